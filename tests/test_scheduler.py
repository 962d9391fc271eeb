"""The first stage's batching policy and the KV block bookkeeping, without torch or sockets."""

from __future__ import annotations

import pytest

from hexgen_zmq.stage.block_manager import BlockManager, CacheFull
from hexgen_zmq.wire.messages import Cancel, Feedback, SamplingParams, Submit, TokenRecord
from hexgen_zmq.stage.scheduler import Scheduler


def submit(rid, prompt_len, max_new=4, timeout=None):
    return Submit(rid, list(range(1, prompt_len + 1)), SamplingParams(max_new_tokens=max_new), [0], timeout)


def test_block_manager_reserves_whole_lives_and_gives_everything_back():
    blocks = BlockManager(num_blocks=4, block_size=16)
    blocks.admit(1, 40)  # 3 blocks
    assert blocks.free_blocks == 1 and not blocks.can_admit(17) and blocks.can_admit(16)
    assert blocks.grow(1, 17) == [0, 1]
    with pytest.raises(CacheFull):
        blocks.grow(1, 49)
    with pytest.raises(CacheFull):
        blocks.admit(2, 17)
    assert blocks.release(1) and not blocks.release(1)
    assert blocks.free_blocks == 4
    blocks.admit(2, 64)
    assert sorted(blocks.grow(2, 64)) == [0, 1, 2, 3]


def test_prompts_are_chunked_within_the_token_budget_and_only_the_last_chunk_samples():
    s = Scheduler(capacity_blocks=100, block_size=16, max_batch_tokens=10, depth=1)
    s.submit(submit(1, 25))
    sizes = []
    while (ready := s.next_batch()) is not None:
        batch, tokens = ready
        sizes.append([(seg.start, seg.n_tokens, seg.sample) for seg in batch.segments])
        assert len(tokens) == sum(seg.n_tokens for seg in batch.segments) <= 10
        s.in_flight.clear()  # chunks of one prompt need no feedback to go on
    assert sizes == [[(0, 10, False)], [(10, 10, False)], [(20, 5, True)]]


def test_decode_steps_come_first_and_requests_split_over_the_pipeline_depth():
    s = Scheduler(capacity_blocks=100, block_size=16, max_batch_tokens=64, depth=2)
    for rid in range(1, 5):
        s.submit(submit(rid, 3, max_new=10))
    a, _ = s.next_batch()
    b, _ = s.next_batch()
    assert [seg.request_id for seg in a.segments] == [1, 2] and [seg.request_id for seg in b.segments] == [3, 4]
    assert s.next_batch() is None  # two micro-batches in flight fill a 2-stage pipeline
    s.feedback(Feedback(a.batch_id, [TokenRecord(1, 42), TokenRecord(2, 43)]))
    c, tokens = s.next_batch()
    assert [(seg.request_id, seg.start, seg.n_tokens) for seg in c.segments] == [(1, 3, 1), (2, 3, 1)]
    assert tokens == [42, 43]


def test_admission_waits_for_cache_and_releases_travel_down():
    s = Scheduler(capacity_blocks=2, block_size=16, max_batch_tokens=64, depth=1)
    s.submit(submit(1, 10, max_new=10))  # 20 tokens: 2 blocks
    s.submit(submit(2, 3, max_new=3))
    batch, _ = s.next_batch()
    assert [seg.request_id for seg in batch.segments] == [1] and len(s.waiting) == 1
    s.feedback(Feedback(batch.batch_id, [TokenRecord(1, 0, True, "eos")]))
    batch, _ = s.next_batch()
    assert batch.release == [1] and [seg.request_id for seg in batch.segments] == [2]
    assert [n.request_id for n in batch.new] == [2]


def test_cancel_and_deadline_drop_requests():
    now = [0.0]
    s = Scheduler(capacity_blocks=10, block_size=16, max_batch_tokens=64, depth=1, clock=lambda: now[0])
    s.submit(submit(1, 3, timeout=1.0))
    s.submit(submit(2, 3))
    s.next_batch()
    assert s.cancel(Cancel([2])) == [2]
    now[0] = 5.0
    assert s.expire() == [1]
    assert s.reserved_blocks == 0 and sorted(s.pending_release) == [1, 2]
    assert not s.in_flight  # the batch held only cancelled requests: its slot is free again
    assert not s.feedback(Feedback(0, [TokenRecord(1, 5), TokenRecord(2, 6)]))  # late tokens are ignored
    assert not s.feedback(Feedback(99, [TokenRecord(1, 5)]))  # not a batch in flight
    assert not s.running


def test_broker_budget_caps_admission():
    s = Scheduler(capacity_blocks=100, block_size=16, max_batch_tokens=64, depth=1)
    s.submit(Submit(1, [1, 2, 3], SamplingParams(max_new_tokens=29), [0], None, kv_budget_blocks=2))
    s.submit(Submit(2, [1, 2, 3], SamplingParams(max_new_tokens=29), [0], None, kv_budget_blocks=2))
    batch, _ = s.next_batch()
    assert [seg.request_id for seg in batch.segments] == [1] and len(s.waiting) == 1


def test_one_micro_batch_waits_for_its_requests_and_merges_late_arrivals():
    s = Scheduler(capacity_blocks=100, block_size=16, max_batch_tokens=64, depth=3, micro_batches=1)
    s.submit(submit(1, 3, max_new=10))
    s.submit(submit(2, 3, max_new=10))
    a, _ = s.next_batch()
    assert [seg.request_id for seg in a.segments] == [1, 2]
    s.submit(submit(3, 3, max_new=10))  # arrives while the batch is in flight: waits to join it
    assert s.next_batch() is None
    s.feedback(Feedback(a.batch_id, [TokenRecord(1, 42), TokenRecord(2, 43)]))
    b, tokens = s.next_batch()
    assert [(seg.request_id, seg.n_tokens) for seg in b.segments] == [(1, 1), (2, 1), (3, 3)]
    assert tokens == [42, 43, 1, 2, 3]


def test_micro_batches_default_to_the_hardware():
    from hexgen_zmq.operations.deployment import parse_deployment
    from tests.support import deployment_dict

    data = deployment_dict("/m", [[(0, 2, 1), (2, 4, 1)]])
    assert parse_deployment(data).pipelines[0].default_micro_batches() == 1  # stages share one host's cores
    for i, stage in enumerate(data["pipelines"][0]["stages"]):
        stage["ranks"][0]["device"] = f"cuda:{i}"
    assert parse_deployment(data).pipelines[0].default_micro_batches() == 2  # a GPU per stage
    data["pipelines"][0]["micro_batches"] = 1
    assert parse_deployment(data).pipelines[0].default_micro_batches() == 1


def test_duplicate_and_excess_submits_do_not_grow_the_queue():
    from hexgen_zmq.wire.messages import SamplingParams, Submit
    from hexgen_zmq.stage.scheduler import Scheduler

    scheduler = Scheduler(capacity_blocks=1, block_size=16, max_batch_tokens=64, depth=1, max_waiting=3)
    assert scheduler.submit(Submit(1, [1, 2], SamplingParams(max_new_tokens=4)))
    assert not scheduler.submit(Submit(1, [1, 2], SamplingParams(max_new_tokens=4)))  # duplicate
    for i in range(2, 4):
        assert scheduler.submit(Submit(i, [1, 2], SamplingParams(max_new_tokens=4)))
    assert not scheduler.submit(Submit(9, [1, 2], SamplingParams(max_new_tokens=4)))  # bound reached
    assert len(scheduler.waiting) == 3


def test_requests_of_an_earlier_broker_are_found_for_dropping():
    from hexgen_zmq.wire.messages import SamplingParams, Submit
    from hexgen_zmq.stage.scheduler import Scheduler

    scheduler = Scheduler(capacity_blocks=8, block_size=16, max_batch_tokens=64, depth=1)
    scheduler.submit(Submit(1, [1, 2], SamplingParams(max_new_tokens=4), broker=100))
    scheduler.submit(Submit(2, [1, 2], SamplingParams(max_new_tokens=4), broker=200))
    scheduler.next_batch()
    assert scheduler.requests_of_other_brokers(200) == [1]


def test_a_forged_feedback_reusing_a_batch_id_strands_nothing():
    from hexgen_zmq.wire.messages import Feedback, SamplingParams, Submit, TokenRecord
    from hexgen_zmq.stage.scheduler import Scheduler

    scheduler = Scheduler(capacity_blocks=8, block_size=16, max_batch_tokens=64, depth=1)
    scheduler.submit(Submit(1, [1, 2, 3], SamplingParams(max_new_tokens=4)))
    batch, _ = scheduler.next_batch()
    assert scheduler.feedback(Feedback(batch.batch_id, [TokenRecord(999, 5)]))  # someone else's record
    assert scheduler.next_batch() is None  # the real batch is still awaited
    assert scheduler.feedback(Feedback(batch.batch_id, [TokenRecord(1, 7)]))
    follow, tokens = scheduler.next_batch()
    assert tokens == [7] and follow.segments[0].request_id == 1
