"""The operator<->agent mutual TLS: the names both ends agree on and the TLS profile of each end.

The agent serves TLS 1.3 under the fixed name :data:`AGENT_SERVER_NAME`, asks every client for a
certificate and lets ``/v1`` through only to the operator's identity (:data:`OPERATOR_IDENTITY`);
no session tickets, so every connection is verified against the bundle in force. The agent's
reloading of its files is ``meshaccel.agent.tls``; the operator's issuing is
``meshaccel.operator.credentials``; docs/security.md tells the whole story. Standard library only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

log = logging.getLogger(__name__)

#: The DNS name in every agent's server certificate; the operator verifies it (SNI too).
AGENT_SERVER_NAME: Final = "agent.meshaccel.internal"
#: The URI SAN of the operator's client certificates: what the agent requires under /v1.
OPERATOR_IDENTITY: Final = "urn:meshaccel:operator"
MINIMUM_VERSION: Final = ssl.TLSVersion.TLSv1_3

_PEM_CERTIFICATE = re.compile(
    r"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


class TLSError(Exception):
    """The TLS material cannot be used: ``str()`` says why, ``file`` which file is at fault
    (``cert``: the certificate or its key, ``client_ca``: the bundle; None: not known)."""

    def __init__(self, message: str, file: str | None = None) -> None:
        super().__init__(message)
        self.file = file


# -- names and fingerprints ----------------------------------------------------------------------


def certificates(pem: str) -> list[str]:
    """The PEM blocks of the certificates in ``pem`` (other text is ignored)."""
    return _PEM_CERTIFICATE.findall(pem)


def bundle_fingerprint(pem: str) -> str:
    """``sha256:<hex>`` over the sorted DER encodings of the certificates in ``pem``: the same
    for the same set of CAs, whatever their order, comments or line breaks. The agent reports
    it for the bundle it uses; the operator compares it with the bundle it wrote."""
    try:
        ders = sorted(ssl.PEM_cert_to_DER_cert(block) for block in certificates(pem))
    except ValueError as err:
        raise TLSError(f"not a PEM certificate: {err}", "client_ca") from None
    digest = hashlib.sha256()
    for der in ders:
        digest.update(hashlib.sha256(der).digest())
    return f"sha256:{digest.hexdigest()}"


def is_operator(peercert: Mapping[str, Any] | None) -> bool:
    """The verified client certificate (``getpeercert()``) names the operator."""
    if not peercert:
        return False
    return ("URI", OPERATOR_IDENTITY) in peercert.get("subjectAltName", ())


# -- the profile of each end ---------------------------------------------------------------------


def _common(context: ssl.SSLContext, trusted: str, what: str) -> None:
    context.minimum_version = MINIMUM_VERSION
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    if not certificates(trusted):
        raise TLSError(f"{what}: no PEM certificate in it", "client_ca")
    try:
        context.load_verify_locations(cadata=trusted)
    except ssl.SSLError as err:
        raise TLSError(f"{what}: {err.reason or err}", "client_ca") from None


def _server(client_cas: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _common(context, client_cas, "the client CA bundle")
    context.verify_mode = ssl.CERT_OPTIONAL
    context.options |= ssl.OP_NO_TICKET
    context.num_tickets = 0  # TLS 1.3: no tickets, no resumption without verification
    return context


def server_context(cert_file: Path, key_file: Path, client_cas: str) -> ssl.SSLContext:
    """The agent's context: its certificate and key (files, as mounted), TLS 1.3, client
    certificates asked for and verified against ``client_cas`` (PEM) but not required."""
    context = _server(client_cas)
    try:
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as err:
        raise TLSError(f"certificate and key: {_reason(err)}", "cert") from None
    return context


def server_context_pem(cert_pem: str, key_pem: str, client_cas: str) -> ssl.SSLContext:
    """:func:`server_context` from PEM text (the tests' fake agents)."""
    context = _server(client_cas)
    load_cert_chain_pem(context, cert_pem, key_pem)
    return context


def client_context(cert_pem: str, key_pem: str, trusted_cas: str) -> ssl.SSLContext:
    """The operator's context: its certificate and key (PEM, never written to a file system),
    TLS 1.3, the server verified against ``trusted_cas`` (PEM) and by name (the caller gives
    ``server_hostname=AGENT_SERVER_NAME``)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    _common(context, trusted_cas, "the trusted CAs")
    load_cert_chain_pem(context, cert_pem, key_pem)
    return context


def load_cert_chain_pem(context: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    """``load_cert_chain`` from memory: ssl reads only files, so the PEM goes through an
    anonymous memory file (memfd) that no directory lists and that is gone once closed."""
    fd = os.memfd_create("meshaccel-tls", os.MFD_CLOEXEC)
    try:
        data = memoryview((cert_pem.rstrip("\n") + "\n" + key_pem).encode())
        while data:
            data = data[os.write(fd, data) :]
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    except ssl.SSLError as err:
        raise TLSError(f"certificate and key: {_reason(err)}", "cert") from None
    finally:
        os.close(fd)


def _reason(err: OSError) -> str:
    if isinstance(err, ssl.SSLError):
        return str(err.reason or err)
    return err.strerror or str(err)


# -- the agent's material, reloaded --------------------------------------------------------------


@dataclass(frozen=True)
class TLSFiles:
    """The agent's three files: its certificate, its key, the CA bundle clients chain to."""

    cert: Path
    key: Path
    client_ca: Path

    def stamp(self) -> tuple[tuple[int, int, int, int], ...]:
        """What changes when any file does (followed through kubelet's symlinks)."""
        found = []
        for path in (self.cert, self.key, self.client_ca):
            st = os.stat(path)
            found.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(found)
