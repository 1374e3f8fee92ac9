"""Enrolled agent keys: which Ed25519 public key speaks for which node.

A directory holds one file per node, `<node>.pub`, with the key's 32 bytes in base64, one key
per line: the last line is the node's current key, the lines before it the keys it had before
(a reinstalled node gets a new key with `gputally enroll --rotate`; its old key stays, so that
what it signed can still be verified, but no longer speaks for the node). The collector
records a node's summaries only when they are signed by its current key. The
directory is read again when a file changes, so `gputally enroll` (or an updated Kubernetes
ConfigMap) takes effect without a restart, and deleting a node's file revokes its key. In
trust-on-first-use mode (for labs; off by default) the first key a node presents is enrolled
for it; a different key later is still refused.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from gputally.v1.signing import (
    PUBLIC_KEY_BYTES,
    KeyFileError,
    decode_public_key,
    encode_public_key,
    write_file,
)

log = logging.getLogger("gputally.collector")


class KeyStoreError(KeyFileError):
    """A key directory, or an enrolment, that cannot be used; the message says why."""


def read_public_keys(text: str, where: str) -> list[bytes]:
    """The keys of a `<node>.pub` file, oldest first; the last is current."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise KeyStoreError(f"{where}: no key in the file")
    return [decode_public_key(line, f"{where}: line {i}") for i, line in enumerate(lines, 1)]


def _checked_name(node: str) -> str:
    if not node or "/" in node or node.startswith(".") or "\x00" in node:
        raise KeyStoreError(f"{node!r} cannot name a key file")
    return node


def _stamp(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_mtime_ns, status.st_size


class KeyStore:
    def __init__(self, directory: Path | str, *, trust_on_first_use: bool = False):
        self.directory = Path(directory)
        self.trust_on_first_use = trust_on_first_use
        self._lock = threading.Lock()
        self._keys: dict[str, list[bytes]] = {}  # node -> its keys, oldest first
        self._seen: dict[str, tuple[int, int]] = {}  # node -> (mtime_ns, size) when read
        if not self.directory.is_dir():
            if not trust_on_first_use:
                raise KeyStoreError(f"{self.directory}: no such key directory")
            self.directory.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.directory.glob("*.pub")):
            self._keys[path.stem] = read_public_keys(path.read_text(), str(path))
            self._seen[path.stem] = _stamp(path)

    def key(self, node: str) -> bytes | None:
        """The node's current key as the directory holds it now (one stat per call: keys are
        looked up once per stream and once per summary, not per report)."""
        keys = self.keys(node)
        return keys[-1] if keys else None

    def keys(self, node: str) -> list[bytes]:
        """Every key the node has had, oldest first (empty when it has none)."""
        try:
            path = self.directory / f"{_checked_name(node)}.pub"
        except KeyStoreError:
            return []
        with self._lock:
            try:
                stamp = _stamp(path)
            except OSError:  # no file (never enrolled, or revoked by deleting it)
                self._keys.pop(node, None)
                self._seen.pop(node, None)
                return []
            if self._seen.get(node) != stamp:
                try:
                    self._keys[node] = read_public_keys(path.read_text(), str(path))
                except (OSError, KeyFileError) as error:
                    # A half-written or broken file: keep what was enrolled before, if anything.
                    log.warning("cannot read enrolled key", extra={"kv": {"error": str(error)}})
                    return list(self._keys.get(node, []))
                self._seen[node] = stamp
            return list(self._keys.get(node, []))

    def enroll(self, node: str, public_key: bytes, *, rotate: bool = False) -> Path:
        """Make `public_key` the node's key. A node that has another key already keeps it only
        with `rotate`: the new key becomes current, the old one stays to verify the past."""
        if len(public_key) != PUBLIC_KEY_BYTES:
            raise KeyStoreError(f"an Ed25519 public key has {PUBLIC_KEY_BYTES} bytes")
        path = self.directory / f"{_checked_name(node)}.pub"
        existing = self.keys(node)
        if existing and existing[-1] == public_key:
            return path  # enrolled already
        if public_key in existing:
            raise KeyStoreError(
                f"node {node}: this key was retired by a rotation and cannot be made current again"
            )
        if existing and not rotate:
            raise KeyStoreError(
                f"node {node} already has another key; `gputally enroll --rotate` makes this one its "
                "current key (the old one stays, to verify what it signed)"
            )
        keys = [*existing, public_key]
        with self._lock:
            # Written whole and renamed into place: a collector reading the directory never
            # sees half a key.
            write_file(
                path, "".join(encode_public_key(k) + "\n" for k in keys).encode(), mode=0o644
            )
            self._keys[node] = keys
            self._seen[node] = _stamp(path)
        return path

    def admit(self, node: str, public_key: bytes) -> None:
        """Raise KeyStoreError unless `public_key` speaks for `node` (enrolling it on first
        use in trust-on-first-use mode)."""
        enrolled = self.key(node)
        if enrolled is None and self.trust_on_first_use and len(public_key) == PUBLIC_KEY_BYTES:
            self.enroll(node, public_key)
            return
        if enrolled is None:
            raise KeyStoreError(
                f"node {node} has no enrolled key: enroll it with `gputally enroll`"
            )
        if public_key != enrolled:
            retired = public_key in self.keys(node)
            raise KeyStoreError(
                f"node {node} presented a key that was retired by a rotation"
                if retired
                else f"node {node} presented a key that is not the one enrolled for it"
            )
