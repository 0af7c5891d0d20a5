"""A pod from the agent's API to its pods-map entry: its flags and addresses (no kernel needed).

Reading the maps back into an AcceleratedPod is tested against the real maps in
``tests/agent/test_reconcile.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest

from meshaccel.agent import layout
from meshaccel.agent.layout import PodFlags
from meshaccel.agent.pods import AcceleratedPod, cidr_key, decode_cidr_key
from meshaccel.agent.reconcile import accelerated_pod
from meshaccel.contract.api import PodSpec
from meshaccel.contract.modes import ISTIO

CGROUP_ID = 4242


@dataclass(frozen=True)
class FlagsCase:
    reason: str
    options: dict[str, Any]  # PodOptions, as the operator sends them (JSON)
    flags: PodFlags


FLAGS_CASES = [
    FlagsCase("the defaults", {}, PodFlags.POD_OUTBOUND_INCLUDE_ALL),
    FlagsCase(
        "sk_msg into the app",
        {"sk_msg_to_app": True},
        PodFlags.POD_OUTBOUND_INCLUDE_ALL | PodFlags.POD_SK_MSG_TO_APP,
    ),
    FlagsCase(
        "sk_msg into the sidecar only, spelled out",
        {"sk_msg_to_app": False},
        PodFlags.POD_OUTBOUND_INCLUDE_ALL,
    ),
    FlagsCase(
        "included CIDRs, sidecar only", {"included_outbound_cidrs": ["10.0.0.0/8"]}, PodFlags(0)
    ),
    FlagsCase(
        "included CIDRs and sk_msg into the app",
        {"included_outbound_cidrs": ["10.0.0.0/8"], "sk_msg_to_app": True},
        PodFlags.POD_SK_MSG_TO_APP,
    ),
]


@pytest.mark.parametrize("case", FLAGS_CASES, ids=[c.reason for c in FLAGS_CASES])
def test_pod_options_become_pod_flags(case: FlagsCase) -> None:
    body = {"uid": "u-1", "namespace": "shop", "name": "web-1", "ip": "198.18.0.10"}
    spec = PodSpec.model_validate_json(json.dumps({**body, "options": case.options}))
    pod = accelerated_pod(spec, CGROUP_ID)
    assert pod.sk_msg_to_app == case.options.get("sk_msg_to_app", False), case.reason
    assert PodFlags(pod.info().flags) == case.flags, case.reason
    if "included_outbound_cidrs" in case.options:
        assert pod.included_outbound_cidrs == frozenset({IPv4Network("10.0.0.0/8")})


@dataclass(frozen=True)
class AddressCase:
    reason: str
    ip: str | None  # in_mesh's ip
    ipv6: str | None  # in_mesh's ipv6
    info_ip: bytes  # pod_info.ip
    info_ipv6: bytes  # pod_info.ipv6
    pod_ips: set[bytes]  # its pod_ips keys


MAPPED = bytes(10) + b"\xff\xff"
V4 = bytes([198, 18, 0, 10])
V6 = bytes.fromhex("fd000198001800000000000000000010")
ADDRESS_CASES = [
    AddressCase("IPv4 only, as before", "198.18.0.10", None, V4, bytes(16), {MAPPED + V4}),
    AddressCase("IPv6 only, given as ip", "fd00:198:18::10", None, bytes(4), V6, {V6}),
    AddressCase("IPv6 only, given as ipv6", None, "fd00:198:18::10", bytes(4), V6, {V6}),
    AddressCase("dual-stack", "198.18.0.10", "fd00:198:18::10", V4, V6, {MAPPED + V4, V6}),
]


@pytest.mark.parametrize("case", ADDRESS_CASES, ids=[c.reason for c in ADDRESS_CASES])
def test_addresses_of_both_families_encode_and_decode(case: AddressCase) -> None:
    pod = AcceleratedPod.in_mesh(
        ISTIO,
        CGROUP_ID,
        case.ip,
        ipv6=case.ipv6,
        excluded_outbound_cidrs=frozenset({IPv4Network("10.0.0.0/8"), IPv6Network("fd00::/8")}),
        included_outbound_cidrs=frozenset({IPv6Network("::/0")}),
    )
    info = pod.info()
    assert (bytes(info.ip), bytes(info.ipv6)) == (case.info_ip, case.info_ipv6), case.reason
    assert pod.address_keys() == case.pod_ips, case.reason
    decoded = AcceleratedPod.from_info(
        CGROUP_ID,
        layout.PodInfo.from_buffer_copy(bytes(info)),
        excluded_outbound_ports=pod.excluded_outbound_ports,
        excluded_inbound_ports=pod.excluded_inbound_ports,
        excluded_outbound_cidrs=frozenset(decode_cidr_key(k)[1] for k in pod.excluded_cidr_keys()),
        included_outbound_cidrs=frozenset(decode_cidr_key(k)[1] for k in pod.included_cidr_keys()),
    )
    assert decoded == pod, case.reason


def test_pod_info_keeps_every_ipv4_field_where_it_was() -> None:
    """ipv6 was appended: the first 16 bytes are the IPv4 layout's, byte for byte."""
    pod = AcceleratedPod.in_mesh(ISTIO, CGROUP_ID, "198.18.0.10", ipv6="fd00:198:18::10")
    raw = bytes(pod.info())
    assert len(raw) == 32
    assert raw[:4] == V4 and raw[16:] == V6
    assert raw[8:10] == ISTIO.outbound_port.to_bytes(2, "big")
    assert raw[10:12] == ISTIO.inbound_port.to_bytes(2, "big")


@dataclass(frozen=True)
class CidrCase:
    reason: str
    network: IPv4Network | IPv6Network
    family: int
    prefixlen: int  # of the trie key: 96 (family + cgroup id) + the address bits before it
    addr: bytes


CIDR_CASES = [
    CidrCase(
        "IPv4: inside ::ffff:0:0/96",
        IPv4Network("10.96.0.0/12"),
        layout.AF_INET,
        96 + 96 + 12,
        MAPPED + bytes([10, 96, 0, 0]),
    ),
    CidrCase(
        "IPv4 everything", IPv4Network("0.0.0.0/0"), layout.AF_INET, 96 + 96, MAPPED + bytes(4)
    ),
    CidrCase("IPv6", IPv6Network("fd00:198:18::/64"), layout.AF_INET6, 96 + 64, V6[:8] + bytes(8)),
    CidrCase(
        "IPv6 everything: its family keeps IPv4 out",
        IPv6Network("::/0"),
        layout.AF_INET6,
        96,
        bytes(16),
    ),
]


@pytest.mark.parametrize("case", CIDR_CASES, ids=[c.reason for c in CIDR_CASES])
def test_cidr_keys_of_both_families(case: CidrCase) -> None:
    raw = cidr_key(CGROUP_ID, case.network)
    key = layout.PodCidrKey.from_buffer_copy(raw)
    assert (key.family, key.prefixlen, bytes(key.addr)) == (case.family, case.prefixlen, case.addr)
    assert key.pod_cgroup_id == CGROUP_ID
    assert decode_cidr_key(raw) == (CGROUP_ID, case.network), case.reason


@dataclass(frozen=True)
class RefusedCase:
    reason: str
    ip: str | None
    ipv6: str | None


REFUSED_CASES = [
    RefusedCase("no address at all", None, None),
    RefusedCase("two IPv6 addresses", "fd00:198:18::10", "fd00:198:18::11"),
    RefusedCase("IPv6 loopback", None, "::1"),
    RefusedCase("an IPv4-mapped address as the IPv6 one", "198.18.0.10", "::ffff:198.18.0.10"),
    RefusedCase("IPv4 given as ipv6", "198.18.0.10", "198.18.0.11"),
]


@pytest.mark.parametrize("case", REFUSED_CASES, ids=[c.reason for c in REFUSED_CASES])
def test_impossible_addresses_are_refused(case: RefusedCase) -> None:
    with pytest.raises(ValueError):
        AcceleratedPod.in_mesh(ISTIO, CGROUP_ID, case.ip, ipv6=case.ipv6)


@pytest.mark.parametrize(
    ("body", "ip", "ipv6"),
    [
        ({"ip": "198.18.0.10"}, "198.18.0.10", None),
        ({"ip": "fd00:198:18::10"}, None, "fd00:198:18::10"),
        (
            {"ip": "fd00:198:18::10", "ips": ["fd00:198:18::10", "198.18.0.10"]},
            "198.18.0.10",
            "fd00:198:18::10",
        ),
    ],
    ids=["ipv4", "ipv6", "dual-stack, IPv6 primary"],
)
def test_a_spec_gives_one_address_per_family(
    body: dict[str, Any], ip: str | None, ipv6: str | None
) -> None:
    spec = PodSpec.model_validate({"uid": "u-1", "namespace": "shop", "name": "web-1", **body})
    pod = accelerated_pod(spec, CGROUP_ID)
    assert (pod.ip, pod.ipv6) == (
        None if ip is None else IPv4Address(ip),
        None if ipv6 is None else IPv6Address(ipv6),
    )
