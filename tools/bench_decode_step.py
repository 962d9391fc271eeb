"""One stage's decode step on this CPU with the fast paths of `hexgen_zmq.model.kernels` (C decode attention, C
RMSNorm, silu * up and rotary embedding, oneDNN-packed linear layers) and with plain torch ops, side by side.

Builds the embedded tiny model (8 layers x 256) in a temporary directory, loads all its layers as one stage
twice (once with `HEXGEN_ZMQ_KERNELS=0`), on one thread, prefills a batch of requests and times decode steps
of the whole batch, alternating the two so that both see the same machine. Prints ms per step, tokens/s and
the ratio.

    python tools/bench_decode_step.py [--batch 16] [--prompt 64] [--steps 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from hexgen_zmq.model import kernels
from hexgen_zmq.model.checkpoint import ShardPlan
from hexgen_zmq.wire.messages import MicroBatch, NewRequest, SamplingParams, Segment
from hexgen_zmq.model.info import read_model_info
from hexgen_zmq.model.runner import StageModel
from hexgen_zmq.stage.worker import StageWorker
from hexgen_zmq.model.tiny import make_tiny_model


def decode_times(worker: StageWorker, batch: int, prompt: int, steps: int, first_id: int) -> list[float]:
    """Prefill `batch` requests, then time `steps` decode steps of all of them (seconds each)."""
    vocab = worker.model.info.vocab_size
    ids = list(range(first_id, first_id + batch))
    params = SamplingParams(max_new_tokens=steps + 1, ignore_eos=True)
    new = [NewRequest(i, prompt + steps + 1, params, []) for i in ids]
    worker.step(MicroBatch(0, [Segment(i, 0, prompt, True) for i in ids], new, []),
                torch.randint(3, vocab, (batch * prompt,)))
    times = []
    for step in range(steps):
        segments = [Segment(i, prompt + step, 1, True) for i in ids]
        start = time.perf_counter()
        worker.step(MicroBatch(step + 1, segments, [], []), torch.randint(3, vocab, (batch,)))
        times.append(time.perf_counter() - start)
    for i in ids:
        worker.release(i)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    if not kernels.enabled():
        raise SystemExit("the C kernel is not built (or HEXGEN_ZMQ_KERNELS=0): nothing to compare")
    if not kernels.packing_usable(torch.device("cpu"), torch.float32):
        print("(this torch has no oneDNN: linear layers stay unpacked in both)")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model(tmp)
        info = read_model_info(path)
        workers = {}
        for label, switch in (("fast", "1"), ("torch", "0")):
            os.environ["HEXGEN_ZMQ_KERNELS"] = switch
            model = StageModel(info, (0, info.num_layers), first=True, last=True, dtype=torch.float32,
                               device=torch.device("cpu"), shard=ShardPlan.make(info, 0, 1))
            workers[label] = StageWorker(model, 4096, 16)
        results: dict[str, list[float]] = {label: [] for label in workers}
        next_id = 0
        for _ in range(args.rounds):
            for label, worker in workers.items():
                os.environ["HEXGEN_ZMQ_KERNELS"] = "1" if label == "fast" else "0"
                results[label] += decode_times(worker, args.batch, args.prompt, args.steps, next_id)
                next_id += args.batch
        os.environ.pop("HEXGEN_ZMQ_KERNELS")
    print(f"decode step, {info.num_layers} layers x {info.hidden_size}, batch {args.batch}, context "
          f"{args.prompt}..{args.prompt + args.steps}, 1 thread")
    median = {label: statistics.median(times) for label, times in results.items()}
    for label, seconds in median.items():
        print(f"  {label:6s}: {seconds * 1e3:6.2f} ms/step  {args.batch / seconds:7.0f} tok/s")
    print(f"  fast / torch: {median['torch'] / median['fast']:.2f}x the speed")


if __name__ == "__main__":
    main()
