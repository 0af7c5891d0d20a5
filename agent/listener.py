"""The API's listening socket: who may connect, for how long, and TLS.

The API listens on the node's address, which every pod can reach: what a client that is not the
operator can do, before it is refused, is bounded here (the HTTP layer, :mod:`.server`, decides
who may do what). aiohttp's own server offers none of these bounds, so :class:`Listener` makes
the listening socket itself and gives each accepted connection a :class:`_Connection`, which

* counts it from the moment it is accepted: past ``max_connections`` in all, or
  ``max_connections_per_peer`` from one address, the connection is reset at once;
* does the TLS handshake itself (``loop.start_tls``, with the context in force when the
  client connects: :class:`~.tls.ServerTLS` swaps it on reload), within ``handshake_timeout``;
* gives the first request's headers ``header_timeout`` from the handshake, and each later one
  ``header_timeout`` from its first byte (an idle keep-alive connection is aiohttp's
  ``keepalive_timeout``); the body has ``body_timeout`` (``PUT /v1/pods`` reads it within it,
  else 408);
* then hands the connection to aiohttp's request handler, which parses HTTP with its own
  limits on lines, headers and the body's size (``max_body_bytes``).

:class:`LocalSocket` is the other way in: a unix socket inside the agent's pod for the local,
read-only API (``meshaccel-agent status|pods``), made mode 0600 before it listens.

The header deadline needs to know when a request's headers are in: the server's middleware calls
:meth:`Listener.request_started` and :meth:`Listener.request_finished`. A refused or timed-out
connection is counted (:attr:`Listener.counts`), never answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from meshaccel.agent.tls import ServerTLS

log = logging.getLogger(__name__)

# A thousand pods are ~75 KB; a pod with every option list full is ~15 KB.
DEFAULT_MAX_BODY_BYTES: Final = 16 * 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one client, or all of them, may hold of the agent's API."""

    max_connections: int = 128
    # Each operator replica holds one or two (a push and a probe, kept alive), kubelet one per
    # probe, Prometheus one.
    max_connections_per_peer: int = 16
    handshake_timeout: float = 5.0
    header_timeout: float = 5.0
    body_timeout: float = 10.0
    # Above the operator's 60 s, so that the client, not the server, ends an idle connection.
    keepalive_timeout: float = 75.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_connections_per_peer < 1:
            raise ValueError("the connection limits must be at least 1")
        if min(self.handshake_timeout, self.header_timeout, self.body_timeout) <= 0:
            raise ValueError("the timeouts must be positive")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes={self.max_body_bytes} cannot hold even a small set")


ProtocolFactory = Callable[[], asyncio.Protocol]


class Listener:
    """The API's socket. ``tls=None``: plain HTTP (a demo on loopback only, ``main`` checks)."""

    def __init__(self, limits: Limits, tls: ServerTLS | None) -> None:
        self.limits = limits
        self.tls = tls
        self.active = 0
        self.by_peer: Counter[str] = Counter()
        # refused (a limit), handshake_failed, header_timeout: connections ended here.
        self.counts: Counter[str] = Counter()
        self._connections: dict[asyncio.BaseTransport, _Connection] = {}
        self._server: asyncio.Server | None = None
        self._full = False

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("not listening")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self, handler: ProtocolFactory, host: str, port: int) -> None:
        """Listen on ``host:port``; every connection ends up with a ``handler()`` protocol
        (aiohttp's ``runner.server``)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self, handler), host, port, reuse_address=True
        )

    async def stop(self) -> None:
        """Stop accepting; open connections are aiohttp's to end (``runner.cleanup()``)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    # -- what the server's middleware tells ---------------------------------------------------

    def request_started(self, transport: asyncio.BaseTransport | None) -> None:
        """A request's headers are in: its connection's header deadline is off."""
        connection = self._connections.get(transport) if transport is not None else None
        if connection is not None:
            connection.busy(True)

    def request_finished(self, transport: asyncio.BaseTransport | None) -> None:
        connection = self._connections.get(transport) if transport is not None else None
        if connection is not None:
            connection.busy(False)

    # -- the connections' bookkeeping -----------------------------------------------------------

    def _admit(self, peer: str) -> bool:
        limits = self.limits
        if self.active >= limits.max_connections or (
            self.by_peer[peer] >= limits.max_connections_per_peer
        ):
            self.counts["refused"] += 1
            if not self._full:
                self._full = True
                log.warning(
                    "connection refused: too many connections",
                    extra={
                        "event": "connection_refused",
                        "peer": peer,
                        "active": self.active,
                        "from_peer": self.by_peer[peer],
                    },
                )
            return False
        self.active += 1
        self.by_peer[peer] += 1
        return True

    def _release(self, peer: str) -> None:
        self.active -= 1
        self.by_peer[peer] -= 1
        if self.by_peer[peer] <= 0:
            del self.by_peer[peer]
        if self._full and self.active < self.limits.max_connections // 2:
            self._full = False  # warn again the next time a limit is reached


class _Connection(asyncio.Protocol):
    """One accepted connection: counted, TLS done here, then aiohttp's protocol behind it."""

    def __init__(self, listener: Listener, handler: ProtocolFactory) -> None:
        self._listener = listener
        self._make_handler = handler
        self._handler: asyncio.Protocol | None = None
        self._raw: asyncio.Transport | None = None
        self._transport: asyncio.Transport | None = None
        self._peer = "?"
        self._counted = False
        self._busy = False
        self._deadline: asyncio.TimerHandle | None = None
        self._handshake: asyncio.Task[None] | None = None
        # What TLS decrypted between the handshake's end and start_tls returning (a client
        # sends its request with its last handshake message): passed on at the handover.
        self._early: list[bytes] = []
        self._early_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._raw = transport
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if peer else "?"
        if not self._listener._admit(self._peer):
            transport.abort()
            return
        self._counted = True
        tls = self._listener.tls
        if tls is None:
            self._start(transport)
            return
        # Nothing is read before start_tls takes the socket over (a ClientHello read here
        # would be lost to the handshake).
        transport.pause_reading()
        self._handshake = asyncio.get_running_loop().create_task(
            self._start_tls(transport, tls.context), name="meshaccel-api-tls"
        )

    async def _start_tls(self, raw: asyncio.Transport, context: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                raw,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=self._listener.limits.handshake_timeout,
            )
        except (OSError, TimeoutError, ConnectionError) as err:  # ssl.SSLError is an OSError
            self._listener.counts["handshake_failed"] += 1
            log.debug(
                "TLS handshake failed",
                extra={"event": "tls_handshake_failed", "peer": self._peer, "error": str(err)},
            )
            raw.abort()
            return
        if transport is None or transport.is_closing():
            return
        self._start(transport)

    def _start(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._listener._connections[transport] = self
        self._handler = handler = self._make_handler()
        handler.connection_made(transport)
        self._arm()  # the first request's headers
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)
        if self._early_eof and not handler.eof_received():
            transport.close()

    # -- the header deadline --------------------------------------------------------------------

    def busy(self, busy: bool) -> None:
        self._busy = busy
        if busy:
            self._disarm()

    def _arm(self) -> None:
        if self._deadline is None and not self._busy:
            self._deadline = asyncio.get_running_loop().call_later(
                self._listener.limits.header_timeout, self._expired
            )

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        self._listener.counts["header_timeout"] += 1
        log.debug(
            "connection closed: no complete request headers in time",
            extra={"event": "header_timeout", "peer": self._peer},
        )
        if self._transport is not None:
            self._transport.abort()

    # -- asyncio.Protocol, passed on --------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._handler is None:
            self._early.append(data)
            return
        if not self._busy:
            self._arm()  # a request starts: its headers are due
        self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        if self._handler is None:
            self._early_eof = True  # (under TLS, which closes the connection on EOF anyway)
            return None
        return self._handler.eof_received()

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._counted:
            self._counted = False
            self._listener._release(self._peer)
        if self._transport is not None:
            self._listener._connections.pop(self._transport, None)
        if self._handler is not None:
            handler, self._handler = self._handler, None
            handler.connection_lost(exc)


@dataclass
class LocalSocket:
    """The unix socket of the local, read-only API: bound and made mode 0600 before anything
    can connect (it listens only once served). :meth:`unlink` while it still listens (nothing
    else can have bound the path meanwhile: :meth:`bind` refuses a live socket), then
    :meth:`close`."""

    path: Path
    sock: socket.socket
    made_dirs: list[Path] = field(default_factory=list)

    @classmethod
    def bind(cls, path: Path) -> LocalSocket:
        """Bind ``path``, making its missing directories (0700). A socket left there by an
        agent that is gone is replaced; a live one, or anything else, is an OSError."""
        made = []
        for directory in reversed([path.parent, *path.parent.parents]):
            if not directory.is_dir():
                directory.mkdir(mode=0o700)
                made.append(directory)
        if path.is_symlink() or path.exists():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
            if _answers(path):
                raise OSError(errno.EADDRINUSE, f"another process serves {path}")
            path.unlink()  # an earlier agent's, in the same pod
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            os.chmod(path, 0o600)
        except OSError:
            sock.close()
            raise
        return cls(path, sock, made)

    def unlink(self) -> None:
        """Remove the socket's path: new clients find nothing; accepted ones carry on."""
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()

    def close(self) -> None:
        """Close the socket, and remove the directories :meth:`bind` made if they are empty."""
        self.sock.close()
        for directory in reversed(self.made_dirs):
            with contextlib.suppress(OSError):
                directory.rmdir()


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
