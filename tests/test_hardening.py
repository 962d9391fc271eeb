"""No request and no frame may take a pipeline down (issue 13), on real processes: hostile parameters on a TP
pipeline and a plain one, degenerate headers to every socket (counted), a broker restart with requests in
flight, a huge text prompt, a slow step and a lost micro-batch, and the client's own failure modes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import msgspec
import pytest
import torch
import zmq

from hexgen_zmq.serving.client import Client, GenerationError
from hexgen_zmq.wire.messages import (BrokerEpoch, ErrorEvent, GenerateRequest, MicroBatch, NewRequest, Ping,
                                 SamplingParams, Segment, Submit, TokenEvent, decode_control, encode_control)
from hexgen_zmq.wire.codec import encode
from tests.support import hf_greedy, local_deployment, wait_for

# p0: [TP 2 | TP 1], p1: [TP 1 | TP 1]
LAYOUT = [[(0, 3, 2), (3, 6, 1)], [(0, 2, 1), (2, 6, 1)]]
ORACLE_PROMPTS = [[9, 8, 7], [1, 2, 3, 4, 5, 6], [100, 3]]


@pytest.fixture(scope="module")
def deployment(tiny_model, tmp_path_factory):
    with local_deployment(tmp_path_factory.mktemp("hardening"), tiny_model, LAYOUT, request_timeout_s=60,
                          stage_timeout_s=1.5, client_timeout_s=2.0) as local:
        yield local


async def status_of(client: Client) -> dict:
    return {p.id: p for p in (await client.status()).pipelines}


async def oracle_round(deployment, tiny_model) -> None:
    """Requests still equal Hugging Face, both pipelines are healthy, and no process has exited."""
    async with Client.connect(deployment.address) as client:
        results = await asyncio.wait_for(asyncio.gather(
            *(client.generate(prompt_ids=p, max_new_tokens=10) for p in ORACLE_PROMPTS * 3)), 90)
        assert all(p.healthy for p in (await client.status()).pipelines)
    for prompt, result in zip(ORACLE_PROMPTS * 3, results):
        assert result.token_ids == hf_greedy(tiny_model, prompt, 10)
    assert deployment.dead() is None


HOSTILE = [  # (sampling parameters, the error code, or None when it must sample)
    (dict(temperature=1e-40), None),
    (dict(temperature=5e-324), None),
    (dict(temperature=1e-30, top_k=1), None),
    (dict(temperature=100.0), None),
    (dict(temperature=0.7, top_p=1e-300), None),
    (dict(temperature=0.7, top_k=2**62), None),
    (dict(temperature=0.7, top_k=1, top_p=1e-9), None),
    (dict(temperature=0.9, seed=2**63 - 1), None),
    (dict(temperature=0.9, seed=0), None),
    (dict(temperature=0.9, seed=2**64 - 1), "invalid_request"),
    (dict(temperature=0.9, seed=-1), "invalid_request"),
    (dict(temperature=float("inf")), "invalid_request"),
    (dict(temperature=float("nan")), "invalid_request"),
    (dict(temperature=101.0), "invalid_request"),
    (dict(top_p=float("nan"), temperature=0.5), "invalid_request"),
    (dict(top_p=0.0, temperature=0.5), "invalid_request"),
    (dict(top_k=-(2**62), temperature=0.5), "invalid_request"),
    (dict(max_new_tokens=2**63 - 1), "prompt_too_long"),
    (dict(max_new_tokens=-(2**63)), "invalid_request"),
    (dict(stop_token_ids=[2**40]), "invalid_request"),
    (dict(timeout_s=-1.0), "invalid_request"),
    (dict(timeout_s=float("nan")), "invalid_request"),
    (dict(timeout_s=float("inf")), "invalid_request"),
]


async def send_raw(address: str, request: GenerateRequest, timeout_s: float = 30) -> list:
    """Send one request through a bare DEALER (no client-side checks) and collect events until it ends."""
    import zmq.asyncio

    ctx = zmq.asyncio.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(address)
    events = []
    try:
        await dealer.send_multipart(encode_control(request))
        async with asyncio.timeout(timeout_s):
            while True:
                if not await dealer.poll(500):
                    await dealer.send_multipart(encode_control(Ping()))  # still here
                    continue
                message = decode_control(await dealer.recv_multipart())
                for event in getattr(message, "events", (message,)):
                    if not isinstance(event, (TokenEvent, ErrorEvent)):
                        continue  # a Pong
                    events.append(event)
                    if isinstance(event, ErrorEvent) or getattr(event, "finished", False):
                        return events
    finally:
        dealer.close(0)


def hostile_request(client_request_id: int, params: dict) -> GenerateRequest:
    fields = {k: v for k, v in params.items() if k != "timeout_s"}
    return GenerateRequest(client_request_id, SamplingParams(**{"max_new_tokens": 8, **fields}),
                           prompt_ids=[1, 2, 3, 4], timeout_s=params.get("timeout_s"))


async def test_hostile_parameters_end_alone_and_the_batch_goes_on(deployment, tiny_model):
    """Every hostile request gets its tokens or its own error; oracle requests sent with them (so batched
    with them, on both pipelines, the TP one and the plain one) still equal Hugging Face; no process exits."""
    async with Client.connect(deployment.address) as client:
        neighbours = [client.generate(prompt_ids=p, max_new_tokens=12) for p in ORACLE_PROMPTS * 2]
        hostile = [send_raw(deployment.address, hostile_request(1000 + i, params))
                   for i, (params, _) in enumerate(HOSTILE * 2)]
        outcomes = await asyncio.wait_for(asyncio.gather(*neighbours, *hostile), 90)
    for prompt_ids, result in zip(ORACLE_PROMPTS * 2, outcomes):
        assert result.token_ids == hf_greedy(tiny_model, prompt_ids, 12)
    greedy = hf_greedy(tiny_model, [1, 2, 3, 4], 8)
    served = set()
    for (params, code), events in zip(HOSTILE * 2, outcomes[len(neighbours):]):
        last = events[-1]
        if code is not None:
            assert isinstance(last, ErrorEvent) and last.code == code, (params, last)
            continue
        assert not isinstance(last, ErrorEvent), (params, last)
        served.add(last.pipeline)
        tokens = [t for e in events for t in e.tokens]
        assert 1 <= len(tokens) <= 8
        if params.get("temperature", 1) < 1e-20 or params.get("top_k") == 1:  # the limit of sampling is greedy
            assert tokens == greedy[:len(tokens)], params
    assert served == {"p0", "p1"}
    assert deployment.dead() is None
    await oracle_round(deployment, tiny_model)


def degenerate_frames(hidden: int) -> list[list[bytes]]:
    """Headers that pass a naive byte-count check or name what does not exist."""
    raw = msgspec.msgpack.encode
    new = NewRequest(5, 10, SamplingParams(max_new_tokens=4))
    return [
        [raw([1, ["MicroBatch", 1, []], [["float32", [0, 2**63 - 1]]]]), b""],  # zero beside huge
        [raw([1, ["MicroBatch", 1, []], [["float32", [0, 2**31 - 1, 2**31 - 1, 2**31 - 1]]]]), b""],
        [raw([1, ["MicroBatch", 1, []], [["float32", [1] * 40]]]), b"\x00" * 4],  # too many dimensions
        [raw([1, ["MicroBatch", 2**64 - 1, []], []])],  # id past int64
        [raw([1, ["MicroBatch", -5, []], []])],  # negative id
        [raw([1, ["MicroBatch", 1, [[-1, 0, 1, True]]], [["float32", [1, hidden]]]]), b"\x00" * (4 * hidden)],
        [raw([1, ["Submit", 2**63, [1, 2], [4]], []])],
        [raw([1, ["Submit", 3, [-7, 2], [4]], []])],
        [raw([1, ["Cancel", [2**64 - 1]], []])],
        [raw([1, ["Feedback", 1, [[1, -9]]], []])],  # token below -1
        [raw([1, ["Tokens", "p0", [[1, 2**40]]], []])],
        [raw([1, ["Heartbeat", "p0s0", -1], []])],
        # more segments than tokens, zero-token and duplicate segments
        [bytes(f) for f in encode(MicroBatch(2, [Segment(5, 0, 1, True), Segment(6, 0, 1, True)], [new]),
                                  [torch.zeros(1, hidden)])],
        [bytes(f) for f in encode(MicroBatch(3, [Segment(5, 0, 0, True)], [new]), [torch.zeros(0, hidden)])],
        [bytes(f) for f in encode(MicroBatch(4, [Segment(5, 0, 1, True), Segment(5, 1, 1, True)], [new]),
                                  [torch.zeros(2, hidden)])],
        [bytes(f) for f in encode(MicroBatch(5, [Segment(424242, 0, 2, True)]), [torch.zeros(2, hidden)])],
        # a request announced with an absurd size, and one with a segment that skips positions
        [bytes(f) for f in encode(MicroBatch(6, [Segment(7, 0, 1, True)], [NewRequest(7, 2**31 - 1, SamplingParams())]),
                                  [torch.zeros(1, hidden)])],
        [bytes(f) for f in encode(MicroBatch(7, [Segment(8, 40, 1, True)], [NewRequest(8, 64, SamplingParams())]),
                                  [torch.zeros(1, hidden)])],
        [bytes(f) for f in encode(MicroBatch(8, [Segment(9, 0, 1, True)],
                                             [NewRequest(9, 20, SamplingParams(temperature=float("nan")))]),
                                  [torch.zeros(1, hidden)])],
        encode_control(Submit(11, [1, 2], SamplingParams(), timeout_s=float("nan"))),
        encode_control(Submit(12, [1, 2], SamplingParams(max_new_tokens=2**40))),
    ]


async def test_degenerate_headers_to_every_socket_are_counted_and_change_nothing(deployment, tiny_model):
    from hexgen_zmq.model.info import read_model_info

    hidden = read_model_info(tiny_model).hidden_size
    spec = deployment.deployment
    frames = degenerate_frames(hidden)
    async with Client.connect(deployment.address) as client:
        before = await client.status()
        ctx = zmq.Context()
        try:
            for target in [s.inbound for p in spec.pipelines for s in p.stages] + [spec.broker.results]:
                push = ctx.socket(zmq.PUSH)
                push.setsockopt(zmq.LINGER, 5000)
                push.connect(target)
                for message in frames:
                    push.send_multipart(message)
                push.close()
        finally:
            ctx.term()

        def counted(reply) -> dict[str, int]:
            stages = {stage: n for p in reply.pipelines for stage, n in p.bad_messages.items()}
            return {**stages, "broker": reply.bad_messages}

        start = counted(before)

        async def all_counted():
            now = counted(await client.status())
            return now if all(now[k] - start.get(k, 0) >= len(frames) for k in now) else None

        # Every frame is refused and counted, by every stage and by the broker: none was silently taken in.
        await wait_for(all_counted, timeout_s=20)
        assert len(counted(await client.status())) == 5
    assert deployment.dead() is None
    await oracle_round(deployment, tiny_model)


async def test_concurrent_status_calls_each_get_their_answer(deployment):
    async with Client.connect(deployment.address) as client:
        replies = await asyncio.wait_for(asyncio.gather(*(client.status() for _ in range(20))), 20)
    assert len(replies) == 20 and all(len(r.pipelines) == 2 for r in replies)


async def test_a_silent_client_is_told_its_requests_were_cancelled(deployment):
    """A bare DEALER that never pings: after client_timeout_s its request ends with an error event, and
    every stage frees its cache."""
    import zmq.asyncio

    dealer = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(deployment.address)
    try:
        # enough work that it cannot all finish inside client_timeout_s, however idle the machine is
        for i in range(16):
            await dealer.send_multipart(encode_control(GenerateRequest(
                i, SamplingParams(max_new_tokens=480, ignore_eos=True), prompt_ids=[3, 4, i + 1], timeout_s=60)))
        finished = 0
        async with asyncio.timeout(20):
            while True:
                message = decode_control(await dealer.recv_multipart())
                events = getattr(message, "events", (message,))
                errors = [e for e in events if isinstance(e, ErrorEvent)]
                if errors:
                    break
                finished += sum(1 for e in events if getattr(e, "finished", False))
                assert finished < 16, "every request finished before the client counted as gone"
        assert errors[0].code == "cancelled" and "no word from the client" in errors[0].message
    finally:
        dealer.close(0)
    async with Client.connect(deployment.address) as client:
        async def freed():
            return all(sum(p.kv_blocks_used.values()) == 0 for p in (await client.status()).pipelines)

        await wait_for(freed, timeout_s=10)


async def test_a_huge_text_prompt_does_not_stall_the_broker(deployment, tiny_model):
    """Tokenizing ~4 MB of text takes seconds: off the broker's loop, heartbeats are read meanwhile (the
    stage timeout here is 1.5 s), a concurrent request streams, and the huge one is refused by its size."""
    async with Client.connect(deployment.address) as client:
        huge = asyncio.create_task(client.generate(prompt="the quick brown fox " * 190_000, max_new_tokens=4))
        result = await asyncio.wait_for(client.generate(prompt_ids=[9, 8, 7], max_new_tokens=40), 30)
        assert result.token_ids == hf_greedy(tiny_model, [9, 8, 7], 40)
        with pytest.raises(GenerationError) as err:
            await asyncio.wait_for(huge, 60)
        assert err.value.code == "prompt_too_long"
        assert all(p.healthy for p in (await status_of(client)).values())


async def test_a_request_sent_before_the_broker_starts_is_answered(tiny_model, tmp_path):
    """The client connects and sends while nothing listens; the deployment then starts; the request waits
    in the broker's queue until the pipelines are ready and gets its tokens."""
    from hexgen_zmq.operations.launcher import LocalDeployment
    from tests.support import write_deployment

    path = write_deployment(tmp_path, tiny_model, [[(0, 6, 1)]], request_timeout_s=120)
    local = LocalDeployment(path, log_dir=tmp_path / "logs", threads=1)
    async with Client.connect(local.address) as client:
        early = asyncio.create_task(client.generate(prompt_ids=[4, 5, 6], max_new_tokens=8))
        await asyncio.sleep(0.5)
        assert not early.done()
        try:
            await asyncio.to_thread(local.start, 120)
            result = await asyncio.wait_for(early, 60)
        finally:
            local.stop()
    assert result.token_ids == hf_greedy(tiny_model, [4, 5, 6], 8)


def test_a_client_dropped_without_close_does_not_hang_its_process(tmp_path):
    """A client left open after a timed-out request, then garbage-collected in the middle of other work."""
    script = tmp_path / "drop.py"
    script.write_text(
        "import asyncio, gc\n"
        "from hexgen_zmq.serving.client import Client, GenerationError\n"
        "from hexgen_zmq.wire.sockets import free_port\n"
        "async def main():\n"
        "    client = await Client.connect(f'tcp://127.0.0.1:{free_port()}', silence_s=0.2)\n"
        "    try:\n"
        "        await client.generate(prompt_ids=[1], timeout_s=0.2)\n"
        "    except GenerationError as exc:\n"
        "        print('first request:', exc.code)\n"
        "asyncio.run(main())\n"
        "gc.collect()\n"
        "async def later():\n"
        "    await asyncio.sleep(0.1)\n"
        "asyncio.run(later())\n"
        "print('done')\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "first request: timeout" in out.stdout and "done" in out.stdout, out


async def test_a_restarted_broker_never_sends_an_old_requests_tokens_to_a_new_client(deployment, tiny_model):
    """Requests in flight when the broker is killed are orphans: the restarted broker's ids cannot collide
    with theirs, and the first stages drop them once the new incarnation speaks. The orphans that must
    outlive the restart are made deterministic: while no broker runs, an incarnation between the old and
    the new one submits requests with small ids (what a restarted broker counting from 1 would reuse) that
    wait at the first stages (a KV budget of one block holds them back)."""
    prompts = [[7, i, 9] for i in range(6)]
    old = await Client.connect(deployment.address)
    streams = [old.stream(prompt_ids=p, max_new_tokens=480, ignore_eos=True, timeout_s=120) for p in prompts]
    for stream in streams:
        await asyncio.wait_for(anext(stream), 30)
    deployment.restart("broker")
    between = time.time_ns() // 1000
    ctx = zmq.Context()
    try:
        for pipeline in deployment.deployment.pipelines:
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 5000)
            push.connect(pipeline.stages[0].inbound)
            push.send_multipart(encode_control(BrokerEpoch(between)))
            for request_id in range(1, 7):
                push.send_multipart(encode_control(Submit(request_id, [5, 6, request_id], SamplingParams(
                    max_new_tokens=40), timeout_s=120, kv_budget_blocks=1, broker=between)))
            push.close()
    finally:
        ctx.term()
    try:
        async with Client.connect(deployment.address) as client:
            async def serving():
                try:
                    return all(p.ready and p.healthy for p in (await client.status(timeout_s=2)).pipelines)
                except TimeoutError:  # the new broker is still starting
                    return False

            await wait_for(serving, timeout_s=60, interval_s=0.3)
            results = await asyncio.wait_for(asyncio.gather(
                *(client.generate(prompt_ids=p, max_new_tokens=12) for p in ORACLE_PROMPTS * 2)), 60)
            for prompt, result in zip(ORACLE_PROMPTS * 2, results):
                assert result.token_ids == hf_greedy(tiny_model, prompt, 12)

            # The old client's streams went on under the new broker (resubmitted): end them, so that what
            # is left in the caches would be the orphans'.
            for stream in streams:
                await stream.aclose()
            streams = []

            async def orphans_freed():
                return all(sum(p.kv_blocks_used.values()) == 0 for p in (await client.status()).pipelines)

            await wait_for(orphans_freed, timeout_s=30)
    finally:
        for stream in streams:
            await stream.aclose()
        await old.close()
    for stage in ("p0s0", "p1s0"):
        assert "broker restarted: dropping 6 requests" in (deployment.log_dir / f"{stage}-0.log").read_text()
    assert deployment.dead() is None


@pytest.fixture(scope="module")
def faulty(tiny_model, tmp_path_factory):
    """One pipeline [TP 2 | TP 1] whose TP leader makes its first prompt step 3 s slower than it is, and whose
    last stage drops its 60th micro-batch."""
    env = {"HEXGEN_FAULT_SLOW_STEP": "p0s0:3", "HEXGEN_FAULT_DROP_BATCH": "p0s1:60"}
    with local_deployment(tmp_path_factory.mktemp("faulty"), tiny_model, [[(0, 3, 2), (3, 6, 1)]], env=env,
                          request_timeout_s=60, stage_timeout_s=1.5, progress_timeout_s=3.0) as local:
        yield local


async def test_a_step_longer_than_the_heartbeat_timeout_is_not_a_death(faulty, tiny_model):
    async with Client.connect(faulty.address) as client:
        start = time.monotonic()
        result = await asyncio.wait_for(client.generate(prompt_ids=[5, 6, 7], max_new_tokens=10), 60)
        assert time.monotonic() - start > 3, "the slow step ran"
        assert result.token_ids == hf_greedy(tiny_model, [5, 6, 7], 10)
        assert all(p.healthy for p in (await status_of(client)).values())
    assert "fault injected: this step takes" in (faulty.log_dir / "p0s0-0.log").read_text()
    assert faulty.dead() is None


async def test_a_lost_micro_batch_is_detected_by_the_watchdog_and_replayed(faulty, tiny_model):
    from tests.test_robustness import long_prompts

    prompt = long_prompts(tiny_model, 120, 1)[0]
    async with Client.connect(faulty.address) as client:
        start = time.monotonic()
        result = await asyncio.wait_for(client.generate(prompt_ids=prompt, max_new_tokens=120), 40)
        elapsed = time.monotonic() - start
        assert result.token_ids == hf_greedy(tiny_model, prompt, 120)
        assert "fault injected: dropping micro-batch" in (faulty.log_dir / "p0s1-0.log").read_text()
        broker_log = (faulty.log_dir / "broker.log").read_text()
        assert "no progress for 3 s" in broker_log and "replayed as" in broker_log
        assert elapsed < 3.0 + 10.0, f"{elapsed:.1f} s: the watchdog's bound is 3 s of silence"
        status = await client.status()
        assert status.replayed == 1 and all(p.healthy for p in status.pipelines)

        async def freed():
            return all(sum(p.kv_blocks_used.values()) == 0 for p in (await client.status()).pipelines)

        await wait_for(freed, timeout_s=10)
    assert faulty.dead() is None
