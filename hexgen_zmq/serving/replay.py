"""Replay: how a request goes on in a new attempt after the pipeline running it failed, or under a new broker
(pure policy: no sockets, no torch).

An attempt is a `Submit` of its own id whose prompt is the original prompt followed by every token already
emitted, asking for the tokens still to come, with `generated` telling the last stage how many came before
(its sampler draws the k-th token from the seed and k, so a seeded request continues exactly as if nothing
had happened, and greedy decoding reproduces the same tokens from the same context).
"""

from __future__ import annotations

import msgspec

from hexgen_zmq.wire.messages import Submit

# Failures that belong to where a request ran, not to the request: another attempt can succeed.
REPLAYABLE = frozenset({"stage_failed"})


def replayable(code: str) -> bool:
    return code in REPLAYABLE


def continuation(first: Submit, emitted: list[int], max_new_tokens: int, request_id: int, broker: int,
                 time_left_s: float) -> Submit:
    """The Submit that continues `first` (an attempt with the original prompt) after `emitted` tokens."""
    if len(emitted) >= max_new_tokens:
        raise ValueError(f"{len(emitted)} tokens emitted of {max_new_tokens}: nothing is left to generate")
    params = msgspec.structs.replace(first.params, max_new_tokens=max_new_tokens - len(emitted))
    return Submit(request_id, [*first.prompt, *emitted], params, first.eos_token_ids, max(time_left_s, 1e-3),
                  broker=broker, generated=len(emitted))
