"""Decoding many answers at once: each row is one party's answer to one query, on its own KV store.

Decoding needs no messages (every party decodes from its own store), so answers of different
parties and different queries are independent and can share forward passes. On a CPU a decode
step of a small model is bound by reading the weights, so B rows cost far less than B steps.
Stores of different lengths (per block, and per row) are padded and masked; a row that stops
leaves the batch. One row is the single-answer case, with no padding and no mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedattn.runtime.decoding import StopRule
from fedattn.runtime.kv_store import ParticipantKVStore


@dataclass
class DecodeRow:
    """One answer to generate: where its keys live, what it starts from, how it picks and stops."""

    store: ParticipantKVStore
    first_position: int  # global position of ``first_token`` (the prompt length)
    first_token: int
    pick: Callable[[torch.Tensor], int]  # logits of one step -> the next token
    stop: StopRule
    logits: list[torch.Tensor] | None = None  # every step's logits are appended here when given


class _PaddedLayer:
    """One block's K/V for every row, right-padded to a common width with room for new tokens."""

    def __init__(self, stores: list[tuple[torch.Tensor, torch.Tensor]], room: int) -> None:
        lengths = [key.shape[1] for key, _ in stores]
        heads, _, head_dim = stores[0][0].shape
        width = max(lengths) + room
        template = stores[0][0]
        self.key = template.new_zeros(len(stores), heads, width, head_dim)  # zeros: padding must not be NaN
        self.value = template.new_zeros(len(stores), heads, width, head_dim)
        self.valid = torch.zeros(len(stores), width, dtype=torch.bool, device=template.device)
        for row, (key, value) in enumerate(stores):
            self.key[row, :, : key.shape[1]] = key
            self.value[row, :, : key.shape[1]] = value
            self.valid[row, : key.shape[1]] = True
        self.lengths = torch.tensor(lengths, device=template.device)

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store each row's new (heads, 1, head_dim) entry; return what the rows attend to."""
        rows = torch.arange(len(self.lengths), device=self.lengths.device)
        self.key[rows, :, self.lengths] = key[:, :, 0]
        self.value[rows, :, self.lengths] = value[:, :, 0]
        self.valid[rows, self.lengths] = True
        self.lengths += 1
        used = int(self.lengths.max())
        mask = None if bool((self.lengths == used).all()) else self.valid[:, None, None, :used]
        return self.key[:, :, :used], self.value[:, :, :used], mask

    def keep(self, rows: torch.Tensor) -> None:
        self.key, self.value = self.key[rows], self.value[rows]
        self.valid, self.lengths = self.valid[rows], self.lengths[rows]


class _BatchDecodeStep:
    """The attention hook's view of one decode step: every row's new token at every block."""

    def __init__(self, layers: list[_PaddedLayer]) -> None:
        self.layers = layers

    def attend(
        self,
        layer: int,
        key: torch.Tensor,
        value: torch.Tensor,
        query: torch.Tensor | None = None,
        scaling: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self.layers[layer].append(key, value)


@torch.inference_mode()
def decode_rows(
    model: torch.nn.Module,
    rows: list[DecodeRow],
    max_new_tokens: int,
    on_step: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Every row's tokens, its first token included, until its stop rule or ``max_new_tokens``.

    ``on_step`` gets the number of steps taken (a liveness/progress hook).
    """
    tokens = [[row.first_token] for row in rows]

    def finished(index: int) -> bool:
        return len(tokens[index]) >= max_new_tokens or rows[index].stop(tokens[index])

    active = [index for index in range(len(rows)) if not finished(index)]
    if not active:
        return tokens
    num_layers = len(rows[0].store.layers)
    layers = [
        _PaddedLayer([rows[index].store[layer].view()[:2] for index in active], max_new_tokens)
        for layer in range(num_layers)
    ]
    device = layers[0].key.device
    step = 0
    while active:
        input_ids = torch.tensor([[tokens[index][-1]] for index in active], device=device)
        positions = torch.tensor(
            [[rows[index].first_position + len(tokens[index]) - 1] for index in active], device=device
        )
        output = model(
            input_ids=input_ids,
            position_ids=positions,
            fedattn_step=_BatchDecodeStep(layers),
            use_cache=False,
            logits_to_keep=1,
        )
        logits = output.logits[:, -1].float()
        for slot, index in enumerate(active):
            row = rows[index]
            if row.logits is not None:
                row.logits.append(logits[slot])
            tokens[index].append(row.pick(logits[slot]))
        step += 1
        if on_step is not None:
            on_step(step)
        still = [slot for slot, index in enumerate(active) if not finished(index)]
        if len(still) < len(active):
            kept = torch.tensor(still, dtype=torch.long, device=device)
            for layer in layers:
                layer.keep(kept)
            active = [active[slot] for slot in still]
    return tokens
