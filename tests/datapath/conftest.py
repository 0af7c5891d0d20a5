"""Fixtures for the datapath scenarios: the real objects, loaded on a netlab node's cgroup.

Each scenario runs twice, as ``ebpf`` (meshaccel loaded with sk_msg redirection, which is
opt-in, so that the whole datapath is exercised; pods a and b accelerated, pod c not) and as
``iptables`` (the control: the mesh's interception alone). Pods, Envoys and iptables rules
come from the module-scoped ``netlab_node``: Istio's, or with ``EVERY_MESH`` each mesh's in
turn (tests/netlab/meshes.py); each test loads and unloads its own datapath.

The lab's pods are dual-stack. A scenario parametrised over ``family`` (``BOTH_FAMILIES``)
talks to the pods' addresses of that family; on IPv6 the pods are put in with both of their
addresses (what the operator does with a dual-stack pod's status.podIPs), on IPv4 with their
IPv4 address alone, as before.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from meshaccel.agent.datapath import SK_MSG_FEATURES, Datapath
from meshaccel.agent.layout import FALLBACK_REASONS, Counter, DatapathFeatures
from meshaccel.agent.pods import AcceleratedPod
from meshaccel.contract.modes import ISTIO
from tests.netlab import Node, Pod
from tests.netlab.envoy import ipv6_twin
from tests.netlab.families import LOOPBACK, Family, address_prefix
from tests.netlab.meshes import LabMesh
from tests.netlab.netns import run_in_netns
from tests.requirements import require_btf, require_tool

PIN_ROOT = Path(f"/sys/fs/bpf/meshaccel-test-{os.getpid()}")


def load_datapath(
    node: Node,
    features: DatapathFeatures = SK_MSG_FEATURES,
    *,
    instance: str | None = None,
    **options: Any,
) -> Datapath:
    """The shipped objects, attached to the node's own test cgroup (never the root cgroup);
    ``options`` go to Datapath.load."""
    return Datapath.load(
        node.cgroup.path,
        instance=instance or node.token,
        features=features,
        pin_root=PIN_ROOT,
        **options,
    )


def unload_quietly(node: Node, *, instance: str | None = None) -> None:
    """Teardown: remove whatever a test left loaded, even after a failure half-way."""
    try:
        datapath = Datapath.adopt(instance=instance or node.token, pin_root=PIN_ROOT)
    except Exception:
        return
    datapath.unload(drain_seconds=0)


def forget_conntrack(node: Node) -> None:
    """Give a test fresh conntrack tables in its pods.

    A NAT entry left by an earlier iptables-path test (TIME_WAIT lasts 120 s) can make b's
    PREROUTING REDIRECT remap the client port of a steered connection. That is handled (the
    accepting side still gets its original destination: test_exclusions tests it on purpose),
    but the two ends then see different tuples, so that connection's bytes take TCP, and the
    scenarios assert exact byte counts.
    """
    require_tool("conntrack")
    for pod in node.pods.values():
        run_in_netns(pod.netns, ["conntrack", "--flush"])


def family_addresses(pod: Pod, family: Family) -> dict[str, object]:
    """in_mesh's keyword addresses of a pod for a scenario on ``family``: on IPv6 its IPv6
    address too (a dual-stack pod), on IPv4 nothing more (its IPv4 address alone, as ever)."""
    if family == "ipv4":
        return {}
    assert pod.ipv6 is not None, f"{pod} has no IPv6 address"
    return {"ipv6": pod.ipv6}


def istio_pod(pod: Pod, family: Family = "ipv4", **options: object) -> AcceleratedPod:
    options |= family_addresses(pod, family)
    return AcceleratedPod.in_mesh(ISTIO, pod.cgroup_id, pod.ip, **options)  # type: ignore[arg-type]


def lab_mesh(pod: Pod) -> LabMesh:
    """The mesh that built the pod."""
    assert pod.mesh is not None, f"{pod} was not built by a mesh"
    return pod.mesh


def mesh_pod(pod: Pod, family: Family = "ipv4", **options: object) -> AcceleratedPod:
    """The pod as the operator would put it in: in its own mesh's mode (with both addresses
    for a scenario on IPv6)."""
    mode = lab_mesh(pod).mode
    options |= family_addresses(pod, family)
    return AcceleratedPod.in_mesh(mode, pod.cgroup_id, pod.ip, **options)  # type: ignore[arg-type]


def passthrough_source(server: Pod, family: Family) -> str:
    """The address the server's inbound passthrough connects to its app from, on ``family``:
    127.0.0.6 or its IPv6 twin (Istio, Kuma), the pod's own address (Linkerd)."""
    source = lab_mesh(server).listeners.inbound_passthrough_source
    if source is None:  # Linkerd: the pod's own address
        return server.host(family)
    return source if family == "ipv4" else ipv6_twin(source)


def steered_prefix(family: Family) -> str:
    """What the kernel's own local address of a connection connect4/connect6 steered to its
    sidecar starts with: "127.0.0.1:" or "[::1]:"."""
    return address_prefix(LOOPBACK[family])


FALLBACKS = tuple(FALLBACK_REASONS)
ERRORS = tuple(c for c in Counter if c.name.startswith("COUNTER_ERROR_"))


def shown(counters: dict[Counter, int]) -> dict[str, int]:
    """The counters that moved, by metric name: for assertion messages."""
    return {c.metric_name: n for c, n in counters.items() if n}


def counters_since(datapath: Datapath, before: dict[Counter, int]) -> dict[Counter, int]:
    """How far each counter moved since ``before`` (an earlier datapath.counters())."""
    return {c: n - before[c] for c, n in datapath.counters().items()}


def assert_redirected_until_fallback(
    counters: dict[Counter, int], *, hops: int, nbytes: int, connections: int = 1
) -> None:
    """``nbytes`` in all each way over ``hops`` redirecting hops per connection: every byte was
    redirected unless a receiver fell behind its budget, which happens at most once per hop
    and connection (a fallback is for good), and no direction ever failed otherwise."""
    redirected = counters[Counter.COUNTER_MSG_BYTES_REDIRECTED]
    assert not any(counters[c] for c in ERRORS), shown(counters)
    assert counters[Counter.COUNTER_FALLBACK_RECEIVER_UNKNOWN] == 0, shown(counters)
    assert counters[Counter.COUNTER_FALLBACK_REDIRECT_FAILED] == 0, shown(counters)
    if counters[Counter.COUNTER_FALLBACK_BUDGET] == 0:
        assert redirected == hops * nbytes, shown(counters)
    else:
        assert counters[Counter.COUNTER_FALLBACK_BUDGET] <= hops * connections, shown(counters)
        assert 0 < redirected < hops * nbytes, shown(counters)


def loopback_tx_bytes(pod: Pod) -> int:
    """Bytes sent over the pod's lo: what crossed the loopback TCP stack."""
    return int(run_in_netns(pod.netns, ["cat", "/sys/class/net/lo/statistics/tx_bytes"]))


@dataclass
class MeshPath:
    """One way of intercepting: the control (datapath None) or meshaccel loaded."""

    name: str
    node: Node
    datapath: Datapath | None = None
    family: Family = "ipv4"
    _baseline: dict[Counter, int] = field(default_factory=dict)

    @property
    def accelerated(self) -> bool:
        return self.datapath is not None

    def pod(self, name: str) -> Pod:
        return self.node.pods[name]

    def host(self, pod: Pod) -> str:
        """The pod's address of the scenario's family, as its clients name it."""
        return pod.host(self.family)

    def address(self, pod: Pod, port: int) -> str:
        """ "ip:port" of the pod in the scenario's family, as Envoy and the apps print it."""
        return pod.address(port, self.family)

    def accelerate(self, *pods: Pod, **options: object) -> None:
        if self.datapath is not None:
            for pod in pods:
                self.datapath.put_pod(mesh_pod(pod, self.family, **options))

    def mark(self) -> None:
        """Counters are read relative to the last mark."""
        self._baseline = self._read()

    def counters(self) -> dict[Counter, int]:
        now = self._read()
        return {c: now[c] - self._baseline.get(c, 0) for c in Counter}

    def _read(self) -> dict[Counter, int]:
        if self.datapath is None:
            return dict.fromkeys(Counter, 0)
        return self.datapath.counters()


@pytest.fixture(scope="module")
def mesh(netlab_node: Node) -> Node:
    require_btf()
    return netlab_node


@pytest.fixture(scope="module")
def lab(mesh: Node) -> LabMesh:
    """The mesh whose pods the module's node holds."""
    return lab_mesh(mesh.pods["a"])


@pytest.fixture
def datapath_factory(mesh: Node) -> Iterator[Callable[..., Datapath]]:
    """load(features=..., fresh_conntrack=True, **Datapath.load options) -> a Datapath on the
    module's node, unloaded after the test."""
    with ExitStack() as cleanup:

        def load(
            features: DatapathFeatures = SK_MSG_FEATURES,
            *,
            fresh_conntrack: bool = True,
            **options: Any,
        ) -> Datapath:
            if fresh_conntrack:
                forget_conntrack(mesh)
            cleanup.callback(unload_quietly, mesh)
            return load_datapath(mesh, features, **options)

        yield load


@pytest.fixture(params=["iptables", "ebpf"])
def path(
    request: pytest.FixtureRequest,
    mesh: Node,
    datapath_factory: Callable[..., Datapath],
    family: Family,
) -> MeshPath:
    """Pods a and b accelerated (ebpf) or not (iptables); pod c never is. On the test's
    ``family`` (IPv4 unless it is parametrised with BOTH_FAMILIES)."""
    mesh_path = MeshPath(request.param, mesh, family=family)
    if request.param == "ebpf":
        mesh_path.datapath = datapath_factory()
        mesh_path.accelerate(mesh.pods["a"], mesh.pods["b"])
    mesh_path.mark()
    return mesh_path
