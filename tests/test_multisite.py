"""Across emulated datacenters: three hosts in two regions (network namespaces, a shaped link with real
latency between the regions), one supervisor per host (`hexgen-zmq up F --host NAME`), the broker on one
of them and the test client outside. A pipeline crosses the regions; output equals the oracle; a killed
stage is restarted by its supervisor; the layout is redeployed under load and back, by replacing the file;
an invalid file is refused while the old layout serves; a whole host is lost and its requests replay.

The tests of this module share one set of hosts and run in order.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hexgen_zmq.serving.client import Client, GenerationError
from tests.support import hf_greedy
from tools.site_deployment import SiteDeployment, layout, serving, status
from tools.sites import Sites, unavailable_reason

LATENCY_MS = 20.0
TOPOLOGY = {"regions": {"eu": ["a", "b"], "us": ["c"]},
            "links": [{"a": "eu", "b": "us", "mbit": 300, "latency_ms": LATENCY_MS}]}
pytestmark = [pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason())),
              pytest.mark.timeout(400)]

# pipelines as {id: [(host, first layer, end layer), ...]}
FIRST = {"p0": [("a", 0, 3), ("c", 3, 6)], "p1": [("b", 0, 6)]}
SECOND = {"p0": [("a", 0, 2), ("c", 2, 6)], "p2": [("c", 0, 6)]}  # p0 reshaped, p1 removed, p2 added
PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7], [2, 7, 1, 8], [6, 6, 6], [1, 4, 1, 4, 2, 1, 3, 5]]


class Cluster(SiteDeployment):
    def write(self, pipelines: dict, **broker) -> Path:
        return self.redeploy(pipelines, **broker)


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("multisite")
    with Sites(TOPOLOGY, prefix="hxms", subnet="10.243.0.0/16") as sites:
        cluster = Cluster(sites, tiny_model, directory, FIRST)
        try:
            asyncio.run(serving(cluster, set(FIRST), timeout_s=240))
            yield cluster
        finally:
            cluster.stop()


async def run_streams(cluster: Cluster, n: int, max_new_tokens: int, during=None, timeout_s: float = 200):
    """n concurrent greedy streams; `during()` runs once every stream has its first token. Returns, per
    stream, (prompt, tokens, pipeline)."""
    async with await cluster.connect() as client:
        started = asyncio.Event()
        first_tokens = 0

        async def one(i: int):
            nonlocal first_tokens
            prompt = PROMPTS[i % len(PROMPTS)] + [i % 50 + 1]
            tokens = []
            async for token in client.stream(prompt_ids=prompt, max_new_tokens=max_new_tokens):
                if not tokens:
                    first_tokens += 1
                    if first_tokens == n:
                        started.set()
                tokens.append(token)
            return prompt, tokens

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        if during is not None:
            await asyncio.wait_for(started.wait(), timeout_s)
            await during()
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout_s)


def assert_oracle(model: str, results, max_new_tokens: int) -> None:
    for prompt, tokens in results:
        assert tokens == hf_greedy(model, prompt, max_new_tokens), f"prompt {prompt}"


def process_of(reply, host: str, name: str):
    [report] = [h for h in reply.hosts if h.host == host]
    return {p.name: p for p in report.processes}[name]


def test_a_pipeline_across_regions_serves_the_oracle_over_the_shaped_link(cluster):
    before = cluster.sites.link_counters()

    async def ask():
        async with await cluster.connect() as client:
            return await asyncio.wait_for(asyncio.gather(
                *(client.generate(prompt_ids=p, max_new_tokens=12) for p in PROMPTS * 2)), 120)

    results = asyncio.run(ask())
    for prompt, result in zip(PROMPTS * 2, results):
        assert result.token_ids == hf_greedy(cluster.model, prompt, 12)
    across = [r for r in results if r.pipeline == "p0"]
    assert across, "the cross-region pipeline served some requests"
    after = cluster.sites.link_counters()
    hidden_bytes = 128 * 4  # one token's hidden state, float32
    sent = sum(len(p) + len(r.token_ids) for p, r in zip(PROMPTS * 2, results) if r.pipeline == "p0") * hidden_bytes
    assert after[("eu", "us")].bytes - before[("eu", "us")].bytes >= sent * 0.9, "activations crossed the link"
    assert after[("us", "eu")].packets > before[("us", "eu")].packets  # tokens and feedback came back
    # every token of the cross-region pipeline waits for the hop there and the feedback back
    for result in across:
        if len(result.token_ids) > 2:
            assert (result.total_s - result.ttft_s) / (len(result.token_ids) - 1) >= 2 * LATENCY_MS / 1000 * 0.9
    reply = asyncio.run(status(cluster))
    assert {h.host for h in reply.hosts} == {"a", "b", "c"}
    assert all(p.state == "running" for h in reply.hosts for p in h.processes)


def test_a_killed_stage_is_restarted_by_its_supervisor_and_no_request_is_lost(cluster):
    victim = process_of(asyncio.run(status(cluster)), "c", "p0s1:0")

    async def kill():
        os.kill(victim.pid, signal.SIGKILL)

    results = run_streams_sync(cluster, 8, 16, kill)
    assert_oracle(cluster.model, results, 16)

    async def restarted():
        deadline = time.monotonic() + 120
        while True:
            reply = await serving(cluster, set(FIRST), 120)
            process = process_of(reply, "c", "p0s1:0")
            if process.pid != victim.pid and process.state == "running":
                return reply, process
            assert time.monotonic() < deadline, f"not restarted: {process}"
            await asyncio.sleep(0.25)

    reply, process = asyncio.run(restarted())
    assert process.restarts == victim.restarts + 1 and process.last_exit == -signal.SIGKILL
    assert all(p.ready and p.healthy for p in reply.pipelines)


def run_streams_sync(cluster: Cluster, n: int, max_new_tokens: int, during=None):
    return asyncio.run(run_streams(cluster, n, max_new_tokens, during))


def test_redeploys_under_load_lose_nothing_and_status_shows_the_new_layout(cluster):
    timings = {}

    async def redeploy_to(pipelines: dict, name: str):
        start = time.monotonic()
        new = cluster.write(pipelines)
        from hexgen_zmq.operations.deployment import file_version

        await serving(cluster, set(pipelines), 240, file_version(new.read_bytes()))
        timings[name] = time.monotonic() - start

    results = run_streams_sync(cluster, 24, 24, lambda: redeploy_to(SECOND, "second"))
    assert_oracle(cluster.model, results, 24)
    reply = asyncio.run(status(cluster))
    p0 = next(p for p in reply.pipelines if p.id == "p0")
    assert {p.id for p in reply.pipelines} == {"p0", "p2"} and p0.stages_ready == ["p0s0", "p0s1"]
    assert reply.redeploys >= 1 and reply.requests_failed == {}
    names = {p.name for h in reply.hosts for p in h.processes}
    assert "p1s0:0" not in names and {"p0s0:0", "p0s1:0", "p2s0:0"} <= names
    results = run_streams_sync(cluster, 24, 24, lambda: redeploy_to(FIRST, "back"))
    assert_oracle(cluster.model, results, 24)
    reply = asyncio.run(status(cluster))
    assert {p.id for p in reply.pipelines} == {"p0", "p1"} and reply.requests_failed == {}
    print(f"\nredeploy: file swap -> new layout serving: {timings['second']:.1f} s, back: {timings['back']:.1f} s")


def test_an_invalid_new_file_is_refused_and_the_running_layout_keeps_serving(cluster):
    bad = cluster.dir / "bad.yaml"
    spec = layout(cluster.sites, cluster.model, FIRST)
    spec["pipelines"][0]["stages"][1]["layers"] = [4, 6]
    bad.write_text(yaml.safe_dump(spec))
    before = cluster.config.read_bytes()
    result = subprocess.run([sys.executable, "-m", "hexgen_zmq.cli", "redeploy", str(cluster.config), str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "pipelines[0].stages[1].layers" in result.stderr
    assert cluster.config.read_bytes() == before
    # a configuration tool that swaps the file without checking it: every process refuses it
    swap = cluster.dir / ".swap.yaml"
    swap.write_bytes(bad.read_bytes())
    os.replace(swap, cluster.config)
    try:
        async def refused():
            deadline = time.monotonic() + 30
            while True:
                reply = await status(cluster)
                if reply.file_error and all(h.file_error for h in reply.hosts):
                    return reply
                assert time.monotonic() < deadline, "the invalid file was not reported"
                await asyncio.sleep(0.25)

        reply = asyncio.run(refused())
        assert "pipelines[0].stages[1].layers" in reply.file_error
        assert all("pipelines[0].stages[1].layers" in h.file_error for h in reply.hosts)
        assert {p.id for p in reply.pipelines if p.ready and p.healthy} == set(FIRST)
        results = run_streams_sync(cluster, 6, 8)
        assert_oracle(cluster.model, results, 8)
    finally:
        swap.write_bytes(before)
        os.replace(swap, cluster.config)


def test_a_client_without_a_key_or_with_an_unknown_one_gets_a_clear_error(cluster, tmp_path):
    from hexgen_zmq.wire.security import write_keys

    _, stranger = write_keys("stranger", tmp_path)
    server_key = cluster.credentials["server_key"]

    async def attempt(**credentials):
        async with await Client.connect(cluster.address, **credentials) as client:
            with pytest.raises(GenerationError) as err:
                await asyncio.wait_for(client.generate(prompt_ids=[1, 2, 3], max_new_tokens=4), 20)
            return err.value

    for credentials in ({}, {"keys": str(stranger), "server_key": server_key}):
        error = asyncio.run(attempt(**credentials))
        assert error.code == "unauthenticated" and "CURVE" in str(error), error
    reply = asyncio.run(status(cluster))
    assert any("broker.clients" in reason for reason in reply.rejected_peers), reply.rejected_peers


def test_an_authenticated_peer_may_only_send_what_its_role_sends(cluster):
    """Host a holds the broker and p0's first stage: its key may send micro-batches to p0s1, not feedback;
    a client's key is not admitted on the broker's results socket at all, and on the client socket it may
    not send what stages send."""
    import zmq

    from hexgen_zmq.wire.messages import Feedback, StageFailed, encode_control
    from hexgen_zmq.wire.security import ClientCurve, write_keys
    from hexgen_zmq.wire.sockets import make_socket

    keys, spec = cluster.keys_dir, layout(cluster.sites, cluster.model, FIRST)
    p0s1 = spec["pipelines"][0]["stages"][1]["inbound"]
    ctx = zmq.Context()
    try:
        as_host_a = ClientCurve(keys / "a.key_secret", public_key_of(keys, "c"))
        forged = make_socket(ctx, zmq.PUSH, connect=p0s1, security=as_host_a)
        forged.send_multipart(encode_control(Feedback(0, [])), copy=True)
        as_client = ClientCurve(keys / "client.key_secret", public_key_of(keys, "a"))
        clients = make_socket(ctx, zmq.DEALER, connect=cluster.address, security=as_client)
        clients.send_multipart(encode_control(StageFailed("p0s0", "forged", [1, 2, 3])))
        # keys the file does not admit there: a stranger's at a stage, a client's on the results socket
        stranger = ClientCurve(write_keys("rogue", cluster.dir / "rogue")[1], public_key_of(keys, "c"))
        make_socket(ctx, zmq.PUSH, connect=p0s1, security=stranger).send_multipart(
            encode_control(Feedback(0, [])))
        as_client_to_results = ClientCurve(keys / "client.key_secret", public_key_of(keys, "a"))
        make_socket(ctx, zmq.PUSH, connect=spec["broker"]["results"], security=as_client_to_results).send_multipart(
            encode_control(StageFailed("p0s1", "forged")))

        async def counted():
            deadline = time.monotonic() + 20
            while True:
                reply = await status(cluster)
                p0 = next(p for p in reply.pipelines if p.id == "p0")
                if any("Feedback" in r for r in p0.rejected_peers) and \
                        any("unknown key on stage:p0s1" in r for r in p0.rejected_peers) and \
                        any("StageFailed" in r for r in reply.rejected_peers) and \
                        any("unknown key on broker.results" in r for r in reply.rejected_peers):
                    return reply
                assert time.monotonic() < deadline, (p0.rejected_peers, reply.rejected_peers)
                await asyncio.sleep(0.25)

        reply = asyncio.run(counted())
        assert all(p.healthy for p in reply.pipelines), "a forged failure report failed nothing"
    finally:
        ctx.destroy(linger=0)
    assert_oracle(cluster.model, run_streams_sync(cluster, 4, 8), 8)


def public_key_of(keys_dir: Path, name: str) -> str:
    from tools.site_deployment import public_key

    return public_key(keys_dir, name)


def test_the_http_gateway_serves_a_keyed_broker_across_sites(cluster, tmp_path):
    import openai

    from hexgen_zmq.operations.commands import GatewayProcess
    from hexgen_zmq.wire.sockets import free_port

    gateway = GatewayProcess(cluster.config, ("127.0.0.1", free_port()), ["--keys", cluster.credentials["keys"]],
                             log_path=tmp_path / "gateway.log")
    try:
        gateway.wait_ready(120)
        api = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="none", max_retries=0, timeout=60)
        completion = api.completions.create(model=api.models.list().data[0].id, prompt=[5, 3, 5, 8], max_tokens=8,
                                            temperature=0)
        from transformers import AutoTokenizer

        expected = hf_greedy(cluster.model, [5, 3, 5, 8], 8)
        assert completion.usage.completion_tokens == len(expected)
        tokenizer = AutoTokenizer.from_pretrained(cluster.model)
        assert completion.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    finally:
        gateway.stop()


CAPTURE = r"""
import signal, socket, sys, time
socks = []
for name in sys.argv[2:]:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # every protocol
    sock.bind((name, 0))
    sock.settimeout(0.05)
    socks.append(sock)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
print("ready", flush=True)
with open(sys.argv[1], "wb") as out:
    while not stop:
        for sock in socks:
            try:
                out.write(sock.recv(1 << 17))
            except socket.timeout:
                pass
"""


def capture(argv_prefix: list[str], interfaces: list[str], out: Path) -> subprocess.Popen:
    process = subprocess.Popen([*argv_prefix, sys.executable, "-c", CAPTURE, str(out), *interfaces],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def test_nothing_crosses_in_clear(cluster, tmp_path):
    """Packets captured on the client's link to the broker and on the cross-region link: the ZMTP greetings
    name CURVE, and the prompt's token ids (as MessagePack puts them on the wire) appear nowhere."""
    import msgspec

    prompt = [401, 402, 403, 404, 405, 406, 407]
    pattern = msgspec.msgpack.encode(prompt)
    captures = [capture([], [f"{cluster.sites.prefix}-rt"], tmp_path / "client-link.bin"),
                capture(["ip", "netns", "exec", cluster.sites.router], ["l0a", "l0b"], tmp_path / "region-link.bin")]
    try:
        async def ask():
            async with await cluster.connect() as client:  # a new connection: its greeting is captured
                return await asyncio.wait_for(asyncio.gather(
                    *(client.generate(prompt_ids=prompt, max_new_tokens=12) for _ in range(6))), 60)

        results = asyncio.run(ask())
        assert all(r.token_ids == hf_greedy(cluster.model, prompt, 12) for r in results)
    finally:
        for process in captures:
            process.terminate()
            process.wait(10)
    client_link = (tmp_path / "client-link.bin").read_bytes()
    region_link = (tmp_path / "region-link.bin").read_bytes()
    assert len(client_link) > 6 * 64 and len(region_link) > 0, "the capture saw the traffic"
    assert b"CURVE" in client_link, "the client's connection negotiated CURVE"
    assert pattern not in client_link and pattern not in region_link
    # message kinds are tagged by name: in clear, every request and every heartbeat would show its own
    assert b"GenerateRequest" not in client_link and b"Heartbeat" not in region_link and b"p0s1" not in region_link
    assert msgspec.msgpack.encode(results[0].token_ids) not in client_link + region_link


def test_a_key_removed_by_a_redeploy_is_no_longer_admitted(cluster):
    from hexgen_zmq.operations.deployment import file_version

    spec = layout(cluster.sites, cluster.model, FIRST, keys_dir=cluster.keys_dir)
    kept = cluster.config.read_bytes()
    spec["security"]["client_keys"] = []
    new = cluster.dir / "no-clients.yaml"
    new.write_text(yaml.safe_dump(spec))
    subprocess.run([sys.executable, "-m", "hexgen_zmq.cli", "redeploy", str(cluster.config), str(new)], check=True,
                   timeout=60)

    async def refused():
        # until the broker has the new key list, a request may be served, or wait (its pipelines converging
        # to the new version on a loaded machine): neither is a refusal yet, so try again
        deadline = time.monotonic() + 60
        while True:
            async with await cluster.connect() as client:
                try:
                    await asyncio.wait_for(client.generate(prompt_ids=[1, 2], max_new_tokens=2), 10)
                except GenerationError as exc:
                    if exc.code == "unauthenticated":
                        return
                except TimeoutError:
                    pass
            assert time.monotonic() < deadline, "the removed client key is still admitted"
            await asyncio.sleep(0.5)

    try:
        asyncio.run(refused())
    finally:
        (cluster.dir / "restore.yaml").write_bytes(kept)
        subprocess.run([sys.executable, "-m", "hexgen_zmq.cli", "redeploy", str(cluster.config),
                        str(cluster.dir / "restore.yaml")], check=True, timeout=60)
    asyncio.run(serving(cluster, set(FIRST), 60, file_version(kept)))
    assert_oracle(cluster.model, run_streams_sync(cluster, 2, 6), 6)


def test_a_lost_host_has_its_requests_replayed_elsewhere(cluster):
    """Host b holds p1, which the broker favours (no link to cross): lost with its supervisor while p1
    holds requests, they go on on p0 across the regions."""
    before = asyncio.run(status(cluster)).replayed

    async def lose_host_b():
        deadline = time.monotonic() + 30
        while not next(p for p in (await status(cluster)).pipelines if p.id == "p1").in_flight:
            assert time.monotonic() < deadline, "p1 got no request"
            await asyncio.sleep(0.05)
        cluster.sites.kill_host("b")  # its supervisor and every process on it

    results = run_streams_sync(cluster, 12, 40, lose_host_b)
    assert_oracle(cluster.model, results, 40)

    async def p1_lost():
        deadline = time.monotonic() + 20
        while True:
            reply = await status(cluster)
            if not next(p for p in reply.pipelines if p.id == "p1").healthy:
                return reply
            assert time.monotonic() < deadline, "the lost host's pipeline still looks healthy"
            await asyncio.sleep(0.25)

    reply = asyncio.run(p1_lost())
    assert reply.replayed > before and reply.requests_failed == {}
