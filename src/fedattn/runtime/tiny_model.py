"""A seeded random-weight Qwen2-style model with a byte-level tokenizer.

It exists so that tests and quick trials exercise the same code paths as a real model (chat
template, special tokens, grouped-query attention, rotary positions) in milliseconds, with nothing
downloaded. Weights are a pure function of the seed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tiny_tokenizer(renumbered: bool = False) -> PreTrainedTokenizerFast:
    """One token per byte (GPT-2's byte-to-unicode alphabet) plus Qwen's three special tokens;
    ``renumbered``: the bytes' ids in reverse order (as many tokens, other meanings)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), reverse=renumbered)
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@dataclass(frozen=True)
class TinyShape:
    """A tiny model's seed and sizes; ``padding_rows`` embedding rows beyond the tokenizer's tokens,
    as real checkpoints have (Qwen2.5: 151,936 rows for 151,665 tokens)."""

    seed: int = 0
    blocks: int = 8
    hidden: int = 64
    padding_rows: int = 0
    renumbered_tokenizer: bool = False  # a tokenizer of as many tokens that numbers them otherwise


# tiny-random is FedAttn's test model; the others share its tokenizer (SpecFed's ensembles and drafts)
TINY_MODELS = {
    "tiny-random": TinyShape(),
    "tiny-random-wide": TinyShape(seed=1, blocks=4, hidden=96, padding_rows=13),
    "tiny-random-draft": TinyShape(seed=2, blocks=2, hidden=32),
    "tiny-random-renumbered": TinyShape(seed=3, blocks=2, hidden=32, renumbered_tokenizer=True),
}


_GLOBAL_GENERATOR = threading.Lock()  # the weights are drawn from torch's global generator, seeded for the draw


def build_tiny_model(shape: TinyShape = TinyShape()) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """A tiny model and its tokenizer (``tiny-random``: 8 blocks, d = 64, 4 heads, 2 KV heads); same
    shape, same weights."""
    tokenizer = build_tiny_tokenizer(shape.renumbered_tokenizer)
    config = Qwen2Config(
        vocab_size=len(tokenizer) + shape.padding_rows,
        hidden_size=shape.hidden,
        intermediate_size=2 * shape.hidden,
        num_hidden_layers=shape.blocks,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.1,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    with _GLOBAL_GENERATOR:  # threads building at once would draw from each other's seeds
        generator_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(shape.seed)
            model = Qwen2ForCausalLM(config)
        finally:
            torch.random.set_rng_state(generator_state)
    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
