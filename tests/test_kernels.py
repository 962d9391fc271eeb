"""The C kernels against the torch path they replace, in float32 and bfloat16: same attention, from the pool in
place, and the same small per-layer ops (bfloat16 rounded where torch's bfloat16 ops round)."""

from __future__ import annotations

import shutil
import sysconfig

import pytest
import torch
import torch.nn.functional as F

from hexgen_zmq.model import kernels
from hexgen_zmq.wire.messages import MicroBatch, NewRequest, SamplingParams, Segment

needs_kernel = pytest.mark.skipif(not kernels.enabled(), reason="the C kernel is not built here")


def test_kernel_is_built_where_a_compiler_is():
    """The extension is optional for users without a compiler; CI has one, so a silent build failure fails."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler})")
    assert kernels._kernels is not None


def reference(q, k_pool, v_pool, gather, lengths, rows, scale):
    """Gather, mask, scaled_dot_product_attention: the torch path, one row at a time."""
    out = {}
    for b in range(gather.shape[0]):
        slots = gather[b, : lengths[b]]
        k = k_pool[slots].transpose(0, 1).unsqueeze(0)  # [1, KV, L, D]
        v = v_pool[slots].transpose(0, 1).unsqueeze(0)
        qb = q[:, rows[b]].unsqueeze(0).unsqueeze(2)  # [1, H, 1, D]
        out[int(rows[b])] = F.scaled_dot_product_attention(qb, k, v, scale=scale, enable_gqa=True)[0, :, 0]
    return out


DTYPES = [torch.float32, torch.bfloat16]
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2}}


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 4, 32), (9, 3, 64), (16, 2, 128), (4, 4, 24), (6, 1, 8),
                                                    (28, 4, 64), (14, 2, 128)])  # groups of 2, 3, 8, 1, 6, 7, 7
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_attention_matches_sdpa(heads, kv_heads, head_dim, dtype, threads, monkeypatch):
    """One request per chunk of the thread pool, each with its own scratch: any thread count, same answer."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    gen = torch.Generator().manual_seed(heads * 100 + head_dim)
    slots, tokens = 300, 7
    k_pool = torch.randn(slots, kv_heads, head_dim, generator=gen).to(dtype)
    v_pool = torch.randn(slots, kv_heads, head_dim, generator=gen).to(dtype)
    q = torch.randn(tokens, heads, head_dim, generator=gen).to(dtype).transpose(0, 1)  # [H, T, D], not contiguous
    lengths = torch.tensor([1, 37, 5, 64])
    gather = torch.full((4, 64), slots - 1, dtype=torch.long)  # padding points at a real slot: must be ignored
    for b, n in enumerate(lengths.tolist()):
        gather[b, :n] = torch.randperm(slots - 1, generator=gen)[:n]
    rows = torch.tensor([6, 0, 3, 2])  # decode rows among prompt rows, out of order
    out = torch.full((tokens, heads, head_dim), 7.0, dtype=dtype)
    scale = head_dim**-0.5
    kernels.decode_attention(q, k_pool, v_pool, kernels.DecodeIndex(gather, lengths, rows), out, scale)
    # the reference attends in float32 over the same (bfloat16) values: the kernel rounds only its output
    expected = reference(q.float(), k_pool.float(), v_pool.float(), gather, lengths, rows, scale)
    for row, value in expected.items():
        torch.testing.assert_close(out[row], value.to(dtype), **TOLERANCE[dtype])
    untouched = [t for t in range(tokens) if t not in rows.tolist()]
    assert torch.all(out[untouched] == 7.0)  # rows of other segments are left to the prompt path


@needs_kernel
def test_decode_attention_rejects_what_it_cannot_run():
    pool = torch.zeros(16, 2, 8)
    q, out = torch.zeros(4, 1, 8), torch.zeros(1, 4, 8)
    gather, lengths, rows = torch.zeros(1, 3, dtype=torch.long), torch.tensor([3]), torch.tensor([0])
    bad = {
        "float32 or bfloat16": (q.half(), kernels.DecodeIndex(gather, lengths, rows)),
        "like q": (q.bfloat16(), kernels.DecodeIndex(gather, lengths, rows)),  # a float32 pool
        "out of range": (q, kernels.DecodeIndex(gather, torch.tensor([4]), rows)),
        "out of range ": (q, kernels.DecodeIndex(gather, lengths, torch.tensor([1]))),
        "slot is out of range": (q, kernels.DecodeIndex(torch.full((1, 3), -1), lengths, rows)),
        "of the pool": (q, kernels.DecodeIndex(torch.tensor([[0, 1, 16]]), lengths, rows)),  # a 16-slot pool
        "int64": (q, kernels.DecodeIndex(gather.int(), lengths, rows)),
    }
    for match, (query, index) in bad.items():
        with pytest.raises(ValueError, match=match.strip()):
            kernels.decode_attention(query, pool, pool, index, out, 1.0)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_stage_steps_agree_with_and_without_kernel(tiny_model, monkeypatch, dtype):
    """Whole-stage forward over mixed micro-batches (prompt chunks beside decode steps): same hidden states
    (bfloat16: within its rounding, compounded over the layers)."""
    from hexgen_zmq.model.checkpoint import ShardPlan
    from hexgen_zmq.model.info import read_model_info
    from hexgen_zmq.model.runner import StageModel
    from hexgen_zmq.stage.worker import StageWorker

    info = read_model_info(tiny_model)
    gen = torch.Generator().manual_seed(0)

    def run() -> list[torch.Tensor]:  # loads the stage afresh: it decides on the kernels when it loads
        model = StageModel(info, (0, info.num_layers), first=True, last=False, dtype=dtype,
                           device=torch.device("cpu"), shard=ShardPlan.make(info, 0, 1))
        assert all(layer.fast == kernels.enabled() for layer in model.layers)
        worker = StageWorker(model, 64, 16)
        params = SamplingParams(max_new_tokens=8)
        batches = [
            MicroBatch(0, [Segment(1, 0, 20, True), Segment(2, 0, 5, True)],
                       [NewRequest(1, 28, params, []), NewRequest(2, 13, params, [])], []),
            MicroBatch(1, [Segment(1, 20, 1, True), Segment(3, 0, 9, False), Segment(2, 5, 1, True)],
                       [NewRequest(3, 30, params, [])], []),
            MicroBatch(2, [Segment(3, 9, 4, True), Segment(2, 6, 1, True), Segment(1, 21, 1, True)], [], []),
        ]
        outs = []
        for batch in batches:
            total = sum(seg.n_tokens for seg in batch.segments)
            outs.append(worker.step(batch, torch.randint(3, info.vocab_size, (total,), generator=gen)).hidden)
        return outs

    with_kernel = run()
    monkeypatch.setenv("HEXGEN_ZMQ_KERNELS", "0")
    gen.manual_seed(0)
    without = run()
    for a, b in zip(with_kernel, without):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # float32 rounding order differs (FMA, exp)
        else:  # a bfloat16 ulp here and there, carried through six layers
            assert a.dtype == b.dtype == torch.bfloat16
            assert float((a.float() - b.float()).norm() / b.float().norm()) < 2e-2


def test_packed_linear_pads_to_few_row_counts_and_matches_linear():
    from torch import nn

    from hexgen_zmq.model.kernels import EXACT_ROWS, PackedLinear, bucket_rows, packing_usable

    sizes = {bucket_rows(n) for n in range(1, 4097)}
    assert len(sizes) <= EXACT_ROWS + 4 * 6 and all(n <= bucket_rows(n) <= 1.25 * n for n in range(1, 4097))
    if not packing_usable(torch.device("cpu"), torch.float32):
        pytest.skip("this torch has no oneDNN")
    linear = nn.Linear(32, 24)
    packed = PackedLinear(linear)
    with torch.inference_mode():
        for rows in (1, 9, 13, 37, 130):
            x = torch.randn(1, rows, 32)
            torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
        x = torch.randn(5, 32)
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)


def test_bfloat16_linears_are_packed_where_onednn_has_bf16_dot_products():
    from torch import nn

    from hexgen_zmq.model.kernels import PackedLinear, packing_usable

    usable = packing_usable(torch.device("cpu"), torch.bfloat16)
    assert usable == (kernels.switched_on() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if not usable:
        pytest.skip("no bfloat16 dot products in oneDNN on this CPU")
    linear = nn.Linear(64, 40, dtype=torch.bfloat16)
    packed = PackedLinear(linear)
    with torch.inference_mode():
        for rows in (1, 16, 70):
            x = torch.randn(rows, 64).to(torch.bfloat16)
            out = packed(x)
            assert out.dtype == torch.bfloat16
            torch.testing.assert_close(out, linear(x))  # both accumulate in float32; bfloat16 tolerance


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_ops_match_their_torch_versions(dtype):
    """RMSNorm, silu(gate) * up and the rotary embedding with the KV write: C against the torch fallback, in
    the dtype of the stage (bfloat16: the same roundings as torch's, so at most an ulp from exp or sqrt)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 40, generator=gen).to(dtype)[:, :36]  # rows with a gap between them
    weight = torch.randn(36, generator=gen).to(dtype)
    fast = kernels.rms_norm(x, weight, 1e-6, True)
    assert fast.dtype == dtype
    torch.testing.assert_close(fast, kernels.rms_norm(x, weight, 1e-6, False))
    gate_up = (torch.randn(5, 2 * 44, generator=gen) * 30).to(dtype)  # large values: the exp's clamping matters
    torch.testing.assert_close(kernels.silu_mul(gate_up, True), kernels.silu_mul(gate_up, False))
    wide = (torch.randn(61, 2 * 700, generator=gen) * 30).to(dtype)  # several chunks of rows on the pool
    torch.testing.assert_close(kernels.silu_mul(wide, True), kernels.silu_mul(wide, False))
    tokens, q_heads, kv_heads, head_dim, slots = 6, 4, 2, 16, 40
    qkv = torch.randn(tokens, q_heads + 2 * kv_heads, head_dim, generator=gen).to(dtype)
    angles = torch.randn(tokens, 1, head_dim, generator=gen)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    where = torch.randperm(slots, generator=gen)[:tokens]
    pools = {fast: (torch.zeros(slots, kv_heads, head_dim, dtype=dtype), torch.zeros(slots, kv_heads, head_dim, dtype=dtype))
             for fast in (True, False)}
    q = {fast: kernels.rope_store(qkv, q_heads, kv_heads, cos, sin, *pools[fast], where, fast)
         for fast in (True, False)}
    torch.testing.assert_close(q[True], q[False])
    for fast_pool, torch_pool in zip(pools[True], pools[False]):
        torch.testing.assert_close(fast_pool, torch_pool)
    with pytest.raises(ValueError, match="out of range"):
        kernels.rope_store(qkv, q_heads, kv_heads, cos, sin, *pools[True], where + slots, True)


def test_warm_up_runs_every_packed_shape_at_every_step_size(monkeypatch):
    from torch import nn

    from hexgen_zmq.model.kernels import PackedLinear, bucket_rows, packing_usable, warm_up

    if not packing_usable(torch.device("cpu"), torch.float32):
        pytest.skip("this torch has no oneDNN")
    stage = nn.ModuleList([PackedLinear(nn.Linear(16, 24)), PackedLinear(nn.Linear(16, 24)),
                           PackedLinear(nn.Linear(24, 8, bias=False))])
    seen = set()
    forward = PackedLinear.forward

    def record(self, x):
        seen.add((self.in_features, self.out_features, x.shape[0]))
        return forward(self, x)

    monkeypatch.setattr(PackedLinear, "forward", record)
    calls = warm_up(stage, 300)
    sizes = {bucket_rows(n) for n in range(1, 301)}
    assert seen == {(i, o, n) for i, o in ((16, 24), (24, 8)) for n in sizes}
    assert calls == 2 * len(sizes)  # the two layers of one shape share oneDNN's kernels: warmed once
