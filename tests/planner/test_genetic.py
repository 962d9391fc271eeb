import random
from collections import Counter
from pathlib import Path

import pytest
from planner_helpers import TINY, small_cluster

from hexgen_zmq.planner.cluster import load_cluster
from hexgen_zmq.planner.costmodel import CostModel, Workload
from hexgen_zmq.planner.evaluate import Evaluator
from hexgen_zmq.planner.exhaustive import all_genomes
from hexgen_zmq.planner.genetic import GaSettings, _Operators, genetic_search
from hexgen_zmq.planner.model import PRESETS
from hexgen_zmq.planner.planning import make_plan
from hexgen_zmq.planner.simulate import unit_gaps

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

SMALL_CLUSTERS = {
    "two-regions-8": [("a", "r1", {"small": 4}), ("b", "r1", {"tiny": 2}), ("c", "r2", {"small": 1, "roomy": 1})],
    "mixed-host-8": [("a", "r1", {"tiny": 4}), ("b", "r2", {"small": 2, "tiny": 2})],
    "three-regions-7": [("a", "r1", {"small": 3}), ("b", "r2", {"tiny": 3}), ("c", "r3", {"roomy": 1})],
}


@pytest.mark.parametrize("name", sorted(SMALL_CLUSTERS))
@pytest.mark.parametrize("rate", [90.0, 150.0, 250.0])
def test_genetic_search_finds_the_exhaustive_optimum(name, rate):
    cluster = small_cluster(SMALL_CLUSTERS[name])
    assert cluster.total_gpus <= 8
    cm = CostModel(cluster, TINY, Workload(prompt_len=128, output_len=16, rate=rate, slo=0.5, max_batch=4))
    gaps = unit_gaps(0, 200)
    reference = Evaluator(cm, gaps)
    optimum = max(reference.evaluate(g).score.key for g in all_genomes({s.index: s.count for s in cluster.slots}))
    for seed in (1, 2):
        found = genetic_search(Evaluator(cm, gaps), seed=seed, time_budget=30, settings=GaSettings(stagnation=15))
        assert found.best.score.key == optimum


def _gpus(genome):
    total = Counter()
    for group in genome:
        for slot, count in group:
            total[slot] += count
    return total


def test_operators_keep_every_gpu_exactly_once():
    cluster = load_cluster(CONFIGS / "cluster-hexgen-full.yaml")
    ops = _Operators(cluster, random.Random(3))
    everything = Counter({s.index: s.count for s in cluster.slots})
    genomes = ops.seeds(1e11) + [ops.random_genome() for _ in range(20)]
    for genome in genomes:
        assert _gpus(genome) == everything
    for _ in range(300):
        a, b = random.Random(_).sample(genomes, 2)
        for child in (ops.mutate(a), ops.crossover(a, b), ops.merge(a), ops.split(a), ops.swap(a)):
            assert _gpus(child) == everything
            assert all(group and all(c > 0 for _, c in group) for group in child)


def _search(seed):
    cluster = load_cluster(CONFIGS / "cluster-hexgen-full.yaml")
    cm = CostModel(cluster, PRESETS["llama-2-70b"], Workload(512, 128, 7.0, 20.0))
    return genetic_search(Evaluator(cm, unit_gaps(seed)), seed, time_budget=600, settings=GaSettings(max_generations=8))


def test_same_seed_same_plan():
    a, b = _search(5), _search(5)
    assert a.best.genome == b.best.genome and a.best.pipelines == b.best.pipelines
    assert a.best.score == b.best.score


def _check_plan(outcome):
    cluster, model = outcome.cluster, outcome.model
    L = model.num_hidden_layers
    used = Counter()
    for p in outcome.pipelines:
        assert p.stages[0].layers[0] == 0 and p.stages[-1].layers[1] == L
        assert all(a.layers[1] == b.layers[0] for a, b in zip(p.stages, p.stages[1:]))
        assert all(st.layers[1] > st.layers[0] for st in p.stages)
        for st in p.stages:
            assert model.valid_tp(st.tp)
            assert st.memory_gib * 1024**3 <= cluster.gpu_types[st.gpu].memory_bytes
            for d in st.devices:
                used[st.host.name, d] += 1
    assert all(n == 1 for n in used.values())
    for host in cluster.hosts:
        devices = {d for (h, d) in used if h == host.name}
        assert devices <= set(range(sum(c for _, c in host.gpus)))


@pytest.mark.parametrize("name", ["cluster-hexgen-full.yaml", "cluster-hexgen-half.yaml", "cluster-a100-baseline.yaml"])
def test_plans_use_each_gpu_once_cover_all_layers_and_fit(name):
    outcome = make_plan(load_cluster(CONFIGS / name), PRESETS["llama-2-70b"], Workload(512, 64, 2.0, 30.0),
                        seed=1, time_budget=10, settings=GaSettings(max_generations=10))
    assert outcome.pipelines
    _check_plan(outcome)
    slot_of = {}
    for s in outcome.cluster.slots:
        for d in range(s.first_device, s.first_device + s.count):
            slot_of[outcome.cluster.hosts[s.host].name, d] = s.gpu.name
    for p in outcome.pipelines:
        for st in p.stages:
            assert {slot_of[st.host.name, d] for d in st.devices} == {st.gpu}


@pytest.mark.parametrize("name", sorted(SMALL_CLUSTERS))
def test_small_plans_are_valid(name):
    outcome = make_plan(small_cluster(SMALL_CLUSTERS[name]), TINY, Workload(128, 16, 150.0, 0.5, max_batch=4),
                        seed=0, time_budget=10)
    _check_plan(outcome)
