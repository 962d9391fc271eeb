"""Which pipeline a request goes to: each pipeline's pace of tokens, and the order of the candidates.

The broker (`serving/broker_state.py`) sends a request, among the pipelines whose KV budget holds it, where it
would get its tokens soonest: each pipeline's moving average of the time between two tokens of one request
(`pace_s`, updated once per step's token message with weight PACE_WEIGHT), scaled by the requests it would
then hold over the requests it held while that pace was seen; until every candidate has shown a pace, the
fewest requests in flight. Plain Python that imports nothing of the runtime, so that the planner's simulator
(`planner/stepsim.py`, through `planner/dispatch.py`) runs this very policy rather than a copy of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

PACE_WEIGHT = 0.2  # of each step's new sample in a pipeline's pace (about the last 5 steps count)


class PaceEstimate:
    """The pace fields' behaviour, for a dataclass that has `pace_s: float | None`, `pace_load: float` and
    `in_flight` (a set of request ids)."""

    pace_s: float | None
    pace_load: float
    in_flight: set[int]

    def observe_pace(self, seconds: float, load: int) -> None:
        """One step's tokens came back: `seconds` since the previous token of the same requests, on average,
        with `load` requests in flight."""
        if self.pace_s is None:
            self.pace_s, self.pace_load = seconds, float(max(load, 1))
        else:
            self.pace_s += PACE_WEIGHT * (seconds - self.pace_s)
            self.pace_load += PACE_WEIGHT * (max(load, 1) - self.pace_load)

    def expected_pace_s(self) -> float:
        """The pace a request joining now would see, taking time per step as proportional to the requests in
        flight. That overstates what one more request costs a lightly loaded pipeline, so it errs towards
        spreading requests out; but it follows the load as soon as requests come or go, before any step has
        shown the change, and a faster pipeline ends up holding more requests than a slower one."""
        return (self.pace_s or 0.0) * (len(self.in_flight) + 1) / self.pace_load


class Candidate(Protocol):
    pace_s: float | None
    in_flight: set[int]
    reserved_blocks: int

    @property
    def capacity_blocks(self) -> int: ...

    def expected_pace_s(self) -> float: ...


def dispatch_key(candidates: Sequence[Candidate]) -> Callable[[Candidate], tuple]:
    """Sort key among pipelines that can hold a request: the pace it would see (the pipelines' speeds
    differ), then the fewest requests in flight, then the lightest KV load. Until every candidate has shown
    its pace, only the count: a pipeline not yet measured would otherwise look infinitely fast and take
    everything."""
    paced = all(p.pace_s is not None for p in candidates)

    def key(p: Candidate) -> tuple:
        load = p.reserved_blocks / max(p.capacity_blocks, 1)
        return (p.expected_pace_s() if paced else 0.0, len(p.in_flight), load)
    return key
