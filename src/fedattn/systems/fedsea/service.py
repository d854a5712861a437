"""FedSEA as a service's query handler (``fedattn.network.service.QueryHandler``).

A FedSEA service holds one model, loaded once, and plays the role its place in a query gives it: in
a query it is asked to join (rank 0, ``fedattn ask --system split --parties SERVER``) it is the
**server** and runs the client's middle blocks; in its own queries (the asker, rank 1) it is the
**client**, with the prompt (its private input, only in its own Ask) and the ends of the model.
Each query is one role with, on the server, one session (the KV cache of its blocks), freed when
the query ends, however it ends: a client that leaves or dies fails its own query only.

The server's queries share one ``Batcher``: every step any of them has pending goes through the
model in one ``SplitModel.run`` call (continuous batching: take what is queued, run, repeat), and
its ``trace`` says which queries' steps ran together. A party's document is its own report
(``networked.own_report``); the asker merges them.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from fedattn.argtypes import add_model_options, positive_int, text_or_file
from fedattn.errors import FedAttnError
from fedattn.network.grpc_transport import GrpcTransport
from fedattn.network.kv_codec import CODECS
from fedattn.network.service import SERVICE_TRANSPORT, Plan, Query, asker_text
from fedattn.report.schema import merge, report_of_party
from fedattn.runtime.attention import federated_attention_enabled
from fedattn.runtime.blocks import RowStep, SplitModel
from fedattn.runtime.models import LoadedModel
from fedattn.systems.base import served_model
from fedattn.systems.fedsea.config import (
    MAX_CLIENT_BLOCKS,
    RUN_OPTIONS,
    add_run_options,
    config_from_args,
    query_from_words,
)
from fedattn.systems.fedsea.networked import CLIENT_RANK, SERVER_RANK, max_frame_bytes, own_party, own_report, take_part
from fedattn.systems.fedsea.query import SplitSetup, chat_prompt, check_prompt_text
from fedattn.systems.fedsea.reporting import SYSTEM
from fedattn.systems.fedsea.roles import Batch, Engine, Server

PRIVATE_INPUT = "prompt"  # what the asker's Ask carries for its own party (the client)
ROLES = ("server", "client")  # by rank
TRACE_KEPT = 10_000  # engine calls a batcher remembers: a service runs for long


@dataclass
class _Request:
    """One query's pending rows, and their outputs once a batch ran them."""

    label: str
    rows: list[RowStep]
    outputs: list[torch.Tensor] = field(default_factory=list)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class Batcher:
    """A service's one engine for the server role of all its queries: each query's thread hands it
    its pending rows and waits; one thread runs whatever is queued in one ``run`` call, then again.
    ``trace`` records each call (the latest ``TRACE_KEPT``): which queries' steps it ran and how
    many tokens each."""

    def __init__(self, run: Engine) -> None:
        self._run = run
        self._queue: list[_Request] = []
        self._ready = threading.Condition()
        self._closed = False
        self.trace: deque[Batch] = deque(maxlen=TRACE_KEPT)
        self._thread = threading.Thread(target=self._serve, name="fedattn-split-batcher", daemon=True)
        self._thread.start()

    def engine(self, label: str) -> Engine:
        """The engine of one query's server (``label`` names the query in the trace)."""
        return lambda rows: self.submit(label, rows)

    def submit(self, label: str, rows: list[RowStep]) -> list[torch.Tensor]:
        """``rows`` through their blocks, batched with whatever other queries have pending."""
        request = _Request(label, rows)
        with self._ready:
            if self._closed:
                raise FedAttnError("the service stopped")
            self._queue.append(request)
            self._ready.notify()
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.outputs

    def close(self) -> None:
        """Stop once what is queued has run; later submissions are refused."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join()

    def _serve(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue, []
            self._run_batch(batch)

    def _run_batch(self, batch: list[_Request]) -> None:
        try:
            outputs = self._run([row for request in batch for row in request.rows])
        except Exception as error:  # every query of the batch fails with it; the service goes on
            for request in batch:
                request.error = error
                request.done.set()
            return
        self.trace.append(
            Batch(
                [request.label for request in batch for _ in request.rows],
                [row.hidden.shape[0] for request in batch for row in request.rows],
            )
        )
        start = 0
        for request in batch:
            request.outputs = outputs[start : start + len(request.rows)]
            start += len(request.rows)
            request.done.set()


class SplitHandler:
    """One party's FedSEA: its loaded model, the server's or the client's as the query places it."""

    system = SYSTEM

    def __init__(
        self,
        loaded: LoadedModel,
        device: str,
        dtype: str,
        max_client_blocks: int = MAX_CLIENT_BLOCKS,
        run: Engine | None = None,
    ) -> None:
        """``run`` is the batcher's engine (default: the model's ``SplitModel.run``)."""
        self.loaded, self.device, self.dtype = loaded, device, dtype
        self.max_client_blocks = max_client_blocks
        self.split = SplitModel(loaded.model)
        self.max_frame_bytes = max(max_frame_bytes(self.split, codec) for codec in CODECS)
        # the hook stays on for the handler's life, so that queries running at once never switch it off
        self._hook = ExitStack()
        self._hook.enter_context(federated_attention_enabled(loaded.model))
        self.batcher = Batcher(run or self.split.run)
        self._servers: dict[str, Server] = {}  # the server role of each query running here
        self._lock = threading.Lock()

    def close(self) -> None:
        self.batcher.close()
        self._hook.close()

    def sessions(self) -> dict[str, int]:
        """Sessions held now, by query id: their KV caches' bytes (a query's are freed when it ends)."""
        with self._lock:
            return {query: server.held_bytes() for query, server in self._servers.items() if server.sessions}

    def plan(self, query: Query, rank: int) -> Plan:
        if len(query.parties) != 2:
            raise FedAttnError(
                f"a FedSEA query is a server and its client (--parties SERVER), not {len(query.parties)} parties"
            )
        args = query_from_words(list(query.options))
        config = config_from_args(args)
        config.check(self.split.num_blocks, self.max_client_blocks if rank == SERVER_RANK else self.split.num_blocks)
        return Plan(args.timeout, max_frame_bytes(self.split, config.hidden_codec), (config, args.raw))

    def run(
        self, query: Query, rank: int, plan: Plan, transport: GrpcTransport, private: dict[str, str] | None
    ) -> dict:
        config, raw = plan.settings
        setup = SplitSetup(config, self.loaded, self.device, self.dtype, raw)
        start = time.perf_counter()
        if rank == CLIENT_RANK:
            party = own_party(rank, transport, setup, chat_prompt(setup, asker_text(private, PRIVATE_INPUT)))
            seconds = take_part(party, transport)
        else:
            label = f"{query.starter}/{query.id[:8]}"
            party = own_party(rank, transport, setup, None, self.max_client_blocks, self.batcher.engine(label))
            seconds = self._serve(query.id, party, transport)
        return own_report(party, setup, SERVICE_TRANSPORT, time.perf_counter() - start, seconds).to_json()

    def _serve(self, query: str, server: Server, transport: GrpcTransport) -> dict[str, float]:
        """The server's part of one query; its session freed when the query ends, however it ends."""
        with self._lock:
            self._servers[query] = server
        try:
            return take_part(server, transport)
        finally:
            with self._lock:
                del self._servers[query]
            server.sessions.clear()

    def combine(self, query: Query, documents: list[dict]) -> dict:
        """The merged report, once the server's and the client's documents are each a FedSEA report
        of that party alone in its role."""
        reports = [
            report_of_party(document, SYSTEM, "FedSEA", name, rank, role)
            for rank, (name, document, role) in enumerate(zip(query.parties, documents, ROLES, strict=True))
        ]
        return merge(reports).to_json()


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """``fedattn serve --system split``: the model (loaded once), and the most blocks the server
    lets a client keep at either end."""
    add_model_options(parser)
    parser.add_argument(
        "--max-client-blocks",
        type=positive_int,
        default=MAX_CLIENT_BLOCKS,
        metavar="N",
        help=f"as a query's server, serve clients keeping A and C in 1..N blocks (default {MAX_CLIENT_BLOCKS})",
    )


def handler_from_args(args: argparse.Namespace, context: str | None) -> SplitHandler:
    """The service's handler: its model loaded once."""
    loaded, device = served_model(args, context, "FedSEA")
    return SplitHandler(loaded, device, args.dtype, args.max_client_blocks)


def add_ask_options(parser: argparse.ArgumentParser) -> None:
    """``fedattn ask --system split``: the asker's prompt (it stays with the asker's own service,
    the client) and the query's run options, which the server reads too."""
    parser.add_argument(
        "--prompt",
        required=True,
        type=text_or_file,
        metavar="TEXT|@FILE",
        help="the client's prompt (private: it goes to its own service only; the server sees hidden states)",
    )
    parser.add_argument("--raw", action="store_true", help="no chat template: the prompt is tokenized as is")
    add_run_options(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")


def ask_input(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The query's option words (every party reads them) and the asker's private prompt."""
    from fedattn.argtypes import option_words

    check_prompt_text(args.prompt)
    if args.noise_seed is not None:
        raise FedAttnError(
            "--noise-seed is for local runs: a query's options reach the server, which could subtract the noise "
            "(each session draws a fresh secret seed)"
        )
    words = option_words({name: getattr(args, name) for name in RUN_OPTIONS if name != "noise_seed"})
    return words + (["--raw"] if args.raw else []), {PRIVATE_INPUT: args.prompt}
