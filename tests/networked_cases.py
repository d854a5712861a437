"""The runs every networked transport must answer exactly as in-process, and what their links
carry: one list, so that the in-thread gRPC test (``test_grpc_transport``, every case) and the
launched-process tests (``test_networked``, the cases that differ in what crosses processes) check
the same schedules, codecs and exchanges, each run configured by the CLI's own parsing."""

from __future__ import annotations

import argparse

from fedattn.network.frames import HELLO_FRAME, SMALL_FRAME, kv_frame_size
from fedattn.runtime.models import LoadedModel
from fedattn.systems.fedattn.config import RunConfig, add_options, configure
from fedattn.systems.fedattn.exchange import frame_token_counts

CONTEXTS = ["Alice's locker code is 4417 and she lives in Oslo.", "Bob's locker code is 9230.", "Carol keeps the key."]
QUESTION = "What is Alice's locker code?"
RUN_OPTIONS = ["--model", "tiny-random", "--max-new-tokens", "6"]  # before each case's own options

# (parties, the run's options): the schedules, codecs and exchanges a networked run is tested with
SAME_AS_IN_PROCESS = [
    (2, ["--sync-every", "1"]),
    (3, ["--sync-every", "2", "--all-answers"]),
    (4, ["--placement", "deep-half", "--sync-every", "3"]),
    (4, ["--schedule", "publisher-dense", "--sync-layers", "0,4", "--publisher-sync-every", "3", "--all-answers"]),
    (
        3,
        [
            "--ratio-comp",
            "0.7",
            "--ratio-comm",
            "0.5",
            "--ratio-comm-publisher",
            "1",
            "--seed",
            "3",
            "--all-answers",
            "--kv-codec",
            "bfloat16",
        ],
    ),
    (
        3,
        [
            "--sync-every",
            "2",
            "--all-answers",
            "--kv-codec",
            "int4-kivi",
            "--kv-select",
            "attention",
            "--kv-budget",
            "30000",
            "--kv-noise",
            "0.1",
        ],
    ),
    (3, ["--temperature", "0.8", "--top-k", "20", "--seed", "5"]),
]


def words(parties: int, options: list[str]) -> list[str]:
    """``fedattn run`` with ``options``: the question and the first ``parties - 1`` contexts."""
    argv = ["run", *RUN_OPTIONS, *options, "--question", QUESTION]
    for context in CONTEXTS[: parties - 1]:
        argv += ["--context", context]
    return argv


def configured(options: list[str]) -> tuple[LoadedModel, RunConfig]:
    """The model and run configuration ``fedattn run`` builds from ``options`` (after ``RUN_OPTIONS``)."""
    parser = argparse.ArgumentParser()
    add_options(parser)
    loaded, config, _ = configure(parser.parse_args([*RUN_OPTIONS, *options, "--json"]))
    return loaded, config


def expected_link_bytes(model, config: RunConfig, lengths: list[int], copy_framing: int) -> list[int]:
    """Per party, what its point-to-point links carry (README, Telemetry): every frame it sends
    (handshake, K/V where the schedule sends it, the publisher's first token and completion), once
    per addressee, each copy with its framing. ``model`` is the model's configuration."""
    count = len(lengths)
    heads, head_dim = model.num_key_value_heads, model.hidden_size // model.num_attention_heads
    tokens = frame_token_counts(
        config.schedule, config.sparsity, config.exchange, config.codec, lengths, heads, head_dim, config.all_answers
    )
    links = [(HELLO_FRAME.size + copy_framing) * (count - 1)] * count
    for sender in range(count):
        for layer in range(model.num_hidden_layers):
            receivers = config.schedule.receivers(layer, sender, count, config.all_answers)
            if receivers:
                sent = tokens[(sender, layer)]
                size = kv_frame_size(sent, sent == lengths[sender], config.codec, heads, head_dim)
                links[sender] += (size + copy_framing) * len(receivers)
    publisher_frames = 2 if config.all_answers else 1  # the completion, and the first token if all answer
    links[-1] += publisher_frames * (SMALL_FRAME.size + copy_framing) * (count - 1)
    return links
