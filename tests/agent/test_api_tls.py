"""The agent's API as it listens (agent/listener.py, agent/tls.py): mutual TLS with real
certificates, the TLS files reloaded without a restart, the limits on what a client may hold.

The app is the real one (``create_app``), served by ``serving`` as ``meshaccel-agent run``
serves it, over a stand-in for the reconciler where the kernel is not the point; the last test
pushes to it from the operator's pusher over a real datapath. Timeouts are made short and
each test waits for what they cause (a closed connection, a counter, a 408), never for time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest

from meshaccel.agent.datapath import Datapath, PinLayout
from meshaccel.agent.listener import Limits, Listener
from meshaccel.agent.reconcile import Reconciler, Snapshot
from meshaccel.agent.server import create_app, serving
from meshaccel.agent.tls import ServerTLS
from meshaccel.contract.api import HealthReply
from meshaccel.contract.tls import AGENT_SERVER_NAME, bundle_fingerprint
from meshaccel.contract.version import VERSION
from meshaccel.operator.credentials import AgentTLS, issue_server, new_authority
from meshaccel.operator.pusher import Pusher
from tests.agent.conftest import FakeResolver, expected_pods, pod_spec
from tests.pki import PKI, make_pki, write_secret_volume
from tests.waiting import wait_for

OLD = make_pki()  # the CA in force
NEW = make_pki()  # the CA a rotation brings in
STRANGER = make_pki()  # another installation's
AGENT_TLS = OLD.agent_tls()  # the agents' Secret


@dataclass
class _Datapath:
    """What /readyz asks of the datapath: its pins, none of which exists here."""

    pins: PinLayout

    def missing_attachments(self) -> list[str]:
        return [str(path) for path in self.pins.attachments()]


@dataclass
class StandInReconciler:
    """What the app reads of a reconciler for these requests (nothing is applied here)."""

    datapath: _Datapath
    boot_id: str = "boot-1"
    snapshot: Snapshot = field(init=False)

    def __post_init__(self) -> None:
        self.snapshot = Snapshot(
            boot_id=self.boot_id,
            started_at=dt.datetime.now(dt.UTC),
            applied_generation=None,
            applied_epoch=0,
            last_apply_time=None,
            entries={},
            unresolved=(),
            programmed=0,
            map_entries={},
            map_capacity={},
            apply_errors={},
            pods_vanished=0,
        )


@dataclass
class Agent:
    listener: Listener
    tls: ServerTLS | None
    directory: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.listener.port}"


Serve = Callable[..., Awaitable[Agent]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    """serve(limits=..., tls=AgentTLS | None, reconciler=..., **create_app options) -> the
    agent's app listening on 127.0.0.1 (TLS from files, as kubelet mounts them)."""
    async with AsyncExitStack() as stack:

        async def start(
            *,
            tls: AgentTLS | None = AGENT_TLS,
            reconciler: Any = None,
            **options: Any,
        ) -> Agent:
            directory = tmp_path / "tls"
            server_tls = None if tls is None else ServerTLS(write_secret_volume(directory, tls))
            target = reconciler or StandInReconciler(_Datapath(PinLayout(tmp_path / "pins")))
            options.setdefault("retry_interval", None)
            options.setdefault("tls_reload_interval", None)
            app = create_app(cast(Reconciler, target), tls=server_tls, **options)
            listener = await stack.enter_async_context(
                serving(app, "127.0.0.1", 0, shutdown_timeout=0.1)
            )
            return Agent(listener, server_tls, directory)

        yield start


async def call(
    agent: Agent,
    path: str,
    context: ssl.SSLContext | None,
    *,
    method: str = "GET",
    scheme: str = "https",
) -> tuple[int, Any]:
    """(status, JSON body) of one request on a fresh connection."""
    url = f"{scheme}://127.0.0.1:{agent.listener.port}{path}"
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
        session.request(
            method,
            url,
            ssl=context if context is not None else False,
            server_hostname=AGENT_SERVER_NAME if scheme == "https" else None,
        ) as response,
    ):
        return response.status, await response.json()


async def refused(agent: Agent, path: str, context: ssl.SSLContext) -> bool:
    """The connection ends before any HTTP reply."""
    try:
        await call(agent, path, context)
    except (aiohttp.ClientError, ConnectionError, ssl.SSLError):
        return True
    return False


def operator(pki: PKI = OLD) -> ssl.SSLContext:
    return pki.client_context()


# -- who may do what ----------------------------------------------------------------------------


async def test_plain_http_is_refused(serve: Serve) -> None:
    agent = await serve()
    with pytest.raises(aiohttp.ClientError):
        await call(agent, "/healthz", None, scheme="http")
    # (aiohttp tries an idempotent request once more on a new connection)
    await wait_for(lambda: agent.listener.counts["handshake_failed"] >= 1, what="the refusal")


async def test_the_open_paths_say_ok_or_not_and_nothing_else(serve: Serve) -> None:
    agent = await serve()
    anonymous = OLD.anonymous_context()
    anonymous.check_hostname = True
    assert await call(agent, "/healthz", anonymous) == (200, {"status": "ok", "version": VERSION})
    assert await call(agent, "/readyz", anonymous) == (
        503,
        {"error": "not ready", "detail": None, "applied_generation": None},
    )


@pytest.mark.parametrize(
    ("client", "outcome", "reason"),
    [
        (lambda: OLD.anonymous_context(), 403, "no client certificate"),
        (
            lambda: OLD.client_context(OLD.issue_client("urn:meshaccel:someone-else")),
            403,
            "a certificate of the CA that does not name the operator",
        ),
        (
            lambda: OLD.client_context(OLD.server),
            "refused",
            "the agents' server certificate used as a client's (serverAuth only)",
        ),
        (
            lambda: STRANGER.client_context(trusted=OLD.ca.pem),
            "refused",
            "the operator's identity from another CA",
        ),
        (lambda: operator(), 200, "the operator"),
    ],
)
async def test_v1_is_the_operators_only(
    serve: Serve, client: Callable[[], ssl.SSLContext], outcome: int | str, reason: str
) -> None:
    agent = await serve()
    if outcome == "refused":
        assert await refused(agent, "/v1/health", client()), reason
        return
    status, body = await call(agent, "/v1/health", client())
    assert status == outcome, (reason, body)
    if status == 200:
        health = HealthReply.model_validate(body)
        assert health.boot_id == "boot-1"
        assert health.trust_bundle == bundle_fingerprint(OLD.ca.pem)


async def test_the_operator_refuses_an_agent_of_another_ca(serve: Serve) -> None:
    agent = await serve(tls=STRANGER.agent_tls(OLD.ca.pem))
    assert await refused(agent, "/v1/health", operator())


# -- rotation: the files change, the agent does not restart ----------------------------------------


async def test_a_ca_rotation_reloads_the_files_and_accepts_old_and_new_meanwhile(
    serve: Serve,
) -> None:
    agent = await serve(tls_reload_interval=0.01)
    tls = agent.tls
    assert tls is not None
    old_client, new_client = operator(OLD), NEW.client_context(trusted=OLD.ca.pem)
    assert await refused(agent, "/v1/health", new_client)

    # 1. The new CA joins the bundle: clients of both are accepted.
    write_secret_volume(agent.directory, OLD.agent_tls(OLD.ca.pem + NEW.ca.pem))
    await wait_for(lambda: tls.reloads == 1, what="the first reload")
    for client in (old_client, new_client):
        status, body = await call(agent, "/v1/health", client)
        assert status == 200 and body["trust_bundle"] == bundle_fingerprint(OLD.ca.pem + NEW.ca.pem)

    # 2. The new CA alone, and a server certificate it issued: the old client is refused, and
    #    an operator that trusts only the old CA refuses the agent.
    write_secret_volume(agent.directory, NEW.agent_tls(NEW.ca.pem))
    await wait_for(lambda: tls.reloads == 2, what="the second reload")
    assert await refused(agent, "/v1/health", old_client)
    assert await refused(agent, "/v1/health", NEW.client_context(trusted=OLD.ca.pem))
    status, body = await call(agent, "/v1/health", NEW.client_context())
    assert status == 200 and body["trust_bundle"] == bundle_fingerprint(NEW.ca.pem)


async def test_material_that_does_not_load_leaves_the_previous_in_force(serve: Serve) -> None:
    agent = await serve()
    tls = agent.tls
    assert tls is not None
    other_key = issue_server(new_authority(OLD.now), OLD.now).key_pem
    write_secret_volume(agent.directory, AgentTLS(OLD.server.cert_pem, other_key, OLD.ca.pem))

    assert not tls.reload_if_changed()
    assert not tls.reload_if_changed()  # tried once per change, and warned once
    assert tls.reloads == 0
    assert (await call(agent, "/v1/health", operator()))[0] == 200

    write_secret_volume(agent.directory, OLD.agent_tls(OLD.ca.pem + NEW.ca.pem))
    assert tls.reload_if_changed() and tls.reloads == 1


# -- limits ---------------------------------------------------------------------------------------


async def open_raw(agent: Agent, local: str = "127.0.0.1") -> asyncio.StreamReader:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", agent.listener.port, local_addr=(local, 0)
    )
    _open.append(writer)
    return reader


_open: list[asyncio.StreamWriter] = []


@pytest.fixture(autouse=True)
async def _close_raw() -> AsyncIterator[None]:
    yield
    while _open:
        _open.pop().close()


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        return await reader.read(1) == b""
    except ConnectionError:
        return True


async def test_connections_past_the_limit_are_refused(serve: Serve) -> None:
    agent = await serve(limits=Limits(max_connections=2))
    await open_raw(agent)
    await open_raw(agent)
    await wait_for(lambda: agent.listener.active == 2, what="two connections held")

    assert await closed_by_server(await open_raw(agent))
    assert agent.listener.counts["refused"] == 1

    _open.pop(0).close()
    await wait_for(lambda: agent.listener.active == 1, what="one let go")
    assert (await call(agent, "/v1/health", operator()))[0] == 200


async def test_one_address_holds_no_more_than_its_share(serve: Serve) -> None:
    agent = await serve(limits=Limits(max_connections=8, max_connections_per_peer=1))
    await open_raw(agent, "127.0.0.1")
    await wait_for(lambda: agent.listener.active == 1, what="one connection held")
    assert await closed_by_server(await open_raw(agent, "127.0.0.1"))
    await open_raw(agent, "127.0.0.2")  # another client is still served
    await wait_for(lambda: agent.listener.by_peer == {"127.0.0.1": 1, "127.0.0.2": 1}, what="2")
    assert agent.listener.counts["refused"] == 1


async def test_a_silent_connection_is_dropped_after_the_handshake_timeout(serve: Serve) -> None:
    agent = await serve(limits=Limits(handshake_timeout=0.05))
    assert await closed_by_server(await open_raw(agent))  # no ClientHello: cut
    await wait_for(lambda: agent.listener.counts["handshake_failed"] == 1, what="the count")


@pytest.mark.parametrize(
    ("sent", "reason"),
    [(b"", "nothing after the handshake"), (b"GET /healthz HTTP/1.1\r\nHost: a\r\n", "half")],
)
async def test_headers_that_do_not_come_in_time_end_the_connection(
    serve: Serve, sent: bytes, reason: str
) -> None:
    agent = await serve(limits=Limits(header_timeout=0.05))
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", agent.listener.port, ssl=operator(), server_hostname=AGENT_SERVER_NAME
    )
    _open.append(writer)
    writer.write(sent)
    assert await closed_by_server(reader), reason
    assert agent.listener.counts["header_timeout"] == 1, reason


async def test_a_slow_body_is_408(serve: Serve) -> None:
    agent = await serve(limits=Limits(body_timeout=0.05))
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", agent.listener.port, ssl=operator(), server_hostname=AGENT_SERVER_NAME
    )
    _open.append(writer)
    writer.write(
        b"PUT /v1/pods HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"generation"'
    )
    status_line = await reader.readline()
    assert status_line.startswith(b"HTTP/1.1 408"), status_line
    assert agent.listener.counts["header_timeout"] == 0  # the headers were in time


async def test_a_body_over_the_limit_is_413(serve: Serve) -> None:
    agent = await serve(limits=Limits(max_body_bytes=1024))
    async with (
        aiohttp.ClientSession() as session,
        session.put(
            f"{agent.url}/v1/pods",
            data=b"{" + b" " * 4096 + b"}",
            headers={"Content-Type": "application/json"},
            ssl=operator(),
            server_hostname=AGENT_SERVER_NAME,
        ) as response,
    ):
        assert response.status == 413
        assert "1024" in (await response.json())["error"]


# -- end to end: the operator's pusher, the real app over a real datapath --------------------------


@pytest.mark.kernel
async def test_the_pusher_programs_the_real_agent_over_mutual_tls(
    serve: Serve, reconciler: Reconciler, datapath: Datapath, resolver: FakeResolver
) -> None:
    agent = await serve(tls=OLD.agent_tls(), reconciler=reconciler)
    async with aiohttp.ClientSession() as session:
        client = OLD.client_context()
        pusher = Pusher("mesh", tls=lambda: client, session=session, epoch=1, probe_interval=0.05)
        try:
            pusher.set_endpoint("node", f"http://127.0.0.1:{agent.listener.port}")  # as the engine
            pusher.set_pods("node", [pod_spec(0), pod_spec(1)])
            await wait_for(lambda: pusher.nodes()["node"].in_sync, what="the set applied")
            expected = bundle_fingerprint(OLD.ca.pem)
            await wait_for(lambda: pusher.nodes()["node"].trust_bundle == expected, what="probe")
        finally:
            await pusher.close()
    assert datapath.pods() == expected_pods(resolver, pod_spec(0), pod_spec(1))
    state = pusher.nodes()["node"]
    assert state.url == f"https://127.0.0.1:{agent.listener.port}"
    assert state.boot_id == reconciler.boot_id
