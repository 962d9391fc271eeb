"""The cost model against published measurements, and the behaviours the throughput figures rest on:
chunked prefill sharing weight reads with decode steps, and batches sized by memory."""

import math
from pathlib import Path

from hexgen_zmq.planner.cluster import load_cluster
from hexgen_zmq.planner.costmodel import CostModel, Workload
from hexgen_zmq.planner.genetic import genetic_search
from hexgen_zmq.planner.evaluate import Evaluator
from hexgen_zmq.planner.model import PRESETS
from hexgen_zmq.planner.plan import Pipeline, Stage, pipeline_batch, pipeline_timing
from hexgen_zmq.planner.simulate import unit_gaps

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
A100_80GB_HOST = {"gpus": {"A100-40GB": {"memory_gib": 80, "hbm_gbps": 2039}},
                  "hosts": [{"name": "h", "gpus": {"A100-40GB": 8}}],
                  "links": {"intra_host": {"gbps": 2400, "latency_ms": 0.005}}}


def _tp8_a100_80gb():
    from hexgen_zmq.planner.cluster import parse_cluster
    cm = CostModel(parse_cluster(A100_80GB_HOST), PRESETS["llama-2-70b"], Workload(512, 128, 1.0, 20.0))
    return cm, Pipeline((Stage(0, 8, 0, 80),), 0.0)


def test_llama_70b_on_8_a100_matches_published_latencies():
    # PyTorch/IBM, "Speed up inference on Llama 2" (2023): 29 ms per token for one request of Llama-2-70B on
    # 8 x A100-80GB with TP 8 (torch.compile). Accept 20-40 ms (other runtimes: vLLM, TensorRT-LLM).
    cm, pipeline = _tp8_a100_80gb()
    t = pipeline_timing(cm, pipeline)
    assert 0.020 <= t.step_times[1] <= 0.040
    # Prefill of 512 tokens: 70.6 TFLOP over 8 x 312 TFLOPS at COMPUTE_EFFICIENCY is 51 ms, plus TP
    # all-reduces and overheads; reported TTFTs for this setup are about 100-200 ms with framework overhead.
    # The model sits at the optimistic end: accept 50-200 ms.
    assert 0.050 <= t.prefill_latency <= 0.200


def test_prefill_chunks_ride_along_memory_bound_decode_steps():
    cm, pipeline = _tp8_a100_80gb()
    t = pipeline_timing(cm, pipeline)
    # With a few requests decoding the step is memory-bound: a prompt's chunk costs less than running alone,
    # but never less than nothing, and never more than alone plus the extra all-reduce bytes.
    assert 0 < t.busy(4) < t.prefill_busy
    assert all(x > 0 for x in t.prefill_marginal)
    assert math.isclose(t.busy(0), t.prefill_busy)


def test_batch_is_set_by_memory_not_a_fixed_cap():
    cm = CostModel(load_cluster(CONFIGS / "cluster-a100-baseline.yaml"), PRESETS["llama-2-70b"],
                   Workload(512, 128, 1.0, 20.0))
    pipeline = Pipeline((Stage(0, 8, 0, 80),), 0.0)
    b = pipeline_batch(cm, pipeline)
    assert b > 256  # 40 GB - 17 GB of weights per GPU hold the KV cache of hundreds of requests
    gpu = cm.cluster.slots[0].gpu
    assert cm.stage_memory(gpu, 8, 80, True, True, b) <= cm.usable_bytes(gpu)
    assert cm.stage_memory(gpu, 8, 80, True, True, b + 1) > cm.usable_bytes(gpu)


def test_default_search_stops_on_a_count_and_repeats():
    cm = CostModel(load_cluster(CONFIGS / "cluster-a100-baseline.yaml"), PRESETS["llama-2-70b"],
                   Workload(512, 128, 20.0, 20.0))
    a = genetic_search(Evaluator(cm, unit_gaps(4)), seed=4)
    b = genetic_search(Evaluator(cm, unit_gaps(4)), seed=4)
    assert a.stop_reason in ("stagnation", "generations") and b.stop_reason == a.stop_reason
    assert a.best.genome == b.best.genome and a.best.score == b.best.score
