"""The OpenAI API as the gateway speaks it: request bodies (pydantic models), the errors in OpenAI's JSON
shape with their HTTP status, and the response and stream-chunk bodies.

Requests that OpenAI accepts but this server cannot honour (n > 1, several prompts, penalties, logit bias,
echo, suffix) are refused with a 400 that names the field, never silently ignored. Unknown fields are
ignored, as OpenAI-compatible servers do, so clients that send extras keep working.
"""

from __future__ import annotations

import functools
import re
from typing import Annotated, Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOPS = 16

# ------------------------------------------------------------------------------------------------- errors

# The client library's GenerationError codes -> HTTP status and OpenAI error type.
ERROR_STATUS: dict[str, tuple[int, str]] = {
    "invalid_request": (400, "invalid_request_error"),
    "prompt_too_long": (400, "invalid_request_error"),
    "too_large": (400, "invalid_request_error"),
    "busy": (429, "rate_limit_error"),
    "no_pipeline": (503, "service_unavailable"),
    "timeout": (504, "timeout"),
    "stage_failed": (500, "internal_error"),
    "sampling_failed": (500, "internal_error"),
    "cancelled": (500, "internal_error"),  # cancelled by someone other than this gateway's client
}


class APIError(Exception):
    """An error to answer in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.counted = False  # in the gateway's request metrics already

    @classmethod
    def from_generation(cls, code: str, message: str) -> APIError:
        status, kind = ERROR_STATUS.get(code, (500, "internal_error"))
        return cls(status, message, kind, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unsupported(param: str, why: str) -> APIError:
    return APIError(400, f"{param}: {why}", param=param, code="unsupported_parameter")


# ------------------------------------------------------------------------------------------------ requests


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    """What both endpoints share. `top_k`, `stop_token_ids` and `ignore_eos` are extras, as in vLLM."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: Annotated[float, Field(ge=0.0)] | None = None  # OpenAI's default is 1
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: int | None = None  # <= 0: no top-k (vLLM uses -1)
    seed: int | None = None
    stop: list[str] = []  # a string or a list of them
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else [] if value is None else value
        if isinstance(stops, list) and len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        return stops

    def check_supported(self) -> None:
        if self.n != 1:
            raise unsupported("n", f"only n = 1 is served, got {self.n}")
        if self.presence_penalty or self.frequency_penalty:
            raise unsupported("presence_penalty" if self.presence_penalty else "frequency_penalty",
                              "penalties are not supported")
        if self.logit_bias:
            raise unsupported("logit_bias", "not supported")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self) -> dict:
        """Keyword arguments of Client.events, except the prompt and max_new_tokens."""
        return dict(temperature=1.0 if self.temperature is None else self.temperature,
                    top_p=None if self.top_p is None or self.top_p >= 1.0 else self.top_p,
                    top_k=self.top_k if self.top_k and self.top_k > 0 else None, seed=self.seed,
                    stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos)


TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(_Sampling):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise unsupported("echo", "not supported")
        if self.suffix:
            raise unsupported("suffix", "not supported")
        if self.best_of not in (None, 1):
            raise unsupported("best_of", "only best_of = 1 is served")

    @property
    def logprobs_wanted(self) -> int | None:
        """Top alternatives to report per token (0: only the chosen token's), or None for no logprobs."""
        return self.logprobs

    def single_prompt(self) -> str | list[int]:
        """The one prompt, as text or token ids; a batch of several is refused."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise unsupported("prompt", f"one prompt per request, got {len(prompt)}")
            prompt = prompt[0]
        if isinstance(prompt, list) and not prompt or prompt == "":
            raise APIError(400, "the prompt is empty", param="prompt")
        return prompt


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        bad = [p.type for p in self.content if p.type != "text"]
        if bad:
            raise unsupported("messages", f"only text content is served, got {bad[0]!r}")
        return "".join(p.text or "" for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessageIn], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    def chat(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprobs_wanted(self) -> int | None:
        """Top alternatives to report per token (0: only the chosen token's), or None for no logprobs."""
        if not self.logprobs:
            if self.top_logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            return None
        return self.top_logprobs or 0


# --------------------------------------------------------------------------------------------- responses

_json = msgspec.json.Encoder()


def dumps(body: Any) -> bytes:
    return _json.encode(body)


def sse(body: Any) -> bytes:
    """One server-sent event carrying a JSON body."""
    return b"data: " + _json.encode(body) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ChunkWriter:
    """The stream-chunk bodies of one request, with its id, creation time and model fixed."""

    def __init__(self, chat: bool, request_id: str, created: int, model: str, include_usage: bool):
        self.chat, self.include_usage = chat, include_usage
        self.base = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": created, "model": model}
        # The chunk of every token, as bytes around the text: only the text is encoded per token.
        self._head, self._tail = self.chunk("\x00", _template=True).split(b'"\\u0000"')

    def chunk(self, text: str | None, finish_reason: str | None = None, logprobs: Any = None,
              role: bool = False, _template: bool = False) -> bytes:
        if finish_reason is None and logprobs is None and not role and text is not None and not _template:
            return self._head + _json.encode(text) + self._tail
        if self.chat:
            delta: dict = {"role": "assistant", "content": text or ""} if role else \
                ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        body = {**self.base, "choices": [choice]}
        if self.include_usage:
            body["usage"] = None
        return sse(body)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return sse({**self.base, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})


def completion_body(chat: bool, request_id: str, created: int, model: str, text: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int, logprobs: Any = None) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}


# ------------------------------------------------------------------------------------------------ logprobs

LOGPROB_FLOOR = -9999.0  # JSON has no -inf; what vLLM reports for an impossible token


@functools.lru_cache(maxsize=1)
def _gpt2_byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins for the 256 byte values (GPT-2's table), inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class LogprobFormatter:
    """Token ids and their log-probabilities (TokenLogprob) in OpenAI's two shapes: the legacy completions
    object (tokens, token_logprobs, top_logprobs, text_offset) and chat's `content` list with bytes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = "ByteLevel" in type(decoder).__name__ or "ByteLevel" in repr(decoder)

    @functools.lru_cache(maxsize=65536)
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (part of a character, for byte tokens)."""
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if match := _BYTE_TOKEN.fullmatch(piece):
                return bytes([int(match.group(1), 16)])
            table = _gpt2_byte_decoder()
            if self.byte_level and all(c in table for c in piece):
                return bytes(table[c] for c in piece)
            if not self.byte_level:  # SentencePiece: ▁ marks a space (which decoding a lone token drops)
                return piece.replace("▁", " ").encode()
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode()

    def token_text(self, token_id: int) -> str:
        """The token as text; part of a character is written `bytes:\\xe2\\x82` as OpenAI does, so that
        different byte tokens stay different keys of top_logprobs."""
        raw = self.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def completion(self, entries: list[tuple[int, Any, int]]) -> dict:
        """entries: (token id, TokenLogprob, text offset) per token."""
        tokens, logprobs, tops, offsets = [], [], [], []
        for token, lp, offset in entries:
            tokens.append(self.token_text(token))
            logprobs.append(max(lp.logprob, LOGPROB_FLOOR))
            top = {self.token_text(token): max(lp.logprob, LOGPROB_FLOOR)}  # the chosen token, as vLLM lists it
            for alt, value in lp.top:
                top.setdefault(self.token_text(alt), max(value, LOGPROB_FLOOR))
            tops.append(top)
            offsets.append(offset)
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}

    def chat(self, entries: list[tuple[int, Any, int]]) -> dict:
        def one(token: int, value: float) -> dict:
            return {"token": self.token_text(token), "logprob": max(value, LOGPROB_FLOOR),
                    "bytes": list(self.token_bytes(token))}

        return {"content": [{**one(token, lp.logprob), "top_logprobs": [one(alt, value) for alt, value in lp.top]}
                            for token, lp, _ in entries]}
