"""The CPU stage's own matrix products (`_matmul.c` through `kernels.BlockedLinear`): every shape, row count,
stride, bias and thread count against a float64 reference, and the thread pool under calls that race it."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hexgen_zmq.model import kernels
from hexgen_zmq.stage import core_share

DTYPES = [d for d in (torch.float32, torch.bfloat16) if kernels.blocked_usable(d)]
needs_blocked = pytest.mark.skipif(not DTYPES, reason="no AVX2 or AVX-512 here, or the extension is not built")
SHAPES = [(1, 1), (3, 70), (37, 13), (64, 40), (576, 577), (1536, 5), (33, 129), (2, 64)]  # (in, out)


AMX = kernels.amx_min_rows() is not None


@pytest.fixture(params=["vector", "amx"])
def product_path(request):
    """bfloat16 products on the vector units, and again on AMX tiles from one row up where the CPU has them
    (float32 products always run on the vector units)."""
    if request.param == "amx" and not AMX:
        pytest.skip("no AMX here")
    if request.param == "amx" and getattr(request.node, "callspec", None) and \
            request.node.callspec.params.get("dtype") == torch.float32:
        pytest.skip("float32 products do not run on AMX")
    before = kernels.amx_min_rows()
    if before is not None:
        kernels.amx_min_rows(1 if request.param == "amx" else 0)
    yield request.param
    if before is not None:
        kernels.amx_min_rows(before)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield lambda n: torch.set_num_threads(n)
    torch.set_num_threads(before)


def reference(x: torch.Tensor, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """The product in float64, and a bound on a float32 sum's error: k float32 roundings of at most
    sum |x_i w_i| each (summed in any order)."""
    bias = None if linear.bias is None else linear.bias.double()
    exact = F.linear(x.double(), linear.weight.double(), bias)
    magnitude = F.linear(x.double().abs(), linear.weight.double().abs(), None if bias is None else bias.abs())
    return exact, magnitude * linear.in_features * 2 ** -24


def check(out: torch.Tensor, want: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype) -> None:
    exact, bound = want
    assert out.dtype == dtype and out.shape == exact.shape
    error = (out.double() - exact).abs()
    if dtype == torch.bfloat16:  # then one rounding to bfloat16: half an ulp (2^-8 relative), and ties
        bound = bound * (1 + 2 ** -8) + exact.abs() * 2 ** -8 + 1e-30
    assert bool((error <= bound + 1e-30).all()), f"worst excess {float((error - bound).max()):.3g}"


@needs_blocked
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_blocked_linear_matches_the_product_at_every_row_count(dtype, shape, threads, product_path):
    gen = torch.Generator().manual_seed(sum(shape))
    fan_in, fan_out = shape
    linear = nn.Linear(fan_in, fan_out, bias=fan_out % 2 == 1)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(fan_out, fan_in, generator=gen))
        if linear.bias is not None:
            linear.bias.copy_(torch.randn(fan_out, generator=gen))
    linear = linear.to(dtype)
    blocked = kernels.BlockedLinear(linear)
    with torch.inference_mode():
        for n_threads in (1, 2):
            threads(n_threads)
            for rows in (1, 2, 3, 5, 6, 7, 13, 64, 130):
                x = torch.randn(rows, fan_in, generator=gen).to(dtype)
                check(blocked(x), reference(x, linear), dtype)


@needs_blocked
@pytest.mark.parametrize("dtype", DTYPES)
def test_blocked_linear_reads_only_its_rows_inputs(dtype, product_path):
    """Rows of a wider tensor (a gap between them holding NaN), odd input sizes, and 3-D input: the kernel
    reads exactly k inputs per row (a bfloat16 pair never reaches past an odd row's end)."""
    gen = torch.Generator().manual_seed(1)
    for fan_in in (1, 7, 33, 65):
        linear = nn.Linear(fan_in, 21, bias=False).to(dtype)
        blocked = kernels.BlockedLinear(linear)
        wide = torch.full((9, fan_in + 3), float("nan"), dtype=dtype)
        wide[:, :fan_in] = torch.randn(9, fan_in, generator=gen).to(dtype)
        x = wide[:, :fan_in]
        with torch.inference_mode():
            out = blocked(x)
            assert torch.isfinite(out.float()).all()
            check(out, reference(x, linear), dtype)
            check(blocked(x[None, :4]), reference(x[None, :4], linear), dtype)


@needs_blocked
@pytest.mark.parametrize("dtype", DTYPES)
def test_blocked_linear_carries_nan_and_inf_as_the_product_does(dtype, product_path):
    linear = nn.Linear(40, 8, bias=False).to(dtype)
    with torch.no_grad():
        linear.weight.fill_(0.5)
    blocked = kernels.BlockedLinear(linear)
    x = torch.ones(3, 40, dtype=dtype)
    x[0, 5], x[1, 6] = float("nan"), float("inf")
    with torch.inference_mode():
        out = blocked(x).float()
    assert out[0].isnan().all() and out[1].isinf().all() and (out[2] == 20).all()


@pytest.mark.skipif(torch.bfloat16 not in DTYPES, reason="no bfloat16 products here")
def test_bfloat16_products_can_come_out_as_float32_sums(product_path):
    """`float_out`: the unrounded float32 sums (what a row-parallel part hands the all-reduce), within a float32
    sum's error of the exact product, and rounding them gives exactly the bfloat16 output."""
    gen = torch.Generator().manual_seed(3)
    linear = nn.Linear(77, 45, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(45, 77, generator=gen))
        linear.bias.copy_(torch.randn(45, generator=gen))
    linear = linear.to(torch.bfloat16)
    blocked = kernels.BlockedLinear(linear)
    with torch.inference_mode():
        for rows in (1, 5, 7, 20):
            x = torch.randn(rows, 77, generator=gen).to(torch.bfloat16)
            sums = blocked(x, float_out=True)
            check(sums, reference(x, linear), torch.float32)
            assert torch.equal(sums.to(torch.bfloat16), blocked(x))


@needs_blocked
def test_blocked_linear_refuses_other_dtypes():
    blocked = kernels.BlockedLinear(nn.Linear(8, 4).to(DTYPES[0]))
    other = torch.float64
    with pytest.raises(ValueError, match="holds"):
        blocked(torch.zeros(2, 8, dtype=other))
    with pytest.raises(ValueError, match="do not run here"):  # its bytes would be read as float32's
        kernels.BlockedLinear(nn.Linear(8, 4).to(torch.float16))


@needs_blocked
def test_the_pool_survives_racing_callers_and_changing_thread_counts(threads):
    """Python threads calling at once (the pool takes one job at a time), thread counts from 1 to more than
    the cores, and pauses long enough for the workers to fall asleep: every result stays right."""
    dtype = DTYPES[0]
    gen = torch.Generator().manual_seed(7)
    layers = [nn.Linear(96, 200).to(dtype) for _ in range(3)]
    blocked = [kernels.BlockedLinear(layer) for layer in layers]
    inputs = [torch.randn(r, 96, generator=gen).to(dtype) for r in (1, 4, 9)]
    wants = [[reference(x, layer) for x in inputs] for layer in layers]
    errors: list[BaseException] = []

    def caller(seed: int) -> None:
        try:
            with torch.inference_mode():
                for i in range(150):
                    torch.set_num_threads(1 + (i + seed) % 4)
                    which, row = (i + seed) % 3, (i * 7 + seed) % 3
                    check(blocked[which](inputs[row]), wants[which][row], dtype)
                    if i % 50 == 49:
                        time.sleep(0.002)  # past the workers' spin: they sleep, and must wake for the next
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    racers = [threading.Thread(target=caller, args=(seed,)) for seed in range(3)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=120)
    assert not any(r.is_alive() for r in racers), "a caller hung"
    assert not errors, errors[0]


@needs_blocked
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_forked_child_starts_its_own_pool(dtype, product_path, threads):
    """Also: the child may use the AMX tiles its parent was allowed (the permission comes along)."""
    threads(2)
    layer = nn.Linear(64, 300).to(dtype)
    blocked = kernels.BlockedLinear(layer)
    x = torch.randn(5, 64).to(dtype)
    with torch.inference_mode():
        want = reference(x, layer)
        check(blocked(x), want, dtype)  # the parent's pool is running
        pid = os.fork()
        if pid == 0:  # the child: its workers did not come along
            try:
                ok = all(torch.equal(blocked(x), blocked(x)) for _ in range(20))
                check(blocked(x), want, dtype)
                os._exit(0 if ok else 1)
            except BaseException:  # noqa: BLE001
                os._exit(1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung in its product")


@needs_blocked
def test_stage_layers_use_the_blocked_products():
    from hexgen_zmq.model.layers import fuse

    linear = fuse([nn.Linear(16, 8, bias=False), nn.Linear(16, 4, bias=False)]).to(DTYPES[0])
    assert isinstance(kernels.fast_linear(linear), kernels.BlockedLinear)


def test_openmp_threads_sleep_where_the_pool_does_the_products(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("HEXGEN_ZMQ_BLOCKED", raising=False)
    monkeypatch.delenv("HEXGEN_ZMQ_KERNELS", raising=False)
    both = kernels.blocked_usable(torch.bfloat16)
    assert core_share.passive_openmp() == both
    assert os.environ.get("OMP_WAIT_POLICY") == ("PASSIVE" if both else None)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the operator's word stands
    assert core_share.passive_openmp() and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("HEXGEN_ZMQ_BLOCKED", "0")  # oneDNN's products: OpenMP keeps spinning
    assert not core_share.passive_openmp() and "OMP_WAIT_POLICY" not in os.environ
