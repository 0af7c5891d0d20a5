"""Application hops of short-lived connections stay on TCP (docs/datapath.md, "Short-lived
connections"), through both Envoys in the default configuration.

A socket joining a sockhash costs a psock to make and free; a connection that carries one
message saves less than that. Each pod learns from its application connections' first and
second sends (app_reuse) whether they are reused, and connect4 leaves the application hops of a
pod whose connections send once to TCP, but for one probe in APP_REUSE_PROBE; a connection that
sends again makes the pod learn anew. The counts below are exact: every client connection here
starts after the previous one's answer, so each pod's record has seen it when the next connects,
and the connections of a scenario come from one client process, milliseconds apart, so that no
gap between them but the one a test makes reaches APP_REUSE_PAUSE_NS.
"""

from __future__ import annotations

import json
import time
from ipaddress import IPv4Address, IPv6Address, ip_address
from math import ceil
from typing import Any

import pytest

from meshaccel.agent import layout, libbpf
from meshaccel.agent.datapath import DEFAULT_FEATURES, AppConnectionUse, Datapath
from meshaccel.agent.layout import AppReuse, AppReuseLimits, Counter
from tests.datapath.conftest import ERRORS, FALLBACKS, istio_pod, shown
from tests.netlab import ECHO_PORT, Node, Pod
from tests.netlab.app_handles import apps_argv
from tests.netlab.families import Family
from tests.netlab.fixtures import BOTH_FAMILIES

pytestmark = pytest.mark.kernel

APP_REUSE_SAMPLES = AppReuseLimits.APP_REUSE_SAMPLES
APP_REUSE_PROBE = AppReuseLimits.APP_REUSE_PROBE
APP_REUSE_WINDOW = AppReuseLimits.APP_REUSE_WINDOW
APP_REUSE_PAUSE = AppReuseLimits.APP_REUSE_PAUSE_NS / 1e9
REQUEST_SIZE = 512


def exchange(client: Pod, server: Pod, family: Family, *plan: tuple[int, int]) -> None:
    """Echoed requests from ``client``'s app to ``server``'s echo server, one client process
    following ``plan``: (connections, requests on each) in order, one connection after the
    other; every answer compared."""
    argv = [
        "rr-client",
        *("--host", server.host(family), "--port", str(ECHO_PORT)),
        *("--size", str(REQUEST_SIZE), "--duration", "60"),
        *("--plan", ",".join(f"{connections}x{requests}" for connections, requests in plan)),
    ]
    completed = client.run_to_completion(apps_argv(*argv), timeout=90)
    report: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    assert completed.returncode == 0 and not report["errors"], report
    assert report["connections"] == sum(connections for connections, _ in plan), report
    assert report["requests"] == sum(c * requests for c, requests in plan), report


def on_tcp_after(connections: int) -> int:
    """Application hops a pod leaves to TCP over its first ``connections`` one-request ones."""
    after_learning = max(0, connections - APP_REUSE_SAMPLES)
    return after_learning - ceil(after_learning / APP_REUSE_PROBE)


def reuse_of(datapath: Datapath, pod: Pod, family: Family) -> tuple[int, int, int] | None:
    """The pod's app_reuse record for ``family``: (connections, reused, skipped)."""
    with libbpf.Map.from_pin(datapath.pins.map("app_reuse")) as bpf_map:
        raw = bpf_map.lookup(bytes(layout.address(pod.host(family))))
    if raw is None:
        return None
    record = AppReuse.from_buffer_copy(raw)
    return record.connections, record.reused, record.skipped


def judged_by_counts(datapath: Datapath) -> dict[IPv4Address | IPv6Address, AppConnectionUse]:
    """The agent's reading of every record as connect4 judges a connect while the pods keep
    connecting: at the earliest record's last connect no record is paused, whatever time the
    test machine took since (the pause has a test of its own)."""
    with libbpf.Map.from_pin(datapath.pins.map("app_reuse")) as bpf_map:
        records = [AppReuse.from_buffer_copy(raw) for _, raw in bpf_map.items()]
    return datapath.app_connections(now_ns=min(r.last_connect_ns for r in records))


def loaded(mesh: Node, datapath_factory: Any, family: Family) -> Datapath:
    datapath: Datapath = datapath_factory(DEFAULT_FEATURES)
    for pod in (mesh.pods["a"], mesh.pods["b"]):
        datapath.put_pod(istio_pod(pod, family))
    return datapath


@BOTH_FAMILIES
def test_a_connection_per_request_leaves_application_hops_to_tcp(
    mesh: Node, datapath_factory: Any, family: Family
) -> None:
    """100 connections of one request each. In pod a the app's connections to its sidecar, in
    pod b its sidecar's to the app: the first APP_REUSE_SAMPLES of each join and teach the pod
    that they send once; of the rest, every APP_REUSE_PROBE-th joins (a probe) and the others
    stay on TCP. The sidecars' hop is on sk_msg throughout; every answer is exact."""
    a, b = mesh.pods["a"], mesh.pods["b"]
    datapath = loaded(mesh, datapath_factory, family)
    connections = 100
    exchange(a, b, family, (connections, 1))

    after_learning = connections - APP_REUSE_SAMPLES
    probes = after_learning - on_tcp_after(connections)
    expected = (APP_REUSE_SAMPLES + probes, 0, after_learning)
    assert reuse_of(datapath, a, family) == expected
    assert reuse_of(datapath, b, family) == expected
    # What /v1/pods shows of them: the agent judges a record as connect4 does. And app_reuse
    # holds one record per pod, under the address connect4 knows it by: a pod's connections
    # teach its own record, and decide only how its own application hops are carried.
    use = AppConnectionUse(connections=expected[0], reused=0, short_lived=True)
    assert judged_by_counts(datapath) == {ip_address(p.host(family)): use for p in (a, b)}
    counters = datapath.counters()
    assert counters[Counter.COUNTER_APP_HOP_ON_TCP] == 2 * on_tcp_after(connections), shown(
        counters
    )
    assert not any(counters[c] for c in (*FALLBACKS, *ERRORS)), shown(counters)
    # Requests and answers between the sidecars, and each joined application hop's one send.
    joined = APP_REUSE_SAMPLES + probes
    assert counters[Counter.COUNTER_MSG_REDIRECTED] == 2 * connections + 2 * joined, shown(counters)


@BOTH_FAMILIES
def test_a_pod_whose_connections_are_reused_again_learns_anew(
    mesh: Node, datapath_factory: Any, family: Family
) -> None:
    """After 40 one-request connections both pods count as short-lived. The app then sends two
    requests per connection: the first such connection is a probe, its second send starts the
    pods' learning over, and no later application hop is left to TCP."""
    a, b = mesh.pods["a"], mesh.pods["b"]
    datapath = loaded(mesh, datapath_factory, family)
    assert (40 - APP_REUSE_SAMPLES) % APP_REUSE_PROBE == 0  # the 41st application hop: a probe
    exchange(a, b, family, (40, 1), (20, 2))
    counters = datapath.counters()
    assert counters[Counter.COUNTER_APP_HOP_ON_TCP] == 2 * on_tcp_after(40), shown(counters)
    # Learned anew from the second connection on: 19 connections, each sent twice.
    assert reuse_of(datapath, a, family) == (19, 19, 0)
    assert reuse_of(datapath, b, family) == (19, 19, 0)
    assert not any(counters[c] for c in (*FALLBACKS, *ERRORS)), shown(counters)


@BOTH_FAMILIES
def test_a_pause_in_connects_starts_the_record_over(
    mesh: Node, datapath_factory: Any, family: Family
) -> None:
    """42 one-request connections: the last application hop of each pod stays on TCP (it is
    no probe). After a pause of more than APP_REUSE_PAUSE_NS the next one joins and the
    records start over: a pod that connects rarely gains nothing from skipping, and a long
    connection after a burst of short ones gets the whole path."""
    a, b = mesh.pods["a"], mesh.pods["b"]
    datapath = loaded(mesh, datapath_factory, family)
    assert on_tcp_after(42) == on_tcp_after(41) + 1  # the 42nd application hop: no probe
    exchange(a, b, family, (42, 1))
    on_tcp = datapath.counters()[Counter.COUNTER_APP_HOP_ON_TCP]
    assert on_tcp == 2 * on_tcp_after(42)

    time.sleep(APP_REUSE_PAUSE + 0.2)  # the condition under test, not a wait for an outcome
    # Paused: the records still count short-lived connections, but the next connect starts
    # them over, and the agent says so already.
    assert {use.short_lived for use in datapath.app_connections().values()} == {False}
    exchange(a, b, family, (1, 1))
    counters = datapath.counters()
    assert counters[Counter.COUNTER_APP_HOP_ON_TCP] == on_tcp, shown(counters)
    assert reuse_of(datapath, a, family) == (1, 0, 0)
    assert reuse_of(datapath, b, family) == (1, 0, 0)


def test_reused_connections_never_stay_on_tcp(mesh: Node, datapath_factory: Any) -> None:
    """80 connections of 3 requests each: every one counts as reused, none is left to TCP. The
    record is halved when it reaches APP_REUSE_WINDOW connections (at the 65th), so it keeps
    to the recent ones."""
    a, b = mesh.pods["a"], mesh.pods["b"]
    datapath = loaded(mesh, datapath_factory, "ipv4")
    exchange(a, b, "ipv4", (80, 3))
    counters = datapath.counters()
    assert counters[Counter.COUNTER_APP_HOP_ON_TCP] == 0, shown(counters)
    halved = APP_REUSE_WINDOW // 2 + (80 - APP_REUSE_WINDOW)
    assert reuse_of(datapath, a, "ipv4") == (halved, halved, 0)
    assert reuse_of(datapath, b, "ipv4") == (halved, halved, 0)
    use = AppConnectionUse(connections=halved, reused=halved, short_lived=False)
    assert judged_by_counts(datapath) == {ip_address(p.host("ipv4")): use for p in (a, b)}


def test_the_agent_reads_a_record_at_its_bounds_as_connect4_decides(
    mesh: Node, datapath_factory: Any
) -> None:
    """APP_REUSE_SAMPLES connections sending once are short-lived (connect4 judges the next
    one so: the first test's exact counts). 16 connections of which 8 sent twice are not: half
    reused is not short-lived, as the agent reads the record and as connect4 decides (a 17th
    is neither left to TCP nor a probe: nothing counts it as skipped); that 17th, sending once,
    tips the record over."""
    a, b = mesh.pods["a"], mesh.pods["b"]
    datapath = loaded(mesh, datapath_factory, "ipv4")
    pods = [ip_address(p.host("ipv4")) for p in (a, b)]

    def starting_over(*plan: tuple[int, int]) -> None:
        with libbpf.Map.from_pin(datapath.pins.map("app_reuse")) as bpf_map:
            for key in [key for key, _ in bpf_map.items()]:
                bpf_map.delete(key)
        exchange(a, b, "ipv4", *plan)

    starting_over((APP_REUSE_SAMPLES, 1))
    use = AppConnectionUse(connections=APP_REUSE_SAMPLES, reused=0, short_lived=True)
    assert judged_by_counts(datapath) == dict.fromkeys(pods, use)

    starting_over((7, 1), (8, 2), (1, 1))
    use = AppConnectionUse(connections=16, reused=8, short_lived=False)
    assert judged_by_counts(datapath) == dict.fromkeys(pods, use)

    starting_over((7, 1), (8, 2), (1, 1), (1, 1))
    assert reuse_of(datapath, a, "ipv4") == (17, 8, 0)
    assert reuse_of(datapath, b, "ipv4") == (17, 8, 0)
    use = AppConnectionUse(connections=17, reused=8, short_lived=True)
    assert judged_by_counts(datapath) == dict.fromkeys(pods, use)
