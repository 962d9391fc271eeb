"""The client library (contract): async first, with a small synchronous wrapper. No torch needed.

    client = await Client.connect("tcp://127.0.0.1:5555")
    result = await client.generate(prompt="Hello", max_new_tokens=16)
    async for token_id in client.stream(prompt_ids=[1, 2, 3], max_new_tokens=8): ...
    await client.close()

One task reads the DEALER socket and routes each event to its request: a stream's queue (errors travel
through the same queue), or, for `generate`, the request's token list, waking the caller once at the end.
Another pings the broker while requests are open, so the broker can tell a client that went away from one
that waits, and fails streams the broker has been silent about for too long (no timer per token). Leaving
a stream early, or cancelling the task, cancels the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from hexgen_zmq.wire.messages import (CancelRequest, ChatMessage, ErrorEvent, GenerateRequest, Ping, Pong, SamplingParams,
                                 StatusReply, StatusRequest, TokenEvent, TokenEvents, WireError, decode_control,
                                 encode_control, TokenLogprob)
from hexgen_zmq.wire.security import HANDSHAKE_FAILURES, ClientCurve
from hexgen_zmq.wire.sockets import CONTROL_MAX_BYTES, make_socket, send_now

PING_S = 0.5  # well inside the broker's client_timeout_s
SILENCE_S = 60.0  # beyond a request's own deadline: no word from the broker for this long means it is gone
DEFAULT_DEADLINE_S = 300.0  # the broker's default request_timeout_s


class GenerationError(RuntimeError):
    """The broker refused or failed a request; `code` says why (busy, timeout, stage_failed, ...)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass
class GenerationResult:
    token_ids: list[int]  # the new tokens only
    text: str | None
    finish_reason: str | None
    ttft_s: float
    total_s: float
    prompt_tokens: int = 0
    pipeline: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token, when asked for (logprobs=K)

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.total_s if self.total_s > 0 else 0.0


@dataclass
class _Open:
    """A request in flight. A stream gets every event through `queue`; a generate call (with a `done` future)
    has the reader gather its tokens and wakes once, when `done` resolves: no task switch per token."""

    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    done: asyncio.Future | None = None
    tokens: list[int] = field(default_factory=list)
    first_at: float | None = None  # perf_counter() of the first token
    logprobs: list[TokenLogprob] = field(default_factory=list)
    request: GenerateRequest | None = None  # what to resubmit should a new broker answer
    received: list[int] = field(default_factory=list)  # every token so far, in order (both modes)
    broker: int | None = None  # the broker incarnation it was last submitted to, when known
    heard: float = field(default_factory=time.monotonic)  # when the broker last sent something for it

    def accept(self, event: TokenEvent) -> TokenEvent | ErrorEvent | None:
        """Stream integrity: tokens already received are dropped (a replay or a resubmission may send them
        again), a gap is an error, never silently skipped. None when nothing new is left."""
        if event.index < 0:  # a broker that does not number its events
            self.received.extend(event.tokens)
            return event
        have = len(self.received)
        if event.index > have:
            return ErrorEvent(event.client_request_id, "stream_gap",
                              f"tokens from position {event.index} arrived, but only {have} had come before")
        skip = have - event.index
        if skip:
            if skip >= len(event.tokens) and not event.finished:
                return None
            event = msgspec.structs.replace(event, tokens=event.tokens[skip:], logprobs=event.logprobs[skip:],
                                            index=have)
        self.received.extend(event.tokens)
        return event

    def deliver(self, event: TokenEvent | ErrorEvent) -> None:
        self.heard = time.monotonic()
        if self.done is None:
            self.queue.put_nowait(event)
        elif self.done.done():
            return
        elif isinstance(event, ErrorEvent):
            self.done.set_exception(GenerationError(event.code, event.message))
        else:
            if self.first_at is None:
                self.first_at = time.perf_counter()
            self.tokens.extend(event.tokens)
            self.logprobs.extend(event.logprobs)
            if event.finished:
                self.done.set_result(event)


def joined_events(event: TokenEvent, following: TokenEvent) -> TokenEvent:
    """Two consecutive events of one request as one: the tokens of both, the rest of the later one."""
    return msgspec.structs.replace(following, tokens=event.tokens + following.tokens,
                                   logprobs=event.logprobs + following.logprobs, index=event.index)


def _request(client_request_id: int, prompt_ids, prompt, messages, max_new_tokens, temperature, top_k, top_p, seed,
             stop_token_ids, timeout_s, ignore_eos, logprobs=None) -> GenerateRequest:
    if temperature and temperature > 0 and seed is None:  # a seed of its own: a resubmission draws the same tokens
        seed = secrets.randbits(63)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k, top_p=top_p,
                            seed=seed, stop_token_ids=list(stop_token_ids or []), ignore_eos=ignore_eos,
                            logprobs=logprobs)
    chat = None
    if messages is not None:
        chat = [m if isinstance(m, ChatMessage) else ChatMessage(m["role"], m["content"]) for m in messages]
    return GenerateRequest(client_request_id, params, list(prompt_ids) if prompt_ids is not None else None, prompt,
                           chat, timeout_s)


class Client:
    def __init__(self, address: str, silence_s: float = SILENCE_S, keys: str | None = None,
                 server_key: str | None = None):
        self.address = address
        self.silence_s = silence_s  # how long past a request's deadline to wait for a broker that went quiet
        # One context for every client of the process, never terminated: a client dropped without close()
        # has its socket closed by the garbage collector (bounded by LINGER), where terminating a context of
        # its own could block that collection, wherever it happens, for good.
        self.ctx = zmq.asyncio.Context.instance()
        curve = None
        if keys is not None or server_key is not None:
            if keys is None or server_key is None:
                raise GenerationError("invalid_request", "CURVE needs both keys= (the client's secret key file) "
                                                         "and server_key= (the broker host's public key)")
            curve = ClientCurve(keys, server_key)
        # A refused handshake is not retried and leaves sends waiting for good; the socket's events tell why, so
        # requests fail with a clear error instead of timing out. The monitor is attached before the socket
        # connects: attached after, it could miss the one event there is (seen on a loaded machine).
        monitors: list[zmq.Socket] = []

        def watch(sock: zmq.Socket) -> None:
            monitors.append(sock.get_monitor_socket(sum(HANDSHAKE_FAILURES)))

        self.socket = make_socket(self.ctx, zmq.DEALER, connect=address, hwm=10000, max_bytes=CONTROL_MAX_BYTES,
                                  identity=os.urandom(8), security=curve, before_connect=watch)
        [self._monitor] = monitors
        self._auth_error: str | None = None
        self._refused = asyncio.Event()  # set with _auth_error
        self._ids = itertools.count(1)
        self._open: dict[int, _Open] = {}
        self._status: dict[int, asyncio.Future] = {}  # by nonce: concurrent status() calls each get theirs
        self._nonces = itertools.count(1)
        self._broker: int | None = None  # the broker incarnation last heard from (Pong)
        self._tasks: list[asyncio.Task] = []

    @classmethod
    def connect(cls, address: str, silence_s: float = SILENCE_S, keys: str | None = None,
                server_key: str | None = None) -> _Connecting:
        """`client = await Client.connect(addr)`, or `async with Client.connect(addr) as client:`. For a
        broker off loopback with CURVE: `keys` is this client's secret key file (`hexgen-zmq keys`), and
        `server_key` the public key of the broker's host."""
        return _Connecting(cls, address, silence_s, keys, server_key)

    def _start(self) -> Client:
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._ping()),
                       asyncio.create_task(self._watch_handshakes())]
        return self

    async def _watch_handshakes(self) -> None:
        from zmq.utils.monitor import parse_monitor_message

        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            why = HANDSHAKE_FAILURES.get(event["event"])
            if why is None or self._auth_error is not None:
                continue
            self._auth_error = (f"CURVE authentication with the broker at {self.address} failed: {why} "
                                f"(code {event['value']})")
            self._refused.set()
            for client_request_id, entry in list(self._open.items()):
                entry.deliver(ErrorEvent(client_request_id, "unauthenticated", self._auth_error))
            for waiter in self._status.values():
                if not waiter.done():
                    waiter.set_exception(GenerationError("unauthenticated", self._auth_error))

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        for request_id in list(self._open):
            await self._send(CancelRequest(request_id))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.socket.disable_monitor()
        self._monitor.close(linger=0)
        self.socket.close(linger=200)

    async def _send(self, message) -> None:
        if self._auth_error is not None:
            raise GenerationError("unauthenticated", self._auth_error)
        frames = encode_control(message)
        if len(frames[0]) > CONTROL_MAX_BYTES:  # the broker would drop it and the connection with it
            raise GenerationError("invalid_request", f"request of {len(frames[0])} bytes exceeds the "
                                                     f"{CONTROL_MAX_BYTES}-byte message limit")
        send = asyncio.ensure_future(self.socket.send_multipart(frames))
        if not send.done():  # no peer to take it yet: a refused handshake would leave it waiting for good
            refused = asyncio.ensure_future(self._refused.wait())
            await asyncio.wait({send, refused}, return_when=asyncio.FIRST_COMPLETED)
            refused.cancel()
            if not send.done():
                send.cancel()
                raise GenerationError("unauthenticated", self._auth_error)
        send.result()

    async def _read(self) -> None:
        while True:
            frames = await self.socket.recv_multipart()
            try:
                message = decode_control(frames)
            except WireError:
                continue
            if isinstance(message, StatusReply):
                waiter = self._status.pop(message.nonce, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(message)
                continue
            if isinstance(message, Pong):
                await self._on_broker(message.broker)
                continue
            events = message.events if isinstance(message, TokenEvents) else (message,)
            for event in events:
                if isinstance(event, (TokenEvent, ErrorEvent)):
                    entry = self._open.get(event.client_request_id)
                    if entry is not None:
                        if isinstance(event, TokenEvent):
                            event = entry.accept(event)
                        if event is not None:
                            entry.deliver(event)

    async def _on_broker(self, epoch: int) -> None:
        """A Pong says which broker incarnation answers. When it is a new one (the broker restarted at the same
        address), every open request is submitted again with the tokens received so far: the new broker goes
        on from there, and callers see nothing but a pause."""
        self._broker = epoch
        for client_request_id, entry in list(self._open.items()):
            if entry.request is None:
                continue
            if entry.broker is None:
                entry.broker = epoch
            elif entry.broker != epoch:
                entry.broker = epoch
                await self._send(msgspec.structs.replace(entry.request, resume=list(entry.received)))

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(PING_S)
            if self._open:
                await self._send(Ping())
                self._fail_silent_streams()

    def _fail_silent_streams(self) -> None:
        """A stream the broker said nothing about for its patience gets a timeout error (generate calls
        time out by themselves)."""
        now = time.monotonic()
        for client_request_id, entry in self._open.items():
            if entry.done is None and entry.request is not None and \
                    now - entry.heard > (patience := self._patience(entry.request)):
                entry.heard = now  # one error each time the patience runs out, not one per ping
                entry.queue.put_nowait(self._silent(patience))  # raised as it is, and cancels the request

    async def status(self, timeout_s: float = 5.0) -> StatusReply:
        """The broker's view of its pipelines (ready, healthy, load)."""
        nonce = next(self._nonces)
        self._status[nonce] = waiter = asyncio.get_running_loop().create_future()
        try:
            await self._send(StatusRequest(nonce))
            return await asyncio.wait_for(waiter, timeout_s)
        finally:
            self._status.pop(nonce, None)

    @contextlib.asynccontextmanager
    async def _opened(self, request: GenerateRequest, entry: _Open):
        """Register the request and send it; on the way out forget it, and cancel it at the broker unless it
        ended (finished or failed there)."""
        request_id = request.client_request_id
        entry.request, entry.broker = request, self._broker
        self._open[request_id] = entry
        ended = [False]
        try:
            await self._send(request)
            if self._broker is None:  # learn which broker took it, so a restart of it can be told
                await self._send(Ping())
            yield ended
        finally:
            self._open.pop(request_id, None)
            if not ended[0]:
                with contextlib.suppress(zmq.ZMQError):
                    send_now(self.socket, encode_control(CancelRequest(request_id)))

    def _patience(self, request: GenerateRequest) -> float:
        """How long to wait for word from the broker: past the request's own deadline, it is gone."""
        return (request.timeout_s or DEFAULT_DEADLINE_S) + self.silence_s

    def _silent(self, patience: float) -> GenerationError:
        return GenerationError("timeout", f"no answer from the broker at {self.address} for {patience:g} s")

    async def _events(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        """The request's events; those that were already waiting when the consumer came back for more are
        joined into one (a consumer that fell behind catches up in one step). The ping task ends a stream
        the broker went silent about."""
        entry = _Open()
        queue = entry.queue
        held = None  # an error that arrived behind tokens, raised after them
        async with self._opened(request, entry) as ended:
            while True:
                if held is not None:
                    event, held = held, None
                else:
                    event = queue.get_nowait() if queue.qsize() else await queue.get()
                if isinstance(event, GenerationError):  # the broker went silent: cancel it there too
                    raise event
                if isinstance(event, ErrorEvent):
                    ended[0] = True
                    raise GenerationError(event.code, event.message)
                while queue.qsize() and not event.finished:
                    following = queue.get_nowait()
                    if not isinstance(following, TokenEvent):
                        held = following
                        break
                    event = joined_events(event, following)
                ended[0] = event.finished
                yield event
                if event.finished:
                    return

    def events(self, prompt_ids: list[int] | None = None, prompt: str | None = None, *, messages=None,
               max_new_tokens: int = 16, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, stop_token_ids: list[int] | None = None,
               timeout_s: float | None = None, ignore_eos: bool = False,
               logprobs: int | None = None) -> AsyncIterator[TokenEvent]:
        """An async generator of the broker's TokenEvents as they come: the tokens of each step (of several
        steps, joined, when the caller fell behind), and on the last one the finish reason, prompt length
        and pipeline (what an HTTP front end reports). Leaving early (aclose) cancels. `logprobs=K`: each
        event also carries its tokens' log-probabilities and K top alternatives."""
        request = _request(next(self._ids), prompt_ids, prompt, messages, max_new_tokens, temperature, top_k, top_p,
                           seed, stop_token_ids, timeout_s, ignore_eos, logprobs)
        return self._events(request)  # itself: one generator less for every event to pass through

    async def stream(self, prompt_ids: list[int] | None = None, prompt: str | None = None, *, messages=None,
                     max_new_tokens: int = 16, temperature: float = 0.0, top_k: int | None = None,
                     top_p: float | None = None, seed: int | None = None, stop_token_ids: list[int] | None = None,
                     timeout_s: float | None = None, ignore_eos: bool = False,
                     logprobs: int | None = None) -> AsyncIterator[int]:
        """Yield each new token id as the pipeline produces it."""
        request = _request(next(self._ids), prompt_ids, prompt, messages, max_new_tokens, temperature, top_k, top_p,
                           seed, stop_token_ids, timeout_s, ignore_eos, logprobs)
        events = self._events(request)
        try:
            async for event in events:
                for token in event.tokens:
                    yield token
        finally:
            await events.aclose()

    async def generate(self, prompt_ids: list[int] | None = None, prompt: str | None = None, *, messages=None,
                       max_new_tokens: int = 16, temperature: float = 0.0, top_k: int | None = None,
                       top_p: float | None = None, seed: int | None = None, stop_token_ids: list[int] | None = None,
                       timeout_s: float | None = None, ignore_eos: bool = False,
                       logprobs: int | None = None) -> GenerationResult:
        """Run a request to the end and return its tokens, text and timings (and with `logprobs=K` each
        token's log-probability and K top alternatives)."""
        request = _request(next(self._ids), prompt_ids, prompt, messages, max_new_tokens, temperature, top_k, top_p,
                           seed, stop_token_ids, timeout_s, ignore_eos, logprobs)
        entry = _Open(done=asyncio.get_running_loop().create_future())
        patience = self._patience(request)  # the broker ends every request by its deadline
        start = time.perf_counter()
        async with self._opened(request, entry) as ended:
            try:
                async with asyncio.timeout(patience):
                    last = await entry.done
            except TimeoutError:
                raise self._silent(patience) from None
            except GenerationError:
                ended[0] = True
                raise
            ended[0] = True
        total = time.perf_counter() - start
        return GenerationResult(entry.tokens, last.text, last.finish_reason, entry.first_at - start, total,
                                last.prompt_tokens, last.pipeline, entry.logprobs if logprobs is not None else None)


class _Connecting:
    """What `Client.connect` returns: awaitable, and usable directly as an async context manager."""

    def __init__(self, cls: type[Client], address: str, silence_s: float, keys: str | None = None,
                 server_key: str | None = None):
        self._cls, self._address, self._silence_s = cls, address, silence_s
        self._keys, self._server_key = keys, server_key
        self._client: Client | None = None

    async def _open(self) -> Client:
        return self._cls(self._address, self._silence_s, self._keys, self._server_key)._start()

    def __await__(self):
        return self._open().__await__()

    async def __aenter__(self) -> Client:
        self._client = await self._open()
        return self._client

    async def __aexit__(self, *exc) -> None:
        await self._client.close()


class SyncClient:
    """A blocking wrapper for scripts: runs a Client on an event loop in a background thread."""

    def __init__(self, address: str, keys: str | None = None, server_key: str | None = None):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="hexgen-client")
        self._thread.start()
        self._client: Client = self._call(self._connect(address, keys, server_key))

    @staticmethod
    async def _connect(address: str, keys: str | None, server_key: str | None) -> Client:
        return await Client.connect(address, keys=keys, server_key=server_key)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, *args, **kwargs) -> GenerationResult:
        return self._call(self._client.generate(*args, **kwargs))

    def stream(self, *args, **kwargs) -> Iterator[int]:
        agen = self._client.stream(*args, **kwargs)
        try:
            while True:
                try:
                    yield self._call(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._call(agen.aclose())

    def status(self) -> StatusReply:
        return self._call(self._client.status())

    def close(self) -> None:
        self._call(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
