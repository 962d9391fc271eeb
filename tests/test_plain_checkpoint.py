"""What the outside check does: a bare `save_pretrained` Llama checkpoint (no tokenizer), a deployment file
written by hand to the contract, `hexgen-zmq up`, and `Client.generate` against Hugging Face greedy."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from hexgen_zmq.serving.client import Client, GenerationError
from tests.support import hf_greedy, local_deployment


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=5,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.1, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("bare")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def deployment(bare_model, tmp_path_factory):
    with local_deployment(tmp_path_factory.mktemp("bare-run"), bare_model, [[(0, 3, 2), (3, 5, 1)], [(0, 1, 1), (1, 5, 4)]]) as local:
        yield local


async def test_bare_checkpoint_equals_hf(deployment, bare_model):
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 1000) for _ in range(n)] for n in (1, 5, 17, 40, 8, 3)]
    async with Client.connect(deployment.address) as client:
        results = await asyncio.wait_for(
            asyncio.gather(*(client.generate(prompt_ids=p, max_new_tokens=30) for p in prompts)), 120)
        with pytest.raises(GenerationError, match="no tokenizer"):
            await asyncio.wait_for(client.generate(prompt="text needs a tokenizer"), 30)
    for prompt, result in zip(prompts, results):
        assert result.token_ids == hf_greedy(bare_model, prompt, 30)
        assert result.text is None
