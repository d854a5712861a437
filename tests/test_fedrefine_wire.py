"""FedRefine over the in-process grid: the answer is the core's own (``receiver.answer`` over caches
read directly, no wire) token for token, and the receiver alone (HF generate) when the gates are
closed; every byte is the cost model's, for every codec; a subset of the sharers answers as those
sharers alone; the rephrasing is all the sharers see; and a fake sharer's bad frames, or a sharer
asked for another model, end the query with the reason, naming the sender."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from refine_cases import QUESTION, RECEIVER, SHARERS, direct_answer, projectors_for

from fedattn.errors import FedAttnError, ProtocolError
from fedattn.network.frames import KV_HEADER
from fedattn.network.kv_codec import CODECS, get_codec
from fedattn.network.transport import InProcessGrid
from fedattn.runtime.attention import ATTENTION_NAME, federated_attention_enabled, native_attention
from fedattn.runtime.blocks import SplitModel
from fedattn.runtime.decoding import Decoding, stop_rule
from fedattn.runtime.models import KNOWN_MODELS, load_model, model_fingerprint, model_identity
from fedattn.runtime.prompting import tokenizer_fingerprint
from fedattn.systems.fedrefine import costs, frames, protocol
from fedattn.systems.fedrefine.alignment import receiver_prompt
from fedattn.systems.fedrefine.caches import CacheDims
from fedattn.systems.fedrefine.config import RefineConfig, SharerSpec
from fedattn.systems.fedrefine.projector import load_projectors
from fedattn.systems.fedrefine.query import RefineSetup, answer_chat
from fedattn.systems.fedrefine.roles import Receiver, Sharer, SharerPlan

NEW_TOKENS = 4


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    receiver = load_model(RECEIVER, progress=False)
    others = ("tiny-random-renumbered", "tiny-random-gemma")  # other tokenizers (Gemma: another family too)
    sharers = [load_model(name, progress=False) for name in (*SHARERS, *others)]
    return receiver, sharers


def setup_of(models, indices=(0, 1), codec="float32", open_gates=True, rephrase=False) -> RefineSetup:
    receiver, sharers = models
    chosen = [sharers[index] for index in indices]
    projectors = [projectors_for(receiver, sharer, open_gates, seed=index) for index, sharer in zip(indices, chosen)]
    config = RefineConfig(tuple(SharerSpec(sharer.name) for sharer in chosen), codec, rephrase, Decoding(), NEW_TOKENS)
    return RefineSetup(config, receiver, chosen, projectors, "cpu", "float32")


def test_the_answer_is_the_cores_own_and_fusion_changes_it(models):
    setup = setup_of(models)
    report = answer_chat(setup, QUESTION)
    pairs = list(zip(setup.sharers, setup.projectors))
    assert report.answer_token_ids == direct_answer(setup.receiver, pairs, QUESTION, NEW_TOKENS)
    assert report.answer_token_ids != direct_answer(setup.receiver, [], QUESTION, NEW_TOKENS)


def test_closed_gates_answer_as_the_receiver_alone_does_in_hf_generate(models):
    setup = setup_of(models, open_gates=False)
    receiver = setup.receiver
    ids = torch.tensor([receiver_prompt(receiver.tokenizer, QUESTION).ids])
    reference = receiver.model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert answer_chat(setup, QUESTION).answer_token_ids == reference[0, ids.shape[1] :].tolist()


def test_another_tokenizer_sends_token_texts_and_answers_as_the_core(models):
    setup = setup_of(models, indices=(2,))
    report = answer_chat(setup, QUESTION)
    (entry,) = report.details["sharers"]
    assert entry["same_tokenizer"] is False
    prompt = receiver_prompt(setup.receiver.tokenizer, QUESTION)
    assert entry["tokens"] == prompt.message_stop - prompt.message_start  # the message alone is fused
    pairs = list(zip(setup.sharers, setup.projectors))
    assert report.answer_token_ids == direct_answer(setup.receiver, pairs, QUESTION, NEW_TOKENS)
    assert_bytes_are_the_cost_models(report)


def test_a_gemma_sharer_answers_within_its_window_and_refuses_beyond_it(models):
    # tiny-random-gemma: another family and tokenizer (BPE, <bos>, no template), a window of 4 in its
    # first blocks, so it holds the whole of at most 3 tokens: <bos> and two receiver tokens
    setup = setup_of(models, indices=(3,))
    setup.raw = True
    report = answer_chat(setup, "Hi?")
    (entry,) = report.details["sharers"]
    assert (entry["same_tokenizer"], entry["tokens"]) == (False, 2)
    pairs = list(zip(setup.sharers, setup.projectors))
    assert report.answer_token_ids == direct_answer(setup.receiver, pairs, "Hi?", NEW_TOKENS, raw=True)
    assert_bytes_are_the_cost_models(report)
    with pytest.raises(FedAttnError, match="sharer1 refused: the sharer's block 0 keeps 3 of the prompt's 5 tokens"):
        answer_chat(setup, "Mars?")


def assert_bytes_are_the_cost_models(report) -> None:
    for party in report.parties:
        assert (party.bytes_sent, party.bytes_received) == (party.expected_bytes_sent, party.expected_bytes_received)
    for entry in report.details["sharers"]:
        assert entry["bytes_to_sharer"] == entry["expected_bytes_to_sharer"]
        assert entry["bytes_from_sharer"] == entry["expected_bytes_from_sharer"]
    assert report.measured_bytes == report.expected_bytes


@pytest.mark.parametrize("codec", list(CODECS))
def test_bytes_equal_the_cost_model_for_every_codec(models, codec):
    setup = setup_of(models, codec=codec)
    report = answer_chat(setup, QUESTION)
    assert_bytes_are_the_cost_models(report)
    # the cache by hand: one whole-segment K/V frame per sent block (the receiver's 8 blocks map
    # onto all 4 of the wide sharer's and both of the draft's)
    tokens = len(receiver_prompt(setup.receiver.tokenizer, QUESTION).ids) - 1
    for entry, (blocks, heads, head_dim) in zip(report.details["sharers"], [(4, 2, 24), (2, 2, 8)]):
        payload = get_codec(codec).payload_size(tokens, heads, head_dim)
        assert entry["blocks"] == blocks and entry["tokens"] == tokens
        assert entry["bytes_from_sharer"] == frames.ANSWER.size + blocks * (KV_HEADER.size + payload)
        if codec == "float32":
            assert payload == tokens * 2 * heads * head_dim * 4


def test_a_bfloat16_cache_of_the_1_5b_sharer_for_the_0_5b_receiver_is_24576_bytes_per_token():
    # Qwen2.5-Coder-1.5B: 28 blocks, 2 KV heads of 128; the 0.5B receiver maps 24 of them:
    # 24 blocks x 2 (K and V) x 256 x 2 bytes = 24,576 per token, plus a 22-byte header per block
    sharer = CacheDims(28, 2, 128)
    assert costs.cache_bytes("bfloat16", 1, sharer, 24) == 24_576 + 24 * 22
    assert costs.cache_bytes("bfloat16", 100, sharer, 24) == 2_457_600 + 24 * 22
    assert costs.cache_bytes("bfloat16", 1, sharer, 28) == 28_672 + 28 * 22  # the spec's figure: all 28


def test_a_subset_of_the_sharers_answers_as_those_sharers_alone(models):
    setup = setup_of(models)
    report = answer_chat(setup, QUESTION, sharers=[1])
    assert [party.name for party in report.parties] == ["sharer2", "receiver"]
    only = [(setup.sharers[1], setup.projectors[1])]
    assert report.answer_token_ids == direct_answer(setup.receiver, only, QUESTION, NEW_TOKENS)
    reversed_order = answer_chat(setup, QUESTION, sharers=[1, 0])
    pairs = list(zip(setup.sharers, setup.projectors))[::-1]
    assert reversed_order.answer_token_ids == direct_answer(setup.receiver, pairs, QUESTION, NEW_TOKENS)
    assert_bytes_are_the_cost_models(report)


def test_rephrasing_is_all_the_sharers_read(models):
    setup = setup_of(models, indices=(0,), rephrase=True)
    report = answer_chat(setup, QUESTION)
    rephrasing = report.details["rephrasing"]
    assert rephrasing and rephrasing != QUESTION
    pairs = list(zip(setup.sharers, setup.projectors))
    assert report.answer_token_ids == direct_answer(setup.receiver, pairs, rephrasing, NEW_TOKENS)
    prompt = receiver_prompt(setup.receiver.tokenizer, rephrasing)
    assert report.details["sharers"][0]["tokens"] == len(prompt.ids) - 1
    assert report.parties[-1].timing["rephrase_s"] > 0


# -- a fake sharer ----------------------------------------------------------------------------------


def receiver_role(models, endpoint, plans: list[SharerPlan]) -> Receiver:
    receiver = models[0]
    config = RefineConfig(tuple(SharerSpec(plan.model) for plan in plans), "float32", False, Decoding(), NEW_TOKENS)
    stop = stop_rule(receiver.tokenizer, receiver.model)
    return Receiver(1, endpoint, receiver, SplitModel(receiver.model), config, QUESTION, False, plans, stop)


class FakeSharer:
    """A real receiver (rank 1) asking one sharer (rank 0) whose frames this test writes."""

    def __init__(self, models, plan_identity: str | None = None) -> None:
        receiver, sharers = models
        self.sharer = sharers[0]
        grid = InProcessGrid(["fake", "receiver"], timeout=5.0)
        self.endpoint = grid.endpoint(0)
        projectors = projectors_for(receiver, self.sharer, True)
        plan = SharerPlan(0, self.sharer.name, plan_identity or self.sharer.identity, projectors)
        self.receiver = receiver_role(models, grid.endpoint(1), [plan])
        self.receiver.send_hellos()
        self.hello = frames.decode_hello(self.endpoint.recv(1), "receiver")

    def accept(self) -> frames.Request:
        self.endpoint.send(frames.encode_answer(tokenizer_fingerprint(self.sharer.tokenizer), None), [1])
        self.receiver.send_requests()
        return frames.decode_request(self.endpoint.recv(1), "receiver", self.hello.tokens, 1 << 20)


def cache_frames(request: frames.Request, heads=2, head_dim=24, tokens=None, blocks=(0, 1, 2, 3), fill=0.5):
    count = request.count if tokens is None else tokens
    return [
        frames.encode_cache_block(
            block,
            torch.full((heads, count, head_dim), fill),
            torch.full((heads, count, head_dim), fill),
            request.first,
            CODECS["float32"],
        )
        for block in blocks
    ]


BAD_CACHES = {
    "wrong head count": (lambda r: cache_frames(r, heads=3), "shape 3 KV heads x 24, the model has 2 x 24"),
    "wrong head size": (lambda r: cache_frames(r, head_dim=16), "shape 2 KV heads x 16"),
    "wrong token count": (lambda r: cache_frames(r, tokens=r.count - 1), "tokens, the run's plan sends"),
    "NaN": (lambda r: cache_frames(r, fill=math.nan), "non-finite values"),
    "truncated": (lambda r: [cache_frames(r)[0][:-3]], "bytes where its header implies"),
    "header only part": (lambda r: [cache_frames(r)[0][:10]], "truncated KV frame"),
    "wrong kind": (lambda r: [frames.encode_request(r)], "kind 16, expected 2"),
    "blocks out of order": (lambda r: cache_frames(r, blocks=(1, 0, 2, 3)), "it is for block 1, out of order"),
    "refusal instead": (lambda r: [frames.encode_answer(None, "out of memory")], "fake refused: out of memory"),
}


@pytest.mark.parametrize("case", list(BAD_CACHES))
def test_a_bad_cache_from_a_sharer_is_refused_with_its_reason(models, case):
    fake = FakeSharer(models)
    request = fake.accept()
    build, reason = BAD_CACHES[case]
    for frame in build(request):
        fake.endpoint.send(frame, [1])
    with pytest.raises(FedAttnError) as error:
        fake.receiver.receive_caches()
    assert reason in str(error.value) and "fake" in str(error.value)
    assert "\n" not in str(error.value)
    if case != "refusal instead":
        assert isinstance(error.value, ProtocolError)


def test_the_request_carries_the_hello_and_ids_below_the_vocabulary(models):
    fake = FakeSharer(models)
    assert fake.hello.name == SHARERS[0] and fake.hello.receiver_blocks == 8
    request = fake.accept()
    prompt = receiver_prompt(models[0].tokenizer, QUESTION)
    assert request.ids == prompt.ids[:-1] and request.first == 0
    with pytest.raises(ProtocolError, match="token id 300 beyond the sharer's 300"):
        frames.decode_request(frames.encode_request(frames.Request(0, False, ids=[1, 300])), "r", 8, 300)


def test_a_sharer_asked_for_another_model_refuses_and_the_receiver_says_why(models):
    receiver, sharers = models
    grid = InProcessGrid(["sharer1", "receiver"], timeout=5.0)
    sharer = Sharer(0, 1, grid.endpoint(0), sharers[0], frames.MAX_TOKENS)
    # the receiver's projectors are the draft model's, while the party runs the wide one
    plan = SharerPlan(0, sharers[1].name, sharers[1].identity, projectors_for(receiver, sharers[1], True))
    own = receiver_role(models, grid.endpoint(1), [plan])
    with pytest.raises(
        FedAttnError, match="sharer1 refused: the receiver asks for tiny-random-draft .* runs tiny-random-wide"
    ):
        protocol.run([sharer, own])
    assert "tiny-random-draft" in sharer.refused and not grid.pending()


# -- a fake receiver --------------------------------------------------------------------------------


def sharer_answer(models, frames_in: list[bytes]) -> tuple[Sharer, list[bytes]]:
    """A real sharer (rank 0, the wide model) sent ``frames_in`` by a fake receiver (rank 1); what it sent back."""
    grid = InProcessGrid(["sharer", "fake"], timeout=5.0)
    fake = grid.endpoint(1)
    sharer = Sharer(0, 1, grid.endpoint(0), models[1][0], max_tokens=64)
    for frame in frames_in:
        fake.send(frame, [0])
    sharer.answer_hello()
    sharer.send_cache()
    sent = []
    while grid.pending():
        sent.append(fake.recv(0))
    return sharer, sent


def hello_for(models, **changes) -> bytes:
    wide = models[1][0]
    fields = {
        "model": model_fingerprint(wide.identity),
        "name": wide.name,
        "codec": CODECS["float32"].code,
        "receiver_blocks": 8,
        "tokens": 10,
    }
    return frames.encode_hello(frames.Hello(**(fields | changes)))


BAD_REQUESTS = {
    "another model": ([{"model": b"\x01" * 8}], None, "the receiver asks for tiny-random-wide (identity 0101"),
    "unknown codec": ([{"codec": 99}], None, "unknown KV codec 99"),
    "more tokens than served": ([{"tokens": 65}], None, "up to 65 tokens; this sharer serves 64"),
    "a request beyond its hello": ([{}], frames.Request(0, False, ids=list(range(11))), "11 tokens, the hello"),
    "an id beyond the vocabulary": ([{}], frames.Request(0, False, ids=[5, 400]), "token id 400 beyond"),
    "a truncated text": ([{}], b"truncate", "truncated after 1 of 2 token texts"),
    "a hello again": ([{}], b"hello", "kind 14, expected 16"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_hello_or_request_is_refused_with_its_reason(models, case):
    (changes,), request, reason = BAD_REQUESTS[case]
    sent = [hello_for(models, **changes)]
    if request == b"truncate":
        sent.append(frames.encode_request(frames.Request(0, False, pieces=["ab", "c"]))[:-2])
    elif request == b"hello":
        sent.append(hello_for(models))
    elif request is not None:
        sent.append(frames.encode_request(request))
    sharer, back = sharer_answer(models, sent)
    refusal = frames.decode_answer(back[-1], "sharer")
    assert not refusal.accepted and reason in refusal.reason and reason in sharer.refused
    assert sharer.done and len(back) == (1 if request is None else 2)


def test_a_good_request_is_answered_with_one_frame_per_mapped_block(models):
    request = frames.Request(3, False, pieces=["M", "ars", "?"])
    sharer, back = sharer_answer(models, [hello_for(models, receiver_blocks=2), frames.encode_request(request)])
    assert frames.decode_answer(back[0], "sharer").accepted and sharer.refused is None
    # a 2-block receiver maps the wide sharer's last two blocks; three texts, three tokens, positions 3..5
    shape = frames.CacheShape(CODECS["float32"], 2, 24, [2, 3], 3, 3)
    keys = [frames.decode_cache_block(frame, shape, index, "sharer")[0] for index, frame in enumerate(back[1:])]
    assert [key.shape for key in keys] == [torch.Size([2, 3, 24])] * 2


def test_a_sharer_without_a_projector_folder_uses_the_committed_one(models, tmp_path, monkeypatch):
    from fedattn.systems.fedrefine import config as refine_config

    monkeypatch.setattr(refine_config, "PROJECTORS", tmp_path)
    assert refine_config.default_projector_dir(RECEIVER, SHARERS[0]) is None
    (tmp_path / f"{RECEIVER}--{SHARERS[0]}").mkdir()  # a folder without a projector is none
    assert refine_config.default_projector_dir(RECEIVER, SHARERS[0]) is None
    receiver, sharers = models
    folder = tmp_path / f"{RECEIVER}--{SHARERS[0]}"
    projectors_for(receiver, sharers[0], True).save(folder)
    assert refine_config.default_projector_dir(RECEIVER, SHARERS[0]) == folder
    assert refine_config.projector_dir(RECEIVER, SharerSpec(SHARERS[0])) == folder
    assert refine_config.projector_dir(RECEIVER, SharerSpec(SHARERS[0], tmp_path / "own")) == tmp_path / "own"


def test_a_models_identity_without_loading_it_is_the_loaded_ones(models):
    receiver, sharers = models
    for loaded in (receiver, *sharers):
        assert model_identity(loaded.name) == loaded.identity
    assert model_identity("qwen2.5-coder-1.5b-instruct") == KNOWN_MODELS["qwen2.5-coder-1.5b-instruct"].sha256[:16]
    with pytest.raises(FedAttnError, match="unknown model 'no-such-model'"):
        model_identity("no-such-model")


@pytest.mark.parametrize("first", ["hook", "native"])
def test_a_models_own_attention_and_the_hook_exclude_each_other_across_threads(models, first):
    """A service's model is a sharer (HF's forward) and a receiver (the hook) at once: a sharer's read
    waits while the hook is on, and the hook waits while a read runs."""
    model = models[1][0].model
    contexts = {"hook": federated_attention_enabled, "native": native_attention}
    second = "native" if first == "hook" else "hook"
    seen: list[tuple[str, bool]] = []
    inside, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with contexts[first](model):
            inside.set()
            leave.wait(5)
            seen.append((first, model.config._attn_implementation == ATTENTION_NAME))

    def enter() -> None:
        with contexts[second](model):
            seen.append((second, model.config._attn_implementation == ATTENTION_NAME))

    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(5)
    waiter = threading.Thread(target=enter)
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and seen == []  # the second waits for the first to leave
    leave.set()
    holder.join(5)
    waiter.join(5)
    assert seen == [(first, first == "hook"), (second, second == "hook")]
    assert model.config._attn_implementation != ATTENTION_NAME


def test_loading_a_projector_draws_nothing_from_the_global_generator(models, tmp_path):
    """A service loads projectors while another query builds a tiny model from a seeded global
    generator (its identity): a draw in between would give that model other weights."""
    receiver, sharers = models
    saved = projectors_for(receiver, sharers[0], True)
    saved.save(tmp_path / "pair")
    before = torch.random.get_rng_state()
    loaded = load_projectors(tmp_path / "pair")
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), saved.state_dict().values()))
    assert loaded.open_gates() == saved.open_gates() == 16 and not loaded.training


def test_what_a_frame_cannot_carry_is_refused_in_one_line():
    with pytest.raises(FedAttnError, match="is 300 bytes; a hello carries 255"):
        frames.encode_hello(frames.Hello(bytes(8), "m" * 300, 1, 8, 10))
    with pytest.raises(FedAttnError, match="text of 0 bytes"):
        frames.encode_request(frames.Request(0, False, pieces=["a", ""]))
