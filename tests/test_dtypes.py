"""Half-precision deployments: bfloat16 activations cross stage boundaries and TP all-reduces on the wire
as raw bytes; greedy output equals Hugging Face generate run in the same dtype.

Requests go one at a time: in bfloat16 a token's logits depend in their last bits on what else shares its
matmuls, so batched half-precision output may part from a one-request oracle at near-ties (the float32
oracle holds under any batching)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from hexgen_zmq.serving.client import Client
from tests.support import local_deployment


@pytest.fixture(scope="module")
def deployment(tiny_model, tmp_path_factory):
    with local_deployment(tmp_path_factory.mktemp("bf16"), tiny_model, [[(0, 2, 1), (2, 6, 2)]],
                          edit=lambda spec: spec["model"].update(dtype="bfloat16")) as local:
        yield local


def hf_bf16_greedy(model_path: str, prompt: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


async def test_bfloat16_pipeline_with_tp_equals_hf_in_bfloat16(deployment, tiny_model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [100, 200, 300], [42] * 20]
    async with Client.connect(deployment.address) as client:
        for prompt in prompts:
            result = await asyncio.wait_for(client.generate(prompt_ids=prompt, max_new_tokens=12), 60)
            assert result.token_ids == hf_bf16_greedy(tiny_model, prompt, 12)


async def test_bfloat16_under_batching_stays_close_to_its_oracle(deployment, tiny_model):
    """Sixteen requests at once share micro-batches: each answer agrees with Hugging Face bfloat16 run on it
    alone, and with the float32 oracle, for most of its length (near-ties may part them: see the module)."""
    from tests.support import hf_greedy

    prompts = [[3 + i, 50 + 7 * i, 9, 200 - i, 17 * i % 250 + 3] for i in range(16)]
    async with Client.connect(deployment.address) as client:
        results = await asyncio.wait_for(asyncio.gather(
            *(client.generate(prompt_ids=p, max_new_tokens=10) for p in prompts)), 120)

    def before_first_difference(got: list[int], want: list[int]) -> float:
        if got == want:
            return 1.0
        return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want))) / len(want)

    for oracle in (lambda p: hf_bf16_greedy(tiny_model, p, 10), lambda p: hf_greedy(tiny_model, p, 10)):
        shares = [before_first_difference(r.token_ids, oracle(p)) for r, p in zip(results, prompts)]
        assert sum(shares) / len(shares) >= 0.8, shares
