"""How close a bfloat16 deployment stays to the float32 oracle under batching: token agreement, measured.

Starts the embedded layout (configs/smollm2-local.yaml, or --config) in bfloat16 on free ports, sends
`--requests` chat prompts `--concurrency` at a time (so they share micro-batches), greedy, `--tokens` each
with ignore_eos, and compares every answer with Hugging Face `generate` on the whole model in float32 (the
oracle) and in bfloat16, one request at a time. Prints, for the deployment against each, and for Hugging
Face's bfloat16 against its float32 (how far bfloat16 itself is from the oracle): the share of requests
equal token for token, the mean share of each answer before its first difference, and the share of
positions that agree.
In bfloat16 a row's logits depend in their last bits on what shares its matmuls, so answers part from the
oracle at near-ties and then run on differently: the prefix figure is the one that says how far they agree.

    .venv/bin/python tools/bf16_agreement.py [--requests 32 --concurrency 32 --tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

import torch
import yaml

from hexgen_zmq.operations.launcher import LocalDeployment
from hexgen_zmq.serving.client import Client
from hexgen_zmq.wire.sockets import free_port

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["a fox", "the sea", "a robot", "winter", "a library", "the moon", "a train", "bread", "a garden",
          "music", "a river", "chess", "a bicycle", "rain", "a lighthouse", "coffee"]


def prompts(n: int) -> list[list[dict]]:
    asks = ["Tell me a short story about {}.", "Explain {} to a child.", "Write a poem about {}.",
            "List three facts about {}."]
    return [[{"role": "user", "content": asks[i % len(asks)].format(TOPICS[i % len(TOPICS)])}] for i in range(n)]


def bf16_config(source: Path, out: Path) -> Path:
    """The deployment file with dtype bfloat16, an absolute model path and every address on a free port."""
    spec = yaml.safe_load(source.read_text())
    spec["model"]["path"] = str((source.parent / spec["model"]["path"]).resolve())
    spec["model"]["dtype"] = "bfloat16"
    spec["broker"]["clients"] = f"tcp://127.0.0.1:{free_port()}"
    spec["broker"]["results"] = f"tcp://127.0.0.1:{free_port()}"
    for pipeline in spec["pipelines"]:
        for stage in pipeline["stages"]:
            stage["inbound"] = f"tcp://127.0.0.1:{free_port()}"
            stage["tp_init"] = f"tcp://127.0.0.1:{free_port()}"
    out.write_text(yaml.safe_dump(spec))
    return out


async def served(address: str, chats: list[list[dict]], tokens: int, concurrency: int) -> list[list[int]]:
    gate = asyncio.Semaphore(concurrency)
    async with Client.connect(address) as client:
        async def one(chat):
            async with gate:
                result = await client.generate(messages=chat, max_new_tokens=tokens, ignore_eos=True, timeout_s=600)
                return result.token_ids
        return await asyncio.gather(*(one(chat) for chat in chats))


def oracle(model_path: str, chats: list[list[dict]], tokens: int, dtype: torch.dtype) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    out = []
    with torch.inference_mode():
        for chat in chats:
            ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]
            generated = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                       attention_mask=torch.ones_like(ids), pad_token_id=tokenizer.eos_token_id)
            out.append(generated[0, ids.shape[1]:].tolist())
    return out


def agreement(answers: list[list[int]], reference: list[list[int]]) -> dict[str, float]:
    """Whole answers equal, mean share before the first difference, share of equal positions."""
    prefix, positions = [], []
    for got, want in zip(answers, reference):
        n = min(len(got), len(want))
        first = next((i for i in range(n) if got[i] != want[i]), n)
        prefix.append(first / max(len(want), 1))
        positions.append(sum(a == b for a, b in zip(got, want)) / max(len(want), 1))
    return {"equal": sum(a == b for a, b in zip(answers, reference)) / len(answers),
            "prefix": statistics.fmean(prefix), "positions": statistics.fmean(positions)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs/smollm2-local.yaml")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    chats = prompts(args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        config = bf16_config(args.config, Path(tmp) / "bf16.yaml")
        model_path = yaml.safe_load(config.read_text())["model"]["path"]
        with LocalDeployment(config, log_dir=Path(tmp) / "logs") as local:
            answers = asyncio.run(served(local.address, chats, args.tokens, args.concurrency))
    print(f"bfloat16 deployment ({args.config.name}), {args.requests} chat requests {args.concurrency} at a time, "
          f"{args.tokens} greedy tokens each")
    float32 = oracle(model_path, chats, args.tokens, torch.float32)
    bfloat16 = oracle(model_path, chats, args.tokens, torch.bfloat16)
    for label, got, want in (("this deployment / float32 oracle", answers, float32),
                             ("this deployment / HF bfloat16", answers, bfloat16),
                             ("HF bfloat16 / float32 oracle", bfloat16, float32)):  # bfloat16's own distance
        figures = agreement(got, want)
        print(f"  {label:33s}: equal answers {figures['equal']:6.1%}   before the first difference "
              f"{figures['prefix']:6.1%}   equal positions {figures['positions']:6.1%}")


if __name__ == "__main__":
    main()
