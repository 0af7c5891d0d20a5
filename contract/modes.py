"""Sidecar identity and ports of each mesh meshaccel can accelerate."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class MeshModeName(enum.StrEnum):
    ISTIO = "istio"
    LINKERD = "linkerd"
    KUMA = "kuma"


@dataclass(frozen=True)
class MeshMode:
    """How one mesh intercepts: who its proxy is and where it listens.

    ``outbound_excluded_ports``/``inbound_excluded_ports`` are the mesh's own
    ports, never redirected in that direction whatever a pod's annotations say.
    """

    name: MeshModeName
    sidecar_uid: int
    outbound_port: int
    inbound_port: int
    outbound_excluded_ports: frozenset[int]
    inbound_excluded_ports: frozenset[int]


# Ports as istio-iptables and the Istio sidecar use them: the proxy's own
# listeners (15000 admin, 15001/15006 capture, 15004 debug, 15008 HBONE, 15020/15021
# status and health, 15053 DNS, 15090 Prometheus) and the inbound RETURNs.
ISTIO = MeshMode(
    name=MeshModeName.ISTIO,
    sidecar_uid=1337,
    outbound_port=15001,
    inbound_port=15006,
    outbound_excluded_ports=frozenset(
        {15000, 15001, 15004, 15006, 15008, 15020, 15021, 15053, 15090}
    ),
    inbound_excluded_ports=frozenset({15008, 15020, 15021, 15090}),
)

# linkerd2-proxy: outbound 4140, inbound 4143, admin 4191, control 4190.
LINKERD = MeshMode(
    name=MeshModeName.LINKERD,
    sidecar_uid=2102,
    outbound_port=4140,
    inbound_port=4143,
    outbound_excluded_ports=frozenset({4140, 4143, 4190, 4191}),
    inbound_excluded_ports=frozenset({4190, 4191}),
)

# Kuma's Envoy: the same capture ports as Istio, admin 9901, DNS 15053.
KUMA = MeshMode(
    name=MeshModeName.KUMA,
    sidecar_uid=5678,
    outbound_port=15001,
    inbound_port=15006,
    outbound_excluded_ports=frozenset({9901, 15001, 15006, 15053}),
    inbound_excluded_ports=frozenset({9901}),
)

MESH_MODES: dict[MeshModeName, MeshMode] = {m.name: m for m in (ISTIO, LINKERD, KUMA)}
