"""One place that makes ZeroMQ sockets: bind or connect, high-water marks, size limits, linger, back-off."""

from __future__ import annotations

import asyncio
import random
import socket as _socket
from typing import Callable

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
    security=None,
    domain: str | None = None,
    before_connect: Callable[[zmq.Socket], None] | None = None,
) -> zmq.Socket:
    """A socket with every option this project relies on set before it binds or connects; with `security`
    (a ProcessSecurity), a CURVE server (bound, ZAP `domain`) or client (connecting) off loopback.
    `before_connect` sees the configured socket first: a monitor must be attached there, because libzmq does
    not retry a handshake refused on protocol or authentication, so its one event can come before a monitor
    attached after connect() exists."""
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
    if security is not None:
        if bind is not None:
            security.server(sock, bind, domain or "")
        else:
            security.client(sock, connect)
    if before_connect is not None:
        before_connect(sock)
    if bind is not None:
        sock.bind(bind)
    else:
        sock.connect(connect)
    return sock


def _retrieve(future) -> None:
    if not future.cancelled():
        future.exception()  # a queued send that failed later: counted by nobody, but never an unread error


def send_now(sock: zmq.Socket, frames: list, copy: bool = True) -> bool:
    """Send without waiting, from any socket; False when it cannot take the message now (its peer's queue is
    full, or a ROUTER's peer is not connected). An asyncio socket reports that in the Future it returns
    (done at once unless an awaited send is still pending, behind which this one then goes), not by raising;
    sending through a synchronous view of the same socket instead would leave the asyncio socket's pending
    receive unwoken (ZeroMQ signals its descriptor by edges)."""
    try:
        result = sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=copy)
    except zmq.ZMQError as exc:
        error = exc
    else:
        if not isinstance(result, asyncio.Future):
            return True
        if not result.done():
            result.add_done_callback(_retrieve)
            return True
        error = result.exception()
        if error is None:
            return True
    if isinstance(error, zmq.Again) or (isinstance(error, zmq.ZMQError) and error.errno == zmq.EHOSTUNREACH):
        return False
    raise error


_random = random.SystemRandom()
_handed_out: set[int] = set()
FREE_PORTS = range(20000, 32000)  # below Linux's ephemeral range (32768-60999), where outgoing connections
# take their local ports: a port handed out there could be taken by a connection before it is bound


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now (for tests and local deployments)."""
    for _ in range(200):
        port = _random.choice(FREE_PORTS)
        if port in _handed_out:  # not bound yet, maybe: a deployment asks for all its ports first
            continue
        with _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            _handed_out.add(port)
            return port
    with _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]

