"""Sharing a machine's cores among the stage processes on it: a stage that computes alone uses the idle cores,
stages that compute at once use their base share.

Under load every stage of the machine is busy and each keeps its base threads (`--threads`, by default the
machine's cores divided among its ranks). A lone request leaves all but one stage idle, and with a fixed
share it would run on one core of several. So each stage process says on a board shared by the processes
of the machine how many threads it is computing with right now (0 while it waits), and before each layer
takes what the others leave: `threads_for(base, most, others, cores)`. A stage counts as computing while it
is in a step and for QUIET_S after (a loaded pipeline's stages pause between steps for far less), so that
only a stage whose neighbours have really gone quiet spreads: spreading into the gap between two of another
stage's steps would oversubscribe the cores at once, and OpenMP's barriers make that cost far more than the
gap was worth (measured: the tiny model's embedded layout under 32 streams fell from 2,012 to 1,156 tok/s
without the quiet time). A stage that starts computing claims its base at once, and one that had spread
gives the cores back within a layer.

The board is one small shared-memory file per machine (processes of every deployment, and of every emulated
host in a network namespace, share the cores, so they share the board): 64 slots of (pid, threads) as int32
and the time (CLOCK_MONOTONIC, shared by every process) its last step ended, as a float64.
A process takes a free slot under a file lock when it starts; a slot whose process died is free again, and
its claim is ignored. Torch-free: the stage process applies the figure with `torch.set_num_threads`.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import time
from collections.abc import Callable
from pathlib import Path

BOARD_PATH = Path("/dev/shm/hexgen-zmq-cores-v2")  # the version of the slot layout
SLOTS = 64
_SLOT_BYTES = 16  # pid, threads (int32 each), end of the last step (float64)
QUIET_S = 0.05  # a stage whose last step ended this recently still counts as computing


def passive_openmp() -> bool:
    """Make torch's OpenMP threads sleep as soon as a parallel region ends (OMP_WAIT_POLICY=PASSIVE) where a
    CPU stage's matrix products run on `_matmul.c`'s own pool, unless the environment already says; called by
    a stage process before it imports torch, as OpenMP reads it once. Returns whether it is set.

    That pool's workers spin briefly between the products of a step; OpenMP's threads, spinning by default
    after each of torch's parallel ops (sampling's reductions over the vocabulary, prompt steps), would fight
    them for the same cores. Measured: a SmolLM2 bfloat16 step of one row took 24.5 ms with spinning OpenMP
    threads and 17.5 ms with sleeping ones. Where the products are oneDNN's instead (no AVX2 or AVX-512, the
    extension missing or switched off), OpenMP keeps spinning: oneDNN forks a parallel
    region per product, and waking sleeping threads for each doubled that step's time."""
    if os.environ.get("HEXGEN_ZMQ_KERNELS", "1") == "0" or os.environ.get("HEXGEN_ZMQ_BLOCKED", "1") == "0":
        return "OMP_WAIT_POLICY" in os.environ
    try:
        from hexgen_zmq.model import _kernels  # the C extension alone: no torch
    except ImportError:
        return "OMP_WAIT_POLICY" in os.environ
    if _kernels.matmul_supported(True):  # float32 and bfloat16 products both on the pool
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return "OMP_WAIT_POLICY" in os.environ


def threads_for(base: int, most: int, others: int, cores: int) -> int:
    """Threads for a stage about to compute: at least its base share, and up to `most` of the `cores` that the
    other stage processes (computing with `others` threads in all) leave idle."""
    return max(base, min(most, cores - others))


def machine_cores() -> int:
    """The cores this process may run on (its affinity, which a container or taskset may narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class CoreBoard:
    """This process's slot on the machine's board: `claim(threads)` while computing, `others()` to read the
    rest. Opening it never fails a stage: without /dev/shm (or with every slot taken) `others()` is None and
    the stage keeps its base threads."""

    def __init__(self, path: Path = BOARD_PATH):
        self.slot: int | None = None
        self.view: memoryview | None = None
        self.times: memoryview | None = None
        self.pid = os.getpid()
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_size < SLOTS * _SLOT_BYTES:
                os.ftruncate(fd, SLOTS * _SLOT_BYTES)
            self._map = mmap.mmap(fd, SLOTS * _SLOT_BYTES)
            view, times = memoryview(self._map).cast("i"), memoryview(self._map).cast("d")
            for slot in range(SLOTS):
                pid = view[4 * slot]
                if pid == 0 or pid == self.pid or not _alive(pid):
                    view[4 * slot], view[4 * slot + 1], times[2 * slot + 1] = self.pid, 0, 0.0
                    self.slot, self.view, self.times = slot, view, times
                    break
        except OSError:
            pass
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def claim(self, threads: int) -> None:
        """Say how many threads this process computes with now; 0 when its step ends."""
        if self.view is not None:
            if threads == 0 and self.view[4 * self.slot + 1]:
                self.times[2 * self.slot + 1] = time.monotonic()
            self.view[4 * self.slot + 1] = threads

    def others(self) -> int | None:
        """Threads the other live processes on the board compute with now, a process whose last step ended
        within QUIET_S counting as one (None: no board)."""
        view, times = self.view, self.times
        if view is None:
            return None
        total, now = 0, time.monotonic()
        for slot in range(SLOTS):
            pid = view[4 * slot]
            if not pid or slot == self.slot:
                continue
            threads = view[4 * slot + 1]
            if threads or now - times[2 * slot + 1] < QUIET_S:
                if _alive(pid):
                    total += max(threads, 1)
        return total

    def close(self) -> None:
        if self.view is not None:
            self.view[4 * self.slot], self.view[4 * self.slot + 1] = 0, 0
            self.view.release()
            self.times.release()
            self._map.close()
            self.view = self.times = None


class CoreShare:
    """How many threads this stage computes with, layer by layer: `fit()` before each layer (it calls
    `set_threads` when the figure changes), `idle()` when a step ends. `most` = base pins the stage to its
    base share (and opens no board)."""

    def __init__(self, base: int, most: int, set_threads: Callable[[int], None], board: CoreBoard | None = None,
                 cores: int | None = None):
        self.base, self.most = max(1, base), max(1, base, most)
        self.cores = cores or machine_cores()
        self.set_threads = set_threads
        self.current = self.base
        self.board = board if board is not None else (CoreBoard() if self.most > self.base else None)

    def threads(self) -> int:
        """Claim and return the threads to compute with now."""
        others = self.board.others() if self.board is not None else None
        n = self.base if others is None else threads_for(self.base, self.most, others, self.cores)
        if self.board is not None:
            self.board.claim(n)
        return n

    def fit(self) -> None:
        n = self.threads()
        if n != self.current:
            self.set_threads(n)
            self.current = n

    def idle(self) -> None:
        if self.board is not None:
            self.board.claim(0)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
