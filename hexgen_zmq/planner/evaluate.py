"""Fitness of a genome: memoised pipelines per group, then SLO attainment from the simulation.

Shared by the genetic search and the baselines, so that every search scores plans the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hexgen_zmq.planner.costmodel import CostModel
from hexgen_zmq.planner.dp import best_pipeline
from hexgen_zmq.planner.plan import Genome, Group, Pipeline, Timing, make_genome, make_group, pipeline_timing
from hexgen_zmq.planner.simulate import SimResult, simulate

PipelineBuilder = Callable[[CostModel, Group], "Pipeline | None"]


@dataclass(frozen=True, slots=True)
class Score:
    """Higher is better: SLO attainment first, then the plan's total capacity (requests/s)."""

    attainment: float
    capacity: float
    mean_latency: float

    @property
    def key(self) -> tuple[float, float]:
        return (self.attainment, self.capacity)


@dataclass(frozen=True, slots=True)
class Evaluated:
    genome: Genome
    score: Score
    pipelines: tuple[Pipeline, ...]  # the serving pipelines (groups with no useful pipeline left out)


class Evaluator:
    """Scores genomes against one workload and arrival trace, caching per group and per genome."""

    def __init__(self, cm: CostModel, gaps: list[float], builder: PipelineBuilder = best_pipeline):
        self.cm = cm
        self.gaps = gaps
        self.builder = builder
        self._pipelines: dict[Group, Pipeline | None] = {}
        self._timings: dict[Pipeline, Timing] = {}
        self._scores: dict[Genome, Evaluated] = {}
        self.evaluations = 0  # distinct genomes simulated

    def pipeline(self, group: Group) -> Pipeline | None:
        """The group's pipeline (memoised), or None if none fits or none can meet the SLO unloaded."""
        if group not in self._pipelines:
            found = self.builder(self.cm, group)
            if found is not None and self._unloaded_latency(found) > self.cm.workload.slo:
                found = None
            self._pipelines[group] = found
        return self._pipelines[group]

    def timing(self, pipeline: Pipeline) -> Timing:
        if pipeline not in self._timings:
            self._timings[pipeline] = pipeline_timing(self.cm, pipeline)
        return self._timings[pipeline]

    def _unloaded_latency(self, pipeline: Pipeline) -> float:
        t = self.timing(pipeline)
        return t.prefill_latency + (self.cm.workload.output_len - 1) * t.step_times[1]

    def normalise(self, genome: Genome) -> Genome:
        """Split the GPUs a group's pipeline leaves unused into a group of their own (repeatedly)."""
        out: list[Group] = []
        todo = list(genome)
        while todo:
            group = todo.pop()
            pipeline = self.pipeline(group)
            if pipeline is None:
                out.append(group)
                continue
            used = dict(pipeline.group())
            rest = make_group({s: c - used.get(s, 0) for s, c in group})
            out.append(pipeline.group())
            if rest:
                todo.append(rest)
        return make_genome(out)

    def evaluate(self, genome: Genome) -> Evaluated:
        """Normalise the genome, then simulate its pipelines (memoised per genome)."""
        genome = self.normalise(genome)
        if genome not in self._scores:
            pipelines = tuple(p for p in (self.pipeline(g) for g in genome) if p is not None)
            result = self.simulate(pipelines)
            capacity = sum(self.timing(p).capacity(self.cm.workload.output_len) for p in pipelines)
            score = Score(result.attainment, capacity, result.mean_latency)
            self._scores[genome] = Evaluated(genome, score, pipelines)
            self.evaluations += 1
        return self._scores[genome]

    def simulate(self, pipelines: tuple[Pipeline, ...], rate: float | None = None) -> SimResult:
        w = self.cm.workload
        timings = [self.timing(p) for p in pipelines]
        return simulate(timings, w.output_len, self.gaps, rate or w.rate, w.slo)
