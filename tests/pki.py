"""Certificates for tests, made by the operator's own code (:mod:`meshaccel.operator.credentials`).

A :class:`PKI` is a CA with an agent server certificate and an operator client certificate, as
the operator issues them; :meth:`PKI.issue_client` makes others (another identity, the server's
certificate used as a client's). The files an agent reads are written where a test says, in the
layout kubelet gives a mounted Secret when asked (``..data`` symlink swapped on update).
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from meshaccel.contract.tls import AGENT_SERVER_NAME, TLSFiles, client_context
from meshaccel.operator.credentials import (
    TLS_CA,
    TLS_CERT,
    TLS_KEY,
    AgentTLS,
    Authority,
    Issued,
    issue_client,
    issue_server,
    new_authority,
    utc_now,
)


@dataclass(frozen=True)
class PKI:
    ca: Authority
    server: Issued
    client: Issued
    now: dt.datetime = field(default_factory=utc_now)

    def agent_tls(self, bundle: str | None = None) -> AgentTLS:
        """The agents' Secret: this server certificate, and ``bundle`` (default: this CA)."""
        return AgentTLS(self.server.cert_pem, self.server.key_pem, bundle or self.ca.pem)

    def issue_client(self, identity: str | None = None) -> Issued:
        if identity is None:
            return issue_client(self.ca, self.now)
        return issue_client(self.ca, self.now, identity=identity)

    def client_context(
        self,
        issued: Issued | None = None,
        *,
        trusted: str | None = None,
        check_hostname: bool = True,
    ) -> ssl.SSLContext:
        """The operator's context (or one with ``issued``). ``check_hostname=False`` for a client
        that cannot name the server (aiohttp's test client): the chain is still verified."""
        issued = issued or self.client
        context = client_context(issued.cert_pem, issued.key_pem, trusted or self.ca.pem)
        context.check_hostname = check_hostname
        return context

    def anonymous_context(self) -> ssl.SSLContext:
        """A client that verifies the agent but has no certificate (kubelet, a pod)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cadata=self.ca.pem)
        context.check_hostname = False
        return context

    def write_agent_files(self, directory: Path, tls: AgentTLS | None = None) -> TLSFiles:
        """The agent's Secret volume in ``directory``, as kubelet writes it (again: an update)."""
        return write_secret_volume(directory, tls or self.agent_tls())


def make_pki(now: dt.datetime | None = None) -> PKI:
    now = now or utc_now()
    ca = new_authority(now)
    return PKI(ca, issue_server(ca, now), issue_client(ca, now), now)


_volumes = iter(range(1_000_000))


def write_secret_volume(directory: Path, tls: AgentTLS) -> TLSFiles:
    """kubelet's atomic writer: the files in a fresh ``..<n>`` directory, ``..data`` pointing at
    it (swapped by a rename), and each file a symlink through ``..data``."""
    directory.mkdir(parents=True, exist_ok=True)
    version = directory / f"..{next(_volumes)}"
    version.mkdir()
    for key, value in ((TLS_CERT, tls.cert_pem), (TLS_KEY, tls.key_pem), (TLS_CA, tls.bundle_pem)):
        (version / key).write_text(value)
    temporary = directory / "..data_tmp"
    temporary.symlink_to(version.name)
    os.replace(temporary, directory / "..data")
    for key in (TLS_CERT, TLS_KEY, TLS_CA):
        link = directory / key
        if not link.is_symlink():
            link.symlink_to(f"..data/{key}")
    return TLSFiles(directory / TLS_CERT, directory / TLS_KEY, directory / TLS_CA)


__all__ = ["AGENT_SERVER_NAME", "PKI", "make_pki", "write_secret_volume"]
