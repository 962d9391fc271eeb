"""A userspace delay line for emulated links: hold every packet of a TUN device for a fixed time.

This kernel has no `netem`, so `tools/sites.py` routes each direction of an inter-region link through a TUN
device in the router namespace and runs this program there: it reads every packet the kernel routes into a
TUN, keeps it for that TUN's delay, and writes it back into the same TUN, from where the kernel routes it on
to the destination region. Addresses are untouched (no proxy). Bandwidth is not this program's job: a
`tc tbf` on the TUN limits what reaches it.

    ip netns exec NS python tools/delay_line.py --tun t0:20 --tun t1:20

The TUN devices must already exist in the namespace (`ip tuntap add dev t0 mode tun`). The program prints
`ready` once it holds every device, and runs until it is killed.
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import os
import select
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
MAX_PACKET = 65536


def open_tun(name: str) -> int:
    """Attach to the existing TUN device `name` (no packet-info header) and return its non-blocking fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def parse_tun(text: str) -> tuple[str, float]:
    """`NAME:DELAY_MS` -> (name, delay in seconds)."""
    name, _, delay_ms = text.partition(":")
    if not name or not delay_ms:
        raise argparse.ArgumentTypeError(f"expected NAME:DELAY_MS, got {text!r}")
    return name, float(delay_ms) / 1000.0


def run(tuns: list[tuple[str, float]]) -> None:
    """Forward packets of every TUN back into it after its delay; never returns.

    A delay is the same for every packet of a TUN, so each TUN's queue is FIFO and only its head is due next.
    """
    fds = {open_tun(name): delay for name, delay in tuns}
    queues: dict[int, collections.deque[tuple[float, bytes]]] = {fd: collections.deque() for fd in fds}
    print("ready", flush=True)
    while True:
        now = time.monotonic()
        next_due = None
        for fd, queue in queues.items():
            while queue and queue[0][0] <= now:
                try:
                    os.write(fd, queue.popleft()[1])
                except OSError:
                    pass  # the kernel refused it (a device going down): lost, as on a real link
            if queue and (next_due is None or queue[0][0] < next_due):
                next_due = queue[0][0]
        timeout = None if next_due is None else max(0.0, next_due - now)
        readable, _, _ = select.select(list(fds), [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            while True:
                try:
                    packet = os.read(fd, MAX_PACKET)
                except BlockingIOError:
                    break
                queues[fd].append((now + fds[fd], packet))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tun", type=parse_tun, action="append", required=True, help="NAME:DELAY_MS")
    args = parser.parse_args(argv)
    try:
        os.nice(-10)  # stages keep the CPUs busy: a late wake-up would lengthen the link's latency
    except OSError:
        pass
    try:
        run(args.tun)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
