"""Lossless serving (issue 14) on real processes: two pipelines of different shapes (one with TP 2), 16
concurrent streams of different lengths, greedy and seeded; a stage SIGKILLed, a stage SIGSTOPped, a TP
follower SIGKILLed, the broker killed and started again. Every request completes, greedy outputs equal
Hugging Face, seeded ones equal the same request run without a fault, and no stream sees a gap or a
duplicate (the client refuses gaps and drops duplicates; each test also checks the tokens it got)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest

from hexgen_zmq.serving.client import Client, GenerationError
from tests.support import local_deployment, wait_for

# p0: [TP 2 | TP 1], p1: [TP 1 | TP 1]
LAYOUT = [[(0, 3, 2), (3, 6, 1)], [(0, 2, 1), (2, 6, 1)]]


def fast_tp_timeout(spec: dict) -> None:
    """TP ranks time out after 3 s; p1's cache holds about five requests of the workload, so the broker,
    which favours the faster pipeline, sends the rest to p0 and both pipelines hold requests."""
    for pipeline in spec["pipelines"]:
        for stage in pipeline["stages"]:
            stage["tp_timeout_s"] = 3.0
    for stage in spec["pipelines"][1]["stages"]:
        stage["kv_cache_tokens"] = 1024


@pytest.fixture(scope="module")
def deployment(tiny_model, tmp_path_factory):
    with local_deployment(tmp_path_factory.mktemp("lossless"), tiny_model, LAYOUT, edit=fast_tp_timeout,
                          request_timeout_s=120, stage_timeout_s=1.5, client_timeout_s=5.0) as local:
        yield local


def workload() -> list[dict]:
    """16 requests: 12 greedy of different prompt and output lengths, 4 seeded sampled ones."""
    rng = random.Random(21)
    jobs = []
    for i in range(16):
        prompt = [rng.randrange(3, 490) for _ in range(rng.randint(2, 40))]
        job = dict(prompt_ids=prompt, max_new_tokens=rng.randint(60, 160), ignore_eos=True, timeout_s=120)
        if i % 4 == 3:
            job.update(temperature=0.8, top_p=0.95, seed=1000 + i)
        jobs.append(job)
    return jobs


@pytest.fixture(scope="module")
def expected(deployment, tiny_model) -> list[list[int]]:
    """What each request gives without a fault: HF greedy, and for the seeded ones a run on the healthy
    deployment."""
    async def reference():
        async with Client.connect(deployment.address) as client:
            return await asyncio.wait_for(asyncio.gather(
                *(client.generate(**job) for job in workload() if "seed" in job)), 120)

    seeded = iter(asyncio.run(reference()))
    out = []
    for job in workload():
        if "seed" in job:
            out.append(next(seeded).token_ids)
        else:
            model = hf_greedy_ignoring_eos(tiny_model, job["prompt_ids"], job["max_new_tokens"])
            out.append(model)
    return out


def hf_greedy_ignoring_eos(model_path, prompt: list[int], n: int) -> list[int]:
    """The oracle for ignore_eos: Hugging Face's model, greedy, n tokens whatever they are (generate's
    min_new_tokens would instead forbid EOS, which changes the choice)."""
    import torch

    from tests.support import hf_model

    model = hf_model(str(model_path))
    tokens = []
    with torch.inference_mode():
        out = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


async def healthy(client: Client) -> bool:
    try:
        return all(p.ready and p.healthy for p in (await client.status(timeout_s=2)).pipelines)
    except TimeoutError:
        return False


async def run_with_fault(deployment, expected, fault, client: Client | None = None, greedy_only: bool = False) -> float:
    """Start the 16 streams, wait until both pipelines hold some and every stream has a token, apply
    `fault()`, and check that every stream completes with the expected tokens. Returns the seconds from
    the fault to the last stream's end."""
    own = client is None
    client = client or await Client.connect(deployment.address)
    try:
        jobs = workload()
        if greedy_only:
            expected = [want for job, want in zip(jobs, expected) if "seed" not in job]
            jobs = [job for job in jobs if "seed" not in job]
        streams = [client.stream(**job) for job in jobs]
        got = [[await asyncio.wait_for(anext(s), 60)] for s in streams]
        status = await client.status()
        assert all(p.in_flight for p in status.pipelines), [p.in_flight for p in status.pipelines]
        await fault()
        faulted = time.monotonic()

        async def drain(stream, tokens):
            async for token in stream:
                tokens.append(token)
            return tokens

        await asyncio.wait_for(asyncio.gather(*(drain(s, t) for s, t in zip(streams, got))), 150)
        for job, tokens, want in zip(jobs, got, expected):
            assert tokens == want, job
        return time.monotonic() - faulted
    finally:
        if own:
            await client.close()


async def test_a_killed_stage_loses_no_request_and_rejoins_when_restarted(deployment, expected):
    async def kill():
        os.kill(deployment.pid("p1s1:0"), signal.SIGKILL)

    async with Client.connect(deployment.address) as client:
        await run_with_fault(deployment, expected, kill, client)
        status = await client.status()
        assert status.replayed >= 1 and status.gave_up == 0
        deployment.restart("p1s1:0")
        await wait_for(lambda: healthy(client), timeout_s=90, interval_s=0.3)
        assert (await client.status()).pipelines[1].restarts >= 1


async def test_a_stopped_stage_loses_no_request(deployment, expected):
    pid = deployment.pid("p1s0:0")

    async def stop():
        os.kill(pid, signal.SIGSTOP)

    try:
        async with Client.connect(deployment.address) as client:
            await run_with_fault(deployment, expected, stop, client)
    finally:
        os.kill(pid, signal.SIGCONT)
    async with Client.connect(deployment.address) as client:
        await wait_for(lambda: healthy(client), timeout_s=60, interval_s=0.3)


@pytest.mark.parametrize("rank", [1, 0], ids=["follower", "leader"])
async def test_a_killed_tp_rank_loses_no_request_and_its_stage_rejoins(deployment, expected, rank):
    async def kill():
        os.kill(deployment.pid(f"p0s0:{rank}"), signal.SIGKILL)

    async with Client.connect(deployment.address) as client:
        await run_with_fault(deployment, expected, kill, client)
        # the stage's group is broken: both ranks start again, as a supervisor would start them
        deployment.restart("p0s0:0")
        deployment.restart("p0s0:1")
        await wait_for(lambda: healthy(client), timeout_s=120, interval_s=0.3)


async def test_a_broker_restart_loses_no_stream(deployment, expected):
    async def restart():
        deployment.restart("broker")

    async with Client.connect(deployment.address) as client:
        await run_with_fault(deployment, expected, restart, client)
    assert deployment.dead() is None


async def test_with_every_pipeline_down_requests_wait_then_fail_at_their_deadline(deployment):
    pids = [deployment.pid(name) for name in ("p0s1:0", "p1s0:0")]  # stages without TP: they can resume
    async with Client.connect(deployment.address) as client:
        await wait_for(lambda: healthy(client), timeout_s=60, interval_s=0.3)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            async def down():
                return not any(p.healthy for p in (await client.status()).pipelines)

            await wait_for(down, timeout_s=10)
            start = time.monotonic()
            with pytest.raises(GenerationError) as err:
                await asyncio.wait_for(client.generate(prompt_ids=[1, 2, 3], max_new_tokens=5, timeout_s=3), 20)
            assert err.value.code == "no_pipeline" and time.monotonic() - start >= 2.5
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        await wait_for(lambda: healthy(client), timeout_s=60, interval_s=0.3)


@pytest.fixture(scope="module")
def patient(tiny_model, tmp_path_factory):
    """A deployment whose broker waits 60 s for heartbeats: only a stage's new incarnation can tell it that
    the stage restarted."""
    with local_deployment(tmp_path_factory.mktemp("patient"), tiny_model, [[(0, 3, 1), (3, 6, 1)], [(0, 6, 1)]],
                          request_timeout_s=120, stage_timeout_s=60.0, progress_timeout_s=60.0) as local:
        yield local


async def test_a_stage_restarted_inside_the_heartbeat_timeout_is_recognised(patient, expected):
    async def kill_and_restart():
        patient.restart("p0s1:0")  # SIGKILL, then the same command again at once

    async with Client.connect(patient.address) as client:
        elapsed = await run_with_fault(patient, expected, kill_and_restart, client, greedy_only=True)
        assert elapsed < 50, "recognised by its incarnation, long before the 60 s timeouts"
        await wait_for(lambda: healthy(client), timeout_s=60, interval_s=0.3)
        assert (await client.status()).replayed >= 1
    assert "stage p0s1 restarted" in (patient.log_dir / "broker.log").read_text()
