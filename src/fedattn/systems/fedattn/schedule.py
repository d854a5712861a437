"""Which party sees which party's keys and values at which Transformer block.

A schedule is the whole of FedAttn's communication pattern: everything else (the engine, the cost
model, the test oracle) asks it ``receives(layer, receiver, sender)``. The paper's sync interval,
explicit block lists and placements only choose ``sync_layers``; the publisher's receive blocks
(all of them: publisher-dense) and the extra publisher sync add edges towards or from the task
publisher.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from fedattn.errors import FedAttnError

PLACEMENTS = ("shallow-half", "deep-half", "progressive", "regressive")


@dataclass(frozen=True)
class Schedule:
    """The sync pattern of one run.

    ``sync_layers`` are global blocks (all-to-all exchange). At ``publisher_layers`` the task
    publisher also receives every collaborator's K/V (at every block: publisher-dense). With ``publisher_sync_every``
    (H_pub) every party also receives the publisher's K/V at blocks l % H_pub == 0 that are not
    global (the paper's adaptive KV aggregation).
    """

    num_layers: int
    sync_layers: tuple[int, ...]
    publisher_layers: tuple[int, ...] = ()
    publisher_sync_every: int | None = None

    def __post_init__(self) -> None:
        for what, layers in (("sync", self.sync_layers), ("publisher receive", self.publisher_layers)):
            for layer in layers:
                if not 0 <= layer < self.num_layers:
                    raise FedAttnError(
                        f"{what} block {layer} is out of range: the model has blocks 0..{self.num_layers - 1}"
                    )
            if list(layers) != sorted(set(layers)):
                raise FedAttnError(f"{what} blocks must be distinct and increasing, got {list(layers)}")
        if self.publisher_sync_every is not None and self.publisher_sync_every < 1:
            raise FedAttnError(f"the publisher sync interval must be >= 1, got {self.publisher_sync_every}")

    @property
    def publisher_dense(self) -> bool:
        """The publisher receives every collaborator's K/V at every block."""
        return len(self.publisher_layers) == self.num_layers

    @property
    def publisher_sync_layers(self) -> tuple[int, ...]:
        """Blocks where everyone also attends to the publisher's tokens (not already global)."""
        if self.publisher_sync_every is None:
            return ()
        return tuple(
            layer for layer in range(0, self.num_layers, self.publisher_sync_every) if layer not in self.sync_layers
        )

    def receives(self, layer: int, receiver: int, sender: int, publisher: int) -> bool:
        """Whether ``receiver`` attends to ``sender``'s tokens at ``layer`` (a party always sees itself)."""
        if receiver == sender or layer in self.sync_layers:
            return True
        if receiver == publisher and layer in self.publisher_layers:
            return True
        return sender == publisher and layer in self.publisher_sync_layers

    def receivers(self, layer: int, sender: int, num_parties: int, everyone_decodes: bool) -> list[int]:
        """The other parties that need ``sender``'s K/V at ``layer`` (publisher = last party).

        Prefill is causal, so K/V only helps a later party's prefill; an earlier party can use it
        only to decode its own answer. When only the publisher (the last party) decodes, nothing
        is sent backwards.
        """
        publisher = num_parties - 1
        return [
            n
            for n in range(num_parties)
            if n != sender and self.receives(layer, n, sender, publisher) and (everyone_decodes or n > sender)
        ]

    def describe(self) -> str:
        parts = [f"sync blocks {list(self.sync_layers)}"]
        if self.publisher_dense:
            parts.append("publisher-dense")
        elif self.publisher_layers:
            parts.append(f"publisher receives at {format_layers(self.publisher_layers)}")
        if self.publisher_sync_every is not None:
            parts.append(f"publisher extra sync every {self.publisher_sync_every}")
        return ", ".join(parts)


def all_layers(num_layers: int) -> tuple[int, ...]:
    return tuple(range(num_layers))


@dataclass(frozen=True)
class NamedSchedule:
    """A named exchange recipe for a model of L blocks: the publisher's receive blocks, the
    collaborators' sync blocks (None: taken from the other options, none if none given) and,
    where the recipe says so, the K/V codec, token selection and exchange ratio. Options given
    explicitly win over the recipe's codec, selection and ratio."""

    description: str
    publisher_layers: Callable[[int], tuple[int, ...]]
    sync_layers: Callable[[int], tuple[int, ...]] | None = None
    kv_codec: str | None = None
    kv_select: str | None = None
    ratio_comm: float | None = None


NAMED_SCHEDULES = {
    "publisher-dense": NamedSchedule("the publisher receives every block", all_layers),
    "retrieval": NamedSchedule(
        "every block is global (K/V flows only to later parties) and K/V crosses as int4-kivi: "
        "centralized quality on crossfacts at 29% of bfloat16's bytes",
        publisher_layers=lambda num_layers: (),
        sync_layers=all_layers,
        kv_codec="int4-kivi",
    ),
}


def every(interval: int, num_layers: int) -> tuple[int, ...]:
    """The default schedule: block l is global iff l % H == 0 (block 0 always; H = 1 is centralized)."""
    if interval < 1:
        raise FedAttnError(f"the sync interval H must be >= 1, got {interval}")
    return tuple(range(0, num_layers, interval))


def placement(name: str, count: int, num_layers: int) -> tuple[int, ...]:
    """``count`` global blocks placed by one of the paper's placement variants."""
    if count < 1 or count > num_layers:
        raise FedAttnError(f"a placement needs between 1 and {num_layers} sync blocks, got {count}")
    if name == "shallow-half":
        return _evenly_spaced(count, num_layers // 2)
    if name == "deep-half":
        return tuple(sorted(num_layers - 1 - x for x in _evenly_spaced(count, num_layers // 2)))
    if name == "progressive":
        return _graded(list(range(1, count)), num_layers)
    if name == "regressive":
        return _graded(list(range(count - 1, 0, -1)), num_layers)
    raise FedAttnError(f"unknown placement {name!r}: choose one of {', '.join(PLACEMENTS)}")


def _evenly_spaced(count: int, span: int) -> tuple[int, ...]:
    """k evenly spaced integers in [0, span): (i * span) // k; collapses to distinct values."""
    return tuple(sorted({(i * max(span, 1)) // count for i in range(count)}))


def _graded(gaps: list[int], num_layers: int) -> tuple[int, ...]:
    """Points from 0 to L-1 whose gaps are proportional to ``gaps``, rounded, kept distinct."""
    if not gaps:
        return (0,)
    total = sum(gaps)
    points = [0]
    running = 0
    for gap in gaps:
        running += gap
        points.append(round((num_layers - 1) * running / total))
    points[-1] = num_layers - 1
    for i in range(1, len(points)):  # push duplicates apart, forwards then backwards
        points[i] = max(points[i], points[i - 1] + 1)
    for i in range(len(points) - 2, -1, -1):
        points[i] = min(points[i], points[i + 1] - 1)
    return tuple(points)


def sync_count(interval: int, num_layers: int) -> int:
    """k = ceil(L / H): the number of global blocks of the default schedule."""
    return math.ceil(num_layers / interval)


def parse_layers(text: str) -> tuple[int, ...]:
    """'0,8,16' -> (0, 8, 16) and '12-23' -> (12, ..., 23), with one-line errors for junk; whether
    the model has these blocks is for ``check_layers`` to say (the text alone cannot)."""
    layers: set[int] = set()
    for part in filter(None, (part.strip() for part in text.split(","))):
        low, _, high = part.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise FedAttnError(f"expected comma-separated block indices or ranges like 12-23, got {text!r}") from None
        if last < first:
            raise FedAttnError(f"the range {part} runs backwards (write {last}-{first})")
        layers.update(range(first, last + 1))
    if not layers:
        raise FedAttnError(f"{text!r} names no block")
    return tuple(sorted(layers))


def check_layers(layers: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """``layers`` if a model of ``num_layers`` blocks has every one of them."""
    for layer in layers:
        if not 0 <= layer < num_layers:
            raise FedAttnError(f"block {layer} is out of range: the model has blocks 0..{num_layers - 1}")
    return layers


def format_layers(layers: tuple[int, ...] | list[int]) -> str:
    """(0, 1, 2, 5, 12, 13) -> '0-2,5,12-13': what ``parse_layers`` reads back."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in runs)
