"""Fake node agents for the operator's tests: real aiohttp servers speaking the agent's contract.

A :class:`FakeAgent` serves TLS with the agents' Secret (:class:`AgentTLS`: server certificate,
key, and the CA bundle client certificates must chain to, with the agent's own TLS profile,
:mod:`meshaccel.contract.tls`), lets only the operator's identity past the open paths (403, as the
agent), validates bodies with the agent's own models (:mod:`meshaccel.contract.api`),
applies the reconciler's epoch and generation rules (a lower epoch → 409 with
``applied_epoch`` only; a higher one is taken with any generation; within the epoch, a lower
generation → 409 with ``applied_generation``; the same generation with the same set → no-op;
with another set → 409), and answers ``PUT /v1/pods`` (ApplyResult with ``boot_id``), ``GET
/v1/pods``, ``GET /v1/health`` (the applied set's epoch and generation, the CA bundle's
fingerprint), ``GET /healthz``, ``POST /v1/uninstall`` (then refusing sets with a 409 that has
no ``applied_generation``, as the agent does). ``tls=None`` plays a plain-HTTP server (what an
agent before TLS was). ``epochs=False`` plays an agent that predates epochs: a set naming one
is a 422 on the field ``epoch``, as its strict model answers; ``ipv6=False`` one that predates
IPv6: a set with an IPv6 address or range, or a pod's ``ips``, is a 422 naming each, as its
IPv4-only models answer. It programs nothing: it records
every accepted set in :attr:`FakeAgent.accepted`, and every request in
:attr:`FakeAgent.requests`.

Controls: :meth:`~FakeAgent.use_tls` (the Secret kubelet would mount now),
:meth:`~FakeAgent.fail_next` (N requests to a path answer a status),
:meth:`~FakeAgent.stop_listening` / :meth:`~FakeAgent.start_listening` (connections refused;
open keep-alive connections are cut too), :meth:`~FakeAgent.restart` (a fresh process: new boot
id, no generation, no pods), :attr:`~FakeAgent.delay` (seconds before each reply),
:meth:`~FakeAgent.preset` (what a previous operator, or another writer, left applied),
``max_pods`` (a 422 above),
:attr:`~FakeAgent.on_accept` (called on the event loop with every set taken, as it is taken),
:meth:`~FakeAgent.cannot_find` / :meth:`~FakeAgent.finds` (pods its replies list as
unresolved, or no longer), ``version`` (what its replies say it is; None: an agent that
predates the field; by default this tree's version), sent as the agent sends it: to a client
that sends its own in the ``Meshaccel-Version`` header.

:class:`FakeAgentFleet` serves many agents from one aiohttp application: one listening socket
per agent on its own loopback address (127.1.x.y; all of 127/8 is loopback on Linux), and the
handlers tell the agents apart by the connection's local address. Use it for hundreds of nodes.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from types import TracebackType
from typing import Self

from aiohttp import web
from pydantic import BaseModel, ValidationError

from meshaccel.contract.api import (
    VERSION_HEADER,
    AppliedPod,
    ApplyResult,
    ErrorReply,
    HealthReply,
    PodSet,
    PodSpec,
    PodsReply,
    ProbeReply,
    UninstallReply,
    UnresolvedPod,
)
from meshaccel.contract.tls import bundle_fingerprint, is_operator, server_context_pem
from meshaccel.contract.version import VERSION
from meshaccel.operator.credentials import AgentTLS

#: Two nodes' fake agents, each on an address of its own (the emulator's cluster's nodes).
NODES = {"node-1": "127.0.0.2", "node-2": "127.0.0.3"}


def common_free_port() -> int:
    """A port free on every node's address in NODES (an agent DaemonSet has one port for all
    nodes)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((NODES["node-1"], 0))
            port = int(probe.getsockname()[1])
        with socket.socket() as other:
            try:
                other.bind((NODES["node-2"], port))
            except OSError:
                continue
        return port
    raise RuntimeError("no common free port")


Handler = Callable[["FakeAgent", web.Request], Awaitable[web.StreamResponse]]
FLEET_NETWORK = IPv4Address("127.1.0.1")  # the fleet's first agent address
_EXTRA = "Extra inputs are not permitted"  # pydantic's message for an unknown field
_NOT_V4 = "Input is not a valid IPv4 address"  # ... for an IPv6 address where IPv4 is due
_NOT_V4_NET = "Input is not a valid IPv4 network"


@dataclass(frozen=True)
class Accepted:
    """A set the fake agent took (a no-op repeat included), and when (time.monotonic())."""

    pod_set: PodSet
    at: float
    noop: bool


@dataclass(frozen=True)
class Request:
    """A request the fake agent answered: its status, when (time.monotonic()), and the serial
    number of the client certificate it came with (None: none, or plain HTTP)."""

    method: str
    path: str
    status: int
    at: float
    client: str | None = None
    body: bytes = b""  # as it came (aiohttp keeps what a handler read)


def _ipv6_errors(pod_set: PodSet) -> list[dict[str, object]]:
    """What the models of an agent that predates IPv6 say of a set: IPv4 addresses and ranges
    only, and no ``ips`` field (pydantic's error types and locations, as its detail lists them)."""
    errors: list[dict[str, object]] = []
    for index, pod in enumerate(pod_set.pods):
        if pod.ip.version == 6:
            errors.append({"type": "ip_v4_address", "loc": ["pods", index, "ip"], "msg": _NOT_V4})
        options = pod.options
        for field, cidrs in (
            ("excluded_outbound_cidrs", options.excluded_outbound_cidrs),
            ("included_outbound_cidrs", options.included_outbound_cidrs or ()),
        ):
            for position, cidr in enumerate(cidrs):
                if cidr.version == 6:
                    loc = ["pods", index, "options", field, position]
                    errors.append({"type": "ip_v4_network", "loc": loc, "msg": _NOT_V4_NET})
        if pod.ips:
            errors.append({"type": "extra_forbidden", "loc": ["pods", index, "ips"], "msg": _EXTRA})
    return errors


def _json(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(
        text=model.model_dump_json(), status=status, content_type="application/json"
    )


def _error(
    status: int,
    message: str,
    applied_generation: int | None = None,
    *,
    applied_epoch: int = 0,
    detail: list[dict[str, object]] | None = None,
) -> web.Response:
    reply = ErrorReply(
        error=message,
        detail=detail,
        applied_generation=applied_generation,
        applied_epoch=applied_epoch,
    )
    return _json(reply, status)


class FakeAgent:
    """One fake agent: its state, its controls, and (alone or in a fleet) its listening socket."""

    def __init__(
        self,
        *,
        tls: AgentTLS | None,
        host: str = "127.0.0.1",
        port: int = 0,
        name: str = "node",
        max_pods: int = 1024,
        standalone: bool = False,
        epochs: bool = True,
        ipv6: bool = True,
        version: str | None = VERSION,
        server: _Server | None = None,
    ) -> None:
        self.name = name
        self.epochs = epochs
        self.ipv6 = ipv6
        self.version = version  # in its replies (None: an agent that predates the field)
        # namespace/name -> why: pods of its sets it reports unresolved (see cannot_find).
        self.unresolvable: dict[str, str] = {}
        self.host = host
        self.port = port
        self.max_pods = max_pods
        self.standalone = standalone
        self.delay = 0.0
        self._context: ssl.SSLContext | None = None
        self.trust_bundle: str | None = None
        self._take_tls(tls)
        self._server = server
        self._own_server = server is None
        self._site: web.BaseSite | None = None
        self._failures: dict[str, list[int]] = {}
        self.requests: list[Request] = []
        self.accepted: list[Accepted] = []
        # Called with each Accepted as it is recorded (the benchmark times changes by it).
        self.on_accept: Callable[[FakeAgent, Accepted], None] | None = None
        self.uninstalls = 0
        self._new_process()

    def _new_process(self) -> None:
        self.boot_id = str(uuid.uuid4())
        self.applied_generation: int | None = None
        self.applied_epoch = 0
        self.pods: dict[str, PodSpec] = {}
        self.uninstalled = False

    # -- life --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self._context else 'http'}://{self.host}:{self.port}"

    @property
    def listening(self) -> bool:
        return self._site is not None

    async def start(self) -> None:
        if self._server is None:
            self._server = _Server()
        await self._server.setup()
        await self.start_listening()

    async def start_listening(self) -> None:
        """Listen (again: on the same port once it was chosen)."""
        assert self._server is not None, "start() first"
        if self._site is not None:
            return
        # Our own socket, so that a port 0 is known before the site starts (and kept after).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        site = web.SockSite(self._server.runner, sock, ssl_context=self._context)
        await site.start()
        self._site = site
        self._server.agents[(self.host, self.port)] = self

    async def stop_listening(self) -> None:
        """Refuse new connections, and cut the open ones (clients keep them alive)."""
        if self._site is None:
            return
        site, self._site = self._site, None
        await site.stop()
        server = self._server.runner.server if self._server is not None else None
        for connection in list(server.connections if server is not None else []):
            sockname = connection.sockname
            if sockname is not None and tuple(sockname[:2]) == (self.host, self.port):
                connection.force_close()
                if connection.transport is not None:
                    connection.transport.close()

    async def restart(self) -> None:
        """A fresh agent process: new boot id, nothing applied. For downtime in between, call
        :meth:`stop_listening` before and :meth:`start_listening` when the test is ready."""
        self._new_process()

    async def close(self) -> None:
        await self.stop_listening()
        if self._own_server and self._server is not None:
            await self._server.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- controls ----------------------------------------------------------------------------

    async def use_tls(self, tls: AgentTLS | None) -> None:
        """Take the TLS material the operator made (its Secret), as the agent does when kubelet
        updates the mounted files: new connections use it (open ones are cut here)."""
        self._take_tls(tls)
        if self._site is not None:
            await self.stop_listening()
            await self.start_listening()

    def _take_tls(self, tls: AgentTLS | None) -> None:
        if tls is None:
            self._context = self.trust_bundle = None
            return
        self._context = server_context_pem(tls.cert_pem, tls.key_pem, tls.bundle_pem)
        self.trust_bundle = bundle_fingerprint(tls.bundle_pem)

    def fail_next(self, count: int, status: int = 503, *, path: str = "/v1/pods") -> None:
        """The next ``count`` requests to ``path`` answer ``status`` (an ErrorReply)."""
        self._failures.setdefault(path, []).extend([status] * count)

    def cannot_find(self, *pods: str, reason: str = "no cgroup found for this pod uid") -> None:
        """Report these pods (``namespace/name``) unresolved in every reply to a set, a repeat
        included, as an agent does while it cannot find their cgroup."""
        self.unresolvable.update(dict.fromkeys(pods, reason))

    def finds(self, *pods: str) -> None:
        """These pods resolve (the agent's own retry found them): no longer reported."""
        for pod in pods:
            self.unresolvable.pop(pod, None)

    def heal(self, path: str = "/v1/pods") -> None:
        """Forget the failures still queued for ``path``."""
        self._failures.pop(path, None)

    def preset(self, generation: int, pods: list[PodSpec] | None = None, *, epoch: int = 0) -> None:
        """What an earlier operator (or another writer) had applied here."""
        self.applied_generation = generation
        self.applied_epoch = epoch
        self.pods = {p.uid: p for p in pods or []}

    def puts(self, status: int | None = None) -> list[Request]:
        return [
            r for r in self.requests if r.method == "PUT" and (status is None or r.status == status)
        ]

    @property
    def last_set(self) -> PodSet | None:
        return self.accepted[-1].pod_set if self.accepted else None

    # -- the contract ------------------------------------------------------------------------

    async def handle(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self._site is None:  # "not listening": a request that slipped in is cut off
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=503)  # never arrives: the connection is gone
        response = await self._answer(request, handler)
        transport = request.transport
        peercert = transport.get_extra_info("peercert") if transport is not None else None
        serial = str(peercert["serialNumber"]) if peercert else None
        body = await request.read() if request.can_read_body or request.body_exists else b""
        self.requests.append(
            Request(request.method, request.path, response.status, time.monotonic(), serial, body)
        )
        return response

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        public = request.path in ("/healthz", "/readyz")
        if not public and self._context is not None:
            transport = request.transport
            peercert = transport.get_extra_info("peercert") if transport is not None else None
            if not is_operator(peercert):
                return _error(403, "this client certificate does not name the operator")
        failures = self._failures.get(request.path)
        if failures:
            status = failures.pop(0)
            return _error(status, f"injected failure {status}")
        return await handler(self, request)

    async def put_pods(self, request: web.Request) -> web.Response:
        if self.standalone:
            return _error(409, "this agent takes its pod set from the pods file, not from the API")
        if self.uninstalled:
            return _error(409, "this agent was uninstalled (POST /v1/uninstall)")
        body = await request.read()
        try:
            pod_set = PodSet.model_validate_json(body)
        except ValidationError as err:
            first = err.errors(include_url=False, include_input=False)[0]
            status = 400 if first["type"] == "json_invalid" else 422
            return _error(status, f"invalid pod set: {first['loc']}: {first['msg']}")
        if not self.epochs and b'"epoch"' in body:
            return _error(
                422,
                "invalid pod set (1 error): epoch: Extra inputs are not permitted",
                detail=[{"type": "extra_forbidden", "loc": ["epoch"], "msg": _EXTRA}],
            )
        if not self.ipv6 and (refused := _ipv6_errors(pod_set)):
            return _error(422, f"invalid pod set ({len(refused)} errors)", detail=refused)
        desired = {p.uid: p for p in pod_set.pods}
        applied = self.applied_generation
        if applied is not None and pod_set.epoch < self.applied_epoch:
            return _error(
                409,
                f"epoch {pod_set.epoch} is older than the applied set's epoch "
                f"{self.applied_epoch}: another operator replica leads",
                applied_epoch=self.applied_epoch,
            )
        if applied is not None and pod_set.epoch > self.applied_epoch:
            applied = None  # a new leader: its generations start afresh
        if applied is not None and pod_set.generation < applied:
            return _error(
                409,
                f"generation {pod_set.generation} is older than the applied generation {applied}",
                applied,
            )
        noop = False
        if applied is not None and pod_set.generation == applied:
            if desired != self.pods:
                return _error(
                    409,
                    f"generation {applied} is already applied with a different pod set",
                    applied,
                )
            noop = True
        if len(desired) > self.max_pods:
            return _error(422, f"the set has {len(desired)} pods; at most {self.max_pods}", applied)
        added = 0 if noop else len(desired.keys() - self.pods.keys())
        removed = 0 if noop else len(self.pods.keys() - desired.keys())
        updated = (
            0
            if noop
            else sum(1 for u in desired.keys() & self.pods.keys() if desired[u] != self.pods[u])
        )
        self.applied_generation, self.pods = pod_set.generation, desired
        self.applied_epoch = pod_set.epoch
        accepted = Accepted(pod_set, time.monotonic(), noop)
        self.accepted.append(accepted)
        if self.on_accept is not None:
            self.on_accept(self, accepted)
        return _json(
            ApplyResult(
                applied_generation=pod_set.generation,
                added=added,
                updated=updated,
                removed=removed,
                unresolved=self._unresolved(),
                duration_ms=0.1,
                boot_id=self.boot_id,
                applied_epoch=pod_set.epoch,
                version=self._version_for(request),
            )
        )

    def _version_for(self, request: web.Request) -> str | None:
        """As the agent: only a client that sends its own version gets the agent's."""
        return self.version if VERSION_HEADER in request.headers else None

    def _unresolved(self) -> list[UnresolvedPod]:
        return [
            UnresolvedPod(uid=p.uid, namespace=p.namespace, name=p.name, reason=reason)
            for p in self.pods.values()
            if (reason := self.unresolvable.get(f"{p.namespace}/{p.name}")) is not None
        ]

    async def get_pods(self, request: web.Request) -> web.Response:
        return _json(
            PodsReply(
                applied_generation=self.applied_generation,
                pods=[
                    AppliedPod(
                        uid=p.uid,
                        namespace=p.namespace,
                        name=p.name,
                        ip=p.ip,
                        ips=p.ips,
                        cgroup_id=1,
                    )
                    for p in self.pods.values()
                    if f"{p.namespace}/{p.name}" not in self.unresolvable
                ],
                unresolved=self._unresolved(),
            )
        )

    async def healthz(self, request: web.Request) -> web.Response:
        return _json(ProbeReply())

    async def health(self, request: web.Request) -> web.Response:
        if not self.epochs:
            return _json(HealthReply(boot_id=self.boot_id))
        return _json(
            HealthReply(
                boot_id=self.boot_id,
                applied_generation=self.applied_generation,
                applied_epoch=self.applied_epoch,
                trust_bundle=self.trust_bundle,
                version=self._version_for(request),
            )
        )

    async def post_uninstall(self, request: web.Request) -> web.Response:
        if self.standalone:
            return _error(409, "this agent takes its pod set from the pods file, not from the API")
        self.uninstalls += 1
        already, self.uninstalled = self.uninstalled, True
        return _json(UninstallReply(already=already, duration_ms=0.1, boot_id=self.boot_id))


_AGENTS: web.AppKey[dict[tuple[str, int], FakeAgent]] = web.AppKey("agents")


def _route(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A route that finds the agent by the address the connection came in on."""

    async def route(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        local = transport.get_extra_info("sockname") if transport is not None else None
        agent = request.app[_AGENTS].get((local[0], local[1])) if local else None
        if agent is None:
            return _error(404, f"no fake agent at {local}")
        return await agent.handle(request, handler)

    return route


class _Server:
    """One aiohttp application and runner; each agent adds its own TCPSite to it."""

    def __init__(self) -> None:
        self.agents: dict[tuple[str, int], FakeAgent] = {}
        app = web.Application()
        app[_AGENTS] = self.agents
        app.router.add_routes(
            [
                web.put("/v1/pods", _route(FakeAgent.put_pods)),
                web.get("/v1/pods", _route(FakeAgent.get_pods)),
                web.get("/healthz", _route(FakeAgent.healthz)),
                web.get("/v1/health", _route(FakeAgent.health)),
                web.post("/v1/uninstall", _route(FakeAgent.post_uninstall)),
            ]
        )
        # shutdown_timeout: cleanup must not wait for the clients' keep-alive connections.
        self.runner = web.AppRunner(app, shutdown_timeout=0.1, handle_signals=False)
        self._set_up = False

    async def setup(self) -> None:
        if not self._set_up:
            await self.runner.setup()
            self._set_up = True

    async def cleanup(self) -> None:
        if self._set_up:
            await self.runner.cleanup()
            self._set_up = False


class FakeAgentFleet:
    """``count`` fake agents in one application, agent ``i`` on ``127.1.x.y`` (see module)."""

    def __init__(
        self, count: int, *, tls: AgentTLS | None, max_pods: int = 1024, port: int = 0
    ) -> None:
        if not 0 < count <= 60000:
            raise ValueError(f"{count} agents do not fit the fleet's addresses")
        self._server = _Server()
        self.agents = [
            FakeAgent(
                tls=tls,
                host=str(FLEET_NETWORK + i),
                port=port,
                name=f"node-{i:04d}",
                max_pods=max_pods,
                server=self._server,
            )
            for i in range(count)
        ]
        self.by_name = {agent.name: agent for agent in self.agents}

    async def start(self) -> None:
        await self._server.setup()
        await asyncio.gather(*(agent.start_listening() for agent in self.agents))

    async def use_tls(self, tls: AgentTLS | None) -> None:
        await asyncio.gather(*(agent.use_tls(tls) for agent in self.agents))

    async def close(self) -> None:
        await asyncio.gather(*(agent.stop_listening() for agent in self.agents))
        await self._server.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __iter__(self) -> Iterator[FakeAgent]:
        return iter(self.agents)

    def __len__(self) -> int:
        return len(self.agents)

    def request_counts(self) -> Counter[tuple[str, str, int]]:
        return Counter((r.method, r.path, r.status) for a in self.agents for r in a.requests)
