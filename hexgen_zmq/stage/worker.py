"""What every rank of a stage does with one micro-batch: apply its releases and new requests to the KV
cache, check it, run the layers, and on the last stage pick tokens. Socket-free and the same on all ranks.

One request's problem stays that request's: a new request that cannot be admitted, a segment that names a
request this stage does not hold or skips positions, a row that cannot be sampled. That request is failed
(a `TokenRecord` with token -1 in `MicroBatch.failed`, carried to the last stage and from there to the
first stage and the broker), its rows are taken out of the batch, and the rest of the batch runs. Only a
batch whose tensor contradicts its own header is refused whole (`BadBatch`). Every rank makes the same
decisions from the same inputs, so their caches stay identical without talking.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from hexgen_zmq.model.attention import SlotIndex, build_layout
from hexgen_zmq.stage.block_manager import BlockManager, CacheFull
from hexgen_zmq.wire.messages import MicroBatch, NewRequest, Segment, TokenRecord
from hexgen_zmq.model.runner import StageModel
from hexgen_zmq.stage.core_share import CoreShare
from hexgen_zmq.model.sampling import RequestSampler, SamplingError, sample, with_logprobs


class BadBatch(ValueError):
    """A micro-batch whose tensor does not match its segments: rejected whole, nothing run."""


@dataclass
class StepResult:
    """What a step produced: the batch to send on (segments of failed requests taken out, their records in
    `failed`), and hidden states, or on the last stage the token records of every request it touched."""

    batch: MicroBatch
    hidden: torch.Tensor | None = None
    records: list[TokenRecord] = field(default_factory=list)


def failure(request_id: int, message: str, code: str = "stage_failed") -> TokenRecord:
    return TokenRecord(request_id, -1, True, message, code)


class StageWorker:
    def __init__(self, model: StageModel, num_blocks: int, block_size: int, clock=time.monotonic):
        self.model = model
        self.blocks = BlockManager(num_blocks, block_size)
        self.pool = model.new_pool(num_blocks, block_size)
        self.slots = SlotIndex(self.blocks, model.device)
        self.samplers: dict[int, RequestSampler] = {}
        self.lengths: dict[int, int] = {}  # positions cached so far, per request
        self.last_used: dict[int, float] = {}  # when a request last had work here (to free forgotten ones)
        self.failed_requests = 0
        self.clock = clock
        self.cores: CoreShare | None = None  # threads that follow the machine's load (`share_cores`)

    def share_cores(self, cores: CoreShare) -> None:
        """Compute with the threads `cores` gives, re-read before every layer, instead of a fixed number."""
        self.cores = cores
        self.model.before_layer = cores.fit

    @property
    def capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    def check(self, batch: MicroBatch, inputs: torch.Tensor) -> None:
        """Raise BadBatch unless the tensor matches the segments (the batch's own consistency)."""
        total = sum(seg.n_tokens for seg in batch.segments)
        if self.model.first:
            if inputs.dtype not in (torch.int64, torch.int32) or tuple(inputs.shape) != (total,):
                raise BadBatch(f"expected token ids of shape [{total}], got {inputs.dtype} {list(inputs.shape)}")
            if total and (int(inputs.min()) < 0 or int(inputs.max()) >= self.model.info.vocab_size):
                raise BadBatch("token id outside the vocabulary")
        else:
            hidden = self.model.info.hidden_size
            if not inputs.is_floating_point() or tuple(inputs.shape) != (total, hidden):
                raise BadBatch(f"expected hidden states [{total}, {hidden}], got {inputs.dtype} {list(inputs.shape)}")
        seen = set()
        for seg in batch.segments:
            if seg.n_tokens < 1:
                raise BadBatch(f"segment of request {seg.request_id} has no tokens")
            if seg.request_id in seen:
                raise BadBatch(f"request {seg.request_id} has two segments in one batch")
            seen.add(seg.request_id)
        if len({new.request_id for new in batch.new}) != len(batch.new):
            raise BadBatch("a request is announced twice in one batch")

    def _admit(self, new: NewRequest) -> str | None:
        """Admit a new request; the reason when it cannot be."""
        info = self.model.info
        if not 0 < new.total_tokens <= info.max_positions:
            return f"{new.total_tokens} tokens do not fit the model's context of {info.max_positions}"
        try:
            new.params.validate(info.vocab_size)
        except ValueError as exc:
            return str(exc)
        if new.total_tokens - new.params.max_new_tokens < 1:
            return "the request has no prompt"
        try:
            self.blocks.admit(new.request_id, new.total_tokens)
        except CacheFull as exc:
            return f"no room in this stage's KV cache: {exc}"
        self.lengths[new.request_id] = 0
        if self.model.last:
            prompt = new.total_tokens - new.params.max_new_tokens
            limit = new.generated + min(new.params.max_new_tokens, info.max_positions - prompt)
            self.samplers[new.request_id] = RequestSampler.make(new.params, new.eos_token_ids, limit, new.generated)
        return None

    def _place(self, seg: Segment) -> str | None:
        """Give the segment its cache slots; the reason when the request cannot take it."""
        if seg.request_id not in self.blocks:
            return f"segment of unknown request {seg.request_id}"
        if seg.start != self.lengths[seg.request_id]:
            return f"segment starts at position {seg.start}, the request holds {self.lengths[seg.request_id]}"
        try:
            self.blocks.grow(seg.request_id, seg.start + seg.n_tokens)
        except CacheFull as exc:
            return str(exc)
        return None

    def step(self, batch: MicroBatch, inputs: torch.Tensor) -> StepResult:
        """Run one micro-batch (already `check`ed)."""
        now = self.clock()
        for request_id in batch.release:
            self.release(request_id)
        failed: dict[int, TokenRecord] = {}
        for new in batch.new:
            self.release(new.request_id)  # a re-announced id starts afresh
            if why := self._admit(new):
                failed[new.request_id] = failure(new.request_id, why, "invalid_request")
            else:
                self.last_used[new.request_id] = now
        keep: list[Segment] = []
        rows: list[int] = []
        row = 0
        for seg in batch.segments:
            if seg.request_id not in failed and (why := self._place(seg)):
                failed[seg.request_id] = failure(seg.request_id, f"stage cannot run it: {why}")
            if seg.request_id in failed:
                self.release(seg.request_id)
            else:
                keep.append(seg)
                rows.extend(range(row, row + seg.n_tokens))
                self.lengths[seg.request_id] = seg.start + seg.n_tokens
                self.last_used[seg.request_id] = now
            row += seg.n_tokens
        if failed:
            self.failed_requests += len(failed)
            if len(rows) != row:
                inputs = inputs.index_select(0, torch.tensor(rows, dtype=torch.int64, device=inputs.device))
            batch = MicroBatch(batch.batch_id, keep, [n for n in batch.new if n.request_id not in failed],
                               batch.release, [*batch.failed, *failed.values()])
        try:
            return self._run(batch, inputs)
        except Exception as exc:  # the same on every rank: nothing of this batch can go on
            for seg in batch.segments:
                self.release(seg.request_id)
            self.failed_requests += len(batch.segments)
            lost = [failure(seg.request_id, f"step failed: {exc}") for seg in batch.segments]
            batch = MicroBatch(batch.batch_id, [], [], batch.release, [*batch.failed, *lost])
            return self._run(batch, inputs[:0])
        finally:
            if self.cores is not None:
                self.cores.idle()  # the other stages of this machine may spread over the cores it used

    def _run(self, batch: MicroBatch, inputs: torch.Tensor) -> StepResult:
        if not batch.segments:  # only releases or failures travel in this batch
            if self.model.last:
                return StepResult(batch, records=list(batch.failed))
            return StepResult(batch, hidden=torch.empty(0, self.model.info.hidden_size, dtype=self.model.dtype))
        layout = build_layout(batch.segments, self.slots, self.model.device, self.pool.pad_slot)
        out = self.model(inputs, layout, self.pool)
        if not self.model.last:
            return StepResult(batch, hidden=out)
        sampled = [seg.request_id for seg in batch.segments if seg.sample]
        records = list(batch.failed)
        wanted = [self.samplers[rid].params.logprobs for rid in sampled]  # read before release
        for request_id, token in zip(sampled, sample(out, [self.samplers[rid] for rid in sampled])):
            if isinstance(token, SamplingError):
                self.failed_requests += 1
                record = failure(request_id, str(token), "sampling_failed")
            else:
                record = self.samplers[request_id].record(request_id, token)
            if record.finished:
                self.release(request_id)
            records.append(record)
        return StepResult(batch, records=with_logprobs(records, out, sampled, wanted))

    def idle_requests(self, bound_s: float) -> list[int]:
        """Requests that have had no work here for `bound_s`: nobody runs them any more (their release was
        lost with a broker, a stage or a micro-batch)."""
        now = self.clock()
        return [rid for rid in self.blocks.request_ids() if now - self.last_used.get(rid, now) > bound_s]

    def release(self, request_id: int) -> None:
        self.blocks.release(request_id)
        self.slots.forget(request_id)
        self.samplers.pop(request_id, None)
        self.lengths.pop(request_id, None)
        self.last_used.pop(request_id, None)
