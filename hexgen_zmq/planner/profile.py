"""Measured device and link figures of one host (`hexgen-zmq profile` writes them), for the cost model.

The planner's default coefficients are datasheet figures and stated guesses (`constants`, `catalog`). A
profile replaces them with what this project's own stage code measured on the host: per decoder layer, the
time of a prompt per token at a few prompt lengths and of a decode step at a few batch sizes and contexts;
the LM head per sampled row; the stage's fixed per-step overhead; and the goodput and latency of the links
to named peers. Torch-free: the profiler (`hexgen_zmq.operations.profiler`) measures, this module reads and writes.

Schema (every field required unless marked; unknown fields are refused, errors name the field path):

```yaml
version: 1
host: il-a                               # the host measured (a name of the cluster file)
device: {kind: cpu, name: cpu, dtype: float32, threads: 1, memory_gib: 7.6}   # memory per device
model: {name: tiny, hidden_size: 256, intermediate_size: 688, num_attention_heads: 8,
        num_key_value_heads: 4, head_dim: 32, vocab_size: 512}
prefill:                                 # one decoder layer, one prompt alone: seconds per prompt token
  - {prompt_len: 16, layer_s_per_token: 1.1e-5}
decode:                                  # one decoder layer, one step of `batch` requests at `context`
  - {batch: 1, context: 64, layer_s: 1.2e-4}        # every batch at every context (a full grid)
head:                                    # final norm + LM head over `rows` sampled rows, one step
  - {rows: 1, s: 4.0e-5}
stage_overhead_s: 3.1e-4                 # per step, beyond layers and head (layout, bookkeeping, wire)
links:                                   # optional: measured TCP goodput and one-way latency to peers
  - {peer: ic-a, address: 10.2.0.1, gbps: 0.29, latency_ms: 20.1}
```

How the cost model reads it (`Profile.layer_time`, `head_time`): on the profiled model shape and dtype, at
a profiled shape, exactly the measured figure; between and beyond, piecewise-linear interpolation (linear
extrapolation from the nearest two points). A step that mixes decode rows with a prompt chunk costs both
parts less one per-call fixed cost (`layer_fixed_s`), which they share. For another model shape (a 70B
plan on a host profiled with the tiny model) the profile gives effective coefficients instead: FLOP/s
from the largest prompt, bytes/s from the smallest decode step, and the per-call fixed cost, used in the
same roofline as the datasheet figures (`effective`). Those transfer badly from a model whose weights sit
in the CPU's caches (the tiny model's layer is 2.9 MB): profile with the model to be served, or one of its
layer size, when the plan's figures matter.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

PROFILE_VERSION = 1
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
MODEL_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "vocab_size")


class ProfileError(ValueError):
    """An invalid profile; the message starts with the offending field's path."""


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    kind: str  # cpu | cuda
    name: str  # the device kind the cluster file names (`gpus: {cpu: 2}`)
    dtype: str
    threads: int
    memory_gib: float


@dataclass(frozen=True, slots=True)
class ModelShape:
    name: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int


@dataclass(frozen=True, slots=True)
class PrefillPoint:
    prompt_len: int
    layer_s_per_token: float


@dataclass(frozen=True, slots=True)
class DecodePoint:
    batch: int
    context: int
    layer_s: float


@dataclass(frozen=True, slots=True)
class HeadPoint:
    rows: int
    s: float


@dataclass(frozen=True, slots=True)
class LinkFigure:
    peer: str
    address: str
    gbps: float  # goodput measured (what a stream reaches, not the nominal rate)
    latency_ms: float  # one way: half the median round trip of a small message


@dataclass(frozen=True, slots=True)
class Profile:
    host: str
    device: DeviceInfo
    model: ModelShape
    prefill: tuple[PrefillPoint, ...]
    decode: tuple[DecodePoint, ...]
    head: tuple[HeadPoint, ...]
    stage_overhead_s: float
    links: tuple[LinkFigure, ...] = ()

    # --- lookups ------------------------------------------------------------------------------------------
    def matches(self, model: Any, dtype: str) -> bool:
        """Whether the per-layer figures apply as measured: same layer shape, vocabulary and dtype."""
        return dtype == self.device.dtype and all(getattr(model, f) == getattr(self.model, f) for f in MODEL_FIELDS)

    def prefill_layer_s(self, tokens: float) -> float:
        """One layer over a prompt (or chunk) of `tokens` positions, the layer otherwise idle."""
        if tokens <= 0:
            return 0.0
        points = [(float(p.prompt_len), p.prompt_len * p.layer_s_per_token) for p in self.prefill]
        return max(_interp(points, tokens), tokens * min(p.layer_s_per_token for p in self.prefill))

    def decode_layer_s(self, batch: float, context: float) -> float:
        """One layer over one decode step of `batch` requests attending to `context` cached tokens each."""
        if batch <= 0:
            return 0.0
        contexts = sorted({p.context for p in self.decode})
        per_context = []
        for ctx in contexts:
            row = sorted((float(p.batch), p.layer_s) for p in self.decode if p.context == ctx)
            per_context.append((float(ctx), _interp(row, batch)))
        return max(_interp(per_context, context), 0.2 * min(p.layer_s for p in self.decode))

    @property
    def layer_fixed_s(self) -> float:
        """Per-call cost of a layer that does not grow with tokens: the decode time at batch 0 extrapolated
        from the two smallest batches at the smallest context (clamped to [0, 90%] of the smallest step)."""
        ctx = min(p.context for p in self.decode)
        row = sorted((p.batch, p.layer_s) for p in self.decode if p.context == ctx)
        if len(row) < 2:
            return 0.5 * row[0][1]
        (b1, t1), (b2, t2) = row[0], row[1]
        fixed = t1 - (t2 - t1) / (b2 - b1) * b1
        return min(max(fixed, 0.0), 0.9 * t1)

    def layer_time(self, decode_tokens: int, context: float, prompt_tokens: int) -> float:
        """One layer for one step: `decode_tokens` decode rows at `context` plus a `prompt_tokens` chunk."""
        if not prompt_tokens:
            return self.decode_layer_s(decode_tokens, context)
        if not decode_tokens:
            return self.prefill_layer_s(prompt_tokens)
        shared = min(self.layer_fixed_s, self.decode_layer_s(decode_tokens, context), self.prefill_layer_s(prompt_tokens))
        return self.decode_layer_s(decode_tokens, context) + self.prefill_layer_s(prompt_tokens) - shared

    def head_time(self, rows: int) -> float:
        """Final norm and LM head over `rows` sampled rows."""
        if rows <= 0:
            return 0.0
        points = sorted((float(p.rows), p.s) for p in self.head)
        return max(_interp(points, rows), min(p.s for p in self.head))

    def effective(self) -> tuple[float, float, float]:
        """(FLOP/s, bytes/s, per-call fixed seconds) of this device, for a model other than the profiled one:
        FLOP/s from the largest prompt measured, bytes/s from the smallest decode step measured."""
        return _effective(self)

    def link_to(self, peer: str) -> LinkFigure | None:
        return next((link for link in self.links if link.peer == peer), None)

    # --- files --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data = {"version": PROFILE_VERSION, **data}
        for key in ("prefill", "decode", "head", "links"):
            data[key] = [dict(x) for x in data[key]]
        if not data["links"]:
            del data["links"]
        return data


@lru_cache(maxsize=None)
def _effective(profile: Profile) -> tuple[float, float, float]:
    """Profile.effective, computed once per profile."""
    m, b = profile.model, DTYPE_BYTES[profile.device.dtype]
    attn = 2 * m.hidden_size * m.num_attention_heads * m.head_dim + 2 * m.hidden_size * m.num_key_value_heads * m.head_dim
    params = attn + 3 * m.hidden_size * m.intermediate_size
    fixed = profile.layer_fixed_s
    big = max(profile.prefill, key=lambda p: p.prompt_len)
    flops_per_token = 2 * params + 4 * m.num_attention_heads * m.head_dim * (big.prompt_len + 1) / 2
    flops = flops_per_token / max(big.layer_s_per_token - fixed / big.prompt_len, 1e-12)
    small = min(profile.decode, key=lambda p: (p.batch, p.context))
    kv = 2 * m.num_key_value_heads * m.head_dim * b
    nbytes = params * b + small.batch * small.context * kv
    bandwidth = nbytes / max(small.layer_s - fixed, 1e-12)
    return flops, bandwidth, fixed


def _interp(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear through (x, y) points, exact at each; beyond the ends, linear extrapolation from the
    nearest two; a single point is flat."""
    points = sorted(points)
    if len(points) == 1:
        return points[0][1]
    k = 0
    while k < len(points) - 2 and x > points[k + 1][0]:
        k += 1
    (x0, y0), (x1, y1) = points[k], points[k + 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


# --- load and validate -----------------------------------------------------------------------------------------
def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}") from exc
    except OSError as exc:
        raise ProfileError(f"{path}: {exc.strerror or exc}") from exc
    return parse_profile(data)


def write_profile(path: str | Path, profile: Profile, comment: str = "") -> None:
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    Path(path).write_text(header + yaml.safe_dump(profile.to_dict(), sort_keys=False, default_flow_style=None, width=120))


def parse_profile(data: Any) -> Profile:
    """Validate a parsed profile; every error names its field path."""
    top = _fields(data, "", required={"version", "host", "device", "model", "prefill", "decode", "head",
                                      "stage_overhead_s"}, optional={"links"})
    if top["version"] != PROFILE_VERSION:
        raise ProfileError(f"version: expected {PROFILE_VERSION}, got {top['version']!r}")
    host = _text(top["host"], "host")
    d = _fields(top["device"], "device", required={"kind", "name", "dtype", "threads", "memory_gib"})
    if d["kind"] not in ("cpu", "cuda"):
        raise ProfileError(f"device.kind: expected cpu or cuda, got {d['kind']!r}")
    if d["dtype"] not in DTYPE_BYTES:
        raise ProfileError(f"device.dtype: expected one of {', '.join(DTYPE_BYTES)}, got {d['dtype']!r}")
    device = DeviceInfo(d["kind"], _text(d["name"], "device.name"), d["dtype"], _int(d["threads"], "device.threads"),
                        _num(d["memory_gib"], "device.memory_gib"))
    m = _fields(top["model"], "model", required={"name", *MODEL_FIELDS})
    model = ModelShape(_text(m["name"], "model.name"), *(_int(m[f], f"model.{f}") for f in MODEL_FIELDS))
    prefill = tuple(PrefillPoint(_int(e["prompt_len"], f"{w}.prompt_len"), _num(e["layer_s_per_token"], f"{w}.layer_s_per_token"))
                    for w, e in _entries(top["prefill"], "prefill", {"prompt_len", "layer_s_per_token"}))
    decode = tuple(DecodePoint(_int(e["batch"], f"{w}.batch"), _int(e["context"], f"{w}.context"), _num(e["layer_s"], f"{w}.layer_s"))
                   for w, e in _entries(top["decode"], "decode", {"batch", "context", "layer_s"}))
    head = tuple(HeadPoint(_int(e["rows"], f"{w}.rows"), _num(e["s"], f"{w}.s"))
                 for w, e in _entries(top["head"], "head", {"rows", "s"}))
    _distinct([p.prompt_len for p in prefill], "prefill", "prompt_len")
    _distinct([(p.batch, p.context) for p in decode], "decode", "(batch, context)")
    _distinct([p.rows for p in head], "head", "rows")
    batches, contexts = {p.batch for p in decode}, {p.context for p in decode}
    if len(decode) != len(batches) * len(contexts):
        raise ProfileError(f"decode: expected every batch ({sorted(batches)}) at every context ({sorted(contexts)}), "
                           f"got {len(decode)} points")
    links = tuple(LinkFigure(_text(e["peer"], f"{w}.peer"), _text(e["address"], f"{w}.address"), _num(e["gbps"], f"{w}.gbps"),
                             _num(e["latency_ms"], f"{w}.latency_ms", strict=False))
                  for w, e in _entries(top.get("links", []), "links", {"peer", "address", "gbps", "latency_ms"}, allow_empty=True))
    return Profile(host, device, model, prefill, decode, head, _num(top["stage_overhead_s"], "stage_overhead_s", strict=False), links)


def _fields(value: Any, where: str, required: set[str], optional: set[str] = frozenset()) -> dict:
    if not isinstance(value, dict):
        raise ProfileError(f"{where or '<top level>'}: expected a mapping")
    prefix = f"{where}." if where else ""
    for key in value:
        if key not in required | optional:
            raise ProfileError(f"{prefix}{key}: unknown field (expected one of {', '.join(sorted(required | optional))})")
    for key in sorted(required):
        if key not in value:
            raise ProfileError(f"{prefix}{key}: missing")
    return value


def _entries(value: Any, where: str, keys: set[str], allow_empty: bool = False) -> list[tuple[str, dict]]:
    if not isinstance(value, list) or (not value and not allow_empty):
        raise ProfileError(f"{where}: expected a non-empty list" if not allow_empty else f"{where}: expected a list")
    return [(f"{where}[{i}]", _fields(e, f"{where}[{i}]", keys)) for i, e in enumerate(value)]


def _distinct(values: list, where: str, what: str) -> None:
    seen = set()
    for i, v in enumerate(values):
        if v in seen:
            raise ProfileError(f"{where}[{i}]: {what} {v} measured twice")
        seen.add(v)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ProfileError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ProfileError(f"{where}: expected a positive integer, got {value!r}")
    return value


def _num(value: Any, where: str, strict: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProfileError(f"{where}: expected a number, got {value!r}")
    if value < 0 or (strict and value == 0):
        raise ProfileError(f"{where}: expected a {'positive' if strict else 'non-negative'} number, got {value!r}")
    return float(value)
