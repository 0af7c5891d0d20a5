"""Linkerd's interception (nat table) as linkerd2-proxy-init writes it, for one pod netns.

Written from linkerd2-proxy-init's ``pkg/iptables/iptables.go`` and the injector's defaults
(linkerd2 ``charts/partials/templates/_proxy-init.tpl``, ``values.yaml``): two chains,
PROXY_INIT_REDIRECT (from PREROUTING: skipped inbound ports and source subnets return, the rest
goes to the proxy's inbound port) and PROXY_INIT_OUTPUT (from OUTPUT: the proxy's uid, and gid
when one is configured, returns, so does everything leaving through lo, then the skipped
outbound ports; the rest goes to the proxy's outbound port). Unlike Istio's rules there is no
gid rule by default and no rule for the proxy's own pod address: the proxy reaches its
application over lo, which returns. With IPv6 on (proxy-init --ipv6), the same rules go to
ip6tables: they name no address, only the skipped subnets of that family.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .families import Family, family_of
from .nat_table import nat_table_head

# The injector's defaults: the proxy's control and admin ports, and Galera's (4567, 4568), which
# the chart skips both ways (proxyInit.ignoreInboundPorts / ignoreOutboundPorts).
LINKERD_DEFAULT_INBOUND_SKIPS = (4190, 4191, 4567, 4568)
LINKERD_DEFAULT_OUTBOUND_SKIPS = (4567, 4568)

# iptables' multiport match takes at most 15 port references per rule (a range counts twice).
_MULTIPORT_LIMIT = 15


@dataclass(frozen=True)
class LinkerdInterception:
    """Parameters of proxy-init; the skips mirror config.linkerd.io/skip-*-ports annotations,
    appended to the injector's defaults as the chart does. ``proxy_gid`` None: proxy-init's
    ``--proxy-gid`` is not given (the chart passes it only when ``proxy.gid`` is set)."""

    proxy_uid: int = 2102
    proxy_gid: int | None = None
    inbound_port: int = 4143
    outbound_port: int = 4140
    skip_inbound_ports: tuple[int, ...] = ()
    skip_outbound_ports: tuple[int, ...] = ()
    skip_subnets: tuple[str, ...] = ()

    @property
    def inbound_ports_to_ignore(self) -> tuple[int, ...]:
        return LINKERD_DEFAULT_INBOUND_SKIPS + self.skip_inbound_ports

    @property
    def outbound_ports_to_ignore(self) -> tuple[int, ...]:
        return LINKERD_DEFAULT_OUTBOUND_SKIPS + self.skip_outbound_ports


def _multiport_groups(ports: Sequence[int]) -> Iterator[str]:
    """Ports in comma-joined groups that one multiport rule accepts, in order."""
    for start in range(0, len(ports), _MULTIPORT_LIMIT):
        yield ",".join(str(port) for port in ports[start : start + _MULTIPORT_LIMIT])


def render_linkerd_nat_rules(config: LinkerdInterception, family: Family = "ipv4") -> str:
    """The (ip6)iptables-restore text of the nat table proxy-init installs (redirect-all
    mode)."""
    subnets = [s for s in config.skip_subnets if family_of(s.split("/")[0]) == family]
    redirect, output = "PROXY_INIT_REDIRECT", "PROXY_INIT_OUTPUT"
    lines = [
        *nat_table_head(redirect, output),
        *(
            f"-A {redirect} -p tcp -m multiport --dports {group} -j RETURN"
            for group in _multiport_groups(config.inbound_ports_to_ignore)
        ),
        *(f"-A {redirect} -s {subnet} -j RETURN" for subnet in subnets),
        f"-A {redirect} -p tcp -j REDIRECT --to-ports {config.inbound_port}",
        f"-A PREROUTING -j {redirect}",
        f"-A {output} -m owner --uid-owner {config.proxy_uid} -j RETURN",
    ]
    if config.proxy_gid is not None:
        lines.append(f"-A {output} -m owner --gid-owner {config.proxy_gid} -j RETURN")
    lines += [
        f"-A {output} -o lo -j RETURN",
        *(
            f"-A {output} -p tcp -m multiport --dports {group} -j RETURN"
            for group in _multiport_groups(config.outbound_ports_to_ignore)
        ),
        f"-A {output} -p tcp -j REDIRECT --to-ports {config.outbound_port}",
        f"-A OUTPUT -j {output}",
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"
