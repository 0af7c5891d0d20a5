"""A node with Istio-style pods: iptables interception, an Envoy sidecar and echo servers each."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .istio_iptables import IstioInterception
from .topology import DEFAULT_SUBNET, Node, Pod

ECHO_PORT = 8080
EXCLUDED_PORT = 9090  # excluded from interception both ways in the default pods (Istio annotations)


@dataclass(frozen=True)
class MeshPodSpec:
    """How to build one pod. interception=None: no iptables; sidecar=False: no Envoy."""

    name: str
    interception: IstioInterception | None = field(
        default_factory=lambda: IstioInterception(
            exclude_inbound_ports=(EXCLUDED_PORT,), exclude_outbound_ports=(EXCLUDED_PORT,)
        )
    )
    sidecar: bool = True
    protocol: Literal["tcp", "http"] = "tcp"
    echo_ports: tuple[int, ...] = (ECHO_PORT, EXCLUDED_PORT)
    read_api: str = "recv"
    cgroup_subpath: str | None = None


# a and b: the pair tests accelerate; c: a meshed pod that stays on the iptables path.
DEFAULT_MESH_PODS = (MeshPodSpec("a"), MeshPodSpec("b"), MeshPodSpec("c"))


def add_mesh_pod(node: Node, spec: MeshPodSpec) -> Pod:
    pod = node.add_pod(spec.name, cgroup_subpath=spec.cgroup_subpath)
    for port in spec.echo_ports:
        pod.start_echo_server(port, read_api=spec.read_api)
    if spec.interception is not None:
        pod.install_istio_iptables(spec.interception)
    if spec.sidecar:
        pod.start_envoy(protocol=spec.protocol)
    return pod


def build_mesh_node(node: Node, specs: tuple[MeshPodSpec, ...] = DEFAULT_MESH_PODS) -> Node:
    """Populate an entered Node with the given pods (default: a, b, c)."""
    for spec in specs:
        add_mesh_pod(node, spec)
    return node


def mesh_node(
    specs: tuple[MeshPodSpec, ...] = DEFAULT_MESH_PODS, *, subnet: str = DEFAULT_SUBNET
) -> Node:
    """A not-yet-entered Node that builds these pods on __enter__ (undoing all on failure)."""
    return _MeshNode(specs, subnet=subnet)


class _MeshNode(Node):
    def __init__(self, specs: tuple[MeshPodSpec, ...], *, subnet: str) -> None:
        super().__init__(subnet=subnet)
        self._specs = specs

    def _setup(self) -> None:
        super()._setup()
        build_mesh_node(self, self._specs)
