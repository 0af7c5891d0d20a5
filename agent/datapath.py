"""The node's datapath: load, attach, adopt and unload the eBPF programs; edit their pods.

Everything lives under one bpffs directory per instance::

    /sys/fs/bpf/meshaccel/<instance>/
        maps/<map>          every shared map (pinned by libbpf at load)
        links/<hook>        one cgroup link per hook (connect4, connect6, sockops, ...)
        progs/redirect_msg  the sk_msg program, attached to msg_senders

Pins keep the datapath running without the agent; a new agent adopts them.

A pod is an entry in ``pods`` (by pod cgroup id), one in ``pod_ips`` (its address) and one per
option in the option maps (:data:`POD_MAPS`). :meth:`Datapath.put_pod` and
:meth:`Datapath.delete_pod` write them in an order connect4 may meet at any moment (options
before the pod entry; the pod entry removed first), all or nothing. The option maps are keyed by
pod and option, so a pod's options can only be found by walking them: a caller that keeps what it
programmed passes it as ``previous`` and nothing is walked, and :meth:`Datapath.read_pods` reads
every pod in one pass over each map. These are the reconciler's
:class:`~meshaccel.agent.pods.PodMaps`, the kernel's implementation of it.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from importlib import resources
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from meshaccel.agent import layout, libbpf, prerequisites, probes
from meshaccel.agent.layout import AppReuseLimits, Counter, DatapathFeatures, TrafficDirection
from meshaccel.agent.pods import (
    AcceleratedPod,
    checked_previous,
    decode_cidr_key,
    decode_u64,
    u32,
    u64,
)
from meshaccel.agent.pods import ProgrammedPods as ProgrammedPods  # read_pods() returns it
from meshaccel.agent.prerequisites import DatapathError
from meshaccel.contract.settings import (
    DEFAULT_CAPACITIES,
    DEFAULT_REDIRECT_BUDGET,
    MAX_REDIRECT_BUDGET,
    MIN_REDIRECT_BUDGET,
    PIN_ROOT,
    Capacities,
)

log = logging.getLogger(__name__)

#: Connect-time steering only: every byte takes TCP.
CONNECT_FEATURES = DatapathFeatures.FEATURE_SAME_NODE_INBOUND
#: Connect-time steering plus socket-to-socket delivery into sidecar sockets (and into the
#: application sockets of pods that opt in), each direction falling back to TCP when its
#: receiver falls behind (docs/datapath.md, "Delivery that follows its receiver").
SK_MSG_FEATURES = CONNECT_FEATURES | DatapathFeatures.FEATURE_SK_MSG_REDIRECT
DEFAULT_FEATURES = SK_MSG_FEATURES


class _ReadBack(enum.Enum):
    READ_BACK = "read back"


#: ``previous`` left out of :meth:`Datapath.put_pod` and :meth:`Datapath.delete_pod`: the pod's
#: entries are read back from the maps first (a walk of the option maps).
READ_BACK = _ReadBack.READ_BACK


class NotLoadedError(DatapathError):
    pass


class AlreadyLoadedError(DatapathError):
    pass


class MapFullError(DatapathError):
    pass


class UndoFailedError(DatapathError):
    """A write failed, and so did undoing the writes before it: the maps may hold part of the
    change. ``error`` is the write's error, ``undo_error`` the first failed undo's."""

    def __init__(self, error: Exception, undo_error: Exception) -> None:
        super().__init__(
            f"{error}; undoing the writes before it failed too ({undo_error}): the maps may "
            "hold part of the change"
        )
        self.error = error
        self.undo_error = undo_error


@dataclass(frozen=True)
class CgroupHook:
    """A program attached to the cgroup through a pinned bpf_link."""

    object_file: str
    program: str
    link: str


# Attach order: whatever a steered connection needs must be in place before
# connect4 starts steering, so connect4 comes last (and is detached first).
SK_MSG_OBJECT, SK_MSG_PROGRAM = "redirect.bpf.o", "redirect_msg"
CGROUP_HOOKS = (
    CgroupHook("getsockopt.bpf.o", "answer_original_dst", "getsockopt"),
    CgroupHook("sockname.bpf.o", "restore_peer_address", "getpeername4"),
    CgroupHook("sockname.bpf.o", "restore_local_address", "getsockname4"),
    CgroupHook("sockname.bpf.o", "restore_peer_address6", "getpeername6"),
    CgroupHook("sockname.bpf.o", "restore_local_address6", "getsockname6"),
    CgroupHook("dns.bpf.o", "restore_dns_reply_source", "recvmsg4"),
    CgroupHook("dns.bpf.o", "restore_dns_reply_source6", "recvmsg6"),
    CgroupHook("dns.bpf.o", "capture_dns_sendmsg4", "sendmsg4"),
    CgroupHook("dns.bpf.o", "capture_dns_sendmsg6", "sendmsg6"),
    CgroupHook("sockops.bpf.o", "track_sockets", "sockops"),
    CgroupHook("connect.bpf.o", "redirect_connect6", "connect6"),
    CgroupHook("connect.bpf.o", "redirect_connect4", "connect4"),
)
OBJECT_FILES = tuple(dict.fromkeys((SK_MSG_OBJECT, *(hook.object_file for hook in CGROUP_HOOKS))))

SHARED_MAPS = (
    "pods",
    "pod_ips",
    "inbound_listeners",
    "listener_pods",
    "pod_ports",
    "outbound_excluded_cidrs",
    "outbound_included_cidrs",
    "handshakes",
    "msg_senders",
    "msg_receivers",
    "socket_states",
    "receive_queues",
    "app_reuse",
    "draining",
    "loaded_config",
    "counters",
)
# What the agent writes for each accelerated pod. The option maps hold one entry per option
# (value 1), keyed by the pod's cgroup id and the option.
POD_MAPS = ("pods", "pod_ips", "pod_ports", "outbound_excluded_cidrs", "outbound_included_cidrs")
OPTION_MAPS = ("pod_ports", "outbound_excluded_cidrs", "outbound_included_cidrs")
_PRESENT = b"\x01"
_Undo = list[Callable[[], object]]  # steps that undo the writes so far, in write order


@dataclass(frozen=True)
class PinnedProgram:
    """One program of a datapath as its pin shows it (ids None: the pin is missing or dead)."""

    hook: str  # connect4, sockops, ..., sk_msg
    program: str
    pin: Path
    link_id: int | None
    program_id: int | None

    @property
    def attached(self) -> bool:
        return (self.link_id if self.hook != "sk_msg" else self.program_id) is not None


@dataclass(frozen=True)
class PinLayout:
    root: Path

    def map(self, name: str) -> Path:
        return self.root / "maps" / name

    def link(self, name: str) -> Path:
        return self.root / "links" / name

    def program(self, name: str) -> Path:
        return self.root / "progs" / name

    def attachments(self) -> list[Path]:
        return [self.program(SK_MSG_PROGRAM), *(self.link(h.link) for h in CGROUP_HOOKS)]

    def all_pins(self) -> list[Path]:
        return [*self.attachments(), *(self.map(name) for name in SHARED_MAPS)]


#: Maps an earlier release pinned that this one has no more: an upgrade unloads a datapath that
#: still has them (its programs are the earlier release's) and loads the current one.
RETIRED_MAPS = ("connecting_sockets", "connections", "sidecar_sockets", "app_sockets")


def earlier_release(pins: PinLayout, objects_dir: Path | None = None) -> str | None:
    """Why the datapath pinned at ``pins`` is an earlier release's, or None if it is not (or
    nothing is pinned). Such a datapath has other programs or map layouts than this release's
    objects: an upgrade unloads it and loads the current one. Reads pins and objects only."""
    retired = [name for name in RETIRED_MAPS if pins.map(name).exists()]
    if retired:
        return f"maps this release retired: {', '.join(retired)}"
    # connect4 is attached last: with its link pinned, the loader attached every hook and
    # pinned every map it had.
    if pins.link(CGROUP_HOOKS[-1].link).exists():
        missing = [hook.link for hook in CGROUP_HOOKS if not pins.link(hook.link).exists()]
        if missing:
            return f"no {', '.join(missing)} hook"
        missing = [name for name in SHARED_MAPS if not pins.map(name).exists()]
        if missing:
            return f"no {', '.join(missing)} map"
    sized_by_settings = Capacities().max_entries()
    for name, shape in _map_shapes(objects_dir or default_objects_dir()).items():
        if not pins.map(name).exists():
            continue
        with libbpf.Map.from_pin(pins.map(name)) as pinned:
            found = _MapShape(
                pinned.map_type,
                pinned.key_size,
                pinned.value_size,
                None if name in sized_by_settings else pinned.max_entries,
            )
        if found != shape:
            return f"map {name} is {found}, this release's is {shape}"
    return None


@dataclass(frozen=True)
class _MapShape:
    map_type: libbpf.MapType
    key_size: int
    value_size: int
    max_entries: int | None  # None: set from the settings (Capacities), compared elsewhere

    def __str__(self) -> str:
        entries = "" if self.max_entries is None else f" x{self.max_entries}"
        return f"{self.map_type.name} {self.key_size}:{self.value_size}{entries}"


def _map_shapes(objects_dir: Path) -> dict[str, _MapShape]:
    """Each shared map as this release's objects declare it (opened, not loaded)."""
    sized_by_settings = Capacities().max_entries()
    shapes: dict[str, _MapShape] = {}
    for name in OBJECT_FILES:
        with libbpf.BpfObject.open(objects_dir / name) as obj:
            for bpf_map in obj.maps:
                if bpf_map.name in SHARED_MAPS:
                    shapes[bpf_map.name] = _MapShape(
                        bpf_map.map_type,
                        bpf_map.key_size,
                        bpf_map.value_size,
                        None if bpf_map.name in sized_by_settings else bpf_map.max_entries,
                    )
    return shapes


SOCKHASHES = ("msg_senders", "msg_receivers")
SK_MSG_SOCKHASH = "msg_senders"  # the one the sk_msg program is attached to


@dataclass(frozen=True)
class LoadedConfig:
    """What the programs were loaded with (their ``.rodata``, recorded in ``loaded_config``)."""

    features: DatapathFeatures
    redirect_budget: int

    def raw(self) -> bytes:
        return bytes(
            layout.DatapathConfig(features=int(self.features), redirect_budget=self.redirect_budget)
        )

    @classmethod
    def decode(cls, raw: bytes) -> LoadedConfig:
        config = layout.DatapathConfig.from_buffer_copy(raw)
        return cls(DatapathFeatures(config.features), config.redirect_budget)


@dataclass(frozen=True)
class AppConnectionUse:
    """How a pod's application connections on one address were used lately (app_reuse): of
    ``connections`` that sent, ``reused`` sent again. ``short_lived``: connect4 leaves its
    application hops to TCP, but for probes (docs/datapath.md, "Short-lived connections")."""

    connections: int
    reused: int
    short_lived: bool

    @classmethod
    def of(cls, record: layout.AppReuse, now_ns: int) -> AppConnectionUse:
        """helpers.h short_lived(), while the pod keeps connecting: after a pause of
        APP_REUSE_PAUSE_NS, connect4 starts the record over at the pod's next connect."""
        connections, reused = record.connections, record.reused
        short_lived = (
            connections >= AppReuseLimits.APP_REUSE_SAMPLES
            and 2 * reused < connections
            and now_ns - record.last_connect_ns < AppReuseLimits.APP_REUSE_PAUSE_NS
        )
        return cls(connections, reused, short_lived)


def default_objects_dir() -> Path:
    env = os.environ.get("MESHACCEL_BPF_OBJECTS")
    if env:
        return Path(env)
    return Path(str(resources.files("meshaccel.agent") / "objects"))


class Datapath:
    """A loaded datapath, reached through its pinned maps. Close to let go; unload to remove."""

    def __init__(self, pins: PinLayout, maps: dict[str, libbpf.Map]) -> None:
        self.pins = pins
        self._maps = maps

    # -- life cycle -----------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        cgroup: Path | None = None,
        *,
        instance: str = "default",
        objects_dir: Path | None = None,
        features: DatapathFeatures = DEFAULT_FEATURES,
        redirect_budget: int = DEFAULT_REDIRECT_BUDGET,
        capacities: Capacities = DEFAULT_CAPACITIES,
        pin_root: Path = PIN_ROOT,
        splice_probe: Callable[[Path], bool] = probes.splice_reads_redirected_bytes,
        host_checked: bool = False,
    ) -> Datapath:
        """Load the objects, pin their maps, attach to ``cgroup`` (default: the cgroup2 root).

        The host's prerequisites are checked first, with the cause and fix of a missing one,
        unless ``host_checked`` says the caller ran them already (the agent's start-up runs
        ``preflight.check_settings``, the checks of ``meshaccel-agent check``).

        With sk_msg on, ``splice_probe`` asks the kernel whether splice() reads redirected
        bytes; if it does, every application socket is a redirect target
        (``FEATURE_SK_MSG_TO_EVERY_APP``, never taken from ``features``). On any failure,
        everything this call created is removed again.
        """
        if not MIN_REDIRECT_BUDGET <= redirect_budget <= MAX_REDIRECT_BUDGET:
            raise ValueError(
                f"redirect_budget must be {MIN_REDIRECT_BUDGET} to {MAX_REDIRECT_BUDGET} bytes, "
                f"not {redirect_budget}"
            )
        sk_msg = bool(features & DatapathFeatures.FEATURE_SK_MSG_REDIRECT)
        cgroup = cgroup if cgroup is not None else prerequisites.cgroup2_root()
        objects_dir = objects_dir if objects_dir is not None else default_objects_dir()
        paths = [objects_dir / name for name in OBJECT_FILES]
        if not host_checked:
            prerequisites.check_privileges(sk_msg=sk_msg)
            prerequisites.check_btf()
            prerequisites.check_kernel_features()
            prerequisites.check_cgroup(cgroup)
            prerequisites.check_objects(paths)
            prerequisites.check_bpffs(pin_root)
        features &= ~DatapathFeatures.FEATURE_SK_MSG_TO_EVERY_APP  # the kernel's answer, below
        if sk_msg and splice_probe(objects_dir):
            log.info("splice() reads redirected bytes here: every application takes sk_msg")
            features |= DatapathFeatures.FEATURE_SK_MSG_TO_EVERY_APP
        config = LoadedConfig(features, redirect_budget)

        pins = PinLayout(pin_root / instance)
        if any(p.exists() for p in pins.attachments()):
            raise AlreadyLoadedError(
                f"a datapath is already attached under {pins.root}: adopt it "
                "(Datapath.adopt) or unload it first"
            )

        with contextlib.ExitStack() as undo:
            _make_pin_dirs(pins, undo)
            objects = {path.name: undo.enter_context(libbpf.BpfObject.open(path)) for path in paths}
            _prepare(objects, paths, pins, config, capacities, undo)
            for name, obj in objects.items():
                log.debug("loading %s", name)
                obj.load()
            links = _attach(objects, cgroup, pins, undo)
            datapath = cls.adopt(instance=instance, pin_root=pin_root)
            datapath._map("loaded_config").update(u32(0), config.raw())
            undo.pop_all()  # success: keep what was made
        # The pins hold the kernel objects now: drop this process's handles.
        for link in links:
            link.destroy()
        for obj in objects.values():
            obj.close()
        log.info(
            "datapath loaded: instance=%s cgroup=%s features=%s redirect_budget=%d",
            instance,
            cgroup,
            features,
            redirect_budget,
        )
        return datapath

    @classmethod
    def adopt(cls, *, instance: str = "default", pin_root: Path = PIN_ROOT) -> Datapath:
        """Take over a datapath a previous agent left pinned; the kernel state is not touched."""
        pins = PinLayout(pin_root / instance)
        missing = [str(p) for p in pins.all_pins() if not p.exists()]
        if missing:
            raise NotLoadedError(
                f"no complete datapath under {pins.root}: missing {', '.join(missing)}"
            )
        return cls(pins, {name: libbpf.Map.from_pin(pins.map(name)) for name in SHARED_MAPS})

    @property
    def loaded_config(self) -> LoadedConfig:
        """What the programs were loaded with (also after an adopt)."""
        raw = self._map("loaded_config").lookup(u32(0))
        assert raw is not None  # an ARRAY map has every index
        return LoadedConfig.decode(raw)

    @property
    def features(self) -> DatapathFeatures:
        return self.loaded_config.features

    def close(self) -> None:
        """Let go of the maps; the datapath keeps running from its pins."""
        for bpf_map in self._maps.values():
            bpf_map.close()
        self._maps.clear()

    def __enter__(self) -> Datapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def unload(self, drain_seconds: float = 2.0) -> None:
        """Detach everything and remove every pin, without losing a byte of open connections.

        sk_msg stops redirecting first, so data already queued on receiving sockets is read
        before the sockhash goes; steering stops next; then, after ``drain_seconds`` in
        which accepted connections can still ask for SO_ORIGINAL_DST, the rest goes.
        Connections keep working on the ordinary TCP path throughout.
        """
        self.close()
        unload_pins(self.pins, drain_seconds)
        log.info("datapath unloaded: %s", self.pins.root)

    # -- pods -----------------------------------------------------------------------------

    def put_pod(
        self,
        pod: AcceleratedPod,
        *,
        previous: AcceleratedPod | _ReadBack | None = READ_BACK,
        take_ip: bool = False,
    ) -> frozenset[int]:
        """Accelerate ``pod``, or bring its entries in line with it. All or nothing.

        ``previous`` is what the maps hold for the pod now (None: nothing), as the caller
        programmed it: only the entries that differ are written, and the option maps are not
        walked. Left out, the pod is read back first (:meth:`pod`: a walk of the option maps).
        The address entries are always checked in the map: ``put_pod(p, previous=p)`` restores
        them. An address of ``pod`` held by another pod is refused (ValueError) unless
        ``take_ip``, for a caller that moves that pod off it in the same batch (two pods
        swapping addresses); the cgroup ids of the pods addresses were taken from are returned
        (else empty), to give them back on undo.
        """
        owners = {key: self._map("pod_ips").lookup(key) for key in sorted(pod.address_keys())}
        taken = {
            key: owner_id
            for key, owner in owners.items()
            if owner is not None and (owner_id := decode_u64(owner)) != pod.cgroup_id
        }
        if taken and not take_ip:
            raise ValueError(
                "; ".join(
                    f"{layout.address_of(key)} already belongs to the pod with cgroup id {owner_id}"
                    for key, owner_id in taken.items()
                )
            )
        old = (
            self.pod(pod.cgroup_id)
            if previous is READ_BACK
            else checked_previous(previous, pod.cgroup_id)
        )
        key = u64(pod.cgroup_id)
        info, old_info = bytes(pod.info()), None if old is None else bytes(old.info())
        new_options, old_options = _option_keys(pod), _option_keys(old)

        with undo_on_failure() as undo:
            # Options before the pod entry: connect4 acts on a pod only once `pods` has it.
            for name, keys in new_options.items():
                self._insert(undo, name, keys - old_options[name])
            for ip_key, owner in owners.items():
                if owner != key:
                    self._put(undo, "pod_ips", ip_key, key, owner)
            if info != old_info:
                self._put(undo, "pods", key, info, old_info)
            # What the new version no longer has goes last.
            for name, keys in old_options.items():
                self._remove(undo, name, keys - new_options[name])
            if old is not None:
                self._release_ips(undo, old, old.address_keys() - pod.address_keys())
        return frozenset(taken.values())

    def delete_pod(
        self, cgroup_id: int, *, previous: AcceleratedPod | _ReadBack | None = READ_BACK
    ) -> bool:
        """Stop accelerating a pod (its open connections carry on). All or nothing.

        ``previous`` as for :meth:`put_pod`. False if the pod was not there.
        """
        pod = (
            self.pod(cgroup_id) if previous is READ_BACK else checked_previous(previous, cgroup_id)
        )
        if pod is None:
            return False
        with undo_on_failure() as undo:
            # The pod entry first: connect4 stops acting on the pod at once.
            existed = self._remove(undo, "pods", {u64(cgroup_id)}, bytes(pod.info())) > 0
            self._release_ips(undo, pod, pod.address_keys())
            for name, keys in _option_keys(pod).items():
                self._remove(undo, name, keys)
        # What sockops saw of its inbound listener goes with it ("not seen" again if it returns).
        self._map("inbound_listeners").delete(u64(cgroup_id))
        return existed

    def pod(self, cgroup_id: int) -> AcceleratedPod | None:
        """One pod, read back from the maps (a walk of the option maps: see :meth:`pods`)."""
        raw = self._map("pods").lookup(u64(cgroup_id))
        if raw is None:
            return None
        return self._read({u64(cgroup_id): raw}, find_orphans=False).pods[cgroup_id]

    def pods(self) -> dict[int, AcceleratedPod]:
        """Every accelerated pod, read back from the maps (one pass over each)."""
        return self.read_pods().pods

    def read_pods(self) -> ProgrammedPods:
        """Every accelerated pod and every entry that belongs to none, one pass over each map."""
        read = self._read(dict(self._map("pods").items()), find_orphans=True)
        orphans = read.orphans
        for ip_key, owner in self._map("pod_ips").items():
            pod = read.pods.get(decode_u64(owner))
            if pod is None or ip_key not in pod.address_keys():  # no pod, or other addresses
                orphans.setdefault("pod_ips", set()).add(ip_key)
        return read

    def remove_orphans(self, orphans: Mapping[str, Iterable[bytes]]) -> int:
        """Delete entries :meth:`read_pods` found to belong to no pod; how many were there."""
        removed = 0
        for name, keys in orphans.items():
            bpf_map = self._map(name)
            removed += sum(bpf_map.delete(key) for key in keys)
        return removed

    def max_entries(self, name: str) -> int:
        return self._map(name).max_entries

    def counters(self) -> dict[Counter, int]:
        """Event counters summed over CPUs."""
        counters = self._map("counters")
        return {
            counter: sum(decode_u64(v) for v in counters.lookup_percpu(u32(counter)) or ())
            for counter in Counter
        }

    def app_connections(
        self, now_ns: int | None = None
    ) -> dict[IPv4Address | IPv6Address, AppConnectionUse]:
        """Each pod address's record in app_reuse, as connect4 would judge a connect at
        ``now_ns`` (default: now, on bpf_ktime_get_ns()'s clock). A record whose last connect
        came after ``now_ns`` (one made during the walk) is not paused."""
        if now_ns is None:
            now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        return {
            layout.address_of(key): AppConnectionUse.of(
                layout.AppReuse.from_buffer_copy(raw), now_ns
            )
            for key, raw in self._map("app_reuse").items()
        }

    def inbound_listeners(self, cgroup_id: int) -> int:
        """How many of the pod's inbound listeners sockops saw open and not yet close."""
        raw = self._map("inbound_listeners").lookup(u64(cgroup_id))
        return 0 if raw is None else ctypes.c_uint32.from_buffer_copy(raw).value

    def missing_attachments(self) -> list[str]:
        """Pins of the programs' attachments that are not there (stat only: cheap)."""
        return [str(path) for path in self.pins.attachments() if not path.exists()]

    def programs(self) -> list[PinnedProgram]:
        """Every program as its pin shows it now: each cgroup hook's link, and sk_msg's."""
        programs = []
        for hook in CGROUP_HOOKS:
            path = self.pins.link(hook.link)
            link_id = program_id = None
            if path.exists():
                with (
                    contextlib.suppress(libbpf.BpfError, OSError),
                    libbpf.Link.open_pinned(path) as link,
                ):
                    info = link.info()
                    link_id, program_id = info.id, info.prog_id
            programs.append(PinnedProgram(hook.link, hook.program, path, link_id, program_id))
        path = self.pins.program(SK_MSG_PROGRAM)
        program_id = None
        if path.exists():
            with (
                contextlib.suppress(libbpf.BpfError, OSError),
                libbpf.Program.from_pin(path) as program,
            ):
                program_id = program.info().id
        programs.append(PinnedProgram("sk_msg", SK_MSG_PROGRAM, path, None, program_id))
        return programs

    def sockets(self) -> dict[str, int]:
        """How many sockets each sockhash holds."""
        return {name: sum(1 for _ in self._map(name)) for name in SOCKHASHES}

    # -- internals ------------------------------------------------------------------------

    def _map(self, name: str) -> libbpf.Map:
        try:
            return self._maps[name]
        except KeyError:
            raise DatapathError(f"map {name} is not open: the datapath was closed") from None

    def _read(self, infos: dict[bytes, bytes], *, find_orphans: bool) -> ProgrammedPods:
        """The pods of these ``pods`` entries (key -> value), their options read in one pass
        over each option map; with ``find_orphans``, option entries of no pod in ``infos``, and
        included CIDRs of a pod that includes everything (a failed undo can leave them: unseen,
        they would take effect the day the pod names CIDRs of its own)."""
        owned: dict[str, dict[bytes, list[bytes]]] = {name: {} for name in OPTION_MAPS}
        orphans: dict[str, set[bytes]] = {}
        for name in OPTION_MAPS:
            by_owner, owner_at = owned[name], _OWNER_AT[name]
            for key in self._map(name):
                owner = key[owner_at]
                if owner in infos:
                    by_owner.setdefault(owner, []).append(key)
                elif find_orphans:
                    orphans.setdefault(name, set()).add(key)
        pods: dict[int, AcceleratedPod] = {}
        for key, raw in infos.items():
            cgroup_id, info = decode_u64(key), layout.PodInfo.from_buffer_copy(raw)
            ports: dict[int, set[int]] = {d: set() for d in TrafficDirection}
            for port_key in owned["pod_ports"].get(key, ()):
                ports[port_key[_DIRECTION_AT]].add(int.from_bytes(port_key[_PORT_AT], "big"))
            excluded, included = (
                frozenset(decode_cidr_key(k)[1] for k in owned[name].get(key, ()))
                for name in ("outbound_excluded_cidrs", "outbound_included_cidrs")
            )
            pod = pods[cgroup_id] = AcceleratedPod.from_info(
                cgroup_id,
                info,
                excluded_outbound_ports=frozenset(ports[TrafficDirection.DIRECTION_OUTBOUND]),
                excluded_inbound_ports=frozenset(ports[TrafficDirection.DIRECTION_INBOUND]),
                excluded_outbound_cidrs=excluded,
                included_outbound_cidrs=included,
            )
            if find_orphans and pod.included_outbound_cidrs is None and included:
                unused = owned["outbound_included_cidrs"][key]
                orphans.setdefault("outbound_included_cidrs", set()).update(unused)
        return ProgrammedPods(pods, orphans)

    def _put(
        self, undo: _Undo, name: str, key: bytes, value: bytes, previous: bytes | None
    ) -> None:
        """Write one entry whose current value the caller knows (None: absent)."""
        bpf_map = self._map(name)
        self._update(name, key, value)
        if previous is None:
            undo.append(partial(bpf_map.delete, key))
        else:
            undo.append(partial(bpf_map.update, key, previous))

    def _insert(self, undo: _Undo, name: str, keys: Iterable[bytes]) -> None:
        for key in keys:
            self._put(undo, name, key, _PRESENT, None)

    def _remove(
        self, undo: _Undo, name: str, keys: Iterable[bytes], value: bytes = _PRESENT
    ) -> int:
        """Delete ``keys`` (each holding ``value``); how many were there."""
        bpf_map, removed = self._map(name), 0
        for key in keys:
            if bpf_map.delete(key):
                undo.append(partial(bpf_map.update, key, value))
                removed += 1
        return removed

    def _release_ips(self, undo: _Undo, pod: AcceleratedPod, keys: Iterable[bytes]) -> None:
        """Delete these address entries of the pod, except those another pod has taken since."""
        owner = u64(pod.cgroup_id)
        for ip_key in sorted(keys):
            if self._map("pod_ips").lookup(ip_key) == owner:
                self._remove(undo, "pod_ips", {ip_key}, owner)

    def _update(self, name: str, key: bytes, value: bytes) -> None:
        try:
            self._map(name).update(key, value)
        except libbpf.MapError as err:
            if err.errno in (errno.E2BIG, errno.ENOSPC):  # full: hash maps / LPM tries
                raise MapFullError(
                    f"map {name} is full ({self._map(name).max_entries} entries): raise its "
                    "capacity (Capacities) and reload"
                ) from err
            raise


def _field(struct: type[ctypes.Structure], name: str) -> slice:
    """Where a field of a key lies in its bytes (decoding keys one by one is too slow)."""
    field = getattr(struct, name)
    return slice(field.offset, field.offset + field.size)


_OWNER_AT = {
    "pod_ports": _field(layout.PodPortKey, "pod_cgroup_id"),
    "outbound_excluded_cidrs": _field(layout.PodCidrKey, "pod_cgroup_id"),
    "outbound_included_cidrs": _field(layout.PodCidrKey, "pod_cgroup_id"),
}
_PORT_AT = _field(layout.PodPortKey, "port")
_DIRECTION_AT = layout.PodPortKey.direction.offset


def _option_keys(pod: AcceleratedPod | None) -> dict[str, set[bytes]]:
    if pod is None:
        return {name: set() for name in OPTION_MAPS}
    return {
        "pod_ports": pod.port_keys(),
        "outbound_excluded_cidrs": pod.excluded_cidr_keys(),
        "outbound_included_cidrs": pod.included_cidr_keys(),
    }


@contextlib.contextmanager
def undo_on_failure() -> Iterator[_Undo]:
    """Collects undo steps; if the block raises, runs them in reverse and raises again (an
    ``UndoFailedError`` if an undo step failed too). PodMaps writes are all or nothing by it."""
    undo: _Undo = []
    try:
        yield undo
    except BaseException as err:
        failures = []
        for step in reversed(undo):
            try:
                step()
            except Exception as undo_err:  # keep undoing the rest
                failures.append(undo_err)
        if failures and isinstance(err, Exception):
            raise UndoFailedError(err, failures[0]) from err
        raise


# -- load steps ---------------------------------------------------------------------------


def _make_pin_dirs(pins: PinLayout, undo: contextlib.ExitStack) -> None:
    for directory in (
        pins.root.parent,
        pins.root,
        pins.root / "maps",
        pins.root / "links",
        pins.root / "progs",
    ):
        if not directory.exists():
            directory.mkdir()
            undo.callback(_rmdir_if_empty, directory)


def _rmdir_if_empty(directory: Path) -> None:
    with contextlib.suppress(OSError):
        directory.rmdir()


def unload_pins(pins: PinLayout, drain_seconds: float) -> None:
    """Detach and remove whatever of a datapath is pinned under ``pins``, complete or not (an
    agent killed while loading leaves only part), in the order :meth:`Datapath.unload` needs."""
    if pins.map("draining").exists():
        with libbpf.Map.from_pin(pins.map("draining")) as draining:
            draining.update(u32(0), u32(1))
    steering = ("connect4", "connect6", "sendmsg4", "sendmsg6", "sockops")
    for link in steering:
        _detach_link(pins.link(link))
    time.sleep(drain_seconds)
    # What answers the sockets' own queries (SO_ORIGINAL_DST, addresses) goes last.
    for hook in reversed(CGROUP_HOOKS):
        if hook.link not in steering:
            _detach_link(pins.link(hook.link))
    sk_msg_pin = pins.program(SK_MSG_PROGRAM)
    if sk_msg_pin.exists():
        with libbpf.Program.from_pin(sk_msg_pin) as program:
            if pins.map(SK_MSG_SOCKHASH).exists():
                with libbpf.Map.from_pin(pins.map(SK_MSG_SOCKHASH)) as sockhash:
                    libbpf.prog_detach(program.fd, sockhash.fd, libbpf.AttachType.SK_MSG_VERDICT)
        sk_msg_pin.unlink()
    for name in (*SHARED_MAPS, *RETIRED_MAPS):
        pins.map(name).unlink(missing_ok=True)
    for directory in (
        pins.root / "maps",
        pins.root / "links",
        pins.root / "progs",
        pins.root,
        pins.root.parent,
    ):
        _rmdir_if_empty(directory)  # only if empty: other instances may live next to it


def _prepare(
    objects: dict[str, libbpf.BpfObject],
    paths: list[Path],
    pins: PinLayout,
    config: LoadedConfig,
    capacities: Capacities,
    undo: contextlib.ExitStack,
) -> None:
    """Pin paths, sizes and .rodata of every object, before any of them loads."""
    max_entries = capacities.max_entries()
    preexisting = {name for name in SHARED_MAPS if pins.map(name).exists()}
    for name in SHARED_MAPS:
        if name not in preexisting:  # pinned by libbpf at load: remove again on failure
            undo.callback(pins.map(name).unlink, missing_ok=True)
    rodata = config.raw()
    for path in paths:
        obj = objects[path.name]
        for bpf_map in obj.maps:
            if bpf_map.name in SHARED_MAPS:
                bpf_map.set_pin_path(pins.map(bpf_map.name))
                if bpf_map.name in max_entries:
                    bpf_map.set_max_entries(max_entries[bpf_map.name])
            elif bpf_map.name.endswith(".rodata"):
                _set_config(bpf_map, path, rodata)


def _set_config(rodata: libbpf.ObjectMap, path: Path, config: bytes) -> None:
    with libbpf.Btf.parse(path) as btf:
        variables = {name: (offset, size) for name, offset, size in btf.datasec_vars(".rodata")}
    if "config" not in variables:
        return
    offset, size = variables["config"]
    if size != len(config):
        raise DatapathError(
            f"{path.name}: .rodata config is {size} bytes, the agent's is {len(config)}: the "
            "objects and the agent come from different builds"
        )
    initial = bytearray(rodata.initial_value)
    initial[offset : offset + size] = config
    rodata.initial_value = bytes(initial)


def _attach(
    objects: dict[str, libbpf.BpfObject],
    cgroup: Path,
    pins: PinLayout,
    undo: contextlib.ExitStack,
) -> list[libbpf.Link]:
    sk_msg = objects[SK_MSG_OBJECT].program(SK_MSG_PROGRAM)
    sockhash = objects[SK_MSG_OBJECT].map(SK_MSG_SOCKHASH).handle()  # borrows the object's fd
    libbpf.prog_attach(sk_msg.fd, sockhash.fd, libbpf.AttachType.SK_MSG_VERDICT)
    undo.callback(libbpf.prog_detach, sk_msg.fd, sockhash.fd, libbpf.AttachType.SK_MSG_VERDICT)
    _pin(undo, sk_msg.pin, pins.program(SK_MSG_PROGRAM))

    links = []
    cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for hook in CGROUP_HOOKS:
            link = objects[hook.object_file].program(hook.program).attach_cgroup(cgroup_fd)
            undo.callback(link.destroy)
            _pin(undo, link.pin, pins.link(hook.link))
            links.append(link)
    finally:
        os.close(cgroup_fd)
    return links


def _pin(undo: contextlib.ExitStack, pin: Callable[[Path], None], path: Path) -> None:
    pin(path)
    undo.callback(path.unlink, missing_ok=True)


def _detach_link(path: Path) -> None:
    """Detach now (not whenever the last reference goes) and remove the pin."""
    if not path.exists():
        return
    with libbpf.Link.open_pinned(path) as link:
        link.detach()
    path.unlink()
