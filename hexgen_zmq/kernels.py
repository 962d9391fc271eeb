"""The optional C kernel of CPU stages (`_kernels.c`): paged decode attention read straight from the KV pool.

Built with the package when a C compiler is at hand; without it, or with `HEXGEN_ZMQ_KERNELS=0` in the
environment, stages use the torch path (gather, then scaled_dot_product_attention). Both give the same
tokens; the kernel saves the padded copy of every request's cache on every decode step.
"""

from __future__ import annotations

import os

import torch

try:
    from hexgen_zmq import _kernels
except ImportError:  # built without a C compiler
    _kernels = None


def enabled() -> bool:
    return _kernels is not None and os.environ.get("HEXGEN_ZMQ_KERNELS", "1") != "0"


def usable(pool: torch.Tensor) -> bool:
    """Whether decode attention over this pool can run in the kernel (float32 on a CPU)."""
    return enabled() and pool.device.type == "cpu" and pool.dtype == torch.float32


def decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, gather: torch.Tensor,
                     lengths: torch.Tensor, rows: torch.Tensor, out: torch.Tensor, scale: float) -> None:
    """out[rows[b]] = attention of q[:, rows[b]] over the pool slots gather[b, :lengths[b]], for every b.

    q [H, T, D] (any strides with a unit last one), pools [slots, KV, D] contiguous, gather [B, L],
    lengths and rows [B] (int64), out [T, H, D] contiguous float32."""
    heads, tokens, head_dim = q.shape
    kv_heads = k_pool.shape[1]
    batch, longest = gather.shape
    for name, tensor in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool), ("out", out)):
        if tensor.dtype != torch.float32 or tensor.device.type != "cpu":
            raise ValueError(f"decode_attention: {name} must be float32 on the CPU, not {tensor.dtype} {tensor.device}")
    for name, tensor in (("gather", gather), ("lengths", lengths), ("rows", rows)):
        if tensor.dtype != torch.int64 or not tensor.is_contiguous():
            raise ValueError(f"decode_attention: {name} must be contiguous int64")
    if (k_pool.shape != v_pool.shape or k_pool.dim() != 3 or k_pool.shape[2] != head_dim or heads % kv_heads
            or not (k_pool.is_contiguous() and v_pool.is_contiguous())):
        raise ValueError(f"decode_attention: pools {list(k_pool.shape)} do not fit query heads {heads} x {head_dim}")
    if q.stride(2) != 1 or out.shape != (tokens, heads, head_dim) or not out.is_contiguous():
        raise ValueError("decode_attention: q needs a unit last stride and out the shape [T, H, D], contiguous")
    if lengths.shape != (batch,) or rows.shape != (batch,):
        raise ValueError("decode_attention: gather, lengths and rows disagree on the batch size")
    if batch == 0:
        return
    if int(lengths.min()) < 1 or int(lengths.max()) > longest or int(rows.min()) < 0 or int(rows.max()) >= tokens:
        raise ValueError("decode_attention: a length or row is out of range")
    scratch = torch.empty(heads * (longest + head_dim), dtype=torch.float32)
    _kernels.decode_attention(q.data_ptr(), q.stride(1), q.stride(0), k_pool.data_ptr(), v_pool.data_ptr(),
                              gather.data_ptr(), gather.stride(0), lengths.data_ptr(), rows.data_ptr(),
                              out.data_ptr(), out.stride(0), batch, heads, kv_heads, head_dim, float(scale),
                              scratch.data_ptr())
