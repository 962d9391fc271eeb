"""The replay policy alone: what a continuation asks for."""

from __future__ import annotations

import pytest

from hexgen_zmq.wire.messages import SamplingParams, Submit
from hexgen_zmq.serving.replay import continuation, replayable


def test_a_continuation_prefixes_the_emitted_tokens_and_asks_for_the_rest():
    first = Submit(1, [5, 6, 7], SamplingParams(max_new_tokens=10, temperature=0.8, seed=3), [2], 60.0, broker=9)
    again = continuation(first, [11, 12, 13], 10, request_id=2, broker=9, time_left_s=40.0)
    assert again.request_id == 2 and again.prompt == [5, 6, 7, 11, 12, 13]
    assert again.params.max_new_tokens == 7 and again.params.seed == 3 and again.params.temperature == 0.8
    assert again.generated == 3 and again.eos_token_ids == [2] and again.timeout_s == 40.0
    assert len(again.prompt) + again.params.max_new_tokens == len(first.prompt) + 10  # the same KV need


def test_nothing_left_is_not_a_continuation():
    first = Submit(1, [5], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError):
        continuation(first, [1, 2], 2, request_id=2, broker=0, time_left_s=1.0)


def test_only_failures_of_where_a_request_ran_are_replayed():
    assert replayable("stage_failed")
    assert not any(replayable(code) for code in ("invalid_request", "sampling_failed", "timeout", "cancelled"))
