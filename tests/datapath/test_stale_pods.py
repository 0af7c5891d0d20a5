"""A pod that dies while the agent is not told: its address must never lead to a dead listener.

The pod's processes end and its cgroup goes, its address is given to a pod outside the mesh, and
the datapath still holds the dead pod's entries (no new pod set came). Envoy a's connect to that
address must reach the new owner as it would under iptables, not the dead pod's inbound port;
over IPv4 and over IPv6 (the heir takes both of the dead pod's addresses).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from meshaccel.agent.datapath import DEFAULT_FEATURES, Datapath
from meshaccel.agent.layout import Counter
from tests.datapath.conftest import istio_pod, shown
from tests.netlab import ECHO_PORT, Node, Pod
from tests.netlab.families import Family
from tests.netlab.fixtures import BOTH_FAMILIES
from tests.netlab.netns import run_in_netns

pytestmark = pytest.mark.kernel

PAYLOAD = 64 << 10


def meshed_pod(node: Node, name: str) -> Pod:
    pod = node.add_pod(name)
    pod.install_istio_iptables()
    pod.start_echo_server(ECHO_PORT)
    return pod


def dies_and_leaves_its_address(node: Node, dead: Pod, heir_name: str, *neighbours: Pod) -> Pod:
    """End every process of ``dead`` and remove its cgroup (telling nobody), then give its
    addresses to a new pod with no sidecar and no interception, serving on ECHO_PORT."""
    assert dead.sidecar is not None
    dead.sidecar.stop()
    for server in dead.servers.values():
        server.process.stop()
    dead.cgroup_dir.rmdir()
    run_in_netns(dead.netns, ["ip", "link", "set", "eth0", "down"])
    heir = node.add_pod(heir_name)
    heir.start_echo_server(ECHO_PORT)
    prefix = node.subnet.prefixlen
    run_in_netns(heir.netns, ["ip", "addr", "add", f"{dead.ip}/{prefix}", "dev", "eth0"])
    if dead.ipv6 is not None:
        prefix6 = f"{dead.ipv6}/{node.subnet6.prefixlen}"
        run_in_netns(heir.netns, ["ip", "-6", "addr", "add", prefix6, "dev", "eth0", "nodad"])
    for pod in neighbours:  # forget the dead pod's link-layer address
        for address in (dead.ip, dead.ipv6):
            if address is not None:
                run_in_netns(pod.netns, ["ip", "neigh", "flush", "to", str(address)])
    return heir


def served_by(pod: Pod, address: str) -> bool:
    return any(
        event["event"] == "accept" and event["local"] == address
        for event in pod.servers[ECHO_PORT].events()
    )


@BOTH_FAMILIES
def test_a_dead_pods_address_is_reached_through_iptables(
    mesh: Node, datapath_factory: Callable[..., Datapath], family: Family
) -> None:
    a = mesh.pods["a"]
    datapath = datapath_factory(DEFAULT_FEATURES)
    datapath.put_pod(istio_pod(a, family))
    doomed = meshed_pod(mesh, f"doomed-{family[-1]}")
    # Programmed before its sidecar listens, as in a cluster.
    datapath.put_pod(istio_pod(doomed, family))
    doomed.start_envoy()

    before = datapath.counters()
    alive = a.echo_client(doomed.host(family), ECHO_PORT, nbytes=PAYLOAD)
    assert alive.ok, alive.raw
    steered = datapath.counters()[Counter.COUNTER_CONNECT_INBOUND_REDIRECTED]
    assert steered == before[Counter.COUNTER_CONNECT_INBOUND_REDIRECTED] + 1

    cgroup_id = doomed.cgroup_id
    heir = dies_and_leaves_its_address(mesh, doomed, f"heir-{family[-1]}", a)
    assert datapath.pod(cgroup_id) is not None, "the datapath still has the dead pod"
    before = datapath.counters()
    after_death = a.echo_client(doomed.host(family), ECHO_PORT, nbytes=PAYLOAD)

    counters = {c: n - before[c] for c, n in datapath.counters().items()}
    assert after_death.ok, (after_death.raw, shown(counters))
    assert served_by(heir, doomed.address(ECHO_PORT, family))
    assert counters[Counter.COUNTER_BYPASS_NO_INBOUND_LISTENER] == 1, shown(counters)
    assert counters[Counter.COUNTER_CONNECT_INBOUND_REDIRECTED] == 0, shown(counters)
    assert counters[Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED] == 1, shown(counters)


@BOTH_FAMILIES
def test_a_listener_older_than_the_datapath_is_trusted_until_the_pod_is_removed(
    mesh: Node, datapath_factory: Callable[..., Datapath], family: Family
) -> None:
    """The limit, and the control: a sidecar that was listening before the datapath loaded
    was never seen to open, so its closing is not seen either. The pod's entries lead to the
    dead listener (the connection is refused, which proves the test above can fail) until
    they are removed, as the agent does when the pod's cgroup goes (tests/agent*/
    test_vanished.py): then the new owner is reached."""
    a = mesh.pods["a"]
    early = meshed_pod(mesh, f"early-{family[-1]}")
    early.start_envoy()
    datapath = datapath_factory(DEFAULT_FEATURES)
    for pod in (a, early):
        datapath.put_pod(istio_pod(pod, family))
    cgroup_id = early.cgroup_id

    heir = dies_and_leaves_its_address(mesh, early, f"heir2-{family[-1]}", a)
    before = datapath.counters()
    refused = a.echo_client(early.host(family), ECHO_PORT, nbytes=PAYLOAD, timeout=5)
    counters = {c: n - before[c] for c, n in datapath.counters().items()}
    assert not refused.ok, refused.raw
    assert counters[Counter.COUNTER_CONNECT_INBOUND_REDIRECTED] == 1, shown(counters)
    assert counters[Counter.COUNTER_BYPASS_NO_INBOUND_LISTENER] == 0, shown(counters)

    assert datapath.delete_pod(cgroup_id)  # what the agent does once the cgroup is gone
    reached = a.echo_client(early.host(family), ECHO_PORT, nbytes=PAYLOAD)
    assert reached.ok, reached.raw
    assert served_by(heir, early.address(ECHO_PORT, family))
