"""How sparse probability rows (kept token ids and their probabilities) become bytes and back.

An encoding is an id format and a probability format, chosen once per run and named in each frame
by its one-byte code:

| name     | code | ids                   | probabilities                  | bytes per kept token (V = 151,665)|
|----------|------|-----------------------|--------------------------------|-----------------------------------|
| `f32`    | 1    | int32 little-endian   | float32, lossless              | 8                                 |
| `f16`    | 2    | int32 little-endian   | float16, rounded toward zero   | 6 (the top-K logits work's)       |
| `packed` | 3    | ceil(log2 V) bits     | 8-bit log-space code, down     | 18/8 + 1 = 3.25                   |

Every lossy format rounds toward the smaller probability, so a row's decoded probabilities never
sum above the true ones: a decoded value p' of a true p obeys (1 - r) p - a <= p' <= p, with
the encoding's ``relative_error`` r and ``absolute_error`` a:

- f32: r = a = 0.
- f16: r = 2^-10 (one float16 step toward zero), a = 2^-24 (the float16 subnormal step).
- packed: code c in 0..254 means exp(-c * STEP) (as float32), c = 255 means 0; STEP = 1/20, so
  r = 1 - exp(-1/20) ~ 4.9% (mean ~2.5%) and a = exp(-254/20) ~ 3.1e-6 (the smallest non-zero
  value: smaller probabilities are sent as 0). 1/20 balances the two for K = 1% of Qwen's
  vocabulary: K * a ~ 0.5% of mass at worst, against r.

Packed ids use b = max(1, ceil(log2 V)) bits each (18 for 151,665), least significant bit first,
in one little-endian bit stream per frame section; the last byte is padded with zero bits, and a
receiver refuses non-zero padding.

A receiver checks each decoded row (``check_rows``): ids in range and distinct within a row;
probabilities finite, non-negative, at most 1 + SUM_TOLERANCE each and in sum; a residual eps
(1 - the true kept mass), when sent, finite, in [0, 1] and consistent with the kept mass:
(1 - r)(1 - eps - SUM_TOLERANCE) - k a <= sum p' <= 1 - eps + SUM_TOLERANCE. SUM_TOLERANCE is the
same for every encoding, since none rounds up: it covers only the sender's float32 softmax and
its eps = 1 - sum, whose error we measured at most 1.5e-5 over 151,665 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedattn.errors import FedAttnError
from fedattn.network.kv_codec import CodecError

SUM_TOLERANCE = 1e-4
PACKED_STEP = 1 / 20
ZERO_CODE = 255
# code c -> exp(-c * STEP) as float32, code 255 -> 0: a receiver and a sender read the same table
PACKED_TABLE = np.append(np.exp(-np.arange(ZERO_CODE) * PACKED_STEP).astype(np.float32), np.float32(0.0))
_ASCENDING = PACKED_TABLE[::-1].copy()


def id_bits(vocab: int) -> int:
    """ceil(log2 vocab), at least 1: the width of a bit-packed id."""
    return max(1, (vocab - 1).bit_length())


@dataclass(frozen=True)
class IdFormat:
    """Ids (and other values below the vocabulary size) as int32 or bit-packed."""

    packed: bool

    def bits(self, vocab: int) -> int:
        return id_bits(vocab) if self.packed else 32

    def size(self, count: int, vocab: int) -> int:
        """ceil(count * bits / 8) bytes: 4 * count for int32."""
        return (count * self.bits(vocab) + 7) // 8

    def encode(self, values: np.ndarray, vocab: int) -> bytes:
        values = np.asarray(values, dtype=np.int64)
        if values.size and (int(values.min()) < 0 or int(values.max()) >= vocab):
            raise ValueError(f"values outside [0, {vocab}) cannot be encoded")
        if not self.packed:
            return values.astype("<i4").tobytes()
        bits = self.bits(vocab)
        matrix = np.empty((values.size, bits), dtype=np.uint8)
        for bit in range(bits):  # a loop over bit positions, not over values
            matrix[:, bit] = (values >> bit) & 1
        return np.packbits(matrix.reshape(-1), bitorder="little").tobytes()

    def decode(self, payload: memoryview | bytes, count: int, vocab: int) -> np.ndarray:
        """``count`` values (int64) from the first ``size(count, vocab)`` bytes; the caller checked the length.
        Range checks are the caller's (``check_rows``); non-zero padding bits raise ``CodecError``."""
        data = np.frombuffer(payload, dtype=np.uint8, count=self.size(count, vocab))
        if not self.packed:
            return data.view("<i4").astype(np.int64)
        bits = self.bits(vocab)
        stream = np.unpackbits(data, bitorder="little")
        if stream[count * bits :].any():
            raise CodecError("non-zero padding bits after the packed ids")
        matrix = stream[: count * bits].reshape(count, bits)
        values = np.zeros(count, dtype=np.int64)
        for bit in range(bits):
            values |= matrix[:, bit].astype(np.int64) << bit
        return values


@dataclass(frozen=True)
class ProbabilityFormat:
    """Probabilities as float32, float16 rounded toward zero, or 8-bit log-space codes rounded down."""

    name: str
    bits: int
    relative_error: float
    absolute_error: float

    def size(self, count: int) -> int:
        return count * self.bits // 8

    def encode(self, probs: np.ndarray) -> bytes:
        probs = np.asarray(probs, dtype=np.float32)
        if self.name == "float32":
            return probs.astype("<f4").tobytes()
        if self.name == "float16":
            exact = torch.from_numpy(probs)  # torch converts to float16 in hardware, numpy in software
            halves = exact.to(torch.float16)
            halves = torch.where(halves.float() > exact, torch.nextafter(halves, torch.zeros_like(halves)), halves)
            return halves.numpy().tobytes()
        # the smallest code whose value does not exceed p (the table descends with the code)
        below = np.searchsorted(_ASCENDING, probs, side="right") - 1
        return (ZERO_CODE - np.maximum(below, 0)).astype(np.uint8).tobytes()

    def decode(self, payload: memoryview | bytes, count: int) -> np.ndarray:
        """``count`` probabilities as float32 from the first ``size(count)`` bytes."""
        if self.name == "float32":
            return np.frombuffer(payload, dtype="<f4", count=count).astype(np.float32)
        if self.name == "float16":
            halves = np.frombuffer(payload, dtype="<f2", count=count)
            return torch.from_numpy(halves.copy()).float().numpy()
        return PACKED_TABLE[np.frombuffer(payload, dtype=np.uint8, count=count)]


FLOAT32 = ProbabilityFormat("float32", 32, 0.0, 0.0)
FLOAT16 = ProbabilityFormat("float16", 16, 2.0**-10, 2.0**-24)
LOG8 = ProbabilityFormat(
    "log8", 8, 1.0 - float((PACKED_TABLE[1:ZERO_CODE] / PACKED_TABLE[: ZERO_CODE - 1]).min()), float(PACKED_TABLE[254])
)


@dataclass(frozen=True)
class RowEncoding:
    """An id format and a probability format, named on the wire by ``code``."""

    name: str
    code: int
    ids: IdFormat
    probabilities: ProbabilityFormat


ENCODINGS: dict[str, RowEncoding] = {
    encoding.name: encoding
    for encoding in (
        RowEncoding("f32", 1, IdFormat(packed=False), FLOAT32),
        RowEncoding("f16", 2, IdFormat(packed=False), FLOAT16),
        RowEncoding("packed", 3, IdFormat(packed=True), LOG8),
    )
}


def get_encoding(name: str) -> RowEncoding:
    if name not in ENCODINGS:
        raise FedAttnError(f"unknown probability encoding {name!r}: choose one of {', '.join(ENCODINGS)}")
    return ENCODINGS[name]


def encoding_by_code(code: int) -> RowEncoding | None:
    return next((encoding for encoding in ENCODINGS.values() if encoding.code == code), None)


def check_rows(
    ids: np.ndarray | None,
    probs: np.ndarray,
    counts: np.ndarray,
    residuals: np.ndarray | None,
    vocab: int,
    probabilities: ProbabilityFormat,
) -> None:
    """Refuse decoded rows that no honest sender produces (see the module doc); raises ``CodecError``
    naming the first bad row. ``ids`` None: full distributions (every id in order); ``residuals``
    None: not sent (a full distribution's is then 0)."""
    counts = np.asarray(counts, dtype=np.int64)
    row_of = np.repeat(np.arange(len(counts)), counts)
    if ids is not None:
        _check_ids(ids, row_of, vocab)
    _first(~np.isfinite(probs), row_of, "non-finite probability")
    _first(probs < 0, row_of, "negative probability", probs)
    _first(probs > 1 + SUM_TOLERANCE, row_of, f"probability above 1 (tolerance {SUM_TOLERANCE:g})", probs)
    sums = np.bincount(row_of, weights=probs.astype(np.float64), minlength=len(counts))
    _first(sums > 1 + SUM_TOLERANCE, None, f"probabilities sum above 1 (tolerance {SUM_TOLERANCE:g})", sums)
    if residuals is None:
        if ids is not None:
            return
        residuals = np.zeros(len(counts))
    residuals = residuals.astype(np.float64)
    _first(~np.isfinite(residuals), None, "non-finite residual", residuals)
    _first((residuals < 0) | (residuals > 1), None, "residual outside [0, 1]", residuals)
    high = 1 - residuals + SUM_TOLERANCE
    low = (1 - probabilities.relative_error) * (1 - residuals - SUM_TOLERANCE) - counts * probabilities.absolute_error
    bad = (sums > high) | (sums < low)
    if bad.any():
        row = int(np.argmax(bad))
        raise CodecError(
            f"row {row}: residual {residuals[row]:.6g} inconsistent with the kept mass {sums[row]:.6g} "
            f"(expected it in [{max(low[row], 0):.6g}, {high[row]:.6g}])"
        )


def _check_ids(ids: np.ndarray, row_of: np.ndarray, vocab: int) -> None:
    _first((ids < 0) | (ids >= vocab), row_of, f"id outside [0, {vocab})")
    order = np.lexsort((ids, row_of))
    keys_row, keys_id = row_of[order], ids[order]
    repeated = (keys_row[1:] == keys_row[:-1]) & (keys_id[1:] == keys_id[:-1])
    if repeated.any():
        at = int(np.argmax(repeated))
        raise CodecError(f"row {int(keys_row[at])}: id {int(keys_id[at])} repeated")


def _first(bad: np.ndarray, row_of: np.ndarray | None, what: str, values: np.ndarray | None = None) -> None:
    """Raise for the first flagged element: ``row_of`` maps elements to rows (None: one element per row)."""
    if not bad.any():
        return
    at = int(np.argmax(bad))
    row = at if row_of is None else int(row_of[at])
    shown = "" if values is None else f" ({values[at]:.6g})"
    raise CodecError(f"row {row}: {what}{shown}")
