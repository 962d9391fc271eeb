"""Picking tokens on the last stage, and deciding when a request stops.

Greedy rows share one argmax. A sampled request draws each token from a generator seeded with its seed and
the token's index in the output (counter-based, not a generator that carries state from draw to draw): the
same seed gives the same tokens whatever else is batched with it, and a request replayed elsewhere from its
k-th token on draws exactly what an uninterrupted run would have drawn. Filters apply in Hugging Face's
order: temperature, then top-k, then top-p. Extreme but valid parameters never raise: a temperature so
small that the scaled logits overflow samples the most likely token, as the limit says it should.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import msgspec
import torch

from hexgen_zmq.model import kernels
from hexgen_zmq.wire.messages import SamplingParams, TokenLogprob, TokenRecord

MASK64 = (1 << 64) - 1


class SamplingError(ValueError):
    """This request's row cannot be sampled (its logits are not finite): the request fails, not its batch."""


def draw_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for the `index`-th token of a request seeded with `seed` (splitmix64)."""
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return (z ^ (z >> 31)) >> 1


@dataclass
class RequestSampler:
    params: SamplingParams
    stop_ids: frozenset[int]
    eos_ids: frozenset[int]
    limit: int  # generated tokens allowed in all (max_new_tokens, cut by the context length)
    generated: int = 0  # tokens of the output so far, including those emitted before a replay
    seed: int | None = None  # None: greedy

    @classmethod
    def make(cls, params: SamplingParams, eos_ids: list[int], limit: int, generated: int = 0) -> RequestSampler:
        """`generated`: output tokens that came before this attempt (they are part of its prompt)."""
        seed = None
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        eos = frozenset() if params.ignore_eos else frozenset(eos_ids)
        return cls(params, frozenset(params.stop_token_ids), eos, limit, generated, seed)

    @property
    def greedy(self) -> bool:
        return self.seed is None

    def draw(self, logits: torch.Tensor) -> int:
        """The next token from logits [vocab] (float32, or bfloat16 taken exactly as float32) with temperature /
        top-k / top-p."""
        # Shifting by the maximum first keeps the division finite-or-minus-infinity: the best token scores 0
        # at any temperature, so a tiny temperature degrades to greedy instead of inf / inf = NaN.
        # In float64: a temperature below float32's smallest number would otherwise round to 0 (0 / 0 = NaN).
        logits = logits.float()  # the model's bfloat16 logits as they are, exactly
        logits = (logits - logits.max()).double() / self.params.temperature
        if self.params.top_k is not None and self.params.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.params.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.params.top_p is not None and self.params.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs >= self.params.top_p  # keep the token that crosses p
            drop[0] = False  # the best token always stays, however small p is
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        probs = logits.softmax(-1)
        generator = torch.Generator().manual_seed(draw_seed(self.seed, self.generated))
        return int(torch.multinomial(probs, 1, generator=generator))

    def record(self, request_id: int, token: int) -> TokenRecord:
        """Count the token and say whether the request is done, and why."""
        self.generated += 1
        reason = None
        if token in self.eos_ids:
            reason = "eos"
        elif token in self.stop_ids:
            reason = "stop"
        elif self.generated >= self.limit:
            reason = "length"
        return TokenRecord(request_id, token, reason is not None, reason)


def sample(logits: torch.Tensor, samplers: list[RequestSampler]) -> list[int | SamplingError]:
    """One token per row of logits [S, vocab] (float32, or the model's dtype; row i belongs to samplers[i]), or
    the error of that row alone: a row holding a NaN or an infinity."""
    best, finite = kernels.greedy(logits)
    tokens: list[int | SamplingError] = list(best)
    for i, sampler in enumerate(samplers):
        try:
            if not finite[i]:
                raise SamplingError("the model's logits are not finite")
            if not sampler.greedy:
                tokens[i] = sampler.draw(logits[i])
        except SamplingError as exc:
            tokens[i] = exc
        except (RuntimeError, ValueError) as exc:  # torch refusing a distribution: this request's problem
            tokens[i] = SamplingError(f"sampling failed: {exc}")
    return tokens


def with_logprobs(records: list[TokenRecord], logits: torch.Tensor, sampled: list[int],
                  wanted: list[int | None]) -> list[TokenRecord]:
    """The records, with log-probabilities attached for the requests that asked (`wanted[i]`: how many top
    alternatives for row i of `logits`, which belongs to request `sampled[i]`; None: none wanted). They come
    from the raw model's logits, before temperature or filters, in float32, as OpenAI and vLLM report them."""
    rows = {rid: i for i, (rid, k) in enumerate(zip(sampled, wanted)) if k is not None}
    if not rows:
        return records
    out = []
    for record in records:
        i = rows.get(record.request_id)
        if i is None or record.token < 0:
            out.append(record)
            continue
        logprobs = torch.log_softmax(logits[i].float(), -1)
        top: list[tuple[int, float]] = []
        if wanted[i]:
            values, ids = torch.topk(logprobs, min(wanted[i], logprobs.shape[-1]))
            top = list(zip(ids.tolist(), values.tolist()))
        out.append(msgspec.structs.replace(record, logprobs=TokenLogprob(float(logprobs[record.token]), top)))
    return out
