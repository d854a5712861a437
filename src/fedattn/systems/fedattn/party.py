"""One FedAttn party: its own tokens, its own KV store, and messages as its only link to the others.

A participant knows how to do each step of a run (send its hello, prefill, take K/V, pick or
receive the first token, give its decoding row, end); in which order, and which role takes which
step, is ``protocol.PHASES``, executed by both runners.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fedattn.errors import FedAttnError, ProtocolError
from fedattn.network.frames import (
    KIND_DONE,
    KIND_TOKEN,
    MAX_TOKENS,
    Hello,
    KVBlock,
    KVExpectation,
    decode_hello,
    decode_kv,
    decode_small,
    encode_hello,
    encode_kv,
    encode_small,
)
from fedattn.network.handshake import check_hello, run_fingerprints
from fedattn.network.transport import Transport
from fedattn.privacy.noise import add_kv_noise, noise_generator
from fedattn.runtime.batch_decode import DecodeRow
from fedattn.runtime.decoding import StopRule
from fedattn.runtime.dims import ModelDims
from fedattn.runtime.kv_store import ParticipantKVStore
from fedattn.runtime.prompting import check_prompt_length
from fedattn.systems.fedattn.config import RunConfig
from fedattn.systems.fedattn.exchange import frame_token_counts
from fedattn.systems.fedattn.selection import select_tokens
from fedattn.systems.fedattn.sparsity import kept_indices


def party_names(count: int) -> list[str]:
    """'party-1' .. 'party-(N-1)' and 'publisher' for the last."""
    return [f"party-{n + 1}" for n in range(count - 1)] + ["publisher"]


@dataclass
class PartyTimings:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    wait_s: float = 0.0  # blocked on the transport (all phases)
    block_wait_s: dict[int, float] = field(default_factory=dict)  # prefill waits per sync block


@dataclass
class PartyOutcome:
    """What one party measured in a run (its transport's counts, its payload, its times): the
    runner's raw figures, which ``reporting`` turns into the report schema's ``PartyReport``."""

    rank: int
    name: str
    tokens: int
    kept_tokens: int
    bytes_sent: int
    bytes_received: int
    frames_sent: int
    frames_received: int
    kv_payload_sent: int
    prefill_s: float
    decode_s: float
    wait_s: float
    block_wait_s: dict[int, float]
    generated_tokens: int


class Participant:
    """One party; ``protocol.PHASES`` says which of its steps it takes, and in which order."""

    def __init__(
        self,
        rank: int,
        token_ids: list[int],
        model: torch.nn.Module,
        transport: Transport,
        config: RunConfig,
        stop: StopRule = StopRule(),
        model_identity: str = "",
    ) -> None:
        if not token_ids:
            raise FedAttnError(f"{transport.name_of(rank)} has an empty segment")
        if len(token_ids) > MAX_TOKENS:
            raise FedAttnError(
                f"{transport.name_of(rank)} has {len(token_ids)} tokens; at most {MAX_TOKENS} are allowed"
            )
        self.rank = rank
        self.name = transport.name_of(rank)
        self.device = model.device
        self.token_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        self.model = model
        self.transport = transport
        self.config = config
        self.stop = stop
        self.world_size = transport.world_size
        self.publisher = self.world_size - 1
        self.is_publisher = rank == self.publisher
        model_config = model.config
        self.num_layers = model_config.num_hidden_layers
        self.num_kv_heads = model_config.num_key_value_heads
        self.head_dim = ModelDims.from_config(model_config).head_dim
        self.vocab_size = model_config.vocab_size
        self.max_positions = model_config.max_position_embeddings
        self.hello = Hello(
            rank, self.world_size, len(token_ids), run_fingerprints(config, model_identity, model_config)
        )
        self.store = ParticipantKVStore(self.num_layers)
        self.segment_lengths: list[int] = []  # every party's, known after receive_hellos
        self.offsets: list[int] = []
        self.prompt_length = 0
        self.kept = kept_indices(config.sparsity, rank, len(token_ids), self.is_publisher).to(self.device)
        self.kept_positions = torch.empty(0, dtype=torch.long)
        self.frame_tokens: dict[tuple[int, int], int] = {}  # (sender, block) -> tokens, every party's
        self.kv_payload_sent = 0
        self.timings = PartyTimings()
        self.answer_logits: list[torch.Tensor] = []
        self.first_token_id: int | None = None  # the publisher's pick, which every answer starts from
        self.answer: list[int] = []
        self._first_token_logits: torch.Tensor | None = None
        self._generator: torch.Generator | None = None

    @property
    def answers(self) -> bool:
        """The publisher always answers; a collaborator only when every answer is requested."""
        return self.is_publisher or self.config.all_answers

    # -- handshake --------------------------------------------------------------------
    def send_hello(self) -> None:
        self.transport.send(encode_hello(self.hello), self._others())

    def receive_hellos(self) -> None:
        """Learn every segment length (global positions need them) and refuse any mismatch."""
        self.transport.note("handshake")
        lengths = []
        for n in range(self.world_size):
            if n == self.rank:
                lengths.append(len(self.token_ids))
                continue
            theirs = decode_hello(self._recv(n, "the handshake"), self.name_of(n))
            check_hello(self.hello, theirs, self.name_of(n), n)
            if theirs.segment_length > self.max_positions:
                raise ProtocolError(
                    f"bad frame from {self.name_of(n)} (handshake): segment length {theirs.segment_length}, "
                    f"the model's context is {self.max_positions} positions"
                )
            lengths.append(theirs.segment_length)
        check_prompt_length(sum(lengths), self.config.max_new_tokens, self.max_positions)
        self.segment_lengths = lengths
        self.offsets = [sum(lengths[:n]) for n in range(self.world_size)]
        self.prompt_length = sum(lengths)
        self.kept_positions = self.offsets[self.rank] + self.kept
        config = self.config
        self.frame_tokens = frame_token_counts(
            config.schedule,
            config.sparsity,
            config.exchange,
            config.codec,
            lengths,
            self.num_kv_heads,
            self.head_dim,
            config.all_answers,
        )

    # -- prefill --------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self) -> None:
        """Run the model over the kept tokens; the publisher keeps its last-position logits."""
        if not self.segment_lengths:
            raise RuntimeError("receive_hellos must run before prefill")
        start = time.perf_counter()
        self.store.reserve(self.prompt_length + self.config.max_new_tokens)
        step = _PrefillStep(self, self.kept_positions)
        inputs = dict(input_ids=self.token_ids[self.kept].unsqueeze(0), position_ids=self.kept_positions.unsqueeze(0))
        if self.is_publisher:
            output = self.model(**inputs, fedattn_step=step, use_cache=False, logits_to_keep=1)
            self._first_token_logits = output.logits[0, -1].float()
        else:  # a collaborator never predicts from the prompt: skip the LM head
            self.model.base_model(**inputs, fedattn_step=step, use_cache=False)
        self.timings.prefill_s += time.perf_counter() - start

    def send_kv(
        self,
        layer: int,
        key: torch.Tensor,
        value: torch.Tensor,
        query: torch.Tensor | None = None,
        scaling: float | None = None,
    ) -> None:
        """Send this block's K/V (heads, kept tokens, d) where scheduled: the planned number of
        tokens, chosen by ``--kv-select`` (``query``, (heads, kept tokens, d), serves ``attention``),
        with ``--kv-noise`` added to what leaves (the store keeps the clean K/V)."""
        receivers = self.config.schedule.receivers(layer, self.rank, self.world_size, self.config.all_answers)
        if not receivers:
            return
        exchange, seed = self.config.exchange, self.config.sparsity.seed
        count = self.frame_tokens[(self.rank, layer)]
        chosen = select_tokens(exchange.select, count, key, query, self.kept_positions, scaling, seed, self.rank, layer)
        chosen = chosen.to(self.device)
        if len(chosen) < len(self.kept):
            key, value = key[:, chosen], value[:, chosen]
        key, value = add_kv_noise(key, value, exchange.noise, noise_generator(seed, self.rank, layer))
        block = KVBlock(layer, self.kept_positions[chosen], key, value)
        frame = encode_kv(block, self.config.codec, whole_segment=len(chosen) == len(self.token_ids))
        self.transport.send(frame, receivers)
        self.kv_payload_sent += self.config.codec.payload_size(len(chosen), self.num_kv_heads, self.head_dim)

    def receive_kv(self, layer: int, senders: range) -> None:
        schedule = self.config.schedule
        for sender in senders:
            if self.rank not in schedule.receivers(layer, sender, self.world_size, self.config.all_answers):
                continue
            lo = self.offsets[sender]
            expect = KVExpectation(
                sender=self.name_of(sender),
                layer=layer,
                num_kv_heads=self.num_kv_heads,
                head_dim=self.head_dim,
                max_tokens=self.segment_lengths[sender],
                position_range=(lo, lo + self.segment_lengths[sender]),
                tokens=self.frame_tokens[(sender, layer)],
            )
            block = decode_kv(self._recv(sender, f"its K/V of block {layer}", layer), expect, self.config.codec)
            dtype, device = self.model.dtype, self.model.device
            self.store[layer].append(
                block.key.to(device, dtype), block.value.to(device, dtype), block.positions.to(device)
            )

    # -- what later parties sent ----------------------------------------------------
    @torch.inference_mode()
    def receive_from_later_parties(self) -> None:
        """K/V of later parties: useless during prefill (causal), needed only to decode."""
        self.transport.note("taking later parties' K/V")
        for layer in range(self.num_layers):
            self.receive_kv(layer, range(self.rank + 1, self.world_size))

    # -- decoding -------------------------------------------------------------------
    def first_token(self) -> int:
        """The publisher's prediction at the last prompt position (sampled with its generator)."""
        if self._first_token_logits is None:
            raise RuntimeError("only the publisher, after prefill, has the first token")
        self._generator = self.config.decoding.generator(self.rank)
        if self.config.record_logits:
            self.answer_logits.append(self._first_token_logits)
        self.first_token_id = self.config.decoding.pick(self._first_token_logits, self._generator)
        return self.first_token_id

    def share_first_token(self) -> None:
        self.transport.send(encode_small(KIND_TOKEN, self.first_token_id), self._others())

    def receive_first_token(self) -> int:
        self._generator = self.config.decoding.generator(self.rank)
        frame = self._recv(self.publisher, "the first answer token")
        self.first_token_id = decode_small(
            frame, KIND_TOKEN, self.name_of(self.publisher), "first token", self.vocab_size
        )
        return self.first_token_id

    def decode_row(self) -> DecodeRow:
        """This party's answer, from the first token on, as a row for ``decode_rows`` (which may
        batch it with others); decoding reads only the local store, so no message is needed."""
        if self.first_token_id is None:
            raise RuntimeError("the first token must be known before decoding")
        decoding, generator = self.config.decoding, self._generator
        return DecodeRow(
            store=self.store,
            first_position=self.prompt_length,
            first_token=self.first_token_id,
            pick=lambda logits: decoding.pick(logits, generator),
            stop=self.stop,
            logits=self.answer_logits if self.config.record_logits else None,
        )

    def record_answer(self, tokens: list[int], seconds: float) -> None:
        """The decoded answer and this party's share of the decoding time."""
        self.answer = tokens
        self.timings.decode_s += seconds

    # -- completion -----------------------------------------------------------------
    def send_done(self) -> None:
        """The publisher tells everyone the query is answered: no collaborator exits cleanly before."""
        self.transport.send(encode_small(KIND_DONE, len(self.answer)), self._others())

    def await_done(self) -> int:
        self.transport.note("waiting for the publisher's completion")
        frame = self._recv(self.publisher, "the publisher's completion")
        return decode_small(
            frame, KIND_DONE, self.name_of(self.publisher), "completion", self.config.max_new_tokens + 1
        )

    def outcome(self) -> PartyOutcome:
        stats = self.transport.stats
        return PartyOutcome(
            rank=self.rank,
            name=self.name,
            tokens=len(self.token_ids),
            kept_tokens=len(self.kept),
            bytes_sent=stats.bytes_sent,
            bytes_received=stats.bytes_received,
            frames_sent=stats.frames_sent,
            frames_received=stats.frames_received,
            kv_payload_sent=self.kv_payload_sent,
            prefill_s=self.timings.prefill_s,
            decode_s=self.timings.decode_s,
            wait_s=self.timings.wait_s,
            block_wait_s=dict(self.timings.block_wait_s),
            generated_tokens=len(self.answer),
        )

    # -- helpers -----------------------------------------------------------------------------
    def name_of(self, rank: int) -> str:
        return self.transport.name_of(rank)

    def _others(self) -> list[int]:
        return [n for n in range(self.world_size) if n != self.rank]

    def _recv(self, sender: int, what: str, layer: int | None = None) -> bytes:
        start = time.perf_counter()
        frame = self.transport.recv(sender, what)
        waited = time.perf_counter() - start
        self.timings.wait_s += waited
        if layer is not None:
            self.timings.block_wait_s[layer] = self.timings.block_wait_s.get(layer, 0.0) + waited
        return frame


class _PrefillStep:
    """Per block: store own K/V, send it where scheduled, take what earlier parties sent, and
    attend causally over global positions."""

    def __init__(self, party: Participant, positions: torch.Tensor) -> None:
        self.party = party
        self.query_positions = positions

    def attend(
        self,
        layer: int,
        key: torch.Tensor,
        value: torch.Tensor,
        query: torch.Tensor | None = None,
        scaling: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        party = self.party
        party.transport.note(f"prefill block {layer}")
        own_key, own_value = key[0], value[0]  # a party prefills its one segment
        party.store[layer].append(own_key, own_value, self.query_positions)
        party.send_kv(layer, own_key, own_value, None if query is None else query[0], scaling)
        party.receive_kv(layer, range(party.rank))
        keys, values, positions = party.store[layer].view()
        mask = positions.unsqueeze(0) <= self.query_positions.unsqueeze(1)
        return keys.unsqueeze(0), values.unsqueeze(0), mask
