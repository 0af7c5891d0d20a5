"""A node whose pods belong to different meshes: one Istio, one Linkerd and one Kuma pod, each
with its own mesh's iptables and proxy (tests/netlab/meshes.py).

A call from one mesh's pod to another's goes through the caller's proxy, then the callee's, as
the two meshes' rules send it. With meshaccel loaded and every pod put in with its own mode, the
same call must take the same path, hop by hop, as with the meshes' rules alone: the reference is
measured first, without meshaccel, and compared. Over IPv4 and over IPv6, each against its own
reference.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from meshaccel.agent.datapath import Datapath
from meshaccel.agent.layout import Counter
from meshaccel.contract.modes import MeshModeName
from tests.datapath.conftest import (
    counters_since,
    forget_conntrack,
    load_datapath,
    mesh_pod,
    passthrough_source,
    shown,
    unload_quietly,
)
from tests.netlab import ECHO_PORT, MeshPodSpec, Node, Pod, find_leftovers, mesh_node
from tests.netlab.families import Family, address_prefix
from tests.netlab.fixtures import BOTH_FAMILIES
from tests.netlab.meshes import LAB_MESHES
from tests.requirements import require_btf

pytestmark = pytest.mark.kernel

PAYLOAD = 256 * 1024
Route = dict[str, str]

# caller -> callee: Istio calls Kuma, Linkerd calls Istio, Kuma calls Linkerd.
PAIRS = [
    (MeshModeName.ISTIO, MeshModeName.KUMA),
    (MeshModeName.LINKERD, MeshModeName.ISTIO),
    (MeshModeName.KUMA, MeshModeName.LINKERD),
]
PAIR_IDS = [f"{caller}-to-{callee}" for caller, callee in PAIRS]


@pytest.fixture(scope="module")
def mixed(netlab_requirements: None) -> Iterator[Node]:
    """Pods "istio", "linkerd" and "kuma", each built the way its mesh builds it."""
    require_btf()
    specs = tuple(MeshPodSpec(str(name), mesh=lab) for name, lab in LAB_MESHES.items())
    node = mesh_node(specs)
    with node:
        yield node
    leftovers = find_leftovers(node.token)
    if leftovers:
        pytest.fail("netlab teardown left: " + "; ".join(leftovers), pytrace=False)


def masked(address: str) -> str:
    """An address with its port masked unless it is the application's (ephemeral ports differ
    between any two runs)."""
    ip, _, port = address.rpartition(":")
    return address if port == str(ECHO_PORT) else f"{ip}:*"


def route(client: Pod, server: Pod, family: Family) -> Route:
    """Where one byte-exact call over ``family`` from client's app to server's app went: what
    the client app saw, both proxies' access logs (each learned the destination through
    SO_ORIGINAL_DST or IP6T_SO_ORIGINAL_DST) and whom the server app saw connecting."""
    assert client.sidecar is not None and server.sidecar is not None
    result = client.echo_client(server.host(family), ECHO_PORT, nbytes=PAYLOAD)
    assert result.ok, result.raw
    ((app, peer),) = [(c["local"], c["peer"]) for c in result.connections]
    (outbound,) = client.sidecar.wait_access_log(lambda e: e.downstream_remote == app)
    (inbound,) = server.sidecar.wait_access_log(
        lambda e: e.downstream_remote == outbound.upstream_local
    )
    served = server.servers[ECHO_PORT].wait_closed_from(inbound.upstream_local)
    return {
        "client app": f"{masked(app)} -> {masked(peer)}",
        "client proxy": f"{outbound.listener} {masked(outbound.downstream_remote)} -> "
        f"{outbound.downstream_local}, upstream {masked(outbound.upstream_local)} -> "
        f"{outbound.upstream_host}",
        "server proxy": f"{inbound.listener} {masked(inbound.downstream_remote)} -> "
        f"{inbound.downstream_local}, upstream {masked(inbound.upstream_local)} -> "
        f"{inbound.upstream_host}",
        "server app": f"{masked(served['peer'])}, {served['bytes']} bytes, error {served['error']}",
    }


def show(title: str, found: Route) -> None:
    print(f"\n[{title}]")
    for hop, seen in found.items():
        print(f"  {hop}: {seen}")


Routes = dict[tuple[MeshModeName, MeshModeName], Route]


@pytest.fixture(scope="module")
def references(mixed: Node) -> dict[Family, Routes]:
    """The node's references per family, measured once each."""
    return {}


@pytest.fixture
def without_meshaccel(mixed: Node, family: Family, references: dict[Family, Routes]) -> Routes:
    """The reference: every pair's call under the two meshes' own rules alone, once per
    family."""
    if family in references:
        return references[family]
    forget_conntrack(mixed)
    routes = {}
    for caller, callee in PAIRS:
        client, server = mixed.pods[caller], mixed.pods[callee]
        found = route(client, server, family)
        show(f"iptables {family} {caller} -> {callee}", found)
        # What the meshes do: the caller's proxy, then the callee's, which connects to the app
        # from its passthrough source (the pod's own address for Linkerd).
        source = address_prefix(passthrough_source(server, family))
        destination = server.address(ECHO_PORT, family)
        caller_app = address_prefix(client.ip_of(family))
        assert found["client proxy"].startswith(f"virtualOutbound {caller_app}* -> {destination}")
        assert found["server proxy"].startswith(f"virtualInbound {caller_app}* -> {destination}")
        assert found["server app"] == f"{source}*, {PAYLOAD} bytes, error None"
        routes[caller, callee] = found
    references[family] = routes
    return routes


@pytest.fixture
def datapath(mixed: Node, family: Family) -> Iterator[Datapath]:
    """meshaccel loaded on the node, every pod put in with its own mesh's mode."""
    forget_conntrack(mixed)
    try:
        loaded = load_datapath(mixed)
        for pod in mixed.pods.values():
            loaded.put_pod(mesh_pod(pod, family))
        yield loaded
    finally:
        unload_quietly(mixed)


@BOTH_FAMILIES
@pytest.mark.parametrize(("caller", "callee"), PAIRS, ids=PAIR_IDS)
def test_a_call_across_meshes_takes_the_meshes_own_path(
    mixed: Node,
    without_meshaccel: Routes,
    datapath: Datapath,
    caller: MeshModeName,
    callee: MeshModeName,
    family: Family,
) -> None:
    before = datapath.counters()

    found = route(mixed.pods[caller], mixed.pods[callee], family)

    show(f"ebpf {family} {caller} -> {callee}", found)
    counters = counters_since(datapath, before)
    assert found == without_meshaccel[caller, callee], shown(counters)
    # ... and meshaccel, not iptables, took it there: each hop steered in its pod's own mode.
    assert counters[Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED] == 1, shown(counters)
    assert counters[Counter.COUNTER_CONNECT_INBOUND_REDIRECTED] == 1, shown(counters)
    assert counters[Counter.COUNTER_CONNECT_SIDECAR_TO_OWN_POD] == 1, shown(counters)
    assert counters[Counter.COUNTER_ORIGINAL_DST_ANSWERED] == 2, shown(counters)
    assert counters[Counter.COUNTER_MSG_BYTES_REDIRECTED] == 4 * PAYLOAD, shown(counters)
