"""A decoder layer of the Llama family (Llama, Mistral, Qwen2, Qwen3) as a stage runs it.

transformers' own layer class still builds the layer and checks its weights (`load_state_dict(strict=True)`
in `StageModel`); this module then regroups those same tensors so that a step makes few calls: q, k and v
in one matrix product, gate and up in one, and around them the ops of `hexgen_zmq.model.kernels` (RMSNorm,
silu(gate) * up, rotary embedding of q and k with the KV-cache write; in C on a float32 or bfloat16 CPU
stage, in torch elsewhere), and attention straight over the paged KV pool on packed `[tokens, hidden]` rows. A decode step
of a small model on a CPU is dominated by per-call overhead and by reading each weight matrix once per call:
regrouping alone took 13% off a decode step of the tiny model at 16 rows, the C ops as much again. The
functions are transformers' (the oracle tests compare whole generations with Hugging Face `generate`, per
model family); float32 rounding order differs (hidden states within about 1e-5 after six layers).
"""

from __future__ import annotations

import torch
from torch import nn

from hexgen_zmq.model import kernels
from hexgen_zmq.model.attention import BatchLayout, paged_attention


def fuse(linears: list[nn.Linear]) -> nn.Linear:
    """One linear layer computing the given ones side by side (their outputs concatenated)."""
    first = linears[0]
    weight = torch.cat([lin.weight.detach() for lin in linears])
    bias = None
    if any(lin.bias is not None for lin in linears):
        bias = torch.cat([lin.bias.detach() if lin.bias is not None else weight.new_zeros(lin.out_features)
                          for lin in linears])
    fused = nn.Linear(first.in_features, weight.shape[0], bias=bias is not None, device="meta")
    fused.load_state_dict({"weight": weight, **({"bias": bias} if bias is not None else {})}, assign=True)
    return fused


class DecoderLayer(nn.Module):
    """The weights of one transformers decoder layer (its o_proj and down_proj possibly row-parallel), run
    over the packed rows of a micro-batch. With `pack`, every matrix is in oneDNN's packed layout."""

    def __init__(self, layer: nn.Module, head_dim: int, pack: bool):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.head_dim = head_dim
        self.q_heads = attn.q_proj.out_features // head_dim
        self.kv_heads = attn.k_proj.out_features // head_dim
        self.scale = attn.scaling
        self.intermediate = mlp.gate_proj.out_features
        self.input_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)  # Qwen3
        self.qkv = fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = attn.o_proj
        self.gate_up = fuse([mlp.gate_proj, mlp.up_proj])
        self.down_proj = mlp.down_proj
        self.act = mlp.act_fn
        self.silu = mlp.config.hidden_act == "silu"  # every supported family: one fused op
        weight = self.input_norm.weight
        self.fast = kernels.runs_on(weight.device, weight.dtype)  # the C kernels of hexgen_zmq.model.kernels
        if pack:
            kernels.pack_linears(self)

    def norm(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        return kernels.rms_norm(x, norm.weight, norm.variance_epsilon, self.fast)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: BatchLayout,
                k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        """hidden [T, hidden_size] -> [T, hidden_size]; cos, sin [T, 1, D]; writes the new keys and values
        into the pools at `layout.write_slots` and attends as `layout` says."""
        tokens = hidden.shape[0]
        heads = self.q_heads + 2 * self.kv_heads
        qkv = self.qkv(self.norm(hidden, self.input_norm)).view(tokens, heads, self.head_dim)
        if self.q_norm is not None:  # Qwen3: q and k heads normalised before they rotate
            qkv = torch.cat((self.norm(qkv[:, : self.q_heads], self.q_norm),
                             self.norm(qkv[:, self.q_heads : self.q_heads + self.kv_heads], self.k_norm),
                             qkv[:, self.q_heads + self.kv_heads :]), dim=1)
        q = kernels.rope_store(qkv, self.q_heads, self.kv_heads, cos, sin, k_pool, v_pool, layout.write_slots,
                               self.fast, layout.write_end() if self.fast else None)
        attended = paged_attention(q, k_pool, v_pool, layout, self.scale, self.fast)
        hidden = hidden + self.o_proj(attended.reshape(tokens, self.q_heads * self.head_dim))
        gate_up = self.gate_up(self.norm(hidden, self.post_norm))
        if self.silu:
            mlp = kernels.silu_mul(gate_up, self.fast)
        else:
            mlp = self.act(gate_up[:, : self.intermediate]) * gate_up[:, self.intermediate :]
        return hidden + self.down_proj(mlp)
