"""Partial loading: a stage (and a TP rank in it) reads only its own tensors, and only its shard of them.

Safetensors files are memory-mapped and read by name (through `model.safetensors.index.json` when sharded),
with `get_slice` so a rank reads only the rows or columns it keeps. No pickle, no code execution.

Tensor-parallel split (Megatron style): q/k/v and gate/up are column parallel (q/k/v by attention heads),
o_proj and down_proj row parallel. Embeddings, final norm and LM head are replicated on every rank of their
stage (they are small next to the layers, and replication keeps sampling local to the leader).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from hexgen_zmq.model.info import CheckpointError, ModelInfo


@dataclass(frozen=True)
class ShardPlan:
    """What one rank of a TP group keeps: its query heads, the KV heads they read, its MLP columns."""

    rank: int
    size: int
    q_heads: list[int]
    kv_heads: list[int]  # one entry per local KV head (a head may be replicated across ranks)
    mlp: tuple[int, int]

    @staticmethod
    def make(info: ModelInfo, rank: int, size: int) -> ShardPlan:
        if why := info.check_tp_degree(size):
            raise CheckpointError(why)
        per_rank = info.num_heads // size
        q_heads = list(range(rank * per_rank, (rank + 1) * per_rank))
        group = info.num_heads // info.num_kv_heads
        needed = [q // group for q in q_heads]  # the KV head each local query head reads
        distinct = list(dict.fromkeys(needed))
        repeat = per_rank // len(distinct) if per_rank % len(distinct) == 0 else 0
        if repeat and needed == [distinct[i // repeat] for i in range(per_rank)]:
            kv_heads = distinct  # even grouping: HF's repeat_kv maps local query heads correctly
        else:
            kv_heads = needed  # uneven: one (replicated) KV head per local query head
        width = info.intermediate_size // size
        return ShardPlan(rank, size, q_heads, kv_heads, (rank * width, (rank + 1) * width))


class CheckpointReader:
    """Reads named tensors (or slices of them) from a checkpoint's safetensors files."""

    def __init__(self, path: Path):
        self.path = Path(path)
        index_file = self.path / "model.safetensors.index.json"
        self.file_of: dict[str, str] = {}
        if index_file.is_file():
            self.file_of = json.loads(index_file.read_text())["weight_map"]
        else:
            for file in sorted(self.path.glob("*.safetensors")):
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        self.file_of[name] = file.name
        self._handles: dict[str, object] = {}
        self.bytes_read = 0

    def has(self, name: str) -> bool:
        return name in self.file_of

    def _handle(self, name: str):
        if name not in self.file_of:
            raise CheckpointError(f"{self.path}: tensor {name!r} not found in the checkpoint")
        file = self.file_of[name]
        if file not in self._handles:
            self._handles[file] = safe_open(self.path / file, framework="pt")
        return self._handles[file]

    def read(self, name: str, rows: list[tuple[int, int]] | None = None, cols: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or the concatenation of its row ranges, or a column range: only those bytes are read."""
        piece = self._handle(name).get_slice(name)
        if rows is not None:
            tensor = torch.cat([piece[a:b] for a, b in rows]) if len(rows) > 1 else piece[rows[0][0] : rows[0][1]]
        elif cols is not None:
            tensor = piece[:, cols[0] : cols[1]]
        else:
            tensor = piece[:]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def close(self) -> None:
        self._handles.clear()


def _head_rows(heads: list[int], head_dim: int) -> list[tuple[int, int]]:
    """Row ranges of the given heads, merged where consecutive."""
    ranges: list[tuple[int, int]] = []
    for h in heads:
        a, b = h * head_dim, (h + 1) * head_dim
        if ranges and ranges[-1][1] == a:
            ranges[-1] = (ranges[-1][0], b)
        else:
            ranges.append((a, b))
    return ranges


def load_layer_state(reader: CheckpointReader, info: ModelInfo, layer: int, shard: ShardPlan) -> dict[str, torch.Tensor]:
    """One decoder layer's parameters for one rank, named as in the HF decoder layer module."""
    prefix = f"model.layers.{layer}."
    names = [n[len(prefix) :] for n in reader.file_of if n.startswith(prefix)]
    if not names:
        raise CheckpointError(f"{reader.path}: no tensors for decoder layer {layer}")
    hd = info.head_dim
    q_rows = _head_rows(shard.q_heads, hd)
    kv_rows = _head_rows(shard.kv_heads, hd)
    mlp_rows = [shard.mlp]
    state: dict[str, torch.Tensor] = {}
    for name in names:
        full = prefix + name
        if shard.size == 1:
            tensor = reader.read(full)
        elif name.startswith("self_attn.q_proj."):
            tensor = reader.read(full, rows=q_rows)
        elif name.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            tensor = reader.read(full, rows=kv_rows)
        elif name == "self_attn.o_proj.weight":
            tensor = reader.read(full, cols=(q_rows[0][0], q_rows[-1][1]))
        elif name.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
            tensor = reader.read(full, rows=mlp_rows)
        elif name == "mlp.down_proj.weight":
            tensor = reader.read(full, cols=shard.mlp)
        elif name in ("self_attn.o_proj.bias", "mlp.down_proj.bias"):
            # row-parallel bias: added once, after the all-reduce sums the partial products
            tensor = reader.read(full)
            if shard.rank != 0:
                tensor = torch.zeros_like(tensor)
        else:
            tensor = reader.read(full)  # norms (including per-head q/k norms): replicated
        state[name] = tensor
    return state

