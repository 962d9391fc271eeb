"""From a cluster, a model and a workload to a placed plan with its figures of merit.

Runs the genetic search, pins every stage to concrete devices, and measures the plan on a longer arrival
trace: SLO attainment at the given rate, the highest rate that keeps the target attainment, and the lowest
deadline met at the given rate.
"""

from __future__ import annotations

from dataclasses import dataclass

from hexgen_zmq.planner import constants as C
from hexgen_zmq.planner.cluster import Cluster, Host
from hexgen_zmq.planner.costmodel import CostModel, Workload
from hexgen_zmq.planner.evaluate import Evaluator
from hexgen_zmq.planner.genetic import GaSettings, SearchResult, genetic_search
from hexgen_zmq.planner.model import ModelSpec
from hexgen_zmq.planner.plan import Pipeline
from hexgen_zmq.planner.simulate import max_rate, simulate, unit_gaps
from hexgen_zmq.planner.stepsim import RuntimeFigures, runtime_figures


@dataclass(frozen=True, slots=True)
class PlacedStage:
    id: str
    host: Host
    gpu: str
    devices: tuple[int, ...]
    layers: tuple[int, int]
    memory_gib: float  # per rank, as planned
    memory_capacity_gib: float
    prefill_s: float  # this stage's share of one prompt
    decode_s: float  # this stage's share of one decode step with one request
    gpu_kind: str = "cuda"  # the device kind: cuda, or cpu for a profiled CPU host

    @property
    def tp(self) -> int:
        return len(self.devices)


@dataclass(frozen=True, slots=True)
class PlacedPipeline:
    id: str
    stages: tuple[PlacedStage, ...]
    prefill_latency: float
    per_token_latency: float  # one request alone
    per_token_latency_full: float  # with a full batch in flight
    batch: int  # requests in flight at most (KV cache reserved for them)
    capacity: float  # requests per second


@dataclass(frozen=True, slots=True)
class PlanOutcome:
    cluster: Cluster
    model: ModelSpec
    workload: Workload
    pipelines: tuple[PlacedPipeline, ...]
    attainment: float
    max_rate: float
    min_deadline: float
    target_attainment: float
    search: SearchResult
    runtime: RuntimeFigures | None = None  # the same figures from the step-level model of the runtime

    @property
    def used_gpus(self) -> int:
        return sum(st.tp for p in self.pipelines for st in p.stages)


def place(cm: CostModel, evaluator: Evaluator, pipelines: tuple[Pipeline, ...]) -> tuple[PlacedPipeline, ...]:
    """Pin stages to devices (in slot order per host) and name pipelines p0.. by decreasing capacity."""
    w, slots = cm.workload, cm.cluster.slots
    next_device = {s.index: s.first_device for s in slots}
    ordered = sorted(pipelines, key=lambda p: (-evaluator.timing(p).capacity(w.output_len), p.stages))
    placed = []
    for i, pipeline in enumerate(ordered):
        timing = evaluator.timing(pipeline)
        stages = []
        n = len(pipeline.stages)
        for j, st in enumerate(pipeline.stages):
            slot = slots[st.slot]
            devices = tuple(range(next_device[st.slot], next_device[st.slot] + st.tp))
            next_device[st.slot] += st.tp
            first, last = j == 0, j == n - 1
            stages.append(
                PlacedStage(
                    id=f"p{i}s{j}",
                    host=cm.cluster.hosts[slot.host],
                    gpu=slot.gpu.name,
                    devices=devices,
                    layers=(st.start, st.end),
                    memory_gib=cm.stage_memory(slot.gpu, st.tp, st.layers, first, last, timing.max_batch) / C.GIB,
                    memory_capacity_gib=slot.gpu.memory_gib,
                    prefill_s=cm.stage_time(slot.gpu, st.tp, st.layers, last, w.prompt_len, False),
                    decode_s=cm.stage_time(slot.gpu, st.tp, st.layers, last, 1, True),
                    gpu_kind=slot.gpu.kind,
                )
            )
        placed.append(
            PlacedPipeline(
                id=f"p{i}",
                stages=tuple(stages),
                prefill_latency=timing.prefill_latency,
                per_token_latency=timing.step_times[1],
                per_token_latency_full=timing.step_times[-1],
                batch=timing.max_batch,
                capacity=timing.capacity(w.output_len),
            )
        )
    return tuple(placed)


def make_plan(
    cluster: Cluster,
    model: ModelSpec,
    workload: Workload,
    seed: int = C.DEFAULT_SEED,
    time_budget: float = C.DEFAULT_TIME_BUDGET_S,
    target_attainment: float = C.DEFAULT_TARGET_ATTAINMENT,
    settings: GaSettings = GaSettings(),
    runtime_requests: int = 0,
) -> PlanOutcome:
    """Search for the best plan and measure it (with the step-level runtime model too, on a trace of
    `runtime_requests`; 0: not)."""
    cm = CostModel(cluster, model, workload)
    evaluator = Evaluator(cm, unit_gaps(seed))
    result = genetic_search(evaluator, seed, time_budget, settings)
    return measure(cm, evaluator, result, seed, target_attainment, runtime_requests)


def measure(cm: CostModel, evaluator: Evaluator, result: SearchResult, seed: int, target: float,
            runtime_requests: int = 0) -> PlanOutcome:
    """Place the search's best plan and compute its figures on a longer trace (the fluid model's, and with
    `runtime_requests` the step simulator's)."""
    w = cm.workload
    pipelines = result.best.pipelines
    timings = [evaluator.timing(p) for p in pipelines]
    gaps = unit_gaps(seed + 1, C.REPORT_REQUESTS)
    at_rate = simulate(timings, w.output_len, gaps, w.rate, w.slo)
    runtime = None
    if runtime_requests and pipelines:
        runtime = runtime_figures(cm, pipelines, unit_gaps(seed + 2, runtime_requests), target)
    return PlanOutcome(
        cluster=cm.cluster,
        model=cm.model,
        workload=w,
        pipelines=place(cm, evaluator, pipelines),
        attainment=at_rate.attainment,
        max_rate=max_rate(timings, w.output_len, gaps, w.slo, target),
        min_deadline=at_rate.quantile(target),
        target_attainment=target,
        search=result,
        runtime=runtime,
    )
