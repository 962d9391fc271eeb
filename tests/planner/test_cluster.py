from pathlib import Path

import pytest

from hexgen_zmq.planner.catalog import CATALOG
from hexgen_zmq.planner.cluster import ClusterError, load_cluster, parse_cluster

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize(("name", "gpus", "regions"), [
    ("cluster-hexgen-full.yaml", 58, 4),
    ("cluster-hexgen-half.yaml", 30, 3),
    ("cluster-a100-baseline.yaml", 16, 1),
])
def test_paper_clusters_load(name, gpus, regions):
    cluster = load_cluster(CONFIGS / name)
    assert cluster.total_gpus == gpus
    assert len(cluster.regions) == regions
    assert not cluster.assumed_links


def test_catalog_covers_the_issue_list():
    for name in ("A100-40GB", "A100-40GB-PCIe", "A100-80GB", "A100-80GB-PCIe", "H100", "H200", "L40S", "A40",
                 "A6000", "A5000", "A4000", "RTX3090", "RTX3090Ti", "RTX4090", "T4", "V100"):
        assert name in CATALOG


def test_links_and_slots():
    cluster = parse_cluster({
        "gpus": {"A6000": {"memory_gib": 50}, "X1": {"memory_gib": 10, "fp16_tflops": 1, "hbm_gbps": 100}},
        "hosts": [{"name": "h0", "region": "r1", "gpus": {"A6000": 2, "X1": 3}},
                  {"name": "h1", "address": "10.0.0.2", "region": "r1", "gpus": {"X1": 1}},
                  {"name": "h2", "region": "r2", "gpus": {"T4": 1}}],
    })
    assert cluster.gpu_types["A6000"].memory_gib == 50 and cluster.gpu_types["A6000"].fp16_tflops == 154.8
    assert [(s.host, s.gpu.name, s.count, s.first_device) for s in cluster.slots] == [
        (0, "A6000", 2, 0), (0, "X1", 3, 2), (1, "X1", 1, 0), (2, "T4", 1, 0)]
    assert cluster.hosts[0].address == "h0"
    assert cluster.link(0, 0) is cluster.intra_host
    assert cluster.link(0, 1) is cluster.intra_region
    assert cluster.link(0, 2).gbps == 1.0  # assumed default WAN link, and reported as assumed
    assert cluster.assumed_links == [("r1", "r2")]


HOST = {"name": "h", "region": "r", "gpus": {"A6000": 1}}


@pytest.mark.parametrize(("data", "path"), [
    ([], "<top level>"),
    ({"hosts": [HOST], "gpu": {}}, "gpu: unknown field"),
    ({"hosts": []}, "hosts: expected a non-empty list"),
    ({"hosts": [HOST, HOST, {"name": "x", "gpus": {"A6000": 1}}]}, "hosts[1].name: duplicate"),
    ({"hosts": [HOST, {"name": "x", "gpus": {"A6000": 1}}, {"name": "y", "gpus": {"A6001": 2}}]},
     "hosts[2].gpus.A6001: unknown GPU type"),
    ({"hosts": [{"name": "h", "gpus": {"A6000": 0}}]}, "hosts[0].gpus.A6000: expected a positive integer"),
    ({"hosts": [{"name": "h", "gpus": {"A6000": True}}]}, "hosts[0].gpus.A6000: expected a positive integer"),
    ({"hosts": [{"name": "h"}]}, "hosts[0].gpus: expected a mapping"),
    ({"hosts": [{"name": "h", "address": "tcp://x", "gpus": {"A6000": 1}}]}, "hosts[0].address"),
    ({"hosts": [{"name": "h", "gpus": {"A6000": 1}, "cpus": 4}]}, "hosts[0].cpus: unknown field"),
    ({"gpus": {"Z": {"memory_gib": 10}}, "hosts": [HOST]}, "gpus.Z.fp16_tflops: missing"),
    ({"gpus": {"A6000": {"memory_gib": -1}}, "hosts": [HOST]}, "gpus.A6000.memory_gib: must be > 0"),
    ({"gpus": {"A6000": {"memory_gib": "big"}}, "hosts": [HOST]}, "gpus.A6000.memory_gib: expected a number"),
    ({"hosts": [HOST], "links": {"intra_host": {"gbps": 0, "latency_ms": 1}}}, "links.intra_host.gbps: must be > 0"),
    ({"hosts": [HOST], "links": {"intra_region": {"gbps": 1}}}, "links.intra_region.latency_ms: missing"),
    ({"hosts": [HOST], "links": {"between": [{"a": "r", "b": "mars", "gbps": 1, "latency_ms": 1}]}},
     "links.between[0].b: unknown region"),
    ({"hosts": [HOST], "links": {"between": {}}}, "links.between: expected a list"),
])
def test_invalid_cluster_files_name_the_field(data, path):
    with pytest.raises(ClusterError) as info:
        parse_cluster(data)
    assert str(info.value).startswith(path)


def test_invalid_yaml_file(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("hosts: [\n")
    with pytest.raises(ClusterError, match="not valid YAML"):
        load_cluster(bad)
