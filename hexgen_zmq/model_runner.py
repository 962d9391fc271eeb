"""Device work of one stage rank: its slice of the model, its KV-cache pool, and one forward pass per
micro-batch of packed segments.

The decoder layers are transformers' own modules, built on the meta device and filled with this rank's
tensors only. Attention goes through a function registered with transformers' `AttentionInterface`: it
writes each new token's key/value into the paged pool and attends every segment to its own request's cache
(decode steps batched together, prompt chunks one by one with a causal mask).
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig
from transformers.modeling_utils import AttentionInterface

from hexgen_zmq import kernels
from hexgen_zmq.block_manager import BlockManager
from hexgen_zmq.checkpoint import CheckpointReader, ShardPlan, load_layer_state
from hexgen_zmq.messages import Segment
from hexgen_zmq.model_info import ModelInfo

ATTENTION_NAME = "hexgen_paged"
CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


class KVPool:
    """Per-layer key and value tensors of `num_blocks * block_size` token slots for this rank's KV heads,
    plus one zeroed block that padded gathers read. The rest is left uninitialised: on a CPU its pages
    cost no memory until a request first writes them, and nothing reads a slot before it is written."""

    def __init__(self, layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        slots = (num_blocks + 1) * block_size
        self.pad_slot = num_blocks * block_size  # first slot of the zeroed padding block
        self.keys = [torch.empty(slots, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.empty(slots, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        for tensor in (*self.keys, *self.values):
            tensor[self.pad_slot :].zero_()

    @staticmethod
    def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * layers * kv_heads * head_dim * dtype.itemsize


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
    decode_rows: torch.Tensor | None  # [B] rows of one-token segments
    decode_gather: torch.Tensor | None  # [B, L] their cache slots, padded
    decode_mask: torch.Tensor | None  # [B, 1, 1, L] True where a slot is real
    decode_lengths: torch.Tensor | None  # [B] real slots of each row
    prefills: list[PrefillChunk]
    sample_rows: torch.Tensor  # [S] rows whose logits pick a token
    pool: KVPool | None = None
    first_layer: int = 0


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
    layout = BatchLayout(
        positions=torch.tensor([positions], dtype=torch.long, device=device),
        write_slots=torch.cat(write_slots) if write_slots else torch.empty(0, dtype=torch.long, device=device),
        decode_rows=None,
        decode_gather=None,
        decode_mask=None,
        decode_lengths=None,
        prefills=prefills,
        sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=device),
    )
    if decode_rows:
        lengths = torch.tensor([s.numel() for s in decode_slots], device=device)
        layout.decode_rows = torch.tensor(decode_rows, dtype=torch.long, device=device)
        layout.decode_gather = torch.nn.utils.rnn.pad_sequence(decode_slots, batch_first=True, padding_value=pad_slot)
        longest = layout.decode_gather.shape[1]
        layout.decode_lengths = lengths
        layout.decode_mask = (torch.arange(longest, device=device) < lengths.unsqueeze(1)).view(len(decode_rows), 1, 1, longest)
    return layout


def paged_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """Attention over the paged cache. query [1, H, T, D], key/value [1, KV, T, D] (new tokens only)."""
    layout: BatchLayout = kwargs["hexgen_layout"]
    local = module.layer_idx - layout.first_layer
    k_pool, v_pool = layout.pool.keys[local], layout.pool.values[local]
    k_pool.index_copy_(0, layout.write_slots, key[0].transpose(0, 1))
    v_pool.index_copy_(0, layout.write_slots, value[0].transpose(0, 1))
    q = query[0]  # [H, T, D]
    out = torch.empty(q.shape[1], q.shape[0], q.shape[2], dtype=q.dtype, device=q.device)  # [T, H, D]
    if layout.decode_rows is not None:
        if kernels.usable(k_pool) and q.stride(-1) == 1:  # reads the cache in place: no padded copy per step
            scale = scaling if scaling is not None else q.shape[-1] ** -0.5
            kernels.decode_attention(q, k_pool, v_pool, layout.decode_gather, layout.decode_lengths,
                                     layout.decode_rows, out, scale)
        else:
            b, length = layout.decode_gather.shape
            flat = layout.decode_gather.view(-1)  # index_select is several times faster than advanced indexing
            kd = k_pool.index_select(0, flat).view(b, length, *k_pool.shape[1:]).transpose(1, 2)  # [B, KV, L, D]
            vd = v_pool.index_select(0, flat).view(b, length, *v_pool.shape[1:]).transpose(1, 2)
            all_decode = not layout.prefills  # then the decode rows are the whole batch, in order
            qd = (q if all_decode else q.index_select(1, layout.decode_rows)).transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=layout.decode_mask, scale=scaling, enable_gqa=True)
            if all_decode:
                return od.transpose(1, 2), None  # [B, 1, H, D]: HF reshapes it to [1, T = B, H * D]
            out[layout.decode_rows] = od[:, :, 0, :]
    for chunk in layout.prefills:
        qp = q[:, chunk.rows].unsqueeze(0)  # [1, H, n, D]
        kp = k_pool.index_select(0, chunk.gather).transpose(0, 1).unsqueeze(0)  # [1, KV, L, D]
        vp = v_pool.index_select(0, chunk.gather).transpose(0, 1).unsqueeze(0)
        op = F.scaled_dot_product_attention(
            qp, kp, vp, attn_mask=chunk.mask, is_causal=chunk.mask is None, scale=scaling, enable_gqa=True
        )
        out[chunk.rows] = op[0].transpose(0, 1)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION_NAME, paged_attention)


class RowParallel(nn.Module):
    """A row-parallel linear layer: each rank holds some input columns; the all-reduce sums the parts."""

    def __init__(self, linear: nn.Linear, group: dist.ProcessGroup):
        super().__init__()
        self.linear = linear
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        dist.all_reduce(y, group=self.group)
        return y


def _modeling_classes(model_type: str) -> tuple[type, type, type]:
    prefix = CLASS_PREFIX[model_type]
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return (getattr(module, f"{prefix}DecoderLayer"), getattr(module, f"{prefix}RMSNorm"),
            getattr(module, f"{prefix}RotaryEmbedding"))


class StageModel(nn.Module):
    """Layers [start, end) of the model for one TP rank, plus embeddings (first) or norm and head (last)."""

    def __init__(self, info: ModelInfo, layers: tuple[int, int], *, first: bool, last: bool,
                 dtype: torch.dtype, device: torch.device, shard: ShardPlan,
                 group: dist.ProcessGroup | None = None):
        super().__init__()
        self.info, self.first, self.last = info, first, last
        self.start, self.end = layers
        self.dtype, self.device, self.shard = dtype, device, shard
        layer_cls, norm_cls, rotary_cls = _modeling_classes(info.model_type)
        config = AutoConfig.from_pretrained(info.path, trust_remote_code=False)
        config._attn_implementation = ATTENTION_NAME
        local = copy.deepcopy(config)
        local.num_attention_heads = len(shard.q_heads)
        local.num_key_value_heads = len(shard.kv_heads)
        local.intermediate_size = shard.mlp[1] - shard.mlp[0]
        local.head_dim = info.head_dim
        local._attn_implementation = ATTENTION_NAME
        reader = CheckpointReader(info.path)
        pack = kernels.packing_usable(device, dtype)  # float32 on a CPU: weights in oneDNN's layout, packed once
        self.layers = nn.ModuleList()
        for index in range(self.start, self.end):
            with torch.device("meta"):
                layer = layer_cls(local, index)
            state = load_layer_state(reader, info, index, shard)
            layer.load_state_dict(self._cast(state), strict=True, assign=True)
            if group is not None and shard.size > 1:
                layer.self_attn.o_proj = RowParallel(layer.self_attn.o_proj, group)
                layer.mlp.down_proj = RowParallel(layer.mlp.down_proj, group)
            if pack:
                kernels.pack_linears(layer)
            self.layers.append(layer)
        self.rotary = rotary_cls(config=config).to(device)
        self.embed = self.norm = self.lm_head = None
        if first:
            self.embed = nn.Embedding.from_pretrained(self._cast1(reader.read("model.embed_tokens.weight")))
        if last:
            self.norm = norm_cls(info.hidden_size, eps=config.rms_norm_eps)
            self.norm.load_state_dict({"weight": self._cast1(reader.read("model.norm.weight"))}, assign=True)
            head = "lm_head.weight" if reader.has("lm_head.weight") and not info.tie_word_embeddings else "model.embed_tokens.weight"
            weight = self._cast1(reader.read(head))
            self.lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
            self.lm_head.load_state_dict({"weight": weight}, assign=True)
            if pack:
                self.lm_head = kernels.PackedLinear(self.lm_head)
        self.bytes_loaded = reader.bytes_read
        reader.close()
        self.eval()

    def _cast1(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=self.dtype).contiguous()

    def _cast(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: self._cast1(t) for name, t in state.items()}

    def new_pool(self, num_blocks: int, block_size: int) -> KVPool:
        return KVPool(len(self.layers), num_blocks, block_size, len(self.shard.kv_heads), self.info.head_dim,
                      self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, inputs: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        """Token ids [T] (first stage) or hidden states [T, hidden] in; hidden states [T, hidden] out, or
        float32 logits [S, vocab] of the sampled rows on the last stage."""
        if self.first:
            hidden = self.embed(inputs.to(self.device))
        else:
            hidden = inputs.to(device=self.device, dtype=self.dtype)
        hidden = hidden.unsqueeze(0)
        layout.first_layer = self.start
        if len(self.layers):
            cos_sin = self.rotary(hidden, layout.positions)
            for layer in self.layers:
                hidden = layer(hidden, position_embeddings=cos_sin, hexgen_layout=layout)
        hidden = hidden[0]
        if not self.last:
            return hidden
        picked = self.norm(hidden.index_select(0, layout.sample_rows))
        return self.lm_head(picked).float().cpu()  # sampling (and its generators) run on the CPU
