"""GGUF file -> standard Hugging Face checkpoint directory (sharded safetensors, config, tokenizer).

transformers reads a GGUF file and dequantizes it to ordinary float tensors, but the model it returns carries
a GGUF quantizer and refuses `save_pretrained`. So the GGUF model is only a source of tensors: a plain model
is built from the same config, minus its `quantization_config`, and the tensors are copied in. The result is
an ordinary checkpoint; nothing that loads it needs to know it came from GGUF.

Needs the optional packages `gguf` and `accelerate` (`pip install 'hexgen-zmq[gguf]'`). torch and
transformers are imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DTYPES = ("float32", "bfloat16")
EXTRAS = ("gguf", "accelerate")
INSTALL_HINT = "pip install 'hexgen-zmq[gguf]'"

# A few token ids that every vocabulary has; enough to compare two models' logits.
_PROBE_IDS = [1, 9690, 198, 2683, 314, 260, 3575, 282]


class MissingExtrasError(ImportError):
    """The optional packages that reading GGUF needs are not installed."""


def require_extras() -> None:
    """Raise MissingExtrasError naming what to install, before any slow work starts."""
    missing = [name for name in EXTRAS if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtrasError(
            f"converting a GGUF model needs the optional package(s) {', '.join(missing)}: run `{INSTALL_HINT}`"
        )


def _import_transformers() -> Any:
    # Every path here is a local directory; never let transformers reach for a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()  # the caller shows its own progress
    return transformers


def _torch_dtype(dtype: str) -> torch.dtype:
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    return getattr(torch, dtype)


def load_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (dequantized to float32) and tokenizer, with its chat template, read from one GGUF file."""
    require_extras()
    transformers = _import_transformers()
    import torch

    directory, name = str(gguf_path.parent), gguf_path.name
    with _tqdm_disabled():  # transformers' GGUF reader draws its own tqdm bar regardless of its settings
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=torch.float32, local_files_only=True
        )
    model.eval()
    # Saved with the tokenizer otherwise: a load option of ours, and an unbounded length the model lacks.
    tokenizer.init_kwargs.pop("local_files_only", None)
    tokenizer.model_max_length = model.config.max_position_embeddings
    return model, tokenizer


@contextlib.contextmanager
def _tqdm_disabled() -> Iterator[None]:
    from transformers import modeling_gguf_pytorch_utils as reader

    original = getattr(reader, "tqdm", None)
    if original is None:  # a transformers that reads GGUF differently: leave it be
        yield
        return
    reader.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        reader.tqdm = original


def to_plain_model(gguf_model: PreTrainedModel, dtype: str) -> PreTrainedModel:
    """A model of the same architecture with no quantizer attached, holding gguf_model's weights in dtype."""
    transformers = _import_transformers()
    import torch

    config = gguf_model.config.__class__.from_dict(gguf_model.config.to_dict())
    for attribute in ("quantization_config", "_model_name_or_path"):  # GGUF-only: its quantizer, its title
        if hasattr(config, attribute):
            delattr(config, attribute)
    config.dtype = dtype
    with torch.no_grad():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=_torch_dtype(dtype))
        model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model.eval()
    if config.tie_word_embeddings and not embeddings_tied(model):
        raise RuntimeError("the rebuilt model lost its tied input/output embeddings")
    return model


def embeddings_tied(model: PreTrainedModel) -> bool:
    """Whether the LM head and the input embeddings are one tensor."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight.data_ptr() == embed.weight.data_ptr()


def save_checkpoint(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path, max_shard_size: str | int
) -> None:
    """Write config, generation config, sharded safetensors with their index, tokenizer and chat template."""
    model.save_pretrained(out_dir, max_shard_size=max_shard_size, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def verify_checkpoint(out_dir: Path, reference: PreTrainedModel, dtype: str) -> None:
    """Reload out_dir the way any user would and check it against reference: tied embeddings, same logits."""
    transformers = _import_transformers()
    import torch

    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(out_dir), dtype=_torch_dtype(dtype), local_files_only=True
    )
    loaded.eval()
    if reference.config.tie_word_embeddings and not embeddings_tied(loaded):
        raise RuntimeError(f"{out_dir}: the saved checkpoint loads with untied embeddings")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{out_dir}: the saved tokenizer has no chat template")
    ids = torch.tensor([_PROBE_IDS])
    with torch.no_grad():
        expected = reference(ids).logits
        got = loaded(ids).logits
    if not torch.equal(expected, got):
        diff = (expected.float() - got.float()).abs().max().item()
        raise RuntimeError(f"{out_dir}: the saved checkpoint's logits differ from the source (max {diff:.3g})")
