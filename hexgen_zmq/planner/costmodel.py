"""The cost model: time of a stage per phase, TP all-reduces, pipeline hops, and memory per GPU.

Compute is a roofline: a layer takes the longer of its FLOPs at the GPU's tensor peak and its bytes read
(weights, KV cache) at its memory bandwidth, each scaled by an efficiency factor, plus a fixed overhead.
A step may mix decode tokens with a chunk of a prompt (the runtime's chunked prefill): the weights are read
once for all of them, so a chunk that rides along a memory-bound decode step costs only its extra FLOPs.
TP adds two ring all-reduces per layer over the intra-host link (TP groups never leave a host). A
pipeline hop moves the activations of a micro-batch over the link between the two stages' hosts.
All constants come from `constants`. A device with a profile (`profile`: measured by `hexgen-zmq profile`)
uses its measured per-layer, head and per-step figures in place of the roofline and the fixed overheads: as
measured on the profiled model and dtype, else as effective FLOP/s and bytes/s in the same roofline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from hexgen_zmq.planner import constants as C
from hexgen_zmq.planner.catalog import GpuSpec
from hexgen_zmq.planner.cluster import Cluster, Link
from hexgen_zmq.planner.model import ModelSpec


@dataclass(frozen=True, slots=True)
class Workload:
    """Requests to serve: lengths in tokens, Poisson arrival rate (1/s), latency deadline (s). Without
    `batching`, each pipeline serves one request at a time (HexGen's runtime), and max_batch must be 1."""

    prompt_len: int
    output_len: int
    rate: float
    slo: float
    dtype: str = "float16"
    max_batch: int = C.DEFAULT_MAX_BATCH
    batching: bool = True

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError("prompt and output lengths must be at least 1 token")
        if self.rate <= 0 or self.slo <= 0 or self.max_batch < 1:
            raise ValueError("rate, slo and max_batch must be positive")
        if not self.batching and self.max_batch != 1:
            raise ValueError("one request at a time (no batching) plans with max_batch 1")
        if self.dtype not in C.DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {', '.join(C.DTYPE_BYTES)}")

    @property
    def dtype_bytes(self) -> int:
        return C.DTYPE_BYTES[self.dtype]

    @property
    def mean_context(self) -> float:
        """Mean number of cached tokens a decode step attends to."""
        return self.prompt_len + self.output_len / 2


class CostModel:
    """Times and memory for one (cluster, model, workload); results are cached per GPU type and TP."""

    def __init__(self, cluster: Cluster, model: ModelSpec, workload: Workload):
        self.cluster = cluster
        self.model = model
        self.workload = workload
        self.tp_degrees = [tp for tp in (1, 2, 4, 8, 16, 32, 64) if model.valid_tp(tp)]
        self.mixed_layer_time = lru_cache(maxsize=None)(self._mixed_layer_time)
        self.head_time = lru_cache(maxsize=None)(self._head_time)

    # --- time ---------------------------------------------------------------------------------------------
    def _roofline(self, gpu: GpuSpec, flops: float, nbytes: float) -> float:
        if gpu.profile is not None:  # effective rates measured on this device: no datasheet efficiency
            flops_s, bytes_s, _ = gpu.profile.effective()
            return max(flops / flops_s, nbytes / bytes_s)
        return max(flops / (gpu.flops * C.COMPUTE_EFFICIENCY), nbytes / (gpu.bandwidth * C.MEMORY_EFFICIENCY))

    def measured(self, gpu: GpuSpec) -> bool:
        """Whether this device's profile was measured on this very model and dtype (figures used as measured)."""
        return gpu.profile is not None and gpu.profile.matches(self.model, self.workload.dtype)

    def layer_overhead(self, gpu: GpuSpec) -> float:
        return gpu.profile.effective()[2] if gpu.profile is not None else C.LAYER_OVERHEAD_S

    def step_overhead(self, gpu: GpuSpec) -> float:
        return gpu.profile.stage_overhead_s if gpu.profile is not None else C.STAGE_STEP_OVERHEAD_S

    def allreduce(self, tp: int, nbytes: float, link: Link) -> float:
        """One ring all-reduce of `nbytes` over `tp` ranks: 2(tp-1) steps of nbytes/tp each."""
        if tp == 1:
            return 0.0
        return 2 * (tp - 1) * (link.latency + nbytes / tp / link.bandwidth)

    def layer_time(self, gpu: GpuSpec, tp: int, tokens: int, decode: bool) -> float:
        """One decoder layer on one TP rank: `tokens` query tokens of a decode batch or of one prompt."""
        return self.mixed_layer_time(gpu, tp, tokens, 0) if decode else self.mixed_layer_time(gpu, tp, 0, tokens)

    def _mixed_layer_time(self, gpu: GpuSpec, tp: int, decode_tokens: int, prompt_tokens: int) -> float:
        """One decoder layer on one TP rank for one step: `decode_tokens` requests decoding one token each
        (attending to the mean context) and `prompt_tokens` positions of prompts (causal: a prompt position
        attends on average to half the prompt). The weights are read once for the whole step."""
        m, w = self.model, self.workload
        b = w.dtype_bytes
        tokens = decode_tokens + prompt_tokens
        reduce = 2 * self.allreduce(tp, tokens * m.hidden_size * b, self.cluster.intra_host)
        if self.measured(gpu):  # measured at TP 1: compute splits evenly over the ranks (an assumption)
            return gpu.profile.layer_time(decode_tokens, w.mean_context, prompt_tokens) / tp + reduce
        kv = m.kv_elements_per_token_layer(tp) * b
        flops = (
            decode_tokens * (m.layer_matmul_flops_per_token() + m.attention_flops_per_token(w.mean_context))
            + prompt_tokens * (m.layer_matmul_flops_per_token() + m.attention_flops_per_token((w.prompt_len + 1) / 2))
        ) / tp
        kv_bytes = decode_tokens * w.mean_context * kv + 2 * prompt_tokens * kv  # prompt KV: written, read once
        nbytes = m.layer_params * b / tp + kv_bytes + 4 * tokens * m.hidden_size * b
        return self._roofline(gpu, flops, nbytes) + self.layer_overhead(gpu) + reduce

    def _head_time(self, gpu: GpuSpec, tp: int, tokens: int) -> float:
        """Final norm and LM head for `tokens` positions (only positions that sample are computed)."""
        m, b = self.model, self.workload.dtype_bytes
        split = tp if C.LM_HEAD_SHARDED else 1
        if self.measured(gpu):
            return gpu.profile.head_time(tokens) / split
        flops = 2 * tokens * m.vocab_size * m.hidden_size / split
        return self._roofline(gpu, flops, m.head_params * b / split) + self.layer_overhead(gpu)

    def stage_time(self, gpu: GpuSpec, tp: int, layers: int, last: bool, tokens: int, decode: bool) -> float:
        """One step of a stage: its layers, the head if last, and the per-step message overhead."""
        if decode:
            return self.mixed_stage_time(gpu, tp, layers, last, tokens, 0)
        return self.mixed_stage_time(gpu, tp, layers, last, 0, tokens)

    def mixed_stage_time(
        self, gpu: GpuSpec, tp: int, layers: int, last: bool, decode_tokens: int, prompt_tokens: int
    ) -> float:
        """One step of a stage over `decode_tokens` decode tokens plus a `prompt_tokens` chunk of one prompt
        (the head samples every decode token and, at most, the prompt's last position)."""
        t = layers * self.mixed_layer_time(gpu, tp, decode_tokens, prompt_tokens) + self.step_overhead(gpu)
        if last:
            t += self.head_time(gpu, tp, decode_tokens + (1 if prompt_tokens else 0))
        return t

    def hop(self, host_a: int, host_b: int, tokens: int) -> float:
        """Activations of `tokens` positions from a stage on host_a to the next one on host_b."""
        nbytes = tokens * self.model.hidden_size * self.workload.dtype_bytes
        return self.cluster.link(host_a, host_b).transfer(nbytes)

    def loopback(self, host_last: int, host_first: int, batch: int, stages: int) -> float:
        """Sampled token ids from the last stage back to the first (in-process for one stage)."""
        if stages == 1:
            return 0.0
        return self.cluster.link(host_last, host_first).transfer(batch * C.TOKEN_ID_BYTES)

    # --- memory ---------------------------------------------------------------------------------------------
    def layer_bytes(self, tp: int, batch: int | None = None) -> float:
        """Per-rank memory of one layer: weight shard plus the KV cache of `batch` requests (default: the
        planned batch)."""
        m, w = self.model, self.workload
        kv = (batch or w.max_batch) * (w.prompt_len + w.output_len) * m.kv_elements_per_token_layer(tp)
        return (m.layer_params / tp + kv) * w.dtype_bytes

    def fixed_bytes(self, tp: int, first: bool, last: bool, batch: int | None = None) -> float:
        """Per-rank memory that does not grow with layers: workspace, activations, embeddings, head."""
        m, w = self.model, self.workload
        b = w.dtype_bytes
        total = C.WORKSPACE_BYTES + w.prompt_len * m.hidden_size * C.ACTIVATION_HIDDEN_MULTIPLE * b
        if first:
            total += m.embedding_params * b
        if last:
            total += m.head_params * b / (tp if C.LM_HEAD_SHARDED else 1)
            total += (batch or w.max_batch) * m.vocab_size * 4  # float32 logits of one step
        return total

    def stage_memory(
        self, gpu: GpuSpec, tp: int, layers: int, first: bool, last: bool, batch: int | None = None
    ) -> float:
        """Bytes one rank of this stage needs with `batch` requests in flight (default: the planned batch)."""
        return self.fixed_bytes(tp, first, last, batch) + layers * self.layer_bytes(tp, batch)

    def usable_bytes(self, gpu: GpuSpec) -> float:
        return gpu.memory_bytes * C.MEMORY_UTILISATION

    def max_layers(self, gpu: GpuSpec, tp: int, first: bool, last: bool) -> int:
        """The most layers a stage of `tp` GPUs of this type can hold (0: not even one)."""
        free = self.usable_bytes(gpu) - self.fixed_bytes(tp, first, last)
        if free <= 0:
            return 0
        return min(self.model.num_hidden_layers, math.floor(free / self.layer_bytes(tp)))
