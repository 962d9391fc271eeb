import math

from hexgen_zmq.planner.plan import Timing
from hexgen_zmq.planner.simulate import max_rate, simulate, unit_gaps

# One pipeline: 0.2 s prefill (0.1 s of it compute), decode steps slower with more requests in flight.
PIPE = Timing(prefill_latency=0.2, prefill_busy=0.1, step_times=(0.0, 0.01, 0.011, 0.012, 0.013))
OUT = 21


def test_lone_request_takes_prefill_plus_decode_steps():
    result = simulate([PIPE], OUT, [1.0], rate=1.0, slo=10.0)
    assert math.isclose(result.latencies[0], 0.2 + 20 * 0.01)


def test_attainment_falls_as_the_rate_rises():
    gaps = unit_gaps(1, 300)
    values = [simulate([PIPE], OUT, gaps, rate, slo=1.0).attainment for rate in (1, 5, 10, 20, 40)]
    assert values == sorted(values, reverse=True)
    assert values[0] == 1.0 and values[-1] < 0.5


def test_dispatch_spreads_load_over_pipelines():
    gaps = unit_gaps(2, 300)
    one = simulate([PIPE], OUT, gaps, 12.0, slo=1.0)
    two = simulate([PIPE, PIPE], OUT, gaps, 12.0, slo=1.0)
    assert two.attainment > one.attainment and two.mean_latency < one.mean_latency


def test_requests_queue_beyond_the_batch():
    # Five requests at once on a batch of 4: four prefills stall decoding (0.4 s), 20 steps at batch 4
    # (0.26 s), plus the prefill's network share (0.1 s); the fifth starts when they finish, runs alone.
    result = simulate([PIPE], OUT, [1e-9] * 5, rate=1.0, slo=100.0)
    first_four = 0.4 + 20 * 0.013 + 0.1
    assert all(math.isclose(x, first_four, abs_tol=1e-6) for x in result.latencies[:4])
    assert math.isclose(result.latencies[4], first_four - 0.1 + 0.1 + 20 * 0.01 + 0.1, abs_tol=1e-6)


def test_max_rate_keeps_the_target_and_stays_below_capacity():
    gaps = unit_gaps(3, 500)
    rate = max_rate([PIPE, PIPE], OUT, gaps, slo=1.5, target=0.99)
    capacity = 2 * PIPE.capacity(OUT)
    assert 0 < rate <= capacity
    assert simulate([PIPE, PIPE], OUT, gaps, rate, 1.5).attainment >= 0.99
    assert max_rate([PIPE], OUT, gaps, slo=0.1, target=0.99) == 0.0  # deadline below the lone latency
    assert simulate([], OUT, gaps, 1.0, 1.0).attainment == 0.0


def test_quantile_is_the_lowest_deadline_met():
    result = simulate([PIPE], OUT, unit_gaps(4, 200), 5.0, slo=100.0)
    deadline = result.quantile(0.99)
    assert simulate([PIPE], OUT, unit_gaps(4, 200), 5.0, slo=deadline).attainment >= 0.99
    assert simulate([PIPE], OUT, unit_gaps(4, 200), 5.0, slo=deadline * 0.999).attainment < 0.99
