"""One place that makes ZeroMQ sockets: bind or connect, high-water marks, size limits, linger, back-off."""

from __future__ import annotations

import socket as _socket

import zmq
import zmq.asyncio

ACTIVATION_HWM = 64  # messages queued per peer before a sender waits
ACTIVATION_MAX_BYTES = 1 << 30  # one frame of activations
CONTROL_MAX_BYTES = 16 << 20  # one client or control frame
LINGER_MS = 500


def make_socket(
    ctx: zmq.asyncio.Context | zmq.Context,
    kind: int,
    *,
    bind: str | None = None,
    connect: str | None = None,
    hwm: int = ACTIVATION_HWM,
    max_bytes: int = ACTIVATION_MAX_BYTES,
    identity: bytes | None = None,
) -> zmq.Socket:
    """A socket with every option this project relies on set before it binds or connects."""
    if (bind is None) == (connect is None):
        raise ValueError("give exactly one of bind= or connect=")
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if bind is not None:
        sock.bind(bind)
    else:
        sock.connect(connect)
    return sock


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now (for tests and local deployments)."""
    with _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]

