"""End to end over real processes and sockets: client -> broker -> pipelines of 1, 2 and 3 stages (uneven
splits) -> tokens back, checked against Hugging Face generate on the whole model."""

from __future__ import annotations

import asyncio
import random

import pytest

from hexgen_zmq.serving.client import Client, GenerationError
from tests.support import hf_greedy, local_deployment, wait_for

LAYOUT = [
    [(0, 6, 1)],
    [(0, 2, 1), (2, 6, 1)],
    [(0, 1, 1), (1, 4, 1), (4, 6, 1)],
]


@pytest.fixture(scope="module")
def deployment(tiny_model, tmp_path_factory):
    with local_deployment(tmp_path_factory.mktemp("e2e"), tiny_model, LAYOUT, request_timeout_s=60) as local:
        yield local


async def connect(deployment) -> Client:
    return await Client.connect(deployment.address)


async def test_concurrent_greedy_equals_hf(deployment, tiny_model):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 490) for _ in range(n)] for n in (1, 3, 7, 12, 20, 33, 48, 5, 64, 9, 17, 2)]
    async with await connect(deployment) as client:
        results = await asyncio.wait_for(
            asyncio.gather(*(client.generate(prompt_ids=p, max_new_tokens=24) for p in prompts)), 120)
    for prompt, result in zip(prompts, results):
        assert result.token_ids == hf_greedy(tiny_model, prompt, 24), f"prompt of {len(prompt)} tokens"
        assert result.finish_reason in ("eos", "length")
        assert 0 < result.ttft_s <= result.total_s
    assert {r.pipeline for r in results} == {"p0", "p1", "p2"}  # every layout was exercised


async def test_each_layout_alone_equals_hf(deployment, tiny_model):
    """One request at a time: least-loaded dispatch visits pipelines in turn."""
    prompt = [11, 22, 33, 44, 55]
    expected = hf_greedy(tiny_model, prompt, 40)
    async with await connect(deployment) as client:
        for _ in range(3):
            result = await asyncio.wait_for(client.generate(prompt_ids=prompt, max_new_tokens=40), 60)
            assert result.token_ids == expected


async def test_stream_yields_the_same_tokens(deployment, tiny_model):
    prompt = [7, 8, 9]
    async with await connect(deployment) as client:
        streamed = [t async for t in client.stream(prompt_ids=prompt, max_new_tokens=16)]
    assert streamed == hf_greedy(tiny_model, prompt, 16)


async def test_text_prompt_and_chat(deployment, tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    async with await connect(deployment) as client:
        result = await asyncio.wait_for(client.generate(prompt="The quick brown fox", max_new_tokens=12), 60)
        ids = tokenizer("The quick brown fox")["input_ids"]
        assert result.token_ids == hf_greedy(tiny_model, ids, 12)
        assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)
        chat = [{"role": "user", "content": "What is the capital of France?"}]
        result = await asyncio.wait_for(client.generate(messages=chat, max_new_tokens=12), 60)
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert result.token_ids == hf_greedy(tiny_model, list(ids), 12)


async def test_seeded_sampling_is_reproducible(deployment):
    prompt = [5, 6, 7, 8]
    kwargs = dict(prompt_ids=prompt, max_new_tokens=30, temperature=1.0, top_k=50, top_p=0.9)
    async with await connect(deployment) as client:
        # concurrently, so the runs land on different pipelines and in different batches
        a, b = await asyncio.wait_for(asyncio.gather(client.generate(seed=1234, **kwargs),
                                                     client.generate(seed=1234, **kwargs)), 60)
        others = await asyncio.wait_for(asyncio.gather(*(client.generate(seed=s, **kwargs) for s in range(3))), 60)
    assert a.token_ids == b.token_ids
    assert any(o.token_ids != a.token_ids for o in others)


async def test_stop_token_ends_the_request(deployment, tiny_model):
    prompt = [40, 41, 42]
    expected = hf_greedy(tiny_model, prompt, 20)
    stop = expected[5]
    async with await connect(deployment) as client:
        result = await asyncio.wait_for(client.generate(prompt_ids=prompt, max_new_tokens=20,
                                                        stop_token_ids=[stop]), 60)
    assert result.token_ids == expected[: expected.index(stop) + 1]
    assert result.finish_reason in ("stop", "eos")


async def no_cache_held(client: Client) -> bool:
    status = await client.status()
    return all(sum(p.kv_blocks_used.values()) == 0 for p in status.pipelines) and \
        all(p.in_flight == 0 for p in status.pipelines)


TWINS = 9


async def only_twins_hold_cache(client: Client, twins: list[asyncio.Task]) -> bool:
    """Every stage holds exactly the requests in flight on its pipeline, which are the twins, all still
    running: the other request's cache was freed on every stage before it could have ended by itself."""
    assert not any(t.done() for t in twins), "a twin finished first: the request could have ended by itself"
    status = await client.status()
    return sum(p.in_flight for p in status.pipelines) == len(twins) and \
        all(n == p.in_flight for p in status.pipelines for n in p.cached_requests.values())


def start_twins(client: Client) -> list[asyncio.Task]:
    """Requests like the one under test that cannot end by themselves soon (ignore_eos, long outputs, and
    enough of them on every pipeline to slow each other down)."""
    return [asyncio.create_task(client.generate(prompt_ids=[3, 4, 5, i], max_new_tokens=480, ignore_eos=True))
            for i in range(TWINS)]


async def stop_twins(client: Client, twins: list[asyncio.Task]) -> None:
    for task in twins:
        task.cancel()
    await asyncio.gather(*twins, return_exceptions=True)
    await wait_for(lambda: no_cache_held(client), timeout_s=20)


async def test_cancel_frees_the_cache(deployment):
    async with await connect(deployment) as client:
        twins = start_twins(client)
        stream = client.stream(prompt_ids=[3, 4, 5, 6], max_new_tokens=480, ignore_eos=True)
        got = []
        async for token in stream:
            got.append(token)
            if len(got) == 3:
                break
        await stream.aclose()
        await wait_for(lambda: only_twins_hold_cache(client, twins), timeout_s=20, interval_s=0.05)
        await stop_twins(client, twins)


async def test_deadline_fails_the_request_and_frees_the_cache(deployment):
    async with await connect(deployment) as client:
        twins = start_twins(client)
        with pytest.raises(GenerationError) as err:
            await asyncio.wait_for(client.generate(prompt_ids=list(range(10, 20)), max_new_tokens=480,
                                                   ignore_eos=True, timeout_s=0.5), 30)
        assert err.value.code == "timeout"
        await wait_for(lambda: only_twins_hold_cache(client, twins), timeout_s=20, interval_s=0.05)
        await stop_twins(client, twins)


@pytest.mark.parametrize("kwargs, code", [
    (dict(prompt_ids=[5] * 500, max_new_tokens=100), "prompt_too_long"),
    (dict(prompt_ids=[1, 2], max_new_tokens=4, temperature=-1.0), "invalid_request"),
    (dict(prompt_ids=[1, 2], max_new_tokens=4, top_p=1.5), "invalid_request"),
    (dict(prompt_ids=[1, 2], max_new_tokens=4, top_k=0), "invalid_request"),
    (dict(prompt_ids=[1, 2], max_new_tokens=0), "invalid_request"),
    (dict(prompt_ids=[], max_new_tokens=4), "invalid_request"),
    (dict(prompt_ids=[1, 10**6], max_new_tokens=4), "invalid_request"),
    (dict(prompt_ids=[1, 2], max_new_tokens=4, stop_token_ids=[-3]), "invalid_request"),
])
async def test_invalid_requests_get_clear_errors(deployment, kwargs, code):
    async with await connect(deployment) as client:
        with pytest.raises(GenerationError) as err:
            await asyncio.wait_for(client.generate(**kwargs), 30)
        assert err.value.code == code
        assert str(err.value)
        # and the broker still serves
        result = await asyncio.wait_for(client.generate(prompt_ids=[1, 2, 3], max_new_tokens=2), 30)
        assert len(result.token_ids) >= 1


async def test_connect_is_awaitable_and_a_context_manager(deployment, tiny_model):
    import hexgen_zmq

    async with hexgen_zmq.Client.connect(deployment.address) as client:
        a = await asyncio.wait_for(client.generate(prompt_ids=[2, 3], max_new_tokens=5), 30)
    client = await hexgen_zmq.Client.connect(deployment.address)
    try:
        b = await asyncio.wait_for(client.generate(prompt_ids=[2, 3], max_new_tokens=5), 30)
    finally:
        await client.close()
    assert a.token_ids == b.token_ids == hf_greedy(tiny_model, [2, 3], 5)


def test_sync_client(deployment, tiny_model):
    import hexgen_zmq

    with hexgen_zmq.SyncClient(deployment.address) as client:
        assert client.generate(prompt_ids=[8, 9], max_new_tokens=6).token_ids == hf_greedy(tiny_model, [8, 9], 6)
        assert list(client.stream(prompt_ids=[8, 9], max_new_tokens=6)) == hf_greedy(tiny_model, [8, 9], 6)


async def test_a_silent_broker_is_an_error_not_a_hang():
    import zmq.asyncio

    from hexgen_zmq.wire.sockets import free_port

    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)  # accepts the request, never answers
    address = f"tcp://127.0.0.1:{free_port()}"
    router.bind(address)
    try:
        async with Client.connect(address, silence_s=0.3) as client:
            with pytest.raises(GenerationError) as err:
                await asyncio.wait_for(client.generate(prompt_ids=[1, 2], timeout_s=0.2), 10)
        assert err.value.code == "timeout"
    finally:
        router.close(0)
        ctx.term()


async def test_leaving_a_request_early_tells_the_broker_to_cancel_it():
    """Cancelling a generate task, or leaving a stream after its first token, sends CancelRequest for it."""
    import zmq.asyncio

    from hexgen_zmq.wire.messages import CancelRequest, GenerateRequest, TokenEvent, decode_control, encode_control
    from hexgen_zmq.wire.sockets import free_port

    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)  # a broker that records what the client sends
    address = f"tcp://127.0.0.1:{free_port()}"
    router.bind(address)

    async def next_message(kind):
        while True:
            identity, *frames = await asyncio.wait_for(router.recv_multipart(), 10)
            message = decode_control(frames)
            if isinstance(message, kind):
                return identity, message

    try:
        async with Client.connect(address) as client:
            task = asyncio.create_task(client.generate(prompt_ids=[1, 2], max_new_tokens=50))
            identity, request = await next_message(GenerateRequest)
            router.send_multipart([identity, *encode_control(TokenEvent(request.client_request_id, [7]))])
            await asyncio.sleep(0.1)  # the token reaches the client, which keeps waiting for the rest
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            _, cancel = await next_message(CancelRequest)
            assert cancel.client_request_id == request.client_request_id

            stream = client.stream(prompt_ids=[1, 2], max_new_tokens=50)
            first = asyncio.create_task(anext(stream))
            identity, request = await next_message(GenerateRequest)
            router.send_multipart([identity, *encode_control(TokenEvent(request.client_request_id, [9]))])
            assert await asyncio.wait_for(first, 10) == 9
            await stream.aclose()
            _, cancel = await next_message(CancelRequest)
            assert cancel.client_request_id == request.client_request_id
    finally:
        router.close(0)
        ctx.term()


def test_bench_reports_against_the_hf_baselines(deployment, tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "hexgen_zmq.cli", "bench", "--config", str(deployment.config),
                             "--concurrency", "3", "--requests", "6", "--prompt-len", "4:12", "--output-len", "5",
                             "--slo", "30", "--baseline", "hf", "--baseline-requests", "2", "--json", str(out)],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    reports = json.loads(out.read_text())["reports"]
    assert [r["requests"] for r in reports] == [6, 2, 6]
    assert reports[0]["output_tokens"] == 30 and reports[0]["failed"] == 0 and reports[0]["slo_attainment"] == 1.0
    assert set(reports[0]["ttft_s"]) == {"p50", "p90", "p99", "mean"}
    assert "tokens/s ratio, hexgen-zmq / hf one at a time" in result.stdout


async def test_an_oversized_request_is_refused_before_it_is_sent(deployment):
    async with Client.connect(deployment.address) as client:
        with pytest.raises(GenerationError, match="message limit") as err:
            await client.generate(prompt="x" * (17 << 20))
        assert err.value.code == "invalid_request"
        assert (await asyncio.wait_for(client.generate(prompt_ids=[1, 2], max_new_tokens=2), 30)).token_ids
