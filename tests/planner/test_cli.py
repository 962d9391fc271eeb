import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from hexgen_zmq.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _plan(tmp_path, cluster="cluster-hexgen-half.yaml", *extra):
    out, report, svg = tmp_path / "deploy.yaml", tmp_path / "report.json", tmp_path / "plan.svg"
    argv = ["plan", "--cluster", str(CONFIGS / cluster), "--model", "llama-2-70b", "--prompt-len", "512",
            "--output-len", "64", "--rate", "1.5", "--slo", "15", "--out", str(out), "--report", str(report),
            "--seed", "3", "--time-budget", "5", "--picture", str(svg), "--quiet", "--runtime-requests", "200", *extra]
    return main(argv), out, report, svg


def test_plan_writes_deployment_report_and_picture(tmp_path):
    rc, out, report, svg = _plan(tmp_path, "cluster-hexgen-full.yaml", "--model-path", "/srv/llama-2-70b-hf")
    assert rc == 0
    data = yaml.safe_load(out.read_text())
    assert data["model"] == {"path": "/srv/llama-2-70b-hf", "dtype": "float16"}
    assert data["broker"]["clients"].startswith("tcp://10.1.0.1:")  # the first host of the cluster
    endpoints = [data["broker"]["clients"], data["broker"]["results"]]
    devices = []
    for pipeline in data["pipelines"]:
        assert pipeline["stages"][0]["layers"][0] == 0 and pipeline["stages"][-1]["layers"][1] == 80
        for stage in pipeline["stages"]:
            endpoints += [stage["inbound"], stage["tp_init"]]
            assert len({r["host"] for r in stage["ranks"]}) == 1
            devices += [(r["host"], r["device"]) for r in stage["ranks"]]
    assert len(endpoints) == len(set(endpoints)) and len(devices) == len(set(devices))
    rep = json.loads(report.read_text())
    assert {"objective", "pipelines", "search", "workload"} <= rep.keys()
    assert rep["objective"]["max_rate_at_target"] > 0 and 0 <= rep["objective"]["slo_attainment"] <= 1
    stage = rep["pipelines"][0]["stages"][0]
    assert {"gpu", "tp", "layers", "memory_gib", "devices", "host"} <= stage.keys()
    assert rep["search"]["seconds"] <= 5 + 2
    runtime = rep["runtime_model"]  # the step-level model's figures beside the fluid model's
    assert runtime["requests"] == 200 and runtime["max_rate_at_target"] > 0 and runtime["mean_tpot_s"] > 0
    assert ET.parse(svg).getroot().tag.endswith("svg")


def test_deployment_passes_the_runtime_loader(tmp_path):
    deployment = pytest.importorskip("hexgen_zmq.operations.deployment")
    for cluster in ("cluster-hexgen-full.yaml", "cluster-hexgen-half.yaml", "cluster-a100-baseline.yaml"):
        rc, out, _, _ = _plan(tmp_path, cluster, "--runtime-requests", "0")
        assert rc == 0
        loaded = deployment.load_deployment(out, check_checkpoint=False)
        assert loaded.pipelines


def test_no_batching_plans_one_request_per_pipeline(tmp_path):
    rc, _, report, _ = _plan(tmp_path, "cluster-a100-baseline.yaml", "--no-batching")
    rep = json.loads(report.read_text())
    assert rc == 0 and rep["workload"]["batching"] is False and rep["workload"]["max_batch"] == 1
    assert all(p["batch"] == 1 for p in rep["pipelines"])


def test_invalid_cluster_is_a_field_path_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hosts:\n  - {name: a, gpus: {A6000: 8}}\n  - {name: b, gpus: {A6000: 8}}\n  - {name: c, gpus: {A6001: 1}}\n")
    argv = ["plan", "--cluster", str(bad), "--model", "llama-2-70b", "--prompt-len", "8", "--output-len", "8",
            "--rate", "1", "--slo", "10", "--out", str(tmp_path / "d.yaml"), "--report", str(tmp_path / "r.json")]
    assert main(argv) == 2
    assert "hosts[2].gpus.A6001: unknown GPU type" in capsys.readouterr().err


def test_no_fitting_pipeline_exits_1(tmp_path):
    small = tmp_path / "small.yaml"
    small.write_text("hosts:\n  - {name: a, gpus: {T4: 2}}\n")
    argv = ["plan", "--cluster", str(small), "--model", "llama-2-70b", "--prompt-len", "8", "--output-len", "8",
            "--rate", "1", "--slo", "10", "--out", str(tmp_path / "d.yaml"), "--report", str(tmp_path / "r.json"),
            "--time-budget", "2"]
    assert main(argv) == 1


def test_planner_imports_and_plans_without_torch_transformers_or_zmq():
    code = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'zmq', 'numpy'):\n"
        "    sys.modules[name] = None\n"
        "import hexgen_zmq.planner.cli, hexgen_zmq.planner.emit, hexgen_zmq.planner.picture, hexgen_zmq.planner.report\n"
        "from hexgen_zmq.planner import load_cluster, make_plan, PRESETS, Workload\n"
        f"c = load_cluster({str(CONFIGS / 'cluster-a100-baseline.yaml')!r})\n"
        "assert make_plan(c, PRESETS['llama-2-7b'], Workload(128, 16, 1.0, 10.0), time_budget=2).pipelines\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
