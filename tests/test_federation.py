"""The federation's roster and credentials: what ``fedattn federation init`` writes (checked with the
``cryptography`` package's own verification and file modes), and each way a roster can be wrong."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedattn.cli.main import main
from fedattn.errors import FedAttnError
from fedattn.network.federation import RosterEntry, init_federation, load_roster

NAMES = ["party-1", "party-2", "publisher"]
ADDRESSES = ["127.0.0.1:7001", "10.0.0.2:7002", "publisher.example.org:7003"]


def test_init_writes_a_ca_private_keys_certificates_and_the_roster(tmp_path, capsys):
    folder = tmp_path / "federation"
    argv = ["federation", "init", str(folder), "--parties", ",".join(NAMES), "--addresses", ",".join(ADDRESSES)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"roster {folder / 'roster.toml'}" in out and "publisher at publisher.example.org:7003" in out
    ca = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for path in [folder / "ca-key.pem", *(folder / name / "key.pem" for name in NAMES)]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for name in NAMES:
        certificate = x509.load_pem_x509_certificate((folder / name / "cert.pem").read_bytes())
        certificate.verify_directly_issued_by(ca)
        assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        alternative = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert alternative.get_values_for_type(x509.DNSName) == [name, "localhost"]
        assert alternative.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
        usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        private = load_pem_private_key((folder / name / "key.pem").read_bytes(), password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.public_key() == certificate.public_key()
    roster = load_roster(folder / "roster.toml")
    assert roster.parties == (
        RosterEntry("party-1", ADDRESSES[0], False),
        RosterEntry("party-2", ADDRESSES[1], False),
        RosterEntry("publisher", ADDRESSES[2], True),  # the last party starts queries unless told otherwise
    )
    credentials = roster.credentials("party-2")
    assert credentials.cert_pem == (folder / "party-2" / "cert.pem").read_bytes()
    assert credentials.ca_pem == (folder / "ca.pem").read_bytes()


def test_init_defaults_and_may_start(tmp_path):
    roster = init_federation(tmp_path / "f", ["a", "b"], ["h:1", "h:2"], ["a", "b"])
    assert [party.may_start for party in roster.parties] == [True, True]
    assert main(["federation", "init", str(tmp_path / "g"), "--parties", "a,b,c"]) == 0
    default = load_roster(tmp_path / "g" / "roster.toml")
    assert [party.address for party in default.parties] == ["127.0.0.1:50051", "127.0.0.1:50052", "127.0.0.1:50053"]
    assert [party.may_start for party in default.parties] == [False, False, True]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--parties", "a,b", "--addresses", "h:1"], "2 parties but 1 addresses"),
        (["--parties", "a,B"], "party name 'B' must be 1-63 lowercase letters"),
        (["--parties", "a,a"], "name 'a' is given to more than one party"),
        (["--parties", "a,b", "--addresses", "h:1,h:1"], "address 'h:1' is given to more than one party"),
        (["--parties", "a,b", "--may-start", "c"], "c may start queries but is not one of the parties (a, b)"),
        (["--parties", "a,b", "--addresses", "h:1,h"], "b: address 'h' must be HOST:PORT"),
    ],
)
def test_init_refuses_a_bad_federation(tmp_path, capsys, argv, message):
    assert main(["federation", "init", str(tmp_path / "f"), *argv]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "f").exists()  # nothing half-written


def test_init_never_overwrites(tmp_path, capsys):
    folder = tmp_path / "f"
    init_federation(folder, ["a", "b"], ["h:1", "h:2"], ["b"])
    key = (folder / "a" / "key.pem").read_bytes()
    assert main(["federation", "init", str(folder), "--parties", "a,b"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (folder / "a" / "key.pem").read_bytes() == key


PARTY = '[[party]]\nname = "{name}"\naddress = "{address}"\nmay_start = {may_start}\n'


def roster_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "roster.toml"
    path.write_text(text)
    return path


def two(first: str = "", second: str = "") -> str:
    return (
        PARTY.format(name="a", address="h:1", may_start="false")
        + first
        + "\n"
        + PARTY.format(name="b", address="h:2", may_start="true")
        + second
    )


@pytest.mark.parametrize(
    "text,message",
    [
        ("[[party]\n", "is not valid TOML"),
        ("", "no parties; add one [[party]] table per party"),
        ("party = 3\n", "no parties"),
        ("title = 'x'\n" + two(), "unknown top-level key 'title'"),
        (two(first="port = 3\n"), "party 1: unknown key 'port'"),
        ('[[party]]\nname = "a"\n', "party 1: 'address' must be a string"),
        ('[[party]]\nname = 1\naddress = "h:1"\n', "party 1: 'name' must be a string"),
        (two().replace("may_start = true", 'may_start = "yes"'), "party 2: 'may_start' must be true or false"),
        (two().replace("may_start = true", "may_start = false"), "no party may start queries"),
        (two().replace('"b"', '"a"'), "name 'a' is given to more than one party"),
        (two().replace('"h:2"', '"h:1"'), "address 'h:1' is given to more than one party"),
        (two().replace('"h:2"', '"h:99999"'), "b: address 'h:99999' must be HOST:PORT with a port in 1..65535"),
        (two().replace('"b"', '"-b"'), "party name '-b' must be"),
    ],
)
def test_a_bad_roster_is_refused_in_one_line(tmp_path, text, message):
    path = roster_file(tmp_path, text)
    with pytest.raises(FedAttnError) as refused:
        load_roster(path)
    assert message in str(refused.value)
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FedAttnError, match="cannot read the roster .*nowhere.toml: No such file"):
        load_roster(tmp_path / "nowhere.toml")
    roster = load_roster(roster_file(tmp_path, two()))
    with pytest.raises(FedAttnError, match=r"cannot read .*ca\.pem: No such file"):
        roster.credentials("a")
    with pytest.raises(FedAttnError, match=r"carol is not in the federation's roster \(a, b\)"):
        roster.credentials("carol")
