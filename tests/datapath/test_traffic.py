"""Scenario 6: hard traffic through the accelerated mesh stays byte-exact and never hangs.

The bulk, concurrency, close and reset scenarios run for each mesh (``EVERY_MESH``), the read
APIs on Istio's pods, all over both families (``BOTH_FAMILIES``).
"""

from __future__ import annotations

import pytest

from meshaccel.agent.datapath import SK_MSG_FEATURES, Datapath
from meshaccel.agent.layout import Counter
from tests.datapath.conftest import MeshPath, assert_redirected_until_fallback, istio_pod
from tests.netlab import ECHO_PORT, Node
from tests.netlab.families import Family
from tests.netlab.fixtures import BOTH_FAMILIES, EVERY_MESH, ISTIO_ONLY
from tests.waiting import wait_until

pytestmark = pytest.mark.kernel

READ_APIS = ("read", "recv", "recv_into", "recvmsg", "readinto", "readv", "splice")
FIRST_API_PORT = 8101


def api_port(read_api: str) -> int:
    return FIRST_API_PORT + READ_APIS.index(read_api)


@pytest.fixture(scope="module")
def read_api_servers(mesh: Node) -> None:
    """Pod b's apps reading with every read API, one port each."""
    b = mesh.pods["b"]
    for read_api in READ_APIS:
        if api_port(read_api) not in b.servers:
            b.start_echo_server(api_port(read_api), read_api=read_api)


def wait_connections_forgotten(datapath: Datapath | None) -> None:
    """Closed sockets leave the sockhashes (their storage goes with them)."""
    if datapath is not None:
        empty = {"msg_senders": 0, "msg_receivers": 0}
        wait_until(lambda: datapath.sockets() == empty, timeout=10, what="empty sockhashes")


@EVERY_MESH
@BOTH_FAMILIES
def test_64_mib_each_way_on_one_connection(path: MeshPath) -> None:
    a, b = path.pod("a"), path.pod("b")
    result = a.echo_client(path.host(b), ECHO_PORT, nbytes=64 << 20, timeout=120)
    assert result.ok, result.raw
    if path.accelerated:
        assert_redirected_until_fallback(path.counters(), hops=4, nbytes=64 << 20)
    wait_connections_forgotten(path.datapath)


@EVERY_MESH
@BOTH_FAMILIES
def test_200_concurrent_connections(path: MeshPath) -> None:
    a, b = path.pod("a"), path.pod("b")
    result = a.echo_client(path.host(b), ECHO_PORT, nbytes=64 << 10, connections=200, timeout=60)
    assert result.ok, [c for c in result.connections if not c.get("exact")][:3]
    assert len(result.connections) == 200
    if path.accelerated:
        counters = path.counters()
        assert counters[Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED] == 200
        assert counters[Counter.COUNTER_CONNECT_INBOUND_REDIRECTED] == 200
        assert counters[Counter.COUNTER_ERROR_SOCKHASH_UPDATE] == 0
    wait_connections_forgotten(path.datapath)


@EVERY_MESH
@BOTH_FAMILIES
@pytest.mark.parametrize("half_close", [True, False], ids=["half-close", "full-close"])
def test_close_styles(path: MeshPath, half_close: bool) -> None:
    a, b = path.pod("a"), path.pod("b")
    result = a.echo_client(path.host(b), ECHO_PORT, nbytes=256 << 10, half_close=half_close)
    assert result.ok, result.raw
    wait_connections_forgotten(path.datapath)


@EVERY_MESH
@BOTH_FAMILIES
def test_reset_mid_stream_then_the_server_still_serves(path: MeshPath) -> None:
    a, b = path.pod("a"), path.pod("b")
    reset = a.echo_client(path.host(b), ECHO_PORT, nbytes=1 << 20, reset_after=256 << 10)
    assert reset.ok and reset.reset, reset.raw
    assert reset.verified == [256 << 10]

    after = a.echo_client(path.host(b), ECHO_PORT, nbytes=64 << 10)
    assert after.ok, after.raw
    wait_connections_forgotten(path.datapath)


@ISTIO_ONLY
@BOTH_FAMILIES
@pytest.mark.usefixtures("read_api_servers")
@pytest.mark.parametrize("read_api", READ_APIS)
def test_receiving_app_reads_with_any_api(path: MeshPath, read_api: str) -> None:
    a, b = path.pod("a"), path.pod("b")
    result = a.echo_client(path.host(b), api_port(read_api), nbytes=4 << 20, timeout=30)
    assert result.ok, result.raw
    if path.accelerated:
        assert_redirected_until_fallback(path.counters(), hops=4, nbytes=4 << 20)


@ISTIO_ONLY
@BOTH_FAMILIES
@pytest.mark.usefixtures("read_api_servers")
@pytest.mark.parametrize("read_api", [api for api in READ_APIS if api != "splice"])
def test_apps_as_redirect_targets_read_with_copying_apis(
    mesh: Node, datapath_factory, read_api: str, family: Family
) -> None:
    """Pods that opt in (sk_msg_to_app): bytes land in the apps' own sockets too. Not for
    apps that read with splice(), which cannot see sk_msg's queue (docs/datapath.md)."""
    a, b = mesh.pods["a"], mesh.pods["b"]
    datapath = datapath_factory(SK_MSG_FEATURES)
    for pod in (a, b):
        datapath.put_pod(istio_pod(pod, family, sk_msg_to_app=True))
    result = a.echo_client(b.host(family), api_port(read_api), nbytes=4 << 20, timeout=30)
    assert result.ok, result.raw
    assert_redirected_until_fallback(datapath.counters(), hops=6, nbytes=4 << 20)
