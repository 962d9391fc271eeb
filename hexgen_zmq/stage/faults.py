"""Faults injected on purpose, for tests of what the system does when a step is slow or a micro-batch is
lost. Read once from the environment of a stage process; absent in every normal run.

    HEXGEN_FAULT_SLOW_STEP=STAGE_ID:SECONDS   the stage's first step with a prompt chunk takes SECONDS longer
    HEXGEN_FAULT_DROP_BATCH=STAGE_ID:N        the stage drops the N-th micro-batch it receives (1-based)
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class Faults:
    slow_step_s: float = 0.0
    drop_batch: int = 0  # 0: none

    @classmethod
    def from_env(cls, stage_id: str, env: dict[str, str] | None = None) -> Faults:
        env = os.environ if env is None else env
        faults = cls()
        for name, attr, kind in (("HEXGEN_FAULT_SLOW_STEP", "slow_step_s", float),
                                 ("HEXGEN_FAULT_DROP_BATCH", "drop_batch", int)):
            target, _, value = env.get(name, "").partition(":")
            if target == stage_id and value:
                setattr(faults, attr, kind(value))
        return faults
