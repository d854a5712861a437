"""The server's drafters: what proposes a round's tokens, and the distribution q it drew them from.

A model draft (``ModelDraft``) samples from its own next-token distribution one token at a time over
its kept cache. Prompt lookup (``LookupDraft``) needs no model: it copies the tokens that followed the
latest earlier occurrence of the sequence's last few tokens (answers often repeat the prompt's
numbers and names), so its q is a point mass and its cost is nothing; where nothing matches it
proposes no draft and the round is one plain ensemble step.
"""

from __future__ import annotations

from typing import Protocol

import torch

from fedattn.runtime.incremental import IncrementalLM
from fedattn.systems.specfed.kernel import distributions, sample

LOOKUP_NGRAMS = (3, 2, 1)  # the suffix lengths prompt lookup tries, longest first


class Drafter(Protocol):
    def propose(
        self, sequence: list[int], count: int, generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor]:
        """Up to ``count`` draft ids after ``sequence`` and the (drafts, vocab) distributions they were
        drawn from (greedy when ``generator`` is None)."""
        ...


class ModelDraft:
    def __init__(self, model: torch.nn.Module, vocab: int, temperature: float) -> None:
        self.lm = IncrementalLM(model)
        self.vocab = vocab
        self.temperature = temperature

    def propose(
        self, sequence: list[int], count: int, generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor]:
        drafts: list[int] = []
        rows = []
        for _ in range(count):
            logits = self.lm.next_token_logits(sequence + drafts, 1)
            q = distributions(logits, self.vocab, self.temperature)[0]
            drafts.append(sample(q, generator))
            rows.append(q)
        return drafts, torch.stack(rows) if rows else torch.empty(0, self.vocab)


class LookupDraft:
    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def propose(
        self, sequence: list[int], count: int, generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor]:
        drafts = lookup(sequence, count)
        q = torch.zeros(len(drafts), self.vocab)
        q[torch.arange(len(drafts)), torch.tensor(drafts, dtype=torch.long)] = 1.0
        return drafts, q


def lookup(sequence: list[int], count: int) -> list[int]:
    """The ``count`` tokens that followed the latest earlier occurrence of the longest suffix of
    ``sequence`` (of LOOKUP_NGRAMS lengths) that occurred before; [] when none did."""
    if count == 0:
        return []
    for size in LOOKUP_NGRAMS:
        if len(sequence) <= size:
            continue
        suffix = sequence[-size:]
        for start in range(len(sequence) - size - 1, -1, -1):
            if sequence[start : start + size] == suffix:
                follow = sequence[start + size : start + size + count]
                return follow
    return []
