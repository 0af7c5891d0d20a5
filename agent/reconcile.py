"""Keep the datapath's pod maps equal to the node's desired pod set.

A :class:`Reconciler` takes each :class:`~meshaccel.contract.api.PodSet` as the node's complete
desired state and applies the difference to its :class:`~meshaccel.agent.pods.PodMaps` (the
kernel's :class:`~meshaccel.agent.datapath.Datapath`, or the tests' in memory), all or nothing.
Sets are ordered by ``(epoch, generation)`` (docs/agent.md, "API"); a set over capacity is
refused but still removes the pods it no longer names; a pod whose cgroup is not found yet is
reported unresolved and programmed later; a pod whose cgroup vanished is removed. Pods are
written one at a time, journaled: a failed write undoes the pods written before it in reverse
order and raises :class:`ApplyFailedError`.

It keeps what it programmed in memory and writes only the pods that differ, with ``previous=``
what it wrote before (no walk of the maps); it reads the maps once, when made (after a restart
they are the truth), and removes entries that belong to no pod before its next write.

Every public method takes one lock and blocks on map syscalls: call them from a worker thread,
never on an event loop. :attr:`Reconciler.snapshot` is an immutable view any thread may read.
"""

from __future__ import annotations

import logging
import operator
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from functools import partial
from typing import Generic, Protocol

from typing_extensions import TypeVar  # default= (PEP 696) before Python 3.13

from meshaccel.agent.datapath import POD_MAPS as POD_MAPS  # the server lists them
from meshaccel.agent.datapath import Datapath, MapFullError, UndoFailedError
from meshaccel.agent.pods import AcceleratedPod, PodMaps
from meshaccel.contract.api import ApplyResult, PodSet, PodSpec, UnresolvedPod
from meshaccel.contract.modes import MESH_MODES

log = logging.getLogger(__name__)

#: A new uuid4 each time the agent process starts: tells an operator that the agent restarted.
BOOT_ID = str(uuid.uuid4())


# -- interfaces and errors ------------------------------------------------------------------


class UnresolvedPodError(Exception):
    """A resolver cannot find the pod's cgroup (yet); ``reason`` says what it looked for."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PodResolver(Protocol):
    """Finds the pod cgroup id (cgroup2 inode number) the datapath recognises a pod by."""

    def resolve(self, pod: PodSpec) -> int:
        """The pod's cgroup id, or :class:`UnresolvedPodError`."""
        ...

    def vanished(self, pod: PodSpec, cgroup_id: int) -> str | None:
        """Why ``cgroup_id``, what ``pod`` resolved to, is gone; None while it is there, and
        when that cannot be told (a pod is removed on a certainty only)."""
        ...


class ApplyRefusedError(Exception):
    """The set was refused before anything was written: nothing changed."""

    reason = "refused"  # a short, stable label (metrics, logs)

    def __init__(self, message: str, *, applied_generation: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.applied_generation = applied_generation


class StaleEpochError(ApplyRefusedError):
    """The set comes from a writer whose term ended: nothing to retry (no applied generation)."""

    reason = "stale_epoch"

    def __init__(self, requested: int, applied: int) -> None:
        super().__init__(
            f"epoch {requested} is older than the applied set's epoch {applied}: another "
            "operator replica leads, and this set is refused whatever its generation",
            applied_generation=None,
        )
        self.requested = requested
        self.applied = applied


class StaleGenerationError(ApplyRefusedError):
    reason = "stale_generation"

    def __init__(self, requested: int, applied: int) -> None:
        super().__init__(
            f"generation {requested} is older than the applied generation {applied}",
            applied_generation=applied,
        )
        self.requested = requested
        self.applied = applied


class GenerationConflictError(ApplyRefusedError):
    reason = "generation_conflict"

    def __init__(self, generation: int) -> None:
        super().__init__(
            f"generation {generation} is already applied with a different pod set: "
            "send a changed set with a higher generation",
            applied_generation=generation,
        )
        self.generation = generation


class CapacityError(ApplyRefusedError):
    reason = "capacity"


class InvalidPodError(ApplyRefusedError):
    reason = "invalid_pod"


class ApplyFailedError(Exception):
    """A map write failed part-way. ``rolled_back``: the maps are as before the apply."""

    def __init__(
        self,
        message: str,
        *,
        rolled_back: bool,
        map_full: bool,
        applied_generation: int | None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.rolled_back = rolled_back
        self.map_full = map_full
        self.applied_generation = applied_generation

    @property
    def reason(self) -> str:
        if not self.rolled_back:
            return "rollback_failed"
        return "map_full" if self.map_full else "datapath_error"


# -- state ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PodEntry:
    """A pod of the applied set that is programmed: its spec and what it resolved to."""

    spec: PodSpec
    pod: AcceleratedPod
    cgroup_id: int  # pod.cgroup_id, kept apart: read for every pod on every apply


@dataclass(frozen=True)
class Snapshot:
    """What the reconciler has done, for readers on other threads (never mutated)."""

    boot_id: str
    started_at: datetime
    applied_generation: int | None
    applied_epoch: int  # of the applied set (0: none yet, or from an operator without epochs)
    last_apply_time: datetime | None
    entries: Mapping[str, PodEntry]  # uid -> programmed pod of the applied set
    unresolved: tuple[UnresolvedPod, ...]
    programmed: int  # pods in the maps (after a restart, also pods no set has named yet)
    map_entries: Mapping[str, int]
    map_capacity: Mapping[str, int]
    apply_errors: Mapping[str, int]  # by ApplyRefusedError/ApplyFailedError reason
    pods_vanished: int  # pods removed since the start because their cgroup was gone

    @property
    def apply_errors_total(self) -> int:
        return sum(self.apply_errors.values())


@dataclass(frozen=True)
class _Plan:
    removes: list[AcceleratedPod]
    updates: list[tuple[AcceleratedPod, AcceleratedPod]]
    adds: list[AcceleratedPod]

    @property
    def empty(self) -> bool:
        return not (self.removes or self.updates or self.adds)


def _pod_fields(spec: PodSpec | None) -> dict[str, object]:
    """The ``extra=`` fields naming a pod (``contract/logs.py``); None for a pod programmed
    before a restart that no set has named yet."""
    if spec is None:
        return {"pod": None, "uid": None}
    return {"pod": f"{spec.namespace}/{spec.name}", "uid": spec.uid}


def _changed_fields(old: AcceleratedPod, new: AcceleratedPod) -> str:
    return ",".join(f.name for f in fields(old) if getattr(old, f.name) != getattr(new, f.name))


# -- writing ---------------------------------------------------------------------------------


class _Journal:
    """Writes pods through the datapath, each with what was programmed before, and keeps the
    steps that undo it: rollback puts every pod written back, in reverse order."""

    def __init__(self, datapath: PodMaps, programmed: Mapping[int, AcceleratedPod]) -> None:
        self._datapath = datapath
        self._programmed = programmed  # before the apply
        self._undo: list[Callable[[], object]] = []

    def put(self, pod: AcceleratedPod, before: AcceleratedPod | None) -> None:
        # take_ip: in an address swap, the pod holding the address moves off it later.
        taken_from = self._datapath.put_pod(pod, previous=before, take_ip=True)
        for cgroup_id in sorted(taken_from):
            holder = self._programmed.get(cgroup_id)
            if holder is not None and set(holder.addresses) & set(pod.addresses):
                # Undoing this pod deletes the address. If its holder has not moved off it by
                # then (its write failed, or never came), this gives it back: only address
                # entries differ from `holder`, so only those are written.
                self._undo.append(partial(self._datapath.put_pod, holder, previous=holder))
        if before is None:
            self._undo.append(partial(self._datapath.delete_pod, pod.cgroup_id, previous=pod))
        else:
            self._undo.append(partial(self._datapath.put_pod, before, previous=pod, take_ip=True))

    def delete(self, before: AcceleratedPod) -> None:
        self._datapath.delete_pod(before.cgroup_id, previous=before)
        self._undo.append(partial(self._datapath.put_pod, before, previous=None, take_ip=True))

    def rollback(self) -> list[Exception]:
        failures: list[Exception] = []
        for undo in reversed(self._undo):
            try:
                undo()
            except Exception as err:  # keep undoing the rest
                failures.append(err)
        self._undo.clear()
        return failures


def map_usage(pods: Iterable[AcceleratedPod]) -> dict[str, int]:
    """Entries each per-pod map needs for these pods (counted, not encoded: cheap). The
    operator counts a pod's the same way (``meshaccel.operator.budget``)."""
    usage = dict.fromkeys(POD_MAPS, 0)
    for pod in pods:
        usage["pods"] += 1
        usage["pod_ips"] += len(pod.addresses)  # one per family: 1 or 2
        usage["pod_ports"] += len(pod.excluded_outbound_ports) + len(pod.excluded_inbound_ports)
        usage["outbound_excluded_cidrs"] += len(pod.excluded_outbound_cidrs)
        usage["outbound_included_cidrs"] += len(pod.included_outbound_cidrs or ())
    return usage


_SPEC_FIELDS_BUT_OPTIONS = operator.itemgetter(*(f for f in PodSpec.model_fields if f != "options"))


def same_spec(a: PodSpec, b: PodSpec) -> bool:
    """``a == b``, four times faster than pydantic's general ``__eq__`` (it runs for every pod
    of every set). Both models are frozen, forbid extra fields and have no private attributes,
    so equal field values are equality; the fields are taken from the model, not listed."""
    if a is b:
        return True
    left, right = a.__dict__, b.__dict__
    options_a, options_b = left["options"], right["options"]
    if options_a is not options_b and options_a.__dict__ != options_b.__dict__:
        return False
    return bool(_SPEC_FIELDS_BUT_OPTIONS(left) == _SPEC_FIELDS_BUT_OPTIONS(right))


def accelerated_pod(spec: PodSpec, cgroup_id: int) -> AcceleratedPod:
    """What the maps should hold for ``spec``, whose pod cgroup id is ``cgroup_id``."""
    options = spec.options
    return AcceleratedPod.in_mesh(
        MESH_MODES[spec.mode],
        cgroup_id,
        spec.ipv4,
        ipv6=spec.ipv6,
        excluded_outbound_ports=options.excluded_outbound_ports,
        excluded_inbound_ports=options.excluded_inbound_ports,
        excluded_outbound_cidrs=options.excluded_outbound_cidrs,
        included_outbound_cidrs=options.included_outbound_cidrs,
        sk_msg_to_app=options.sk_msg_to_app,
        dns_capture=options.dns_capture,
    )


# -- the reconciler ---------------------------------------------------------------------------


#: The maps a reconciler writes. The agent's are its Datapath, which the server and the metrics
#: also read: a plain ``Reconciler`` is a ``Reconciler[Datapath]``.
MapsT = TypeVar("MapsT", bound=PodMaps, default=Datapath)


class Reconciler(Generic[MapsT]):
    """Applies pod sets to a datapath's pod maps; see the module docstring. The datapath stays
    the caller's: close the reconciler (it waits for an apply in progress), then the datapath."""

    def __init__(self, datapath: MapsT, resolver: PodResolver, *, max_pods: int) -> None:
        if max_pods < 0:
            raise ValueError(f"max_pods must not be negative, not {max_pods}")
        self.datapath = datapath
        self.resolver = resolver
        self._lock = threading.Lock()
        self._capacity = {name: datapath.max_entries(name) for name in POD_MAPS}
        read = datapath.read_pods()
        self._programmed = read.pods  # cgroup id -> what the maps hold (never mutated)
        self._orphans = read.orphans  # map name -> entries of no pod, for the next apply
        self.max_pods = min(max_pods, self._capacity["pods"], self._capacity["pod_ips"])
        self._usage_now = map_usage(self._programmed.values())
        self._dirty = False  # the maps may differ from _programmed (a rollback failed): read again
        self._generation: int | None = None
        self._epoch = 0  # the applied set's; meaningful once _generation is not None
        self._desired: dict[str, PodSpec] = {}  # the applied set, unresolved pods included
        self._entries: dict[str, PodEntry] = {}
        self._by_cgroup: dict[int, PodEntry] = {}
        self._unresolved: dict[str, UnresolvedPod] = {}
        # uid -> (spec, reason) of pods removed because their cgroup was gone: the reason they
        # are reported by while that spec stays unresolved (the resolver's own says less).
        self._vanished: dict[str, tuple[PodSpec, str]] = {}
        self._vanished_total = 0
        self._errors: dict[str, int] = {}
        self._last_apply: datetime | None = None
        self._started = datetime.now(UTC)
        self._snapshot = self._make_snapshot()
        if self._programmed or self._orphans:
            log.info(
                "adopted programmed pods (matched by cgroup id when the first set arrives)",
                extra={
                    "event": "pods_adopted",
                    "pods": len(self._programmed),
                    "orphans": {n: len(k) for n, k in self._orphans.items()},
                },
            )

    # -- public --------------------------------------------------------------------------------

    @property
    def boot_id(self) -> str:
        return BOOT_ID

    @property
    def applied_generation(self) -> int | None:
        return self._snapshot.applied_generation

    @property
    def applied_epoch(self) -> int:
        return self._snapshot.applied_epoch

    @property
    def snapshot(self) -> Snapshot:
        """The latest state; safe to read from any thread without blocking."""
        return self._snapshot

    def apply(self, pod_set: PodSet) -> ApplyResult:
        """Make the maps hold exactly ``pod_set`` (its resolvable pods). Blocks: not on a loop.

        Raises :class:`ApplyRefusedError` (nothing was changed) or :class:`ApplyFailedError`.
        """
        with self._lock:
            started = time.perf_counter()
            try:
                desired = self._admit(pod_set)
                if desired is None:  # the same set at the same epoch and generation again
                    self._last_apply = datetime.now(UTC)
                    self._publish()
                    return self._result(pod_set.generation, _Plan([], [], []), started)
                return self._reconcile(
                    pod_set.generation, desired, started, retry=False, epoch=pod_set.epoch
                )
            except ApplyRefusedError as err:
                if isinstance(err, CapacityError):
                    removed = self._remove_unnamed({pod.uid for pod in pod_set.pods})
                    if removed:
                        err.message += (
                            f"; the {removed} pod(s) of the applied set it no longer names "
                            "were removed"
                        )
                        err.args = (err.message,)
                self._refused(err, pod_set)
                raise

    def retry_unresolved(self) -> ApplyResult | None:
        """Resolve the applied set's unresolved pods again; program those found. Blocks.

        None when nothing was unresolved. Raises like :meth:`apply` if a write fails.
        """
        with self._lock:
            if not self._unresolved or self._generation is None:
                return None
            try:
                return self._reconcile(
                    self._generation,
                    self._desired,
                    time.perf_counter(),
                    retry=True,
                    epoch=self._epoch,
                )
            except ApplyRefusedError as err:  # not counted: the set itself was accepted
                log.warning(
                    "pods resolved since, but not programmed",
                    extra={"event": "retry_refused", "reason": err.reason, "error": err.message},
                )
                raise

    def remove_vanished(self) -> list[UnresolvedPod]:
        """Remove the programmed pods whose cgroup is gone; they become unresolved. Blocks.

        Asks the resolver about every programmed pod of the applied set (pods adopted after a
        restart are matched to a set, and resolved afresh, by the first set: until then there
        is no set to report them in). Those gone are removed all or nothing, as an apply
        writes, and returned; a retry or a later set programs one again once it resolves.
        Raises :class:`ApplyFailedError` if a write fails (every removal undone). After a
        failed rollback, nothing is removed until the next apply or retry has read the maps
        again: what is programmed is not known until then.
        """
        with self._lock:
            generation = self._generation
            if generation is None or not self._entries or self._dirty:
                return []
            gone: dict[str, str] = {}
            for uid, entry in self._entries.items():
                reason = self._vanished_reason(entry)
                if reason is not None:
                    gone[uid] = reason
            if not gone:
                return []
            removed = [self._entries[uid] for uid in gone]
            self._execute(
                _Plan([e.pod for e in removed], [], []),
                generation,
                doing=f"removing {len(removed)} pods whose cgroup is gone",
            )
            # Committed: the maps no longer hold them.
            ids = {e.cgroup_id for e in removed}
            self._programmed = {c: p for c, p in self._programmed.items() if c not in ids}
            self._usage_now = map_usage(self._programmed.values())
            self._entries = {u: e for u, e in self._entries.items() if u not in gone}
            self._by_cgroup = {e.cgroup_id: e for e in self._entries.values()}
            reported = [_unresolved(e.spec, gone[e.spec.uid]) for e in removed]
            self._unresolved = {**self._unresolved, **{u.uid: u for u in reported}}
            self._vanished.update((e.spec.uid, (e.spec, gone[e.spec.uid])) for e in removed)
            self._vanished_total += len(removed)
            self._publish()
            for entry in removed:
                self._log_pod(
                    "pod removed: its cgroup is gone",
                    "pod_vanished",
                    entry.spec,
                    entry.cgroup_id,
                    gone[entry.spec.uid],
                    generation,
                    level=logging.WARNING,
                )
            return reported

    def close(self) -> None:
        """Wait for an apply in progress to finish. The maps are the datapath's: close that
        after this (it keeps running from its pins)."""
        with self._lock:
            pass

    def __enter__(self) -> Reconciler[MapsT]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- steps ---------------------------------------------------------------------------------

    def _remove_unnamed(self, named: set[str]) -> int:
        """A set was refused for capacity: remove the programmed pods of the applied set it
        does not name (all or nothing, as an apply writes), keep the rest as applied. Returns
        how many went. Nothing before a first set (pods adopted after a restart are matched by
        the first set applied), nor while the maps must be read again."""
        generation = self._generation
        if generation is None or self._dirty:
            return 0
        kept = {uid: entry for uid, entry in self._entries.items() if uid in named}
        gone = [entry for uid, entry in self._entries.items() if uid not in named]
        if not gone:
            return 0
        try:
            self._execute(
                _Plan([entry.pod for entry in gone], [], []),
                generation,
                doing=f"removing {len(gone)} pods a refused set no longer names",
            )
        except ApplyFailedError:
            return 0  # logged and counted; every removal undone, the applied set stays
        # Committed: the maps no longer hold them, and the applied set no longer names them.
        ids = {entry.cgroup_id for entry in gone}
        self._programmed = {c: p for c, p in self._programmed.items() if c not in ids}
        self._usage_now = map_usage(self._programmed.values())
        self._entries = kept
        self._by_cgroup = {e.cgroup_id: e for e in kept.values()}
        self._desired = {uid: spec for uid, spec in self._desired.items() if uid in named}
        self._unresolved = {u: item for u, item in self._unresolved.items() if u in named}
        self._vanished = {u: v for u, v in self._vanished.items() if u in named}
        for entry in gone:
            self._log_pod(
                "pod removed",
                "pod_removed",
                entry.spec,
                entry.cgroup_id,
                "not in a set refused for capacity",
                generation,
            )
        return len(gone)

    def _admit(self, pod_set: PodSet) -> dict[str, PodSpec] | None:
        """The set by uid, None for an idempotent repeat (while the maps are known to hold
        it: after a failed rollback it is written again); raises if it must be refused."""
        desired = {pod.uid: pod for pod in pod_set.pods}
        applied = self._generation
        if applied is not None and pod_set.epoch < self._epoch:
            raise StaleEpochError(pod_set.epoch, self._epoch)
        if applied is not None and pod_set.epoch > self._epoch:
            applied = None  # a new leader: its generations start afresh
        if applied is not None and pod_set.generation < applied:
            raise StaleGenerationError(pod_set.generation, applied)
        if applied is not None and pod_set.generation == applied:
            previous = self._desired
            if desired.keys() == previous.keys() and all(
                same_spec(spec, previous[uid]) for uid, spec in desired.items()
            ):
                return desired if self._dirty else None
            raise GenerationConflictError(applied)
        if len(desired) > self.max_pods:
            raise CapacityError(
                f"the set has {len(desired)} pods; this agent holds at most {self.max_pods} "
                "(raise the pods capacity of the datapath, or run fewer meshed pods on the node)",
                applied_generation=self._generation,
            )
        return desired

    def _reconcile(
        self,
        generation: int,
        desired: dict[str, PodSpec],
        started: float,
        *,
        retry: bool,
        epoch: int,
    ) -> ApplyResult:
        if self._dirty:
            self._resync()
        entries, unresolved = self._resolve(desired)
        target: dict[int, AcceleratedPod] = {e.cgroup_id: e.pod for e in entries.values()}
        needed = map_usage(target.values())
        over = {
            name: (n, self._capacity[name])
            for name, n in needed.items()
            if n > self._capacity[name]
        }
        if over:
            raise CapacityError(
                "the set needs more map entries than the datapath holds: "
                + "; ".join(f"{name} needs {n}, holds {cap}" for name, (n, cap) in over.items())
                + " (raise the datapath's Capacities, or send fewer pods or options)",
                applied_generation=self._generation,
            )
        plan = self._plan(target)
        if not plan.empty or self._orphans:
            self._execute(plan, generation, doing=f"applying generation {generation}")
        # Committed: the maps now hold `target`.
        self._programmed = target
        self._usage_now = needed
        self._generation = generation
        self._epoch = epoch
        self._desired = desired
        previous_entries, previous_unresolved = self._by_cgroup, self._unresolved
        self._entries = entries
        self._by_cgroup = {e.cgroup_id: e for e in entries.values()}
        self._unresolved = unresolved
        if self._vanished:  # kept for pods still unresolved as they were
            self._vanished = {
                uid: v
                for uid, v in self._vanished.items()
                if uid in unresolved and same_spec(v[0], desired[uid])
            }
        if not retry:
            self._last_apply = datetime.now(UTC)
        self._publish()
        result = self._result(generation, plan, started)
        self._log_decisions(plan, previous_entries, previous_unresolved, generation, retry=retry)
        return result

    def _resolve(
        self, desired: Mapping[str, PodSpec]
    ) -> tuple[dict[str, PodEntry], dict[str, UnresolvedPod]]:
        entries: dict[str, PodEntry] = {}
        unresolved: dict[str, UnresolvedPod] = {}
        known = self._entries
        for uid, spec in desired.items():
            entry = known.get(uid)
            if entry is None or not same_spec(entry.spec, spec):  # new or changed: do it again
                try:
                    cgroup_id = self._resolve_one(spec)
                except UnresolvedPodError as err:
                    unresolved[uid] = _unresolved(spec, self._reason_for(spec, err.reason))
                    continue
                try:
                    entry = PodEntry(spec, accelerated_pod(spec, cgroup_id), cgroup_id)
                except ValueError as err:  # the API's validation should have caught it
                    raise InvalidPodError(
                        f"pod {spec.namespace}/{spec.name} (uid {uid}): {err}",
                        applied_generation=self._generation,
                    ) from err
            entries[uid] = entry
        if len({e.cgroup_id for e in entries.values()}) == len(entries):
            return entries, unresolved
        claimed: dict[int, list[str]] = {}
        for uid, entry in entries.items():
            claimed.setdefault(entry.cgroup_id, []).append(uid)
        for cgroup_id, uids in claimed.items():
            if len(uids) > 1:  # never guess which one the cgroup is
                for uid in uids:
                    others = ", ".join(u for u in uids if u != uid)
                    unresolved[uid] = _unresolved(
                        entries.pop(uid).spec,
                        f"resolves to cgroup id {cgroup_id}, as do pods with uid {others}",
                    )
        return entries, unresolved

    def _reason_for(self, spec: PodSpec, reason: str) -> str:
        """Why ``spec`` is unresolved: its cgroup vanished, if so (and it did not change)."""
        vanished = self._vanished.get(spec.uid)
        if vanished is not None and same_spec(vanished[0], spec):
            return vanished[1]
        return reason

    def _resolve_one(self, spec: PodSpec) -> int:
        try:
            cgroup_id = self.resolver.resolve(spec)
        except UnresolvedPodError:
            raise
        except Exception as err:  # a resolver bug must not fail the whole set
            log.exception("resolver failed", extra={"event": "resolver_error", **_pod_fields(spec)})
            raise UnresolvedPodError(f"resolver error: {type(err).__name__}: {err}") from err
        if type(cgroup_id) is not int or cgroup_id <= 0:
            raise UnresolvedPodError(f"resolver returned {cgroup_id!r}, not a cgroup id")
        return cgroup_id

    def _vanished_reason(self, entry: PodEntry) -> str | None:
        try:
            reason = self.resolver.vanished(entry.spec, entry.cgroup_id)
        except Exception:  # a resolver bug: the pod stays, as for any answer that is not sure
            log.exception(
                "resolver failed to check a cgroup",
                extra={"event": "resolver_error", **_pod_fields(entry.spec)},
            )
            return None
        return None if reason is None else str(reason)

    def _plan(self, target: Mapping[int, AcceleratedPod]) -> _Plan:
        current = self._programmed
        removes = [pod for cgroup_id, pod in current.items() if cgroup_id not in target]
        updates: list[tuple[AcceleratedPod, AcceleratedPod]] = []
        adds: list[AcceleratedPod] = []
        for cgroup_id, pod in target.items():
            old = current.get(cgroup_id)
            if old is None:
                adds.append(pod)
            elif old is not pod and old != pod:
                updates.append((old, pod))
        return _Plan(removes, updates, adds)

    def _execute(self, plan: _Plan, generation: int, *, doing: str) -> None:
        """Write the plan: removals first (they free room and addresses), then changes, then
        additions. On a failure every write is undone; the maps are as before. ``doing``
        names the work in the error ("applying generation 7")."""
        journal = _Journal(self.datapath, self._programmed)
        try:
            if self._orphans:
                self.datapath.remove_orphans(self._orphans)
                self._orphans = {}
            for pod in plan.removes:
                journal.delete(pod)
            for old, new in plan.updates:
                journal.put(new, old)
            for pod in plan.adds:
                journal.put(pod, None)
        except BaseException as raised:
            failures = journal.rollback()
            if not isinstance(raised, Exception):  # not ours to turn into an error reply
                self._dirty = True  # whether the pod being written was undone is not known
                raise
            err = raised
            if isinstance(raised, UndoFailedError):  # the failing pod's own undo failed
                err = raised.error
                failures.insert(0, raised.undo_error)
            rolled_back = not failures
            if not rolled_back:
                self._dirty = True  # read the maps again before the next apply
            failed = ApplyFailedError(
                f"{doing} failed: {err}"
                + (
                    "; every change was undone, the previous set stays"
                    if rolled_back
                    else f"; undoing it failed too ({failures[0]}): the maps are read again "
                    "before the next apply"
                ),
                rolled_back=rolled_back,
                map_full=isinstance(err, MapFullError),
                applied_generation=self._generation,
            )
            self._count_error(failed.reason)
            log.error(
                "apply failed",
                extra={
                    "event": "apply_failed",
                    "generation": generation,
                    "doing": doing,
                    "reason": failed.reason,
                    "error": str(err),
                    "rolled_back": rolled_back,
                },
            )
            self._publish()
            raise failed from raised

    def _resync(self) -> None:
        read = self.datapath.read_pods()
        self._programmed, self._orphans = read.pods, read.orphans
        self._usage_now = map_usage(self._programmed.values())
        self._dirty = False
        # Entries whose pod is no longer in the maps as cached must be encoded again.
        self._entries = {
            uid: e for uid, e in self._entries.items() if self._programmed.get(e.cgroup_id) == e.pod
        }
        log.warning("maps read again after a failed rollback", extra={"event": "maps_resynced"})

    # -- bookkeeping ---------------------------------------------------------------------------

    def _refused(self, err: ApplyRefusedError, pod_set: PodSet) -> None:
        self._count_error(err.reason)
        log.warning(
            "set refused",
            extra={
                "event": "apply_refused",
                "epoch": pod_set.epoch,
                "generation": pod_set.generation,
                "reason": err.reason,
                "error": err.message,
            },
        )
        self._publish()

    def _count_error(self, reason: str) -> None:
        self._errors[reason] = self._errors.get(reason, 0) + 1

    def _result(self, generation: int, plan: _Plan, started: float) -> ApplyResult:
        return ApplyResult(
            applied_generation=generation,
            added=len(plan.adds),
            updated=len(plan.updates),
            removed=len(plan.removes),
            unresolved=sorted(self._unresolved.values(), key=lambda u: (u.namespace, u.name)),
            duration_ms=(time.perf_counter() - started) * 1000,
            boot_id=BOOT_ID,
            applied_epoch=self._epoch,
        )

    def _make_snapshot(self) -> Snapshot:
        return Snapshot(
            boot_id=BOOT_ID,
            started_at=self._started,
            applied_generation=self._generation,
            applied_epoch=self._epoch,
            last_apply_time=self._last_apply,
            entries=self._entries,  # replaced, never mutated, by every apply
            unresolved=tuple(
                sorted(self._unresolved.values(), key=lambda u: (u.namespace, u.name))
            ),
            programmed=len(self._programmed),
            map_entries=self._usage_now,
            map_capacity=self._capacity,  # never mutated
            apply_errors=dict(self._errors),
            pods_vanished=self._vanished_total,
        )

    def _publish(self) -> None:
        self._snapshot = self._make_snapshot()

    def _log_decisions(
        self,
        plan: _Plan,
        previous: Mapping[int, PodEntry],
        previous_unresolved: Mapping[str, UnresolvedPod],
        generation: int,
        *,
        retry: bool,
    ) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        by_cgroup = self._by_cgroup
        for pod in plan.removes:
            old = previous.get(pod.cgroup_id)
            spec = old.spec if old is not None else None
            if spec is None:
                reason = "programmed before the agent restarted and not in the set"
            elif spec.uid in self._unresolved:
                reason = f"unresolved now: {self._unresolved[spec.uid].reason}"
            elif spec.uid in self._desired:
                reason = "its cgroup changed"
            else:
                reason = "not in the set"
            self._log_pod("pod removed", "pod_removed", spec, pod.cgroup_id, reason, generation)
        for old_pod, new_pod in plan.updates:
            self._log_pod(
                "pod updated",
                "pod_updated",
                by_cgroup[new_pod.cgroup_id].spec,
                new_pod.cgroup_id,
                f"changed: {_changed_fields(old_pod, new_pod)}",
                generation,
            )
        for pod in plan.adds:
            spec = by_cgroup[pod.cgroup_id].spec
            reason = "resolved on retry" if retry else "new in the set"
            if spec.uid in previous_unresolved and not retry:
                reason = "resolved now"
            self._log_pod("pod accelerated", "pod_added", spec, pod.cgroup_id, reason, generation)
        for uid, item in self._unresolved.items():
            before = previous_unresolved.get(uid)
            if before is None or before.reason != item.reason:
                self._log_pod(
                    "pod unresolved",
                    "pod_unresolved",
                    self._desired[uid],
                    None,
                    item.reason,
                    generation,
                    level=logging.WARNING,
                )
        if not plan.empty or not retry:
            log.info(
                "set applied",
                extra={
                    "event": "set_applied",
                    "epoch": self._epoch,
                    "generation": generation,
                    "added": len(plan.adds),
                    "updated": len(plan.updates),
                    "removed": len(plan.removes),
                    "unresolved": len(self._unresolved),
                },
            )

    @staticmethod
    def _log_pod(
        message: str,
        event: str,
        spec: PodSpec | None,
        cgroup_id: int | None,
        reason: str,
        generation: int,
        *,
        level: int = logging.INFO,
    ) -> None:
        log.log(
            level,
            message,
            extra={
                "event": event,
                **_pod_fields(spec),
                "cgroup_id": cgroup_id,
                "reason": reason,
                "generation": generation,
            },
        )


def _unresolved(spec: PodSpec, reason: str) -> UnresolvedPod:
    return UnresolvedPod(uid=spec.uid, namespace=spec.namespace, name=spec.name, reason=reason)
