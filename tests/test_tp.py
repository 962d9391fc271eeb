"""Tensor parallelism inside stages, a different degree per stage, against the Hugging Face oracle."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest

from hexgen_zmq.serving.client import Client, GenerationError
from tests.support import hf_greedy, local_deployment

# [TP 2, TP 1] and [TP 1, TP 4, TP 2], uneven splits; the tiny model has 8 query heads over 4 KV heads, so
# TP 4 replicates KV heads (one per rank) and TP 2 splits them.
LAYOUT = [[(0, 4, 2), (4, 6, 1)], [(0, 1, 1), (1, 3, 4), (3, 6, 2)]]


@pytest.fixture(scope="module")
def deployment(tiny_model, tmp_path_factory):
    with local_deployment(tmp_path_factory.mktemp("tp"), tiny_model, LAYOUT, request_timeout_s=60, stage_timeout_s=2.0) as local:
        yield local


async def test_tp_pipelines_equal_hf_under_concurrency(deployment, tiny_model):
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 490) for _ in range(n)] for n in (2, 9, 31, 4, 17, 50, 1, 23)]
    async with await Client.connect(deployment.address) as client:
        results = await asyncio.wait_for(
            asyncio.gather(*(client.generate(prompt_ids=p, max_new_tokens=20) for p in prompts)), 120)
    for prompt, result in zip(prompts, results):
        assert result.token_ids == hf_greedy(tiny_model, prompt, 20)
    assert {r.pipeline for r in results} == {"p0", "p1"}


async def wait_for_in_flight(client: Client, count: int) -> dict[str, int]:
    """Requests in flight per pipeline, once the broker has dispatched `count` in all."""
    from tests.support import wait_for

    async def dispatched():
        pipelines = (await client.status()).pipelines
        return {p.id: p.in_flight for p in pipelines} if sum(p.in_flight for p in pipelines) >= count else None

    return await wait_for(dispatched, timeout_s=20, interval_s=0.02)


async def test_killing_a_follower_replays_its_pipelines_requests_on_the_other(deployment, tiny_model):
    async with await Client.connect(deployment.address) as client:
        requests = []
        for i in range(6):  # until p1 holds one (the broker sends the first ones to the faster pipeline)
            requests.append(asyncio.create_task(client.generate(prompt_ids=[7, i, 9], max_new_tokens=200,
                                                                timeout_s=60, ignore_eos=True)))
            in_flight = await wait_for_in_flight(client, len(requests))
            if in_flight["p1"]:
                break
        assert in_flight["p1"], in_flight
        os.kill(deployment.pid("p1s1:2"), signal.SIGKILL)
        start = time.monotonic()
        outcomes = await asyncio.wait_for(asyncio.gather(*requests, return_exceptions=True), 55)
        # p1's requests were replayed on p0: none is lost, each has all its tokens
        assert all(not isinstance(o, Exception) and len(o.token_ids) == 200 for o in outcomes), outcomes
        assert any(o.pipeline == "p0" for o in outcomes)
        assert time.monotonic() - start < 50, "replayed, not hung"
        # p1 is now marked failed; p0 keeps answering correctly
        async def p1_down():
            status = await client.status()
            return not status.pipelines[1].healthy

        from tests.support import wait_for

        await wait_for(p1_down, timeout_s=30)
        for i in range(3):
            result = await asyncio.wait_for(client.generate(prompt_ids=[3, i, 5], max_new_tokens=12), 30)
            assert result.pipeline == "p0" and result.token_ids == hf_greedy(tiny_model, [3, i, 5], 12)
