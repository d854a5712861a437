"""FedRefine's cost model: the exact bytes of one query with one sharer, from the frame sizes (``frames``).

The receiver sends its hello and its request; the sharer answers and sends one K/V frame per
sharer block the receiver maps (``alignment.sent_blocks``: with a shallower receiver only its
blocks' partners cross, each once). A sharer's cache is n tokens x sent blocks x 2 x (heads_S x
d_S) x bytes per element for a float codec, plus a 22-byte header per block: Qwen2.5-Coder-1.5B
(28 blocks, 2 KV heads of 128) for a 24-block receiver in bfloat16 sends 24 blocks, 24,576 bytes
per token (the spec's 28,672 counts all 28).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedattn.network.frames import kv_frame_size
from fedattn.network.kv_codec import get_codec
from fedattn.systems.fedrefine import frames
from fedattn.systems.fedrefine.alignment import sent_blocks
from fedattn.systems.fedrefine.caches import CacheDims


@dataclass(frozen=True)
class SharerBytes:
    """One sharer's exchange with the receiver: what the receiver sends (the sharer receives) and receives."""

    receiver_sent: int
    receiver_received: int


def cache_bytes(codec_name: str, tokens: int, sharer: CacheDims, receiver_blocks: int) -> int:
    """The K/V frames of a sharer's cache of ``tokens`` tokens for a receiver of ``receiver_blocks`` blocks."""
    codec = get_codec(codec_name)
    blocks = len(sent_blocks(receiver_blocks, sharer.blocks))
    return blocks * kv_frame_size(tokens, True, codec, sharer.heads, sharer.head_dim)


def sharer_bytes(
    codec_name: str, sharer_name: str, request: frames.Request, sharer: CacheDims, receiver_blocks: int
) -> SharerBytes:
    """One sharer's whole exchange: hello and request one way, answer and cache the other."""
    hello = frames.HELLO.size + len(sharer_name.encode())
    cache = cache_bytes(codec_name, request.count, sharer, receiver_blocks)
    return SharerBytes(hello + frames.request_size(request), frames.ANSWER.size + cache)
