"""DNS capture: an application's queries go to its proxy's DNS server, as the mesh's rules send
them, and its sockets still say they talked to the server they asked.

Per mesh that captures DNS (Istio with DNS proxying, Kuma's built-in DNS), a node of three pods:
a, whose mesh rules capture DNS; b, whose rules do not; c, no mesh, the "upstream" server on
port 53. Pods a and b run a DNS stand-in for the proxy's on 127.0.0.1:15053 that answers
``PROXY_ANSWER``; c's answers ``UPSTREAM_ANSWER``. A real resolver client (tests/netlab/dns.py)
asks c over unconnected UDP (sendto), connected UDP and TCP, as the application or as the proxy.
The ``iptables`` path is the reference; the ``ebpf`` path (meshaccel loaded, the pod given
``dns_capture``) must give the same answers, with the datapath's counters showing that the
programs, not iptables, did it. Every scenario runs over IPv4 and over IPv6 (c's IPv6 address;
the proxy's DNS stand-ins listen on [::1]:15053 too, where ip6tables' REDIRECT sends a query).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshaccel.agent.datapath import Datapath
from meshaccel.agent.layout import Counter
from meshaccel.contract.modes import MeshModeName
from tests.datapath.conftest import forget_conntrack, load_datapath, mesh_pod, shown, unload_quietly
from tests.netlab import ISTIO_LAB, KUMA_LAB, Node, Pod
from tests.netlab.families import Family, format_address
from tests.netlab.fixtures import BOTH_FAMILIES, _assert_nothing_left
from tests.netlab.mesh import MeshPodSpec, mesh_node
from tests.netlab.processes import RunAs
from tests.requirements import require_btf
from tests.waiting import wait_until

pytestmark = pytest.mark.kernel

DNS_SCRIPT = Path(__file__).resolve().parents[1] / "netlab" / "dns.py"
PROXY_DNS_PORT = 15053
PROXY_ANSWER = "192.0.2.15"
UPSTREAM_ANSWER = "192.0.2.53"
TRANSPORTS = ("udp", "udp-connected", "tcp")

# (pod a's mesh: captures DNS, pod b's: the same mesh without DNS capture)
DNS_MESHES = {
    MeshModeName.ISTIO: (dataclasses.replace(ISTIO_LAB, dns_port=PROXY_DNS_PORT), ISTIO_LAB),
    MeshModeName.KUMA: (KUMA_LAB, dataclasses.replace(KUMA_LAB, dns_port=None)),
}

Answers = dict[str, dict[str, Any]]  # transport -> what the client saw


def dns_argv(*arguments: str) -> list[str]:
    return [sys.executable, "-u", str(DNS_SCRIPT), *arguments]


def start_dns_server(pod: Pod, addresses: tuple[str, ...], port: int, answer: str) -> None:
    listen = [argument for address in addresses for argument in ("--address", address)]
    server = pod.run(
        dns_argv("server", *listen, "--port", str(port), "--answer", answer), name="dns-server"
    )

    def listening() -> bool:
        if not server.is_running():
            raise RuntimeError(server.describe())
        return '"listening"' in server.stdout()

    wait_until(listening, timeout=10, what=f"the DNS stand-in in {pod.name}")


@pytest.fixture(scope="module", params=list(DNS_MESHES), ids=[str(m) for m in DNS_MESHES])
def dns_node(request: pytest.FixtureRequest, netlab_requirements: None) -> Iterator[Node]:
    require_btf()
    capturing, plain = DNS_MESHES[request.param]
    specs = (
        MeshPodSpec("a", mesh=capturing),
        MeshPodSpec("b", mesh=plain),
        MeshPodSpec("c", mesh=plain, interception=None, sidecar=False, echo_ports=()),
    )
    node = mesh_node(specs)
    with node:
        for name in ("a", "b"):
            start_dns_server(node.pods[name], ("127.0.0.1", "::1"), PROXY_DNS_PORT, PROXY_ANSWER)
        start_dns_server(node.pods["c"], ("0.0.0.0", "::"), 53, UPSTREAM_ANSWER)
        yield node
    _assert_nothing_left(node.token)


@pytest.fixture
def datapath(dns_node: Node) -> Iterator[Datapath]:
    forget_conntrack(dns_node)
    try:
        yield load_datapath(dns_node)
    finally:
        unload_quietly(dns_node)


def ask(pod: Pod, server: Pod, family: Family = "ipv4", *, run_as: RunAs | None = None) -> Answers:
    """One query per transport from ``pod`` to ``server``:53 over ``family``."""
    answers: Answers = {}
    for transport in TRANSPORTS:
        argv = ["query", "--server", server.host(family), "--transport", transport]
        if run_as is not None:
            argv += ["--run-as", f"{run_as.uid}:{run_as.gid}"]
        done = pod.run_to_completion(dns_argv(*argv), timeout=30)
        assert done.returncode == 0, f"{transport}: {done.stderr}"
        answers[transport] = json.loads(done.stdout)
    return answers


def expected(server: Pod, answer: str, family: Family = "ipv4") -> Answers:
    """What a resolver sees when ``answer`` comes back, addressed as from ``server``:53."""
    upstream = format_address(server.ip_of(family), 53)
    return {
        "udp": {"answer": answer, "source": upstream, "peer": None},
        "udp-connected": {"answer": answer, "source": upstream, "peer": upstream},
        "tcp": {"answer": answer, "source": None, "peer": upstream},
    }


def dns_counters(datapath: Datapath | None) -> dict[Counter, int]:
    return datapath.counters() if datapath is not None else dict.fromkeys(Counter, 0)


@pytest.fixture(params=["iptables", "ebpf"])
def path(request: pytest.FixtureRequest, dns_node: Node) -> Iterator[Datapath | None]:
    if request.param == "iptables":
        yield None
        return
    yield request.getfixturevalue("datapath")


@BOTH_FAMILIES
def test_application_dns_goes_to_the_proxy_the_proxy_s_own_does_not(
    dns_node: Node, path: Datapath | None, family: Family
) -> None:
    """Pod a: the app's queries are answered by the proxy's DNS server yet look answered by the
    server asked; the proxy's own queries reach that server. Same on both paths."""
    a, c = dns_node.pods["a"], dns_node.pods["c"]
    if path is not None:
        path.put_pod(mesh_pod(a, family, dns_capture=True))
    before = dns_counters(path)

    assert ask(a, c, family) == expected(c, PROXY_ANSWER, family)
    assert a.mesh is not None
    assert ask(a, c, family, run_as=a.mesh.proxy) == expected(c, UPSTREAM_ANSWER, family)

    if path is not None:
        after = path.counters()
        moved = {counter: after[counter] - before[counter] for counter in Counter}
        # connect: connected UDP and TCP; sendmsg: the unconnected datagram; both UDP replies.
        assert moved[Counter.COUNTER_DNS_CONNECT_CAPTURED] == 2, shown(moved)
        assert moved[Counter.COUNTER_DNS_DATAGRAM_CAPTURED] == 1, shown(moved)
        assert moved[Counter.COUNTER_DNS_REPLY_ADDRESS_RESTORED] == 2, shown(moved)
        assert moved[Counter.COUNTER_ERROR_SOCKET_STATE] == 0, shown(moved)
        print(f"\n{a.mesh.name} DNS counters: {shown(moved)}")


@BOTH_FAMILIES
def test_a_pod_without_dns_capture_is_untouched(
    dns_node: Node, path: Datapath | None, family: Family
) -> None:
    """Pod b, whose mesh does not capture DNS and which has no dns_capture: every query reaches
    the server asked, and the DNS programs count nothing."""
    b, c = dns_node.pods["b"], dns_node.pods["c"]
    if path is not None:
        path.put_pod(mesh_pod(b, family))
    before = dns_counters(path)

    assert ask(b, c, family) == expected(c, UPSTREAM_ANSWER, family)

    moved = {counter: n - before[counter] for counter, n in dns_counters(path).items()}
    for counter in (
        Counter.COUNTER_DNS_CONNECT_CAPTURED,
        Counter.COUNTER_DNS_DATAGRAM_CAPTURED,
        Counter.COUNTER_DNS_REPLY_ADDRESS_RESTORED,
    ):
        assert moved[counter] == 0, shown(moved)


@BOTH_FAMILIES
def test_the_datapath_alone_captures(dns_node: Node, datapath: Datapath, family: Family) -> None:
    """Pod b's rules do not capture DNS: with dns_capture, meshaccel's programs alone send its
    queries to the proxy's DNS server and give the replies the server asked."""
    b, c = dns_node.pods["b"], dns_node.pods["c"]
    datapath.put_pod(mesh_pod(b, family, dns_capture=True))
    assert ask(b, c, family) == expected(c, PROXY_ANSWER, family)
    assert b.mesh is not None
    assert ask(b, c, family, run_as=b.mesh.proxy) == expected(c, UPSTREAM_ANSWER, family)
    # Read back from the maps, the pod is what was put.
    assert datapath.pod(b.cgroup_id) == mesh_pod(b, family, dns_capture=True)
