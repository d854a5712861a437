"""A FedSEA server driven directly over an in-process grid by a hand-made fake client beside a real
one: every malformed hello or hidden frame is refused with its own reason to that client alone,
its session is dropped, and the real client's answer is still its solo answer; a finished
session's KV cache is freed."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from fedattn.errors import FedAttnError
from fedattn.network.kv_codec import CODECS
from fedattn.network.transport import InProcessGrid
from fedattn.runtime.blocks import SplitModel
from fedattn.runtime.decoding import Decoding, StopRule
from fedattn.runtime.models import load_model
from fedattn.systems.fedsea import frames
from fedattn.systems.fedsea.config import Noise, SplitConfig
from fedattn.systems.fedsea.inprocess import ClientQuery, run_in_process
from fedattn.systems.fedsea.roles import Client, Server, model_fingerprint

PROMPT = [60, 61, 62, 63, 60, 61, 62, 64, 65]
FAKE_TOKENS = 5  # the fake client's prompt
WIDTH = 96
LIMIT = 1  # the server's limit on A and C
CONFIG = SplitConfig((1, 1), Noise(), Noise(), "float32", Decoding(), 4)
SERVER, FAKE, GOOD = 0, 1, 2


@pytest.fixture(scope="module")
def wide():
    torch.set_num_threads(1)
    loaded = load_model("tiny-random-wide", progress=False)
    split = SplitModel(loaded.model)
    solo = run_in_process(split, loaded.identity, [ClientQuery(PROMPT, CONFIG)]).clients[0].answer
    return split, loaded.identity, solo


def hello(identity: str, **changes) -> bytes:
    fields = {
        "num_blocks": 4,
        "hidden_size": WIDTH,
        "first": 1,
        "last": 1,
        "codec": CODECS["float32"].code,
        "noise_mode": frames.NOISE_OFF,
        "noise": 0.0,
        "reply_noise": 0.0,
        "positions": 16,
        "model": model_fingerprint(identity),
    }
    return frames.encode_hello(frames.ClientHello(**(fields | changes)))


def hidden(tokens=FAKE_TOKENS, width=WIDTH, first=0, codec="float32") -> bytes:
    states = torch.full((tokens, width), 0.5)
    return frames.encode_hidden(states, CODECS[codec], torch.arange(first, first + tokens))


def prefill_then(frame: bytes) -> list[bytes]:
    """A good prefill, then ``frame`` as the first decode step."""
    return [hidden(), frame]


class Driven:
    """A server with a fake client (rank 1, raw frames) and a real one (rank 2), round by round."""

    def __init__(self, split: SplitModel, identity: str, fake_hello: bytes, fake_steps: list[bytes]) -> None:
        grid = InProcessGrid(["server", "fake", "good"], timeout=5.0)
        self.fake = grid.endpoint(FAKE)
        self.good = Client(GOOD, SERVER, grid.endpoint(GOOD), split, CONFIG, PROMPT, StopRule(), identity)
        self.server = Server(SERVER, grid.endpoint(SERVER), split, [FAKE, GOOD], identity, LIMIT)
        self.to_fake: list[bytes] = []
        self.good.send_hello()
        self.fake.send(fake_hello, [SERVER])
        self.server.receive_hellos()
        self.stores = {rank: weakref.ref(session.store) for rank, session in self.server.sessions.items()}
        self.good.receive_answer()
        self.to_fake.append(self.fake.recv(SERVER))
        steps = iter(fake_steps)
        for _ in range(20):
            if self.server.done:
                break
            self.good.send_step()
            fake_sent = FAKE in self.server.sessions
            if fake_sent:
                self.fake.send(next(steps, frames.encode_done(0)), [SERVER])
            self.server.serve()
            self.good.receive_step()
            if fake_sent and grid.pending():  # a reply or a refusal (none after done)
                self.to_fake.append(self.fake.recv(SERVER))
        assert self.server.done and self.good.done and not grid.pending()

    def reason(self) -> str | None:
        """The server's last word to the fake client, None when that was a hidden state or an acceptance."""
        last = self.to_fake[-1]
        return frames.decode_answer(last, "server") if last[5] == frames.KIND_SPLIT_ANSWER else None


REFUSED_HELLOS = {
    "no blocks left": ({"first": 2, "last": 2}, "A + C = 4 leaves no block of 4"),
    "A beyond the limit": ({"first": 2}, "client blocks 2,1: this server serves A and C in 1..1"),
    "C beyond the limit": ({"last": 2}, "client blocks 1,2: this server serves A and C in 1..1"),
    "A zero": ({"first": 0}, "client blocks 0,1"),
    "other weights": ({"model": b"\x01" * 8}, "weights differ"),
    "other width": ({"hidden_size": 64}, "4 blocks of width 64; this server runs 4 of width 96"),
    "other depth": ({"num_blocks": 8}, "8 blocks of width 96"),
    "too many positions": ({"positions": 5000}, "5000 positions: the model has 4096"),
    "unknown codec": ({"codec": 99}, "unknown hidden codec 99"),
}


@pytest.mark.parametrize("case", list(REFUSED_HELLOS))
def test_a_bad_hello_is_refused_and_the_other_client_is_served(wide, case):
    split, identity, solo = wide
    changes, reason = REFUSED_HELLOS[case]
    driven = Driven(split, identity, hello(identity, **changes), [])
    assert len(driven.to_fake) == 1
    assert reason in driven.reason()
    assert driven.server.refused == {"fake": driven.reason()}
    assert driven.good.answer == solo
    assert [batch.clients for batch in driven.server.trace] == [["good"]] * len(solo)


def test_a_truncated_hello_is_refused(wide):
    split, identity, solo = wide
    driven = Driven(split, identity, hello(identity)[:-1], [])
    assert "37 bytes, expected 38" in driven.reason()
    assert driven.good.answer == solo


def nan_states() -> bytes:
    states = torch.zeros(FAKE_TOKENS, WIDTH)
    states[2, 7] = float("nan")
    return frames.encode_hidden(states, CODECS["float32"], torch.arange(FAKE_TOKENS))


def infinite_step() -> bytes:
    states = torch.zeros(1, WIDTH)
    states[0, 0] = float("inf")
    return frames.encode_hidden(states, CODECS["float32"], torch.tensor([FAKE_TOKENS]))


def miscounted() -> bytes:
    """A header that says one token more than the frame carries."""
    frame = bytearray(hidden())
    frame[8:12] = (FAKE_TOKENS + 1).to_bytes(4, "little")
    return bytes(frame)


BAD_STEPS = {
    "other hidden size": ([hidden(width=95)], "hidden size 95, the model's is 96"),
    "other codec": ([hidden(codec="float16")], "hidden states in float16, the session agreed on float32"),
    "unknown codec": ([hidden()[:6] + b"\x63" + hidden()[7:]], "unknown code 99"),
    "positions not from 0": ([hidden(first=1)], "positions 1..5, expected 0..4"),
    "a decode step that repeats a position": (prefill_then(hidden(1, first=4)), "positions 4..4, expected 5..5"),
    "a decode step that skips a position": (prefill_then(hidden(1, first=6)), "positions 6..6, expected 5..5"),
    "more tokens than announced": ([hidden(tokens=17)], "17 tokens, expected 1..16"),
    "no tokens": ([hidden(tokens=0)], "0 tokens, expected 1..16"),
    "a miscounted header": ([miscounted()], "1956 bytes, expected 2344 for 6 tokens"),
    "non-finite prefill": ([nan_states()], "non-finite hidden states"),
    "non-finite decode step": (prefill_then(infinite_step()), "non-finite hidden states"),
    "truncated": ([hidden()[:-3]], "1953 bytes, expected 1956 for 5 tokens"),
    "not a hidden frame": ([hello("00")], "kind 10, expected 12"),
    "a done beyond its positions": ([frames.encode_done(17)], "value 17 outside [0, 17)"),
}


@pytest.mark.parametrize("case", list(BAD_STEPS))
def test_a_bad_hidden_frame_drops_that_session_only(wide, case):
    split, identity, solo = wide
    steps, reason = BAD_STEPS[case]
    driven = Driven(split, identity, hello(identity), steps)
    assert frames.decode_answer(driven.to_fake[0], "server") is None  # accepted
    assert len(driven.to_fake) == len(steps) + 1  # a reply to each good step, then the refusal
    assert reason in driven.reason()
    assert driven.server.refused == {"fake": driven.reason()}
    assert driven.good.answer == solo
    assert not driven.server.sessions


def test_every_refusal_says_something_else(wide):
    """The reasons are each case's own (a mix-up of checks would repeat one)."""
    fragments = [reason for _, reason in REFUSED_HELLOS.values()] + [reason for _, reason in BAD_STEPS.values()]
    assert len(set(fragments)) == len(fragments) - 1  # the two non-finite cases share theirs


def test_a_finished_session_frees_its_kv_cache(wide):
    """held_bytes drops to 0 on done and nothing keeps the session's store alive."""
    split, identity, solo = wide
    grid = InProcessGrid(["server", "client"], timeout=5.0)
    client = Client(1, SERVER, grid.endpoint(1), split, CONFIG, PROMPT, StopRule(), identity)
    server = Server(SERVER, grid.endpoint(SERVER), split, [1], identity, LIMIT)
    client.send_hello()
    server.receive_hellos()
    client.receive_answer()
    store = weakref.ref(server.sessions[1].store)
    held = []
    while not client.finished:
        client.send_step()
        server.serve()
        client.receive_step()
        held.append(server.held_bytes())
    # blocks [1, 3) of 2 KV heads of 24 channels, K and V in float32: at least one entry per position
    assert all(size >= 2 * 2 * 2 * 24 * 4 * (len(PROMPT) + step) for step, size in enumerate(held))
    client.send_step()  # done
    server.serve()
    assert server.done and server.held_bytes() == 0
    gc.collect()
    assert store() is None
    assert client.answer == solo
    assert server.closed[0].answer_length == len(solo) and server.closed[0].prompt_length == len(PROMPT)


def test_a_dropped_session_frees_its_kv_cache(wide):
    split, identity, _ = wide
    driven = Driven(split, identity, hello(identity), prefill_then(hidden(1, first=9)))
    assert "positions 9..9, expected 5..5" in driven.reason()
    gc.collect()
    assert driven.stores[FAKE]() is None and driven.stores[GOOD]() is None


def client_facing_a_fake_server(split: SplitModel, identity: str, reply: bytes) -> Client:
    """A real client whose server accepts it, then answers its prefill with ``reply``."""
    grid = InProcessGrid(["server", "client"], timeout=5.0)
    server = grid.endpoint(SERVER)
    client = Client(1, SERVER, grid.endpoint(1), split, CONFIG, PROMPT, StopRule(), identity)
    client.send_hello()
    server.recv(1)
    server.send(frames.encode_answer(None), [1])
    client.receive_answer()
    client.send_step()
    server.recv(1)
    server.send(reply, [1])
    return client


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (frames.encode_answer("over capacity"), "server dropped the session: over capacity"),
        (frames.encode_hidden(torch.zeros(1, WIDTH), CODECS["float32"], None), "1 tokens, expected 9"),
        (frames.encode_hidden(torch.zeros(len(PROMPT), 64), CODECS["float32"], None), "hidden size 64"),
        (frames.encode_hidden(torch.zeros(len(PROMPT), WIDTH), CODECS["float32"], torch.arange(9)), "flags 1"),
        (frames.encode_hidden(torch.full((len(PROMPT), WIDTH), float("inf")), CODECS["float32"], None), "non-finite"),
    ],
)
def test_the_client_refuses_a_bad_reply_in_one_line(wide, reply, reason):
    split, identity, _ = wide
    with pytest.raises(FedAttnError, match=reason) as raised:
        client_facing_a_fake_server(split, identity, reply).receive_step()
    assert "\n" not in str(raised.value)
