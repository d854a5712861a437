"""Measured bytes equal the spec's cost model exactly, for every codec, selection, budget and noise."""

import pytest
from conftest import random_segments

from fedattn.network.kv_codec import CODECS, get_codec
from fedattn.runtime.dims import ModelDims
from fedattn.systems.fedattn.config import RunConfig
from fedattn.systems.fedattn.costs import expected_costs
from fedattn.systems.fedattn.exchange import Exchange
from fedattn.systems.fedattn.inprocess import run_in_process
from fedattn.systems.fedattn.schedule import Schedule, all_layers, every
from fedattn.systems.fedattn.sparsity import Sparsity

HEADER = 22  # KV frame header: magic 4, 4 x u8, 3 x u16, 2 x u32
SMALL = 14  # token / completion frame: magic 4, u8, u8, u64
HELLO = 70  # magic 4, u8, u8, 2 x u16, u32, 7 fingerprints x 8


@pytest.mark.parametrize("codec_name,element_bytes", [("float32", 4), ("bfloat16", 2), ("float16", 2)])
@pytest.mark.parametrize("interval", [1, 3])
def test_all_to_all_bytes_match_spec_formula(tiny, codec_name, element_bytes, interval):
    """Every party decodes, so the exchange is the paper's all-to-all: upload per sync
    T_n * H_kv * d_h * 2 * b, |S| times; download (T - T_n) * H_kv * d_h * 2 * b per sync."""
    model, _ = tiny
    lengths = [8, 13, 5]
    sync = every(interval, 8)
    config = RunConfig(Schedule(8, sync), codec=get_codec(codec_name), max_new_tokens=2, all_answers=True)
    result = run_in_process(model, random_segments(lengths, seed=2), config)
    per_token = 2 * 16 * 2 * element_bytes  # H_kv = 2, d_h = 16
    total, parties = sum(lengths), len(lengths)
    for party, length in zip(result.parties, lengths):
        assert party.kv_payload_sent == len(sync) * length * per_token
        received_kv = len(sync) * ((total - length) * per_token + (parties - 1) * HEADER)
        is_publisher = party.rank == parties - 1
        control_sent = HELLO + (2 * SMALL if is_publisher else 0)  # first token and completion
        control_received = (parties - 1) * HELLO + (0 if is_publisher else 2 * SMALL)
        assert party.bytes_sent == party.kv_payload_sent + len(sync) * HEADER + control_sent
        assert party.bytes_received == received_kv + control_received


def test_publisher_only_sends_forwards(tiny):
    """Only the publisher decodes: K/V flows only to later parties (causal prefill), so party n
    receives sum_{m<n} T_m tokens per sync and the publisher, last, sends none."""
    model, _ = tiny
    lengths = [8, 13, 5]
    sync = every(2, 8)
    result = run_in_process(model, random_segments(lengths, seed=2), RunConfig(Schedule(8, sync), max_new_tokens=2))
    per_token = 2 * 16 * 2 * 4
    assert [p.kv_payload_sent for p in result.parties] == [len(sync) * t * per_token for t in (8, 13, 0)]
    earlier = [0, 8, 8 + 13]
    senders = [0, 1, 2]
    for party, tokens, count in zip(result.parties, earlier, senders):
        control = 2 * HELLO + (0 if party.rank == 2 else SMALL)
        assert party.bytes_received == len(sync) * (tokens * per_token + count * HEADER) + control


@pytest.mark.parametrize(
    "schedule,sparsity,all_answers",
    [
        (Schedule(8, (0, 4)), Sparsity(), True),
        (Schedule(8, (), publisher_layers=all_layers(8)), Sparsity(), False),
        (
            Schedule(8, (1, 6), publisher_layers=all_layers(8), publisher_sync_every=3),
            Sparsity(comp=0.7, comm=0.4, seed=2),
            True,
        ),
        (Schedule(8, every(2, 8)), Sparsity(comp=0.5, comm=0.5, comp_publisher=1.0, comm_publisher=0.9, seed=1), False),
    ],
)
@pytest.mark.parametrize("codec_name", list(CODECS))
def test_wire_bytes_match_cost_model(tiny, one_torch_thread, schedule, sparsity, all_answers, codec_name):
    model, _ = tiny
    lengths = [9, 4, 12, 7]
    config = RunConfig(
        schedule, sparsity=sparsity, codec=get_codec(codec_name), max_new_tokens=3, all_answers=all_answers
    )
    result = run_in_process(model, random_segments(lengths, seed=6), config)
    costs = expected_costs(ModelDims.from_config(model.config), schedule, sparsity, config.codec, lengths, all_answers)
    for party, cost in zip(result.parties, costs):
        assert party.kv_payload_sent == cost.kv_bytes_sent
        assert party.bytes_sent == cost.wire_bytes_sent
        assert party.bytes_received == cost.wire_bytes_received


@pytest.mark.parametrize("codec_name", ["bfloat16", "int8", "int4", "int8-kivi", "int4-kivi"])
@pytest.mark.parametrize(
    "exchange,all_answers",
    [
        (Exchange(select="key-norm", budget=12000), True),
        (Exchange(select="attention", budget=7000, noise=0.3), False),
        (Exchange(select="random", budget=9000, noise=1.0), True),
    ],
)
def test_wire_bytes_match_cost_model_with_budget_selection_and_noise(
    tiny, one_torch_thread, codec_name, exchange, all_answers
):
    model, _ = tiny
    lengths = [9, 4, 12, 7]
    schedule = Schedule(8, (1, 6), publisher_layers=all_layers(8), publisher_sync_every=3)
    sparsity = Sparsity(comp=0.8, comm=0.7, seed=2)
    config = RunConfig(
        schedule,
        sparsity=sparsity,
        codec=get_codec(codec_name),
        exchange=exchange,
        max_new_tokens=3,
        all_answers=all_answers,
    )
    result = run_in_process(model, random_segments(lengths, seed=6), config)
    costs = expected_costs(
        ModelDims.from_config(model.config), schedule, sparsity, config.codec, lengths, all_answers, exchange
    )
    for party, cost in zip(result.parties, costs):
        assert party.kv_payload_sent == cost.kv_bytes_sent
        assert party.bytes_sent == cost.wire_bytes_sent
        assert party.bytes_received == cost.wire_bytes_received
    control = len(lengths) * HELLO + SMALL * (2 if all_answers else 1)
    assert sum(party.bytes_sent for party in result.parties) - control <= exchange.budget


@pytest.mark.parametrize("codec_name,per_token", [("int8", 2 * 2 * (16 + 4)), ("int4", 2 * 2 * (8 + 4))])
def test_per_token_quantized_bytes_follow_the_formula(tiny, one_torch_thread, codec_name, per_token):
    """Per-token codecs: 2 (K, V) x H_kv x (D * bits / 8 codes + 4 scale bytes) per token and sync."""
    model, _ = tiny
    lengths = [8, 13, 5]
    sync = every(3, 8)
    config = RunConfig(Schedule(8, sync), codec=get_codec(codec_name), max_new_tokens=2, all_answers=True)
    result = run_in_process(model, random_segments(lengths, seed=2), config)
    for party, length in zip(result.parties, lengths):
        assert party.kv_payload_sent == len(sync) * length * per_token


def test_qwen_example_from_spec():
    """Qwen2.5-0.5B (H_kv = 2, d_h = 64) in bf16: 512 bytes per token per sync block."""
    dims = ModelDims(num_layers=24, hidden=896, num_heads=14, num_kv_heads=2, head_dim=64, ffn=4864, vocab=151936)
    assert get_codec("bfloat16").payload_size(1, dims.num_kv_heads, dims.head_dim) == 512


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
