"""The lab's meshes (no root needed): each mesh's rules as its own tool writes them, and the lab
kept in step with the modes meshaccel is given (contract/modes.py).

The kernel scenarios (tests/datapath/) run traffic through these rules; here the rule text is
pinned against the meshes' sources, and every port a mesh's rules leave alone is checked to be
one meshaccel leaves alone too (excluding less than the mesh would steer what the mesh does not).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshaccel.contract.modes import MESH_MODES, MeshModeName

from .envoy import EnvoyBootstrapOptions, render_envoy_bootstrap
from .istio_iptables import ISTIO_DEFAULT_INBOUND_EXCLUDES, IstioInterception
from .kuma_iptables import KumaInterception, render_kuma_nat_rules
from .linkerd_iptables import LinkerdInterception, render_linkerd_nat_rules
from .meshes import LAB_MESHES, LINKERD_LAB, LabMesh, render_nat_rules


def chain(rules: str, name: str) -> list[str]:
    return [line for line in rules.splitlines() if line.startswith(f"-A {name} ")]


def test_linkerd_rules_match_proxy_init() -> None:
    rules = render_linkerd_nat_rules(
        LinkerdInterception(skip_inbound_ports=(9090,), skip_outbound_ports=(9091,))
    )
    lines = rules.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    assert chain(rules, "PREROUTING") == ["-A PREROUTING -j PROXY_INIT_REDIRECT"]
    assert chain(rules, "OUTPUT") == ["-A OUTPUT -j PROXY_INIT_OUTPUT"]
    assert chain(rules, "PROXY_INIT_REDIRECT") == [
        "-A PROXY_INIT_REDIRECT -p tcp -m multiport --dports 4190,4191,4567,4568,9090 -j RETURN",
        "-A PROXY_INIT_REDIRECT -p tcp -j REDIRECT --to-ports 4143",
    ]
    assert chain(rules, "PROXY_INIT_OUTPUT") == [
        "-A PROXY_INIT_OUTPUT -m owner --uid-owner 2102 -j RETURN",
        "-A PROXY_INIT_OUTPUT -o lo -j RETURN",
        "-A PROXY_INIT_OUTPUT -p tcp -m multiport --dports 4567,4568,9091 -j RETURN",
        "-A PROXY_INIT_OUTPUT -p tcp -j REDIRECT --to-ports 4140",
    ]


def test_linkerd_rules_with_a_proxy_gid_subnets_and_many_ports() -> None:
    ports = tuple(range(20000, 20020))
    rules = render_linkerd_nat_rules(
        LinkerdInterception(proxy_gid=2102, skip_inbound_ports=ports, skip_subnets=("10.9.0.0/16",))
    )
    redirect = chain(rules, "PROXY_INIT_REDIRECT")
    # multiport takes 15 ports a rule: 4 defaults + 20 make two rules, in order.
    skipped = [line.split("--dports ")[1].split()[0].split(",") for line in redirect[:2]]
    assert [len(group) for group in skipped] == [15, 9]
    assert [int(p) for group in skipped for p in group] == [4190, 4191, 4567, 4568, *ports]
    assert redirect[2] == "-A PROXY_INIT_REDIRECT -s 10.9.0.0/16 -j RETURN"
    assert chain(rules, "PROXY_INIT_OUTPUT")[1] == (
        "-A PROXY_INIT_OUTPUT -m owner --gid-owner 2102 -j RETURN"
    )


def test_kuma_rules_match_kuma_init_with_the_builtin_dns() -> None:
    rules = render_kuma_nat_rules(
        KumaInterception(exclude_inbound_ports=(9090,), exclude_outbound_ports=(9091,))
    )
    assert chain(rules, "PREROUTING") == ["-A PREROUTING -p tcp -j KUMA_MESH_INBOUND"]
    assert chain(rules, "OUTPUT") == [
        "-A OUTPUT -p udp --dport 53 -m owner --uid-owner 5678 -j RETURN",
        "-A OUTPUT -p udp --dport 53 -j REDIRECT --to-ports 15053",
        "-A OUTPUT -p tcp -j KUMA_MESH_OUTBOUND",
    ]
    assert chain(rules, "KUMA_MESH_INBOUND") == [
        "-A KUMA_MESH_INBOUND -p tcp --dport 9090 -j RETURN",
        "-A KUMA_MESH_INBOUND -p tcp --dport 9001 -j RETURN",
        "-A KUMA_MESH_INBOUND -p tcp -j KUMA_MESH_INBOUND_REDIRECT",
    ]
    assert chain(rules, "KUMA_MESH_OUTBOUND") == [
        "-A KUMA_MESH_OUTBOUND -p tcp --dport 9091 -j RETURN",
        "-A KUMA_MESH_OUTBOUND -s 127.0.0.6/32 -o lo -j RETURN",
        "-A KUMA_MESH_OUTBOUND -p tcp ! --dport 53 -o lo ! -d 127.0.0.1/32"
        " -m owner --uid-owner 5678 -j KUMA_MESH_INBOUND_REDIRECT",
        "-A KUMA_MESH_OUTBOUND -p tcp ! --dport 53 -o lo -m owner ! --uid-owner 5678 -j RETURN",
        "-A KUMA_MESH_OUTBOUND -m owner --uid-owner 5678 -j RETURN",
        "-A KUMA_MESH_OUTBOUND -p tcp --dport 53 -j REDIRECT --to-ports 15053",
        "-A KUMA_MESH_OUTBOUND -d 127.0.0.1/32 -j RETURN",
        "-A KUMA_MESH_OUTBOUND -j KUMA_MESH_OUTBOUND_REDIRECT",
    ]
    assert chain(rules, "KUMA_MESH_INBOUND_REDIRECT") == [
        "-A KUMA_MESH_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 15006"
    ]
    assert chain(rules, "KUMA_MESH_OUTBOUND_REDIRECT") == [
        "-A KUMA_MESH_OUTBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 15001"
    ]


def test_kuma_rules_without_the_builtin_dns_leave_port_53_alone() -> None:
    rules = render_kuma_nat_rules(KumaInterception(dns_port=None))
    assert "53" not in rules.replace("15053", "")
    assert "-A KUMA_MESH_OUTBOUND -p tcp -o lo -m owner ! --uid-owner 5678 -j RETURN" in rules


@dataclass(frozen=True)
class DefaultsLeftAlone:
    """Ports a mesh's rules leave alone in a pod without annotations, per direction."""

    inbound: frozenset[int]
    outbound: frozenset[int]
    reason: str


def defaults_left_alone(lab: LabMesh) -> DefaultsLeftAlone:
    rules = lab.interception()
    if isinstance(rules, LinkerdInterception):
        return DefaultsLeftAlone(
            frozenset(rules.inbound_ports_to_ignore),
            frozenset(rules.outbound_ports_to_ignore),
            "proxy-init's inbound/outbound ports to ignore, as the injector sets them",
        )
    if isinstance(rules, KumaInterception):
        return DefaultsLeftAlone(
            frozenset(rules.inbound_excludes),
            frozenset({53} if rules.dns_port is not None else ()),
            "the probe proxy inbound; TCP DNS goes to kuma-dp's DNS server, not Envoy",
        )
    assert isinstance(rules, IstioInterception)
    return DefaultsLeftAlone(
        frozenset({rules.inbound_tunnel_port, *ISTIO_DEFAULT_INBOUND_EXCLUDES}),
        frozenset(),
        "istio-iptables' inbound RETURNs (HBONE, Prometheus, health, status)",
    )


@pytest.mark.parametrize("mesh", list(LAB_MESHES), ids=str)
def test_meshaccel_leaves_alone_every_port_the_mesh_leaves_alone(mesh: MeshModeName) -> None:
    lab, mode = LAB_MESHES[mesh], MESH_MODES[mesh]
    left_alone = defaults_left_alone(lab)
    assert left_alone.inbound <= mode.inbound_excluded_ports, left_alone.reason
    assert left_alone.outbound <= mode.outbound_excluded_ports, left_alone.reason


@pytest.mark.parametrize("mesh", list(LAB_MESHES), ids=str)
def test_the_lab_builds_each_mesh_as_its_mode_describes_it(mesh: MeshModeName) -> None:
    lab = LAB_MESHES[mesh]
    assert lab.mode is MESH_MODES[mesh]
    assert lab.proxy.uid == lab.mode.sidecar_uid
    # The connect-time check of who the proxy is follows the mesh's own owner rules.
    assert lab.exempts_proxy_gid == lab.mode.sidecar_by_gid
    assert (lab.listeners.outbound_port, lab.listeners.inbound_port) == (
        lab.mode.outbound_port,
        lab.mode.inbound_port,
    )
    # The scenarios' "own port" is excluded both ways by meshaccel, and no proxy listens there.
    assert lab.own_port in lab.mode.outbound_excluded_ports & lab.mode.inbound_excluded_ports
    proxy_ports = {lab.listeners.outbound_port, lab.listeners.inbound_port}
    assert lab.own_port not in proxy_ports | {lab.listeners.admin_port}
    # Rendering goes to the mesh's own writer.
    assert render_nat_rules(lab.interception()).startswith("*nat\n")


def stand_in_options(lab: LabMesh, tmp_path: Path, *, ipv6: bool = False) -> EnvoyBootstrapOptions:
    """The Envoy bootstrap a pod of ``lab``'s mesh runs as its proxy's stand-in."""
    listeners = lab.listeners
    return EnvoyBootstrapOptions(
        node_id=str(lab.name),
        access_log_path=tmp_path / "access.log",
        admin_port=listeners.admin_port,
        outbound_port=listeners.outbound_port,
        inbound_port=listeners.inbound_port,
        outbound_address=listeners.outbound_address,
        inbound_passthrough_source=listeners.inbound_passthrough_source,
        ipv6=ipv6,
    )


def test_the_linkerd_stand_in_listens_where_linkerd2_proxy_does(tmp_path: Path) -> None:
    bootstrap = render_envoy_bootstrap(stand_in_options(LINKERD_LAB, tmp_path))
    resources = bootstrap["static_resources"]
    bound = {
        listener["name"]: listener["address"]["socket_address"]
        for listener in resources["listeners"]
    }
    assert bound == {
        "virtualOutbound": {"address": "127.0.0.1", "port_value": 4140},
        "virtualInbound": {"address": "0.0.0.0", "port_value": 4143},
    }
    assert bootstrap["admin"]["address"]["socket_address"]["port_value"] == 4191
    # The inbound side connects from the pod's own address: no bind to a passthrough source.
    (inbound,) = [c for c in resources["clusters"] if c["name"] == "InboundPassthroughCluster"]
    assert "upstream_bind_config" not in inbound


def test_kuma_and_linkerd_ip6tables_rules_differ_only_in_addresses() -> None:
    """With IPv6 on, kuma-init and proxy-init write the same chains for ip6tables: Kuma's with
    ::1/128 and its IPv6 passthrough source ::6/128, Linkerd's (which name no address) alike
    but for the skipped subnets, each family's own."""
    kuma = KumaInterception(exclude_inbound_ports=(9090,), exclude_outbound_ports=(9091,))
    kuma4, kuma6 = render_kuma_nat_rules(kuma), render_kuma_nat_rules(kuma, "ipv6")
    assert "127." not in kuma6
    assert kuma6 == kuma4.replace("127.0.0.1/32", "::1/128").replace("127.0.0.6/32", "::6/128")
    linkerd = LinkerdInterception(skip_subnets=("10.9.0.0/16", "fd00:9::/64"))
    linkerd4, linkerd6 = (render_linkerd_nat_rules(linkerd, f) for f in ("ipv4", "ipv6"))
    assert chain(linkerd4, "PROXY_INIT_REDIRECT")[1] == (
        "-A PROXY_INIT_REDIRECT -s 10.9.0.0/16 -j RETURN"
    )
    assert chain(linkerd6, "PROXY_INIT_REDIRECT")[1] == (
        "-A PROXY_INIT_REDIRECT -s fd00:9::/64 -j RETURN"
    )
    assert linkerd6.replace("fd00:9::/64", "10.9.0.0/16") == linkerd4


@pytest.mark.parametrize("mesh", list(LAB_MESHES), ids=str)
def test_a_dual_stack_stand_in_listens_on_both_families(mesh: MeshModeName, tmp_path: Path) -> None:
    """A dual-stack pod's proxy listens on each virtual listener's IPv6 twin too (:: or ::1,
    IPv6-only sockets beside the IPv4 ones) and, where it binds its inbound passthrough to
    127.0.0.6, binds ::6 for IPv6 destinations."""
    listeners = LAB_MESHES[mesh].listeners
    options = stand_in_options(LAB_MESHES[mesh], tmp_path, ipv6=True)
    resources = render_envoy_bootstrap(options)["static_resources"]
    twins = {
        listener["name"]: [a["address"]["socket_address"] for a in listener["additional_addresses"]]
        for listener in resources["listeners"]
    }
    outbound6 = "::1" if listeners.outbound_address == "127.0.0.1" else "::"
    assert twins == {
        "virtualOutbound": [{"address": outbound6, "port_value": listeners.outbound_port}],
        "virtualInbound": [{"address": "::", "port_value": listeners.inbound_port}],
    }
    (inbound,) = [c for c in resources["clusters"] if c["name"] == "InboundPassthroughCluster"]
    if listeners.inbound_passthrough_source is None:
        assert "upstream_bind_config" not in inbound
    else:
        assert inbound["upstream_bind_config"]["extra_source_addresses"] == [
            {"address": {"address": "::6", "port_value": 0}}
        ]
    # IPv4 alone: exactly the bootstrap of before.
    single = render_envoy_bootstrap(dataclasses.replace(options, ipv6=False))
    assert "additional_addresses" not in json.dumps(single)
    assert "extra_source_addresses" not in json.dumps(single)
