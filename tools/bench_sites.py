"""Benchmarks over emulated datacenters (needs root): what a link's latency costs a cross-region pipeline
per token, and what a redeploy under load costs.

    python tools/bench_sites.py [--latency-ms 20] [--mbit 300] [--streams 24] [--model DIR]

1. Per-token latency: one request at a time, on a two-stage pipeline inside one region, then (redeployed)
   on the same split across the regions (the decode loop crosses the link twice per token: activations
   there, the sampled token back), then on four stages alternating regions (four crossings): each crossing
   adds the link's one-way latency, so a pipeline whose loop crosses between regions k times pays about k
   link latencies per token.
2. Redeploy under load: `--streams` closed-loop streams; the file is swapped to a layout with a pipeline
   reshaped, one removed and one added. Prints the time from the swap until the broker serves the new
   layout, and throughput before, during and after.
3. With `--compare-security`: the cost of CURVE. A two-stage pipeline over two hosts of one region,
   `--streams` closed-loop streams for `--settle-s`, once with keys and once with `security: insecure`,
   alternating `--pairs` times (each a fresh deployment); medians of tokens/s and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hexgen_zmq.serving.client import Client  # noqa: E402
from hexgen_zmq.operations.deployment import file_version  # noqa: E402
from tools.site_deployment import SiteDeployment, serving  # noqa: E402
from tools.sites import Sites, require_root  # noqa: E402

SAME_REGION = {"p0": [("a", 0, 3), ("b", 3, 6)]}  # a -> b -> a: no crossing
TWO_CROSSINGS = {"p0": [("a", 0, 3), ("c", 3, 6)]}  # a -> c -> a
FOUR_CROSSINGS = {"p0": [("a", 0, 2), ("c", 2, 3), ("b", 3, 5), ("c", 5, 6)]}  # a -> c -> b -> c -> a
BEFORE = {"p0": [("a", 0, 3), ("c", 3, 6)], "p1": [("b", 0, 6)]}
AFTER = {"p0": [("a", 0, 2), ("c", 2, 6)], "p2": [("c", 0, 6)]}


async def per_token_s(deployment: SiteDeployment, requests: int, tokens: int) -> list[float]:
    out = []
    async with await deployment.connect() as client:
        for i in range(requests):
            result = await client.generate(prompt_ids=[3, 1, 4, 1, 5, i + 1], max_new_tokens=tokens, ignore_eos=True)
            out.append((result.total_s - result.ttft_s) / (len(result.token_ids) - 1))
    return out


async def stream_until(client: Client, i: int, stop: asyncio.Event, stamps: list[float], failures: list[str]) -> None:
    """One closed-loop stream: requests back to back until `stop`, each token's arrival time in `stamps`,
    each failed request in `failures` (the bar is none)."""
    n = 0
    while not stop.is_set():
        n += 1
        try:
            async for _ in client.stream(prompt_ids=[2, 7, 1, 8, i % 50 + 1, n % 50 + 1], max_new_tokens=32,
                                         ignore_eos=True):
                stamps.append(time.monotonic())
        except Exception as exc:
            failures.append(repr(exc))


async def redeploy_under_load(deployment: SiteDeployment, streams: int, settle_s: float) -> dict:
    stamps: list[float] = []
    failures: list[str] = []
    stop = asyncio.Event()

    async with await deployment.connect() as client:
        tasks = [asyncio.create_task(stream_until(client, i, stop, stamps, failures)) for i in range(streams)]
        await asyncio.sleep(settle_s)
        swap = time.monotonic()
        new = deployment.redeploy(AFTER)
        await serving(deployment, set(AFTER), 300, file_version(new.read_bytes()))
        served = time.monotonic()
        await asyncio.sleep(settle_s)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 120)

    def rate(a: float, b: float) -> float:
        return sum(1 for t in stamps if a <= t < b) / (b - a)

    return {"swap_to_serving_s": served - swap, "before": rate(swap - settle_s + 2, swap),
            "during": rate(swap, served), "after": rate(served + 2, served + settle_s), "failures": failures}


async def closed_loop_rate(deployment: SiteDeployment, streams: int, seconds: float) -> float:
    """Tokens per second of `streams` streams issuing requests back to back (after a warm-up second)."""
    stamps: list[float] = []
    failures: list[str] = []
    stop = asyncio.Event()

    async with await deployment.connect() as client:
        tasks = [asyncio.create_task(stream_until(client, i, stop, stamps, failures)) for i in range(streams)]
        start = time.monotonic()
        await asyncio.sleep(seconds + 1)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed: {failures[:3]}")
    return sum(1 for t in stamps if t >= start + 1) / seconds


def compare_security(args, model: str, tmp: Path) -> None:
    topology = {"regions": {"eu": ["a", "b"]}, "links": []}
    rates: dict[bool, list[float]] = {True: [], False: []}
    with Sites(topology, prefix="hxbk", subnet="10.245.0.0/16") as sites:
        for pair in range(args.pairs):
            for secure in (True, False) if pair % 2 == 0 else (False, True):
                directory = tmp / f"security-{pair}-{secure}"
                directory.mkdir()
                deployment = SiteDeployment(sites, model, directory, {"p0": [("a", 0, 3), ("b", 3, 6)]},
                                            secure=secure)
                try:
                    asyncio.run(serving(deployment, {"p0"}, 300))
                    rates[secure].append(asyncio.run(closed_loop_rate(deployment, args.streams, args.settle_s)))
                finally:
                    deployment.stop()
                print(f"  {'keys' if secure else 'insecure':8s} {rates[secure][-1]:7.0f} tok/s", flush=True)
    keyed, plain = statistics.median(rates[True]), statistics.median(rates[False])
    print(f"two hosts, one region, {args.streams} streams: with keys {keyed:.0f} tok/s, insecure {plain:.0f} tok/s "
          f"(medians of {args.pairs}); keys/insecure {keyed / plain:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--mbit", type=float, default=300.0)
    parser.add_argument("--streams", type=int, default=24)
    parser.add_argument("--requests", type=int, default=6, help="sequential requests per layout (latency)")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--settle-s", type=float, default=12.0)
    parser.add_argument("--model", default=None, help="checkpoint (default: a tiny random Llama)")
    parser.add_argument("--compare-security", action="store_true", help="only the CURVE cost comparison")
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    require_root()
    with tempfile.TemporaryDirectory(prefix="bench-sites-") as tmp:
        model = args.model
        if model is None:
            from hexgen_zmq.model.tiny import make_tiny_model

            model = str(make_tiny_model(Path(tmp) / "tiny", num_layers=6, hidden_size=128, num_heads=8,
                                        num_kv_heads=4, intermediate_size=344, max_positions=512))
        if args.compare_security:
            compare_security(args, model, Path(tmp))
            return 0
        topology = {"regions": {"eu": ["a", "b"], "us": ["c"]},
                    "links": [{"a": "eu", "b": "us", "mbit": args.mbit, "latency_ms": args.latency_ms}]}
        with Sites(topology, prefix="hxbs", subnet="10.244.0.0/16") as sites:
            deployment = SiteDeployment(sites, model, Path(tmp), SAME_REGION)
            try:
                asyncio.run(serving(deployment, {"p0"}, 300))
                figures = {}
                crossings = {"same region": 0, "two crossings": 2, "four crossings": 4}
                for name, layout in (("same region", SAME_REGION), ("two crossings", TWO_CROSSINGS),
                                     ("four crossings", FOUR_CROSSINGS)):
                    if layout is not SAME_REGION:
                        new = deployment.redeploy(layout)
                        asyncio.run(serving(deployment, {"p0"}, 300, file_version(new.read_bytes())))
                    asyncio.run(per_token_s(deployment, 1, 4))  # warm
                    figures[name] = statistics.median(asyncio.run(per_token_s(deployment, args.requests,
                                                                              args.tokens)))
                base = figures["same region"]
                print(f"link: {args.mbit:g} Mbit/s, {args.latency_ms:g} ms one way")
                print("per-token latency, one request at a time (median of "
                      f"{args.requests} requests x {args.tokens} tokens):")
                for name, k in crossings.items():
                    expected = base + k * args.latency_ms / 1000
                    print(f"  {name:14s} {figures[name] * 1000:7.1f} ms   (same region + {k} x latency = "
                          f"{expected * 1000:.1f} ms; extra per crossing: "
                          f"{(figures[name] - base) / max(k, 1) * 1000:.1f} ms)")
                new = deployment.redeploy(BEFORE)
                asyncio.run(serving(deployment, set(BEFORE), 300, file_version(new.read_bytes())))
                load = asyncio.run(redeploy_under_load(deployment, args.streams, args.settle_s))
                print(f"redeploy under {args.streams} streams (p0 reshaped, p1 removed, p2 added): "
                      f"swap -> new layout serving {load['swap_to_serving_s']:.1f} s; tokens/s before "
                      f"{load['before']:.0f}, during {load['during']:.0f}, after {load['after']:.0f}; "
                      f"failed requests: {len(load['failures'])}")
                for failure in load["failures"][:5]:
                    print("  ", failure)
            finally:
                deployment.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
