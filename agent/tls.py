"""The agent's TLS material (:class:`ServerTLS`), re-read when its files change: kubelet updates
a mounted Secret in place (it swaps the ``..data`` symlink); new connections get the new context
while open ones keep theirs. The profile and names are ``meshaccel.contract.tls``."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass

from meshaccel.contract.tls import TLSError, TLSFiles, bundle_fingerprint, server_context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Material:
    context: ssl.SSLContext
    trust_bundle: str
    stamp: tuple[tuple[int, int, int, int], ...]


def _load(files: TLSFiles) -> _Material:
    try:
        before = files.stamp()
        client_cas = files.client_ca.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise TLSError(f"cannot read the TLS files: {err}") from None
    context = server_context(files.cert, files.key, client_cas)
    fingerprint = bundle_fingerprint(client_cas)
    try:
        after = files.stamp()
    except OSError as err:
        raise TLSError(f"cannot read the TLS files: {err}") from None
    if after != before:  # read in the middle of an update: some files old, some new
        raise TLSError("the TLS files changed while they were read")
    return _Material(context, fingerprint, after)


class ServerTLS:
    """The agent's TLS context, from :class:`TLSFiles`, and what changes it.

    :meth:`reload_if_changed` (called every few seconds by the server) compares the files'
    inode, mtime and size with what was read; when they differ it reads them again and, if
    they make a good context, new connections use it. Material that fails to load (a key that
    does not match, a file half written) is logged once and the previous context stays.
    """

    def __init__(self, files: TLSFiles) -> None:
        self.files = files
        self._material = _load(files)  # TLSError: the caller cannot start
        self._failed: object = None  # what last failed (a stamp, or the error): warned once
        self.reloads = 0

    @property
    def context(self) -> ssl.SSLContext:
        """The context for the next connection."""
        return self._material.context

    @property
    def trust_bundle(self) -> str:
        """:func:`bundle_fingerprint` of the client CA bundle in force."""
        return self._material.trust_bundle

    def reload_if_changed(self) -> bool:
        """Read the files again if they changed; True if a new context is in force."""
        try:
            stamp = self.files.stamp()
        except OSError as err:
            self._warn_once(str(err), f"cannot read the TLS files: {err}")
            return False
        if stamp == self._material.stamp or stamp == self._failed:
            return False
        try:
            material = _load(self.files)
        except TLSError as err:
            self._warn_once(stamp, str(err))
            return False
        previous, self._material, self._failed = self._material, material, None
        self.reloads += 1
        log.info(
            "TLS material reloaded: new connections use it",
            extra={
                "event": "tls_reloaded",
                "trust_bundle": material.trust_bundle,
                "trust_bundle_changed": material.trust_bundle != previous.trust_bundle,
            },
        )
        return True

    def _warn_once(self, what: object, why: str) -> None:
        if what == self._failed:
            return
        self._failed = what
        log.warning(
            "TLS material not reloaded: keeping the previous one",
            extra={"event": "tls_reload_failed", "reason": why},
        )
