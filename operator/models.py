"""The MeshAcceleration resource: the single source of truth for its CRD schema.

``python -m meshaccel.operator.crd`` turns these models into ``crds/*.yaml``; a test fails
when the committed files are out of date. Field names are the resource's camelCase keys.
What the schema can check (types, enums, ranges, patterns, required fields) is checked here,
and so is what admission can check of fields together: CEL rules (``x-kubernetes-validations``,
:func:`cel_rules`) refuse at ``kubectl apply``, with their message, selector terms that can
never match and options that exclude each other. What CEL cannot see (a retired field in a
resource stored before, a CIDR's host bits, two value lists compared within the API server's
cost budget) is reported by :mod:`.checks` as a Degraded condition.

The agents' image is not part of the resource: it is the operator's setting
(:class:`~.config.AgentImage`). ``spec.agent.image`` stays in the schema, retired, so that the
API server keeps showing it to the operator instead of dropping it unseen (docs/security.md).
"""

from __future__ import annotations

import enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from meshaccel.contract.modes import MeshModeName
from meshaccel.contract.settings import (
    DEFAULT_REDIRECT_BUDGET,
    MAX_REDIRECT_BUDGET,
    MIN_REDIRECT_BUDGET,
)

GROUP = "meshaccel.io"
VERSION = "v1alpha1"
KIND = "MeshAcceleration"
PLURAL = "meshaccelerations"
SINGULAR = "meshacceleration"
SHORT_NAMES = ("meshaccel", "ma")
API_VERSION = f"{GROUP}/{VERSION}"

# What the 0.1 CRD defaulted spec.agent.image to: the API server wrote it into every resource
# created then. Such a resource chose nothing, so the value is ignored rather than refused.
LEGACY_DEFAULT_AGENT_IMAGE = "ghcr.io/meshaccel/meshaccel-agent:0.1.0"
# What the 0.1 CRD defaulted spec.agent.resources to, stored in every resource created then.
# Such a resource chose nothing either: its agents get the operator's default resources.
LEGACY_DEFAULT_AGENT_RESOURCES = {
    "requests": {"cpu": "50m", "memory": "96Mi"},
    "limits": {"memory": "256Mi"},
}
DEFAULT_AGENT_PORT = 9474

Port = Annotated[int, Field(ge=1, le=65535)]
# Kubernetes quantities ("100m", "64Mi", 1): the CRD types them as int-or-string.
Quantity = Annotated[int | str, Field(json_schema_extra={"x-kubernetes-int-or-string": True})]
LabelKey = Annotated[
    str,
    Field(
        min_length=1,
        max_length=317,  # an optional 253-character DNS prefix, "/", a 63-character name
        pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
    ),
]
LabelValue = Annotated[
    str, Field(max_length=63, pattern=r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
]
# The spelling only (IPv4 dotted quads, or IPv6 hex groups with at least one colon): the
# operator checks the rest (checks.py), as Kubernetes 1.30's CEL has no CIDR functions.
Cidr = Annotated[
    str,
    Field(
        max_length=49,  # the longest IPv6 address (45 characters), "/128"
        pattern=r"^(([0-9]{1,3}\.){3}[0-9]{1,3}/[0-9]{1,2}|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*/[0-9]{1,3})$",
        description="an IPv4 or IPv6 network in CIDR notation, such as 10.0.0.0/8 or fd00::/8",
    ),
]


class _Model(BaseModel):
    # Unknown fields are refused (a real API server prunes them; the emulator refuses them).
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


CEL_RULES = "x-kubernetes-validations"


def cel_rules(*rules: tuple[str, str]) -> ConfigDict:
    """A model's CEL rules, each (expression, message), for the CRD (:mod:`.crd` copies them).

    ``self`` is the model's object, after defaulting; a nullable field set to null is absent
    to ``has()``, as on the API server. Rules iterate only lists with a ``maxItems`` and compare
    only strings with a ``maxLength`` or an enum: the API server refuses a CRD whose rules it
    cannot bound. tests/operator/test_crd_rules.py evaluates each on good and bad resources.
    """
    return ConfigDict(json_schema_extra={CEL_RULES: [{"rule": r, "message": m} for r, m in rules]})


class SelectorOperator(enum.StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class LabelSelectorRequirement(_Model):
    model_config = cel_rules(
        (
            "self.operator in ['Exists', 'DoesNotExist'] || (has(self.values) && "
            "size(self.values) > 0)",
            "operators In and NotIn need at least one value: list them in values, or use "
            "Exists or DoesNotExist",
        ),
        (
            "self.operator in ['In', 'NotIn'] || !has(self.values) || size(self.values) == 0",
            "operators Exists and DoesNotExist take no values: remove values, or use In or NotIn",
        ),
    )

    key: LabelKey
    operator: SelectorOperator
    values: list[LabelValue] = Field(
        default_factory=list,
        max_length=256,
        description="non-empty for In and NotIn, empty for Exists and DoesNotExist",
    )


class LabelSelector(_Model):
    """Kubernetes' LabelSelector: every term must hold; an empty selector matches everything.

    Its CEL rules refuse terms that contradict each other or ``matchLabels`` (the selector
    could never match); two In or NotIn terms whose value lists leave no value are
    :mod:`.checks`' (comparing lists of 256 values, pair by pair, is beyond CEL's budget).
    """

    model_config = cel_rules(
        (
            "!has(self.matchExpressions) || self.matchExpressions.all(e, e.operator != "
            "'DoesNotExist' || ((!has(self.matchLabels) || !(e.key in self.matchLabels)) && "
            "!self.matchExpressions.exists(f, f.key == e.key && f.operator in ['In', 'Exists'])))",
            "the selector can never match: a label is required (matchLabels, In or Exists) and "
            "also required to be absent (DoesNotExist); remove or change one of them",
        ),
        (
            "!has(self.matchExpressions) || !has(self.matchLabels) || self.matchExpressions.all("
            "e, !(e.key in self.matchLabels) || !has(e.values) || size(e.values) == 0 || "
            "(e.operator == 'In' ? self.matchLabels[e.key] in e.values : "
            "(e.operator != 'NotIn' || !(self.matchLabels[e.key] in e.values))))",
            "the selector can never match: matchLabels gives a label a value that an In term on "
            "the same key does not list, or that a NotIn term excludes; remove or change one "
            "of them",
        ),
    )

    matchLabels: dict[str, LabelValue] = Field(default_factory=dict)
    matchExpressions: list[LabelSelectorRequirement] = Field(default_factory=list, max_length=64)


class TolerationOperator(enum.StrEnum):
    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(enum.StrEnum):
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(_Model):
    """core/v1 Toleration, copied into the agents' DaemonSet."""

    model_config = cel_rules(
        (
            "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || "
            "size(self.value) == 0",
            "a toleration with operator Exists matches every value of its key: remove value, "
            "or use operator Equal",
        ),
    )

    key: str | None = Field(default=None, max_length=317)
    operator: TolerationOperator | None = None
    value: str | None = Field(default=None, max_length=63)
    effect: TaintEffect | None = None
    tolerationSeconds: int | None = None


class ResourceRequirements(_Model):
    """core/v1 ResourceRequirements (requests and limits) of the agent container."""

    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(default_factory=dict)


class PullPolicy(enum.StrEnum):
    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


def _default_tolerations() -> list[Toleration]:
    # Every node that runs meshed pods needs its agent, tainted or not (as CNI agents do).
    return [Toleration(operator=TolerationOperator.EXISTS)]


class AgentSpec(_Model):
    """Where the node agents run and how their DaemonSet looks."""

    image: str | None = Field(
        default=None,
        max_length=512,
        description="retired: the agents run the image the operator is configured with (Helm "
        "value agent.image), never one a MeshAcceleration names. Leave it unset: any value other "
        "than " + LEGACY_DEFAULT_AGENT_IMAGE + " (the old default) makes the resource Degraded "
        "(InvalidSpec) until it is removed",
    )
    imagePullPolicy: PullPolicy = Field(
        default=PullPolicy.IF_NOT_PRESENT,
        description="when the kubelet pulls the agents' image (the operator's setting)",
    )
    port: Port = Field(
        default=DEFAULT_AGENT_PORT,
        description="the agent's API port on each node (agents use the host network)",
    )
    nodeSelector: dict[str, LabelValue] = Field(
        default_factory=dict, description="nodes that get an agent (empty: every node)"
    )
    tolerations: list[Toleration] = Field(
        default_factory=_default_tolerations,
        max_length=64,
        description="the agents' tolerations (default: tolerate every taint)",
    )
    resources: ResourceRequirements | None = Field(
        default=None,
        description="requests and limits of the agent container; unset: the operator's default "
        "(Helm value agent.resources). The 0.1 default stored in older resources counts as unset",
    )
    priorityClassName: str = Field(
        default="system-node-critical",
        max_length=253,
        description="agents keep the datapath's maps in step with the pods: schedule them first. "
        "A priority class set in the operator's settings (Helm value agent.priorityClassName) "
        "wins over this one",
    )
    logLevel: LogLevel = LogLevel.INFO


class DatapathSpec(_Model):
    """Switches and map capacities of the eBPF datapath on every node."""

    model_config = cel_rules(
        (
            "!has(self.skMsgToAppsSelector) || !has(self.skMsgRedirect) || self.skMsgRedirect",
            "skMsgToAppsSelector needs skMsgRedirect: without sk_msg redirection nothing is "
            "delivered into application sockets; remove the selector or set skMsgRedirect to true",
        ),
    )

    sameNodeInbound: bool = Field(
        default=True,
        description="steer a sidecar's connect to a same-node accelerated pod straight to that "
        "pod's inbound listener (skips the iptables PREROUTING hop)",
    )
    skMsgRedirect: bool = Field(
        default=True,
        description="move bytes socket-to-socket between same-node sockets (sidecars', and "
        "applications' in pods that opt in: see skMsgToAppsSelector) while the receiver keeps "
        "up: each direction of a connection falls back to TCP for good once its receiver holds "
        "more than skMsgRedirectBudget bytes unread. The agents then need CAP_PERFMON",
    )
    skMsgRedirectBudget: int = Field(
        default=DEFAULT_REDIRECT_BUDGET,
        ge=MIN_REDIRECT_BUDGET,
        le=MAX_REDIRECT_BUDGET,
        description="bytes a receiving socket may hold unread before that direction of the "
        "connection falls back to TCP",
    )
    skMsgToAppsSelector: LabelSelector | None = Field(
        default=None,
        description="pods matching this selector (besides the resource's own selectors) get "
        "sk_msg delivery into their application sockets; only for apps that never read with "
        "splice() or zero-copy receive. A pod's annotation meshaccel.io/sk-msg-to-app "
        '"true" or "false" wins over it. Needs skMsgRedirect',
    )
    maxPods: int = Field(default=1024, ge=1, le=65536, description="accelerated pods per node")
    maxConnections: int = Field(
        default=65536, ge=1024, le=1 << 22, description="steered connections tracked at once"
    )
    maxPodPorts: int = Field(
        default=16384, ge=1, le=1 << 20, description="excluded ports of all pods on a node"
    )
    maxPodCidrs: int = Field(
        default=4096, ge=1, le=1 << 20, description="excluded CIDRs of all pods on a node"
    )


class ExclusionsSpec(_Model):
    """Cluster-wide opt-outs, added to every accelerated pod's own annotations."""

    outboundPorts: list[Port] = Field(
        default_factory=list, max_length=256, description="never steer apps' connects to these"
    )
    inboundPorts: list[Port] = Field(
        default_factory=list,
        max_length=256,
        description="never steer sidecars' connects to these ports of accelerated pods",
    )
    outboundCIDRs: list[Cidr] = Field(
        default_factory=list, max_length=256, description="never steer connects to these"
    )


class MeshAccelerationSpec(_Model):
    mode: MeshModeName = Field(
        default=MeshModeName.ISTIO, description="the mesh whose sidecars are accelerated"
    )
    namespaceSelector: LabelSelector = Field(
        description="namespaces whose pods are accelerated ({} selects every namespace)"
    )
    podSelector: LabelSelector = Field(
        default_factory=LabelSelector,
        description="pods accelerated within those namespaces (default: every meshed pod)",
    )
    agent: AgentSpec = Field(default_factory=AgentSpec)
    datapath: DatapathSpec = Field(default_factory=DatapathSpec)
    exclusions: ExclusionsSpec = Field(default_factory=ExclusionsSpec)
    dnsCapture: bool | None = Field(
        default=None,
        description="Istio: whether the mesh captures DNS in pods whose proxy.istio.io/config "
        "does not say (meshConfig.defaultConfig.proxyMetadata.ISTIO_META_DNS_CAPTURE, which the "
        "operator cannot see; unset: off). Kuma pods say it themselves (the injector's "
        "kuma.io/builtin-dns annotation); Linkerd captures no DNS",
    )


# Ready, Reconciling and Stalled as kstatus reads them; Degraded and Conflict say what is wrong
# (docs/operator.md, Status). 0.1's Progressing is Reconciling now.
class ConditionType(enum.StrEnum):
    READY = "Ready"
    RECONCILING = "Reconciling"
    STALLED = "Stalled"
    DEGRADED = "Degraded"
    CONFLICT = "Conflict"


class ConditionStatus(enum.StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(_Model):
    type: ConditionType
    status: ConditionStatus
    reason: str = Field(max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = Field(default="", max_length=32768)
    lastTransitionTime: str = Field(
        description="RFC 3339", json_schema_extra={"format": "date-time"}
    )
    observedGeneration: int | None = Field(default=None, ge=0)


MAX_NODES_LISTED = 20
MAX_PROBLEMS_LISTED = 20
MAX_CONFLICTS_LISTED = 10
MAX_ERROR_LENGTH = 1024

# Why a pod the selectors match is not accelerated, besides the selection's own verdicts
# (operator/selection.py Verdict): reported by the agents, or by the push channel.
UNRESOLVED = "Unresolved"  # its node's agent cannot find its cgroup (yet)
PENDING = "Pending"  # in a set its node's agent has not confirmed yet
# Not sent to its node's agent, which predates IPv6 (an IPv6-only pod; operator/pusher.py).
AGENT_WITHOUT_IPV6 = "AgentWithoutIPv6"
# The reasons nobody chose: such pods keep Ready False and are listed in status.problems. Every
# other reason is the pod's or the spec's own choice, or nothing to accelerate (docs/operator.md).
PROBLEM_REASONS = (UNRESOLVED, "OverBudget", "InvalidAnnotation", AGENT_WITHOUT_IPV6)


class NodeReport(_Model):
    """One node's agent as the operator last heard from it."""

    node: str
    agentVersion: str | None = Field(
        default=None,
        max_length=128,
        description="the agent's version, from its replies; absent: not heard from yet, or an "
        "agent that predates the field (older than the operator: see the Degraded condition)",
    )
    desiredGeneration: int | None = Field(
        default=None, description="the generation of the newest set sent to it"
    )
    appliedGeneration: int | None = Field(
        default=None, description="the generation of the set it holds, as last heard"
    )
    inSync: bool = Field(default=False, description="it confirmed the newest set")
    podsAccelerated: int = Field(default=0, description="pods of its confirmed set it programmed")
    podsUnresolved: int = Field(
        default=0, description="pods of its confirmed set whose cgroup it cannot find"
    )
    lastError: str | None = Field(
        default=None,
        max_length=MAX_ERROR_LENGTH,
        description="why its newest set is not applied, or why its health probe failed",
    )


class PodProblem(_Model):
    """A pod the selectors match that is not accelerated for a reason nobody chose."""

    namespace: str
    name: str
    node: str | None = None
    reason: str = Field(description=f"one of {', '.join(PROBLEM_REASONS)}")
    message: str = Field(default="", max_length=MAX_ERROR_LENGTH)


class HeldByOlder(_Model):
    """What an older MeshAcceleration keeps of the nodes and pods this one selects."""

    heldBy: str = Field(
        description="the older MeshAcceleration (earlier creationTimestamp, then name)"
    )
    nodes: list[str] = Field(
        default_factory=list,
        max_length=MAX_NODES_LISTED,
        description=f"up to {MAX_NODES_LISTED} nodes both resources' agents select, sorted: "
        "the older one keeps them, this one's agents there get an empty set",
    )
    nodeCount: int = Field(default=0, description="how many such nodes")
    pods: list[str] = Field(
        default_factory=list,
        max_length=MAX_NODES_LISTED,
        description=f"up to {MAX_NODES_LISTED} pods (namespace/name) both resources' selectors "
        "claim, sorted: the older one keeps them wherever they run",
    )
    podCount: int = Field(default=0, description="how many such pods")


class MeshAccelerationStatus(_Model):
    observedGeneration: int | None = None
    operatorVersion: str | None = Field(
        default=None, max_length=128, description="the version of the operator that wrote this"
    )
    conditions: list[Condition] = Field(default_factory=list)
    daemonSet: str | None = Field(
        default=None, description="the agents' DaemonSet (namespace/name)"
    )
    nodesDesired: int = 0
    nodesReady: int = 0
    nodeCount: int = Field(default=0, description="nodes whose agent the operator pushes to")
    nodesInSync: int = Field(default=0, description="nodes whose agent applied the newest set")
    nodesWithProblems: int = Field(
        default=0,
        description="nodes behind, failing, with unresolved pods, unreachable by the health probe "
        "or running another version than the operator",
    )
    nodes: list[NodeReport] = Field(
        default_factory=list,
        max_length=MAX_NODES_LISTED,
        description=f"up to {MAX_NODES_LISTED} nodes, those with problems first (behind, the "
        "longest waiting first; then unresolved pods or a failing probe; then another version), "
        "then the rest by name",
    )
    podsSelected: int = Field(
        default=0, description="pods that match, on nodes with an agent, sent to the agents"
    )
    podsAccelerated: int = Field(default=0, description="pods the agents report as programmed")
    podsNotAccelerated: dict[str, int] = Field(
        default_factory=dict,
        description="pods the selectors match that are not accelerated, counted by reason. "
        "Chosen, or nothing to accelerate (Ready stays True): NoSidecar, OptedOut, NotRunning, "
        "UnsupportedAnnotation (the pod's own interception settings), NoAgentOnNode (the "
        "agents' nodeSelector or tolerations leave its node out), PodClaimedByOlderResource and "
        "NodeClaimedByOlderResource (an older MeshAcceleration keeps the pod, or its node). "
        "Problems (Ready False, listed in problems): Unresolved (its agent cannot find its "
        "cgroup), OverBudget (its node's datapath maps do not take it), InvalidAnnotation (a "
        "mesh annotation meshaccel cannot read). Pending: in a set its node's agent has not "
        "confirmed yet (Reconciling)",
    )
    problemCount: int = Field(
        default=0,
        description="pods not accelerated for a reason nobody chose: " + ", ".join(PROBLEM_REASONS),
    )
    problems: list[PodProblem] = Field(
        default_factory=list,
        max_length=MAX_PROBLEMS_LISTED,
        description=f"up to {MAX_PROBLEMS_LISTED} of those pods, taking each reason in turn, "
        "each reason's by namespace and name",
    )
    podsWithWarnings: dict[str, int] = Field(
        default_factory=dict,
        description="accelerated pods that run otherwise than one of their annotations asks, "
        "counted by reason (InvalidAnnotation: a meshaccel.io/sk-msg-to-app value other than "
        '"true" or "false", ignored); the operator logs each pod',
    )
    conflicts: list[HeldByOlder] = Field(
        default_factory=list,
        max_length=MAX_CONFLICTS_LISTED,
        description=f"up to {MAX_CONFLICTS_LISTED} older MeshAccelerations that keep some of the "
        "nodes or pods this one selects (by name); see the Conflict condition",
    )


# The CRD root's rules, which may read metadata.name (and nothing else of metadata).
RESOURCE_RULES = (
    (
        "!has(self.metadata.name) || size(self.metadata.name) <= 63",
        "the name is longer than 63 characters: the agents name their pinned datapath after it; "
        "choose a shorter name",
    ),
)


class MeshAcceleration(_Model):
    """The whole resource, as the API server stores it (its rules: the CRD's root's)."""

    model_config = cel_rules(*RESOURCE_RULES)

    apiVersion: Literal["meshaccel.io/v1alpha1"] = "meshaccel.io/v1alpha1"
    kind: Literal["MeshAcceleration"] = "MeshAcceleration"
    metadata: dict[str, object] = Field(default_factory=dict)
    spec: MeshAccelerationSpec
    status: MeshAccelerationStatus | None = None


# The printer columns of `kubectl get meshaccelerations`.
PRINTER_COLUMNS: tuple[dict[str, str], ...] = (
    {"name": "Mode", "type": "string", "jsonPath": ".spec.mode"},
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
    },
    {"name": "Nodes", "type": "integer", "jsonPath": ".status.nodesDesired"},
    {"name": "Nodes Ready", "type": "integer", "jsonPath": ".status.nodesReady"},
    {"name": "In Sync", "type": "integer", "jsonPath": ".status.nodesInSync"},
    {"name": "Selected", "type": "integer", "jsonPath": ".status.podsSelected"},
    {"name": "Accelerated", "type": "integer", "jsonPath": ".status.podsAccelerated"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
)
