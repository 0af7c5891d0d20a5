"""The contract: the operator's side never loads the agent's kernel code (it shares only
meshaccel.contract), and what the contract promises about addresses of both families."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from pydantic import ValidationError

from meshaccel.contract.api import (
    AppliedPod,
    PodOptions,
    PodSet,
    PodSpec,
    PodsReply,
)

# Imports every module of the given packages in a fresh interpreter and prints what got loaded.
_PROBE = """
import importlib, json, pkgutil, sys
for package in sys.argv[1:]:
    root = importlib.import_module(package)
    for module in pkgutil.walk_packages(root.__path__, package + "."):
        importlib.import_module(module.name)
print(json.dumps(sorted(sys.modules)))
"""


def _loaded_by(*packages: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, *packages],
        capture_output=True,
        text=True,
        check=True,
    )
    loaded: list[str] = json.loads(result.stdout)
    return loaded


def test_the_operator_loads_no_agent_module() -> None:
    loaded = _loaded_by("meshaccel.operator")
    assert "meshaccel.operator.main" in loaded  # the probe did import the operator
    assert "meshaccel.contract.api" in loaded
    assert [name for name in loaded if name.startswith("meshaccel.agent")] == []


def test_the_contract_imports_neither_side() -> None:
    loaded = _loaded_by("meshaccel.contract")
    assert "meshaccel.contract.settings" in loaded
    leaked = [name for name in loaded if name.startswith(("meshaccel.agent", "meshaccel.operator"))]
    assert leaked == []
    assert "ctypes" not in loaded  # no binding, no struct layout: plain data only


def test_the_probe_sees_the_agent_when_it_is_imported() -> None:
    # The check above can fail: importing the agent's datapath does load the binding.
    loaded = _loaded_by("meshaccel.agent")
    assert "meshaccel.agent.libbpf.native" in loaded


# -- addresses of both families (meshaccel.contract.api) ---------------------------------------

# What the contract before IPv6 wrote for these bodies, byte for byte: an agent that predates
# IPv6 refuses unknown fields, so an IPv4-only set must still be exactly this.
IPV4_SET_BEFORE_IPV6 = (
    '{"epoch":4,"generation":17,"pods":[{"uid":"uid-1","namespace":"shop","name":"web-1",'
    '"ip":"198.18.0.10","mode":"istio","options":{"excluded_outbound_ports":[],'
    '"excluded_inbound_ports":[],"excluded_outbound_cidrs":[],"included_outbound_cidrs":null,'
    '"sk_msg_to_app":false,"dns_capture":false},"cgroup":null},{"uid":"uid-2","namespace":"shop",'
    '"name":"db-1","ip":"198.18.0.11","mode":"kuma","options":{"excluded_outbound_ports":[5432],'
    '"excluded_inbound_ports":[9090],"excluded_outbound_cidrs":["169.254.169.254/32"],'
    '"included_outbound_cidrs":["10.0.0.0/8"],"sk_msg_to_app":true,"dns_capture":true},'
    '"cgroup":"kubepods/pod-2"}]}'
)
IPV4_PODS_REPLY_BEFORE_IPV6 = (
    '{"applied_generation":3,"pods":[{"uid":"u","namespace":"n","name":"p","ip":"198.18.0.10",'
    '"cgroup_id":42}],"unresolved":[]}'
)


def test_an_ipv4_only_set_serializes_as_before_ipv6() -> None:
    pod_set = PodSet.model_validate(
        {
            "epoch": 4,
            "generation": 17,
            "pods": [
                {"uid": "uid-1", "namespace": "shop", "name": "web-1", "ip": "198.18.0.10"},
                {
                    "uid": "uid-2",
                    "namespace": "shop",
                    "name": "db-1",
                    "ip": "198.18.0.11",
                    "mode": "kuma",
                    "cgroup": "kubepods/pod-2",
                    "options": {
                        "excluded_outbound_ports": [5432],
                        "excluded_inbound_ports": [9090],
                        "excluded_outbound_cidrs": ["169.254.169.254/32"],
                        "included_outbound_cidrs": ["10.0.0.0/8"],
                        "sk_msg_to_app": True,
                        "dns_capture": True,
                    },
                },
            ],
        }
    )
    assert pod_set.model_dump_json() == IPV4_SET_BEFORE_IPV6
    assert PodSet.model_validate_json(IPV4_SET_BEFORE_IPV6) == pod_set


def test_an_ipv4_only_pods_reply_serializes_as_before_ipv6() -> None:
    applied = AppliedPod.model_validate(
        {"uid": "u", "namespace": "n", "name": "p", "ip": "198.18.0.10", "cgroup_id": 42}
    )
    reply = PodsReply(applied_generation=3, pods=[applied], unresolved=[])
    assert reply.model_dump_json() == IPV4_PODS_REPLY_BEFORE_IPV6
    assert PodsReply.model_validate_json(IPV4_PODS_REPLY_BEFORE_IPV6) == reply


SPEC_CASES: list[tuple[str, dict[str, object], tuple[str, ...] | str]] = [
    # (reason, fields besides uid/namespace/name, addresses or the error's fragment)
    ("IPv4-only", {"ip": "198.18.0.10"}, ("198.18.0.10",)),
    ("IPv6-only", {"ip": "fd00:198:18::10"}, ("fd00:198:18::10",)),
    (
        "dual-stack: ip first, whatever the order of ips",
        {"ip": "198.18.0.10", "ips": ["fd00:198:18::10", "198.18.0.10"]},
        ("198.18.0.10", "fd00:198:18::10"),
    ),
    ("ips of one address: just ip", {"ip": "fd00::1", "ips": ["fd00::1"]}, ("fd00::1",)),
    ("ips without ip", {"ip": "198.18.0.10", "ips": ["fd00::1"]}, "(ip) is not among them"),
    (
        "two of one family",
        {"ip": "198.18.0.10", "ips": ["198.18.0.10", "198.18.0.11"]},
        "at most one address per family",
    ),
    (
        "three addresses",
        {"ip": "198.18.0.10", "ips": ["198.18.0.10", "fd00::1", "fd00::2"]},
        "at most 2 items",
    ),
    ("IPv6 loopback", {"ip": "::1"}, "cannot be a pod's address"),
    ("IPv6 unspecified", {"ip": "::"}, "cannot be a pod's address"),
    ("IPv6 multicast", {"ip": "ff02::1"}, "cannot be a pod's address"),
    ("IPv6 link-local", {"ip": "fe80::1"}, "cannot be a pod's address"),
    ("IPv4-mapped (the datapath's own spelling)", {"ip": "::ffff:198.18.0.10"}, "cannot be"),
    ("a bad address in ips", {"ip": "fd00::1", "ips": ["fd00::1", "127.0.0.1"]}, "cannot be"),
    ("not an address", {"ip": "fd00::1::2"}, "ip"),
]


@pytest.mark.parametrize(("reason", "fields", "want"), SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_a_pods_addresses(
    reason: str, fields: dict[str, object], want: tuple[str, ...] | str
) -> None:
    body = {"uid": "u", "namespace": "n", "name": "p", **fields}
    if isinstance(want, str):
        with pytest.raises(ValidationError, match=re.escape(want)):
            PodSpec.model_validate(body)
        return
    spec = PodSpec.model_validate(body)
    assert tuple(map(str, spec.addresses)) == want, reason
    assert spec.ipv4 == next((a for a in spec.addresses if a.version == 4), None), reason
    assert spec.ipv6 == next((a for a in spec.addresses if a.version == 6), None), reason
    again = PodSpec.model_validate_json(spec.model_dump_json())
    assert again == spec, "a round trip keeps every address"
    assert ('"ips"' in spec.model_dump_json()) is bool(spec.ips), reason


def test_unknown_fields_stay_refused() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        PodSpec.model_validate(
            {"uid": "u", "namespace": "n", "name": "p", "ip": "fd00::1", "ipv6": "fd00::1"}
        )
    with pytest.raises(ValidationError, match="Extra inputs"):
        AppliedPod.model_validate(
            {"uid": "u", "namespace": "n", "name": "p", "ip": "fd00::1", "cgroup_id": 1, "x": 1}
        )


SET_CASES: list[tuple[str, list[tuple[str, ...]], str | None]] = [
    (
        "distinct addresses of both families",
        [("198.18.0.1", "fd00::1"), ("fd00::2",), ("198.18.0.3",)],
        None,
    ),
    (
        "one IPv4 address twice",
        [("198.18.0.1",), ("198.18.0.1", "fd00::2")],
        "pods[1].ip 198.18.0.1",
    ),
    (
        "one IPv6 address twice",
        [("198.18.0.1", "fd00::1"), ("198.18.0.2", "fd00::1")],
        "pods[1].ips fd00::1",
    ),
    (
        "an IPv6-only pod's address in a dual-stack pod",
        [("fd00::1",), ("198.18.0.2", "fd00::1")],
        "pods[1].ips fd00::1",
    ),
]


@pytest.mark.parametrize(("reason", "addresses", "error"), SET_CASES, ids=[c[0] for c in SET_CASES])
def test_no_two_pods_of_a_set_share_an_address(
    reason: str, addresses: list[tuple[str, ...]], error: str | None
) -> None:
    pods = [
        PodSpec.model_validate(
            {
                "uid": f"u{i}",
                "namespace": "n",
                "name": f"p{i}",
                "ip": a[0],
                "ips": a if len(a) > 1 else (),
            }
        )
        for i, a in enumerate(addresses)
    ]
    if error is None:
        assert len(PodSet(generation=1, pods=pods).pods) == len(pods), reason
    else:
        with pytest.raises(ValidationError, match=re.escape(f"{error} appears twice")):
            PodSet(generation=1, pods=pods)


def test_cidrs_of_both_families_are_kept_as_given() -> None:
    """``::/0`` stays one range: the datapath's trie key carries the family, so an IPv6 range
    never matches an IPv4 destination (tests/datapath/test_ipv6.py proves it in the kernel)."""
    given = {"10.0.0.0/8", "192.0.2.0/24", "fd00::/8", "::/0"}
    options = PodOptions.model_validate(
        {"excluded_outbound_cidrs": given, "included_outbound_cidrs": given}
    )
    for taken in (options.excluded_outbound_cidrs, options.included_outbound_cidrs):
        assert taken is not None
        assert {str(n) for n in taken} == given
    assert PodOptions.model_validate_json(options.model_dump_json()) == options
