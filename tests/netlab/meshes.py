"""The meshes the lab builds pods for: Istio, Linkerd and Kuma, each the way the mesh does it.

A :class:`LabMesh` joins what meshaccel is told about a mesh (its mode, contract/modes.py) with
what the mesh itself puts in a pod: its own iptables rules (istio_iptables.py,
linkerd_iptables.py, kuma_iptables.py, each written from the mesh's sources) and a real Envoy
standing in for its proxy, run as the proxy's uid and listening where the proxy listens, taking
the original destination with SO_ORIGINAL_DST as every one of these proxies does.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshaccel.contract.modes import ISTIO, KUMA, LINKERD, MeshMode, MeshModeName

from .envoy import ISTIO_LISTENERS, ProxyListeners
from .families import Family
from .istio_iptables import (
    IstioInterception,
    add_passthrough_source_v6,
    render_istio_nat_rules,
    restore_rules,
)
from .kuma_iptables import KumaInterception, render_kuma_nat_rules
from .linkerd_iptables import LinkerdInterception, render_linkerd_nat_rules
from .processes import RunAs

Interception = IstioInterception | LinkerdInterception | KumaInterception


@dataclass(frozen=True)
class LabMesh:
    """One mesh as the lab builds it.

    ``own_port``: one of the mesh's own ports that meshaccel excludes both ways and on which the
    stand-in proxy does not listen (the scenarios serve it with an echo server).
    ``dns_port``: where the mesh's rules send an application's DNS (None: DNS is not captured).
    """

    mode: MeshMode
    proxy: RunAs
    listeners: ProxyListeners
    own_port: int
    dns_port: int | None = None

    @property
    def name(self) -> MeshModeName:
        return self.mode.name

    @property
    def exempts_proxy_gid(self) -> bool:
        """Whether the mesh's rules leave a process with the proxy's gid alone whatever its uid
        (Istio's --gid-owner rules; Linkerd only with proxy.gid set, Kuma never)."""
        rules = self.interception()
        if isinstance(rules, LinkerdInterception):
            return rules.proxy_gid is not None
        return isinstance(rules, IstioInterception)

    def interception(
        self,
        *,
        exclude_inbound_ports: tuple[int, ...] = (),
        exclude_outbound_ports: tuple[int, ...] = (),
    ) -> Interception:
        """The mesh's rules for a pod whose annotations exclude these ports."""
        if self.mode.name is MeshModeName.LINKERD:
            return LinkerdInterception(
                proxy_uid=self.proxy.uid,
                skip_inbound_ports=exclude_inbound_ports,
                skip_outbound_ports=exclude_outbound_ports,
            )
        if self.mode.name is MeshModeName.KUMA:
            return KumaInterception(
                proxy_uid=self.proxy.uid,
                dns_port=self.dns_port,
                exclude_inbound_ports=exclude_inbound_ports,
                exclude_outbound_ports=exclude_outbound_ports,
            )
        return IstioInterception(
            proxy_uid=self.proxy.uid,
            proxy_gid=self.proxy.gid,
            dns_port=self.dns_port,
            exclude_inbound_ports=exclude_inbound_ports,
            exclude_outbound_ports=exclude_outbound_ports,
        )


ISTIO_LAB = LabMesh(
    mode=ISTIO, proxy=RunAs(uid=1337, gid=1337), listeners=ISTIO_LISTENERS, own_port=15021
)
# linkerd2-proxy: outbound 127.0.0.1:4140, inbound 4143, admin 4191; its inbound side connects
# to the original destination from the pod's own address (since Linkerd 2.11).
LINKERD_LAB = LabMesh(
    mode=LINKERD,
    proxy=RunAs(uid=2102, gid=2102),
    listeners=ProxyListeners(
        outbound_port=4140,
        inbound_port=4143,
        admin_port=4191,
        outbound_address="127.0.0.1",
        inbound_passthrough_source=None,
    ),
    own_port=4190,
)
# kuma-dp's Envoy: Istio's capture ports, admin 9901, DNS 15053, application probe proxy 9001.
KUMA_LAB = LabMesh(
    mode=KUMA,
    proxy=RunAs(uid=5678, gid=5678),
    listeners=ProxyListeners(admin_port=9901),
    own_port=9001,
    dns_port=15053,
)

LAB_MESHES: dict[MeshModeName, LabMesh] = {m.name: m for m in (ISTIO_LAB, LINKERD_LAB, KUMA_LAB)}


def render_nat_rules(interception: Interception, family: Family = "ipv4") -> str:
    """The (ip6)iptables-restore text of a mesh's nat table."""
    if isinstance(interception, LinkerdInterception):
        return render_linkerd_nat_rules(interception, family)
    if isinstance(interception, KumaInterception):
        return render_kuma_nat_rules(interception, family)
    return render_istio_nat_rules(interception, family)


def install_interception(netns: str, interception: Interception, *, ipv6: bool = False) -> str:
    """Load a mesh's rules into the netns with one iptables-restore, and with ``ipv6`` its
    ip6tables rules with one ip6tables-restore (plus ::6 on lo, the IPv6 passthrough source of
    Istio and Kuma); return the IPv4 text."""
    rules = render_nat_rules(interception)
    restore_rules(netns, rules)
    if ipv6:
        if not isinstance(interception, LinkerdInterception):
            add_passthrough_source_v6(netns)
        restore_rules(netns, render_nat_rules(interception, "ipv6"), "ipv6")
    return rules
