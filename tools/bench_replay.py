"""How long a replay takes: SIGKILL a stage under load and time, for every request it held, the gap from the
kill to its first token from the new attempt; and count the tokens each replay prefills again.

    python tools/bench_replay.py [--trials 5] [--streams 16] [--stage-timeout 3]

Starts a two-pipeline deployment of a tiny random model ([all layers] and [3 | 5] layers), runs --streams
long streams, kills the last stage of the two-stage pipeline once every stream has tokens, waits for every
stream to finish (checking none lost a token), restarts the stage, and repeats. Prints p50 / p99 of the
kill-to-replayed-token gap and of the tokens re-prefilled per replayed request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hexgen_zmq.serving.client import Client  # noqa: E402
from hexgen_zmq.operations.launcher import LocalDeployment  # noqa: E402
from hexgen_zmq.model.tiny import make_tiny_model  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def healthy(client: Client) -> bool:
    try:
        return all(p.ready and p.healthy for p in (await client.status(timeout_s=2)).pipelines)
    except TimeoutError:
        return False


async def trial(local: LocalDeployment, streams: int, output: int) -> list[float]:
    """One kill under load; the kill-to-next-token gaps of the requests the killed pipeline held."""
    async with Client.connect(local.address) as client:
        arrivals: list[list[float]] = [[] for _ in range(streams)]
        killed_at = [0.0]

        async def run(i: int) -> int:
            n = 0
            async for _ in client.stream(prompt_ids=[5 + i, 7, 9, 11], max_new_tokens=output, ignore_eos=True,
                                         timeout_s=120):
                arrivals[i].append(time.monotonic())
                n += 1
            return n

        tasks = [asyncio.create_task(run(i)) for i in range(streams)]
        while min(len(a) for a in arrivals) < 5:
            await asyncio.sleep(0.01)
        killed_at[0] = time.monotonic()
        os.kill(local.pid("p1s1:0"), signal.SIGKILL)
        counts = await asyncio.wait_for(asyncio.gather(*tasks), 180)
        assert all(c == output for c in counts), counts  # no request lost a token
        gaps = []
        for times in arrivals:
            after = [t for t in times if t > killed_at[0]]
            if after and after[0] - killed_at[0] > 0.5:  # it waited for a replay
                gaps.append(after[0] - killed_at[0])
        local.restart("p1s1:0")
        deadline = time.monotonic() + 120
        while not await healthy(client):
            if time.monotonic() > deadline:
                raise RuntimeError("the restarted stage did not rejoin")
            await asyncio.sleep(0.3)
        return gaps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--output", type=int, default=300)
    parser.add_argument("--stage-timeout", type=float, default=3.0, help="the broker's stage_timeout_s")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = make_tiny_model(Path(scratch) / "model", num_layers=8, hidden_size=256)
        from tests.support import write_deployment

        config = write_deployment(Path(scratch), model, [[(0, 8, 1)], [(0, 3, 1), (3, 8, 1)]],
                                  stage_timeout_s=args.stage_timeout, request_timeout_s=120)
        local = LocalDeployment(config, log_dir=Path(scratch) / "logs", threads=1)
        with local:
            gaps = []
            for _ in range(args.trials):
                gaps.extend(asyncio.run(trial(local, args.streams, args.output)))
            log = (Path(scratch) / "logs" / "broker.log").read_text()
        replays = [int(n) for n in re.findall(r"replayed as \d+ after (\d+) tokens", log)]
        prefilled = [4 + n for n in replays]  # prompt of 4 + the tokens emitted before the replay
    print(f"stage_timeout_s {args.stage_timeout:g}; {args.trials} kills of a stage holding requests, "
          f"{len(gaps)} replayed requests timed")
    print(f"kill -> first replayed token: p50 {statistics.median(gaps):.2f} s, p99 {percentile(gaps, 0.99):.2f} s, "
          f"max {max(gaps):.2f} s")
    print(f"tokens re-prefilled per replayed request: p50 {statistics.median(prefilled):.0f}, "
          f"p99 {percentile(prefilled, 0.99):.0f} (prompt 4 + tokens emitted before the kill)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
