"""`hexgen-zmq plan`: cluster description + model + workload -> deployment file, report and picture."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hexgen_zmq.planner import constants as C


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `plan` subcommand."""
    p = subparsers.add_parser(
        "plan",
        help="choose pipelines, stages, TP degrees and layers for a cluster (the HexGen scheduler)",
        description=__doc__,
    )
    p.add_argument("--cluster", required=True, help="cluster description YAML")
    p.add_argument("--model", required=True, help="preset (llama-2-7b, llama-2-13b, llama-2-70b), config.json or checkpoint dir")
    p.add_argument("--prompt-len", type=int, required=True, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, required=True, help="generated tokens per request")
    p.add_argument("--rate", type=float, required=True, help="Poisson arrival rate, requests per second")
    p.add_argument("--slo", type=float, required=True, help="latency deadline per request, seconds")
    p.add_argument("--out", required=True, help="deployment file to write")
    p.add_argument("--report", required=True, help="JSON report to write")
    p.add_argument("--seed", type=int, default=C.DEFAULT_SEED)
    p.add_argument("--time-budget", type=float, default=C.DEFAULT_TIME_BUDGET_S, help="search time limit, seconds")
    p.add_argument("--model-path", help="model.path in the deployment file (default: --model if a directory)")
    p.add_argument("--dtype", default="float16", choices=sorted(C.DTYPE_BYTES))
    p.add_argument("--max-batch", type=int, default=C.DEFAULT_MAX_BATCH, help="requests a pipeline runs at once")
    p.add_argument("--no-batching", action="store_true",
                   help="plan for one request at a time per pipeline (HexGen's runtime): no continuous batching")
    p.add_argument("--runtime-requests", type=int, default=C.RUNTIME_REQUESTS,
                   help="requests of the step-level runtime simulation in the report (0: skip it)")
    p.add_argument("--target-attainment", type=float, default=C.DEFAULT_TARGET_ATTAINMENT)
    p.add_argument("--picture", help="SVG picture of the plan to write")
    p.add_argument("--quiet", action="store_true", help="no table on the terminal")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Plan and write the outputs; 2 on invalid input, 1 if no pipeline fits."""
    from hexgen_zmq.planner.cluster import ClusterError, load_cluster
    from hexgen_zmq.planner.costmodel import Workload
    from hexgen_zmq.planner.emit import write_deployment
    from hexgen_zmq.planner.model import load_model
    from hexgen_zmq.planner.picture import write_svg
    from hexgen_zmq.planner.planning import make_plan
    from hexgen_zmq.planner.report import print_report, write_report

    try:
        cluster = load_cluster(args.cluster)
        model = load_model(args.model)
        workload = Workload(args.prompt_len, args.output_len, args.rate, args.slo, args.dtype,
                            1 if args.no_batching else args.max_batch, batching=not args.no_batching)
        if not 0 < args.target_attainment <= 1:
            raise ValueError("--target-attainment must be in (0, 1]")
    except (ClusterError, ValueError, OSError) as exc:
        print(f"hexgen-zmq plan: {exc}", file=sys.stderr)
        return 2
    outcome = make_plan(cluster, model, workload, args.seed, args.time_budget, args.target_attainment,
                        runtime_requests=max(0, args.runtime_requests))
    if not outcome.pipelines:
        print("hexgen-zmq plan: no pipeline of this cluster can hold the model and meet the SLO", file=sys.stderr)
        return 1
    model_path = args.model_path or (str(Path(args.model).resolve()) if Path(args.model).is_dir() else f"/models/{model.name}")
    write_deployment(args.out, outcome, model_path, args.dtype)
    write_report(args.report, outcome)
    if args.picture:
        write_svg(args.picture, outcome)
    if not args.quiet:
        print_report(outcome)
    return 0
