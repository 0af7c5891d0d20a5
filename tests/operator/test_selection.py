"""Pod selection: which pods a MeshAcceleration accelerates and with which options."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest

from meshaccel.contract.modes import MeshModeName
from meshaccel.operator.models import MeshAccelerationSpec
from meshaccel.operator.selection import PodFacts, PodWarning, Selection, Verdict, select
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
    Case("IPv6-only pod", Verdict.SELECTED, pod={"ip": "fd00::5"}),
    Case(
        "dual-stack pod", Verdict.SELECTED, pod={"ip": "10.1.0.10", "ips": ["10.1.0.10", "fd00::a"]}
    ),
    Case(
        "dual-stack pod, IPv6 primary",
        Verdict.SELECTED,
        pod={"ip": "fd00::a", "ips": ["fd00::a", "10.1.0.10"]},
    ),
    Case(
        "two addresses of one family (not a pod Kubernetes makes)",
        Verdict.INVALID_ANNOTATION,
        pod={"ip": "10.1.0.10", "ips": ["10.1.0.10", "10.1.0.11"]},
    ),
    Case("an address that is not one", Verdict.INVALID_ANNOTATION, pod={"ip": "10.1.0.300"}),
    Case("an IPv4-mapped address", Verdict.INVALID_ANNOTATION, pod={"ip": "::ffff:10.1.0.10"}),
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
    }, "an IPv4-only pod takes no IPv6 range: no connection of it has an IPv6 destination"
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


# -- sk_msg into the pod's application sockets --------------------------------------------------

TO_APP = "meshaccel.io/sk-msg-to-app"
RECV_READERS = {"matchLabels": {"reads-with": "recv"}}


@dataclass(frozen=True)
class ToAppCase:
    reason: str
    want: bool  # PodOptions.sk_msg_to_app
    warned: bool = False  # the annotation was ignored, with a warning
    labels: dict[str, str] = field(default_factory=dict)
    annotation: str | None = None  # meshaccel.io/sk-msg-to-app
    datapath: dict[str, Any] = field(default_factory=lambda: {"skMsgToAppsSelector": RECV_READERS})


TO_APP_CASES = [
    ToAppCase("no selector, no annotation: sidecars only", False, datapath={}),
    ToAppCase("the selector matches", True, labels={"reads-with": "recv"}),
    ToAppCase("the selector does not match", False, labels={"reads-with": "splice"}),
    ToAppCase("an empty selector matches every pod", True, datapath={"skMsgToAppsSelector": {}}),
    ToAppCase("annotation true without a selector", True, annotation="true", datapath={}),
    ToAppCase("annotation true wins over a selector that does not match", True, annotation="true"),
    ToAppCase(
        "annotation false wins over a selector that matches",
        False,
        labels={"reads-with": "recv"},
        annotation="false",
    ),
    ToAppCase(
        "the annotation is case-blind and trimmed, as the opt-out is",
        False,
        labels={"reads-with": "recv"},
        annotation=" FALSE ",
    ),
    ToAppCase(
        "an invalid value is ignored: the matching selector decides",
        True,
        warned=True,
        labels={"reads-with": "recv"},
        annotation="yes",
    ),
    ToAppCase(
        "an invalid value is ignored: the non-matching selector decides",
        False,
        warned=True,
        annotation="1",
    ),
    ToAppCase("an empty value is invalid too", False, warned=True, annotation=""),
    ToAppCase(
        "without sk_msg redirection nothing is delivered, whatever the annotation says",
        False,
        annotation="true",
        datapath={"skMsgRedirect": False},
    ),
]


@pytest.mark.parametrize("case", TO_APP_CASES, ids=[c.reason for c in TO_APP_CASES])
def test_sk_msg_to_app(case: ToAppCase) -> None:
    annotations = {} if case.annotation is None else {TO_APP: case.annotation}
    obj = pod("web-1", "shop", labels=case.labels, annotations=annotations)
    spec = MeshAccelerationSpec.model_validate({**SPEC, "datapath": case.datapath})

    result = select(PodFacts.from_object(obj), ENABLED, spec, {"node-1"})

    assert result.verdict == Verdict.SELECTED, "the annotation never costs a pod its acceleration"
    assert result.pod is not None
    assert result.pod.options.sk_msg_to_app == case.want, case.reason
    if case.warned:
        assert result.warning == PodWarning.INVALID_ANNOTATION, case.reason
        assert TO_APP in result.detail and repr(case.annotation) in result.detail, result.detail
    else:
        assert (result.warning, result.detail) == (None, ""), case.reason


def test_sk_msg_to_app_does_not_spoil_the_mesh_annotations_checks() -> None:
    """A pod the mesh's annotations refuse stays refused, with their reason, not the warning."""
    obj = pod(
        "web-1",
        "shop",
        annotations={TO_APP: "maybe", "traffic.sidecar.istio.io/excludeInboundPorts": "http"},
    )
    spec = MeshAccelerationSpec.model_validate(SPEC)
    result = select(PodFacts.from_object(obj), ENABLED, spec, {"node-1"})
    assert result.verdict == Verdict.INVALID_ANNOTATION and result.warning is None
    assert "excludeInboundPorts" in result.detail


def _dns_capture(mode: str, annotations: dict[str, str], spec: dict[str, Any]) -> bool:
    obj = pod("a", "shop", sidecar=mode == "istio", annotations=annotations)
    if mode == "kuma":
        obj["spec"]["containers"].append({"name": "kuma-sidecar", "image": "example/proxy:1"})
    if mode == "linkerd":
        obj["spec"]["containers"].append({"name": "linkerd-proxy", "image": "example/proxy:1"})
    model = MeshAccelerationSpec.model_validate({**SPEC, "mode": mode, **spec})
    result = select(PodFacts.from_object(obj), ENABLED, model, {"node-1"})
    assert result.pod is not None, result
    return result.pod.options.dns_capture


ISTIO_DNS_ON = {"proxy.istio.io/config": 'proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: "true"\n'}
ISTIO_DNS_OFF = {"proxy.istio.io/config": '{"proxyMetadata": {"ISTIO_META_DNS_CAPTURE": "false"}}'}


@pytest.mark.parametrize(
    ("mode", "annotations", "spec", "captured"),
    [
        ("istio", {}, {}, False),  # Istio proxies DNS only when asked to
        ("istio", ISTIO_DNS_ON, {}, True),
        ("istio", {}, {"dnsCapture": True}, True),  # meshConfig.defaultConfig, as stated
        ("istio", ISTIO_DNS_OFF, {"dnsCapture": True}, False),  # the pod's own config wins
        ("istio", {"proxy.istio.io/config": "holdApplicationUntilProxyStarts: true"}, {}, False),
        ("istio", {"proxy.istio.io/config": "proxyMetadata: [not, a, map"}, {}, False),
        # Kuma's injector annotates every pod whose built-in DNS is on; without it, no capture.
        ("kuma", {}, {}, False),
        ("kuma", {}, {"dnsCapture": True}, False),  # the spec speaks for Istio only
        ("kuma", {"kuma.io/builtin-dns": "disabled"}, {}, False),
        ("kuma", {"kuma.io/builtin-dns": "enabled"}, {"dnsCapture": False}, True),
        (
            "kuma",
            {"kuma.io/builtin-dns": "enabled", "kuma.io/builtin-dns-port": "25053"},
            {},
            False,  # elsewhere: left to iptables
        ),
        ("kuma", {"kuma.io/builtin-dns": "enabled", "kuma.io/builtin-dns-port": "15053"}, {}, True),
        ("linkerd", {}, {"dnsCapture": True}, False),  # Linkerd has no DNS proxy
    ],
)
def test_dns_capture_from_the_mesh_settings(
    mode: str, annotations: dict[str, str], spec: dict[str, Any], captured: bool
) -> None:
    assert _dns_capture(mode, annotations, spec) is captured


def _meshed(mode: str, annotations: dict[str, str]) -> Selection:
    obj = pod("a", "shop", sidecar=False, annotations=annotations)
    obj["spec"]["containers"].append(
        {"name": {"kuma": "kuma-sidecar", "linkerd": "linkerd-proxy"}[mode], "image": "proxy:1"}
    )
    model = MeshAccelerationSpec.model_validate({**SPEC, "mode": mode})
    return select(PodFacts.from_object(obj), ENABLED, model, {"node-1"})


@pytest.mark.parametrize(
    ("mode", "annotation"),
    [
        ("linkerd", "config.linkerd.io/skip-subnets"),
        ("kuma", "traffic.kuma.io/exclude-inbound-ips"),
        ("kuma", "traffic.kuma.io/exclude-outbound-ports-for-uids"),
    ],
)
def test_exclusions_the_datapath_cannot_make_leave_the_pod_to_the_mesh(
    mode: str, annotation: str
) -> None:
    """Exclusion by source address or by uid has no map entry: such a pod keeps the mesh's
    rules (UnsupportedAnnotation) rather than be steered where the mesh would not steer it."""
    value = "1000:5432" if annotation.endswith("for-uids") else "10.8.0.0/16"
    refused = _meshed(mode, {annotation: value})
    assert refused.verdict == Verdict.UNSUPPORTED_ANNOTATION, refused
    assert annotation in refused.detail
    assert _meshed(mode, {annotation: ""}).verdict == Verdict.SELECTED  # the default


def test_kumas_outbound_ip_exclusions_become_the_pods_excluded_cidrs() -> None:
    result = _meshed("kuma", {"traffic.kuma.io/exclude-outbound-ips": "10.8.0.0/16, 192.0.2.7"})
    assert result.pod is not None, result
    assert result.pod.options.excluded_outbound_cidrs == {
        IPv4Network("10.8.0.0/16"),
        IPv4Network("192.0.2.7/32"),
    }


# -- address families ------------------------------------------------------------------------

ISTIO_EXCLUDE = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
ISTIO_INCLUDE = "traffic.sidecar.istio.io/includeOutboundIPRanges"
RANGES = {
    ISTIO_EXCLUDE: "169.254.169.254/32, fd00:ec2::254/128",
    ISTIO_INCLUDE: "10.0.0.0/8,fd00::/8",
}


def _select(obj: dict[str, Any], spec: dict[str, Any] | None = None) -> Selection:
    model = MeshAccelerationSpec.model_validate(spec or SPEC)
    return select(PodFacts.from_object(obj), ENABLED, model, {"node-1"})


@dataclass(frozen=True)
class FamilyCase:
    reason: str
    ip: str
    ips: tuple[str, ...]
    want_ips: tuple[str, ...]  # PodSpec.ips as sent: empty for a single-stack pod
    want_excluded: frozenset[str]
    want_included: frozenset[str]


FAMILY_CASES = [
    FamilyCase(
        "IPv4-only: no ips, IPv4 ranges only (as before IPv6)",
        "10.1.0.10",
        (),
        (),
        frozenset({"169.254.169.254/32", "192.0.2.0/24"}),
        frozenset({"10.0.0.0/8"}),
    ),
    FamilyCase(
        "IPv6-only: its address as ip, IPv6 ranges only",
        "fd00:10:1::a",
        (),
        (),
        frozenset({"fd00:ec2::254/128", "2001:db8::/32"}),
        frozenset({"fd00::/8"}),
    ),
    FamilyCase(
        "dual-stack: podIP first, every address in ips, both families' ranges",
        "10.1.0.10",
        ("10.1.0.10", "fd00:10:1::a"),
        ("10.1.0.10", "fd00:10:1::a"),
        frozenset({"169.254.169.254/32", "192.0.2.0/24", "fd00:ec2::254/128", "2001:db8::/32"}),
        frozenset({"10.0.0.0/8", "fd00::/8"}),
    ),
    FamilyCase(
        "dual-stack with an IPv6 podIP: podIPs' order kept",
        "fd00:10:1::a",
        ("fd00:10:1::a", "10.1.0.10"),
        ("fd00:10:1::a", "10.1.0.10"),
        frozenset({"169.254.169.254/32", "192.0.2.0/24", "fd00:ec2::254/128", "2001:db8::/32"}),
        frozenset({"10.0.0.0/8", "fd00::/8"}),
    ),
]


@pytest.mark.parametrize("case", FAMILY_CASES, ids=[c.reason for c in FAMILY_CASES])
def test_every_address_of_a_pod_and_the_ranges_of_its_families(case: FamilyCase) -> None:
    spec = {**SPEC, "exclusions": {"outboundCIDRs": ["192.0.2.0/24", "2001:db8::/32"]}}
    result = _select(pod("web-1", "shop", ip=case.ip, ips=case.ips, annotations=RANGES), spec)
    assert result.verdict == Verdict.SELECTED and result.pod is not None, (case.reason, result)
    sent = result.pod
    assert str(sent.ip) == case.ip, case.reason
    assert tuple(map(str, sent.ips)) == case.want_ips, case.reason
    assert tuple(map(str, sent.addresses)) == (case.ips or (case.ip,)), case.reason
    assert set(map(str, sent.options.excluded_outbound_cidrs)) == case.want_excluded, case.reason
    included = sent.options.included_outbound_cidrs
    assert included is not None and set(map(str, included)) == case.want_included, case.reason


def test_a_single_stack_pod_is_sent_as_before_ipv6() -> None:
    """The body an IPv4-only pod goes out in has no ``ips`` and no IPv6 range: an agent that
    predates IPv6 (its model refuses unknown fields) takes it."""
    result = _select(pod("web-1", "shop", ip="10.1.0.10", annotations=RANGES))
    assert result.pod is not None
    body = result.pod.model_dump(mode="json")
    assert "ips" not in body and body["ip"] == "10.1.0.10"
    assert body["options"]["excluded_outbound_cidrs"] == ["169.254.169.254/32"]


def test_podips_alone_give_the_address() -> None:
    """podIP is podIPs[0]; an object with only the list still has its address."""
    obj = pod("web-1", "shop", ip="fd00:10:1::a", ips=("fd00:10:1::a", "10.1.0.10"))
    del obj["status"]["podIP"]
    facts = PodFacts.from_object(obj)
    assert facts.addresses == ("fd00:10:1::a", "10.1.0.10")
    result = _select(obj)
    assert result.pod is not None
    assert result.pod.addresses == (IPv6Address("fd00:10:1::a"), IPv4Address("10.1.0.10"))


def test_a_single_address_in_podips_is_no_second_address() -> None:
    facts = PodFacts.from_object(pod("web-1", "shop", ip="10.1.0.10"))
    assert facts.ips == () and facts.addresses == ("10.1.0.10",)


def test_ipv6_ranges_reach_the_agent_as_given() -> None:
    """``::/0`` (every IPv6 destination, to ip6tables) is one range: the datapath's CIDR key
    carries the family, so it excludes no IPv4 destination (tests/datapath/test_ipv6.py)."""
    obj = pod(
        "web-1",
        "shop",
        ip="10.1.0.10",
        ips=("10.1.0.10", "fd00::a"),
        annotations={ISTIO_EXCLUDE: "::/0"},
    )
    result = _select(obj)
    assert result.pod is not None
    assert result.pod.options.excluded_outbound_cidrs == frozenset({IPv6Network("::/0")})


def test_kuma_excludes_ipv6_outbound_ips() -> None:
    obj = pod(
        "a",
        "shop",
        sidecar=False,
        ip="fd00::5",
        annotations={"traffic.kuma.io/exclude-outbound-ips": "fd00:8::/64, 10.8.0.0/16"},
    )
    obj["spec"]["containers"].append({"name": "kuma-sidecar", "image": "proxy:1"})
    result = _select(obj, {**SPEC, "mode": "kuma"})
    assert result.pod is not None, result
    assert result.pod.options.excluded_outbound_cidrs == {IPv6Network("fd00:8::/64")}


def test_an_invalid_ipv6_range_is_an_invalid_annotation() -> None:
    obj = pod("web-1", "shop", ip="fd00::5", annotations={ISTIO_EXCLUDE: "fd00::/129"})
    result = _select(obj)
    assert result.verdict == Verdict.INVALID_ANNOTATION and ISTIO_EXCLUDE in result.detail
    refused = _select(
        pod("web-1", "shop", ip="10.1.0.10", annotations={ISTIO_EXCLUDE: "fd00::/129"})
    )
    assert refused.verdict == Verdict.INVALID_ANNOTATION, "read whatever the pod's families"


def test_an_address_the_contract_refuses_is_named() -> None:
    result = _select(pod("web-1", "shop", ip="10.1.0.10", ips=("10.1.0.10", "10.1.0.11")))
    assert result.verdict == Verdict.INVALID_ANNOTATION
    assert "at most one address per family" in result.detail, result.detail
