"""The broker: `hexgen-zmq broker --config F`, the front door of a deployment.

Clients talk to its ROUTER. It checks each request (tokenizing text and chat messages), admits it to a
pipeline whose KV budget can hold it, the one where it would get its tokens fastest (each pipeline's observed
pace between tokens, scaled by its load), or queues it, up to a bound, then answers busy; and it streams
tokens back as the last stages report them. It is not on the per-token path between stages: the
decode loop closes inside each pipeline. It enforces deadlines, cancels work of clients that cancel or go
silent, watches stage heartbeats, and fails the requests of a pipeline that lost a stage with a clear error
while the other pipelines keep serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from hexgen_zmq.aio import run_until_first_failure
from hexgen_zmq.block_manager import BLOCK_SIZE, blocks_for
from hexgen_zmq.deployment import Deployment, DeploymentError, PipelineSpec, load_deployment
from hexgen_zmq.messages import (BrokerReady, Cancel, CancelRequest, ErrorEvent, GenerateRequest, Heartbeat,
                                 PipelineStatus, Ping, StageFailed, StageReady, StatusReply, StatusRequest, Submit,
                                 TokenEvent, TokenEvents, Tokens, WireError, decode_control, encode_control)
from hexgen_zmq.model_info import ModelInfo
from hexgen_zmq.sockets import CONTROL_MAX_BYTES, make_socket

log = logging.getLogger("broker")
TICK_S = 0.05
PACE_WEIGHT = 0.2  # of each step's new sample in a pipeline's pace (about the last 5 steps count)


class RequestError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class PipelineState:
    spec: PipelineSpec
    socket: zmq.asyncio.Socket
    last_seen: dict[str, float] = field(default_factory=dict)
    capacity_tokens: dict[str, int] = field(default_factory=dict)
    cached_requests: dict[str, int] = field(default_factory=dict)
    in_flight: set[int] = field(default_factory=set)
    reserved_blocks: int = 0
    healthy: bool = True
    pace_s: float | None = None  # seconds between two tokens of one request here (moving average)
    pace_load: float = 1.0  # requests in flight while that pace was seen (same average)

    def observe_pace(self, seconds: float, load: int) -> None:
        """One step's tokens came back: `seconds` since the previous token of the same requests, on average."""
        if self.pace_s is None:
            self.pace_s, self.pace_load = seconds, float(max(load, 1))
        else:
            self.pace_s += PACE_WEIGHT * (seconds - self.pace_s)
            self.pace_load += PACE_WEIGHT * (max(load, 1) - self.pace_load)

    def expected_pace_s(self) -> float:
        """The pace a request joining now would see, taking time per step as proportional to the requests in
        flight. That overstates what one more request costs a lightly loaded pipeline, so it errs towards
        spreading requests out; but it follows the load as soon as requests come or go, before any step has
        shown the change, and a faster pipeline ends up holding more requests than a slower one."""
        return (self.pace_s or 0.0) * (len(self.in_flight) + 1) / self.pace_load

    @property
    def ready(self) -> bool:
        return len(self.last_seen) == len(self.spec.stages)

    @property
    def capacity_blocks(self) -> int:
        return min(self.capacity_tokens.values()) // BLOCK_SIZE if self.ready else 0

    def silent_stage(self, now: float, timeout: float) -> str | None:
        for stage in self.spec.stages:
            seen = self.last_seen.get(stage.id)
            if seen is not None and now - seen > timeout:
                return stage.id
        return None


@dataclass
class InFlight:
    client: bytes
    client_request_id: int
    prompt: list[int]
    submit: Submit
    deadline: float
    blocks: int
    pipeline: str | None = None
    tokens: list[int] = field(default_factory=list)
    last_token_at: float | None = None


class Broker:
    def __init__(self, deployment: Deployment, notify: str | None = None):
        self.deployment = deployment
        self.config = deployment.broker
        self.info: ModelInfo = deployment.model_info()
        self.max_context = self.info.max_positions
        if sliding := self.info.raw.get("sliding_window"):
            self.max_context = min(self.max_context, int(sliding))  # attention ignores windows: stay inside one
        self.ctx = zmq.asyncio.Context()
        self.clients = make_socket(self.ctx, zmq.ROUTER, bind=self.config.clients, hwm=10000,
                                   max_bytes=CONTROL_MAX_BYTES)
        self.results = make_socket(self.ctx, zmq.PULL, bind=self.config.results, hwm=10000,
                                   max_bytes=CONTROL_MAX_BYTES)
        self.pipelines = {
            p.id: PipelineState(p, make_socket(self.ctx, zmq.PUSH, connect=p.stages[0].inbound,
                                               max_bytes=CONTROL_MAX_BYTES))
            for p in deployment.pipelines
        }
        self.stage_pipeline = {s.id: p.id for p in deployment.pipelines for s in p.stages}
        self.notify = make_socket(self.ctx, zmq.PUSH, connect=notify, max_bytes=CONTROL_MAX_BYTES) if notify else None
        self.requests: dict[int, InFlight] = {}
        self.by_client: dict[tuple[bytes, int], int] = {}
        self.client_seen: dict[bytes, float] = {}
        self.queue: deque[int] = deque()
        self.next_id = 1
        self.bad_messages = 0
        self.tokenizer = None
        self.client_handlers = {GenerateRequest: self.on_generate, CancelRequest: self.on_cancel_request,
                                Ping: self.on_ping, StatusRequest: self.on_status}
        self.result_handlers = {Tokens: self.on_tokens, Heartbeat: self.on_heartbeat, StageReady: self.on_ready,
                                StageFailed: self.on_stage_failed}

    # ------------------------------------------------------------------ helpers
    def load_tokenizer(self) -> None:
        """Load the checkpoint's tokenizer, if it has one, before serving (text prompts, chat, output text)."""
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.info.path, trust_remote_code=False)
        except Exception as exc:  # token-id requests still work
            log.warning("no usable tokenizer in %s (%s): only prompt_ids requests are served", self.info.path, exc)

    def need_tokenizer(self):
        if self.tokenizer is None:
            raise RequestError("invalid_request", "the checkpoint has no tokenizer: send prompt_ids")
        return self.tokenizer

    def reject(self, why: str) -> None:
        self.bad_messages += 1
        log.warning("rejected message #%d: %s", self.bad_messages, why)

    def to_client(self, client: bytes, message) -> None:
        try:
            self.clients.send_multipart([client, *encode_control(message)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # a client that vanished or stopped reading: its requests time out
            log.debug("dropping reply to a client: %s", exc)

    def fail(self, request_id: int, code: str, message: str, cancel: bool = True) -> None:
        request = self.requests.get(request_id)
        if request is None:
            return
        self.to_client(request.client, ErrorEvent(request.client_request_id, code, message))
        self.forget(request_id, cancel=cancel, reason=code)

    def forget(self, request_id: int, cancel: bool, reason: str = "cancelled") -> None:
        request = self.requests.pop(request_id)
        self.by_client.pop((request.client, request.client_request_id), None)
        if request_id in self.queue:
            self.queue.remove(request_id)
        if request.pipeline is not None:
            state = self.pipelines[request.pipeline]
            state.in_flight.discard(request_id)
            state.reserved_blocks -= request.blocks
            if cancel:
                state.socket.send_multipart(encode_control(Cancel([request_id], reason)), copy=False)

    # ------------------------------------------------------------------ requests
    def prompt_ids(self, message: GenerateRequest) -> list[int]:
        given = [x is not None for x in (message.prompt_ids, message.prompt, message.messages)]
        if sum(given) != 1:
            raise RequestError("invalid_request", "give exactly one of prompt_ids, prompt or messages")
        if message.prompt_ids is not None:
            ids = list(message.prompt_ids)
        elif message.prompt is not None:
            ids = self.need_tokenizer()(message.prompt, add_special_tokens=True)["input_ids"]
        else:
            chat = [{"role": m.role, "content": m.content} for m in message.messages]
            try:
                ids = self.need_tokenizer().apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                         return_dict=False)
            except RequestError:
                raise
            except Exception as exc:
                raise RequestError("invalid_request", f"cannot apply the chat template: {exc}") from None
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        if not ids:
            raise RequestError("invalid_request", "the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.info.vocab_size]
        if bad:
            raise RequestError("invalid_request", f"prompt token ids outside the vocabulary (size {self.info.vocab_size}): {bad[:5]}")
        return ids

    def on_generate(self, client: bytes, message: GenerateRequest) -> None:
        key = (client, message.client_request_id)
        if key in self.by_client:
            return self.to_client(client, ErrorEvent(message.client_request_id, "invalid_request",
                                                     "a request with this id is already running"))
        try:
            message.params.validate(self.info.vocab_size)
            prompt = self.prompt_ids(message)
            total = len(prompt) + message.params.max_new_tokens
            if total > self.max_context:
                raise RequestError("prompt_too_long", f"prompt of {len(prompt)} tokens + max_new_tokens "
                                   f"{message.params.max_new_tokens} exceeds the model's context of {self.max_context}")
            timeout = message.timeout_s or self.config.request_timeout_s
            if not timeout > 0:
                raise RequestError("invalid_request", f"timeout_s must be > 0, got {timeout}")
            live = [p for p in self.pipelines.values() if p.ready and p.healthy]
            if not live:
                raise RequestError("no_pipeline", "no pipeline is ready (still starting, or every pipeline lost a stage)")
            blocks = blocks_for(total)
            if blocks > max(p.capacity_blocks for p in live):
                raise RequestError("too_large", f"{total} tokens do not fit the KV cache of any pipeline")
        except RequestError as exc:
            return self.to_client(client, ErrorEvent(message.client_request_id, exc.code, str(exc)))
        except ValueError as exc:
            return self.to_client(client, ErrorEvent(message.client_request_id, "invalid_request", str(exc)))
        request_id = self.next_id
        self.next_id += 1
        submit = Submit(request_id, prompt, message.params, list(self.info.eos_token_ids), timeout)
        self.requests[request_id] = InFlight(client, message.client_request_id, prompt, submit,
                                             time.monotonic() + timeout, blocks)
        self.by_client[key] = request_id
        if not self.dispatch(request_id):
            if len(self.queue) >= self.config.queue_limit:
                return self.fail(request_id, "busy", f"all pipelines are full and {len(self.queue)} requests wait")
            self.queue.append(request_id)

    def dispatch(self, request_id: int) -> bool:
        """Send the request to the pipeline that can hold it and would serve it fastest; False when none can now."""
        request = self.requests[request_id]
        fits = [p for p in self.pipelines.values()
                if p.ready and p.healthy and p.reserved_blocks + request.blocks <= p.capacity_blocks]
        if not fits:
            return False
        state = min(fits, key=self.dispatch_order(fits))
        submit = Submit(request.submit.request_id, request.prompt, request.submit.params,
                        request.submit.eos_token_ids, request.submit.timeout_s, state.capacity_blocks)
        state.socket.send_multipart(encode_control(submit), copy=False)
        state.in_flight.add(request_id)
        state.reserved_blocks += request.blocks
        request.pipeline = state.spec.id
        return True

    @staticmethod
    def dispatch_order(candidates: list[PipelineState]):
        """Sort key among pipelines that can hold a request: the pace it would see (the pipelines' speeds
        differ), then the fewest requests in flight. Until every candidate has shown its pace, only the
        count: a pipeline not yet measured would otherwise look infinitely fast and take everything."""
        paced = all(p.pace_s is not None for p in candidates)

        def key(p: PipelineState) -> tuple:
            load = p.reserved_blocks / max(p.capacity_blocks, 1)
            return (p.expected_pace_s() if paced else 0.0, len(p.in_flight), load)
        return key

    def on_cancel_request(self, client: bytes, message: CancelRequest) -> None:
        request_id = self.by_client.get((client, message.client_request_id))
        if request_id is not None:
            self.fail(request_id, "cancelled", "cancelled by the client")

    def on_ping(self, client: bytes, message: Ping) -> None:
        pass  # receiving it refreshed client_seen

    def on_status(self, client: bytes, message: StatusRequest) -> None:
        pipelines = [PipelineStatus(p.spec.id, p.ready, p.healthy, len(p.in_flight), sorted(p.last_seen),
                                    dict(p.cached_requests))
                     for p in self.pipelines.values()]
        self.to_client(client, StatusReply(pipelines, len(self.queue)))

    # ------------------------------------------------------------------ results from stages
    def on_tokens(self, message: Tokens) -> None:
        """Stream one step's tokens: one message per client, however many of its requests moved."""
        by_client: dict[bytes, list[TokenEvent]] = {}
        now = time.monotonic()
        gaps: list[float] = []
        state = self.pipelines.get(message.pipeline_id)
        load = len(state.in_flight) if state is not None else 0
        for record in message.records:
            request = self.requests.get(record.request_id)
            if request is None or request.pipeline != message.pipeline_id:
                continue
            if request.last_token_at is not None:
                gaps.append(now - request.last_token_at)
            request.last_token_at = now
            if record.token < 0:
                self.fail(record.request_id, "stage_failed", record.reason or "a stage rejected the request")
                continue
            request.tokens.append(record.token)
            logprobs = [record.logprobs] if record.logprobs is not None else []
            if record.finished:
                text = self.tokenizer.decode(request.tokens, skip_special_tokens=True) if self.tokenizer else None
                event = TokenEvent(request.client_request_id, [record.token], True, record.reason, text,
                                   len(request.prompt), request.pipeline, logprobs)
            else:
                event = TokenEvent(request.client_request_id, [record.token], logprobs=logprobs)
            by_client.setdefault(request.client, []).append(event)
            if record.finished:
                self.forget(record.request_id, cancel=False)
        for client, events in by_client.items():
            self.to_client(client, events[0] if len(events) == 1 else TokenEvents(events))
        if gaps:
            state.observe_pace(sum(gaps) / len(gaps), load)

    def _seen(self, stage_id: str, capacity: int) -> None:
        pipeline = self.stage_pipeline.get(stage_id)
        if pipeline is None:
            return self.reject(f"heartbeat from unknown stage {stage_id!r}")
        state = self.pipelines[pipeline]
        state.last_seen[stage_id] = time.monotonic()
        if capacity > 0:
            state.capacity_tokens[stage_id] = capacity
        if not state.healthy and state.silent_stage(time.monotonic(), self.config.stage_timeout_s) is None \
                and state.ready:
            log.info("pipeline %s is healthy again", pipeline)
            state.healthy = True

    def on_heartbeat(self, message: Heartbeat) -> None:
        self._seen(message.stage_id, message.kv_capacity_tokens)
        if pipeline := self.stage_pipeline.get(message.stage_id):
            self.pipelines[pipeline].cached_requests[message.stage_id] = message.running

    def on_ready(self, message: StageReady) -> None:
        log.info("stage %s ready (pid %d, %d KV tokens)", message.stage_id, message.pid, message.kv_capacity_tokens)
        self._seen(message.stage_id, message.kv_capacity_tokens)

    def on_stage_failed(self, message: StageFailed) -> None:
        pipeline = self.stage_pipeline.get(message.stage_id)
        if pipeline is None:
            return self.reject(f"failure report from unknown stage {message.stage_id!r}")
        if message.request_ids:
            for request_id in message.request_ids:
                if request_id in self.requests and self.requests[request_id].pipeline == pipeline:
                    self.fail(request_id, "stage_failed", message.message)
        else:
            self.lose_pipeline(pipeline, message.message)

    def lose_pipeline(self, pipeline: str, why: str) -> None:
        state = self.pipelines[pipeline]
        if state.healthy:
            log.error("pipeline %s lost: %s", pipeline, why)
        state.healthy = False
        for request_id in list(state.in_flight):
            self.fail(request_id, "stage_failed", f"pipeline {pipeline} failed: {why}", cancel=True)

    # ------------------------------------------------------------------ loops
    async def client_loop(self) -> None:
        while True:
            frames = await self.clients.recv_multipart(copy=False)
            client = frames[0].bytes
            self.client_seen[client] = time.monotonic()
            try:
                message = decode_control(frames[1:])
                handler = self.client_handlers.get(type(message))
                if handler is None:
                    raise WireError(f"unexpected {type(message).__name__} from a client")
                handler(client, message)
            except WireError as exc:
                self.reject(str(exc))
            except Exception:
                log.exception("handling a client message failed")
                self.bad_messages += 1

    async def results_loop(self) -> None:
        while True:
            frames = await self.results.recv_multipart(copy=False)
            try:
                message = decode_control(frames)
                handler = self.result_handlers.get(type(message))
                if handler is None:
                    raise WireError(f"unexpected {type(message).__name__} on the results socket")
                handler(message)
            except WireError as exc:
                self.reject(str(exc))
            except Exception:
                log.exception("handling a result failed")
                self.bad_messages += 1

    def tick(self) -> None:
        now = time.monotonic()
        for request_id in [r for r, req in self.requests.items() if now > req.deadline]:
            self.fail(request_id, "timeout", "the request passed its deadline")
        for state in self.pipelines.values():
            if state.healthy and (silent := state.silent_stage(now, self.config.stage_timeout_s)):
                self.lose_pipeline(state.spec.id, f"stage {silent} stopped responding "
                                   f"(no heartbeat for {self.config.stage_timeout_s:g} s)")
        gone = {c for c, seen in self.client_seen.items() if now - seen > self.config.client_timeout_s}
        for client in gone:
            del self.client_seen[client]
            for request_id in [r for r, req in self.requests.items() if req.client == client]:
                log.info("client went away; cancelling request %d", request_id)
                self.forget(request_id, cancel=True, reason="client gone")
        while self.queue and self.dispatch(self.queue[0]):
            self.queue.popleft()

    async def tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.tick()
            except Exception:
                log.exception("broker tick failed")

    async def run(self) -> None:
        self.load_tokenizer()
        if self.info.ignored_generation_settings:
            log.warning("generation_config.json sets %s, which requests here do not apply",
                        ", ".join(self.info.ignored_generation_settings))
        if self.notify is not None:
            self.notify.send_multipart(encode_control(BrokerReady(os.getpid())))
        log.info("broker ready: clients at %s, results at %s", self.config.clients, self.config.results)
        try:
            await run_until_first_failure(self.client_loop(), self.results_loop(), self.tick_loop())
        finally:
            self.ctx.destroy(linger=200)


def run_broker(config: str, notify: str | None = None) -> int:
    """Entry of the broker process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [broker] %(levelname)s %(message)s")
    import uvloop

    try:
        uvloop.run(Broker(load_deployment(config), notify).run())
    except KeyboardInterrupt:
        pass
    except DeploymentError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0
