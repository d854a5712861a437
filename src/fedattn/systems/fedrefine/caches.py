"""The two caches fusion needs: a sharer's K/V at its sent blocks, and the receiver's own.

A sharer runs its model as HF ships it (its own attention, sliding windows included) and its cache
is read afterwards; nothing reaches inside the model. The receiver's side runs through the runtime's
block runner (``runtime.blocks.SplitModel``), whose stores are what the hook attends over, so a
fused store is simply a store whose prompt entries were replaced.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from fedattn.errors import FedAttnError
from fedattn.runtime.blocks import RowStep, SplitModel
from fedattn.runtime.kv_store import ParticipantKVStore
from fedattn.systems.fedrefine.alignment import SharerInput
from fedattn.systems.fedrefine.projector import PairDims, ProjectorSet


@dataclass(frozen=True)
class CacheDims:
    """A model's cache shape: blocks, KV heads, head size."""

    blocks: int
    heads: int
    head_dim: int


def cache_dims(model: torch.nn.Module) -> CacheDims:
    config = model.config
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return CacheDims(int(config.num_hidden_layers), heads, int(head_dim))


def pair_dims(receiver: CacheDims, sharer: CacheDims) -> PairDims:
    return PairDims(receiver.blocks, receiver.heads, receiver.head_dim, sharer.blocks, sharer.heads, sharer.head_dim)


@dataclass
class SharerCache:
    """K and V of the sent sharer blocks (ascending), each (heads_S, n, d_S), for the n tokens sent."""

    blocks: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def tokens(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0

    def block(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        at = self.blocks.index(index)
        return self.keys[at], self.values[at]


@torch.inference_mode()
def read_sharer_cache(model: torch.nn.Module, reading: SharerInput, blocks: list[int]) -> SharerCache:
    """One forward pass of the sharer over its input; its K/V at ``blocks`` for the sent positions
    (none sent, as for a one-token message after a BOS: empty K/V, and the model is not run)."""
    device = next(model.parameters()).device
    if not reading.sent:
        dims = cache_dims(model)
        empty = next(model.parameters()).new_empty(dims.heads, 0, dims.head_dim)
        return SharerCache(list(blocks), [empty] * len(blocks), [empty] * len(blocks))
    cache = DynamicCache(config=model.config)
    word = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    model(input_ids=torch.tensor([reading.ids], device=device), use_cache=True, **{word: cache})
    sent = torch.tensor(reading.sent, device=device)
    keys, values = [], []
    for block in blocks:
        layer = cache.layers[block]
        if layer.keys.shape[-2] != len(reading.ids):
            raise FedAttnError(
                f"the sharer's block {block} keeps {layer.keys.shape[-2]} of the prompt's {len(reading.ids)} "
                "tokens (a sliding window): the prompt is too long for this sharer"
            )
        keys.append(layer.keys[0].index_select(1, sent))
        values.append(layer.values[0].index_select(1, sent))
    return SharerCache(list(blocks), keys, values)


def receiver_prefill(split: SplitModel, ids: list[int], reserve: int = 0) -> ParticipantKVStore:
    """The receiver's own cache of ``ids`` (positions 0..n-1), room for ``reserve`` entries."""
    store = split.new_store()
    store.reserve(max(reserve, len(ids)))
    split.run([RowStep(split.embed(ids), torch.arange(len(ids)), store, 0, split.num_blocks)])
    return store


@torch.inference_mode()
def fuse_into(store: ParticipantKVStore, projectors: ProjectorSet, shared: SharerCache, positions: list[int]) -> None:
    """Replace the receiver's K/V at ``positions`` (one per token the sharer sent) by the fused
    ones, block by block; entries at other positions stay the receiver's own."""
    if len(positions) != shared.tokens:
        raise ValueError(f"{shared.tokens} sharer tokens for {len(positions)} receiver positions")
    if not positions:
        return
    for block, sharer_block in enumerate(projectors.sharer_block_of):
        keys, values, stored_positions = store[block].view()
        at = _indices(stored_positions, positions)
        sharer_key, sharer_value = shared.block(sharer_block)
        fused_key, fused_value = projectors.fuse(
            block, keys[:, at].float(), values[:, at].float(), sharer_key.float(), sharer_value.float()
        )
        keys[:, at] = fused_key.to(keys.dtype)
        values[:, at] = fused_value.to(values.dtype)


def _indices(stored: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Where each wanted position sits in a store (prefill stores position p at index p)."""
    wanted = torch.tensor(positions, device=stored.device)
    if int(wanted.max()) >= stored.numel() or not bool((stored[wanted] == wanted).all()):
        raise ValueError("the receiver's store does not hold the positions to fuse in prompt order")
    return wanted
