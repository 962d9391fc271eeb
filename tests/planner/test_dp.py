import itertools
import math

import pytest

from hexgen_zmq.planner.costmodel import CostModel, Workload
from hexgen_zmq.planner.dp import best_pipeline
from hexgen_zmq.planner.exhaustive import brute_force_pipeline
from hexgen_zmq.planner.model import PRESETS
from hexgen_zmq.planner.plan import pipeline_objective

from planner_helpers import TINY, small_cluster

GROUPS = [
    ((0, 2),),
    ((0, 1), (1, 1)),
    ((0, 2), (1, 1)),
    ((2, 2),),
    ((0, 1), (2, 1), (3, 1)),
    ((3, 2), (4, 1)),
    ((0, 2), (3, 2)),
    ((1, 1), (3, 1), (4, 1), (2, 1)),
    ((0, 2), (1, 1), (3, 1)),
    ((4, 1),),
]


def _canon(group):
    return tuple(sorted(group))


@pytest.mark.parametrize("group", [_canon(g) for g in GROUPS])
@pytest.mark.parametrize("batch", [1, 4])
def test_dp_equals_brute_force(mixed_cm, group, batch):
    w = mixed_cm.workload
    cm = CostModel(mixed_cm.cluster, TINY, Workload(w.prompt_len, w.output_len, w.rate, w.slo, max_batch=batch))
    dp, brute = best_pipeline(cm, group), brute_force_pipeline(cm, group)
    if brute is None:
        assert dp is None
        return
    assert dp is not None
    assert math.isclose(dp.cost, brute.cost, rel_tol=1e-9)
    assert math.isclose(pipeline_objective(cm, dp.stages), dp.cost, rel_tol=1e-9)


def test_dp_equals_brute_force_across_regions_with_slow_wan(tiny_workload):
    cluster = small_cluster([("a", "r1", {"small": 1, "tiny": 1}), ("b", "r2", {"small": 1}), ("c", "r3", {"tiny": 2})],
                            wan_ms=40)
    cm = CostModel(cluster, TINY, tiny_workload)
    slots = [(s.index, s.count) for s in cluster.slots]
    for size in range(1, len(slots) + 1):
        for group in itertools.combinations(slots, size):
            dp, brute = best_pipeline(cm, group), brute_force_pipeline(cm, group)
            assert (dp is None) == (brute is None)
            if dp:
                assert math.isclose(dp.cost, brute.cost, rel_tol=1e-9)


def test_dp_pipelines_cover_all_layers_once_and_fit(mixed_cm):
    L = TINY.num_hidden_layers
    for group in GROUPS:
        p = best_pipeline(mixed_cm, _canon(group))
        if p is None:
            continue
        assert p.stages[0].start == 0 and p.stages[-1].end == L
        assert all(a.end == b.start for a, b in zip(p.stages, p.stages[1:]))
        available = dict(group)
        assert all(c <= available.get(s, 0) for s, c in p.group())
        for i, st in enumerate(p.stages):
            gpu = mixed_cm.cluster.slots[st.slot].gpu
            mem = mixed_cm.stage_memory(gpu, st.tp, st.layers, i == 0, i == len(p.stages) - 1)
            assert mem <= mixed_cm.usable_bytes(gpu)


def test_llama_70b_does_not_fit_six_24gb_gpus_but_fits_eight():
    cluster = small_cluster([("a", "r", {"RTX3090Ti": 8})])
    cm = CostModel(cluster, PRESETS["llama-2-70b"], Workload(512, 128, 1.0, 60.0))
    assert best_pipeline(cm, ((0, 6),)) is None
    p = best_pipeline(cm, ((0, 8),))
    assert p is not None and sum(st.tp for st in p.stages) == 8
