"""Picking tokens on the last stage, and deciding when a request stops.

Greedy rows share one argmax. A sampled request owns a `torch.Generator` seeded from its seed, used only for
its own draws, so the same seed gives the same tokens whatever else is batched with it. Filters apply in
Hugging Face's order: temperature, then top-k, then top-p.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import msgspec
import torch

from hexgen_zmq.messages import SamplingParams, TokenLogprob, TokenRecord


@dataclass
class RequestSampler:
    params: SamplingParams
    stop_ids: frozenset[int]
    eos_ids: frozenset[int]
    limit: int  # generated tokens allowed (max_new_tokens, cut by the context length)
    generated: int = 0
    generator: torch.Generator | None = field(default=None, repr=False)

    @classmethod
    def make(cls, params: SamplingParams, eos_ids: list[int], limit: int) -> RequestSampler:
        generator = None
        if params.temperature > 0:
            generator = torch.Generator()
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            generator.manual_seed(seed)
        eos = frozenset() if params.ignore_eos else frozenset(eos_ids)
        return cls(params, frozenset(params.stop_token_ids), eos, limit, generator=generator)

    def draw(self, logits: torch.Tensor) -> int:
        """One token from float32 logits [vocab] with temperature / top-k / top-p."""
        logits = logits / self.params.temperature
        if self.params.top_k is not None and self.params.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.params.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.params.top_p is not None and self.params.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) >= self.params.top_p  # keep the token that crosses p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

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


def sample(logits: torch.Tensor, samplers: list[RequestSampler]) -> list[int]:
    """One token per row of logits [S, vocab]; row i belongs to samplers[i]."""
    tokens = logits.argmax(-1).tolist()
    for i, sampler in enumerate(samplers):
        if sampler.generator is not None:
            tokens[i] = sampler.draw(logits[i])
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
