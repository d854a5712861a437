"""A hostile rank 0 for networked tests: it joins a 2-party run like ``fedattn participant`` does,
completes a valid handshake with the real publisher (rank 1), then sends ONE bad message.

    python fake_peer.py CASE PORT -- SHARED_OPTIONS...

CASE is one of ``CASES``; PORT is the rendezvous store's (served by the test); SHARED_OPTIONS are the
publisher's shared options (``--model tiny-random --sync-every 1 ...``), from which this script
builds the same run configuration as the CLI, so its handshake fingerprints match. Frames leave
exactly as ``TorchTransport`` frames them (``distributed.frame_messages``: an int64 size word, then
the payload with its end mark), so a case is one defect and nothing else. Afterwards it keeps its
heartbeat going and waits, so the publisher's reaction is its own and not a reaction to this
process leaving.

It prints one line per step on stdout (``fake: ...``); the line of the bad message ends with the
time it was sent (``time.time()``), so the test can tell a prompt refusal from a timeout.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time

import torch
import torch.distributed as dist

from fedattn.cli import main as cli
from fedattn.network.frames import KV_HEADER, Hello, KVBlock, decode_hello, encode_hello, encode_kv
from fedattn.network.handshake import run_fingerprints
from fedattn.network.kv_codec import CODECS
from fedattn.network.torch_transport import PAYLOAD_TAG, SIZE_TAG, frame_messages
from fedattn.runtime.dims import ModelDims
from fedattn.systems.fedattn.config import configure
from fedattn.systems.fedattn.networked import max_frame_bytes

RANK, WORLD_SIZE, PUBLISHER = 0, 2, 1
SEGMENT = [72, 101, 108, 108, 111, 33]  # any short token list: the fake never runs the model
WAIT_S = 20.0
# the KV cases: one bad frame for block 0 (the publisher's first wait); then the message-level ones
KV_CASES = ("dtype", "heads", "zero-tokens", "size-mismatch", "nan", "out-of-order")
# the hello cases: a valid handshake but for one field, and no message after it
HELLO_CASES = {
    "model-mismatch": "other weights",
    "zero-segment": "segment length 0",
    "long-segment": "segment length 5000",
}
FRAMING_CASES = ("truncated", "oversized", "negative-size", "zero-size", "short-size-word")  # gloo's own framing
CASES = (*KV_CASES, *FRAMING_CASES, *HELLO_CASES)


def say(text: str) -> None:
    print(f"fake: {text}", flush=True)


def heartbeat(port: int, stop: threading.Event) -> None:
    """``fedattn/beat/0`` = "seq progress phase", every half second; progress never moves."""
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=5))
    sequence = 0
    while not stop.is_set():
        sequence += 1
        store.set(f"fedattn/beat/{RANK}", f"{sequence} 1 prefill block 0")
        stop.wait(0.5)


def send_messages(size: torch.Tensor, payload: torch.Tensor | None, pending: list) -> None:
    """Never waited for (the publisher may never take a bad message); the tensors stay referenced."""
    pending.append((dist.isend(size, dst=PUBLISHER, tag=SIZE_TAG), size))
    if payload is not None:
        pending.append((dist.isend(payload, dst=PUBLISHER, tag=PAYLOAD_TAG), payload))


def recv_frame() -> bytes:
    size = torch.empty(1, dtype=torch.int64)
    dist.recv(size, src=PUBLISHER, tag=SIZE_TAG)
    payload = torch.empty(int(size.item()) + 1, dtype=torch.uint8)  # the frame and its end mark
    dist.recv(payload, src=PUBLISHER, tag=PAYLOAD_TAG)
    return payload[:-1].numpy().tobytes()


def size_word(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64)


def kv_block(layer: int, heads: int, head_dim: int, tokens: int = len(SEGMENT)) -> KVBlock:
    generator = torch.Generator().manual_seed(layer)
    shape = (heads, tokens, head_dim)
    return KVBlock(
        layer=layer,
        positions=torch.arange(tokens),
        key=torch.randn(shape, generator=generator),
        value=torch.randn(shape, generator=generator),
    )


def kv_shape(model_config) -> tuple[int, int]:
    """(KV heads, head dimension) of the model."""
    return model_config.num_key_value_heads, ModelDims.from_config(model_config).head_dim


def bad_frame(case: str, codec, model_config) -> bytes:
    """The one bad frame of a K/V case, whatever carries it (gloo here, gRPC in ``test_grpc_wire``):
    a frame for block 0 (the publisher's first wait) that is well formed but for the defect."""
    heads, head_dim = kv_shape(model_config)
    whole = dict(whole_segment=True)
    if case == "dtype":  # a well-formed frame in a dtype the run did not agree on
        other = CODECS["bfloat16"] if codec.name != "bfloat16" else CODECS["float16"]
        return encode_kv(kv_block(0, heads, head_dim), other, **whole)
    if case == "heads":
        return encode_kv(kv_block(0, heads + 1, head_dim), codec, **whole)
    if case == "zero-tokens":  # the header says 0 tokens, and the frame is exactly that size
        frame = encode_kv(kv_block(0, heads, head_dim, tokens=1), codec, whole_segment=False)
        fields = list(KV_HEADER.unpack_from(frame))
        fields[4], fields[8] = 0, 0  # flags, tokens
        return KV_HEADER.pack(*fields)
    if case == "size-mismatch":  # 6 tokens in the header, one float short in the bytes
        return encode_kv(kv_block(0, heads, head_dim), codec, **whole)[: -codec.bytes_per_element]
    if case == "nan":
        block = kv_block(0, heads, head_dim)
        block.value[1, 2, 3] = float("nan")
        return encode_kv(block, codec, **whole)
    if case == "out-of-order":
        return encode_kv(kv_block(1, heads, head_dim), codec, **whole)
    raise ValueError(f"{case!r} is not a K/V case; one of {', '.join(KV_CASES)}")


def hello_frame(case: str, config, model_identity: str, model_config) -> bytes:
    """This fake's hello (rank 0 of 2, a segment of ``SEGMENT``'s length): valid, with the
    fingerprints of the publisher's own run configuration and model, unless ``case`` is one of
    ``HELLO_CASES``, whose one field it gets wrong."""
    fingerprints = run_fingerprints(config, model_identity, model_config)
    if case == "model-mismatch":  # other weights, everything else the same
        fingerprints = (bytes(8 * [0xAB]), *fingerprints[1:])
    segment_length = {"zero-segment": 0, "long-segment": 5000}.get(case, len(SEGMENT))  # tiny-random: 4096 positions
    return encode_hello(Hello(RANK, WORLD_SIZE, segment_length, fingerprints))


def bad_message(case: str, config, model_config, limit: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(size message, payload message or None) of the one defect: a bad frame framed as
    ``TorchTransport`` frames it, or a defect of that framing itself."""
    if case in KV_CASES:
        return frame_messages(bad_frame(case, config.codec, model_config))
    if case == "truncated":  # the size word announces a whole valid frame; its first half is sent
        frame = encode_kv(kv_block(0, *kv_shape(model_config)), config.codec, whole_segment=True)
        return size_word(len(frame)), torch.frombuffer(bytearray(frame[: len(frame) // 2]), dtype=torch.uint8)
    if case == "oversized":  # no payload: the receiver must refuse before allocating
        return size_word(limit + 1), None
    if case == "negative-size":
        return size_word(-5), None
    if case == "zero-size":
        return size_word(0), None
    if case == "short-size-word":  # 4 bytes where an int64 is due
        return torch.tensor([100], dtype=torch.int32), None
    raise SystemExit(f"unknown case {case!r}; one of {', '.join(CASES)}")


def main(argv: list[str]) -> int:
    case, port, separator, *shared = argv
    if separator != "--" or case not in CASES:
        raise SystemExit(__doc__)
    port = int(port)
    args = cli.build_parser().parse_args(
        [
            "participant",
            "--rank",
            str(RANK),
            "--world-size",
            str(WORLD_SIZE),
            "--master",
            f"127.0.0.1:{port}",
            "--external-store",
            "--context",
            "unused",
            *shared,
            "--json",
        ]
    )
    loaded, config, _ = configure(args)
    model_config = loaded.model.config
    hello = hello_frame(case, config, loaded.identity, model_config)

    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=10))
    stop = threading.Event()
    threading.Thread(target=heartbeat, args=(port, stop), daemon=True).start()
    store.set(f"fedattn/joined/{RANK}", "1")
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore("fedattn/pg", store),
        rank=RANK,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),
    )
    say("joined")
    pending: list = []
    send_messages(*frame_messages(hello), pending)
    if case in HELLO_CASES:
        say(f"hello sent with {HELLO_CASES[case]} at {time.time():.3f}")
    theirs = decode_hello(recv_frame(), "publisher")
    say(f"publisher's hello: segment of {theirs.segment_length} tokens")
    if case not in HELLO_CASES:
        size, payload = bad_message(case, config, model_config, max_frame_bytes(model_config, config.codec))
        send_messages(size, payload, pending)
        say(
            f"sent {case}: size message {size.tolist()}, "
            f"payload {None if payload is None else payload.numel()} bytes at {time.time():.3f}"
        )
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        time.sleep(0.1)
    say("done waiting")
    stop.set()
    sys.stdout.flush()
    os._exit(0)  # no gloo teardown: the publisher may be gone


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
