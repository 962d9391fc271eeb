"""Threads that follow the machine's load: the policy, and the shared board between real processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from hexgen_zmq.stage.core_share import QUIET_S, SLOTS, CoreBoard, CoreShare, threads_for


def test_a_lone_stage_spreads_and_a_busy_machine_keeps_base_shares():
    assert threads_for(base=1, most=2, others=0, cores=2) == 2  # alone on two cores
    assert threads_for(base=1, most=2, others=1, cores=2) == 1  # another stage computes
    assert threads_for(base=1, most=2, others=2, cores=2) == 1  # it had spread: never below the base
    assert threads_for(base=1, most=8, others=3, cores=16) == 8  # capped by --max-threads
    assert threads_for(base=2, most=16, others=20, cores=16) == 2  # oversubscribed: the base still holds


def claimer(board: Path, threads: int, then_idle: bool = False) -> subprocess.Popen:
    """Another process on the board, computing with `threads` until it is killed (or, `then_idle`, ending
    its step at once and staying idle)."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from hexgen_zmq.stage.core_share import CoreBoard
        board = CoreBoard(Path({str(board)!r}))
        board.claim({threads})
        if {then_idle}:
            board.claim(0)
        print("claimed", flush=True)
        time.sleep(60)
    """)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "claimed"
    return process


def test_board_counts_other_live_processes_and_forgets_dead_ones(tmp_path):
    path = tmp_path / "board"
    mine = CoreBoard(path)
    assert mine.others() == 0
    first, second = claimer(path, 1), claimer(path, 2)
    try:
        mine.claim(2)  # its own claim is not counted among the others
        assert mine.others() == 3
        first.kill()
        first.wait(10)
        assert mine.others() == 2  # a process that died (SIGKILL, no cleanup) no longer holds cores
        third = claimer(path, 1)  # and its slot is free again
        try:
            assert mine.others() == 3
        finally:
            third.kill()
            third.wait(10)
    finally:
        second.kill()
        second.wait(10)
    mine.close()
    assert CoreBoard(path).others() == 0


def test_share_claims_while_it_computes_and_releases_when_idle(tmp_path):
    path = tmp_path / "board"
    calls: list[int] = []
    share = CoreShare(1, 2, calls.append, board=CoreBoard(path), cores=2)
    watcher = CoreBoard(path)
    watcher_pid_slot = watcher.slot
    share.fit()
    assert calls == [2]  # alone: both cores
    share.fit()
    assert calls == [2]  # unchanged: no call
    # the watcher shares this process's pid, so it reuses the share's slot: read the raw claim instead
    assert watcher_pid_slot == share.board.slot and share.board.view[4 * share.board.slot + 1] == 2
    other = claimer(path, 1)
    try:
        share.fit()
        assert calls == [2, 1]  # another stage started computing: back to the base within a layer
        share.idle()
        assert share.board.view[4 * share.board.slot + 1] == 0
    finally:
        other.kill()
        other.wait(10)
    time.sleep(QUIET_S)  # the killed claimer's slot: dead, so ignored at once anyway
    share.fit()
    assert calls == [2, 1, 2]
    share.close()


def test_a_stage_that_just_ended_a_step_still_counts_for_the_quiet_time(tmp_path):
    """Between two steps of a loaded stage there is a short gap: spreading into it would oversubscribe."""
    path = tmp_path / "board"
    mine = CoreBoard(path)
    other = claimer(path, 1, then_idle=True)
    try:
        assert mine.others() == 1  # its step ended just now
        time.sleep(QUIET_S * 1.5)
        assert mine.others() == 0  # quiet long enough: its core is free
    finally:
        other.kill()
        other.wait(10)


def test_pinned_share_opens_no_board_and_a_missing_board_keeps_the_base(tmp_path):
    calls: list[int] = []
    pinned = CoreShare(2, 2, calls.append, cores=16)
    assert pinned.board is None and pinned.threads() == 2
    pinned.fit()
    assert calls == []  # it starts at its base: nothing to change
    nowhere = CoreBoard(tmp_path / "no-such-dir" / "board")
    assert nowhere.others() is None
    share = CoreShare(1, 4, calls.append, board=nowhere, cores=4)
    assert share.threads() == 1


def test_a_full_board_leaves_later_processes_at_their_base(tmp_path):
    path = tmp_path / "board"
    path.write_bytes(b"\0" * (SLOTS * 16))
    import mmap

    with open(path, "r+b") as f:
        view = memoryview(mmap.mmap(f.fileno(), SLOTS * 16)).cast("i")
        for slot in range(SLOTS):
            view[4 * slot] = 1  # init: alive, never this process
        view.release()
    board = CoreBoard(path)
    assert board.slot is None and board.others() is None
    board.claim(2)  # a no-op without a slot

