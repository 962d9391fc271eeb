"""The deployment file (DESIGN.md contract) for a placed plan: endpoints and ports assigned per host.

Ports are handed out per host upward from PORT_BASE, so no two endpoints collide: the broker's two sockets
first, on the cluster's first host, then each stage's inbound PULL and TP rendezvous on its leader's host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hexgen_zmq.planner import constants as C
from hexgen_zmq.planner.planning import PlanOutcome


class _Ports:
    def __init__(self) -> None:
        self.next: dict[str, int] = {}

    def endpoint(self, address: str) -> str:
        port = self.next.get(address, C.PORT_BASE)
        self.next[address] = port + 1
        return f"tcp://{address}:{port}"


def _device(kind: str, index: int) -> str:
    """A rank's device: `cuda:N`, or `cpu` for a CPU host's ranks (each a process with its own threads)."""
    return "cpu" if kind == "cpu" else f"{kind}:{index}"


def deployment_dict(outcome: PlanOutcome, model_path: str, dtype: str) -> dict[str, Any]:
    """The deployment file's content."""
    ports = _Ports()
    broker_host = outcome.cluster.hosts[0].address
    broker = {"clients": ports.endpoint(broker_host), "results": ports.endpoint(broker_host)}
    pipelines = []
    for pipeline in outcome.pipelines:
        stages = []
        for st in pipeline.stages:
            address = st.host.address
            stages.append(
                {
                    "id": st.id,
                    "layers": [st.layers[0], st.layers[1]],
                    "inbound": ports.endpoint(address),
                    "tp_init": ports.endpoint(address),
                    "ranks": [{"host": address, "device": _device(st.gpu_kind, d)} for d in st.devices],
                }
            )
        pipelines.append({"id": pipeline.id, "stages": stages})
    return {"model": {"path": model_path, "dtype": dtype}, "broker": broker, "pipelines": pipelines}


def write_deployment(path: str | Path, outcome: PlanOutcome, model_path: str, dtype: str) -> None:
    """Write the deployment YAML, with a comment saying where it came from."""
    data = deployment_dict(outcome, model_path, dtype)
    w = outcome.workload
    header = (
        f"# Written by `hexgen-zmq plan` for {outcome.model.name}: prompt {w.prompt_len}, output {w.output_len}"
        f" tokens, {w.rate:g} req/s, SLO {w.slo:g} s, batch {w.max_batch}.\n"
        f"# {len(outcome.pipelines)} pipelines on {outcome.used_gpus} of {outcome.cluster.total_gpus} GPUs;"
        f" estimated SLO attainment {outcome.attainment:.1%}.\n"
    )
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)
    Path(path).write_text(header + body)
