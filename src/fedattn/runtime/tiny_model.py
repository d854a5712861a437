"""Seeded random-weight Qwen2-style models with a byte-level tokenizer, and a Gemma 3-style one with its own.

They exist so that tests and quick trials exercise the same code paths as a real model (chat
template, special tokens, grouped-query attention, rotary positions; for Gemma 3 sliding-window
blocks and a BOS token) in milliseconds, with nothing downloaded. Weights are a pure function of the seed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
GEMMA_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>")  # ids 0, 1, 2 as in Gemma 3's tokenizer
# In GPT-2's byte alphabet a space is "Ġ". " a" ranks after "an", so " and" splits as "Ġ" + "and".
GEMMA_MERGES = (("t", "h"), ("th", "e"), ("Ġ", "the"), ("i", "n"), ("in", "g"), ("a", "n"), ("an", "d"), ("Ġ", "a"))

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
    gemma: bool = False  # Gemma 3's architecture and the BPE tokenizer of build_tiny_gemma_tokenizer


# tiny-random is FedAttn's test model; the Qwen2-style others share its tokenizer (SpecFed's ensembles and
# drafts); tiny-random-gemma is another family, with its own tokenizer (FedRefine's sharers)
TINY_MODELS = {
    "tiny-random": TinyShape(),
    "tiny-random-wide": TinyShape(seed=1, blocks=4, hidden=96, padding_rows=13),
    "tiny-random-draft": TinyShape(seed=2, blocks=2, hidden=32),
    "tiny-random-renumbered": TinyShape(seed=3, blocks=2, hidden=32, renumbered_tokenizer=True),
    "tiny-random-gemma": TinyShape(seed=4, blocks=3, hidden=48, gemma=True),
}


def build_tiny_gemma_tokenizer() -> PreTrainedTokenizerFast:
    """Gemma 3's special tokens first (<pad> 0, <eos> 1, <bos> 2), then the byte alphabet, then one token
    per merge of ``GEMMA_MERGES``; it prepends <bos> as Gemma's does. No chat template: a base model."""
    vocab = {token: index for index, token in enumerate(GEMMA_SPECIAL_TOKENS)}
    for symbol in [*sorted(pre_tokenizers.ByteLevel.alphabet()), *(left + right for left, right in GEMMA_MERGES)]:
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(GEMMA_MERGES)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B:1", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tiny_tokenizer(shape: TinyShape) -> PreTrainedTokenizerFast:
    """The tokenizer of a tiny model of this shape."""
    return build_tiny_gemma_tokenizer() if shape.gemma else build_tiny_tokenizer(shape.renumbered_tokenizer)


_GLOBAL_GENERATOR = threading.Lock()  # the weights are drawn from torch's global generator, seeded for the draw


def build_tiny_model(shape: TinyShape = TinyShape()) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A tiny model and its tokenizer (``tiny-random``: 8 blocks, d = 64, 4 heads, 2 KV heads); same
    shape, same weights."""
    tokenizer = tiny_tokenizer(shape)
    model_class, config = (_gemma_config if shape.gemma else _qwen2_config)(shape, tokenizer)
    with _GLOBAL_GENERATOR:  # threads building at once would draw from each other's seeds
        generator_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(shape.seed)
            model = model_class(config)
        finally:
            torch.random.set_rng_state(generator_state)
    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _shared_config(shape: TinyShape, tokenizer: PreTrainedTokenizerFast) -> dict:
    """What every tiny model's config sets alike; the 0.1 initializer gives logits far from uniform."""
    return {
        "vocab_size": len(tokenizer) + shape.padding_rows,
        "hidden_size": shape.hidden,
        "intermediate_size": 2 * shape.hidden,
        "num_hidden_layers": shape.blocks,
        "max_position_embeddings": 4096,
        "initializer_range": 0.1,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _qwen2_config(shape: TinyShape, tokenizer: PreTrainedTokenizerFast) -> tuple[type, Qwen2Config]:
    return Qwen2ForCausalLM, Qwen2Config(
        **_shared_config(shape, tokenizer),
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        bos_token_id=None,
    )


def _gemma_config(shape: TinyShape, tokenizer: PreTrainedTokenizerFast) -> tuple[type, Gemma3TextConfig]:
    """Gemma 3 270M in miniature: 2 heads / 1 KV head, tied embeddings, a sliding window of 4 in every
    block but the last (the real model: 512, every 6th block global)."""
    return Gemma3ForCausalLM, Gemma3TextConfig(
        **_shared_config(shape, tokenizer),
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=shape.hidden // 2,
        query_pre_attn_scalar=shape.hidden // 2,
        sliding_window=4,
        layer_types=["sliding_attention"] * (shape.blocks - 1) + ["full_attention"],
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
    )
