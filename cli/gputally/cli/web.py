"""HTTP(S) for /metrics the way Prometheus exporters serve it: a web configuration file.

``--web-config-file`` of the agent and the collector reads the Prometheus exporter-toolkit's
format (what node_exporter's ``--web.config.file`` reads), so a scrape job's ``tls_config`` and
``basic_auth`` work unchanged. Keys, all optional::

    tls_server_config:
      cert_file, key_file          server certificate and key (PEM); or inline: cert, key
      client_auth_type             NoClientCert (default), RequestClientCert,
                                   RequireAnyClientCert (or its old name RequireClientCert),
                                   VerifyClientCertIfGiven, RequireAndVerifyClientCert
      client_ca_file               CAs that vouch for client certificates; or inline: client_ca
      client_allowed_sans          a client certificate must name one of these (DNS, IP,
                                   e-mail or URI); others are answered 403
      min_version, max_version     TLS10, TLS11, TLS12, TLS13 (default TLS12 to TLS13)
      cipher_suites                Go's names of the TLS 1.2 suites (TLS 1.3's are fixed)
      prefer_server_cipher_suites  default true
      curve_preferences            CurveP256, CurveP384, CurveP521, X25519: checked, ignored
    http_server_config:
      headers                      Strict-Transport-Security, X-Content-Type-Options,
                                   X-Frame-Options, X-XSS-Protection, Content-Security-Policy
      http2                        checked, no effect
    basic_auth_users:              user: bcrypt hash ($2a$, $2b$ or $2y$; `gputally web-password`)
    rate_limit:                    interval (a Go duration: 100ms, 1s) and burst; 429 beyond

Relative paths are relative to the file's folder. The file is read at start (a bad one stops
the daemon) and again, with the certificate files it names, whenever one of them changes
(mtime, size or inode) as a connection arrives: certificates rotate and users change without a
restart. A broken change is logged once and the last good configuration stays in force.

Where Python's ``ssl`` cannot do what Go's crypto/tls does, or where Go's choice would be a trap,
this module differs from the exporter-toolkit, always towards refusing:

* RequestClientCert asks no certificate: Go asks for one and checks nothing, and nothing here
  would read an unchecked certificate, so clients see the same outcome.
* RequireAnyClientCert needs client_ca_file and verifies the certificate against it, like
  RequireAndVerifyClientCert: Python's ssl cannot accept a certificate it has not verified.
* The verifying types need client_ca_file (or client_ca): Go would fall back to the system's
  web CAs, which are not who should vouch for a scraper.
* curve_preferences: the names are checked, then ignored: Python's ssl can restrict the key
  exchange to one curve at most, not order several; OpenSSL's default groups apply.
* http2 is checked and has no effect: this server speaks HTTP/1.x (ALPN offers http/1.1).
* TLS 1.3 cipher suite names are accepted with no effect, as in Go; TLS10 and TLS11 are
  accepted, but OpenSSL 3's default security level refuses those versions anyway.
* Refused where Go accepts: a tls_server_config with settings but no certificate (Go would
  silently serve plain HTTP), duplicate keys, an empty client_allowed_sans (no client could
  connect), header values with control characters, and a reload that would switch between HTTP
  and HTTPS (that takes a restart).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import getpass
import hashlib
import ipaddress
import logging
import re
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

import bcrypt
import yaml

from .options import OK, Address, fail

log = logging.getLogger("gputally.web")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class WebConfigError(ValueError):
    """A web configuration file that cannot be used: one line naming the file and the fault."""


# -- the file's vocabulary -------------------------------------------------------------------

CLIENT_AUTH_TYPES = (
    "NoClientCert",
    "RequestClientCert",
    "RequireAnyClientCert",
    "VerifyClientCertIfGiven",
    "RequireAndVerifyClientCert",
)
# The exporter-toolkit still reads this older name of RequireAnyClientCert; so do we.
_CLIENT_AUTH_ALIASES = {"RequireClientCert": "RequireAnyClientCert"}
_VERIFYING = ("RequireAnyClientCert", "VerifyClientCertIfGiven", "RequireAndVerifyClientCert")
# Types under which every client presents a certificate: the only ones where a SAN rule
# can hold (under the others a client without a certificate would slip past it).
_CERTIFICATE_REQUIRED = ("RequireAnyClientCert", "RequireAndVerifyClientCert")
_VERIFY_MODES = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_NONE,  # see the module's docstring
    "RequireAnyClientCert": ssl.CERT_REQUIRED,  # verified: see the module's docstring
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}

_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}

# The TLS 1.0-1.2 suites Go lets a configuration name (crypto/tls CipherSuites(): its
# insecure ones are refused there too), by their IANA names, and what OpenSSL calls them.
_CIPHERS_TLS12 = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
}
# TLS 1.3's suites: Go accepts their names and then uses all three regardless; so does this.
_CIPHERS_TLS13 = (
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
)
_CURVES = ("CurveP256", "CurveP384", "CurveP521", "X25519")

# The headers a file may add (a closed list, so every exporter sets the same ones), and the
# values of those that are enumerations.
_HEADERS: dict[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}

_BCRYPT = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
_GO_DURATION = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}

_TOP = ("tls_server_config", "http_server_config", "basic_auth_users", "rate_limit")
_TLS_KEYS = (
    "cert_file",
    "key_file",
    "cert",
    "key",
    "client_auth_type",
    "client_ca_file",
    "client_ca",
    "client_allowed_sans",
    "min_version",
    "max_version",
    "cipher_suites",
    "prefer_server_cipher_suites",
    "curve_preferences",
)


@dataclass(frozen=True)
class RateLimit:
    interval: float  # seconds earned per request: one every `interval` on average
    burst: int  # requests allowed at once after a quiet spell


@dataclass(frozen=True)
class TLSSettings:
    """tls_server_config, paths resolved against the file's folder."""

    cert_file: Path | None = None
    key_file: Path | None = None
    cert: str | None = field(default=None, repr=False)  # inline PEM instead of cert_file
    key: str | None = field(default=None, repr=False)  # inline PEM instead of key_file
    client_auth_type: str = "NoClientCert"
    client_ca_file: Path | None = None
    client_ca: str | None = field(default=None, repr=False)
    client_allowed_sans: tuple[str, ...] | None = None  # None: no SAN rule
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    max_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
    cipher_suites: tuple[str, ...] = ()  # Go's names; () is OpenSSL's defaults
    prefer_server_cipher_suites: bool = True
    curve_preferences: tuple[str, ...] = ()  # checked, not applied (see the module docstring)

    @property
    def files(self) -> tuple[Path, ...]:
        """The files the TLS settings read: a change to one of them is a reload."""
        named = (self.cert_file, self.key_file, self.client_ca_file)
        return tuple(path for path in named if path is not None)


@dataclass(frozen=True)
class WebConfig:
    """A parsed web configuration file."""

    path: Path
    tls: TLSSettings | None = None  # None: plain HTTP
    users: dict[str, bytes] = field(default_factory=dict, repr=False)  # {}: no basic auth
    headers: dict[str, str] = field(default_factory=dict)  # added to every response
    http2: bool = True  # checked, no effect
    rate_limit: RateLimit | None = None


# -- reading the file ------------------------------------------------------------------------


class _Bad(ValueError):
    """What is wrong, without the file's name (load_web_config adds it)."""


def load_web_config(path: str | Path) -> WebConfig:
    """Read and check a web configuration file, certificates and keys included."""
    return _load(Path(path))[0]


Signature = tuple[tuple[int, ...] | None, ...]


def _load(path: Path) -> tuple[WebConfig, ssl.SSLContext | None, Signature]:
    """The configuration, its TLS context, and the signature of the files it was read from.

    Each file is looked at before it is read: a change that lands between the two is seen
    again by the next connection, never missed."""
    try:
        before = _stat(path)
        config = _parse(path, _read_yaml(path))
        signature = (before, *(_stat(f) for f in config.tls.files)) if config.tls else (before,)
        context = _tls_context(config.tls) if config.tls else None
    except _Bad as error:
        raise WebConfigError(f"{path}: {_one_line(str(error))}") from None
    return config, context, signature


def _stat(path: Path) -> tuple[int, ...] | None:
    try:
        st = path.stat()
    except OSError:
        return None  # gone (mid-rotation, perhaps): different from any file there
    # inode and ctime too: an atomic rename of a file of the same size in the same clock tick
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev, st.st_ctime_ns)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _Bad(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise _Bad(f"{what} {path}: is a folder, not a file") from None
    except PermissionError:
        raise _Bad(f"{what} {path}: permission denied") from None
    except OSError as error:
        raise _Bad(f"{what} {path}: {error.strerror or error}") from None


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice: the last one silently winning hides mistakes."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:
            continue  # unhashable: construct_mapping says so below
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _mapping_without_duplicates,
)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _Bad("no such file") from None
    except IsADirectoryError:
        raise _Bad("is a folder, not a web configuration file") from None
    except OSError as error:
        raise _Bad(f"cannot read it: {error.strerror or error}") from None
    try:
        loaded = yaml.load(data, Loader=_StrictLoader)  # a SafeLoader: no Python objects
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise _Bad(f"not valid YAML: {error.problem or error}{where}") from None
    except yaml.YAMLError as error:
        raise _Bad(f"not valid YAML: {error}") from None
    if loaded is None:
        return {}  # an empty file: plain HTTP, no authentication
    if not isinstance(loaded, dict):
        raise _Bad(f"expected a YAML mapping with {', '.join(_TOP)}; got {_kind(loaded)}")
    return loaded


def _kind(value: object) -> str:
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    kinds.update({list: "a list", dict: "a mapping", type(None): "nothing"})
    return kinds.get(type(value), type(value).__name__)


def _section(data: Mapping[str, Any], key: str, known: Iterable[str], where: str) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    return _keys(value, known, where)


def _keys(value: object, known: Iterable[str], where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(f"{where} must be a mapping, got {_kind(value)}")
    allowed = tuple(known)
    for key in value:
        if key not in allowed:
            raise _Bad(f"unknown key {key!r} in {where}; known keys: {', '.join(allowed)}")
    return value


def _string(section: Mapping[str, Any], key: str, where: str) -> str | None:
    """A string value; absent, null and "" are all "not set" (as in Go)."""
    value = section.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _Bad(f"{where}.{key} must be a string, got {_kind(value)}")
    return value


def _strings(section: Mapping[str, Any], key: str, where: str) -> tuple[str, ...] | None:
    value = section.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _Bad(f"{where}.{key} must be a list of strings, got {_kind(value)}")
    return tuple(value)


def _boolean(section: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    value = section.get(key, default)
    if not isinstance(value, bool):
        raise _Bad(f"{where}.{key} must be true or false, got {_kind(value)} {value!r}")
    return value


def _choice(value: str, key: str, choices: Iterable[str], where: str) -> str:
    options = tuple(choices)
    if value not in options:
        raise _Bad(f"unknown {where}.{key} {value!r}; one of {', '.join(options)}")
    return value


def _parse(path: Path, data: Mapping[str, Any]) -> WebConfig:
    _keys(data, _TOP, "the top level")
    http = _section(data, "http_server_config", ("http2", "headers"), "http_server_config")
    return WebConfig(
        path=path,
        tls=_parse_tls(
            path.parent, _section(data, "tls_server_config", _TLS_KEYS, "tls_server_config")
        ),
        users=_parse_users(data.get("basic_auth_users")),
        headers=_parse_headers(http.get("headers")),
        http2=_boolean(http, "http2", "http_server_config", True),
        rate_limit=_parse_rate_limit(data.get("rate_limit")),
    )


def _parse_tls(folder: Path, tls: Mapping[str, Any]) -> TLSSettings | None:
    where = "tls_server_config"
    if not tls:
        return None

    def file(key: str) -> Path | None:
        name = _string(tls, key, where)
        return None if name is None else folder / name  # absolute names stay as they are

    cert_file, key_file, ca_file = file("cert_file"), file("key_file"), file("client_ca_file")
    cert, key, ca = (_string(tls, k, where) for k in ("cert", "key", "client_ca"))
    for on_disk, inline, name in ((cert_file, cert, "cert"), (key_file, key, "key")):
        if on_disk is None and inline is None:
            raise _Bad(f"{where} has no {name}_file (nor an inline {name}): HTTPS needs both")
    for on_disk, inline, name in (
        (cert_file, cert, "cert"),
        (key_file, key, "key"),
        (ca_file, ca, "client_ca"),
    ):
        if on_disk is not None and inline is not None:
            raise _Bad(f"{where} gives both {name}_file and an inline {name}: keep one")

    auth = _string(tls, "client_auth_type", where) or "NoClientCert"
    auth = _choice(
        _CLIENT_AUTH_ALIASES.get(auth, auth), "client_auth_type", CLIENT_AUTH_TYPES, where
    )
    has_ca = ca_file is not None or ca is not None
    if has_ca and auth == "NoClientCert":
        raise _Bad(
            f"{where} has client_ca_file but client_auth_type NoClientCert asks no client "
            "certificate: set client_auth_type (RequireAndVerifyClientCert) or drop the CA"
        )
    if auth in _VERIFYING and not has_ca:
        raise _Bad(f"{where}: client_auth_type {auth} needs client_ca_file, the CAs to trust")
    sans = _strings(tls, "client_allowed_sans", where)
    if sans is not None:
        if auth not in _CERTIFICATE_REQUIRED:
            raise _Bad(
                f"{where}.client_allowed_sans needs client_auth_type RequireAndVerifyClientCert "
                f"(or RequireAnyClientCert), not {auth}: a client without a certificate has no SAN"
            )
        if not sans:
            raise _Bad(f"{where}.client_allowed_sans is empty: no client could connect")

    versions = []
    for key_name, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        version = _string(tls, key_name, where) or default
        versions.append(_TLS_VERSIONS[_choice(version, key_name, _TLS_VERSIONS, where)])
    if versions[0] > versions[1]:
        raise _Bad(f"{where}: min_version is above max_version")

    ciphers = _strings(tls, "cipher_suites", where) or ()
    for cipher in ciphers:
        if cipher not in _CIPHERS_TLS12 and cipher not in _CIPHERS_TLS13:
            raise _Bad(
                f"unknown {where}.cipher_suites entry {cipher!r}: name a suite as Go does, "
                "e.g. TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 (Go's insecure ones are refused)"
            )
    curves = _strings(tls, "curve_preferences", where) or ()
    for curve in curves:
        _choice(curve, "curve_preferences", _CURVES, where)

    return TLSSettings(
        cert_file=cert_file,
        key_file=key_file,
        cert=cert,
        key=key,
        client_auth_type=auth,
        client_ca_file=ca_file,
        client_ca=ca,
        client_allowed_sans=sans,
        min_version=versions[0],
        max_version=versions[1],
        cipher_suites=ciphers,
        prefer_server_cipher_suites=_boolean(tls, "prefer_server_cipher_suites", where, True),
        curve_preferences=curves,
    )


def _parse_users(value: object) -> dict[str, bytes]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Bad(f"basic_auth_users must be a mapping of user: bcrypt hash, got {_kind(value)}")
    users: dict[str, bytes] = {}
    for user, hashed in value.items():
        if not isinstance(user, str):
            raise _Bad(f"basic_auth_users: user name {user!r} must be a string: quote it")
        if not user or ":" in user:
            raise _Bad(f"basic_auth_users: user name {user!r} must be non-empty, without ':'")
        match = _BCRYPT.fullmatch(hashed) if isinstance(hashed, str) else None
        if match is None or not 4 <= int(match.group(1)) <= 31:
            raise _Bad(
                f"basic_auth_users.{user} is not a bcrypt hash ($2a$, $2b$ or $2y$, cost 4 to "
                "31, 60 characters): make one with `gputally web-password`"
            )
        users[user] = hashed.encode("ascii")
    return users


def _parse_headers(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Bad(f"http_server_config.headers must be a mapping, got {_kind(value)}")
    canonical = {name.lower(): name for name in _HEADERS}
    headers: dict[str, str] = {}
    for name, text in value.items():
        header = canonical.get(str(name).lower())
        if header is None:
            raise _Bad(
                f"http_server_config.headers: {name!r} cannot be set; only {', '.join(_HEADERS)}"
            )
        if not isinstance(text, str):
            raise _Bad(f"http_server_config.headers.{header} must be a string, got {_kind(text)}")
        if any(ord(c) < 32 or ord(c) == 127 for c in text):
            raise _Bad(f"http_server_config.headers.{header} has a control character in it")
        if not text:
            continue  # blank: not sent
        allowed = _HEADERS[header]
        if allowed and text not in allowed:
            raise _Bad(
                f"http_server_config.headers.{header} is {text!r}; one of {', '.join(allowed)}"
            )
        headers[header] = text
    return headers


def _parse_rate_limit(value: object) -> RateLimit | None:
    section = _keys(value, ("interval", "burst"), "rate_limit") if value is not None else {}
    raw = section.get("interval", 0)
    if raw == 0 and not isinstance(raw, bool):
        return None  # no interval: no limit
    if not isinstance(raw, str) or not _GO_DURATION.fullmatch(raw):
        raise _Bad(f"rate_limit.interval {raw!r} is not a duration such as 100ms, 1s or 1m30s")
    interval = sum(float(n) * _SECONDS[unit] for n, unit in _DURATION_PART.findall(raw))
    burst = section.get("burst", 0)
    if not isinstance(burst, int) or isinstance(burst, bool) or burst < 1:
        raise _Bad(f"rate_limit.burst must be a whole number of at least 1, got {burst!r}")
    return RateLimit(interval, burst) if interval > 0 else None


# -- TLS -------------------------------------------------------------------------------------

_CERTIFICATE_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----")
_KEY_PEM = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")


class _Encrypted(Exception):
    pass


def _no_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key's password.
    raise _Encrypted


def _tls_context(tls: TLSSettings) -> ssl.SSLContext:
    where = "tls_server_config"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = tls.min_version
    context.maximum_version = tls.max_version
    context.set_alpn_protocols(["http/1.1"])
    if tls.prefer_server_cipher_suites:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    # OpenSSL's list governs TLS 1.0-1.2 only; TLS 1.3's suites stay OpenSSL's.
    chosen = [_CIPHERS_TLS12[name] for name in tls.cipher_suites if name in _CIPHERS_TLS12]
    if chosen:
        try:
            context.set_ciphers(":".join(chosen))
        except ssl.SSLError:
            raise _Bad(f"{where}.cipher_suites: this OpenSSL offers none of them") from None

    cert_what = f"{where}.cert_file" if tls.cert_file else f"{where}.cert"
    key_what = f"{where}.key_file" if tls.key_file else f"{where}.key"
    cert = _pem(tls.cert_file, tls.cert, cert_what)
    key = _pem(tls.key_file, tls.key, key_what)
    if not _CERTIFICATE_PEM.search(cert):
        raise _Bad(f"{_name(cert_what, tls.cert_file)} holds no PEM certificate")
    if not _KEY_PEM.search(key):
        raise _Bad(f"{_name(key_what, tls.key_file)} holds no PEM private key")
    # load_cert_chain reads files only: inline PEM goes through a private temporary folder
    # for the moment it takes to load it.
    with tempfile.TemporaryDirectory(prefix="gputally-web-") as folder:
        cert_path = tls.cert_file or Path(folder, "cert.pem")
        key_path = tls.key_file or Path(folder, "key.pem")
        if tls.cert_file is None:
            cert_path.write_bytes(cert)
        if tls.key_file is None:
            key_path.write_bytes(key)
        try:
            context.load_cert_chain(cert_path, key_path, password=_no_password)
        except _Encrypted:
            raise _Bad(
                f"{_name(key_what, tls.key_file)} is encrypted: give it unencrypted"
            ) from None
        except ssl.SSLError as error:
            pair = f"{_name(cert_what, tls.cert_file)} and {_name(key_what, tls.key_file)}"
            if "KEY_VALUES_MISMATCH" in str(error.reason or error):
                raise _Bad(f"{pair} do not match: the key is not the certificate's") from None
            raise _Bad(f"{pair}: cannot load them: {error.reason or error}") from None
        except OSError as error:
            raise _Bad(f"{cert_what}: {error.strerror or error}") from None

    if tls.client_ca_file is not None or tls.client_ca is not None:
        ca_what = f"{where}.client_ca_file" if tls.client_ca_file else f"{where}.client_ca"
        ca = _pem(tls.client_ca_file, tls.client_ca, ca_what)
        if not _CERTIFICATE_PEM.search(ca):
            raise _Bad(f"{_name(ca_what, tls.client_ca_file)} holds no PEM certificate")
        try:
            context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        except ssl.SSLError as error:
            raise _Bad(
                f"{_name(ca_what, tls.client_ca_file)}: cannot load it: {error.reason or error}"
            ) from None
    context.verify_mode = _VERIFY_MODES[tls.client_auth_type]
    return context


def _pem(path: Path | None, inline: str | None, what: str) -> bytes:
    return _read(path, what) if path is not None else (inline or "").encode()


def _name(what: str, path: Path | None) -> str:
    return f"{what} {path}" if path is not None else what


def _normal_san(text: str) -> str:
    """One spelling per SAN: IP addresses as Python writes them (OpenSSL writes IPv6 in
    full upper-case hex), the rest as given."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        return text


def _peer_sans(certificate: Mapping[str, Any]) -> set[str]:
    kinds = ("DNS", "IP Address", "email", "URI")
    return {
        _normal_san(str(value))
        for kind, value in certificate.get("subjectAltName", ())
        if kind in kinds
    }


# -- the configuration in force --------------------------------------------------------------

# bcrypt reads at most 72 bytes of a password (bcrypt>=5 refuses more): the rest never counted,
# in htpasswd's hashes or Go's checks either.
_BCRYPT_BYTES = 72
_CACHE_LIMIT = 4096  # successful (user, password) pairs remembered; more: start again


class _Auth:
    """basic_auth_users of one configuration, with the checks that passed remembered."""

    def __init__(self, users: Mapping[str, bytes], lock: threading.Lock):
        self._users = dict(users)
        self._passed: set[tuple[str, bytes]] = set()
        self._lock = lock
        # An unknown user costs one bcrypt check like a known one, against a hash no password
        # matches (of the users' highest cost), so response times do not tell who exists.
        cost = max((int(h[4:6]) for h in users.values()), default=10)
        self._decoy = b"$2b$%02d$" % cost + b"." * 53

    @property
    def enabled(self) -> bool:
        return bool(self._users)

    def check(self, user: str, password: bytes) -> bool:
        # Keyed by a digest, not the password: the cache holds no password.
        key = (user, hashlib.sha256(password).digest())
        if key in self._passed:
            return True
        stored = self._users.get(user)
        # One check at a time: bcrypt is meant to be slow, and a flood of wrong passwords
        # should cost the daemon one core, not all of them.
        with self._lock:
            matched = bcrypt.checkpw(password[:_BCRYPT_BYTES], stored or self._decoy)
        if not matched or stored is None:
            return False
        if len(self._passed) >= _CACHE_LIMIT:
            self._passed.clear()
        self._passed.add(key)
        return True


class _Limiter:
    """A token bucket: `burst` requests at once, then one per `interval` seconds."""

    def __init__(self, limit: RateLimit):
        self._limit = limit
        self._tokens = float(limit.burst)
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            now = time.monotonic()
            earned = (now - self._stamp) / self._limit.interval
            self._tokens = min(float(self._limit.burst), self._tokens + earned)
            self._stamp = now
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True


@dataclass(frozen=True)
class _Generation:
    """One loaded configuration: what each connection that arrives while it is in force uses."""

    config: WebConfig
    context: ssl.SSLContext | None
    auth: _Auth
    limiter: _Limiter | None
    allowed_sans: frozenset[str] | None
    headers: tuple[tuple[str, str], ...]


class _Live:
    """The web configuration file, read again when it or a file it names changes."""

    def __init__(self, path: Path):
        self.path = path
        self._bcrypt_lock = threading.Lock()  # shared by every generation: one server, one core
        self._current = self._load()
        self.tls = self._current[0].context is not None
        self._broken: Signature | None = None  # a change already logged as unusable
        self._lock = threading.Lock()

    def _load(self) -> tuple[_Generation, Signature]:
        config, context, signature = _load(self.path)
        sans = config.tls.client_allowed_sans if config.tls else None
        generation = _Generation(
            config=config,
            context=context,
            auth=_Auth(config.users, self._bcrypt_lock),
            limiter=_Limiter(config.rate_limit) if config.rate_limit else None,
            allowed_sans=None if sans is None else frozenset(_normal_san(s) for s in sans),
            headers=tuple(config.headers.items()),
        )
        return generation, signature

    def _signature(self, config: WebConfig) -> Signature:
        files = config.tls.files if config.tls else ()
        return (_stat(self.path), *(_stat(f) for f in files))

    def current(self) -> _Generation:
        """The configuration for a new connection, reloaded first if a file changed."""
        generation, signature = self._current
        if self._signature(generation.config) in (signature, self._broken):
            return generation
        with self._lock:  # one reload at a time; the others wait and take its result
            generation, signature = self._current
            now = self._signature(generation.config)
            if now in (signature, self._broken):
                return generation
            try:
                fresh = self._load()
                if (fresh[0].context is not None) != self.tls:
                    scheme = "HTTPS" if self.tls else "plain HTTP"
                    raise WebConfigError(
                        f"{self.path}: switching to or from TLS takes a restart (serving {scheme})"
                    )
                if generation.auth.enabled and not fresh[0].auth.enabled:
                    # a file caught half-written (its users not yet there) must not open the
                    # door: turning basic auth off, like TLS, takes a restart
                    raise WebConfigError(
                        f"{self.path}: turning basic auth off takes a restart (a half-written "
                        "file would otherwise let anyone in)"
                    )
            except WebConfigError as error:
                self._broken = now
                log.warning(
                    "web configuration not reloaded: the last good one stays in force",
                    extra={"kv": {"file": str(self.path), "error": str(error)}},
                )
                return generation
            self._current, self._broken = fresh, None
            log.info("web configuration reloaded", extra={"kv": {"file": str(self.path)}})
            return fresh[0]


# -- serving ---------------------------------------------------------------------------------

_CONNECTION = "gputally.web.connection"  # the environ key of a request's _Connection
_HANDSHAKE_SECONDS = 10.0  # a client that has not finished its TLS handshake by then is dropped
_TLS_HANDSHAKE_RECORD = b"\x16"  # the first byte of every TLS client hello


@dataclass(frozen=True)
class _Connection:
    generation: _Generation
    refused: str = ""  # why the client certificate is not allowed, or ""


class _Responder(ServerHandler):
    """wsgiref's response writer, without a traceback on stderr when the client hung up
    mid-response (a scraper's timeout, a port scan): that is the client's doing, not news."""

    def log_exception(self, exc_info: Any) -> None:
        if issubclass(exc_info[0], ConnectionError | TimeoutError | ssl.SSLError):
            log.debug("client went away mid-response", extra={"kv": {"error": str(exc_info[1])}})
            return
        super().log_exception(exc_info)


class _Handler(WSGIRequestHandler):
    # Seconds a connection may stall mid-request: a stuck client holds a thread, not forever
    # (a scrape sends its request at once).
    timeout = 15

    def handle(self) -> None:
        # WSGIRequestHandler.handle, with _Responder for its ServerHandler
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.requestline = self.request_version = self.command = ""
            self.send_error(414)
            return
        if not self.parse_request():
            return
        responder = _Responder(
            self.rfile,
            self.wfile,  # type: ignore[arg-type]  # a socket file, as the base class passes
            self.get_stderr(),
            self.get_environ(),
            multithread=False,
        )
        responder.request_handler = self  # type: ignore[attr-defined]  # wsgiref's back-pointer
        responder.run(self.server.get_app())  # type: ignore[attr-defined]

    def __init__(
        self, request: Any, client_address: Any, server: Any, connection: _Connection | None = None
    ):
        self.web_connection = connection  # set before the base class handles the request
        super().__init__(request, client_address, server)

    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
        pass

    def get_environ(self) -> dict[str, Any]:
        environ = super().get_environ()
        if self.web_connection is not None:
            environ[_CONNECTION] = self.web_connection
            if self.web_connection.generation.context is not None:
                environ["HTTPS"] = "on"  # wsgi.url_scheme follows
        return environ


# Connections served at once; past it a new one is closed at once. Scrapers are few: a
# client holding hundreds of slow connections must not hold as many threads.
MAX_CONNECTIONS = 128


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    # the kernel's queue of connections not yet accepted: the default 5 resets a burst of
    # clients (Prometheus and a few probes, a witness's loggers) that the cap below admits
    request_queue_size = MAX_CONNECTIONS
    live: _Live | None = None
    _slots = threading.BoundedSemaphore(MAX_CONNECTIONS)  # replaced per server in server_bind

    def server_bind(self) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().server_bind()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.debug(
                "connection refused: too many at once",
                extra={"kv": {"peer": _peer(client_address)}},
            )
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        """In the connection's own thread: the configuration check, the TLS handshake (a slow
        client delays itself only), then the request."""
        if self.live is None:
            _Handler(request, client_address, self, None)
            return
        generation = self.live.current()
        if generation.context is None:
            _Handler(request, client_address, self, _Connection(generation))
            return
        secure = self._handshake(request, client_address, generation.context)
        if secure is None:
            return
        try:
            refused = _refusal(secure, generation.allowed_sans)
            if refused:
                log.info(
                    "client certificate refused",
                    extra={"kv": {"peer": _peer(client_address), "reason": refused}},
                )
            _Handler(secure, client_address, self, _Connection(generation, refused))
        finally:
            self.shutdown_request(secure)

    def _handshake(
        self, request: socket.socket, client_address: Any, context: ssl.SSLContext
    ) -> ssl.SSLSocket | None:
        request.settimeout(_HANDSHAKE_SECONDS)
        try:
            first = request.recv(1, socket.MSG_PEEK)
            if first and first != _TLS_HANDSHAKE_RECORD:
                _answer_plain_http(request)
                return None
            if not first:
                return None  # connected and left (a port check)
        except OSError as error:
            _handshake_failed(client_address, error)
            return None
        try:
            secure = context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        except OSError as error:  # gone between accept and now
            _handshake_failed(client_address, error)
            return None
        try:
            secure.do_handshake()
        except OSError as error:  # ssl.SSLError, a reset, a timeout
            _handshake_failed(client_address, error)
            secure.close()
            return None
        return secure

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError | ssl.SSLError):
            # a client that went away or spoke nonsense: not the server's fault, no traceback
            log.debug(
                "connection ended early",
                extra={"kv": {"peer": _peer(client_address), "error": _reason(error)}},
            )
            return
        log.error("request failed", exc_info=True, extra={"kv": {"peer": _peer(client_address)}})


class _Server6(_Server):
    address_family = socket.AF_INET6


def _refusal(secure: ssl.SSLSocket, allowed: frozenset[str] | None) -> str:
    if allowed is None:
        return ""
    found = _peer_sans(secure.getpeercert() or {})
    if found & allowed:
        return ""
    return f"no SAN in client_allowed_sans; the certificate has {sorted(found) or 'none'}"


def _answer_plain_http(request: socket.socket) -> None:
    """A plain HTTP request on the HTTPS port: say so (in plain HTTP), rather than a dropped
    connection nobody can explain."""
    try:
        request.recv(65536)  # the request, read so that closing does not reset the connection
        body = b"this port speaks HTTPS: use https://\n"
        request.sendall(
            b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body
        )
    except OSError:
        pass


def _handshake_failed(client_address: Any, error: BaseException) -> None:
    # debug: every port scan and health check that speaks no TLS would be a warning otherwise
    log.debug(
        "TLS handshake failed",
        extra={"kv": {"peer": _peer(client_address), "error": _reason(error)}},
    )


def _peer(client_address: Any) -> str:
    try:
        host, port = client_address[0], client_address[1]
    except (TypeError, IndexError):
        return str(client_address)
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _reason(error: BaseException | None) -> str:
    if isinstance(error, ssl.SSLError) and error.reason:
        return str(error.reason)
    return _one_line(str(error)) or type(error).__name__


def _credentials(header: str) -> tuple[str, bytes] | None:
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    if not colon:
        return None
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        return None


def _guard(app: WSGIApp, open_paths: frozenset[str] = frozenset()) -> WSGIApp:
    """The app behind the configuration's rate limit, client certificate rule and basic auth,
    its responses with the configuration's headers. `open_paths` (health checks: a liveness
    probe has no password) need no basic auth; they are served over TLS all the same."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        connection: _Connection = environ.pop(_CONNECTION)
        generation = connection.generation

        def respond(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
            present = {name.lower() for name, _ in headers}
            extra = [(k, v) for k, v in generation.headers if k.lower() not in present]
            return start_response(status, [*headers, *extra], *exc_info)

        def refuse(status: str, text: str, *more: tuple[str, str]) -> Iterable[bytes]:
            body = text.encode()
            respond(status, [("Content-Type", "text/plain; charset=utf-8"), *more])
            return [body]

        if generation.limiter is not None and not generation.limiter.allow():
            return refuse("429 Too Many Requests", "too many requests: see rate_limit\n")
        if connection.refused:
            return refuse(
                "403 Forbidden", f"client certificate not allowed: {connection.refused}\n"
            )
        if generation.auth.enabled and environ.get("PATH_INFO", "") not in open_paths:
            credentials = _credentials(environ.get("HTTP_AUTHORIZATION", ""))
            if credentials is None or not generation.auth.check(*credentials):
                return refuse(
                    "401 Unauthorized",
                    "unauthorized: this server needs a user and password (basic auth)\n",
                    ("WWW-Authenticate", 'Basic realm="gputally"'),
                )
        return app(environ, respond)

    return guarded


def serve_http(
    app: WSGIApp,
    listen: Address,
    web_config: str = "",
    *,
    name: str = "gputally-http",
    open_paths: frozenset[str] = frozenset(),
) -> tuple[WSGIServer, threading.Thread]:
    """Serve the app on a daemon thread; returns the server (its server_port is the bound
    port) and the thread.

    `web_config` names an exporter-toolkit web configuration file (TLS, basic auth, headers);
    empty: plain HTTP for everyone. A bad file raises WebConfigError before anything listens.
    `open_paths` are served without basic auth (the collector's /healthz and /readyz)."""
    live = _Live(Path(web_config)) if web_config else None
    host = listen.bind_host
    server_class = _Server6 if ":" in host else _Server
    server = server_class((host, listen.port), _Handler)
    server.live = live
    server.set_app(_guard(app, open_paths) if live is not None else app)
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    if live is not None:
        config = live.current().config
        log.info(
            "serving HTTPS" if live.tls else "serving HTTP",
            extra={
                "kv": {
                    "address": str(Address(listen.host, server.server_port)),
                    "web_config": str(live.path),
                    "basic_auth_users": len(config.users),
                    "client_auth_type": config.tls.client_auth_type if config.tls else "",
                }
            },
        )
    return server, thread


# -- gputally web-password -------------------------------------------------------------------


def _cost(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 4 <= value <= 31:
        raise argparse.ArgumentTypeError(f"bcrypt's cost is 4 to 31, got {value}")
    return value


def register(sub: Any) -> dict[str, argparse.ArgumentParser]:
    parser: argparse.ArgumentParser = sub.add_parser(
        "web-password",
        help="hash a password with bcrypt, for basic_auth_users of a --web-config-file",
        description="Read a password from stdin (or ask for it twice on a terminal) and print its "
        "bcrypt hash: the value of a user in basic_auth_users of the web configuration file that "
        "`gputally agent` and `gputally collector` read with --web-config-file (the Prometheus "
        "exporter-toolkit's format, as node_exporter's --web.config.file).",
        epilog="Example: printf '%s\\n' \"$PASSWORD\" | gputally web-password. One trailing "
        "newline is not part of the password. Exit status 2 for an empty password, one longer "
        "than the 72 bytes bcrypt reads, or two answers on a terminal that differ.",
    )
    parser.add_argument(
        "--cost",
        type=_cost,
        default=10,
        metavar="N",
        help="bcrypt cost, 4 to 31: 2^N rounds, each step doubling the time a check takes "
        "(default: %(default)s, tens of milliseconds; the server remembers checks that passed)",
    )
    parser.set_defaults(handler=run_web_password)
    return {"web-password": parser}


def run_web_password(args: argparse.Namespace) -> int:
    command = "web-password"
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            return fail(command, "the two passwords differ; nothing printed")
    else:
        password = sys.stdin.read().removesuffix("\n").removesuffix("\r")
        if "\n" in password or "\r" in password:
            return fail(command, "give the password on one line: it has a line break in it")
    raw = password.encode("utf-8")
    if not raw:
        return fail(command, "the password is empty")
    if len(raw) > _BCRYPT_BYTES:
        return fail(
            command,
            f"the password is {len(raw)} bytes; bcrypt reads only the first {_BCRYPT_BYTES}",
        )
    print(bcrypt.hashpw(raw, bcrypt.gensalt(rounds=args.cost)).decode("ascii"))
    return OK
