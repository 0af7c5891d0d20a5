"""The agent's HTTP contract: request and reply bodies, validated by pydantic.

The operator imports these models as its client contract, so a field renamed here is a
breaking change for both sides. Everything is strict about shape (unknown fields are refused)
and explicit about limits, so a malformed or hostile body is refused whole with a 4xx naming
the field at fault, before anything is applied.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from meshaccel.agent.modes import MeshModeName

Port = Annotated[int, Field(ge=1, le=65535)]
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
KubernetesName = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
PodUid = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")]

MAX_PORTS_PER_LIST = 256
MAX_CIDRS_PER_LIST = 256
MAX_PODS_PER_SET = 65536  # a hard ceiling on the body; the maps' capacity is checked on apply


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PodOptions(_Strict):
    """Per-pod opt-outs, from the mesh's own annotations (Istio: traffic.sidecar.istio.io/*)."""

    excluded_outbound_ports: frozenset[Port] = Field(
        default=frozenset(),
        max_length=MAX_PORTS_PER_LIST,
        description="excludeOutboundPorts: never steer the app's connects to these ports",
    )
    excluded_inbound_ports: frozenset[Port] = Field(
        default=frozenset(),
        max_length=MAX_PORTS_PER_LIST,
        description="excludeInboundPorts: never steer sidecars' connects to these ports here",
    )
    excluded_outbound_cidrs: frozenset[IPv4Network] = Field(
        default=frozenset(),
        max_length=MAX_CIDRS_PER_LIST,
        description="excludeOutboundIPRanges",
    )
    included_outbound_cidrs: frozenset[IPv4Network] | None = Field(
        default=None,
        max_length=MAX_CIDRS_PER_LIST,
        description="includeOutboundIPRanges; null (the default) means every destination",
    )


class PodSpec(_Strict):
    """One pod of the node's desired set."""

    uid: PodUid
    namespace: KubernetesName
    name: KubernetesName
    ip: IPv4Address
    mode: MeshModeName = MeshModeName.ISTIO
    options: PodOptions = PodOptions()
    cgroup: str | None = Field(
        default=None,
        max_length=4096,
        description="the pod's cgroup directory relative to the cgroup2 root; only standalone "
        "agents take it from here, a Kubernetes agent finds it from the pod UID",
    )

    @field_validator("ip")
    @classmethod
    def _routable(cls, ip: IPv4Address) -> IPv4Address:
        if ip.is_loopback or ip.is_unspecified or ip.is_multicast:
            raise ValueError(f"{ip} cannot be a pod's address")
        return ip


class PodSet(_Strict):
    """PUT /v1/pods: the node's complete desired set, replacing the previous one."""

    generation: int = Field(ge=0, description="increases with every set the operator sends")
    pods: list[PodSpec] = Field(max_length=MAX_PODS_PER_SET)

    @model_validator(mode="after")
    def _unique(self) -> PodSet:
        for field in ("uid", "ip"):
            seen: set[object] = set()
            for index, pod in enumerate(self.pods):
                value = getattr(pod, field)
                if value in seen:
                    raise ValueError(f"pods[{index}].{field} {value} appears twice in the set")
                seen.add(value)
        return self


class AppliedPod(_Strict):
    uid: str
    namespace: str
    name: str
    ip: IPv4Address
    cgroup_id: int


class UnresolvedPod(_Strict):
    uid: str
    namespace: str
    name: str
    reason: str


class ApplyResult(_Strict):
    """The reply to PUT /v1/pods."""

    applied_generation: int
    added: int
    updated: int
    removed: int
    unresolved: list[UnresolvedPod]
    duration_ms: float


class PodsReply(_Strict):
    """GET /v1/pods."""

    applied_generation: int | None
    pods: list[AppliedPod]
    unresolved: list[UnresolvedPod]


class ErrorReply(_Strict):
    """Every 4xx/5xx body."""

    error: str
    detail: list[dict[str, object]] | None = None
    applied_generation: int | None = None
