"""The agent's HTTP contract: request and reply bodies, validated by pydantic.

The operator imports these models as its client contract, so a field renamed here is a
breaking change for both sides. Everything is strict about shape (unknown fields are refused)
and explicit about limits, so a malformed or hostile body is refused whole with a 4xx naming
the field at fault, before anything is applied.

Compatibility: a field added to a reply after the first release is left out of the JSON while it
holds its default (:class:`_Reply`), so that an operator or a tool that predates it, whose models
refuse unknown fields too, still parses the reply. A field added to a request has a default
meaning what an older client meant by sending nothing (``PodSet.epoch``).
"""

from __future__ import annotations

from datetime import datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    SerializerFunctionWrapHandler,
    WithJsonSchema,
    model_serializer,
    model_validator,
)

from meshaccel.contract.modes import MESH_MODES, MeshModeName

Port = Annotated[int, Field(ge=1, le=65535)]
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
KubernetesName = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
PodUid = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")]

MAX_PORTS_PER_LIST = 256
MAX_CIDRS_PER_LIST = 256
# How an agent process got its datapath (GET /v1/status, the start-up log).
StartupDecision = Literal["loaded", "adopted", "reloaded"]


def _address(value: object) -> IPv4Address | IPv6Address:
    """An address of either family, parsed once (pydantic's union of the two parses an IPv4
    address twice as slowly as its IPv4Address did, for every pod of every set)."""
    if isinstance(value, IPv4Address | IPv6Address):
        return value
    if not isinstance(value, str):
        raise ValueError(f"an address is a string, not {type(value).__name__}")
    try:
        address = ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 or IPv6 address") from None
    if isinstance(address, IPv6Address) and address.scope_id:
        raise ValueError(f"{value!r}: a pod's address has no scope")
    return address


def pod_address_problem(address: IPv4Address | IPv6Address) -> str | None:
    """Why ``address`` cannot be a pod's, or None; the operator's sets and the agent's pods
    both hold to it."""
    if address.is_loopback or address.is_unspecified or address.is_multicast:
        return "a loopback, unspecified or multicast address"
    if isinstance(address, IPv6Address):
        if address.ipv4_mapped is not None:
            # How the datapath stores an IPv4 address: the pod's IPv4 address goes in as itself.
            return "IPv4-mapped: an IPv4 address goes in as itself"
        if address.is_link_local:
            return "link-local: not unique across the node's links"
    return None


def _pod_address(value: object) -> IPv4Address | IPv6Address:
    address = _address(value)
    if problem := pod_address_problem(address):
        raise ValueError(f"{address} cannot be a pod's address: {problem}")
    return address


def _network(value: object) -> IPv4Network | IPv6Network:
    """A network of either family, host bits clear (as pydantic's IPv4Network wanted)."""
    if isinstance(value, IPv4Network | IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError(f"a network is a string, not {type(value).__name__}")
    try:
        return ip_network(value)
    except ValueError as err:
        raise ValueError(f"{value!r} is not an IPv4 or IPv6 network ({err})") from None


# Addresses and CIDRs of either family (status.podIPs holds at most one address of each).
IPAddress = Annotated[
    IPv4Address | IPv6Address,
    PlainValidator(_address),
    WithJsonSchema({"type": "string", "format": "ipvanyaddress"}),
]
PodAddress = Annotated[
    IPv4Address | IPv6Address,
    PlainValidator(_pod_address),
    WithJsonSchema({"type": "string", "format": "ipvanyaddress"}),
]
IPNetwork = Annotated[
    IPv4Network | IPv6Network,
    PlainValidator(_network),
    WithJsonSchema({"type": "string", "format": "ipvanynetwork"}),
]

MAX_PODS_PER_SET = 65536  # a hard ceiling on the body; the maps' capacity is checked on apply
# metadata.generation is an int64 in Kubernetes; the agent also exports it as a metric.
MAX_GENERATION = 2**63 - 1
# A writer's leader epoch is the leaseTransitions of the operator's Lease: an int32.
MAX_EPOCH = 2**31 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Reply(_Strict):
    """A body whose fields named in ``_added`` (added after the first release) are left out
    of the JSON while they hold their default: see the module's docstring. Replies use it,
    and so does a request model whose older readers (agents) refuse the new field."""

    _added: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _leave_out_added_defaults(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            fields = type(self).model_fields
            for name in self._added:
                if getattr(self, name) == fields[name].default:
                    data.pop(name, None)
        return data


class PodOptions(_Strict):
    """Per-pod options: the mesh's opt-outs (Istio: traffic.sidecar.istio.io/*), sk_msg opt-in."""

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
    excluded_outbound_cidrs: frozenset[IPNetwork] = Field(
        default=frozenset(),
        max_length=MAX_CIDRS_PER_LIST,
        description="excludeOutboundIPRanges",
    )
    included_outbound_cidrs: frozenset[IPNetwork] | None = Field(
        default=None,
        max_length=MAX_CIDRS_PER_LIST,
        description="includeOutboundIPRanges; null (the default) means every destination",
    )
    sk_msg_to_app: bool = Field(
        default=False,
        description="sk_msg may deliver into this pod's application sockets (opt-in: an app "
        "reading with splice() or TCP_ZEROCOPY_RECEIVE would stall, as those never see bytes "
        "sk_msg queued)",
    )
    dns_capture: bool = Field(
        default=False,
        description="the mesh captures this pod's DNS (Istio's DNS proxying, Kuma's built-in "
        "DNS): the app's UDP and TCP to port 53 go to the proxy's DNS port; only for a mode "
        "that has one",
    )


class PodSpec(_Reply):
    """One pod of the node's desired set.

    ``ips`` was added with IPv6: it is left out of the JSON while empty, so that a single-stack
    pod's spec is what it was before (an agent that predates it refuses the field).
    """

    _added = frozenset({"ips"})

    uid: PodUid
    namespace: KubernetesName
    name: KubernetesName
    ip: PodAddress = Field(description="status.podIP: the pod's primary address")
    ips: tuple[PodAddress, ...] = Field(
        default=(),
        max_length=2,
        description="status.podIPs: every address of the pod (at most one per family, ip among "
        "them); empty (the default) means just ip",
    )
    mode: MeshModeName = MeshModeName.ISTIO
    options: PodOptions = PodOptions()
    cgroup: str | None = Field(
        default=None,
        max_length=4096,
        description="the pod's cgroup directory relative to the cgroup2 root; only standalone "
        "agents take it from here, a Kubernetes agent finds it from the pod UID",
    )

    @model_validator(mode="after")
    def _consistent(self) -> PodSpec:
        # One validator for both checks: it runs for every pod of every set.
        if self.ips:
            if self.ip not in self.ips:
                raise ValueError(f"ips: {self.ip} (ip) is not among them")
            if len({ip.version for ip in self.ips}) != len(self.ips):
                raise ValueError("ips: at most one address per family")
        if self.options.dns_capture and MESH_MODES[self.mode].dns_port is None:
            raise ValueError(f"options.dns_capture: {self.mode} has no DNS proxy")
        return self

    @property
    def addresses(self) -> tuple[IPAddress, ...]:
        """Every address of the pod, ``ip`` first."""
        return addresses_of(self.ip, self.ips)

    @property
    def ipv4(self) -> IPv4Address | None:
        return _of_family(self.addresses, IPv4Address)

    @property
    def ipv6(self) -> IPv6Address | None:
        return _of_family(self.addresses, IPv6Address)


_Address = TypeVar("_Address", bound=IPv4Address | IPv6Address | str)


def addresses_of(ip: _Address, ips: tuple[_Address, ...]) -> tuple[_Address, ...]:
    """``ip`` first, then the rest of ``ips`` (empty: just ``ip``): a pod's addresses, as
    ``status.podIP`` and ``status.podIPs`` give them (as text) or a :class:`PodSpec` holds them."""
    return (ip, *(other for other in ips if other != ip))


_Family = TypeVar("_Family", IPv4Address, IPv6Address)


def _of_family(addresses: tuple[IPAddress, ...], family: type[_Family]) -> _Family | None:
    for address in addresses:
        if isinstance(address, family):
            return address
    return None


class PodSet(_Strict):
    """PUT /v1/pods: the node's complete desired set, replacing the previous one.

    Sets are ordered by ``(epoch, generation)``: a set from a lower epoch than the applied one
    is refused whatever its generation (its writer no longer leads), a higher epoch is taken
    with any generation (a new leader counts its generations afresh), and within one epoch the
    generation rules hold (lower: refused; equal: a no-op if the same set, else refused).
    """

    epoch: int = Field(
        default=0,
        ge=0,
        le=MAX_EPOCH,
        description="the writer's leader epoch (its term in the operator's Lease); 0, what an "
        "operator that predates epochs sends by leaving it out, comes before every term",
    )
    generation: int = Field(
        ge=0,
        le=MAX_GENERATION,
        description="increases with every set the operator sends within its epoch",
    )
    pods: list[PodSpec] = Field(max_length=MAX_PODS_PER_SET)

    @model_validator(mode="after")
    def _unique(self) -> PodSet:
        uids: set[str] = set()
        addresses: set[IPAddress] = set()
        for index, pod in enumerate(self.pods):
            if pod.uid in uids:
                raise ValueError(f"pods[{index}].uid {pod.uid} appears twice in the set")
            uids.add(pod.uid)
            for address in pod.ips or (pod.ip,):  # ips holds ip when it is not empty
                if address in addresses:
                    field = "ip" if address == pod.ip else "ips"
                    raise ValueError(f"pods[{index}].{field} {address} appears twice in the set")
                addresses.add(address)
        return self


class AppConnections(_Strict):
    """How a pod's application connections on one of its addresses were used lately (the
    datapath's app_reuse): of ``connections`` that sent, ``reused`` sent again. While
    ``short_lived``, its application hops stay on TCP but for probes (docs/datapath.md,
    "Short-lived connections")."""

    ip: IPAddress
    connections: int = Field(ge=0)
    reused: int = Field(ge=0)
    short_lived: bool


class AppliedPod(_Reply):
    """A programmed pod. ``ips`` (every address, as in its :class:`PodSpec`) was added with
    IPv6 and is left out while empty (a single-stack pod); ``app_connections`` (one entry per
    address the datapath has a record of) is left out while there is none."""

    _added = frozenset({"ips", "app_connections"})

    uid: str
    namespace: str
    name: str
    ip: IPAddress
    ips: tuple[IPAddress, ...] = Field(default=(), max_length=2)
    cgroup_id: int
    app_connections: tuple[AppConnections, ...] = Field(default=(), max_length=2)

    @property
    def addresses(self) -> tuple[IPAddress, ...]:
        return addresses_of(self.ip, self.ips)


class UnresolvedPod(_Strict):
    uid: str
    namespace: str
    name: str
    reason: str


# The agent's build (meshaccel.contract.version.VERSION); the operator reports it per node and
# warns when it differs from its own.
_VERSION_DESCRIPTION = "the agent's version (None: an agent that predates the field)"
#: A client that sends this request header (its own version) gets the agent's ``version`` in
#: the replies that have the field; one that predates it does not, and so still parses them.
VERSION_HEADER = "Meshaccel-Version"


class ApplyResult(_Reply):
    """The reply to PUT /v1/pods."""

    _added = frozenset({"applied_epoch", "version"})

    applied_generation: int
    added: int
    updated: int
    removed: int
    unresolved: list[UnresolvedPod]
    duration_ms: float
    boot_id: str = Field(
        description="the agent process's boot id, as /v1/health gives it: a new one means the "
        "agent restarted (its maps were adopted, its memory of sets is gone)"
    )
    applied_epoch: int = Field(default=0, description="the epoch of the applied set")
    version: str | None = Field(default=None, description=_VERSION_DESCRIPTION)


class UninstallReply(_Strict):
    """The reply to POST /v1/uninstall."""

    uninstalled: Literal[True] = True
    already: bool = Field(description="an earlier request had uninstalled it: nothing was done")
    duration_ms: float = Field(description="the uninstall's own time (the drain included)")
    boot_id: str


class PodsReply(_Strict):
    """GET /v1/pods."""

    applied_generation: int | None
    pods: list[AppliedPod]
    unresolved: list[UnresolvedPod]


class ErrorReply(_Reply):
    """Every 4xx/5xx body.

    On a 409, ``applied_generation`` is set only when the generation was refused (lower than
    the applied one, or equal to it with another set) within the applied set's epoch: a client
    then sends its set again with a higher generation. ``applied_epoch`` is set when the set's
    epoch was refused (lower than the applied set's): another writer leads, and sending again
    cannot help (an operator that predates epochs cannot parse the reply, and so takes it as
    final). A 409 with neither (a standalone or uninstalled agent) is final too.
    """

    _added = frozenset({"applied_epoch"})

    error: str
    detail: list[dict[str, object]] | None = None
    applied_generation: int | None = None
    applied_epoch: int = 0


class ProbeReply(_Reply):
    """GET /healthz, and GET /readyz when ready (otherwise 503 ErrorReply): open, so no more
    (/healthz adds the version, which the open /metrics shows too)."""

    _added = frozenset({"version"})

    status: Literal["ok"] = "ok"
    version: str | None = Field(default=None, description=_VERSION_DESCRIPTION)


class HealthReply(_Reply):
    """GET /v1/health (the operator's probe): the process, the set it holds, what it trusts."""

    _added = frozenset({"applied_generation", "applied_epoch", "trust_bundle", "version"})

    status: Literal["ok"] = "ok"
    boot_id: str
    applied_generation: int | None = Field(
        default=None, description="the applied set's generation (None: no set since the start)"
    )
    applied_epoch: int = Field(default=0, description="the applied set's epoch")
    trust_bundle: str | None = Field(
        default=None,
        description="sha256 fingerprint of the CA bundle the agent accepts client certificates "
        "from (None: serving without TLS); the operator's CA rotation waits for it",
    )
    version: str | None = Field(default=None, description=_VERSION_DESCRIPTION)


class ProgramStatus(_Strict):
    """One of the datapath's programs, as its pin shows it."""

    hook: str = Field(description="connect4, sockops, getsockopt or sk_msg")
    program: str
    pin: str
    attached: bool = Field(description="its pin exists and opens as a live link or program")
    link_id: int | None = None
    program_id: int | None = None


class MapUsage(_Strict):
    """A per-pod map: entries the agent has programmed, and its capacity."""

    name: str
    entries: int
    max_entries: int


class StatusReply(_Reply):
    """GET /v1/status."""

    _added = frozenset({"applied_epoch", "not_ready", "version"})

    boot_id: str = Field(description="a new uuid4 on every start of the agent process")
    started_at: datetime
    pin_root: str
    attach_cgroup: str | None = Field(description="where the programs are attached, if known")
    datapath_features: list[str] | None = Field(
        description=".rodata features the datapath was loaded with, if known"
    )
    startup: StartupDecision | None = Field(
        default=None,
        description="how this process got its datapath: loaded fresh, adopted the pins, or "
        "reloaded pins whose settings differed",
    )
    startup_reason: str | None = Field(
        default=None, description="what differed, when the pinned datapath was reloaded or kept"
    )
    attached: bool = Field(description="every program's pin is present and live")
    programs: list[ProgramStatus]
    kernel_features: dict[str, bool] = Field(
        description="program types, map types and BTF the datapath needs, as probed here"
    )
    applied_generation: int | None
    applied_epoch: int = Field(default=0, description="the epoch of the applied set")
    last_apply_time: datetime | None
    pods_accelerated: int
    unresolved: list[UnresolvedPod]
    maps: list[MapUsage]
    counters: dict[str, int] | None = Field(
        description="datapath event counters by name; null when they cannot be read"
    )
    apply_errors: int
    apply_errors_by_reason: dict[str, int]
    pods_vanished: int = Field(
        default=0,
        description="programmed pods removed since the agent started because their cgroup was "
        "gone (listed in unresolved until they resolve again)",
    )
    uninstalled: bool = Field(
        default=False,
        description="POST /v1/uninstall removed the datapath; the applied set and map usage "
        "are what was applied before it",
    )
    not_ready: str | None = Field(
        default=None, description="why GET /readyz answers 503 (None: it answers 200)"
    )
    version: str | None = Field(default=None, description=_VERSION_DESCRIPTION)
