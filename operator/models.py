"""The MeshAcceleration resource: the single source of truth for its CRD schema.

``python -m meshaccel.operator.crd`` turns these models into ``crds/*.yaml``; a test fails
when the committed files are out of date. Field names are the resource's camelCase keys.
What the schema can check (types, enums, ranges, patterns, required fields) is checked here;
what only makes sense together (a selector that can never match, a retired field still set) is
reported by :mod:`.checks` as a Degraded condition.

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
Cidr = Annotated[
    str,
    Field(
        pattern=r"^([0-9]{1,3}\.){3}[0-9]{1,3}/[0-9]{1,2}$",
        description="an IPv4 network in CIDR notation, such as 10.0.0.0/8",
    ),
]


class _Model(BaseModel):
    # Unknown fields are refused (a real API server prunes them; the emulator refuses them).
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class SelectorOperator(enum.StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class LabelSelectorRequirement(_Model):
    key: LabelKey
    operator: SelectorOperator
    values: list[LabelValue] = Field(
        default_factory=list,
        max_length=256,
        description="non-empty for In and NotIn, empty for Exists and DoesNotExist",
    )


class LabelSelector(_Model):
    """Kubernetes' LabelSelector: every term must hold; an empty selector matches everything."""

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


def _default_resources() -> ResourceRequirements:
    return ResourceRequirements(
        requests={"cpu": "50m", "memory": "96Mi"}, limits={"memory": "256Mi"}
    )


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
    resources: ResourceRequirements = Field(default_factory=_default_resources)
    priorityClassName: str = Field(
        default="system-node-critical",
        max_length=253,
        description="agents keep the datapath's maps in step with the pods: schedule them first",
    )
    logLevel: LogLevel = LogLevel.INFO


class DatapathSpec(_Model):
    """Switches and map capacities of the eBPF datapath on every node."""

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


class ConditionType(enum.StrEnum):
    READY = "Ready"
    PROGRESSING = "Progressing"
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
    lastTransitionTime: str = Field(description="RFC 3339")
    observedGeneration: int | None = Field(default=None, ge=0)


class NodeLag(_Model):
    """A node whose agent has not applied the newest set sent to it."""

    node: str
    desiredGeneration: int | None = None
    appliedGeneration: int | None = None
    error: str | None = Field(default=None, max_length=1024)


MAX_NODES_LISTED = 20
MAX_CONFLICTS_LISTED = 10


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
    conditions: list[Condition] = Field(default_factory=list)
    daemonSet: str | None = Field(
        default=None, description="the agents' DaemonSet (namespace/name)"
    )
    nodesDesired: int = 0
    nodesReady: int = 0
    nodesInSync: int = Field(default=0, description="nodes whose agent applied the newest set")
    nodesBehind: list[NodeLag] = Field(
        default_factory=list,
        max_length=MAX_NODES_LISTED,
        description=f"up to {MAX_NODES_LISTED} nodes that are behind, the longest waiting first",
    )
    podsSelected: int = Field(
        default=0, description="pods that match, on nodes with an agent, sent to the agents"
    )
    podsAccelerated: int = Field(default=0, description="pods the agents report as programmed")
    podsNotAccelerated: dict[str, int] = Field(
        default_factory=dict,
        description="pods the selectors match that are not accelerated, counted by reason "
        "(NoSidecar, OptedOut, NotRunning, NoAgentOnNode, UnsupportedAnnotation, "
        "InvalidAnnotation; PodClaimedByOlderResource, NodeClaimedByOlderResource: an older "
        "MeshAcceleration keeps the pod, or its node; OverBudget: the node's datapath maps do "
        "not take it, see the Degraded condition)",
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


class MeshAcceleration(_Model):
    """The whole resource, as the API server stores it."""

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
    {"name": "Pods Accelerated", "type": "integer", "jsonPath": ".status.podsAccelerated"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
)
