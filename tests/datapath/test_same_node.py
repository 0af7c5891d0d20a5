"""Scenarios 1 and 2: a same-node call through two sidecars, and pods outside the set.

Every scenario runs for each mesh (Istio, Linkerd, Kuma), on pods built the way that mesh builds
them, both on its iptables alone and with meshaccel in that mesh's mode, over IPv4 and over IPv6
(the pods are dual-stack; on IPv6 they are put in with both addresses). A dual-stack scenario
reaches one pod on both families in one test.
"""

from __future__ import annotations

import pytest

from meshaccel.agent.datapath import CONNECT_FEATURES, SK_MSG_FEATURES
from meshaccel.agent.layout import Counter
from tests.datapath.conftest import (
    MeshPath,
    counters_since,
    loopback_tx_bytes,
    mesh_pod,
    passthrough_source,
    shown,
)
from tests.netlab import ECHO_PORT, Node, Pod
from tests.netlab.families import FAMILIES, Family, address_prefix
from tests.netlab.fixtures import BOTH_FAMILIES, EVERY_MESH

pytestmark = [pytest.mark.kernel, EVERY_MESH]

PAYLOAD = 1 << 20


def call_through_sidecars(client: Pod, server: Pod, family: Family = "ipv4") -> tuple[int, str]:
    """client's app -> server's app:8080 over ``family``, checked hop by hop in both Envoys'
    access logs.

    Returns the bytes client's pod sent over lo, and the address the server's app saw.
    """
    lo_before = loopback_tx_bytes(client)
    result = client.echo_client(server.host(family), ECHO_PORT, nbytes=PAYLOAD)
    lo_sent = loopback_tx_bytes(client) - lo_before
    assert result.ok, result.raw

    assert client.sidecar is not None and server.sidecar is not None
    (app,) = result.local_addresses
    (outbound,) = client.sidecar.wait_access_log(lambda e: e.downstream_remote == app)
    # Envoy's original_dst listener filter got the destination through SO_ORIGINAL_DST
    # (IP6T_SO_ORIGINAL_DST on IPv6).
    destination = server.address(ECHO_PORT, family)
    assert outbound.downstream_local == destination
    assert outbound.upstream_host == destination
    (inbound,) = server.sidecar.wait_access_log(
        lambda e: e.downstream_remote == outbound.upstream_local
    )
    assert inbound.downstream_local == destination
    # The inbound passthrough: from 127.0.0.6 or ::6 (Istio, Kuma), from the pod's own
    # address (Linkerd).
    assert inbound.upstream_local.startswith(address_prefix(passthrough_source(server, family)))
    assert inbound.bytes_received == inbound.bytes_sent == PAYLOAD
    return lo_sent, inbound.upstream_local


@BOTH_FAMILIES
def test_same_node_call_through_both_sidecars(path: MeshPath) -> None:
    a, b = path.pod("a"), path.pod("b")
    lo_sent, _ = call_through_sidecars(a, b, path.family)
    counters = path.counters()
    print(f"\n[{path.name}] pod a sent {lo_sent} bytes over lo; counters: {shown(counters)}")

    if not path.accelerated:
        assert not any(counters.values())
        assert lo_sent >= 2 * PAYLOAD  # app -> Envoy and Envoy -> app, both over lo
        return
    assert counters[Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED] == 1
    assert counters[Counter.COUNTER_CONNECT_INBOUND_REDIRECTED] == 1
    assert counters[Counter.COUNTER_CONNECT_SIDECAR_TO_OWN_POD] == 1
    assert counters[Counter.COUNTER_ORIGINAL_DST_ANSWERED] == 2  # Envoy a and Envoy b
    # 3 connections, both ends; the two sidecar-to-sidecar sockets send and take redirects.
    assert counters[Counter.COUNTER_SOCKHASH_ADDED] == 8
    assert counters[Counter.COUNTER_MSG_REDIRECTED] > 0
    # Into sidecar sockets only (the default): app a -> Envoy a -> Envoy b, app b -> Envoy b
    # -> Envoy a. The two hops into the apps stay on TCP.
    assert counters[Counter.COUNTER_MSG_BYTES_REDIRECTED] == 4 * PAYLOAD
    assert PAYLOAD <= lo_sent < PAYLOAD + PAYLOAD // 4  # only Envoy a -> app a crossed lo
    assert counters[Counter.COUNTER_ERROR_MAP_UPDATE] == 0
    assert counters[Counter.COUNTER_ERROR_SOCKHASH_UPDATE] == 0


@BOTH_FAMILIES
def test_payload_skips_tcp_entirely_when_apps_are_targets(
    mesh: Node, datapath_factory, family: Family
) -> None:
    a, b = mesh.pods["a"], mesh.pods["b"]
    datapath = datapath_factory(SK_MSG_FEATURES)
    for pod in (a, b):
        datapath.put_pod(mesh_pod(pod, family, sk_msg_to_app=True))
    before = datapath.counters()
    b_lo_before = loopback_tx_bytes(b)

    lo_sent, _ = call_through_sidecars(a, b, family)

    counters = counters_since(datapath, before)
    print(f"\n[ebpf, apps too] pod a sent {lo_sent} bytes over lo; counters: {shown(counters)}")
    # All six hops: app a -> Envoy a -> Envoy b -> app b and back.
    assert counters[Counter.COUNTER_MSG_BYTES_REDIRECTED] == 6 * PAYLOAD
    # Handshakes, ACKs and FINs still use TCP; not a byte of payload does.
    assert lo_sent < 64 * 1024
    assert loopback_tx_bytes(b) - b_lo_before < 64 * 1024


@BOTH_FAMILIES
def test_pod_outside_the_set_is_left_to_iptables(path: MeshPath) -> None:
    b, c = path.pod("b"), path.pod("c")
    if path.datapath is not None:
        assert path.datapath.delete_pod(b.cgroup_id)
        path.mark()

    call_through_sidecars(c, b, path.family)  # netfilter answered SO_ORIGINAL_DST for both

    assert not any(path.counters().values())


@BOTH_FAMILIES
def test_call_from_unaccelerated_pod_into_accelerated_pod(path: MeshPath) -> None:
    b, c = path.pod("b"), path.pod("c")
    call_through_sidecars(c, b, path.family)

    counters = path.counters()
    # c's side is iptables' alone: nothing steered, every SO_ORIGINAL_DST from netfilter.
    assert counters[Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED] == 0
    assert counters[Counter.COUNTER_CONNECT_INBOUND_REDIRECTED] == 0
    assert counters[Counter.COUNTER_ORIGINAL_DST_ANSWERED] == 0
    # b's own hop, Envoy b -> app b, is accelerated whoever called.
    assert counters[Counter.COUNTER_CONNECT_SIDECAR_TO_OWN_POD] == (1 if path.accelerated else 0)


@BOTH_FAMILIES
def test_connect_time_steering_alone_leaves_bytes_to_tcp(
    mesh: Node, datapath_factory, family: Family
) -> None:
    """sk_msg off (connect-time steering only): both sidecars are reached without netfilter
    NAT, and every byte still takes TCP with its flow control."""
    a, b = mesh.pods["a"], mesh.pods["b"]
    datapath = datapath_factory(CONNECT_FEATURES)
    for pod in (a, b):
        datapath.put_pod(mesh_pod(pod, family))

    lo_sent, _ = call_through_sidecars(a, b, family)

    counters = datapath.counters()
    assert counters[Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED] == 1
    assert counters[Counter.COUNTER_CONNECT_INBOUND_REDIRECTED] == 1
    assert counters[Counter.COUNTER_ORIGINAL_DST_ANSWERED] == 2
    assert counters[Counter.COUNTER_SOCKHASH_ADDED] == 0
    assert counters[Counter.COUNTER_MSG_REDIRECTED] == 0
    assert lo_sent >= 2 * PAYLOAD


def test_a_dual_stack_pod_is_reached_on_both_families(mesh: Node, datapath_factory) -> None:
    """Pods a and b put in with both addresses: b's app is called over IPv4, then over IPv6,
    and each call takes the accelerated path of its family, hop by hop as under the mesh's
    rules, every payload byte into the sidecars redirected."""
    a, b = mesh.pods["a"], mesh.pods["b"]
    datapath = datapath_factory(SK_MSG_FEATURES)
    for pod in (a, b):
        datapath.put_pod(mesh_pod(pod, "ipv6"))
    assert datapath.pod(b.cgroup_id) == mesh_pod(b, "ipv6")

    for family in FAMILIES:
        before = datapath.counters()
        lo_sent, served_from = call_through_sidecars(a, b, family)
        counters = counters_since(datapath, before)
        moved = shown(counters)
        source = address_prefix(passthrough_source(b, family))
        assert served_from.startswith(source), (family, served_from)
        assert counters[Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED] == 1, (family, moved)
        assert counters[Counter.COUNTER_CONNECT_INBOUND_REDIRECTED] == 1, (family, moved)
        assert counters[Counter.COUNTER_CONNECT_SIDECAR_TO_OWN_POD] == 1, (family, moved)
        assert counters[Counter.COUNTER_ORIGINAL_DST_ANSWERED] == 2, (family, moved)
        assert counters[Counter.COUNTER_MSG_BYTES_REDIRECTED] == 4 * PAYLOAD, (family, moved)
        assert PAYLOAD <= lo_sent < PAYLOAD + PAYLOAD // 4, (family, lo_sent)
