"""TLS for the agent -> collector gRPC stream: credentials from PEM files, read again when the
files change, so certificates are rotated without restarting anything.

The collector's server credentials are grpc's dynamic ones: grpc asks for the current
configuration at every new handshake, and gets a new one only when a file changed (open
streams keep the certificate they were opened with). An agent builds its channel credentials
at every connection, which reads its files again. A file that cannot be read at start is a
one-line error; one that breaks later (half-written by a rotation) is logged and the last good
certificate stays in use.

`gputally ca` (gputally.cli.ca) makes a private CA and the certificates for labs and small
sites; any other CA works the same.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

log = logging.getLogger("gputally.tls")


class TlsError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names it and says why."""


def _stamp(path: str) -> tuple[int, int]:
    status = Path(path).stat()
    return status.st_mtime_ns, status.st_size


def _read_pem(path: str, what: str, option: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise TlsError(f"{option} {path}: cannot read the {what}: {error.strerror}") from None
    if b"-----BEGIN " not in data:
        raise TlsError(f"{option} {path}: not a PEM file (the {what} must be PEM)")
    return data


def _check_certificates(data: bytes, path: str, option: str) -> None:
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError as error:
        raise TlsError(f"{option} {path}: not a PEM certificate: {error}") from None


@dataclass(frozen=True, slots=True)
class ServerFiles:
    """The collector's side: its certificate chain and key, and, for mutual TLS, the CA whose
    client certificates it accepts (empty: no client certificate asked for)."""

    cert: str
    key: str
    client_ca: str = ""

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        cert = _read_pem(self.cert, "certificate", "--tls-cert")
        _check_certificates(cert, self.cert, "--tls-cert")
        key = _read_pem(self.key, "private key", "--tls-key")
        ca = None
        if self.client_ca:
            ca = _read_pem(self.client_ca, "client CA", "--tls-client-ca")
            _check_certificates(ca, self.client_ca, "--tls-client-ca")
        return cert, key, ca

    def stamps(self) -> tuple[tuple[int, int], ...]:
        return tuple(_stamp(p) for p in (self.cert, self.key, self.client_ca) if p)


def _configuration(cert: bytes, key: bytes, ca: bytes | None) -> Any:
    return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)


def server_credentials(files: ServerFiles) -> grpc.ServerCredentials:
    """Dynamic server credentials over `files`. TlsError at once when they cannot be read;
    grpc itself refuses a key that does not match its certificate at the first handshake, so
    the pair is tried here too, by loading both into an SSL context."""
    cert, key, ca = files.read()
    _check_pair(cert, key, files)
    lock = threading.Lock()
    seen = [files.stamps()]

    def fetch() -> Any:
        # Called by grpc for every new connection: a stat per file, a read only on change.
        with lock:
            try:
                stamps = files.stamps()
                if stamps == seen[0]:
                    return None  # grpc keeps the current configuration
                new = files.read()
                _check_pair(new[0], new[1], files)
            except (OSError, TlsError) as error:
                log.warning(
                    "TLS files changed but cannot be used; the previous certificate stays",
                    extra={"kv": {"error": str(error)}},
                )
                return None
            seen[0] = stamps
            log.info("TLS certificate reloaded", extra={"kv": {"cert": files.cert}})
            return _configuration(*new)

    return grpc.dynamic_ssl_server_credentials(
        _configuration(cert, key, ca), fetch, require_client_authentication=bool(files.client_ca)
    )


def _check_pair(cert: bytes, key: bytes, files: ServerFiles) -> None:
    import ssl
    import tempfile

    # ssl can only load a chain from files: write both to a private temporary directory.
    with tempfile.TemporaryDirectory() as tmp:
        c, k = Path(tmp, "c.pem"), Path(tmp, "k.pem")
        c.write_bytes(cert)
        k.write_bytes(key)

        def no_password() -> str:
            raise TlsError(
                f"--tls-key {files.key}: an encrypted key; give it unencrypted (mode 0600)"
            )

        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(c, k, password=no_password)
        except ssl.SSLError as error:
            raise TlsError(
                f"--tls-key {files.key}: not the private key of --tls-cert {files.cert} "
                f"({error.reason or error})"
            ) from None


@dataclass(frozen=True, slots=True)
class ClientFiles:
    """The agent's side: the CA that signed the collector's certificate (empty: the system's
    roots), and, for mutual TLS, the node's certificate and key."""

    ca: str = ""
    cert: str = ""
    key: str = ""
    server_name: str = ""  # the name the collector's certificate must carry (default: its host)

    def credentials(self) -> grpc.ChannelCredentials:
        """Read the files now (the agent calls this at every connection: a rotated
        certificate is used from the next one on)."""
        if bool(self.cert) != bool(self.key):
            raise TlsError(
                "--tls-cert and --tls-key go together (a client certificate and its key)"
            )
        ca = _read_pem(self.ca, "CA", "--tls-ca") if self.ca else None
        if ca is not None:
            _check_certificates(ca, self.ca, "--tls-ca")
        cert = _read_pem(self.cert, "certificate", "--tls-cert") if self.cert else None
        key = _read_pem(self.key, "private key", "--tls-key") if self.key else None
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )

    def options(self) -> Sequence[tuple[str, str]]:
        return (("grpc.ssl_target_name_override", self.server_name),) if self.server_name else ()


def peer_names(auth_context: dict[str, Sequence[bytes]]) -> set[str]:
    """The names a verified client certificate carries (its common name and DNS names), from
    grpc's auth context; empty when the peer sent none."""
    names: set[str] = set()
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        names.update(v.decode(errors="replace") for v in auth_context.get(key, ()))
    return names


def is_loopback(host: str) -> bool:
    """Whether a listen host reaches this machine only (plaintext is allowed there)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
