"""Dynamic programming: the best pipeline for one group of GPUs.

A pipeline is a sequence of stages; a stage is `tp` GPUs of one slot (one GPU type on one host) running a
contiguous range of layers. The objective (`plan.pipeline_objective`) is the time one request takes at the
planned batch: for each stage a fixed part plus a per-layer part, plus a hop between consecutive stages and
the token loop from the last stage back to the first. Memory caps the layers of every stage.

State: (GPUs still free per slot, host of the last stage) -> cheapest cost for every number of layers
placed so far. A stage of per-layer cost c and cap K extends layer count l to k in (l, l+K], so each
transition is a sliding-window minimum over l, O(layers). The first stage's host is fixed per outer pass
because the token loop back to it costs differently per host. The result equals exhaustive enumeration.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from hexgen_zmq.planner.costmodel import CostModel
from hexgen_zmq.planner.plan import Group, Pipeline, Stage

INF = math.inf


@dataclass(frozen=True, slots=True)
class _Option:
    index: int  # position of the slot in the group
    slot: int
    tp: int
    host: int
    per_layer: float
    fixed: float  # not the last stage
    fixed_last: float  # the last stage: adds the LM head
    cap_mid: int
    cap_first: int
    cap_last: int
    cap_only: int  # first and last at once (one-stage pipeline)


def stage_options(cm: CostModel, group: Group) -> list[_Option]:
    """Every (slot, TP degree) a stage of this group can take, with its cost terms and layer caps."""
    w = cm.workload
    steps = w.output_len - 1
    options = []
    for index, (slot_id, count) in enumerate(group):
        slot = cm.cluster.slots[slot_id]
        gpu = slot.gpu
        for tp in cm.tp_degrees:
            if tp > count:
                continue
            per_layer = cm.layer_time(gpu, tp, w.prompt_len, False) + steps * cm.layer_time(gpu, tp, w.max_batch, True)
            fixed = cm.stage_time(gpu, tp, 0, False, w.prompt_len, False) + steps * cm.stage_time(
                gpu, tp, 0, False, w.max_batch, True
            )
            fixed_last = cm.stage_time(gpu, tp, 0, True, w.prompt_len, False) + steps * cm.stage_time(
                gpu, tp, 0, True, w.max_batch, True
            )
            caps = [cm.max_layers(gpu, tp, first, last) for first, last in ((0, 0), (1, 0), (0, 1), (1, 1))]
            options.append(_Option(index, slot_id, tp, slot.host, per_layer, fixed, fixed_last, *caps))
    return options


def best_pipeline(cm: CostModel, group: Group) -> Pipeline | None:
    """The cheapest pipeline on (a subset of) the group's GPUs, or None if the model cannot fit."""
    if not _enough_memory(cm, group):
        return None
    options = stage_options(cm, group)
    best: Pipeline | None = None
    for first_host in sorted({o.host for o in options}):
        found = _solve(cm, group, options, first_host, best.cost if best else INF)
        if found is not None:
            best = found
    return best


def _enough_memory(cm: CostModel, group: Group) -> bool:
    """A necessary condition: all the group's GPUs together can hold every layer once."""
    slots = cm.cluster.slots
    free = sum(count * (cm.usable_bytes(slots[s].gpu) - cm.fixed_bytes(1, False, False)) for s, count in group)
    per_layer = min(tp * cm.layer_bytes(tp) for tp in cm.tp_degrees)
    return free >= cm.model.num_hidden_layers * per_layer


def _solve(cm: CostModel, group: Group, options: list[_Option], first_host: int, bound: float) -> Pipeline | None:
    """The cheapest pipeline starting on `first_host` that costs less than `bound`, if any."""
    w = cm.workload
    L = cm.model.num_hidden_layers
    steps = w.output_len - 1
    hop_cache: dict[tuple[int, int], float] = {}

    def hop(a: int, b: int) -> float:
        if (a, b) not in hop_cache:
            hop_cache[a, b] = cm.hop(a, b, w.prompt_len) + steps * cm.hop(a, b, w.max_batch)
        return hop_cache[a, b]

    def loop(last_host: int) -> float:
        return steps * cm.loopback(last_host, first_host, w.max_batch, 2)

    start_key = (tuple(c for _, c in group), -1)
    # state key -> (cost per layers placed, back pointer per layers placed: (prev key, prev layers, option))
    states: dict[tuple, tuple[list[float], list]] = {}
    buckets: dict[int, list[tuple]] = {}
    best_cost, best_end = bound, None
    # Lower bound on what placing the layers after the first l still costs: prune what cannot win.
    cheapest_layer = min((o.per_layer for o in options), default=0.0)
    cheapest_last = min((o.fixed_last for o in options), default=0.0)
    rest = [(L - l) * cheapest_layer + cheapest_last for l in range(L + 1)]
    density: dict[int, float] = {}  # most layers one GPU of the slot can hold, at any TP degree
    for o in options:
        density[o.index] = max(density.get(o.index, 0.0), max(o.cap_mid, o.cap_last) / o.tp)

    def state(key: tuple) -> tuple[list[float], list]:
        if key not in states:
            states[key] = ([INF] * L, [None] * L)
            buckets.setdefault(sum(key[0]), []).append(key)
        return states[key]

    def take(remaining: tuple[int, ...], opt: _Option) -> tuple[int, ...]:
        rest = list(remaining)
        rest[opt.index] -= opt.tp
        return tuple(rest)

    # First stage: on the chosen first host.
    for opt in options:
        if opt.host != first_host:
            continue
        if opt.cap_only >= L:
            cost = opt.fixed_last + L * opt.per_layer
            if cost < best_cost:
                best_cost, best_end = cost, (start_key, 0, opt)
        if opt.cap_first < 1:
            continue
        costs, backs = state((take(start_key[0], opt), opt.host))
        for k in range(1, min(opt.cap_first, L - 1) + 1):
            cost = opt.fixed + k * opt.per_layer
            if cost < costs[k]:
                costs[k], backs[k] = cost, (start_key, 0, opt)

    # Later stages, in order of fewer free GPUs (every stage takes at least one).
    for free in range(sum(start_key[0]), 0, -1):
        for key in buckets.get(free, []):
            remaining, last_host = key
            costs, _ = states[key]
            usable = [o for o in options if o.tp <= remaining[o.index]]
            if not usable:
                continue
            # Tighter bounds from the GPUs still free: the layers they can hold at most, and their cost.
            room = sum(remaining[i] * d for i, d in density.items())
            c_min = min(o.per_layer for o in usable)
            f_min = min(o.fixed_last for o in usable)
            live = [l for l in range(max(1, math.ceil(L - room - 1e-9)), L) if costs[l] + (L - l) * c_min + f_min < best_cost]
            if not live:
                continue
            lowest, highest = live[0], live[-1]
            cheapest = min(costs[l] for l in live)
            for opt in usable:
                h = hop(last_host, opt.host)
                if opt.cap_last >= 1:  # this stage ends the pipeline
                    tail = opt.fixed_last + h + loop(opt.host)
                    for l in range(max(lowest, L - opt.cap_last), L):
                        cost = costs[l] + (L - l) * opt.per_layer + tail
                        if cost < best_cost:
                            best_cost, best_end = cost, (key, l, opt)
                top = min(L - 1, highest + opt.cap_mid)
                if opt.cap_mid < 1 or top <= lowest:
                    continue
                if cheapest + opt.per_layer + opt.fixed + h + rest[top] >= best_cost:
                    continue  # even the cheapest one-layer step from here cannot win
                target = state((take(remaining, opt), opt.host))
                _extend(costs, key, opt, h, target, (lowest, top), [best_cost - r for r in rest])
    if best_end is None:
        return None
    return Pipeline(_trace(states, best_end, L, start_key), best_cost)


def _extend(
    costs: list[float],
    key: tuple,
    opt: _Option,
    hop: float,
    target: tuple[list[float], list],
    span: tuple[int, int],
    limits: list[float],
) -> None:
    """target[k] = min over l in [k-cap, k-1], l >= lowest of costs[l] + (k-l)*c + fixed + hop, for k in
    (lowest, top], kept only below limits[k] (beyond it the pipeline cannot beat the best one found)."""
    new_costs, new_backs = target
    c, cap, add = opt.per_layer, opt.cap_mid, opt.fixed + hop
    lowest, top = span
    window: deque[int] = deque()  # candidate l, increasing l and increasing costs[l] - l*c
    for k in range(lowest + 1, top + 1):
        l_new = k - 1
        if costs[l_new] < INF:
            value = costs[l_new] - l_new * c
            while window and costs[window[-1]] - window[-1] * c >= value:
                window.pop()
            window.append(l_new)
        while window and window[0] < k - cap:
            window.popleft()
        if window:
            l = window[0]
            cost = costs[l] + (k - l) * c + add
            if cost < new_costs[k] and cost < limits[k]:
                new_costs[k], new_backs[k] = cost, (key, l, opt)


def _trace(states: dict, end: tuple, L: int, start_key: tuple) -> tuple[Stage, ...]:
    """Follow back pointers from the last stage to the first."""
    key, l, opt = end
    stages = [Stage(opt.slot, opt.tp, l, L)]
    while key != start_key:
        k = l
        key, l, opt = states[key][1][k]
        stages.append(Stage(opt.slot, opt.tp, l, k))
    return tuple(reversed(stages))
