"""The model hook: FedAttn as an attention function registered with HF's AttentionInterface.

The HF model stays untouched and knows nothing about distribution. Each forward pass receives a
``fedattn_step`` (anything with ``collect`` and ``query_positions``); at every block this function
hands it the block's fresh keys and values and gets back everything the party may attend to, with
global positions, then attends causally over global positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

ATTENTION_NAME = "fedattn"


class ForwardStep(Protocol):
    """What one forward pass of one participant supplies to every block."""

    query_positions: torch.Tensor

    def collect(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store this block's own K/V (heads, n, d), exchange as scheduled, return (K, V, positions)."""
        ...


def federated_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    fedattn_step: ForwardStep | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if fedattn_step is None:
        raise RuntimeError("the fedattn attention function needs a fedattn_step argument in the forward call")
    if query.shape[0] != 1:
        raise ValueError("a FedAttn participant runs one sequence at a time")
    keys, values, key_positions = fedattn_step.collect(module.layer_idx, key[0], value[0])
    query_positions = fedattn_step.query_positions
    # A single decode query comes after every stored key, so it needs no mask.
    mask = None if query.shape[2] == 1 else key_positions.unsqueeze(0) <= query_positions.unsqueeze(1)
    output = F.scaled_dot_product_attention(
        query, keys.unsqueeze(0), values.unsqueeze(0), attn_mask=mask, scale=scaling, enable_gqa=True
    )
    return output.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs) -> None:
    """The positional mask is built per block from global positions, not by HF's mask helpers."""
    return None


@contextmanager
def federated_attention_enabled(model: torch.nn.Module) -> Iterator[None]:
    """Switch ``model`` to the hook for the duration, then back (so HF ``generate`` still works)."""
    AttentionInterface.register(ATTENTION_NAME, federated_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
