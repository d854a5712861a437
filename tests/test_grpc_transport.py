"""The gRPC transport on loopback: a FedAttn query over it against the in-process run (tokens and
bytes exactly), the callers mutual TLS must refuse, and a party that dies or stalls.

Parties run as threads of this process, each with its own transport, sharing the tiny model;
ports are picked free by the OS and every wait is bounded.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import random_segments
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from networked_cases import CONTEXTS, QUESTION, SAME_AS_IN_PROCESS, configured, expected_link_bytes

from fedattn.errors import FedAttnError
from fedattn.network.federation import (
    PartyCredentials,
    RosterEntry,
    free_loopback_addresses,
    init_federation,
    issue_party,
    load_ca,
    load_roster,
    roster_text,
)
from fedattn.network.grpc_transport import GRPC_MESSAGE_PREFIX, MIN_BEAT_GAP_S, SERVICE, STALE_AFTER_S, GrpcTransport
from fedattn.network.peers import PeerFailure
from fedattn.runtime.attention import federated_attention_enabled
from fedattn.systems.fedattn.config import RunConfig
from fedattn.systems.fedattn.inprocess import party_names, run_in_process
from fedattn.systems.fedattn.networked import max_frame_bytes, party_segment, run_alone
from fedattn.systems.fedattn.party import Participant
from fedattn.systems.fedattn.schedule import Schedule, every

THREAD_BOUND_S = 30  # a party thread still running after this is a hang
SMALL_LIMIT = 4096  # max_frame_bytes of the refusal tests


def federation(folder: Path, names: list[str]):
    return init_federation(folder, names, free_loopback_addresses(len(names)), names[-1:])


def endpoint(roster, names, rank, timeout_s=10.0, limit=SMALL_LIMIT, credentials=None) -> GrpcTransport:
    credentials = credentials or roster.credentials(names[rank])
    return GrpcTransport(rank, names, roster, credentials, timeout_s, limit)


def run_threads(targets: list) -> dict[int, object]:
    """Each target in its own thread; its return value or the exception it raised, by index."""
    results: dict[int, object] = {}

    def call(index, target):
        try:
            results[index] = target()
        except BaseException as error:  # noqa: BLE001 - the test inspects it
            results[index] = error

    threads = [threading.Thread(target=call, args=(n, target), daemon=True) for n, target in enumerate(targets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(THREAD_BOUND_S)
    assert not any(thread.is_alive() for thread in threads), "a party hung"
    return results


def party_run(transport: GrpcTransport, party: Participant):
    def run():
        try:
            transport.join()
            answer = run_alone(party)
        except BaseException:
            transport.close()
            raise
        transport.finish()
        return answer

    return run


def grpc_query(model, roster, segments, config, timeout_s=10.0, victim=None):
    """Every party of one query in its own thread; ``victim(transport)`` may sabotage one."""
    names = party_names(len(segments))
    limit = max_frame_bytes(model.config, config.codec)
    transports = [endpoint(roster, names, rank, timeout_s, limit) for rank in range(len(segments))]
    if victim is not None:
        victim(transports)
    parties = [Participant(rank, segment, model, transports[rank], config) for rank, segment in enumerate(segments)]
    with federated_attention_enabled(model):
        results = run_threads([party_run(transport, party) for transport, party in zip(transports, parties)])
    return results, transports


@pytest.mark.parametrize(
    "parties,options", SAME_AS_IN_PROCESS, ids=[f"case{index}" for index in range(len(SAME_AS_IN_PROCESS))]
)
def test_same_tokens_and_bytes_as_in_process(one_torch_thread, tmp_path, parties, options):
    """Every run the launched processes check over gloo (``networked_cases``), configured by the
    CLI's parsing and tokenized from the same words, here over gRPC with each party in a thread."""
    loaded, config = configured(options)
    model = loaded.model
    segments = [party_segment(loaded, rank, parties, CONTEXTS[rank], None, None, False) for rank in range(parties - 1)]
    segments.append(party_segment(loaded, parties - 1, parties, None, QUESTION, None, False))
    reference = run_in_process(model, segments, config)
    roster = federation(tmp_path / "federation", party_names(parties))
    results, transports = grpc_query(model, roster, segments, config)
    assert all(not isinstance(result, BaseException) for result in results.values()), results
    assert results[parties - 1] == reference.answer_token_ids
    if config.all_answers:
        assert results == reference.answers
    for transport, expected in zip(transports, reference.parties):
        stats = transport.stats
        assert (stats.bytes_sent, stats.bytes_received) == (expected.bytes_sent, expected.bytes_received)
        assert (stats.frames_sent, stats.frames_received) == (expected.frames_sent, expected.frames_received)
    # each copy on a link is one gRPC message: the frame and its 5-byte prefix, once per addressee
    links = expected_link_bytes(model.config, config, [len(segment) for segment in segments], GRPC_MESSAGE_PREFIX)
    assert [transport.link_bytes_sent for transport in transports] == links
    received = sum(t.stats.bytes_received + GRPC_MESSAGE_PREFIX * t.stats.frames_received for t in transports)
    assert sum(links) == received  # and every copy sent was received once


# -- refused callers ---------------------------------------------------------------------------


@pytest.fixture
def publisher(tmp_path):
    """A run of party-1 and publisher in a roster that also names party-2; the publisher's endpoint
    is up. Yields (roster, names, publisher endpoint)."""
    roster = federation(tmp_path / "federation", ["party-1", "party-2", "publisher"])
    names = ["party-1", "publisher"]
    receiver = endpoint(roster, names, 1)
    yield roster, names, receiver
    receiver.close()


def still_takes_frames(roster, names, receiver) -> None:
    """After whatever was refused, the genuine party-1 still gets its frames through, and only those."""
    sender = endpoint(roster, names, 0)
    try:
        sender.send(b"genuine", [1])
        sender.flush()
    finally:
        sender.close()
    assert receiver.recv(0) == b"genuine"
    assert receiver._inbox[0].empty()


def raw_call(address: str, credentials: grpc.ChannelCredentials, frame: bytes, target: str = "publisher"):
    channel = grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", target)])
    try:
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(f"/{SERVICE}/Deliver")(frame, timeout=5)
    finally:
        channel.close()
    return refused.value


def channel_credentials(credentials: PartyCredentials, with_certificate: bool = True) -> grpc.ChannelCredentials:
    if not with_certificate:
        return grpc.ssl_channel_credentials(credentials.ca_pem)
    return grpc.ssl_channel_credentials(credentials.ca_pem, credentials.key_pem, credentials.cert_pem)


def test_a_certificate_from_another_ca_is_refused(publisher, tmp_path):
    roster, names, receiver = publisher
    other_federation = init_federation(tmp_path / "other", roster.names, free_loopback_addresses(3), ["publisher"])
    other = other_federation.credentials("party-1")
    # the impostor trusts its own CA: it cannot verify the publisher's certificate
    impostor = endpoint(roster, names, 0, timeout_s=1, credentials=other)
    with pytest.raises(PeerFailure, match=r"publisher \(rank 1\) at .*: its certificate is not signed by this fede"):
        impostor.join()
    impostor.close()
    # it trusts the real CA, but its own certificate is the other CA's: the publisher hangs up on it
    mixed = PartyCredentials(roster.credentials("party-1").ca_pem, other.key_pem, other.cert_pem)
    impostor = endpoint(roster, names, 0, timeout_s=1, credentials=mixed)
    with pytest.raises(PeerFailure, match="it closed the connection during the TLS handshake"):
        impostor.join()
    impostor.close()
    assert receiver._inbox[0].empty()
    still_takes_frames(roster, names, receiver)


def test_a_name_not_in_the_roster_is_refused(publisher, tmp_path, caplog):
    roster, names, receiver = publisher
    issue_party(tmp_path / "federation", "mallory", *load_ca(tmp_path / "federation"))
    mallory = PartyCredentials(*(roster.credentials("party-1").ca_pem, *_own(tmp_path / "federation", "mallory")))
    with caplog.at_level(logging.WARNING, logger="fedattn.network.grpc_transport"):
        refused = raw_call(receiver.addresses[1], channel_credentials(mallory), b"let me in")
        outsider = raw_call(receiver.addresses[1], channel_credentials(roster.credentials("party-2")), b"me too")
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused.details() == "publisher refused 'mallory': not in the federation's roster"
    assert outsider.code() == grpc.StatusCode.PERMISSION_DENIED
    assert outsider.details() == "publisher refused party-2: not a party of this run"
    assert "'mallory': not in the federation's roster" in caplog.text
    still_takes_frames(roster, names, receiver)


def _own(folder: Path, name: str) -> tuple[bytes, bytes]:
    return (folder / name / "key.pem").read_bytes(), (folder / name / "cert.pem").read_bytes()


def test_a_client_without_a_certificate_is_refused(publisher):
    roster, names, receiver = publisher
    refused = raw_call(receiver.addresses[1], channel_credentials(roster.credentials("party-1"), False), b"anonymous")
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert "Socket closed" in refused.details()  # the service ends the TLS handshake: no client certificate
    plain = grpc.insecure_channel(receiver.addresses[1])
    with pytest.raises(grpc.RpcError) as cleartext:
        plain.unary_unary(f"/{SERVICE}/Deliver")(b"plain text", timeout=5)
    plain.close()
    assert cleartext.value.code() == grpc.StatusCode.UNAVAILABLE
    still_takes_frames(roster, names, receiver)


def test_a_garbage_tcp_client_is_dropped(publisher):
    roster, names, receiver = publisher
    host, port = receiver.addresses[1].rsplit(":", 1)
    for garbage in (os.urandom(4096), b"\x16\x03\x01\xff\xff" + b"\x00" * 64, b"GET / HTTP/1.1\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(garbage)
            assert sock.recv(4096) == b""  # the service hangs up
    still_takes_frames(roster, names, receiver)


def test_a_frame_over_the_size_limit_is_refused(publisher):
    roster, names, receiver = publisher
    sender = endpoint(roster, names, 0, limit=10 * SMALL_LIMIT)
    try:
        sender.send(b"x" * SMALL_LIMIT, [1])  # the largest valid frame passes
        sender.flush()
        assert receiver.recv(0) == b"x" * SMALL_LIMIT
        sender.send(b"x" * (SMALL_LIMIT + 1), [1])
        with pytest.raises(PeerFailure) as refused:
            sender.flush()
    finally:
        sender.close()
    expected = f"RESOURCE_EXHAUSTED: Received message larger than max ({SMALL_LIMIT + 1} vs. {SMALL_LIMIT})"
    assert str(refused.value) == f"publisher (rank 1) did not take a frame from party-1: {expected}"
    assert receiver._inbox[0].empty()
    still_takes_frames(roster, names, receiver)


def test_an_empty_frame_is_refused(publisher):
    """No frame is empty (over gloo, a zero size word is refused): the service refuses it, and the
    sender names the refusal."""
    roster, names, receiver = publisher
    sender = endpoint(roster, names, 0)
    try:
        sender.send(b"", [1])
        with pytest.raises(PeerFailure) as refused:
            sender.flush()
    finally:
        sender.close()
    expected = "INVALID_ARGUMENT: publisher refused an empty frame from party-1"
    assert str(refused.value) == f"publisher (rank 1) did not take a frame from party-1: {expected}"
    assert receiver._inbox[0].empty()
    still_takes_frames(roster, names, receiver)


def test_party_1_cannot_speak_as_party_2(tmp_path):
    names = ["party-1", "party-2", "publisher"]
    roster = federation(tmp_path / "federation", names)
    receiver = endpoint(roster, names, 2, timeout_s=1)
    impostor = endpoint(roster, names, 1, credentials=roster.credentials("party-1"))  # runs as party-2
    try:
        impostor.send(b"from party-2, honestly", [2])
        impostor.flush()
        assert receiver.recv(0) == b"from party-2, honestly"  # filed under the certificate's name
        assert receiver._inbox[1].empty()
        # nor can it answer as party-2: the publisher checks the service's certificate names party-2.
        # The receiver started first, so its channel to party-2's address first found nothing there;
        # wait (bounded) until a reconnection has met the impostor, or the call fails for that instead.
        wrong_name = "its certificate does not carry the expected party name"
        deadline = time.monotonic() + THREAD_BOUND_S
        while receiver._views[1].error != wrong_name and time.monotonic() < deadline:
            time.sleep(0.05)
        receiver.send(b"for party-2 only", [1])
        with pytest.raises(PeerFailure, match=wrong_name):
            receiver.flush()
        assert impostor._inbox[2].empty()
    finally:
        impostor.close()
        receiver.close()


def test_an_impostor_is_refused_at_join_by_everyone(tmp_path):
    """party-1's certificate running as party-2: the genuine parties cannot verify a party-2, and
    party-1 refuses a caller bearing its own name; each says so at once, without waiting the timeout."""
    names = party_names(3)
    roster = federation(tmp_path / "federation", names)
    timeout = 20
    transports = [endpoint(roster, names, rank, timeout) for rank in (0, 2)]
    transports.insert(1, endpoint(roster, names, 1, timeout, credentials=roster.credentials("party-1")))
    start = time.monotonic()
    try:
        results = run_threads([transport.join for transport in transports])
    finally:
        for transport in transports:
            transport.close()
    assert time.monotonic() - start < timeout / 2
    for rank in (0, 2):
        assert isinstance(results[rank], PeerFailure)
        assert "party-2 (rank 1) at " in str(results[rank])
        assert str(results[rank]).endswith(": its certificate does not carry the expected party name")
    assert str(results[1]).endswith("PERMISSION_DENIED: party-1 refused a call with its own name party-1")


# -- other endpoints' mistakes ---------------------------------------------------------------


def test_an_address_in_use_and_a_name_outside_the_roster_are_refused(publisher):
    roster, names, receiver = publisher
    with pytest.raises(FedAttnError, match=r"publisher cannot listen on 127\.0\.0\.1:\d+: the address is in use"):
        endpoint(roster, names, 1)
    with pytest.raises(FedAttnError, match="carol is not in the federation's roster"):
        endpoint(roster, ["party-1", "carol"], 0)


def test_a_party_that_never_starts_is_named_by_join(publisher):
    roster, names, receiver = publisher
    receiver.close()
    lonely = endpoint(roster, names, 0, timeout_s=1)
    with pytest.raises(PeerFailure, match=r"within 1 s: publisher \(rank 1\) at .*: nothing listens at its address"):
        lonely.join()
    lonely.close()


def test_a_party_that_starts_late_is_waited_for(publisher):
    """Later than a party not heard from would count as gone: join waits for it, and after join
    nobody mistakes it for gone."""
    roster, names, receiver = publisher
    receiver.close()
    early = endpoint(roster, names, 0, timeout_s=20)

    def start_late() -> GrpcTransport:
        time.sleep(STALE_AFTER_S + 1)
        late = endpoint(roster, names, 1, timeout_s=20)
        late.join()
        late.send(b"late, but here", [0])
        return late

    try:
        results = run_threads([early.join, start_late])
        assert early.recv(1) == b"late, but here"
    finally:
        early.close()
        results[1].close()


# -- dead and stalled parties ----------------------------------------------------------------


class Stop(Exception):
    """Ends the sabotaged party's thread."""


def sabotage(rank: int, phase: str, action):
    """Make party ``rank`` run ``action(transport)`` when it reaches ``phase``."""

    def victim(transports):
        transport = transports[rank]
        note = transport.note

        def noted(reached: str) -> None:
            note(reached)
            if reached == phase:
                time.sleep(4 * MIN_BEAT_GAP_S)  # let the beat carry the phase it dies or stalls in
                action(transport)

        transport.note = noted

    return victim


def die(transport):
    transport.close()
    raise Stop


def test_a_dead_party_is_named_with_its_phase_within_the_bound(tiny, tmp_path):
    model, _ = tiny
    segments = random_segments([6, 6, 6], seed=8)
    roster = federation(tmp_path / "federation", party_names(3))
    timeout = 8
    start = time.monotonic()
    config = RunConfig(Schedule(8, every(2, 8)), max_new_tokens=3, all_answers=True)
    results, _ = grpc_query(model, roster, segments, config, timeout, sabotage(1, "prefill block 4", die))
    elapsed = time.monotonic() - start
    assert isinstance(results[1], Stop)
    for rank in (0, 2):
        assert isinstance(results[rank], PeerFailure), results[rank]
        assert "party-2 (rank 1) is gone (last seen at prefill block 4)" in str(results[rank])
    assert elapsed < STALE_AFTER_S + timeout


def test_a_stalled_party_is_named_after_the_timeout(tiny, tmp_path):
    model, _ = tiny
    segments = random_segments([6, 6, 6], seed=9)
    roster = federation(tmp_path / "federation", party_names(3))
    timeout = 3

    def stall(transport):
        time.sleep(timeout + 3)  # alive (its service answers) but going nowhere, until the others gave up
        transport.close()
        raise Stop

    config = RunConfig(Schedule(8, every(2, 8)), max_new_tokens=3)
    start = time.monotonic()
    results, _ = grpc_query(model, roster, segments, config, timeout, sabotage(0, "prefill block 2", stall))
    message = "party-1 (rank 0) made no progress for 3 s (it is alive, at prefill block 2)"
    assert message in str(results[1]) and message in str(results[2])
    assert time.monotonic() - start < THREAD_BOUND_S


# -- a federation that brings its own CA -----------------------------------------------------


def test_own_ca_with_an_intermediate_as_the_readme_describes(tmp_path):
    """Root CA in ca.pem; each party's cert.pem is its leaf (CN and DNS name = its roster name, no
    localhost) followed by the intermediate that signed it."""
    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, issuer: str, key, signer, ca_path_length: int | None, dns: str | None = None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=dns is None, path_length=ca_path_length), critical=True)
        )
        if dns is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
        return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    root_key, middle_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = certificate("Example Root", "Example Root", root_key, root_key, 1)
    middle = certificate("Example Parties", "Example Root", middle_key, root_key, 0)
    folder = tmp_path / "ours"
    names = ["hr-office", "publisher"]
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        (folder / name).mkdir(parents=True)
        pkcs8 = serialization.PrivateFormat.PKCS8
        (folder / name / "key.pem").write_bytes(
            key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())
        )
        leaf = certificate(name, "Example Parties", key, middle_key, None, dns=name)
        (folder / name / "cert.pem").write_bytes(leaf + middle)
    (folder / "ca.pem").write_bytes(root)
    addresses = free_loopback_addresses(2)
    entries = [RosterEntry(name, address, name == "publisher") for name, address in zip(names, addresses)]
    (folder / "roster.toml").write_text(roster_text(entries))
    roster = load_roster(folder / "roster.toml")
    transports = [endpoint(roster, names, rank, timeout_s=5) for rank in range(2)]
    try:
        run_threads([transport.join for transport in transports])
        transports[0].send(b"from the HR office", [1])
        transports[0].flush()
        assert transports[1].recv(0) == b"from the HR office"
    finally:
        for transport in transports:
            transport.close()
