from __future__ import annotations

import pytest

from tests.support import TINY


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random Llama checkpoint (6 layers, GQA, initializer_range 0.1) sharded into several safetensors."""
    from hexgen_zmq.tiny_model import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny"), max_shard_size="200KB", **TINY))


@pytest.fixture(scope="session")
def tied_model(tmp_path_factory) -> str:
    """Like tiny_model but with tied embeddings, in one safetensors file."""
    from hexgen_zmq.tiny_model import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tied"), tie_word_embeddings=True, seed=1, **TINY))
