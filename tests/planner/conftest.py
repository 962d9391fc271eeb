"""Fixtures for the planner tests (helpers in planner_helpers)."""

from __future__ import annotations

import pytest
from planner_helpers import TINY, small_cluster

from hexgen_zmq.planner.costmodel import CostModel, Workload


@pytest.fixture
def tiny_workload() -> Workload:
    return Workload(prompt_len=128, output_len=16, rate=20.0, slo=0.5, max_batch=4)


@pytest.fixture
def mixed_cm(tiny_workload: Workload) -> CostModel:
    cluster = small_cluster([
        ("a", "r1", {"small": 2, "tiny": 1}),
        ("b", "r1", {"roomy": 2}),
        ("c", "r2", {"tiny": 2, "small": 1}),
    ])
    return CostModel(cluster, TINY, tiny_workload)
