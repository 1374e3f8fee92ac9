"""`gputally ca`: the CA and the certificates it issues, as files, as X.509, and in real mutual
TLS handshakes on loopback, with Python's ssl (OpenSSL) and with grpc (BoringSSL)."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gputally.cli import ca
from gputally.cli.main import main

pytestmark = pytest.mark.timeout(30)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def one_line_error(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gputally ca"), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err
    return err


@pytest.fixture
def ca_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    directory = tmp_path / "ca"
    assert main(["ca", "init", "--dir", str(directory), "--name", "test CA"]) == 0
    capsys.readouterr()
    return directory


@pytest.fixture
def pki(ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Path]:
    """A CA, a collector's certificate for 127.0.0.1, a node's, and one from a stranger CA."""
    out = tmp_path / "issued"
    assert (
        main(
            [
                "ca",
                "issue",
                "--dir",
                str(ca_dir),
                "--server",
                "collector.test",
                "--ip",
                "127.0.0.1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (
        main(["ca", "issue", "--dir", str(ca_dir), "--node", "gpu-node-01", "--out", str(out)]) == 0
    )
    other = tmp_path / "other"
    assert main(["ca", "init", "--dir", str(other)]) == 0
    assert main(["ca", "issue", "--dir", str(other), "--node", "gpu-node-01"]) == 0
    capsys.readouterr()
    return {
        "ca": ca_dir / "ca.crt",
        "server_crt": out / "collector.test.crt",
        "server_key": out / "collector.test.key",
        "node_crt": out / "gpu-node-01.crt",
        "node_key": out / "gpu-node-01.key",
        "stranger_crt": other / "gpu-node-01.crt",
        "stranger_key": other / "gpu-node-01.key",
    }


# -- init ------------------------------------------------------------------------------------


def test_init_makes_a_ca_key_0600_and_a_self_signed_ca_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "ca"
    assert main(["ca", "init", "--dir", str(directory), "--days", "30"]) == 0
    out = capsys.readouterr().out
    key_path, cert_path = directory / "ca.key", directory / "ca.crt"
    assert mode(key_path) == 0o600
    assert mode(cert_path) == 0o644
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    cert = load(cert_path)
    cert.verify_directly_issued_by(cert)
    assert cert.subject == cert.issuer
    common_name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(common_name, str) and common_name.startswith("gputally CA ")
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=30, minutes=5)
    assert ca.fingerprint(cert) in out and str(key_path) in out


def test_init_twice_refuses_without_force_and_replaces_with_it(
    ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (ca_dir / "ca.crt").read_bytes()
    assert main(["ca", "init", "--dir", str(ca_dir)]) == 2
    one_line_error(capsys, "already holds a CA", "--force")
    assert (ca_dir / "ca.crt").read_bytes() == before
    assert main(["ca", "init", "--dir", str(ca_dir), "--force"]) == 0
    assert (ca_dir / "ca.crt").read_bytes() != before
    assert mode(ca_dir / "ca.key") == 0o600


def test_init_refuses_a_name_too_long_for_a_common_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["ca", "init", "--dir", str(tmp_path), "--name", "x" * 65])
    assert exit_.value.code == 2
    assert "at most 64 bytes" in capsys.readouterr().err
    assert not (tmp_path / "ca.key").exists()


# -- issue -----------------------------------------------------------------------------------


def test_a_node_certificate_is_a_client_certificate_bound_to_the_node_name(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "node"
    assert (
        main(["ca", "issue", "--dir", str(ca_dir), "--node", "gpu-node-01", "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    cert_path, key_path = out / "gpu-node-01.crt", out / "gpu-node-01.key"
    assert mode(key_path) == 0o600
    authority, cert = load(ca_dir / "ca.crt"), load(cert_path)
    cert.verify_directly_issued_by(authority)
    assert f"wrote {cert_path}" in printed and f"wrote {key_path}" in printed
    assert ca.fingerprint(cert) in printed
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gpu-node-01"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.DNSName("gpu-node-01")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = authority.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    now = datetime.now(UTC)
    assert now - timedelta(minutes=6) < cert.not_valid_before_utc < now - timedelta(minutes=4)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=397, minutes=5)
    # The public key in the certificate is the key's written beside it.
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == cert.public_key()


def test_a_server_certificate_names_every_dns_name_and_address(
    ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["ca", "issue", "--dir", str(ca_dir), "--server", "collector.example.org"]
    args += ["--dns", "collector", "--dns", "collector.example.org", "--ip", "10.0.0.5"]
    args += ["--ip", "fd00::1", "--days", "90"]
    assert main(args) == 0
    cert = load(ca_dir / "collector.example.org.crt")
    cert.verify_directly_issued_by(load(ca_dir / "ca.crt"))
    assert mode(ca_dir / "collector.example.org.key") == 0o600
    assert cert.subject.rfc4514_string() == "CN=collector.example.org"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["collector.example.org", "collector"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("fd00::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=90, minutes=5)


def test_a_server_named_by_its_address_has_an_ip_san() -> None:
    authority_key, authority = ca.new_ca("t")
    _, cert = ca.issue(authority_key, authority, "10.1.2.3", server=True)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.IPAddress(ipaddress.ip_address("10.1.2.3"))]


def test_issue_refuses_to_overwrite_without_force(
    ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["ca", "issue", "--dir", str(ca_dir), "--node", "n1"]
    assert main(args) == 0
    before = (ca_dir / "n1.crt").read_bytes()
    assert main(args) == 2
    one_line_error(capsys, "exist", "--force")
    assert (ca_dir / "n1.crt").read_bytes() == before
    assert main([*args, "--force"]) == 0
    assert (ca_dir / "n1.crt").read_bytes() != before
    # A node called "ca" would overwrite the CA itself: never, --force or not.
    assert main(["ca", "issue", "--dir", str(ca_dir), "--node", "ca", "--force"]) == 2
    one_line_error(capsys, "CA's own files")


def test_a_certificate_never_outlives_its_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "ca"
    assert main(["ca", "init", "--dir", str(directory), "--days", "10"]) == 0
    assert main(["ca", "issue", "--dir", str(directory), "--node", "n1"]) == 0
    assert "cut to the CA's expiry" in capsys.readouterr().out
    assert (
        load(directory / "n1.crt").not_valid_after_utc
        == load(directory / "ca.crt").not_valid_after_utc
    )


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("gpu node", "spaces"),
        ("gpu\tnode", "spaces"),
        ("gpu\u00a0node", "spaces"),  # a no-break space is whitespace too
        ("gpu\x00node", "printable"),
        ("gpu\u200bnode", "printable"),  # zero-width space: not printable
        ("racks/gpu1", "'/'"),
        (".hidden", "'.'"),
        ("..", "'.'"),
        ("g" * 251, "at most 250"),
        ("é" * 126, "at most 250"),  # 252 bytes of UTF-8 in 126 characters
        ("nœud-1", "ASCII"),  # the collector takes it; a dNSName cannot hold it
    ],
)
def test_bad_node_names_are_refused_on_one_line(
    ca_dir: Path, name: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ca", "issue", "--dir", str(ca_dir), "--node", name]) == 2
    one_line_error(capsys, "--node", why)
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca.crt", "ca.key"]


def test_a_name_longer_than_a_common_name_is_in_the_san_alone(
    ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Over a CN's 64 bytes: the subject is empty and the SAN, critical, names the node.
    name = "n" * 241
    assert main(["ca", "issue", "--dir", str(ca_dir), "--node", name]) == 0
    cert = load(ca_dir / f"{name}.crt")
    cert.verify_directly_issued_by(load(ca_dir / "ca.crt"))
    assert len(cert.subject) == 0
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.DNSName) == [name]
    # The collector's longest name, 250 bytes, has a certificate...
    _, longest = ca.issue(*ca.new_ca("t"), "n" * 250, client=True)
    assert longest.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
    # ...and its files: "<name>.key" fits a file system's 255-byte names (write_file's
    # temporary name is short whatever the name)
    assert main(["ca", "issue", "--dir", str(ca_dir), "--node", "m" * 250]) == 0
    assert (ca_dir / f"{'m' * 250}.key").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("address", ["1.2.3", "10.0.0.256", "localhost", "10.0.0.1/24", ""])
def test_a_bad_ip_is_refused_on_one_line(
    ca_dir: Path, address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ca", "issue", "--dir", str(ca_dir), "--server", "s", "--ip", address]) == 2
    one_line_error(capsys, "--ip", "not an IPv4 or IPv6 address")
    assert not (ca_dir / "s.crt").exists()


def test_a_node_certificate_takes_no_other_names(
    ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ca", "issue", "--dir", str(ca_dir), "--node", "n1", "--dns", "n2"]) == 2
    one_line_error(capsys, "--server")


def test_issue_without_a_usable_ca_says_why_on_one_line(
    tmp_path: Path, ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere"
    assert main(["ca", "issue", "--dir", str(missing), "--node", "n1"]) == 2
    one_line_error(capsys, "no CA in", "gputally ca init --dir")
    assert not missing.exists()

    (ca_dir / "ca.key").chmod(0o640)
    assert main(["ca", "issue", "--dir", str(ca_dir), "--node", "n1"]) == 2
    one_line_error(capsys, "readable by others", "chmod 600")

    (ca_dir / "ca.key").write_text("not a key")
    (ca_dir / "ca.key").chmod(0o600)
    assert main(["ca", "issue", "--dir", str(ca_dir), "--node", "n1"]) == 2
    one_line_error(capsys, "not a PEM private key")

    other = tmp_path / "other"
    assert main(["ca", "init", "--dir", str(other)]) == 0
    (ca_dir / "ca.key").write_bytes((other / "ca.key").read_bytes())
    (ca_dir / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    assert main(["ca", "issue", "--dir", str(ca_dir), "--node", "n1"]) == 2
    one_line_error(capsys, "not a PEM certificate")

    # A key and a certificate of two different CAs.
    assert main(["ca", "init", "--dir", str(ca_dir), "--force"]) == 0
    (ca_dir / "ca.key").write_bytes((other / "ca.key").read_bytes())
    assert main(["ca", "issue", "--dir", str(ca_dir), "--node", "n1"]) == 2
    one_line_error(capsys, "is not the key of")

    # A leaf certificate in the CA's place.
    leaf_key, leaf = ca.issue(*ca.new_ca("y"), "leaf", client=True)
    (ca_dir / "ca.key").write_bytes(ca.key_pem(leaf_key))
    (ca_dir / "ca.crt").write_bytes(ca.cert_pem(leaf))
    assert main(["ca", "issue", "--dir", str(ca_dir), "--node", "n1"]) == 2
    one_line_error(capsys, "not a CA certificate")
    assert not (ca_dir / "n1.crt").exists()


def test_the_functions_refuse_what_they_cannot_make() -> None:
    authority_key, authority = ca.new_ca("t")
    with pytest.raises(ValueError, match="server, a client or both"):
        ca.issue(authority_key, authority, "n1")
    with pytest.raises(ValueError):
        ca.issue(authority_key, authority, "n1", server=True, ips=["nope"])
    with pytest.raises(ValueError, match="not the key"):
        ca.issue(ca.new_ca("u")[0], authority, "n1", client=True)
    with pytest.raises(ValueError, match="days"):
        ca.new_ca("t", days=0)
    key, both = ca.issue(authority_key, authority, "n1", server=True, client=True)
    eku = both.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert ca.key_pem(key).startswith(b"-----BEGIN PRIVATE KEY-----")
    assert ca.fingerprint(both).count(":") == 31 and ca.fingerprint(both).isupper()


# -- show ------------------------------------------------------------------------------------


def test_show_prints_names_usages_validity_issuer_and_fingerprint(
    pki: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ca", "show", str(pki["server_crt"])]) == 0
    out = capsys.readouterr().out
    cert = load(pki["server_crt"])
    assert "subject:         CN=collector.test" in out
    assert "DNS:collector.test, IP:127.0.0.1" in out
    assert "key usage:       digitalSignature" in out
    assert "extended usage:  serverAuth" in out
    assert "issuer:          CN=test CA" in out
    assert "CA:              no" in out
    assert f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC (396 days left)" in out
    assert f"SHA-256:         {ca.fingerprint(cert)}" in out
    assert "ECDSA secp256r1" in out

    assert main(["ca", "show", str(pki["ca"])]) == 0
    out = capsys.readouterr().out
    assert "CA:              yes (path length 0)" in out and "keyCertSign, cRLSign" in out


def test_show_refuses_what_is_not_a_pem_certificate_on_one_line(
    pki: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ca", "show", str(pki["node_key"])]) == 2
    one_line_error(capsys, "not a PEM certificate", "private key")
    (tmp_path / "junk").write_bytes(b"\x00\xff junk")
    assert main(["ca", "show", str(tmp_path / "junk")]) == 2
    one_line_error(capsys, "not a PEM certificate")
    assert main(["ca", "show", str(tmp_path / "missing.crt")]) == 2
    one_line_error(capsys, "missing.crt", "No such file")


@pytest.mark.parametrize("command", [[], ["init"], ["issue"], ["show"]])
def test_every_ca_command_has_useful_help(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["ca", *command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: gputally ca {' '.join(command)}".strip() in text
    assert {"": "gputally ca init", "init": "--force", "issue": "--node", "show": "fingerprint"}[
        command[0] if command else ""
    ] in text


# -- mutual TLS with Python's ssl (OpenSSL) --------------------------------------------------


def _strict(context: ssl.SSLContext) -> ssl.SSLContext:
    # Python 3.13's default contexts check this strictly: the certificates must pass it.
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def _tls_server(pki: dict[str, Path]) -> tuple[socket.socket, dict[str, Any]]:
    """A server on 127.0.0.1 that requires a client certificate from the CA, answers one
    connection with the node name its certificate gives, and keeps what it saw."""
    context = _strict(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(pki["server_crt"], pki["server_key"])
    context.load_verify_locations(pki["ca"])
    context.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    seen: dict[str, Any] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        conn.settimeout(10)
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                peer: Any = tls.getpeercert()  # typeshed's union of every field's type
                seen["peer"] = peer
                common_name = dict(item[0] for item in peer["subject"])["commonName"]
                tls.sendall(f"hello {common_name}".encode())
        except (ssl.SSLError, OSError) as error:
            seen["error"] = error
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    seen["thread"] = thread
    return listener, seen


def _tls_client(pki: dict[str, Path], cert: str, key: str, port: int) -> bytes:
    context = _strict(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    context.load_verify_locations(pki["ca"])
    context.load_cert_chain(pki[cert], pki[key])
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    # The server's certificate must name 127.0.0.1 (its --ip): hostname checking is on.
    with raw, context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        return tls.recv(100)


def test_mutual_tls_accepts_a_node_certificate_and_the_server_sees_the_node(
    pki: dict[str, Path],
) -> None:
    listener, seen = _tls_server(pki)
    with listener:
        answer = _tls_client(pki, "node_crt", "node_key", listener.getsockname()[1])
        seen["thread"].join(10)
    assert answer == b"hello gpu-node-01"
    assert seen["peer"]["subjectAltName"] == (("DNS", "gpu-node-01"),)


def test_mutual_tls_refuses_a_certificate_from_another_ca(pki: dict[str, Path]) -> None:
    listener, seen = _tls_server(pki)
    with listener:
        # TLS 1.3: the client's handshake ends before the server has checked its certificate;
        # the refusal arrives as an alert on the first read.
        try:
            answer = _tls_client(pki, "stranger_crt", "stranger_key", listener.getsockname()[1])
        except (ssl.SSLError, ConnectionError):
            answer = b""
        seen["thread"].join(10)
    assert answer == b""  # an alert, a reset or a connection closed unanswered
    assert "peer" not in seen
    assert isinstance(seen["error"], ssl.SSLError)
    assert "certificate verify failed" in str(seen["error"])


# -- mutual TLS with grpc (BoringSSL) --------------------------------------------------------


def test_grpc_mutual_tls_serves_a_node_and_refuses_a_client_without_certificate(
    pki: dict[str, Path],
) -> None:
    seen: list[dict[str, list[bytes]]] = []

    def echo(request: bytes, context: Any) -> bytes:
        auth: dict[str, list[bytes]] = context.auth_context()
        seen.append(auth)
        return request + b" from " + auth["x509_common_name"][0]

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
            ),
        )
    )
    credentials = grpc.ssl_server_credentials(
        [(pki["server_key"].read_bytes(), pki["server_crt"].read_bytes())],
        root_certificates=pki["ca"].read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        node = grpc.ssl_channel_credentials(
            pki["ca"].read_bytes(), pki["node_key"].read_bytes(), pki["node_crt"].read_bytes()
        )
        # The target is 127.0.0.1: grpc checks it against the server certificate's IP SAN.
        with grpc.secure_channel(f"127.0.0.1:{port}", node) as channel:
            call = channel.unary_unary("/test.Echo/Echo")
            assert call(b"ping", timeout=10) == b"ping from gpu-node-01"
        assert seen[0]["x509_subject_alternative_name"] == [b"gpu-node-01"]
        assert seen[0]["transport_security_type"] == [b"ssl"]

        for refused_credentials in (
            grpc.ssl_channel_credentials(pki["ca"].read_bytes()),
            grpc.ssl_channel_credentials(
                pki["ca"].read_bytes(),
                pki["stranger_key"].read_bytes(),
                pki["stranger_crt"].read_bytes(),
            ),
        ):
            with grpc.secure_channel(f"127.0.0.1:{port}", refused_credentials) as channel:
                with pytest.raises(grpc.RpcError) as refused:
                    channel.unary_unary("/test.Echo/Echo")(b"ping", timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(seen) == 1
    finally:
        server.stop(None)
