"""An independent FedAttn reference: ONE forward over the concatenated sequence with a per-block
additive mask written straight from the spec, recomputed from scratch at every generated token.

It shares nothing with the engine but the model weights and the sparse draws (same seed, same
samples): no KV store, no transport, no incremental decoding, eager softmax instead of SDPA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

_MASKS: list[torch.Tensor] = []


def _oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling + _MASKS[module.layer_idx]
    weights = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), None


AttentionInterface.register("fedattn_oracle", _oracle_attention)
AttentionMaskInterface.register("fedattn_oracle", lambda *args, **kwargs: None)

# visible(layer, receiver, sender) -> bool, for receiver != sender
Visibility = Callable[[int, int, int], bool]


def spec_visibility(sync_layers, num_parties, publisher_layers=(), publisher_sync_every=None) -> Visibility:
    """The spec's rules, restated: global blocks all-to-all; publisher-dense: the publisher sees
    everyone at every block; extra publisher sync: at l % H_pub == 0 (not global) all see the publisher."""
    publisher = num_parties - 1

    def visible(layer: int, receiver: int, sender: int) -> bool:
        if layer in sync_layers:
            return True
        if layer in publisher_layers and receiver == publisher:
            return True
        return publisher_sync_every is not None and layer % publisher_sync_every == 0 and sender == publisher

    return visible


def oracle_generate(
    model,
    segments: list[list[int]],
    visible: Visibility,
    kept: list[torch.Tensor],
    sent: Callable[[int, int], torch.Tensor],
    decoder: int,
    first_token: int | None,
    max_new_tokens: int,
) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens of party ``decoder`` (the publisher when ``first_token`` is None) and the
    logits of its first prediction. ``sent(party, layer)`` indexes into that party's kept tokens."""
    num_layers = model.config.num_hidden_layers
    offsets = [sum(len(s) for s in segments[:n]) for n in range(len(segments))]
    total = sum(len(s) for s in segments)
    ids, positions, owners, kept_rank = [], [], [], []
    for party, segment in enumerate(segments):
        for rank, index in enumerate(kept[party].tolist()):
            ids.append(segment[index])
            positions.append(offsets[party] + index)
            owners.append(party)
            kept_rank.append(rank)
    prompt_size = len(ids)
    sent_sets = {(p, layer): set(sent(p, layer).tolist()) for p in range(len(segments)) for layer in range(num_layers)}
    generated: list[int] = [] if first_token is None else [first_token]
    first_logits = None
    previous = model.config._attn_implementation
    model.set_attn_implementation("fedattn_oracle")
    try:
        while len(generated) < max_new_tokens:
            sequence = ids + generated
            pos = positions + [total + g for g in range(len(generated))]
            own = owners + [decoder] * len(generated)
            _MASKS[:] = [
                _mask(layer, pos, own, kept_rank, prompt_size, visible, sent_sets) for layer in range(num_layers)
            ]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([sequence]), position_ids=torch.tensor([pos])).logits[0, -1]
            if first_logits is None:
                first_logits = logits.float()
            generated.append(int(torch.argmax(logits)))
            if generated[-1] == model.generation_config.eos_token_id:
                break
    finally:
        model.set_attn_implementation(previous)
    return generated, first_logits


def _mask(layer, positions, owners, kept_rank, prompt_size, visible, sent_sets) -> torch.Tensor:
    size = len(positions)
    allowed = torch.zeros(size, size, dtype=torch.bool)
    for q in range(size):
        for k in range(size):
            if positions[k] > positions[q]:
                continue
            if owners[k] == owners[q]:
                allowed[q, k] = True
            elif k < prompt_size and visible(layer, owners[q], owners[k]):
                allowed[q, k] = kept_rank[k] in sent_sets[(owners[k], layer)]
    return torch.zeros(size, size).masked_fill(~allowed, float("-inf"))[None, None]
