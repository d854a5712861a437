"""``--kv-budget``: split a cap on a query's K/V wire bytes over its frames before prefill.

The plan is a pure function of settings every party agrees on (schedule, ratios, codec, segment
lengths), so every party computes the same token counts, receivers can check them, and the cost
model predicts the bytes exactly. The budget is shared by water-filling: frames that need less
than an even share take what they need, and the rest split what is left evenly; every frame is
then cut to the most tokens whose exact frame size fits its share. The total never exceeds the
budget (each share is a floor of what remains).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedattn.errors import FedAttnError


@dataclass(frozen=True)
class Frame:
    """One K/V frame a party will send: up to ``wanted`` tokens out of a ``segment`` of tokens."""

    key: tuple[int, int]  # (sender, block)
    wanted: int
    segment: int


# exact frame bytes for (tokens, whole segment)
FrameSize = Callable[[int, bool], int]


def tokens_within(frame: Frame, cap: int, size: FrameSize) -> int:
    """The most tokens (1..wanted) of ``frame`` whose frame fits in ``cap`` bytes, or 0 if none.

    A frame is whole-segment (no explicit positions) only with every token of the segment, so
    the size is not monotone at that one point; below it, it grows with every token."""
    if size(frame.wanted, frame.wanted == frame.segment) <= cap:
        return frame.wanted
    low, high = 0, frame.wanted - 1  # the answer is in [low, high]; explicit positions below wanted
    while low < high:
        middle = (low + high + 1) // 2
        if size(middle, False) <= cap:
            low = middle
        else:
            high = middle - 1
    return low


def fit_budget(frames: list[Frame], budget: int, size: FrameSize) -> dict[tuple[int, int], int]:
    """Tokens per frame so that the frames' total size is at most ``budget`` bytes."""
    smallest = sum(size(1, frame.segment == 1) for frame in frames)
    if smallest > budget:
        raise FedAttnError(
            f"--kv-budget {budget} bytes cannot carry one token in each of this run's {len(frames)} K/V frames "
            f"(at least {smallest} bytes)"
        )
    counts: dict[tuple[int, int], int] = {}
    remaining = budget
    by_need = sorted(frames, key=lambda frame: (size(frame.wanted, frame.wanted == frame.segment), frame.key))
    for left, frame in zip(range(len(by_need), 0, -1), by_need):
        count = tokens_within(frame, remaining // left, size)
        if count == 0:  # cannot happen while the check above holds (see the module doc)
            raise AssertionError(f"budget plan left frame {frame.key} without a token")
        counts[frame.key] = count
        remaining -= size(count, count == frame.segment)
    return counts
