"""Exhaustive enumeration, the reference the tests hold the dynamic program and the genetic search to.

Only for small instances: every stage sequence of a group, and every partition of a small cluster.
"""

from __future__ import annotations

from collections.abc import Iterator

from hexgen_zmq.planner.costmodel import CostModel
from hexgen_zmq.planner.plan import Genome, Group, Pipeline, Stage, make_genome, pipeline_objective


def all_pipelines(cm: CostModel, group: Group) -> Iterator[tuple[Stage, ...]]:
    """Every memory-feasible stage sequence on distinct GPUs of the group covering all layers."""
    L = cm.model.num_hidden_layers
    slots = cm.cluster.slots

    def fits(stage: Stage, first: bool, last: bool) -> bool:
        gpu = slots[stage.slot].gpu
        used = cm.stage_memory(gpu, stage.tp, stage.layers, first, last)
        return used <= cm.usable_bytes(gpu)

    def extend(prefix: list[Stage], start: int, free: dict[int, int]) -> Iterator[tuple[Stage, ...]]:
        for slot, count in free.items():
            for tp in cm.tp_degrees:
                if tp > count:
                    continue
                for end in range(start + 1, L + 1):
                    stage = Stage(slot, tp, start, end)
                    if not fits(stage, start == 0, end == L):
                        continue
                    if end == L:
                        yield (*prefix, stage)
                    else:
                        rest = dict(free)
                        rest[slot] -= tp
                        yield from extend([*prefix, stage], end, rest)

    yield from extend([], 0, dict(group))


def brute_force_pipeline(cm: CostModel, group: Group) -> Pipeline | None:
    """The cheapest pipeline by enumeration."""
    best: Pipeline | None = None
    for stages in all_pipelines(cm, group):
        cost = pipeline_objective(cm, stages)
        if best is None or cost < best.cost:
            best = Pipeline(stages, cost)
    return best


def all_genomes(slot_counts: dict[int, int]) -> list[Genome]:
    """Every partition of the GPUs into groups (GPUs of one slot are interchangeable)."""
    gpus = [slot for slot, count in sorted(slot_counts.items()) for _ in range(count)]
    seen: set[Genome] = set()

    def partitions(i: int, groups: list[dict[int, int]]) -> None:
        if i == len(gpus):
            seen.add(make_genome([dict(g) for g in groups]))
            return
        slot = gpus[i]
        for g in groups:
            g[slot] = g.get(slot, 0) + 1
            partitions(i + 1, groups)
            g[slot] -= 1
        groups.append({slot: 1})
        partitions(i + 1, groups)
        groups.pop()

    partitions(0, [])
    return sorted(seen)
