"""SpecFed's cost model in closed form (../shared/spec/specfed.md, "Bytes"): the bytes each party
sends and receives in a run, from the prompt length, the drafts' lengths and the kept counts alone.

It is written from the frames' header sizes and the encodings' bit widths, never by encoding a
frame, so measured traffic can be checked against it. Accounting is the transport's
(``network/transport.py``): one send to several addressees counts once for the sender (a
broadcast medium); each receiver counts what it receives. A run of W workers and R rounds, round r
with a draft of n_r tokens:

- hellos: the server broadcasts 30 + 4 L bytes (a prompt of L tokens); each worker broadcasts 22
  (to the server and every other worker: all of them check every worker's tokenizer).
- round r: the server broadcasts the draft (8 + 4 n_r) and the verdict (13); worker i sends its
  rows for n_r + 1 positions keeping k_1..k_{n_r+1} tokens:
  14 + [adaptive] ceil((n_r + 1) b / 8) + [not full] ceil(sum k_j b / 8) + sum k_j p / 8 + [residual] 4 (n_r + 1),
  with b the encoding's id bits (32; packed: ceil(log2 V)) and p its probability bits (32, 16, 8).

Server: sends hello + sum_r (draft_r + verdict), receives 22 W + sum_r sum_i rows_{r,i}.
Worker i: sends 22 + sum_r rows_{r,i}, receives hello + sum_r (draft_r + verdict) + 22 (W - 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from fedattn.network.topk_codec import RowEncoding
from fedattn.systems.specfed.frames import (
    DRAFT_HEADER,
    RESIDUAL_BYTES,
    ROWS_HEADER,
    SERVER_HELLO,
    TOKEN_BYTES,
    VERDICT,
    WORKER_HELLO,
    RowLayout,
)


@dataclass(frozen=True)
class PartyBytes:
    sent: int
    received: int


@dataclass(frozen=True)
class RunBytes:
    """A run's expected traffic: the server's and each worker's."""

    server: PartyBytes
    workers: tuple[PartyBytes, ...]

    @property
    def total_sent(self) -> int:
        """Bytes put on the medium by all parties (a broadcast once)."""
        return self.server.sent + sum(worker.sent for worker in self.workers)


def _ceil_bytes(bits: int) -> int:
    return -(-bits // 8)


def rows_bytes(layout: RowLayout, counts: Sequence[int]) -> int:
    """One rows frame whose positions keep ``counts`` tokens (the module doc's formula)."""
    vocab, encoding = layout.vocab, layout.encoding
    id_bits = encoding.ids.bits(vocab)
    positions, kept = len(counts), sum(counts)
    return (
        ROWS_HEADER.size
        + (_ceil_bytes(positions * id_bits) if layout.adaptive else 0)
        + (0 if layout.full else _ceil_bytes(kept * id_bits))
        + kept * encoding.probabilities.bits // 8
        + (RESIDUAL_BYTES * positions if layout.residual else 0)
    )


def _counts(layout: RowLayout, draft_length: int) -> list[int]:
    """Every position's count under a fixed K or full distributions."""
    return [layout.vocab if layout.full else layout.k] * (draft_length + 1)


def downlink_bytes(prompt_length: int, draft_lengths: Sequence[int]) -> int:
    """What the server broadcasts: its hello, then each round's draft and verdict."""
    hello = SERVER_HELLO.size + TOKEN_BYTES * prompt_length
    return hello + sum(DRAFT_HEADER.size + TOKEN_BYTES * n + VERDICT.size for n in draft_lengths)


def uplink_bytes(layout: RowLayout, draft_lengths: Sequence[int], kept: Sequence[Sequence[int]] | None) -> int:
    """What one worker sends: its hello (to every party at once), then each round's rows;
    ``kept[r]``: its per-position counts in round r (only used, and needed, for an adaptive layout)."""
    if layout.adaptive and kept is None:
        raise ValueError("an adaptive layout's cost needs the kept counts of every round")
    return WORKER_HELLO.size + sum(
        rows_bytes(layout, kept[r] if layout.adaptive else _counts(layout, n)) for r, n in enumerate(draft_lengths)
    )


def worker_bytes(
    layout: RowLayout,
    prompt_length: int,
    draft_lengths: Sequence[int],
    workers: int,
    kept: Sequence[Sequence[int]] | None = None,
) -> PartyBytes:
    """One worker: it sends its uplink and receives the downlink and every other worker's hello."""
    received = downlink_bytes(prompt_length, draft_lengths) + WORKER_HELLO.size * (workers - 1)
    return PartyBytes(sent=uplink_bytes(layout, draft_lengths, kept), received=received)


def expected_bytes(
    layout: RowLayout,
    prompt_length: int,
    draft_lengths: Sequence[int],
    workers: int,
    kept: Sequence[Sequence[Sequence[int]]] | None = None,
) -> RunBytes:
    """Per party, a run of ``len(draft_lengths)`` rounds. ``kept[r][i]``: the per-position counts
    worker i sent in round r (needed, and only used, for an adaptive layout)."""
    if layout.adaptive and kept is None:
        raise ValueError("an adaptive layout's cost needs the kept counts of every round and worker")
    own = [None if kept is None else [counts[worker] for counts in kept] for worker in range(workers)]
    costs = [worker_bytes(layout, prompt_length, draft_lengths, workers, own[worker]) for worker in range(workers)]
    server = PartyBytes(sent=downlink_bytes(prompt_length, draft_lengths), received=sum(cost.sent for cost in costs))
    return RunBytes(server, tuple(costs))


def full_distribution_bytes(
    layout: RowLayout, prompt_length: int, draft_lengths: Sequence[int], workers: int
) -> RunBytes:
    """The same rounds with every position sent as a full distribution in the same encoding (the baseline)."""
    full = replace(layout, k=None, adaptive=False, residual=False)
    return expected_bytes(full, prompt_length, draft_lengths, workers)


def full_distribution_bytes_per_token(encoding: RowEncoding, vocab: int, workers: int) -> int:
    """Bytes all parties send per generated token in non-speculative ensemble decoding with full
    distributions (one token per round: an empty draft, one full row per worker, a verdict), hellos aside."""
    full = RowLayout(encoding, vocab, None)
    return DRAFT_HEADER.size + VERDICT.size + workers * rows_bytes(full, [vocab])
