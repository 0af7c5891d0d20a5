"""Scenarios 3 and 4: excluded ports are never steered; a sidecar never loops into itself."""

from __future__ import annotations

import pytest

from meshaccel.agent.layout import Counter
from tests.datapath.conftest import MeshPath, istio_pod
from tests.netlab import ECHO_PORT, EXCLUDED_PORT, SIDECAR_IDENTITY, Node, Pod, RunAs

pytestmark = pytest.mark.kernel

ISTIO_HEALTH_PORT = 15021  # one of Istio's own ports: excluded in both directions
PAYLOAD = 64 * 1024


@pytest.fixture(scope="module", autouse=True)
def health_server(mesh: Node) -> None:
    """An app listening on Istio's health port in pod b, so the excluded path can carry bytes."""
    if ISTIO_HEALTH_PORT not in mesh.pods["b"].servers:
        mesh.pods["b"].start_echo_server(ISTIO_HEALTH_PORT)


def echo(client: Pod, server: Pod, port: int, run_as: RunAs | None = None) -> str:
    """A byte-exact echo; returns the client's local address."""
    result = client.echo_client(str(server.ip), port, nbytes=PAYLOAD, run_as=run_as)
    assert result.ok, result.raw
    (local,) = result.local_addresses
    return local


def steered(counters: dict[Counter, int]) -> int:
    return (
        counters[Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED]
        + counters[Counter.COUNTER_CONNECT_INBOUND_REDIRECTED]
    )


def test_mesh_own_ports_are_never_steered(path: MeshPath) -> None:
    a, b = path.pod("a"), path.pod("b")
    assert a.sidecar is not None
    app = echo(a, b, ISTIO_HEALTH_PORT)

    # iptables still sends the app's connection through Envoy a, which learns the destination
    # from netfilter; Envoy a's own connect goes straight to b's port (ISTIO_INBOUND RETURN).
    (entry,) = a.sidecar.wait_access_log(lambda e: e.downstream_remote == app)
    assert entry.downstream_local == b.address(ISTIO_HEALTH_PORT)
    counters = path.counters()
    assert steered(counters) == 0
    assert counters[Counter.COUNTER_ORIGINAL_DST_ANSWERED] == 0
    expected = 1 if path.accelerated else 0
    assert counters[Counter.COUNTER_BYPASS_OUTBOUND_PORT_EXCLUDED] == expected
    assert counters[Counter.COUNTER_BYPASS_INBOUND_PORT_EXCLUDED] == expected


def test_per_pod_excluded_outbound_port(path: MeshPath) -> None:
    a, b = path.pod("a"), path.pod("b")
    # The pods' istio-iptables exclude 9090 both ways, as their annotations would say.
    path.accelerate(a, excluded_outbound_ports=frozenset({EXCLUDED_PORT}))
    path.mark()

    app = echo(a, b, EXCLUDED_PORT)

    b.servers[EXCLUDED_PORT].wait_closed_from(app)  # the app saw a's app itself: no proxy
    counters = path.counters()
    assert steered(counters) == 0
    assert counters[Counter.COUNTER_BYPASS_OUTBOUND_PORT_EXCLUDED] == (1 if path.accelerated else 0)


def test_per_pod_excluded_inbound_port(path: MeshPath) -> None:
    a, b = path.pod("a"), path.pod("b")
    path.accelerate(b, excluded_inbound_ports=frozenset({EXCLUDED_PORT}))
    path.mark()

    # A sidecar's connect to b:9090 (uid 1337 is not redirected outbound by either path).
    client = echo(a, b, EXCLUDED_PORT, run_as=SIDECAR_IDENTITY)

    b.servers[EXCLUDED_PORT].wait_closed_from(client)  # no proxy on the way
    counters = path.counters()
    assert steered(counters) == 0
    assert counters[Counter.COUNTER_BYPASS_INBOUND_PORT_EXCLUDED] == (1 if path.accelerated else 0)


@pytest.mark.parametrize(
    "identity", [SIDECAR_IDENTITY, RunAs(uid=0, gid=1337)], ids=["uid-1337", "gid-1337"]
)
def test_sidecar_to_meshed_pod_goes_to_its_inbound_listener(
    path: MeshPath, identity: RunAs
) -> None:
    a, b = path.pod("a"), path.pod("b")
    assert a.sidecar is not None and b.sidecar is not None
    client = echo(a, b, ECHO_PORT, run_as=identity)

    (inbound,) = b.sidecar.wait_access_log(lambda e: e.downstream_remote == client)
    assert inbound.downstream_local == b.address(ECHO_PORT)
    assert not [e for e in a.sidecar.access_log() if e.downstream_remote == client]
    counters = path.counters()
    assert counters[Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED] == 0  # never into Envoy a
    assert counters[Counter.COUNTER_CONNECT_INBOUND_REDIRECTED] == (1 if path.accelerated else 0)


def test_sidecar_to_pod_outside_the_set_is_not_steered(path: MeshPath) -> None:
    a, c = path.pod("a"), path.pod("c")
    assert a.sidecar is not None and c.sidecar is not None
    client = echo(a, c, ECHO_PORT, run_as=SIDECAR_IDENTITY)

    # c's own iptables hand it to Envoy c; Envoy a never sees its own connection.
    (inbound,) = c.sidecar.wait_access_log(lambda e: e.downstream_remote == client)
    assert inbound.downstream_local == c.address(ECHO_PORT)
    assert not [e for e in a.sidecar.access_log() if e.downstream_remote == client]
    counters = path.counters()
    assert steered(counters) == 0
    assert counters[Counter.COUNTER_BYPASS_SIDECAR_REMOTE_DESTINATION] == (
        1 if path.accelerated else 0
    )


def test_original_destination_survives_a_nat_port_remap(mesh: Node, datapath_factory) -> None:
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
        str(b.ip),
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
        datapath.put_pod(istio_pod(pod))
    steered = a.echo_client(
        str(b.ip), ECHO_PORT, nbytes=PAYLOAD, run_as=SIDECAR_IDENTITY, source_port=source_port
    )

    assert steered.ok, steered.raw
    assert iptables_era.wait(timeout=20).ok
    counters = datapath.counters()
    assert counters[Counter.COUNTER_CONNECT_INBOUND_REDIRECTED] == 1
    assert counters[Counter.COUNTER_ORIGINAL_DST_ANSWERED] == 1
    b.sidecar.wait_access_log(lambda e: e.downstream_remote.startswith(f"{a.ip}:"))
    inbound = b.sidecar.access_log()[earlier:]
    remapped = [
        e
        for e in inbound
        if e.downstream_remote.startswith(f"{a.ip}:")
        and e.downstream_remote != f"{a.ip}:{source_port}"
    ]
    assert remapped, "b's conntrack did not remap the port: the test no longer tests the clash"
    assert [e.downstream_local for e in remapped] == [b.address(ECHO_PORT)]
