"""Partial loading: a stage reads only its layers (and a TP rank only its shard) from safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hexgen_zmq.model.checkpoint import ShardPlan
from hexgen_zmq.model.info import read_model_info
from hexgen_zmq.model.runner import StageModel


def tensor_bytes(model_path: str) -> dict[str, int]:
    sizes = {}
    for file in Path(model_path).glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                sizes[name] = int(torch.tensor(t.get_shape()).prod()) * 4
    return sizes


def build(model_path, layers, first, last, rank=0, size=1):
    info = read_model_info(model_path)
    return StageModel(info, layers, first=first, last=last, dtype=torch.float32, device=torch.device("cpu"),
                      shard=ShardPlan.make(info, rank, size))


def test_sharded_checkpoint_has_an_index(tiny_model):
    assert (Path(tiny_model) / "model.safetensors.index.json").is_file()
    assert len(list(Path(tiny_model).glob("*.safetensors"))) > 3


@pytest.mark.parametrize("layers, first, last", [((0, 2), True, False), ((2, 5), False, False), ((5, 6), False, True)])
def test_a_stage_reads_only_its_own_tensors(tiny_model, layers, first, last):
    sizes = tensor_bytes(tiny_model)
    wanted = sum(v for k, v in sizes.items() if k.startswith("model.layers.")
                 and layers[0] <= int(k.split(".")[2]) < layers[1])
    if first:
        wanted += sizes["model.embed_tokens.weight"]
    if last:
        wanted += sizes["model.norm.weight"] + sizes["lm_head.weight"]
    model = build(tiny_model, layers, first, last)
    assert model.bytes_loaded == wanted
    assert model.bytes_loaded < 0.6 * sum(sizes.values())
    assert len(model.layers) == layers[1] - layers[0]


def test_tied_embeddings_feed_the_head(tied_model):
    index = Path(tied_model) / "model.safetensors.index.json"
    names = json.loads(index.read_text())["weight_map"] if index.exists() else tensor_bytes(tied_model)
    assert "lm_head.weight" not in names
    model = build(tied_model, (4, 6), False, True)
    with safe_open(next(Path(tied_model).glob("*.safetensors")), framework="pt") as f:
        embedding = f.get_tensor("model.embed_tokens.weight")
    hidden = torch.randn(3, embedding.shape[1])
    with torch.inference_mode():
        torch.testing.assert_close(model.lm_head(hidden), hidden @ embedding.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [2, 4])
def test_a_tp_rank_reads_about_one_over_tp_of_its_stage(tiny_model, size):
    whole = build(tiny_model, (1, 5), False, False).bytes_loaded
    for rank in range(size):
        part = build(tiny_model, (1, 5), False, False, rank, size).bytes_loaded
        assert part == pytest.approx(whole / size, rel=0.05)


@pytest.mark.parametrize("heads, kv, size, expected", [
    (8, 4, 2, [[0, 1], [2, 3]]),  # KV heads split evenly
    (8, 2, 4, [[0], [0], [1], [1]]),  # TP a multiple of the KV heads: replicate
    (8, 8, 8, [[i] for i in range(8)]),
    (24, 6, 4, [[0, 0, 0, 0, 1, 1], [1, 1, 2, 2, 2, 2], [3, 3, 3, 3, 4, 4], [4, 4, 5, 5, 5, 5]]),  # uneven: per head
    (9, 3, 3, [[0], [1], [2]]),  # SmolLM2's shape
])
def test_kv_heads_for_each_rank(heads, kv, size, expected):
    from dataclasses import replace

    info = replace(_fake_info(), num_heads=heads, num_kv_heads=kv, intermediate_size=48 * size)
    assert [ShardPlan.make(info, r, size).kv_heads for r in range(size)] == expected


def _fake_info():
    from hexgen_zmq.model.info import ModelInfo

    return ModelInfo(Path("."), "llama", 2, 64, 8, 4, 8, 96, 100, 128, False, (), {})
