"""The step-level runtime simulator: closed-form cases (a lone request's timeline, chunked prefill, M/D/1
queueing with one request at a time), and its dispatch equals the broker's own policy on a recorded trace."""

from __future__ import annotations

import math
import random

import pytest

from hexgen_zmq.planner import dispatch
from hexgen_zmq.planner.dispatch import blocks_for
from hexgen_zmq.planner.stepsim import PipeModel, simulate_steps


def fixed(step: float, stages: int = 1, hop: float = 0.0, loop: float = 0.0, **kw) -> PipeModel:
    return PipeModel(stages, lambda i, d, p: step, lambda i, t: hop, lambda t: loop, **({"capacity_blocks": 1 << 20} | kw))


def poisson(rate: float, n: int, prompt: int, output: int, seed: int = 1) -> list[tuple[float, int, int]]:
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append((t, prompt, output))
    return out


def test_a_lone_request_crosses_every_stage_and_hop_once_per_token():
    stage = {0: 0.01, 1: 0.02}
    model = PipeModel(2, lambda i, d, p: stage[i] * (3 if p else 1), lambda i, t: 0.005, lambda t: 0.001,
                      capacity_blocks=100, to_first_s=0.002, to_broker_s=0.004)
    r = simulate_steps([model], [(1.0, 32, 5)], tick_s=0)
    prefill = 0.002 + 0.03 + 0.005 + 0.06 + 0.004
    step = 0.01 + 0.005 + 0.02 + 0.001  # the decode loop: stage 0, hop, stage 1, back to stage 0
    assert math.isclose(r.ttft[0], prefill) and math.isclose(r.latencies[0], prefill + 4 * step)
    assert math.isclose(r.tpot[0], step)
    # each stage computed the prompt once and 4 decode steps: the busy time the runtime's counters report
    assert r.steps == [[5, 5]]
    assert math.isclose(r.busy_s[0][0], 0.03 + 4 * 0.01) and math.isclose(r.busy_s[0][1], 0.06 + 4 * 0.02)


def test_long_prompts_are_chunked_by_the_step_token_budget():
    model = PipeModel(1, lambda i, d, p: 0.001 * max(p, 1), lambda i, t: 0.0, lambda t: 0.0, capacity_blocks=1000,
                      max_batch_tokens=1024)
    r = simulate_steps([model], [(0.0, 2500, 2)], tick_s=0)
    assert math.isclose(r.ttft[0], 0.001 * 2500)  # three chunks of 1024, 1024 and 452 tokens, one after another
    assert math.isclose(r.latencies[0], 0.001 * 2500 + 0.001)


@pytest.mark.parametrize("rho", [0.5, 0.8])
@pytest.mark.parametrize("where", ["scheduler", "broker"])
def test_one_at_a_time_queues_as_m_d_1(rho, where):
    """Service is deterministic (D = output tokens x step), arrivals Poisson: the mean wait is
    rho / (2 mu (1 - rho)) (Pollaczek-Khinchine with zero service variance)."""
    step, out = 0.01, 10
    service = out * step
    kw = {"max_running": 1} if where == "scheduler" else {"capacity_blocks": blocks_for(32 + out)}  # KV for one
    r = simulate_steps([fixed(step, **kw)], poisson(rho / service, 6000, 32, out), tick_s=0)
    wait = r.mean_latency - service
    expected = rho / (2 * (1 / service) * (1 - rho))
    assert wait == pytest.approx(expected, rel=0.12)


def test_the_broker_tick_delays_queued_requests():
    kw = {"capacity_blocks": blocks_for(32 + 10)}
    requests = [(0.0, 32, 10), (0.001, 32, 10)]
    immediate = simulate_steps([fixed(0.012, **kw)], requests, tick_s=0)
    ticked = simulate_steps([fixed(0.012, **kw)], requests, tick_s=0.05)
    assert math.isclose(immediate.latencies[1], 0.24 - 0.001)
    assert math.isclose(ticked.latencies[1], 0.15 + 0.12 - 0.001)  # waits for the tick after the first ends


def test_batching_serves_more_than_one_at_a_time():
    def pipe(**kw):  # decode steps cost 10 ms plus 0.5 ms per row: batching amortises the fixed part
        return PipeModel(1, lambda i, d, p: 0.01 + 0.0005 * (d + p), lambda i, t: 0.0, lambda t: 0.0,
                         capacity_blocks=1 << 20, **kw)
    requests = poisson(8.0, 400, 32, 16)
    batched, single = simulate_steps([pipe()], requests), simulate_steps([pipe(max_running=1)], requests)
    assert batched.mean_latency < 0.5 * single.mean_latency


def test_dispatch_equals_the_brokers_policy_on_a_recorded_trace():
    broker_state = pytest.importorskip("hexgen_zmq.serving.broker_state")
    from hexgen_zmq.stage.block_manager import BLOCK_SIZE
    from hexgen_zmq.operations.deployment import PipelineSpec, RankSpec, StageSpec

    assert dispatch.PACE_WEIGHT == broker_state.PACE_WEIGHT and dispatch.BLOCK_SIZE == BLOCK_SIZE
    models = [fixed(0.008, capacity_blocks=40), fixed(0.013, capacity_blocks=40), fixed(0.02, 2, 0.004, 0.002, capacity_blocks=60)]
    r = simulate_steps(models, poisson(150.0, 600, 40, 24, seed=5), record=True)
    assert len(r.decisions) >= 600 and {k for *_, k, _ in r.decisions if k is not None} == {0, 1, 2}
    assert any(all(p[3] is not None for p in states) for *_, states in r.decisions)  # paced decisions happened
    assert any(k is None for _, _, k, _ in r.decisions)  # and some found every budget full

    real = []
    for i in range(len(models)):
        stage = StageSpec(f"p{i}s0", (0, 2), "tcp://127.0.0.1:1", "tcp://127.0.0.1:2", [RankSpec("127.0.0.1")])
        state = broker_state.PipelineState(PipelineSpec(f"p{i}", [stage]))
        state.incarnations[stage.id], state.last_seen[stage.id] = 1, 0.0
        real.append(state)
    for now, blocks, chosen, states in r.decisions:
        for state, (capacity, in_flight, reserved, pace_s, pace_load) in zip(real, states):
            state.capacity_tokens = {state.spec.stages[0].id: capacity * BLOCK_SIZE}
            state.in_flight, state.reserved_blocks, state.pace_s, state.pace_load = set(in_flight), reserved, pace_s, pace_load
        fits = [p for p in real if p.reserved_blocks + blocks <= p.capacity_blocks]  # BrokerState.dispatch's filter
        expected = real.index(min(fits, key=broker_state.BrokerState.dispatch_order(fits))) if fits else None
        assert chosen == expected


def test_the_step_model_of_a_planned_pipeline_matches_the_fluid_timing_for_a_lone_request(mixed_cm):
    from hexgen_zmq.planner.plan import Pipeline, Stage, pipeline_timing
    from hexgen_zmq.planner.stepsim import pipe_model

    cm, slots = mixed_cm, mixed_cm.cluster.slots
    pipeline = Pipeline((Stage(0, 1, 0, 3), Stage(2, 2, 3, 6), Stage(3, 1, 6, 8)), 0.0)  # three hosts, two regions
    timing = pipeline_timing(cm, pipeline)
    first, last = slots[pipeline.stages[0].slot].host, slots[pipeline.stages[-1].slot].host
    model = pipe_model(cm, pipeline, broker_host=first)
    w = cm.workload
    r = simulate_steps([model], [(0.0, w.prompt_len, w.output_len)], tick_s=0)
    to_broker = cm.cluster.link(last, first).transfer(8) if last != first else 0.0
    assert r.ttft[0] == pytest.approx(timing.prefill_latency + to_broker, rel=1e-9)
    assert r.tpot[0] == pytest.approx(timing.step_times[1], rel=1e-9)
    assert model.capacity_blocks > 0


def test_one_request_at_a_time_mode(mixed_cm):
    from hexgen_zmq.planner.costmodel import CostModel, Workload
    from hexgen_zmq.planner.dp import best_pipeline
    from hexgen_zmq.planner.plan import make_group, pipeline_batch
    from hexgen_zmq.planner.stepsim import pipe_model

    with pytest.raises(ValueError, match="max_batch 1"):
        Workload(128, 16, 1.0, 1.0, max_batch=4, batching=False)
    cm = CostModel(mixed_cm.cluster, mixed_cm.model, Workload(128, 16, 1.0, 1.0, max_batch=1, batching=False))
    pipeline = best_pipeline(cm, make_group({s.index: s.count for s in cm.cluster.slots}))
    assert pipeline_batch(cm, pipeline) == 1 and pipe_model(cm, pipeline, batching=False).max_running == 1


def test_the_saturated_rate_bounds_what_a_burst_would_suggest():
    from hexgen_zmq.planner.stepsim import saturated_rate

    # Ten requests' KV at once, a step of 10 ms whatever it carries, ten tokens each: about 100 requests/s.
    model = fixed(0.01, capacity_blocks=10 * blocks_for(32 + 10))
    assert saturated_rate([model], 32, 10) == pytest.approx(100, rel=0.15)
    assert saturated_rate([model, model], 32, 10) == pytest.approx(200, rel=0.15)


def test_the_simulator_runs_the_brokers_own_pace_and_order_code():
    """No copy to drift: the simulator's pipeline record and the broker's share the pace code, and the
    simulator orders candidates with the broker's function."""
    broker_state = pytest.importorskip("hexgen_zmq.serving.broker_state")
    from hexgen_zmq.serving import pace

    for name in ("observe_pace", "expected_pace_s"):
        assert getattr(dispatch.PaceState, name) is getattr(broker_state.PipelineState, name)
    assert dispatch.dispatch_order is pace.dispatch_key
