"""Pod selection: which pods a MeshAcceleration accelerates and with which options."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Network
from typing import Any

import pytest

from meshaccel.agent.modes import MeshModeName
from meshaccel.operator.models import MeshAccelerationSpec
from meshaccel.operator.selection import PodFacts, Verdict, select
from tests.operator.objects import pod

ENABLED = {"meshaccel.io/accelerate": "enabled"}
SPEC: dict[str, Any] = {"namespaceSelector": {"matchLabels": ENABLED}}


@dataclass(frozen=True)
class Case:
    reason: str
    want: Verdict
    pod: dict[str, Any] = field(default_factory=dict)  # keyword arguments of objects.pod()
    namespace_labels: dict[str, str] | None = field(default_factory=lambda: dict(ENABLED))
    spec: dict[str, Any] = field(default_factory=lambda: dict(SPEC))
    agent_nodes: tuple[str, ...] = ("node-1",)


CASES = [
    Case("meshed, running, labelled namespace, agent on its node", Verdict.SELECTED),
    Case("namespace not labelled", Verdict.NAMESPACE_NOT_SELECTED, namespace_labels={}),
    Case(
        "namespace unknown (not seen yet, or deleted)",
        Verdict.NAMESPACE_NOT_SELECTED,
        namespace_labels=None,
    ),
    Case(
        "podSelector does not match",
        Verdict.POD_NOT_SELECTED,
        spec={**SPEC, "podSelector": {"matchLabels": {"tier": "web"}}},
    ),
    Case(
        "podSelector matches",
        Verdict.SELECTED,
        pod={"labels": {"tier": "web"}},
        spec={
            **SPEC,
            "podSelector": {
                "matchExpressions": [{"key": "tier", "operator": "In", "values": ["web"]}]
            },
        },
    ),
    Case(
        "opted out by annotation",
        Verdict.OPTED_OUT,
        pod={"annotations": {"meshaccel.io/accelerate": "false"}},
    ),
    Case(
        "opt-out is case-blind",
        Verdict.OPTED_OUT,
        pod={"annotations": {"meshaccel.io/accelerate": "False"}},
    ),
    Case(
        "annotation true is no opt-out",
        Verdict.SELECTED,
        pod={"annotations": {"meshaccel.io/accelerate": "true"}},
    ),
    Case("no sidecar", Verdict.NO_SIDECAR, pod={"sidecar": False}),
    Case(
        "sidecar known by Istio's status annotation only",
        Verdict.SELECTED,
        pod={
            "sidecar": False,
            "annotations": {"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'},
        },
    ),
    Case("pending", Verdict.NOT_RUNNING, pod={"phase": "Pending"}),
    Case("no IP yet", Verdict.NOT_RUNNING, pod={"ip": None}),
    Case("host network", Verdict.NOT_RUNNING, pod={"host_network": True}),
    Case("not scheduled", Verdict.NO_AGENT, pod={"node": None}),
    Case("node without this resource's agent", Verdict.NO_AGENT, pod={"node": "node-2"}),
    Case(
        "Istio sidecar in linkerd mode is no sidecar",
        Verdict.NO_SIDECAR,
        spec={**SPEC, "mode": "linkerd"},
    ),
    Case(
        "includeInboundPorts restricted: the datapath cannot include, only exclude",
        Verdict.UNSUPPORTED_ANNOTATION,
        pod={"annotations": {"traffic.sidecar.istio.io/includeInboundPorts": "8080"}},
    ),
    Case(
        "includeInboundPorts '*' is the default",
        Verdict.SELECTED,
        pod={"annotations": {"traffic.sidecar.istio.io/includeInboundPorts": "*"}},
    ),
    Case(
        "TPROXY interception",
        Verdict.UNSUPPORTED_ANNOTATION,
        pod={"annotations": {"sidecar.istio.io/interceptionMode": "TPROXY"}},
    ),
    Case(
        "unparsable port list",
        Verdict.INVALID_ANNOTATION,
        pod={"annotations": {"traffic.sidecar.istio.io/excludeOutboundPorts": "http"}},
    ),
    Case(
        "port out of range",
        Verdict.INVALID_ANNOTATION,
        pod={"annotations": {"traffic.sidecar.istio.io/excludeInboundPorts": "70000"}},
    ),
    Case(
        "bad CIDR",
        Verdict.INVALID_ANNOTATION,
        pod={"annotations": {"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/40"}},
    ),
    Case("IPv6-only pod", Verdict.INVALID_ANNOTATION, pod={"ip": "fd00::5"}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.reason for c in CASES])
def test_select(case: Case) -> None:
    facts = PodFacts.from_object(pod("web-1", "shop", **case.pod))
    spec = MeshAccelerationSpec.model_validate(case.spec)
    result = select(facts, case.namespace_labels, spec, case.agent_nodes)
    assert result.verdict == case.want, (case.reason, result.detail)
    assert (result.pod is not None) == (case.want == Verdict.SELECTED), case.reason


def test_selected_pod_carries_its_identity_and_options() -> None:
    obj = pod(
        "web-1",
        "shop",
        ip="10.1.0.10",
        annotations={
            "traffic.sidecar.istio.io/excludeOutboundPorts": "5432, 6379",
            "traffic.sidecar.istio.io/excludeInboundPorts": "9090-9092",
            "traffic.sidecar.istio.io/excludeOutboundIPRanges": "169.254.169.254/32,fd00::/8",
            "traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/8",
        },
    )
    spec = MeshAccelerationSpec.model_validate(
        {
            **SPEC,
            "exclusions": {
                "outboundPorts": [25],
                "inboundPorts": [15000],
                "outboundCIDRs": ["192.0.2.0/24"],
            },
        }
    )
    result = select(PodFacts.from_object(obj), ENABLED, spec, {"node-1"})
    assert result.pod is not None
    accelerated = result.pod
    assert (accelerated.uid, accelerated.namespace, accelerated.name) == (
        obj["metadata"]["uid"],
        "shop",
        "web-1",
    )
    assert str(accelerated.ip) == "10.1.0.10" and accelerated.mode == MeshModeName.ISTIO
    options = accelerated.options
    assert options.excluded_outbound_ports == {5432, 6379, 25}, "annotation plus cluster-wide"
    assert options.excluded_inbound_ports == {9090, 9091, 9092, 15000}
    assert options.excluded_outbound_cidrs == {
        IPv4Network("169.254.169.254/32"),
        IPv4Network("192.0.2.0/24"),
    }, "IPv6 ranges are left to connect6"
    assert options.included_outbound_cidrs == frozenset({IPv4Network("10.0.0.0/8")})


def test_include_everything_is_none() -> None:
    obj = pod("a", "shop", annotations={"traffic.sidecar.istio.io/includeOutboundIPRanges": "*"})
    result = select(
        PodFacts.from_object(obj), ENABLED, MeshAccelerationSpec.model_validate(SPEC), {"node-1"}
    )
    assert result.pod is not None and result.pod.options.included_outbound_cidrs is None


@pytest.mark.parametrize(
    ("mode", "container", "annotation", "excluded"),
    [
        ("linkerd", "linkerd-proxy", "config.linkerd.io/skip-outbound-ports", {3306}),
        ("kuma", "kuma-sidecar", "traffic.kuma.io/exclude-outbound-ports", {3306}),
    ],
)
def test_other_meshes(mode, container, annotation, excluded) -> None:
    obj = pod("a", "shop", sidecar=False, annotations={annotation: "3306"})
    obj["spec"]["containers"].append({"name": container, "image": "example/proxy:1"})
    spec = MeshAccelerationSpec.model_validate({**SPEC, "mode": mode})
    result = select(PodFacts.from_object(obj), ENABLED, spec, {"node-1"})
    assert result.pod is not None, result
    assert result.pod.mode == mode
    assert result.pod.options.excluded_outbound_ports == excluded


def test_facts_keep_only_what_selection_reads() -> None:
    obj = pod(
        "a", "shop", annotations={"kubectl.kubernetes.io/last-applied-configuration": "x" * 10_000}
    )
    facts = PodFacts.from_object(obj)
    assert facts.annotations == {}, "unrelated annotations are not kept (memory at 10k pods)"
    changed = pod("a", "shop", uid=obj["metadata"]["uid"], annotations={"unrelated": "y"})
    assert PodFacts.from_object(changed) == facts, "an irrelevant change compares equal"
