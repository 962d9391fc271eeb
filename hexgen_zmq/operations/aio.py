"""asyncio helpers shared by the process entry points."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine


async def run_until_first_failure(*coroutines: Coroutine) -> None:
    """Run a process's loops together; the first one to raise stops the others and re-raises."""
    tasks = [asyncio.create_task(c) for c in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
