"""The spec's cost model: expected bytes and FLOPs per participant, from the schedule alone.

It is computed independently of the engine (from segment lengths, ratios and the schedule, never
from what was sent), so a run's measured bytes can be checked against it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedattn.network.frames import HELLO_FRAME, SMALL_FRAME, kv_frame_size
from fedattn.network.kv_codec import KVCodec
from fedattn.runtime.dims import ModelDims
from fedattn.systems.fedattn.exchange import Exchange, frame_token_counts, kept_counts
from fedattn.systems.fedattn.schedule import Schedule
from fedattn.systems.fedattn.sparsity import Sparsity

if TYPE_CHECKING:
    from fedattn.systems.fedattn.config import RunConfig

SWIGLU_FFN_FACTOR = 6


def token_flops(dims: ModelDims) -> float:
    """Projections and FFN of one token at one block: 2 d^2 (2 + 2r) + c_ffn d d_ff, with r = H_kv / heads."""
    kv_ratio = dims.num_kv_heads / dims.num_heads
    return 2 * dims.hidden**2 * (2 + 2 * kv_ratio) + SWIGLU_FFN_FACTOR * dims.hidden * dims.ffn


@dataclass
class PartyCost:
    kv_bytes_sent: int = 0
    kv_bytes_received: int = 0
    wire_bytes_sent: int = 0
    wire_bytes_received: int = 0
    prefill_flops: float = 0.0
    prompt_kv_per_layer: list[int] | None = None

    def decode_flops(self, dims: ModelDims, steps: int) -> float:
        """L G (2 d^2 (2+2r) + c d d_ff) + 4 d sum_l (G T0_l + G(G-1)/2) + 2 G d V."""
        attention = sum(steps * t0 + steps * (steps - 1) / 2 for t0 in self.prompt_kv_per_layer or [])
        return (
            dims.num_layers * steps * token_flops(dims)
            + 4 * dims.hidden * attention
            + 2 * steps * dims.hidden * dims.vocab
        )


def expected_costs(
    dims: ModelDims,
    schedule: Schedule,
    sparsity: Sparsity,
    codec: KVCodec,
    segment_lengths: list[int],
    all_answers: bool = False,
    exchange: Exchange = Exchange(),
) -> list[PartyCost]:
    """Per party: K/V payload bytes, exact wire bytes (headers, positions, control frames), FLOPs.

    K/V goes only where it can be used: forwards during prefill, and backwards too only when every
    party decodes (``all_answers``), which is the paper's all-to-all exchange. Tokens per frame:
    ``--ratio-comm`` of the kept tokens, cut to ``--kv-budget``; payload bytes: the codec's formula.
    """
    count = len(segment_lengths)
    publisher = count - 1
    kept = kept_counts(sparsity, segment_lengths)
    frame_tokens = frame_token_counts(
        schedule, sparsity, exchange, codec, segment_lengths, dims.num_kv_heads, dims.head_dim, all_answers
    )
    costs = [PartyCost(prompt_kv_per_layer=[]) for _ in range(count)]
    if count > 1:  # control frames: everyone's hello, the publisher's completion (and first token)
        publisher_frames = SMALL_FRAME.size * (2 if all_answers else 1)
        for cost in costs:
            cost.wire_bytes_sent += HELLO_FRAME.size
            cost.wire_bytes_received += HELLO_FRAME.size * (count - 1)
        costs[publisher].wire_bytes_sent += publisher_frames
        for cost in costs[:publisher]:
            cost.wire_bytes_received += publisher_frames
    for layer in range(dims.num_layers):
        sent = [0] * count
        for m in range(count):
            receivers = schedule.receivers(layer, m, count, all_answers)
            if receivers:
                sent[m] = frame_tokens[(m, layer)]
                frame = kv_frame_size(sent[m], sent[m] == segment_lengths[m], codec, dims.num_kv_heads, dims.head_dim)
                payload = codec.payload_size(sent[m], dims.num_kv_heads, dims.head_dim)
                costs[m].kv_bytes_sent += payload
                costs[m].wire_bytes_sent += frame
                for n in receivers:
                    costs[n].kv_bytes_received += payload
                    costs[n].wire_bytes_received += frame
        for n, cost in enumerate(costs):
            visible = [m for m in range(count) if m != n and schedule.receives(layer, n, m, publisher)]
            earlier = sum(sent[m] for m in visible if m < n)
            causal_pairs = kept[n] * earlier + kept[n] * (kept[n] + 1) // 2
            cost.prefill_flops += kept[n] * token_flops(dims) + 4 * dims.hidden * causal_pairs
            cost.prompt_kv_per_layer.append(kept[n] + sum(sent[m] for m in visible))
    costs[publisher].prefill_flops += 2 * dims.hidden * dims.vocab
    return costs


def run_costs(
    dims: ModelDims, config: RunConfig, segment_lengths: list[int], all_answers: bool | None = None
) -> list[PartyCost]:
    """``expected_costs`` of a run's configuration; ``all_answers`` overrides the run's (the naive
    all-to-all exchange is the run with every party answering)."""
    everyone = config.all_answers if all_answers is None else all_answers
    return expected_costs(
        dims, config.schedule, config.sparsity, config.codec, segment_lengths, everyone, config.exchange
    )
