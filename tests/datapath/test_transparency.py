"""What a pod's sockets answer under meshaccel equals what they answer under iptables.

One connection, app a -> 198.18.0.11:8080 (pod b's app) through both Envoys, observed from every
socket on its way: the application client, both sidecars (their real Envoy's sockets, read
through copies of its file descriptors) and the application server each answer getsockname,
getpeername and SO_ORIGINAL_DST with buffers of 8, 16 and 8192 bytes, and both Envoys log the
addresses they saw. The table under the mesh's iptables alone is the reference; meshaccel, in
every feature set, must produce the same table, ephemeral ports aside: for Istio's pods, and for
Linkerd's and Kuma's (``EVERY_MESH``), whose proxies listen elsewhere; over IPv4 and over IPv6
(``BOTH_FAMILIES``: the same connection to [fd00:198:18::11]:8080, IP6T_SO_ORIGINAL_DST with
buffers of 16, 28 and 8192 bytes, each family against its own reference).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from itertools import count
from typing import Any

import pytest

from meshaccel.agent import libbpf
from meshaccel.agent.datapath import CONNECT_FEATURES, DEFAULT_FEATURES, Datapath
from meshaccel.agent.layout import Counter
from tests.datapath.conftest import forget_conntrack, lab_mesh, mesh_pod, shown
from tests.netlab import ECHO_PORT, Node, Pod
from tests.netlab.app_handles import apps_argv
from tests.netlab.envoy import (
    ENVOY_INBOUND_PORT,
    ENVOY_OUTBOUND_PORT,
    AccessLogEntry,
    EnvoySidecar,
    ProxyListeners,
)
from tests.netlab.families import LOOPBACK, Family, address_prefix
from tests.netlab.fixtures import BOTH_FAMILIES, EVERY_MESH, ISTIO_ONLY
from tests.netlab.peek import tcp_connection_views
from tests.waiting import wait_until

pytestmark = pytest.mark.kernel

Table = dict[str, dict[str, str]]  # role -> query -> answer

ACCESS_LOG_FIELDS = ("downstream_remote", "downstream_local", "upstream_host", "upstream_local")
ADDRESS_HOOKS: dict[Family, tuple[str, str]] = {
    "ipv4": ("getpeername4", "getsockname4"),
    "ipv6": ("getpeername6", "getsockname6"),
}
SOCKET_FAMILY: dict[Family, int] = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}

_runs = count()


def fixed_ports(listeners: ProxyListeners) -> frozenset[int]:
    """Ports that are part of the answer; any other port is ephemeral and differs between runs."""
    return frozenset({ECHO_PORT, listeners.outbound_port, listeners.inbound_port})


def without_ephemeral_port(answer: str, fixed: frozenset[int]) -> str:
    ip, sep, port = answer.rpartition(":")
    if not sep or not port.isdigit() or int(port) in fixed:
        return answer
    return f"{ip}:*"


def sidecar_sockets(role: str, pod: Pod, listener_port: int, family: Family) -> Table:
    """The sidecar's two sockets of the one connection: the one it accepted on its listener
    (downstream) and the one it opened to the next hop (upstream)."""
    assert pod.sidecar is not None
    admin_port = lab_mesh(pod).listeners.admin_port
    views = [
        view
        for view in tcp_connection_views(pod.sidecar.pid, SOCKET_FAMILY[family])
        if not view["local"].endswith(f":{admin_port}")
    ]
    downstream = [v for v in views if v["local"].endswith(f":{listener_port}")]
    upstream = [v for v in views if v not in downstream]
    assert len(downstream) == len(upstream) == 1, views
    return {f"{role} downstream": downstream[0], f"{role} upstream": upstream[0]}


def logged_since(sidecar: EnvoySidecar, before: int) -> list[AccessLogEntry]:
    """The access-log entries after the first ``before``, once there is one."""
    wait_until(lambda: len(sidecar.access_log()) > before, timeout=10, what="an access log entry")
    return sidecar.access_log()[before:]


def observe(node: Node, family: Family = "ipv4") -> Table:
    """Every answer about one connection from app a to app b over ``family``, ephemeral ports
    masked."""
    a, b = node.pods["a"], node.pods["b"]
    assert a.sidecar is not None and b.sidecar is not None
    server = b.servers[ECHO_PORT]

    def accepts() -> list[dict[str, Any]]:
        return [event for event in server.events() if event["event"] == "accept"]

    accepted_before = len(accepts())
    logged_before = len(a.sidecar.access_log()), len(b.sidecar.access_log())
    hold = a.workdir / f"hold-{next(_runs)}"
    argv = ["--host", b.host(family), "--port", str(ECHO_PORT), "--hold-file", str(hold)]
    client = a.run(apps_argv("socket-view-client", *argv, "--timeout", "30"), name="view")
    table: Table = {}
    try:
        connected: list[dict[str, Any]] = []

        def client_connected() -> bool:
            connected[:] = [r for r in _json_lines(client.stdout()) if r.get("event")]
            if not connected and not client.is_running():
                raise RuntimeError(client.describe())
            return bool(connected)

        wait_until(client_connected, timeout=10, what="the socket-view client's connection")
        table["app client"] = connected[0]["view"]
        wait_until(lambda: len(accepts()) > accepted_before, timeout=10, what="the accept")
        (accepted,) = accepts()[accepted_before:]
        table["app server"] = accepted["view"]
        table |= sidecar_sockets("sidecar a", a, lab_mesh(a).listeners.outbound_port, family)
        table |= sidecar_sockets("sidecar b", b, lab_mesh(b).listeners.inbound_port, family)
    finally:
        hold.touch()
    assert client.wait(30) == 0, client.describe()

    # tcp_proxy logs a connection when it closes.
    for role, sidecar, before in (
        ("a", a.sidecar, logged_before[0]),
        ("b", b.sidecar, logged_before[1]),
    ):
        entries = logged_since(sidecar, before)
        assert len(entries) == 1, entries
        table[f"sidecar {role} access log"] = {f: getattr(entries[0], f) for f in ACCESS_LOG_FIELDS}
    fixed = fixed_ports(lab_mesh(a).listeners) | fixed_ports(lab_mesh(b).listeners)
    return {
        role: {query: without_ephemeral_port(answer, fixed) for query, answer in answers.items()}
        for role, answers in table.items()
    }


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def differences(reference: Table, table: Table) -> list[str]:
    return [
        f"{role} {query}: iptables {answer!r}, here {table.get(role, {}).get(query)!r}"
        for role, answers in reference.items()
        for query, answer in answers.items()
        if table.get(role, {}).get(query) != answer
    ]


def show(name: str, table: Table) -> None:
    print(f"\n[{name}]")
    for role, answers in table.items():
        print(f"  {role}: " + ", ".join(f"{q}={a}" for q, a in answers.items()))


@pytest.fixture(scope="module")
def references(mesh: Node) -> dict[Family, Table]:
    """The references of the module's node (one per mesh), per family, observed once each."""
    return {}


@pytest.fixture
def under_iptables(mesh: Node, family: Family, references: dict[Family, Table]) -> Table:
    """The reference: the mesh's interception alone, nothing of meshaccel loaded."""
    if family in references:
        return references[family]
    forget_conntrack(mesh)
    table = observe(mesh, family)
    show(f"iptables {family}", table)
    # The reference is what an application expects: its own view is the destination it asked for.
    a, b = mesh.pods["a"], mesh.pods["b"]
    assert table["app client"]["peer"] == b.address(ECHO_PORT, family)
    assert table["sidecar a downstream"]["peer"] == f"{address_prefix(a.ip_of(family))}*"
    references[family] = table
    return table


CONFIGURATIONS: dict[str, dict[str, Any]] = {
    "connect": {"features": CONNECT_FEATURES},
    "default": {"features": DEFAULT_FEATURES},
    "apps": {"features": DEFAULT_FEATURES, "sk_msg_to_app": True},
}


def accelerated(
    mesh: Node,
    datapath_factory: Callable[..., Datapath],
    configuration: str,
    family: Family = "ipv4",
) -> Datapath:
    options = CONFIGURATIONS[configuration]
    datapath = datapath_factory(options["features"])
    for name in ("a", "b"):
        datapath.put_pod(
            mesh_pod(mesh.pods[name], family, sk_msg_to_app=options.get("sk_msg_to_app", False))
        )
    return datapath


@EVERY_MESH
@BOTH_FAMILIES
@pytest.mark.parametrize("configuration", list(CONFIGURATIONS))
def test_every_socket_answers_as_under_iptables(
    mesh: Node,
    datapath_factory: Callable[..., Datapath],
    under_iptables: Table,
    configuration: str,
    family: Family,
) -> None:
    datapath = accelerated(mesh, datapath_factory, configuration, family)
    before = datapath.counters()

    table = observe(mesh, family)
    show(f"{configuration} {family}", table)

    counters = {c: n - before[c] for c, n in datapath.counters().items()}
    assert differences(under_iptables, table) == [], shown(counters)
    # The connection was steered, and the programs (not chance) made the answers equal.
    assert counters[Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED] == 1, shown(counters)
    assert counters[Counter.COUNTER_CONNECT_INBOUND_REDIRECTED] == 1, shown(counters)
    assert counters[Counter.COUNTER_PEER_ADDRESS_RESTORED] > 0, shown(counters)
    assert counters[Counter.COUNTER_LOCAL_ADDRESS_RESTORED] > 0, shown(counters)


@ISTIO_ONLY
@BOTH_FAMILIES
def test_without_the_address_hooks_the_rewrite_shows(
    mesh: Node,
    datapath_factory: Callable[..., Datapath],
    under_iptables: Table,
    family: Family,
) -> None:
    """The control: with getpeername/getsockname of the family detached, the battery sees the
    rewrite (what meshaccel answered before it had them), so the test above can fail."""
    datapath = accelerated(mesh, datapath_factory, "default", family)
    for hook in ADDRESS_HOOKS[family]:
        with libbpf.Link.open_pinned(datapath.pins.link(hook)) as link:
            link.detach()

    found = differences(under_iptables, observe(mesh, family))

    a, b = mesh.pods["a"].ip_of(family), mesh.pods["b"].ip_of(family)
    app = address_prefix(a) + "*"
    loopback = address_prefix(LOOPBACK[family])
    destination = address_prefix(b) + str(ECHO_PORT)
    assert found == [
        f"app client local: iptables '{app}', here '{loopback}*'",
        f"app client peer: iptables '{destination}', here '{loopback}{ENVOY_OUTBOUND_PORT}'",
        f"sidecar a downstream peer: iptables '{app}', here '{loopback}*'",
        f"sidecar a upstream peer: iptables '{destination}', "
        f"here '{address_prefix(b)}{ENVOY_INBOUND_PORT}'",
        f"sidecar a access log downstream_remote: iptables '{app}', here '{loopback}*'",
    ], found
