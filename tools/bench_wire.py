"""Benchmark: the cost of moving one activation across a stage boundary (serialise, send, receive, rebuild
the tensor) against a bare pyzmq PUSH/PULL of the same bytes, measured side by side in one run.

    .venv/bin/python tools/bench_wire.py [--iters N] [--curve]

Both sides run over TCP on 127.0.0.1 with the receiver in its own thread, as between two stage processes.
"hexgen" encodes a MicroBatch header plus the tensor with the wire codec and decodes it back into a tensor
on the far side; "bare" sends and receives the tensor's bytes as one frame with nothing around them. The
script also checks that no tensor bytes are copied in Python: the frame handed to pyzmq shares the
tensor's memory, and the received tensor shares the received frame's memory. With --curve it also prints the
wire codec over a CurveZMQ-encrypted pair (what links between hosts use) against the same over plain TCP.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch
import zmq

from hexgen_zmq.wire.messages import MicroBatch, Segment
from hexgen_zmq.wire.codec import decode, encode

SIZES = {"16 KiB": 16 * 1024, "4 MiB": 4 * 1024 * 1024}


def pair(ctx: zmq.Context, curve: bool = False) -> tuple[zmq.Socket, zmq.Socket]:
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    if curve:  # what ProcessSecurity sets on a link between hosts (no ZAP handler: any client key is taken)
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        pull.curve_secretkey, pull.curve_publickey, pull.curve_server = server_secret, server_public, True
        push.curve_secretkey, push.curve_publickey, push.curve_serverkey = client_secret, client_public, server_public
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{port}")
    for s in (push, pull):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 64)
        s.setsockopt(zmq.RCVHWM, 64)
    return push, pull


def run(mode: str, nbytes: int, iters: int, curve: bool = False) -> float:
    """Seconds per message, sender and receiver pipelined (throughput-bound, as in a busy pipeline)."""
    hidden = 1024
    tensor = torch.randn(nbytes // 4 // hidden, hidden) if nbytes >= 4 * hidden else torch.randn(nbytes // 4)
    raw = tensor.numpy().tobytes()
    batch = MicroBatch(1, [Segment(1, 0, max(1, tensor.shape[0]), False)])
    ctx = zmq.Context()
    push, pull = pair(ctx, curve)
    checksum = []

    def receive() -> None:
        total = 0.0
        for _ in range(iters):
            frames = pull.recv_multipart(copy=False)
            if mode == "hexgen":
                _, (out,) = decode(frames)
                total += float(out.view(-1)[0])
            else:
                buf = frames[0].buffer
                total += buf.nbytes
        checksum.append(total)

    receiver = threading.Thread(target=receive)
    receiver.start()
    start = time.perf_counter()
    for _ in range(iters):
        if mode == "hexgen":
            push.send_multipart(encode(batch, [tensor]), copy=False)
        else:
            push.send(raw, copy=False)
    receiver.join()
    elapsed = time.perf_counter() - start
    push.close(), pull.close(), ctx.term()
    return elapsed / iters


def check_zero_copy() -> None:
    tensor = torch.randn(1024, 1024)
    frames = encode(MicroBatch(1, []), [tensor])
    assert torch.frombuffer(frames[1], dtype=torch.uint8).data_ptr() == tensor.data_ptr(), "send side copied"
    ctx = zmq.Context()
    push, pull = pair(ctx)
    push.send_multipart(frames, copy=False)
    received = pull.recv_multipart(copy=False)
    _, (out,) = decode(received)
    assert out.data_ptr() == torch.frombuffer(received[1].buffer, dtype=torch.uint8).data_ptr(), "receive side copied"
    push.close(), pull.close(), ctx.term()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--curve", action="store_true", help="also: the wire over CURVE against over plain TCP")
    args = parser.parse_args()
    torch.set_num_threads(1)
    check_zero_copy()
    print("zero-copy check: the sent frame shares the tensor's memory, the received tensor shares the frame's")
    print(f"{'size':>8} {'bare pyzmq':>14} {'hexgen wire':>14} {'ratio':>7}  (median of {args.repeats} runs)")
    for label, nbytes in SIZES.items():
        iters = args.iters if nbytes < 1 << 20 else max(200, args.iters // 4)
        bare, ours = [], []
        for _ in range(args.repeats):  # interleaved, so both see the same machine state
            bare.append(run("bare", nbytes, iters))
            ours.append(run("hexgen", nbytes, iters))
        b, o = statistics.median(bare), statistics.median(ours)
        print(f"{label:>8} {b * 1e6:>11.1f} us {o * 1e6:>11.1f} us {o / b:>6.2f}x   "
              f"({nbytes / b / 1e9:.2f} vs {nbytes / o / 1e9:.2f} GB/s)")
    if not args.curve:
        return
    print(f"{'size':>8} {'plain TCP':>14} {'CURVE':>14} {'ratio':>7}  (hexgen wire both; median of {args.repeats})")
    for label, nbytes in SIZES.items():
        iters = args.iters if nbytes < 1 << 20 else max(100, args.iters // 10)
        plain, curve = [], []
        for _ in range(args.repeats):
            plain.append(run("hexgen", nbytes, iters))
            curve.append(run("hexgen", nbytes, iters, curve=True))
        p, c = statistics.median(plain), statistics.median(curve)
        print(f"{label:>8} {p * 1e6:>11.1f} us {c * 1e6:>11.1f} us {c / p:>6.2f}x   "
              f"({nbytes / p / 1e9:.2f} vs {nbytes / c / 1e9:.3f} GB/s)")


if __name__ == "__main__":
    main()
