"""Istio's sidecar interception (nat table) as istio-iptables writes it, for one pod netns.

With IPv6 enabled istio-iptables writes the same chains for ip6tables, with ::1/128 for
127.0.0.1/32 and ::6/128 (which it adds to lo) for the inbound passthrough source 127.0.0.6
(istio/istio tools/istio-iptables, testdata ipv6-*.golden). The lab does the same in every pod
that has an IPv6 address.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from .commands import run_command
from .families import FAMILIES, LOOPBACK, PASSTHROUGH_SOURCE, Family, host_cidr
from .nat_table import nat_table_head
from .netns import netns_exec_argv, run_in_netns

# Ports Istio's injector always excludes from inbound capture (Prometheus merge, health, status).
ISTIO_DEFAULT_INBOUND_EXCLUDES = (15090, 15021, 15020)


@dataclass(frozen=True)
class IstioInterception:
    """Parameters of istio-iptables; the excludes mirror traffic.sidecar.istio.io annotations."""

    proxy_uid: int = 1337
    proxy_gid: int = 1337
    outbound_capture_port: int = 15001
    inbound_capture_port: int = 15006
    inbound_tunnel_port: int = 15008
    passthrough_source: str = "127.0.0.6"
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    # istio-agent's DNS proxy with ISTIO_META_DNS_CAPTURE (istio-iptables --redirect-dns, every
    # destination captured): None, DNS is not redirected.
    dns_port: int | None = None


DNS_PORT = 53


def passthrough_cidr(source: str, family: Family) -> str:
    """The inbound passthrough source as the rules of ``family`` name it: the configured IPv4
    source for iptables, ::6 for ip6tables (istio-iptables' own)."""
    return host_cidr(source if family == "ipv4" else PASSTHROUGH_SOURCE["ipv6"])


def render_istio_nat_rules(config: IstioInterception, family: Family = "ipv4") -> str:
    """The iptables-restore (``ipv4``) or ip6tables-restore (``ipv6``) text of the nat table
    istio-iptables installs (excludes included)."""
    uid, gid = config.proxy_uid, config.proxy_gid
    loopback = host_cidr(LOOPBACK[family])
    tunnel = config.inbound_tunnel_port
    # With DNS redirected, TCP to port 53 over lo is neither the proxy's hairpin nor returned.
    not_dns = f" ! --dport {DNS_PORT}" if config.dns_port is not None else ""
    not_hairpin_ports = (
        f"-m multiport ! --dports {tunnel},{DNS_PORT}" if not_dns else f"! --dport {tunnel}"
    )
    lines = [
        *nat_table_head(
            "ISTIO_INBOUND",
            "ISTIO_IN_REDIRECT",
            "ISTIO_OUTPUT",
            "ISTIO_REDIRECT",
            *(["ISTIO_OUTPUT_DNS"] if config.dns_port is not None else []),
        ),
        "-A PREROUTING -p tcp -j ISTIO_INBOUND",
        f"-A ISTIO_INBOUND -p tcp --dport {tunnel} -j RETURN",
        "-A ISTIO_INBOUND -p tcp -m multiport --dports "
        + ",".join(str(p) for p in ISTIO_DEFAULT_INBOUND_EXCLUDES)
        + " -j RETURN",
        *(
            f"-A ISTIO_INBOUND -p tcp --dport {port} -j RETURN"
            for port in config.exclude_inbound_ports
        ),
        "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
        f"-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {config.inbound_capture_port}",
        *_dns_output_rules(config),
        "-A OUTPUT -p tcp -j ISTIO_OUTPUT",
        # istio-iptables applies outbound port exclusions first in ISTIO_OUTPUT.
        *(
            f"-A ISTIO_OUTPUT -p tcp --dport {port} -j RETURN"
            for port in config.exclude_outbound_ports
        ),
        f"-A ISTIO_OUTPUT -s {passthrough_cidr(config.passthrough_source, family)} -o lo -j RETURN",
    ]
    for owner in (f"--uid-owner {uid}", f"--gid-owner {gid}"):
        lines += [
            f"-A ISTIO_OUTPUT ! -d {loopback} -o lo -p tcp {not_hairpin_ports}"
            f" -m owner {owner} -j ISTIO_IN_REDIRECT",
            f"-A ISTIO_OUTPUT -o lo{' -p tcp' + not_dns if not_dns else ''} -m owner ! {owner}"
            " -j RETURN",
            f"-A ISTIO_OUTPUT -m owner {owner} -j RETURN",
        ]
    if config.dns_port is not None:
        lines.append(
            f"-A ISTIO_OUTPUT -p tcp --dport {DNS_PORT} -j REDIRECT --to-ports {config.dns_port}"
        )
    lines += [
        f"-A ISTIO_OUTPUT -d {loopback} -j RETURN",
        "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
        f"-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {config.outbound_capture_port}",
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


def _dns_output_rules(config: IstioInterception) -> list[str]:
    """UDP DNS in its own chain: the proxy's own queries return, every other one goes to the
    DNS proxy (TCP DNS is redirected in ISTIO_OUTPUT, after the proxy's RETURNs)."""
    if config.dns_port is None:
        return []
    return [
        "-A OUTPUT -p udp -j ISTIO_OUTPUT_DNS",
        f"-A ISTIO_OUTPUT_DNS -p udp --dport {DNS_PORT} -m owner --uid-owner {config.proxy_uid}"
        " -j RETURN",
        f"-A ISTIO_OUTPUT_DNS -p udp --dport {DNS_PORT} -m owner --gid-owner {config.proxy_gid}"
        " -j RETURN",
        f"-A ISTIO_OUTPUT_DNS -p udp --dport {DNS_PORT} -j REDIRECT --to-ports {config.dns_port}",
    ]


_TOOL: dict[Family, str] = {"ipv4": "iptables", "ipv6": "ip6tables"}
_NFT_FAMILY: dict[Family, str] = {"ipv4": "ip", "ipv6": "ip6"}


def iptables_restore_binary(family: Family = "ipv4") -> str:
    """iptables-nft-restore or ip6tables-nft-restore (this project's baseline is the nft
    backend)."""
    tool = _TOOL[family]
    for name in (f"{tool}-nft-restore", f"{tool}-restore"):
        if shutil.which(name):
            return name
    raise FileNotFoundError(f"{tool}-nft-restore / {tool}-restore not found")


def restore_rules(netns: str, rules: str, family: Family = "ipv4") -> None:
    """Load one nat table's text into the netns with one (ip6)iptables-restore."""
    run_command(netns_exec_argv(netns, [iptables_restore_binary(family)]), input_text=rules)


def add_passthrough_source_v6(netns: str) -> None:
    """What istio-iptables does with IPv6 enabled: ::6/128 on lo, the address the inbound
    passthrough binds to for IPv6 destinations."""
    listing = run_in_netns(netns, ["ip", "-6", "-o", "addr", "show", "dev", "lo"])
    if f" {host_cidr(PASSTHROUGH_SOURCE['ipv6'])} " not in listing:
        run_in_netns(netns, ["ip", "-6", "addr", "add", "::6/128", "dev", "lo"])


def dump_nat_table(netns: str, family: Family = "ipv4") -> str:
    """(ip6)iptables-save -t nat inside the netns (empty text if there is no nat table)."""
    return run_in_netns(netns, [f"{_TOOL[family]}-nft-save", "-t", "nat"], check=False)


def nat_table_exists(netns: str, family: Family = "ipv4") -> bool:
    nft_family = _NFT_FAMILY[family]
    listing = run_in_netns(netns, ["nft", "list", "tables", nft_family])
    return any(line.split() == ["table", nft_family, "nat"] for line in listing.splitlines())


def remove_istio_iptables(netns: str) -> None:
    """Delete (not flush) the ip and ip6 nat tables so that no nat/conntrack hooks stay
    registered (any mesh's rules: they all live in the nat tables)."""
    for family in FAMILIES:
        if nat_table_exists(netns, family):
            run_in_netns(netns, ["nft", "delete", "table", _NFT_FAMILY[family], "nat"])
