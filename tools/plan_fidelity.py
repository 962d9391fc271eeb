"""Predicted against measured: profile a cluster, plan it, deploy the plan, bench it at Poisson rates, compare.

For each rate it prints the step-level runtime model's prediction (planner/stepsim.py, with the cost
model's profiled figures) beside what `hexgen-zmq bench --rate R` measures on the deployed plan: mean time
to first token, mean time per output token and SLO attainment, overall and per pipeline, and the highest
rate at the target attainment.

Two modes:

- **emulated datacenters** (`--sites`, needs root): hosts are network namespaces in regions joined by
  shaped links (tools/sites.py; by default two hosts, `a` in region eu and `b` in region us, one link of
  `--mbit` at `--latency-ms` one way). Each host is profiled inside its namespace (`hexgen-zmq profile`:
  device time per layer, and its links to the other hosts through `--serve-probe` running in theirs),
  a cluster description referencing those profiles is written and planned by the planner
  (planning.make_plan), and the plan is deployed with one supervisor per host, the broker on host `a`
  (tools/site_deployment.py). The same is done for the naive plan, one pipeline over every host in order
  with equal layer splits (baselines.uniform_pipeline). The bench runs in the calling namespace, which
  reaches host `a` without delay (the client sits beside the broker). The model is fed the very arrival
  trace each bench run sends (bench.arrival_offsets), so the two columns differ by the model's error and
  the machine's noise, not by the draw.
- **this machine** (no `--sites`): every host of `--cluster` must be 127.0.0.1 (configs/cluster-cpu-local.yaml)
  and the bench launches the plan itself.

    sudo .venv/bin/python tools/plan_fidelity.py --sites --latency-ms 5 [--mbit 200] [--rounds 2]
        [--requests 64 --prompt-len 64 --output-len 32 --slo 2.5 --target 0.9] [--fractions 0.6,0.8,...]
        [--profile together|alone] [--hidden 768 --intermediate 2048 --layers 8 | --model DIR] [--keep DIR]
    .venv/bin/python tools/plan_fidelity.py [--cluster configs/cluster-cpu-local.yaml --model models/tiny]
        [--rates 4,8,16] [--requests 64] [--prompt-len 64 --output-len 64 --slo 5]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import math
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from hexgen_zmq.planner.baselines import uniform_pipeline  # noqa: E402
from hexgen_zmq.planner.cluster import Cluster, load_cluster  # noqa: E402
from hexgen_zmq.planner.costmodel import CostModel, Workload  # noqa: E402
from hexgen_zmq.planner.emit import write_deployment  # noqa: E402
from hexgen_zmq.planner.evaluate import Evaluator  # noqa: E402
from hexgen_zmq.planner.model import load_model  # noqa: E402
from hexgen_zmq.planner.plan import Pipeline, make_group  # noqa: E402
from hexgen_zmq.planner.planning import make_plan  # noqa: E402
from hexgen_zmq.planner.profile import LinkFigure, load_profile, write_profile  # noqa: E402
from hexgen_zmq.planner.simulate import unit_gaps  # noqa: E402
from hexgen_zmq.planner.stepsim import pipe_model, runtime_figures, simulate_steps, trace  # noqa: E402
from hexgen_zmq.serving.bench import arrival_offsets  # noqa: E402

PROBE_PORT = 7700


# ------------------------------------------------------------------------------------------ pure parts
def crossing_rate(points: list[tuple[float, float]], target: float) -> float:
    """The highest rate at which attainment meets `target`, from (rate, attainment) points: linear between
    the last point that meets it and the next (which does not); the last rate tried if every one meets
    it (a lower bound), 0 if none does."""
    points = sorted(points)
    meets = [i for i, (_, a) in enumerate(points) if a >= target]
    if not meets:
        return 0.0
    i = meets[-1]
    if i == len(points) - 1:
        return points[i][0]
    (r0, a0), (r1, a1) = points[i], points[i + 1]
    return r0 + (r1 - r0) * (a0 - target) / (a0 - a1)


@dataclass
class Figures:
    """Mean TTFT and time per output token (s), SLO attainment and requests, overall or of one pipeline."""

    ttft: float
    tpot: float
    attainment: float
    requests: int
    pipelines: dict[str, Figures] = field(default_factory=dict)
    busy_s: dict[str, float] = field(default_factory=dict)  # per stage id: seconds computing
    steps: dict[str, int] = field(default_factory=dict)  # per stage id: micro-batches computed


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def scaled(model, factors: list[float]):
    """A pipeline model whose stage i computes `factors[i]` times slower."""
    inner = model.stage_time
    return dataclasses.replace(model, stage_time=lambda i, d, p: factors[i] * inner(i, d, p))


def predicted(cm: CostModel, pipelines: list[Pipeline], ids: list[str], offsets: list[float], slo: float,
              broker_host: int = 0, speed: dict[str, float] | None = None) -> Figures:
    """The runtime model on the very trace the bench sends (`offsets`, one length), overall and per pipeline
    (`ids`: the deployed id of each of `pipelines`, in the order the broker lists them). `speed`: per stage id
    (p0s0, ...), a factor on its compute times (what a run measured against what the profile predicts)."""
    w = cm.workload
    models = [pipe_model(cm, p, w.batching, broker_host) for p in pipelines]
    if speed:
        models = [scaled(m, [speed.get(f"{pid}s{i}", 1.0) for i in range(m.stages)]) for m, pid in zip(models, ids)]
    r = simulate_steps(models, [(t, w.prompt_len, w.output_len) for t in offsets])
    done = [i for i, x in enumerate(r.latencies) if x < math.inf]

    def figures(served: list[int]) -> Figures:
        return Figures(_mean([r.ttft[i] for i in served]), _mean([r.tpot[i] for i in served]),
                       sum(1 for i in served if r.latencies[i] <= slo) / max(1, len(served)), len(served))

    out = figures(done)
    out.attainment = sum(1 for i in done if r.latencies[i] <= slo) / max(1, len(offsets))
    for k, pid in enumerate(ids):
        for i in range(len(r.busy_s[k])):
            out.busy_s[f"{pid}s{i}"], out.steps[f"{pid}s{i}"] = r.busy_s[k][i], r.steps[k][i]
    for k, pid in enumerate(ids):
        served = [i for i in done if r.pipeline[i] == k]
        if served:
            out.pipelines[pid] = figures(served)
    return out


def from_report(report: dict) -> Figures:
    """A bench JSON report's figures (hexgen_zmq.serving.bench.Report as a dict)."""
    out = Figures(report["ttft_s"].get("mean", math.nan), report["tpot_s"].get("mean", math.nan),
                  report["slo_attainment"], report["requests"] - report["failed"])
    for pid, f in report.get("pipelines", {}).items():
        out.pipelines[pid] = Figures(f["ttft_s"].get("mean", math.nan), f["tpot_s"].get("mean", math.nan),
                                     f["slo_attainment"], f["requests"])
    return out


def ordered_pipelines(cm: CostModel, pipelines) -> list[Pipeline]:
    """Pipelines in the order `place` names them p0, p1, ... (decreasing capacity)."""
    ev, w = Evaluator(cm, []), cm.workload
    return sorted(pipelines, key=lambda p: (-ev.timing(p).capacity(w.output_len), p.stages))


def describe(cluster: Cluster, pipelines: list[Pipeline]) -> str:
    slots = cluster.slots
    return "; ".join(f"p{k}: " + " -> ".join(f"{cluster.hosts[slots[s.slot].host].name}[{s.start},{s.end})"
                                            for s in p.stages) for k, p in enumerate(pipelines))


def ratio(p: float, m: float) -> str:
    return f"{p / m:.2f}" if m and not math.isnan(p) and not math.isnan(m) else "-"


# ------------------------------------------------------------------------------------------ this machine
def measured_local(config: Path, rate: float, args: argparse.Namespace, out: Path) -> dict:
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
    return json.loads(out.read_text())["reports"][0]


def main_local(args: argparse.Namespace) -> int:
    rates = [float(x) for x in args.rates.split(",")]
    model_dir = args.model or str(ROOT / "models/tiny")
    cluster, model = load_cluster(args.cluster), load_model(model_dir)
    if any(h.address not in ("127.0.0.1", "localhost") for h in cluster.hosts):
        print("plan_fidelity: without --sites, only clusters on this machine (127.0.0.1)", file=sys.stderr)
        return 2
    workload = Workload(args.prompt_len, args.output_len, rates[0], args.slo, args.dtype)
    outcome = make_plan(cluster, model, workload, seed=args.seed, time_budget=args.plan_budget)
    cm = CostModel(cluster, model, workload)
    pipelines = ordered_pipelines(cm, outcome.search.best.pipelines)
    ids = [p.id for p in outcome.pipelines]
    print(f"plan: {describe(cluster, pipelines)}")
    print("| rate | TTFT pred / meas | TPOT pred / meas | attainment pred / meas |")
    print("| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "plan.yaml"
        write_deployment(config, outcome, str(Path(model_dir).resolve()), args.dtype)
        for rate in rates:
            p = predicted(cm, pipelines, ids, arrival_offsets(args.requests, rate, args.seed), args.slo)
            m = from_report(measured_local(config, rate, args, Path(tmp) / "bench.json"))
            print(f"| {rate:g} | {p.ttft * 1e3:.1f} / {m.ttft * 1e3:.1f} ms | {p.tpot * 1e3:.2f} / "
                  f"{m.tpot * 1e3:.2f} ms | {p.attainment:.0%} / {m.attainment:.0%} |", flush=True)
    print("(predicted: step-level runtime model with the cluster's profiles, on the bench's own arrival trace; "
          "measured: hexgen-zmq bench --launch)")
    return 0


# ------------------------------------------------------------------------------------------ emulated sites
def default_topology(args: argparse.Namespace) -> dict:
    return {"regions": {"eu": ["a"], "us": ["b"]},
            "links": [{"a": "eu", "b": "us", "mbit": args.mbit, "latency_ms": args.latency_ms}]}


def _python() -> str:
    venv = ROOT / ".venv/bin/python"
    return str(venv) if venv.exists() else sys.executable


NICE = 0  # --nice: the priority every process of the system under test runs at (profilers included)


def _autogroup(pid: int | str) -> None:
    """With the kernel's autogroups (sched_autogroup_enabled), a niceness weighs only inside its session;
    between sessions (every stage runs in one of its own) the session's autogroup niceness counts."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(NICE))
    except OSError:
        pass


def _niced() -> None:
    if NICE:
        os.nice(NICE)
        _autogroup("self")


def renice(pids: list[int], autogroup_only: list[int] = ()) -> None:
    """Put processes already running (a deployment's supervisors and what they started) at --nice."""
    for pid in pids:
        try:
            os.setpriority(os.PRIO_PROCESS, pid, NICE)
        except OSError:
            pass
    for pid in [*pids, *autogroup_only]:
        _autogroup(pid)


def _wait_line(process: subprocess.Popen, timeout: float) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    return process.stdout.readline() if ready else ""


def profile_hosts(sites, model: str, directory: Path, together: bool, repeats: int, batches: str = "1,4,16,32",
                  contexts: str = "64,256") -> dict[str, Path]:
    """Profile every host inside its namespace, its links to every other host included; `together`: all
    hosts at once (each host's device time then includes what the others' compute takes from the shared
    cores and memory, as when a plan runs them all), else one after another."""
    probes = {}
    out: dict[str, Path] = {}
    try:
        for host in sites.hosts:
            probes[host] = sites.popen(host, [_python(), "-m", "hexgen_zmq.cli", "profile", "--serve-probe",
                                              "--listen", f"{sites.address(host)}:{PROBE_PORT}"],
                                       stdout=subprocess.PIPE, text=True, cwd=ROOT, preexec_fn=_niced)
            if "probe server" not in _wait_line(probes[host], 60):
                raise RuntimeError(f"the link probe server on {host} did not start")
        commands = {}
        for host in sites.hosts:
            out[host] = directory / f"profile-{host}.yaml"
            commands[host] = [_python(), "-m", "hexgen_zmq.cli", "profile", "--config", model, "--out", str(out[host]),
                              "--host", host, "--threads", "1", "--devices", "1", "--repeats", str(repeats),
                              "--batches", batches, "--contexts", contexts]
        groups = [list(sites.hosts)] if together else [[h] for h in sites.hosts]
        for group in groups:
            running = {h: sites.popen(h, commands[h], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      cwd=ROOT, preexec_fn=_niced) for h in group}
            for host, process in running.items():
                text, _ = process.communicate(timeout=900)
                if process.returncode != 0:
                    raise RuntimeError(f"profiling {host} failed:\n{text[-3000:]}")
                for line in text.splitlines():
                    if "decode batch   1 context    64" in line or "decode batch  16 context    64" in line \
                            or "prefill    64" in line or "overhead" in line:
                        print(f"  {host}: {line.strip()}", flush=True)
        # Links one at a time, with nothing computing: a probe's round trip must not wait for a busy core.
        for host in sites.hosts:
            links = []
            for other in sites.hosts:
                if other == host:
                    continue
                code = ("import json, sys; from hexgen_zmq.operations.profiler import probe_link; "
                        f"print(json.dumps(probe_link({sites.address(other)!r}, {PROBE_PORT})))")
                done = sites.run(host, [_python(), "-c", code], timeout=120, cwd=ROOT, preexec_fn=_niced)
                gbps, latency_ms = json.loads(done.stdout.strip().splitlines()[-1])
                links.append(LinkFigure(other, sites.address(other), round(gbps, 4), round(latency_ms, 3)))
                print(f"  {host}: link to {other}: {gbps:.3f} Gbit/s, {latency_ms:.2f} ms one way", flush=True)
            profile = load_profile(out[host])
            write_profile(out[host], dataclasses.replace(profile, links=tuple(links)),
                          f"hexgen-zmq profile of {host} ({'with every host profiling at once' if together else 'alone'}),"
                          " links by the profiler's probe, one at a time (tools/plan_fidelity.py)")
    finally:
        for process in probes.values():
            if process.poll() is None:
                process.terminate()
            process.wait(10)
    return out


def write_cluster(sites, profiles: dict[str, Path], path: Path) -> Cluster:
    """The cluster description of the emulated hosts: one single-threaded CPU rank each, with its profile."""
    hosts = [{"name": h, "address": sites.address(h), "region": sites.region(h), "gpus": {"cpu": 1},
              "profile": profiles[h].name} for h in sites.hosts]
    path.write_text("# Emulated hosts (tools/sites.py), profiled in their namespaces by tools/plan_fidelity.py\n"
                    + yaml.safe_dump({"hosts": hosts}, sort_keys=False))
    return load_cluster(path)


def site_layout(cluster: Cluster, pipelines: list[Pipeline]) -> dict[str, list[tuple[str, int, int]]]:
    """tools/site_deployment.layout's pipelines: {p0: [(host, first layer, end layer), ...], ...}."""
    slots = cluster.slots
    out = {}
    for k, p in enumerate(pipelines):
        if any(s.tp != 1 for s in p.stages):
            raise ValueError("the emulated deployment places one rank per stage (TP 1)")
        out[f"p{k}"] = [(cluster.hosts[slots[s.slot].host].name, s.start, s.end) for s in p.stages]
    return out


def lone_latency(cm: CostModel) -> float:
    """A lone request on the cluster's first device holding every layer: its prompt, then a decode step per
    further token (the cost model's figures, no hops)."""
    w, gpu, layers = cm.workload, cm.cluster.slots[0].gpu, cm.model.num_hidden_layers
    return (cm.stage_time(gpu, 1, layers, True, w.prompt_len, False)
            + (w.output_len - 1) * cm.stage_time(gpu, 1, layers, True, 1, True))


def wait_quiet(cores: float, limit_s: float, window_s: float = 5.0) -> None:
    """Wait (up to `limit_s`) until other work on this shared machine keeps fewer than `cores` cores busy
    over `window_s`, so that a sweep starts in a quiet spell; says what it found either way."""
    if limit_s <= 0:
        return
    deadline = time.monotonic() + limit_s
    while True:
        t, busy = time.monotonic(), _cpu_busy_s()
        time.sleep(window_s)
        load = (_cpu_busy_s() - busy) / (time.monotonic() - t)
        if load < cores or time.monotonic() > deadline:
            print(f"  (other work keeps {load:.2f} cores busy as this sweep starts)", flush=True)
            return


def bench_sites(config: Path, rate: float | None, args: argparse.Namespace, out: Path,
                concurrency: int | None = None, requests: int | None = None) -> dict:
    """`hexgen-zmq bench` against the running deployment, from the calling namespace; its JSON report."""
    cmd = [_python(), "-m", "hexgen_zmq.cli", "bench", "--config", str(config),
           *(["--rate", str(rate)] if rate else ["--concurrency", str(concurrency)]),
           "--requests", str(requests or args.requests), "--prompt-len", str(args.prompt_len),
           "--output-len", str(args.output_len), "--slo", str(args.slo), "--seed", str(args.seed), "--json", str(out)]
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=900, cwd=ROOT,
                          preexec_fn=_niced)
    if not out.exists():
        raise RuntimeError(f"bench failed at rate {rate}: {done.stderr[-2000:]}")
    report = json.loads(out.read_text())["reports"][0]
    out.unlink()
    return report


def _cpu_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (every core, /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _pids_cpu_s(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(parts[11]) + int(parts[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def _namespace_pids(sites, routers: bool = True) -> list[int]:
    out = []
    for ns in [*([sites.router] if routers else []), *(sites.namespace(h) for h in sites.hosts)]:
        listed = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
        out += [int(x) for x in listed.split()]
    return out


class CpuWatch:
    """Cores busy during a run: the machine's, ours (the emulated hosts' processes, the links' delay line,
    the bench), the rest (other people's work on this shared machine)."""

    def __init__(self, sites):
        self.pids = _namespace_pids(sites)
        self.t, self.busy, self.ours = time.monotonic(), _cpu_busy_s(), _pids_cpu_s(self.pids)
        self.children = os.times().children_user + os.times().children_system

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.t
        children = os.times().children_user + os.times().children_system - self.children
        ours = _pids_cpu_s(self.pids) - self.ours + children
        busy = _cpu_busy_s() - self.busy
        return {"cores_busy": busy / wall, "ours": ours / wall, "others": max(0.0, busy - ours) / wall}


@dataclass
class PlanRun:
    name: str
    pipelines: list[Pipeline]
    rates: list[float]
    predicted_max: float  # the runtime model's highest rate at the target, long trace (bisection)
    predicted: dict[float, Figures] = field(default_factory=dict)
    measured: dict[float, list[Figures]] = field(default_factory=dict)  # per rate, one per round
    calibrated: dict[float, list[Figures]] = field(default_factory=dict)  # the model at each run's device speed
    slowdown: dict[float, list[dict[str, float]]] = field(default_factory=dict)  # per stage: measured/model busy
    cpu: dict[float, list[dict[str, float]]] = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return [f"p{k}" for k in range(len(self.pipelines))]


def stage_busy(reply) -> dict[str, tuple[float, int, int, int]]:
    """Per stage id: (seconds computing, micro-batches, token rows, segments) so far, from a broker status."""
    return {sid: (c.step_seconds_total, c.steps_total, c.step_tokens_total, c.step_requests_total)
            for p in reply.pipelines for sid, c in p.stage_counters.items()}


def measure_plan(sites, model: str, cluster: Cluster, cm: CostModel, run: PlanRun, args: argparse.Namespace,
                 directory: Path) -> None:
    from tools.site_deployment import SiteDeployment, serving, status

    directory.mkdir(parents=True)
    deployment = SiteDeployment(sites, model, directory, site_layout(cluster, run.pipelines), threads=1,
                                secure=False)
    try:
        asyncio.run(serving(deployment, set(run.ids), 300))
        if NICE:  # the hosts' processes; the delay line (the router's namespace) keeps its own -10 in its session
            hosts = _namespace_pids(sites, routers=False)
            renice(hosts, [pid for pid in _namespace_pids(sites) if pid not in hosts])
        bench_sites(deployment.config, None, args, directory / "warm.json", concurrency=4, requests=8)  # warm-up
        for rate in run.rates:
            before = stage_busy(asyncio.run(status(deployment)))
            watch = CpuWatch(sites)
            report = bench_sites(deployment.config, rate, args, directory / "bench.json")
            cpu = watch.stop()
            after = stage_busy(asyncio.run(status(deployment)))
            if report["failed"]:
                print(f"  {run.name} at {rate:.2f}/s: {report['failed']} requests failed", flush=True)
            m = from_report(report)
            p = run.predicted[rate]
            rows = {}
            for sid in after:
                was = before.get(sid, (0.0, 0, 0, 0))
                m.busy_s[sid] = after[sid][0] - was[0]
                m.steps[sid] = after[sid][1] - was[1]
                rows[sid] = ((after[sid][2] - was[2]) / max(m.steps[sid], 1), (after[sid][3] - was[3]) / max(m.steps[sid], 1))
            slow = {sid: m.busy_s[sid] / p.busy_s[sid] for sid in m.busy_s if p.busy_s.get(sid)}
            c = predicted(cm, run.pipelines, run.ids, arrival_offsets(args.requests, rate, args.seed), args.slo,
                          speed=slow)
            run.measured.setdefault(rate, []).append(m)
            run.calibrated.setdefault(rate, []).append(c)
            run.slowdown.setdefault(rate, []).append(slow)
            run.cpu.setdefault(rate, []).append(cpu)
            print(f"  {run.name:8s} {rate:6.2f}/s  TTFT {p.ttft * 1e3:5.0f} / {c.ttft * 1e3:5.0f} / {m.ttft * 1e3:5.0f} ms"
                  f"  TPOT {p.tpot * 1e3:5.1f} / {c.tpot * 1e3:5.1f} / {m.tpot * 1e3:5.1f} ms  attainment "
                  f"{p.attainment:4.0%} / {c.attainment:4.0%} / {m.attainment:4.0%}  (profile / at the run's device "
                  f"speed / measured); compute measured/profile "
                  + " ".join(f"{sid} {x:.2f} ({m.steps[sid]} steps of {m.busy_s[sid] / max(m.steps[sid], 1) * 1e3:.1f} ms,"
                             f" {rows[sid][0]:.1f} tokens in {rows[sid][1]:.1f} segments,"
                             f" busy {m.busy_s[sid] / report['wall_s']:.0%}; model {p.steps[sid]} of "
                             f"{p.busy_s[sid] / max(p.steps[sid], 1) * 1e3:.1f} ms)" for sid, x in slow.items())
                  + f"; cores busy {cpu['cores_busy']:.2f}, ours {cpu['ours']:.2f}, others {cpu['others']:.2f}",
                  flush=True)
    finally:
        deployment.stop()


def _median_figures(runs: list[Figures]) -> Figures:
    """Medians over rounds, overall and per pipeline."""
    med = lambda xs: statistics.median(x for x in xs if not math.isnan(x)) if any(not math.isnan(x) for x in xs) else math.nan  # noqa: E731
    out = Figures(med([f.ttft for f in runs]), med([f.tpot for f in runs]), med([f.attainment for f in runs]),
                  round(med([f.requests for f in runs])))
    for pid in sorted({p for f in runs for p in f.pipelines}):
        per = [f.pipelines[pid] for f in runs if pid in f.pipelines]
        out.pipelines[pid] = _median_figures(per)
    return out


def spread(xs: list[float], scale: float = 1e3) -> str:
    xs = [x for x in xs if not math.isnan(x)]
    return f" ({min(xs) * scale:.0f}-{max(xs) * scale:.0f})" if len(xs) > 1 else ""


def _pick(f: Figures | None, pid: str) -> Figures | None:
    return f if pid == "all" or f is None else f.pipelines.get(pid)


def print_tables(run: PlanRun, cluster: Cluster, args: argparse.Namespace) -> dict:
    """Per rate, overall and per pipeline: the model from the profile, the model at the run's own device
    speed, and the measurement (medians over rounds, min-max in brackets); then the highest rate at the
    target. Returns the summary (results.json)."""
    print(f"\n### {run.name}: {describe(cluster, run.pipelines)}")
    print("| rate /s | pipeline | requests | TTFT ms: profile / device speed / measured | TPOT ms: profile / device "
          "speed / measured | attainment: profile / device speed / measured | compute measured / profile |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rates = [r for r in run.rates if run.measured.get(r)]
    table = []
    for rate in rates:
        runs, cals = run.measured[rate], run.calibrated[rate]
        m, c, p = _median_figures(runs), _median_figures(cals), run.predicted[rate]
        for pid in ["all", *run.ids]:
            pf, cf, mf = _pick(p, pid), _pick(c, pid), _pick(m, pid)
            if pf is None or mf is None or cf is None:
                continue
            slow = [statistics.median(s[sid] for s in run.slowdown[rate] if sid in s)
                    for sid in (sorted(run.slowdown[rate][0]) if pid == "all" else
                                [x for x in sorted(run.slowdown[rate][0]) if x.startswith(pid + "s")])]
            ttfts = [g.ttft for g in (_pick(f, pid) for f in runs) if g is not None]
            tpots = [g.tpot for g in (_pick(f, pid) for f in runs) if g is not None]
            print(f"| {rate:.2f} | {pid} | {pf.requests} / {mf.requests} | {pf.ttft * 1e3:.0f} / {cf.ttft * 1e3:.0f} / "
                  f"{mf.ttft * 1e3:.0f}{spread(ttfts)} | {pf.tpot * 1e3:.1f} / {cf.tpot * 1e3:.1f} / "
                  f"{mf.tpot * 1e3:.1f}{spread(tpots)} | {pf.attainment:.0%} / {cf.attainment:.0%} / {mf.attainment:.0%} "
                  f"| {' '.join(f'{x:.2f}' for x in slow)} |")
            table.append({"rate": rate, "pipeline": pid, "requests": [pf.requests, mf.requests],
                          "ttft_s": [pf.ttft, cf.ttft, mf.ttft], "tpot_s": [pf.tpot, cf.tpot, mf.tpot],
                          "attainment": [pf.attainment, cf.attainment, mf.attainment], "compute_ratio": slow})
    cpu = [x for r in rates for x in run.cpu[r]]
    print(f"cores busy during the runs: {statistics.median(x['cores_busy'] for x in cpu):.2f} of {os.cpu_count()} "
          f"(median), ours {statistics.median(x['ours'] for x in cpu):.2f}, other work "
          f"{statistics.median(x['others'] for x in cpu):.2f} ({min(x['others'] for x in cpu):.2f}-"
          f"{max(x['others'] for x in cpu):.2f})")
    summary = {"plan": describe(cluster, run.pipelines), "predicted_max_long_trace": run.predicted_max,
               "table": table, "cpu": cpu}
    for pid in ["all", *run.ids]:
        def att(f: Figures | None) -> float:
            g = _pick(f, pid)
            return g.attainment if g is not None else 1.0  # served nothing: nothing missed

        pred = crossing_rate([(r, att(run.predicted[r])) for r in rates], args.target)
        cal = crossing_rate([(r, att(_median_figures(run.calibrated[r]))) for r in rates], args.target)
        per_round = [crossing_rate([(r, att(run.measured[r][k])) for r in rates if len(run.measured[r]) > k],
                                   args.target) for k in range(args.rounds)]
        meas = crossing_rate([(r, att(_median_figures(run.measured[r]))) for r in rates], args.target)
        summary[pid] = {"predicted": pred, "calibrated": cal, "measured": meas, "measured_rounds": per_round}
        what = "overall" if pid == "all" else f"{pid}'s requests"
        print(f"highest rate at {args.target:.0%} within {args.slo:g} s, {what}: profile {pred:.2f}/s"
              + (f" (long trace {run.predicted_max:.2f}/s)" if pid == "all" else "")
              + f", at the runs' device speed {cal:.2f}/s, measured {meas:.2f}/s (rounds: "
              f"{', '.join(f'{x:.2f}' for x in per_round)}); profile/measured {ratio(pred, meas)}")
    return summary


def main_sites(args: argparse.Namespace) -> int:
    from tools.sites import Sites, require_root

    require_root()
    spec = yaml.safe_load(Path(args.topology).read_text()) if args.topology else default_topology(args)
    fractions = [float(x) for x in args.fractions.split(",")]
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="plan-fidelity-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        from hexgen_zmq.model.tiny import make_tiny_model

        model = str(make_tiny_model(workdir / "model", num_layers=args.layers, hidden_size=args.hidden,
                                    num_heads=args.hidden // 64, num_kv_heads=max(1, args.hidden // 192),
                                    intermediate_size=args.intermediate, max_positions=1024))
    results = {}
    try:
        with Sites(spec, prefix=args.prefix, subnet=args.subnet) as sites:
            if sites.hosts[0] != "a":
                raise ValueError("the broker runs on host 'a' (tools/site_deployment.py): name the first host a")
            links = ", ".join(f"{l.a}<->{l.b} {l.mbit or 'unshaped'} Mbit/s {l.latency_ms:g} ms"
                              for l in sites.topology.links)
            print(f"emulated cluster: {sites.topology.regions}; links: {links}; model {model}", flush=True)
            if NICE:  # the delay line too, before the links are probed: its -10 weighs only inside its session
                renice([], _namespace_pids(sites))
            wait_quiet(args.quiet_cores, args.quiet_wait_s)
            print(f"profiling ({args.profile})", flush=True)
            profiles = profile_hosts(sites, model, workdir, args.profile == "together", args.profile_repeats,
                                     args.profile_batches, args.profile_contexts)
            cluster = write_cluster(sites, profiles, workdir / "cluster.yaml")
            spec_model = load_model(model)
            if args.slo is None:  # a deadline this machine's speed today can meet: a multiple of a lone request
                probe = CostModel(cluster, spec_model, Workload(args.prompt_len, args.output_len, 1.0, 1.0, "float32"))
                args.slo = round(args.slo_factor * lone_latency(probe), 2)
                print(f"SLO: {args.slo_factor:g} x a lone request on one host's full model = {args.slo:g} s", flush=True)
            workload = Workload(args.prompt_len, args.output_len, args.plan_rate, args.slo, "float32")
            outcome = make_plan(cluster, spec_model, workload, seed=args.seed, time_budget=args.plan_budget,
                                target_attainment=args.target)
            cm = CostModel(cluster, spec_model, workload)
            every = make_group({s.index: s.count for s in cluster.slots})
            naive = uniform_pipeline(cm, every)
            plans = [("planner", ordered_pipelines(cm, outcome.search.best.pipelines))] if outcome.pipelines else []
            if not plans:
                print("the planner found no plan that meets the SLO on these profiles", flush=True)
            if naive is not None and "naive" in args.plans:
                plans.append(("naive", [naive]))
            plans = [(name, pipelines) for name, pipelines in plans if name in args.plans]
            runs = []
            for name, pipelines in plans:
                figures = runtime_figures(cm, pipelines, unit_gaps(args.seed + 2, args.model_requests), args.target)
                top = figures.max_rate if figures.max_rate > 0 else args.plan_rate
                run = PlanRun(name, pipelines, [round(top * f, 2) for f in fractions], figures.max_rate)
                for rate in run.rates:
                    run.predicted[rate] = predicted(cm, pipelines, run.ids,
                                                    arrival_offsets(args.requests, rate, args.seed), args.slo)
                print(f"{name}: {describe(cluster, pipelines)}; runtime model: highest rate at {args.target:.0%} "
                      f"{figures.max_rate:.2f}/s, TTFT {figures.mean_ttft * 1e3:.0f} ms, TPOT "
                      f"{figures.mean_tpot * 1e3:.1f} ms at {args.plan_rate:g}/s", flush=True)
                runs.append(run)
            for k in range(args.rounds):  # the plans alternate, so that both see the same spells of the machine
                for run in runs if k % 2 == 0 else runs[::-1]:
                    wait_quiet(args.quiet_cores, args.quiet_wait_s)
                    measure_plan(sites, model, cluster, cm, run, args, workdir / f"{run.name}-{k}")
            print(f"\n## links {links}; prompt {args.prompt_len}, output {args.output_len} tokens, SLO {args.slo:g} s, "
                  f"{args.requests} requests per rate, {args.rounds} round(s) (medians; spread min-max)")
            for run in runs:
                results[run.name] = print_tables(run, cluster, args)
            if len(runs) == 2:
                a, b = results["planner"]["all"], results["naive"]["all"]
                print(f"\nplanner vs naive, highest rate at {args.target:.0%}: predicted {a['predicted']:.2f} vs "
                      f"{b['predicted']:.2f}/s, measured {a['measured']:.2f} vs {b['measured']:.2f}/s; the model says "
                      f"{'planner' if a['predicted'] >= b['predicted'] else 'naive'} wins, measured "
                      f"{'planner' if a['measured'] >= b['measured'] else 'naive'} wins")
            (workdir / "results.json").write_text(json.dumps(results, indent=2))
            print(f"profiles, cluster file, deployments and results.json in {workdir}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", action="store_true", help="emulated datacenters (root): profile, plan, deploy, bench")
    ap.add_argument("--cluster", default=str(ROOT / "configs/cluster-cpu-local.yaml"), help="without --sites")
    ap.add_argument("--model", default=None, help="checkpoint (default: models/tiny; with --sites a random one "
                                                  "of --layers/--hidden/--intermediate)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=None, help="default 64, with --sites 32")
    ap.add_argument("--slo", type=float, default=None,
                    help="end-to-end deadline (default 5 s; with --sites, --slo-factor x a lone request's latency)")
    ap.add_argument("--rates", default="4,8,16", help="without --sites")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plan-budget", type=float, default=5.0, help="seconds of genetic search")
    sites = ap.add_argument_group("emulated sites")
    sites.add_argument("--topology", default=None, help="tools/sites.py spec YAML (first host 'a'); default: a in "
                                                        "eu, b in us")
    sites.add_argument("--latency-ms", type=float, default=5.0)
    sites.add_argument("--mbit", type=float, default=200.0)
    sites.add_argument("--target", type=float, default=0.9, help="SLO attainment target")
    sites.add_argument("--slo-factor", type=float, default=4.0)
    sites.add_argument("--quiet-cores", type=float, default=0.5,
                       help="before a sweep, wait until other work keeps fewer cores busy than this")
    sites.add_argument("--quiet-wait-s", type=float, default=120.0, help="but no longer than this")
    sites.add_argument("--fractions", default="0.5,0.75,0.9,1.0,1.1,1.25",
                       help="rates to bench, as fractions of each plan's predicted highest rate")
    sites.add_argument("--plan-rate", type=float, default=4.0, help="the workload rate the planner plans for")
    sites.add_argument("--rounds", type=int, default=1, help="sweeps per plan (plans alternate)")
    sites.add_argument("--plans", default="planner,naive", help="which plans to measure")
    sites.add_argument("--nice", type=int, default=0,
                       help="run profilers, deployments and the bench at this niceness (e.g. -10 on a machine "
                            "shared with other work, so that it slows them less than it would otherwise)")
    sites.add_argument("--profile", choices=["together", "alone"], default="together")
    sites.add_argument("--profile-repeats", type=int, default=6)
    sites.add_argument("--profile-batches", default="1,4,16,32")
    sites.add_argument("--profile-contexts", default="64,256")
    sites.add_argument("--model-requests", type=int, default=1000, help="trace of the model's highest-rate search")
    sites.add_argument("--layers", type=int, default=8)
    sites.add_argument("--hidden", type=int, default=768)
    sites.add_argument("--intermediate", type=int, default=2048)
    sites.add_argument("--prefix", default="hxpf")
    sites.add_argument("--subnet", default="10.246.0.0/16")
    sites.add_argument("--keep", default=None, help="keep profiles, cluster file, deployments and results here")
    args = ap.parse_args(argv)
    global NICE
    NICE = args.nice
    if args.output_len is None:
        args.output_len = 32 if args.sites else 64
    if args.slo is None and not args.sites:
        args.slo = 5.0
    return main_sites(args) if args.sites else main_local(args)


if __name__ == "__main__":
    sys.exit(main())
