"""Profiles: the schema round-trips, bad ones are refused by field path, and the cost model uses the measured
figures as measured on the profiled shapes (and effective rates for another model); a CPU host plans."""

from __future__ import annotations

import copy
import math

import pytest
import yaml

from hexgen_zmq.planner.cluster import ClusterError, load_cluster
from hexgen_zmq.planner.costmodel import CostModel, Workload
from hexgen_zmq.planner.emit import deployment_dict
from hexgen_zmq.planner.genetic import GaSettings
from hexgen_zmq.planner.model import PRESETS, ModelSpec
from hexgen_zmq.planner.planning import make_plan
from hexgen_zmq.planner.profile import ProfileError, load_profile, parse_profile, write_profile

PROFILE = {
    "version": 1,
    "host": "cpu-a",
    "device": {"kind": "cpu", "name": "cpu", "dtype": "float32", "threads": 1, "memory_gib": 4.0},
    "model": {"name": "tiny", "hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 8,
              "num_key_value_heads": 4, "head_dim": 32, "vocab_size": 499},
    "prefill": [{"prompt_len": 16, "layer_s_per_token": 3.5e-5}, {"prompt_len": 64, "layer_s_per_token": 2.0e-5},
                {"prompt_len": 256, "layer_s_per_token": 1.9e-5}],
    "decode": [{"batch": b, "context": c, "layer_s": t} for (b, c), t in {
        (1, 64): 2.0e-4, (4, 64): 2.4e-4, (16, 64): 4.0e-4,
        (1, 256): 2.2e-4, (4, 256): 3.0e-4, (16, 256): 6.0e-4}.items()],
    "head": [{"rows": 1, "s": 8e-5}, {"rows": 4, "s": 9e-5}, {"rows": 16, "s": 1.4e-4}],
    "stage_overhead_s": 3e-4,
    "links": [{"peer": "cpu-b", "address": "10.9.0.2", "gbps": 0.25, "latency_ms": 20.0}],
}
MODEL = ModelSpec("tiny", 256, 688, 8, 8, 4, 499, 32)


def cluster_file(tmp_path, profile=PROFILE, gpus=None):
    write = tmp_path / "cpu-a.yaml"
    write.write_text(yaml.safe_dump(profile))
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump({
        "hosts": [{"name": "cpu-a", "region": "r1", "gpus": gpus or {"cpu": 2}, "profile": "cpu-a.yaml"},
                  {"name": "cpu-b", "region": "r2", "gpus": {"cpu": 2}, "profile": "cpu-a.yaml"}],
        "links": {"between": [{"a": "r1", "b": "r2", "gbps": 10, "latency_ms": 1}]},
    }))
    return tmp_path / "cluster.yaml"


def test_schema_round_trips(tmp_path):
    profile = parse_profile(copy.deepcopy(PROFILE))
    assert parse_profile(profile.to_dict()) == profile
    write_profile(tmp_path / "p.yaml", profile, "a comment")
    assert load_profile(tmp_path / "p.yaml") == profile
    assert profile.link_to("cpu-b").latency_ms == 20.0


@pytest.mark.parametrize("path, value, message", [
    (("version",), 2, "version: expected 1"),
    (("device", "kind"), "tpu", "device.kind: expected cpu or cuda"),
    (("device", "memory_gib"), -1, "device.memory_gib: expected a positive number"),
    (("model", "hidden_size"), "big", "model.hidden_size: expected a positive integer"),
    (("prefill", 1, "layer_s_per_token"), None, "prefill[1].layer_s_per_token: expected a number"),
    (("decode", 2, "batch"), 0, "decode[2].batch: expected a positive integer"),
    (("head",), [], "head: expected a non-empty list"),
    (("links", 0, "gbps"), 0, "links[0].gbps: expected a positive number"),
    (("stage_overhead_s",), "fast", "stage_overhead_s: expected a number"),
])
def test_bad_fields_are_refused_by_path(path, value, message):
    data = copy.deepcopy(PROFILE)
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ProfileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_profile(data)


def test_missing_unknown_duplicate_and_incomplete_grid_are_refused():
    for mutate, message in [
        (lambda d: d.pop("decode"), "decode: missing"),
        (lambda d: d["device"].update(cores=2), "device.cores: unknown field"),
        (lambda d: d["prefill"].append(dict(d["prefill"][0])), r"prefill\[3\]: prompt_len 16 measured twice"),
        (lambda d: d["decode"].pop(), r"decode: expected every batch \(\[1, 4, 16\]\) at every context"),
    ]:
        data = copy.deepcopy(PROFILE)
        mutate(data)
        with pytest.raises(ProfileError, match=message):
            parse_profile(data)


def test_a_cluster_names_the_bad_profile_field(tmp_path):
    data = copy.deepcopy(PROFILE)
    data["decode"][1]["layer_s"] = "slow"
    with pytest.raises(ClusterError, match=r"hosts\[0\].profile: decode\[1\].layer_s: expected a number"):
        load_cluster(cluster_file(tmp_path, data))
    data = copy.deepcopy(PROFILE)
    data["links"][0]["peer"] = "nowhere"
    with pytest.raises(ClusterError, match=r"hosts\[0\].profile: links\[0\].peer: 'nowhere' is not a host"):
        load_cluster(cluster_file(tmp_path, data))
    with pytest.raises(ClusterError, match=r"hosts\[0\].gpus.tpu: unknown GPU type"):
        load_cluster(cluster_file(tmp_path, gpus={"tpu": 1}))


def test_predicted_step_times_equal_the_profile_on_profiled_shapes(tmp_path):
    cluster = load_cluster(cluster_file(tmp_path))
    gpu = cluster.slots[0].gpu
    assert gpu.kind == "cpu" and gpu.profile is not None and gpu.memory_gib == 4.0
    layers, overhead = 3, PROFILE["stage_overhead_s"]
    head = {p["rows"]: p["s"] for p in PROFILE["head"]}
    for context in (64, 256):  # a workload whose mean decode context is the profiled one
        cm = CostModel(cluster, MODEL, Workload(context - 16, 32, 1.0, 10.0, dtype="float32"))
        for point in (p for p in PROFILE["decode"] if p["context"] == context):
            b = point["batch"]
            assert math.isclose(cm.stage_time(gpu, 1, layers, False, b, decode=True), layers * point["layer_s"] + overhead)
            assert math.isclose(cm.stage_time(gpu, 1, layers, True, b, decode=True),
                                layers * point["layer_s"] + overhead + head[b])
    for point in PROFILE["prefill"]:
        p = point["prompt_len"]
        cm = CostModel(cluster, MODEL, Workload(p, 8, 1.0, 10.0, dtype="float32"))
        assert math.isclose(cm.stage_time(gpu, 1, layers, True, p, decode=False),
                            layers * p * point["layer_s_per_token"] + overhead + head[1])


def test_between_profiled_shapes_the_figures_interpolate(tmp_path):
    profile = load_cluster(cluster_file(tmp_path)).slots[0].gpu.profile
    assert 2.4e-4 < profile.decode_layer_s(8, 64) < 4.0e-4
    assert math.isclose(profile.decode_layer_s(4, 160), (2.4e-4 + 3.0e-4) / 2)
    assert profile.decode_layer_s(32, 64) > 4.0e-4  # extrapolated along the last segment
    mixed = profile.layer_time(4, 64, 64)
    assert profile.decode_layer_s(4, 64) < mixed < profile.decode_layer_s(4, 64) + profile.prefill_layer_s(64)


def test_measured_links_replace_the_region_link(tmp_path):
    cluster = load_cluster(cluster_file(tmp_path))
    link = cluster.link(0, 1)  # host cpu-a to cpu-b, measured by cpu-a's profile
    assert math.isclose(link.bandwidth, 0.25e9 / 8) and link.latency_ms == 20.0
    assert cluster.link(0, 0) == cluster.intra_host


def test_another_model_uses_effective_rates(tmp_path):
    cluster = load_cluster(cluster_file(tmp_path))
    gpu = cluster.slots[0].gpu
    cm = CostModel(cluster, PRESETS["llama-2-7b"], Workload(128, 32, 1.0, 10.0))
    assert not cm.measured(gpu)
    flops, bandwidth, fixed = gpu.profile.effective()
    assert flops > 0 and bandwidth > 0 and 0 <= fixed < 2.0e-4
    decode = cm.stage_time(gpu, 1, 1, False, 1, decode=True)
    m = PRESETS["llama-2-7b"]
    roofline = max(2 * m.layer_params / flops, 2 * m.layer_params / bandwidth)  # matmul FLOPs; fp16 weight bytes
    assert decode > fixed + PROFILE["stage_overhead_s"] + 0.99 * roofline and math.isfinite(decode)


def test_a_cpu_host_is_planned_like_any_other(tmp_path):
    cluster = load_cluster(cluster_file(tmp_path))
    workload = Workload(48, 32, 2.0, 5.0, dtype="float32", max_batch=4)
    outcome = make_plan(cluster, MODEL, workload, time_budget=5, settings=GaSettings(max_generations=20))
    assert outcome.pipelines
    data = deployment_dict(outcome, "/models/tiny", "float32")
    devices = {r["device"] for p in data["pipelines"] for s in p["stages"] for r in s["ranks"]}
    assert devices == {"cpu"}


def test_a_cpu_stage_holds_the_kv_budget_the_runtime_gives_it(tmp_path):
    """The runtime gives a CPU stage 1 GiB of KV cache (at most 64 longest contexts), whatever the host's
    memory: the model's budget is the same, so a plan holds as many requests at once as its stages will."""
    from hexgen_zmq.planner.plan import Stage
    from hexgen_zmq.planner.stepsim import kv_budget_blocks

    cluster = load_cluster(cluster_file(tmp_path))
    cm = CostModel(cluster, MODEL, Workload(48, 32, 2.0, 5.0, dtype="float32"))
    per_token = 8 * 2 * 4 * 32 * 4  # layers x (K, V) x KV heads x head_dim x float32
    assert kv_budget_blocks(cm, Stage(0, 1, 0, 8), True, True) == (1 << 30) // per_token // 16
    capped = CostModel(cluster, ModelSpec("tiny", 256, 688, 8, 8, 4, 499, 32, max_positions=256),
                       Workload(48, 32, 2.0, 5.0, dtype="float32"))
    assert kv_budget_blocks(capped, Stage(0, 1, 0, 8), True, True) == 64 * 256 // 16
    assert kv_budget_blocks(cm, Stage(0, 1, 0, 4), True, False) == 2 * (1 << 30) // per_token // 16  # half the layers
