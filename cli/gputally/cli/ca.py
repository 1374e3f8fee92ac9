"""`gputally ca`: a private certificate authority for the agents' mutual TLS, for labs and small
sites that have no PKI of their own (any other CA works the same; see gputally.cli.tls).

* `init` makes the CA: ``ca.key`` (PKCS#8 PEM, mode 0600) and a self-signed ``ca.crt``.
* `issue` makes a server certificate for the collector, or a client certificate for one node,
  bound to the node's name (subject CN and SAN dNSName), which the collector checks against
  the name the node's Hello gives.
* `show` prints what a certificate says, for the person wiring it up.

Keys are ECDSA P-256 and signatures ECDSA with SHA-256: what every TLS stack accepts
(OpenSSL, grpc's BoringSSL and Go's crypto/tls among them). The certificates are shaped to pass
OpenSSL's X509_STRICT checks (Python 3.13's default): critical basicConstraints and keyUsage,
subject and authority key identifiers, a critical SAN wherever the subject is empty.

The functions above the commands (`new_ca`, `issue`, `key_pem`, `cert_pem`, `fingerprint`)
are what tests use to make certificates for their gRPC TLS servers.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import socket
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gputally.cli.options import fail
from gputally.v1.signing import write_file

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
CA_DAYS = 3650
# 397 days: the longest validity public CAs may give a server certificate (CA/Browser Forum,
# 398 days, less a day of margin); some clients (Apple's) refuse longer ones even privately.
LEAF_DAYS = 397
# Up to 100 years: further, and a typing slip runs past what X.509 times can say (year 9999).
MAX_DAYS = 36_500
# Certificates start this long ago, so that a node whose clock runs a little behind the CA's
# machine does not find a fresh certificate "not yet valid".
CLOCK_SKEW = timedelta(minutes=5)
# The collector's rule for node names (gputally.collector.live.validate.MAX_NODE_NAME, which
# this module must not import): a node's key file is <node>.pub, at most 255 bytes.
MAX_NODE_NAME = 250
# RFC 5280's ub-common-name; cryptography refuses a longer CN.
MAX_COMMON_NAME = 64
MAX_DNS_NAME = 253


# -- certificates ----------------------------------------------------------------------------


def _now() -> datetime:
    # X.509 times have whole seconds; cut here so that what is compared is what is written.
    return datetime.now(UTC).replace(microsecond=0)


def _check_days(days: int) -> None:
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"a certificate is valid for 1 to {MAX_DAYS} days, not {days}")


def _key_usage(*, sign: bool = False, certs: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=certs,
        crl_sign=certs,
        encipher_only=False,
        decipher_only=False,
    )


def new_ca(
    common_name: str, days: int = CA_DAYS
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new CA: its P-256 key and self-signed certificate, valid from 5 minutes ago for
    `days`. ValueError for a name cryptography refuses (empty, over 64 bytes) or bad days."""
    _check_days(days)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        # pathlen 0: the CA signs leaf certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(certs=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def _same_key(key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> bool:
    def raw(public: Any) -> bytes:
        return bytes(
            public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    return raw(key.public_key()) == raw(certificate.public_key())


def _general_name(text: str) -> x509.GeneralName:
    """A name in a SAN: an IP address as an iPAddress (a client connecting to 10.0.0.5 checks
    that, never a dNSName "10.0.0.5"), anything else as a dNSName."""
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        return x509.DNSName(text)  # ValueError for a name that is not ASCII


def issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    *,
    server: bool = False,
    client: bool = False,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    days: int = LEAF_DAYS,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new P-256 key and its certificate signed by the CA: for TLS servers (serverAuth),
    clients (clientAuth) or both, named `common_name` in its subject CN and SAN (a dNSName, or
    an iPAddress when it is one), with every `dns` and `ips` in the SAN too.

    Valid from 5 minutes ago for `days`, but never past the CA's own expiry (every verifier
    refuses a chain from then on anyway). A name over 64 bytes, the most a CN may hold, leaves
    the subject empty and the SAN, then critical, alone names the certificate. ValueError for
    a certificate for nothing, bad names or addresses, an expired CA, or a key and
    certificate that are not one CA."""
    if not (server or client):
        raise ValueError("a certificate is for a TLS server, a client or both")
    _check_days(days)
    if not _same_key(ca_key, ca_cert):
        raise ValueError("the CA key is not the key of the CA certificate")
    names: list[x509.GeneralName] = []
    for general in [
        _general_name(common_name),
        *(x509.DNSName(name) for name in dns),
        *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips),
    ]:
        if general not in names:
            names.append(general)
    now = _now()
    ca_expiry = ca_cert.not_valid_after_utc
    if ca_expiry <= now:
        raise ValueError(f"the CA expired on {ca_expiry:%Y-%m-%d %H:%M:%S} UTC")
    not_after = min(now + timedelta(days=days), ca_expiry)
    fits = len(common_name.encode()) <= MAX_COMMON_NAME
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if fits else [])
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    try:
        authority = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        )
    except x509.ExtensionNotFound:  # a CA made elsewhere, without one
        authority = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # digitalSignature alone: with ECDHE key exchange (every TLS 1.2 and 1.3 suite an EC
        # key can use), the certificate's key only signs the handshake.
        .add_extension(_key_usage(sign=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        # RFC 5280: with an empty subject the SAN is the certificate's only name, and critical.
        .add_extension(x509.SubjectAlternativeName(names), critical=not fits)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(authority, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, certificate


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM (what grpc, OpenSSL and Go read); keep it 0600."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    """The SHA-256 of the certificate's DER as upper-case hex pairs joined by colons, the way
    `openssl x509 -noout -fingerprint -sha256` prints it, so the two can be compared by eye."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


# -- names -----------------------------------------------------------------------------------


def name_problem(name: str) -> str | None:
    """Why `name` cannot name a certificate issued here, or None.

    The collector's rule for node names (printable, no whitespace, at most 250 bytes of UTF-8),
    the rule for the file named after it (no '/', not hidden), and ASCII: a SAN dNSName is an
    IA5String, and the collector compares the SAN with the Hello's name as it is."""
    if not name:
        return "is empty"
    if not name.isprintable() or any(c.isspace() for c in name):
        return "must be printable, without spaces"
    if len(name.encode()) > MAX_NODE_NAME:
        return f"is {len(name.encode())} bytes long; at most {MAX_NODE_NAME}"
    if "/" in name or name.startswith("."):
        return "names the certificate's files: no '/', and not starting with '.'"
    if not name.isascii():
        return "must be ASCII: a certificate's dNSName cannot hold other characters"
    return None


def _dns_problem(name: str) -> str | None:
    if not name or not name.isascii() or not name.isprintable() or " " in name:
        return "must be printable ASCII, without spaces"
    if len(name) > MAX_DNS_NAME:
        return f"is {len(name)} characters long; a DNS name has at most {MAX_DNS_NAME}"
    return None


def _days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of days: {text!r}") from None
    if not 1 <= value <= MAX_DAYS:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_DAYS} days, got {text}")
    return value


def _ca_name(text: str) -> str:
    if not text.strip() or not text.isprintable():
        raise argparse.ArgumentTypeError(f"must be printable and not empty, got {text!r}")
    if len(text.encode()) > MAX_COMMON_NAME:
        raise argparse.ArgumentTypeError(
            f"a certificate's common name has at most {MAX_COMMON_NAME} bytes; {text!r} has "
            f"{len(text.encode())}"
        )
    return text


def default_ca_name() -> str:
    # Cut to a CN's 64 bytes: a long FQDN must not make `ca init` fail without --name.
    return f"gputally CA {socket.gethostname()}".encode()[:MAX_COMMON_NAME].decode(errors="ignore")


# -- the commands ----------------------------------------------------------------------------

_WORKFLOW = """\
A lab's workflow:
  gputally ca init --dir ./ca
  gputally ca issue --dir ./ca --server collector.example.org --ip 10.0.0.5
  gputally ca issue --dir ./ca --node gpu-node-01 --out ./nodes/gpu-node-01
Give the collector collector.example.org.{crt,key} and ca.crt (the CA its clients must come
from); give each node its own <node>.{crt,key} and ca.crt. ca.key never leaves the CA's
machine: whoever holds it can speak as any node."""


def register(sub: Any) -> dict[str, argparse.ArgumentParser]:
    ca: argparse.ArgumentParser = sub.add_parser(
        "ca",
        help="a private CA for the agents' mutual TLS: make it, issue server and node certificates",
        # Raw, for the workflow's lines: the description is wrapped here, by hand.
        description="A private certificate authority for labs and small sites: ECDSA P-256 keys\n"
        "and SHA-256 signatures, which every TLS stack accepts. Sites with a PKI of their\n"
        "own use theirs.",
        epilog=_WORKFLOW,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="CA_COMMAND", required=True)

    init = ca_sub.add_parser(
        "init",
        help="make the CA: ca.key and a self-signed ca.crt",
        description="Make a new CA in DIR: its private key ca.key (PKCS#8 PEM, mode 0600) and its "
        "self-signed certificate ca.crt (CA, path length 0: it signs node and server certificates "
        "only). Prints the certificate's SHA-256 fingerprint.",
    )
    init.add_argument("--dir", required=True, metavar="DIR", help="where the CA is kept")
    init.add_argument(
        "--name",
        type=_ca_name,
        metavar="NAME",
        help="the CA's common name, at most 64 bytes (default: 'gputally CA <hostname>')",
    )
    init.add_argument(
        "--days",
        type=_days,
        default=CA_DAYS,
        metavar="N",
        help="how long the CA is valid (default: %(default)s)",
    )
    init.add_argument(
        "--force",
        action="store_true",
        help="replace a CA DIR already holds: every certificate the old one issued stops being "
        "accepted wherever the new ca.crt replaces the old",
    )
    init.set_defaults(handler=run_init)

    issue_ = ca_sub.add_parser(
        "issue",
        help="issue a server certificate (the collector) or a client certificate (one node)",
        description="Issue a certificate signed by the CA in DIR and write <name>.crt and <name>.key "
        "(mode 0600) into --out. --node: a client certificate for that node (clientAuth), its name in "
        "the subject CN and the SAN; the collector accepts it only from an agent whose Hello gives that "
        "name. --server: a server certificate (serverAuth) for the collector, its name in the CN and "
        "the SAN with every --dns and --ip; agents check the name they connect to against the SAN. "
        "Valid from 5 minutes ago (clocks drift) for --days, never past the CA's expiry. Prints the "
        "files written and the certificate's SHA-256 fingerprint.",
        epilog="Names: printable ASCII without spaces, at most 250 bytes, no '/', not starting with "
        "'.' (the collector's rule for node names, and the files named after them). A name over 64 "
        "bytes, the most a common name holds, is in the SAN only.",
    )
    issue_.add_argument("--dir", required=True, metavar="DIR", help="the CA's directory")
    who = issue_.add_mutually_exclusive_group(required=True)
    who.add_argument("--node", metavar="NAME", help="a client certificate for this node")
    who.add_argument(
        "--server",
        metavar="NAME",
        help="a server certificate for this name (a DNS name, or an IP address)",
    )
    issue_.add_argument(
        "--dns",
        action="append",
        default=[],
        metavar="NAME",
        help="another DNS name of the server, repeatable (--server only)",
    )
    issue_.add_argument(
        "--ip",
        action="append",
        default=[],
        metavar="ADDR",
        help="an IP address agents connect to the server by, repeatable (--server only)",
    )
    issue_.add_argument(
        "--days",
        type=_days,
        default=LEAF_DAYS,
        metavar="N",
        help="how long the certificate is valid (default: %(default)s)",
    )
    issue_.add_argument(
        "--out", metavar="DIR", help="where to write <name>.crt and <name>.key (default: --dir)"
    )
    issue_.add_argument(
        "--force", action="store_true", help="overwrite the certificate and key if they exist"
    )
    issue_.set_defaults(handler=run_issue)

    show = ca_sub.add_parser(
        "show",
        help="print what a certificate says: names, usages, validity, issuer, fingerprint",
        description="Print each certificate of a PEM file: subject, SANs, key usages, validity, "
        "issuer, serial, key and SHA-256 fingerprint (upper-case hex pairs with colons, as "
        "`openssl x509 -fingerprint -sha256` prints it).",
    )
    show.add_argument("file", metavar="FILE", help="a PEM certificate (or several, e.g. a chain)")
    show.set_defaults(handler=run_show)
    return {"ca": ca}


def _os_error(error: OSError) -> str:
    where = f"{error.filename}: " if error.filename else ""
    return f"{where}{error.strerror or error}"


def run_init(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    # lexists: a dangling link is something there too, and writing would replace it.
    there = [p.name for p in (key_path, cert_path) if os.path.lexists(p)]
    if there and not args.force:
        return fail(
            "ca init",
            f"{directory} already holds a CA ({', '.join(there)}); replacing it makes every "
            "certificate it issued unusable: pass --force if that is what you want",
        )
    try:
        key, certificate = new_ca(args.name or default_ca_name(), args.days)
    except ValueError as error:
        return fail("ca init", str(error))
    try:
        # The key first: a crash between the two leaves a key without a certificate, which
        # `issue` refuses by name, never a certificate whose key is gone.
        write_file(key_path, key_pem(key))
        write_file(cert_path, cert_pem(certificate), mode=0o644)
    except OSError as error:
        return fail("ca init", _os_error(error))
    print(f"wrote {key_path} (keep it here: it signs every certificate)")
    print(f"wrote {cert_path} (give it to the collector and every node)")
    print(f"CA {certificate.subject.rfc4514_string()}, valid until {_date(certificate)}")
    print(f"SHA-256 fingerprint {fingerprint(certificate)}")
    return 0


def load_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA in `directory`; ValueError with a one-line reason when there is none to use."""
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    missing = [p.name for p in (key_path, cert_path) if not p.exists()]
    if missing:
        raise ValueError(
            f"no CA in {directory} ({' and '.join(missing)} missing); make one with "
            f"`gputally ca init --dir {directory}`"
        )
    try:
        if key_path.stat().st_mode & 0o077:
            # As for every private key here (gputally.v1.signing): whoever reads it can
            # issue a certificate for any node.
            raise ValueError(
                f"{key_path}: the CA key is readable by others; run `chmod 600 {key_path}`"
            )
        key_data, cert_data = key_path.read_bytes(), cert_path.read_bytes()
    except OSError as error:
        raise ValueError(_os_error(error)) from None
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:  # what cryptography raises for a key that needs a password
        raise ValueError(f"{key_path}: the key is encrypted; `ca` reads unencrypted keys") from None
    except ValueError:
        raise ValueError(f"{key_path}: not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path}: not an ECDSA key")
    try:
        certificate = x509.load_pem_x509_certificate(cert_data)
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        raise ValueError(f"{cert_path}: not a CA certificate (no basicConstraints)") from None
    except ValueError:
        raise ValueError(f"{cert_path}: not a PEM certificate") from None
    if not constraints.value.ca:
        raise ValueError(f"{cert_path}: not a CA certificate")
    if not _same_key(key, certificate):
        raise ValueError(f"{key_path} is not the key of {cert_path}")
    return key, certificate


def run_issue(args: argparse.Namespace) -> int:
    command = "ca issue"
    node = args.node is not None  # else --server: argparse requires one of the two
    name: str = args.node if node else args.server
    flag = "--node" if node else "--server"
    problem = name_problem(name)
    if problem:
        return fail(command, f"{flag} {name[:60]!r} {problem}")
    if node and (args.dns or args.ip):
        # One certificate, one node: a second name would let one node's key speak for another.
        return fail(
            command, "--dns and --ip are for --server; a node certificate names its node only"
        )
    for dns in args.dns:
        problem = _dns_problem(dns)
        if problem:
            return fail(command, f"--dns {dns[:60]!r} {problem}")
    for ip in args.ip:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            return fail(command, f"--ip {ip[:60]!r} is not an IPv4 or IPv6 address")
    directory = Path(args.dir)
    try:
        ca_key, ca_cert = load_ca(directory)
    except ValueError as error:
        return fail(command, str(error))
    out = Path(args.out) if args.out else directory
    key_path, cert_path = out / f"{name}.key", out / f"{name}.crt"
    ca_files = {(directory / CA_KEY).resolve(), (directory / CA_CERT).resolve()}
    if {key_path.resolve(), cert_path.resolve()} & ca_files:
        # --force or not: overwriting ca.key would lose the CA.
        return fail(command, f"{name!r} would overwrite the CA's own files; use another --out")
    there = [str(p) for p in (cert_path, key_path) if os.path.lexists(p)]
    if there and not args.force:
        return fail(command, f"{' and '.join(there)} exist; pass --force to replace them")
    try:
        key, certificate = issue(
            ca_key,
            ca_cert,
            name,
            server=not node,
            client=node,
            dns=args.dns,
            ips=args.ip,
            days=args.days,
        )
    except ValueError as error:
        return fail(command, str(error))
    try:
        # The key first, as in `init`; both names have the same length, so a name too long
        # for the file system fails at the first and leaves nothing behind.
        write_file(key_path, key_pem(key))
        write_file(cert_path, cert_pem(certificate), mode=0o644)
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            # write_file's temporary file is ".<file>.<8 random>": 10 bytes more than <file>.
            return fail(
                command,
                f"{flag} {name[:40]!r}...: {len(name.encode())} bytes make a file name too long "
                f"for {out} (with its temporary name)",
            )
        return fail(command, _os_error(error))
    kind = "client certificate for node" if node else "server certificate for"
    print(f"wrote {cert_path} ({kind} {name})")
    print(f"wrote {key_path} (mode 0600: only its owner may read it)")
    until = f"valid until {_date(certificate)}"
    if certificate.not_valid_after_utc == ca_cert.not_valid_after_utc:
        until += " (cut to the CA's expiry)"
    print(until)
    print(f"SHA-256 fingerprint {fingerprint(certificate)}")
    return 0


# -- show ------------------------------------------------------------------------------------

_USAGES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}


def _date(certificate: x509.Certificate, end: bool = True) -> str:
    moment = certificate.not_valid_after_utc if end else certificate.not_valid_before_utc
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


def _extension(certificate: x509.Certificate, kind: type[Any]) -> Any:
    try:
        return certificate.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _san(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DNSName):
        return f"DNS:{name.value}"
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    if isinstance(name, x509.UniformResourceIdentifier):
        return f"URI:{name.value}"
    if isinstance(name, x509.RFC822Name):
        return f"email:{name.value}"
    return f"{type(name).__name__}:{getattr(name, 'value', '?')}"


def _key_usages(usage: x509.KeyUsage) -> list[str]:
    names = [
        "digitalSignature",
        "contentCommitment",
        "keyEncipherment",
        "dataEncipherment",
        "keyAgreement",
        "keyCertSign",
        "cRLSign",
    ]
    attributes = [
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
    ]
    found = [n for n, a in zip(names, attributes, strict=True) if getattr(usage, a)]
    # encipher_only and decipher_only raise unless keyAgreement is set.
    if usage.key_agreement:
        found += [
            n
            for n, a in (("encipherOnly", "encipher_only"), ("decipherOnly", "decipher_only"))
            if getattr(usage, a)
        ]
    return found


def _public_key(certificate: x509.Certificate) -> str:
    key = certificate.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name} ({key.key_size} bits)"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size} bits"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448"
    return type(key).__name__


def describe(certificate: x509.Certificate, now: datetime | None = None) -> list[str]:
    """What `ca show` prints for one certificate, a line per fact."""
    now = now or datetime.now(UTC)
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    if now < start:
        state = "NOT YET VALID"
    elif now >= end:
        state = "EXPIRED"
    else:
        state = f"{(end - now).days} days left"
    san = _extension(certificate, x509.SubjectAlternativeName)
    usage = _extension(certificate, x509.KeyUsage)
    extended = _extension(certificate, x509.ExtendedKeyUsage)
    constraints = _extension(certificate, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        pathlen = constraints.path_length
        role = "yes" + ("" if pathlen is None else f" (path length {pathlen})")
    else:
        role = "no"
    return [
        f"subject:         {certificate.subject.rfc4514_string() or '(empty)'}",
        f"SANs:            {', '.join(_san(n) for n in san) if san is not None else '(none)'}",
        f"key usage:       {', '.join(_key_usages(usage)) if usage is not None else '(any)'}",
        "extended usage:  "
        + (
            ", ".join(_USAGES.get(oid, oid.dotted_string) for oid in extended)
            if extended is not None
            else "(any)"
        ),
        f"CA:              {role}",
        f"valid:           {_date(certificate, end=False)} to {_date(certificate)} ({state})",
        f"issuer:          {certificate.issuer.rfc4514_string() or '(empty)'}",
        f"serial:          {certificate.serial_number:x}",
        f"key:             {_public_key(certificate)}",
        f"SHA-256:         {fingerprint(certificate)}",
    ]


def run_show(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        data = path.read_bytes()
    except OSError as error:
        return fail("ca show", _os_error(error))
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        # cryptography's message is a paragraph with a link; the one thing to say is this.
        hint = " (it holds a private key)" if b"PRIVATE KEY-----" in data else ""
        return fail("ca show", f"{path}: not a PEM certificate{hint}")
    try:
        # Extensions are parsed when first read: a malformed one is a ValueError here.
        blocks = [describe(c) for c in certificates]
    except ValueError as error:
        return fail("ca show", f"{path}: a certificate that cannot be read: {error}")
    for i, lines in enumerate(blocks):
        if i:
            print()
        print("\n".join(lines))
    return 0
