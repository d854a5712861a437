"""What parties must agree on before any K/V crosses, and who differs in what when they do not.

Each party announces its segment length and a short fingerprint of each thing that must match
(weights, model shape, schedule, sparsity, KV codec, K/V exchange: selection, byte budget and noise,
decoding). Fingerprints, not the values:
the handshake says *which* setting differs without one party dictating the others' settings.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

from fedattn.errors import FedAttnError
from fedattn.network.frames import HELLO_FIELDS, Hello


def _fingerprint(value: object) -> bytes:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).digest()[:8]


def run_fingerprints(config, model_identity: str, model_config) -> tuple[bytes, ...]:
    """One fingerprint per ``HELLO_FIELDS`` entry, in that order."""
    shape = {
        key: getattr(model_config, key, None)
        for key in (
            "model_type",
            "num_hidden_layers",
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
        )
    }
    decoding = asdict(config.decoding) | {"max_new_tokens": config.max_new_tokens, "all_answers": config.all_answers}
    return (
        _fingerprint(model_identity),
        _fingerprint(shape),
        _fingerprint(asdict(config.schedule)),
        _fingerprint(asdict(config.sparsity)),
        _fingerprint(config.codec.name),
        _fingerprint(asdict(config.exchange)),
        _fingerprint(decoding),
    )


def check_hello(mine: Hello, theirs: Hello, sender: str, expected_rank: int) -> None:
    """Refuse a peer that is not who it should be or does not run what we run."""
    if theirs.rank != expected_rank or theirs.world_size != mine.world_size:
        raise FedAttnError(
            f"{sender} says it is rank {theirs.rank} of {theirs.world_size}; "
            f"expected rank {expected_rank} of {mine.world_size}"
        )
    differing = [field for field, a, b in zip(HELLO_FIELDS, mine.fingerprints, theirs.fingerprints) if a != b]
    if differing:
        raise FedAttnError(
            f"handshake refused: {sender} (rank {theirs.rank}) differs from rank {mine.rank} in {', '.join(differing)}"
        )
