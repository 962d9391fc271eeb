"""Benchmark of the HexGen planner on the paper's clusters with Llama-2-70B.

Prints, for a workload (prompt/output lengths, SLO):
  1. search time: how long the genetic search takes to reach a plan within 2% of the best plan found with
     ten times its budget (the figure of merit is the plan's highest sustainable rate at 99% attainment);
  2. the 58-GPU heterogeneous cluster's highest sustainable rate against the 16 x A100-40GB baseline at the
     same SLO, and the lowest deadline each meets at the same rate (the paper: up to 4x rate, 2.3x deadline);
  3. the genetic search against random search and against the published prototype's approach (uniform
     layer split with TP enumeration, no elite), each with the same time budget.
It first prints the cost model's estimates next to published reference points (Llama-2-70B, TP 8 on
8 x A100-80GB), so that the absolute figures can be judged.

    .venv/bin/python tools/bench_planner.py [--slo 20] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hexgen_zmq.planner import constants as C
from hexgen_zmq.planner.baselines import prototype_search, random_search
from hexgen_zmq.planner.cluster import load_cluster, parse_cluster
from hexgen_zmq.planner.costmodel import CostModel, Workload
from hexgen_zmq.planner.evaluate import Evaluated, Evaluator
from hexgen_zmq.planner.genetic import GaSettings, genetic_search
from hexgen_zmq.planner.model import PRESETS
from hexgen_zmq.planner.plan import Pipeline, Stage, pipeline_timing
from hexgen_zmq.planner.simulate import max_rate, simulate, unit_gaps

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TARGET = C.DEFAULT_TARGET_ATTAINMENT
REPORT_GAPS = unit_gaps(12345, C.REPORT_REQUESTS)


def rate_of(ev: Evaluator, best: Evaluated) -> float:
    """Highest rate the plan sustains at the target attainment, on the long report trace."""
    w = ev.cm.workload
    return max_rate([ev.timing(p) for p in best.pipelines], w.output_len, REPORT_GAPS, w.slo, TARGET)


def deadline_of(ev: Evaluator, best: Evaluated, rate: float) -> float:
    w = ev.cm.workload
    return simulate([ev.timing(p) for p in best.pipelines], w.output_len, REPORT_GAPS, rate, w.slo).quantile(TARGET)


def cost_model(cluster: str, args: argparse.Namespace, rate: float) -> CostModel:
    w = Workload(args.prompt_len, args.output_len, rate, args.slo, max_batch=args.max_batch)
    return CostModel(load_cluster(CONFIGS / cluster), PRESETS["llama-2-70b"], w)


def plan_at_frontier(cluster: str, args: argparse.Namespace, seed: int, budget: float, settings: GaSettings):
    """Plan for a rate, measure the plan's highest rate, plan again for that rate; keep the better plan."""
    rate, best = args.rate, None
    for _ in range(2):
        cm = cost_model(cluster, args, rate)
        ev = Evaluator(cm, unit_gaps(seed))
        result = genetic_search(ev, seed, budget, settings)
        found = (rate_of(ev, result.best), result, ev)
        if best is None or found[0] > best[0]:
            best = found
        rate = max(found[0], 0.05)
    return best


def describe(ev: Evaluator, best: Evaluated) -> str:
    slots, hosts = ev.cm.cluster.slots, ev.cm.cluster.hosts
    parts = []
    for p in best.pipelines:
        parts.append("+".join(f"{hosts[slots[s.slot].host].name}:{s.tp}x{slots[s.slot].gpu.name}[{s.start},{s.end})" for s in p.stages))
    return f"{len(best.pipelines)} pipelines: " + ", ".join(sorted(parts))


def reference_points(args: argparse.Namespace) -> None:
    """The cost model against measurements: Llama-2-70B, TP 8 on one host of 8 x A100-80GB SXM (NVLink)."""
    cluster = parse_cluster({"gpus": {"A100-80GB": {}}, "hosts": [{"name": "h", "gpus": {"A100-80GB": 8}}],
                             "links": {"intra_host": {"gbps": 2400, "latency_ms": 0.005}}})
    cm = CostModel(cluster, PRESETS["llama-2-70b"], Workload(args.prompt_len, args.output_len, 1.0, args.slo))
    t = pipeline_timing(cm, Pipeline((Stage(0, 8, 0, 80),), 0.0))
    print("0. reference points, Llama-2-70B TP 8 on 8 x A100-80GB")
    print(f"   decode step, 1 request : model {t.step_times[1] * 1e3:.1f} ms; measured 29 ms (PyTorch/IBM blog, "
          f"torch.compile), about 25-40 ms in vLLM")
    print(f"   prefill of {args.prompt_len} tokens  : model {t.prefill_latency * 1e3:.0f} ms; reported about "
          f"100-200 ms for 512 tokens (rule of thumb, framework overheads included)")
    print(f"   decode step, {t.max_batch} requests (all the KV cache holds): model {t.step_times[-1] * 1e3:.0f} ms\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--slo", type=float, default=20.0, help="deadline per request, seconds")
    ap.add_argument("--rate", type=float, default=6.0, help="first rate the search plans for")
    ap.add_argument("--max-batch", type=int, default=C.DEFAULT_MAX_BATCH)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget", type=float, default=C.DEFAULT_TIME_BUDGET_S, help="default search budget, s")
    args = ap.parse_args(argv)
    full, base = "cluster-hexgen-full.yaml", "cluster-a100-baseline.yaml"
    print(f"Llama-2-70B, prompt {args.prompt_len}, output {args.output_len}, SLO {args.slo:g} s, "
          f"target {TARGET:.0%}, batch {args.max_batch}; {len(args.seeds)} seeds\n")

    reference_points(args)

    # 1. Search time to within 2% of a ten-times-budget search.
    print("1. search time on the 58-GPU cluster (to within 2% of the best plan of a 10x-budget search)")
    hits, rate_at = [], args.rate
    for seed in args.seeds:
        cm = cost_model(full, args, rate_at)
        ev = Evaluator(cm, unit_gaps(seed))
        t0 = time.perf_counter()
        result = genetic_search(ev, seed, args.budget)
        spent = time.perf_counter() - t0
        long_ev = Evaluator(cm, unit_gaps(seed))
        long_budget = 10 * max(spent, 1.0)
        reference = genetic_search(long_ev, seed + 1000, long_budget, GaSettings(stagnation=10**9, max_generations=None))
        ref_rate = rate_of(long_ev, reference.best)
        reach = next((t for t, e in result.trace if rate_of(ev, e) >= 0.98 * ref_rate), None)
        final = rate_of(ev, result.best)
        hits.append(reach)
        print(f"   seed {seed}: search stopped after {spent:.1f} s ({result.evaluations} plans, {result.generations} "
              f"generations, {result.stop_reason}); best rate {final:.2f} req/s vs {ref_rate:.2f} with {long_budget:.0f} s "
              f"({final / ref_rate:.1%}); within 2% after "
              + (f"{reach:.1f} s" if reach is not None else "never"))
    reached = [h for h in hits if h is not None]
    if reached:
        print(f"   => within 2% after {max(reached):.1f} s at worst ({len(reached)}/{len(hits)} seeds); "
              f"the paper's search took 1.5-2.1 min\n")

    # 2. Heterogeneous 58 GPUs against 16 x A100 at the same SLO.
    print("2. highest sustainable rate at the same SLO: 58 heterogeneous GPUs vs 16 x A100-40GB")
    seed = args.seeds[0]
    het_rate, het_result, het_ev = plan_at_frontier(full, args, seed, args.budget, GaSettings())
    a100_rate, a100_result, a100_ev = plan_at_frontier(base, args, seed, args.budget, GaSettings())
    print(f"   58 GPUs : {het_rate:.2f} req/s; {describe(het_ev, het_result.best)}")
    print(f"   16 A100 : {a100_rate:.2f} req/s; {describe(a100_ev, a100_result.best)}")
    if a100_rate > 0:
        print(f"   => rate ratio {het_rate / a100_rate:.2f}x (paper: up to 4x)")
    common = min(het_rate, a100_rate)
    if common > 0:
        d_het, d_a100 = deadline_of(het_ev, het_result.best, common), deadline_of(a100_ev, a100_result.best, common)
        print(f"   at {common:.2f} req/s the lowest deadline met by {TARGET:.0%}: 58 GPUs {d_het:.2f} s, "
              f"16 A100 {d_a100:.2f} s => {d_a100 / d_het:.2f}x lower (paper: up to 2.3x)\n")

    # 3. GA against random search and the prototype's approach, same budget, planned for the same rate.
    budget = max(het_result.elapsed, 2.0)
    for cluster in (full, "cluster-hexgen-half.yaml"):
        rate = het_ev.cm.workload.rate if cluster == full else het_ev.cm.workload.rate / 2
        cm = cost_model(cluster, args, rate)
        print(f"3. same budget ({budget:.1f} s) on {cluster}, planning for {rate:.2f} req/s")
        rows = []
        for seed in args.seeds:
            ga_ev = Evaluator(cm, unit_gaps(seed))
            ga = genetic_search(ga_ev, seed, budget, GaSettings(stagnation=10**9, max_generations=None))
            rs_ev = Evaluator(cm, unit_gaps(seed))
            rs = random_search(rs_ev, seed, budget)
            proto = prototype_search(cm, unit_gaps(seed), seed, budget)
            rows.append((rate_of(ga_ev, ga.best), rate_of(rs_ev, rs.best), rate_of(ga_ev, proto.best),
                         ga.best.score.attainment, rs.best.score.attainment, proto.best.score.attainment))
            print(f"   seed {seed}: rate GA {rows[-1][0]:.2f}, random {rows[-1][1]:.2f}, prototype {rows[-1][2]:.2f} "
                  f"req/s; attainment GA {rows[-1][3]:.1%}, random {rows[-1][4]:.1%}, prototype {rows[-1][5]:.1%}")
        mean = [sum(r[i] for r in rows) / len(rows) for i in range(6)]
        print(f"   => mean rate GA {mean[0]:.2f}, random {mean[1]:.2f} ({mean[0] / max(mean[1], 1e-9):.2f}x), "
              f"prototype {mean[2]:.2f} ({mean[0] / max(mean[2], 1e-9):.2f}x) req/s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
