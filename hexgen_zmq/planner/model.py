"""Model shapes (Llama family: GQA attention, SwiGLU MLP): exact parameter, KV-cache and FLOP counts.

A model is given as a preset name, a Hugging Face `config.json`, or a checkpoint directory holding one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int
    tie_word_embeddings: bool = False
    max_positions: int | None = None  # the longest context (max_position_embeddings), where known

    # --- parameters (elements) -------------------------------------------------------------------------
    @property
    def attention_params(self) -> int:
        """q and o projections (hidden x heads*head_dim), k and v (hidden x kv_heads*head_dim); no biases."""
        h, d = self.hidden_size, self.head_dim
        return 2 * h * self.num_attention_heads * d + 2 * h * self.num_key_value_heads * d

    @property
    def mlp_params(self) -> int:
        """SwiGLU: gate, up (hidden x intermediate) and down (intermediate x hidden)."""
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def layer_params(self) -> int:
        """One decoder layer, with its two RMSNorm weights."""
        return self.attention_params + self.mlp_params + 2 * self.hidden_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        """LM head (absent when tied to the embeddings) plus the final norm."""
        return (0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size) + self.hidden_size

    @property
    def total_params(self) -> int:
        return self.num_hidden_layers * self.layer_params + self.embedding_params + self.head_params

    # --- KV cache ---------------------------------------------------------------------------------------------
    def kv_heads_per_rank(self, tp: int) -> int:
        """KV heads each TP rank stores: kv/tp when tp divides kv, else one (replicated) head."""
        return max(1, self.num_key_value_heads // tp)

    def kv_elements_per_token_layer(self, tp: int = 1) -> int:
        """K and V elements one token adds to one layer's cache on one TP rank."""
        return 2 * self.kv_heads_per_rank(tp) * self.head_dim

    # --- FLOPs ----------------------------------------------------------------------------------------------
    def layer_matmul_flops_per_token(self) -> int:
        """Multiply-adds of the layer's weight GEMMs, as FLOPs, for one token."""
        return 2 * (self.attention_params + self.mlp_params)

    def attention_flops_per_token(self, context: float) -> float:
        """QK^T and PV for one query token attending to `context` keys, all heads."""
        return 4 * self.num_attention_heads * self.head_dim * context

    def valid_tp(self, tp: int) -> bool:
        """TP degrees the runtime accepts: divide the heads, and divide or be a multiple of the KV heads."""
        kv = self.num_key_value_heads
        return self.num_attention_heads % tp == 0 and (kv % tp == 0 or tp % kv == 0)


PRESETS: dict[str, ModelSpec] = {
    "llama-2-7b": ModelSpec("llama-2-7b", 4096, 11008, 32, 32, 32, 32000, 128),
    "llama-2-13b": ModelSpec("llama-2-13b", 5120, 13824, 40, 40, 40, 32000, 128),
    "llama-2-70b": ModelSpec("llama-2-70b", 8192, 28672, 80, 64, 8, 32000, 128),
}


def load_model(spec: str) -> ModelSpec:
    """A preset name, a config.json path, or a checkpoint directory containing config.json."""
    if spec.lower() in PRESETS:
        return PRESETS[spec.lower()]
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"model {spec!r}: not a preset ({', '.join(PRESETS)}) nor a config.json or checkpoint")
    return model_from_config(json.loads(path.read_text()), name=Path(spec).name)


def model_from_config(config: dict, name: str = "model") -> ModelSpec:
    """Build a ModelSpec from a Hugging Face Llama-style config dict."""
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return ModelSpec(
            name=name,
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            vocab_size=int(config["vocab_size"]),
            head_dim=int(config.get("head_dim") or hidden // heads),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_positions=int(config["max_position_embeddings"]) if config.get("max_position_embeddings") else None,
        )
    except KeyError as exc:
        raise ValueError(f"model config: missing field {exc.args[0]}") from exc
