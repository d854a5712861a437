"""The model runtime's shared pieces: one ModelDims (head_dim from the config, or hidden / heads) and one
seeded-generator recipe, checked against hand-computed byte counts, HF generate and the recipes
they replaced."""

import hashlib

import pytest
import torch
from conftest import random_segments
from transformers import Qwen2Config, Qwen3Config, Qwen3ForCausalLM

from fedattn.network.kv_codec import get_codec
from fedattn.privacy.noise import noise_generator
from fedattn.runtime.decoding import Decoding
from fedattn.runtime.dims import ModelDims
from fedattn.runtime.seeding import seeded_generator
from fedattn.systems.fedattn.config import RunConfig
from fedattn.systems.fedattn.costs import run_costs
from fedattn.systems.fedattn.inprocess import run_in_process
from fedattn.systems.fedattn.networked import max_frame_bytes
from fedattn.systems.fedattn.schedule import Schedule, every
from fedattn.systems.fedattn.sparsity import Sparsity, draw_sent, kept_indices

FLOAT32_BYTES = 4
WIDE_HEAD_DIM = 32  # a Qwen3-style config: 4 heads of 32 in a hidden size of 64 (hidden / heads would say 16)


def test_model_dims_derive_head_dim_only_when_the_config_has_none():
    implied = ModelDims.from_config(Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2))
    explicit = ModelDims.from_config(
        Qwen3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=WIDE_HEAD_DIM)
    )
    assert (implied.head_dim, explicit.head_dim) == (16, WIDE_HEAD_DIM)
    assert (explicit.num_heads, explicit.num_kv_heads, explicit.hidden) == (4, 2, 64)


@pytest.fixture(scope="module")
def wide_heads() -> Qwen3ForCausalLM:
    config = Qwen3Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=WIDE_HEAD_DIM,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).eval()
    torch.random.set_rng_state(state)
    return model


def test_explicit_head_dim_agrees_across_runner_cost_model_and_frame_limit(wide_heads):
    """K/V sent, as counted by the party, equals the formula with the config's head_dim, and so does
    the cost model and the networked frame limit."""
    lengths = [5, 3, 4]
    segments = random_segments(lengths, seed=6)
    config = RunConfig(Schedule(4, every(2, 4)), max_new_tokens=3)
    result = run_in_process(wide_heads, segments, config)
    per_token = 2 * 2 * WIDE_HEAD_DIM * FLOAT32_BYTES  # K and V, 2 KV heads
    publisher = len(lengths) - 1
    for rank, (party, length) in enumerate(zip(result.parties, lengths)):
        assert party.kv_payload_sent == (0 if rank == publisher else 2 * length * per_token)
    expected = run_costs(ModelDims.from_config(wide_heads.config), config, lengths)
    assert [party.bytes_sent for party in result.parties] == [cost.wire_bytes_sent for cost in expected]
    codec = get_codec("float32")
    assert max_frame_bytes(wide_heads.config, codec) - codec.payload_size(512, 2, WIDE_HEAD_DIM) == 22 + 4 * 512


def test_explicit_head_dim_is_centralized_at_h1(wide_heads):
    segments = random_segments([6, 4, 5], seed=7)
    config = RunConfig(Schedule(4, every(1, 4)), max_new_tokens=6)
    ours = run_in_process(wide_heads, segments, config).answer_token_ids
    ids = torch.tensor([sum(segments, [])])
    theirs = wide_heads.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1] :]
    assert ours == theirs.tolist()


def old_sha256_generator(text: str) -> torch.Generator:
    """The recipe sparsity and noise each wrote out before seeding.py (their draws must not change)."""
    digest = hashlib.sha256(text.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def test_sparse_draws_are_unchanged_by_the_one_recipe():
    sent = draw_sent(7, party=2, layer=5, num_kept=40, count=9)
    assert torch.equal(sent, torch.randperm(40, generator=old_sha256_generator("7:comm:2:5"))[:9].sort().values)
    kept = kept_indices(Sparsity(comp=0.5, seed=3), party=1, num_tokens=30, is_publisher=False)
    assert torch.equal(kept, torch.randperm(30, generator=old_sha256_generator("3:comp:1:-1"))[:15].sort().values)


def test_noise_draws_are_unchanged_by_the_one_recipe():
    ours = torch.randn(64, generator=noise_generator(11, 0, 3))
    assert torch.equal(ours, torch.randn(64, generator=old_sha256_generator("11:noise:0:3")))


def test_seeded_generators_differ_in_every_part():
    def draw(*parts):
        return torch.randint(0, 2**62, (4,), generator=seeded_generator(*parts)).tolist()

    assert draw(1, "decode", 0) == draw(1, "decode", 0)
    others = [draw(2, "decode", 0), draw(1, "noise", 0), draw(1, "decode", 1), draw(1, "decode", 0, 0)]
    assert len({tuple(values) for values in [draw(1, "decode", 0), *others]}) == 5


def test_sampling_generators_are_per_party_and_none_when_greedy():
    assert Decoding().generator(0) is None
    sampled = Decoding(temperature=0.7, seed=4)
    first, again, other = sampled.generator(0), sampled.generator(0), sampled.generator(1)
    assert torch.equal(torch.rand(8, generator=first), torch.rand(8, generator=again))
    assert not torch.equal(torch.rand(8, generator=sampled.generator(0)), torch.rand(8, generator=other))
