"""Predicted against measured: plan a profiled cluster, deploy the plan, bench it at Poisson rates, compare.

For each rate it prints the step-level runtime model's prediction (planner/stepsim.py, with the cost
model's profiled figures) beside what `hexgen-zmq bench --launch --rate R` measures on the deployed plan:
mean time to first token, mean time per output token, SLO attainment and completed requests per second.
This version deploys on this machine (every host of the cluster file must be 127.0.0.1, as in
configs/cluster-cpu-local.yaml); emulated datacenters (tools/sites.py) are not wired in yet.

    .venv/bin/python tools/plan_fidelity.py [--cluster configs/cluster-cpu-local.yaml --model models/tiny]
        [--rates 4,8,16] [--requests 64] [--prompt-len 64 --output-len 64 --slo 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hexgen_zmq.planner.cluster import load_cluster
from hexgen_zmq.planner.costmodel import CostModel, Workload
from hexgen_zmq.planner.emit import write_deployment
from hexgen_zmq.planner.evaluate import Evaluator
from hexgen_zmq.planner.model import load_model
from hexgen_zmq.planner.planning import make_plan
from hexgen_zmq.planner.simulate import unit_gaps
from hexgen_zmq.planner.stepsim import pipe_model, simulate_steps, trace

ROOT = Path(__file__).resolve().parents[1]


def predicted(cm: CostModel, pipelines, rate: float, n: int, seed: int) -> dict:
    """The runtime model's figures for `n` Poisson requests at `rate` (pipelines in the deployment's order)."""
    w = cm.workload
    ev = Evaluator(cm, [])
    ordered = sorted(pipelines, key=lambda p: (-ev.timing(p).capacity(w.output_len), p.stages))
    models = [pipe_model(cm, p, w.batching) for p in ordered]
    r = simulate_steps(models, trace(unit_gaps(seed, n), rate, w.prompt_len, w.output_len))
    done = [i for i, x in enumerate(r.latencies) if x < float("inf")]
    span = max(r.arrivals[i] + r.latencies[i] for i in done) - r.arrivals[0]
    return {"ttft": statistics.fmean(r.ttft[i] for i in done), "tpot": statistics.fmean(r.tpot[i] for i in done),
            "attainment": r.attainment(w.slo), "rps": len(done) / span}


def measured(config: Path, rate: float, args: argparse.Namespace, out: Path) -> dict:
    cmd = [str(ROOT / ".venv/bin/hexgen-zmq"), "bench", "--config", str(config), "--launch", "--rate", str(rate),
           "--requests", str(args.requests), "--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len),
           "--slo", str(args.slo), "--seed", str(args.seed), "--json", str(out)]
    for attempt in range(3):  # the previous run's processes may still hold the ports for a moment
        time.sleep(3)
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=900)
        if done.returncode == 0:
            break
    else:
        raise RuntimeError(f"bench failed at rate {rate}: {done.stderr[-2000:]}")
    report = json.loads(out.read_text())["reports"][0]
    return {"ttft": report["ttft_s"]["mean"], "tpot": report["tpot_s"]["mean"], "attainment": report["slo_attainment"],
            "rps": report["requests_per_s"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cluster", default=str(ROOT / "configs/cluster-cpu-local.yaml"))
    ap.add_argument("--model", default=str(ROOT / "models/tiny"))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--slo", type=float, default=5.0)
    ap.add_argument("--rates", default="4,8,16")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rates = [float(x) for x in args.rates.split(",")]
    cluster, model = load_cluster(args.cluster), load_model(args.model)
    if any(h.address not in ("127.0.0.1", "localhost") for h in cluster.hosts):
        print("plan_fidelity: only clusters on this machine (127.0.0.1) for now", file=sys.stderr)
        return 2
    workload = Workload(args.prompt_len, args.output_len, rates[0], args.slo, args.dtype)
    outcome = make_plan(cluster, model, workload, seed=args.seed)
    cm = CostModel(cluster, model, workload)
    pipelines = outcome.search.best.pipelines
    shape = ", ".join(f"{p.id}: " + "+".join(f"{s.host.name}:{s.gpu}x{s.tp}[{s.layers[0]},{s.layers[1]})" for s in p.stages)
                      for p in outcome.pipelines)
    print(f"plan: {shape}")
    print("| rate | TTFT pred / meas | TPOT pred / meas | attainment pred / meas | req/s pred / meas |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "plan.yaml"
        write_deployment(config, outcome, str(Path(args.model).resolve()), args.dtype)
        for rate in rates:
            p = predicted(cm, pipelines, rate, args.requests, args.seed)
            m = measured(config, rate, args, Path(tmp) / "bench.json")
            print(f"| {rate:g} | {p['ttft'] * 1e3:.1f} / {m['ttft'] * 1e3:.1f} ms | {p['tpot'] * 1e3:.2f} / "
                  f"{m['tpot'] * 1e3:.2f} ms | {p['attainment']:.0%} / {m['attainment']:.0%} | "
                  f"{p['rps']:.2f} / {m['rps']:.2f} |", flush=True)
    print("(predicted: step-level runtime model with the cluster's profiles; measured: hexgen-zmq bench --launch; "
          "the bench's Poisson trace and the model's are different draws of the same rate)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
