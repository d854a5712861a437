"""The receiver's answer: its own prefill, each sharer's contribution fused in turn, then decoding.

The prompt's first N - 1 tokens are prefilled by the receiver alone and their cache entries are
replaced by the fused ones; the last prompt token and every generated token run through the
receiver alone over that cache (generated tokens are never fused). Sharers are fused one after
another, each through its own projectors, the second reading what the first produced.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fedattn.runtime.blocks import RowStep, SplitModel
from fedattn.runtime.decoding import Decoding, StopRule
from fedattn.runtime.kv_store import ParticipantKVStore
from fedattn.runtime.prompting import check_prompt_length
from fedattn.systems.fedrefine.alignment import ReceiverPrompt
from fedattn.systems.fedrefine.caches import SharerCache, fuse_into, receiver_prefill
from fedattn.systems.fedrefine.projector import ProjectorSet


@dataclass
class Contribution:
    """One sharer's cache, the receiver positions it fuses, and the projectors of that pair."""

    projectors: ProjectorSet
    cache: SharerCache
    positions: list[int]


@dataclass
class ReceiverAnswer:
    token_ids: list[int]
    seconds: dict[str, float] = field(default_factory=dict)  # prefill_s, fuse_s, decode_s


def answer(
    split: SplitModel,
    prompt: ReceiverPrompt,
    contributions: list[Contribution],
    decoding: Decoding,
    stop: StopRule,
    max_new_tokens: int,
) -> ReceiverAnswer:
    """The receiver's tokens after fusing every contribution (none: the receiver alone)."""
    prefilled = prefill(split, prompt, max_new_tokens)
    return answer_over(split, prefilled, prompt, contributions, decoding, stop, max_new_tokens)


@dataclass
class Prefilled:
    """The receiver's own cache of the prompt's first N - 1 tokens, before any fusion (a networked
    receiver makes it while its sharers compute), and the seconds it took."""

    store: ParticipantKVStore
    seconds: float


def prefill(split: SplitModel, prompt: ReceiverPrompt, max_new_tokens: int) -> Prefilled:
    check_prompt_length(len(prompt.ids), max_new_tokens, split.max_positions)
    start = time.perf_counter()
    store = receiver_prefill(split, prompt.ids[:-1], reserve=len(prompt.ids) + max_new_tokens)
    return Prefilled(store, time.perf_counter() - start)


def answer_over(
    split: SplitModel,
    prefilled: Prefilled,
    prompt: ReceiverPrompt,
    contributions: list[Contribution],
    decoding: Decoding,
    stop: StopRule,
    max_new_tokens: int,
) -> ReceiverAnswer:
    """Every contribution fused into the prefilled cache (once), then the answer decoded over it."""
    store = prefilled.store
    start = time.perf_counter()
    for contribution in contributions:
        fuse_into(store, contribution.projectors, contribution.cache, contribution.positions)
    decoding_start = time.perf_counter()
    tokens = _decode(split, store, prompt.ids[-1], len(prompt.ids) - 1, decoding, stop, max_new_tokens)
    end = time.perf_counter()
    seconds = {"prefill_s": prefilled.seconds, "fuse_s": decoding_start - start, "decode_s": end - decoding_start}
    return ReceiverAnswer(tokens, seconds)


def _decode(
    split: SplitModel,
    store,
    token: int,
    position: int,
    decoding: Decoding,
    stop: StopRule,
    max_new_tokens: int,
) -> list[int]:
    generator = decoding.generator(0)
    tokens: list[int] = []
    while len(tokens) < max_new_tokens:
        step = RowStep(split.embed([token]), torch.tensor([position]), store, 0, split.num_blocks)
        hidden = split.run([step])[0]
        token = decoding.pick(split.logits(hidden)[-1], generator)
        tokens.append(token)
        position += 1
        if stop(tokens):
            break
    return tokens
