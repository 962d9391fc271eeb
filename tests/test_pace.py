"""The broker's dispatch policy (pure): requests go where they would finish soonest, by observed speed."""

from __future__ import annotations

from brokers.pace import Pace, expected_wait


def timed(seconds_per_step: float, tokens_per_step: int, steps: int = 20) -> Pace:
    pace, now = Pace(), 0.0
    for _ in range(steps):
        now += seconds_per_step
        pace.tokens(now, tokens_per_step)
    return pace


def test_pace_averages_busy_gaps_and_skips_idle_ones():
    pace = timed(0.010, 16)
    assert abs(pace.seconds_per_token - 0.010 / 16) < 1e-9
    pace.idle()
    pace.tokens(100.0, 16)  # after a long idle spell: not a sample
    assert abs(pace.seconds_per_token - 0.010 / 16) < 1e-9
    pace.tokens(100.020, 16)  # twice as slow now: the average moves toward it
    assert 0.010 / 16 < pace.seconds_per_token < 0.020 / 16


def test_requests_split_by_speed_not_by_count():
    fast, slow = timed(0.010, 16), timed(0.015, 16)  # 1.5x the time per token
    paces, load = [fast, slow], [0, 0]
    for _ in range(50):
        pick = min(range(2), key=lambda i: expected_wait(load[i], paces[i], paces))
        load[pick] += 1
    assert load == [30, 20]


def test_untimed_pipelines_count_as_the_average_and_all_alike_at_first():
    fresh, timed_one = Pace(), timed(0.010, 16)
    assert expected_wait(3, fresh, [fresh, timed_one]) == expected_wait(3, timed_one, [fresh, timed_one])
    assert expected_wait(0, Pace(), [Pace(), Pace()]) == expected_wait(0, Pace(), [Pace()])
