"""Measured bytes equal the spec's cost model exactly (uncompressed dtypes)."""

import pytest

from conftest import random_segments
from fedattn.cost_model import ModelDims, expected_costs
from fedattn.engine import run_in_process
from fedattn.kv_codec import get_codec
from fedattn.participant import RunConfig
from fedattn.schedule import Schedule, every
from fedattn.sparsity import Sparsity


@pytest.mark.parametrize("codec_name,element_bytes", [("float32", 4), ("bfloat16", 2), ("float16", 2)])
@pytest.mark.parametrize("interval", [1, 3])
def test_kv_bytes_match_spec_formula(tiny, codec_name, element_bytes, interval):
    """Upload per sync T_n * H_kv * d_h * 2 * b, |S| times; download (T - T_n) * ... per sync."""
    model, _ = tiny
    lengths = [8, 13, 5]
    segments = random_segments(lengths, seed=2)
    sync = every(interval, 8)
    config = RunConfig(Schedule(8, sync), codec=get_codec(codec_name), max_new_tokens=2)
    result = run_in_process(model, segments, config)
    heads, head_dim = 2, 16
    total = sum(lengths)
    for party, length in zip(result.parties, lengths):
        assert party.kv_payload_sent == len(sync) * length * heads * head_dim * 2 * element_bytes
        header, segment_frame = 22, 14  # KV header: magic 4, 4 x u8, 3 x u16, 2 x u32; small frame: 4 + 1 + 1 + 8
        # every KV frame it receives: header + (T_m * per-token bytes), one per sender and sync block
        received_kv = len(sync) * (total - length) * heads * head_dim * 2 * element_bytes
        assert party.bytes_received == received_kv + len(sync) * (len(lengths) - 1) * header + 2 * segment_frame
        assert party.bytes_sent == party.kv_payload_sent + len(sync) * header + segment_frame


@pytest.mark.parametrize(
    "schedule,sparsity,all_answers",
    [
        (Schedule(8, (0, 4)), Sparsity(), True),
        (Schedule(8, (), publisher_dense=True), Sparsity(), False),
        (Schedule(8, (1, 6), publisher_dense=True, publisher_sync_every=3), Sparsity(comp=0.7, comm=0.4, seed=2), True),
        (Schedule(8, every(2, 8)), Sparsity(comp=0.5, comm=0.5, comp_publisher=1.0, comm_publisher=0.9, seed=1), False),
    ],
)
def test_wire_bytes_match_cost_model(tiny, schedule, sparsity, all_answers):
    model, _ = tiny
    lengths = [9, 4, 12, 7]
    config = RunConfig(schedule, sparsity=sparsity, max_new_tokens=3, all_answers=all_answers)
    result = run_in_process(model, random_segments(lengths, seed=6), config)
    costs = expected_costs(ModelDims.from_config(model.config), schedule, sparsity, config.codec, lengths, all_answers)
    for party, cost in zip(result.parties, costs):
        assert party.kv_payload_sent == cost.kv_bytes_sent
        assert party.bytes_sent == cost.wire_bytes_sent
        assert party.bytes_received == cost.wire_bytes_received


def test_qwen_example_from_spec():
    """Qwen2.5-0.5B (H_kv = 2, d_h = 64) in bf16: 512 bytes per token per sync block."""
    dims = ModelDims(num_layers=24, hidden=896, num_heads=14, num_kv_heads=2, head_dim=64, ffn=4864, vocab=151936)
    assert dims.kv_bytes_per_token(2) == 512


def test_prefill_flops_formula():
    """Dense, two parties, one global block out of two: the spec's per-block prefill formula."""
    dims = ModelDims(num_layers=2, hidden=8, num_heads=2, num_kv_heads=1, head_dim=4, ffn=16, vocab=10)
    costs = expected_costs(dims, Schedule(2, (0,)), Sparsity(), get_codec("float32"), [3, 5])
    d, r, ff = 8, 0.5, 16

    def block(tokens, pairs):
        return 2 * tokens * d * d * (2 + 2 * r) + 4 * pairs * d + 6 * tokens * d * ff

    # party 2 (publisher): global block sees 3 earlier keys per query + its own causal 15 pairs; local block 15
    assert costs[1].prefill_flops == block(5, 5 * 3 + 15) + block(5, 15) + 2 * d * 10
    assert costs[0].prefill_flops == 2 * block(3, 6)
