"""Every supported model family runs through the stage's own decoder layer (fused q/k/v and gate/up, rotary
of q and k together, Qwen3's head norms, Qwen2's q/k/v biases) and generates what Hugging Face generates.

In process, without sockets: two stages of one pipeline chained by hand, prompts prefilled together and
then decoded together, greedy, float32, against `generate` on the whole model."""

from __future__ import annotations

import pytest
import torch

from hexgen_zmq.model.checkpoint import ShardPlan
from hexgen_zmq.wire.messages import MicroBatch, NewRequest, SamplingParams, Segment
from hexgen_zmq.model.info import read_model_info
from hexgen_zmq.model.runner import StageModel
from hexgen_zmq.stage.worker import StageWorker

SIZES = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, bos_token_id=0,
             eos_token_id=1, pad_token_id=1)


def family_checkpoint(directory, family: str):
    import transformers

    config_cls, model_cls, extra = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True)),
        "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=False)),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(use_sliding_window=False, head_dim=16)),
    }[family]
    config = getattr(transformers, config_cls)(**SIZES, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).to(torch.float32).eval()
    with torch.no_grad():  # biases start at zero: make them matter
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    path = directory / family
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_two_stage_greedy_equals_hf_generate(tmp_path, family):
    path, hf = family_checkpoint(tmp_path, family)
    info = read_model_info(path)
    stages = [StageWorker(StageModel(info, layers, first=first, last=last, dtype=torch.float32,
                                     device=torch.device("cpu"), shard=ShardPlan.make(info, 0, 1)), 64, 16)
              for layers, first, last in (((0, 1), True, False), ((1, 3), False, True))]
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (7, 19, 2)]
    new_tokens = 12
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    new = [NewRequest(i, len(p) + new_tokens, params, [1]) for i, p in enumerate(prompts)]
    segments = [Segment(i, 0, len(p), True) for i, p in enumerate(prompts)]
    inputs = torch.tensor([t for p in prompts for t in p])
    produced: list[list[int]] = [[] for _ in prompts]
    for step in range(new_tokens):
        batch = MicroBatch(step, segments, new if step == 0 else [], [])
        records = stages[1].step(batch, stages[0].step(batch, inputs).hidden).records
        for record in records:
            produced[record.request_id].append(record.token)
        segments = [Segment(i, len(p) + step, 1, True) for i, p in enumerate(prompts)]
        inputs = torch.tensor([r.token for r in records])
    with torch.inference_mode():
        for prompt, tokens in zip(prompts, produced):
            expected = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=1)[0, len(prompt):].tolist()
            assert tokens == expected
    assert len({t for tokens in produced for t in tokens}) > 3  # the checkpoint does not repeat one token
