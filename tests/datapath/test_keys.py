"""Sockhash keys are bound to their connection: a look-alike tuple cannot take another's bytes.

A pod that can make a network namespace can give it other pods' addresses and, inside it,
accept a connection whose tuple is exactly that of a live connection between two sidecars (its
own NAT rule makes its connecting end look like the victim's). Tuples between pods carry no
network namespace (a sender cannot know its peer's), so while keys were the tuple alone the
look-alike's accepted socket took the real receiver's place in the sockhashes and sk_msg
delivered the victim's bytes to the intruder. Keys now carry the connection's handshake.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from meshaccel.agent.datapath import DEFAULT_FEATURES, Datapath
from meshaccel.agent.layout import Counter
from tests.datapath.conftest import istio_pod, shown
from tests.netlab import ECHO_PORT, SIDECAR_IDENTITY, Node, Pod
from tests.netlab.envoy import ENVOY_INBOUND_PORT
from tests.netlab.families import Family, host_cidr
from tests.netlab.fixtures import BOTH_FAMILIES
from tests.netlab.netns import create_netns, delete_netns, run_in_netns
from tests.netlab.processes import pod_command

pytestmark = pytest.mark.kernel

STREAM = 256 << 10
PACE = 5.0  # the victim's connection stays open this long

# Runs in the intruder's namespace and its pod's cgroup: listens where pod b's sidecar would,
# connects as the sidecar uid (connect4 steers it to b's inbound port, like the victim's) from
# a port that the namespace's SNAT turns into the victim's, so that the accepted socket's tuple
# is the victim receiver's; sends, says so, and holds the connection open until the hold file
# exists, reading; then reports everything its accepted socket received.
INTRUDER = """
import json, os, socket, sys
client_ip, server_ip, client_port, port, inbound, uid, hold = sys.argv[1:8]
family = socket.AF_INET6 if ":" in server_ip else socket.AF_INET
payload = b"intruder" * 4096
listener = socket.socket(family)
listener.bind((server_ip, int(inbound)))
listener.listen(1)
client = socket.socket(family)
client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
client.bind((client_ip, int(client_port)))
os.setgroups([])
os.setresgid(int(uid), int(uid), int(uid))
os.setresuid(int(uid), int(uid), int(uid))
client.settimeout(10)
client.connect((server_ip, int(port)))
accepted, _ = listener.accept()
accepted.settimeout(0.05)
client.sendall(payload)
print(json.dumps({"event": "holding"}), flush=True)
got = b""
while True:
    done = os.path.exists(hold)
    try:
        while chunk := accepted.recv(65536):
            got += chunk
    except TimeoutError:
        pass
    if done:
        break
print(json.dumps({"sent": len(payload), "received": len(got), "exact": got == payload}))
"""


@pytest.fixture
def intruder_pod(mesh: Node) -> Iterator[tuple[Pod, str]]:
    """An accelerated-to-be pod whose processes run in a namespace of their own making."""
    pod = mesh.pods.get("intruder") or mesh.add_pod("intruder")
    netns = f"{mesh.token}-lookalike"
    create_netns(netns)
    try:
        yield pod, netns
    finally:
        delete_netns(netns)


def sidecar_upstream_port(client: Pod, server: Pod, family: Family) -> int:
    """The local port of client's sidecar connection to server's inbound listener (ss)."""
    destination = server.address(ENVOY_INBOUND_PORT, family)
    out = run_in_netns(client.netns, ["ss", "-Htn", "dst", destination])
    ports = {int(line.split()[3].rpartition(":")[2]) for line in out.splitlines() if line}
    assert len(ports) == 1, out
    return ports.pop()


@BOTH_FAMILIES
def test_a_look_alike_connection_takes_nothing_from_the_real_one(
    mesh: Node,
    datapath_factory: Callable[..., Datapath],
    intruder_pod: tuple[Pod, str],
    family: Family,
) -> None:
    a, b = mesh.pods["a"], mesh.pods["b"]
    intruder, lookalike = intruder_pod
    datapath = datapath_factory(DEFAULT_FEATURES)
    for pod in (a, b, intruder):
        datapath.put_pod(istio_pod(pod, family))

    victim = a.start_echo_client(b.host(family), ECHO_PORT, nbytes=STREAM, pace_seconds=PACE)
    victim.wait_connected()
    victim.wait_echoed(STREAM // 8)
    port = sidecar_upstream_port(a, b, family)
    own_port = 45999 if port != 45999 else 45998
    # The look-alike namespace has both sidecars' addresses; its tuples touch no loopback.
    client_ip, server_ip = a.host(family), b.host(family)
    for ip in (client_ip, server_ip):
        run_in_netns(lookalike, ["ip", "addr", "add", host_cidr(ip), "dev", "lo", "nodad"])
    run_in_netns(lookalike, ["ip", "link", "set", "lo", "up"])
    tables = "iptables" if family == "ipv4" else "ip6tables"
    snat = [tables, "-t", "nat", "-A", "POSTROUTING", "-p", "tcp", "-s", client_ip]
    snat += ["--sport", str(own_port), "-j", "SNAT", "--to-source", a.address(port, family)]
    run_in_netns(lookalike, snat)

    before = datapath.counters()
    hold = intruder.workdir / "hold"
    argv = [sys.executable, "-u", "-c", INTRUDER, client_ip, server_ip, str(own_port)]
    argv += [str(ECHO_PORT), str(ENVOY_INBOUND_PORT), str(SIDECAR_IDENTITY.uid), str(hold)]
    with subprocess.Popen(
        pod_command(lookalike, intruder.cgroup_dir, argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            assert process.stdout is not None
            holding = process.stdout.readline()  # the look-alike connection is in place
            assert holding, process.communicate(timeout=30)
            result = victim.wait()  # the rest of the victim's stream flows meanwhile
        finally:
            hold.touch()
        out, err = process.communicate(timeout=30)
    counters = {c: n - before[c] for c, n in datapath.counters().items()}
    assert process.returncode == 0, err
    intrusion = json.loads(out.splitlines()[-1])

    assert result.ok, (result.raw, shown(counters))  # every victim byte, exactly, to the victim
    assert intrusion["exact"], intrusion  # the intruder got its own bytes, nothing else
    # The look-alike was steered like the victim, and its sockets joined the sockhashes.
    assert counters[Counter.COUNTER_CONNECT_INBOUND_REDIRECTED] == 1, shown(counters)
    assert counters[Counter.COUNTER_SOCKHASH_ADDED] >= 2, shown(counters)
    assert counters[Counter.COUNTER_SOCKHASH_KEY_TAKEN] == 0, shown(counters)
