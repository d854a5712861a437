"""Hostile party-1 over gRPC: the wire fuzz cases of ``test_networked_wire`` that are about a
frame's content, with the same bad frames (``fake_peer.bad_frame``, ``fake_peer.hello_frame``)
and the same messages (``test_networked_wire.EXPECTED``).

party-1 runs in a thread with its own ``GrpcTransport`` and a valid certificate: it joins, sends a
hello built from the publisher's own run configuration, reads the publisher's hello, then sends
ONE bad frame (a hello case: its hello is the bad frame). The real publisher (``Participant`` and
``run_alone`` over its own ``GrpcTransport``, in another thread) must refuse it at once, naming
party-1, with the message the gloo publisher gives; nothing may hang (every thread is bounded).

gloo's framing cases (a truncated frame; a size word oversized, negative, zero or short) have no
counterpart here: gRPC frames every message with its own length prefix, so no size word of ours
is ever read. What is left of them over gRPC, a message over the size limit and an empty one, is
``test_grpc_transport``'s ``test_a_frame_over_the_size_limit_is_refused`` and
``test_an_empty_frame_is_refused``.
"""

from __future__ import annotations

import threading
import time

import fake_peer
import pytest
from conftest import random_segments
from networked_cases import configured
from test_grpc_transport import endpoint, federation, party_run, run_threads
from test_networked_wire import EXPECTED, PEER_TIMEOUT_S, PROMPT_REJECT_S, SHARED

from fedattn.errors import FedAttnError, ProtocolError
from fedattn.network.frames import decode_hello
from fedattn.network.peers import PeerFailure
from fedattn.runtime.attention import federated_attention_enabled
from fedattn.systems.fedattn.networked import max_frame_bytes
from fedattn.systems.fedattn.party import Participant, party_names

CONTENT_CASES = (*fake_peer.KV_CASES, *fake_peer.HELLO_CASES)
HOLD_S = 20  # the hostile party stays up (beating) until the publisher is done, at most this long


@pytest.fixture(scope="module")
def shared_run():
    """The model and run configuration of the gloo fuzz tests' shared options, as the CLI builds them."""
    return configured(SHARED)


def test_every_content_case_of_the_gloo_fuzz_tests_is_here():
    assert set(CONTENT_CASES) == set(EXPECTED) - set(fake_peer.FRAMING_CASES)


@pytest.mark.parametrize("case", CONTENT_CASES)
def test_a_bad_frame_is_refused_at_once_with_its_own_error(shared_run, one_torch_thread, tmp_path, case):
    loaded, config = shared_run
    model, model_config = loaded.model, loaded.model.config
    names = party_names(2)
    roster = federation(tmp_path / "federation", names)
    limit = max_frame_bytes(model_config, config.codec)
    hostile, real = (endpoint(roster, names, rank, PEER_TIMEOUT_S, limit) for rank in range(2))
    publisher = Participant(1, random_segments([5], seed=2)[0], model, real, config, model_identity=loaded.identity)
    sent_at, refused_at, refused = [], [], threading.Event()

    def hostile_party_1() -> None:
        try:
            hostile.join()
            sent_at.append(time.monotonic())
            hostile.send(fake_peer.hello_frame(case, config, loaded.identity, model_config), [1])
            if case not in fake_peer.HELLO_CASES:
                decode_hello(hostile.recv(1, "the handshake"), "publisher")
                sent_at.append(time.monotonic())
                hostile.send(fake_peer.bad_frame(case, config.codec, model_config), [1])
            refused.wait(HOLD_S)  # alive and beating: the publisher's refusal is its own
        finally:
            hostile.close()

    def real_publisher() -> list[int]:
        try:
            return party_run(real, publisher)()
        finally:
            refused_at.append(time.monotonic())
            refused.set()

    with federated_attention_enabled(model):
        results = run_threads([hostile_party_1, real_publisher])
    assert results[0] is None, results[0]  # party-1 got to send its bad frame
    error = results[1]
    assert isinstance(error, FedAttnError), error
    # a bad frame is a peer's failure (exit 3); a handshake refusal a setup mistake (exit 2)
    if case == "model-mismatch":
        assert not isinstance(error, (PeerFailure, ProtocolError)), repr(error)
    else:
        assert isinstance(error, ProtocolError), repr(error)
    message = str(error)
    assert EXPECTED[case] in message and "party-1" in message
    assert "\n" not in message
    took = refused_at[0] - sent_at[-1]
    assert took < PROMPT_REJECT_S, f"took {took:.1f} s: {message}"
