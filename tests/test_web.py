"""/metrics behind an exporter-toolkit web configuration file: TLS, client certificates, basic
auth, reloads, the file's checks, `gputally web-password`, and a real Prometheus scraping it.

Every certificate is made here (ECDSA P-256, a throwaway CA); every connection goes to
loopback with a timeout.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import ipaddress
import itertools
import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client import CollectorRegistry, Gauge, make_wsgi_app

from gputally.cli import web
from gputally.cli.main import main
from gputally.cli.options import Address
from gputally.cli.web import WebConfigError, load_web_config, serve_http

from .conftest import free_port, require_binary

TIMEOUT = 5.0  # seconds for any one connection of a test
RIGHT = bcrypt.hashpw(b"right", bcrypt.gensalt(4)).decode()  # cost 4: a millisecond a check
OTHER = bcrypt.hashpw(b"other", bcrypt.gensalt(4)).decode()


# -- a throwaway PKI -------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path
    serial: int


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    server: Pair
    server_next: Pair  # the same names, another certificate: for rotation
    client: Pair  # signed by `ca`
    stranger: Pair  # a client certificate from `other_ca`
    encrypted_key: Path  # the server's key, encrypted with a password


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    usage: x509.ObjectIdentifier | None = None,
    sans: Iterable[x509.GeneralName] = (),
) -> x509.Certificate:
    now = datetime.now(UTC)
    ca = usage is None
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    names = list(sans)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


SERVER_SANS = [
    x509.DNSName("localhost"),
    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    x509.IPAddress(ipaddress.ip_address("::1")),
]
CLIENT_SANS = [
    x509.DNSName("scraper.example"),
    x509.UniformResourceIdentifier("spiffe://gputally.test/prometheus"),
    x509.IPAddress(ipaddress.ip_address("10.9.8.7")),
    x509.IPAddress(ipaddress.ip_address("fd00::7")),
    x509.RFC822Name("prometheus@gputally.test"),
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    cas = {}
    for label in ("ca", "other_ca"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"gputally test {label}", key, _name(f"gputally test {label}"), key)
        cas[label] = (key, cert, _write_cert(folder / f"{label}.crt", cert))

    def leaf(label: str, ca: str, usage: x509.ObjectIdentifier, sans: list[Any]) -> Pair:
        ca_key, ca_cert, _ = cas[ca]
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(label, key, ca_cert.subject, ca_key, usage=usage, sans=sans)
        return Pair(
            _write_cert(folder / f"{label}.crt", cert),
            _write_key(folder / f"{label}.key", key),
            cert.serial_number,
        )

    server, client = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    first = leaf("server", "ca", server, SERVER_SANS)
    encrypted = folder / "server-encrypted.key"
    encrypted.write_bytes(
        serialization.load_pem_private_key(first.key.read_bytes(), None).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"sesame"),
        )
    )
    return Pki(
        ca=cas["ca"][2],
        other_ca=cas["other_ca"][2],
        server=first,
        server_next=leaf("server-next", "ca", server, SERVER_SANS),
        client=leaf("client", "ca", client, CLIENT_SANS),
        stranger=leaf("stranger", "other_ca", client, CLIENT_SANS),
        encrypted_key=encrypted,
    )


# -- helpers ---------------------------------------------------------------------------------

_BASE_NS = time.time_ns()
_VERSIONS = itertools.count(1)


def write(path: Path, content: str | bytes) -> None:
    """Replace a file the way rotation tools do (a new file renamed over the old), one second
    later each time: kernel timestamps are coarse, and two versions written in the same tick
    could otherwise look alike to a test that rewrites files within milliseconds."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_bytes(content.encode() if isinstance(content, str) else content)
    stamp = _BASE_NS + next(_VERSIONS) * 1_000_000_000
    os.utime(fresh, ns=(stamp, stamp))
    os.replace(fresh, path)


def hello(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"hello over {environ['wsgi.url_scheme']}\n".encode()]


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def get(
    port: int,
    context: ssl.SSLContext | None = None,
    auth: tuple[str, str] | None = None,
    host: str = "127.0.0.1",
    authorization: str | None = None,
    path: str = "/metrics",
) -> Response:
    connection = (
        http.client.HTTPSConnection(host, port, timeout=TIMEOUT, context=context)
        if context is not None
        else http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    )
    headers = {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    if authorization is not None:
        headers["Authorization"] = authorization
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return Response(response.status, dict(response.getheaders()), response.read())
    finally:
        connection.close()


def client(pki: Pki, pair: Pair | None = None, ca: Path | None = None) -> ssl.SSLContext:
    """A client that verifies the server (hostname included), with a certificate if given."""
    context = ssl.create_default_context(cafile=ca or pki.ca)
    if pair is not None:
        context.load_cert_chain(pair.cert, pair.key)
    return context


def served_serial(port: int, context: ssl.SSLContext) -> int:
    """The serial number of the certificate the server shows a new connection."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as secure,
    ):
        der = secure.getpeercert(binary_form=True)
        secure.sendall(b"GET / HTTP/1.0\r\n\r\n")
        while secure.recv(65536):
            pass
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def tls(pki: Pki, **settings: Any) -> dict[str, Any]:
    return {"cert_file": str(pki.server.cert), "key_file": str(pki.server.key), **settings}


def warned(caplog: pytest.LogCaptureFixture) -> str:
    """The errors of the warnings gputally.web logged (structured: they are in `kv`)."""
    records = [r for r in caplog.records if r.name == "gputally.web" and r.levelname == "WARNING"]
    return "\n".join(str(getattr(r, "kv", {}).get("error")) for r in records)


Serve = Callable[..., int]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    """Start serve_http on loopback with a web configuration (a mapping, written to
    tmp_path/web.yml) or none; returns the port. Stopped at the end of the test."""
    started: list[tuple[Any, threading.Thread]] = []

    def start(
        config: dict[str, Any] | None = None,
        app: web.WSGIApp = hello,
        host: str = "127.0.0.1",
        open_paths: frozenset[str] = frozenset(),
    ) -> int:
        path = ""
        if config is not None:
            path = str(tmp_path / "web.yml")
            write(Path(path), yaml.safe_dump(config))
        server, thread = serve_http(app, Address(host, 0), path, open_paths=open_paths)
        started.append((server, thread))
        return int(server.server_port)

    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)


REFUSED = (ssl.SSLError, ConnectionError)  # how a client learns its handshake was refused


# -- serving ---------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_without_a_web_config_it_is_plain_http_for_everyone(serve: Serve, host: str) -> None:
    port = serve(host=host)
    response = get(port, host=host)
    assert (response.status, response.body) == (200, b"hello over http\n")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_https_for_a_client_that_verifies_the_server(serve: Serve, pki: Pki, host: str) -> None:
    port = serve({"tls_server_config": tls(pki)}, host=host)
    response = get(port, client(pki), host=host)
    assert (response.status, response.body) == (200, b"hello over https\n")
    with pytest.raises(ssl.SSLCertVerificationError):
        get(port, client(pki, ca=pki.other_ca), host=host)


def test_plain_http_on_the_https_port_gets_no_metrics_but_a_hint(serve: Serve, pki: Pki) -> None:
    port = serve({"tls_server_config": tls(pki)})
    response = get(port)
    assert response.status == 400
    assert b"https://" in response.body and b"hello" not in response.body
    assert get(port, client(pki)).status == 200  # and the server carries on


def test_require_and_verify_client_cert(
    serve: Serve, pki: Pki, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    port = serve(
        {
            "tls_server_config": tls(
                pki, client_auth_type="RequireAndVerifyClientCert", client_ca_file=str(pki.ca)
            )
        }
    )
    caplog.set_level(logging.DEBUG, logger="gputally.web")
    with pytest.raises(REFUSED):
        get(port, client(pki))  # no certificate
    with pytest.raises(REFUSED):
        get(port, client(pki, pki.stranger))  # a certificate from another CA
    assert get(port, client(pki, pki.client)).status == 200
    # refused handshakes are a debug line each, never a traceback
    failed = [r for r in caplog.records if r.getMessage() == "TLS handshake failed"]
    assert len(failed) == 2 and all(r.levelno == logging.DEBUG for r in failed)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert "Traceback" not in capsys.readouterr().err


def test_verify_client_cert_if_given(serve: Serve, pki: Pki) -> None:
    port = serve(
        {
            "tls_server_config": tls(
                pki, client_auth_type="VerifyClientCertIfGiven", client_ca_file=str(pki.ca)
            )
        }
    )
    assert get(port, client(pki)).status == 200
    assert get(port, client(pki, pki.client)).status == 200
    with pytest.raises(REFUSED):
        get(port, client(pki, pki.stranger))


@pytest.mark.parametrize(
    ("allowed", "status"),
    [
        (["scraper.example"], 200),
        (["nobody.example", "spiffe://gputally.test/prometheus"], 200),
        (["10.9.8.7"], 200),
        (["fd00:0:0::7"], 200),  # IPv6 compared as addresses, not as spellings
        (["prometheus@gputally.test"], 200),
        (["other.example", "10.9.8.8"], 403),
    ],
)
def test_client_allowed_sans(serve: Serve, pki: Pki, allowed: list[str], status: int) -> None:
    port = serve(
        {
            "tls_server_config": tls(
                pki,
                client_auth_type="RequireAndVerifyClientCert",
                client_ca_file=str(pki.ca),
                client_allowed_sans=allowed,
            )
        }
    )
    response = get(port, client(pki, pki.client))
    assert response.status == status
    if status == 403:
        assert b"scraper.example" in response.body and b"hello" not in response.body


def test_basic_auth(serve: Serve) -> None:
    headers = {"X-Frame-Options": "deny", "Content-Security-Policy": "default-src 'none'"}
    port = serve(
        {
            "basic_auth_users": {"alice": RIGHT, "bob": OTHER},
            "http_server_config": {"headers": headers},
        }
    )
    for attempt in (
        {},
        {"auth": ("alice", "wrong")},
        {"auth": ("alice", "other")},  # bob's password
        {"auth": ("mallory", "right")},
        {"authorization": "Bearer cmlnaHQ="},
        {"authorization": "Basic not-base64!"},
    ):
        response = get(port, **attempt)
        assert response.status == 401, attempt
        assert response.headers["WWW-Authenticate"] == 'Basic realm="gputally"'
        assert b"hello" not in response.body
        assert response.headers["X-Frame-Options"] == "deny"
    for user, password in (("alice", "right"), ("bob", "other")):
        response = get(port, auth=(user, password))
        assert (response.status, response.body) == (200, b"hello over http\n")
        assert response.headers["Content-Security-Policy"] == "default-src 'none'"
        assert "WWW-Authenticate" not in response.headers


def test_successful_checks_are_cached_and_unknown_users_still_cost_a_check(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    port = serve({"basic_auth_users": {"alice": RIGHT}})
    assert get(port, auth=("alice", "right")).status == 200
    assert get(port, auth=("alice", "right")).status == 200
    assert len(calls) == 1  # the second request was answered from the cache
    assert get(port, auth=("alice", "wrong")).status == 401
    assert get(port, auth=("alice", "wrong")).status == 401
    assert len(calls) == 3  # failures are never cached
    assert get(port, auth=("mallory", "right")).status == 401
    assert len(calls) == 4 and calls[-1] != RIGHT.encode()  # a decoy hash, as slow as a real one
    assert calls[-1].startswith(b"$2b$04$")  # at the users' cost


def test_rate_limit(serve: Serve) -> None:
    port = serve({"rate_limit": {"interval": "1h", "burst": 2}})
    assert [get(port).status for _ in range(3)] == [200, 200, 429]


def test_a_slow_handshake_holds_up_nobody(
    serve: Serve, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(web, "_HANDSHAKE_SECONDS", 2.0)
    port = serve({"tls_server_config": tls(pki)})
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as silent,
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as stalled,
    ):
        stalled.sendall(b"\x16\x03\x01")  # the start of a client hello, and then nothing
        started = time.monotonic()
        assert get(port, client(pki)).status == 200
        assert time.monotonic() - started < 1.8  # served before the stalled ones time out
        # and the stalled clients are let go once their handshake time is up
        assert silent.recv(1) == b"" and stalled.recv(1) == b""


def test_tls_versions_and_cipher_suites(serve: Serve, pki: Pki) -> None:
    suite = "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"
    port = serve({"tls_server_config": tls(pki, max_version="TLS12", cipher_suites=[suite])})
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        client(pki).wrap_socket(raw, server_hostname="127.0.0.1") as secure,
    ):
        assert secure.version() == "TLSv1.2"
        cipher = secure.cipher()
        assert cipher is not None and cipher[0] == "ECDHE-ECDSA-AES256-GCM-SHA384"

    port = serve({"tls_server_config": tls(pki, min_version="TLS13")})
    old = client(pki)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(REFUSED):
        get(port, old)
    assert get(port, client(pki)).status == 200


# -- reloading -------------------------------------------------------------------------------


def test_a_changed_file_takes_effect_and_a_broken_one_is_logged_once_and_ignored(
    serve: Serve, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = serve({"basic_auth_users": {"alice": RIGHT}})
    assert get(port, auth=("alice", "right")).status == 200
    path = tmp_path / "web.yml"

    write(path, yaml.safe_dump({"basic_auth_users": {"carol": OTHER}}))
    assert get(port, auth=("alice", "right")).status == 401  # the cache went with the old file
    assert get(port, auth=("carol", "other")).status == 200

    caplog.set_level(logging.INFO, logger="gputally.web")
    write(path, "basic_auth_users:\n  carol: not-a-hash\n")
    for _ in range(3):
        assert get(port, auth=("carol", "other")).status == 200
        assert get(port).status == 401
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].kv["file"] == str(path)  # type: ignore[attr-defined]
    assert "basic_auth_users.carol is not a bcrypt hash" in warnings[0].kv["error"]  # type: ignore[attr-defined]

    # an empty file (or one caught half-written, before its users) would turn basic auth
    # off: refused like a broken one, the users stay (turning auth off takes a restart)
    caplog.clear()
    write(path, "")
    assert get(port).status == 401
    assert get(port, auth=("carol", "other")).status == 200
    (refusal,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "turning basic auth off takes a restart" in refusal.kv["error"]  # type: ignore[attr-defined]


def test_health_checks_need_no_password_but_still_tls(serve: Serve, pki: Pki) -> None:
    port = serve(
        {"tls_server_config": tls(pki), "basic_auth_users": {"alice": RIGHT}},
        open_paths=frozenset({"/healthz"}),
    )
    context = client(pki)
    assert get(port, context, path="/healthz").status == 200  # a probe has no password
    assert get(port, context, path="/metrics").status == 401
    assert get(port, context, auth=("alice", "right")).status == 200


def test_a_reload_cannot_turn_https_into_http(
    serve: Serve, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = serve({"tls_server_config": tls(pki)})
    write(tmp_path / "web.yml", yaml.safe_dump({"basic_auth_users": {"alice": RIGHT}}))
    assert get(port, client(pki)).status == 200  # still HTTPS, still no users
    assert "takes a restart" in warned(caplog)


def test_certificate_rotation(
    serve: Serve, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    # relative names: relative to the configuration file's folder
    port = serve({"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key"}})
    assert served_serial(port, client(pki)) == pki.server.serial

    write(cert, pki.server_next.cert.read_bytes())  # halfway: the key is still the old one
    assert served_serial(port, client(pki)) == pki.server.serial
    assert "do not match" in warned(caplog)
    write(key, pki.server_next.key.read_bytes())
    assert served_serial(port, client(pki)) == pki.server_next.serial
    assert get(port, client(pki)).status == 200


# -- the file's checks -----------------------------------------------------------------------

TLS = "tls_server_config:\n  cert_file: @CERT@\n  key_file: @KEY@\n"
BAD_FILES = {
    "unknown top-level key": ("tls_config:\n  cert_file: @CERT@\n", "unknown key 'tls_config'"),
    "unknown tls key": (TLS + "  client_ca_path: @CA@\n", "unknown key 'client_ca_path'"),
    "unknown client_auth_type": (
        TLS + "  client_auth_type: RequireCert\n",
        "client_auth_type 'RequireCert'",
    ),
    "missing key_file": ("tls_server_config:\n  cert_file: @CERT@\n", "no key_file"),
    "settings but no certificate": ("tls_server_config:\n  min_version: TLS13\n", "no cert_file"),
    "not a bcrypt hash": ("basic_auth_users:\n  alice: right\n", "not a bcrypt hash"),
    "an apr1 hash": ("basic_auth_users:\n  alice: $apr1$x$y\n", "not a bcrypt hash"),
    "user name not a string": ("basic_auth_users:\n  123: @HASH@\n", "must be a string"),
    "cert file missing": (TLS.replace("@CERT@", "@DIR@/gone.crt"), "gone.crt: no such file"),
    "not a mapping": ("- tls_server_config\n", "expected a YAML mapping"),
    "a scalar": ("metrics\n", "expected a YAML mapping"),
    "not YAML": ("tls_server_config: [\n", "not valid YAML"),
    "duplicate key": ("basic_auth_users:\n  a: @HASH@\n  a: @HASH@\n", "'a' appears twice"),
    "unknown cipher": (TLS + "  cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]\n", "cipher_suites"),
    "unknown version": (TLS + "  min_version: TLS14\n", "min_version 'TLS14'"),
    "min above max": (TLS + "  min_version: TLS13\n  max_version: TLS12\n", "above"),
    "unknown curve": (TLS + "  curve_preferences: [P256]\n", "curve_preferences 'P256'"),
    "wrong type": ("http_server_config:\n  http2: 'yes'\n", "http2 must be true or false"),
    "unknown header": (
        "http_server_config:\n  headers:\n    X-Powered-By: gputally\n",
        "'X-Powered-By' cannot be set",
    ),
    "bad header value": (
        "http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
        "X-Frame-Options is 'allow'",
    ),
    "CA without client auth": (TLS + "  client_ca_file: @CA@\n", "NoClientCert"),
    "verify without CA": (
        TLS + "  client_auth_type: RequireAndVerifyClientCert\n",
        "needs client_ca_file",
    ),
    "SANs with an optional certificate": (
        TLS + "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: @CA@\n"
        "  client_allowed_sans: [scraper.example]\n",
        "client_allowed_sans needs client_auth_type",
    ),
    "key of another certificate": (TLS.replace("@KEY@", "@CLIENT_KEY@"), "do not match"),
    "encrypted key": (TLS.replace("@KEY@", "@ENCRYPTED_KEY@"), "is encrypted"),
    "key file not PEM": (TLS.replace("@KEY@", "@CA@"), "holds no PEM private key"),
    "CA file not PEM": (
        TLS + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: @KEY@\n",
        "holds no PEM certificate",
    ),
    "rate limit without a unit": ("rate_limit:\n  interval: 5\n  burst: 1\n", "not a duration"),
}


def fill(text: str, pki: Pki, folder: Path) -> str:
    for token, value in (
        ("@CERT@", pki.server.cert),
        ("@KEY@", pki.server.key),
        ("@CLIENT_KEY@", pki.client.key),
        ("@ENCRYPTED_KEY@", pki.encrypted_key),
        ("@CA@", pki.ca),
        ("@DIR@", folder),
        ("@HASH@", RIGHT),
    ):
        text = text.replace(token, str(value))
    return text


@pytest.mark.parametrize(("text", "expected"), BAD_FILES.values(), ids=BAD_FILES.keys())
def test_a_bad_file_is_one_line_naming_the_file_and_the_fault(
    pki: Pki, tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "web.yml"
    path.write_text(fill(text, pki, tmp_path))
    with pytest.raises(WebConfigError) as caught:
        load_web_config(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_a_missing_file_is_refused_before_anything_listens(tmp_path: Path) -> None:
    path = tmp_path / "absent.yml"
    with pytest.raises(WebConfigError, match=f"^{path}: no such file$"):
        serve_http(hello, Address("127.0.0.1", 0), str(path), name="gputally-http-refused")
    assert "gputally-http-refused" not in [t.name for t in threading.enumerate()]


def test_a_complete_file_is_read_completely(pki: Pki, tmp_path: Path) -> None:
    shutil.copy(pki.server.cert, tmp_path / "server.crt")
    path = tmp_path / "web.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "tls_server_config": {
                    "cert_file": "server.crt",
                    "key": pki.server.key.read_text(),  # inline
                    "client_auth_type": "RequireAndVerifyClientCert",
                    "client_ca_file": str(pki.ca),
                    "client_allowed_sans": ["scraper.example"],
                    "min_version": "TLS13",
                    "cipher_suites": ["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"],
                    "prefer_server_cipher_suites": False,
                    "curve_preferences": ["X25519", "CurveP256"],
                },
                "http_server_config": {"http2": False, "headers": {"x-frame-options": "deny"}},
                "basic_auth_users": {"alice": RIGHT},
                "rate_limit": {"interval": "1m30s", "burst": 5},
            }
        )
    )
    config = load_web_config(path)
    assert config.tls is not None
    assert config.tls.cert_file == tmp_path / "server.crt"
    assert config.tls.key_file is None and config.tls.key is not None
    assert config.tls.client_auth_type == "RequireAndVerifyClientCert"
    assert config.tls.client_allowed_sans == ("scraper.example",)
    assert (config.tls.min_version, config.tls.max_version) == (
        ssl.TLSVersion.TLSv1_3,
        ssl.TLSVersion.TLSv1_3,
    )
    assert config.tls.cipher_suites == ("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",)
    assert config.tls.prefer_server_cipher_suites is False
    assert config.users == {"alice": RIGHT.encode()}
    assert config.headers == {"X-Frame-Options": "deny"}
    assert config.http2 is False
    assert config.rate_limit == web.RateLimit(90.0, 5)
    assert "BEGIN" not in repr(config)  # the inline key stays out of logs

    empty = tmp_path / "empty.yml"
    empty.write_text("")
    assert load_web_config(empty) == web.WebConfig(path=empty)


# -- gputally web-password -------------------------------------------------------------------


def test_web_password_prints_a_bcrypt_hash_the_file_accepts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("pässwörd with spaces \n"))
    assert main(["web-password", "--cost", "4"]) == 0
    hashed = capsys.readouterr().out.strip()
    assert hashed.startswith("$2b$04$") and len(hashed) == 60
    assert bcrypt.checkpw("pässwörd with spaces ".encode(), hashed.encode())
    path = tmp_path / "web.yml"
    path.write_text(yaml.safe_dump({"basic_auth_users": {"prometheus": hashed}}))
    assert load_web_config(path).users == {"prometheus": hashed.encode()}


@pytest.mark.parametrize(
    ("stdin", "message"),
    [("\n", "empty"), ("two\nlines\n", "one line"), ("x" * 73, "73 bytes")],
)
def test_web_password_refuses_what_bcrypt_cannot_take(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], stdin: str, message: str
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert main(["web-password", "--cost", "4"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err
    with pytest.raises(SystemExit):
        main(["web-password", "--cost", "3"])


# -- a real Prometheus -----------------------------------------------------------------------


def _query(base: str, promql: str) -> float | None:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        body = json.load(response)
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else None


@pytest.mark.prometheus
def test_prometheus_scrapes_over_https_with_basic_auth(
    serve: Serve, pki: Pki, tmp_path: Path
) -> None:
    binary = require_binary("prometheus")
    registry = CollectorRegistry()
    Gauge("gputally_web_test_value", "A value to scrape.", registry=registry).set(42)
    port = serve(
        {"tls_server_config": tls(pki), "basic_auth_users": {"prometheus": RIGHT}},
        app=make_wsgi_app(registry),
    )
    jobs = [
        {
            "job_name": job,
            "scheme": "https",
            "tls_config": {"ca_file": str(pki.ca)},
            "basic_auth": {"username": "prometheus", "password": password},
            "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
        }
        for job, password in (("good", "right"), ("bad", "wrong"))
    ]
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": jobs}))
    listen = free_port()
    base = f"http://127.0.0.1:{listen}"
    with (tmp_path / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{listen}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        found: dict[str, float | None] = {}
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):  # not listening yet
                found = {
                    "value": _query(base, 'gputally_web_test_value{job="good"}'),
                    "good": _query(base, 'up{job="good"}'),
                    "bad": _query(base, 'up{job="bad"}'),
                }
            if found and None not in found.values():
                break
            time.sleep(0.3)
        assert found == {"value": 42.0, "good": 1.0, "bad": 0.0}, (
            tmp_path / "prometheus.log"
        ).read_text()[-3000:]
    finally:
        process.terminate()
        process.wait(20)


def test_connections_beyond_the_cap_are_closed_at_once(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client holding many slow connections holds at most MAX_CONNECTIONS threads; the
    next connection is closed at once, and served again once the slow ones are gone."""
    monkeypatch.setattr(web, "MAX_CONNECTIONS", 3)
    port = serve()
    slow = [socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) for _ in range(3)]
    try:
        for s in slow:
            s.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        extra.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert extra.recv(100) == b""  # closed without an answer
        extra.close()
    finally:
        for s in slow:
            s.close()
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            if get(port).status == 200:
                break
        except OSError:
            pass
        time.sleep(0.1)
    assert get(port).status == 200
