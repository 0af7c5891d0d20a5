"""netlab: "pods" on this machine (netns + veth to a bridge in a node netns + a child cgroup) for
real-kernel datapath tests, with Istio's iptables interception and real Envoy sidecars.

Start with mesh.mesh_node() / topology.Node, or the pytest fixtures in netlab.fixtures.
"""

from .cgroups import TestCgroup, cgroup_id, find_cgroup2_mount
from .counters import NetCounters, read_net_counters
from .envoy import (
    AccessLogEntry,
    EnvoyBootstrapOptions,
    EnvoySidecar,
    ExplicitListener,
    find_envoy_binary,
    render_envoy_bootstrap,
)
from .istio_iptables import (
    IstioInterception,
    install_istio_iptables,
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
)
from .processes import SIDECAR_IDENTITY, PodProcess, RunAs
from .topology import Node, Pod

__all__ = [
    "DEFAULT_MESH_PODS",
    "ECHO_PORT",
    "EXCLUDED_PORT",
    "SIDECAR_IDENTITY",
    "AccessLogEntry",
    "EnvoyBootstrapOptions",
    "EnvoySidecar",
    "ExplicitListener",
    "IstioInterception",
    "MeshPodSpec",
    "NetCounters",
    "Node",
    "Pod",
    "PodProcess",
    "RunAs",
    "TestCgroup",
    "build_mesh_node",
    "cgroup_id",
    "find_cgroup2_mount",
    "find_envoy_binary",
    "find_leftovers",
    "install_istio_iptables",
    "mesh_node",
    "read_net_counters",
    "remove_istio_iptables",
    "remove_stale_leftovers",
    "render_envoy_bootstrap",
    "render_istio_nat_rules",
]
