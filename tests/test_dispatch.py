"""The broker's choice of pipeline: by the pace a request would see there, once every pipeline has shown one."""

from __future__ import annotations

from hexgen_zmq.serving.broker_state import BrokerState, PipelineState
from hexgen_zmq.operations.deployment import PipelineSpec, RankSpec, StageSpec


def pipeline(name: str) -> PipelineState:
    stage = StageSpec(f"{name}s0", (0, 2), "tcp://127.0.0.1:1", "tcp://127.0.0.1:2", [RankSpec("127.0.0.1")])
    state = PipelineState(PipelineSpec(name, [stage]))
    state.last_seen[stage.id], state.capacity_tokens[stage.id] = 0.0, 1 << 16
    state.incarnations[stage.id] = 1
    return state


def assign(states: list[PipelineState], requests: int, next_id: int = 0) -> None:
    for request_id in range(next_id, next_id + requests):
        chosen = min(states, key=BrokerState.dispatch_order(states))
        chosen.in_flight.add(request_id)


def test_by_count_until_every_pipeline_has_a_pace():
    fast, slow = pipeline("fast"), pipeline("slow")
    fast.observe_pace(0.005, 1)  # measured alone, e.g. by a warm-up request: must not pull everything away
    assign([fast, slow], 32)
    assert len(fast.in_flight) == len(slow.in_flight) == 16


def test_a_faster_pipeline_holds_more_requests_and_a_slow_one_is_not_starved():
    fast, slow = pipeline("fast"), pipeline("slow")
    assign([fast, slow], 32)
    for _ in range(20):  # both at 16 requests: 8 ms against 11 ms between tokens
        fast.observe_pace(0.008, 16)
        slow.observe_pace(0.011, 16)
    fast.in_flight.clear()
    slow.in_flight.clear()
    assign([fast, slow], 32, next_id=100)
    assert len(fast.in_flight) > len(slow.in_flight) >= 12
    assert abs(fast.expected_pace_s() - slow.expected_pace_s()) < 0.002  # about the same pace on both


def test_pace_follows_load_before_any_step_shows_it():
    a, b = pipeline("a"), pipeline("b")
    a.observe_pace(0.010, 10)
    b.observe_pace(0.010, 10)
    a.in_flight.update(range(10))
    b.in_flight.update(range(100, 104))  # b lost requests since: it is now the better choice
    assert min([a, b], key=BrokerState.dispatch_order([a, b])) is b
