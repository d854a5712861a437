"""FedSEA (split inference) in one process, against references computed here from plain forward
calls of the whole model: HF ``generate`` and its logits for every cut (A, C), a centralized
sampler loop, the model's own hidden states at the cuts, each client's solo answer when several
share a server, and the frame sizes of the spec's table written out by hand."""

from __future__ import annotations

import math
import struct
import threading
from dataclasses import replace

import pytest
import torch

from fedattn.errors import FedAttnError
from fedattn.network.kv_codec import CODECS
from fedattn.network.transport import InProcessGrid, InProcessTransport
from fedattn.runtime.attention import ATTENTION_NAME, federated_attention_enabled
from fedattn.runtime.blocks import RowStep, SplitModel
from fedattn.runtime.decoding import Decoding, StopRule, stop_rule
from fedattn.runtime.models import load_model
from fedattn.systems.fedsea import costs, inprocess
from fedattn.systems.fedsea.config import Noise, SplitConfig
from fedattn.systems.fedsea.inprocess import ClientQuery, run_in_process

PROMPT = [60, 61, 62, 63, 60, 61, 62, 64, 65, 60, 61, 33, 34]
OTHER_PROMPT = [70, 71, 72, 70, 71, 40]
NEW_TOKENS = 6
# the spec's frame table, by hand: preamble (magic 4, version 1, kind 1) then the fields
HELLO_BYTES = 6 + 2 + 4 + 2 + 2 + 1 + 1 + 4 + 4 + 4 + 8
ANSWER_BYTES = 6 + 1 + 2
HIDDEN_HEADER_BYTES = 6 + 1 + 1 + 4 + 4
DONE_BYTES = 6 + 8
KIND_HELLO, KIND_HIDDEN, KIND_DONE = 10, 12, 13


@pytest.fixture(scope="module")
def wide():
    """tiny-random-wide: 4 blocks, d = 96 (13 padding rows in its vocabulary)."""
    torch.set_num_threads(1)
    return load_model("tiny-random-wide", progress=False)


@pytest.fixture(scope="module")
def narrow():
    """tiny-random: 8 blocks, d = 64."""
    torch.set_num_threads(1)
    return load_model("tiny-random", progress=False)


def settings(
    blocks=(1, 1),
    codec="float32",
    noise=Noise(),
    reply_noise=Noise(),
    decoding=Decoding(),
    new=NEW_TOKENS,
    noise_seed=0,  # fixed: these tests compare runs
):
    return SplitConfig(tuple(blocks), noise, reply_noise, codec, decoding, new, noise_seed)


def recording_logits(split: SplitModel) -> list[torch.Tensor]:
    """Every vector of logits the client computes, in order (the server never calls the head)."""
    seen: list[torch.Tensor] = []
    head = split.logits

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        result = head(hidden)
        seen.append(result[-1].clone())
        return result

    split.logits = logits
    return seen


def full_logits(model, sequence: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([sequence])).logits[0, -1].float()


# -- equality with centralized generation ---------------------------------------------------------


def check_greedy_equals_generate(loaded, blocks, prompt=PROMPT, new=NEW_TOKENS):
    model = loaded.model
    split = SplitModel(model)
    seen = recording_logits(split)
    stop = stop_rule(loaded.tokenizer, model)
    result = run_in_process(split, loaded.identity, [ClientQuery(prompt, settings(blocks, new=new), stop)], limit=8)
    with torch.no_grad():
        reference = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=new,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    expected = reference.sequences[0, len(prompt) :].tolist()
    assert result.clients[0].answer == expected, blocks
    assert len(seen) == len(expected) == len(reference.logits)
    for step, (ours, theirs) in enumerate(zip(seen, reference.logits, strict=True)):
        assert torch.allclose(ours, theirs[0].float(), atol=1e-4, rtol=0), (blocks, step)
        recomputed = full_logits(model, prompt + expected[:step])
        assert torch.allclose(ours, recomputed, atol=1e-4, rtol=0), (blocks, step)


def test_every_cut_of_four_blocks_equals_generate(wide):
    cuts = [(first, last) for first in range(1, 4) for last in range(1, 4) if first + last < 4]
    assert cuts == [(1, 1), (1, 2), (2, 1)]
    for blocks in cuts:
        check_greedy_equals_generate(wide, blocks)


@pytest.mark.parametrize("blocks", [(1, 1), (1, 6), (6, 1), (2, 3), (5, 2)])
def test_cuts_of_eight_blocks_equal_generate(narrow, blocks):
    check_greedy_equals_generate(narrow, blocks, prompt=OTHER_PROMPT, new=8)


@pytest.mark.parametrize(
    "decoding",
    [Decoding(0.9, top_k=12, seed=7), Decoding(1.3, top_p=0.8, seed=3), Decoding(0.7, top_k=30, top_p=0.95, seed=11)],
)
def test_seeded_sampling_equals_a_centralized_sampler(narrow, decoding):
    model = narrow.model
    stop = StopRule()
    config = settings((2, 3), decoding=decoding, new=10)
    result = run_in_process(SplitModel(model), narrow.identity, [ClientQuery(PROMPT, config, stop)])
    generator, sequence = decoding.generator(0), list(PROMPT)
    for _ in range(10):
        sequence.append(decoding.pick(full_logits(model, sequence), generator))
    assert result.clients[0].answer == sequence[len(PROMPT) :]
    greedy = run_in_process(SplitModel(model), narrow.identity, [ClientQuery(PROMPT, settings((2, 3), new=10), stop)])
    assert greedy.clients[0].answer != result.clients[0].answer  # the draws matter


# -- what the server receives ---------------------------------------------------------------------


class RecordingGrid(InProcessGrid):
    """The in-process grid, keeping every frame each party took, by receiver: (sender, frame)."""

    def __init__(self, names, timeout=60.0):
        super().__init__(names, timeout)
        self.taken: dict[int, list[tuple[int, bytes]]] = {rank: [] for rank in range(len(names))}

    def endpoint(self, rank):
        return RecordingTransport(self, rank)


class RecordingTransport(InProcessTransport):
    def _take(self, sender, what):
        frame = super()._take(sender, what)
        self._grid.taken[self.rank].append((sender, frame))
        return frame


@pytest.fixture
def recorded(monkeypatch):
    """The frames of the next ``run_in_process``: a list that the grid's record is put in."""
    grids: list[RecordingGrid] = []

    def grid(names, timeout=60.0):
        grids.append(RecordingGrid(names, timeout))
        return grids[-1]

    monkeypatch.setattr(inprocess, "InProcessGrid", grid)
    return grids


def parse_hidden(frame: bytes, with_positions: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A float32 hidden frame read by hand from the spec's table: codec, flags, tokens, width,
    positions (int32, client -> server only), then tokens x width floats."""
    codec, flags, tokens, width = struct.unpack_from("<BBII", frame, 6)
    assert (codec, flags) == (CODECS["float32"].code, int(with_positions))
    position_bytes = 4 * tokens if with_positions else 0
    assert len(frame) == HIDDEN_HEADER_BYTES + position_bytes + 4 * tokens * width
    positions = None
    if with_positions:
        positions = torch.tensor(struct.unpack_from(f"<{tokens}i", frame, HIDDEN_HEADER_BYTES))
    values = struct.unpack_from(f"<{tokens * width}f", frame, HIDDEN_HEADER_BYTES + position_bytes)
    return torch.tensor(values).view(tokens, width), positions


def test_the_server_receives_hidden_states_at_the_cut_and_nothing_else(wide, recorded):
    """Every frame the server takes is a hello, a hidden frame or done, of the sizes of the spec's
    table; the hidden frames hold the whole model's states after block A (T x d, then 1 x d each
    step) with positions, and its replies the states after block L - C, without."""
    model, width = wide.model, 96
    first, last = 1, 2
    result = run_in_process(SplitModel(model), wide.identity, [ClientQuery(PROMPT, settings((first, last)))])
    answer = result.clients[0].answer
    (grid,) = recorded
    taken = grid.taken[0]
    kinds = [frame[5] for _, frame in taken]
    assert kinds == [KIND_HELLO] + [KIND_HIDDEN] * NEW_TOKENS + [KIND_DONE]
    assert len(taken[0][1]) == HELLO_BYTES and len(taken[-1][1]) == DONE_BYTES
    with torch.no_grad():
        states = model(torch.tensor([PROMPT + answer]), output_hidden_states=True).hidden_states
    total = len(PROMPT) + len(answer)
    starts = [0] + list(range(len(PROMPT), total - 1))
    stops = [len(PROMPT)] + list(range(len(PROMPT) + 1, total))
    replies = [frame for _, frame in grid.taken[1][1:]]  # the client's: the answer to its hello, then replies
    for (_, frame), reply, start, stop in zip(taken[1:-1], replies, starts, stops, strict=True):
        sent, positions = parse_hidden(frame, with_positions=True)
        assert sent.shape == (stop - start, width)
        assert positions.tolist() == list(range(start, stop))
        assert torch.allclose(sent, states[first][0, start:stop], atol=1e-5)
        returned, _ = parse_hidden(reply, with_positions=False)
        assert torch.allclose(returned, states[4 - last][0, start:stop], atol=1e-4)


# -- bytes against the cost model -----------------------------------------------------------------


def by_hand(bytes_per_value: int, width: int, prompt: int, answer: int) -> tuple[int, int]:
    """A float codec's session: up, the hello, T states with positions, N - 1 single ones and done;
    down, the answer and N replies without positions."""
    up = HELLO_BYTES + (HIDDEN_HEADER_BYTES + 4 * prompt + prompt * width * bytes_per_value)
    up += (answer - 1) * (HIDDEN_HEADER_BYTES + 4 + width * bytes_per_value) + DONE_BYTES
    down = ANSWER_BYTES + (HIDDEN_HEADER_BYTES + prompt * width * bytes_per_value)
    down += (answer - 1) * (HIDDEN_HEADER_BYTES + width * bytes_per_value)
    return up, down


@pytest.mark.parametrize("codec", list(CODECS))
def test_measured_bytes_equal_the_cost_model(wide, codec):
    result = run_in_process(SplitModel(wide.model), wide.identity, [ClientQuery(PROMPT, settings(codec=codec))])
    (client,) = result.clients
    assert len(client.answer) == NEW_TOKENS
    expected = costs.session_bytes(codec, 96, len(PROMPT), NEW_TOKENS)
    assert (client.transport.stats.bytes_sent, client.transport.stats.bytes_received) == (
        expected.client_sent,
        expected.client_received,
    )
    server = result.server.transport.stats
    assert (server.bytes_received, server.bytes_sent) == (expected.client_sent, expected.client_received)
    assert server.frames_received == NEW_TOKENS + 2 and server.frames_sent == NEW_TOKENS + 1


def test_a_one_token_answer_sends_the_prefill_alone(wide):
    config = settings(codec="bfloat16", new=1)
    result = run_in_process(SplitModel(wide.model), wide.identity, [ClientQuery(PROMPT, config)])
    stats = result.clients[0].transport.stats
    assert (stats.bytes_sent, stats.bytes_received) == by_hand(2, 96, len(PROMPT), 1)
    assert (stats.frames_sent, stats.frames_received) == (3, 2)  # hello, prefill, done; answer, reply


def test_the_cost_model_of_float_codecs_by_hand():
    for codec, size in (("float32", 4), ("bfloat16", 2), ("float16", 2)):
        for width, prompt, answer in ((96, 13, 6), (896, 500, 64), (64, 1, 1)):
            expected = costs.session_bytes(codec, width, prompt, answer)
            assert (expected.client_sent, expected.client_received) == by_hand(size, width, prompt, answer)
    # the spec's figure: Qwen2.5-0.5B (d = 896) in bfloat16, 1,792 bytes of states per token each way
    one_more = costs.session_bytes("bfloat16", 896, 100, 11)
    fewer = costs.session_bytes("bfloat16", 896, 100, 10)
    assert one_more.client_sent - fewer.client_sent == HIDDEN_HEADER_BYTES + 4 + 1792
    assert one_more.client_received - fewer.client_received == HIDDEN_HEADER_BYTES + 1792


# -- several clients on one server ----------------------------------------------------------------


def test_several_clients_get_their_solo_answers_from_batched_steps(narrow):
    """Three clients of different prompts, cuts, codecs and lengths: each gets what it gets alone,
    the server ran their steps together, and its bytes are the sum of their sessions."""
    queries = [
        ClientQuery(PROMPT, settings((1, 1), new=7)),
        ClientQuery(OTHER_PROMPT, settings((3, 2), codec="bfloat16", new=4)),
        ClientQuery(PROMPT[:5], settings((2, 5), decoding=Decoding(1.0, top_k=20, seed=5), new=9)),
    ]
    split = SplitModel(narrow.model)
    solo = [run_in_process(split, narrow.identity, [query]).clients[0].answer for query in queries]
    together = run_in_process(split, narrow.identity, queries)
    assert [client.answer for client in together.clients] == solo
    assert [len(answer) for answer in solo] == [7, 4, 9]
    batches = [batch.clients for batch in together.server.trace]
    assert batches[0] == ["client1", "client2", "client3"]  # the three prefills in one call
    assert sum(len(clients) == 3 for clients in batches) == 4  # until client2 finishes
    assert len(batches) == 9  # one call per round: the longest answer's
    received = sent = 0
    for client, query in zip(together.clients, queries, strict=True):
        expected = costs.session_bytes(query.config.hidden_codec, 64, len(query.prompt), len(client.answer))
        assert client.transport.stats.bytes_sent == expected.client_sent
        received, sent = received + expected.client_sent, sent + expected.client_received
    stats = together.server.transport.stats
    assert (stats.bytes_received, stats.bytes_sent) == (received, sent)


def test_a_refused_client_is_told_why(wide):
    with pytest.raises(FedAttnError, match=r"server refused the session: .*serves A and C in 1\.\.1"):
        run_in_process(SplitModel(wide.model), wide.identity, [ClientQuery(PROMPT, settings((1, 2)))], limit=1)


# -- noise ----------------------------------------------------------------------------------------


def noise_settings(level: float, relative: bool = False, seed: int = 0) -> SplitConfig:
    return settings((1, 1), noise=Noise(level, relative), noise_seed=seed)


def test_noise_off_is_bit_identical_to_no_noise_option(wide, recorded):
    """--noise 0 and --noise-relative 0 send the very bytes of a run without the option."""
    split = SplitModel(wide.model)
    runs = []
    for config in (settings((1, 1)), noise_settings(0.0), noise_settings(0.0, relative=True)):
        answer = run_in_process(split, wide.identity, [ClientQuery(PROMPT, config)]).clients[0].answer
        runs.append((answer, recorded[-1].taken[0], recorded[-1].taken[1]))
    assert runs[0] == runs[1] == runs[2]


def test_noise_on_the_wire_is_the_level_reproducible_and_changes_the_answer(wide, recorded):
    split = SplitModel(wide.model)

    def run(config):
        answer = run_in_process(split, wide.identity, [ClientQuery(PROMPT, config)]).clients[0].answer
        return answer, [frame for _, frame in recorded[-1].taken[0]]

    clean_answer, clean = run(settings((1, 1)))
    level = 0.05
    noisy_answer, noisy = run(noise_settings(level, seed=4))
    assert run(noise_settings(level, seed=4)) == (noisy_answer, noisy)
    assert run(noise_settings(level, seed=5))[1][1] != noisy[1]
    # the prefill's states are the same before noise: what differs on the wire is the noise itself
    difference = parse_hidden(noisy[1], True)[0] - parse_hidden(clean[1], True)[0]
    assert abs(float(difference.abs().mean()) / level - 1) < 0.1
    secret = replace(noise_settings(level), noise_seed=None)  # the default: a fresh secret seed per session
    assert run(secret)[1][1] != run(secret)[1][1]
    relative_answer, relative = run(noise_settings(0.5, relative=True))
    clean_states = parse_hidden(clean[1], True)[0]
    difference = parse_hidden(relative[1], True)[0] - clean_states
    assert abs(float(difference.abs().mean()) / (0.5 * float(clean_states.abs().mean())) - 1) < 0.1
    loud_answer, _ = run(noise_settings(20.0, relative=True))
    assert loud_answer != clean_answer


def test_reply_noise_is_added_by_the_server(wide, recorded):
    split = SplitModel(wide.model)
    run_in_process(split, wide.identity, [ClientQuery(PROMPT, settings((1, 1)))])
    clean = recorded[-1].taken[1][1][1]
    config = settings((1, 1), reply_noise=Noise(0.05))
    run_in_process(split, wide.identity, [ClientQuery(PROMPT, config)])
    noisy = recorded[-1].taken[1][1][1]
    difference = parse_hidden(noisy, False)[0] - parse_hidden(clean, False)[0]
    assert abs(float(difference.abs().mean()) / 0.05 - 1) < 0.1


def test_hidden_noise_has_the_mean_absolute_level():
    from fedattn.privacy.noise import add_hidden_noise, hidden_noise_sigma

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(400, 500, generator=generator) * 3.0 + 1.0
    for level, relative, mean_abs in ((0.02, False, 0.02), (0.3, True, 0.3 * float(hidden.abs().mean()))):
        sigma = hidden_noise_sigma(hidden, level, relative)
        assert sigma == pytest.approx(mean_abs * math.sqrt(math.pi / 2), rel=1e-6)
        noise = add_hidden_noise(hidden, level, relative, torch.Generator().manual_seed(1)) - hidden
        assert float(noise.abs().mean()) == pytest.approx(mean_abs, rel=0.02)
        assert float(noise.std()) == pytest.approx(sigma, rel=0.02)
    assert add_hidden_noise(hidden, 0.0, True, generator) is hidden
    with pytest.raises(FedAttnError):
        add_hidden_noise(hidden, float("nan"), False)


def test_a_decode_step_batched_with_another_rows_prefill_is_its_solo_step(narrow):
    """A service batches whatever is pending: one row's one-token step beside another's whole
    prompt (padded to it), over different block ranges, gives each row what it gets alone."""
    split = SplitModel(narrow.model)

    def rows(stores):
        embed = split.embed
        prefill = RowStep(embed(PROMPT), torch.arange(len(PROMPT)), stores[0], 1, 5)
        step = RowStep(embed([33]), torch.tensor([len(PROMPT)]), stores[0], 1, 5)
        other = RowStep(embed(OTHER_PROMPT), torch.arange(len(OTHER_PROMPT)), stores[1], 3, 7)
        return prefill, step, other

    alone = [split.new_store(), split.new_store()]
    prefill, step, other = rows(alone)
    split.run([prefill])
    expected = split.run([step])[0], split.run([other])[0]
    together = [split.new_store(), split.new_store()]
    prefill, step, other = rows(together)
    split.run([prefill])
    got = split.run([step, other])
    assert got[0].shape == (1, 64) and got[1].shape == (len(OTHER_PROMPT), 64)
    for ours, theirs in zip(got, expected, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)


def test_the_hook_stays_on_until_the_last_thread_inside_leaves(wide):
    """Queries of one service run forwards of one model in several threads: the first to leave
    must not switch the hook off under another's forward; the last restores the model's own."""
    model = wide.model
    own = model.config._attn_implementation
    first_inside, first_may_leave = threading.Event(), threading.Event()
    seen = []

    def first() -> None:
        with federated_attention_enabled(model):
            first_inside.set()
            first_may_leave.wait(10)
        seen.append(model.config._attn_implementation)  # the second is still inside

    thread = threading.Thread(target=first)
    thread.start()
    first_inside.wait(10)
    with federated_attention_enabled(model):
        first_may_leave.set()
        thread.join(10)
        seen.append(model.config._attn_implementation)
    assert seen == [ATTENTION_NAME, ATTENTION_NAME] and model.config._attn_implementation == own != ATTENTION_NAME
