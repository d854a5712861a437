"""Which torch device a run uses, refused in one line if this machine lacks it.

torch only finds out that a device is missing when the first tensor moves there, which for a
named model is after its slow load (and then as an assertion deep inside torch).
"""

from __future__ import annotations

import torch

from fedattn.errors import FedAttnError


def resolve_device(requested: str | None) -> str:
    """``requested`` (cpu, cuda, cuda:N, mps) if this machine has it; None: cuda when available, else cpu."""
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = requested.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise FedAttnError(f"device {requested!r}: this machine has no CUDA device that torch can use")
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise FedAttnError(f"device {requested!r}: this machine has CUDA devices 0..{count - 1}")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise FedAttnError(f"device {requested!r}: MPS is not available on this machine")
    return requested
