"""The plan-fidelity tool's pure parts and the bench figures it reads: per-pipeline summaries, the open
loop's arrival offsets, the rate at which attainment crosses the target."""

from __future__ import annotations

import asyncio

from hexgen_zmq.serving import bench
from hexgen_zmq.serving.bench import RequestStats, arrival_offsets, summarize
from tools.plan_fidelity import crossing_rate


def test_summary_per_pipeline():
    stats = [RequestStats(0.1, 1.0, 11, pipeline="p0"), RequestStats(0.3, 3.0, 11, pipeline="p1"),
             RequestStats(0.2, 2.0, 11, pipeline="p0"), RequestStats(0.0, 0.5, 0, ok=False, error="x")]
    report = summarize("r", stats, 4.0, slo_s=1.5)
    assert report.slo_attainment == 1 / 4
    assert set(report.pipelines) == {"p0", "p1"}
    p0 = report.pipelines["p0"]
    assert p0["requests"] == 2 and p0["slo_attainment"] == 0.5
    assert abs(p0["ttft_s"]["mean"] - 0.15) < 1e-12 and abs(p0["tpot_s"]["mean"] - 0.135) < 1e-12
    assert report.pipelines["p1"]["slo_attainment"] == 0.0
    assert summarize("r", stats, 4.0, None).pipelines["p0"]["slo_attainment"] is None


def test_arrival_offsets_are_the_open_loops_sends():
    offsets = arrival_offsets(50, 20.0, 3)
    assert offsets[0] == 0.0 and offsets == sorted(offsets) and offsets == arrival_offsets(50, 20.0, 3)
    assert 1.0 < offsets[-1] < 5.0  # 49 gaps of mean 50 ms
    sent: list[float] = []

    async def one(i: int) -> None:
        sent.append(asyncio.get_running_loop().time())

    asyncio.run(bench._drive(one, 20, None, 40.0, 3))
    expected = arrival_offsets(20, 40.0, 3)
    for got, want in zip(sent, expected):
        assert abs((got - sent[0]) - want) < 0.02


def test_crossing_rate():
    points = [(2.0, 1.0), (4.0, 0.95), (6.0, 0.7), (8.0, 0.2)]
    assert abs(crossing_rate(points, 0.9) - (4.0 + 2.0 * 0.05 / 0.25)) < 1e-9
    assert crossing_rate([(2.0, 0.5)], 0.9) == 0.0  # never at the target: none of the rates tried
    assert crossing_rate([(2.0, 1.0), (4.0, 0.99)], 0.9) == 4.0  # every rate tried met it: at least the last
    # non-monotone noise: the first rate from which attainment stays below the target
    assert abs(crossing_rate([(2.0, 1.0), (4.0, 0.85), (6.0, 0.95), (8.0, 0.1)], 0.9) - (6.0 + 2 * 0.05 / 0.85)) < 1e-9
