"""Running an HF decoder block range by block range: split inference's thin runner over its layers.

Split inference cuts one model between parties: one runs the embeddings and the first blocks,
another the middle, the first again the last blocks and the head. Each side runs only its own
blocks, on hidden states it received, with a KV cache of its own blocks alone. This runner calls
the model's own modules (embeddings, decoder layers, rotary embedding, final norm, head) in order
and reaches inside a block only through the attention hook (``runtime.attention``): each block's
fresh K/V go to the row's own ``ParticipantKVStore`` and the mask is built from global positions,
so nothing that crosses a network needs a mask.

Rows are independent sequences (different clients of one server): each has its own store, token
count, positions and block range, and one call runs every block any row needs once per token count,
over the rows that need it (their stores padded to the longest, masked), so pending steps of
different rows share each block's weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedattn.errors import FedAttnError
from fedattn.runtime.attention import ForwardStep, federated_attention_enabled
from fedattn.runtime.kv_store import ParticipantKVStore


@dataclass
class RowStep:
    """One row's step through blocks [first, stop): its new tokens' hidden states (n, d), their
    global positions (n,), and its KV store (entries of each block it runs are appended)."""

    hidden: torch.Tensor
    positions: torch.Tensor
    store: ParticipantKVStore
    first: int
    stop: int


class SplitModel:
    """One loaded causal LM, run piecewise: embed, blocks [first, stop) of many rows, head."""

    def __init__(self, model: torch.nn.Module) -> None:
        decoder = getattr(model, "model", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if decoder is None or not all(hasattr(decoder, part) for part in needed) or not hasattr(model, "lm_head"):
            raise FedAttnError(
                f"{type(model).__name__} is not a decoder this split runner knows (embeddings, blocks, norm, head)"
            )
        kinds = set(getattr(model.config, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise FedAttnError(
                f"{type(model).__name__} has {', '.join(sorted(kinds - {'full_attention'}))} blocks: "
                "split inference runs full-attention models only"
            )
        self.model = model
        self.decoder = decoder
        self.num_blocks = int(model.config.num_hidden_layers)
        self.hidden_size = int(model.config.hidden_size)
        self.max_positions = int(model.config.max_position_embeddings)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    def new_store(self) -> ParticipantKVStore:
        return ParticipantKVStore(self.num_blocks)

    @torch.inference_mode()
    def embed(self, token_ids: list[int]) -> torch.Tensor:
        """(n, d) input embeddings of ``token_ids``."""
        return self.decoder.embed_tokens(torch.tensor(token_ids, device=self.device))

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, vocab) float32 logits of the last block's output (n, d): final norm, then head."""
        return self.model.lm_head(self.decoder.norm(hidden)).float()

    @torch.inference_mode()
    def run(self, rows: list[RowStep]) -> list[torch.Tensor]:
        """Every row's hidden states after its blocks, (n_i, d) each, in order. Rows of one token
        count run together, each block once over the rows whose range holds it (a decode step
        padded to another row's prompt would cost that prompt's compute)."""
        for row in rows:
            if not 0 <= row.first <= row.stop <= self.num_blocks:
                raise ValueError(f"blocks [{row.first}, {row.stop}) outside the model's {self.num_blocks}")
        outputs: list[torch.Tensor | None] = [None] * len(rows)
        for count in dict.fromkeys(row.hidden.shape[0] for row in rows):
            group = [index for index, row in enumerate(rows) if row.hidden.shape[0] == count]
            for index, output in zip(group, self._run_group([rows[index] for index in group]), strict=True):
                outputs[index] = output
        return outputs

    def _run_group(self, rows: list[RowStep]) -> list[torch.Tensor]:
        width = rows[0].hidden.shape[0]
        hidden = self.decoder.embed_tokens.weight.new_zeros(len(rows), width, self.hidden_size)
        positions = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        for index, row in enumerate(rows):
            hidden[index] = row.hidden.to(self.device, self.dtype)
            positions[index] = row.positions.to(self.device)
        with federated_attention_enabled(self.model):
            for block in range(min(row.first for row in rows), max(row.stop for row in rows)):
                active = [index for index, row in enumerate(rows) if row.first <= block < row.stop]
                if not active:
                    continue
                chosen = torch.tensor(active, device=self.device)
                step = _RowsAttention([rows[index] for index in active], width)
                hidden[chosen] = self.block(block, hidden[chosen], positions[chosen], step)
        return [hidden[index].clone() for index in range(len(rows))]

    def block(self, index: int, hidden: torch.Tensor, positions: torch.Tensor, step: ForwardStep) -> torch.Tensor:
        """Block ``index`` on (batch, n, d) hidden states at (batch, n) positions, its attention
        through ``step`` (the caller enables the hook): what ``run`` does per block, open to callers
        whose rows share a prefix (an attacker scoring many candidate tokens behind one)."""
        embeddings = self.decoder.rotary_emb(hidden, positions)
        output = self.decoder.layers[index](
            hidden, attention_mask=None, position_ids=positions, position_embeddings=embeddings, fedattn_step=step
        )
        return output[0] if isinstance(output, tuple) else output


class _RowsAttention:
    """The hook's view of one block for the rows that run it (each with ``width`` new tokens): each
    row's fresh K/V join its store, and each row's queries see its own stored keys up to their
    position."""

    def __init__(self, rows: list[RowStep], width: int) -> None:
        self.rows = rows
        self.width = width

    def attend(
        self,
        layer: int,
        key: torch.Tensor,
        value: torch.Tensor,
        query: torch.Tensor | None = None,
        scaling: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        views = []
        for index, row in enumerate(self.rows):
            row.store[layer].append(key[index], value[index], row.positions.to(key.device))
            views.append(row.store[layer].view())
        if len(views) == 1 and self.width == 1:
            keys, values, _ = views[0]
            return keys[None], values[None], None  # one new token sees everything its row stored
        return _padded(views, [row.positions.to(key.device) for row in self.rows])


def _padded(
    views: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], queries: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows' stored K/V right-padded to one length, and the mask: a query sees its row's keys at or
    before its position."""
    heads, _, head_dim = views[0][0].shape
    longest = max(key.shape[1] for key, _, _ in views)
    template = views[0][0]
    keys = template.new_zeros(len(views), heads, longest, head_dim)  # zeros: padding must not be NaN
    values = template.new_zeros(len(views), heads, longest, head_dim)
    mask = torch.zeros(len(views), 1, queries[0].shape[0], longest, dtype=torch.bool, device=template.device)
    for row, ((key, value, positions), query) in enumerate(zip(views, queries, strict=True)):
        length = key.shape[1]
        keys[row, :, :length], values[row, :, :length] = key, value
        mask[row, 0, :, :length] = positions[None, :] <= query[:, None]
    return keys, values, mask


def client_share(model: torch.nn.Module, first: int, last: int) -> dict[str, float]:
    """What the party running the embeddings, blocks [0, first) and the last ``last`` blocks and the
    head holds and computes, as fractions of the whole model: ``compute`` counts each token's
    matrix products (the blocks' and the head's weights; attention over the context aside),
    ``memory`` the parameters it keeps (tied embeddings counted once) and ``kv_cache`` its blocks'
    share of the KV cache."""
    decoder = model.model
    blocks = [sum(p.numel() for p in layer.parameters()) for layer in decoder.layers]
    count = len(blocks)
    own = sum(blocks[:first]) + sum(blocks[count - last :])
    head = model.lm_head.weight.numel()
    everything = {id(p): p.numel() for p in model.parameters()}
    shared = {id(p): p.numel() for p in (decoder.embed_tokens.weight, model.lm_head.weight, *decoder.norm.parameters())}
    return {
        "compute": (own + head) / (sum(blocks) + head),
        "memory": (own + sum(shared.values())) / sum(everything.values()),
        "kv_cache": (first + last) / count,
    }
