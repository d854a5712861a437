"""How much a way of sending the workers' distributions costs in fidelity and in bytes, measured on
the very positions a text goes through (teacher forcing: one forward pass per model over the prompt
and a continuation gives every position's distributions at once).

For each compression (K or adaptive K, reconstruction, encoding) every worker's row goes through
the real path: ``roles.compress``, the encoding's round trip (``frames.encode_rows`` and
``decode_rows``), ``kernel.reconstruct``, ``kernel.aggregate``; the figures are the spec's: the
aggregation bias ||p_hat - p||_1, the residual mass sum_i w_i eps_i, the acceptance-rate bias
|beta_hat - beta| against the draft's q, and the bytes of the records per position. This is how the
bias-per-byte of the encodings and of adaptive K is compared with plain top-K without decoding
once per setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import fmean

import torch

from fedattn.systems.specfed import frames
from fedattn.systems.specfed.config import SpecFedConfig
from fedattn.systems.specfed.kernel import aggregate, distributions, l1, overlap, reconstruct
from fedattn.systems.specfed.roles import compress, row_layout


@dataclass(frozen=True)
class Fidelity:
    aggregation_bias: float
    residual_mass: float
    acceptance_bias: float | None
    argmax_agreement: float  # positions whose argmax the rebuilt aggregate keeps: greedy output is unchanged at 1.0
    bytes_per_position: float  # every worker's record of one position (a frame's header is per round, not counted)


@torch.inference_mode()
def teacher_forced(
    model: torch.nn.Module, sequence: list[int], start: int, vocab: int, temperature: float
) -> torch.Tensor:
    """(len - start, vocab): the distributions that predict ``sequence[start:]``, one forward pass."""
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([sequence], device=device)).logits[0, start - 1 : len(sequence) - 1]
    return distributions(logits.float().cpu(), vocab, temperature)


def measure(truths: list[torch.Tensor], q: torch.Tensor | None, config: SpecFedConfig, vocab: int) -> Fidelity:
    """``truths``: each worker's (positions, vocab) distributions; ``q``: the draft's, or None."""
    weights = [worker.weight for worker in config.workers]
    layout = row_layout(config, vocab)
    truth = aggregate(truths, weights)
    biases, residuals, acceptance, sizes, agreed = [], [], [], [], []
    for position in range(truth.shape[0]):
        rows = [compress(p[position], config) for p in truths]
        received = [frames.decode_rows(frames.encode_rows([row], layout), "worker", layout, 1)[0] for row in rows]
        rebuilt = aggregate([reconstruct(row, vocab, config.reconstruct) for row in received], weights)
        biases.append(l1(rebuilt, truth[position]))
        agreed.append(int(torch.argmax(rebuilt)) == int(torch.argmax(truth[position])))
        residuals.append(sum(weight * row.residual for weight, row in zip(weights, rows)))
        if q is not None:
            acceptance.append(abs(overlap(rebuilt, q[position]) - overlap(truth[position], q[position])))
        sizes.append(sum(frames.rows_frame_size(layout, [row.k]) - frames.ROWS_HEADER.size for row in rows))
    return Fidelity(
        aggregation_bias=fmean(biases),
        residual_mass=fmean(residuals),
        acceptance_bias=fmean(acceptance) if acceptance else None,
        argmax_agreement=fmean(agreed),
        bytes_per_position=fmean(sizes),
    )
