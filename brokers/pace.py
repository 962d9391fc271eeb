"""How fast each pipeline turns out tokens, as the broker sees it, and where that sends the next request.

Pipelines of one deployment differ in speed (other GPUs, more stages and hops, other datacenters). Counting
requests in flight would give each the same share, and the slowest would finish last while the others idle.
The broker instead times the token messages of each pipeline while it is busy and sends a new request where
(requests in flight + 1) x (seconds per token) is smallest: shares follow observed speed. Pure policy.
"""

from __future__ import annotations

from collections.abc import Sequence

WEIGHT = 0.2  # of each new gap in the moving average


class Pace:
    """Seconds per generated token of one pipeline: a moving average of the gaps between its token messages,
    divided by the tokens each carried. Gaps after the pipeline sat idle are not counted."""

    def __init__(self) -> None:
        self.seconds_per_token: float | None = None
        self._last: float | None = None

    def tokens(self, now: float, count: int) -> None:
        """A token message of `count` tokens arrived at `now`."""
        if self._last is not None and count > 0:
            sample = (now - self._last) / count
            known = self.seconds_per_token
            self.seconds_per_token = sample if known is None else (1 - WEIGHT) * known + WEIGHT * sample
        self._last = now

    def idle(self) -> None:
        """The pipeline has nothing in flight: the next gap measures waiting, not work."""
        self._last = None


def expected_wait(in_flight: int, pace: Pace, paces: Sequence[Pace]) -> float:
    """What sending one more request to this pipeline costs, in seconds per token of its whole load.
    A pipeline not yet timed counts as the average of those that are (or all alike when none is)."""
    known = [p.seconds_per_token for p in paces if p.seconds_per_token is not None]
    default = sum(known) / len(known) if known else 1.0
    return (in_flight + 1) * (pace.seconds_per_token if pace.seconds_per_token is not None else default)
