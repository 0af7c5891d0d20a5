"""An accelerated pod as the datapath sees it, its encoding into map entries, and the maps that
hold pods as the reconciler writes them (:class:`PodMaps`)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Protocol

from meshaccel.agent import layout
from meshaccel.agent.layout import TrafficDirection
from meshaccel.contract.modes import MeshMode


def _check_ports(ports: frozenset[int], what: str) -> None:
    bad = sorted(p for p in ports if not 0 < p < 65536)
    if bad:
        raise ValueError(f"{what}: {bad} are not TCP ports (1-65535)")


@dataclass(frozen=True)
class AcceleratedPod:
    """Exactly what the maps hold for one pod: writing it and reading it back give equal values.

    ``cgroup_id`` is the pod-level cgroup's id (its inode number on cgroup2): the
    datapath recognises a pod's processes by it. Port and CIDR sets include the
    mesh's own ports; build from a mesh mode with :meth:`in_mesh`.
    ``included_outbound_cidrs`` of None means every destination is included.
    ``sk_msg_to_app``: sk_msg may deliver into the pod's application sockets, not only into
    its sidecar's (``POD_SK_MSG_TO_APP``). ``sidecar_by_gid``: a process whose gid is
    ``sidecar_uid`` is the sidecar too (Istio); False: by uid only (``POD_SIDECAR_UID_ONLY``).
    ``dns_port``: the mesh captures the pod's DNS: the application's UDP and TCP to port 53 go
    to 127.0.0.1 on this port (``POD_DNS_CAPTURE``); None: DNS is left alone.
    """

    cgroup_id: int
    ip: IPv4Address
    sidecar_uid: int
    outbound_port: int
    inbound_port: int
    excluded_outbound_ports: frozenset[int] = frozenset()
    excluded_inbound_ports: frozenset[int] = frozenset()
    excluded_outbound_cidrs: frozenset[IPv4Network] = frozenset()
    included_outbound_cidrs: frozenset[IPv4Network] | None = field(default=None)
    sk_msg_to_app: bool = False
    sidecar_by_gid: bool = True
    dns_port: int | None = None

    def __post_init__(self) -> None:
        if self.cgroup_id <= 0:
            raise ValueError(f"cgroup_id must be a positive cgroup id, not {self.cgroup_id}")
        if self.ip.is_loopback or self.ip.is_unspecified:
            raise ValueError(f"pod IP {self.ip} cannot be a loopback or unspecified address")
        _check_ports(frozenset({self.outbound_port, self.inbound_port}), "listener ports")
        _check_ports(self.excluded_outbound_ports, "excluded outbound ports")
        _check_ports(self.excluded_inbound_ports, "excluded inbound ports")
        if self.dns_port is not None:
            _check_ports(frozenset({self.dns_port}), "DNS port")

    @classmethod
    def in_mesh(
        cls,
        mode: MeshMode,
        cgroup_id: int,
        ip: IPv4Address | str,
        *,
        excluded_outbound_ports: frozenset[int] = frozenset(),
        excluded_inbound_ports: frozenset[int] = frozenset(),
        excluded_outbound_cidrs: frozenset[IPv4Network] = frozenset(),
        included_outbound_cidrs: frozenset[IPv4Network] | None = None,
        sk_msg_to_app: bool = False,
        dns_capture: bool = False,
    ) -> AcceleratedPod:
        """A pod of ``mode``'s mesh, with the mesh's own ports always excluded; with
        ``dns_capture``, its DNS goes to the mesh's DNS port (ValueError if the mesh has none)."""
        if dns_capture and mode.dns_port is None:
            raise ValueError(f"{mode.name} has no DNS proxy to capture DNS for")
        return cls(
            cgroup_id=cgroup_id,
            ip=IPv4Address(ip),
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
            ip=layout.ipv4(self.ip),
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
        excluded_outbound_cidrs: frozenset[IPv4Network],
        included_outbound_cidrs: frozenset[IPv4Network],
    ) -> AcceleratedPod:
        """The pod whose ``pods`` entry is ``info`` and whose option entries hold these: the
        reverse of :meth:`info` and the option keys (every reader of the maps decodes here)."""
        flags = layout.PodFlags(info.flags)
        return cls(
            cgroup_id=cgroup_id,
            ip=layout.ip_of(info.ip),
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
    ) -> int | None:
        """Make the maps hold ``pod``, writing only what differs from ``previous`` (what they
        hold for it now; None: nothing). An address another pod holds is refused (ValueError)
        unless ``take_ip``; then the cgroup id of the pod it was taken from is returned."""
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


def cidr_key(cgroup_id: int, network: IPv4Network) -> bytes:
    return bytes(
        layout.PodCidrKey(
            prefixlen=layout.POD_CIDR_PREFIX_BITS + network.prefixlen,
            pod_cgroup_id=cgroup_id,
            addr=layout.ipv4(network.network_address),
        )
    )


def decode_port_key(key: bytes) -> tuple[int, int, TrafficDirection]:
    decoded = layout.PodPortKey.from_buffer_copy(key)
    return decoded.pod_cgroup_id, layout.port_of(decoded.port), TrafficDirection(decoded.direction)


def decode_cidr_key(key: bytes) -> tuple[int, IPv4Network]:
    decoded = layout.PodCidrKey.from_buffer_copy(key)
    prefix = decoded.prefixlen - layout.POD_CIDR_PREFIX_BITS
    return decoded.pod_cgroup_id, IPv4Network(f"{layout.ip_of(decoded.addr)}/{prefix}")


def checked_previous(previous: AcceleratedPod | None, cgroup_id: int) -> AcceleratedPod | None:
    """``previous`` for the pod ``cgroup_id`` (a PodMaps write's), refused if it is another's."""
    if previous is not None and previous.cgroup_id != cgroup_id:
        raise ValueError(f"previous is the pod {previous.cgroup_id}, not {cgroup_id}")
    return previous
