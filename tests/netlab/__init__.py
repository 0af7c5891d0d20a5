"""netlab: "pods" on this machine (netns + veth to a bridge in a node netns + a child cgroup) for
real-kernel datapath tests, with a mesh's iptables interception (Istio's, Linkerd's or Kuma's:
meshes.py) and real Envoy sidecars. Pods are dual-stack unless asked not to be: 198.18.X.N and
fd00:198:18:X::N, the mesh's ip6tables rules beside its iptables ones, Envoy on both families.

Start with mesh.mesh_node() / topology.Node, or the pytest fixtures in netlab.fixtures.
"""

from .cgroups import TestCgroup, cgroup_id, find_cgroup2_mount
from .counters import NetCounters, read_net_counters
from .envoy import (
    AccessLogEntry,
    EnvoyBootstrapOptions,
    EnvoySidecar,
    ExplicitListener,
    ProxyListeners,
    find_envoy_binary,
    render_envoy_bootstrap,
)
from .families import FAMILIES, LOOPBACK, Family, address_prefix, format_address
from .istio_iptables import (
    IstioInterception,
    remove_istio_iptables,
    render_istio_nat_rules,
)
from .leftovers import find_leftovers, remove_stale_leftovers
from .mesh import (
    DEFAULT_MESH_PODS,
    ECHO_PORT,
    EXCLUDED_PORT,
    MeshPodSpec,
    build_mesh_node,
    mesh_node,
    mesh_pods,
)
from .meshes import ISTIO_LAB, KUMA_LAB, LAB_MESHES, LINKERD_LAB, LabMesh
from .processes import SIDECAR_IDENTITY, PodProcess, RunAs
from .topology import Node, Pod

__all__ = [
    "DEFAULT_MESH_PODS",
    "ECHO_PORT",
    "EXCLUDED_PORT",
    "FAMILIES",
    "ISTIO_LAB",
    "KUMA_LAB",
    "LAB_MESHES",
    "LINKERD_LAB",
    "LOOPBACK",
    "SIDECAR_IDENTITY",
    "AccessLogEntry",
    "EnvoyBootstrapOptions",
    "EnvoySidecar",
    "ExplicitListener",
    "Family",
    "IstioInterception",
    "LabMesh",
    "MeshPodSpec",
    "NetCounters",
    "Node",
    "Pod",
    "PodProcess",
    "ProxyListeners",
    "RunAs",
    "TestCgroup",
    "address_prefix",
    "build_mesh_node",
    "cgroup_id",
    "find_cgroup2_mount",
    "find_envoy_binary",
    "find_leftovers",
    "format_address",
    "mesh_node",
    "mesh_pods",
    "read_net_counters",
    "remove_istio_iptables",
    "remove_stale_leftovers",
    "render_envoy_bootstrap",
    "render_istio_nat_rules",
]
