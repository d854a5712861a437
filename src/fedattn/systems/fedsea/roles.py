"""FedSEA's two roles: the client (embeddings, blocks [0, A) and [L - C, L), the head, the prompt and
the answer) and the server (blocks [A, L - C) of every client it serves, one session each).

Each side keeps the KV cache of its own blocks only (``runtime.blocks``), so after prefill one hidden
vector per new token crosses each way. The server never sees a token id, a mask or a logit: a
session's frames are hidden states with their positions, validated against what the session agreed
at its hello; a session that sends anything else is told why and dropped, and the others go on.

The server runs every pending step of its sessions in one call of its ``engine`` (by default its
model's ``SplitModel.run``; a service passes a batcher shared by its queries), so steps of
different clients share each block's weights; ``trace`` records which were batched together.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fedattn.errors import FedAttnError, ProtocolError
from fedattn.network.kv_codec import codec_by_code, get_codec
from fedattn.network.transport import Transport
from fedattn.privacy.noise import add_hidden_noise
from fedattn.runtime.blocks import RowStep, SplitModel
from fedattn.runtime.decoding import StopRule
from fedattn.runtime.kv_store import ParticipantKVStore
from fedattn.runtime.models import model_fingerprint
from fedattn.runtime.seeding import seeded_generator
from fedattn.systems.fedsea import frames
from fedattn.systems.fedsea.config import MAX_CLIENT_BLOCKS, SplitConfig

Engine = Callable[[list[RowStep]], list[torch.Tensor]]


def noise_generator(seed: int | None, purpose: str) -> torch.Generator:
    """One session's noise draws, in order: from ``seed`` (reproducible), or by default from a fresh
    secret seed (a known seed would let the receiver subtract the noise, and a seed reused per
    position would repeat it in every session)."""
    if seed is None:
        return torch.Generator().manual_seed(secrets.randbits(63))
    return seeded_generator(seed, purpose)


def noise_mode(config: SplitConfig) -> int:
    if config.noise.off and config.reply_noise.off:
        return frames.NOISE_OFF
    return frames.NOISE_RELATIVE if config.noise.relative else frames.NOISE_ABSOLUTE


class Client:
    """The party with the prompt: it runs the ends of the model and decodes."""

    def __init__(
        self,
        rank: int,
        server: int,
        transport: Transport,
        split: SplitModel,
        config: SplitConfig,
        prompt: list[int],
        stop: StopRule,
        identity: str,
    ) -> None:
        config.check(split.num_blocks, limit=split.num_blocks)
        if len(prompt) + config.max_new_tokens > split.max_positions:
            raise FedAttnError(
                f"the prompt ({len(prompt)} tokens) and {config.max_new_tokens} new tokens exceed the model's "
                f"{split.max_positions} positions"
            )
        self.rank, self.server, self.transport = rank, server, transport
        self.split, self.config, self.prompt, self.stop = split, config, prompt, stop
        self.identity = identity
        self.codec = get_codec(config.hidden_codec)
        self.store = split.new_store()
        self.store.reserve(len(prompt) + config.max_new_tokens)
        self.generator = config.decoding.generator(0)
        self.noise = noise_generator(config.noise_seed, "hidden-noise")
        self.answer: list[int] = []
        self.finished = False  # the answer is complete
        self.done = False  # ... and the server was told
        self.token_times: list[float] = []  # perf_counter when each token was picked
        self.compute_s = 0.0  # this party's own blocks and head
        self.started = time.perf_counter()
        self._sent: torch.Tensor | None = None  # positions of the step in flight

    @property
    def name(self) -> str:
        return self.transport.name_of(self.rank)

    def send_hello(self) -> None:
        self.started = time.perf_counter()
        config = self.config
        hello = frames.ClientHello(
            self.split.num_blocks,
            self.split.hidden_size,
            config.first,
            config.last,
            self.codec.code,
            noise_mode(config),
            config.noise.level,
            config.reply_noise.level,
            len(self.prompt) + config.max_new_tokens,
            model_fingerprint(self.identity),
        )
        self.transport.send(frames.encode_hello(hello), [self.server])

    def receive_answer(self) -> None:
        server = self.transport.name_of(self.server)
        reason = frames.decode_answer(self.transport.recv(self.server, "its answer to the hello"), server)
        if reason is not None:
            raise FedAttnError(f"{server} refused the session: {reason}")

    def send_step(self) -> None:
        """The prompt (prefill) or the newest token through blocks [0, A), noised; or, once the
        answer is complete, done."""
        if self.finished:
            if not self.done:
                self.transport.send(frames.encode_done(len(self.answer)), [self.server])
                self.done = True
            return
        tokens = self.prompt if not self.answer else self.answer[-1:]
        first = len(self.prompt) + len(self.answer) - len(tokens)
        positions = torch.arange(first, first + len(tokens))
        start = time.perf_counter()
        (hidden,) = self.split.run([RowStep(self.split.embed(tokens), positions, self.store, 0, self.config.first)])
        noise = self.config.noise
        sent = add_hidden_noise(hidden, noise.level, noise.relative, self.noise)
        self.compute_s += time.perf_counter() - start
        self.transport.note(f"step {len(self.answer)}")
        self.transport.send(frames.encode_hidden(sent, self.codec, positions), [self.server])
        self._sent = positions

    def receive_step(self) -> None:
        """The server's reply through blocks [L - C, L) and the head: the next token."""
        if self.finished:
            return
        positions, self._sent = self._sent, None
        frame = self.transport.recv(self.server, f"the reply to step {len(self.answer)}")
        server = self.transport.name_of(self.server)
        if len(frame) > 5 and frame[5] == frames.KIND_SPLIT_ANSWER:
            raise FedAttnError(f"{server} dropped the session: {frames.decode_answer(frame, server)}")
        expect = frames.HiddenExpectation(
            self.codec, self.split.hidden_size, False, len(positions), tokens=len(positions)
        )
        hidden, _ = frames.decode_hidden(frame, expect, server, f"the reply to step {len(self.answer)}")
        start = time.perf_counter()
        num_blocks = self.split.num_blocks
        row = RowStep(hidden, positions, self.store, num_blocks - self.config.last, num_blocks)
        (output,) = self.split.run([row])
        logits = self.split.logits(output[-1:])[0]
        self.answer.append(self.config.decoding.pick(logits, self.generator))
        self.compute_s += time.perf_counter() - start
        self.token_times.append(time.perf_counter())
        self.finished = len(self.answer) >= self.config.max_new_tokens or self.stop(self.answer)

    def timing(self) -> dict[str, float]:
        """Prefill (hello to first token), then decoding (first to last token) and its mean per later token."""
        if not self.token_times:
            return {"prefill_s": 0.0, "decode_s": 0.0, "per_token_s": 0.0, "client_compute_s": self.compute_s}
        later = len(self.token_times) - 1
        decode = self.token_times[-1] - self.token_times[0]
        return {
            "prefill_s": self.token_times[0] - self.started,
            "decode_s": decode,
            "per_token_s": decode / later if later else 0.0,
            "client_compute_s": self.compute_s,
        }


@dataclass
class Session:
    """One client's state on the server: its blocks, codec, noise and the KV cache of its blocks."""

    client: int
    name: str
    first: int
    stop: int
    codec_code: int
    reply_noise: float
    relative: bool
    positions: int  # the most the client announced
    store: ParticipantKVStore | None  # None once the session ended: its cache is freed, the record stays
    noise: torch.Generator  # the reply noise's draws
    next_position: int = 0
    steps: int = 0
    prompt_length: int = 0  # the first step's tokens
    answer_length: int | None = None  # as its done frame says


@dataclass
class Batch:
    """One call of the server's engine: which sessions' steps it ran together, and their sizes."""

    clients: list[str]
    tokens: list[int]


@dataclass
class Server:
    """Blocks [A, L - C) for every client it serves."""

    rank: int
    transport: Transport
    split: SplitModel
    clients: list[int]
    identity: str
    limit: int = MAX_CLIENT_BLOCKS
    seed: int | None = None  # of the reply noise's draws (None: a fresh secret seed per session)
    engine: Engine | None = None
    sessions: dict[int, Session] = field(default_factory=dict)
    trace: list[Batch] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # a client's name -> why it was refused or dropped
    closed: list[Session] = field(default_factory=list)  # sessions their clients ended, in order
    greeted: bool = False
    compute_s: float = 0.0

    @property
    def name(self) -> str:
        return self.transport.name_of(self.rank)

    @property
    def done(self) -> bool:
        return self.greeted and not self.sessions

    def held_bytes(self) -> int:
        """Bytes of K/V the sessions hold now (what freeing a session returns)."""
        total = 0
        for session in self.sessions.values():
            for layer in session.store.layers:
                if layer._key is not None:
                    total += 2 * layer._key.numel() * layer._key.element_size()
        return total

    def receive_hellos(self) -> None:
        """Each client's hello: accepted (a session) or refused, and told which."""
        for client in self.clients:
            name = self.transport.name_of(client)
            try:
                hello = frames.decode_hello(self.transport.recv(client, "its hello"), name)
                self._check(hello)
            except FedAttnError as refusal:
                self._drop(client, name, str(refusal))
                continue
            store = self.split.new_store()
            self.sessions[client] = Session(
                client,
                name,
                hello.first,
                self.split.num_blocks - hello.last,
                hello.codec,
                hello.reply_noise,
                hello.noise_mode == frames.NOISE_RELATIVE,
                hello.positions,
                store,
                noise_generator(self.seed, f"reply-noise:{name}"),
            )
            self.transport.send(frames.encode_answer(None), [client])
        self.greeted = True

    def serve(self) -> None:
        """One frame from every session: done (the session is freed) or a step; then every step
        through this server's blocks in one engine call, and each reply back. Each round is
        progress a networked client sees (its liveness check names a server that makes none)."""
        self.transport.note(f"serve {len(self.trace)}")
        pending: list[tuple[Session, torch.Tensor, torch.Tensor]] = []
        for client, session in list(self.sessions.items()):
            frame = self.transport.recv(client, f"step {session.steps}")
            try:
                if frames.is_done(frame):
                    session.answer_length = frames.decode_done(frame, session.name, session.positions + 1)
                    session.store = None  # the cache of a long-lived server's ended sessions must not pile up
                    self.closed.append(self.sessions.pop(client))
                    continue
                pending.append((session, *self._hidden(session, frame)))
            except ProtocolError as error:
                self._drop(client, session.name, str(error))
        if not pending:
            return
        start = time.perf_counter()
        rows = [RowStep(hidden, positions, s.store, s.first, s.stop) for s, hidden, positions in pending]
        outputs = (self.engine or self.split.run)(rows)
        self.compute_s += time.perf_counter() - start
        self.trace.append(Batch([s.name for s, _, _ in pending], [len(p) for _, _, p in pending]))
        for (session, _, _), output in zip(pending, outputs, strict=True):
            reply = add_hidden_noise(output, session.reply_noise, session.relative, session.noise)
            self.transport.send(frames.encode_hidden(reply, codec_by_code(session.codec_code), None), [session.client])

    def _hidden(self, session: Session, frame: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        room = session.positions - session.next_position
        if room < 1:
            raise ProtocolError(
                f"bad frame from {session.name}: a step beyond the {session.positions} positions it announced"
            )
        expect = frames.HiddenExpectation(
            codec_by_code(session.codec_code),
            self.split.hidden_size,
            True,
            room,
            first_position=session.next_position,
        )
        hidden, positions = frames.decode_hidden(frame, expect, session.name, f"step {session.steps}")
        session.prompt_length = session.prompt_length or len(positions)
        session.next_position += len(positions)
        session.steps += 1
        return hidden, positions

    def _check(self, hello: frames.ClientHello) -> None:
        """Refuse a hello for another model or a block range this server does not serve."""
        split = self.split
        if (hello.num_blocks, hello.hidden_size) != (split.num_blocks, split.hidden_size):
            raise FedAttnError(
                f"the client splits a model of {hello.num_blocks} blocks of width {hello.hidden_size}; "
                f"this server runs {split.num_blocks} of width {split.hidden_size}"
            )
        if hello.model != model_fingerprint(self.identity):
            raise FedAttnError("the client's model weights differ from this server's")
        first, last = hello.first, hello.last
        if first + last >= split.num_blocks:
            raise FedAttnError(f"A + C = {first + last} leaves no block of {split.num_blocks} to this server")
        if not (1 <= first <= self.limit and 1 <= last <= self.limit):
            raise FedAttnError(f"client blocks {first},{last}: this server serves A and C in 1..{self.limit}")
        if hello.positions > split.max_positions:
            raise FedAttnError(f"{hello.positions} positions: the model has {split.max_positions}")

    def _drop(self, client: int, name: str, reason: str) -> None:
        """Tell the client why, free its session, go on with the others."""
        self.refused[name] = reason
        self.sessions.pop(client, None)
        self.transport.send(frames.encode_answer(reason), [client])
