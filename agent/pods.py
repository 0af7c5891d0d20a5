"""An accelerated pod as the datapath sees it, its encoding into map entries, and the maps that
hold pods as the reconciler writes them (:class:`PodMaps`)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Protocol

from meshaccel.agent import layout
from meshaccel.agent.layout import TrafficDirection
from meshaccel.contract.api import pod_address_problem
from meshaccel.contract.modes import MeshMode

#: A pod address, or an address of a CIDR option: either family.
PodAddress = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


def _check_address(address: PodAddress, what: str) -> None:
    if problem := pod_address_problem(address):
        raise ValueError(f"{what} {address} cannot be a pod's address: {problem}")


def _check_ports(ports: frozenset[int], what: str) -> None:
    bad = sorted(p for p in ports if not 0 < p < 65536)
    if bad:
        raise ValueError(f"{what}: {bad} are not TCP ports (1-65535)")


@dataclass(frozen=True)
class AcceleratedPod:
    """Exactly what the maps hold for one pod: writing it and reading it back give equal values.

    ``cgroup_id`` is the pod-level cgroup's id (its inode number on cgroup2): the
    datapath recognises a pod's processes by it. ``ip`` and ``ipv6`` are the pod's addresses of
    each family, at least one of them (IPv4-only, IPv6-only and dual-stack pods): connections of
    a family the pod has no address of are left alone. Port and CIDR sets include the
    mesh's own ports; build from a mesh mode with :meth:`in_mesh`.
    ``included_outbound_cidrs`` of None means every destination is included.
    ``sk_msg_to_app``: sk_msg may deliver into the pod's application sockets, not only into
    its sidecar's (``POD_SK_MSG_TO_APP``). ``sidecar_by_gid``: a process whose gid is
    ``sidecar_uid`` is the sidecar too (Istio); False: by uid only (``POD_SIDECAR_UID_ONLY``).
    ``dns_port``: the mesh captures the pod's DNS: the application's UDP and TCP to port 53 go
    to 127.0.0.1 on this port (``POD_DNS_CAPTURE``); None: DNS is left alone.
    """

    cgroup_id: int
    ip: IPv4Address | None
    sidecar_uid: int
    outbound_port: int
    inbound_port: int
    excluded_outbound_ports: frozenset[int] = frozenset()
    excluded_inbound_ports: frozenset[int] = frozenset()
    excluded_outbound_cidrs: frozenset[Network] = frozenset()
    included_outbound_cidrs: frozenset[Network] | None = field(default=None)
    sk_msg_to_app: bool = False
    sidecar_by_gid: bool = True
    dns_port: int | None = None
    ipv6: IPv6Address | None = None

    def __post_init__(self) -> None:
        if self.cgroup_id <= 0:
            raise ValueError(f"cgroup_id must be a positive cgroup id, not {self.cgroup_id}")
        if self.ip is None and self.ipv6 is None:
            raise ValueError("a pod needs an address: ip, ipv6 or both")
        if self.ip is not None:
            if not isinstance(self.ip, IPv4Address):
                raise ValueError(f"ip {self.ip} is not an IPv4 address (IPv6 goes in ipv6)")
            _check_address(self.ip, "pod IP")
        if self.ipv6 is not None:
            if not isinstance(self.ipv6, IPv6Address):
                raise ValueError(f"ipv6 {self.ipv6} is not an IPv6 address")
            _check_address(self.ipv6, "pod IPv6")
        _check_ports(frozenset({self.outbound_port, self.inbound_port}), "listener ports")
        _check_ports(self.excluded_outbound_ports, "excluded outbound ports")
        _check_ports(self.excluded_inbound_ports, "excluded inbound ports")
        if self.dns_port is not None:
            _check_ports(frozenset({self.dns_port}), "DNS port")

    @property
    def addresses(self) -> tuple[PodAddress, ...]:
        """Every address of the pod, IPv4 first: each is a ``pod_ips`` entry."""
        return tuple(a for a in (self.ip, self.ipv6) if a is not None)

    @classmethod
    def in_mesh(
        cls,
        mode: MeshMode,
        cgroup_id: int,
        ip: PodAddress | str | None,
        *,
        ipv6: IPv6Address | str | None = None,
        excluded_outbound_ports: frozenset[int] = frozenset(),
        excluded_inbound_ports: frozenset[int] = frozenset(),
        excluded_outbound_cidrs: frozenset[Network] = frozenset(),
        included_outbound_cidrs: frozenset[Network] | None = None,
        sk_msg_to_app: bool = False,
        dns_capture: bool = False,
    ) -> AcceleratedPod:
        """A pod of ``mode``'s mesh, with the mesh's own ports always excluded; with
        ``dns_capture``, its DNS goes to the mesh's DNS port (ValueError if the mesh has none).

        ``ip`` is its IPv4 address, or its IPv6 address for an IPv6-only pod (or None with
        ``ipv6``); ``ipv6`` its IPv6 address beside an IPv4 one (dual-stack)."""
        if dns_capture and mode.dns_port is None:
            raise ValueError(f"{mode.name} has no DNS proxy to capture DNS for")
        first = None if ip is None else ip_address(ip)
        second = None if ipv6 is None else IPv6Address(ipv6)
        if isinstance(first, IPv6Address):
            if second is not None:
                raise ValueError(f"two IPv6 addresses ({first}, {second}): give IPv4 as ip")
            first, second = None, first
        return cls(
            cgroup_id=cgroup_id,
            ip=first,
            ipv6=second,
            sidecar_uid=mode.sidecar_uid,
            sidecar_by_gid=mode.sidecar_by_gid,
            outbound_port=mode.outbound_port,
            inbound_port=mode.inbound_port,
            excluded_outbound_ports=mode.outbound_excluded_ports | excluded_outbound_ports,
            excluded_inbound_ports=mode.inbound_excluded_ports | excluded_inbound_ports,
            excluded_outbound_cidrs=excluded_outbound_cidrs,
            included_outbound_cidrs=included_outbound_cidrs,
            sk_msg_to_app=sk_msg_to_app,
            dns_port=mode.dns_port if dns_capture else None,
        )

    # -- encoding ---------------------------------------------------------------------------

    def info(self) -> layout.PodInfo:
        flags = layout.PodFlags(0)
        if self.included_outbound_cidrs is None:
            flags |= layout.PodFlags.POD_OUTBOUND_INCLUDE_ALL
        if self.sk_msg_to_app:
            flags |= layout.PodFlags.POD_SK_MSG_TO_APP
        if not self.sidecar_by_gid:
            flags |= layout.PodFlags.POD_SIDECAR_UID_ONLY
        if self.dns_port is not None:
            flags |= layout.PodFlags.POD_DNS_CAPTURE
        return layout.PodInfo(
            ip=layout.ipv4(self.ip or IPv4Address(0)),
            ipv6=layout.address(self.ipv6) if self.ipv6 is not None else layout.Address(),
            sidecar_uid=self.sidecar_uid,
            outbound_port=layout.be16(self.outbound_port),
            inbound_port=layout.be16(self.inbound_port),
            flags=int(flags),
            dns_port=layout.be16(self.dns_port or 0),
        )

    @classmethod
    def from_info(
        cls,
        cgroup_id: int,
        info: layout.PodInfo,
        *,
        excluded_outbound_ports: frozenset[int],
        excluded_inbound_ports: frozenset[int],
        excluded_outbound_cidrs: frozenset[Network],
        included_outbound_cidrs: frozenset[Network],
    ) -> AcceleratedPod:
        """The pod whose ``pods`` entry is ``info`` and whose option entries hold these: the
        reverse of :meth:`info` and the option keys (every reader of the maps decodes here)."""
        flags = layout.PodFlags(info.flags)
        ipv4, ipv6 = bytes(info.ip), bytes(info.ipv6)
        return cls(
            cgroup_id=cgroup_id,
            ip=IPv4Address(ipv4) if any(ipv4) else None,
            ipv6=IPv6Address(ipv6) if any(ipv6) else None,
            sidecar_uid=info.sidecar_uid,
            outbound_port=layout.port_of(info.outbound_port),
            inbound_port=layout.port_of(info.inbound_port),
            excluded_outbound_ports=excluded_outbound_ports,
            excluded_inbound_ports=excluded_inbound_ports,
            excluded_outbound_cidrs=excluded_outbound_cidrs,
            included_outbound_cidrs=None
            if flags & layout.PodFlags.POD_OUTBOUND_INCLUDE_ALL
            else included_outbound_cidrs,
            sk_msg_to_app=bool(flags & layout.PodFlags.POD_SK_MSG_TO_APP),
            sidecar_by_gid=not flags & layout.PodFlags.POD_SIDECAR_UID_ONLY,
            dns_port=layout.port_of(info.dns_port)
            if flags & layout.PodFlags.POD_DNS_CAPTURE
            else None,
        )

    def address_keys(self) -> set[bytes]:
        """The pod's ``pod_ips`` keys (``struct ip_address``: IPv4 mapped)."""
        return {layout.address_bytes(a) for a in self.addresses}

    def port_keys(self) -> set[bytes]:
        keys = {
            port_key(self.cgroup_id, p, TrafficDirection.DIRECTION_OUTBOUND)
            for p in self.excluded_outbound_ports
        }
        keys |= {
            port_key(self.cgroup_id, p, TrafficDirection.DIRECTION_INBOUND)
            for p in self.excluded_inbound_ports
        }
        return keys

    def excluded_cidr_keys(self) -> set[bytes]:
        return {cidr_key(self.cgroup_id, n) for n in self.excluded_outbound_cidrs}

    def included_cidr_keys(self) -> set[bytes]:
        return {cidr_key(self.cgroup_id, n) for n in self.included_outbound_cidrs or ()}


@dataclass(frozen=True)
class ProgrammedPods:
    """The per-pod maps read back: the pods, and entries that belong to none (an agent killed
    half-way through a write leaves them) as map name -> keys."""

    pods: dict[int, AcceleratedPod]
    orphans: dict[str, set[bytes]]


class PodMaps(Protocol):
    """The maps that hold accelerated pods (``datapath.POD_MAPS``), as the reconciler uses them.

    :class:`~meshaccel.agent.datapath.Datapath` is the kernel's; the tests keep one in memory
    (``tests/agent/memory_maps.py``), held to the kernel's behaviour by a contract test.
    :meth:`put_pod` and :meth:`delete_pod` are all or nothing: on a failure they undo their own
    writes and raise (``MapFullError`` when a map is full, ``UndoFailedError`` when undoing
    failed too: both in ``datapath``).
    """

    def max_entries(self, name: str) -> int:
        """How many entries the map ``name`` holds at most."""
        ...

    def read_pods(self) -> ProgrammedPods:
        """Every pod in the maps, and the entries of none (their keys are opaque to callers: they
        go back to :meth:`remove_orphans`)."""
        ...

    def put_pod(
        self, pod: AcceleratedPod, *, previous: AcceleratedPod | None, take_ip: bool = False
    ) -> frozenset[int]:
        """Make the maps hold ``pod``, writing only what differs from ``previous`` (what they
        hold for it now; None: nothing). An address another pod holds is refused (ValueError)
        unless ``take_ip``; then the cgroup ids of the pods addresses were taken from are
        returned (empty if none)."""
        ...

    def delete_pod(self, cgroup_id: int, *, previous: AcceleratedPod | None) -> bool:
        """Remove the pod ``previous`` (what the maps hold for it); False if it was not there."""
        ...

    def remove_orphans(self, orphans: Mapping[str, Iterable[bytes]]) -> int:
        """Delete entries :meth:`read_pods` found to belong to no pod; how many were there."""
        ...


def u64(value: int) -> bytes:
    """A ``__u64`` key or value: host byte order, like the kernel's."""
    return value.to_bytes(8, sys.byteorder)


def u32(value: int) -> bytes:
    """A ``__u32`` key or value (array indexes, counters' keys)."""
    return value.to_bytes(4, sys.byteorder)


def decode_u64(raw: bytes) -> int:
    return int.from_bytes(raw[:8], sys.byteorder)


def port_key(cgroup_id: int, port: int, direction: TrafficDirection) -> bytes:
    return bytes(
        layout.PodPortKey(pod_cgroup_id=cgroup_id, port=layout.be16(port), direction=direction)
    )


def cidr_key(cgroup_id: int, network: Network) -> bytes:
    """An IPv4 CIDR as part of ::ffff:0:0/96, an IPv6 one as it is; the family in the key keeps
    an IPv6 CIDR spanning the mapped range (``::/0``) from matching IPv4 destinations."""
    ipv4 = isinstance(network, IPv4Network)
    return bytes(
        layout.PodCidrKey(
            prefixlen=layout.POD_CIDR_PREFIX_BITS
            + (layout.MAPPED_PREFIX_BITS if ipv4 else 0)
            + network.prefixlen,
            family=layout.AF_INET if ipv4 else layout.AF_INET6,
            pod_cgroup_id=cgroup_id,
            addr=layout.address(network.network_address),
        )
    )


def decode_port_key(key: bytes) -> tuple[int, int, TrafficDirection]:
    decoded = layout.PodPortKey.from_buffer_copy(key)
    return decoded.pod_cgroup_id, layout.port_of(decoded.port), TrafficDirection(decoded.direction)


def decode_cidr_key(key: bytes) -> tuple[int, Network]:
    decoded = layout.PodCidrKey.from_buffer_copy(key)
    prefix = decoded.prefixlen - layout.POD_CIDR_PREFIX_BITS
    network: Network
    if decoded.family == layout.AF_INET:
        address = layout.address_of(decoded.addr)
        network = IPv4Network(f"{address}/{prefix - layout.MAPPED_PREFIX_BITS}")
    else:
        network = IPv6Network(f"{IPv6Address(bytes(decoded.addr))}/{prefix}")
    return decoded.pod_cgroup_id, network


def checked_previous(previous: AcceleratedPod | None, cgroup_id: int) -> AcceleratedPod | None:
    """``previous`` for the pod ``cgroup_id`` (a PodMaps write's), refused if it is another's."""
    if previous is not None and previous.cgroup_id != cgroup_id:
        raise ValueError(f"previous is the pod {previous.cgroup_id}, not {cgroup_id}")
    return previous
