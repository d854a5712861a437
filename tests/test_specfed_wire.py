"""SpecFed's wire format: round trips of every encoding and layout, exact sizes against the frame
size functions and the closed-form cost model, traffic over the in-process transport against the
cost model, and each malformed frame refused with its own message.

Independent references: error bounds and byte formulas are written here from the spec and the
documented choices (STEP = 1/20, ids LSB-first in ceil(log2 V) bits), not read from the code.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch

from fedattn.errors import FedAttnError, ProtocolError
from fedattn.network.frames import KIND_DRAFT, KIND_ROWS, KIND_VERDICT, KIND_WORKER_HELLO, MAGIC, VERSION
from fedattn.network.topk_codec import ENCODINGS, id_bits
from fedattn.network.transport import InProcessGrid
from fedattn.systems.specfed import costs
from fedattn.systems.specfed.frames import (
    MAX_PROMPT,
    RowLayout,
    ServerHello,
    Verdict,
    WorkerHello,
    decode_draft,
    decode_rows,
    decode_server_hello,
    decode_verdict,
    decode_worker_hello,
    draft_frame_size,
    encode_draft,
    encode_rows,
    encode_server_hello,
    encode_verdict,
    encode_worker_hello,
    rows_frame_size,
    server_hello_size,
    verdict_frame_size,
    worker_hello_size,
)
from fedattn.systems.specfed.kernel import SparseRow

QWEN_VOCAB, SMALL_VOCAB = 151_665, 300
SENDER = "worker-2"
TOKENIZER, SETTINGS = b"tok12345", b"set12345"
F32, F16, PACKED = ENCODINGS["f32"], ENCODINGS["f16"], ENCODINGS["packed"]
# documented bounds: a decoded p' of a true p lies in [(1 - r) p - a, p]
BOUNDS = {"f32": (0.0, 0.0), "f16": (2.0**-10, 2.0**-24), "packed": (1 - math.exp(-1 / 20), math.exp(-254 / 20))}
HEADER = 14  # rows frame: preamble 6, encoding 1, flags 1, positions 2, K 4
PROB_BYTES = {"f32": 4, "f16": 2, "packed": 1}


def distributions(vocab: int, positions: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(positions, vocab, generator=generator) * 4, dim=-1)


def rows_for(layout: RowLayout, positions: int, seed: int = 0) -> list[SparseRow]:
    """Rows as a worker sends them: its top-k per position (adaptive: k varies in 1..cap), or all ids."""
    probs = distributions(layout.vocab, positions, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    rows = []
    for distribution in probs:
        if layout.full:
            ids, kept = torch.arange(layout.vocab), distribution
        else:
            k = int(torch.randint(1, layout.k + 1, (), generator=generator)) if layout.adaptive else layout.k
            kept, ids = distribution.topk(k)
        rows.append(SparseRow(ids=ids, probs=kept, residual=float((1 - kept.double().sum()).clamp(0, 1))))
    return rows


def layouts(vocab: int, k: int | None):
    for encoding in ENCODINGS.values():
        for adaptive in (False, True) if k is not None else (False,):
            for residual in (False, True):
                yield RowLayout(encoding, vocab, k, adaptive, residual)


def layout_id(layout: RowLayout) -> str:
    mode = "full" if layout.full else ("adaptive" if layout.adaptive else "fixed")
    return f"{layout.encoding.name}-{mode}{layout.k or ''}-{'eps' if layout.residual else 'noeps'}-V{layout.vocab}"


ROUND_TRIP = [*layouts(SMALL_VOCAB, 16), *layouts(SMALL_VOCAB, None), *layouts(QWEN_VOCAB, 64)]


@pytest.mark.parametrize("layout", ROUND_TRIP, ids=layout_id)
def test_rows_round_trip(layout: RowLayout) -> None:
    sent = rows_for(layout, positions=5, seed=3)
    received = decode_rows(encode_rows(sent, layout), SENDER, layout, positions=5)
    relative, absolute = BOUNDS[layout.encoding.name]
    assert len(received) == len(sent)
    for mine, theirs in zip(sent, received):
        assert torch.equal(theirs.ids, mine.ids) and theirs.ids.dtype == torch.int64
        assert theirs.probs.dtype == torch.float32
        true, got = mine.probs.double(), theirs.probs.double()
        if layout.encoding.name == "f32":
            assert torch.equal(theirs.probs, mine.probs)
        assert bool((got <= true).all()) and bool((got >= (1 - relative) * true - absolute - 1e-12).all())
        if layout.residual:
            assert theirs.residual == float(np.float32(mine.residual))
        else:
            assert theirs.residual == pytest.approx(min(max(1 - float(got.sum()), 0.0), 1.0), abs=1e-12)


def test_full_qwen_distribution_round_trip_in_every_encoding() -> None:
    for encoding in ENCODINGS.values():
        layout = RowLayout(encoding, QWEN_VOCAB, None, residual=True)
        sent = rows_for(layout, positions=2, seed=5)
        frame = encode_rows(sent, layout)
        assert len(frame) == HEADER + 2 * QWEN_VOCAB * PROB_BYTES[encoding.name] + 2 * 4
        received = decode_rows(frame, SENDER, layout, positions=2)
        relative, absolute = BOUNDS[encoding.name]
        for mine, theirs in zip(sent, received):
            true, got = mine.probs.double(), theirs.probs.double()
            assert bool((got <= true).all()) and bool((got >= (1 - relative) * true - absolute - 1e-12).all())


def test_packed_probabilities_never_sum_above_the_true_sum() -> None:
    generator = torch.Generator().manual_seed(11)
    table = torch.tensor([math.exp(-c / 20) for c in range(255)], dtype=torch.float32)
    layout = RowLayout(PACKED, SMALL_VOCAB, 64)
    for trial in range(20):
        rows = []
        for _ in range(4):
            logits = torch.randn(SMALL_VOCAB, generator=generator) * (1 + trial)
            probs, ids = torch.softmax(logits, -1).topk(64)
            if trial % 2:  # probabilities exactly on, just above and just below code values
                picks = table[torch.randint(0, 255, (64,), generator=generator)]
                nudge = torch.randint(-1, 2, (64,), generator=generator).float() * 1e-7
                probs = (picks * (1 + nudge)).clamp(0, 1) / 64
            rows.append(SparseRow(ids, probs, float((1 - probs.double().sum()).clamp(0, 1))))
        for mine, theirs in zip(rows, decode_rows(encode_rows(rows, layout), SENDER, layout, 4)):
            assert float(theirs.probs.double().sum()) <= float(mine.probs.double().sum())
            assert bool((theirs.probs <= mine.probs).all())


def test_packed_ids_are_ceil_log2_vocab_bits_least_significant_first() -> None:
    assert id_bits(QWEN_VOCAB) == math.ceil(math.log2(QWEN_VOCAB)) == 18
    assert id_bits(SMALL_VOCAB) == 9 and id_bits(256) == 8 and id_bits(257) == 9
    layout = RowLayout(PACKED, QWEN_VOCAB, 3)
    ids = [QWEN_VOCAB - 1, 0, 131_073]
    row = SparseRow(torch.tensor(ids), torch.tensor([0.5, 0.25, 0.125]), 0.125)
    frame = encode_rows([row], layout)
    assert len(frame) == HEADER + math.ceil(3 * 18 / 8) + 3
    stream = int.from_bytes(frame[HEADER : HEADER + 7], "little")
    assert [(stream >> (18 * j)) & (2**18 - 1) for j in range(3)] == ids
    assert stream >> 54 == 0  # zero padding
    # codes: 0.5 -> ceil(ln 2 * 20) = 14, 0.25 -> 28, 0.125 -> 42 (rounded toward the smaller probability)
    assert list(frame[HEADER + 7 :]) == [14, 28, 42]


# -- sizes: measured == size function == closed-form cost -----------------------------------------------------------
def size_grid():
    for vocab in (QWEN_VOCAB, SMALL_VOCAB):
        for k in (1, 8, 64, 1517, None):
            if k is not None and k > vocab:
                continue
            yield from ((layout, gamma) for layout in layouts(vocab, k) for gamma in (0, 1, 4, 8))


def fake_rows(layout: RowLayout, positions: int) -> list[SparseRow]:
    """Valid rows of the layout's shape, cheaply (sizes do not depend on the values)."""
    if layout.full:
        counts = [layout.vocab] * positions
    else:
        counts = [1 + j % layout.k if layout.adaptive else layout.k for j in range(positions)]
    return [SparseRow(torch.arange(count), torch.full((count,), 1 / max(count, 2)), 0.0) for count in counts]


@pytest.mark.parametrize(
    ("layout", "gamma"), list(size_grid()), ids=lambda it: f"g{it}" if isinstance(it, int) else layout_id(it)
)
def test_rows_frame_size_equals_size_function_and_cost_model(layout: RowLayout, gamma: int) -> None:
    rows = fake_rows(layout, gamma + 1)
    counts = [row.ids.numel() for row in rows]
    measured = len(encode_rows(rows, layout))
    bits = 32 if layout.encoding.name != "packed" else math.ceil(math.log2(layout.vocab))
    by_hand = (
        HEADER
        + (math.ceil(len(counts) * bits / 8) if layout.adaptive else 0)
        + (0 if layout.full else math.ceil(sum(counts) * bits / 8))
        + sum(counts) * PROB_BYTES[layout.encoding.name]
        + (4 * len(counts) if layout.residual else 0)
    )
    assert measured == rows_frame_size(layout, counts) == costs.rows_bytes(layout, counts) == by_hand


@pytest.mark.parametrize("n", [0, 1, 4, 8])
def test_small_frame_sizes(n: int) -> None:
    assert len(encode_draft(list(range(n)))) == draft_frame_size(n) == 8 + 4 * n
    assert len(encode_verdict(Verdict(n, 7, False))) == verdict_frame_size() == 13
    assert len(encode_server_hello(ServerHello(list(range(n + 1)), 300, TOKENIZER, SETTINGS))) == server_hello_size(
        n + 1
    )
    assert server_hello_size(n + 1) == 30 + 4 * (n + 1)
    assert len(encode_worker_hello(WorkerHello(TOKENIZER, 300, 320))) == worker_hello_size() == 22


def simulate(layout: RowLayout, prompt: list[int], drafts: list[int], workers: int) -> tuple[InProcessGrid, list, list]:
    """A run's frames over the in-process transport, server rank 0: returns the endpoints and kept counts."""
    grid = InProcessGrid(["server"] + [f"worker-{i}" for i in range(1, workers + 1)], timeout=5)
    server, *peers = [grid.endpoint(rank) for rank in range(workers + 1)]
    everyone = list(range(1, workers + 1))
    server.send(encode_server_hello(ServerHello(prompt, layout.vocab, TOKENIZER, SETTINGS)), everyone)
    for peer in peers:  # a worker's hello goes to every other party
        decode_server_hello(peer.recv(0), "server")
        others = [rank for rank in range(workers + 1) if rank != peer.rank]
        peer.send(encode_worker_hello(WorkerHello(TOKENIZER, layout.vocab, layout.vocab + 7)), others)
    for receiver in [server, *peers]:
        for peer in peers:
            if peer is not receiver:
                decode_worker_hello(receiver.recv(peer.rank), peer.name_of(peer.rank))
    kept = []
    for r, n in enumerate(drafts):
        server.send(encode_draft([(r + j) % layout.vocab for j in range(n)]), everyone)
        kept.append([])
        for i, peer in enumerate(peers):
            assert len(decode_draft(peer.recv(0), "server", 8, layout.vocab)) == n
            rows = rows_for(layout, n + 1, seed=100 * r + i)
            kept[-1].append([row.ids.numel() for row in rows])
            peer.send(encode_rows(rows, layout), [0])
            decode_rows(server.recv(peer.rank), peer.name_of(peer.rank), layout, n + 1)
        server.send(encode_verdict(Verdict(n // 2, 5, r == len(drafts) - 1)), everyone)
        for peer in peers:
            decode_verdict(peer.recv(0), "server", n, layout.vocab)
    assert grid.pending() == 0
    return grid, [server, *peers], kept


@pytest.mark.parametrize("layout", [*layouts(SMALL_VOCAB, 8), *layouts(SMALL_VOCAB, None)], ids=layout_id)
@pytest.mark.parametrize("workers", [1, 3])
def test_measured_traffic_equals_the_cost_model(layout: RowLayout, workers: int) -> None:
    prompt, drafts = list(range(17)), [4, 0, 8, 1]
    _, (server, *peers), kept = simulate(layout, prompt, drafts, workers)
    expected = costs.expected_bytes(layout, len(prompt), drafts, workers, kept if layout.adaptive else None)
    assert (server.stats.bytes_sent, server.stats.bytes_received) == (expected.server.sent, expected.server.received)
    for peer, cost in zip(peers, expected.workers, strict=True):
        assert (peer.stats.bytes_sent, peer.stats.bytes_received) == (cost.sent, cost.received)
    # by hand: hello, rounds of draft + verdict (broadcast once) and, per worker, rows
    downlink = 30 + 4 * len(prompt) + sum(8 + 4 * n + 13 for n in drafts)
    assert expected.server.sent == downlink and expected.workers[0].received == downlink + 22 * (workers - 1)


def test_full_distribution_baselines() -> None:
    layout = RowLayout(PACKED, QWEN_VOCAB, 64, residual=True)
    baseline = costs.full_distribution_bytes(layout, 10, [4, 4], 2)
    rows = [HEADER + (n + 1) * QWEN_VOCAB for n in (4, 4)]  # one byte per probability, no ids
    assert baseline.workers[0].sent == 22 + sum(rows)
    assert costs.full_distribution_bytes_per_token(F32, QWEN_VOCAB, 2) == 8 + 13 + 2 * (HEADER + 4 * QWEN_VOCAB)
    assert costs.full_distribution_bytes_per_token(F16, QWEN_VOCAB, 1) == 8 + 13 + HEADER + 2 * QWEN_VOCAB


def test_adaptive_cost_needs_the_kept_counts() -> None:
    with pytest.raises(ValueError, match="kept counts"):
        costs.expected_bytes(RowLayout(F32, SMALL_VOCAB, 8, adaptive=True), 3, [1], 1)


def test_layout_refuses_nonsense() -> None:
    with pytest.raises(FedAttnError, match="needs a cap"):
        RowLayout(F32, SMALL_VOCAB, None, adaptive=True)
    with pytest.raises(FedAttnError, match="K = 301"):
        RowLayout(F32, SMALL_VOCAB, 301)
    with pytest.raises(FedAttnError, match="K = 0"):
        RowLayout(F32, SMALL_VOCAB, 0)


# -- malformed frames: each refused with its own message -------------------------------------------------------------
def refused(decode, *args) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(*args)
    message = str(info.value)
    assert SENDER in message and "\n" not in message, message
    return message


def rows_refused(frame: bytes, layout: RowLayout, positions: int = 3) -> str:
    return refused(decode_rows, frame, SENDER, layout, positions)


def hand_rows(layout: RowLayout, ids: list[list[int]], probs: list[list[float]], residuals: list[float]) -> bytes:
    """A rows frame built by hand for an int32-id layout (so anything can be put in it)."""
    counts = [len(row) for row in ids]
    k = 0 if layout.full else layout.k
    header = struct.pack("<4sBBBBHI", MAGIC, VERSION, KIND_ROWS, layout.encoding.code, layout.flags, len(ids), k)
    flat_ids = [i for row in ids for i in row]
    flat_probs = np.array([p for row in probs for p in row], dtype="<f4" if layout.encoding.name == "f32" else "<f2")
    body = np.array([c - 1 for c in counts], dtype="<i4").tobytes() if layout.adaptive else b""
    body += b"" if layout.full else np.array(flat_ids, dtype="<i4").tobytes()
    body += flat_probs.tobytes()
    body += np.array(residuals, dtype="<f4").tobytes() if layout.residual else b""
    return header + body


FIXED = RowLayout(F32, SMALL_VOCAB, 2, residual=True)
GOOD_IDS, GOOD_PROBS, GOOD_EPS = [[5, 9], [0, 299], [7, 8]], [[0.5, 0.25], [0.7, 0.1], [0.9, 0.05]], [0.25, 0.2, 0.05]


def test_hand_rows_match_the_encoder() -> None:
    """The hand-built frame is a valid frame, so each defect below is the only one."""
    rows = [SparseRow(torch.tensor(i), torch.tensor(p), e) for i, p, e in zip(GOOD_IDS, GOOD_PROBS, GOOD_EPS)]
    assert hand_rows(FIXED, GOOD_IDS, GOOD_PROBS, GOOD_EPS) == encode_rows(rows, FIXED)
    assert len(decode_rows(hand_rows(FIXED, GOOD_IDS, GOOD_PROBS, GOOD_EPS), SENDER, FIXED, 3)) == 3


def with_row(index: int, ids=None, probs=None, eps=None, layout: RowLayout = FIXED) -> bytes:
    all_ids, all_probs, all_eps = [list(r) for r in GOOD_IDS], [list(r) for r in GOOD_PROBS], list(GOOD_EPS)
    all_ids[index] = ids or all_ids[index]
    all_probs[index] = probs or all_probs[index]
    all_eps[index] = GOOD_EPS[index] if eps is None else eps
    return hand_rows(layout, all_ids, all_probs, all_eps)


def test_rows_size_and_header_defects() -> None:
    frame = hand_rows(FIXED, GOOD_IDS, GOOD_PROBS, GOOD_EPS)
    assert "truncated at 10 bytes" in rows_refused(frame[:10], FIXED)
    assert f"{len(frame) - 1} bytes, expected {len(frame)}" in rows_refused(frame[:-1], FIXED)
    assert f"{len(frame) + 4} bytes, expected {len(frame)}" in rows_refused(frame + b"\0" * 4, FIXED)
    assert f"kind {KIND_DRAFT}, expected {KIND_ROWS}" in rows_refused(encode_draft([1, 2]), FIXED)
    assert "not a fedattn frame" in rows_refused(b"XXXX" + frame[4:], FIXED)
    assert "protocol version 9" in rows_refused(frame[:4] + b"\x09" + frame[5:], FIXED)
    f16 = RowLayout(F16, SMALL_VOCAB, 2, residual=True)
    assert "encoding code 2, expected 1 (f32)" in rows_refused(hand_rows(f16, GOOD_IDS, GOOD_PROBS, GOOD_EPS), FIXED)
    no_eps = RowLayout(F32, SMALL_VOCAB, 2)
    assert "layout flags 0x0, expected 0x4" in rows_refused(hand_rows(no_eps, GOOD_IDS, GOOD_PROBS, []), FIXED)
    assert "3 positions, expected 4" in rows_refused(frame, FIXED, 4)
    three = RowLayout(F32, SMALL_VOCAB, 3, residual=True)
    assert "K = 2, expected 3" in rows_refused(frame, three)


def test_rows_id_defects() -> None:
    assert "row 1: id outside [0, 300)" in rows_refused(with_row(1, ids=[0, 300]), FIXED)
    assert "row 2: id outside [0, 300)" in rows_refused(with_row(2, ids=[-1, 8]), FIXED)
    assert "row 1: id 4 repeated" in rows_refused(with_row(1, ids=[4, 4]), FIXED)
    # the same id in two different rows is fine
    decode_rows(with_row(1, ids=[5, 9]), SENDER, FIXED, 3)
    packed = RowLayout(PACKED, SMALL_VOCAB, 2)
    wider = RowLayout(PACKED, 512, 2)  # the same 9-bit ids, so id 400 fits the stream but not the vocabulary
    rows = [SparseRow(torch.tensor(i), torch.tensor(p), e) for i, p, e in zip(GOOD_IDS, GOOD_PROBS, GOOD_EPS)]
    rows[2] = SparseRow(torch.tensor([7, 400]), rows[2].probs, rows[2].residual)
    assert "row 2: id outside [0, 300)" in rows_refused(encode_rows(rows, wider), packed)
    frame = bytearray(encode_rows(rows[:2] + [rows[1]], packed))  # 6 ids x 9 bits = 54 bits: 2 padding bits
    frame[HEADER + 6] |= 0x80
    assert "non-zero padding bits" in rows_refused(bytes(frame), packed)


def test_rows_probability_defects() -> None:
    assert "row 0: negative probability (-0.1)" in rows_refused(with_row(0, probs=[0.85, -0.1]), FIXED)
    assert "row 1: probability above 1" in rows_refused(with_row(1, probs=[1.5, 0.0001]), FIXED)
    assert "row 2: probabilities sum above 1" in rows_refused(with_row(2, probs=[0.6, 0.6]), FIXED)
    assert "row 0: non-finite probability" in rows_refused(with_row(0, probs=[float("nan"), 0.1]), FIXED)
    assert "row 0: non-finite probability" in rows_refused(with_row(0, probs=[float("inf"), 0.1]), FIXED)
    f16 = RowLayout(F16, SMALL_VOCAB, 2, residual=True)
    assert "non-finite probability" in rows_refused(with_row(1, probs=[float("inf"), 0.1], layout=f16), f16)
    # the documented tolerance: 1e-4 above 1 passes, 1e-3 does not
    decode_rows(with_row(0, probs=[0.75005, 0.25], eps=0.0), SENDER, FIXED, 3)
    assert "sum above 1 (tolerance 0.0001)" in rows_refused(with_row(0, probs=[0.751, 0.25], eps=0.0), FIXED)


def test_rows_residual_defects() -> None:
    assert "row 1: non-finite residual" in rows_refused(with_row(1, eps=float("nan")), FIXED)
    assert "row 1: non-finite residual" in rows_refused(with_row(1, eps=float("inf")), FIXED)
    assert "row 0: residual outside [0, 1] (-0.25)" in rows_refused(with_row(0, eps=-0.25), FIXED)
    assert "row 0: residual outside [0, 1] (1.5)" in rows_refused(with_row(0, eps=1.5), FIXED)
    assert "row 2: residual 0.5 inconsistent with the kept mass 0.95" in rows_refused(with_row(2, eps=0.5), FIXED)
    # lossless: sum + eps = 1 within 1e-4
    decode_rows(with_row(2, eps=0.05 + 5e-5), SENDER, FIXED, 3)
    assert "inconsistent" in rows_refused(with_row(2, eps=0.05 + 3e-4), FIXED)
    assert "inconsistent" in rows_refused(with_row(2, eps=0.05 - 3e-4), FIXED)
    # packed: the kept mass may fall short of 1 - eps by the rounding, never exceed it
    packed = RowLayout(PACKED, SMALL_VOCAB, 2, residual=True)
    rows = [SparseRow(torch.tensor(i), torch.tensor(p), e) for i, p, e in zip(GOOD_IDS, GOOD_PROBS, GOOD_EPS)]
    decode_rows(encode_rows(rows, packed), SENDER, packed, 3)
    lying_low = rows[:2] + [SparseRow(rows[2].ids, rows[2].probs, 0.5)]  # kept mass 0.95 > 1 - 0.5
    assert "row 2: residual 0.5 inconsistent" in rows_refused(encode_rows(lying_low, packed), packed)
    lying_high = rows[:2] + [SparseRow(rows[2].ids, torch.tensor([0.3, 0.05]), 0.05)]  # 0.35 << 0.95
    assert "row 2: residual 0.05 inconsistent" in rows_refused(encode_rows(lying_high, packed), packed)
    # a full distribution without residual must sum to 1
    full = RowLayout(F32, SMALL_VOCAB, None)
    half = [SparseRow(torch.arange(SMALL_VOCAB), torch.full((SMALL_VOCAB,), 0.5 / SMALL_VOCAB), 0.0)] * 3
    assert "row 0: residual 0 inconsistent with the kept mass 0.5" in rows_refused(encode_rows(half, full), full)


def test_rows_count_defects() -> None:
    adaptive = RowLayout(F32, SMALL_VOCAB, 3, adaptive=True)
    good = hand_rows(adaptive, GOOD_IDS, GOOD_PROBS, [])
    assert len(decode_rows(good, SENDER, adaptive, 3)) == 3
    frame = bytearray(good)
    struct.pack_into("<i", frame, HEADER + 4, -1)  # row 1's count - 1 = -1: no tokens
    assert "row 1: no tokens kept (count 0)" in rows_refused(bytes(frame), adaptive)
    struct.pack_into("<i", frame, HEADER + 4, 3)  # count 4 > cap 3
    assert "row 1: 4 tokens kept, above the cap K = 3" in rows_refused(bytes(frame), adaptive)
    assert "too few for 3 counts" in rows_refused(good[: HEADER + 5], adaptive)
    struct.pack_into("<i", frame, HEADER + 4, 2)  # count 3 <= cap, but the frame holds only 2 for it
    assert f"{len(good)} bytes, expected {len(good) + 8}" in rows_refused(bytes(frame), adaptive)


def test_draft_defects() -> None:
    assert decode_draft(encode_draft([3, 299]), SENDER, 4, SMALL_VOCAB) == [3, 299]
    assert decode_draft(encode_draft([]), SENDER, 4, SMALL_VOCAB) == []
    assert "5 draft tokens, longer than gamma = 4" in refused(decode_draft, encode_draft([1] * 5), SENDER, 4, 300)
    assert "draft id 300 outside [0, 300)" in refused(decode_draft, encode_draft([1, 300]), SENDER, 4, 300)
    assert "truncated at 5 bytes" in refused(decode_draft, encode_draft([1])[:5], SENDER, 4, 300)
    assert "11 bytes, expected 12" in refused(decode_draft, encode_draft([1])[:-1], SENDER, 4, 300)
    assert f"kind {KIND_ROWS}, expected {KIND_DRAFT}" in refused(
        decode_draft, hand_rows(FIXED, GOOD_IDS, GOOD_PROBS, GOOD_EPS), SENDER, 4, 300
    )


def test_verdict_defects() -> None:
    assert decode_verdict(encode_verdict(Verdict(4, 299, True)), SENDER, 4, SMALL_VOCAB) == Verdict(4, 299, True)
    too_many = encode_verdict(Verdict(5, 1, False))
    assert "5 drafts accepted of a draft of 4" in refused(decode_verdict, too_many, SENDER, 4, 300)
    assert "next token 300 outside [0, 300)" in refused(
        decode_verdict, encode_verdict(Verdict(0, 300, False)), SENDER, 4, 300
    )
    frame = encode_verdict(Verdict(0, 1, True))
    assert "done flag 2, expected 0 or 1" in refused(decode_verdict, frame[:-1] + b"\x02", SENDER, 4, 300)
    assert "truncated at 12 bytes, shorter than its 13-byte header" in refused(
        decode_verdict, frame[:-1], SENDER, 4, 300
    )
    assert "14 bytes, expected 13" in refused(decode_verdict, frame + b"\0", SENDER, 4, 300)
    short = refused(decode_verdict, frame[:4], SENDER, 4, 300)
    assert "truncated at 4 bytes, shorter than the 6-byte preamble" in short
    draft = encode_draft([1, 0])
    assert f"kind {KIND_DRAFT}, expected {KIND_VERDICT}" in refused(decode_verdict, draft, SENDER, 4, 300)


def test_worker_hello_defects() -> None:
    def decode(hello: WorkerHello) -> str:
        return refused(decode_worker_hello, encode_worker_hello(hello), SENDER)

    qwen = WorkerHello(TOKENIZER, QWEN_VOCAB, 151_936)
    assert decode_worker_hello(encode_worker_hello(qwen), SENDER) == qwen
    assert "a vocabulary of 0 tokens" in decode(WorkerHello(TOKENIZER, 0, 10))
    assert "100 embedding rows, fewer than its vocabulary of 151665" in decode(WorkerHello(TOKENIZER, QWEN_VOCAB, 100))
    assert f"kind {KIND_VERDICT}, expected {KIND_WORKER_HELLO}" in refused(
        decode_worker_hello, encode_verdict(Verdict(0, 1, True)), SENDER
    )
    frame = encode_worker_hello(qwen)
    assert "23 bytes, expected 22" in refused(decode_worker_hello, frame + b"\0", SENDER)
    assert "truncated at 21 bytes" in refused(decode_worker_hello, frame[:-1], SENDER)


def test_server_hello_defects() -> None:
    def decode(frame: bytes) -> str:
        return refused(decode_server_hello, frame, SENDER)

    hello = ServerHello([1, 2, 299], SMALL_VOCAB, TOKENIZER, SETTINGS)
    assert decode_server_hello(encode_server_hello(hello), SENDER) == hello
    assert "empty prompt" in decode(encode_server_hello(ServerHello([], SMALL_VOCAB, TOKENIZER, SETTINGS)))
    too_long = bytearray(encode_server_hello(hello))
    struct.pack_into("<I", too_long, 6, MAX_PROMPT + 1)
    assert f"prompt of {MAX_PROMPT + 1} tokens, longer than the limit {MAX_PROMPT}" in decode(bytes(too_long))
    assert "41 bytes, expected 42" in decode(encode_server_hello(hello)[:-1])
    assert "truncated at 29 bytes" in decode(encode_server_hello(hello)[:29])
    assert "a vocabulary of 0 tokens" in decode(encode_server_hello(ServerHello([0], 0, TOKENIZER, SETTINGS)))
    assert "prompt id 300 outside [0, 300)" in decode(
        encode_server_hello(ServerHello([1, 300], SMALL_VOCAB, TOKENIZER, SETTINGS))
    )
