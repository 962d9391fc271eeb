"""What peers send cannot stop a process; a killed stage fails its pipeline's requests, not the others."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import msgspec
import pytest
import torch
import zmq

from hexgen_zmq.serving.client import Client, GenerationError
from hexgen_zmq.wire.messages import (HEADER_ENCODER, Feedback, GenerateRequest, Header, Heartbeat, MicroBatch,
                                 SamplingParams, Segment, Submit, TensorMeta, TokenRecord, Tokens, encode_control)
from hexgen_zmq.wire.sockets import CONTROL_MAX_BYTES
from hexgen_zmq.wire.codec import encode
from tests.support import hf_greedy, local_deployment

LAYOUT = [[(0, 2, 1), (2, 6, 1)], [(0, 6, 1)]]


@pytest.fixture(scope="module")
def deployment(tiny_model, tmp_path_factory):
    with local_deployment(tmp_path_factory.mktemp("robust"), tiny_model, LAYOUT, request_timeout_s=60,
                          stage_timeout_s=1.5, client_timeout_s=1.5) as local:
        yield local


def junk_messages(hidden: int) -> list[list[bytes]]:
    rng = random.Random(1)
    batch = MicroBatch(1, [Segment(999, 0, 2, True)])
    good_header = HEADER_ENCODER.encode(Header(1, batch, [TensorMeta("float32", [2, hidden])]))
    return [
        [bytes(rng.randrange(256) for _ in range(n))] for n in (0, 1, 7, 100, 5000)
    ] + [
        [good_header[:5]],  # truncated header
        [good_header],  # tensor frame missing
        [good_header, b"\x00" * 12],  # tensor too short
        [good_header, b"\x00" * (8 * hidden), b"extra"],  # too many frames
        [bytes(f) for f in encode(batch, [torch.zeros(2, hidden)])],  # unknown request
        [bytes(f) for f in encode(MicroBatch(1, [Segment(5, 0, 3, True)]), [torch.zeros(2, hidden)])],  # lying size
        [bytes(f) for f in encode(batch, [torch.zeros(2, hidden + 1)])],  # wrong width
        [bytes(f) for f in encode(batch, [torch.zeros(2, hidden, dtype=torch.int64)])],  # wrong dtype
        [bytes(f) for f in encode(MicroBatch(1, [], release=[12345]), [torch.zeros(0)])],
        [msgspec.msgpack.encode([1, ["Submit", 1, "not a list", []], []])],
        encode_control(Submit(77, [], SamplingParams())),  # empty prompt
        encode_control(Submit(78, [10**9], SamplingParams())),  # token outside the vocabulary
        encode_control(Submit(79, [5, 6], SamplingParams(max_new_tokens=10**6))),  # past the context
        encode_control(Submit(80, [5, 6], SamplingParams(top_p=7.0))),
        encode_control(Feedback(424242, [TokenRecord(1, 3)])),
        encode_control(Tokens("p0", [TokenRecord(31337, 5, True)])),
        encode_control(Heartbeat("nobody")),
    ]


async def assert_still_serving(deployment, tiny_model):
    prompts = [[9, 8, 7], [1, 2, 3, 4, 5, 6], [100]]
    async with await Client.connect(deployment.address) as client:
        results = await asyncio.wait_for(
            asyncio.gather(*(client.generate(prompt_ids=p, max_new_tokens=12) for p in prompts * 2)), 60)
    for prompt, result in zip(prompts * 2, results):
        assert result.token_ids == hf_greedy(tiny_model, prompt, 12)
    assert {r.pipeline for r in results} == {"p0", "p1"}


async def test_garbage_to_stages_and_broker_leaves_them_serving(deployment, tiny_model):
    from hexgen_zmq.model.info import read_model_info

    hidden = read_model_info(tiny_model).hidden_size
    spec = deployment.deployment
    targets = [s.inbound for p in spec.pipelines for s in p.stages] + [spec.broker.results]
    junk = len(junk_messages(hidden))
    async with await Client.connect(deployment.address) as client:
        before = await client.status()
    ctx = zmq.Context()
    try:
        for target in targets:
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 2000)
            push.connect(target)
            for frames in junk_messages(hidden):
                push.send_multipart(frames)
            push.close()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 2000)
        dealer.connect(spec.broker.clients)
        for frames in junk_messages(hidden):
            dealer.send_multipart(frames)
        dealer.send_multipart([b"\x00" * (CONTROL_MAX_BYTES + 1)])  # oversized: dropped by libzmq
        dealer.close()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 2000)
        dealer.connect(spec.broker.clients)
        dealer.send_multipart(encode_control(GenerateRequest(1, SamplingParams(max_new_tokens=-4), prompt_ids=[1])))
        assert dealer.poll(10000), "the broker answers an invalid request with an error"
        dealer.close()
    finally:
        ctx.term()
    from tests.support import wait_for

    def counts(reply):
        return {**{stage: n for p in reply.pipelines for stage, n in p.bad_messages.items()}, "broker": reply.bad_messages}

    async with await Client.connect(deployment.address) as client:
        async def all_counted():
            now, start = counts(await client.status()), counts(before)
            # each stage refuses all but at most a stray Feedback (legitimate once its batch was cancelled);
            # the broker refuses what reached its results socket and its client socket
            stages_ok = all(now[s] - start.get(s, 0) >= junk - 1 for s in now if s != "broker")
            return stages_ok and now["broker"] - start["broker"] >= 2 * junk - 2

        await wait_for(all_counted, timeout_s=20)
    assert deployment.dead() is None
    await assert_still_serving(deployment, tiny_model)


async def test_a_client_that_goes_away_has_its_work_cancelled(deployment, tiny_model):
    from tests.support import wait_for

    prompt = long_prompts(tiny_model, 500, 1)[0]
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(deployment.deployment.broker.clients)
    for i in range(16):  # more work than can finish before the broker notices the silence
        dealer.send_multipart(encode_control(GenerateRequest(i, SamplingParams(max_new_tokens=500), prompt_ids=prompt)))
    assert dealer.poll(10000)  # the first tokens stream back...
    dealer.close()  # ...and the client vanishes without a word
    ctx.term()
    async with await Client.connect(deployment.address) as client:
        async def idle():
            status = await client.status()
            return all(p.in_flight == 0 and sum(p.cached_requests.values()) == 0 for p in status.pipelines)

        await wait_for(idle, timeout_s=15)
    broker_log = (deployment.log_dir / "broker.log").read_text()
    assert "client went away; cancelling request" in broker_log


def long_prompts(tiny_model, n_tokens: int, count: int) -> list[list[int]]:
    """Prompts whose greedy continuation does not hit EOS within n_tokens (so requests stay in flight)."""
    found = []
    for seed in range(50):
        prompt = [random.Random(seed).randrange(3, 490) for _ in range(6)]
        if len(hf_greedy(tiny_model, prompt, n_tokens)) == n_tokens:
            found.append(prompt)
            if len(found) == count:
                return found
    pytest.skip("no long-running prompt found for this checkpoint")


async def test_killed_stage_has_its_requests_replayed_and_the_other_pipeline_serves(deployment, tiny_model):
    prompts = long_prompts(tiny_model, 300, 6)
    async with await Client.connect(deployment.address) as client:
        streams = []
        for prompt in prompts:  # until both pipelines have a request (the broker picks the faster one first)
            streams.append(client.stream(prompt_ids=prompt, max_new_tokens=300, timeout_s=60))
            await asyncio.wait_for(streams[-1].__anext__(), 30)
            in_flight = {p.id: p.in_flight for p in (await client.status()).pipelines}
            if min(in_flight.values()) >= 1:
                break
        assert min(in_flight.values()) >= 1, in_flight
        os.kill(deployment.pid("p0s1:0"), signal.SIGKILL)
        killed_at = time.monotonic()

        async def drain(stream):
            return [t async for t in stream]

        outcomes = await asyncio.wait_for(asyncio.gather(*(drain(s) for s in streams), return_exceptions=True), 50)
        # p0's requests were replayed on p1 from where they were: every one finishes, as HF says
        for prompt, outcome in zip(prompts, outcomes):
            assert outcome == hf_greedy(tiny_model, prompt, 300)[1:], outcome  # the first token came before
        assert time.monotonic() - killed_at < 40, "replayed well before the 60 s deadline"
        assert (await client.status()).replayed >= in_flight["p0"]
        # the other pipeline goes on serving, including new requests
        result = await asyncio.wait_for(client.generate(prompt_ids=[4, 5, 6], max_new_tokens=10), 30)
        assert result.token_ids == hf_greedy(tiny_model, [4, 5, 6], 10) and result.pipeline == "p1"
        status = await client.status()
        assert [p.healthy for p in status.pipelines] == [False, True]
