"""Budgets: the operator counts a pod's map entries as the agent does, and cuts a node's set to
what its maps hold, the pods within their share first (no Kopf, no I/O)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshaccel.agent.reconcile import accelerated_pod, map_usage
from meshaccel.contract.api import PodOptions, PodSpec
from meshaccel.contract.modes import MeshModeName
from meshaccel.operator.budget import MAPS, SHARES_PER_POD, Budget, usage
from meshaccel.operator.models import MeshAccelerationSpec


def spec(**datapath: Any) -> MeshAccelerationSpec:
    return MeshAccelerationSpec.model_validate({"namespaceSelector": {}, "datapath": datapath})


def pod_spec(index: int, *, dual_stack: bool = False, **options: Any) -> PodSpec:
    ipv4 = ipaddress.IPv4Address("10.1.0.0") + index + 1
    ipv6 = ipaddress.IPv6Address("fd00::") + index + 1
    return PodSpec(
        uid=f"uid-{index}",
        namespace="shop",
        name=f"pod-{index}",
        ip=ipv4,
        ips=(ipv4, ipv6) if dual_stack else (),
        options=PodOptions(**options),
    )


@dataclass(frozen=True)
class UsageCase:
    reason: str
    mode: MeshModeName = MeshModeName.ISTIO
    options: dict[str, Any] | None = None
    ip: str = "10.1.0.1"
    ips: tuple[str, ...] = ()  # a dual-stack pod's addresses


USAGE_CASES = [
    UsageCase("a plain Istio pod: the mesh's own ports only"),
    UsageCase("Linkerd's own ports", mode=MeshModeName.LINKERD),
    UsageCase("Kuma's own ports", mode=MeshModeName.KUMA),
    UsageCase(
        "annotated ports, some of them the mesh's own (counted once)",
        options={"excluded_outbound_ports": {5432, 15001}, "excluded_inbound_ports": {15020, 8443}},
    ),
    UsageCase(
        "excluded and included CIDRs",
        options={
            "excluded_outbound_cidrs": {"10.0.0.0/8", "192.168.0.0/16"},
            "included_outbound_cidrs": {"10.0.0.0/8"},
        },
    ),
    UsageCase("included CIDRs empty: none", options={"included_outbound_cidrs": set()}),
    UsageCase(
        "CIDRs of both families, one trie each",
        options={
            "excluded_outbound_cidrs": {"10.0.0.0/8", "fd00::/8", "2001:db8::/32"},
            "included_outbound_cidrs": {"10.0.0.0/8", "fd00:1::/64"},
        },
        ips=("10.1.0.1", "fd00::1"),
    ),
    UsageCase(
        "every IPv6 destination: ::/0 is one entry (the trie key carries the family)",
        options={"excluded_outbound_cidrs": {"::/0"}},
        ip="fd00::1",
    ),
    UsageCase("an IPv6-only pod: one address", ip="fd00::1"),
    UsageCase("a dual-stack pod: two addresses", ips=("10.1.0.1", "fd00::1")),
    UsageCase(
        "the most a pod can ask for",
        options={
            "excluded_outbound_ports": set(range(20000, 20256)),
            "excluded_inbound_ports": set(range(30000, 30256)),
        },
    ),
]


@pytest.mark.parametrize("case", USAGE_CASES, ids=lambda c: c.reason)
def test_usage_counts_as_the_agent_does(case: UsageCase) -> None:
    pod = PodSpec(
        uid="u",
        namespace="shop",
        name="web",
        ip=ipaddress.ip_address(case.ip),
        ips=tuple(map(ipaddress.ip_address, case.ips)),
        mode=case.mode,
        options=PodOptions(**(case.options or {})),
    )
    agent = map_usage([accelerated_pod(pod, 7)])
    assert usage(pod) == tuple(agent[name] for name in MAPS), case.reason
    assert (agent["pods"], agent["pod_ips"]) == (1, len(pod.addresses)), case.reason


def test_ipv6_ranges_are_counted_as_the_agent_takes_them() -> None:
    """One trie entry per range of either family, ``::/0`` included."""
    everything = PodOptions(excluded_outbound_cidrs=frozenset({ipaddress.ip_network("::/0")}))
    assert usage(pod_spec(0, excluded_outbound_cidrs=everything.excluded_outbound_cidrs))[1] == 1
    both = pod_spec(
        1, excluded_outbound_cidrs={"10.0.0.0/8", "fd00::/8"}, included_outbound_cidrs={"fd00::/8"}
    )
    assert usage(both)[1:3] == (2, 1)


def test_shares_and_limits_from_the_spec() -> None:
    budget = Budget.of(spec())
    assert budget.capacity == (16384, 4096, 4096, 2048)
    assert budget.share == (16, 4, 4, 2)
    # Every Istio pod needs 13 ports and an address; a pod may add eight shares.
    assert budget.limit == (
        13 + SHARES_PER_POD * 16,
        SHARES_PER_POD * 4,
        SHARES_PER_POD * 4,
        1 + SHARES_PER_POD * 2,
    )

    excluded = MeshAccelerationSpec.model_validate(
        {
            "namespaceSelector": {},
            "exclusions": {"outboundPorts": [5432], "outboundCIDRs": ["10.0.0.0/8"]},
        }
    )
    assert Budget.of(excluded).limit[:2] == (14 + 128, 1 + 32), "what every pod needs, plus"
    assert Budget.of(spec(maxPods=1, maxPodPorts=64)).limit[0] == 64, "never above capacity"


def test_the_pods_within_their_share_go_first() -> None:
    budget = Budget.of(spec(maxPods=4, maxPodPorts=128))  # a share of 32 ports
    hogs = [pod_spec(i, excluded_outbound_ports=set(range(20000, 20050))) for i in range(3)]
    plain = pod_spec(9)
    taken, left_out = budget.fit("node-1", [*hogs, plain])  # the plain pod is the youngest
    assert [p.name for p in taken] == ["pod-9", "pod-0"]
    assert {item.pod: item.reason for item in left_out.values()} == {
        "shop/pod-1": "pod_ports needs 63, 52 left on the node",
        "shop/pod-2": "pod_ports needs 63, 52 left on the node",
    }


def test_at_most_max_pods_oldest_first() -> None:
    budget = Budget.of(spec(maxPods=2))
    taken, left_out = budget.fit("node-1", [pod_spec(i) for i in range(3)])
    assert [p.name for p in taken] == ["pod-0", "pod-1"]
    assert [item.reason for item in left_out.values()] == [
        "the node's agent holds 2 pods (spec.datapath.maxPods)"
    ]


def test_a_node_of_dual_stack_pods_holds_max_pods() -> None:
    """pod_ips holds two entries per pod: a dual-stack pod is within its share, and maxPods of
    them fit (an agent sizes the map the same way, contract/settings.py)."""
    budget = Budget.of(spec(maxPods=3))
    pods = [pod_spec(i, dual_stack=True) for i in range(4)]
    assert all(usage(p)[3] == 2 for p in pods)
    taken, left_out = budget.fit("node-1", pods)
    assert [p.name for p in taken] == ["pod-0", "pod-1", "pod-2"]
    assert [item.reason for item in left_out.values()] == [
        "the node's agent holds 3 pods (spec.datapath.maxPods)"
    ]


ports = st.frozensets(st.integers(1, 65535), max_size=40)
cidrs = st.frozensets(
    st.builds(
        lambda a, n: ipaddress.IPv4Network((a, n), strict=False),
        st.integers(0, 2**32 - 1),
        st.integers(8, 32),
    )
    | st.builds(
        lambda a, n: ipaddress.IPv6Network((a, n), strict=False),
        st.integers(0, 2**128 - 1),
        st.integers(0, 128),
    ),
    max_size=12,
)
option_sets = st.builds(
    lambda out, inb, exc, inc: {
        "excluded_outbound_ports": out,
        "excluded_inbound_ports": inb,
        "excluded_outbound_cidrs": exc,
        "included_outbound_cidrs": inc,
    },
    ports,
    ports,
    cidrs,
    st.none() | cidrs,
)


@settings(max_examples=200, deadline=None)
@given(
    max_pods=st.integers(1, 12),
    port_capacity=st.integers(1, 400),
    cidr_capacity=st.integers(1, 40),
    asks=st.lists(st.tuples(st.one_of(st.just({}), option_sets), st.booleans()), max_size=20),
)
def test_a_cut_set_always_fits_and_never_drops_a_pod_within_its_share(
    max_pods: int, port_capacity: int, cidr_capacity: int, asks: list[tuple[dict[str, Any], bool]]
) -> None:
    budget = Budget.of(spec(maxPods=max_pods, maxPodPorts=port_capacity, maxPodCidrs=cidr_capacity))
    pods = [pod_spec(i, dual_stack=dual, **options) for i, (options, dual) in enumerate(asks)]
    taken, left_out = budget.fit("node-1", pods)

    assert len(taken) + len(left_out) == len(pods)
    assert len(taken) <= max_pods
    totals = [sum(usage(p)[i] for p in taken) for i in range(len(MAPS))]
    assert all(n <= c for n, c in zip(totals, budget.capacity, strict=True))
    within = [p for p in pods if all(n <= s for n, s in zip(usage(p), budget.share, strict=True))]
    if len(within) <= max_pods:
        assert not {p.uid for p in within} & left_out.keys(), "a pod within its share fits"
    assert budget.fit("node-1", pods) == (taken, left_out), "deterministic"
