"""The HTTP gateway: `hexgen-zmq serve --config F --listen HOST:PORT`, an OpenAI-compatible API and
Prometheus metrics in front of a deployment's broker.

A FastAPI app on uvicorn. It is one client of the broker through the project's own client library, so
several gateways can stand in front of one broker. It tokenizes prompts itself (the checkpoint's tokenizer
and chat template, as the broker would) and sends token ids: it then knows every request's prompt length
for `usage`, and detokenizes the stream incrementally for text that never splits a character. Stop strings
are matched here, on that text; when one appears the gateway leaves the request's stream, which cancels it
at the broker. A client that disconnects cancels its request the same way.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with `stream`), GET
/metrics, GET /health. With API keys, /v1/* wants `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hmac
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from hexgen_zmq.serving.client import Client, GenerationError, joined_events
from hexgen_zmq.serving.metrics import GatewayMetrics
from hexgen_zmq.serving.openai_api import (SSE_DONE, APIError, ChatCompletionRequest, ChunkWriter, CompletionRequest,
                                   LogprobFormatter, completion_body, dumps)
from hexgen_zmq.serving.text_stream import CompletionText, finish_reason

log = logging.getLogger("gateway")

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
DEFAULT_CHAT_TOKENS = 256  # the broker reserves KV for prompt + max_tokens, so "up to the context" would be costly
STATUS_TIMEOUT_S = 2.0
GENERATION_PATHS = {"/v1/completions": "completions", "/v1/chat/completions": "chat_completions"}  # metric labels


@dataclass
class GatewayConfig:
    broker: str  # the broker's client address
    model_path: str
    model_name: str
    max_context: int
    api_keys: frozenset[str] = frozenset()
    default_chat_tokens: int = DEFAULT_CHAT_TOKENS
    created: int = field(default_factory=lambda: int(time.time()))
    credentials: dict = field(default_factory=dict)  # Client.connect's keys= and server_key= (CURVE)
    stream_interval: int = 1  # tokens per streamed chunk after the first (vLLM's --stream-interval)


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


class _Track:
    """One request's measurements, recorded once when it ends, whichever way."""

    def __init__(self, metrics: GatewayMetrics, endpoint: str):
        self.metrics, self.endpoint = metrics, endpoint
        self.start = time.perf_counter()
        self.first_at: float | None = None
        self.prompt_tokens = 0
        self.tokens = 0
        self.ended = False
        metrics.in_progress.inc()

    def got(self, n: int) -> None:
        if n and self.first_at is None:
            self.first_at = time.perf_counter()
        self.tokens += n

    def end(self, outcome: str, reason: str | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        self.metrics.in_progress.dec()
        self.metrics.observe(self.endpoint, outcome, self.prompt_tokens, self.tokens, self.start, self.first_at,
                             time.perf_counter(), reason)


async def _disconnected(request: Request) -> None:
    """Returns when the HTTP client goes away (the request body has been read: receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, awaitable):
    """Await `awaitable`, or cancel it and raise ClientGone when the client disconnects first."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, GenerationError, StopAsyncIteration):
        await task
    raise ClientGone()


class _Last(bytes):
    """A stream's last chunk: it goes out with the end of the response body, in one write."""


class EventStream(StreamingResponse):
    """StreamingResponse whose last chunk (a _Last) also ends the body: one write less per request."""

    async def stream_response(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        ended = False
        async for chunk in self.body_iterator:  # to its end even after the last chunk: its `finally` runs now
            ended = type(chunk) is _Last
            await send({"type": "http.response.body", "body": chunk, "more_body": not ended})
        if not ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def fast_decode(tokenizer):
    """`tokenizer.decode(ids, skip_special_tokens=True)`, straight from the Rust tokenizer when that is what
    transformers would do anyway (no clean-up of spaces): the stream decodes twice per token."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and getattr(tokenizer, "clean_up_tokenization_spaces", True) is False:
        return functools.partial(backend.decode, skip_special_tokens=True)
    return functools.partial(tokenizer.decode, skip_special_tokens=True)


class Gateway:
    def __init__(self, config: GatewayConfig, tokenizer, client: Client | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.decode = fast_decode(tokenizer)
        self.decode_one = functools.lru_cache(maxsize=1 << 16)(lambda token: self.decode([token]))
        self.logprob_format = LogprobFormatter(tokenizer)
        self.metrics = GatewayMetrics()
        self.client = client
        self._status_lock = asyncio.Lock()
        self.app = self._build_app()

    # ------------------------------------------------------------------ app
    def _build_app(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI):
            own = self.client is None
            if own:
                self.client = await Client.connect(self.config.broker, **self.config.credentials)
            try:
                yield
            finally:
                if own:
                    await self.client.close()

        app = FastAPI(title="hexgen-zmq", lifespan=lifespan, docs_url=None, redoc_url=None)
        auth = [Depends(self._authorize)]
        app.add_api_route("/v1/models", self.models, methods=["GET"], dependencies=auth)
        app.add_api_route("/v1/completions", self.completions, methods=["POST"], dependencies=auth)
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"], dependencies=auth)
        app.add_api_route("/metrics", self.metrics_endpoint, methods=["GET"])
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_exception_handler(APIError, self._api_error)
        app.add_exception_handler(RequestValidationError, self._validation_error)
        app.add_exception_handler(StarletteHTTPException, self._http_error)
        return app

    def _count_refusal(self, request: Request, exc: APIError) -> None:
        """A generation request refused before it reached the broker still counts, by its outcome."""
        endpoint = GENERATION_PATHS.get(request.url.path)
        if endpoint is not None and not exc.counted:
            self.metrics.requests.labels(endpoint, exc.code or "invalid_request").inc()
            exc.counted = True

    async def _api_error(self, request: Request, exc: APIError) -> JSONResponse:
        self._count_refusal(request, exc)
        return JSONResponse(exc.body(), status_code=exc.status)

    async def _validation_error(self, request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more)"
        return await self._api_error(request, APIError(400, message, param=where or None, code="invalid_request"))

    @staticmethod
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def _authorize(self, request: Request) -> None:
        if not self.config.api_keys:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() == "bearer" and any(hmac.compare_digest(key, k) for k in self.config.api_keys):
            return
        error = APIError(401, "a valid API key is required: Authorization: Bearer KEY", "invalid_request_error",
                         "invalid_api_key")
        if endpoint := GENERATION_PATHS.get(request.url.path):
            self.metrics.requests.labels(endpoint, "unauthorized").inc()
            error.counted = True
        raise error

    async def status(self):
        async with self._status_lock:  # one at a time: a client without status nonces matches replies to none
            return await self.client.status(timeout_s=STATUS_TIMEOUT_S)

    # ------------------------------------------------------------------ small endpoints
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.config.model_name, "object": "model",
                                            "created": self.config.created, "owned_by": "hexgen-zmq",
                                            "root": self.config.model_path, "max_model_len": self.config.max_context}]}

    async def health(self) -> JSONResponse:
        try:
            status = await self.status()
        except (asyncio.TimeoutError, TimeoutError, GenerationError):
            return JSONResponse({"status": "broker unreachable"}, status_code=503)
        ready = [p.id for p in status.pipelines if p.ready and p.healthy]
        return JSONResponse({"status": "ok" if ready else "no pipeline ready", "pipelines": ready},
                            status_code=200 if ready else 503)

    async def metrics_endpoint(self) -> Response:
        try:
            self.metrics.broker.status = await self.status()
        except (asyncio.TimeoutError, TimeoutError, GenerationError):
            self.metrics.broker.status = None
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ generation
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        body.check_supported()
        prompt = body.single_prompt()
        ids = list(prompt) if isinstance(prompt, list) else self._encode(prompt)
        return await self._generate(request, body, ids, body.max_tokens, DEFAULT_COMPLETION_TOKENS, chat=False)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        body.check_supported()
        try:
            ids = self.tokenizer.apply_chat_template(body.chat(), add_generation_prompt=True, tokenize=True,
                                                     return_dict=False)
        except Exception as exc:
            raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from None
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return await self._generate(request, body, list(ids), body.token_limit, self.config.default_chat_tokens,
                                    chat=True)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    async def _generate(self, request: Request, body, prompt_ids: list[int], max_tokens: int | None, default: int,
                        chat: bool) -> Response:
        if max_tokens is None:  # a default never makes a short prompt too long for the context
            max_tokens = max(1, min(default, self.config.max_context - len(prompt_ids)))
        kwargs = dict(prompt_ids=prompt_ids, max_new_tokens=max_tokens, **body.sampling())
        if body.logprobs_wanted is not None:
            kwargs["logprobs"] = body.logprobs_wanted
        track = _Track(self.metrics, "chat_completions" if chat else "completions")
        track.prompt_tokens = len(prompt_ids)
        request_id = ("chatcmpl-" if chat else "cmpl-") + os.urandom(12).hex()
        created = int(time.time())
        try:
            if body.stream:
                return await self._stream(request, body, kwargs, track, request_id, created, chat)
            return await self._complete(request, body, kwargs, track, request_id, created, chat)
        except GenerationError as exc:
            track.end(exc.code)
            error = APIError.from_generation(exc.code, str(exc).partition(": ")[2] or str(exc))
            error.counted = True
            raise error from None
        except ClientGone:
            track.end("client_disconnected")
            return Response(status_code=499)
        except BaseException:
            track.end("error")
            raise

    async def _complete(self, request: Request, body, kwargs: dict, track: _Track, request_id: str, created: int,
                        chat: bool) -> Response:
        entries: list = []
        if not body.stop and body.logprobs_wanted is None:  # the whole answer in one wake-up; the broker decoded it
            t0 = time.perf_counter()
            result = await _unless_disconnected(request, self.client.generate(**kwargs))
            track.first_at = t0 + result.ttft_s
            track.got(len(result.token_ids))
            text = result.text if result.text is not None else self.decode(result.token_ids)
            reason = finish_reason(result.finish_reason)
        else:
            text, reason = await _unless_disconnected(request, self._collect(body, kwargs, track, entries))
        track.end("success", reason)
        return Response(dumps(completion_body(chat, request_id, created, self.config.model_name, text, reason,
                                              track.prompt_tokens, track.tokens, self._logprobs(chat, body, entries))),
                        media_type="application/json")

    def _logprobs(self, chat: bool, body, entries: list) -> dict | None:
        """OpenAI's logprobs object for (token, TokenLogprob, text offset) entries; None when not asked for."""
        if body.logprobs_wanted is None:
            return None
        return self.logprob_format.chat(entries) if chat else self.logprob_format.completion(entries)

    @staticmethod
    def _push(text: CompletionText, event, track: _Track, entries: list | None) -> str:
        """An event's tokens into the text: the text they complete. With `entries` (logprobs asked for),
        each token's log-probability and where its text starts go there. An event may hold several tokens
        (those that arrived while the stream was busy): when logprobs or stop strings need to know where
        each token's text starts or ends, they go in one by one, so offsets, and the tokens counted when a
        stop string ends the request, are the same as for one token per event."""
        tokens = event.tokens
        if len(tokens) == 1 or (entries is None and not text.has_stops):
            track.got(len(tokens))
            offset = text.decoded_chars
            piece = text.push(tokens)
            if entries is not None:
                entries.extend((token, lp, offset) for token, lp in zip(tokens, event.logprobs))
            return piece
        pieces = []
        for i, token in enumerate(tokens):
            track.got(1)
            offset = text.decoded_chars
            pieces.append(text.push((token,)))
            if entries is not None and i < len(event.logprobs):
                entries.append((token, event.logprobs[i], offset))
            if text.stopped:
                break
        return "".join(pieces)

    async def _collect(self, body, kwargs: dict, track: _Track, entries: list) -> tuple[str, str]:
        """Run a request to its end (or its first stop string), gathering the text, the finish_reason, and
        into `entries` the log-probabilities if asked for."""
        text = CompletionText(self.decode, body.stop, self.decode_one)
        want_logprobs = body.logprobs_wanted is not None
        pieces: list[str] = []
        reason = "length"
        async with contextlib.aclosing(self.client.events(**kwargs)) as events:
            async for event in events:
                pieces.append(self._push(text, event, track, entries if want_logprobs else None))
                if text.stopped:
                    return "".join(pieces), "stop"
                if event.finished:
                    reason = finish_reason(event.finish_reason)
        pieces.append(text.finish())
        return "".join(pieces), "stop" if text.stopped else reason

    async def _stream(self, request: Request, body, kwargs: dict, track: _Track, request_id: str, created: int,
                      chat: bool) -> Response:
        """Server-sent events. The response starts with the first token, so that a request the broker
        refuses (busy, too long, no pipeline) still gets its HTTP status and OpenAI error body."""
        events = self.client.events(**kwargs)
        try:
            first = await _unless_disconnected(request, anext(events))
        except BaseException:
            await events.aclose()
            raise
        writer = ChunkWriter(chat, request_id, created, self.config.model_name, body.include_usage)
        text = CompletionText(self.decode, body.stop, self.decode_one)

        want_logprobs = body.logprobs_wanted is not None
        pending: list = []  # log-probabilities of tokens whose text has not gone out yet
        interval = self.config.stream_interval  # the first chunk goes at once: it is the time to first token

        def logprobs() -> dict | None:
            if not want_logprobs:
                return None
            out = self._logprobs(chat, body, pending)
            pending.clear()
            return out

        async def chunks():
            # One write per event (an event holds every token that came for the request since the last),
            # the role chunk going with the first text and the last chunk, usage and [DONE] together.
            outcome, reason = "client_disconnected", None
            head = writer.chunk("", role=True) if chat else b""
            try:
                event = first
                while True:
                    piece = self._push(text, event, track, pending if want_logprobs else None)
                    if text.stopped:
                        reason = "stop"
                        break
                    if event.finished:
                        reason = finish_reason(event.finish_reason)
                        break
                    if piece:
                        yield head + writer.chunk(piece, logprobs=logprobs())
                        head = b""
                    event = await anext(events)
                    while len(event.tokens) < interval and not event.finished:  # one chunk for several tokens
                        event = joined_events(event, await anext(events))
                rest = piece + ("" if text.stopped else text.finish())
                if text.stopped:
                    reason = "stop"
                tail = [head, writer.chunk(rest or (None if chat else ""), reason, logprobs=logprobs())]
                if writer.include_usage:
                    tail.append(writer.usage_chunk(track.prompt_tokens, track.tokens))
                tail.append(SSE_DONE)
                yield _Last(b"".join(tail))
                outcome = "success"
            except GenerationError as exc:  # after the response started: an error event, as OpenAI sends
                outcome = exc.code
                error = APIError.from_generation(exc.code, str(exc))
                yield _Last(head + b"data: " + dumps(error.body()) + b"\n\n" + SSE_DONE)
            finally:
                await events.aclose()  # cancels the request unless it ended
                track.end(outcome, reason if outcome == "success" else None)

        return EventStream(chunks(), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---------------------------------------------------------------------------------------------- process


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)


def read_api_keys(keys: list[str] | None, key_file: str | None) -> frozenset[str]:
    """Keys from the command line and from a file (one per line; blank lines and # comments skipped)."""
    found = [k.strip() for k in keys or [] if k.strip()]
    if key_file:
        for line in Path(key_file).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                found.append(line)
    return frozenset(found)


def gateway_config(config_path: str, model_name: str | None = None, api_keys: frozenset[str] = frozenset(),
                   default_chat_tokens: int = DEFAULT_CHAT_TOKENS, keys: str | None = None,
                   stream_interval: int = 1) -> GatewayConfig:
    from hexgen_zmq.operations.commands import client_credentials
    from hexgen_zmq.operations.deployment import load_deployment

    deployment = load_deployment(config_path, check_checkpoint=False)
    info = deployment.model_info()
    context = info.max_positions
    if sliding := info.raw.get("sliding_window"):
        context = min(context, int(sliding))  # as the broker limits it
    return GatewayConfig(deployment.broker.clients, str(deployment.model.path),
                         model_name or Path(deployment.model.path).name, context, api_keys, default_chat_tokens,
                         credentials=client_credentials(deployment, keys), stream_interval=stream_interval)


def cmd_serve(args: argparse.Namespace) -> int:
    """Entry of `hexgen-zmq serve` (its options: hexgen_zmq.operations.commands.add_serve_args)."""
    import uvicorn

    from hexgen_zmq.operations.deployment import DeploymentError
    from hexgen_zmq.wire.security import SecurityError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s [gateway] %(levelname)s %(message)s")
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        print("hexgen-zmq: --ssl-certfile and --ssl-keyfile go together", file=sys.stderr)
        return 2
    try:
        keys = read_api_keys(args.api_key, args.api_key_file)
        if args.stream_interval < 1:
            raise ValueError(f"--stream-interval must be at least 1, not {args.stream_interval}")
        config = gateway_config(args.config, args.model_name, keys, args.default_chat_tokens, args.keys,
                                args.stream_interval)
        tokenizer = load_tokenizer(config.model_path)
    except (DeploymentError, SecurityError, OSError, ValueError) as exc:
        print(f"hexgen-zmq: cannot serve: {exc}", file=sys.stderr)
        return 1
    gateway = Gateway(config, tokenizer)
    host, port = args.listen
    scheme = "https" if args.ssl_certfile else "http"
    log.info("serving %s on %s://%s:%d/v1 (broker %s, %s)", config.model_name, scheme, host, port, config.broker,
             f"{len(keys)} API key(s)" if keys else "no API key")
    uvicorn.run(gateway.app, host=host, port=port, loop="uvloop", http="httptools", log_level="warning",
                access_log=args.access_log, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
                timeout_graceful_shutdown=5)
    return 0
