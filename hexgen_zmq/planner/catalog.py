"""The built-in GPU catalog: datasheet memory, dense fp16 tensor throughput and memory bandwidth.

Values are vendor datasheet figures without structured sparsity. The fp16 tensor figure is the one with
fp32 accumulation, as served models run (PyTorch's fp16 GEMMs and flash attention accumulate in fp32). Data-
centre and workstation cards run that at full rate; GeForce cards at half their fp16-accumulate figure
(NVIDIA GA102 and AD102 whitepapers: RTX 3090 71 vs 142, RTX 3090 Ti 80 vs 160, RTX 4090 165 vs 330).
A cluster file may override any entry or add new ones under its `gpus:` key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hexgen_zmq.planner.profile import Profile


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """One GPU model: memory in GiB, dense fp16 tensor TFLOPS, HBM/GDDR bandwidth in GB/s. A device kind
    measured by `hexgen-zmq profile` (a CPU, or a GPU timed rather than read off its datasheet) carries its
    profile, and the cost model then uses the measured figures; `kind` names the device in the deployment
    file (`cuda:N` or `cpu`)."""

    name: str
    memory_gib: float
    fp16_tflops: float
    hbm_gbps: float
    kind: str = "cuda"
    profile: Profile | None = None

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 1024**3)

    @property
    def flops(self) -> float:
        return self.fp16_tflops * 1e12

    @property
    def bandwidth(self) -> float:
        """Bytes per second."""
        return self.hbm_gbps * 1e9


def _spec(name: str, memory_gib: float, fp16_tflops: float, hbm_gbps: float) -> tuple[str, GpuSpec]:
    return name, GpuSpec(name, memory_gib, fp16_tflops, hbm_gbps)


CATALOG: dict[str, GpuSpec] = dict(
    [
        _spec("A100-40GB", 40, 312.0, 1555),  # SXM4
        _spec("A100-40GB-PCIe", 40, 312.0, 1555),
        _spec("A100-80GB", 80, 312.0, 2039),  # SXM4
        _spec("A100-80GB-PCIe", 80, 312.0, 1935),
        _spec("H100", 80, 989.4, 3350),  # SXM5
        _spec("H100-PCIe", 80, 756.0, 2000),
        _spec("H200", 141, 989.4, 4800),
        _spec("L40S", 48, 362.1, 864),
        _spec("A40", 48, 149.7, 696),
        _spec("A6000", 48, 154.8, 768),
        _spec("A5000", 24, 111.1, 768),
        _spec("A4000", 16, 76.7, 448),
        _spec("RTX3090", 24, 71.0, 936),
        _spec("RTX3090Ti", 24, 80.0, 1008),
        _spec("RTX4090", 24, 165.2, 1008),
        _spec("T4", 16, 65.0, 320),
        _spec("V100", 32, 125.0, 900),  # SXM2 32 GB
        _spec("V100-16GB", 16, 125.0, 900),
    ]
)
