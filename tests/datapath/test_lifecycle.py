"""Scenarios 7 and 8: unload and restart while connections are open.

Both are about meshaccel's own life cycle, so they have no iptables-only control; the control
is what the connections see after the unload, which is the iptables path itself. Both run over
both families, the unload on Istio's pods, the restart on every mesh's.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from meshaccel.agent.datapath import CGROUP_HOOKS, SK_MSG_FEATURES, Datapath
from meshaccel.agent.layout import Counter
from tests.datapath.conftest import (
    PIN_ROOT,
    istio_pod,
    lab_mesh,
    mesh_pod,
    steered_prefix,
    unload_quietly,
)
from tests.netlab import ECHO_PORT, Node, Pod
from tests.netlab.families import Family, address_prefix
from tests.netlab.fixtures import BOTH_FAMILIES, EVERY_MESH, ISTIO_ONLY

pytestmark = pytest.mark.kernel

STREAM = 2 << 20  # per connection, paced over a few seconds so the event falls mid-stream
CONNECTIONS = 4


@pytest.fixture(autouse=True)
def cleanup(mesh: Node):
    yield
    unload_quietly(mesh)


def attached_programs(node: Node) -> list[str]:
    out = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", str(node.cgroup.path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return [entry["name"] for entry in json.loads(out.strip() or "[]")]


def run_loader(node: Node, code: str) -> str:
    """Run code in a separate loader process that exits when done, as an agent would."""
    script = (
        "from pathlib import Path\n"
        "from meshaccel.agent.datapath import SK_MSG_FEATURES, Datapath\n"
        "from meshaccel.agent.layout import Counter\n"
        "from meshaccel.contract.modes import MESH_MODES\n"
        "from meshaccel.agent.pods import AcceleratedPod\n"
        f"cgroup, instance, pin_root = Path({str(node.cgroup.path)!r}), {node.token!r}, "
        f"Path({str(PIN_ROOT)!r})\n" + code
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@ISTIO_ONLY
@BOTH_FAMILIES
def test_unload_with_connections_open(mesh: Node, family: Family) -> None:
    a, b = mesh.pods["a"], mesh.pods["b"]
    datapath = Datapath.load(
        mesh.cgroup.path, instance=mesh.token, pin_root=PIN_ROOT, features=SK_MSG_FEATURES
    )
    for pod in (a, b):
        datapath.put_pod(istio_pod(pod, family))

    streams = a.start_echo_client(
        b.host(family), ECHO_PORT, nbytes=STREAM, connections=CONNECTIONS, pace_seconds=3.0
    )
    accelerated = streams.wait_connected()
    # Steered by connect4 (connect6): the kernel's own local address is loopback.
    assert all(local.startswith(steered_prefix(family)) for local in accelerated)
    streams.wait_echoed(STREAM // 4)
    assert datapath.counters()[Counter.COUNTER_MSG_REDIRECTED] > 0

    datapath.unload(drain_seconds=0.5)

    assert attached_programs(mesh) == []
    assert not (PIN_ROOT / mesh.token).exists()
    # New connections take the iptables path: REDIRECT keeps the app's own source address.
    fresh = a.echo_client(b.host(family), ECHO_PORT, nbytes=256 << 10)
    assert fresh.ok, fresh.raw
    assert fresh.kernel_local_addresses[0].startswith(address_prefix(a.ip_of(family)))
    # The connections opened before go on, byte-exact, now over plain TCP.
    result = streams.wait(timeout=30)
    assert result.ok, result.raw
    assert len(result.connections) == CONNECTIONS


def put_pod_code(mode: str, pod: Pod, family: Family) -> str:
    """The loader's line that puts the pod in (with its IPv6 address too on IPv6)."""
    ipv6 = f", ipv6={str(pod.ipv6)!r}" if family == "ipv6" else ""
    return (
        f"datapath.put_pod(AcceleratedPod.in_mesh({mode}, {pod.cgroup_id}, "
        f"{str(pod.ip)!r}{ipv6}))\n"
    )


@EVERY_MESH
@BOTH_FAMILIES
def test_restart_adopts_the_pins(mesh: Node, family: Family) -> None:
    a, b = mesh.pods["a"], mesh.pods["b"]
    mode = f"MESH_MODES[{str(lab_mesh(a).name)!r}]"
    run_loader(
        mesh,
        (
            "datapath = Datapath.load(cgroup, instance=instance, pin_root=pin_root,\n"
            "                         features=SK_MSG_FEATURES)\n"
            + put_pod_code(mode, a, family)
            + put_pod_code(mode, b, family)
        ),
    )  # ... and that loader has exited

    streams = a.start_echo_client(
        b.host(family), ECHO_PORT, nbytes=STREAM, connections=CONNECTIONS, pace_seconds=3.0
    )
    assert all(local.startswith(steered_prefix(family)) for local in streams.wait_connected())
    streams.wait_echoed(STREAM // 4)

    # A new loader adopts what the first one left, while the connections are mid-stream.
    adopted = json.loads(
        run_loader(
            mesh,
            (
                "import json\n"
                "with Datapath.adopt(instance=instance, pin_root=pin_root) as d:\n"
                "    redirected = d.counters()[Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED]\n"
                "    print(json.dumps({'pods': sorted(d.pods()), 'redirected': redirected}))\n"
            ),
        )
    )
    assert adopted["pods"] == sorted([a.cgroup_id, b.cgroup_id])
    assert adopted["redirected"] >= CONNECTIONS

    result = streams.wait(timeout=30)
    assert result.ok, result.raw

    with Datapath.adopt(instance=mesh.token, pin_root=PIN_ROOT) as datapath:
        assert datapath.pods() == {
            a.cgroup_id: mesh_pod(a, family),
            b.cgroup_id: mesh_pod(b, family),
        }
        assert datapath.features == SK_MSG_FEATURES  # as the first loader loaded it
        before = datapath.counters()[Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED]
        fresh = a.echo_client(b.host(family), ECHO_PORT, nbytes=256 << 10)
        assert fresh.ok, fresh.raw
        assert fresh.kernel_local_addresses[0].startswith(steered_prefix(family))
        assert datapath.counters()[Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED] == before + 1
    assert sorted(attached_programs(mesh)) == sorted(hook.program for hook in CGROUP_HOOKS)
