"""Shared pieces of FedRefine's wire tests: a tiny receiver and sharers, projectors whose gates are
open (random weights: fusion changes the answer) or closed (untrained: the receiver alone), saved
where a projector folder is expected, and the answer computed directly from the core
(``receiver.answer`` over caches read by ``read_sharer_cache``), with no frame or transport."""

from __future__ import annotations

from pathlib import Path

import torch

from fedattn.runtime.blocks import SplitModel
from fedattn.runtime.decoding import Decoding, stop_rule
from fedattn.runtime.models import LoadedModel
from fedattn.systems.fedrefine.alignment import (
    receiver_prompt,
    same_tokenizer,
    sent_blocks,
    sharer_input,
    sharer_request,
)
from fedattn.systems.fedrefine.caches import cache_dims, pair_dims, read_sharer_cache
from fedattn.systems.fedrefine.projector import ProjectorInfo, ProjectorSet
from fedattn.systems.fedrefine.receiver import Contribution, answer

RECEIVER = "tiny-random"
SHARERS = ("tiny-random-wide", "tiny-random-draft")
QUESTION = "Which planet is known as the red planet? Answer in one word."


def projectors_for(receiver: LoadedModel, sharer: LoadedModel, open_gates: bool, seed: int = 0) -> ProjectorSet:
    """A projector set for the pair: random weights from ``seed``, every gate open or all closed."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        info = ProjectorInfo(
            receiver.name, sharer.name, pair_dims(cache_dims(receiver.model), cache_dims(sharer.model))
        )
        projectors = ProjectorSet(info).eval()
    finally:
        torch.random.set_rng_state(generator_state)
    with torch.no_grad():
        for block in projectors.blocks:
            block.key.gate_logit.fill_(1.0 if open_gates else 0.0)
            block.value.gate_logit.fill_(1.0 if open_gates else 0.0)
    return projectors


def saved(projectors: ProjectorSet, folder: Path) -> Path:
    projectors.save(folder)
    return folder


def direct_answer(
    receiver: LoadedModel,
    sharers: list[tuple[LoadedModel, ProjectorSet]],
    question: str,
    max_new_tokens: int,
    raw: bool = False,
) -> list[int]:
    """The core's answer with these sharers' caches, computed here with no wire at all."""
    tokenizer = receiver.tokenizer
    prompt = receiver_prompt(tokenizer, question, raw)
    contributions = []
    for sharer, projectors in sharers:
        request = sharer_request(prompt, tokenizer, same_tokenizer(tokenizer, sharer.tokenizer))
        reading = sharer_input(request, sharer.tokenizer, raw)
        blocks = sent_blocks(receiver.model.config.num_hidden_layers, sharer.model.config.num_hidden_layers)
        cache = read_sharer_cache(sharer.model, reading, blocks)
        contributions.append(Contribution(projectors, cache, request.positions))
    stop = stop_rule(tokenizer, receiver.model)
    split = SplitModel(receiver.model)
    return answer(split, prompt, contributions, Decoding(), stop, max_new_tokens).token_ids
