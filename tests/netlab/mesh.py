"""A node with meshed pods: each with its mesh's iptables, an Envoy sidecar and echo servers."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from .meshes import ISTIO_LAB, Interception, LabMesh
from .topology import DEFAULT_SUBNET, Node, Pod

ECHO_PORT = 8080
EXCLUDED_PORT = 9090  # excluded from interception both ways in the default pods (mesh annotations)


class MeshRules(enum.Enum):
    """The pod's mesh's own rules, EXCLUDED_PORT excluded both ways (as an annotation would)."""

    ANNOTATED = enum.auto()


@dataclass(frozen=True)
class MeshPodSpec:
    """How to build one pod of ``mesh`` (Istio unless said). interception=None: no iptables;
    sidecar=False: no Envoy; ipv6=False: an IPv4-only pod (by default every pod is dual-stack,
    with the mesh's ip6tables rules too and a dual-stack sidecar)."""

    name: str
    interception: Interception | MeshRules | None = MeshRules.ANNOTATED
    sidecar: bool = True
    protocol: Literal["tcp", "http"] = "tcp"
    echo_ports: tuple[int, ...] = (ECHO_PORT, EXCLUDED_PORT)
    read_api: str = "recv"
    cgroup_subpath: str | None = None
    mesh: LabMesh = ISTIO_LAB
    ipv6: bool = True

    def rules(self) -> Interception | None:
        if self.interception is MeshRules.ANNOTATED:
            return self.mesh.interception(
                exclude_inbound_ports=(EXCLUDED_PORT,), exclude_outbound_ports=(EXCLUDED_PORT,)
            )
        return self.interception


# a and b: the pair tests accelerate; c: a meshed pod that stays on the iptables path.
DEFAULT_MESH_PODS = (MeshPodSpec("a"), MeshPodSpec("b"), MeshPodSpec("c"))


def mesh_pods(mesh: LabMesh, names: tuple[str, ...] = ("a", "b", "c")) -> tuple[MeshPodSpec, ...]:
    """The default pods (a, b, c unless named otherwise), all of ``mesh``."""
    return tuple(MeshPodSpec(name, mesh=mesh) for name in names)


def add_mesh_pod(node: Node, spec: MeshPodSpec) -> Pod:
    pod = node.add_pod(spec.name, cgroup_subpath=spec.cgroup_subpath, ipv6=spec.ipv6)
    pod.mesh = spec.mesh
    for port in spec.echo_ports:
        pod.start_echo_server(port, read_api=spec.read_api)
    rules = spec.rules()
    if rules is not None:
        pod.install_interception(rules)
    if spec.sidecar:
        pod.start_envoy(
            protocol=spec.protocol, identity=spec.mesh.proxy, listeners=spec.mesh.listeners
        )
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
