"""A federation: who its parties are, where they listen, who may start queries, and whom to trust.

The roster is one TOML file, one table per party::

    [[party]]
    name = "party-1"               # the name in the party's certificate: its identity on every link
    address = "10.0.0.5:50051"     # where its gRPC service listens (HOST:PORT)
    may_start = false              # whether it may start queries (the publisher side)

Credentials sit beside the roster, by name: ``ca.pem`` (the federation's CA certificate, the only
root trusted) and, for each party that runs on this host, ``NAME/cert.pem`` and ``NAME/key.pem``.

``fedattn federation init`` makes a throwaway CA and every party's key and certificate, for trials
and tests. Production users bring their own CA instead: give every organization the roster,
``ca.pem`` (your CA's certificate, PEM) and only its own ``NAME/key.pem`` (an unencrypted PEM private
key, mode 0600) and ``NAME/cert.pem`` (PEM, signed by that CA). Each party certificate must carry the
roster name as its subject common name (the name a receiver reads from the verified certificate) and
as a DNS subject alternative name (the name a caller checks the service's certificate against,
whatever host it dials), and allow both TLS server and client use (extended key usage serverAuth and
clientAuth). Keep the CA's private key off every party host.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tomllib
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedattn.errors import FedAttnError

ROSTER_FILE = "roster.toml"
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
FIRST_PORT = 50051  # default addresses: 127.0.0.1:50051, :50052, ...
VALID_DAYS = 365
# a DNS label: the name goes into certificates as a DNS subject alternative name
NAME_PATTERN = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
PARTY_KEYS = {"name", "address", "may_start"}


@dataclass(frozen=True)
class RosterEntry:
    name: str
    address: str  # HOST:PORT
    may_start: bool


@dataclass(frozen=True)
class PartyCredentials:
    """What one party needs for mutual TLS: the federation's root, its own key and certificate (PEM)."""

    ca_pem: bytes
    key_pem: bytes
    cert_pem: bytes


@dataclass(frozen=True)
class Roster:
    parties: tuple[RosterEntry, ...]
    folder: Path  # where the credentials named after the parties are found

    @property
    def names(self) -> list[str]:
        return [party.name for party in self.parties]

    def entry(self, name: str) -> RosterEntry:
        for party in self.parties:
            if party.name == name:
                return party
        raise FedAttnError(f"{name} is not in the federation's roster ({', '.join(self.names)})")

    def check_run(self, names: Sequence[str], starter: str) -> None:
        """A run's parties: each in the roster, none twice, and ``starter`` (who starts the query)
        one that may start queries."""
        for name in names:
            self.entry(name)
        repeated = next((name for name in names if names.count(name) > 1), None)
        if repeated is not None:
            raise FedAttnError(f"{repeated} is named more than once among the run's parties")
        if not self.entry(starter).may_start:
            raise FedAttnError(
                f"{starter} would start the query but may not start queries in this federation "
                "(may_start = false in the roster)"
            )

    def credentials(self, name: str) -> PartyCredentials:
        """``name``'s own credentials, from beside the roster."""
        self.entry(name)
        return PartyCredentials(
            ca_pem=_read(self.folder / CA_CERT_FILE),
            key_pem=_read(self.folder / name / KEY_FILE),
            cert_pem=_read(self.folder / name / CERT_FILE),
        )


def load_roster(path: Path) -> Roster:
    """Read and check a roster; every defect is a one-line FedAttnError naming the file."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise FedAttnError(f"cannot read the roster {path}: {error.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise FedAttnError(f"the roster {path} is not valid TOML: {error}") from None
    unknown = sorted(set(document) - {"party"})
    if unknown:
        raise FedAttnError(f"{path}: unknown top-level key {unknown[0]!r}; a roster has only [[party]] tables")
    tables = document.get("party")
    if not isinstance(tables, list) or not tables:
        raise FedAttnError(f"{path}: no parties; add one [[party]] table per party")
    parties = tuple(_entry(path, number, table) for number, table in enumerate(tables, 1))
    check_parties(parties, str(path))
    return Roster(parties, path.parent)


def _entry(path: Path, number: int, table: object) -> RosterEntry:
    where = f"{path}: party {number}"
    if not isinstance(table, dict):
        raise FedAttnError(f"{where} is not a table")
    unknown = sorted(set(table) - PARTY_KEYS)
    if unknown:
        raise FedAttnError(f"{where}: unknown key {unknown[0]!r} (a party has {', '.join(sorted(PARTY_KEYS))})")
    for key in ("name", "address"):
        if not isinstance(table.get(key), str):
            raise FedAttnError(f"{where}: '{key}' must be a string")
    may_start = table.get("may_start", False)
    if not isinstance(may_start, bool):
        raise FedAttnError(f"{where}: 'may_start' must be true or false")
    return RosterEntry(table["name"], table["address"], may_start)


def check_parties(parties: Sequence[RosterEntry], where: str) -> None:
    """Names that can be certificate names, addresses that can be dialled, no duplicates, a starter."""
    for party in parties:
        check_name(party.name, where)
        check_address(party.address, f"{where}: {party.name}")
    for field in ("name", "address"):
        values = [getattr(party, field) for party in parties]
        repeated = next((value for value in values if values.count(value) > 1), None)
        if repeated is not None:
            raise FedAttnError(f"{where}: {field} {repeated!r} is given to more than one party")
    if not any(party.may_start for party in parties):
        raise FedAttnError(f"{where}: no party may start queries; set may_start = true for at least one")


def check_name(name: str, where: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise FedAttnError(
            f"{where}: party name {name!r} must be 1-63 lowercase letters, digits or '-' (a DNS label), "
            "neither starting nor ending with '-'"
        )


def check_address(address: str, where: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FedAttnError(f"{where}: address {address!r} must be HOST:PORT with a port in 1..65535")


def init_federation(folder: Path, names: Sequence[str], addresses: Sequence[str], may_start: Sequence[str]) -> Roster:
    """A new CA in ``folder``, a key and certificate for each party, and the roster."""
    if len(addresses) != len(names):
        raise FedAttnError(f"{len(names)} parties but {len(addresses)} addresses")
    for name in may_start:
        if name not in names:
            raise FedAttnError(f"{name} may start queries but is not one of the parties ({', '.join(names)})")
    parties = tuple(RosterEntry(name, address, name in may_start) for name, address in zip(names, addresses))
    check_parties(parties, "the new federation")
    if folder.exists() and any(folder.iterdir()):
        raise FedAttnError(f"{folder} is not empty: a federation is created in a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca()
    _write_private(folder / CA_KEY_FILE, _key_pem(ca_key))
    (folder / CA_CERT_FILE).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for name in names:
        issue_party(folder, name, ca_key, ca_cert)
    (folder / ROSTER_FILE).write_text(roster_text(parties), encoding="utf-8")
    return Roster(parties, folder)


def free_loopback_addresses(count: int) -> list[str]:
    """``count`` loopback addresses on ports the OS has free now (for local launches and tests)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:  # all bound at once, so no two get the same port
            sock.bind(("127.0.0.1", 0))
        return [f"127.0.0.1:{sock.getsockname()[1]}" for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def default_addresses(count: int) -> list[str]:
    return [f"127.0.0.1:{FIRST_PORT + n}" for n in range(count)]


def roster_text(parties: Sequence[RosterEntry]) -> str:
    lines = ["# The federation's parties: name (as in its certificate), address, whether it may start queries."]
    for party in parties:
        may_start = "true" if party.may_start else "false"
        lines += ["", "[[party]]", f'name = "{party.name}"', f'address = "{party.address}"', f"may_start = {may_start}"]
    return "\n".join(lines) + "\n"


def make_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign party certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedattn federation CA")])
    builder = (
        _validity(x509.CertificateBuilder())
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return key, builder.sign(key, hashes.SHA256())


def issue_party(folder: Path, name: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate) -> Path:
    """``folder/NAME/key.pem`` (0600) and ``cert.pem``: CN and DNS name ``name``, plus localhost and
    127.0.0.1 so that loopback trials verify too; usable as TLS server and client."""
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(name), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    builder = (
        _validity(x509.CertificateBuilder())
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    certificate = builder.sign(ca_key, hashes.SHA256())
    own = folder / name
    own.mkdir(mode=0o700, exist_ok=True)
    _write_private(own / KEY_FILE, _key_pem(key))
    (own / CERT_FILE).write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return own


def load_ca(folder: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA made by ``init_federation`` (to issue more certificates)."""
    key = serialization.load_pem_private_key(_read(folder / CA_KEY_FILE), password=None)
    return key, x509.load_pem_x509_certificate(_read(folder / CA_CERT_FILE))


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        builder.serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate a little clock skew between hosts
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
    )


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    encoding, private_format = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(encoding, private_format, serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    """Created 0600 from the first byte (never readable by others, not even briefly)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise FedAttnError(f"cannot read {path}: {error.strerror}") from None
