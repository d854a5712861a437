"""The model hook: FedAttn as an attention function registered with HF's AttentionInterface.

The HF model stays untouched and knows nothing about distribution. Each forward pass receives a
``fedattn_step`` (anything with ``attend``); at every block this function hands it the block's
fresh keys and values and gets back everything the query may attend to, with the mask that says
which (causality over global positions in prefill, padding when decoding many rows at once).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

ATTENTION_NAME = "fedattn"


class ForwardStep(Protocol):
    """What one forward pass supplies to every block."""

    def attend(
        self,
        layer: int,
        key: torch.Tensor,
        value: torch.Tensor,
        query: torch.Tensor | None = None,
        scaling: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store this block's fresh K/V (batch, heads, n, d), exchange as scheduled, and return
        (K, V, boolean mask or None) over everything the queries may see. ``query`` (batch,
        query heads, n, d) and the softmax ``scaling`` are there for steps that score tokens by
        attention (``--kv-select attention``); others ignore them."""
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
    keys, values, mask = fedattn_step.attend(module.layer_idx, key, value, query=query, scaling=scaling)
    output = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=True)
    return output.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs) -> None:
    """The positional mask is built per block from global positions, not by HF's mask helpers."""
    return None


_switch = threading.Condition()
_users: dict[int, tuple[int, str]] = {}  # id(model) -> (threads inside, the implementation to restore)
_native: dict[int, int] = {}  # id(model) -> threads running it with its own attention (``native_attention``)


@contextmanager
def federated_attention_enabled(model: torch.nn.Module) -> Iterator[None]:
    """Switch ``model`` to the hook for the duration, then back (so HF ``generate`` still works).

    Counted per model: queries of a service run forwards of one model in several threads, and the
    first to leave must not switch the hook off under the others' forwards (their blocks would
    silently attend with HF's own attention); the last to leave restores what was there before.
    It waits while any thread runs the model with its own attention (``native_attention``)."""
    with _switch:
        _switch.wait_for(lambda: not _native.get(id(model)))
        AttentionInterface.register(ATTENTION_NAME, federated_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
        inside, previous = _users.get(id(model), (0, model.config._attn_implementation))
        if inside == 0:
            model.set_attn_implementation(ATTENTION_NAME)
        _users[id(model)] = (inside + 1, previous)
    try:
        yield
    finally:
        with _switch:
            inside, previous = _users.pop(id(model))
            if inside == 1:
                model.set_attn_implementation(previous)
                _switch.notify_all()
            else:
                _users[id(model)] = (inside - 1, previous)


@contextmanager
def native_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` with HF's own attention for the duration, while other threads may use it
    through the hook (a service's model is a FedRefine sharer, read by HF's forward, and a receiver,
    run through the hook): it waits until no thread has the hook on, and holds the hook off meanwhile."""
    with _switch:
        _switch.wait_for(lambda: id(model) not in _users)
        _native[id(model)] = _native.get(id(model), 0) + 1
    try:
        yield
    finally:
        with _switch:
            _native[id(model)] -= 1
            if not _native[id(model)]:
                del _native[id(model)]
                _switch.notify_all()
