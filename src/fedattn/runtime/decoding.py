"""Choosing the next token: greedy by default, or seeded sampling."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from fedattn.errors import FedAttnError
from fedattn.runtime.seeding import seeded_generator


@dataclass(frozen=True)
class Decoding:
    """temperature 0 is greedy; otherwise sample with optional top-k / top-p, seeded per party."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < math.inf:  # NaN fails too
            raise FedAttnError(f"the temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise FedAttnError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise FedAttnError(f"top-k must be >= 1, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, party: int) -> torch.Generator | None:
        return None if self.greedy else seeded_generator(self.seed, "decode", party)

    def pick(self, logits: torch.Tensor, generator: torch.Generator | None) -> int:
        """The next token id from one vector of logits."""
        if self.greedy:
            return int(torch.argmax(logits))
        scores = logits.float() / self.temperature
        if self.top_k is not None:
            kth = torch.topk(scores, min(self.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None:
            ordered, order = torch.sort(scores, descending=True)
            cumulative = torch.softmax(ordered, dim=-1).cumsum(-1)
            drop = cumulative - torch.softmax(ordered, dim=-1) >= self.top_p
            scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))


STOP_TEXT_WINDOW = 16  # tokens decoded to look for a stop text; it must end in the newest token


@dataclass(frozen=True)
class StopRule:
    """When a party stops decoding: an end-of-sequence token, or a stop text in what it wrote
    (a few-shot prompt's next "Question:", say), so answers do not run on into new items."""

    token_ids: frozenset[int] = frozenset()
    texts: tuple[str, ...] = ()
    decode: Callable[[list[int]], str] | None = None

    def __call__(self, tokens: list[int]) -> bool:
        if tokens and tokens[-1] in self.token_ids:
            return True
        if not self.texts or self.decode is None:
            return False
        tail = self.decode(tokens[-STOP_TEXT_WINDOW:])
        return any(text in tail for text in self.texts)

    def trim(self, text: str) -> str:
        """``text`` cut before the first stop text."""
        cut = min((text.find(stop) for stop in self.texts if stop in text), default=len(text))
        return text[:cut]


def stop_rule(tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module, texts: tuple[str, ...] = ()) -> StopRule:
    """Stop at the tokenizer's EOS, any EOS the generation config names, or one of ``texts``."""
    ids = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    for value in (tokenizer.eos_token_id, configured):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return StopRule(frozenset(ids), texts, tokenizer.decode if texts else None)


def answer_text(stop: StopRule, tokenizer: PreTrainedTokenizerBase, token_ids: list[int]) -> str:
    """An answer's text as reported: special tokens dropped, cut before any stop text, stripped."""
    return stop.trim(tokenizer.decode(token_ids, skip_special_tokens=True)).strip()
