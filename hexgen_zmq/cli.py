"""The `hexgen-zmq` command: one subcommand per module, each registering its own parser.

Subcommand modules import torch (or anything heavy) only inside their run functions, so `--help` and the
planner stay fast and torch-free.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that define `register(subparsers)`; each parser sets `func(args) -> int`.
COMMAND_MODULES = [
    "hexgen_zmq.operations.commands",
    "hexgen_zmq.planner.cli",
    "hexgen_zmq.model.fetch",
    "hexgen_zmq.operations.demo",
    "hexgen_zmq.serving.bench",
    "hexgen_zmq.operations.profiler",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hexgen-zmq",
        description="Serve LLMs over heterogeneous GPUs: asymmetric tensor + pipeline parallel stages linked by "
                    "ZeroMQ, a broker in front, and the HexGen planner.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from hexgen_zmq.operations.parent_death import follow_parent

    follow_parent()  # a process that `up` started ends with it
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
