"""Baselines the genetic search is measured against (tools/bench_planner.py).

- Random search: random partitions of the GPU pool, each turned into pipelines by the same DP and scored by
  the same simulation, for the same time budget.
- The published prototype's approach: for a group, enumerate the ways to cut each host's GPUs into TP
  groups, use all of them as stages in host order, and split the layers uniformly; no elitism in the search.
"""

from __future__ import annotations

import itertools
import random
import time
from functools import lru_cache

from hexgen_zmq.planner import constants as C
from hexgen_zmq.planner.costmodel import CostModel
from hexgen_zmq.planner.evaluate import Evaluator
from hexgen_zmq.planner.genetic import GaSettings, SearchResult, _Operators, genetic_search
from hexgen_zmq.planner.plan import Group, Pipeline, Stage, pipeline_objective


def random_search(evaluator: Evaluator, seed: int, time_budget: float) -> SearchResult:
    """Best of random partitions evaluated within the budget."""
    start = time.perf_counter()
    ops = _Operators(evaluator.cm.cluster, random.Random(seed))
    best = evaluator.evaluate(ops.random_genome())
    trace = [(time.perf_counter() - start, best)]
    samples = 1
    while time.perf_counter() - start < time_budget:
        candidate = evaluator.evaluate(ops.random_genome())
        samples += 1
        if candidate.score.key > best.score.key:
            best = candidate
            trace.append((time.perf_counter() - start, best))
    return SearchResult(best, evaluator.evaluations, samples, time.perf_counter() - start, trace, "time budget")


@lru_cache(maxsize=None)
def _tp_splits(count: int, degrees: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Ways to cut `count` GPUs entirely into TP groups of the given degrees (largest first)."""
    out: list[tuple[int, ...]] = []

    def walk(left: int, largest: int, prefix: tuple[int, ...]) -> None:
        if left == 0:
            out.append(prefix)
            return
        for d in degrees:
            if d <= min(left, largest):
                walk(left - d, d, (*prefix, d))

    walk(count, max(degrees), ())
    return tuple(out)


def uniform_pipeline(cm: CostModel, group: Group) -> Pipeline | None:
    """The prototype's pipeline: TP enumeration per host, every GPU used, layers split uniformly."""
    degrees = tuple(sorted(cm.tp_degrees, reverse=True))
    L = cm.model.num_hidden_layers
    slots = cm.cluster.slots
    best: Pipeline | None = None
    per_slot = [[[(slot, tp) for tp in split] for split in _tp_splits(count, degrees)] for slot, count in group]
    combos = itertools.islice(itertools.product(*per_slot), C.PROTOTYPE_MAX_COMBINATIONS)
    for choice in combos:
        cuts = [st for part in choice for st in part]
        n = len(cuts)
        if not cuts or n > L:
            continue
        base, extra = divmod(L, n)
        sizes = [base + (1 if i >= n - extra else 0) for i in range(n)]
        stages, start = [], 0
        for (slot, tp), size in zip(cuts, sizes):
            stages.append(Stage(slot, tp, start, start + size))
            start += size
        fits = all(
            cm.stage_memory(slots[s.slot].gpu, s.tp, s.layers, i == 0, i == n - 1) <= cm.usable_bytes(slots[s.slot].gpu)
            for i, s in enumerate(stages)
        )
        if not fits:
            continue
        cost = pipeline_objective(cm, tuple(stages))
        if best is None or cost < best.cost:
            best = Pipeline(tuple(stages), cost)
    return best


def prototype_search(cm: CostModel, gaps: list[float], seed: int, time_budget: float) -> SearchResult:
    """The prototype's approach: uniform layer split with TP enumeration, genetic search without an elite."""
    evaluator = Evaluator(cm, gaps, builder=uniform_pipeline)
    return genetic_search(evaluator, seed, time_budget, GaSettings(elite=0, stagnation=C.STAGNATION_GENERATIONS))
