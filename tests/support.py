"""Shared test helpers: tiny checkpoints, deployment files on free loopback ports, the Hugging Face oracle."""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

from hexgen_zmq.wire.sockets import free_port

# Small enough for 2 cores, varied enough (initializer_range 0.1) that greedy outputs differ and hit EOS.
TINY = dict(num_layers=6, hidden_size=128, num_heads=8, num_kv_heads=4, intermediate_size=344, max_positions=512)


def deployment_dict(model_path: str | Path, pipelines: list[list[tuple[int, int, int]]], **broker) -> dict:
    """pipelines: for each pipeline, its stages as (first layer, end layer, TP degree)."""
    spec = {
        "model": {"path": str(model_path), "dtype": "float32"},
        "broker": {"clients": f"tcp://127.0.0.1:{free_port()}", "results": f"tcp://127.0.0.1:{free_port()}", **broker},
        "pipelines": [],
    }
    for p, stages in enumerate(pipelines):
        spec["pipelines"].append({
            "id": f"p{p}",
            "stages": [
                {
                    "id": f"p{p}s{s}",
                    "layers": [start, end],
                    "inbound": f"tcp://127.0.0.1:{free_port()}",
                    "tp_init": f"tcp://127.0.0.1:{free_port()}",
                    "ranks": [{"host": "127.0.0.1", "device": "cpu"} for _ in range(tp)],
                }
                for s, (start, end, tp) in enumerate(stages)
            ],
        })
    return spec


def write_deployment(directory: Path, model_path: str | Path, pipelines, name: str = "deployment.yaml",
                     edit=None, **broker) -> Path:
    """Write a deployment file; `edit(spec)` may change the parsed mapping first."""
    spec = deployment_dict(model_path, pipelines, **broker)
    if edit is not None:
        edit(spec)
    path = Path(directory) / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@functools.lru_cache(maxsize=4)
def hf_model(model_path: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def hf_greedy(model_path: str | Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The oracle: Hugging Face generate on the whole model in one process, one request, greedy."""
    import torch

    model = hf_model(str(model_path))
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def local_deployment(directory: Path, model_path, pipelines, edit=None, env=None, **broker):
    """A deployment written to `directory`, to run as `with local_deployment(...) as local:` (starts on
    entry, stops on exit, whatever happens in between). `env`: extra environment of every process."""
    from hexgen_zmq.operations.launcher import LocalDeployment

    path = write_deployment(directory, model_path, pipelines, edit=edit, **broker)
    return LocalDeployment(path, log_dir=Path(directory) / "logs", threads=1, start_timeout_s=240.0, env=env)


async def wait_for(predicate, timeout_s: float = 20.0, interval_s: float = 0.1):
    """Poll an async predicate until it returns a truthy value; fail after `timeout_s`."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s (last value {value!r})")
        await asyncio.sleep(interval_s)
