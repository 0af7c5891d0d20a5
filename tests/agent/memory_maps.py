"""The reconciler's pod maps (:class:`~meshaccel.agent.pods.PodMaps`) in memory, for logic tests
that need no kernel and no root.

Each map is a dict of decoded entries, written one entry at a time in the order ``Datapath``
writes them, sized as ``Capacities`` sizes the kernel's (a new key in a full map fails with
``MapFullError``; a key already there can always be written), a pod's writes undone on a
failure by the datapath's own ``undo_on_failure``. A test can make any entry write fail
(:meth:`fail`) and plant entries that belong to no pod (:meth:`plant`), as an agent killed
half-way through a write leaves them. ``test_pod_maps_contract.py`` runs the same scenarios
here and on the kernel's maps and compares every entry, so this cannot drift from the real
thing.
"""

from __future__ import annotations

import copy
import errno
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from meshaccel.agent import layout
from meshaccel.agent.datapath import POD_MAPS, AppConnectionUse, MapFullError, undo_on_failure
from meshaccel.agent.layout import TrafficDirection
from meshaccel.agent.pods import (
    AcceleratedPod,
    ProgrammedPods,
    checked_previous,
    cidr_key,
    decode_cidr_key,
    decode_port_key,
    port_key,
)
from meshaccel.contract.settings import DEFAULT_CAPACITIES, Capacities

#: A ``pods`` value decoded: IPv4 address, sidecar uid, outbound and inbound listener ports,
#: flags, DNS port, IPv6 address (an absent address None).
PodRecord = tuple[IPv4Address | None, int, int, int, int, int, IPv6Address | None]
#: Every per-pod map's entries, decoded: ``pods`` cgroup id -> PodRecord, ``pod_ips`` address
#: (IPv4Address or IPv6Address) ->
#: cgroup id, ``pod_ports`` (cgroup id, port, direction) -> True, the CIDR maps (cgroup id,
#: network) -> True. The contract test reads the kernel's maps into the same shape.
Entries = dict[str, dict[Any, Any]]
PRESENT = True  # an option map's value (the kernel's b"\x01")
OPTION_MAPS = ("pod_ports", "outbound_excluded_cidrs", "outbound_included_cidrs")  # write order
CIDR_MAPS = ("outbound_excluded_cidrs", "outbound_included_cidrs")
OUTBOUND, INBOUND = TrafficDirection.DIRECTION_OUTBOUND, TrafficDirection.DIRECTION_INBOUND
_Undo = list[Callable[[], object]]


def pod_record(info: layout.PodInfo) -> PodRecord:
    ipv4, ipv6 = bytes(info.ip), bytes(info.ipv6)
    return (
        IPv4Address(ipv4) if any(ipv4) else None,
        info.sidecar_uid,
        layout.port_of(info.outbound_port),
        layout.port_of(info.inbound_port),
        info.flags,
        layout.port_of(info.dns_port),
        IPv6Address(ipv6) if any(ipv6) else None,
    )


def record_info(record: PodRecord) -> layout.PodInfo:
    ip, sidecar_uid, outbound_port, inbound_port, flags, dns_port, ipv6 = record
    return layout.PodInfo(
        ip=layout.ipv4(ip or IPv4Address(0)),
        sidecar_uid=sidecar_uid,
        outbound_port=layout.be16(outbound_port),
        inbound_port=layout.be16(inbound_port),
        flags=flags,
        dns_port=layout.be16(dns_port),
        ipv6=layout.Address(*(ipv6.packed if ipv6 is not None else bytes(16))),
    )


def option_entries(pod: AcceleratedPod | None) -> dict[str, set[Any]]:
    """The option maps' keys of ``pod``, in the order Datapath writes the maps."""
    if pod is None:
        return {name: set() for name in OPTION_MAPS}
    c = pod.cgroup_id
    return {
        "pod_ports": {(c, p, OUTBOUND) for p in pod.excluded_outbound_ports}
        | {(c, p, INBOUND) for p in pod.excluded_inbound_ports},
        "outbound_excluded_cidrs": {(c, n) for n in pod.excluded_outbound_cidrs},
        "outbound_included_cidrs": {(c, n) for n in pod.included_outbound_cidrs or ()},
    }


def encode_key(name: str, key: Any) -> bytes:
    """A decoded key as the kernel's map holds it (orphans are reported in these bytes)."""
    if name == "pod_ports":
        return port_key(*key)
    if name in CIDR_MAPS:
        return cidr_key(*key)
    assert name == "pod_ips", name
    return layout.address_bytes(key)


def decode_key(name: str, raw: bytes) -> Any:
    if name == "pod_ports":
        return decode_port_key(raw)
    if name in CIDR_MAPS:
        return decode_cidr_key(raw)
    assert name == "pod_ips", name
    return layout.address_of(raw)


class MemoryPodMaps:
    """PodMaps in memory; see the module docstring. ``log`` lists every entry write (updates and
    deletes, failed ones too) as (operation, map, key); :meth:`fail` counts writes from now."""

    def __init__(self, capacities: Capacities = DEFAULT_CAPACITIES) -> None:
        sizes = capacities.max_entries()
        self.capacity = {name: sizes[name] for name in POD_MAPS}
        self.entries: Entries = {name: {} for name in POD_MAPS}
        self.log: list[tuple[str, str, Any]] = []
        self._failing: dict[int, BaseException] = {}  # write number -> what it raises
        self._failing_from: tuple[int, BaseException] | None = None
        # What the datapath's app_reuse would say, by address (the sk_msg and connect4
        # programs write it, not the agent, so a test sets it), or what reading it raises.
        self.app_use: dict[IPv4Address | IPv6Address, AppConnectionUse] | OSError = {}

    # -- what tests drive ------------------------------------------------------------------

    def fail(self, nth: int, error: BaseException | None = None, *, onward: bool = False) -> None:
        """Make the ``nth`` entry write from now (1: the next) raise ``error`` (default: EIO);
        with ``onward``, every write after it too (the undo of what came before fails)."""
        if nth < 1:
            raise ValueError(f"nth counts from 1, not {nth}")
        error = error if error is not None else OSError(errno.EIO, "injected write failure")
        if onward:
            self._failing_from = (self.writes + nth, error)
        else:
            self._failing[self.writes + nth] = error

    @property
    def writes(self) -> int:
        return len(self.log)

    def heal(self) -> None:
        """No write fails any more."""
        self._failing.clear()
        self._failing_from = None

    def plant(self, name: str, key: Any, value: object = PRESENT) -> None:
        """An entry written behind the maps' back (what an interrupted write leaves)."""
        self.entries[name][key] = value

    def dump(self) -> Entries:
        return {name: dict(entries) for name, entries in self.entries.items()}

    def usage(self) -> dict[str, int]:
        return {name: len(entries) for name, entries in self.entries.items()}

    # -- what the server reads besides PodMaps ----------------------------------------------

    def app_connections(self) -> dict[IPv4Address | IPv6Address, AppConnectionUse]:
        if isinstance(self.app_use, OSError):
            raise self.app_use
        return dict(self.app_use)

    # -- PodMaps ---------------------------------------------------------------------------

    def max_entries(self, name: str) -> int:
        return self.capacity[name]

    def read_pods(self) -> ProgrammedPods:
        records = self.entries["pods"]
        owned: dict[str, dict[int, list[Any]]] = {}
        orphans: dict[str, set[bytes]] = {}
        for name in OPTION_MAPS:
            owned[name] = {}
            for key in self.entries[name]:
                owner = key[0]  # each option key starts with its pod's cgroup id
                if owner in records:
                    owned[name].setdefault(owner, []).append(key)
                else:
                    orphans.setdefault(name, set()).add(encode_key(name, key))
        pods: dict[int, AcceleratedPod] = {}
        for cgroup_id, record in records.items():
            ports = owned["pod_ports"].get(cgroup_id, [])
            included = owned["outbound_included_cidrs"].get(cgroup_id, [])
            pod = pods[cgroup_id] = AcceleratedPod.from_info(
                cgroup_id,
                record_info(record),
                excluded_outbound_ports=frozenset(p for _, p, d in ports if d == OUTBOUND),
                excluded_inbound_ports=frozenset(p for _, p, d in ports if d == INBOUND),
                excluded_outbound_cidrs=frozenset(
                    n for _, n in owned["outbound_excluded_cidrs"].get(cgroup_id, [])
                ),
                included_outbound_cidrs=frozenset(n for _, n in included),
            )
            if pod.included_outbound_cidrs is None and included:  # it includes everything
                unused = orphans.setdefault("outbound_included_cidrs", set())
                unused.update(encode_key("outbound_included_cidrs", key) for key in included)
        for ip, owner in self.entries["pod_ips"].items():
            holder = pods.get(owner)
            if holder is None or ip not in holder.addresses:
                orphans.setdefault("pod_ips", set()).add(encode_key("pod_ips", ip))
        return ProgrammedPods(pods, orphans)

    def put_pod(
        self, pod: AcceleratedPod, *, previous: AcceleratedPod | None, take_ip: bool = False
    ) -> frozenset[int]:
        # In Datapath's order: by the addresses' bytes in the map.
        addresses = sorted(pod.addresses, key=layout.address_bytes)
        owners = {ip: self.entries["pod_ips"].get(ip) for ip in addresses}
        taken = {ip: o for ip, o in owners.items() if o not in (None, pod.cgroup_id)}
        if taken and not take_ip:
            raise ValueError(
                "; ".join(
                    f"{ip} already belongs to the pod with cgroup id {o}" for ip, o in taken.items()
                )
            )
        old = checked_previous(previous, pod.cgroup_id)
        record = pod_record(pod.info())
        old_record = None if old is None else pod_record(old.info())
        new_options, old_options = option_entries(pod), option_entries(old)
        with undo_on_failure() as undo:
            for name, keys in new_options.items():
                for key in keys - old_options[name]:
                    self._put(undo, name, key, PRESENT, None)
            for ip, owner in owners.items():
                if owner != pod.cgroup_id:
                    self._put(undo, "pod_ips", ip, pod.cgroup_id, owner)
            if record != old_record:
                self._put(undo, "pods", pod.cgroup_id, record, old_record)
            for name, keys in old_options.items():
                self._remove(undo, name, keys - new_options[name])
            if old is not None:
                self._release_ips(undo, old, set(old.addresses) - set(pod.addresses))
        return frozenset(taken.values())

    def delete_pod(self, cgroup_id: int, *, previous: AcceleratedPod | None) -> bool:
        pod = checked_previous(previous, cgroup_id)
        if pod is None:
            return False
        with undo_on_failure() as undo:
            existed = self._remove(undo, "pods", {cgroup_id}, pod_record(pod.info())) > 0
            self._release_ips(undo, pod, set(pod.addresses))
            for name, keys in option_entries(pod).items():
                self._remove(undo, name, keys)
        return existed

    def remove_orphans(self, orphans: Mapping[str, Iterable[bytes]]) -> int:
        return sum(
            self._delete(name, decode_key(name, key))
            for name, keys in orphans.items()
            for key in keys
        )

    # -- entries -----------------------------------------------------------------------------

    def _count_write(self, operation: str, name: str, key: Any) -> None:
        self.log.append((operation, name, key))
        error = self._failing.pop(self.writes, None)
        if (
            error is None
            and self._failing_from is not None
            and self.writes >= self._failing_from[0]
        ):
            error = self._failing_from[1]
        if error is not None:
            raise copy.copy(error)

    def _update(self, name: str, key: Any, value: object) -> None:
        self._count_write("update", name, key)
        entries = self.entries[name]
        if key not in entries and len(entries) >= self.capacity[name]:
            raise MapFullError(
                f"map {name} is full ({self.capacity[name]} entries): raise its capacity "
                "(Capacities) and reload"
            )
        entries[key] = value

    def _delete(self, name: str, key: Any) -> bool:
        self._count_write("delete", name, key)
        return self.entries[name].pop(key, _ABSENT) is not _ABSENT

    def _put(self, undo: _Undo, name: str, key: Any, value: object, previous: object) -> None:
        self._update(name, key, value)
        if previous is None:
            undo.append(partial(self._delete, name, key))
        else:
            undo.append(partial(self._update, name, key, previous))

    def _remove(self, undo: _Undo, name: str, keys: Iterable[Any], value: object = PRESENT) -> int:
        removed = 0
        for key in keys:
            if self._delete(name, key):
                undo.append(partial(self._update, name, key, value))
                removed += 1
        return removed

    def _release_ips(
        self, undo: _Undo, pod: AcceleratedPod, ips: set[IPv4Address | IPv6Address]
    ) -> None:
        for ip in sorted(ips, key=layout.address_bytes):
            if self.entries["pod_ips"].get(ip) == pod.cgroup_id:
                self._remove(undo, "pod_ips", {ip}, pod.cgroup_id)


_ABSENT = object()
