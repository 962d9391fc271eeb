"""The broker's dispatch policy for the simulator: the broker's own (`hexgen_zmq.serving.pace`, plain
Python) over a record of what the broker knows of each pipeline.

`tests/planner/test_stepsim.py` replays a recorded trace of decisions through the broker's
`BrokerState.dispatch_order` to check that the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hexgen_zmq.serving.pace import PACE_WEIGHT, PaceEstimate, dispatch_key
from hexgen_zmq.stage.block_manager import BLOCK_SIZE, blocks_for

__all__ = ["BLOCK_SIZE", "PACE_WEIGHT", "PaceState", "blocks_for", "choose", "dispatch_order"]


@dataclass(eq=False)
class PaceState(PaceEstimate):
    """What the broker knows of one pipeline when it dispatches (PipelineState's dispatch fields)."""

    capacity_blocks: int
    in_flight: set[int] = field(default_factory=set)
    reserved_blocks: int = 0
    pace_s: float | None = None
    pace_load: float = 1.0


dispatch_order = dispatch_key  # BrokerState.dispatch_order


def choose(pipelines: list[PaceState], blocks: int) -> int | None:
    """Index of the pipeline a request of `blocks` KV blocks goes to now (BrokerState.dispatch), or None."""
    fits = [p for p in pipelines if p.reserved_blocks + blocks <= p.capacity_blocks]
    if not fits:
        return None
    chosen = min(fits, key=dispatch_order(fits))
    return next(i for i, p in enumerate(pipelines) if p is chosen)
