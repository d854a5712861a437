"""FedSEA's frames: the common preamble (``network.frames``: MAGIC, VERSION, kind), fixed
little-endian fields, then a body; each ``decode_*`` refuses anything but what its receiver
expects, naming the sender. The server is never sent a token id, a mask or a logit: only hidden
states and their positions.

| frame   | from -> to       | fields after the 6-byte preamble                                      | bytes          |
|---------|------------------|-----------------------------------------------------------------------|----------------|
| hello   | client -> server | blocks u16, hidden u32, A u16, C u16, codec u8, noise mode u8,        | 38             |
|         |                  | noise f32, reply noise f32, positions u32, model 8s                   |                |
| answer  | server -> client | accepted u8, reason length u16; the reason (UTF-8, refusals only)     | 9 + reason     |
| hidden  | either way       | codec u8, flags u8, tokens u32, width u32; positions i32 (up only);   | 16 [+ 4 n] + P |
|         |                  | the codec's payload of (tokens, width)                                 |                |
| done    | client -> server | the answer's length (``network.frames.encode_small``)                  | 14             |

P is the codec's ``tensor_size(n, d)``: 4 n d for float32, 2 n d for bfloat16 and float16.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

from fedattn.errors import ProtocolError
from fedattn.network.frames import (
    KIND_HIDDEN,
    KIND_SPLIT_ANSWER,
    KIND_SPLIT_DONE,
    KIND_SPLIT_HELLO,
    MAGIC,
    SMALL_FRAME,
    VERSION,
    check_preamble,
    decode_small,
    encode_small,
    reason_text,
)
from fedattn.network.kv_codec import CodecError, KVCodec, codec_by_code

HELLO = struct.Struct("<4sBBHIHHBBffI8s")
ANSWER = struct.Struct("<4sBBBH")
HIDDEN = struct.Struct("<4sBBBBII")
POSITION_BYTES = 4
FLAG_POSITIONS = 1  # the frame carries its tokens' positions (client -> server)
MAX_REASON = 400  # bytes of a refusal's reason
MAX_POSITIONS = 1 << 20
NOISE_OFF, NOISE_ABSOLUTE, NOISE_RELATIVE = 0, 1, 2
DONE_SIZE = SMALL_FRAME.size


@dataclass(frozen=True)
class ClientHello:
    """What a client asks of the server: the model it splits (blocks, width, weights), its blocks,
    the codec and noise both ways, and the most positions its session will use."""

    num_blocks: int
    hidden_size: int
    first: int  # A
    last: int  # C
    codec: int  # the hidden codec's code
    noise_mode: int  # NOISE_OFF, NOISE_ABSOLUTE or NOISE_RELATIVE (the reply's noise takes the same mode)
    noise: float
    reply_noise: float
    positions: int
    model: bytes  # 8-byte fingerprint of the weights


def encode_hello(hello: ClientHello) -> bytes:
    return HELLO.pack(
        MAGIC,
        VERSION,
        KIND_SPLIT_HELLO,
        hello.num_blocks,
        hello.hidden_size,
        hello.first,
        hello.last,
        hello.codec,
        hello.noise_mode,
        hello.noise,
        hello.reply_noise,
        hello.positions,
        hello.model,
    )


def decode_hello(frame: bytes, sender: str) -> ClientHello:
    where = f"from {sender} (hello)"
    if len(frame) != HELLO.size:
        raise ProtocolError(f"bad frame {where}: {len(frame)} bytes, expected {HELLO.size}")
    magic, version, kind, *fields = HELLO.unpack(frame)
    check_preamble(magic, version, kind, KIND_SPLIT_HELLO, where)
    hello = ClientHello(*fields)
    if codec_by_code(hello.codec) is None:
        raise ProtocolError(f"bad frame {where}: unknown hidden codec {hello.codec}")
    if hello.noise_mode not in (NOISE_OFF, NOISE_ABSOLUTE, NOISE_RELATIVE):
        raise ProtocolError(f"bad frame {where}: unknown noise mode {hello.noise_mode}")
    for name, level in (("noise", hello.noise), ("reply noise", hello.reply_noise)):
        if not (math.isfinite(level) and level >= 0):
            raise ProtocolError(f"bad frame {where}: {name} level {level}")
    if not 0 < hello.positions <= MAX_POSITIONS:
        raise ProtocolError(f"bad frame {where}: {hello.positions} positions, expected 1..{MAX_POSITIONS}")
    return hello


def encode_answer(reason: str | None) -> bytes:
    """The server's answer to a hello: accepted (``reason`` None) or refused, saying why."""
    text = b"" if reason is None else reason.encode()[:MAX_REASON]
    return ANSWER.pack(MAGIC, VERSION, KIND_SPLIT_ANSWER, reason is None, len(text)) + text


def decode_answer(frame: bytes, sender: str) -> str | None:
    """None when accepted, else the server's reason (printable text only)."""
    where = f"from {sender} (its answer to the hello)"
    if len(frame) < ANSWER.size:
        raise ProtocolError(f"bad frame {where}: {len(frame)} bytes")
    magic, version, kind, accepted, length = ANSWER.unpack_from(frame)
    check_preamble(magic, version, kind, KIND_SPLIT_ANSWER, where)
    if accepted not in (0, 1) or length > MAX_REASON or len(frame) != ANSWER.size + length or (accepted and length):
        raise ProtocolError(f"bad frame {where}: malformed answer")
    if accepted:
        return None
    return reason_text(frame[ANSWER.size :])


def hidden_size(codec: KVCodec, tokens: int, width: int, with_positions: bool) -> int:
    """The exact bytes of a hidden frame."""
    return HIDDEN.size + (POSITION_BYTES * tokens if with_positions else 0) + codec.tensor_size(tokens, width)


def encode_hidden(hidden: torch.Tensor, codec: KVCodec, positions: torch.Tensor | None) -> bytes:
    """(n, d) hidden states, with their positions (client -> server) or without (the reply)."""
    tokens, width = hidden.shape
    header = HIDDEN.pack(
        MAGIC, VERSION, KIND_HIDDEN, codec.code, 0 if positions is None else FLAG_POSITIONS, tokens, width
    )
    placed = b"" if positions is None else positions.to("cpu", torch.int32).numpy().tobytes()
    return header + placed + codec.encode_tensor(hidden)


@dataclass(frozen=True)
class HiddenExpectation:
    """What the receiver accepts: its codec and width; a token count in [1, max_tokens] (exactly
    ``tokens`` when given); with positions, exactly ``first_position``, ``first_position`` + 1, ..."""

    codec: KVCodec
    width: int
    with_positions: bool
    max_tokens: int
    tokens: int | None = None
    first_position: int = 0


def decode_hidden(
    frame: bytes, expect: HiddenExpectation, sender: str, what: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden (n, d) float32, positions (n,) or None), or ProtocolError naming what is wrong."""
    where = f"from {sender} ({what})"
    if len(frame) < HIDDEN.size:
        raise ProtocolError(f"bad frame {where}: {len(frame)} bytes")
    magic, version, kind, codec, flags, tokens, width = HIDDEN.unpack_from(frame)
    check_preamble(magic, version, kind, KIND_HIDDEN, where)
    if codec != expect.codec.code:
        other = codec_by_code(codec)
        named = other.name if other is not None else f"unknown code {codec}"
        raise ProtocolError(f"bad frame {where}: hidden states in {named}, the session agreed on {expect.codec.name}")
    if flags != (FLAG_POSITIONS if expect.with_positions else 0):
        raise ProtocolError(f"bad frame {where}: flags {flags}")
    if width != expect.width:
        raise ProtocolError(f"bad frame {where}: hidden size {width}, the model's is {expect.width}")
    if expect.tokens is not None and tokens != expect.tokens:
        raise ProtocolError(f"bad frame {where}: {tokens} tokens, expected {expect.tokens}")
    if not 1 <= tokens <= expect.max_tokens:
        raise ProtocolError(f"bad frame {where}: {tokens} tokens, expected 1..{expect.max_tokens}")
    size = hidden_size(expect.codec, tokens, width, expect.with_positions)
    if len(frame) != size:
        raise ProtocolError(f"bad frame {where}: {len(frame)} bytes, expected {size} for {tokens} tokens")
    body = memoryview(frame)[HIDDEN.size :]
    positions = None
    if expect.with_positions:
        positions = torch.frombuffer(bytearray(body[: POSITION_BYTES * tokens]), dtype=torch.int32).long()
        expected = torch.arange(expect.first_position, expect.first_position + tokens)
        if not torch.equal(positions, expected):
            raise ProtocolError(
                f"bad frame {where}: positions {positions[0]}..{positions[-1]}, expected "
                f"{expect.first_position}..{expect.first_position + tokens - 1}"
            )
        body = body[POSITION_BYTES * tokens :]
    try:
        hidden = expect.codec.decode_tensor(body, tokens, width).float()
    except CodecError as error:
        raise ProtocolError(f"bad frame {where}: {error}") from None
    if not bool(torch.isfinite(hidden).all()):
        raise ProtocolError(f"bad frame {where}: non-finite hidden states")
    return hidden, positions


def encode_done(answer_length: int) -> bytes:
    return encode_small(KIND_SPLIT_DONE, answer_length)


def is_done(frame: bytes) -> bool:
    """A frame whose preamble says done (the server reads a session's next frame as either kind)."""
    return len(frame) == DONE_SIZE and frame[5] == KIND_SPLIT_DONE


def decode_done(frame: bytes, sender: str, upper: int) -> int:
    return decode_small(frame, KIND_SPLIT_DONE, sender, "done", upper)
