"""A small random Llama checkpoint (safetensors, config, tokenizer with a chat template), for the test suite
and for trying a deployment without real weights.

Weights are drawn with initializer_range 0.1 rather than the default 0.02: at 0.02 a random model repeats one
token forever, which would hide bugs from greedy-equality tests; at 0.1 outputs vary and sometimes hit EOS.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = """\
HexGen serves large language models across heterogeneous GPUs in several datacenters.
A pipeline is cut into stages of consecutive decoder layers; every stage has its own tensor parallel degree.
The broker dispatches each request to a pipeline and streams tokens back to the client as they come.
What is the capital of France? The capital of France is Paris. Tell me a short story about a fox.
The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] { } , . ; : ! ?
"""

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on a small built-in corpus (nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS.splitlines() * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(
    out_dir: str | Path,
    *,
    num_layers: int = 8,
    hidden_size: int = 256,
    num_heads: int = 8,
    num_kv_heads: int = 4,
    intermediate_size: int = 688,
    vocab_size: int = 512,
    max_positions: int = 1024,
    initializer_range: float = 0.1,
    tie_word_embeddings: bool = False,
    max_shard_size: str | None = None,
    seed: int = 0,
) -> Path:
    """Write a random Llama checkpoint with a tokenizer to `out_dir` and return the path."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        initializer_range=initializer_range,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **save_kwargs)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id
    ).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
