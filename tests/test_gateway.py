"""The OpenAI-compatible gateway: its text policy (incremental detokenization, stop strings) on real tokenizers
without sockets; its error mapping against a broker that answers what it is told; and the whole path, the
real `openai` package -> `hexgen-zmq serve` (a subprocess) -> broker -> stages, checked against Hugging Face.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from hexgen_zmq.serving.text_stream import CompletionText, IncrementalDetokenizer, StopMatcher, finish_reason
from tests.support import hf_greedy, local_deployment, wait_for

API_KEY = "test-key-123"
CONTEXT = 4096  # room for a request that runs for many seconds, so a disconnect is seen before it could end
KV_TOKENS = 4096  # one such request fills a stage: the next one is refused as busy (queue_limit 0)
LONG = 4000


# ------------------------------------------------------------------------------ text policy, no sockets


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    """A Llama-2 style tokenizer (▁ for spaces, byte fallback, the first space stripped on decode), trained
    here on a few lines: the case where decoding a window of tokens differs from decoding them all."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog", "a stage of a pipeline"] * 4,
                                  trainer)
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # byte tokens as ordinary vocabulary, as in Llama's: characters not learnt use them
        vocab[f"<0x{b:02X}>"] = len(vocab)
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


TEXTS = ["The quick brown fox", "naïve café — 5 €, 日本語 and 🦊 too", "  leading spaces\nand lines\n", "é"]


@pytest.mark.parametrize("which", ["tiny_tokenizer", "sentencepiece_tokenizer"])
def test_incremental_text_equals_a_full_decode(which, request):
    """Token by token or in runs: the pieces join to decode(all), and a character split across byte tokens
    never shows as a replacement mark."""
    tokenizer = request.getfixturevalue(which)

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    rng = random.Random(0)
    alphabet = "the quick fox é€日本🦊 \n"
    texts = TEXTS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(100)]
    cases = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    # any ids at all: a model may emit byte tokens that are no UTF-8. Byte-level BPE decodes them locally;
    # SentencePiece's byte fallback does not (a later byte can turn earlier ones into U+FFFD), so there only
    # sequences that decode cleanly are comparable
    for _ in range(300):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 40))]
        if which == "tiny_tokenizer" or "\ufffd" not in decode(ids):
            cases.append(ids)
    decode_one = functools.lru_cache(lambda token: decode([token]))  # as the gateway passes it
    for n, ids in enumerate(cases):
        detokenizer = IncrementalDetokenizer(decode, decode_one if n % 2 else None)
        pieces, i = [], 0
        while i < len(ids):
            n = rng.choice([1, 1, 1, 2, 3])
            pieces.append(detokenizer.push(ids[i:i + n]))
            i += n
        pieces.append(detokenizer.finish())
        assert "".join(pieces) == decode(ids), ids
        if "\ufffd" not in decode(ids):
            assert not any("\ufffd" in p for p in pieces), (ids, pieces)
    for text in TEXTS[1:2]:  # the multi-byte characters really are split across tokens here
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert any("\ufffd" in decode([t]) for t in ids)


def feed_all(matcher: StopMatcher, pieces: list[str]) -> tuple[list[str], str]:
    out = [matcher.feed(p) for p in pieces]
    if not matcher.stopped:
        out.append(matcher.flush())
    return out, "".join(out)


@pytest.mark.parametrize("pieces, stops, expected, stopped", [
    (["Hello", " wor", "ld"], [], "Hello world", False),
    (["Hello", " wor", "ld", "!"], ["world"], "Hello ", True),  # across three pieces
    (["abc"], ["abc"], "", True),  # at the very start
    (["aab", "x"], ["ab"], "a", True),  # a false start, then the real one
    (["one. two.", " three"], [".", "two"], "one", True),  # the earliest of several
    (["xy", "z!"], ["yz", "xyzq"], "x", True),  # the one that completes first
    (["end of te", "xt"], ["text!"], "end of text", False),  # a held prefix released at the end
    (["stop", "STOP"], ["STOP"], "stop", True),
])
def test_stop_strings_cut_where_openai_would(pieces, stops, expected, stopped):
    matcher = StopMatcher(stops)
    out, text = feed_all(matcher, pieces)
    assert text == expected and matcher.stopped == stopped


def test_stop_matcher_emits_only_what_cannot_become_a_stop():
    matcher = StopMatcher(["</answer>"])
    assert matcher.feed("42 </ans") == "42 "  # "</ans" might start the stop string: held back
    assert matcher.feed("wer") == ""
    assert matcher.feed("w") == "</answerw"  # it did not
    assert matcher.feed(" </answer> tail") == " " and matcher.stopped
    assert matcher.feed("more") == "" and matcher.flush() == ""


def test_token_chunks_are_the_full_encoding():
    """ChunkWriter writes a token's chunk from precomputed bytes around the text: the same as encoding it."""
    from hexgen_zmq.serving.openai_api import ChunkWriter

    for chat in (False, True):
        for include_usage in (False, True):
            writer = ChunkWriter(chat, "cmpl-1", 7, "tiny", include_usage)
            for text in ("", 'say "hi"\n', "é€🦊\x00"):
                assert writer.chunk(text) == writer.chunk(text, _template=True)
                body = json.loads(writer.chunk(text)[6:])
                assert (body["choices"][0]["delta"]["content"] if chat else body["choices"][0]["text"]) == text


def test_completion_text_stops_inside_a_token(tiny_tokenizer):
    def decode(ids):
        return tiny_tokenizer.decode(ids, skip_special_tokens=True)

    ids = tiny_tokenizer("The quick brown fox jumps over the lazy dog", add_special_tokens=False)["input_ids"]
    text = CompletionText(decode, ["own f"])  # ends inside " fox", starts inside " brown"
    out = []
    for token in ids:
        out.append(text.push([token]))
        if text.stopped:
            break
    assert "".join(out) == "The quick br" and text.stopped
    assert finish_reason("eos") == finish_reason("stop") == "stop" and finish_reason("length") == "length"


# ----------------------------------------------------------------- error mapping against a scripted broker


class ScriptedBroker:
    """A ROUTER that answers every GenerateRequest as `script(request)` says: a list of messages to send."""

    def __init__(self):
        import zmq
        import zmq.asyncio

        from hexgen_zmq.wire.sockets import free_port

        self.ctx = zmq.asyncio.Context()
        self.socket = self.ctx.socket(zmq.ROUTER)
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.socket.bind(self.address)
        self.script = lambda request: []
        self.task = asyncio.create_task(self.serve())

    async def serve(self) -> None:
        from hexgen_zmq.wire.messages import GenerateRequest, decode_control, encode_control

        while True:
            identity, *frames = await self.socket.recv_multipart()
            message = decode_control(frames)
            if isinstance(message, GenerateRequest):
                for reply in self.script(message):
                    if isinstance(reply, float):  # a pause in the script, in seconds
                        await asyncio.sleep(reply)
                    else:
                        await self.socket.send_multipart([identity, *encode_control(reply)])

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.socket.close(0)
        self.ctx.term()


@pytest.fixture
async def scripted(tiny_model, tiny_tokenizer):
    """The gateway app in this process, on httpx's ASGI transport, in front of a ScriptedBroker."""
    from hexgen_zmq.serving.client import Client
    from hexgen_zmq.serving.gateway import Gateway, GatewayConfig

    broker = ScriptedBroker()
    client = await Client.connect(broker.address)
    gateway = Gateway(GatewayConfig(broker.address, tiny_model, "tiny", 512, frozenset({API_KEY})), tiny_tokenizer,
                      client=client)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(gateway.app), base_url="http://gateway", timeout=10)
    api = openai.AsyncOpenAI(base_url="http://gateway/v1", api_key=API_KEY, http_client=http, max_retries=0)
    try:
        yield broker, api, http
    finally:
        await http.aclose()
        await client.close()
        await broker.close()


@pytest.mark.parametrize("code, status, exception", [
    ("invalid_request", 400, openai.BadRequestError),
    ("prompt_too_long", 400, openai.BadRequestError),
    ("too_large", 400, openai.BadRequestError),
    ("busy", 429, openai.RateLimitError),
    ("no_pipeline", 503, openai.InternalServerError),
    ("timeout", 504, openai.InternalServerError),
    ("stage_failed", 500, openai.InternalServerError),
])
async def test_broker_errors_become_openai_errors(scripted, code, status, exception):
    from hexgen_zmq.wire.messages import ErrorEvent

    broker, api, _ = scripted
    broker.script = lambda request: [ErrorEvent(request.client_request_id, code, f"the broker says {code}")]
    for stream in (False, True):  # a streamed request refused before its first token gets the status too
        with pytest.raises(exception) as err:
            await asyncio.wait_for(api.completions.create(model="tiny", prompt="hi", max_tokens=4, stream=stream), 10)
        assert err.value.status_code == status
        assert err.value.code == code and f"the broker says {code}" in err.value.message


async def test_an_error_mid_stream_arrives_as_an_api_error(scripted):
    from hexgen_zmq.wire.messages import ErrorEvent, TokenEvent

    broker, api, _ = scripted
    broker.script = lambda r: [TokenEvent(r.client_request_id, [279]),
                               ErrorEvent(r.client_request_id, "stage_failed", "pipeline p0 failed")]
    stream = await asyncio.wait_for(api.completions.create(model="tiny", prompt="hi", max_tokens=4, stream=True), 10)
    with pytest.raises(openai.APIError, match="pipeline p0 failed"):
        async for _ in stream:
            pass


async def test_a_stream_the_broker_is_silent_about_times_out():
    """Streams have no timer per event: the client's ping task ends one the broker went quiet about."""
    from hexgen_zmq.serving.client import Client, GenerationError

    broker = ScriptedBroker()  # takes the request, never answers
    try:
        async with Client.connect(broker.address, silence_s=0.3) as client:
            start = time.monotonic()
            with pytest.raises(GenerationError) as err:
                async for _ in client.events(prompt_ids=[1, 2], timeout_s=0.2):
                    pass
            assert err.value.code == "timeout" and time.monotonic() - start < 5
    finally:
        await broker.close()


async def test_tokens_that_arrive_together_go_out_in_one_chunk(scripted, tiny_tokenizer):
    """Events already waiting when the stream comes back for more are one SSE chunk: its text is theirs
    joined, and its logprobs list every token, at the right text offsets."""
    from hexgen_zmq.wire.messages import TokenEvent, TokenEvents, TokenLogprob

    broker, _, http = scripted
    tokens = tiny_tokenizer("the cat sat on the mat", add_special_tokens=False)["input_ids"][:5]
    assert len(tokens) == 5

    def event(r, i, **finish):
        return TokenEvent(r.client_request_id, [tokens[i]], index=i, logprobs=[TokenLogprob(-0.5 - i)], **finish)

    broker.script = lambda r: [event(r, 0), TokenEvents([event(r, 1), event(r, 2), event(r, 3)]),
                               event(r, 4, finished=True, finish_reason="length")]
    body = {"prompt": "hi", "max_tokens": 5, "stream": True, "logprobs": 0}
    async with http.stream("POST", "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        raw = b"".join([chunk async for chunk in r.aiter_bytes()])
    chunks = [json.loads(e[6:]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
    assert raw.endswith(b"data: [DONE]\n\n")
    choices = [c["choices"][0] for c in chunks]
    text = "".join(c["text"] for c in choices)
    assert text == tiny_tokenizer.decode(tokens)
    per_chunk = [len(c["logprobs"]["tokens"]) for c in choices if c["logprobs"]]
    assert sum(per_chunk) == 5 and max(per_chunk) >= 3, per_chunk  # the three of one message in one chunk
    logprobs = [v for c in choices if c["logprobs"] for v in c["logprobs"]["token_logprobs"]]
    assert logprobs == [-0.5 - i for i in range(5)]
    offsets = [v for c in choices if c["logprobs"] for v in c["logprobs"]["text_offset"]]
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] < len(text)


async def test_stream_interval_sends_several_tokens_per_chunk_after_the_first(tiny_model, tiny_tokenizer):
    """--stream-interval N: the first token goes out alone (time to first token), then chunks of at least N
    tokens, the last one possibly shorter; the text is the same."""
    from hexgen_zmq.serving.client import Client
    from hexgen_zmq.serving.gateway import Gateway, GatewayConfig
    from hexgen_zmq.wire.messages import TokenEvent, TokenLogprob

    tokens = tiny_tokenizer("the cat sat on the mat and the dog sat on the log", add_special_tokens=False)["input_ids"]
    tokens = tokens[:11]
    broker = ScriptedBroker()  # one message per token, as the broker sends them to a client that keeps up
    broker.script = lambda r: [item for i, token in enumerate(tokens) for item in (
        TokenEvent(r.client_request_id, [token], index=i, logprobs=[TokenLogprob(-1.0 - i)],
                   finished=i == len(tokens) - 1, finish_reason="length" if i == len(tokens) - 1 else None),
        0.02)]  # a step apart
    client = await Client.connect(broker.address)
    config = GatewayConfig(broker.address, tiny_model, "tiny", 512, frozenset({API_KEY}), stream_interval=4)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(Gateway(config, tiny_tokenizer, client=client).app),
                             base_url="http://gateway", timeout=10)
    try:
        body = {"prompt": "hi", "max_tokens": len(tokens), "stream": True, "logprobs": 0}
        async with http.stream("POST", "/v1/completions", json=body,
                               headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            raw = b"".join([chunk async for chunk in r.aiter_bytes()])
    finally:
        await http.aclose()
        await client.close()
        await broker.close()
    choices = [json.loads(e[6:])["choices"][0] for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
    assert "".join(c["text"] for c in choices) == tiny_tokenizer.decode(tokens)
    per_chunk = [len(c["logprobs"]["tokens"]) for c in choices if c["logprobs"] and c["logprobs"]["tokens"]]
    assert sum(per_chunk) == len(tokens) and per_chunk[0] == 1, per_chunk
    assert all(n >= 4 for n in per_chunk[1:-1]) and len(per_chunk) <= 1 + -(-(len(tokens) - 1) // 4), per_chunk
    logprobs = [v for c in choices if c["logprobs"] for v in c["logprobs"]["token_logprobs"]]
    assert logprobs == [-1.0 - i for i in range(len(tokens))]


async def test_requests_the_gateway_refuses_itself(scripted, tiny_model):
    _, api, http = scripted
    bad = openai.AsyncOpenAI(base_url="http://gateway/v1", api_key="wrong", http_client=http, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.completions.create(model="tiny", prompt="hi")
    response = await http.post("/v1/completions", json={"prompt": "hi"})  # no key at all
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.BadRequestError, match="n = 1"):
        await api.completions.create(model="tiny", prompt="hi", n=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        await api.completions.create(model="tiny", prompt="hi", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="one prompt"):
        await api.completions.create(model="tiny", prompt=["a", "b"])
    with pytest.raises(openai.BadRequestError, match="messages"):
        await api.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.NotFoundError):
        await api.embeddings.create(model="tiny", input="hi")
    models = await api.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert (await http.get("/metrics")).status_code == 200  # open without a key, as Prometheus scrapes it


# ------------------------------------------------------------------------ the real thing, end to end


@pytest.fixture(scope="module")
def long_model(tiny_model, tmp_path_factory) -> str:
    """The tiny model with a context of 4096 (same weights: its RoPE does not depend on the length)."""
    path = tmp_path_factory.mktemp("gateway-model") / "tiny-long"
    shutil.copytree(tiny_model, path)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = CONTEXT
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def _set_kv(spec: dict) -> None:
    for pipeline in spec["pipelines"]:
        for stage in pipeline["stages"]:
            stage["kv_cache_tokens"] = KV_TOKENS


@pytest.fixture(scope="module")
def served(long_model, tmp_path_factory):
    """One pipeline of two stages, and `hexgen-zmq serve` in front of it (a subprocess)."""
    from hexgen_zmq.wire.sockets import free_port

    directory = tmp_path_factory.mktemp("gateway")
    with local_deployment(directory, long_model, [[(0, 2, 1), (2, 6, 1)]], edit=_set_kv, queue_limit=0,
                          request_timeout_s=120) as local:
        port = free_port()
        log = open(directory / "gateway.log", "wb")
        gateway = subprocess.Popen([sys.executable, "-m", "hexgen_zmq.cli", "serve", "--config", str(local.config),
                                    "--listen", f"127.0.0.1:{port}", "--api-key", API_KEY, "--model-name", "tiny"],
                                   stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                assert gateway.poll() is None, (directory / "gateway.log").read_text()
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "the gateway did not become ready"
                time.sleep(0.2)
            yield local, url
        finally:
            gateway.terminate()
            try:
                gateway.wait(10)
            except subprocess.TimeoutExpired:
                gateway.kill()
                gateway.wait(5)
            log.close()


@pytest.fixture
async def api(served):
    _, url = served
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture(scope="module")
def tokenizer(long_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(long_model)


def oracle_text(tokenizer, model: str, prompt_ids: list[int], n: int) -> tuple[str, list[int]]:
    tokens = hf_greedy(model, prompt_ids, n)
    return tokenizer.decode(tokens, skip_special_tokens=True), tokens


async def streamed(stream) -> tuple[str, list]:
    chunks = [chunk async for chunk in stream]
    pieces = []
    for c in chunks:
        if c.choices:
            choice = c.choices[0]
            pieces.append(choice.text if hasattr(choice, "text") else (choice.delta.content or ""))
    return "".join(pieces), chunks


async def test_completions_stream_and_not_equal_hf(api, tokenizer, long_model):
    prompt = "The quick brown fox"
    ids = tokenizer(prompt)["input_ids"]
    expected, tokens = oracle_text(tokenizer, long_model, ids, 24)
    whole = await api.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    text, chunks = await streamed(await api.completions.create(
        model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert whole.choices[0].text == text == expected
    reason = "length" if len(tokens) == 24 else "stop"
    assert whole.choices[0].finish_reason == chunks[-2].choices[0].finish_reason == reason
    assert whole.usage.prompt_tokens == chunks[-1].usage.prompt_tokens == len(ids)
    assert whole.usage.completion_tokens == chunks[-1].usage.completion_tokens == len(tokens)
    assert not chunks[-1].choices and all(c.usage is None for c in chunks[:-1])
    by_ids = await api.completions.create(model="tiny", prompt=ids, max_tokens=24, temperature=0)
    assert by_ids.choices[0].text == expected


async def test_chat_stream_and_not_equal_hf(api, tokenizer, long_model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    expected, tokens = oracle_text(tokenizer, long_model, ids, 20)
    whole = await api.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=20,
                                              temperature=0)
    text, chunks = await streamed(await api.chat.completions.create(model="tiny", messages=messages, max_tokens=20,
                                                                    temperature=0, stream=True))
    assert whole.choices[0].message.content == text == expected
    assert whole.choices[0].message.role == "assistant" == chunks[0].choices[0].delta.role
    assert whole.usage.prompt_tokens == len(ids) and whole.usage.completion_tokens == len(tokens)
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def stop_across_tokens(tokenizer, tokens: list[int]) -> tuple[str, int]:
    """A stop string of the decoded text that starts inside one token and ends inside a later one, and
    where it starts (its first occurrence)."""
    full = tokenizer.decode(tokens, skip_special_tokens=True)
    ends = [len(tokenizer.decode(tokens[:k + 1], skip_special_tokens=True)) for k in range(len(tokens))]
    starts = [0] + ends[:-1]
    inner = [k for k in range(1, len(tokens)) if ends[k] - starts[k] >= 2]  # tokens of two characters or more
    for a, b in zip(inner, inner[1:]):
        start, end = starts[a] + 1, starts[b] + 1
        if full.find(full[start:end]) == start:
            return full[start:end], start
    raise AssertionError(f"no usable stop string in {full!r}")


async def test_stop_strings_cut_the_output(api, tokenizer, long_model, served):
    prompt = [11, 22, 33, 44, 55]
    full, tokens = oracle_text(tokenizer, long_model, prompt, 40)
    stop, start = stop_across_tokens(tokenizer, tokens)
    common = dict(model="tiny", prompt=prompt, max_tokens=40, temperature=0, stop=[stop, "\x00never"])
    whole = await api.completions.create(**common)
    text, chunks = await streamed(await api.completions.create(**common, stream=True))
    assert whole.choices[0].text == text == full[:start]
    assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens < 40
    local, _ = served
    from hexgen_zmq.serving.client import Client

    async with Client.connect(local.address) as client:  # leaving at the stop string cancelled the request
        await wait_for(lambda: nothing_held(client), timeout_s=10)


async def nothing_held(client) -> bool:
    status = await client.status()
    return all(p.in_flight == 0 and sum(p.cached_requests.values()) == 0 for p in status.pipelines)


async def test_a_disconnect_mid_stream_frees_the_request(served):
    """A long request (LONG tokens, ignore_eos: many seconds) whose client goes away after a few chunks is
    cancelled at the broker and leaves every stage's cache, long before it could have finished."""
    from hexgen_zmq.serving.client import Client

    local, url = served
    before = metric_values(url)
    async with Client.connect(local.address) as broker:
        started = time.monotonic()
        async with httpx.AsyncClient(timeout=30) as http:
            async with http.stream("POST", f"{url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                                   json={"prompt": [5, 6, 7], "max_tokens": LONG, "ignore_eos": True,
                                         "temperature": 0, "stream": True}) as response:
                assert response.status_code == 200
                # not `async for ... break`: the abandoned iterator, once collected, would close the
                # connection at some point of its own choosing
                lines, data = response.aiter_lines(), 0
                while data < 5:
                    data += (await asyncio.wait_for(anext(lines), 30)).startswith("data: ")
                status = await broker.status()
                assert sum(p.in_flight for p in status.pipelines) == 1, status
        closed = time.monotonic()
        await wait_for(lambda: nothing_held(broker), timeout_s=30, interval_s=0.05)
        freed = time.monotonic()
    per_token = (closed - started) / 5
    assert freed - started < LONG * per_token / 4, \
        f"freed {freed - closed:.2f} s after the disconnect, no sooner than it would have finished"
    after = metric_values(url)
    key = ("hexgen_requests_total", (("endpoint", "completions"), ("outcome", "client_disconnected")))
    assert after.get(key, 0) - before.get(key, 0) == 1


async def test_a_disconnect_while_waiting_for_a_whole_answer_frees_the_request(served):
    from hexgen_zmq.serving.client import Client

    local, url = served
    before = metric_values(url)
    async with Client.connect(local.address) as broker:
        async with httpx.AsyncClient(timeout=30) as http:
            post = asyncio.create_task(http.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                                                 json={"prompt": [5, 6, 7], "max_tokens": LONG, "ignore_eos": True}))

            async def running() -> bool:
                return sum(p.in_flight for p in (await broker.status()).pipelines) == 1

            await wait_for(running, timeout_s=10, interval_s=0.05)
            post.cancel()  # the HTTP client gives up: its connection closes
            with pytest.raises(asyncio.CancelledError):
                await post
        cancelled_at = time.monotonic()
        await wait_for(lambda: nothing_held(broker), timeout_s=30, interval_s=0.05)
    assert time.monotonic() - cancelled_at < LONG * 0.001, "freed no sooner than it would have finished"
    after = metric_values(url)
    key = ("hexgen_requests_total", (("endpoint", "completions"), ("outcome", "client_disconnected")))
    assert after.get(key, 0) - before.get(key, 0) == 1


async def test_busy_and_too_long_get_their_status(api, served):
    # one long request fills the KV cache, and queue_limit 0 turns the next away
    stream = await api.completions.create(model="tiny", prompt=[5, 6], max_tokens=LONG, stream=True,
                                          extra_body={"ignore_eos": True}, temperature=0)
    try:
        await anext(aiter(stream))
        with pytest.raises(openai.RateLimitError) as err:
            await api.completions.create(model="tiny", prompt=[5, 6], max_tokens=200)
        assert err.value.status_code == 429 and err.value.code == "busy"
    finally:
        await stream.close()
    for stream_it in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            await api.completions.create(model="tiny", prompt=[5] * 100, max_tokens=CONTEXT, stream=stream_it)
        assert err.value.code == "prompt_too_long"
    local, _ = served
    from hexgen_zmq.serving.client import Client

    async with Client.connect(local.address) as client:
        await wait_for(lambda: nothing_held(client), timeout_s=10)


def metric_values(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


async def test_metrics_count_what_was_sent(api, served):
    _, url = served
    before = metric_values(url)
    results = [await api.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=5, temperature=0)
               for _ in range(3)]
    _, chunks = await streamed(await api.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    with pytest.raises(openai.BadRequestError):
        await api.completions.create(model="tiny", prompt=[1, 10**6], max_tokens=4)
    with pytest.raises(openai.BadRequestError):  # refused by the gateway: counted all the same
        await api.completions.create(model="tiny", prompt=[1, 2], max_tokens=4, n=3)
    with pytest.raises(openai.BadRequestError):
        await api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], top_p=2)
    after = metric_values(url)

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("hexgen_requests_total", endpoint="completions", outcome="success") == 3
    assert delta("hexgen_requests_total", endpoint="chat_completions", outcome="success") == 1
    usage = chunks[-1].usage
    generated = sum(r.usage.completion_tokens for r in results) + usage.completion_tokens
    assert delta("hexgen_generation_tokens_total") == generated
    assert delta("hexgen_prompt_tokens_total") == 3 * 3 + usage.prompt_tokens
    assert delta("hexgen_time_to_first_token_seconds_count") == 4
    assert delta("hexgen_e2e_request_latency_seconds_count") == 4
    assert after[("hexgen_broker_up", ())] == 1
    assert after[("hexgen_pipeline_ready", (("pipeline", "p0"),))] == 1
    assert ("hexgen_stage_cached_requests", (("pipeline", "p0"), ("stage", "p0s1"))) in after
    # a token id outside the vocabulary is the broker's to refuse
    assert delta("hexgen_requests_total", endpoint="completions", outcome="invalid_request") == 1
    assert delta("hexgen_requests_total", endpoint="completions", outcome="unsupported_parameter") == 1
    assert delta("hexgen_requests_total", endpoint="chat_completions", outcome="invalid_request") == 1


async def test_metrics_carry_every_stages_step_and_bytes_counters(api, served):
    local, url = served
    for _ in range(2):
        await api.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=4, temperature=0)
    stages = [s.id for p in local.deployment.pipelines for s in p.stages]

    def counters() -> dict:
        return {(name, dict(labels)["stage"], dict(labels).get("to")): v
                for (name, labels), v in metric_values(url).items()
                if name.startswith(("hexgen_stage_step", "hexgen_stage_sent_bytes"))}

    async def all_stepped() -> bool:  # stages report in heartbeats, every 0.5 s
        found = await asyncio.to_thread(counters)
        return all(found.get(("hexgen_stage_steps_total", s, None), 0) > 0 for s in stages)

    await wait_for(all_stepped, timeout_s=10)
    found = counters()
    for stage in stages:
        for name in ("steps", "step_seconds", "step_tokens", "step_requests"):
            assert found[(f"hexgen_stage_{name}_total", stage, None)] > 0, (name, stage, found)
        assert found[("hexgen_stage_sent_bytes_total", stage, "next")] > 0, (stage, found)
    assert found[("hexgen_stage_sent_bytes_total", stages[-1], "broker")] > 0
    assert found[("hexgen_stage_sent_bytes_total", stages[0], "broker")] == 0  # only the last stage samples


def hf_log_softmax(model_path: str, prompt: list[int], tokens: list[int]):
    """Log-softmax of Hugging Face's logits at each generated position (teacher-forced on the tokens)."""
    import torch

    from tests.support import hf_model

    with torch.inference_mode():
        logits = hf_model(model_path)(torch.tensor([prompt + tokens])).logits[0]
    return torch.log_softmax(logits[len(prompt) - 1: len(prompt) - 1 + len(tokens)].float(), -1)


async def test_greedy_logprobs_equal_hf_log_softmax(api, tokenizer, long_model):
    prompt = [9, 8, 7, 6]
    tokens = hf_greedy(long_model, prompt, 12)
    expected = hf_log_softmax(long_model, prompt, tokens)
    whole = await api.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, logprobs=3)
    lp = whole.choices[0].logprobs
    assert len(lp.token_logprobs) == len(tokens) == whole.usage.completion_tokens
    for i, token in enumerate(tokens):
        assert lp.token_logprobs[i] == pytest.approx(float(expected[i, token]), abs=2e-3)
        best = expected[i].topk(3).values.tolist()  # the chosen token and the top 3, keyed by their text
        assert len(lp.top_logprobs[i]) >= 3
        assert all(any(abs(v - b) < 2e-3 for b in best) for v in lp.top_logprobs[i].values())
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # chat, streamed: the same numbers arrive chunk by chunk, top alternatives as a list with their bytes
    messages = [{"role": "user", "content": "Tell me a short story about a fox."}]
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    tokens = hf_greedy(long_model, ids, 10)
    expected = hf_log_softmax(long_model, ids, tokens)
    _, chunks = await streamed(await api.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                                                 temperature=0, stream=True, logprobs=True,
                                                                 top_logprobs=2))
    content = [entry for c in chunks if c.choices and c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    assert len(content) == len(tokens)
    for i, (entry, token) in enumerate(zip(content, tokens)):
        assert entry.logprob == pytest.approx(float(expected[i, token]), abs=2e-3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(expected[i].topk(2).values.tolist(), abs=2e-3)
        raw = bytes(entry.bytes)
        assert entry.token == (raw.decode() if not entry.token.startswith("bytes:") else
                               "bytes:" + "".join(f"\\x{b:02x}" for b in raw))
    # no logprobs unless asked for
    plain = await api.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None


def test_token_bytes_rebuild_the_text(tiny_tokenizer, sentencepiece_tokenizer):
    from hexgen_zmq.serving.openai_api import LogprobFormatter

    for tokenizer in (tiny_tokenizer, sentencepiece_tokenizer):
        formatter = LogprobFormatter(tokenizer)
        text = "naïve café — 5 €"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        joined = b"".join(formatter.token_bytes(t) for t in ids).decode()
        assert joined.lstrip(" ") == text  # SentencePiece's first token carries the space it prepends


async def test_bench_drives_the_gateway(served):
    from hexgen_zmq.serving.bench import make_workload, run_http_load

    _, url = served
    workload = make_workload(4, (3, 8), (6, 6), 400, seed=1)
    stats, wall = await asyncio.wait_for(run_http_load(url, workload, 2, None, 0, True, API_KEY), 60)
    assert [s.ok for s in stats] == [True] * 4, [s.error for s in stats]
    assert [s.tokens for s in stats] == [6] * 4 and all(0 < s.ttft_s <= s.total_s for s in stats)


def test_up_passes_the_gateway_options_on():
    from hexgen_zmq.cli import build_parser
    from hexgen_zmq.operations.commands import serve_options

    args = build_parser().parse_args(["up", "d.yaml", "--http", "0.0.0.0:8080", "--api-key", "a", "--api-key", "b",
                                      "--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem"])
    assert args.http == ("0.0.0.0", 8080)
    again = build_parser().parse_args(["serve", "--config", "d.yaml", *serve_options(args)])
    assert (again.api_key, again.ssl_certfile, again.ssl_keyfile) == (["a", "b"], "c.pem", "k.pem")
