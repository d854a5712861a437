"""C2C's projectors: per receiver block, what a sharer's K (and V) add to the receiver's own.

For each token the receiver's K (all its KV heads, flattened) and the aligned sharer K are
concatenated, mapped to a width, passed through residual MLP blocks, and mapped back to the
receiver's shape (K_proj); a second head gives a weight per KV head, w = sigmoid(.). A scalar gate
logit per path decides whether this block takes the sharer's contribution at all:
K_fused = K_recv + gate * w * K_proj. In training the gate is a Gumbel-sigmoid relaxation whose
temperature anneals from 1.0 to 0.001; at evaluation it is hard (logit > 0). The logit starts at
0, so an untrained projector is closed at evaluation and the receiver answers as if alone.

C2C's own size (width 1024, three MLP blocks) is 478M parameters for a Qwen3-0.6B receiver; the
default here is sized for a 2-core CPU (``ProjectorShape``), and ``parameter_count`` says what any
shape costs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fedattn.errors import FedAttnError
from fedattn.systems.fedrefine.alignment import layer_map

CONFIG_FILE = "projector.json"
WEIGHTS_FILE = "projector.safetensors"
FORMAT = 1


@dataclass(frozen=True)
class ProjectorShape:
    """The trainable part's size: the MLP ``width``, its residual blocks (``depth``, each
    ``expansion`` x width inside), dropout, and the gate temperature's annealing."""

    width: int = 96
    depth: int = 1
    expansion: int = 2
    dropout: float = 0.1
    initial_temperature: float = 1.0
    final_temperature: float = 0.001
    anneal_steps: int = 1000


@dataclass(frozen=True)
class PairDims:
    """What the two models' caches look like: blocks, KV heads and head size of each."""

    receiver_blocks: int
    receiver_heads: int
    receiver_head_dim: int
    sharer_blocks: int
    sharer_heads: int
    sharer_head_dim: int

    @property
    def receiver_width(self) -> int:
        return self.receiver_heads * self.receiver_head_dim

    @property
    def sharer_width(self) -> int:
        return self.sharer_heads * self.sharer_head_dim


class _ResidualBlock(nn.Module):
    def __init__(self, width: int, expansion: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(width)
        self.up = nn.Linear(width, width * expansion)
        self.down = nn.Linear(width * expansion, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.dropout(self.down(nn.functional.gelu(self.up(self.norm(hidden)))))


class _Path(nn.Module):
    """One of a block's two projections (K or V)."""

    def __init__(self, dims: PairDims, shape: ProjectorShape) -> None:
        super().__init__()
        self.heads = dims.receiver_heads
        self.project_in = nn.Linear(dims.receiver_width + dims.sharer_width, shape.width)
        self.blocks = nn.ModuleList(
            _ResidualBlock(shape.width, shape.expansion, shape.dropout) for _ in range(shape.depth)
        )
        self.project_out = nn.Linear(shape.width, dims.receiver_width)
        self.weight_head = nn.Linear(shape.width, dims.receiver_heads)
        self.gate_logit = nn.Parameter(torch.zeros(()))

    def forward(self, receiver: torch.Tensor, sharer: torch.Tensor, temperature: float) -> torch.Tensor:
        """``receiver`` (heads_R, n, d_R) and ``sharer`` (heads_S, n, d_S) -> fused (heads_R, n, d_R)."""
        heads, count, head_dim = receiver.shape
        joined = torch.cat([_flat(receiver), _flat(sharer).to(receiver.dtype)], dim=-1)
        hidden = self.project_in(joined)
        for block in self.blocks:
            hidden = block(hidden)
        projected = self.project_out(hidden).view(count, heads, head_dim).transpose(0, 1)
        weight = torch.sigmoid(self.weight_head(hidden)).transpose(0, 1)[..., None]  # (heads, n, 1)
        return receiver + self._gate(heads, count, temperature) * weight * projected

    def _gate(self, heads: int, count: int, temperature: float) -> torch.Tensor:
        if not self.training:
            return (self.gate_logit > 0).to(self.gate_logit.dtype)
        uniform = torch.rand(heads, count, 1, dtype=self.gate_logit.dtype)
        gumbel = -torch.log(-torch.log(uniform + 1e-20) + 1e-20)
        return torch.sigmoid((self.gate_logit + gumbel) / temperature)

    @property
    def open(self) -> bool:
        return bool(self.gate_logit > 0)


def _flat(cache: torch.Tensor) -> torch.Tensor:
    """(heads, n, d) -> (n, heads * d)."""
    heads, count, head_dim = cache.shape
    return cache.transpose(0, 1).reshape(count, heads * head_dim)


class _BlockProjector(nn.Module):
    def __init__(self, dims: PairDims, shape: ProjectorShape) -> None:
        super().__init__()
        self.key = _Path(dims, shape)
        self.value = _Path(dims, shape)


@dataclass
class ProjectorInfo:
    """What a projector folder says about itself besides its weights."""

    receiver: str
    sharer: str
    dims: PairDims
    shape: ProjectorShape = field(default_factory=ProjectorShape)
    training: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "receiver": self.receiver,
            "sharer": self.sharer,
            "dims": asdict(self.dims),
            "shape": asdict(self.shape),
            "training": self.training,
        }


class ProjectorSet(nn.Module):
    """One K/V projector per receiver block, for one (receiver, sharer) pair."""

    def __init__(self, info: ProjectorInfo) -> None:
        super().__init__()
        self.info = info
        dims = info.dims
        self.sharer_block_of = layer_map(dims.receiver_blocks, dims.sharer_blocks)
        self.blocks = nn.ModuleList(_BlockProjector(dims, info.shape) for _ in range(dims.receiver_blocks))
        self.temperature = info.shape.initial_temperature

    def anneal(self, step: int) -> None:
        """The gate temperature after ``step`` optimiser steps (geometric, as C2C)."""
        shape = self.info.shape
        ratio = min(step / max(shape.anneal_steps, 1), 1.0)
        self.temperature = shape.initial_temperature * (shape.final_temperature / shape.initial_temperature) ** ratio

    def fuse(
        self, block: int, key: torch.Tensor, value: torch.Tensor, sharer_key: torch.Tensor, sharer_value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Receiver block ``block``'s fused (K, V), each (heads_R, n, d_R), from its own and the
        aligned sharer's (heads_S, n, d_S) for the same n tokens."""
        projector = self.blocks[block]
        return (
            projector.key(key, sharer_key, self.temperature),
            projector.value(value, sharer_value, self.temperature),
        )

    def open_gates(self) -> int:
        """How many of the 2 x blocks paths pass anything at evaluation."""
        return sum(int(projector.key.open) + int(projector.value.open) for projector in self.blocks)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        weights = {name: tensor.detach().contiguous() for name, tensor in self.state_dict().items()}
        save_file(weights, str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(self.info.to_json(), indent=2) + "\n")


def parameter_count(dims: PairDims, shape: ProjectorShape) -> int:
    """Trainable parameters of a projector set of this shape for this pair, without building it
    (C2C's own shape would not fit in this machine's memory as a module)."""
    width, inner = shape.width, shape.width * shape.expansion
    block = width + (width + 1) * inner + (inner + 1) * width  # RMSNorm weight, up, down
    path = (
        (dims.receiver_width + dims.sharer_width + 1) * width
        + shape.depth * block
        + (width + 1) * dims.receiver_width
        + (width + 1) * dims.receiver_heads
        + 1  # the gate logit
    )
    return 2 * dims.receiver_blocks * path


def read_info(directory: Path) -> ProjectorInfo:
    path = directory / CONFIG_FILE
    try:
        stored = json.loads(path.read_text())
        if not isinstance(stored, dict):
            raise TypeError("not a JSON object")
        if stored.get("format") != FORMAT:
            raise FedAttnError(f"{path} has projector format {stored.get('format')}, this version reads {FORMAT}")
        return ProjectorInfo(
            receiver=stored["receiver"],
            sharer=stored["sharer"],
            dims=PairDims(**stored["dims"]),
            shape=ProjectorShape(**stored["shape"]),
            training=stored.get("training", {}),
        )
    except FileNotFoundError:
        raise FedAttnError(f"{directory} holds no projector ({CONFIG_FILE} missing)") from None
    except (ValueError, KeyError, TypeError) as error:
        raise FedAttnError(f"{path} is not a projector description: {error}") from None


def load_projectors(directory: Path) -> ProjectorSet:
    """A trained projector set, in evaluation mode (hard gates)."""
    info = read_info(directory)
    projectors = ProjectorSet(info)
    try:
        weights = load_file(str(directory / WEIGHTS_FILE))
    except (OSError, SafetensorError) as error:
        raise FedAttnError(f"cannot read {directory / WEIGHTS_FILE}: {error}") from None
    expected = projectors.state_dict()
    if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in expected):
        raise FedAttnError(f"{directory / WEIGHTS_FILE} does not match the shapes {CONFIG_FILE} describes")
    if not all(bool(torch.isfinite(tensor).all()) for tensor in weights.values()):
        raise FedAttnError(f"{directory / WEIGHTS_FILE} holds non-finite weights")
    projectors.load_state_dict({name: tensor.float() for name, tensor in weights.items()})
    return projectors.eval()
