"""Genetic search over partitions of the GPU pool into pipeline groups (HexGen, section 4).

A genome is a partition of the cluster's GPUs into groups; the dynamic program turns every group into its
best pipeline, and the fitness is the plan's SLO attainment in the simulation. The initial population comes
from network-aware clustering (regions, hosts, memory-sized host sets); mutations merge two groups, split
one, or swap GPUs between two; crossover keeps some groups of one parent, fills in from the other and
repairs what is left per host. The best genomes survive unchanged (elitism). Runs are repeatable for a seed
when they stop on the generation limit or on stagnation rather than on the clock; the default settings do
(MAX_GENERATIONS bounds a run well inside the default time budget), and the result says why it stopped.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from hexgen_zmq.planner import constants as C
from hexgen_zmq.planner.cluster import Cluster
from hexgen_zmq.planner.evaluate import Evaluated, Evaluator
from hexgen_zmq.planner.plan import Genome, Group, make_genome, make_group


@dataclass(slots=True)
class SearchResult:
    best: Evaluated
    evaluations: int
    generations: int
    elapsed: float
    trace: list[tuple[float, Evaluated]] = field(default_factory=list)  # (seconds, best so far) on each gain
    # Why the search ended: "stagnation" or "generations" (repeatable for a seed), or "time budget" (not:
    # where the clock cuts a run depends on the machine).
    stop_reason: str = "generations"


@dataclass(frozen=True, slots=True)
class GaSettings:
    population: int = C.POPULATION_SIZE
    elite: int = C.ELITE_COUNT
    tournament: int = C.TOURNAMENT_SIZE
    crossover_rate: float = C.CROSSOVER_RATE
    stagnation: int = C.STAGNATION_GENERATIONS
    max_generations: int | None = C.MAX_GENERATIONS  # None: only stagnation or the clock stop the search


class _Operators:
    """Network-aware genome operators for one cluster."""

    def __init__(self, cluster: Cluster, rng: random.Random):
        self.cluster = cluster
        self.rng = rng

    def region(self, slot: int) -> str:
        return self.cluster.hosts[self.cluster.slots[slot].host].region

    def regions(self, group: Group) -> set[str]:
        return {self.region(s) for s, _ in group}

    def hosts(self, group: Group) -> list[int]:
        return sorted({self.cluster.slots[s].host for s, _ in group})

    # --- initial population ------------------------------------------------------------------------------
    def seeds(self, model_bytes: float) -> list[Genome]:
        """Partitions by host, by region, by host halves, and memory-sized host sets within regions."""
        slots = self.cluster.slots
        by_host: dict[int, dict[int, int]] = {}
        by_region: dict[str, dict[int, int]] = {}
        halves: list[dict[int, int]] = []
        for s in slots:
            by_host.setdefault(s.host, {})[s.index] = s.count
            by_region.setdefault(self.region(s.index), {})[s.index] = s.count
            halves += [{s.index: s.count // 2}, {s.index: s.count - s.count // 2}]
        sized: list[dict[int, int]] = []
        for region in self.cluster.regions:
            current: dict[int, int] = {}
            memory = 0.0
            host_ids = [h for h in by_host if self.cluster.hosts[h].region == region]
            host_ids.sort(key=lambda h: -sum(slots[s].gpu.memory_bytes * c for s, c in by_host[h].items()))
            for h in host_ids:
                for s, c in by_host[h].items():
                    current[s] = c
                    memory += slots[s].gpu.memory_bytes * c
                if memory >= model_bytes:
                    sized.append(current)
                    current, memory = {}, 0.0
            if current:
                sized.append(current)
        genomes = [make_genome(list(by_host.values())), make_genome(list(by_region.values())), make_genome(halves)]
        genomes.append(make_genome(sized))
        return genomes

    def random_genome(self) -> Genome:
        """Every GPU into one of k random groups (used by random search)."""
        gpus = [s.index for s in self.cluster.slots for _ in range(s.count)]
        k = self.rng.randint(1, len(gpus))
        groups: list[dict[int, int]] = [{} for _ in range(k)]
        for slot in gpus:
            g = groups[self.rng.randrange(k)]
            g[slot] = g.get(slot, 0) + 1
        return make_genome(groups)

    # --- mutations ---------------------------------------------------------------------------------------------
    def partner(self, genome: Genome, i: int) -> int | None:
        """Another group, from the same region with probability SAME_REGION_BIAS."""
        others = [j for j in range(len(genome)) if j != i]
        if not others:
            return None
        near = [j for j in others if self.regions(genome[j]) & self.regions(genome[i])]
        if near and self.rng.random() < C.SAME_REGION_BIAS:
            return self.rng.choice(near)
        return self.rng.choice(others)

    def merge(self, genome: Genome) -> Genome:
        i = self.rng.randrange(len(genome))
        j = self.partner(genome, i)
        if j is None:
            return genome
        merged = dict(genome[i])
        for s, c in genome[j]:
            merged[s] = merged.get(s, 0) + c
        rest = [g for k, g in enumerate(genome) if k not in (i, j)]
        return make_genome([*rest, make_group(merged)])

    def split(self, genome: Genome) -> Genome:
        candidates = [i for i, g in enumerate(genome) if sum(c for _, c in g) >= 2]
        if not candidates:
            return genome
        i = self.rng.choice(candidates)
        group = genome[i]
        hosts = self.hosts(group)
        if len(hosts) > 1:  # split along host boundaries
            chosen = set(self.rng.sample(hosts, self.rng.randint(1, len(hosts) - 1)))
            a = {s: c for s, c in group if self.cluster.slots[s].host in chosen}
            b = {s: c for s, c in group if self.cluster.slots[s].host not in chosen}
        else:  # split GPU counts inside the host, halves preferred
            a, b = {}, {}
            for s, c in group:
                k = c // 2 if self.rng.random() < 0.5 else self.rng.randint(0, c)
                a[s], b[s] = k, c - k
            if not any(a.values()) or not any(b.values()):
                s, c = max(group, key=lambda sc: sc[1])
                if c < 2:
                    s = group[0][0]
                    a, b = {s: c}, {x: y for x, y in group if x != s}
                else:
                    a, b = dict(group), {}
                    a[s], b[s] = c // 2, c - c // 2
        rest = [g for k, g in enumerate(genome) if k != i]
        return make_genome([*rest, make_group(a), make_group(b)])

    def swap(self, genome: Genome) -> Genome:
        """Move some GPUs of one slot from a group to another; half the time also some back."""
        i = self.rng.randrange(len(genome))
        j = self.partner(genome, i)
        if j is None:
            return self.split(genome)
        a, b = dict(genome[i]), dict(genome[j])
        self._move(a, b)
        if self.rng.random() < 0.5 and b:
            self._move(b, a)
        rest = [g for k, g in enumerate(genome) if k not in (i, j)]
        return make_genome([*rest, make_group(a), make_group(b)])

    def _move(self, src: dict[int, int], dst: dict[int, int]) -> None:
        slot = self.rng.choice(sorted(s for s, c in src.items() if c > 0))
        k = self.rng.randint(1, src[slot])
        src[slot] -= k
        dst[slot] = dst.get(slot, 0) + k

    def mutate(self, genome: Genome) -> Genome:
        op = self.rng.choices((self.merge, self.split, self.swap), weights=C.MUTATION_WEIGHTS)[0]
        return op(genome)

    # --- crossover ---------------------------------------------------------------------------------------------
    def crossover(self, a: Genome, b: Genome) -> Genome:
        """Some groups of `a`, then `b`'s groups clipped to the GPUs still free, then repair: every GPU
        left over joins a group of its host."""
        free = {s.index: s.count for s in self.cluster.slots}
        child: list[Group] = []

        def place(group: Group) -> None:
            taken = make_group({s: min(c, free[s]) for s, c in group})
            for s, c in taken:
                free[s] -= c
            if taken:
                child.append(taken)

        for group in a:
            if self.rng.random() < 0.5:
                place(group)
        for group in b:
            place(group)
        leftover: dict[int, dict[int, int]] = {}
        for s, c in free.items():
            if c:
                leftover.setdefault(self.cluster.slots[s].host, {})[s] = c
        return make_genome([*child, *(make_group(g) for g in leftover.values())])


def genetic_search(
    evaluator: Evaluator,
    seed: int = C.DEFAULT_SEED,
    time_budget: float = C.DEFAULT_TIME_BUDGET_S,
    settings: GaSettings = GaSettings(),
) -> SearchResult:
    """Search partitions of the cluster for the plan with the best SLO attainment."""
    start = time.perf_counter()
    rng = random.Random(seed)
    ops = _Operators(evaluator.cm.cluster, rng)
    model_bytes = evaluator.cm.model.total_params * evaluator.cm.workload.dtype_bytes

    population = [evaluator.evaluate(g) for g in ops.seeds(model_bytes)]
    while len(population) < settings.population:
        parent = rng.choice(population[:4])
        population.append(evaluator.evaluate(ops.mutate(parent.genome)))
    best = max(population, key=lambda e: e.score.key)
    trace = [(time.perf_counter() - start, best)]
    generations = stale = 0

    def pick() -> Evaluated:
        return max(rng.sample(population, min(settings.tournament, len(population))), key=lambda e: e.score.key)

    stop_reason = "time budget"
    while time.perf_counter() - start < time_budget:
        if settings.max_generations is not None and generations >= settings.max_generations:
            stop_reason = "generations"
            break
        if stale >= settings.stagnation:
            stop_reason = "stagnation"
            break
        ranked = sorted(population, key=lambda e: e.score.key, reverse=True)
        children = _distinct(ranked, settings.elite)
        while len(children) < settings.population and time.perf_counter() - start < time_budget:
            if rng.random() < settings.crossover_rate:
                genome = ops.crossover(pick().genome, pick().genome)
                if rng.random() < 0.5:
                    genome = ops.mutate(genome)
            else:
                genome = ops.mutate(pick().genome)
            children.append(evaluator.evaluate(genome))
        population = children
        generations += 1
        leader = max(population, key=lambda e: e.score.key)
        if leader.score.key > best.score.key:
            best, stale = leader, 0
            trace.append((time.perf_counter() - start, best))
        else:
            stale += 1
    elapsed = time.perf_counter() - start
    return SearchResult(best, evaluator.evaluations, generations, elapsed, trace, stop_reason)


def _distinct(ranked: list[Evaluated], count: int) -> list[Evaluated]:
    out: list[Evaluated] = []
    seen: set[Genome] = set()
    for e in ranked:
        if len(out) == count:
            break
        if e.genome not in seen:
            seen.add(e.genome)
            out.append(e)
    return out
