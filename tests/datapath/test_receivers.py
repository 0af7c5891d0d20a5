"""Receivers that fall behind or read without copying, through both Envoys in the default
configuration: a sender never outruns its receiver's memory, and no byte is lost or stalls.

Receiver-aware delivery (docs/datapath.md): sk_msg moves a direction's bytes socket to socket
only while its receiver keeps its unread queue under the budget, then that direction takes TCP
for good. Request/response traffic never reaches the budget; a bulk stream into a slow reader
does, and then costs the node what the same transfer costs under iptables.

Every scenario runs over both families (``BOTH_FAMILIES``), the slow bulk readers included.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from meshaccel.agent.datapath import DEFAULT_FEATURES, default_objects_dir
from meshaccel.agent.layout import Counter, DatapathFeatures
from meshaccel.agent.probes import probe_splice
from tests.datapath.conftest import (
    ERRORS,
    FALLBACKS,
    MeshPath,
    assert_redirected_until_fallback,
    istio_pod,
    shown,
)
from tests.netlab import ECHO_PORT, Node
from tests.netlab.app_handles import apps_argv
from tests.netlab.families import Family
from tests.netlab.fixtures import BOTH_FAMILIES
from tests.netlab.processes import PodProcess
from tests.netlab.tcpmem import PeakSampler, read_tcp_mem_limits
from tests.requirements import require_tool
from tests.waiting import wait_until

pytestmark = pytest.mark.kernel

SLOW_PORT = 8201
SLOW_SPLICE_PORT = 8202
GO_PROXY_PORT = 8300
GO_PROXY6_PORT = 8301
READ_PAUSE = 0.001  # seconds after every 64 KiB read: about 40 MiB/s, far below the sender
GO_PROXY_SOURCE = Path(__file__).parents[1] / "netlab" / "go" / "iocopy_proxy.go"


@pytest.fixture(scope="module", autouse=True)
def slow_readers(mesh: Node) -> None:
    b = mesh.pods["b"]
    for port, read_api in ((SLOW_PORT, "recv"), (SLOW_SPLICE_PORT, "splice")):
        if port not in b.servers:
            b.start_echo_server(port, read_api=read_api, read_pause=READ_PAUSE)


def listening(proxy: PodProcess) -> bool:
    return "listening" in proxy.stdout()


@pytest.fixture(scope="module")
def go_proxies(mesh: Node, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[Family, int]]:
    """Go's io.Copy between two TCP connections (it splices), as pod b's application on
    GO_PROXY_PORT, in front of b's own echo server (reached on b's own address: not steered);
    on GO_PROXY6_PORT the same over IPv6, to b's own IPv6 address."""
    go = require_tool("go")
    build = tmp_path_factory.mktemp("go")
    binary = build / "iocopy-proxy"
    env = {"GOCACHE": str(build / "cache"), "HOME": str(build), "PATH": "/usr/bin:/bin"}
    subprocess.run(
        [go, "build", "-o", str(binary), str(GO_PROXY_SOURCE)], check=True, env=env, cwd=build
    )
    b = mesh.pods["b"]
    proxies = (
        (f"0.0.0.0:{GO_PROXY_PORT}", b.address(ECHO_PORT)),
        (f"[::]:{GO_PROXY6_PORT}", b.address(ECHO_PORT, "ipv6")),
    )
    for listen, upstream in proxies:
        proxy = b.run([str(binary), listen, upstream], name="iocopy-proxy")
        wait_until(partial(listening, proxy), timeout=10, what="the Go proxy")
    yield {"ipv4": GO_PROXY_PORT, "ipv6": GO_PROXY6_PORT}
    shutil.rmtree(build / "cache", ignore_errors=True)


@BOTH_FAMILIES
def test_slow_reader_costs_the_node_no_more_than_iptables(
    mesh: Node, datapath_factory, family: Family
) -> None:
    """64 MiB each way into a reader that sleeps between reads: under iptables first, then
    with meshaccel's defaults. No ENOMEM, no EPIPE, every byte echoed; TCP memory stays under
    the node's pressure threshold and at most twice what iptables cost."""
    a, b = mesh.pods["a"], mesh.pods["b"]
    with PeakSampler(interval=0.005) as iptables:
        control = a.echo_client(b.host(family), SLOW_PORT, nbytes=64 << 20, timeout=180)
    assert control.ok, control.raw

    datapath = datapath_factory(DEFAULT_FEATURES)
    for pod in (a, b):
        datapath.put_pod(istio_pod(pod, family))
    with PeakSampler(interval=0.005) as accelerated:
        result = a.echo_client(b.host(family), SLOW_PORT, nbytes=64 << 20, timeout=180)
    counters = datapath.counters()
    limits = read_tcp_mem_limits()
    assert limits is not None
    print(
        f"\nTCP memory grown (pages): iptables {iptables.grown}, meshaccel {accelerated.grown} "
        f"(peak {accelerated.peak}, pressure at {limits.pressure_pages}); "
        f"counters: {shown(counters)}"
    )
    assert result.ok, result.raw
    assert counters[Counter.COUNTER_FALLBACK_BUDGET] >= 1, shown(counters)  # bulk falls back
    assert_redirected_until_fallback(counters, hops=4, nbytes=64 << 20)
    assert accelerated.peak is not None and accelerated.peak < limits.pressure_pages
    assert accelerated.grown <= 2 * max(iptables.grown, 1)


@BOTH_FAMILIES
def test_request_response_never_falls_back(mesh: Node, datapath_factory, family: Family) -> None:
    """16 KiB requests answered one at a time: every receiver reads what it is sent before its
    answer goes back, so no direction ever reaches the budget and every hop into a sidecar
    stays socket to socket."""
    a, b = mesh.pods["a"], mesh.pods["b"]
    datapath = datapath_factory(DEFAULT_FEATURES)
    for pod in (a, b):
        datapath.put_pod(istio_pod(pod, family))
    size = 16 << 10
    argv = ["rr-client", "--host", b.host(family), "--port", str(ECHO_PORT), "--size", str(size)]
    completed = a.run_to_completion(apps_argv(*argv, "--duration", "1"), timeout=30)
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    counters = datapath.counters()
    assert completed.returncode == 0 and not report["errors"], report
    assert report["requests"] > 0
    assert not any(counters[c] for c in (*FALLBACKS, *ERRORS)), shown(counters)
    # App a -> Envoy a -> Envoy b and app b -> Envoy b -> Envoy a: four hops into sidecars.
    assert counters[Counter.COUNTER_MSG_BYTES_REDIRECTED] == 4 * size * report["requests"]


@BOTH_FAMILIES
def test_splice_reader_behind_a_slow_pace_gets_every_byte(path: MeshPath) -> None:
    """An application reading with os.splice(), slowly: its socket is no redirect target by
    default, so it reads TCP as always."""
    a, b = path.pod("a"), path.pod("b")
    result = a.echo_client(path.host(b), SLOW_SPLICE_PORT, nbytes=16 << 20, timeout=120)
    assert result.ok, result.raw
    if path.accelerated:
        assert_redirected_until_fallback(path.counters(), hops=4, nbytes=16 << 20)


@pytest.mark.parametrize(
    ("family", "connections"),
    [("ipv4", 1), ("ipv4", 16), ("ipv6", 16)],
    ids=["ipv4-1", "ipv4-16", "ipv6-16"],
)
def test_go_io_copy_proxy_as_the_application(
    path: MeshPath, go_proxies: dict[Family, int], connections: int
) -> None:
    """Go's io.Copy splices in both directions: from its sockets (TCP, as by default nothing
    is redirected into an application) and into them (sk_msg runs for those sends)."""
    a, b = path.pod("a"), path.pod("b")
    result = a.echo_client(
        path.host(b),
        go_proxies[path.family],
        nbytes=16 << 20,
        connections=connections,
        timeout=120,
    )
    assert result.ok, [c for c in result.connections if not c.get("exact")][:3]
    if path.accelerated:
        counters = path.counters()
        assert counters[Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED] == connections
        assert counters[Counter.COUNTER_CONNECT_INBOUND_REDIRECTED] == connections
        # Go listens on 0.0.0.0 with a dual-stack IPv6 socket: the sockets it accepts are
        # IPv4-mapped, and join like the other seven of each connection's four hops.
        assert counters[Counter.COUNTER_SOCKHASH_ADDED] == 8 * connections, counters
        assert_redirected_until_fallback(
            counters, hops=4, nbytes=connections * (16 << 20), connections=connections
        )


def test_the_kernel_is_asked_whether_splice_reads_redirected_bytes(datapath_factory) -> None:
    """The probe sends a real byte through sk_msg into a real socket: it must arrive (or the
    answer would mean nothing), and a datapath loaded here makes every application a target
    exactly when splice() read it (6.18: it did not, tcp_bpf has no splice_read)."""
    probe = probe_splice(default_objects_dir())
    print(f"\nsplice probe on this kernel: {probe}")
    assert probe.redirected
    datapath = datapath_factory(DEFAULT_FEATURES)
    every_app = DatapathFeatures.FEATURE_SK_MSG_TO_EVERY_APP in datapath.features
    assert every_app == probe.spliced


@BOTH_FAMILIES
def test_every_application_takes_msg_where_the_kernel_can_splice(
    mesh: Node, datapath_factory, family: Family
) -> None:
    """Where the probe says splice() reads redirected bytes, no pod needs to opt in: every
    application socket is a target, so all six hops of a call skip TCP."""
    a, b = mesh.pods["a"], mesh.pods["b"]
    datapath = datapath_factory(DEFAULT_FEATURES, splice_probe=lambda _: True)
    assert DatapathFeatures.FEATURE_SK_MSG_TO_EVERY_APP in datapath.features
    for pod in (a, b):
        datapath.put_pod(istio_pod(pod, family))  # no sk_msg_to_app
    result = a.echo_client(b.host(family), ECHO_PORT, nbytes=1 << 20)
    assert result.ok, result.raw
    assert_redirected_until_fallback(datapath.counters(), hops=6, nbytes=1 << 20)


def test_no_application_takes_msg_where_the_kernel_cannot_splice(datapath_factory) -> None:
    """The feature is the kernel's answer, never a caller's: asking for it changes nothing."""
    datapath = datapath_factory(
        DEFAULT_FEATURES | DatapathFeatures.FEATURE_SK_MSG_TO_EVERY_APP,
        splice_probe=lambda _: False,
    )
    assert DatapathFeatures.FEATURE_SK_MSG_TO_EVERY_APP not in datapath.features
