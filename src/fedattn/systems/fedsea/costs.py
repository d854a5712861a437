"""FedSEA's cost model: the exact bytes of a session from the frame sizes (``frames``).

A client whose answer has N tokens sends its hello, the prompt's T hidden states with their
positions, N - 1 single hidden states with theirs, and done; it receives the server's answer and as
many hidden states back, without positions. Recomputing the whole prefix every step (FL-GLM, the
paper's baseline) would send T + k states at step k instead of one.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedattn.network.kv_codec import get_codec
from fedattn.systems.fedsea import frames


@dataclass(frozen=True)
class SessionBytes:
    client_sent: int
    client_received: int


def session_bytes(codec_name: str, width: int, prompt_length: int, answer_length: int) -> SessionBytes:
    """One client's session: what it sends (the server receives) and receives (the server sends)."""
    codec = get_codec(codec_name)
    steps = [prompt_length] + [1] * max(answer_length - 1, 0)
    up = sum(frames.hidden_size(codec, tokens, width, True) for tokens in steps)
    down = sum(frames.hidden_size(codec, tokens, width, False) for tokens in steps)
    return SessionBytes(frames.HELLO.size + up + frames.DONE_SIZE, frames.ANSWER.size + down)


def recompute_bytes(codec_name: str, width: int, prompt_length: int, answer_length: int) -> int:
    """Both ways, were the whole prefix sent and returned at every step (no KV cache on either side)."""
    codec = get_codec(codec_name)
    steps = [prompt_length + step for step in range(max(answer_length, 1))]
    return sum(
        frames.hidden_size(codec, tokens, width, True) + frames.hidden_size(codec, tokens, width, False)
        for tokens in steps
    )
