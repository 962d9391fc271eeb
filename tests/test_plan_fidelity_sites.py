"""tools/plan_fidelity.py end to end over emulated datacenters (needs root, network namespaces, TUN): two
hosts in two regions are profiled in their namespaces, planned, deployed and benched at one rate, and the
figures it writes say which pipeline served what, predicted beside measured. A smoke test of the path,
not of the figures: a small model, a few requests, the planner's plan only."""

from __future__ import annotations

import json

import pytest

from tools import plan_fidelity
from tools.sites import unavailable_reason

pytestmark = [pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason())),
              pytest.mark.timeout(240)]


def test_profile_plan_deploy_and_bench_two_emulated_hosts(tmp_path):
    assert plan_fidelity.main(["--sites", "--latency-ms", "2", "--requests", "6", "--fractions", "0.5",
                               "--profile-repeats", "2", "--profile-batches", "1,4",
                               "--profile-contexts", "64", "--quiet-wait-s", "0", "--plans", "planner",
                               "--layers", "4", "--hidden", "192", "--intermediate", "512", "--slo", "30",
                               "--plan-budget", "1", "--model-requests", "200", "--prefix", "hxpft",
                               "--subnet", "10.247.0.0/16", "--keep", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())["planner"]
    profiles = sorted(p.name for p in tmp_path.glob("profile-*.yaml"))
    assert profiles == ["profile-a.yaml", "profile-b.yaml"]
    assert "links:" in (tmp_path / "profile-a.yaml").read_text()  # the probe ran between the namespaces
    rows = {row["pipeline"]: row for row in results["table"]}
    assert rows["all"]["requests"][1] == 6  # every request measured
    served = [row["requests"][1] for pid, row in rows.items() if pid != "all"]
    assert sum(served) == 6  # and each one attributed to the pipeline that served it
    assert all(x > 0 for x in rows["all"]["ttft_s"] + rows["all"]["tpot_s"])
