"""hexgen-zmq: LLM serving over heterogeneous GPUs with asymmetric tensor + pipeline parallelism.

The package root imports nothing heavy, so `hexgen_zmq.planner` and the client stay usable without torch.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Client", "SyncClient", "GenerationResult", "GenerationError", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Client", "SyncClient", "GenerationResult", "GenerationError"):
        from hexgen_zmq.serving import client
        return getattr(client, name)
    raise AttributeError(f"module 'hexgen_zmq' has no attribute {name!r}")
