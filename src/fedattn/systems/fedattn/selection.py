"""Which of its kept tokens a party sends at a block (``--kv-select``), given how many.

- ``random``: the paper's sparse exchange, a seeded draw per (seed, party, block) (``sparsity``).
- ``key-norm``: the tokens whose keys at this block have the largest L2 norm, averaged over KV
  heads (RoPE rotates keys, so post-RoPE norms are the pre-RoPE ones).
- ``attention``: the tokens that receive the most attention mass at this block from the sender's
  own tokens, i.e. the column sums of its local causal attention (own queries over own keys,
  softmax over own keys only, summed over query heads). It uses the block's queries, which the
  sender computes anyway; what it received from others is left out, so it costs O(n^2) per head
  over its own n tokens (queries are processed in chunks to bound memory).

Ties go to the earlier token; the result is sorted, as frames carry increasing positions.
"""

from __future__ import annotations

import torch

from fedattn.systems.fedattn.sparsity import draw_sent

QUERY_CHUNK = 256


def key_norm_scores(key: torch.Tensor) -> torch.Tensor:
    """(kv heads, n, d) -> (n,): each token's key norm, mean over heads."""
    return key.float().norm(dim=-1).mean(dim=0)


def attention_scores(query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, scaling: float) -> torch.Tensor:
    """(query heads, n, d), (kv heads, n, d), (n,) -> (n,): attention mass each token receives
    from the causal local attention of the same tokens, summed over queries and heads."""
    groups = query.shape[0] // key.shape[0]
    keys = key.float().repeat_interleave(groups, dim=0).transpose(1, 2)
    mass = torch.zeros(key.shape[1], dtype=torch.float32, device=key.device)
    for start in range(0, query.shape[1], QUERY_CHUNK):
        chunk = query[:, start : start + QUERY_CHUNK].float()
        scores = torch.matmul(chunk, keys) * scaling
        visible = positions.unsqueeze(0) <= positions[start : start + QUERY_CHUNK].unsqueeze(1)
        scores.masked_fill_(~visible, float("-inf"))
        mass += torch.softmax(scores, dim=-1).sum(dim=(0, 1))
    return mass


def top_tokens(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest scores (ties: the earlier index), in increasing order."""
    order = torch.argsort(scores.cpu(), descending=True, stable=True)
    return order[:count].sort().values


def select_tokens(
    method: str,
    count: int,
    key: torch.Tensor,
    query: torch.Tensor | None,
    positions: torch.Tensor,
    scaling: float | None,
    seed: int,
    party: int,
    layer: int,
) -> torch.Tensor:
    """Indices (into the sender's kept tokens, CPU, increasing) of the ``count`` tokens to send."""
    total = key.shape[1]
    if count >= total:
        return torch.arange(total)
    if method == "random":
        return draw_sent(seed, party, layer, total, count)
    if method == "key-norm":
        return top_tokens(key_norm_scores(key), count)
    if method == "attention":
        if query is None:
            raise RuntimeError("attention selection needs the block's queries")
        scale = scaling if scaling is not None else key.shape[-1] ** -0.5
        return top_tokens(attention_scores(query, key, positions, scale), count)
    raise ValueError(f"unknown selection {method!r}")
