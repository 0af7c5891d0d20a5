"""Kuma's transparent proxy (nat table) as kuma-init writes it on Kubernetes, for one pod.

Written from kumahq/kuma ``pkg/transparentproxy/iptables/builder/builder_table_nat.go``, its
defaults (``pkg/transparentproxy/config``) and the Kubernetes injector
(``pkg/transparentproxy/kubernetes``, ``--redirect-all-dns-traffic`` with the built-in DNS,
which is on by default there): chains KUMA_MESH_INBOUND and KUMA_MESH_OUTBOUND, each handing
what it captures to a *_REDIRECT chain. The proxy (kuma-dp's Envoy) is recognised by uid only;
its inbound passthrough connects from 127.0.0.6 as Istio's does, and every DNS query, UDP or TCP,
goes to kuma-dp's DNS server on 15053 unless the proxy sends it. The raw table's conntrack zones
for UDP DNS are left out: they concern UDP only, which the lab does not send. With IPv6 on,
kuma-init writes the same chains for ip6tables with ::1/128 and the IPv6 passthrough source ::6.
"""

from __future__ import annotations

from dataclasses import dataclass

from .families import LOOPBACK, PASSTHROUGH_SOURCE, Family, host_cidr
from .nat_table import nat_table_head

DNS_PORT = 53
INBOUND_PASSTHROUGH_SOURCE = PASSTHROUGH_SOURCE["ipv4"]
# The injector excludes its application probe proxy (kuma-dp, 9001) from inbound redirection.
KUMA_DEFAULT_INBOUND_EXCLUDES = (9001,)


@dataclass(frozen=True)
class KumaInterception:
    """Parameters of kuma-init; the excludes mirror traffic.kuma.io/exclude-*-ports annotations
    (inbound ones added to the injector's own, as it does)."""

    proxy_uid: int = 5678
    inbound_port: int = 15006
    outbound_port: int = 15001
    dns_port: int | None = 15053  # None: the built-in DNS is off, DNS is not redirected
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()

    @property
    def inbound_excludes(self) -> tuple[int, ...]:
        return self.exclude_inbound_ports + KUMA_DEFAULT_INBOUND_EXCLUDES


def render_kuma_nat_rules(config: KumaInterception, family: Family = "ipv4") -> str:
    """The (ip6)iptables-restore text of the nat table kuma-init installs."""
    uid = f"--uid-owner {config.proxy_uid}"
    loopback, passthrough = host_cidr(LOOPBACK[family]), host_cidr(PASSTHROUGH_SOURCE[family])
    inbound, outbound = "KUMA_MESH_INBOUND", "KUMA_MESH_OUTBOUND"
    in_redirect, out_redirect = f"{inbound}_REDIRECT", f"{outbound}_REDIRECT"
    # With DNS redirected, TCP to port 53 over lo is not the proxy's passthrough nor returned.
    not_dns = f" ! --dport {DNS_PORT}" if config.dns_port is not None else ""
    lines = [
        *nat_table_head(inbound, outbound, in_redirect, out_redirect),
        f"-A PREROUTING -p tcp -j {inbound}",
    ]
    if config.dns_port is not None:
        lines += [
            f"-A OUTPUT -p udp --dport {DNS_PORT} -m owner {uid} -j RETURN",
            f"-A OUTPUT -p udp --dport {DNS_PORT} -j REDIRECT --to-ports {config.dns_port}",
        ]
    lines += [
        f"-A OUTPUT -p tcp -j {outbound}",
        *(f"-A {inbound} -p tcp --dport {port} -j RETURN" for port in config.inbound_excludes),
        f"-A {inbound} -p tcp -j {in_redirect}",
        *(
            f"-A {outbound} -p tcp --dport {port} -j RETURN"
            for port in config.exclude_outbound_ports
        ),
        f"-A {outbound} -s {passthrough} -o lo -j RETURN",
        f"-A {outbound} -p tcp{not_dns} -o lo ! -d {loopback} -m owner {uid} -j {in_redirect}",
        f"-A {outbound} -p tcp{not_dns} -o lo -m owner ! {uid} -j RETURN",
        f"-A {outbound} -m owner {uid} -j RETURN",
    ]
    if config.dns_port is not None:
        lines.append(
            f"-A {outbound} -p tcp --dport {DNS_PORT} -j REDIRECT --to-ports {config.dns_port}"
        )
    lines += [
        f"-A {outbound} -d {loopback} -j RETURN",
        f"-A {outbound} -j {out_redirect}",
        f"-A {in_redirect} -p tcp -j REDIRECT --to-ports {config.inbound_port}",
        f"-A {out_redirect} -p tcp -j REDIRECT --to-ports {config.outbound_port}",
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"
