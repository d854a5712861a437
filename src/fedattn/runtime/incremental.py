"""A causal LM over a sequence that grows and is cut back: speculative decoding's verifier and draft.

Each call names the whole sequence; the KV cache is kept from the previous call and cropped to the
longest prefix the two sequences share, so a round that accepted only some drafts costs one forward
pass over the tokens that changed, never a re-read of the prompt. The model is used as HF ships it
(its own attention and cache): nothing here reaches inside it.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache


class IncrementalLM:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.cached: list[int] = []  # the tokens whose K/V the cache holds, in order
        # transformers renamed the forward's cache argument (past_key_values -> cache) within 5.x
        parameters = inspect.signature(model.forward).parameters
        self._cache_word = "cache" if "cache" in parameters else "past_key_values"

    @torch.inference_mode()
    def next_token_logits(self, sequence: list[int], count: int) -> torch.Tensor:
        """(count, rows) logits: row j predicts the token after ``sequence[: len - count + j + 1]``.

        One forward pass over what the cache does not hold yet; at least the last ``count`` tokens
        are fed, so their logits exist even when the cache already covers them."""
        if not 1 <= count <= len(sequence):
            raise ValueError(f"count must be in 1..{len(sequence)}, got {count}")
        keep = min(_shared_prefix(self.cached, sequence), len(sequence) - count)
        if keep < len(self.cached):
            self.cache.crop(keep - len(self.cached))  # a negative count removes that many (every transformers 5.x)
        fresh = sequence[keep:]
        device = next(self.model.parameters()).device
        arguments = {"input_ids": torch.tensor([fresh], device=device), "use_cache": True, self._cache_word: self.cache}
        output = self.model(**arguments)
        self.cached = list(sequence)
        return output.logits[0, -count:].float()


def _shared_prefix(a: list[int], b: list[int]) -> int:
    length = min(len(a), len(b))
    for index in range(length):
        if a[index] != b[index]:
            return index
    return length
