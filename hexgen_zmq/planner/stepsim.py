"""Step-level simulation of the runtime: what the broker, the first stage's scheduler and the stages do.

`simulate.py` is the fast fluid model the search scores thousands of plans with; this is the slower model
of the runtime's own mechanics, for the report's figures and for checking the fluid model:

- **the broker** (`hexgen_zmq.serving.broker_state`): a request arrives, goes to the pipeline chosen by the
  broker's pace-based policy (`dispatch`, its twin) among those whose KV budget holds its whole life, or
  waits in the broker's FIFO queue, which is only looked at on the broker's tick (every `tick_s`, as
  `brokers/broker.py` does); a pipeline's pace is updated from each step's token message;
- **the first stage** (`hexgen_zmq.stage.scheduler`, mirrored in `_Scheduler`): admission by the KV budget,
  continuous batching with decode steps first and prompt chunks filling the rest of the step's token budget
  (`max_batch_tokens`: chunked prefill), up to one micro-batch in flight per stage, split into
  `micro_batches` shares; it forms the next micro-batch when it has finished computing the last one;
- **the stages**: each computes one micro-batch at a time, in arrival order; a micro-batch's time is the
  cost model's for its decode rows and prompt tokens; hops are latency plus size over bandwidth (links are
  not shared between micro-batches: an assumption); the last stage sends the sampled tokens back to the
  first (the decode loop closes inside the pipeline) and to the broker, which streams them.

Time is exact between events; nothing is a fluid. Per request it records the time to the first token,
the time per output token after it, and the whole latency, as the broker (and a client beside it) sees them.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from hexgen_zmq.planner import constants as C
from hexgen_zmq.planner.dispatch import BLOCK_SIZE, PaceState, blocks_for, choose


@dataclass(frozen=True)
class PipeModel:
    """What the step simulator needs to know of one pipeline."""

    stages: int
    stage_time: Callable[[int, int, int], float]  # (stage, decode rows, prompt tokens) -> seconds
    hop_time: Callable[[int, int], float]  # (stage i -> i + 1, tokens) -> seconds
    loop_time: Callable[[int], float]  # last stage -> first, for this many sampled tokens (0 for one stage)
    capacity_blocks: int  # the pipeline's KV budget (its smallest stage's), in blocks of BLOCK_SIZE tokens
    micro_batches: int = 1
    max_batch_tokens: int = C.STEP_TOKEN_BUDGET
    to_first_s: float = 0.0  # broker -> first stage, one message
    to_broker_s: float = 0.0  # last stage -> broker
    max_running: int | None = None  # requests the scheduler runs at once (1: HexGen's one at a time)


@dataclass
class StepSimResult:
    arrivals: list[float]
    ttft: list[float]  # arrival -> first token at the broker
    latencies: list[float]  # arrival -> last token at the broker
    tpot: list[float]  # (last - first token) / (output tokens - 1); 0 for one-token outputs
    pipeline: list[int]  # where each request ran
    decisions: list[tuple] = field(default_factory=list)  # with record=True: the dispatch trace
    busy_s: list[list[float]] = field(default_factory=list)  # per pipeline, per stage: seconds computing
    steps: list[list[int]] = field(default_factory=list)  # per pipeline, per stage: micro-batches computed

    def attainment(self, slo: float) -> float:
        return sum(1 for x in self.latencies if x <= slo) / len(self.latencies) if self.latencies else 0.0

    @property
    def mean_latency(self) -> float:
        return sum(self.latencies) / len(self.latencies) if self.latencies else math.inf

    def quantile(self, q: float) -> float:
        if not self.latencies:
            return math.inf
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class _Request:
    __slots__ = ("id", "prompt", "output", "total", "computed", "ready", "in_flight", "announced", "generated")

    def __init__(self, rid: int, prompt: int, output: int):
        self.id, self.prompt, self.output, self.total = rid, prompt, output, prompt + output
        self.computed = 0
        self.ready = False  # its sampled token is back and waits to be fed in (Request.next_token)
        self.in_flight = False
        self.announced = False
        self.generated = 0


class _Scheduler:
    """hexgen_zmq.stage.scheduler.Scheduler's policy over plain records (same order of decisions)."""

    def __init__(self, model: PipeModel):
        self.capacity_blocks = model.capacity_blocks
        self.max_batch_tokens = model.max_batch_tokens
        self.depth = max(1, model.stages)
        self.micro_batches = max(1, min(model.micro_batches, self.depth))
        self.max_running = model.max_running
        self.waiting: deque[_Request] = deque()
        self.running: dict[int, _Request] = {}
        self.reserved_blocks = 0
        self.in_flight: dict[int, set[int]] = {}
        self.awaiting: dict[int, set[int]] = {}
        self.next_id = 0

    def submit(self, request: _Request) -> None:
        self.waiting.append(request)

    def feedback(self, batch_id: int, records: list[tuple[int, bool]]) -> None:
        members, awaiting = self.in_flight[batch_id], self.awaiting[batch_id]
        for rid, finished in records:
            members.discard(rid)
            awaiting.discard(rid)
            request = self.running.get(rid)
            if request is None:
                continue
            request.in_flight = False
            if finished:
                del self.running[rid]
                self.reserved_blocks -= blocks_for(request.total)
            else:
                request.ready = True
        if not awaiting:
            del self.in_flight[batch_id], self.awaiting[batch_id]

    def _admit_waiting(self) -> None:
        while self.waiting:
            if self.max_running is not None and len(self.running) >= self.max_running:
                break
            need = blocks_for(self.waiting[0].total)
            if self.reserved_blocks + need > self.capacity_blocks:
                break
            request = self.waiting.popleft()
            self.reserved_blocks += need
            self.running[request.id] = request

    def next_batch(self) -> tuple[int, list[tuple[_Request, int, bool]]] | None:
        """(batch id, [(request, tokens, samples)]) or None, as Scheduler.next_batch decides."""
        if len(self.in_flight) >= self.depth:
            return None
        self._admit_waiting()
        cap = max(1, math.ceil(len(self.running) / self.micro_batches))
        if self.in_flight:
            ready = sum(1 for r in self.running.values() if not r.in_flight and (r.ready or r.computed < r.prompt))
            if ready < cap:
                return None
        budget = self.max_batch_tokens
        segments: list[tuple[_Request, int, bool]] = []
        for request in self.running.values():  # decode steps first
            if len(segments) >= cap or budget < 1:
                break
            if not request.ready or request.in_flight:
                continue
            segments.append((request, 1, True))
            request.computed += 1
            request.ready = False
            request.in_flight = True
            budget -= 1
        for request in self.running.values():  # then prompt chunks, oldest first
            if len(segments) >= cap or budget < 1:
                break
            left = request.prompt - request.computed
            if left <= 0:
                continue
            n = min(left, budget)
            last_chunk = n == left
            segments.append((request, n, last_chunk))
            request.announced = True
            request.computed += n
            request.in_flight = last_chunk
            budget -= n
        if not segments:
            return None
        batch_id = self.next_id
        self.next_id += 1
        self.in_flight[batch_id] = {r.id for r, _, _ in segments}
        self.awaiting[batch_id] = {r.id for r, _, sample in segments if sample}
        return batch_id, segments


class _Pipe:
    def __init__(self, model: PipeModel):
        self.model = model
        self.sched = _Scheduler(model)
        self.first_busy = False
        self.queues = [deque() for _ in range(model.stages)]  # stages 1..: micro-batches waiting
        self.busy = [False] * model.stages


def _batch_shape(segments) -> tuple[int, int, int]:
    """(decode rows, prompt tokens, tokens) of a micro-batch just formed (a decode step is a one-token
    sampled segment of a request whose prompt is done)."""
    decode = sum(1 for r, n, sample in segments if n == 1 and sample and r.computed > r.prompt)
    tokens = sum(n for _, n, _ in segments)
    return decode, tokens - decode, tokens


def simulate_steps(models: list[PipeModel], requests: list[tuple[float, int, int]], tick_s: float = C.BROKER_TICK_S,
                   record: bool = False) -> StepSimResult:
    """Run `requests` ((arrival s, prompt tokens, output tokens), by arrival) through the pipelines. `tick_s`:
    how often the broker looks at its queue (0: whenever a request finishes)."""
    n = len(requests)
    result = StepSimResult([a for a, _, _ in requests], [math.inf] * n, [math.inf] * n, [math.inf] * n, [-1] * n)
    if not models:
        return result
    pipes = [_Pipe(m) for m in models]
    result.busy_s = [[0.0] * m.stages for m in models]
    result.steps = [[0] * m.stages for m in models]
    paces = [PaceState(m.capacity_blocks) for m in models]
    queue: deque[int] = deque()
    first_at: list[float] = [math.inf] * n
    last_at: list[float | None] = [None] * n
    reqs = [_Request(i, p, o) for i, (_, p, o) in enumerate(requests)]
    events: list[tuple] = []
    seq = 0

    def push(t: float, kind: int, *payload) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, payload))

    def dispatch(rid: int, now: float) -> bool:
        blocks = blocks_for(reqs[rid].total)
        k = choose(paces, blocks)
        if record:
            result.decisions.append((now, blocks, k, [(p.capacity_blocks, sorted(p.in_flight), p.reserved_blocks,
                                                      p.pace_s, p.pace_load) for p in paces]))
        if k is None:
            return False
        paces[k].in_flight.add(rid)
        paces[k].reserved_blocks += blocks
        result.pipeline[rid] = k
        push(now + models[k].to_first_s, SUBMIT, k, rid)
        return True

    def dispatch_queued(now: float) -> None:
        while queue and dispatch(queue[0], now):
            queue.popleft()

    def start_first(k: int, now: float) -> None:
        pipe = pipes[k]
        if pipe.first_busy:
            return
        formed = pipe.sched.next_batch()
        if formed is None:
            return
        pipe.first_busy = True
        formed = (*formed, _batch_shape(formed[1]))
        decode, prompt, _ = formed[2]
        push(now + compute(k, 0, decode, prompt), DONE, k, 0, formed)

    def start_stage(k: int, i: int, now: float) -> None:
        pipe = pipes[k]
        if pipe.busy[i] or not pipe.queues[i]:
            return
        formed = pipe.queues[i].popleft()
        pipe.busy[i] = True
        decode, prompt, _ = formed[2]
        push(now + compute(k, i, decode, prompt), DONE, k, i, formed)

    def compute(k: int, i: int, decode: int, prompt: int) -> float:
        t = models[k].stage_time(i, decode, prompt)
        result.busy_s[k][i] += t
        result.steps[k][i] += 1
        return t

    ARRIVE, TICK, SUBMIT, DONE, HOP, FEEDBACK, TOKENS = range(7)
    for rid, (at, _, _) in enumerate(requests):
        push(at, ARRIVE, rid)
    if tick_s > 0:
        push(tick_s, TICK)
    pending = n
    largest = max(m.capacity_blocks for m in models)
    for rid, r in enumerate(reqs):
        if blocks_for(r.total) > largest:  # the broker refuses it (too_large): never served
            pending -= 1
    while events and pending:
        now, _, kind, payload = heapq.heappop(events)
        if kind == ARRIVE:
            if blocks_for(reqs[payload[0]].total) > largest:
                continue
            if not dispatch(payload[0], now):
                queue.append(payload[0])
        elif kind == TICK:
            dispatch_queued(now)
            push(now + tick_s, TICK)
        elif kind == SUBMIT:
            k, rid = payload
            pipes[k].sched.submit(reqs[rid])
            start_first(k, now)
        elif kind == HOP:
            k, i, formed = payload
            pipes[k].queues[i].append(formed)
            start_stage(k, i, now)
        elif kind == DONE:
            k, i, formed = payload
            pipe, model = pipes[k], models[k]
            if i == 0:
                pipe.first_busy = False
            else:
                pipe.busy[i] = False
            if i < model.stages - 1:
                push(now + model.hop_time(i, formed[2][2]), HOP, k, i + 1, formed)
            else:
                records = []
                for r, _, sample in formed[1]:
                    if sample:
                        r.generated += 1
                        records.append((r.id, r.generated >= r.output))
                if model.stages == 1:
                    pipe.sched.feedback(formed[0], records)
                else:
                    push(now + model.loop_time(len(records)), FEEDBACK, k, formed[0], records)
                push(now + model.to_broker_s, TOKENS, k, records)
            if i == 0 or model.stages == 1:
                start_first(k, now)
            else:
                start_stage(k, i, now)
        elif kind == FEEDBACK:
            k, batch_id, records = payload
            pipes[k].sched.feedback(batch_id, records)
            start_first(k, now)
        elif kind == TOKENS:
            k, records = payload
            state = paces[k]
            load, gaps, finished = len(state.in_flight), [], False
            for rid, done in records:
                if last_at[rid] is not None:
                    gaps.append(now - last_at[rid])
                else:
                    first_at[rid] = now
                last_at[rid] = now
                if done:
                    state.in_flight.discard(rid)
                    state.reserved_blocks -= blocks_for(reqs[rid].total)
                    arrival = requests[rid][0]
                    result.ttft[rid] = first_at[rid] - arrival
                    result.latencies[rid] = now - arrival
                    out = reqs[rid].output
                    result.tpot[rid] = (now - first_at[rid]) / (out - 1) if out > 1 else 0.0
                    pending -= 1
                    finished = True
            if gaps:
                state.observe_pace(sum(gaps) / len(gaps), load)
            if finished and tick_s <= 0:
                dispatch_queued(now)
    return result


def pipe_model(cm, pipeline, batching: bool = True, broker_host: int = 0) -> PipeModel:
    """The step simulator's view of a planned pipeline, from the cost model: stage times per micro-batch
    shape (memoised), hops and the token loop over the cluster's links, the KV budget from each stage's
    memory left after its weights and workspace, micro-batches as the runtime's default (one per stage on
    GPUs, one per host on CPUs), the broker on the cluster's first host (as `emit` places it). Without
    `batching`, one request at a time (HexGen's runtime), by a KV budget of one request: requests then wait
    in the broker's queue and go to the first pipeline that frees (the fastest by pace among those free)."""
    w, slots, stages = cm.workload, cm.cluster.slots, pipeline.stages
    s = len(stages)
    hosts = [slots[st.slot].host for st in stages]
    cache: dict[tuple[int, int, int], float] = {}

    def stage_time(i: int, decode: int, prompt: int) -> float:
        key = (i, decode, prompt)
        if key not in cache:
            st = stages[i]
            cache[key] = cm.mixed_stage_time(slots[st.slot].gpu, st.tp, st.layers, i == s - 1, decode, prompt)
        return cache[key]

    def hop_time(i: int, tokens: int) -> float:
        return cm.hop(hosts[i], hosts[i + 1], tokens)

    def loop_time(tokens: int) -> float:
        return cm.loopback(hosts[-1], hosts[0], tokens, s)

    capacity = min(kv_budget_blocks(cm, st, i == 0, i == s - 1) for i, st in enumerate(stages))
    if not batching:  # a KV budget of one request (kv_cache_tokens in the deployment file): the broker holds
        capacity = min(capacity, blocks_for(w.prompt_len + w.output_len))  # the queue, pipelines take one each
    gpu_stages = any(slots[st.slot].gpu.kind != "cpu" for st in stages)
    link = cm.cluster.link
    return PipeModel(
        stages=s, stage_time=stage_time, hop_time=hop_time, loop_time=loop_time, capacity_blocks=capacity,
        micro_batches=s if gpu_stages else len(set(hosts)), max_batch_tokens=C.STEP_TOKEN_BUDGET,
        to_first_s=link(broker_host, hosts[0]).transfer(w.prompt_len * C.TOKEN_ID_BYTES) if hosts[0] != broker_host else 0.0,
        to_broker_s=link(hosts[-1], broker_host).transfer(C.TOKEN_ID_BYTES) if hosts[-1] != broker_host else 0.0,
        max_running=None if batching else 1,
    )


def kv_budget_blocks(cm, st, first: bool, last: bool) -> int:
    """KV blocks one stage holds, as the runtime sets its budget (hexgen_zmq/stage/process.py kv_blocks): on
    a GPU, the memory left after its weights and fixed workspace; on a CPU, a fixed CPU_KV_BYTES of cache (not
    the host's memory), at most KV_MAX_CONTEXTS of the model's longest context."""
    m, w = cm.model, cm.workload
    gpu = cm.cluster.slots[st.slot].gpu
    per_token = st.layers * m.kv_elements_per_token_layer(st.tp) * w.dtype_bytes
    if not per_token:
        return 1 << 30
    if gpu.kind == "cpu":
        tokens = max(BLOCK_SIZE, C.CPU_KV_BYTES // per_token)
        if m.max_positions:
            tokens = min(tokens, C.KV_MAX_CONTEXTS * m.max_positions)
        return max(1, tokens // BLOCK_SIZE)
    weights = st.layers * m.layer_params / st.tp * w.dtype_bytes
    free = cm.usable_bytes(gpu) - cm.fixed_bytes(st.tp, first, last) - weights
    return max(0, int(free // per_token) // BLOCK_SIZE)


@dataclass(frozen=True, slots=True)
class RuntimeFigures:
    """A plan's figures under the step-level model of the runtime (at the workload's rate, unless noted)."""

    attainment: float
    max_rate: float  # highest rate keeping the target attainment
    min_deadline: float  # lowest deadline the target share meets
    mean_ttft: float
    mean_tpot: float
    requests: int  # simulated per run


def trace(gaps: list[float], rate: float, prompt_len: int, output_len: int) -> list[tuple[float, int, int]]:
    """Requests of one length at `rate`, from unit-rate Poisson gaps (the same trace scaled, as simulate.py)."""
    out, now = [], 0.0
    for gap in gaps:
        now += gap / rate
        out.append((now, prompt_len, output_len))
    return out


def saturated_rate(models: list[PipeModel], prompt_len: int, output_len: int, floor: int = 400) -> float:
    """Requests per second the pipelines complete when work never runs out: a burst of requests at time 0,
    several times what their KV budgets hold at once, timed over the middle half of the completions. No
    rate above it is sustainable, however well a short trace fares (a burst that fits in the KV budgets
    finishes within one long batch)."""
    per_request = blocks_for(prompt_len + output_len)
    at_once = sum(min(m.capacity_blocks // per_request, m.max_running or 1 << 30) for m in models)
    n = max(floor, 3 * at_once)
    r = simulate_steps(models, [(0.0, prompt_len, output_len)] * n, tick_s=0)
    done = sorted(x for x in r.latencies if x < math.inf)
    if len(done) < 4:
        return 0.0
    a, b = len(done) // 4, 3 * len(done) // 4
    return (b - a) / max(done[b] - done[a], 1e-12)


def runtime_figures(cm, pipelines, gaps: list[float], target: float, tolerance: float = 0.02) -> RuntimeFigures:
    """Attainment, TTFT and time per output token at the workload's rate, the lowest deadline met by
    `target`, and the highest rate keeping `target` (bisection to `tolerance` below the saturated rate),
    all from the step simulator."""
    w = cm.workload
    models = [pipe_model(cm, p, w.batching) for p in pipelines]

    def run(rate: float) -> StepSimResult:
        return simulate_steps(models, trace(gaps, rate, w.prompt_len, w.output_len))

    at = run(w.rate)
    served = [i for i, x in enumerate(at.latencies) if x < math.inf]

    def ok(rate: float) -> bool:
        return run(rate).attainment(w.slo) >= target

    best = 0.0
    hi = saturated_rate(models, w.prompt_len, w.output_len) if models else 0.0
    if hi > 0 and ok(hi):
        best = hi
    elif hi > 0 and ok(lo := hi / 1024):
        while hi - lo > tolerance * lo:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        best = lo
    mean = (lambda xs: sum(xs) / len(xs) if xs else math.inf)
    return RuntimeFigures(at.attainment(w.slo), best, at.quantile(target), mean([at.ttft[i] for i in served]),
                          mean([at.tpot[i] for i in served]), len(gaps))
