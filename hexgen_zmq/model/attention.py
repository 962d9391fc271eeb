"""Where every token of a micro-batch sits in the paged KV pool, and attention over that pool.

A micro-batch packs many requests' tokens along one axis. `build_layout` works out, once per step, each
token's position and cache slot and which rows attend how: one-token decode rows all together (the C kernel
of `hexgen_zmq.model.kernels` reads the pool in place; otherwise a padded gather and SDPA), prompt chunks one by one
with a causal mask. Every layer of the stage reuses that layout with its own slice of the pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hexgen_zmq.model import kernels
from hexgen_zmq.stage.block_manager import BlockManager
from hexgen_zmq.wire.messages import Segment


@dataclass
class PrefillChunk:
    rows: slice  # the chunk's tokens in the packed batch
    gather: torch.Tensor  # [length] cache slots of positions 0..start+n-1
    mask: torch.Tensor | None  # [n, length] bool, None when the chunk starts at position 0 (plain causal)


@dataclass
class BatchLayout:
    """Where every token of a micro-batch sits, computed once and shared by all layers."""

    positions: torch.Tensor  # [1, T]
    write_slots: torch.Tensor  # [T] cache slot of each new token
    decode: kernels.DecodeIndex | None  # the one-token segments: their rows and cache slots (padded)
    prefills: list[PrefillChunk]
    sample_rows: torch.Tensor  # [S] rows whose logits pick a token
    _decode_mask: torch.Tensor | None = None
    _write_end: int | None = None

    def write_end(self) -> int:
        """`kernels.slots_end` of the write slots: checked once per step, not once per layer."""
        if self._write_end is None:
            self._write_end = kernels.slots_end(self.write_slots)
        return self._write_end

    def decode_mask(self) -> torch.Tensor:
        """[B, 1, 1, L], True where a decode row's padded slot is real (for the torch path only)."""
        if self._decode_mask is None:
            gather, lengths = self.decode.gather, self.decode.lengths
            real = torch.arange(gather.shape[1], device=gather.device) < lengths.unsqueeze(1)
            self._decode_mask = real.view(gather.shape[0], 1, 1, gather.shape[1])
        return self._decode_mask


class SlotIndex:
    """The cache slot of every position of every request, as tensors rebuilt only when a request's block
    table grows (once per block), so laying out a step costs a few tensor slices per request."""

    def __init__(self, blocks: BlockManager, device: torch.device):
        self.blocks = blocks
        self.device = device
        self.offsets = torch.arange(blocks.block_size, device=device)
        self._slots: dict[int, torch.Tensor] = {}

    def slots(self, request_id: int, end: int) -> torch.Tensor:
        """Slots of positions [0, end) of the request (its table must cover them)."""
        cached = self._slots.get(request_id)
        if cached is None or cached.numel() < end:
            table = torch.tensor(self.blocks.table(request_id), dtype=torch.long, device=self.device)
            cached = (table.unsqueeze(1) * self.blocks.block_size + self.offsets).view(-1)
            self._slots[request_id] = cached
        return cached[:end]

    def forget(self, request_id: int) -> None:
        self._slots.pop(request_id, None)


def build_layout(segments: list[Segment], index: SlotIndex, device: torch.device, pad_slot: int) -> BatchLayout:
    """Positions, cache slots and attention groups of a micro-batch (tables must already cover it);
    decode gathers are padded with `pad_slot`, a slot that always holds zeros."""
    positions: list[int] = []
    write_slots: list[torch.Tensor] = []
    decode_rows: list[int] = []
    decode_slots: list[torch.Tensor] = []
    prefills: list[PrefillChunk] = []
    sample_rows: list[int] = []
    row = 0
    for seg in segments:
        end = seg.start + seg.n_tokens
        slots = index.slots(seg.request_id, end)
        positions.extend(range(seg.start, end))
        write_slots.append(slots[seg.start :])
        if seg.n_tokens == 1:
            decode_rows.append(row)
            decode_slots.append(slots)
        elif seg.n_tokens > 1:
            mask = None
            if seg.start > 0:  # a later chunk of a prompt: causal, offset by what is cached
                mask = torch.arange(end, device=device).unsqueeze(0) <= torch.arange(seg.start, end, device=device).unsqueeze(1)
            prefills.append(PrefillChunk(slice(row, row + seg.n_tokens), slots, mask))
        if seg.sample and seg.n_tokens:
            sample_rows.append(row + seg.n_tokens - 1)
        row += seg.n_tokens
    decode = None
    if decode_rows:
        gather = torch.nn.utils.rnn.pad_sequence(decode_slots, batch_first=True, padding_value=pad_slot)
        lengths = torch.tensor([s.numel() for s in decode_slots], device=device)
        decode = kernels.DecodeIndex(gather, lengths, torch.tensor(decode_rows, device=device))
    return BatchLayout(
        positions=torch.tensor([positions], dtype=torch.long, device=device),
        write_slots=torch.cat(write_slots) if write_slots else torch.empty(0, dtype=torch.long, device=device),
        decode=decode,
        prefills=prefills,
        sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=device),
    )


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, layout: BatchLayout,
                    scale: float, fast: bool) -> torch.Tensor:
    """Attend every row to its own request's cache, the step's new keys and values already in the pools.
    q [T, H, D] (any strides with a unit last one); returns [T, H, D]. `fast`: decode rows in the C kernel."""
    out = q.new_empty(q.shape)
    if layout.decode is not None:
        if fast:  # reads the cache in place: no padded copy per step
            kernels.decode_attention(q.transpose(0, 1), k_pool, v_pool, layout.decode, out, scale)
        else:
            gather, rows = layout.decode.gather, layout.decode.rows
            b, length = gather.shape
            flat = gather.view(-1)  # index_select is several times faster than advanced indexing
            kd = k_pool.index_select(0, flat).view(b, length, *k_pool.shape[1:]).transpose(1, 2)  # [B, KV, L, D]
            vd = v_pool.index_select(0, flat).view(b, length, *v_pool.shape[1:]).transpose(1, 2)
            all_decode = not layout.prefills  # then the decode rows are the whole batch, in order
            qd = (q if all_decode else q.index_select(0, rows)).unsqueeze(2)  # [B, H, 1, D]
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=layout.decode_mask(), scale=scale,
                                                enable_gqa=True)
            if all_decode:
                return od[:, :, 0]
            out[rows] = od[:, :, 0]
    for chunk in layout.prefills:
        qp = q[chunk.rows].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        kp = k_pool.index_select(0, chunk.gather).transpose(0, 1).unsqueeze(0)  # [1, KV, L, D]
        vp = v_pool.index_select(0, chunk.gather).transpose(0, 1).unsqueeze(0)
        op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=chunk.mask, is_causal=chunk.mask is None,
                                            scale=scale, enable_gqa=True)
        out[chunk.rows] = op[0].transpose(0, 1)
    return out
