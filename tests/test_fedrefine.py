"""FedRefine's core (alignment, projectors, caches, the receiver's answer) against references
computed here: block maps and token mappings written out by hand, HF's own ``generate`` and its own
``past_key_values``, a greedy loop of HF's model (its own attention) over a cache built from the fused
store, and the projectors' arithmetic applied by hand. Tiny random models only: the receiver is
tiny-random (8 blocks, byte tokenizer with a chat template); sharers are tiny-random-wide (4 blocks,
same tokenizer) and a Gemma 3 model with tiny-random-gemma's tokenizer (a BPE with merges and a BOS,
no template); tiny-random-gemma itself for the sliding-window refusal."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from transformers import DynamicCache, Gemma3ForCausalLM, Qwen2ForCausalLM

from fedattn.errors import FedAttnError
from fedattn.runtime.blocks import SplitModel
from fedattn.runtime.decoding import Decoding, stop_rule
from fedattn.runtime.tiny_model import TINY_MODELS, build_tiny_gemma_tokenizer, build_tiny_model, build_tiny_tokenizer
from fedattn.systems.fedrefine import receiver as receiver_module
from fedattn.systems.fedrefine.alignment import (
    SharerInput,
    layer_map,
    pick_token,
    receiver_prompt,
    same_tokenizer,
    sent_blocks,
    sharer_input,
    sharer_request,
)
from fedattn.systems.fedrefine.caches import (
    SharerCache,
    cache_dims,
    fuse_into,
    pair_dims,
    read_sharer_cache,
    receiver_prefill,
)
from fedattn.systems.fedrefine.projector import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    PairDims,
    ProjectorInfo,
    ProjectorSet,
    ProjectorShape,
    load_projectors,
    parameter_count,
)
from fedattn.systems.fedrefine.receiver import Contribution, answer

MESSAGE = "What is two plus two? Say it."
NEW_TOKENS = 8
SMALL = ProjectorShape(width=16, depth=1, expansion=2)
# the keyword HF's forward takes a cache by ("past_key_values" is deprecated in transformers 5.25)
CACHE_WORD = "cache" if "cache" in inspect.signature(Qwen2ForCausalLM.forward).parameters else "past_key_values"


def seeded(seed: int, build):
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return build()
    finally:
        torch.random.set_rng_state(state)


@pytest.fixture(scope="module")
def receiver():
    """tiny-random: 8 blocks, 2 KV heads of 16, byte tokenizer with Qwen's chat template."""
    torch.set_num_threads(1)
    return build_tiny_model(TINY_MODELS["tiny-random"])


@pytest.fixture(scope="module")
def wide():
    """tiny-random-wide: 4 blocks, 2 KV heads of 24, the receiver's tokenizer."""
    return build_tiny_model(TINY_MODELS["tiny-random-wide"])


def build_gemma_sharer():
    """A sharer of another family and tokenizer: tiny-random-gemma's shape and tokenizer (merges, <bos>,
    no chat template; 3 blocks of 1 KV head of 24) with a sliding window of 64, which holds these
    prompts (its own window of 4 holds none of them)."""
    gemma, tokenizer = build_tiny_model(TINY_MODELS["tiny-random-gemma"])
    config = copy.deepcopy(gemma.config)
    config.sliding_window = 64
    return seeded(7, lambda: Gemma3ForCausalLM(config).eval()), tokenizer


@pytest.fixture(scope="module")
def gemma_sharer():
    return build_gemma_sharer()


def tokens_of(tokenizer, text: str) -> list[int]:
    """Ids of tokens named by hand ("|"-separated: byte-alphabet symbols, merges, specials)."""
    return tokenizer.convert_tokens_to_ids(text.split("|"))


def projectors_for(receiver_model, sharer_model, seed: int, gate: float | None = None) -> ProjectorSet:
    """Random projectors of this pair in evaluation mode; ``gate`` sets every gate logit."""
    dims = pair_dims(cache_dims(receiver_model), cache_dims(sharer_model))
    projectors = seeded(seed, lambda: ProjectorSet(ProjectorInfo("receiver", "sharer", dims, SMALL))).eval()
    if gate is not None:
        with torch.no_grad():
            for name, parameter in projectors.named_parameters():
                if name.endswith("gate_logit"):
                    parameter.fill_(gate)
    return projectors


def contribution(receiver_pair, sharer_pair, projectors: ProjectorSet, prompt, raw: bool = False) -> Contribution:
    """What a sharer sends for ``prompt``, read the way a sharer reads it."""
    (receiver_model, receiver_tokenizer), (sharer_model, sharer_tokenizer) = receiver_pair, sharer_pair
    request = sharer_request(prompt, receiver_tokenizer, same_tokenizer(receiver_tokenizer, sharer_tokenizer))
    reading = sharer_input(request, sharer_tokenizer, raw)
    blocks = sent_blocks(receiver_model.config.num_hidden_layers, sharer_model.config.num_hidden_layers)
    return Contribution(projectors, read_sharer_cache(sharer_model, reading, blocks), request.positions)


def store_entries(store, blocks: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [tuple(tensor.clone() for tensor in store[block].view()) for block in range(blocks)]


def changed_positions(before, after) -> set[int]:
    """Positions whose K or V differ in any block (both stores in prompt order)."""
    changed = set()
    for (key, value, positions), (fused_key, fused_value, fused_positions) in zip(before, after, strict=True):
        assert torch.equal(positions, fused_positions)
        differs = (key != fused_key).any(-1).any(0) | (value != fused_value).any(-1).any(0)
        changed |= set(positions[differs].tolist())
    return changed


# ---------------------------------------------------------------- block alignment


@pytest.mark.parametrize(
    ("receiver_blocks", "sharer_blocks", "expected"),
    [
        (24, 28, [t + 4 for t in range(24)]),  # receiver 0.5B, sharer 1.5B
        (24, 18, [0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]),
        (8, 4, [0, 0, 0, 0, 0, 1, 2, 3]),
        (4, 8, [4, 5, 6, 7]),
        (3, 3, [0, 1, 2]),
    ],
)
def test_layer_map_aligns_last_blocks(receiver_blocks, sharer_blocks, expected):
    assert layer_map(receiver_blocks, sharer_blocks) == expected
    assert sent_blocks(receiver_blocks, sharer_blocks) == sorted(set(expected))


def test_sent_blocks_by_hand():
    assert sent_blocks(24, 28) == list(range(4, 28))
    assert sent_blocks(24, 18) == list(range(18))
    assert sent_blocks(8, 4) == [0, 1, 2, 3]
    assert sent_blocks(4, 8) == [4, 5, 6, 7]
    with pytest.raises(ValueError):
        layer_map(0, 4)


# ---------------------------------------------------------------- token alignment


def test_gemma_tokenizer_splits_as_its_merges_say():
    """tiny-random-gemma's tokenizer, against its merges applied by hand (the mappings below rely on it)."""
    tokenizer = build_tiny_gemma_tokenizer()
    ids = tokenizer("the cat and the dog").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == "<bos>|the|Ġ|c|a|t|Ġ|and|Ġthe|Ġ|d|o|g".split("|")


def test_receiver_with_merges_to_byte_sharer_keeps_first_of_equals():
    """Receiver tokens " the", "and" re-encode to bytes of length 1 each: the first is kept."""
    receiving, sharing = build_tiny_gemma_tokenizer(), build_tiny_tokenizer()
    prompt = receiver_prompt(receiving, "the cat and the dog")
    assert prompt.ids == tokens_of(receiving, "<bos>|the|Ġ|c|a|t|Ġ|and|Ġthe|Ġ|d|o|g")
    assert (prompt.message_start, prompt.message_stop, prompt.fusable) == (1, 13, 12)
    request = sharer_request(prompt, receiving, same_tokenizer(receiving, sharing))
    assert request.ids is None
    assert request.positions == list(range(1, 12))  # the last token ("g") runs through the receiver alone
    assert request.pieces == ["the", " ", "c", "a", "t", " ", "and", " the", " ", "d", "o"]
    reading = sharer_input(request, sharing)
    opening = sharing("<|im_start|>user\n", add_special_tokens=False).input_ids
    assert opening == [sharing.convert_tokens_to_ids("<|im_start|>"), *tokens_of(sharing, "u|s|e|r|Ċ")]
    assert reading.ids == opening + tokens_of(sharing, "t|Ġ|c|a|t|Ġ|a|Ġ|Ġ|d|o")
    assert reading.sent == list(range(6, 17))


def test_byte_receiver_to_gemma_tokenizer_maps_each_byte_to_itself():
    """Every message token of the receiver (one byte) is one token of the sharer, the same symbol;
    the sharer's own opening (its <bos>) precedes them, and the receiver's template scaffolding is
    not fused."""
    receiving, sharing = build_tiny_tokenizer(), build_tiny_gemma_tokenizer()
    message = "the thing and a thin"
    prompt = receiver_prompt(receiving, message)
    opening = 1 + 5  # <|im_start|>, then "user\n" a byte each
    closing = 1 + 1 + 1 + 10  # <|im_end|>, "\n", <|im_start|>, "assistant\n"
    assert (prompt.message_start, prompt.message_stop) == (opening, opening + len(message))
    assert len(prompt.ids) == opening + len(message) + closing
    request = sharer_request(prompt, receiving, same_tokenizer(receiving, sharing))
    assert request.positions == list(range(opening, opening + len(message)))
    reading = sharer_input(request, sharing)
    symbols = receiving.convert_ids_to_tokens(prompt.ids[opening : opening + len(message)])
    assert reading.ids == [sharing.bos_token_id, *sharing.convert_tokens_to_ids(symbols)]
    assert reading.sent == list(range(1, 1 + len(message)))


@pytest.mark.parametrize("direction", ["byte receiver", "gemma receiver"])
def test_multibyte_character_maps_to_its_own_text(direction):
    """The character "é" is two byte tokens in both tokenizers; each decodes alone to U+FFFD, which
    is no part of the message. Both receiver positions stand for "é", whose sharer tokens ("Ã", "©")
    are equally long: the first, "Ã", is kept for both."""
    byte, bpe = build_tiny_tokenizer(), build_tiny_gemma_tokenizer()
    receiving, sharing = (byte, bpe) if direction == "byte receiver" else (bpe, byte)
    prompt = receiver_prompt(receiving, "café!", raw=True)
    start = prompt.message_start
    assert receiving.convert_ids_to_tokens(prompt.ids[start:]) == "c|a|f|Ã|©|!".split("|")
    request = sharer_request(prompt, receiving, same_tokenizer(receiving, sharing))
    assert request.pieces == ["c", "a", "f", "é", "é"]  # "!" is the prompt's last token: not fused
    reading = sharer_input(request, sharing, raw=True)
    assert sharing.convert_ids_to_tokens([reading.ids[at] for at in reading.sent]) == "c|a|f|Ã|Ã".split("|")


def test_same_tokenizer_reads_the_receivers_ids_at_every_fused_position(receiver, wide):
    tokenizer = receiver[1]
    assert same_tokenizer(tokenizer, wide[1])
    assert not same_tokenizer(tokenizer, build_tiny_gemma_tokenizer())
    prompt = receiver_prompt(tokenizer, MESSAGE)
    request = sharer_request(prompt, tokenizer, True)
    assert request.positions == list(range(len(prompt.ids) - 1))
    reading = sharer_input(request, wide[1])
    assert reading.ids == prompt.ids[:-1]
    assert reading.sent == list(range(len(prompt.ids) - 1))


def test_pick_token_longest_text_first_of_equals():
    bpe, byte = build_tiny_gemma_tokenizer(), build_tiny_tokenizer()
    assert pick_token(bpe, "thin") == bpe.convert_tokens_to_ids("th")  # "th" + "in": a tie, the first
    assert pick_token(bpe, "thing") == bpe.convert_tokens_to_ids("ing")  # "th" + "ing"
    assert pick_token(bpe, " and") == bpe.convert_tokens_to_ids("and")  # "Ġ" + "and"
    assert pick_token(bpe, " the") == bpe.convert_tokens_to_ids("Ġthe")
    assert pick_token(byte, " the") == byte.convert_tokens_to_ids("Ġ")
    with pytest.raises(FedAttnError):
        pick_token(bpe, "")


def test_receiver_prompt_of_a_bos_tokenizer_starts_with_its_bos():
    """A tokenizer that prepends <bos> itself (a post-processor, as Gemma 3's) keeps it in a raw
    prompt; one without a BOS gets none."""
    bpe = build_tiny_gemma_tokenizer()
    assert receiver_prompt(bpe, "the dog", raw=True).ids == tokens_of(bpe, "<bos>|the|Ġ|d|o|g")
    byte = build_tiny_tokenizer()
    assert receiver_prompt(byte, "the dog", raw=True).ids == tokens_of(byte, "t|h|e|Ġ|d|o|g")


# ---------------------------------------------------------------- the receiver's answer


def hf_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    with torch.inference_mode():
        output = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
    return output[0, len(ids) :].tolist()


def receiver_answer(receiver_pair, prompt, contributions) -> list[int]:
    model, tokenizer = receiver_pair
    result = answer(SplitModel(model), prompt, contributions, Decoding(), stop_rule(tokenizer, model), NEW_TOKENS)
    return result.token_ids


def test_closed_gates_answer_as_the_receiver_alone(receiver, wide):
    prompt = receiver_prompt(receiver[1], MESSAGE)
    projectors = projectors_for(receiver[0], wide[0], seed=1)  # untrained: gate logits 0
    assert projectors.open_gates() == 0
    shared = contribution(receiver, wide, projectors, prompt)
    assert receiver_answer(receiver, prompt, [shared]) == hf_greedy(receiver[0], prompt.ids, NEW_TOKENS)


def test_zero_projection_with_open_gates_answers_as_the_receiver_alone(receiver, gemma_sharer):
    prompt = receiver_prompt(receiver[1], MESSAGE)
    projectors = projectors_for(receiver[0], gemma_sharer[0], seed=2, gate=1.0)
    with torch.no_grad():
        for block in projectors.blocks:
            for path in (block.key, block.value):
                path.project_out.weight.zero_()
                path.project_out.bias.zero_()
    assert projectors.open_gates() == 2 * receiver[0].config.num_hidden_layers
    shared = contribution(receiver, gemma_sharer, projectors, prompt)
    assert receiver_answer(receiver, prompt, [shared]) == hf_greedy(receiver[0], prompt.ids, NEW_TOKENS)


# ---------------------------------------------------------------- fusion


@pytest.mark.parametrize("sharer_name", ["wide", "gemma_sharer"])
def test_fusion_changes_exactly_the_requested_positions(receiver, sharer_name, request):
    """Same tokenizer: all of the prompt's first N - 1 positions; another: the message's alone."""
    sharer = request.getfixturevalue(sharer_name)
    model, tokenizer = receiver
    prompt = receiver_prompt(tokenizer, MESSAGE)
    shared = contribution(receiver, sharer, projectors_for(model, sharer[0], seed=3, gate=1.0), prompt)
    if sharer_name == "wide":
        assert shared.positions == list(range(len(prompt.ids) - 1))
    else:
        assert shared.positions == list(range(prompt.message_start, prompt.message_stop))
    split = SplitModel(model)
    plain = store_entries(receiver_prefill(split, prompt.ids[:-1]), split.num_blocks)
    store = receiver_prefill(split, prompt.ids[:-1])
    fuse_into(store, shared.projectors, shared.cache, shared.positions)
    fused = store_entries(store, split.num_blocks)
    for block in range(split.num_blocks):  # every block, K and V, every requested position
        assert changed_positions(plain[block : block + 1], fused[block : block + 1]) == set(shared.positions)


def test_fused_entries_are_the_projectors_of_the_hand_aligned_sharer_blocks(receiver, wide):
    """The fused K/V at each receiver block equal its projector applied to the receiver's own entries
    and HF's own cache of the sharer block the spec's formula names (8 vs 4 blocks, by hand)."""
    model, tokenizer = receiver
    prompt = receiver_prompt(tokenizer, MESSAGE)
    projectors = projectors_for(model, wide[0], seed=4, gate=1.0)
    shared = contribution(receiver, wide, projectors, prompt)
    split = SplitModel(model)
    plain = store_entries(receiver_prefill(split, prompt.ids[:-1]), split.num_blocks)
    store = receiver_prefill(split, prompt.ids[:-1])
    fuse_into(store, projectors, shared.cache, shared.positions)
    with torch.inference_mode():
        sharer_cache = wide[0](torch.tensor([prompt.ids[:-1]]), use_cache=True).past_key_values
        for block, sharer_block in enumerate([0, 0, 0, 0, 0, 1, 2, 3]):
            key, value, _ = plain[block]
            layer = sharer_cache.layers[sharer_block]
            expected = projectors.fuse(block, key, value, layer.keys[0], layer.values[0])
            fused_key, fused_value, _ = store[block].view()
            torch.testing.assert_close(fused_key, expected[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(fused_value, expected[1], rtol=1e-5, atol=1e-6)


def test_answer_decodes_over_the_fused_cache_as_hf_does(receiver, wide, monkeypatch):
    """The last prompt token and the generated ones run through the receiver alone over the fused
    prefix: an HF greedy loop with HF's own attention, its cache built from the fused entries of
    positions 0..N-2, writes the same tokens and the same entries at positions >= N - 1; and the
    fused answer's entries there differ from the unfused run's (through attention only)."""
    model, tokenizer = receiver
    prompt = receiver_prompt(tokenizer, MESSAGE)
    shared = contribution(receiver, wide, projectors_for(model, wide[0], seed=5, gate=1.0), prompt)
    stores = []
    prefill = receiver_module.receiver_prefill

    def recording_prefill(*args, **kwargs):
        stores.append(prefill(*args, **kwargs))
        return stores[-1]

    monkeypatch.setattr(receiver_module, "receiver_prefill", recording_prefill)
    fused_tokens = receiver_answer(receiver, prompt, [shared])
    plain_tokens = receiver_answer(receiver, prompt, [])
    fused_store, plain_store = stores
    last = len(prompt.ids) - 1
    cache = DynamicCache(config=model.config)
    for block in range(model.config.num_hidden_layers):
        key, value, positions = fused_store[block].view()
        assert positions.tolist() == list(range(last + len(fused_tokens)))  # the last new token is never fed
        cache.update(key[None, :, :last].clone(), value[None, :, :last].clone(), block)
    tokens, token = [], prompt.ids[-1]
    with torch.inference_mode():
        for position in range(last, last + NEW_TOKENS):
            logits = model(
                torch.tensor([[token]]), position_ids=torch.tensor([[position]]), use_cache=True, **{CACHE_WORD: cache}
            ).logits
            token = int(logits[0, -1].argmax())
            tokens.append(token)
    assert fused_tokens == tokens
    assert plain_tokens == hf_greedy(model, prompt.ids, NEW_TOKENS)
    for block in range(model.config.num_hidden_layers):
        key, value, _ = fused_store[block].view()
        layer = cache.layers[block]
        stored = key.shape[1]
        torch.testing.assert_close(key[:, last:], layer.keys[0, :, last:stored], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(value[:, last:], layer.values[0, :, last:stored], rtol=1e-4, atol=1e-5)
        plain_key = plain_store[block].view()[0]
        if block > 0:  # block 0's K of the last prompt token depends on its embedding alone
            assert not torch.allclose(key[:, last], plain_key[:, last])
    assert fused_tokens != plain_tokens


def test_two_sharers_fuse_one_after_the_other(receiver, wide, gemma_sharer):
    model, tokenizer = receiver
    prompt = receiver_prompt(tokenizer, MESSAGE)
    first = contribution(receiver, wide, projectors_for(model, wide[0], seed=6, gate=1.0), prompt)
    second = contribution(receiver, gemma_sharer, projectors_for(model, gemma_sharer[0], seed=7, gate=1.0), prompt)
    split = SplitModel(model)
    store = receiver_prefill(split, prompt.ids[:-1])
    by_hand = store_entries(store, split.num_blocks)
    for shared, sharer_blocks in ((first, [0, 0, 0, 0, 0, 1, 2, 3]), (second, [0, 0, 0, 0, 0, 0, 1, 2])):
        fuse_into(store, shared.projectors, shared.cache, shared.positions)
        at = torch.tensor(shared.positions)
        for block, sharer_block in enumerate(sharer_blocks):
            key, value, _ = by_hand[block]
            sharer_key, sharer_value = shared.cache.block(sharer_block)
            with torch.inference_mode():
                key[:, at], value[:, at] = shared.projectors.fuse(
                    block, key[:, at], value[:, at], sharer_key, sharer_value
                )
    for block, (key, value, _) in enumerate(by_hand):
        fused_key, fused_value, _ = store[block].view()
        assert torch.equal(fused_key, key) and torch.equal(fused_value, value)


# ---------------------------------------------------------------- projectors


def test_parameter_count_by_hand():
    """Receiver 2 blocks of 1 KV head of 2, sharer 1 head of 2, width 4, one block, expansion 1:
    project_in 4*4+4, norm 4, up 4*4+4, down 4*4+4, project_out 4*2+2, weight head 4+1, gate 1 = 80
    per path; 2 paths x 2 blocks."""
    dims = PairDims(2, 1, 2, 3, 1, 2)
    assert parameter_count(dims, ProjectorShape(width=4, depth=1, expansion=1)) == 320


def test_parameter_count_of_c2cs_own_shape_is_c2cs_reported_size():
    """C2C: width 1024, 3 MLP blocks, 478M trainable parameters for a Qwen3-0.6B receiver (28 blocks,
    8 KV heads of 128) with a Qwen2.5-0.5B sharer (2 KV heads of 64); its MLP blocks keep the width
    (expansion 1)."""
    dims = PairDims(28, 8, 128, 24, 2, 64)
    assert round(parameter_count(dims, ProjectorShape(width=1024, depth=3, expansion=1)) / 1e6) == 478


@pytest.mark.parametrize(
    ("dims", "shape"),
    [
        (PairDims(8, 2, 16, 4, 2, 24), ProjectorShape()),
        (PairDims(3, 1, 24, 8, 2, 16), ProjectorShape(width=8, depth=0)),
        (PairDims(4, 4, 8, 2, 1, 32), ProjectorShape(width=32, depth=3, expansion=1)),
    ],
)
def test_parameter_count_equals_the_built_modules(dims, shape):
    projectors = ProjectorSet(ProjectorInfo("r", "s", dims, shape))
    assert parameter_count(dims, shape) == sum(parameter.numel() for parameter in projectors.parameters())


def gate_probe() -> tuple[ProjectorSet, torch.Tensor, torch.Tensor]:
    """A projector whose projection is 1 everywhere and whose head weight is 1: fused - own = gate."""
    dims = PairDims(1, 2, 4, 1, 1, 4)
    projectors = seeded(8, lambda: ProjectorSet(ProjectorInfo("r", "s", dims, SMALL)))
    with torch.no_grad():
        for path in (projectors.blocks[0].key, projectors.blocks[0].value):
            path.project_out.weight.zero_()
            path.project_out.bias.fill_(1.0)
            path.weight_head.weight.zero_()
            path.weight_head.bias.fill_(100.0)
    own = torch.randn(2, 64, 4, generator=torch.Generator().manual_seed(0))
    sharer = torch.randn(1, 64, 4, generator=torch.Generator().manual_seed(1))
    return projectors, own, sharer


def test_gate_is_gumbel_in_training_and_hard_at_evaluation():
    projectors, own, sharer = gate_probe()
    torch.manual_seed(0)
    gate = projectors.train().fuse(0, own, own, sharer, sharer)[0] - own
    assert torch.allclose(gate, gate[..., :1].expand_as(gate), atol=1e-6)  # one gate per head and token
    assert bool((gate > 0).all() and (gate < 1).all())
    assert float(gate.detach().std()) > 0.1
    projectors.eval()
    assert torch.equal(projectors.fuse(0, own, own, sharer, sharer)[0], own)  # logit 0: closed
    with torch.no_grad():
        projectors.blocks[0].key.gate_logit.fill_(0.25)
    assert torch.allclose(projectors.fuse(0, own, own, sharer, sharer)[0] - own, torch.ones_like(own))
    assert projectors.open_gates() == 1


def test_temperature_anneals_geometrically():
    projectors = ProjectorSet(ProjectorInfo("r", "s", PairDims(1, 1, 2, 1, 1, 2), ProjectorShape(anneal_steps=1000)))
    assert projectors.temperature == 1.0
    for step, expected in ((0, 1.0), (500, math.sqrt(0.001)), (250, 0.001**0.25), (1000, 0.001), (5000, 0.001)):
        projectors.anneal(step)
        assert projectors.temperature == pytest.approx(expected, rel=1e-9)


def test_save_and_load_give_the_same_fused_outputs(receiver, wide, tmp_path):
    projectors = projectors_for(receiver[0], wide[0], seed=9, gate=0.5)
    projectors.save(tmp_path)
    loaded = load_projectors(tmp_path)
    assert not loaded.training and loaded.info.dims == projectors.info.dims and loaded.info.shape == SMALL
    own = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    sharer = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        for block in range(8):
            assert all(
                torch.equal(a, b)
                for a, b in zip(
                    projectors.fuse(block, own, own, sharer, sharer), loaded.fuse(block, own, own, sharer, sharer)
                )
            )


def saved_projectors(directory, dims=PairDims(2, 1, 4, 2, 1, 4), shape=SMALL) -> ProjectorSet:
    projectors = ProjectorSet(ProjectorInfo("r", "s", dims, shape))
    projectors.save(directory)
    return projectors


def assert_refused(directory) -> str:
    with pytest.raises(FedAttnError) as caught:
        load_projectors(directory)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_load_refuses_a_wrong_shape(tmp_path):
    saved_projectors(tmp_path / "small", shape=ProjectorShape(width=8))
    saved_projectors(tmp_path / "large", shape=ProjectorShape(width=16))
    (tmp_path / "small" / CONFIG_FILE).write_text((tmp_path / "large" / CONFIG_FILE).read_text())
    assert "does not match" in assert_refused(tmp_path / "small")


def test_load_refuses_non_finite_weights(tmp_path):
    projectors = saved_projectors(tmp_path)
    with torch.no_grad():
        projectors.blocks[1].value.project_in.weight[0, 0] = float("nan")
    projectors.save(tmp_path)
    assert "non-finite" in assert_refused(tmp_path)


@pytest.mark.parametrize("damage", ["no config", "no weights", "garbage weights", "garbage config"])
def test_load_refuses_missing_or_unreadable_files(tmp_path, damage):
    saved_projectors(tmp_path)
    if damage == "no config":
        (tmp_path / CONFIG_FILE).unlink()
    elif damage == "no weights":
        (tmp_path / WEIGHTS_FILE).unlink()
    elif damage == "garbage weights":
        (tmp_path / WEIGHTS_FILE).write_bytes(b"\x00" * 5 + b"not a safetensors file")
    else:
        (tmp_path / CONFIG_FILE).write_text("[1, 2]")
    assert_refused(tmp_path)


# ---------------------------------------------------------------- sharer caches


def test_sharer_cache_is_hfs_own_at_the_sent_positions(gemma_sharer):
    model, tokenizer = gemma_sharer
    ids = tokenizer("the thing and the cat").input_ids
    reading = SharerInput(ids, [1, 2, 4, 7])
    shared = read_sharer_cache(model, reading, [0, 2])
    assert isinstance(shared, SharerCache) and shared.tokens == 4
    with torch.inference_mode():
        cache = model(torch.tensor([ids]), use_cache=True).past_key_values
    for block in (0, 2):
        key, value = shared.block(block)
        assert torch.equal(key, cache.layers[block].keys[0][:, reading.sent])
        assert torch.equal(value, cache.layers[block].values[0][:, reading.sent])


def test_nothing_to_fuse_sends_empty_caches(receiver, wide):
    """A BOS and a one-token message, raw: the message token is the prompt's last, so nothing is
    fused; the sharer sends K/V of no tokens (it would run on nothing without a template) and the
    receiver's store stays its own."""
    prompt = receiver_prompt(build_tiny_gemma_tokenizer(), "a", raw=True)
    assert (prompt.message_start, prompt.fusable) == (1, 1)
    request = sharer_request(prompt, build_tiny_gemma_tokenizer(), False)
    assert request.positions == [] and request.pieces == []
    for raw in (True, False):  # without a template the sharer's input is empty
        shared = read_sharer_cache(wide[0], sharer_input(request, wide[1], raw), [0, 3])
        assert shared.tokens == 0 and tuple(shared.block(3)[0].shape) == (2, 0, 24)
    split = SplitModel(receiver[0])
    store = receiver_prefill(split, [5, 6, 7])
    before = store_entries(store, split.num_blocks)
    projectors = projectors_for(receiver[0], wide[0], seed=11, gate=1.0)
    fuse_into(store, projectors, shared, request.positions)
    assert changed_positions(before, store_entries(store, split.num_blocks)) == set()


@pytest.fixture(scope="module")
def windowed():
    """tiny-random-gemma: a sliding window of 4 in blocks 0 and 1, full attention in block 2."""
    return build_tiny_model(TINY_MODELS["tiny-random-gemma"])[0]


def test_sliding_window_sharer_refuses_a_prompt_longer_than_its_window(windowed):
    assert windowed.config.sliding_window == 4
    ids = list(range(10, 16))
    with pytest.raises(FedAttnError) as caught:
        read_sharer_cache(windowed, SharerInput(ids, list(range(6))), [0, 1, 2])
    assert "sliding window" in str(caught.value) and "\n" not in str(caught.value)
    short = [10, 11, 12]
    shared = read_sharer_cache(windowed, SharerInput(short, [0, 1, 2]), [0, 1, 2])
    with torch.inference_mode():
        cache = windowed(torch.tensor([short]), use_cache=True).past_key_values
    for block in (0, 1, 2):
        assert torch.equal(shared.block(block)[0], cache.layers[block].keys[0])
        assert torch.equal(shared.block(block)[1], cache.layers[block].values[0])
