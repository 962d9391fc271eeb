"""Device work of one stage rank: its slice of the model, its KV-cache pool, and one forward pass per
micro-batch of packed segments.

Each decoder layer is built as transformers' own module on the meta device and filled with this rank's
tensors only (its `load_state_dict(strict=True)` checks them), then run as a `hexgen_zmq.model.layers.DecoderLayer`
over the packed rows, attending through the paged pool (`hexgen_zmq.model.attention`).
"""

from __future__ import annotations

import copy
import importlib
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoConfig

from hexgen_zmq.model import huge_pages, kernels
from hexgen_zmq.model.attention import BatchLayout
from hexgen_zmq.model.checkpoint import CheckpointReader, ShardPlan, load_layer_state
from hexgen_zmq.model.layers import DecoderLayer
from hexgen_zmq.model.info import ModelInfo

CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


class KVPool:
    """Per-layer key and value tensors of `num_blocks * block_size` token slots for this rank's KV heads,
    plus one zeroed block that padded gathers read. The rest is left uninitialised: on a CPU its pages (huge
    ones, of 2 MiB) cost no memory until a request first writes them, and nothing reads a slot before it is
    written."""

    def __init__(self, layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        slots = (num_blocks + 1) * block_size
        self.pad_slot = num_blocks * block_size  # first slot of the zeroed padding block
        shape = (slots, kv_heads, head_dim)
        self.keys = [self._empty(shape, dtype, device) for _ in range(layers)]
        self.values = [self._empty(shape, dtype, device) for _ in range(layers)]
        for tensor in (*self.keys, *self.values):
            tensor[self.pad_slot :].zero_()

    @staticmethod
    def _empty(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """On a CPU, on huge pages: decode attention reads every request's cache rows each step."""
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        return huge_pages.empty(math.prod(shape) * dtype.itemsize).view(dtype).view(shape)

    @staticmethod
    def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * layers * kv_heads * head_dim * dtype.itemsize


class RowParallel(nn.Module):
    """A row-parallel linear layer: each rank holds some input columns; the all-reduce sums the parts.

    In bfloat16 on the CPU's own products (`kernels.BlockedLinear`) the parts are float32 sums, added by the
    all-reduce in float32 and rounded once: the same one rounding as the whole product on one rank (and as
    Hugging Face's bfloat16), where bfloat16 parts would be rounded twice more, once each and once summed."""

    def __init__(self, linear: nn.Module, group: dist.ProcessGroup):
        super().__init__()
        self.linear = linear
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.linear, kernels.BlockedLinear) and self.linear.bf16:
            y = self.linear(x, float_out=True)
            dist.all_reduce(y, group=self.group)
            return y.to(x.dtype)
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
        local = copy.deepcopy(config)
        local.num_attention_heads = len(shard.q_heads)
        local.num_key_value_heads = len(shard.kv_heads)
        local.intermediate_size = shard.mlp[1] - shard.mlp[0]
        local.head_dim = info.head_dim
        reader = CheckpointReader(info.path)
        pack = kernels.relayout_usable(device, dtype)  # float32 or bfloat16 on a CPU: weights re-laid out once
        self.layers = nn.ModuleList()
        for index in range(self.start, self.end):
            with torch.device("meta"):
                layer = layer_cls(local, index)
            state = load_layer_state(reader, info, index, shard)
            layer.load_state_dict(self._cast(state), strict=True, assign=True)
            if group is not None and shard.size > 1:
                layer.self_attn.o_proj = RowParallel(layer.self_attn.o_proj, group)
                layer.mlp.down_proj = RowParallel(layer.mlp.down_proj, group)
            self.layers.append(DecoderLayer(layer, info.head_dim, pack))
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
                self.lm_head = kernels.fast_linear(self.lm_head)
        self.before_layer: Callable[[], None] | None = None  # called before each layer and the LM head
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
    def forward(self, inputs: torch.Tensor, layout: BatchLayout, pool: KVPool) -> torch.Tensor:
        """Token ids [T] (first stage) or hidden states [T, hidden] in; hidden states [T, hidden] out, or
        logits [S, vocab] of the sampled rows on the last stage, on the CPU, in the model's dtype."""
        if self.first:
            hidden = self.embed(inputs.to(self.device))
        else:
            hidden = inputs.to(device=self.device, dtype=self.dtype)
        if len(self.layers):
            cos, sin = self.rotary(hidden, layout.positions)  # [1, T, D] each
            cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)
            for layer, keys, values in zip(self.layers, pool.keys, pool.values):
                if self.before_layer is not None:
                    self.before_layer()
                hidden = layer(hidden, cos, sin, layout, keys, values)
        if not self.last:
            return hidden
        if self.before_layer is not None:
            self.before_layer()
        picked = self.norm(hidden.index_select(0, layout.sample_rows))
        # sampling (and its generators) run on the CPU; logits stay in the model's dtype (bfloat16 ones are read
        # exactly as float32 where needed: greedy rows in C, sampled and logprob rows one by one)
        return self.lm_head(picked).cpu()
