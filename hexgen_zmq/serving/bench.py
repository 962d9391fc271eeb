"""`hexgen-zmq bench`: load a deployment and measure it; optionally Hugging Face `generate` side by side.

Closed loop (`--concurrency C`: C clients, each sending its next request when the last one ends) or open
loop (`--rate R`: Poisson arrivals). Prompt and output lengths are fixed (`64`) or drawn uniformly
(`32:128`). Reports time to first token, time per output token, end-to-end latency (p50/p90/p99), output
tokens per second and SLO attainment, on the terminal and as JSON. `--baseline hf` then runs the same
requests through Hugging Face `generate` in this process on the same checkpoint, one at a time and as one
static batch, and prints the ratios. `--http URL` sends the same requests through an HTTP gateway's
/v1/completions too (streamed, as OpenAI clients do), alternating with the native client for `--rounds`
rounds, and prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]


@dataclass
class RequestStats:
    ttft_s: float
    total_s: float
    tokens: int
    ok: bool = True
    error: str | None = None
    pipeline: str | None = None  # the pipeline that served it (native client only)

    @property
    def tpot_s(self) -> float:
        return (self.total_s - self.ttft_s) / (self.tokens - 1) if self.tokens > 1 else 0.0


@dataclass
class Report:
    label: str
    wall_s: float
    requests: int
    failed: int
    output_tokens: int
    tokens_per_s: float
    requests_per_s: float
    ttft_s: dict = field(default_factory=dict)
    tpot_s: dict = field(default_factory=dict)
    e2e_s: dict = field(default_factory=dict)
    slo_s: float | None = None
    slo_attainment: float | None = None
    # per pipeline that served requests (native client): requests, ttft_s, tpot_s, e2e_s, slo_attainment
    pipelines: dict = field(default_factory=dict)


def parse_len(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    low_i, high_i = int(low), int(high or low)
    if not 0 < low_i <= high_i:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or LOW:HIGH with 0 < LOW <= HIGH")
    return low_i, high_i


def make_workload(n: int, prompt_len: tuple[int, int], output_len: tuple[int, int], vocab: int, seed: int) -> Workload:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(*prompt_len))] for _ in range(n)]
    return Workload(prompts, [rng.randint(*output_len) for _ in range(n)])


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "mean": statistics.fmean(values)}


def summarize(label: str, stats: list[RequestStats], wall_s: float, slo_s: float | None,
              latency_only: bool = False) -> Report:
    """Aggregate figures; `latency_only` for runs that cannot see the first token (HF generate)."""
    ok = [s for s in stats if s.ok]
    tokens = sum(s.tokens for s in ok)
    report = Report(label, wall_s, len(stats), len(stats) - len(ok), tokens, tokens / wall_s, len(ok) / wall_s,
                    {} if latency_only else percentiles([s.ttft_s for s in ok]),
                    {} if latency_only else percentiles([s.tpot_s for s in ok if s.tokens > 1]),
                    percentiles([s.total_s for s in ok]))
    if slo_s is not None:
        report.slo_s = slo_s
        report.slo_attainment = sum(1 for s in ok if s.total_s <= slo_s) / max(1, len(stats))
    for pipeline in sorted({s.pipeline for s in ok if s.pipeline is not None}):
        served = [s for s in ok if s.pipeline == pipeline]
        report.pipelines[pipeline] = {
            "requests": len(served), "ttft_s": percentiles([s.ttft_s for s in served]),
            "tpot_s": percentiles([s.tpot_s for s in served if s.tokens > 1]),
            "e2e_s": percentiles([s.total_s for s in served]),
            "slo_attainment": None if slo_s is None else sum(1 for s in served if s.total_s <= slo_s) / len(served)}
    return report


async def run_load(address: str, workload: Workload, concurrency: int | None, rate: float | None, seed: int,
                   ignore_eos: bool, progress: Progress | None = None) -> tuple[list[RequestStats], float]:
    """Send the workload to a running broker; returns per-request stats (in workload order) and wall time."""
    from hexgen_zmq.serving.client import Client, GenerationError

    n = len(workload.prompts)
    stats: list[RequestStats | None] = [None] * n
    task = progress.add_task("requests", total=n) if progress else None

    async with await Client.connect(address) as client:
        await client.generate(prompt_ids=workload.prompts[0][:4], max_new_tokens=2)  # warm-up, not counted

        async def one(i: int) -> None:
            start = time.perf_counter()
            try:
                result = await client.generate(prompt_ids=workload.prompts[i], max_new_tokens=workload.output_lens[i],
                                               ignore_eos=ignore_eos)
                stats[i] = RequestStats(result.ttft_s, result.total_s, len(result.token_ids), pipeline=result.pipeline)
            except GenerationError as exc:
                stats[i] = RequestStats(0.0, time.perf_counter() - start, 0, False, str(exc))
            if progress:
                progress.advance(task)

        wall = await _drive(one, n, concurrency, rate, seed)
    return [s for s in stats if s is not None], wall


async def run_http_load(url: str, workload: Workload, concurrency: int | None, rate: float | None, seed: int,
                        ignore_eos: bool, api_key: str | None = None, progress: Progress | None = None,
                        stream: bool = True, fresh_connections: bool = False) -> tuple[list[RequestStats], float]:
    """The same workload through a gateway's /v1/completions (prompt as token ids, greedy), streamed as
    OpenAI clients do, or with `stream=False` one JSON answer per request (then no time to first token);
    the tokens counted are the usage the gateway reports. aiohttp, as vLLM's serving benchmark uses: its C
    parser keeps the load generator's own cost per token low, and a stream's events after the first are read
    at its end (in aiohttp's buffer meanwhile), so the load generator does no Python per streamed token.
    `fresh_connections`: a new connection per request (as vLLM's benchmark, a session per request), for
    servers that close a kept-alive connection just after a stream ends (llama.cpp's), where a reused one
    fails with 'Server disconnected'."""
    import aiohttp

    n = len(workload.prompts)
    stats: list[RequestStats | None] = [None] * n
    task = progress.add_task("requests over HTTP", total=n) if progress else None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    endpoint = url.rstrip("/") + "/v1/completions"
    connector = aiohttp.TCPConnector(limit=(concurrency or n) + 4, ssl=False, force_close=fresh_connections)
    async with aiohttp.ClientSession(headers=headers, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=600)) as http:
        async def request(prompt: list[int], max_tokens: int) -> RequestStats:
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": ignore_eos,
                    "stream": stream, "stream_options": {"include_usage": True} if stream else None}
            start = time.perf_counter()
            if not stream:
                async with http.post(endpoint, json=body) as response:
                    reply = await response.json(content_type=None)
                end = time.perf_counter()
                if response.status != 200:
                    return RequestStats(0.0, end - start, 0, False, f"HTTP {response.status}: {reply}")
                return RequestStats(0.0, end - start, reply["usage"]["completion_tokens"])
            first = None
            # Room for the whole stream in aiohttp's buffer, so that it never stops reading the socket
            # while the rest of the answer waits there for wait_eof.
            buffer = max(1 << 18, 2048 * max_tokens)
            async with http.post(endpoint, json=body, read_bufsize=buffer) as response:
                if response.status != 200:
                    return RequestStats(0.0, time.perf_counter() - start, 0, False,
                                        f"HTTP {response.status}: {(await response.text())[:200]}")
                # The first event when it comes (time to first token), then the rest when the stream ends:
                # every byte is received, but this task wakes twice per request, not once per token, as
                # the native client's generate() does. On a machine the gateway and the stages share, a
                # wake-up per token here would be taken from them and counted against the gateway.
                data = await response.content.readany()
                while data and b"data: " not in data:
                    data += await response.content.readany()
                first = time.perf_counter()
                await response.content.wait_eof()
                tail = (data + await response.content.read())[-8192:]  # the usage is in the last event
            end = time.perf_counter()
            events = [e for e in tail.split(b"\n\n") if e.startswith(b"data: {")]
            reply = json.loads(events[-1][6:]) if events else {}
            if "error" in reply:
                return RequestStats(0.0, end - start, 0, False, reply["error"].get("message"))
            tokens = (reply.get("usage") or {}).get("completion_tokens", 0)
            return RequestStats((first or end) - start, end - start, tokens)

        await request(workload.prompts[0][:4], 2)  # warm-up, not counted

        async def one(i: int) -> None:
            try:
                stats[i] = await request(workload.prompts[i], workload.output_lens[i])
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                stats[i] = RequestStats(0.0, 0.0, 0, False, f"{type(exc).__name__}: {exc}")
            if progress:
                progress.advance(task)

        wall = await _drive(one, n, concurrency, rate, seed)
    return [s for s in stats if s is not None], wall


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """When the open loop sends requests 0..n-1 (seconds after the first): Poisson arrivals at `rate`.
    The same offsets for the same (n, rate, seed), so a model can be fed the very trace a run sends."""
    rng = random.Random(seed + 1)
    offsets, at = [], 0.0
    for _ in range(n):
        offsets.append(at)
        at += rng.expovariate(rate)
    return offsets


async def _drive(one, n: int, concurrency: int | None, rate: float | None, seed: int) -> float:
    """Closed loop (`concurrency` workers) or open loop (Poisson arrivals at `rate`) over requests 0..n-1;
    returns the wall seconds it took. The open loop sends each request at its offset from the start (not
    a gap after the previous send), so a busy event loop delays a send but does not slow the whole trace."""
    start = time.perf_counter()
    if rate:
        tasks = []
        for i, offset in enumerate(arrival_offsets(n, rate, seed)):
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    else:
        queue = iter(range(n))

        async def worker() -> None:
            for i in queue:
                await one(i)

        await asyncio.gather(*(worker() for _ in range(concurrency or 1)))
    return time.perf_counter() - start


def hf_baselines(model_path: str, workload: Workload, one_at_a_time: int, batch_size: int,
                 console: Console) -> list[Report]:
    """The same requests through Hugging Face generate in this process: one at a time, then in static
    batches of `batch_size` (the benchmark's concurrency), each padded to its longest prompt and output."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    pad = model.generation_config.pad_token_id or model.generation_config.eos_token_id or 0
    if isinstance(pad, list):
        pad = pad[0]
    reports = []
    with torch.inference_mode():
        model.generate(torch.tensor([workload.prompts[0][:4]]), max_new_tokens=2, do_sample=False)  # warm-up
        stats = []
        count = min(one_at_a_time, len(workload.prompts))
        with console.status(f"HF generate, one request at a time ({count} requests)"):
            start = time.perf_counter()
            for prompt, out_len in zip(workload.prompts[:count], workload.output_lens[:count]):
                t0 = time.perf_counter()
                model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False, pad_token_id=pad)
                stats.append(RequestStats(0.0, time.perf_counter() - t0, out_len))  # end-to-end only
            reports.append(summarize("hf one at a time", stats, time.perf_counter() - start, None, latency_only=True))
        with console.status(f"HF generate, static batches of {batch_size}"):
            stats = []
            start = time.perf_counter()
            for first in range(0, len(workload.prompts), batch_size):
                prompts = workload.prompts[first : first + batch_size]
                out_lens = workload.output_lens[first : first + batch_size]
                longest = max(len(p) for p in prompts)
                ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, prompt in enumerate(prompts):  # left padding
                    ids[i, longest - len(prompt):] = torch.tensor(prompt)
                    mask[i, longest - len(prompt):] = 1
                t0 = time.perf_counter()
                model.generate(ids, attention_mask=mask, max_new_tokens=max(out_lens), min_new_tokens=max(out_lens),
                               do_sample=False, pad_token_id=pad)
                took = time.perf_counter() - t0
                stats += [RequestStats(took, took, n) for n in out_lens]  # tokens asked for, not padding
            reports.append(summarize(f"hf static batches of {batch_size}", stats, time.perf_counter() - start, None,
                                     latency_only=True))
    return reports


def print_reports(console: Console, reports: list[Report]) -> None:
    table = Table(title="hexgen-zmq bench")
    for column in ("run", "req", "fail", "out tok", "tok/s", "req/s", "TTFT p50/p90/p99 ms", "TPOT p50/p90/p99 ms",
                   "E2E p50/p90/p99 s", "SLO"):
        table.add_column(column, justify="right")
    ms = lambda d: "/".join(f"{d[k] * 1e3:.0f}" for k in ("p50", "p90", "p99")) if d else "-"  # noqa: E731
    sec = lambda d: "/".join(f"{d[k]:.2f}" for k in ("p50", "p90", "p99")) if d else "-"  # noqa: E731
    for r in reports:
        slo = f"{r.slo_attainment:.1%} <= {r.slo_s:g}s" if r.slo_attainment is not None else "-"
        table.add_row(r.label, str(r.requests), str(r.failed), str(r.output_tokens), f"{r.tokens_per_s:.0f}",
                      f"{r.requests_per_s:.2f}", ms(r.ttft_s), ms(r.tpot_s), sec(r.e2e_s), slo)
        if len(r.pipelines) > 1:  # which pipeline served what, when there is a choice
            for pipeline, f in r.pipelines.items():
                share = f"{f['slo_attainment']:.1%}" if f["slo_attainment"] is not None else "-"
                table.add_row(f"  served by {pipeline}", str(f["requests"]), "", "", "", "", ms(f["ttft_s"]),
                              ms(f["tpot_s"]), sec(f["e2e_s"]), share)
    console.print(table)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="load a deployment and report latency, throughput and SLO attainment")
    p.add_argument("--config", required=True, help="deployment file")
    p.add_argument("--launch", action="store_true", help="start the deployment on this machine for the run")
    loop = p.add_mutually_exclusive_group()
    loop.add_argument("--concurrency", type=int, default=None, help="closed loop: clients in flight (default 32)")
    loop.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals per second")
    p.add_argument("--requests", type=int, default=None, help="requests to send (default: the concurrency, or 64)")
    p.add_argument("--prompt-len", type=parse_len, default=(64, 64), help="N or LOW:HIGH (uniform)")
    p.add_argument("--output-len", type=parse_len, default=(64, 64), help="N or LOW:HIGH (uniform)")
    p.add_argument("--respect-eos", action="store_true", help="stop at EOS (default: always produce output-len)")
    p.add_argument("--slo", type=float, default=None, help="end-to-end deadline in seconds for SLO attainment")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline", choices=["hf"], default=None, help="also run Hugging Face generate, same requests")
    p.add_argument("--baseline-requests", type=int, default=None,
                   help="requests for the one-at-a-time baseline (default: all)")
    p.add_argument("--http", default=None, metavar="URL",
                   help="also drive this gateway's /v1/completions (e.g. http://127.0.0.1:8000), same requests; "
                        "with --launch, a gateway is started there")
    p.add_argument("--api-key", default=None, help="bearer key for --http")
    p.add_argument("--http-whole", action="store_true",
                   help="with --http: ask for whole answers (stream: false) instead of token-by-token streams")
    p.add_argument("--rounds", type=int, default=1,
                   help="with --http: alternate native and HTTP runs this many times and compare medians")
    p.add_argument("--stream-interval", type=int, default=1, metavar="N",
                   help="with --launch --http: the gateway's --stream-interval (tokens per streamed chunk)")
    p.add_argument("--json", default=None, help="write the reports here")
    p.set_defaults(func=run)


def launch_gateway(config: str, url: str, api_key: str | None, stream_interval: int = 1):
    """A `serve` process for --launch --http, listening where `url` points."""
    from urllib.parse import urlsplit

    from hexgen_zmq.operations.commands import GatewayProcess

    where = urlsplit(url)
    options = (["--api-key", api_key] if api_key else []) + ["--stream-interval", str(stream_interval)]
    gateway = GatewayProcess(config, (where.hostname or "127.0.0.1", where.port or 80), options)
    try:
        gateway.wait_ready()
    except BaseException:
        gateway.stop()
        raise
    return gateway


def run(args: argparse.Namespace) -> int:
    from hexgen_zmq.operations.deployment import load_deployment
    from hexgen_zmq.operations.launcher import LocalDeployment

    console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)
    deployment = load_deployment(args.config)
    info = deployment.model_info()
    concurrency = None if args.rate else (args.concurrency or 32)
    n = args.requests or (concurrency or 64)
    workload = make_workload(n, args.prompt_len, args.output_len, min(info.vocab_size, 32000), args.seed)
    local = gateway = None
    load = f"{'rate ' + str(args.rate) + '/s' if args.rate else f'concurrency {concurrency}'}"
    reports: list[Report] = []
    all_stats: list[RequestStats] = []
    rounds = max(1, args.rounds) if args.http else 1
    try:
        if args.launch:
            local = LocalDeployment(args.config)
            with console.status("starting the deployment"):
                local.start()
            if args.http:
                gateway = launch_gateway(args.config, args.http, args.api_key, args.stream_interval)
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=console)
        with progress:
            for r in range(rounds):  # interleaved, so that both sides see the same spells of the machine
                suffix = f", round {r + 1}" if rounds > 1 else ""
                stats, wall = asyncio.run(run_load(deployment.broker.clients, workload, concurrency, args.rate,
                                                   args.seed, not args.respect_eos, progress))
                reports.append(summarize(f"hexgen-zmq ({load}{suffix})", stats, wall, args.slo))
                all_stats += stats
                if args.http:
                    stats, wall = asyncio.run(run_http_load(args.http, workload, concurrency, args.rate, args.seed,
                                                            not args.respect_eos, args.api_key, progress,
                                                            stream=not args.http_whole))
                    reports.append(summarize(f"HTTP gateway ({load}{suffix})", stats, wall, args.slo,
                                             latency_only=args.http_whole))
                    all_stats += stats
    finally:
        if gateway is not None:
            gateway.stop()
        if local is not None:
            local.stop()
    stats = all_stats
    if args.baseline == "hf":
        reports += hf_baselines(deployment.model.path, workload, args.baseline_requests or n, concurrency or n,
                                console)
    print_reports(console, reports)
    if args.http:
        native = [r.tokens_per_s for r in reports if r.label.startswith("hexgen-zmq")]
        http = [r.tokens_per_s for r in reports if r.label.startswith("HTTP gateway")]
        ratios = [h / n for h, n in zip(http, native) if n > 0]
        print(f"tokens/s, native client: median {statistics.median(native):.0f}; through the HTTP gateway: median "
              f"{statistics.median(http):.0f}; ratio per round {', '.join(f'{x:.3f}' for x in ratios)}, "
              f"median {statistics.median(ratios):.3f}")
    if args.baseline == "hf":
        ours = reports[0].tokens_per_s
        for r in reports[1:]:
            print(f"tokens/s ratio, hexgen-zmq / {r.label}: {ours / r.tokens_per_s:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": str(args.config), "requests": n, "reports": [asdict(r) for r in reports]}, indent=2))
    return 0 if all(s.ok for s in stats) else 1
