"""Scenarios 3 and 4: excluded ports are never steered; a sidecar never loops into itself.

The scenarios that hold for every mesh run for each (``EVERY_MESH``), on that mesh's own pods,
with its own ports and its proxy's identity; the conntrack clash is Istio's. Every one runs over
IPv4 and over IPv6 (``BOTH_FAMILIES``).
"""

from __future__ import annotations

import pytest

from meshaccel.agent.layout import Counter
from tests.datapath.conftest import MeshPath, istio_pod
from tests.netlab import ECHO_PORT, EXCLUDED_PORT, SIDECAR_IDENTITY, Node, Pod, RunAs
from tests.netlab.families import Family, address_prefix
from tests.netlab.fixtures import BOTH_FAMILIES, EVERY_MESH, ISTIO_ONLY
from tests.netlab.meshes import LAB_MESHES, LabMesh

pytestmark = pytest.mark.kernel

PAYLOAD = 64 * 1024


@pytest.fixture(scope="module", autouse=True)
def own_port_server(mesh: Node, lab: LabMesh) -> None:
    """An app listening on one of the mesh's own ports in pod b (Istio's health port 15021,
    Linkerd's control port 4190, Kuma's probe proxy 9001), so the excluded path can carry bytes.
    """
    if lab.own_port not in mesh.pods["b"].servers:
        mesh.pods["b"].start_echo_server(lab.own_port)


def echo(
    client: Pod, server: Pod, port: int, run_as: RunAs | None = None, family: Family = "ipv4"
) -> str:
    """A byte-exact echo over ``family``; returns the client's local address."""
    result = client.echo_client(server.host(family), port, nbytes=PAYLOAD, run_as=run_as)
    assert result.ok, result.raw
    (local,) = result.local_addresses
    return local


def steered(counters: dict[Counter, int]) -> int:
    return (
        counters[Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED]
        + counters[Counter.COUNTER_CONNECT_INBOUND_REDIRECTED]
    )


@EVERY_MESH
@BOTH_FAMILIES
def test_mesh_own_ports_are_never_steered(path: MeshPath, lab: LabMesh) -> None:
    a, b = path.pod("a"), path.pod("b")
    assert a.sidecar is not None
    app = echo(a, b, lab.own_port, family=path.family)

    # iptables still sends the app's connection through Envoy a, which learns the destination
    # from netfilter; Envoy a's own connect goes straight to b's port (the inbound RETURN).
    (entry,) = a.sidecar.wait_access_log(lambda e: e.downstream_remote == app)
    assert entry.downstream_local == path.address(b, lab.own_port)
    counters = path.counters()
    assert steered(counters) == 0
    assert counters[Counter.COUNTER_ORIGINAL_DST_ANSWERED] == 0
    expected = 1 if path.accelerated else 0
    assert counters[Counter.COUNTER_BYPASS_OUTBOUND_PORT_EXCLUDED] == expected
    assert counters[Counter.COUNTER_BYPASS_INBOUND_PORT_EXCLUDED] == expected


@EVERY_MESH
@BOTH_FAMILIES
def test_per_pod_excluded_outbound_port(path: MeshPath) -> None:
    a, b = path.pod("a"), path.pod("b")
    # The pods' rules exclude 9090 both ways, as their annotations would say.
    path.accelerate(a, excluded_outbound_ports=frozenset({EXCLUDED_PORT}))
    path.mark()

    app = echo(a, b, EXCLUDED_PORT, family=path.family)

    b.servers[EXCLUDED_PORT].wait_closed_from(app)  # the app saw a's app itself: no proxy
    counters = path.counters()
    assert steered(counters) == 0
    assert counters[Counter.COUNTER_BYPASS_OUTBOUND_PORT_EXCLUDED] == (1 if path.accelerated else 0)


@EVERY_MESH
@BOTH_FAMILIES
def test_per_pod_excluded_inbound_port(path: MeshPath, lab: LabMesh) -> None:
    a, b = path.pod("a"), path.pod("b")
    path.accelerate(b, excluded_inbound_ports=frozenset({EXCLUDED_PORT}))
    path.mark()

    # A sidecar's connect to b:9090 (the proxy's uid is not redirected outbound by either path).
    client = echo(a, b, EXCLUDED_PORT, run_as=lab.proxy, family=path.family)

    b.servers[EXCLUDED_PORT].wait_closed_from(client)  # no proxy on the way
    counters = path.counters()
    assert steered(counters) == 0
    assert counters[Counter.COUNTER_BYPASS_INBOUND_PORT_EXCLUDED] == (1 if path.accelerated else 0)


def went_straight_to_inbound(path: MeshPath, client: str) -> None:
    """The connection from ``client`` (in pod a) reached Envoy b directly, never Envoy a."""
    a, b = path.pod("a"), path.pod("b")
    assert a.sidecar is not None and b.sidecar is not None
    (inbound,) = b.sidecar.wait_access_log(lambda e: e.downstream_remote == client)
    assert inbound.downstream_local == path.address(b, ECHO_PORT)
    assert not [e for e in a.sidecar.access_log() if e.downstream_remote == client]
    counters = path.counters()
    assert counters[Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED] == 0  # never into Envoy a
    assert counters[Counter.COUNTER_CONNECT_INBOUND_REDIRECTED] == (1 if path.accelerated else 0)


@EVERY_MESH
@BOTH_FAMILIES
def test_sidecar_to_meshed_pod_goes_to_its_inbound_listener(path: MeshPath, lab: LabMesh) -> None:
    a, b = path.pod("a"), path.pod("b")
    client = echo(a, b, ECHO_PORT, run_as=lab.proxy, family=path.family)

    went_straight_to_inbound(path, client)


@EVERY_MESH
@BOTH_FAMILIES
def test_the_proxy_gid_alone_counts_as_the_mesh_says(path: MeshPath, lab: LabMesh) -> None:
    """Istio's rules exempt the proxy's gid too: a process with only gid 1337 is the proxy and
    goes straight to b's inbound listener. Linkerd's and Kuma's exempt the uid only: a process
    with only their proxy's gid is an application, whose connection goes through its own
    sidecar first."""
    a, b = path.pod("a"), path.pod("b")
    assert a.sidecar is not None and b.sidecar is not None
    client = echo(a, b, ECHO_PORT, run_as=RunAs(uid=0, gid=lab.proxy.gid), family=path.family)

    if lab.exempts_proxy_gid:
        went_straight_to_inbound(path, client)
        return
    (outbound,) = a.sidecar.wait_access_log(lambda e: e.downstream_remote == client)
    assert outbound.downstream_local == path.address(b, ECHO_PORT)
    (inbound,) = b.sidecar.wait_access_log(lambda e: e.downstream_remote == outbound.upstream_local)
    assert inbound.downstream_local == path.address(b, ECHO_PORT)
    counters = path.counters()
    expected = 1 if path.accelerated else 0
    assert counters[Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED] == expected  # into Envoy a
    assert counters[Counter.COUNTER_CONNECT_INBOUND_REDIRECTED] == expected  # Envoy a -> Envoy b


@EVERY_MESH
@BOTH_FAMILIES
def test_sidecar_to_pod_outside_the_set_is_not_steered(path: MeshPath, lab: LabMesh) -> None:
    a, c = path.pod("a"), path.pod("c")
    assert a.sidecar is not None and c.sidecar is not None
    client = echo(a, c, ECHO_PORT, run_as=lab.proxy, family=path.family)

    # c's own iptables hand it to Envoy c; Envoy a never sees its own connection.
    (inbound,) = c.sidecar.wait_access_log(lambda e: e.downstream_remote == client)
    assert inbound.downstream_local == path.address(c, ECHO_PORT)
    assert not [e for e in a.sidecar.access_log() if e.downstream_remote == client]
    counters = path.counters()
    assert steered(counters) == 0
    assert counters[Counter.COUNTER_BYPASS_SIDECAR_REMOTE_DESTINATION] == (
        1 if path.accelerated else 0
    )


DNS_CAPTURED = [mesh for mesh, lab in LAB_MESHES.items() if lab.dns_port is not None]
DNS_PORT = 53


@pytest.mark.parametrize(
    "netlab_node", DNS_CAPTURED, indirect=True, ids=[str(m) for m in DNS_CAPTURED]
)
@BOTH_FAMILIES
def test_dns_over_tcp_goes_where_the_mesh_sends_it(path: MeshPath, lab: LabMesh) -> None:
    """Kuma's rules send every TCP connection to port 53 to kuma-dp's DNS server in the pod
    (15053), not through Envoy: steering it to the outbound listener would reach the original
    destination instead (here: nobody listens on b:53, so that connection would be refused)."""
    a, b = path.pod("a"), path.pod("b")
    assert lab.dns_port is not None and a.sidecar is not None
    dns_server = a.servers.get(lab.dns_port) or a.start_echo_server(lab.dns_port)

    app = echo(a, b, DNS_PORT, family=path.family)

    dns_server.wait_closed_from(app)  # the mesh's DNS server in pod a took it
    assert not [e for e in a.sidecar.access_log() if e.downstream_remote == app]
    counters = path.counters()
    assert steered(counters) == 0
    assert counters[Counter.COUNTER_BYPASS_OUTBOUND_PORT_EXCLUDED] == (1 if path.accelerated else 0)


@ISTIO_ONLY
@BOTH_FAMILIES
def test_original_destination_survives_a_nat_port_remap(
    mesh: Node, datapath_factory, family: Family
) -> None:
    """A sidecar connection steered to b:15006 from the source port of an open iptables-path
    connection to b:8080: b's conntrack holds that connection's reply tuple (b:15006 ->
    a:port), so the REDIRECT in b's PREROUTING remaps the new client port and the two ends see
    different 4-tuples. Envoy b must still learn b:8080 (what happened, under load, to
    connections reusing the ports of recent iptables-path ones)."""
    a, b = mesh.pods["a"], mesh.pods["b"]
    assert b.sidecar is not None
    source_port = 47000
    # Before meshaccel: iptables NATs a:47000 -> b:8080 to b:15006; the connection stays open.
    iptables_era = a.start_echo_client(
        b.host(family),
        ECHO_PORT,
        nbytes=PAYLOAD,
        pace_seconds=2.0,
        run_as=SIDECAR_IDENTITY,
        source_port=source_port,
    )
    iptables_era.wait_connected()
    earlier = len(b.sidecar.access_log())

    datapath = datapath_factory(fresh_conntrack=False)  # the clash is the point here
    for pod in (a, b):
        datapath.put_pod(istio_pod(pod, family))
    steered = a.echo_client(
        b.host(family), ECHO_PORT, nbytes=PAYLOAD, run_as=SIDECAR_IDENTITY, source_port=source_port
    )

    assert steered.ok, steered.raw
    assert iptables_era.wait(timeout=20).ok
    counters = datapath.counters()
    assert counters[Counter.COUNTER_CONNECT_INBOUND_REDIRECTED] == 1
    assert counters[Counter.COUNTER_ORIGINAL_DST_ANSWERED] == 1
    from_a = address_prefix(a.ip_of(family))
    b.sidecar.wait_access_log(lambda e: e.downstream_remote.startswith(from_a))
    inbound = b.sidecar.access_log()[earlier:]
    remapped = [
        e
        for e in inbound
        if e.downstream_remote.startswith(from_a)
        and e.downstream_remote != a.address(source_port, family)
    ]
    assert remapped, "b's conntrack did not remap the port: the test no longer tests the clash"
    assert [e.downstream_local for e in remapped] == [b.address(ECHO_PORT, family)]
