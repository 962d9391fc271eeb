"""CPU fast paths of a stage: what a float32 or bfloat16 decode step on a CPU spends its time on, done without
waste.

- Paged decode attention in C (`_kernels.c`, built with the package when a C compiler is at hand): each
  request's keys and values are read from the KV pool in place, instead of being gathered into a padded copy
  that scaled_dot_product_attention then reads again. Requests are spread over the matrix products'
  thread pool (`_matmul.c`), one per chunk: a 32-row SmolLM2 step spent 30% of its time here on one thread.
- The small ops around a layer's matrix products, in C too: RMSNorm, silu(gate) * up, and the rotary
  embedding of q and k with the KV-cache write, one pass each instead of several torch ops (each op costs
  some microseconds of dispatch however few rows it has, and a decode step has a few hundred); silu * up
  of many rows on the pool too. Each falls back to the same function in torch for other devices and dtypes,
  or without the extension.
- Linear layers with their weights copied once, at load, into blocks that `_matmul.c` streams on AVX-512
  (float32 FMAs, or bfloat16 VDPBF16PS; bfloat16 products of 3 rows or more on AMX tiles where the CPU has
  them), or on AVX2 and FMA (bfloat16 weights widened as they load), over a pool of threads of its own
  (`BlockedLinear`), from huge pages (`huge_pages`). A decode step multiplies a few rows by every weight matrix,
  so it runs at the speed weights stream from memory; on this project's 2-core AVX-512 machine a SmolLM2
  step's products at one row take 0.8x the time of oneDNN's packed ones (about 19 GB/s against 14), and
  about the same from 32 rows up. Where that is not built or the CPU lacks AVX2 and FMA, the weights are
  packed once into oneDNN's layout instead (`PackedLinear`): plain `F.linear` re-packs each weight on every
  call (1.6x slower per layer at 16 rows, 1.1x for 1024-row prompts). `HEXGEN_ZMQ_BLOCKED=0` chooses oneDNN where both work.

All compute the same functions as the torch path, with float32 rounding in a different order (about 1e-6
relative per op). `HEXGEN_ZMQ_KERNELS=0` in a stage's environment turns them all off; `tools/bench_decode_step.py`
measures one against the other.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hexgen_zmq.model import huge_pages

try:
    from hexgen_zmq.model import _kernels
except ImportError:  # built without a C compiler
    _kernels = None

log = logging.getLogger(__name__)
PACK_ROWS_HINT = 16  # oneDNN picks the packed layout for about this many rows (a decode batch); any count works


def switched_on() -> bool:
    return os.environ.get("HEXGEN_ZMQ_KERNELS", "1") != "0"


def enabled() -> bool:
    """Whether the C kernels are built and switched on."""
    return _kernels is not None and switched_on()


KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # the C kernels' buffers: float32, or bfloat16 bit patterns


def runs_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the C kernels serve a stage on this device and dtype (float32 or bfloat16 on a CPU). A stage
    asks once, when it loads, and passes the answer as `fast` to the functions below."""
    return enabled() and device.type == "cpu" and dtype in KERNEL_DTYPES


def slots_end(slots: torch.Tensor) -> int:
    """1 + the highest of these pool slots (0 for none); ValueError if one is negative."""
    if not slots.numel():
        return 0
    low, high = torch.aminmax(slots)
    if int(low) < 0:
        raise ValueError("a slot is out of range of the pool")
    return int(high) + 1


@dataclass
class DecodeIndex:
    """Which cache slots each decode row of a step reads: row rows[b] attends to slots gather[b, :lengths[b]].
    Built once per step and shared by every layer, so the kernel checks it once (`check`), not per layer."""

    gather: torch.Tensor  # [B, L] int64, contiguous, padded
    lengths: torch.Tensor  # [B] int64
    rows: torch.Tensor  # [B] int64
    _checked: tuple[int, int] | None = None  # (tokens, 1 + highest slot) once checked
    _scratch: torch.Tensor | None = None  # the attention kernel's float32 scratch, shared by the step's layers

    def scratch(self, floats: int) -> torch.Tensor:
        """At least `floats` float32 of scratch, allocated once per step (not once per layer)."""
        if self._scratch is None or self._scratch.numel() < floats:
            self._scratch = torch.empty(floats, dtype=torch.float32)
        return self._scratch

    def check(self, tokens: int) -> int:
        """Raise ValueError unless the index is safe for the kernel over `tokens` rows; returns how many slots
        a pool needs (1 + the highest slot read)."""
        if self._checked is not None and self._checked[0] == tokens:
            return self._checked[1]
        for name, tensor in (("gather", self.gather), ("lengths", self.lengths), ("rows", self.rows)):
            if tensor.dtype != torch.int64 or not tensor.is_contiguous() or tensor.device.type != "cpu":
                raise ValueError(f"decode_attention: {name} must be contiguous int64 on the CPU")
        batch, longest = self.gather.shape
        if self.lengths.shape != (batch,) or self.rows.shape != (batch,):
            raise ValueError("decode_attention: gather, lengths and rows disagree on the batch size")
        if batch:
            lengths, rows = self.lengths, self.rows
            if (int(lengths.min()) < 1 or int(lengths.max()) > longest or int(rows.min()) < 0
                    or int(rows.max()) >= tokens):
                raise ValueError("decode_attention: a length or row is out of range")
        slots_needed = slots_end(self.gather)
        self._checked = (tokens, slots_needed)
        return slots_needed


def decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, index: DecodeIndex,
                     out: torch.Tensor, scale: float) -> None:
    """out[rows[b]] = attention of q[:, rows[b]] over the pool slots gather[b, :lengths[b]], for every b.

    q [H, T, D] (any strides with a unit last one), pools [slots, KV, D] contiguous, out [T, H, D] contiguous,
    all float32 or all bfloat16 (computed in float32, the output rounded once)."""
    heads, tokens, head_dim = q.shape
    kv_heads = k_pool.shape[1]
    for name, tensor in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool), ("out", out)):
        if tensor.dtype not in KERNEL_DTYPES or tensor.dtype != q.dtype or tensor.device.type != "cpu":
            raise ValueError(f"decode_attention: {name} must be float32 or bfloat16 like q, on the CPU, not "
                             f"{tensor.dtype} {tensor.device}")
    if (k_pool.shape != v_pool.shape or k_pool.dim() != 3 or k_pool.shape[2] != head_dim or heads % kv_heads
            or not (k_pool.is_contiguous() and v_pool.is_contiguous())):
        raise ValueError(f"decode_attention: pools {list(k_pool.shape)} do not fit query heads {heads} x {head_dim}")
    if q.stride(2) != 1 or out.shape != (tokens, heads, head_dim) or not out.is_contiguous():
        raise ValueError("decode_attention: q needs a unit last stride and out the shape [T, H, D], contiguous")
    if index.check(tokens) > k_pool.shape[0]:
        raise ValueError("decode_attention: a slot is out of range of the pool")
    batch, longest = index.gather.shape
    if batch == 0:
        return
    per = heads * (longest + head_dim)  # scores and a float32 output row per request, one request per thread
    scratch = index.scratch(batch * per)
    _kernels.decode_attention(q.data_ptr(), q.stride(1), q.stride(0), k_pool.data_ptr(), v_pool.data_ptr(),
                              index.gather.data_ptr(), index.gather.stride(0), index.lengths.data_ptr(),
                              index.rows.data_ptr(), out.data_ptr(), out.stride(0), batch, heads, kv_heads, head_dim,
                              float(scale), scratch.data_ptr(), per, q.dtype == torch.bfloat16,
                              torch.get_num_threads())


def _kernel_dtype(*tensors: torch.Tensor) -> bool:
    """Whether the tensors share one dtype that the C kernels take."""
    return tensors[0].dtype in KERNEL_DTYPES and all(t.dtype == tensors[0].dtype for t in tensors)


def greedy(logits: torch.Tensor) -> tuple[list[int], list[bool]]:
    """For each row of logits [S, vocab]: the index of its first largest value (argmax), and whether all its
    values are finite. One pass in C over float32 or bfloat16 rows on a CPU (torch's argmax over the last
    axis takes 4.6 ms for 32 rows of 49,152, and the finiteness check another pass); torch elsewhere."""
    if (enabled() and logits.device.type == "cpu" and logits.dtype in KERNEL_DTYPES and logits.dim() == 2
            and logits.stride(1) == 1):
        out = torch.empty(logits.shape[0], dtype=torch.int64)
        if logits.shape[0] and logits.shape[1]:
            _kernels.greedy(logits.data_ptr(), logits.shape[0], logits.shape[1], logits.stride(0), out.data_ptr(),
                            logits.dtype == torch.bfloat16)
            picked = out.tolist()
            return [max(i, 0) for i in picked], [i >= 0 for i in picked]
    values = logits.float()
    # max's indices are argmax's (the first of equal maxima), several times faster over the last axis
    return values.max(-1).indices.tolist(), torch.isfinite(values).all(-1).tolist()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fast: bool) -> torch.Tensor:
    """transformers' RMSNorm over the last axis: `weight * (x in float32, normalised).to(x.dtype)`."""
    dim = weight.shape[0]
    if (fast and _kernel_dtype(x, weight) and x.dim() == 2 and x.shape[1] == dim and x.stride(1) == 1
            and weight.is_contiguous()):
        out = torch.empty(x.shape, dtype=x.dtype)
        _kernels.rms_norm(x.data_ptr(), x.shape[0], dim, x.stride(0), weight.data_ptr(), float(eps), out.data_ptr(),
                          x.dtype == torch.bfloat16)
        return out
    if x.dtype == torch.float32:
        return F.rms_norm(x, (dim,), weight, eps)
    return weight * F.rms_norm(x.float(), (dim,), None, eps).to(x.dtype)


def silu_mul(gate_up: torch.Tensor, fast: bool) -> torch.Tensor:
    """silu(gate) * up, for gate_up [T, 2 I] holding the gate and up projections side by side."""
    inter = gate_up.shape[1] // 2
    if fast and _kernel_dtype(gate_up) and gate_up.dim() == 2 and gate_up.stride(1) == 1:
        out = torch.empty(gate_up.shape[0], inter, dtype=gate_up.dtype)
        _kernels.silu_mul(gate_up.data_ptr(), gate_up.shape[0], inter, gate_up.stride(0), out.data_ptr(),
                          gate_up.dtype == torch.bfloat16, torch.get_num_threads())
        return out
    return F.silu(gate_up[:, :inter]) * gate_up[:, inter:]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [T, heads, D] with cos, sin [T, 1, D]: transformers' `apply_rotary_pos_emb`."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rope_store(qkv: torch.Tensor, q_heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
               k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, fast: bool,
               end: int | None = None) -> torch.Tensor:
    """qkv [T, q_heads + 2 kv_heads, D]: rotate q and k (cos, sin [T, 1, D]), write k and v into the pools at
    `slots` [T]; returns the rotated q [T, q_heads, D]. `end`: `slots_end(slots)`, when the caller has it
    from an earlier layer of the same step."""
    tokens, _, head_dim = qkv.shape
    if (fast and _kernel_dtype(qkv, cos, sin, k_pool, v_pool) and qkv.stride(2) == 1 and qkv.stride(1) == head_dim
            and cos.is_contiguous() and sin.is_contiguous() and cos.numel() == sin.numel() == tokens * head_dim
            and k_pool.is_contiguous() and v_pool.is_contiguous() and k_pool.shape == v_pool.shape
            and k_pool.shape[1:] == (kv_heads, head_dim) and qkv.shape[1] == q_heads + 2 * kv_heads
            and slots.dtype == torch.int64 and slots.is_contiguous() and slots.shape == (tokens,)):
        if (slots_end(slots) if end is None else end) > k_pool.shape[0]:
            raise ValueError("rope_store: a slot is out of range of the pool")
        q = torch.empty(tokens, q_heads, head_dim, dtype=qkv.dtype)
        _kernels.rope_store(qkv.data_ptr(), tokens, qkv.stride(0), q_heads, kv_heads, head_dim, cos.data_ptr(),
                            sin.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), slots.data_ptr(), q.data_ptr(),
                            qkv.dtype == torch.bfloat16)
        return q
    qk = rotate(qkv[:, : q_heads + kv_heads], cos, sin)  # q and k in one pass over their adjacent heads
    k_pool.index_copy_(0, slots, qk[:, q_heads:])
    v_pool.index_copy_(0, slots, qkv[:, q_heads + kv_heads :])
    return qk[:, :q_heads]


EXACT_ROWS = 64  # up to this many rows (a decode batch) a packed layer computes exactly the rows it gets


def bucket_rows(n: int) -> int:
    """The row count a packed linear layer computes for n rows: n itself up to EXACT_ROWS, then n rounded up
    to a quarter of its power of two (at most 25% padding, about 4 sizes per doubling)."""
    if n <= EXACT_ROWS:
        return n
    step = 1 << (n.bit_length() - 3)
    return -(-n // step) * step


class PackedLinear(nn.Module):
    """An nn.Linear (of transformers' layers) with its weight in oneDNN's packed layout; the original is freed."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACK_ROWS_HINT)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel() // self.in_features
        if n <= EXACT_ROWS:  # decode steps: as they come (a new row count costs ~0.5 ms once, per shape)
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        # oneDNN builds a kernel per row count (~0.5 ms a layer): prompt chunks share a few padded sizes
        padded = bucket_rows(n)
        rows = x.reshape(n, self.in_features)
        if padded > n:
            rows = F.pad(rows, (0, 0, 0, padded - n))
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")[:n]
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


def blocked_usable(dtype: torch.dtype) -> bool:
    """Whether `BlockedLinear` runs here for this dtype: the extension is built, switched on, and this CPU
    has AVX-512 or AVX2 and FMA."""
    return (enabled() and dtype in KERNEL_DTYPES and os.environ.get("HEXGEN_ZMQ_BLOCKED", "1") != "0"
            and _kernels.matmul_supported(dtype == torch.bfloat16))


def amx_min_rows(rows: int | None = None) -> int | None:
    """bfloat16 `BlockedLinear` products of at least this many rows run on the CPU's AMX tiles (Sapphire Rapids
    and later): returns the setting, or None where this CPU has none. `rows` sets it (0: never; for
    measuring the two paths against each other); `HEXGEN_ZMQ_AMX=0` in a stage's environment does the same."""
    if not enabled():
        return None
    before = _kernels.matmul_amx(-1 if rows is None else rows)
    return None if before < 0 else _kernels.matmul_amx(-1)


if enabled() and os.environ.get("HEXGEN_ZMQ_AMX", "1") == "0":
    amx_min_rows(0)


class BlockedLinear(nn.Module):
    """An nn.Linear (of transformers' layers) with its weight copied into `_matmul.c`'s blocked layout, run
    on as many threads as torch is set to use (what the stage's core share gives it); the original is freed."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().contiguous()
        if weight.device.type != "cpu" or not blocked_usable(weight.dtype):
            raise ValueError(f"BlockedLinear: {weight.dtype} weights on {weight.device} do not run here")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype, self.bf16 = weight.dtype, weight.dtype == torch.bfloat16
        size = _kernels.matmul_blocked_size(self.out_features, self.in_features, self.bf16)
        # 64-byte aligned, as the kernel reads it; on huge pages, as every step streams all of it
        self.register_buffer("blocked", huge_pages.empty(size), persistent=False)
        _kernels.matmul_block_weight(weight.data_ptr(), self.out_features, self.in_features, self.bf16,
                                     self.blocked.data_ptr())
        bias = None if linear.bias is None else linear.bias.detach().to(self.dtype).contiguous()
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor, float_out: bool = False) -> torch.Tensor:
        """x [..., in] -> [..., out] in the weights' dtype; with `float_out`, the float32 sums unrounded (for
        bfloat16: a row-parallel part that an all-reduce adds to the others' before the one rounding)."""
        if x.dtype != self.dtype or x.device.type != "cpu":
            raise ValueError(f"BlockedLinear holds {self.dtype} weights on the CPU, not {x.dtype} {x.device} input")
        rows = x.reshape(-1, self.in_features)
        if rows.stride(1) != 1:
            rows = rows.contiguous()
        n = rows.shape[0]
        out = torch.empty(n, self.out_features, dtype=torch.float32 if float_out else self.dtype)
        blocked, bias = self.blocked, self.bias  # held here while the C code (without the GIL) reads them
        if n:
            _kernels.matmul(rows.data_ptr(), n, rows.stride(0), blocked.data_ptr(),
                            self.out_features, self.in_features, 0 if bias is None else bias.data_ptr(),
                            out.data_ptr(), self.out_features, self.bf16, torch.get_num_threads(), float_out)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blocked=_matmul.c"


def fast_linear(linear: nn.Linear) -> nn.Module:
    """The fastest form of a CPU linear layer here: BlockedLinear, else PackedLinear (callers check
    `relayout_usable` first)."""
    return BlockedLinear(linear) if blocked_usable(linear.weight.dtype) else PackedLinear(linear)


def warm_up(module: nn.Module, max_rows: int) -> int:
    """Run every PackedLinear shape under `module` once at every row count a step of up to `max_rows` tokens
    computes, so that oneDNN builds its kernels before the stage serves: otherwise the first steps at each
    new row count wait ~0.5 ms per shape (about a tenth of a short benchmark, measured here). Returns how
    many calls it made."""
    shapes: dict[tuple, PackedLinear] = {}
    for child in module.modules():
        if isinstance(child, PackedLinear):
            shapes.setdefault((child.in_features, child.out_features, child.bias is not None), child)
    counts = sorted({bucket_rows(n) for n in range(1, max_rows + 1)})
    with torch.inference_mode():
        for linear in shapes.values():
            for n in counts:
                linear(torch.zeros(n, linear.in_features, dtype=linear.packed.dtype))
    return len(shapes) * len(counts)


_packing_works: dict[torch.dtype, bool] = {}
PACKED_DTYPES = (torch.float32, torch.bfloat16)


def packing_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether linear layers of a stage on this device and dtype can be packed: float32 on a CPU whose torch
    has oneDNN, and bfloat16 where oneDNN also has bf16 dot products (AVX512-BF16 or AMX); checked once per
    dtype against F.linear."""
    if device.type != "cpu" or dtype not in PACKED_DTYPES or not switched_on():
        return False
    if dtype not in _packing_works:
        try:
            if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
                raise RuntimeError("oneDNN has no bfloat16 dot products on this CPU")
            gen = torch.Generator().manual_seed(0)
            probe = nn.Linear(48, 40, dtype=dtype)
            with torch.no_grad():
                probe.weight.copy_(torch.randn(40, 48, generator=gen))
            x = torch.randn(3, 5, 48, generator=gen).to(dtype)
            tolerance = 1e-4 if dtype == torch.float32 else 2e-2
            with torch.inference_mode():
                packed, plain = PackedLinear(probe)(x).float(), probe(x).float()
            _packing_works[dtype] = torch.allclose(packed, plain, rtol=tolerance, atol=tolerance * 10)
        except (RuntimeError, AttributeError, NotImplementedError) as exc:  # no oneDNN in this build of torch
            log.info("%s linear layers stay unpacked: %s", dtype, exc)
            _packing_works[dtype] = False
    return _packing_works[dtype]


def relayout_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a stage's linear layers on this device and dtype are copied once, at load, into a faster layout:
    `_matmul.c`'s blocks (AVX-512, or AVX2 and FMA: bfloat16 included, which oneDNN lacks on AVX2 CPUs and
    torch then multiplies ten times slower than float32), else oneDNN's packed one."""
    return device.type == "cpu" and (blocked_usable(dtype) or packing_usable(device, dtype))


def pack_linears(module: nn.Module) -> int:
    """Replace every nn.Linear under `module` by its `fast_linear` form; returns how many."""
    count = 0
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            setattr(module, name, fast_linear(child))
            count += 1
        else:
            count += pack_linears(child)
    return count
