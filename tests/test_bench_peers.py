"""tools/bench_peers.py's pure parts: the server list, the interleaved order, seeds, aggregation and the
deployment rewrite. No server is started and no peer needs to be installed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.bench_peers import (  # noqa: E402
    Run, aggregate, format_table, hexgen_deployment, parse_ints, parse_servers, run_seed, schedule, server_spec,
)


def run(server: str, start: int, round_: int, concurrency: int, tok_s: float) -> Run:
    return Run(server, start, round_, concurrency, tok_s, 8, 0, 0, 0.1, 0.02)


def test_parse_servers_keeps_order_and_refuses_unknown_or_repeated():
    assert parse_servers("vllm-bf16, hexgen-f32,llama-f16") == ["vllm-bf16", "hexgen-f32", "llama-f16"]
    for bad in ("", "hexgen-f64", "llama-f16,llama-f16"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_servers(bad)
    assert parse_ints("32,1") == [32, 1]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_ints("32,0")


def test_schedule_interleaves_servers_across_starts():
    assert schedule(["a", "b", "c"], 2) == [(0, "a"), (0, "b"), (0, "c"), (1, "a"), (1, "b"), (1, "c")]


def test_every_run_has_its_own_seed_shared_by_all_servers():
    seeds = {run_seed(0, s, r, c) for s in range(3) for r in range(4) for c in (1, 32)}
    assert len(seeds) == 3 * 4 * 2
    assert run_seed(7, 1, 2, 32) == run_seed(7, 1, 2, 32)


def test_aggregate_medians_spread_and_ratios():
    runs = [run("hexgen-f32", 0, 0, 32, 200), run("hexgen-f32", 0, 1, 32, 220),
            run("hexgen-f32", 1, 0, 32, 180), run("hexgen-f32", 1, 1, 32, 100),
            run("vllm-bf16", 0, 0, 32, 400), run("vllm-bf16", 0, 1, 32, 420),
            run("vllm-bf16", 1, 0, 32, 300), run("vllm-bf16", 1, 1, 32, 280),
            run("hexgen-f32", 0, 0, 1, 20), run("vllm-bf16", 0, 0, 1, 40)]
    rows = {(r.server, r.concurrency): r for r in aggregate(runs, "hexgen-f32")}
    base, peer = rows[("hexgen-f32", 32)], rows[("vllm-bf16", 32)]
    assert (base.runs, base.median, base.low, base.high) == (4, 190, 100, 220)
    assert base.ratio == 1.0
    assert peer.median == 350 and peer.ratio == pytest.approx(350 / 190)
    # per start: start 0 medians 410 / 210, start 1 medians 290 / 140
    assert peer.ratio_per_start == pytest.approx([410 / 210, 290 / 140])
    assert rows[("vllm-bf16", 1)].ratio == 2.0
    assert peer.tpot_p50_ms == pytest.approx(20.0)
    table = format_table(list(rows.values()), "hexgen-f32")
    lines = table.splitlines()
    assert len(lines) == 2 + 4 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert lines[2].startswith("| hexgen-f32 | 32 |") and "1.84x" in lines[3]


def test_aggregate_without_baseline_has_no_ratios():
    rows = aggregate([run("llama-f16", 0, 0, 32, 150)], None)
    assert rows[0].ratio is None and rows[0].ratio_per_start == []
    assert aggregate([run("llama-f16", 0, 0, 32, 150)], "hexgen-f32")[0].ratio is None


def test_hexgen_deployment_moves_every_port_and_sets_model_and_dtype(tmp_path):
    template = ROOT / "configs" / "smollm2-local.yaml"
    text = hexgen_deployment(template, tmp_path / "model", "bfloat16")
    spec, original = yaml.safe_load(text), yaml.safe_load(template.read_text())
    assert spec["model"] == {"path": str((tmp_path / "model").resolve()), "dtype": "bfloat16"}
    assert [p["id"] for p in spec["pipelines"]] == [p["id"] for p in original["pipelines"]]
    addresses = [spec["broker"]["clients"], spec["broker"]["results"]] + [
        s[key] for p in spec["pipelines"] for s in p["stages"] for key in ("inbound", "tp_init")]
    assert all(a.startswith("tcp://127.0.0.1:") for a in addresses)
    assert len(set(addresses)) == len(addresses)
    assert not set(addresses) & {f"tcp://127.0.0.1:{port}" for port in range(5700, 5708)}
    # ports asked of the OS one by one, unbound, once came back twice in one file (the deployment was refused)
    for _ in range(50):
        again = yaml.safe_load(hexgen_deployment(template, tmp_path / "model", "float32"))
        ports = [again["broker"]["clients"], again["broker"]["results"]] + [
            s[key] for p in again["pipelines"] for s in p["stages"] for key in ("inbound", "tp_init")]
        assert len(set(ports)) == len(ports)


def test_server_spec_skips_peers_that_are_not_installed(tmp_path):
    args = argparse.Namespace(peers=tmp_path / "nothing", model=tmp_path, concurrency=[32, 1], threads=2,
                              vllm_bind="auto", vllm_kv_gib=2, hexgen_config=ROOT / "configs" / "smollm2-local.yaml")
    assert "not installed" in server_spec("vllm-bf16", args, tmp_path)
    assert "not installed" in server_spec("llama-f16", args, tmp_path)
    spec = server_spec("hexgen-f32", args, tmp_path)
    assert spec.argv[3:5] == ["up", str(tmp_path / "hexgen-f32.yaml")] and "--http" in spec.argv
