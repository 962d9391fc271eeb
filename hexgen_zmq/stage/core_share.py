"""Sharing a machine's cores among the stage processes on it: a stage that computes alone uses the idle cores,
stages that compute at once use their base share.

Under load every stage of the machine is busy and each keeps its base threads (`--threads`, by default the
machine's cores divided among its ranks). A lone request leaves all but one stage idle, and with a fixed
share it would run on one core of several. So each stage process says on a board shared by the processes
of the machine how many threads it is computing with right now (0 while it waits), and before each layer
takes what the others leave: `threads_for(base, most, others)`. A stage that starts computing claims its
base at once, and one that had spread over the idle cores gives them back within a layer.

The board is one small shared-memory file per machine (processes of every deployment, and of every emulated
host in a network namespace, share the cores, so they share the board): 64 slots of (pid, threads) as int32.
A process takes a free slot under a file lock when it starts; a slot whose process died is free again, and
its claim is ignored. Torch-free: the stage process applies the figure with `torch.set_num_threads`.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from collections.abc import Callable
from pathlib import Path

BOARD_PATH = Path("/dev/shm/hexgen-zmq-cores")
SLOTS = 64
_SLOT_BYTES = 8  # pid, threads


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
            view = memoryview(self._map).cast("i")
            for slot in range(SLOTS):
                pid = view[2 * slot]
                if pid == 0 or pid == self.pid or not _alive(pid):
                    view[2 * slot], view[2 * slot + 1] = self.pid, 0
                    self.slot, self.view = slot, view
                    break
        except OSError:
            pass
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def claim(self, threads: int) -> None:
        if self.view is not None:
            self.view[2 * self.slot + 1] = threads

    def others(self) -> int | None:
        """Threads the other live processes on the board are computing with now (None: no board)."""
        view = self.view
        if view is None:
            return None
        total = 0
        for slot in range(SLOTS):
            threads = view[2 * slot + 1]
            if threads and slot != self.slot and _alive(view[2 * slot]):
                total += threads
        return total

    def close(self) -> None:
        if self.view is not None:
            self.view[2 * self.slot], self.view[2 * self.slot + 1] = 0, 0
            self.view.release()
            self._map.close()
            self.view = None


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
