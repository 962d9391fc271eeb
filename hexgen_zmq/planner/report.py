"""The plan's report: a JSON document and a terminal table (rich)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from hexgen_zmq.planner.planning import PlanOutcome


def report_dict(outcome: PlanOutcome) -> dict[str, Any]:
    """Everything the planner decided and estimated, JSON-ready."""
    w, s = outcome.workload, outcome.search
    return {
        "model": {"name": outcome.model.name, "params": outcome.model.total_params, "layers": outcome.model.num_hidden_layers},
        "workload": {
            "prompt_len": w.prompt_len,
            "output_len": w.output_len,
            "rate": w.rate,
            "slo_s": w.slo,
            "dtype": w.dtype,
            "max_batch": w.max_batch,
            "batching": w.batching,
        },
        "objective": {
            "slo_attainment": outcome.attainment,
            "target_attainment": outcome.target_attainment,
            "max_rate_at_target": outcome.max_rate,
            "min_deadline_at_rate_s": outcome.min_deadline,
            "capacity_rps": sum(p.capacity for p in outcome.pipelines),
        },
        # The same figures from the step-level model of the runtime (broker dispatch and tick, scheduler,
        # micro-batches, per-step stage times; planner/stepsim.py), on a shorter trace.
        "runtime_model": None if outcome.runtime is None else {
            "slo_attainment": outcome.runtime.attainment,
            "max_rate_at_target": outcome.runtime.max_rate,
            "min_deadline_at_rate_s": outcome.runtime.min_deadline,
            "mean_ttft_s": outcome.runtime.mean_ttft,
            "mean_tpot_s": outcome.runtime.mean_tpot,
            "requests": outcome.runtime.requests,
        },
        "search": {
            "seconds": s.elapsed,
            "evaluations": s.evaluations,
            "generations": s.generations,
            "stop_reason": s.stop_reason,  # stagnation | generations: repeatable for the seed; time budget: not
            "repeatable": s.stop_reason != "time budget",
            "trace": [{"seconds": t, "attainment": e.score.attainment, "capacity_rps": e.score.capacity} for t, e in s.trace],
        },
        "gpus": {"used": outcome.used_gpus, "total": outcome.cluster.total_gpus},
        "assumed_links": [list(pair) for pair in outcome.cluster.assumed_links],
        "pipelines": [
            {
                "id": p.id,
                "prefill_latency_s": p.prefill_latency,
                "per_token_latency_s": p.per_token_latency,
                "per_token_latency_full_batch_s": p.per_token_latency_full,
                "throughput_rps": p.capacity,
                "batch": p.batch,
                "stages": [
                    {
                        "id": st.id,
                        "host": st.host.name,
                        "region": st.host.region,
                        "gpu": st.gpu,
                        "devices": [f"cuda:{d}" for d in st.devices],
                        "tp": st.tp,
                        "layers": list(st.layers),
                        "memory_gib": round(st.memory_gib, 3),
                        "memory_capacity_gib": st.memory_capacity_gib,
                        "prefill_s": st.prefill_s,
                        "decode_step_s": st.decode_s,
                    }
                    for st in p.stages
                ],
            }
            for p in outcome.pipelines
        ],
    }


def write_report(path: str | Path, outcome: PlanOutcome) -> None:
    Path(path).write_text(json.dumps(report_dict(outcome), indent=2) + "\n")


def print_report(outcome: PlanOutcome, console: Console | None = None) -> None:
    """A table of pipelines and stages, then the objective."""
    console = console or Console()
    table = Table(title=f"HexGen plan for {outcome.model.name}", show_lines=False)
    for column in ("pipeline", "stage", "host", "region", "GPU", "TP", "layers", "memory GiB", "prefill s", "token ms", "req/s"):
        table.add_column(column, justify="right" if column in ("TP", "memory GiB", "prefill s", "token ms", "req/s") else "left")
    for p in outcome.pipelines:
        for j, st in enumerate(p.stages):
            first = j == 0
            table.add_row(
                p.id if first else "",
                st.id,
                st.host.name,
                st.host.region,
                st.gpu,
                str(st.tp),
                f"[{st.layers[0]}, {st.layers[1]})",
                f"{st.memory_gib:.1f}/{st.memory_capacity_gib:g}",
                f"{p.prefill_latency:.3f}" if first else "",
                f"{p.per_token_latency * 1000:.1f}" if first else "",
                f"{p.capacity:.2f}" if first else "",
            )
    console.print(table)
    w, s = outcome.workload, outcome.search
    target = f"{outcome.target_attainment:.0%}"
    console.print(
        f"SLO attainment {outcome.attainment:.1%} at {w.rate:g} req/s with a {w.slo:g} s deadline; "
        f"{target} holds up to {outcome.max_rate:.2f} req/s; the lowest deadline {target} meet at {w.rate:g} req/s "
        f"is {outcome.min_deadline:.2f} s.\n"
        f"{outcome.used_gpus} of {outcome.cluster.total_gpus} GPUs in {len(outcome.pipelines)} pipelines; "
        f"search {s.elapsed:.1f} s, {s.evaluations} plans, {s.generations} generations, stopped by {s.stop_reason}."
    )
    if (r := outcome.runtime) is not None:
        console.print(
            f"Step-level runtime model ({r.requests} requests): attainment {r.attainment:.1%} at {w.rate:g} req/s, "
            f"{target} up to {r.max_rate:.2f} req/s, lowest deadline {r.min_deadline:.2f} s; mean TTFT "
            f"{r.mean_ttft:.3f} s, time per output token {r.mean_tpot * 1000:.1f} ms."
        )
    for a, b in outcome.cluster.assumed_links:
        console.print(f"[yellow]no link given between {a} and {b}: assumed the default WAN link[/yellow]")
