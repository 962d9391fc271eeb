"""What every rank of a stage does with one micro-batch: apply its releases and new requests to the KV
cache, check it, run the layers, and on the last stage pick tokens. Socket-free and the same on all ranks."""

from __future__ import annotations

import torch

from hexgen_zmq.block_manager import BlockManager, CacheFull
from hexgen_zmq.messages import MicroBatch, TokenRecord
from hexgen_zmq.attention import SlotIndex, build_layout
from hexgen_zmq.model_runner import StageModel
from hexgen_zmq.sampling import RequestSampler, sample, with_logprobs


class BadBatch(ValueError):
    """A micro-batch that does not fit this stage (shape, dtype, unknown request): rejected, nothing run."""


class StageWorker:
    def __init__(self, model: StageModel, num_blocks: int, block_size: int):
        self.model = model
        self.blocks = BlockManager(num_blocks, block_size)
        self.pool = model.new_pool(num_blocks, block_size)
        self.slots = SlotIndex(self.blocks, model.device)
        self.samplers: dict[int, RequestSampler] = {}

    @property
    def capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    def check(self, batch: MicroBatch, inputs: torch.Tensor) -> None:
        """Raise BadBatch unless the tensor matches the segments and every request is known or announced."""
        total = sum(seg.n_tokens for seg in batch.segments)
        if self.model.first:
            if inputs.dtype not in (torch.int64, torch.int32) or inputs.shape != (total,):
                raise BadBatch(f"expected token ids of shape [{total}], got {inputs.dtype} {list(inputs.shape)}")
            if total and (int(inputs.min()) < 0 or int(inputs.max()) >= self.model.info.vocab_size):
                raise BadBatch("token id outside the vocabulary")
        else:
            hidden = self.model.info.hidden_size
            if not inputs.is_floating_point() or inputs.shape != (total, hidden):
                raise BadBatch(f"expected hidden states [{total}, {hidden}], got {inputs.dtype} {list(inputs.shape)}")
        announced = {new.request_id for new in batch.new}
        released = set(batch.release)
        for seg in batch.segments:
            if seg.request_id in released or (seg.request_id not in announced and seg.request_id not in self.blocks):
                raise BadBatch(f"segment of unknown request {seg.request_id}")

    def step(self, batch: MicroBatch, inputs: torch.Tensor) -> torch.Tensor | list[TokenRecord]:
        """Run one micro-batch: hidden states out, or on the last stage one record per sampled segment."""
        for request_id in batch.release:
            self.release(request_id)
        for new in batch.new:
            self.release(new.request_id)  # a re-announced id starts afresh
            self.blocks.admit(new.request_id, new.total_tokens)
            if self.model.last:
                prompt = new.total_tokens - new.params.max_new_tokens
                limit = min(new.params.max_new_tokens, self.model.info.max_positions - prompt)
                self.samplers[new.request_id] = RequestSampler.make(new.params, new.eos_token_ids, limit)
        for seg in batch.segments:
            try:
                self.blocks.grow(seg.request_id, seg.start + seg.n_tokens)
            except CacheFull as exc:
                raise BadBatch(str(exc)) from None
        if not batch.segments:  # only releases travel in this batch
            return [] if self.model.last else torch.empty(0, self.model.info.hidden_size, dtype=self.model.dtype)
        layout = build_layout(batch.segments, self.slots, self.model.device, self.pool.pad_slot)
        out = self.model(inputs, layout, self.pool)
        if not self.model.last:
            return out
        sampled = [seg.request_id for seg in batch.segments if seg.sample and seg.n_tokens]
        tokens = sample(out, [self.samplers[rid] for rid in sampled])
        records = []
        wanted = [self.samplers[rid].params.logprobs for rid in sampled]  # read before release
        for request_id, token in zip(sampled, tokens):
            record = self.samplers[request_id].record(request_id, token)
            if record.finished:
                self.release(request_id)
            records.append(record)
        return with_logprobs(records, out, sampled, wanted)

    def release(self, request_id: int) -> None:
        self.blocks.release(request_id)
        self.slots.forget(request_id)
        self.samplers.pop(request_id, None)
