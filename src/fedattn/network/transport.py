"""Moving byte frames between named parties.

A transport knows nothing about attention: it delivers opaque frames, point to point or to several
addressees at once, in order per (sender, receiver) pair, and counts the bytes that cross it. The
in-process grid below is the embedded default; a networked transport implements the same class.
"""

from __future__ import annotations

import queue
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from fedattn.errors import FedAttnError


@dataclass
class TrafficStats:
    """Bytes and frames as they crossed the transport (counted on the serialized frames); ``peers``
    holds the same counts per peer's rank, so a party serving several others in one run (FedSEA's
    server) can report each peer's share (a frame sent to several peers counts for each of them)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    peers: dict[int, TrafficStats] = field(default_factory=dict)

    def peer(self, rank: int) -> TrafficStats:
        """The counts of what crossed between this party and ``rank`` (zero when nothing did)."""
        return self.peers.get(rank, TrafficStats())

    def count_sent(self, size: int, to: Sequence[int]) -> None:
        self.bytes_sent += size
        self.frames_sent += 1
        for rank in to:
            peer = self.peers.setdefault(rank, TrafficStats())
            peer.bytes_sent += size
            peer.frames_sent += 1

    def count_received(self, size: int, sender: int) -> None:
        self.bytes_received += size
        self.frames_received += 1
        peer = self.peers.setdefault(sender, TrafficStats())
        peer.bytes_received += size
        peer.frames_received += 1


class Transport(ABC):
    """One party's endpoint."""

    def __init__(self, rank: int, names: Sequence[str]) -> None:
        self.rank = rank
        self.names = list(names)
        self.stats = TrafficStats()

    @property
    def world_size(self) -> int:
        return len(self.names)

    def name_of(self, rank: int) -> str:
        return self.names[rank]

    def note(self, phase: str) -> None:  # noqa: B027 - deliberate no-op default, overridden by networked transports
        """This party moved on to ``phase``; a networked transport tells waiting peers (liveness)."""

    def flush(self) -> None:  # noqa: B027 - deliberate no-op default, overridden by networked transports
        """Block until everything sent has left; a networked transport needs it before exiting."""

    def send(self, frame: bytes, to: Sequence[int]) -> None:
        """Deliver ``frame`` to each addressee.

        Accounting follows the paper's edge-network model: one upload reaches every addressee
        (a broadcast medium), so ``bytes_sent`` grows by the frame size once per call.
        """
        if not to:
            return
        self._deliver(frame, to)
        self.stats.count_sent(len(frame), to)

    def recv(self, sender: int, what: str = "a frame") -> bytes:
        """The next frame from ``sender``; raises FedAttnError (saying ``what`` was awaited) if none
        arrives in time or the sender is gone."""
        frame = self._take(sender, what)
        self.stats.count_received(len(frame), sender)
        return frame

    @abstractmethod
    def _deliver(self, frame: bytes, to: Sequence[int]) -> None: ...

    @abstractmethod
    def _take(self, sender: int, what: str) -> bytes: ...


class InProcessGrid:
    """N endpoints in one process, joined by FIFO mailboxes (one per ordered pair of parties)."""

    def __init__(self, names: Sequence[str], timeout: float = 60.0) -> None:
        self.names = list(names)
        self.timeout = timeout
        size = len(self.names)
        self._mailboxes = {(s, r): queue.Queue() for s in range(size) for r in range(size) if s != r}

    def endpoint(self, rank: int) -> InProcessTransport:
        return InProcessTransport(self, rank)

    def pending(self) -> int:
        """Frames delivered but never taken: non-zero after a run means a schedule mismatch."""
        return sum(box.qsize() for box in self._mailboxes.values())


class InProcessTransport(Transport):
    def __init__(self, grid: InProcessGrid, rank: int) -> None:
        super().__init__(rank, grid.names)
        self._grid = grid

    def _deliver(self, frame: bytes, to: Sequence[int]) -> None:
        for receiver in to:
            if receiver == self.rank or not 0 <= receiver < self.world_size:
                raise ValueError(f"invalid addressee {receiver} for party {self.rank}")
            self._grid._mailboxes[(self.rank, receiver)].put(frame)

    def _take(self, sender: int, what: str) -> bytes:
        try:
            return self._grid._mailboxes[(sender, self.rank)].get(timeout=self._grid.timeout)
        except queue.Empty:
            raise FedAttnError(
                f"{self.name_of(self.rank)} waited {self._grid.timeout:g} s for {what} from {self.name_of(sender)}: "
                "no frame arrived"
            ) from None
