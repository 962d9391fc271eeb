"""The broker's dispatch policy, mirrored for the simulator (the planner does not import the runtime).

`hexgen_zmq.serving.broker_state` sends a request to the pipeline, among those whose KV budget holds it, where it
would get its tokens soonest: each pipeline's moving average of the time between two tokens of one request
(`pace_s`, updated once per step's token message with weight PACE_WEIGHT), scaled by the requests it would
then hold over the requests it held while that pace was seen; until every candidate has shown a pace, the
fewest requests in flight. This module is that code's twin, line for line, and
`tests/planner/test_stepsim.py` replays a recorded trace of decisions through the broker's own
`BrokerState.dispatch_order` to check that the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PACE_WEIGHT = 0.2  # hexgen_zmq.serving.broker_state.PACE_WEIGHT
BLOCK_SIZE = 16  # hexgen_zmq.stage.block_manager.BLOCK_SIZE: KV blocks are reserved in these many tokens


def blocks_for(tokens: int, block_size: int = BLOCK_SIZE) -> int:
    return -(-tokens // block_size)


@dataclass(eq=False)
class PaceState:
    """What the broker knows of one pipeline when it dispatches (PipelineState's dispatch fields)."""

    capacity_blocks: int
    in_flight: set[int] = field(default_factory=set)
    reserved_blocks: int = 0
    pace_s: float | None = None
    pace_load: float = 1.0

    def observe_pace(self, seconds: float, load: int) -> None:
        """One step's tokens came back: `seconds` since the previous token of the same requests, on average."""
        if self.pace_s is None:
            self.pace_s, self.pace_load = seconds, float(max(load, 1))
        else:
            self.pace_s += PACE_WEIGHT * (seconds - self.pace_s)
            self.pace_load += PACE_WEIGHT * (max(load, 1) - self.pace_load)

    def expected_pace_s(self) -> float:
        return (self.pace_s or 0.0) * (len(self.in_flight) + 1) / self.pace_load


def dispatch_order(candidates: list[PaceState]):
    """Sort key among pipelines that can hold a request (BrokerState.dispatch_order)."""
    paced = all(p.pace_s is not None for p in candidates)

    def key(p: PaceState) -> tuple:
        load = p.reserved_blocks / max(p.capacity_blocks, 1)
        return (p.expected_pace_s() if paced else 0.0, len(p.in_flight), load)
    return key


def choose(pipelines: list[PaceState], blocks: int) -> int | None:
    """Index of the pipeline a request of `blocks` KV blocks goes to now (BrokerState.dispatch), or None."""
    fits = [p for p in pipelines if p.reserved_blocks + blocks <= p.capacity_blocks]
    if not fits:
        return None
    chosen = min(fits, key=dispatch_order(fits))
    return next(i for i, p in enumerate(pipelines) if p is chosen)
