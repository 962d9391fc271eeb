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

    prefill_latency: float  # a prompt through every stage and hop, the pipeline otherwise idle
    prefill_busy: float  # how long a prefill holds up the pipeline when nothing else runs (its compute)
    step_times: tuple[float, ...]  # [b]: seconds per decode step with b requests in flight (index 0 unused)
    # [b]: how much one prompt lengthens decoding when it joins b requests in flight; its chunks share steps
    # (and the weight reads) with the decode tokens (chunked prefill). Empty: prefill_busy at every b.
    prefill_marginal: tuple[float, ...] = ()

    @property
    def max_batch(self) -> int:
        return len(self.step_times) - 1

    def busy(self, in_flight: int) -> float:
        """Decoding time a prompt costs the requests already in flight (`in_flight` of them)."""
        return self.prefill_marginal[in_flight] if self.prefill_marginal else self.prefill_busy

    def capacity(self, output_len: int) -> float:
        """Requests per second the pipeline sustains with a full batch."""
        b = self.max_batch
        return b / (b * self.busy(b) + max(output_len - 1, 0) * self.step_times[b])


def pipeline_batch(cm: CostModel, pipeline: Pipeline) -> int:
    """Requests the pipeline runs at once: as many as every stage's memory holds the KV cache of (the runtime
    admits by KV budget), at least the planned batch, at most BATCH_CEILING."""
    slots, stages = cm.cluster.slots, pipeline.stages
    n = len(stages)
    if not cm.workload.batching:
        return 1

    def fits(b: int) -> bool:
        return all(
            cm.stage_memory(slots[st.slot].gpu, st.tp, st.layers, i == 0, i == n - 1, b) <= cm.usable_bytes(slots[st.slot].gpu)
            for i, st in enumerate(stages)
        )

    lo, hi = cm.workload.max_batch, max(C.BATCH_CEILING, cm.workload.max_batch)
    while lo < hi:  # memory grows with the batch: the largest b that fits, by bisection
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def pipeline_timing(cm: CostModel, pipeline: Pipeline) -> Timing:
    """Prefill latency, decode step time and a prompt's marginal cost for every batch size. With b requests
    in flight over S stages the runtime keeps m = min(S, b) micro-batches of u = ceil(b/m) decode tokens
    circulating; a step takes the longer of one micro-batch's trip around the loop and m passes through the
    slowest stage or hop. A new prompt rides in micro-batches in chunks that fill the step's token budget
    (STEP_TOKEN_BUDGET - u tokens each): each chunk lengthens one micro-batch's pass through every stage."""
    w, slots, stages = cm.workload, cm.cluster.slots, pipeline.stages
    n = len(stages)
    hosts = [slots[st.slot].host for st in stages]
    latencies = [cm.cluster.link(hosts[i], hosts[i + 1]).latency for i in range(n - 1)]

    def stage_t(i: int, decode_tokens: int, prompt_tokens: int) -> float:
        st = stages[i]
        return cm.mixed_stage_time(slots[st.slot].gpu, st.tp, st.layers, i == n - 1, decode_tokens, prompt_tokens)

    def hops(tokens: int) -> list[float]:
        return [cm.hop(hosts[i - 1], hosts[i], tokens) for i in range(1, n)]

    batch = pipeline_batch(cm, pipeline)
    prefill_compute = sum(stage_t(i, 0, w.prompt_len) for i in range(n))
    prefill_hops = sum(hops(w.prompt_len))
    steps, marginal = [0.0], [prefill_compute]
    for b in range(1, batch + 1):
        m = min(n, b)
        u = math.ceil(b / m)
        chunks = math.ceil(w.prompt_len / max(1, C.STEP_TOKEN_BUDGET - u))
        c = math.ceil(w.prompt_len / chunks)
        loop = cm.loopback(hosts[-1], hosts[0], u, n)
        compute, mixed = [stage_t(i, u, 0) for i in range(n)], [stage_t(i, u, c) for i in range(n)]
        hop, hop_mixed = hops(u), hops(u + c)
        chain = sum(compute) + sum(hop) + loop
        busiest = max(compute + [h - lat for h, lat in zip(hop, latencies)])
        step = max(chain, m * busiest)
        # The same step with one micro-batch also carrying a chunk of the new prompt.
        chain_mixed = sum(mixed) + sum(hop_mixed) + loop
        loads = [(m - 1) * a + x for a, x in zip(compute, mixed)]
        loads += [(m - 1) * (h - lat) + (x - lat) for h, x, lat in zip(hop, hop_mixed, latencies)]
        steps.append(step)
        marginal.append(chunks * (max(chain_mixed, max(loads)) - step))
    return Timing(prefill_compute + prefill_hops, prefill_compute, tuple(steps), tuple(marginal))
