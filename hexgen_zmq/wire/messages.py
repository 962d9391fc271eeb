"""Every message that crosses a socket, as frozen tagged msgspec Structs, and one decoder over their union.

Frame 0 of every ZeroMQ message is `Header(version, body, tensors)` in MessagePack; frames 1..n hold the raw
bytes of the tensors listed in `tensors` (see `wire.py`). Nothing here is pickled, and nothing here imports
torch, so the broker and the client use these definitions without it.
"""

from __future__ import annotations

from typing import Annotated, Union

import msgspec

PROTOCOL_VERSION = 1

NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
# Bounds on what peers send, checked while decoding, so that no id, position or size a peer invents can
# overflow int64 arithmetic or a tensor constructor further on.
Id = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Count = Annotated[int, msgspec.Meta(ge=0, lt=2**31)]
TokenId = Annotated[int, msgspec.Meta(ge=0, lt=2**31)]
Dim = Annotated[int, msgspec.Meta(ge=0, lt=2**31)]
Total = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]  # a cumulative counter
MAX_DIMS = 8


class Base(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Base of every message; the tag is the class name, so the union decodes by kind."""


class TensorMeta(msgspec.Struct, frozen=True, array_like=True, gc=False):
    dtype: str
    shape: Annotated[list[Dim], msgspec.Meta(max_length=MAX_DIMS)]


# ----------------------------------------------------------------------------------------------- sampling


class SamplingParams(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, gc=False):
    """How the last stage picks tokens. temperature == 0 means greedy."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False  # run to max_new_tokens whatever comes (benchmarks)
    logprobs: int | None = None  # return log-probabilities: this many top alternatives per token (0: the chosen one's)

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError naming the parameter that is out of range."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0.0) or self.temperature != self.temperature or self.temperature > 100:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k!r}")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed!r}")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids outside the vocabulary (size {vocab_size}): {bad}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}")


MAX_TOP_LOGPROBS = 20


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, gc=False):
    """A sampled token's log-probability under the model (log-softmax of its logits before temperature, as
    OpenAI reports it), and the `SamplingParams.logprobs` most likely tokens as (token, log-probability)."""

    logprob: float
    top: list[tuple[int, float]] = []


# ------------------------------------------------------------------------------- broker -> first stage


class Submit(Base, frozen=True):
    """A new request for a pipeline's first stage."""

    request_id: Id
    prompt: list[TokenId]
    params: SamplingParams
    eos_token_ids: list[TokenId] = []
    timeout_s: float | None = None
    kv_budget_blocks: Count = 0  # the smallest KV cache of the pipeline's stages, in blocks (0: unknown)
    broker: Id = 0  # the incarnation of the broker that sent it (see BrokerEpoch)
    generated: Count = 0  # output tokens emitted before this attempt (the end of `prompt`); 0 for a new request
    version: str = ""  # of the pipeline it was sent to: a stage of another version drops it


class Cancel(Base, frozen=True):
    """Drop requests (client cancel, deadline, lost client). Passed down the pipeline as a release."""

    request_ids: list[Id]
    reason: str = "cancelled"
    broker: Id = 0


class BrokerEpoch(Base, frozen=True):
    """Broker -> first stages, at start and then every tick: the broker's incarnation (its start time in
    microseconds). A first stage that sees a later one drops the requests of earlier incarnations, whose
    clients no broker serves any more."""

    broker: Id


# ------------------------------------------------------------------------------------ stage -> stage


class Segment(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """`n_tokens` tokens of one request starting at position `start`; `sample` when its last token's logits
    give the request's next token (the end of a prompt, or a decode step)."""

    request_id: Id
    start: Count
    n_tokens: Count
    sample: bool


class TokenRecord(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, gc=False):
    """One sampled token of one request; token -1 is a failure of that request alone, `reason` its message
    and `code` the client-facing error code."""

    request_id: Id
    token: Annotated[int, msgspec.Meta(ge=-1, lt=2**31)]
    finished: bool = False
    reason: str | None = None  # "eos", "stop", "length"; or an error message when token < 0
    code: str | None = None  # for token < 0: "invalid_request", "stage_failed", ...
    logprobs: TokenLogprob | None = None  # when the request asked for them


class NewRequest(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, gc=False):
    """Announces a request to the later stages, with what the last stage needs to sample and stop."""

    request_id: Id
    total_tokens: Count  # prompt + max_new_tokens: what its cache may grow to
    params: SamplingParams
    eos_token_ids: list[TokenId] = []
    generated: Count = 0  # output tokens before this attempt: the sampler's first token index


class MicroBatch(Base, frozen=True):
    """One unit of work between stages: segments packed along the token axis of one tensor
    (token ids into the first stage's layers, hidden states after)."""

    batch_id: Id
    segments: list[Segment]
    new: list[NewRequest] = []
    release: list[Id] = []
    failed: list[TokenRecord] = []  # requests a stage could not run: their segments were taken out




class Feedback(Base, frozen=True):
    """Last stage -> first stage: the sampled tokens of one micro-batch (the decode loop's back edge)."""

    batch_id: Id
    records: list[TokenRecord]


# -------------------------------------------------------------------------------- stage -> broker


class StageReady(Base, frozen=True):
    stage_id: str
    rank: int
    pid: int
    kv_capacity_tokens: int = 0
    incarnation: Id = 0  # random per start of the stage: a restart is told apart from a late message
    version: str = ""  # the pipeline version it belongs to (Deployment.pipeline_version); "" from older peers


class StageCounters(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, gc=False):
    """A stage's work since it started, cumulative (Prometheus counters: rate() of seconds over steps is the
    mean step time, of tokens over steps the mean batch size)."""

    steps_total: Total = 0  # micro-batches computed
    step_seconds_total: float = 0.0  # wall time spent computing them
    step_tokens_total: Total = 0  # packed token rows of those micro-batches
    step_requests_total: Total = 0  # segments (requests) of those micro-batches
    bytes_sent_total: Total = 0  # frames sent down the pipeline: micro-batches, or the last stage's feedback
    broker_bytes_sent_total: Total = 0  # frames of sampled tokens sent to the broker


class Heartbeat(Base, frozen=True):
    stage_id: str
    kv_capacity_tokens: Count = 0
    running: Count = 0  # requests holding KV cache here
    kv_blocks_used: Count = 0
    kv_blocks_total: Count = 0
    bad_messages: Count = 0  # messages this stage rejected since it started
    step_running_s: float = 0.0  # how long the step now computing has run (0: idle)
    failed_requests: Count = 0  # requests this stage failed alone (bad parameters, a sampling error, ...)
    incarnation: Id = 0
    counters: StageCounters = msgspec.field(default_factory=StageCounters)
    version: str = ""
    rejected_peers: dict[str, Count] = {}  # "PEER: REASON" -> messages or handshakes refused (CURVE roles)


class Tokens(Base, frozen=True):
    """Last stage -> broker: the tokens sampled in one step, for streaming to clients."""

    pipeline_id: str
    records: list[TokenRecord]
    incarnation: Id = 0  # of the last stage that sampled them
    version: str = ""


class StageFailed(Base, frozen=True):
    """A stage tells the broker (or a launcher) that it cannot serve: requests listed here are lost."""

    stage_id: str
    message: str
    request_ids: list[Id] = []
    code: str = "stage_failed"  # for request_ids: the error code their clients get
    incarnation: Id = 0
    version: str = ""


class ProcessReport(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, gc=False):
    """One process under a host's supervisor."""

    name: str  # "broker" or "STAGE:RANK"
    state: str  # starting | running | backoff | failed | stopping
    pid: int = 0
    restarts: int = 0
    last_exit: int | None = None  # its last exit status (negative: the signal that killed it)
    version: str = ""  # the pipeline version it runs


class HostReport(Base, frozen=True):
    """Supervisor -> broker (results socket), every second: how the processes of one host are, and which
    version of the deployment file it runs (or why it refused the newest one)."""

    host: str
    pid: int
    processes: list[ProcessReport] = []
    file_version: str = ""  # digest of the deployment file it follows
    file_error: str | None = None  # why the newest file was refused (the running version keeps serving)


class BrokerReady(Base, frozen=True):
    pid: int


# ------------------------------------------------------------------------------- client <-> broker


class ChatMessage(msgspec.Struct, frozen=True, gc=False):
    role: str
    content: str


class GenerateRequest(Base, frozen=True):
    client_request_id: int
    params: SamplingParams
    prompt_ids: list[int] | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    timeout_s: float | None = None
    # Tokens this request already produced under an earlier broker incarnation (the client resubmits it when
    # a new broker answers): they are part of the prompt, generation goes on from the next one.
    resume: list[int] = []


class CancelRequest(Base, frozen=True):
    client_request_id: int


class Ping(Base, frozen=True):
    """Keeps a client's requests alive; a client silent for too long is taken to be gone."""


class Pong(Base, frozen=True):
    """The broker's answer to a Ping: its incarnation, so a client can tell that a new broker answers (and
    resubmit what the old one had in flight)."""

    broker: int


class StatusRequest(Base, frozen=True):
    nonce: int = 0  # echoed in the reply, so concurrent requests each get their own answer


class TokenEvent(Base, frozen=True):
    client_request_id: int
    tokens: list[int]
    finished: bool = False
    finish_reason: str | None = None
    text: str | None = None
    prompt_tokens: int = 0
    pipeline: str | None = None  # on the last event: the pipeline that served the request
    logprobs: list[TokenLogprob] = []  # one per token, when the request asked for them
    index: int = -1  # position in the output of tokens[0]: clients drop duplicates and refuse gaps


class TokenEvents(Base, frozen=True):
    """Every token one step produced for one client's requests, in one message."""

    events: list[TokenEvent]


class ErrorEvent(Base, frozen=True):
    client_request_id: int
    code: str  # "invalid_request", "prompt_too_long", "no_pipeline", "busy", "timeout", "stage_failed", ...
    message: str


class PipelineStatus(msgspec.Struct, frozen=True, gc=False):
    id: str
    ready: bool
    healthy: bool
    in_flight: int
    stages_ready: list[str]
    cached_requests: dict[str, int] = {}  # per stage: requests holding KV cache (from heartbeats)
    kv_blocks_used: dict[str, int] = {}  # per stage
    kv_blocks_total: dict[str, int] = {}  # per stage
    bad_messages: dict[str, int] = {}  # per stage: messages it rejected
    failure: str | None = None  # why the pipeline is unhealthy
    incarnations: dict[str, int] = {}  # per stage: the incarnation serving now
    restarts: int = 0  # stage incarnations this pipeline has seen replaced or failed
    stage_counters: dict[str, StageCounters] = {}  # per stage: its cumulative step and bytes counters
    version: str = ""  # the pipeline's version (a redeploy that changes a pipeline makes a new version)
    retiring: bool = False  # removed or changed by a redeploy: takes no new requests, finishing what it has
    rejected_peers: dict[str, int] = {}  # "STAGE: PEER: REASON" -> refused handshakes and messages


class StatusReply(Base, frozen=True):
    pipelines: list[PipelineStatus]
    queued: int = 0
    nonce: int = 0
    bad_messages: int = 0  # messages the broker rejected
    requests_failed: dict[str, int] = {}  # per error code, since the broker started
    broker: int = 0  # the broker's incarnation
    replayed: int = 0  # requests moved to another attempt after their pipeline failed
    attempts: int = 0  # attempts started, first ones included
    gave_up: int = 0  # requests failed after their last allowed attempt
    hosts: list[HostReport] = []  # the latest report of every supervisor heard from
    file_version: str = ""  # digest of the deployment file the broker runs
    file_error: str | None = None  # why the broker refused the newest file
    redeploys: int = 0  # new versions of the deployment file adopted since the broker started
    rejected_peers: dict[str, int] = {}  # "PEER: REASON" -> the broker's refused handshakes and messages


Message = Union[
    Submit, Cancel, BrokerEpoch, MicroBatch, Feedback, StageReady, Heartbeat, Tokens, StageFailed, BrokerReady,
    HostReport, GenerateRequest, CancelRequest, Ping, Pong, StatusRequest, TokenEvent, TokenEvents, ErrorEvent, StatusReply,
]


class Header(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """Frame 0: protocol version, the message, and one TensorMeta per following frame."""

    version: int
    body: Message
    tensors: list[TensorMeta] = []


HEADER_ENCODER = msgspec.msgpack.Encoder()
HEADER_DECODER = msgspec.msgpack.Decoder(Header)


class WireError(ValueError):
    """A message that does not follow the wire format."""


def decode_header(frame: bytes | memoryview) -> Header:
    """Frame 0 checked against the schema and the protocol version."""
    try:
        header = HEADER_DECODER.decode(frame)
    except msgspec.DecodeError as exc:
        raise WireError(f"malformed header: {exc}") from None
    if header.version != PROTOCOL_VERSION:
        raise WireError(f"protocol version {header.version}, expected {PROTOCOL_VERSION}")
    return header


def encode_control(body: Message) -> list[bytes]:
    """Frames of a message without tensors (clients, broker, heartbeats): torch is not needed."""
    return [HEADER_ENCODER.encode(Header(PROTOCOL_VERSION, body))]


def decode_control(frames: list) -> Message:
    """The message of a tensor-less multipart message; anything else is a WireError."""
    if len(frames) != 1:
        raise WireError(f"expected 1 frame, got {len(frames)}")
    frame = frames[0]
    header = decode_header(getattr(frame, "buffer", frame))
    if header.tensors:
        raise WireError("unexpected tensors in a control message")
    return header.body
