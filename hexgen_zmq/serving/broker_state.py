"""The broker's decisions as a plain state machine: the request table (every request in flight across its
attempts: prompt, parameters, tokens emitted), each pipeline's lifecycle (starting until every stage is
heard from, serving, failed, draining), dispatch, admission by KV budget, the progress watchdog, and replay.

Events in, messages out: `on_client_message`, `on_stage_message` and `tick` append what must be sent to
`outbox` (ToClient, ToPipeline), with no sockets and no torch, so that unit tests drive it in milliseconds;
the broker process (`brokers/broker.py`) is the thin I/O shell that feeds it and sends its outbox.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import msgspec

from hexgen_zmq.serving.pace import PACE_WEIGHT, PaceEstimate, dispatch_key  # noqa: F401 (PACE_WEIGHT: as before)
from hexgen_zmq.stage.block_manager import BLOCK_SIZE, blocks_for
from hexgen_zmq.operations.deployment import Deployment, PipelineSpec
from hexgen_zmq.wire.messages import (BrokerEpoch, Cancel, CancelRequest, ErrorEvent, GenerateRequest, Heartbeat, HostReport,
                                 Message, PipelineStatus, Ping, Pong, StageCounters, StageFailed, StageReady,
                                 StatusReply, StatusRequest, Submit, TokenEvent, TokenEvents, Tokens)
from hexgen_zmq.model.info import ModelInfo
from hexgen_zmq.serving.replay import continuation, replayable

log = logging.getLogger("broker")
EPOCH_EVERY_S = 1.0  # how often first stages are reminded which broker incarnation serves
LONG_STEP_S = 1.0  # a step running this long, as a heartbeat reports it, holds off the progress watchdog
MAX_PROMPT_CHARS = 4_000_000  # text and chat prompts beyond this are refused before tokenizing
HOST_REPORT_KEPT_S = 30.0  # a supervisor not heard from for this long drops out of `status`


class RequestError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class PipelineState(PaceEstimate):
    spec: PipelineSpec
    version: str = ""  # Deployment.pipeline_version: stage messages of another version are not this pipeline's
    key: str = ""  # in the broker's tables: the id while current, "ID@VERSION" once a redeploy retired it
    retire_by: float | None = None  # retired by a redeploy, finishing its requests: until then at the latest
    last_seen: dict[str, float] = field(default_factory=dict)  # per stage, of its current incarnation
    incarnations: dict[str, int] = field(default_factory=dict)  # per stage: the incarnation serving now
    dead: set[int] = field(default_factory=set)  # incarnations that failed or were replaced
    capacity_tokens: dict[str, int] = field(default_factory=dict)
    cached_requests: dict[str, int] = field(default_factory=dict)
    in_flight: set[int] = field(default_factory=set)
    reserved_blocks: int = 0
    healthy: bool = True
    draining: bool = False  # takes no new requests (its requests were moved elsewhere)
    failure: str | None = None  # why it is unhealthy
    kv_blocks_used: dict[str, int] = field(default_factory=dict)
    kv_blocks_total: dict[str, int] = field(default_factory=dict)
    bad_messages: dict[str, int] = field(default_factory=dict)
    counters: dict[str, StageCounters] = field(default_factory=dict)  # per stage, from its heartbeats
    rejected_peers: dict[str, dict[str, int]] = field(default_factory=dict)  # per stage: refused peers
    long_step_seen: float = 0.0  # when a stage last reported a step that had run LONG_STEP_S, not yet stuck
    pace_s: float | None = None  # seconds between two tokens of one request here (moving average)
    pace_load: float = 1.0  # requests in flight while that pace was seen (same average); see serving/pace.py

    @property
    def ready(self) -> bool:
        return len(self.incarnations) == len(self.spec.stages)

    @property
    def capacity_blocks(self) -> int:
        return min(self.capacity_tokens.values()) // BLOCK_SIZE if self.ready else 0

    @property
    def retiring(self) -> bool:
        return self.retire_by is not None

    def silent_stage(self, now: float, timeout: float) -> str | None:
        for stage in self.spec.stages:
            seen = self.last_seen.get(stage.id)
            if seen is not None and now - seen > timeout:
                return stage.id
        return None


@dataclass
class InFlight:
    """A client's request, across its attempts: `submit` is the current attempt (its id is the key of the
    broker's table), `first` the attempt with the original prompt, `tokens` every token emitted so far."""

    client: bytes
    client_request_id: int
    prompt: list[int]
    submit: Submit
    deadline: float
    blocks: int
    pipeline: str | None = None
    tokens: list[int] = field(default_factory=list)
    last_token_at: float | None = None
    dispatched_at: float | None = None
    first: Submit | None = None
    max_new_tokens: int = 0
    attempts: int = 1

    def stalled_s(self, now: float, busy_at: float = 0.0) -> float:
        """Seconds since this request last moved on its pipeline (dispatched, a token came, or the pipeline
        was seen in the middle of a long step at `busy_at`)."""
        moved = max(t for t in (self.last_token_at, self.dispatched_at, busy_at) if t is not None)
        return now - moved


@dataclass
class Tokenizing:
    """A text or chat request whose prompt is being tokenized off the event loop."""

    cancelled: bool = False


@dataclass(frozen=True)
class ToClient:
    client: bytes
    message: Message


@dataclass(frozen=True)
class ToPipeline:
    pipeline: str  # to its first stage
    message: Message


class BrokerState:
    """Everything the broker decides, as a plain state machine: events in (a client's request or cancel, a
    stage's tokens, heartbeat, ready or failure report, the clock's tick), messages out, appended to
    `outbox` as ToClient / ToPipeline. No sockets and no torch: unit tests drive it with events and read the
    outbox; the broker process (`brokers/broker.py`) is the I/O shell around it."""

    def __init__(self, deployment: Deployment, info: ModelInfo, clock=time.monotonic):
        self.deployment = deployment
        self.config = deployment.broker
        self.info = info
        self.clock = clock
        self.max_context = self.info.max_positions
        if sliding := self.info.raw.get("sliding_window"):
            self.max_context = min(self.max_context, int(sliding))  # attention ignores windows: stay inside one
        self.pipelines: dict[str, PipelineState] = {}  # the current version of each pipeline, by id
        self.retiring: dict[str, PipelineState] = {}  # versions a redeploy removed, finishing their requests
        self.stage_pipeline: dict[str, str] = {}  # stage id -> id of its current pipeline
        self.set_pipelines(deployment)
        self.redeploys = 0
        self.stale_messages = 0  # messages of a pipeline version that is gone (or not adopted yet)
        self.file_version = ""
        self.file_error: str | None = None
        self.requests: dict[int, InFlight] = {}
        self.by_client: dict[tuple[bytes, int], int] = {}
        self.tokenizing: dict[tuple[bytes, int], Tokenizing] = {}
        self.client_seen: dict[bytes, float] = {}
        self.queue: deque[int] = deque()
        # This incarnation: its start time orders it after any earlier one (stages drop the orphans of those),
        # and 31 random bits in every request id keep ids of different incarnations apart.
        self.epoch = time.time_ns() // 1000
        self.id_base = secrets.randbits(31) << 32
        self.next_id = 1
        self.bad_messages = 0
        self.replayed = self.attempts = self.gave_up = 0
        self.failed_by_code: Counter[str] = Counter()
        self.tokenizer = self.encoder = None  # set by whoever loads them (the broker process)
        self.max_token_chars = 0  # the tokenizer's longest vocabulary entry, in characters (0: unknown)
        self.last_tick = clock()
        self.last_epoch_sent = 0.0
        self.outbox: list[ToClient | ToPipeline] = []
        self.client_handlers = {GenerateRequest: self.on_generate, CancelRequest: self.on_cancel_request,
                                Ping: self.on_ping, StatusRequest: self.on_status}
        self.stage_handlers = {Tokens: self.on_tokens, Heartbeat: self.on_heartbeat, StageReady: self.on_ready,
                               StageFailed: self.on_stage_failed, HostReport: self.on_host_report}
        self.hosts: dict[str, HostReport] = {}  # the latest report of each supervisor
        self.hosts_seen: dict[str, float] = {}

    def to_client(self, client: bytes, message) -> None:
        self.outbox.append(ToClient(client, message))

    def to_pipeline(self, state: PipelineState, message) -> None:
        self.outbox.append(ToPipeline(state.key, message))

    def set_pipelines(self, deployment: Deployment) -> None:
        """Make each pipeline of `deployment` current: one whose version is unchanged keeps its state, a new or
        changed one starts from nothing (ready once each of its stages is heard from at that version)."""
        current = {}
        for spec in deployment.pipelines:
            version = deployment.pipeline_version(spec)
            state = self.pipelines.get(spec.id)
            if state is None or state.version != version:
                state = PipelineState(spec, version, spec.id)
            current[spec.id] = state
        self.pipelines = current
        self.stage_pipeline = {s.id: p.id for p in deployment.pipelines for s in p.stages}

    def state_of(self, key: str) -> PipelineState:
        return self.pipelines.get(key) or self.retiring[key]

    def every_pipeline(self) -> list[PipelineState]:
        return [*self.pipelines.values(), *self.retiring.values()]

    def routes(self) -> dict[str, str]:
        """Where each pipeline's messages go (its first stage's inbound), by key: for the I/O shell."""
        return {state.key: state.spec.stages[0].inbound for state in self.every_pipeline()}

    def redeploy(self, deployment: Deployment, file_version: str = "") -> dict[str, str]:
        """Adopt a new version of the deployment file. Pipelines whose version is unchanged go on untouched;
        one removed or changed takes no new requests, and its requests move to other pipelines at once
        (`redeploy: replay`, from the tokens they have, not counted as a failed attempt) or finish where
        they are until `drain_timeout_s`, then move (`finish`); new and changed pipelines take requests once
        each of their stages is heard from at the new version. Returns the keys renamed {old: new} (a
        retired pipeline is "ID@VERSION"), for the shell to move its sockets."""
        old = self.pipelines
        self.deployment, self.config = deployment, deployment.broker
        self.set_pipelines(deployment)
        self.redeploys += 1
        self.file_version, self.file_error = file_version, None
        renamed: dict[str, str] = {}
        now = self.clock()
        for pipeline_id, state in old.items():
            if self.pipelines.get(pipeline_id) is state:
                continue
            state.key = f"{pipeline_id}@{state.version}"
            renamed[pipeline_id] = state.key
            self.retiring[state.key] = state
            for request_id in state.in_flight:
                self.requests[request_id].pipeline = state.key
            state.retire_by = now + (self.config.drain_timeout_s if self.config.redeploy == "finish" else 0.0)
            log.info("redeploy: pipeline %s (version %s) retires%s", pipeline_id, state.version,
                     f", finishing {len(state.in_flight)} requests" if state.in_flight and self.config.redeploy == "finish"
                     else "")
        self.end_retired(now)
        self.dispatch_queued()
        return renamed

    def refuse_file(self, error: str) -> None:
        """A new version of the deployment file was invalid: the running one keeps serving."""
        self.file_error = error

    def end_retired(self, now: float) -> None:
        """A retired pipeline that has no requests left, or whose deadline passed, is gone: what it still
        has moves to other pipelines."""
        for key, state in list(self.retiring.items()):
            if state.in_flight and now < state.retire_by:
                continue
            state.draining = True
            for request_id in list(state.in_flight):
                self.replay(request_id, "stage_failed", f"pipeline {state.spec.id} was redeployed", counted=False)
            del self.retiring[key]

    def on_client_message(self, client: bytes, message) -> None:
        """One decoded message from a client; what it may not send is counted and dropped."""
        self.client_seen[client] = self.clock()
        handler = self.client_handlers.get(type(message))
        if handler is None:
            return self.reject(f"unexpected {type(message).__name__} from a client")
        handler(client, message)

    def on_stage_message(self, message) -> None:
        """One decoded message from a stage (the results socket)."""
        handler = self.stage_handlers.get(type(message))
        if handler is None:
            return self.reject(f"unexpected {type(message).__name__} on the results socket")
        handler(message)

    def drain(self, pipeline: str, why: str, healthy: bool) -> None:
        """Move every request off a pipeline, each to a new attempt elsewhere (from the tokens it has), and
        take no new ones there: what a lost pipeline needs, and what a redeploy that removes one will."""
        state = self.state_of(pipeline)
        state.draining = healthy
        for request_id in list(state.in_flight):
            self.replay(request_id, "stage_failed", f"pipeline {pipeline} {'drained' if healthy else 'failed'}: {why}")

    def text_of(self, tokens: list[int]) -> str | None:
        """A finished request's text, decoded on the loop; None without a tokenizer or when it fails."""
        if self.tokenizer is None:
            return None
        try:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)
        except Exception:
            log.exception("decoding a request's text failed")
            return None

    def reject(self, why: str) -> None:
        self.bad_messages += 1
        log.warning("rejected message #%d: %s", self.bad_messages, why)

    def fail(self, request_id: int, code: str, message: str, cancel: bool = True) -> None:
        request = self.requests.get(request_id)
        if request is None:
            return
        self.failed_by_code[code] += 1
        self.to_client(request.client, ErrorEvent(request.client_request_id, code, message))
        self.forget(request_id, cancel=cancel, reason=code)

    def cancel_at(self, state: PipelineState, request_ids: list[int], reason: str) -> None:
        self.to_pipeline(state, Cancel(request_ids, reason, self.epoch))

    def forget(self, request_id: int, cancel: bool, reason: str = "cancelled") -> None:
        request = self.requests.pop(request_id)
        self.by_client.pop((request.client, request.client_request_id), None)
        if request_id in self.queue:
            self.queue.remove(request_id)
        if request.pipeline is not None:
            state = self.state_of(request.pipeline)
            state.in_flight.discard(request_id)
            state.reserved_blocks -= request.blocks
            if cancel:
                self.cancel_at(state, [request_id], reason)

    def need_tokenizer(self):
        """The tokenizer that prompts are encoded with (on the tokenizing thread only)."""
        if self.encoder is None:
            raise RequestError("invalid_request", "the checkpoint has no tokenizer: send prompt_ids")
        return self.encoder

    def prompt_ids(self, message: GenerateRequest) -> list[int]:
        given = [x is not None for x in (message.prompt_ids, message.prompt, message.messages)]
        if sum(given) != 1:
            raise RequestError("invalid_request", "give exactly one of prompt_ids, prompt or messages")
        if message.prompt_ids is not None:
            ids = list(message.prompt_ids)
        elif message.prompt is not None:
            ids = self.need_tokenizer()(message.prompt, add_special_tokens=True)["input_ids"]
        else:
            self.need_tokenizer()
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
        bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < self.info.vocab_size)]
        if bad:
            raise RequestError("invalid_request", f"prompt token ids outside the vocabulary (size {self.info.vocab_size}): {bad[:5]}")
        return ids

    def on_generate(self, client: bytes, message: GenerateRequest) -> None:
        key = (client, message.client_request_id)
        if key in self.by_client or key in self.tokenizing:
            return self.to_client(client, ErrorEvent(message.client_request_id, "invalid_request",
                                                     "a request with this id is already running"))
        try:
            message.params.validate(self.info.vocab_size)
            timeout = message.timeout_s if message.timeout_s is not None else self.config.request_timeout_s
            if not 0 < timeout < 1e9:
                raise RequestError("invalid_request", f"timeout_s must be in (0, 1e9), got {timeout}")
            if message.prompt_ids is None:
                text = message.prompt or ""
                size = len(text) + sum(len(m.content) + len(m.role) for m in message.messages or ())
                if size > MAX_PROMPT_CHARS:
                    raise RequestError("prompt_too_long", f"a prompt of {size} characters exceeds {MAX_PROMPT_CHARS}")
                self.need_tokenizer()
                # No token covers more than the longest vocabulary entry (twice that, for normalizers that
                # shrink text): a text too long for the context even so is refused without tokenizing it.
                if self.max_token_chars and size / (2 * self.max_token_chars) > self.max_context:
                    raise RequestError("prompt_too_long", f"a prompt of {size} characters is at least "
                                       f"{size // (2 * self.max_token_chars)} tokens, past the model's context "
                                       f"of {self.max_context}")
        except RequestError as exc:
            return self.reply_error(client, message.client_request_id, exc.code, str(exc))
        except ValueError as exc:
            return self.reply_error(client, message.client_request_id, "invalid_request", str(exc))
        if message.prompt_ids is not None:
            prompt, error = self.encode_prompt(message)
            if prompt is None:
                return self.reply_error(client, message.client_request_id, *error)
            return self.admit(client, message, prompt, timeout)
        self.tokenizing[key] = Tokenizing()
        self.start_tokenizing(client, message, timeout)

    def encode_prompt(self, message: GenerateRequest) -> tuple[list[int] | None, tuple[str, str] | None]:
        """The request's prompt as checked token ids, or the (code, message) of why it has none."""
        try:
            return self.prompt_ids(message), None
        except RequestError as exc:
            return None, (exc.code, str(exc))
        except Exception as exc:
            return None, ("invalid_request", f"cannot tokenize the prompt: {exc}")

    def start_tokenizing(self, client: bytes, message: GenerateRequest, timeout: float) -> None:
        """Tokenize a text or chat request, then admit it. Here inline; the broker process does it on a
        thread of its own (a long text would hold up the loop), then calls `tokenized`."""
        self.tokenized(client, message, timeout, *self.encode_prompt(message))

    def tokenized(self, client: bytes, message: GenerateRequest, timeout: float, prompt: list[int] | None,
                  error: tuple[str, str] | None) -> None:
        """A text or chat request's prompt is ready (or could not be made): admit it, unless it was cancelled
        meanwhile."""
        pending = self.tokenizing.pop((client, message.client_request_id), None)
        if pending is None or pending.cancelled:
            return
        if prompt is None:
            return self.reply_error(client, message.client_request_id, *error)
        self.admit(client, message, prompt, timeout)

    def reply_error(self, client: bytes, client_request_id: int, code: str, message: str) -> None:
        self.failed_by_code[code] += 1
        self.to_client(client, ErrorEvent(client_request_id, code, message))

    def fits_no_pipeline(self, blocks: int) -> bool:
        """Whether no ready pipeline could ever hold this many KV blocks (False while none is ready)."""
        known = [p.capacity_blocks for p in self.pipelines.values() if p.ready]
        return bool(known) and blocks > max(known)

    def admit(self, client: bytes, message: GenerateRequest, prompt: list[int], timeout: float) -> None:
        """Check the tokenized request against the model and the pipelines, then dispatch or queue it. With
        no pipeline serving (still starting, or all lost) it waits in the queue until one is, or until its
        deadline."""
        try:
            total = len(prompt) + message.params.max_new_tokens
            if total > self.max_context:
                raise RequestError("prompt_too_long", f"prompt of {len(prompt)} tokens + max_new_tokens "
                                   f"{message.params.max_new_tokens} exceeds the model's context of {self.max_context}")
            if message.resume and (len(message.resume) >= message.params.max_new_tokens or
                                   any(not 0 <= t < self.info.vocab_size for t in message.resume)):
                raise RequestError("invalid_request", "resume must be fewer than max_new_tokens tokens of the vocabulary")
            blocks = blocks_for(total)
            if self.fits_no_pipeline(blocks):
                raise RequestError("too_large", f"{total} tokens do not fit the KV cache of any pipeline")
        except RequestError as exc:
            return self.reply_error(client, message.client_request_id, exc.code, str(exc))
        except ValueError as exc:
            return self.reply_error(client, message.client_request_id, "invalid_request", str(exc))
        params = message.params
        if params.temperature > 0 and params.seed is None:  # a seed of its own, so a replay draws the same
            params = msgspec.structs.replace(params, seed=secrets.randbits(63))
        request_id = self.new_request_id()
        first = Submit(request_id, prompt, params, list(self.info.eos_token_ids), timeout, broker=self.epoch)
        submit = first
        if message.resume:  # it ran under an earlier broker: go on after what the client already has
            submit = continuation(first, list(message.resume), params.max_new_tokens, request_id, self.epoch, timeout)
        self.requests[request_id] = InFlight(client, message.client_request_id, prompt, submit,
                                             self.clock() + timeout, blocks, tokens=list(message.resume),
                                             first=first, max_new_tokens=params.max_new_tokens)
        self.by_client[(client, message.client_request_id)] = request_id
        self.attempts += 1
        if not self.dispatch(request_id):
            if len(self.queue) >= self.config.queue_limit:
                return self.fail(request_id, "busy", f"all pipelines are full and {len(self.queue)} requests wait")
            self.queue.append(request_id)

    def new_request_id(self) -> int:
        request_id = self.id_base | self.next_id
        self.next_id = self.next_id + 1 if self.next_id < 2**32 - 1 else 1
        return request_id

    def replay(self, request_id: int, code: str, why: str, counted: bool = True) -> None:
        """The request's pipeline failed under it: cancel that attempt, and go on with a new one (a new id:
        whatever the old one still sends is ignored) from the tokens emitted so far, ahead of the queue, on
        whichever healthy pipeline can take it first; or fail it once its attempts are used up, or when the
        failure is the request's own. A move that a redeploy makes is not `counted` as a failed attempt."""
        request = self.requests.get(request_id)
        if request is None:
            return
        if not replayable(code) or (counted and request.attempts >= self.config.max_attempts):
            if replayable(code):
                self.gave_up += 1
                why = f"{why} (after {request.attempts} attempts)"
            return self.fail(request_id, code, why)
        self.forget(request_id, cancel=True, reason="replayed")
        new_id = self.new_request_id()
        request.submit = continuation(request.first, request.tokens, request.max_new_tokens, new_id, self.epoch,
                                      request.deadline - self.clock())
        request.pipeline = request.last_token_at = request.dispatched_at = None
        request.attempts += counted
        self.requests[new_id] = request
        self.by_client[(request.client, request.client_request_id)] = new_id
        self.replayed += 1
        self.attempts += 1
        log.info("request %d replayed as %d after %d tokens: %s", request_id, new_id, len(request.tokens), why)
        if not self.dispatch(new_id):
            self.queue.appendleft(new_id)

    def dispatch(self, request_id: int) -> bool:
        """Send the request to the pipeline that can hold it and would serve it fastest; False when none can now."""
        request = self.requests[request_id]
        fits = [p for p in self.pipelines.values()
                if p.ready and p.healthy and not p.draining and p.reserved_blocks + request.blocks <= p.capacity_blocks]
        if not fits:
            return False
        state = min(fits, key=self.dispatch_order(fits))
        submit = msgspec.structs.replace(request.submit, kv_budget_blocks=state.capacity_blocks, version=state.version)
        self.to_pipeline(state, submit)
        state.in_flight.add(request_id)
        state.reserved_blocks += request.blocks
        request.pipeline = state.key
        request.dispatched_at = self.clock()
        return True

    @staticmethod
    def dispatch_order(candidates: list[PipelineState]):
        """Sort key among pipelines that can hold a request (`serving.pace.dispatch_key`)."""
        return dispatch_key(candidates)

    def on_cancel_request(self, client: bytes, message: CancelRequest) -> None:
        key = (client, message.client_request_id)
        if pending := self.tokenizing.get(key):
            pending.cancelled = True
        request_id = self.by_client.get(key)
        if request_id is not None:
            self.fail(request_id, "cancelled", "cancelled by the client")

    def on_ping(self, client: bytes, message: Ping) -> None:
        """Receiving it refreshed client_seen; the answer tells the client which broker incarnation serves."""
        self.to_client(client, Pong(self.epoch))

    def on_status(self, client: bytes, message: StatusRequest) -> None:
        pipelines = [PipelineStatus(p.spec.id, p.ready, p.healthy, len(p.in_flight), sorted(p.last_seen),
                                    dict(p.cached_requests), dict(p.kv_blocks_used), dict(p.kv_blocks_total),
                                    dict(p.bad_messages), p.failure, dict(p.incarnations), len(p.dead),
                                    dict(p.counters), p.version, p.retiring,
                                    {f"{stage}: {peer}": n for stage, peers in p.rejected_peers.items()
                                     for peer, n in peers.items()})
                     for p in self.every_pipeline()]
        hosts = [report for _, report in sorted(self.hosts.items())]
        self.to_client(client, StatusReply(pipelines, len(self.queue), message.nonce, self.bad_messages,
                                           dict(self.failed_by_code), self.epoch, self.replayed, self.attempts,
                                           self.gave_up, hosts, self.file_version, self.file_error, self.redeploys,
                                           self.rejected_peers()))

    def rejected_peers(self) -> dict[str, int]:
        """Handshakes and messages this broker refused, by peer and reason (the process's security knows)."""
        return {}

    def on_host_report(self, message: HostReport) -> None:
        """A supervisor's news of its host's processes, kept for `status` (hosts unheard of for long drop out)."""
        self.hosts[message.host] = message
        self.hosts_seen[message.host] = self.clock()

    def on_tokens(self, message: Tokens) -> None:
        """Stream one step's tokens: one message per client, however many of its requests moved."""
        by_client: dict[bytes, list[TokenEvent]] = {}
        now = self.clock()
        gaps: list[float] = []
        state = self.pipelines.get(message.pipeline_id)
        if state is None and message.pipeline_id not in {p.spec.id for p in self.retiring.values()}:
            return self.reject(f"tokens from unknown pipeline {message.pipeline_id!r}")
        if state is None or (message.version and message.version != state.version):
            state = self.retiring.get(f"{message.pipeline_id}@{message.version}")
            if state is None:
                self.stale_messages += 1  # of a version retired and gone, or not adopted here yet
                return
        serving = state.incarnations.get(state.spec.stages[-1].id)
        if message.incarnation != serving:  # a late message of an incarnation that is gone, or a forgery
            if serving is not None:  # (with none yet, this broker has just started: not the sender's fault)
                self.reject(f"tokens from an incarnation of pipeline {message.pipeline_id!r} that is not serving")
            return
        load = len(state.in_flight)
        for record in message.records:
            request = self.requests.get(record.request_id)
            if request is None or request.pipeline != state.key:
                continue
            if record.token >= self.info.vocab_size:
                self.reject(f"token {record.token} outside the vocabulary from pipeline {message.pipeline_id}")
                continue
            if request.last_token_at is not None:
                gaps.append(now - request.last_token_at)
            request.last_token_at = now
            if record.token < 0:
                self.replay(record.request_id, record.code or "stage_failed",
                            record.reason or "a stage rejected the request")
                continue
            index = len(request.tokens)
            request.tokens.append(record.token)
            logprobs = [record.logprobs] if record.logprobs is not None else []
            if record.finished:
                text = self.text_of(request.tokens)
                event = TokenEvent(request.client_request_id, [record.token], True, record.reason, text,
                                   len(request.prompt), state.spec.id, logprobs, index)
            else:
                event = TokenEvent(request.client_request_id, [record.token], logprobs=logprobs, index=index)
            by_client.setdefault(request.client, []).append(event)
            if record.finished:
                self.forget(record.request_id, cancel=False)
        for client, events in by_client.items():
            self.to_client(client, events[0] if len(events) == 1 else TokenEvents(events))
        if gaps:
            state.observe_pace(sum(gaps) / len(gaps), load)
        if self.queue and len(state.in_flight) < load:  # room freed: a waiting request need not wait for the tick
            self.dispatch_queued()

    def _pipeline_of(self, stage_id: str, version: str, what: str) -> PipelineState | None:
        """The pipeline, current or retiring, that a message of this stage at this version belongs to; None
        (counted as stale) for a version that is gone or not adopted here yet, or an unknown stage."""
        pipeline = self.stage_pipeline.get(stage_id)
        if pipeline is not None and (not version or self.pipelines[pipeline].version == version):
            return self.pipelines[pipeline]
        for state in self.retiring.values():
            if state.version == version and any(s.id == stage_id for s in state.spec.stages):
                return state
        if pipeline is None and not any(s.id == stage_id for p in self.retiring.values() for s in p.spec.stages):
            self.reject(f"{what} from unknown stage {stage_id!r}")
        else:
            self.stale_messages += 1
        return None

    def _stage(self, stage_id: str, incarnation: int, what: str, version: str = "") -> PipelineState | None:
        """The pipeline of a stage message from a live incarnation; a stage that is new or restarted is
        registered on the way (a heartbeat counts: a restarted broker never saw the stages' StageReady), and
        the pipeline of an incarnation it replaces loses its requests. None for a message to ignore."""
        state = self._pipeline_of(stage_id, version, what)
        if state is None:
            return None
        pipeline = state.key
        if incarnation in state.dead:
            return None  # a late message of an incarnation that failed or was replaced
        current = state.incarnations.get(stage_id)
        if current != incarnation:
            if current is not None:
                state.dead.add(current)
                self.lose_pipeline(pipeline, f"stage {stage_id} restarted")
            log.info("stage %s: incarnation %x", stage_id, incarnation)
            state.incarnations[stage_id] = incarnation
        return state

    def _seen(self, state: PipelineState, stage_id: str, capacity: int) -> None:
        now = self.clock()
        state.last_seen[stage_id] = now
        if capacity > 0:
            state.capacity_tokens[stage_id] = capacity
        if not state.healthy and state.ready and state.silent_stage(now, self.config.stage_timeout_s) is None:
            log.info("pipeline %s is healthy again", state.spec.id)
            state.healthy, state.failure = True, None

    def on_heartbeat(self, message: Heartbeat) -> None:
        state = self._stage(message.stage_id, message.incarnation, "heartbeat", message.version)
        if state is None:
            return
        state.cached_requests[message.stage_id] = message.running
        state.kv_blocks_used[message.stage_id] = message.kv_blocks_used
        state.kv_blocks_total[message.stage_id] = message.kv_blocks_total
        state.bad_messages[message.stage_id] = message.bad_messages
        state.counters[message.stage_id] = message.counters
        state.rejected_peers[message.stage_id] = dict(message.rejected_peers)
        if LONG_STEP_S <= message.step_running_s < self.config.progress_timeout_s:
            state.long_step_seen = self.clock()  # a big prefill, say: the pipeline is working
        self._seen(state, message.stage_id, message.kv_capacity_tokens)

    def on_ready(self, message: StageReady) -> None:
        state = self._stage(message.stage_id, message.incarnation, "StageReady", message.version)
        if state is None:
            return
        log.info("stage %s ready (pid %d, %d KV tokens)", message.stage_id, message.pid, message.kv_capacity_tokens)
        self._seen(state, message.stage_id, message.kv_capacity_tokens)

    def on_stage_failed(self, message: StageFailed) -> None:
        state = self._pipeline_of(message.stage_id, message.version, "failure report")
        if state is None:
            return
        pipeline = state.key
        if message.incarnation in state.dead:
            return
        if message.request_ids:
            for request_id in message.request_ids:
                if request_id in self.requests and self.requests[request_id].pipeline == pipeline:
                    self.replay(request_id, message.code, message.message)
            return
        # The stage is gone: this incarnation counts for nothing more; the pipeline serves again once the
        # stage is back (a new incarnation) and every stage of it is heard from.
        state.dead.add(message.incarnation)
        if state.incarnations.get(message.stage_id) == message.incarnation:
            del state.incarnations[message.stage_id]
            state.last_seen.pop(message.stage_id, None)
        self.lose_pipeline(pipeline, message.message)

    def lose_pipeline(self, pipeline: str, why: str) -> None:
        state = self.state_of(pipeline)
        if state.healthy:
            log.error("pipeline %s lost: %s", pipeline, why)
        state.healthy = False
        state.failure = why
        self.drain(pipeline, why, healthy=False)

    def tick(self) -> None:
        now = self.clock()
        # A loop held up (a slow tokenizer, a pause of the host) has heartbeats waiting unread: judging
        # silence now would fail healthy stages, so that check waits for the next, timely tick.
        timely = now - self.last_tick < self.config.stage_timeout_s / 2
        self.last_tick = now
        for request_id in [r for r, req in self.requests.items() if now > req.deadline]:
            request = self.requests[request_id]
            live = any(p.ready and p.healthy for p in self.pipelines.values())
            if request.pipeline is None and not live:
                self.fail(request_id, "no_pipeline", "no pipeline became ready before the request's deadline")
            else:
                self.fail(request_id, "timeout", "the request passed its deadline")
        for state in self.every_pipeline():
            if timely and state.healthy and (silent := state.silent_stage(now, self.config.stage_timeout_s)):
                self.lose_pipeline(state.key, f"stage {silent} stopped responding "
                                   f"(no heartbeat for {self.config.stage_timeout_s:g} s)")
        self.watch_progress(now)
        self.end_retired(now)
        for host in [h for h, seen in self.hosts_seen.items() if now - seen > HOST_REPORT_KEPT_S]:
            del self.hosts[host], self.hosts_seen[host]
        gone = {c for c, seen in self.client_seen.items() if now - seen > self.config.client_timeout_s}
        for client in gone:
            self.drop_client(client, notify=True)
        if now - self.last_epoch_sent > EPOCH_EVERY_S:
            self.last_epoch_sent = now
            self.announce()
        self.dispatch_queued()

    def announce(self) -> None:
        """Tell every first stage which broker incarnation serves (they drop what earlier ones left)."""
        for state in self.pipelines.values():
            self.to_pipeline(state, BrokerEpoch(self.epoch))

    def dispatch_queued(self) -> None:
        """Dispatch waiting requests in order while a pipeline has room; one that no ready pipeline could
        ever hold fails instead of blocking the queue."""
        while self.queue:
            request_id = self.queue[0]
            if self.dispatch(request_id):
                self.queue.popleft()
                continue
            request = self.requests[request_id]
            if self.fits_no_pipeline(request.blocks):
                self.fail(request_id, "too_large", f"{request.blocks} KV blocks do not fit any pipeline")
                continue
            return

    def watch_progress(self, now: float) -> None:
        """A request that has not moved for `progress_timeout_s` on a pipeline that heartbeats was lost in
        it (a dropped micro-batch, a stuck step): it fails with a clear error, and so does the pipeline when
        nothing in it moves any more. A step that a heartbeat shows running for over LONG_STEP_S (and under
        the limit) counts as movement, so one long prefill is not mistaken for lost work."""
        limit = self.config.progress_timeout_s
        for state in self.every_pipeline():
            if not state.healthy or not state.in_flight:
                continue
            stalled = [r for r in state.in_flight if self.requests[r].stalled_s(now, state.long_step_seen) > limit]
            if not stalled:
                continue
            if len(stalled) == len(state.in_flight):
                self.lose_pipeline(state.key, f"no progress for {limit:g} s with {len(stalled)} requests in it")
                continue
            for request_id in stalled:
                log.error("request %d made no progress for %g s on %s", request_id, limit, state.key)
                self.replay(request_id, "stage_failed", f"lost in pipeline {state.key}: no progress for {limit:g} s")

    def drop_client(self, client: bytes, notify: bool) -> None:
        """A client that went silent: its requests are cancelled, and told so should it come back."""
        self.client_seen.pop(client, None)
        for key, pending in self.tokenizing.items():
            if key[0] == client:
                pending.cancelled = True
        for request_id in [r for r, req in self.requests.items() if req.client == client]:
            log.info("client went away; cancelling request %d", request_id)
            if notify:
                self.fail(request_id, "cancelled", f"no word from the client for {self.config.client_timeout_s:g} s")
            else:
                self.forget(request_id, cancel=True, reason="client gone")
