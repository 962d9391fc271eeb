"""What a plan is: groups of GPUs, pipelines of stages, and a pipeline's timing as the simulator sees it.

A *group* is a multiset of GPUs, written as `((slot, count), ...)` sorted by slot; a *genome* (one point of
the genetic search) is a sorted tuple of groups that together hold every GPU of the cluster exactly once.
The dynamic program turns a group into a `Pipeline` (or none when the model does not fit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hexgen_zmq.planner import constants as C
from hexgen_zmq.planner.costmodel import CostModel

Group = tuple[tuple[int, int], ...]
Genome = tuple[Group, ...]


def make_group(counts: dict[int, int]) -> Group:
    """Canonical group from {slot: count}; zero counts dropped."""
    return tuple(sorted((s, c) for s, c in counts.items() if c > 0))


def make_genome(groups: list[Group] | list[dict[int, int]]) -> Genome:
    """Canonical genome: groups canonicalised, empty ones dropped, sorted."""
    canon = [g if isinstance(g, tuple) else make_group(g) for g in groups]
    return tuple(sorted(g for g in canon if g))


@dataclass(frozen=True, slots=True, order=True)
class Stage:
    """`tp` GPUs of one slot running decoder layers [start, end)."""

    slot: int
    tp: int
    start: int
    end: int

    @property
    def layers(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Pipeline:
    stages: tuple[Stage, ...]
    cost: float  # the DP objective: seconds one request takes at the planned batch, without queueing

    def group(self) -> Group:
        """The GPUs this pipeline uses."""
        counts: dict[int, int] = {}
        for st in self.stages:
            counts[st.slot] = counts.get(st.slot, 0) + st.tp
        return make_group(counts)


def pipeline_objective(cm: CostModel, stages: tuple[Stage, ...]) -> float:
    """The DP's objective, computed directly: prefill of one prompt plus output_len-1 decode steps at the
    planned batch, through every stage and hop, plus the token loop from the last stage to the first."""
    w = cm.workload
    slots = cm.cluster.slots
    n = len(stages)
    total = 0.0
    for i, st in enumerate(stages):
        gpu, last = slots[st.slot].gpu, i == n - 1
        total += cm.stage_time(gpu, st.tp, st.layers, last, w.prompt_len, decode=False)
        total += (w.output_len - 1) * cm.stage_time(gpu, st.tp, st.layers, last, w.max_batch, decode=True)
        if i:
            a, b = slots[stages[i - 1].slot].host, slots[st.slot].host
            total += cm.hop(a, b, w.prompt_len) + (w.output_len - 1) * cm.hop(a, b, w.max_batch)
    first, last_host = slots[stages[0].slot].host, slots[stages[-1].slot].host
    return total + (w.output_len - 1) * cm.loopback(last_host, first, w.max_batch, n)


@dataclass(frozen=True, slots=True)
class Timing:
    """A pipeline as the simulator sees it."""

    prefill_latency: float  # a prompt through every stage and hop
    prefill_busy: float  # how long a prefill holds up the pipeline's decode steps
    step_times: tuple[float, ...]  # [b]: seconds per decode step with b requests in flight (index 0 unused)

    @property
    def max_batch(self) -> int:
        return len(self.step_times) - 1

    def capacity(self, output_len: int) -> float:
        """Requests per second the pipeline sustains with a full batch."""
        b = self.max_batch
        return b / (b * self.prefill_busy + max(output_len - 1, 0) * self.step_times[b])


def pipeline_batch(cm: CostModel, pipeline: Pipeline) -> int:
    """Requests the pipeline runs at once: the planned batch, or more (up to BATCH_CEILING) when every stage's
    memory holds their KV cache."""
    slots, stages = cm.cluster.slots, pipeline.stages
    n = len(stages)

    def fits(b: int) -> bool:
        return all(
            cm.stage_memory(slots[st.slot].gpu, st.tp, st.layers, i == 0, i == n - 1, b) <= cm.usable_bytes(slots[st.slot].gpu)
            for i, st in enumerate(stages)
        )

    batch = cm.workload.max_batch
    while batch < max(C.BATCH_CEILING, cm.workload.max_batch) and fits(batch + 1):
        batch += 1
    return batch


def pipeline_timing(cm: CostModel, pipeline: Pipeline) -> Timing:
    """Prefill latency and decode step time for every batch size. With b requests in flight over S stages
    the runtime keeps m = min(S, b) micro-batches circulating; a step takes the longer of one micro-batch's
    trip around the loop and m passes through the slowest stage or hop."""
    w, slots, stages = cm.workload, cm.cluster.slots, pipeline.stages
    n = len(stages)
    hosts = [slots[st.slot].host for st in stages]

    def stage_t(i: int, tokens: int, decode: bool) -> float:
        st = stages[i]
        return cm.stage_time(slots[st.slot].gpu, st.tp, st.layers, i == n - 1, tokens, decode)

    batch = pipeline_batch(cm, pipeline)
    prefill_compute = sum(stage_t(i, w.prompt_len, False) for i in range(n))
    prefill_hops = sum(cm.hop(hosts[i - 1], hosts[i], w.prompt_len) for i in range(1, n))
    steps = [0.0]
    for b in range(1, batch + 1):
        m = min(n, b)
        u = math.ceil(b / m)
        compute = [stage_t(i, u, True) for i in range(n)]
        hops = [cm.hop(hosts[i - 1], hosts[i], u) for i in range(1, n)]
        loop = cm.loopback(hosts[-1], hosts[0], u, n)
        chain = sum(compute) + sum(hops) + loop
        busiest = max(compute + [h - cm.cluster.link(hosts[i], hosts[i + 1]).latency for i, h in enumerate(hops)])
        steps.append(max(chain, m * busiest))
    return Timing(prefill_compute + prefill_hops, prefill_compute, tuple(steps))
