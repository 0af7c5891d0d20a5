"""Which pods a MeshAcceleration accelerates, and with which per-pod options.

A pod is accelerated when, in this order (the first failing rule is its :class:`Verdict`):
its namespace matches ``namespaceSelector``, it matches ``podSelector``, it has not opted
out (``meshaccel.io/accelerate: "false"``), it carries the mesh's sidecar, it is running with
an IP and not on the host network, it sits on a node where this resource's agent runs, and its
mesh annotations are ones the datapath can honour exactly. Anything else would change what
the mesh's own iptables rules do for that pod, so such a pod is left to iptables. The picture then
adds verdicts of its own: an older resource keeps the pod or its node (:mod:`.picture`), or the
node's maps do not take it (:mod:`.budget`).

Whether sk_msg may deliver into an accelerated pod's application sockets is meshaccel's own
per-pod option: ``spec.datapath.skMsgToAppsSelector``, overridden either way by the pod's
``meshaccel.io/sk-msg-to-app`` annotation. That annotation only tunes an accelerated pod, so
a value other than "true" or "false" does not cost the pod its acceleration: it is ignored
(the selector decides) and the selection carries a :class:`PodWarning`.

A pod may be IPv4-only, IPv6-only or dual-stack: it goes to its agent with every address of
``status.podIPs``, and with the CIDRs of its annotations of those families.

Pods are kept as :class:`PodFacts`: only what selection reads, so that 10,000 pods cost
little memory and a pod update that changes nothing relevant is recognised as such.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import ValidationError

from meshaccel.contract.api import IPAddress, IPNetwork, PodOptions, PodSpec, addresses_of
from meshaccel.contract.modes import MESH_MODES, MeshModeName
from meshaccel.operator.models import DatapathSpec, ExclusionsSpec, MeshAccelerationSpec
from meshaccel.operator.selectors import matches

OPT_OUT_ANNOTATION = "meshaccel.io/accelerate"
SK_MSG_TO_APP_ANNOTATION = "meshaccel.io/sk-msg-to-app"
# Istio's per-pod ProxyConfig (YAML): proxyMetadata.ISTIO_META_DNS_CAPTURE turns DNS proxying on.
ISTIO_PROXY_CONFIG_ANNOTATION = "proxy.istio.io/config"
ISTIO_DNS_CAPTURE_METADATA = "ISTIO_META_DNS_CAPTURE"
# Kuma's built-in DNS per pod ("enabled"/"disabled"; on by default on Kubernetes), and its port.
KUMA_BUILTIN_DNS_ANNOTATION = "kuma.io/builtin-dns"
KUMA_BUILTIN_DNS_PORT_ANNOTATION = "kuma.io/builtin-dns-port"
_KUMA_BOOLEANS = {"enabled": True, "true": True, "disabled": False, "false": False}
_ANNOTATION_BOOLEANS = {"true": True, "false": False}


@dataclass(frozen=True)
class MeshSidecar:
    """How a mesh marks a pod as injected, and its per-pod traffic annotations."""

    containers: frozenset[str]
    injected_annotation: str
    excluded_outbound_ports: str
    excluded_inbound_ports: str
    excluded_outbound_cidrs: str | None = None
    included_outbound_cidrs: str | None = None
    # Annotations whose non-default values the datapath cannot reproduce exactly.
    unsupported: Mapping[str, frozenset[str]] = field(default_factory=dict)


_ISTIO = "traffic.sidecar.istio.io/"
SIDECARS: dict[MeshModeName, MeshSidecar] = {
    MeshModeName.ISTIO: MeshSidecar(
        containers=frozenset({"istio-proxy"}),
        injected_annotation="sidecar.istio.io/status",
        excluded_outbound_ports=_ISTIO + "excludeOutboundPorts",
        excluded_inbound_ports=_ISTIO + "excludeInboundPorts",
        excluded_outbound_cidrs=_ISTIO + "excludeOutboundIPRanges",
        included_outbound_cidrs=_ISTIO + "includeOutboundIPRanges",
        unsupported={
            # Only "every port" can be expressed: the datapath excludes, it never includes.
            _ISTIO + "includeInboundPorts": frozenset({"*"}),
            _ISTIO + "includeOutboundPorts": frozenset({""}),
            "sidecar.istio.io/interceptionMode": frozenset({"REDIRECT"}),
        },
    ),
    MeshModeName.LINKERD: MeshSidecar(
        containers=frozenset({"linkerd-proxy"}),
        injected_annotation="linkerd.io/proxy-version",
        excluded_outbound_ports="config.linkerd.io/skip-outbound-ports",
        excluded_inbound_ports="config.linkerd.io/skip-inbound-ports",
        unsupported={
            # proxy-init skips inbound connections *from* these sources; the datapath has no
            # per-source exclusion, so such a pod stays with the mesh's rules.
            "config.linkerd.io/skip-subnets": frozenset({""}),
        },
    ),
    MeshModeName.KUMA: MeshSidecar(
        containers=frozenset({"kuma-sidecar"}),
        injected_annotation="kuma.io/sidecar-injected",
        excluded_outbound_ports="traffic.kuma.io/exclude-outbound-ports",
        excluded_inbound_ports="traffic.kuma.io/exclude-inbound-ports",
        excluded_outbound_cidrs="traffic.kuma.io/exclude-outbound-ips",
        unsupported={
            # Inbound exclusion by source address, outbound exclusion by uid: not reproducible.
            "traffic.kuma.io/exclude-inbound-ips": frozenset({""}),
            "traffic.kuma.io/exclude-outbound-ports-for-uids": frozenset({""}),
        },
    ),
}

# Annotations whose presence is all selection reads (their values, like Istio's injection
# status, can be long JSON): kept with an empty value.
_PRESENCE_ONLY = frozenset(sidecar.injected_annotation for sidecar in SIDECARS.values())

# Annotations selection reads; the rest of a pod's annotations are not kept.
_KEPT_PREFIXES = (
    "sidecar.istio.io/",
    _ISTIO,
    "linkerd.io/",
    "config.linkerd.io/",
    "kuma.io/",
    "traffic.kuma.io/",
    "meshaccel.io/",
    ISTIO_PROXY_CONFIG_ANNOTATION,  # its proxyMetadata says whether DNS is captured
)


@dataclass(frozen=True, slots=True)
class PodFacts:
    """What selection needs to know of a pod."""

    uid: str
    namespace: str
    name: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    containers: frozenset[str]
    node: str | None
    ip: str | None  # status.podIP, the primary address
    running: bool
    host_network: bool
    created: str = ""  # metadata.creationTimestamp: RFC 3339 in UTC sorts as time
    # status.podIPs when it holds more than podIP (a dual-stack pod); empty: just ``ip``.
    ips: tuple[str, ...] = ()

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address of the pod as its status gives them, the primary first."""
        if not self.ip:
            return ()
        return addresses_of(self.ip, self.ips)

    @classmethod
    def from_object(cls, pod: Mapping[str, Any]) -> PodFacts:
        meta = pod.get("metadata") or {}
        spec = pod.get("spec") or {}
        status = pod.get("status") or {}
        annotations = meta.get("annotations") or {}
        containers = [*(spec.get("containers") or ()), *(spec.get("initContainers") or ())]
        ip = status.get("podIP") or None
        ips = tuple(
            str(entry["ip"])
            for entry in status.get("podIPs") or ()
            if isinstance(entry, Mapping) and entry.get("ip")
        )
        if not ip and ips:
            ip = ips[0]  # podIP is podIPs[0]; either may be read, both are set together
        # Keys and the values pods share (labels, container names) are interned: 10,000 pods
        # of a few hundred workloads then hold one copy of each string, not 10,000.
        return cls(
            uid=meta.get("uid", ""),
            namespace=sys.intern(meta.get("namespace", "")),
            name=meta.get("name", ""),
            labels={sys.intern(k): sys.intern(v) for k, v in (meta.get("labels") or {}).items()},
            annotations={
                sys.intern(k): "" if k in _PRESENCE_ONLY else v
                for k, v in annotations.items()
                if k.startswith(_KEPT_PREFIXES)
            },
            containers=frozenset(sys.intern(c.get("name", "")) for c in containers),
            node=spec.get("nodeName"),
            ip=ip,
            running=status.get("phase") == "Running" and not meta.get("deletionTimestamp"),
            host_network=bool(spec.get("hostNetwork")),
            created=str(meta.get("creationTimestamp") or ""),
            ips=ips if set(ips) - {ip} else (),
        )


class Verdict(enum.StrEnum):
    SELECTED = "Selected"
    NAMESPACE_NOT_SELECTED = "NamespaceNotSelected"
    POD_NOT_SELECTED = "PodNotSelected"
    OPTED_OUT = "OptedOut"
    NO_SIDECAR = "NoSidecar"
    NOT_RUNNING = "NotRunning"
    NO_AGENT = "NoAgentOnNode"
    UNSUPPORTED_ANNOTATION = "UnsupportedAnnotation"
    INVALID_ANNOTATION = "InvalidAnnotation"
    # Decided by the picture, not by select(): another resource, or the node's maps.
    POD_CLAIMED = "PodClaimedByOlderResource"
    NODE_CLAIMED = "NodeClaimedByOlderResource"
    OVER_BUDGET = "OverBudget"


#: Verdicts that come before any other resource's claim: such a pod is nobody's to dispute
#: (the picture orders claims so, and ``meshaccel pods`` reads them the same way).
BEFORE_CLAIMS = frozenset(
    {
        Verdict.NAMESPACE_NOT_SELECTED,
        Verdict.POD_NOT_SELECTED,
        Verdict.OPTED_OUT,
        Verdict.NO_SIDECAR,
        Verdict.NOT_RUNNING,
    }
)


class PodWarning(enum.StrEnum):
    """Why an accelerated pod runs otherwise than one of its annotations asks."""

    INVALID_ANNOTATION = "InvalidAnnotation"


@dataclass(frozen=True, slots=True)
class Selection:
    verdict: Verdict
    pod: PodSpec | None = None
    detail: str = ""  # what the verdict, or the warning, is about
    warning: PodWarning | None = None  # only with Verdict.SELECTED


class AnnotationError(ValueError):
    def __init__(self, verdict: Verdict, detail: str) -> None:
        super().__init__(detail)
        self.verdict = verdict
        self.detail = detail


def has_sidecar(pod: PodFacts, mode: MeshModeName) -> bool:
    sidecar = SIDECARS[mode]
    return bool(pod.containers & sidecar.containers) or sidecar.injected_annotation in (
        pod.annotations
    )


def opted_out(pod: PodFacts) -> bool:
    return pod.annotations.get(OPT_OUT_ANNOTATION, "").strip().lower() == "false"


def matches_selectors(
    pod: PodFacts, namespace_labels: Mapping[str, str] | None, spec: MeshAccelerationSpec
) -> Verdict | None:
    """The selector verdict alone (``None``: both selectors match)."""
    if namespace_labels is None or not matches(spec.namespaceSelector, namespace_labels):
        return Verdict.NAMESPACE_NOT_SELECTED
    if not matches(spec.podSelector, pod.labels):
        return Verdict.POD_NOT_SELECTED
    return None


def select(
    pod: PodFacts,
    namespace_labels: Mapping[str, str] | None,
    spec: MeshAccelerationSpec,
    agent_nodes: Iterable[str] | Mapping[str, object],
) -> Selection:
    """Whether ``spec`` accelerates ``pod``; if so, the pod as its node's agent receives it."""
    verdict = matches_selectors(pod, namespace_labels, spec)
    if verdict is not None:
        return Selection(verdict)
    if opted_out(pod):
        return Selection(Verdict.OPTED_OUT, detail=f"{OPT_OUT_ANNOTATION}: false")
    if not has_sidecar(pod, spec.mode):
        return Selection(Verdict.NO_SIDECAR)
    if not pod.running or not pod.ip or pod.host_network:
        return Selection(Verdict.NOT_RUNNING)
    if pod.node is None or pod.node not in agent_nodes:
        return Selection(Verdict.NO_AGENT, detail=f"node {pod.node}")
    to_app, ignored = app_takes_sk_msg(pod, spec.datapath)
    try:
        addresses = pod_addresses(pod)
        options = pod_options(
            pod,
            spec.mode,
            spec.exclusions,
            sk_msg_to_app=to_app,
            dns_capture=dns_captured(pod, spec.mode, spec.dnsCapture),
            families=frozenset(address.version for address in addresses),
        )
        accelerated = PodSpec(
            uid=pod.uid,
            namespace=pod.namespace,
            name=pod.name,
            ip=addresses[0],
            # Left out for a single-stack pod: its spec is then what an agent that predates
            # IPv6 reads (docs/operator.md, Pushing).
            ips=addresses if len(addresses) > 1 else (),
            mode=spec.mode,
            options=options,
        )
    except AnnotationError as err:
        return Selection(err.verdict, detail=err.detail)
    except (ValidationError, ValueError) as err:
        # An address or a name the agent contract refuses: not ours to accelerate.
        return Selection(Verdict.INVALID_ANNOTATION, detail=_first_error(err))
    warning = PodWarning.INVALID_ANNOTATION if ignored else None
    return Selection(Verdict.SELECTED, accelerated, detail=ignored, warning=warning)


def pod_addresses(pod: PodFacts) -> tuple[IPAddress, ...]:
    """The pod's addresses, the primary (status.podIP) first; ValueError for one that is not an
    address."""
    return tuple(ipaddress.ip_address(address) for address in pod.addresses)


def _first_error(err: ValueError) -> str:
    """A ValidationError's first error, with where it is; another ValueError's message."""
    if isinstance(err, ValidationError) and err.errors():
        first = err.errors()[0]
        where = ".".join(map(str, first["loc"]))
        return f"{where}: {first['msg']}" if where else str(first["msg"])
    return str(err).splitlines()[0]


def app_takes_sk_msg(pod: PodFacts, datapath: DatapathSpec) -> tuple[bool, str]:
    """Whether sk_msg may deliver into the pod's application sockets, and why its annotation
    was ignored ("" when it was not).

    The annotation, "true" or "false" (any case), wins over ``skMsgToAppsSelector`` either
    way; any other value is ignored and the selector decides. Without ``skMsgRedirect``
    nothing is delivered by sk_msg at all: always False.
    """
    selector = datapath.skMsgToAppsSelector
    wanted = selector is not None and matches(selector, pod.labels)
    ignored = ""
    raw = pod.annotations.get(SK_MSG_TO_APP_ANNOTATION)
    if raw is not None:
        annotated = _ANNOTATION_BOOLEANS.get(raw.strip().lower())
        if annotated is None:
            ignored = (
                f'{SK_MSG_TO_APP_ANNOTATION}: {raw!r} is neither "true" nor "false": ignored, '
                "spec.datapath.skMsgToAppsSelector decides"
            )
        else:
            wanted = annotated
    return datapath.skMsgRedirect and wanted, ignored


def dns_captured(pod: PodFacts, mode: MeshModeName, default: bool | None) -> bool:
    """Whether the pod's mesh sends its DNS to the proxy's DNS server. Istio: the pod's
    proxy.istio.io/config, else ``default`` (``spec.dnsCapture``, the mesh-wide setting the
    operator cannot see), else off. Kuma: its injector's kuma.io/builtin-dns annotation only.

    A value the mesh would not read as a boolean is taken as the mesh's default too. Anything
    unclear about the port (Kuma's builtin-dns-port set elsewhere) leaves DNS to the mesh's rules
    (False): Kuma's mode never steers TCP/53 to Envoy, so its rules still take it.
    """
    dns_port = MESH_MODES[mode].dns_port
    if dns_port is None:
        return False
    if mode is MeshModeName.ISTIO:
        annotated = _istio_dns_capture(pod.annotations.get(ISTIO_PROXY_CONFIG_ANNOTATION))
        if annotated is not None:
            return annotated
        return bool(default)
    if mode is MeshModeName.KUMA:
        port = pod.annotations.get(KUMA_BUILTIN_DNS_PORT_ANNOTATION)
        if port is not None and port.strip() != str(dns_port):
            return False
        # Kuma's injector writes the annotation on every pod whose built-in DNS is on, and its
        # init container redirects DNS only then: the pod's own word, never a default (a
        # capture the mesh does not make would send DNS to a port nothing listens on).
        raw = pod.annotations.get(KUMA_BUILTIN_DNS_ANNOTATION)
        return raw is not None and _KUMA_BOOLEANS.get(raw.strip().lower()) is True
    return False


def _istio_dns_capture(raw: str | None) -> bool | None:
    """ISTIO_META_DNS_CAPTURE of a proxy.istio.io/config value (None: it does not say)."""
    if not raw:
        return None
    try:
        config = yaml.safe_load(raw)
    except yaml.YAMLError:
        return None
    metadata = config.get("proxyMetadata") if isinstance(config, dict) else None
    value = metadata.get(ISTIO_DNS_CAPTURE_METADATA) if isinstance(metadata, dict) else None
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _ANNOTATION_BOOLEANS.get(value.strip().lower())
    return None


def pod_options(
    pod: PodFacts,
    mode: MeshModeName,
    exclusions: ExclusionsSpec,
    *,
    families: frozenset[int],
    sk_msg_to_app: bool = False,
    dns_capture: bool = False,
) -> PodOptions:
    """The pod's mesh annotations plus the cluster-wide exclusions, as the agent takes them,
    and whether sk_msg may deliver into its application sockets (:func:`app_takes_sk_msg`).

    CIDRs are kept for the address ``families`` (4, 6) the pod has: as the mesh's iptables rules
    take the IPv4 ranges and its ip6tables rules the IPv6 ones, a range of a family the pod has
    no address of concerns no connection of it (so an IPv4-only pod's options are what they were
    before IPv6, whatever its annotations list).
    """
    sidecar = SIDECARS[mode]
    for annotation, accepted in sidecar.unsupported.items():
        value = pod.annotations.get(annotation)
        if value is not None and value.strip() not in accepted:
            raise AnnotationError(
                Verdict.UNSUPPORTED_ANNOTATION,
                f"{annotation}: {value!r} cannot be reproduced by the datapath",
            )
    included: frozenset[IPNetwork] | None = None
    if sidecar.included_outbound_cidrs:
        raw = pod.annotations.get(sidecar.included_outbound_cidrs)
        if raw is not None and raw.strip() != "*":
            included = _cidrs(sidecar.included_outbound_cidrs, raw, families)
    excluded_cidrs = frozenset(
        network
        for network in (ipaddress.ip_network(c) for c in exclusions.outboundCIDRs)
        if network.version in families
    )
    if sidecar.excluded_outbound_cidrs:
        raw = pod.annotations.get(sidecar.excluded_outbound_cidrs, "")
        excluded_cidrs |= _cidrs(sidecar.excluded_outbound_cidrs, raw, families)
    return _shared_options(
        _ports(pod, sidecar.excluded_outbound_ports) | frozenset(exclusions.outboundPorts),
        _ports(pod, sidecar.excluded_inbound_ports) | frozenset(exclusions.inboundPorts),
        excluded_cidrs,
        included,
        sk_msg_to_app,
        dns_capture,
    )


@functools.lru_cache(maxsize=4096)
def _shared_options(
    outbound_ports: frozenset[int],
    inbound_ports: frozenset[int],
    outbound_cidrs: frozenset[IPNetwork],
    included_cidrs: frozenset[IPNetwork] | None,
    sk_msg_to_app: bool,
    dns_capture: bool,
) -> PodOptions:
    """One (immutable) PodOptions per distinct set of options: most pods share the default."""
    return PodOptions(
        excluded_outbound_ports=outbound_ports,
        excluded_inbound_ports=inbound_ports,
        excluded_outbound_cidrs=outbound_cidrs,
        included_outbound_cidrs=included_cidrs,
        sk_msg_to_app=sk_msg_to_app,
        dns_capture=dns_capture,
    )


def _ports(pod: PodFacts, annotation: str) -> frozenset[int]:
    ports: set[int] = set()
    for item in _items(pod.annotations.get(annotation, "")):
        try:
            first, _, last = item.partition("-")  # Istio and Kuma accept ranges
            low, high = int(first), int(last or first)
        except ValueError:
            raise AnnotationError(
                Verdict.INVALID_ANNOTATION, f"{annotation}: {item!r} is not a port"
            ) from None
        if not 1 <= low <= high <= 65535 or high - low >= 256:
            raise AnnotationError(
                Verdict.INVALID_ANNOTATION, f"{annotation}: {item!r} is not a usable port range"
            )
        ports.update(range(low, high + 1))
    return frozenset(ports)


def _cidrs(annotation: str, raw: str, families: frozenset[int]) -> frozenset[IPNetwork]:
    """The networks of ``families`` an annotation lists (every item must be a CIDR)."""
    networks: set[IPNetwork] = set()
    for item in _items(raw):
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise AnnotationError(
                Verdict.INVALID_ANNOTATION, f"{annotation}: {item!r} is not a CIDR"
            ) from None
        if network.version in families:
            networks.add(network)
    return frozenset(networks)


def _items(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(",") if item.strip()]
