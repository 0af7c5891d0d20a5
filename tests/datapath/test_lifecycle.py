"""Scenarios 7 and 8: unload and restart while connections are open.

Both are about meshaccel's own life cycle, so they have no iptables-only control; the control
is what the connections see after the unload, which is the iptables path itself.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from meshaccel.agent.datapath import CGROUP_HOOKS, SK_MSG_FEATURES, Datapath
from meshaccel.agent.layout import Counter
from tests.datapath.conftest import PIN_ROOT, istio_pod, lab_mesh, mesh_pod, unload_quietly
from tests.netlab import ECHO_PORT, Node
from tests.netlab.fixtures import EVERY_MESH, ISTIO_ONLY

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
def test_unload_with_connections_open(mesh: Node) -> None:
    a, b = mesh.pods["a"], mesh.pods["b"]
    datapath = Datapath.load(
        mesh.cgroup.path, instance=mesh.token, pin_root=PIN_ROOT, features=SK_MSG_FEATURES
    )
    for pod in (a, b):
        datapath.put_pod(istio_pod(pod))

    streams = a.start_echo_client(
        str(b.ip), ECHO_PORT, nbytes=STREAM, connections=CONNECTIONS, pace_seconds=3.0
    )
    accelerated = streams.wait_connected()
    assert all(local.startswith("127.0.0.1:") for local in accelerated)  # steered by connect4
    streams.wait_echoed(STREAM // 4)
    assert datapath.counters()[Counter.COUNTER_MSG_REDIRECTED] > 0

    datapath.unload(drain_seconds=0.5)

    assert attached_programs(mesh) == []
    assert not (PIN_ROOT / mesh.token).exists()
    # New connections take the iptables path: REDIRECT keeps the app's own source address.
    fresh = a.echo_client(str(b.ip), ECHO_PORT, nbytes=256 << 10)
    assert fresh.ok, fresh.raw
    assert fresh.kernel_local_addresses[0].startswith(f"{a.ip}:")
    # The connections opened before go on, byte-exact, now over plain TCP.
    result = streams.wait(timeout=30)
    assert result.ok, result.raw
    assert len(result.connections) == CONNECTIONS


@EVERY_MESH
def test_restart_adopts_the_pins(mesh: Node) -> None:
    a, b = mesh.pods["a"], mesh.pods["b"]
    mode = f"MESH_MODES[{str(lab_mesh(a).name)!r}]"
    run_loader(
        mesh,
        (
            "datapath = Datapath.load(cgroup, instance=instance, pin_root=pin_root,\n"
            "                         features=SK_MSG_FEATURES)\n"
            f"datapath.put_pod(AcceleratedPod.in_mesh({mode}, {a.cgroup_id}, {str(a.ip)!r}))\n"
            f"datapath.put_pod(AcceleratedPod.in_mesh({mode}, {b.cgroup_id}, {str(b.ip)!r}))\n"
        ),
    )  # ... and that loader has exited

    streams = a.start_echo_client(
        str(b.ip), ECHO_PORT, nbytes=STREAM, connections=CONNECTIONS, pace_seconds=3.0
    )
    assert all(local.startswith("127.0.0.1:") for local in streams.wait_connected())
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
        assert datapath.pods() == {a.cgroup_id: mesh_pod(a), b.cgroup_id: mesh_pod(b)}
        assert datapath.features == SK_MSG_FEATURES  # as the first loader loaded it
        before = datapath.counters()[Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED]
        fresh = a.echo_client(str(b.ip), ECHO_PORT, nbytes=256 << 10)
        assert fresh.ok, fresh.raw
        assert fresh.kernel_local_addresses[0].startswith("127.0.0.1:")
        assert datapath.counters()[Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED] == before + 1
    assert sorted(attached_programs(mesh)) == sorted(hook.program for hook in CGROUP_HOOKS)
