"""A process that a supervisor (`up`) started ends when the supervisor dies, however it dies.

Children run in sessions of their own (a Ctrl-C meant for `up` must not reach them before `up` stops them
in order), so a SIGKILLed or crashed supervisor would leave them running: holding their ports, so that the
supervisor's restart could not start its own, and serving a layout nobody watches. The parent passes its pid
in the environment; the child asks the kernel (Linux prctl PR_SET_PDEATHSIG) for SIGTERM, its ordinary stop,
when the parent goes, and stops at once if the parent is gone already. Elsewhere it is a no-op.

The kernel sends the signal when the *thread* that started the child ends, so children are started from the
supervisor's main thread.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT_ENV = "HEXGEN_ZMQ_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def child_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for a child that must end with this process."""
    return {**env, PARENT_ENV: str(os.getpid())}


def follow_parent() -> bool:
    """In a child started with `child_env`: have SIGTERM sent to this process when its parent dies (and send
    it now if the parent is gone). The variable is removed, so that this process's own children do not take
    it for theirs. Returns whether the request was made."""
    value = os.environ.pop(PARENT_ENV, None)
    if value is None or not sys.platform.startswith("linux"):
        return False
    try:
        parent = int(value)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (ValueError, OSError, AttributeError):
        return False
    if os.getppid() != parent:  # it died between fork and prctl: nobody would signal us
        os.kill(os.getpid(), signal.SIGTERM)
    return True
