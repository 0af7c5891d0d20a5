"""The operator's settings: command-line flags, each with a MESHACCEL_* environment variable.

The agents' image is one of them (``--agent-image``, set by the chart from its ``agent.image``
values), never a MeshAcceleration's: whoever may create a MeshAcceleration must not choose
what runs with the agents' privileges on every node (docs/security.md). So is the rest of the
agents' pod that belongs to whoever installs meshaccel (:class:`AgentPod`: annotations, labels,
node selector, affinity, priority class, default resources; the chart's ``agent.*`` values, as
JSON): a resource's ``spec.agent`` may narrow where its agents run, never widen it. Every
setting is checked before the operator starts; a bad one exits 2 naming it, and nothing runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from meshaccel.contract.version import VERSION
from meshaccel.operator.models import (
    LEGACY_DEFAULT_AGENT_RESOURCES,
    LabelSelector,
    LabelValue,
    ResourceRequirements,
)

DEFAULT_NAMESPACE = "meshaccel-system"
DEFAULT_PEERING = "meshaccel"
DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"
DEFAULT_METRICS_PORT = 9090
# The agent of this release (the chart's appVersion; tests/chart checks they agree).
DEFAULT_AGENT_IMAGE = "ghcr.io/meshaccel/meshaccel-agent:0.1.0"

# An image reference as the container runtimes parse it (distribution's reference grammar,
# without IPv6 registries): [registry[:port]/]path[:tag][@sha256:digest]. The chart's
# values.schema.json holds the same rules for agent.image.repository, .tag and .digest.
_DOMAIN_COMPONENT = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_REGISTRY = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY_PATTERN = rf"(?:{_REGISTRY}(?::[0-9]+)?/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
TAG_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
DIGEST_PATTERN = r"sha256:[a-f0-9]{64}"
_IMAGE = re.compile(
    rf"^(?P<repository>{REPOSITORY_PATTERN})(?::(?P<tag>{TAG_PATTERN}))?"
    rf"(?:@(?P<digest>{DIGEST_PATTERN}))?$"
)
# A Secret's name: a DNS subdomain.
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def image_problem(reference: str) -> str | None:
    """Why ``reference`` cannot be the agents' image (a sentence), or None if it can.

    A tag or a digest is required and ``latest`` alone is refused: every node must run the
    same agent, and a moving tag pulled at different times is not the same agent.
    """
    found = _IMAGE.match(reference)
    if found is None:
        return (
            f"{reference!r} is not an image reference "
            "(REGISTRY/REPOSITORY:TAG or REGISTRY/REPOSITORY@sha256:DIGEST)"
        )
    if found["digest"]:
        return None
    if not found["tag"]:
        return (
            f"{reference!r} has no tag: name a version (for example {reference}:0.1.0) or a "
            "digest, so every node runs the same agent"
        )
    if found["tag"] == "latest":
        return f"{reference!r} uses the moving tag 'latest': pin a version or a digest"
    return None


@dataclass(frozen=True)
class AgentImage:
    """The agents' container image and the Secrets the kubelet pulls it with.

    The same for every MeshAcceleration: it comes from the operator's settings only.
    """

    reference: str = DEFAULT_AGENT_IMAGE  # repository:tag, repository@sha256:..., or both
    pull_secrets: tuple[str, ...] = ()  # Secret names in the agents' namespace


# -- the agents' pod beyond the image ------------------------------------------------------------

# A label or annotation key: an optional DNS-subdomain prefix and "/", then a 63-character name.
QualifiedName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=317,
        pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
    ),
]
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A resource name: cpu, memory, hugepages-2Mi, or one with a domain (nvidia.com/gpu).
_RESOURCE_NAME = re.compile(
    r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
# Keys the operator sets on the agents' pods itself (rendering.py): the DaemonSet's selector
# and the config hash. Settings may not take them over.
RESERVED_PREFIX = "meshaccel.io/"
RESERVED_LABELS = frozenset(
    {"app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/managed-by"}
)
RESERVED_ANNOTATIONS = frozenset({"kubectl.kubernetes.io/default-container"})
MAX_ANNOTATIONS_BYTES = 256 * 1024  # the API server's limit for an object's annotations
# A Kubernetes quantity ("50m", "96Mi", "1.5", "1e3"); the suffix's factor, for comparing.
_QUANTITY = re.compile(
    r"^\+?([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[KMGTPE]i|[numkMGTPE])?$"
)
_SUFFIXES = {"n": "1e-9", "u": "1e-6", "m": "1e-3", "": "1", "k": "1e3", "M": "1e6", "G": "1e9",
             "T": "1e12", "P": "1e15", "E": "1e18", "Ki": str(2**10), "Mi": str(2**20),
             "Gi": str(2**30), "Ti": str(2**40), "Pi": str(2**50), "Ei": str(2**60)}  # fmt: skip


def quantity(value: int | str) -> Decimal:
    """A Kubernetes quantity's value; ValueError if it is none."""
    found = _QUANTITY.match(str(value))
    if found is None:
        raise ValueError(f"{value!r} is not a quantity (such as 100m, 64Mi or 2)")
    number, suffix = found.groups()
    try:
        if suffix and suffix[0] in "eE":
            return Decimal(number + suffix)
        return Decimal(number) * Decimal(_SUFFIXES[suffix or ""])
    except InvalidOperation as err:  # pragma: no cover - the pattern admits only numbers
        raise ValueError(f"{value!r} is not a quantity") from err


class _Setting(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSelectorRequirement(_Setting):
    key: QualifiedName
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    values: list[str] = Field(default_factory=list)


class NodeSelectorTerm(_Setting):
    matchExpressions: list[NodeSelectorRequirement] = Field(default_factory=list)
    matchFields: list[NodeSelectorRequirement] = Field(default_factory=list)


class NodeSelector(_Setting):
    nodeSelectorTerms: list[NodeSelectorTerm] = Field(min_length=1)


class PreferredSchedulingTerm(_Setting):
    weight: int = Field(ge=1, le=100)
    preference: NodeSelectorTerm


class NodeAffinity(_Setting):
    requiredDuringSchedulingIgnoredDuringExecution: NodeSelector | None = None
    preferredDuringSchedulingIgnoredDuringExecution: list[PreferredSchedulingTerm] = Field(
        default_factory=list
    )


class PodAffinityTerm(_Setting):
    labelSelector: LabelSelector | None = None
    namespaceSelector: LabelSelector | None = None
    namespaces: list[str] = Field(default_factory=list)
    topologyKey: QualifiedName
    matchLabelKeys: list[QualifiedName] = Field(default_factory=list)
    mismatchLabelKeys: list[QualifiedName] = Field(default_factory=list)


class WeightedPodAffinityTerm(_Setting):
    weight: int = Field(ge=1, le=100)
    podAffinityTerm: PodAffinityTerm


class PodAffinity(_Setting):
    requiredDuringSchedulingIgnoredDuringExecution: list[PodAffinityTerm] = Field(
        default_factory=list
    )
    preferredDuringSchedulingIgnoredDuringExecution: list[WeightedPodAffinityTerm] = Field(
        default_factory=list
    )


class Affinity(_Setting):
    """core/v1 Affinity, checked field by field (an unknown field is refused)."""

    nodeAffinity: NodeAffinity | None = None
    podAffinity: PodAffinity | None = None
    podAntiAffinity: PodAffinity | None = None


def _default_resources() -> ResourceRequirements:
    return ResourceRequirements.model_validate(LEGACY_DEFAULT_AGENT_RESOURCES)


class AgentPod(_Setting):
    """The agents' pod as whoever installs meshaccel wants it, for every MeshAcceleration.

    Added to what :mod:`.rendering` renders; a resource's ``spec.agent`` cannot override
    ``node_selector`` keys, ``affinity`` or ``priority_class_name`` (when set): it may only
    narrow where agents run. ``resources`` are the default of resources whose
    ``spec.agent.resources`` is unset.
    """

    annotations: dict[QualifiedName, str] = Field(default_factory=dict)
    labels: dict[QualifiedName, LabelValue] = Field(default_factory=dict)
    node_selector: dict[QualifiedName, LabelValue] = Field(default_factory=dict)
    affinity: Affinity | None = None
    priority_class_name: str = Field(default="", max_length=253)  # "": the resource's
    resources: ResourceRequirements = Field(default_factory=_default_resources)

    @field_validator("labels")
    @classmethod
    def _own_labels(cls, labels: dict[str, str]) -> dict[str, str]:
        taken = sorted(k for k in labels if k in RESERVED_LABELS or k.startswith(RESERVED_PREFIX))
        if taken:
            raise ValueError(f"{taken} are the operator's own labels (the agents' selector)")
        return labels

    @field_validator("annotations")
    @classmethod
    def _own_annotations(cls, annotations: dict[str, str]) -> dict[str, str]:
        taken = sorted(
            k for k in annotations if k in RESERVED_ANNOTATIONS or k.startswith(RESERVED_PREFIX)
        )
        if taken:
            raise ValueError(f"{taken} are the operator's own annotations")
        size = sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items())
        if size > MAX_ANNOTATIONS_BYTES:
            raise ValueError(
                f"{size} bytes, more than the API server takes ({MAX_ANNOTATIONS_BYTES})"
            )
        return annotations

    @field_validator("priority_class_name")
    @classmethod
    def _priority_class(cls, name: str) -> str:
        if name and not re.match(_DNS_SUBDOMAIN, name):
            raise ValueError(f"{name!r} is not a PriorityClass name")
        return name

    @field_validator("resources")
    @classmethod
    def _quantities(cls, resources: ResourceRequirements) -> ResourceRequirements:
        for part in ("requests", "limits"):
            for name, value in getattr(resources, part).items():
                if not _RESOURCE_NAME.match(name):
                    raise ValueError(f"{part}: {name!r} is not a resource name")
                quantity(value)
        return resources

    @model_validator(mode="after")
    def _requests_within_limits(self) -> AgentPod:
        requests, limits = self.resources.requests, self.resources.limits
        for name in sorted(requests.keys() & limits.keys()):
            if quantity(requests[name]) > quantity(limits[name]):
                raise ValueError(
                    f"resources: the {name} request ({requests[name]}) exceeds its limit "
                    f"({limits[name]}): the API server would refuse every agent DaemonSet"
                )
        return self


# (flag, environment variable, AgentPod field, help) of the settings given as JSON.
_POD_JSON: tuple[tuple[str, str, str, str], ...] = (
    ("--agent-pod-annotations", "MESHACCEL_AGENT_POD_ANNOTATIONS", "annotations",
     "JSON object: more annotations on the agents' pods"),
    ("--agent-pod-labels", "MESHACCEL_AGENT_POD_LABELS", "labels",
     "JSON object: more labels on the agents' pods (not the operator's own keys)"),
    ("--agent-node-selector", "MESHACCEL_AGENT_NODE_SELECTOR", "node_selector",
     "JSON object: node labels every agent's node must have, whatever a resource selects"),
    ("--agent-affinity", "MESHACCEL_AGENT_AFFINITY", "affinity",
     "JSON object: the agents' pods' core/v1 Affinity"),
    ("--agent-resources", "MESHACCEL_AGENT_RESOURCES", "resources",
     "JSON object: requests and limits of agents whose resource sets no spec.agent.resources"),
)  # fmt: skip


@dataclass(frozen=True)
class OperatorConfig:
    namespace: str  # where the agents (and the operator) run
    push_window: float = 0.1  # changes this close together go out as one push per node
    request_timeout: float = 10.0
    probe_interval: float = 15.0  # how often each agent's boot id is checked
    backoff_max: float = 30.0
    uninstall_timeout: float = 30.0
    # A node counts as failing (Degraded) once behind with an error for this long.
    failing_after: float = 10.0
    peering_lifetime: int = 60  # seconds without a word before a replica counts as dead
    lease_duration: float = 15.0  # the writer's Lease (leadership.py): a silent holder's time
    resync_interval: float = 300.0  # between full lists that drop what the watches missed
    agent_image: AgentImage = field(default_factory=AgentImage)  # the same for every resource
    agent_pod: AgentPod = field(default_factory=AgentPod)  # so is the rest of their pod's


# (flag, environment variable, type, default, lowest, highest, help) of the numeric settings.
_NUMBERS: tuple[tuple[str, str, type[int] | type[float], str, float, float, str], ...] = (
    ("--metrics-port", "MESHACCEL_METRICS_PORT", int, str(DEFAULT_METRICS_PORT), 0, 65535,
     "Prometheus metrics port (0 to disable)"),
    ("--push-window", "MESHACCEL_PUSH_WINDOW", float, "0.1", 0, 10,
     "seconds within which changes to a node's set go out as one push"),
    ("--probe-interval", "MESHACCEL_PROBE_INTERVAL", float, "15", 0.1, 3600,
     "seconds between checks of each agent's boot id (a restarted agent gets its set)"),
    ("--backoff-max", "MESHACCEL_BACKOFF_MAX", float, "30", 0.1, 3600,
     "longest wait, in seconds, between retries of a push an agent failed"),
    ("--peering-lifetime", "MESHACCEL_PEERING_LIFETIME", int, "60", 1, 3600,
     "seconds a silent replica is still counted alive (failover time)"),
    ("--lease-duration", "MESHACCEL_LEASE_DURATION", float, "15", 1, 600,
     "seconds the writer's Lease outlives its last renewal (the holder stops at 2/3 of it)"),
    ("--resync-interval", "MESHACCEL_RESYNC_INTERVAL", float, "300", 1, 86400,
     "seconds between full lists of pods, namespaces and nodes that drop what the watches "
     "missed"),
)  # fmt: skip


def parse_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ
) -> argparse.Namespace:
    """Flags win over MESHACCEL_* variables, which win over the defaults; bad values exit 2."""
    env = environ.get
    parser = argparse.ArgumentParser(
        prog="meshaccel-operator",
        description="meshaccel's operator: MeshAccelerations reconciled into node agents.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    parser.add_argument(
        "--namespace",
        default=env("MESHACCEL_NAMESPACE", DEFAULT_NAMESPACE),
        help="namespace of the agents' DaemonSets (the operator's own)",
    )
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument(
        "--peering",
        default=env("MESHACCEL_PEERING", DEFAULT_PEERING),
        help="ClusterKopfPeering object the replicas coordinate through",
    )
    peering.add_argument(
        "--standalone", action="store_true", help="no peering: a single replica, or a test"
    )
    parser.add_argument(
        "--liveness",
        default=env("MESHACCEL_LIVENESS", DEFAULT_LIVENESS),
        help="Kopf's health endpoint, as a URL to listen on ('' to disable)",
    )
    parser.add_argument(
        "--log-format", choices=("json", "text"), default=env("MESHACCEL_LOG_FORMAT", "json")
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=env("MESHACCEL_LOG_LEVEL", "info"),
    )
    parser.add_argument(
        "--agent-image",
        default=env("MESHACCEL_AGENT_IMAGE", DEFAULT_AGENT_IMAGE),
        help="the agents' container image, with a tag or a digest (REPOSITORY:TAG, "
        "REPOSITORY@sha256:DIGEST): every MeshAcceleration's agents run it",
    )
    parser.add_argument(
        "--agent-image-pull-secrets",
        default=env("MESHACCEL_AGENT_IMAGE_PULL_SECRETS", ""),
        help="comma-separated names of Secrets in --namespace to pull the agents' image with",
    )
    for flag, variable, _, text in _POD_JSON:
        parser.add_argument(flag, default=env(variable, ""), metavar="JSON", help=text)
    parser.add_argument(
        "--agent-priority-class",
        default=env("MESHACCEL_AGENT_PRIORITY_CLASS", ""),
        help="PriorityClass of every agent, over a resource's spec.agent.priorityClassName "
        "(empty: the resource's)",
    )
    for flag, variable, kind, default, _, _, text in _NUMBERS:
        parser.add_argument(flag, type=kind, default=env(variable, default), help=text)
    args = parser.parse_args(argv)
    for flag, variable, _, _, lowest, highest, _ in _NUMBERS:
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if not lowest <= value <= highest:
            parser.error(f"{flag} ({variable}) must be between {lowest:g} and {highest:g}")
    problem = image_problem(args.agent_image)
    if problem:
        parser.error(f"--agent-image (MESHACCEL_AGENT_IMAGE): {problem}")
    args.agent_image_pull_secrets = _secret_names(args.agent_image_pull_secrets, parser)
    args.agent_pod = _agent_pod(args, parser)
    return args


def _agent_pod(args: argparse.Namespace, parser: argparse.ArgumentParser) -> AgentPod:
    """The :class:`AgentPod` the flags describe, or exit 2 naming each setting at fault."""
    given: dict[str, Any] = {"priority_class_name": args.agent_priority_class}
    where = {"priority_class_name": "--agent-priority-class (MESHACCEL_AGENT_PRIORITY_CLASS)"}
    for flag, variable, name, _ in _POD_JSON:
        where[name] = f"{flag} ({variable})"
        text = getattr(args, flag.removeprefix("--").replace("-", "_")).strip()
        if not text:
            continue
        try:
            given[name] = json.loads(text)
        except ValueError as err:
            parser.error(f"{where[name]}: not JSON ({err})")
        if not isinstance(given[name], dict):
            parser.error(f"{where[name]}: a JSON object is needed, not {text[:40]!r}")
    try:
        return AgentPod.model_validate(given)
    except ValidationError as err:
        problems = []
        for error in err.errors():
            setting, *inner = error["loc"] or ("",)
            at = ".".join(str(part) for part in inner)
            message = error["msg"].removeprefix("Value error, ")
            problems.append(
                f"{where.get(str(setting), setting)}: {at + ': ' if at else ''}{message}"
            )
        parser.error("; ".join(problems))


def _secret_names(text: str, parser: argparse.ArgumentParser) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    for name in names:
        if len(name) > 253 or not _SECRET_NAME.match(name):
            parser.error(
                "--agent-image-pull-secrets (MESHACCEL_AGENT_IMAGE_PULL_SECRETS): "
                f"{name!r} is not a Secret name"
            )
    return tuple(dict.fromkeys(names))  # in order, each once


def operator_config(args: argparse.Namespace) -> OperatorConfig:
    return OperatorConfig(
        namespace=args.namespace,
        agent_image=AgentImage(args.agent_image, args.agent_image_pull_secrets),
        agent_pod=args.agent_pod,
        push_window=args.push_window,
        probe_interval=args.probe_interval,
        backoff_max=args.backoff_max,
        peering_lifetime=args.peering_lifetime,
        lease_duration=args.lease_duration,
        resync_interval=args.resync_interval,
    )
