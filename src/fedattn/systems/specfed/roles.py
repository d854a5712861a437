"""SpecFed's two roles, each a set of steps over its own transport (``protocol`` orders them).

A **worker** holds a model and never sends it: per round it receives the draft ids, runs one
forward pass over them on its kept cache (cropped to the accepted prefix by ``IncrementalLM``) and
sends the top-K of each of its gamma + 1 next-token distributions. The **server** holds the prompt
and the draft: it drafts, rebuilds and aggregates the workers' records, accepts or replaces the
drafts and tells every worker the verdict. Everything received is decoded by ``frames``, which
refuses what does not match the run; a worker of another tokenizer is refused at the handshake.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fedattn.errors import FedAttnError
from fedattn.network.topk_codec import get_encoding
from fedattn.network.transport import Transport
from fedattn.runtime.decoding import StopRule
from fedattn.runtime.incremental import IncrementalLM
from fedattn.runtime.seeding import seeded_generator
from fedattn.systems.specfed import frames
from fedattn.systems.specfed.config import SpecFedConfig
from fedattn.systems.specfed.drafts import Drafter
from fedattn.systems.specfed.kernel import (
    SparseRow,
    accept_greedy,
    accept_sampled,
    adaptive_top_k,
    aggregate,
    distributions,
    reconstruct,
    top_k,
)

SERVER_NAME = "server"


def party_names(workers: int) -> list[str]:
    """worker1..workerW, then the server: the last party starts and ends a query, as in every system."""
    return [f"worker{index + 1}" for index in range(workers)] + [SERVER_NAME]


def kept_per_position(config: SpecFedConfig, vocab: int) -> int | None:
    """K (or the adaptive cap) for this vocabulary; None sends full distributions (as does K >= |V|
    without an adaptive cap: sending every id would only cost more)."""
    if config.top_k is None or (config.top_k >= vocab and config.adaptive_eps is None):
        return None
    return min(config.top_k, vocab)


def row_layout(config: SpecFedConfig, vocab: int) -> frames.RowLayout:
    k = kept_per_position(config, vocab)
    return frames.RowLayout(
        encoding=get_encoding(config.encoding),
        vocab=vocab,
        k=k,
        adaptive=config.adaptive_eps is not None,
        residual=config.reconstruct == "redistribute" and k is not None,
    )


def compress(p: torch.Tensor, config: SpecFedConfig) -> SparseRow:
    """One position of a worker's distribution as it will be sent."""
    k = kept_per_position(config, p.numel())
    if config.adaptive_eps is not None:
        return adaptive_top_k(p, config.adaptive_eps, k)
    return top_k(p, k)


def receive_worker_hello(transport: Transport, worker: int) -> frames.WorkerHello:
    return frames.decode_worker_hello(transport.recv(worker, "its hello"), transport.name_of(worker))


def check_tokenizers(
    transport: Transport, config: SpecFedConfig, hellos: list[frames.WorkerHello], server: tuple[int, bytes]
) -> None:
    """Refuse the first worker (by rank) whose tokenizer (real vocabulary size, fingerprint) is not the
    server's: ids and distributions over them would mean other texts. Every party checks every
    worker in the same order and words it alike, so a networked run ends with this one line (a
    service knows only its own model: there a worker is named without it)."""
    for rank, hello in enumerate(hellos):
        if (hello.vocab, hello.tokenizer) != server:
            model = config.workers[rank].model
            who = transport.name_of(rank) if model is None else f"{transport.name_of(rank)} ({model})"
            raise FedAttnError(
                f"{who} has another tokenizer ({hello.vocab} tokens, {hello.tokenizer.hex()}) than the "
                f"server's ({server[0]} tokens, {server[1].hex()}): SpecFed's workers and draft must share one"
            )


class Party:
    """What both roles share: a rank on a transport, time per stage, and when to stop."""

    role = ""

    def __init__(self, rank: int, transport: Transport, config: SpecFedConfig) -> None:
        self.rank = rank
        self.transport = transport
        self.config = config
        self.done = False
        self.seconds: dict[str, float] = {}

    @property
    def name(self) -> str:
        return self.transport.name_of(self.rank)

    def _timed(self, stage: str, start: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


class Worker(Party):
    role = "worker"

    def __init__(
        self,
        rank: int,
        transport: Transport,
        config: SpecFedConfig,
        model: torch.nn.Module,
        vocab: int,
        tokenizer: bytes,
    ) -> None:
        super().__init__(rank, transport, config)
        self.server = transport.world_size - 1
        self.lm = IncrementalLM(model)
        self.vocab = vocab
        self.tokenizer = tokenizer
        self.rows_in_model = model.get_output_embeddings().weight.shape[0]
        self.server_tokenizer: tuple[int, bytes] = (0, b"")  # the server's (vocabulary, fingerprint), from its hello
        self.sequence: list[int] = []
        self.prompt_length = 0
        self.drafts: list[int] = []
        self.rounds: list[tuple[int, list[int]]] = []  # per round: the draft's length, the ids kept per position
        self.last_distributions: torch.Tensor | None = None  # this round's p_i (measurement only)
        self.last_rows: list[SparseRow] = []

    def answer_hello(self) -> None:
        """Receive the prompt and the run's terms; refuse other settings; say ours to every party
        (the other workers check it too, so that all refuse a foreign tokenizer alike)."""
        hello = frames.decode_server_hello(self.transport.recv(self.server, "the server's hello"), SERVER_NAME)
        own = frames.WorkerHello(self.tokenizer, self.vocab, self.rows_in_model)
        self.transport.send(
            frames.encode_worker_hello(own), [rank for rank in range(self.server + 1) if rank != self.rank]
        )
        if hello.settings != self.config.fingerprint():
            raise FedAttnError(f"{self.name} refuses the run: the server's settings are not this worker's")
        self.server_tokenizer = (hello.vocab, hello.tokenizer)
        self.sequence = list(hello.prompt)
        self.prompt_length = len(hello.prompt)

    def check_hellos(self) -> None:
        """Every worker's tokenizer against the server's, in rank order, as the server checks them."""
        hellos = {self.rank: frames.WorkerHello(self.tokenizer, self.vocab, self.rows_in_model)}
        for worker in range(self.server):
            if worker != self.rank:
                hellos[worker] = receive_worker_hello(self.transport, worker)
        check_tokenizers(
            self.transport, self.config, [hellos[worker] for worker in range(self.server)], self.server_tokenizer
        )

    def verify(self) -> None:
        """One forward pass over the drafts; the top-K of each of their gamma + 1 distributions, up."""
        self.transport.note(f"round {len(self.rounds) + 1}")
        self.drafts = frames.decode_draft(
            self.transport.recv(self.server, "the round's drafts"), SERVER_NAME, self.config.gamma, self.vocab
        )
        start = time.perf_counter()
        logits = self.lm.next_token_logits(self.sequence + self.drafts, len(self.drafts) + 1)
        p = distributions(logits, self.vocab, self.config.temperature)
        self.last_distributions = p
        self.last_rows = [compress(row, self.config) for row in p]
        self.rounds.append((len(self.drafts), [row.k for row in self.last_rows]))
        frame = frames.encode_rows(self.last_rows, row_layout(self.config, self.vocab))
        self._timed("verify", start)
        self.transport.send(frame, [self.server])

    def apply_verdict(self) -> None:
        """The accepted drafts and the next token join the sequence (the cache is cropped to it next round)."""
        verdict = frames.decode_verdict(
            self.transport.recv(self.server, "the round's verdict"), SERVER_NAME, len(self.drafts), self.vocab
        )
        self.sequence += self.drafts[: verdict.accepted] + [verdict.token]
        self.done = verdict.done


@dataclass
class Round:
    """One round as the server saw it: what the cost model and the report need."""

    drafts: int
    accepted: int
    counts: list[list[int]] = field(default_factory=list)  # per worker, per position: the ids it sent


class Server(Party):
    role = "server"

    def __init__(
        self,
        rank: int,
        transport: Transport,
        config: SpecFedConfig,
        prompt: list[int],
        drafter: Drafter,
        vocab: int,
        tokenizer: bytes,
        stop: StopRule,
    ) -> None:
        super().__init__(rank, transport, config)
        self.workers = list(range(transport.world_size - 1))
        self.prompt = list(prompt)
        self.drafter = drafter
        self.vocab = vocab
        self.tokenizer = tokenizer
        self.stop = stop
        self.weights = [worker.weight for worker in config.workers]
        self.generator = None if config.greedy else seeded_generator(config.seed, "specfed", "server")
        self.answer: list[int] = []
        self.rounds: list[Round] = []
        self.drafts: list[int] = []
        self.q = torch.empty(0, vocab)
        self.p_hat: torch.Tensor | None = None  # this round's aggregate (measurement only)

    @property
    def sequence(self) -> list[int]:
        return self.prompt + self.answer

    def send_hello(self) -> None:
        hello = frames.ServerHello(self.prompt, self.vocab, self.tokenizer, self.config.fingerprint())
        self.transport.send(frames.encode_server_hello(hello), self.workers)

    def receive_hellos(self) -> None:
        """Every worker's tokenizer must be the server's (embedding rows may differ: padding)."""
        hellos = [receive_worker_hello(self.transport, worker) for worker in self.workers]
        check_tokenizers(self.transport, self.config, hellos, (self.vocab, self.tokenizer))

    def draft(self) -> None:
        """Up to gamma drafts, never more than the answer still has room for after the round's own token."""
        self.transport.note(f"round {len(self.rounds) + 1}")
        start = time.perf_counter()
        room = self.config.max_new_tokens - len(self.answer) - 1
        self.drafts, self.q = self.drafter.propose(self.sequence, min(self.config.gamma, room), self.generator)
        self._timed("draft", start)
        self.transport.send(frames.encode_draft(self.drafts), self.workers)

    def decide(self) -> None:
        """Rebuild and aggregate the workers' records, accept or replace the drafts, send the verdict."""
        layout = row_layout(self.config, self.vocab)
        positions = len(self.drafts) + 1
        received = [
            frames.decode_rows(
                self.transport.recv(worker, "its top-K records"), self.transport.name_of(worker), layout, positions
            )
            for worker in self.workers
        ]
        start = time.perf_counter()
        rebuilt = [
            torch.stack([reconstruct(row, self.vocab, self.config.reconstruct) for row in rows]) for rows in received
        ]
        self.p_hat = aggregate(rebuilt, self.weights)
        if self.generator is None:
            accepted, token = accept_greedy(self.drafts, self.p_hat)
        else:
            accepted, token = accept_sampled(self.drafts, self.q, self.p_hat, self.generator)
        self._extend(self.drafts[:accepted] + [token])
        self.rounds.append(Round(len(self.drafts), accepted, [[row.k for row in rows] for rows in received]))
        self.done = self.done or len(self.answer) >= self.config.max_new_tokens
        self._timed("decide", start)
        self.transport.send(frames.encode_verdict(frames.Verdict(accepted, token, self.done)), self.workers)

    def _extend(self, tokens: list[int]) -> None:
        """Append the round's tokens up to the first that ends the answer."""
        for token in tokens:
            self.answer.append(token)
            if self.stop(self.answer):
                self.done = True
                return
