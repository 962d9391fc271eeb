"""`hexgen-zmq up` as a user runs it: ready handshake, serving, clean stop, and a dead process reported."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hexgen_zmq.serving.client import Client
from tests.support import hf_greedy, write_deployment


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def assert_gone(pids: list[int], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)


def stop_up(process: subprocess.Popen) -> None:
    """After a failure too: SIGTERM, so `up` stops its children (they have sessions of their own and would
    outlive a SIGKILLed supervisor); SIGKILL only if it does not exit."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def start_up(config: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "hexgen_zmq.cli", "up", str(config), "--threads", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if "ready; clients connect to" in line:
            return process
        if not line and process.poll() is not None:
            raise AssertionError(f"up exited early: {process.stderr.read()}")
    process.kill()
    raise AssertionError("up did not become ready")


def test_up_serves_and_stops_cleanly_on_sigterm(tiny_model, tmp_path):
    config = write_deployment(tmp_path, tiny_model, [[(0, 4, 1), (4, 6, 1)], [(0, 3, 1), (3, 5, 1), (5, 6, 1)]])
    process = start_up(config)
    try:
        pids = children(process.pid)
        assert len(pids) == 6  # broker + 5 stages

        async def ask():
            from hexgen_zmq.operations.deployment import load_deployment

            async with await Client.connect(load_deployment(config).broker.clients) as client:
                return await asyncio.wait_for(client.generate(prompt_ids=[3, 1, 4, 1, 5], max_new_tokens=10), 60)

        assert asyncio.run(ask()).token_ids == hf_greedy(tiny_model, [3, 1, 4, 1, 5], 10)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert_gone(pids)
    finally:
        stop_up(process)


def test_up_restarts_a_dead_process_and_the_deployment_serves_again(tiny_model, tmp_path):
    config = write_deployment(tmp_path, tiny_model, [[(0, 2, 1), (2, 6, 1)]], stage_timeout_s=1.5)
    process = start_up(config)
    try:
        pids = children(process.pid)
        victim = pids[-1]  # the last stage started
        os.kill(victim, signal.SIGKILL)

        async def serves_again():
            from hexgen_zmq.operations.deployment import load_deployment

            async with await Client.connect(load_deployment(config).broker.clients) as client:
                result = await asyncio.wait_for(client.generate(prompt_ids=[2, 7, 1], max_new_tokens=8), 120)
                status = await client.status()
                return result, status

        result, status = asyncio.run(serves_again())
        assert result.token_ids == hf_greedy(tiny_model, [2, 7, 1], 8)

        async def reported_running():  # supervisors report on every change, and every second
            from hexgen_zmq.operations.deployment import load_deployment

            async with await Client.connect(load_deployment(config).broker.clients) as client:
                for _ in range(100):
                    status = await client.status()
                    if {p.name: p for p in status.hosts[0].processes}["p0s1:0"].state == "running":
                        return status
                    await asyncio.sleep(0.1)
            return status

        status = asyncio.run(reported_running())
        assert process.poll() is None, "one process dying no longer stops the deployment"
        new_pids = children(process.pid)
        assert victim not in new_pids and len(new_pids) == len(pids)
        [host] = status.hosts
        restarted = {p.name: p for p in host.processes}["p0s1:0"]
        assert restarted.restarts == 1 and restarted.last_exit == -signal.SIGKILL and restarted.state == "running"
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert_gone(new_pids)
    finally:
        stop_up(process)


def test_a_killed_up_takes_its_processes_with_it_and_a_new_up_serves(tiny_model, tmp_path):
    """SIGKILL gives `up` no chance to stop its children (each in a session of its own): they end by
    themselves, freeing their ports, so the supervisor's restart (systemd's, say) can start and serve."""
    config = write_deployment(tmp_path, tiny_model, [[(0, 3, 1), (3, 6, 1)]])
    process = start_up(config)
    try:
        pids = children(process.pid)
        assert len(pids) == 3  # broker + 2 stages
        process.kill()
        process.wait(30)
        assert_gone(pids, timeout_s=30)
    finally:
        stop_up(process)
    again = start_up(config)
    try:
        async def ask():
            from hexgen_zmq.operations.deployment import load_deployment

            async with await Client.connect(load_deployment(config).broker.clients) as client:
                return await asyncio.wait_for(client.generate(prompt_ids=[2, 7, 1], max_new_tokens=6), 60)

        assert asyncio.run(ask()).token_ids == hf_greedy(tiny_model, [2, 7, 1], 6)
    finally:
        stop_up(again)


def test_up_rejects_a_bad_file_with_its_field_path(tiny_model, tmp_path):
    config = write_deployment(tmp_path, tiny_model, [[(0, 2, 1), (3, 6, 1)]])
    result = subprocess.run([sys.executable, "-m", "hexgen_zmq.cli", "up", str(config)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "pipelines[0].stages[1].layers" in result.stderr


def test_up_stopped_while_starting_leaves_no_process(tiny_model, tmp_path):
    """SIGTERM before every process is ready (a supervisor giving up) still stops every child."""
    config = write_deployment(tmp_path, tiny_model, [[(0, 3, 1), (3, 6, 1)]])
    process = subprocess.Popen([sys.executable, "-m", "hexgen_zmq.cli", "up", str(config), "--threads", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(pids := children(process.pid)) < 3 and time.monotonic() < deadline:  # broker + 2 stages spawned
            time.sleep(0.02)
        assert len(pids) == 3
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)  # returns once every child let go of the pipes too
        assert process.returncode == 0
        assert "stopped during start-up" in err
        assert_gone(pids)
    finally:
        stop_up(process)


@pytest.mark.parametrize("per_process", [False, True])
def test_rendered_systemd_units_verify(tiny_model, tmp_path, per_process):
    import shutil

    config = write_deployment(tmp_path, tiny_model, [[(0, 3, 1), (3, 6, 1)]])
    out = tmp_path / "units"
    args = [sys.executable, "-m", "hexgen_zmq.cli", "render", "systemd", str(config), "--host", "127.0.0.1",
            "--out", str(out)] + (["--per-process"] if per_process else [])
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    units = sorted(p.name for p in out.iterdir())
    if per_process:
        assert units == ["hexgen-zmq-127.0.0.1-broker.service", "hexgen-zmq-127.0.0.1-p0s0-0.service",
                         "hexgen-zmq-127.0.0.1-p0s1-0.service", "hexgen-zmq-127.0.0.1.target"]
        assert "Restart=on-failure" in (out / units[1]).read_text()
    else:
        assert units == ["hexgen-zmq-127.0.0.1.service"]
        assert f"up {config} --host 127.0.0.1" in (out / units[0]).read_text()
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    check = subprocess.run(["systemd-analyze", "verify", *(str(out / u) for u in units)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert "hexgen-zmq" not in check.stderr, check.stderr  # no warning about our units


def test_a_supervisor_for_a_host_given_nothing_yet_waits_for_the_file(tiny_model, tmp_path):
    from hexgen_zmq.operations.launcher import LaunchError
    from hexgen_zmq.operations.supervisor import Supervisor

    def two_hosts(spec):
        spec["hosts"] = [{"name": "here", "address": "127.0.0.1"}, {"name": "spare", "address": "127.0.0.1"}]

    config = write_deployment(tmp_path, tiny_model, [[(0, 6, 1)]], edit=two_hosts)
    spare = Supervisor(config, "spare")
    try:
        assert spare.wanted == {}
        spare.wait_ready(5)  # nothing to start: ready at once, and it goes on following the file
    finally:
        spare.stop()
    with pytest.raises(LaunchError, match="hosts: here, spare"):
        Supervisor(config, "elsewhere")


def test_the_cli_loads_no_torch_before_a_subcommand_runs():
    """Stage processes set OMP_WAIT_POLICY before torch loads (OpenMP reads it once): building the parser,
    which imports every subcommand's module, must not import torch."""
    code = ("import sys; from hexgen_zmq.cli import build_parser; build_parser(); "
            "import hexgen_zmq.stage.core_share; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False", out.stderr
