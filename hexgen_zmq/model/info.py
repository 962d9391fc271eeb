"""What the runtime needs to know about a checkpoint before loading any weight (torch-free).

Read from `config.json` and `generation_config.json` of a Hugging Face checkpoint directory, so the broker and
the deployment loader can validate layouts and requests without torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Decoder families whose layers have the Llama layout (q/k/v/o projections, gate/up/down MLP, RMSNorm, RoPE)
# built by transformers' own layer classes and run by hexgen_zmq.model.layers (tested per family in test_model_families).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


# Logits processors a checkpoint's generation_config.json may switch on, which requests here do not apply
# (with their neutral values); the broker warns when a checkpoint sets one.
UNAPPLIED_GENERATION_SETTINGS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
                                 "suppress_tokens": None, "begin_suppress_tokens": None, "min_length": 0,
                                 "min_new_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be served."""


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    raw: dict
    ignored_generation_settings: tuple[str, ...] = ()  # in generation_config.json, not applied here

    def check_tp_degree(self, tp: int) -> str | None:
        """Why this model cannot be split over `tp` ranks, or None when it can."""
        if self.num_heads % tp:
            return f"TP degree {tp} does not divide the model's {self.num_heads} attention heads"
        if self.intermediate_size % tp:
            return f"TP degree {tp} does not divide the MLP width {self.intermediate_size}"
        return None


def _eos_ids(value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)  # type: ignore[union-attr]


def read_model_info(path: str | Path) -> ModelInfo:
    """Read a checkpoint's config; raise CheckpointError naming what is missing or unsupported."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} is not a Hugging Face checkpoint: no config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file}: invalid JSON ({exc})") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = ", ".join(config.get("architectures") or []) or "unknown architecture"
        raise CheckpointError(
            f"{path}: model_type {model_type!r} ({arch}) is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if not any(path.glob("*.safetensors")):
        raise CheckpointError(f"{path}: no *.safetensors files (only safetensors checkpoints are loaded)")
    generation = {}
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        generation = json.loads(gen_file.read_text())
    eos = _eos_ids(generation.get("eos_token_id", config.get("eos_token_id")))
    ignored = tuple(key for key, neutral in UNAPPLIED_GENERATION_SETTINGS.items()
                    if generation.get(key) not in (None, neutral))
    missing = [k for k in ("num_attention_heads", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
               if k not in config]
    if missing:
        raise CheckpointError(f"{config_file}: missing {', '.join(missing)}")
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    return ModelInfo(
        path=path,
        model_type=model_type,
        num_layers=int(config["num_hidden_layers"]),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        intermediate_size=int(config["intermediate_size"]),
        vocab_size=int(config["vocab_size"]),
        max_positions=int(config.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        eos_token_ids=eos,
        raw=config,
        ignored_generation_settings=ignored,
    )
