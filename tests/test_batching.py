"""Continuous batching and pipelining under load: staggered arrivals of different lengths, prompt chunks
mixed with decode steps, several micro-batches in flight, a KV budget that fills up, and a bounded queue."""

from __future__ import annotations

import asyncio
import random

import pytest

from hexgen_zmq.serving.client import Client, GenerationError
from tests.support import hf_greedy, local_deployment

KV_TOKENS = 256  # 16 blocks of 16 tokens per stage
QUEUE_LIMIT = 6


def small_budgets(spec: dict) -> None:
    spec["pipelines"][0]["micro_batches"] = 3  # one per stage: several in flight, as on GPUs
    for pipeline in spec["pipelines"]:
        for stage in pipeline["stages"]:
            stage.update(kv_cache_tokens=KV_TOKENS, max_batch_tokens=24)  # small: prompts get chunked


@pytest.fixture(scope="module")
def deployment(tiny_model, tmp_path_factory):
    with local_deployment(tmp_path_factory.mktemp("batching"), tiny_model,
                          [[(0, 2, 1), (2, 3, 1), (3, 6, 1)], [(0, 6, 1)]], edit=small_budgets,
                          queue_limit=QUEUE_LIMIT, request_timeout_s=120) as local:
        yield local


async def test_staggered_requests_of_different_lengths_equal_hf(deployment, tiny_model):
    rng = random.Random(11)
    jobs = [([rng.randrange(3, 490) for _ in range(rng.randint(1, 70))], rng.randint(3, 30)) for _ in range(14)]

    async with await Client.connect(deployment.address) as client:
        async def send(i, prompt, n):
            await asyncio.sleep(0.03 * i * rng.random())
            return await client.generate(prompt_ids=prompt, max_new_tokens=n)

        results = await asyncio.wait_for(asyncio.gather(*(send(i, p, n) for i, (p, n) in enumerate(jobs))), 180)
    for (prompt, n), result in zip(jobs, results):
        assert result.token_ids == hf_greedy(tiny_model, prompt, n), f"prompt {len(prompt)}, {n} new"
    assert {r.pipeline for r in results} == {"p0", "p1"}


async def test_a_full_kv_budget_queues_requests_and_loses_none(deployment, tiny_model):
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 490) for _ in range(20)] for _ in range(8 + QUEUE_LIMIT)]
    # each request reserves 20 + 40 tokens = 4 blocks: 4 fit a pipeline, 8 the deployment, the rest queue
    async with await Client.connect(deployment.address) as client:
        tasks = [asyncio.create_task(client.generate(prompt_ids=p, max_new_tokens=40)) for p in prompts]
        queued_seen = 0
        while not all(t.done() for t in tasks):
            status = await client.status()
            queued_seen = max(queued_seen, status.queued)
            for p in status.pipelines:
                assert all(n <= 4 for n in p.cached_requests.values()), p
            await asyncio.sleep(0.02)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
    assert queued_seen > 0
    for prompt, result in zip(prompts, results):
        assert result.token_ids == hf_greedy(tiny_model, prompt, 40)


async def test_over_the_queue_bound_clients_get_a_busy_error(deployment, tiny_model):
    prompts = [[5, 6, i] + [7] * 17 for i in range(8 + QUEUE_LIMIT + 4)]  # 4 blocks each, as above
    async with await Client.connect(deployment.address) as client:
        outcomes = await asyncio.wait_for(asyncio.gather(
            *(client.generate(prompt_ids=p, max_new_tokens=40, ignore_eos=True) for p in prompts),
            return_exceptions=True), 180)
    busy = [o for o in outcomes if isinstance(o, GenerationError)]
    done = [(p, o) for p, o in zip(prompts, outcomes) if not isinstance(o, Exception)]
    assert len(busy) == 4 and all(e.code == "busy" for e in busy), outcomes
    assert len(done) == 8 + QUEUE_LIMIT
    for prompt, result in done:
        assert len(result.token_ids) == 40
