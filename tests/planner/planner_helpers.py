"""Small instances shared by the planner tests: a tiny Llama-shaped model and GPUs small enough that
memory binds, so that stage splits, TP degrees and grouping all matter."""

from __future__ import annotations

from hexgen_zmq.planner.cluster import Cluster, parse_cluster
from hexgen_zmq.planner.costmodel import CostModel, Workload
from hexgen_zmq.planner.model import ModelSpec

TINY = ModelSpec("tiny", hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000, head_dim=128)

SMALL_GPUS = {
    "small": {"memory_gib": 2.2, "fp16_tflops": 50, "hbm_gbps": 300},
    "tiny": {"memory_gib": 2.0, "fp16_tflops": 30, "hbm_gbps": 500},
    "roomy": {"memory_gib": 3.5, "fp16_tflops": 80, "hbm_gbps": 900},
}


def small_cluster(hosts: list[tuple[str, str, dict[str, int]]], wan_ms: float = 5.0) -> Cluster:
    """hosts: (name, region, gpus); every pair of regions joined by a 1 Gbit/s link."""
    regions = list(dict.fromkeys(r for _, r, _ in hosts))
    between = [{"a": a, "b": b, "gbps": 1, "latency_ms": wan_ms} for i, a in enumerate(regions) for b in regions[i + 1:]]
    return parse_cluster({
        "gpus": SMALL_GPUS,
        "hosts": [{"name": n, "region": r, "gpus": g} for n, r, g in hosts],
        "links": {"between": between},
    })
