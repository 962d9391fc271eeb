"""The supervisor's decisions without processes: which processes a host runs, what a new deployment file
stops and starts, and restarts with back-off and a crash-loop limit."""

from __future__ import annotations

from hexgen_zmq.operations.deployment import load_deployment
from hexgen_zmq.operations.supervision import (BACKOFF, FAILED, STOPPING, RestartPolicy, Supervision, host_processes,
                                    plan_change)


def two_host_file(layers_b=(3, 6)) -> dict:
    return {
        "model": {"path": "/nowhere"},
        "hosts": [{"name": "a", "address": "10.1.0.2"}, {"name": "b", "address": "10.2.0.2"}],
        "broker": {"host": "a", "clients": "tcp://10.1.0.2:5555", "results": "tcp://10.1.0.2:5556"},
        "pipelines": [
            {"id": "p0", "stages": [
                {"id": "p0s0", "layers": [0, layers_b[0]], "inbound": "tcp://10.1.0.2:6000", "tp_init": "tcp://127.0.0.1:6100",
                 "ranks": [{"host": "a"}, {"host": "a"}]},
                {"id": "p0s1", "layers": list(layers_b), "inbound": "tcp://10.2.0.2:6000", "tp_init": "tcp://127.0.0.1:6100",
                 "ranks": [{"host": "10.2.0.2"}]},
            ]},
            {"id": "p1", "stages": [
                {"id": "p1s0", "layers": [0, 6], "inbound": "tcp://10.2.0.2:6001", "tp_init": "tcp://127.0.0.1:6101",
                 "ranks": [{"host": "b"}]},
            ]},
        ],
    }


def test_each_host_runs_its_own_processes_named_or_by_address():
    deployment = load_deployment(two_host_file(), check_checkpoint=False)
    assert set(host_processes(deployment, "a")) == {"broker", "p0s0:0", "p0s0:1"}
    assert set(host_processes(deployment, "b")) == {"p0s1:0", "p1s0:0"}  # p0s1 is placed by b's address
    assert len(host_processes(deployment, None)) == 5
    assert host_processes(deployment, "c") == {}


def test_a_new_file_restarts_only_the_pipeline_it_changes():
    old = load_deployment(two_host_file(), check_checkpoint=False)
    new = load_deployment(two_host_file(layers_b=(4, 6)), check_checkpoint=False)
    for host in ("a", "b"):
        change = plan_change(host_processes(old, host), host_processes(new, host))
        p0 = {n for n in host_processes(old, host) if n.startswith("p0")}
        assert set(change.stop) == p0 and set(change.start) == p0
    assert plan_change(host_processes(old, "b"), host_processes(old, "b")).empty


def test_an_exiting_process_backs_off_exponentially_then_is_given_up_on():
    policy = RestartPolicy(initial_backoff_s=1, max_backoff_s=4, crash_loop_exits=5, crash_loop_window_s=100,
                           stable_s=50)
    deployment = load_deployment(two_host_file(), check_checkpoint=False)
    supervision = Supervision(policy)
    spec = host_processes(deployment, "b")["p1s0:0"]
    supervision.add(spec, now=0)
    now, waits = 0.0, []
    assert supervision.due(now) == ["p1s0:0"]
    for _ in range(4):
        supervision.started("p1s0:0", 123, now)
        now += 2
        assert supervision.exited("p1s0:0", 1, now) == BACKOFF
        waits.append(supervision.processes["p1s0:0"].next_start - now)
        assert supervision.due(now) == []
        now += waits[-1]
        assert supervision.due(now) == ["p1s0:0"]
    assert waits == [1, 2, 4, 4]
    supervision.started("p1s0:0", 123, now)
    assert supervision.exited("p1s0:0", -9, now + 1) == FAILED
    process = supervision.processes["p1s0:0"]
    assert process.restarts == 4 and process.last_exit == -9 and supervision.due(now + 1000) == []


def test_a_process_that_ran_stably_starts_its_backoff_over_and_a_stopped_one_is_not_restarted():
    policy = RestartPolicy(initial_backoff_s=1, max_backoff_s=30, crash_loop_exits=3, stable_s=10)
    deployment = load_deployment(two_host_file(), check_checkpoint=False)
    supervision = Supervision(policy)
    supervision.add(host_processes(deployment, "b")["p1s0:0"], now=0)
    supervision.started("p1s0:0", 1, 0)
    supervision.exited("p1s0:0", 1, 1)
    supervision.started("p1s0:0", 2, 2)
    assert supervision.exited("p1s0:0", 1, 100) == BACKOFF  # ran 98 s: a fresh start
    assert supervision.processes["p1s0:0"].next_start == 101
    supervision.started("p1s0:0", 3, 101)
    supervision.stopping("p1s0:0")
    assert supervision.exited("p1s0:0", 0, 102) == STOPPING and "p1s0:0" not in supervision.processes
