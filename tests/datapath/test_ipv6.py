"""IPv6 and IPv4-mapped connections through the real objects, with plain sockets (no Envoy).

Each pod's "sidecar" is a small relay run as the sidecar uid: it listens dual-stack ([::]) on
Istio's outbound and inbound ports, asks the accepted socket for its original destination at
both levels (``SOL_IP``/``SO_ORIGINAL_DST`` and ``SOL_IPV6``/``IP6T_SO_ORIGINAL_DST``), connects
there as the sidecar and copies bytes both ways, reporting every address it saw. Applications
are an echo server and a client that reports what its own socket shows. Pods a and b are
accelerated dual-stack (b's echo server is reached through a's relay, b's relay and then its
passthrough), so every program meets IPv6 sockets, IPv4-mapped ones and plain IPv4 ones in one
connection. No ip6tables rules are installed: whatever is not steered reaches its real
destination, and what should have been steered and was not fails the relay's assertions.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import sys
from collections.abc import Iterator
from ipaddress import IPv4Network, IPv6Network
from typing import Any

import pytest

from meshaccel.agent.datapath import SK_MSG_FEATURES, Datapath
from meshaccel.agent.layout import FALLBACK_REASONS, Counter
from meshaccel.agent.pods import AcceleratedPod, Network
from meshaccel.contract.modes import ISTIO
from tests.datapath.conftest import (
    ERRORS,
    counters_since,
    istio_pod,
    load_datapath,
    shown,
    unload_quietly,
)
from tests.netlab import SIDECAR_IDENTITY, Node, Pod, PodProcess, find_leftovers
from tests.requirements import require_btf
from tests.waiting import wait_until

pytestmark = pytest.mark.kernel

APP_PORT = 8080
EXCLUDED_PORT = 9090
NBYTES = 64 << 10  # well within the redirect budget: every byte of a steered hop is redirected
DNS_SERVER6 = "fd00:198:18::53"  # nobody has it: only a captured query is answered
DNS_SERVER4 = "198.18.0.53"

# The sidecar stand-in: argv port. Prints "ready", then one JSON line per connection it relayed.
RELAY = r"""
import json, socket, sys, threading
ORIGINAL_DST = 80  # SO_ORIGINAL_DST and IP6T_SO_ORIGINAL_DST

def address(sockaddr):
    return [sockaddr[0], sockaddr[1]]

def original(sock):
    seen = {}
    for name, level in (("ipv4", socket.SOL_IP), ("ipv6", socket.IPPROTO_IPV6)):
        try:
            raw = sock.getsockopt(level, ORIGINAL_DST, 128)
        except OSError as err:
            seen[name] = {"errno": err.errno}
            continue
        family = int.from_bytes(raw[:2], sys.byteorder)
        port = int.from_bytes(raw[2:4], "big")
        if family == socket.AF_INET:
            host = socket.inet_ntop(socket.AF_INET, raw[4:8])
        else:
            host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        seen[name] = {"family": family, "address": [host, port], "len": len(raw)}
    return seen

def pump(src, dst):
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

def serve(conn):
    record = {"peer": address(conn.getpeername()), "local": address(conn.getsockname())}
    record["original"] = found = original(conn)
    answer = found["ipv6"] if "address" in found["ipv6"] else found["ipv4"]
    if "address" not in answer:
        print(json.dumps(record), flush=True)
        conn.close()
        return
    up = socket.create_connection(tuple(answer["address"]), timeout=10)
    record["upstream_peer"] = address(up.getpeername())
    record["upstream_local"] = address(up.getsockname())
    record["upstream_original"] = original(up)
    print(json.dumps(record), flush=True)
    back = threading.Thread(target=pump, args=(up, conn))
    back.start()
    pump(conn, up)
    back.join()
    up.close()
    conn.close()

listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
listener.bind(("::", int(sys.argv[1])))
listener.listen(64)
print("ready", flush=True)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

# An application server: argv ports. Echoes everything, dual-stack.
ECHO = r"""
import socket, sys, threading

def echo(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)

def serve(listener):
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()

for port in sys.argv[1:]:
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind(("::", int(port)))
    listener.listen(64)
    threading.Thread(target=serve, args=(listener,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

# An application client: argv family (inet, inet6) host port nbytes. Sends nbytes, reads the
# echo; prints what its socket showed and whether every byte came back exactly.
CLIENT = r"""
import json, socket, sys, threading
family, host, port, nbytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sock = socket.socket(socket.AF_INET6 if family == "inet6" else socket.AF_INET)
sock.settimeout(10)
sock.connect((host, port))
seen = {"peer": list(sock.getpeername()[:2]), "local": list(sock.getsockname()[:2])}
for name, level in (("ipv4", socket.SOL_IP), ("ipv6", socket.IPPROTO_IPV6)):
    try:
        raw = sock.getsockopt(level, 80, 128)
        seen[name] = {"len": len(raw), "family": int.from_bytes(raw[:2], sys.byteorder)}
    except OSError as err:
        seen[name] = {"errno": err.errno}
try:  # shorter than a sockaddr_in6: the kernel's own error stands
    seen["ipv6_short"] = {"len": len(sock.getsockopt(socket.IPPROTO_IPV6, 80, 16))}
except OSError as err:
    seen["ipv6_short"] = {"errno": err.errno}
payload = bytes(range(256)) * (nbytes // 256)
sender = threading.Thread(target=sock.sendall, args=(payload,))
sender.start()
got = bytearray()
while len(got) < len(payload):
    chunk = sock.recv(65536)
    if not chunk:
        break
    got += chunk
sender.join()
seen["exact"] = bytes(got) == payload
print(json.dumps(seen))
"""

# The proxy's DNS server stand-in: a dual-stack UDP socket on argv port answering "proxy".
DNS_PROXY = r"""
import socket, sys
server = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
server.bind(("::", int(sys.argv[1])))
print("ready", flush=True)
while True:
    query, source = server.recvfrom(512)
    server.sendto(b"proxy:" + query, source)
"""

# An application's DNS queries: unconnected (sendto) to each server, and connected to the first.
DNS_CLIENT = r"""
import json, socket, sys
answers = []
for server in sys.argv[1:]:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.settimeout(5)
    sock.sendto(b"query", (server, 53))
    data, source = sock.recvfrom(512)
    answers.append({"asked": server, "data": data.decode(), "source": list(source[:2])})
sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
sock.settimeout(5)
sock.connect((sys.argv[1], 53))
sock.send(b"connected")
data, source = sock.recvfrom(512)
answers.append(
    {"data": data.decode(), "source": list(source[:2]), "peer": list(sock.getpeername()[:2])}
)
print(json.dumps(answers))
"""


def python(script: str, *args: object) -> list[str]:
    return [sys.executable, "-u", "-c", script, *map(str, args)]


def started(process: PodProcess) -> PodProcess:
    wait_until(lambda: "ready" in process.stdout(), timeout=30, what=f"{process.describe()}")
    return process


@dataclasses.dataclass
class V6Lab:
    node: Node
    a: Pod
    b: Pod
    c: Pod
    relays: dict[str, PodProcess]


@pytest.fixture(scope="module")
def v6lab(netlab_requirements: None) -> Iterator[V6Lab]:
    """Pods a, b (each with a relay on 15001 and 15006 and echo servers) and c (a client only),
    every one with an IPv6 address; no interception rules at all."""
    require_btf()
    with Node(subnet="198.18.0.0/24") as node:
        a, b, c = (node.add_pod(name) for name in ("a", "b", "c"))
        relays = {}
        for pod in (a, b):
            for port in (ISTIO.outbound_port, ISTIO.inbound_port):
                relay = pod.run(python(RELAY, port), name="relay", run_as=SIDECAR_IDENTITY)
                relays[f"{pod.name}:{port}"] = started(relay)
            started(pod.run(python(ECHO, APP_PORT, EXCLUDED_PORT), name="echo"))
        yield V6Lab(node, a, b, c, relays)
    assert not find_leftovers(node.token), find_leftovers(node.token)


@pytest.fixture
def datapath(v6lab: V6Lab) -> Iterator[Datapath]:
    loaded = load_datapath(v6lab.node, SK_MSG_FEATURES)
    try:
        yield loaded
    finally:
        loaded.close()
        unload_quietly(v6lab.node)


def relayed(lab: V6Lab) -> dict[str, list[dict[str, Any]]]:
    """Every connection each relay has relayed so far."""
    return {
        name: [json.loads(line) for line in relay.stdout().splitlines() if line.startswith("{")]
        for name, relay in lab.relays.items()
    }


def run_client(pod: Pod, family: str, host: str, port: int, nbytes: int = NBYTES) -> Any:
    done = pod.run_to_completion(python(CLIENT, family, host, port, nbytes), timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@dataclasses.dataclass(frozen=True)
class Route:
    """One way the client in a names b's echo server."""

    name: str
    socket_family: str  # inet, inet6
    b_host: str  # how the client names b
    a_host: str  # a's address as the client's socket shows it
    a_on_relay: str  # ... and as the relays' (dual-stack, IPv6) sockets show it
    level: str  # the getsockopt level that answers: ipv4 (SOL_IP) or ipv6 (SOL_IPV6)


def routes(lab: V6Lab) -> dict[str, Route]:
    a, b = lab.a, lab.b
    a6, a4m = a.host("ipv6"), f"::ffff:{a.ip}"
    return {
        "ipv6": Route("ipv6", "inet6", b.host("ipv6"), a6, a6, "ipv6"),
        "ipv4-mapped": Route("ipv4-mapped", "inet6", f"::ffff:{b.ip}", a4m, a4m, "ipv4"),
        "ipv4": Route("ipv4", "inet", str(b.ip), str(a.ip), a4m, "ipv4"),
    }


@pytest.mark.parametrize("route_name", ["ipv6", "ipv4-mapped", "ipv4"])
def test_a_call_through_both_sidecars_is_steered_answered_and_redirected(
    v6lab: V6Lab, datapath: Datapath, route_name: str
) -> None:
    """App a -> relay a (outbound) -> relay b (inbound, same node) -> app b, and back: every
    socket answers as under ip6tables (or iptables, for the IPv4 connection on an IPv6 socket),
    and every hop into a sidecar moves its bytes socket to socket."""
    route = routes(v6lab)[route_name]
    a, b = v6lab.a, v6lab.b
    datapath.put_pod(istio_pod(a, "ipv6"))
    datapath.put_pod(istio_pod(b, "ipv6"))
    before_relayed, before = relayed(v6lab), datapath.counters()

    seen = run_client(a, route.socket_family, route.b_host, APP_PORT)
    counters = counters_since(datapath, before)
    outbound_relay, inbound_relay = f"a:{ISTIO.outbound_port}", f"b:{ISTIO.inbound_port}"
    now = relayed(v6lab)
    (outbound,) = now[outbound_relay][len(before_relayed[outbound_relay]) :]
    (inbound,) = now[inbound_relay][len(before_relayed[inbound_relay]) :]

    assert seen["exact"], (seen, shown(counters))
    # The application's socket: its real peer and its pod's address, as under NAT; the
    # original destination at its family's level only, the other level's error as the kernel's.
    b_on_a = route.b_host if route.socket_family == "inet6" else str(b.ip)
    assert seen["peer"] == [b_on_a, APP_PORT], seen
    assert seen["local"][0] == route.a_host, seen
    other = "ipv6" if route.level == "ipv4" else "ipv4"
    assert "family" in seen[route.level] and "errno" in seen[other], seen
    if route.level == "ipv6":
        assert seen["ipv6"]["len"] == 28, seen  # a sockaddr_in6
        assert seen["ipv6_short"] == {"errno": errno.EINVAL}, seen
    # a's sidecar: the app's pod address as its peer, the original destination.
    destination = [str(b.ip) if route.level == "ipv4" else b.host("ipv6"), APP_PORT]
    assert outbound["original"][route.level]["address"] == destination, outbound
    assert "errno" in outbound["original"][other], outbound
    assert outbound["peer"][0] == route.a_on_relay, outbound
    # Its upstream, steered to b's inbound listener, answers as if it had reached b:8080.
    assert outbound["upstream_peer"] == destination, outbound
    assert outbound["upstream_original"][route.level]["address"] == destination, outbound
    # b's sidecar learns the destination the app asked for.
    assert inbound["original"][route.level]["address"] == destination, inbound
    assert inbound["local"][1] == ISTIO.inbound_port, inbound
    assert inbound["peer"][0] == route.a_on_relay, inbound

    assert counters[Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED] == 1, shown(counters)
    assert counters[Counter.COUNTER_CONNECT_INBOUND_REDIRECTED] == 1, shown(counters)
    assert counters[Counter.COUNTER_CONNECT_SIDECAR_TO_OWN_POD] == 1, shown(counters)
    assert counters[Counter.COUNTER_ORIGINAL_DST_ANSWERED] == 4, shown(counters)
    assert not any(counters[c] for c in ERRORS), shown(counters)
    assert not any(counters[c] for c in FALLBACK_REASONS), shown(counters)
    # Four hops redirect (into each sidecar, both ways); the two into applications take TCP.
    assert counters[Counter.COUNTER_MSG_BYTES_REDIRECTED] == 4 * NBYTES, shown(counters)
    assert counters[Counter.COUNTER_MSG_PEER_NOT_TARGET] == 0, shown(counters)


@dataclasses.dataclass(frozen=True)
class Bypass:
    reason: str
    host: str  # "a6", "b6", "b4m" (b's IPv4, mapped), "lo6", "any6"
    port: int
    options: dict[str, Any]
    counter: Counter | None  # None: steered after all


def nets(*cidrs: str) -> frozenset[Network]:
    return frozenset(IPv6Network(c) if ":" in c else IPv4Network(c) for c in cidrs)


BYPASSES = [
    Bypass("an excluded port", "b6", EXCLUDED_PORT, {
        "excluded_outbound_ports": frozenset({EXCLUDED_PORT})
    }, Counter.COUNTER_BYPASS_OUTBOUND_PORT_EXCLUDED),
    Bypass("an excluded IPv6 CIDR", "b6", APP_PORT, {
        "excluded_outbound_cidrs": nets("fd00:198:18::/64")
    }, Counter.COUNTER_BYPASS_OUTBOUND_CIDR_EXCLUDED),
    Bypass("an IPv6 destination outside the included CIDRs", "b6", APP_PORT, {
        "included_outbound_cidrs": nets("fd00:198:19::/64", "198.18.0.0/15")
    }, Counter.COUNTER_BYPASS_OUTBOUND_CIDR_EXCLUDED),
    Bypass("an IPv6 destination inside the included CIDRs", "b6", APP_PORT, {
        "included_outbound_cidrs": nets("fd00:198:18::/48")
    }, None),
    Bypass("an excluded IPv4 CIDR does not cover IPv6", "b6", APP_PORT, {
        "excluded_outbound_cidrs": nets("0.0.0.0/0")
    }, None),
    Bypass("an excluded ::/0 does not cover IPv4 on an IPv6 socket", "b4m", APP_PORT, {
        "excluded_outbound_cidrs": nets("::/0")
    }, None),
    Bypass("an excluded IPv4 CIDR covers IPv4 on an IPv6 socket", "b4m", APP_PORT, {
        "excluded_outbound_cidrs": nets("198.18.0.0/24")
    }, Counter.COUNTER_BYPASS_OUTBOUND_CIDR_EXCLUDED),
    Bypass("loopback ::1", "lo6", APP_PORT, {}, Counter.COUNTER_BYPASS_LOCAL_DESTINATION),
    Bypass("the pod's own IPv6 address", "a6", APP_PORT, {},
           Counter.COUNTER_BYPASS_LOCAL_DESTINATION),
]  # fmt: skip


@pytest.mark.parametrize("case", BYPASSES, ids=[c.reason for c in BYPASSES])
def test_exclusions_and_local_destinations_on_ipv6_sockets(
    v6lab: V6Lab, datapath: Datapath, case: Bypass
) -> None:
    a, b = v6lab.a, v6lab.b
    datapath.put_pod(istio_pod(a, "ipv6", **case.options))
    datapath.put_pod(istio_pod(b, "ipv6"))
    host = {
        "a6": a.host("ipv6"),
        "b6": b.host("ipv6"),
        "b4m": f"::ffff:{b.ip}",
        "lo6": "::1",
    }[case.host]
    before_relayed, before = relayed(v6lab), datapath.counters()

    seen = run_client(a, "inet6", host, case.port)
    counters = counters_since(datapath, before)
    steered = len(relayed(v6lab)["a:15001"]) - len(before_relayed["a:15001"])

    assert seen["exact"], (case.reason, seen, shown(counters))
    assert seen["peer"] == [host, case.port], (case.reason, seen)
    if case.counter is None:
        assert steered == 1, (case.reason, shown(counters))
        assert counters[Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED] == 1, shown(counters)
    else:
        assert steered == 0, (case.reason, shown(counters))
        assert counters[case.counter] == 1, (case.reason, shown(counters))
        assert counters[Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED] == 0, shown(counters)
        assert counters[Counter.COUNTER_ORIGINAL_DST_ANSWERED] == 0, shown(counters)


def test_a_pod_without_ipv6_is_left_alone_on_ipv6(v6lab: V6Lab, datapath: Datapath) -> None:
    """Pod c is accelerated with its IPv4 address only: the mesh has no ip6tables rules for it,
    so its IPv6 connects go where they were going, while an IPv4 one on the same kind of
    socket is steered (to a relay that does not exist in c: refused, which shows the steering)."""
    c, b = v6lab.c, v6lab.b
    datapath.put_pod(AcceleratedPod.in_mesh(ISTIO, c.cgroup_id, c.ip))
    datapath.put_pod(istio_pod(b, "ipv6"))
    before_relayed, before = relayed(v6lab), datapath.counters()

    seen = run_client(c, "inet6", b.host("ipv6"), APP_PORT)
    counters = counters_since(datapath, before)

    assert seen["exact"] and seen["peer"] == [b.host("ipv6"), APP_PORT], seen
    assert "errno" in seen["ipv6"] and "errno" in seen["ipv4"], seen
    assert counters[Counter.COUNTER_BYPASS_FAMILY_NOT_IN_POD] == 1, shown(counters)
    assert counters[Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED] == 0, shown(counters)
    assert relayed(v6lab) == before_relayed

    refused = c.run_to_completion(
        python(CLIENT, "inet6", f"::ffff:{b.ip}", APP_PORT, 256), timeout=60
    )
    assert "ConnectionRefusedError" in refused.stderr, refused
    assert counters_since(datapath, before)[Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED] == 1


def test_an_ipv6_only_pod_is_steered_on_ipv6_and_left_alone_on_ipv4(
    v6lab: V6Lab, datapath: Datapath
) -> None:
    a, b = v6lab.a, v6lab.b
    datapath.put_pod(AcceleratedPod.in_mesh(ISTIO, a.cgroup_id, a.ip_of("ipv6")))
    datapath.put_pod(istio_pod(b, "ipv6"))
    before = datapath.counters()

    over_ipv6 = run_client(a, "inet6", b.host("ipv6"), APP_PORT)
    over_ipv4 = run_client(a, "inet", str(b.ip), APP_PORT)
    counters = counters_since(datapath, before)

    assert over_ipv6["exact"] and over_ipv4["exact"], (over_ipv6, over_ipv4)
    assert "family" in over_ipv6["ipv6"], over_ipv6  # steered: answered
    assert "errno" in over_ipv4["ipv4"], over_ipv4  # not: netfilter has nothing either
    assert counters[Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED] == 1, shown(counters)
    assert counters[Counter.COUNTER_BYPASS_FAMILY_NOT_IN_POD] == 1, shown(counters)


def test_dns_over_ipv6_goes_to_the_proxy_and_its_replies_name_the_server(
    v6lab: V6Lab, datapath: Datapath
) -> None:
    a = v6lab.a
    assert ISTIO.dns_port is not None
    proxy = started(a.run(python(DNS_PROXY, ISTIO.dns_port), name="dns-proxy"))
    try:
        datapath.put_pod(istio_pod(a, "ipv6", dns_capture=True))
        before = datapath.counters()
        done = a.run_to_completion(
            python(DNS_CLIENT, DNS_SERVER6, f"::ffff:{DNS_SERVER4}"), timeout=60
        )
        counters = counters_since(datapath, before)
    finally:
        proxy.stop()

    assert done.returncode == 0, done.stderr
    unconnected6, unconnected4, connected6 = json.loads(done.stdout)
    assert unconnected6 == {
        "asked": DNS_SERVER6,
        "data": "proxy:query",
        "source": [DNS_SERVER6, 53],
    }
    mapped = f"::ffff:{DNS_SERVER4}"
    assert unconnected4 == {"asked": mapped, "data": "proxy:query", "source": [mapped, 53]}
    assert connected6 == {
        "data": "proxy:connected",
        "source": [DNS_SERVER6, 53],
        "peer": [DNS_SERVER6, 53],
    }
    assert counters[Counter.COUNTER_DNS_DATAGRAM_CAPTURED] == 2, shown(counters)
    assert counters[Counter.COUNTER_DNS_CONNECT_CAPTURED] == 1, shown(counters)
    assert counters[Counter.COUNTER_DNS_REPLY_ADDRESS_RESTORED] == 3, shown(counters)
