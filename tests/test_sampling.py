"""The sampler alone: extreme parameters sample correctly, a row's failure is that row's, and the
counter-based draws make a replayed request continue exactly as an uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from hexgen_zmq.model import kernels
from hexgen_zmq.wire.messages import SamplingParams
from hexgen_zmq.model.sampling import RequestSampler, SamplingError, sample


def logits(seed: int, vocab: int = 50) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 4


def test_a_temperature_too_small_for_float32_is_greedy():
    for temperature in (1e-40, 5e-324, 1e-300):
        sampler = RequestSampler.make(SamplingParams(temperature=temperature, seed=1), [], 8)
        row = logits(3)
        assert sampler.draw(row) == int(row.argmax())


def test_a_tiny_top_p_keeps_the_best_token():
    sampler = RequestSampler.make(SamplingParams(temperature=1.0, top_p=1e-300, seed=2), [], 8)
    row = logits(4)
    assert sampler.draw(row) == int(row.argmax())


def test_greedy_rows_pick_the_first_of_equal_maxima_as_argmax_does():
    """bfloat16 logits tie often; Hugging Face's greedy search takes argmax, the first of the tied tokens."""
    rows = torch.zeros(4, 49152)
    rows[0, [7, 9000, 49151]] = 3.0
    rows[1, [0, 1]] = -0.5
    rows[1, 2:] = -1.0
    rows[2] = torch.randn(49152, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16).float()
    rows[3, [40000, 123]] = 2.0
    greedy = [RequestSampler.make(SamplingParams(temperature=0.0), [], 8) for _ in range(4)]
    assert sample(rows, greedy) == rows.argmax(-1).tolist() == [7, 0, int(rows[2].argmax()), 123]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_picks_argmax_and_finds_every_row_that_is_not_finite(dtype):
    """kernels.greedy (C for float32 and bfloat16 on a CPU, torch otherwise) against torch's argmax: ties,
    negative rows, and a NaN, +inf or -inf anywhere in a row."""
    gen = torch.Generator().manual_seed(8)
    rows = torch.randn(9, 1001, generator=gen).to(dtype)
    rows[1] = -rows[1].abs() - 1
    rows[2, [3, 500, 1000]] = 100.0
    rows[3, 17], rows[4, 1000], rows[5, 0] = float("nan"), float("inf"), float("-inf")
    rows[6] = 0.0
    rows[7, 999:] = 7.0
    best, finite = kernels.greedy(rows)
    assert finite == [True, True, True, False, False, False, True, True, True]
    want = rows.float().argmax(-1).tolist()
    assert [b for b, f in zip(best, finite) if f] == [w for w, f in zip(want, finite) if f]
    assert best[2] == 3 and best[6] == 0 and best[7] == 999
    strided = torch.randn(4, 2000, generator=gen).to(dtype)[:, ::1][:, :1500]  # rows 2000 apart
    assert kernels.greedy(strided)[0] == strided.float().argmax(-1).tolist()
    short = torch.tensor([[1.0, 3.0, 3.0, 0.0, 2.0], [-5.0, -4.0, -4.0, -9.0, -4.0]], dtype=dtype)  # under 16 wide
    assert kernels.greedy(short) == ([1, 1], [True, True])


def test_a_row_that_cannot_be_sampled_fails_alone():
    rows = torch.stack([logits(1), logits(2), logits(3)])
    rows[1, 5] = float("nan")
    samplers = [RequestSampler.make(SamplingParams(temperature=t, seed=9), [], 8) for t in (0.0, 0.8, 0.8)]
    out = sample(rows, samplers)
    assert out[0] == int(rows[0].argmax())
    assert isinstance(out[1], SamplingError)
    assert isinstance(out[2], int) and 0 <= out[2] < 50


def test_a_replay_from_token_k_draws_what_an_uninterrupted_run_draws():
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=12345)
    rows = [logits(100 + i) for i in range(12)]
    whole = RequestSampler.make(params, [], 12)
    tokens = []
    for row in rows:
        token = whole.draw(row)
        whole.record(0, token)
        tokens.append(token)
    replay = RequestSampler.make(params, [], 12, generated=5)  # five tokens came before this attempt
    again = []
    for row in rows[5:]:
        token = replay.draw(row)
        replay.record(0, token)
        again.append(token)
    assert again == tokens[5:]
    assert len(set(tokens)) > 1  # it did sample


def test_the_same_seed_gives_the_same_tokens_and_another_seed_others():
    rows = [logits(200 + i) for i in range(16)]

    def run(seed):
        sampler = RequestSampler.make(SamplingParams(temperature=1.0, seed=seed), [], 16)
        out = []
        for row in rows:
            out.append(sampler.draw(row))
            sampler.record(0, out[-1])
        return out

    assert run(7) == run(7)
    assert run(7) != run(8)
