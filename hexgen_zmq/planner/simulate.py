"""Discrete-event simulation of a plan under Poisson arrivals.

Each request goes, on arrival, to the least-loaded pipeline (requests in flight relative to the pipeline's
capacity). The broker itself goes by each pipeline's observed pace between tokens scaled by its load, which
also sends more requests to the faster pipelines; this model of it is simpler. A pipeline runs up to `max_batch` requests at once (continuous batching) and queues the rest.
Between events its batch is constant, so decoding advances as a fluid: every request in flight gains one
token per `step_times[b]` seconds. Admitting a request lengthens decoding by its prompt's marginal cost
(`Timing.busy`: with chunked prefill the prompt's chunks share steps, and weight reads, with the decode
tokens; alone, the prefill's compute time); the request's first token also pays the prefill's network hops. One arrival trace (unit-rate gaps from a seed)
is scaled by 1/rate, so every plan and every rate sees the same requests.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass

from hexgen_zmq.planner import constants as C
from hexgen_zmq.planner.plan import Timing


def unit_gaps(seed: int, n: int = C.SIM_REQUESTS) -> list[float]:
    """Inter-arrival gaps of a unit-rate Poisson process."""
    rng = random.Random(seed)
    return [rng.expovariate(1.0) for _ in range(n)]


@dataclass(frozen=True, slots=True)
class SimResult:
    latencies: tuple[float, ...]  # per request, in arrival order
    attainment: float  # share of requests within the deadline

    @property
    def mean_latency(self) -> float:
        return sum(self.latencies) / len(self.latencies) if self.latencies else math.inf

    def quantile(self, q: float) -> float:
        """Smallest deadline that a share q of the requests meets."""
        if not self.latencies:
            return math.inf
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class _Pipe:
    """One pipeline's queue and continuous batch."""

    def __init__(self, timing: Timing, output_len: int):
        self.t = timing
        self.steps = output_len - 1
        self.capacity = timing.capacity(output_len)
        self.offset = timing.prefill_latency - timing.prefill_busy
        self.active: list[tuple[float, int]] = []  # (virtual step at which it finishes, request)
        self.queue: deque[int] = deque()
        self.v = 0.0  # decode steps done so far (fluid)
        self.now = 0.0
        self.pause_until = 0.0

    def load(self) -> float:
        return (len(self.active) + len(self.queue) + 1) / self.capacity

    def admit(self, request: int, now: float) -> None:
        self.pause_until = max(self.pause_until, now) + self.t.busy(len(self.active))
        heapq.heappush(self.active, (self.v + self.steps, request))

    def advance(self, until: float, arrivals: list[float], done: list[float]) -> None:
        """Run the pipeline up to time `until`, recording completions in `done`."""
        while self.active:
            step = self.t.step_times[len(self.active)]
            start = max(self.now, self.pause_until)
            finish = start + (self.active[0][0] - self.v) * step
            if finish > until:
                if until > start:
                    self.v += (until - start) / step
                self.now = until
                return
            self.v, self.now = self.active[0][0], finish
            while self.active and self.active[0][0] <= self.v + 1e-9:
                _, request = heapq.heappop(self.active)
                done[request] = finish + self.offset - arrivals[request]
            while self.queue and len(self.active) < self.t.max_batch:
                self.admit(self.queue.popleft(), finish)
        if until != math.inf:
            self.now = until

    def submit(self, request: int, now: float) -> None:
        if len(self.active) < self.t.max_batch:
            self.admit(request, now)
        else:
            self.queue.append(request)


def simulate(timings: list[Timing], output_len: int, gaps: list[float], rate: float, slo: float) -> SimResult:
    """SLO attainment of a plan (its pipelines' timings) at `rate` requests per second."""
    if not timings:
        return SimResult((), 0.0)
    arrivals, now = [], 0.0
    for gap in gaps:
        now += gap / rate
        arrivals.append(now)
    done = [math.inf] * len(arrivals)
    pipes = [_Pipe(t, output_len) for t in timings]
    for request, at in enumerate(arrivals):
        for pipe in pipes:
            pipe.advance(at, arrivals, done)
        min(pipes, key=_Pipe.load).submit(request, at)
    for pipe in pipes:
        pipe.advance(math.inf, arrivals, done)
    met = sum(1 for latency in done if latency <= slo)
    return SimResult(tuple(done), met / len(done))


def max_rate(timings: list[Timing], output_len: int, gaps: list[float], slo: float, target: float) -> float:
    """Highest arrival rate at which a share `target` of requests meets `slo` (0 if none does). A rate is
    sustainable only below the plan's capacity: above it queues grow without bound however long the trace."""
    if not timings:
        return 0.0

    def ok(rate: float) -> bool:
        return simulate(timings, output_len, gaps, rate, slo).attainment >= target

    hi = sum(t.capacity(output_len) for t in timings)
    if ok(hi):
        return hi
    lo = hi / 1024
    if not ok(lo):
        return 0.0
    while hi - lo > C.RATE_SEARCH_TOLERANCE * lo:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo
