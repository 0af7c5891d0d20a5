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

    ``sidecar_by_gid``: the mesh's rules also exempt a process whose gid (whatever its uid)
    is ``sidecar_uid``, as Istio's ``--gid-owner`` rules do; Linkerd's and Kuma's exempt the
    uid only, so such a process is an application there.
    ``outbound_excluded_ports``/``inbound_excluded_ports`` are the mesh's own
    ports, never redirected in that direction whatever a pod's annotations say. Excluding more
    than the mesh does only leaves a connection to the mesh's own rules; excluding less would
    steer what the mesh does not.
    ``dns_port``: the proxy's DNS server on 127.0.0.1, where the mesh's rules send the
    application's DNS when it captures DNS (None: the mesh never does).
    """

    name: MeshModeName
    sidecar_uid: int
    sidecar_by_gid: bool
    outbound_port: int
    inbound_port: int
    outbound_excluded_ports: frozenset[int]
    inbound_excluded_ports: frozenset[int]
    dns_port: int | None = None


# Ports as istio-iptables and the Istio sidecar use them: the proxy's own
# listeners (15000 admin, 15001/15006 capture, 15004 debug, 15008 HBONE, 15020/15021
# status and health, 15053 DNS, 15090 Prometheus) and the inbound RETURNs.
ISTIO = MeshMode(
    name=MeshModeName.ISTIO,
    sidecar_uid=1337,
    sidecar_by_gid=True,
    outbound_port=15001,
    inbound_port=15006,
    outbound_excluded_ports=frozenset(
        {15000, 15001, 15004, 15006, 15008, 15020, 15021, 15053, 15090}
    ),
    inbound_excluded_ports=frozenset({15008, 15020, 15021, 15090}),
    dns_port=15053,  # istio-agent's DNS proxy, with ISTIO_META_DNS_CAPTURE
)

# linkerd2-proxy: outbound 4140, inbound 4143, admin 4191, control 4190. proxy-init exempts
# the proxy by uid (by gid only when the chart's proxy.gid is set) and, by the injector's
# defaults, skips 4190, 4191 and Galera's 4567, 4568 inbound and 4567, 4568 outbound.
LINKERD = MeshMode(
    name=MeshModeName.LINKERD,
    sidecar_uid=2102,
    sidecar_by_gid=False,
    outbound_port=4140,
    inbound_port=4143,
    outbound_excluded_ports=frozenset({4140, 4143, 4190, 4191, 4567, 4568}),
    inbound_excluded_ports=frozenset({4190, 4191, 4567, 4568}),
)

# Kuma's Envoy: the same capture ports as Istio, admin 9901, DNS 15053, virtual probes 9000,
# application probe proxy 9001 (the injector excludes it from inbound redirection). kuma-init
# exempts the proxy by uid only, and with the built-in DNS (on by default on Kubernetes) sends
# TCP to port 53 to kuma-dp's DNS server on 15053, not through Envoy: 53 is never steered to
# Envoy, and goes to 15053 only in a pod with DNS capture (AcceleratedPod.dns_port), else to its
# rules.
KUMA = MeshMode(
    name=MeshModeName.KUMA,
    sidecar_uid=5678,
    sidecar_by_gid=False,
    outbound_port=15001,
    inbound_port=15006,
    outbound_excluded_ports=frozenset({53, 9000, 9001, 9901, 15001, 15006, 15053}),
    inbound_excluded_ports=frozenset({9000, 9001, 9901}),
    dns_port=15053,  # kuma-dp's built-in DNS server
)

MESH_MODES: dict[MeshModeName, MeshMode] = {m.name: m for m in (ISTIO, LINKERD, KUMA)}
