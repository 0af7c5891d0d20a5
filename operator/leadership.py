"""Which operator replica writes to the agents, and with which epoch: a Lease.

Kopf's peering decides which replica handles events (the others pause), but it has no terms,
and a replica cut off from the API server never learns that another one took over. So the
replica Kopf keeps active (:meth:`Leadership.want`) also takes the ``coordination.k8s.io``
Lease :data:`LEASE_NAME` in its namespace, and its pushers write only while it holds it:

* **Epochs.** Taking the Lease is a compare-and-swap (a merge patch that carries the
  ``resourceVersion`` read: the API server refuses it with 409 if anyone wrote in between) that
  names the holder and raises ``spec.leaseTransitions`` by one; the new value is the term's
  **epoch**, which every pod set carries. The server applies one write to an object at a time,
  and every successful acquisition raised the value it had read, so no two acquisitions yield
  the same number: two replicas never write with one epoch, and a later term always has a
  higher one. (Renewals touch ``renewTime`` only; a release clears the holder and keeps the
  count.) Should the Lease be deleted and made again, the epoch still goes above the highest
  an agent has reported (:meth:`Leadership.superseded`).
* **Renewing.** The holder renews every ``duration * 2/15`` seconds (2 s of 15). One that could
  not for ``duration * 2/3`` seconds (10 s) stops writing by itself, before any other replica
  may take the Lease: others take it when it is free (released) or when it has not changed for
  ``duration`` seconds by their own clock (they read it as often as the holder renews it).
* **Stepping down.** A replica no longer wanted (Kopf paused it, or it is shutting down) stops
  writing at once and releases the Lease, so that the next one takes it without waiting; an
  agent that answers with a higher epoch than the term's ends the term at once.

Whatever slips through (a holder frozen past its deadline, a partition), the agents fence: they
refuse a set from a lower epoch than the one they applied. :class:`Leadership` is plain asyncio
with an injected clock and a :class:`LeaseStore`; :class:`KubeLeases` is the store on the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from kubernetes.aio import client as k8s

from meshaccel.operator.kube import Kube, KubeError

log = logging.getLogger("meshaccel.operator.leadership")

LEASE_NAME = "meshaccel-operator"
DEFAULT_DURATION = 15.0  # seconds: client-go's leader election default
MERGE_PATCH = "application/merge-patch+json"

OnChange = Callable[[int | None], None]
T = TypeVar("T")


class LeaseConflict(Exception):
    """Someone wrote the Lease since it was read (409), or made it first."""


class LeaseError(Exception):
    """The API refused or failed a Lease request for another reason."""


@dataclass(frozen=True)
class LeaseRecord:
    """What the Lease holds (``spec``), and the version it was read or written at."""

    version: str  # metadata.resourceVersion
    holder: str | None
    transitions: int
    duration: float

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> LeaseRecord:
        spec = obj.get("spec") or {}
        return cls(
            version=str(obj.get("metadata", {}).get("resourceVersion", "")),
            holder=spec.get("holderIdentity") or None,
            transitions=int(spec.get("leaseTransitions") or 0),
            duration=float(spec.get("leaseDurationSeconds") or DEFAULT_DURATION),
        )


class LeaseStore(Protocol):
    """The Lease, read and written with optimistic concurrency."""

    async def read(self) -> LeaseRecord | None:
        """The Lease, or None if there is none."""
        ...

    async def create(self, spec: Mapping[str, Any]) -> LeaseRecord:
        """Make the Lease with ``spec``; :class:`LeaseConflict` if it exists."""
        ...

    async def write(self, version: str, spec: Mapping[str, Any]) -> LeaseRecord:
        """Merge ``spec`` into the Lease if it is still at ``version``, else
        :class:`LeaseConflict`. A ``None`` value removes the field."""
        ...


def micro_time(moment: datetime) -> str:
    """A Kubernetes MicroTime (RFC 3339, microseconds, UTC)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def default_identity() -> str:
    """This process among the replicas: the pod's name (its hostname) and a random suffix, so
    that a restarted process never takes its predecessor's term for its own."""
    return f"{socket.gethostname()}/{uuid.uuid4().hex[:8]}"


class Leadership:
    """One replica's claim to write to the agents (see the module docstring).

    ``on_change(epoch)`` is called on the event loop with the new epoch when a term starts, and
    with None when it ends; :attr:`epoch` says the same at any time. :meth:`run` is the loop;
    :meth:`tick` is one step of it (tests drive it with a stopped clock).
    """

    def __init__(
        self,
        store: LeaseStore,
        *,
        identity: str | None = None,
        duration: float = DEFAULT_DURATION,
        on_change: OnChange | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if duration <= 0:
            raise ValueError(f"the lease duration must be positive, not {duration}")
        self.identity = identity or default_identity()
        self.duration = duration
        self.retry = duration * 2 / 15
        self.renew_deadline = duration * 2 / 3
        self._store = store
        self._on_change = on_change
        self._clock = clock
        self._wall = wall
        self._wanted: set[str] = set()
        self._epoch: int | None = None
        self._record: LeaseRecord | None = None  # as we last read or wrote it
        self._seen: tuple[str, float] | None = None  # a version, and when we first saw it
        self._renewed_at = 0.0  # when the last successful write of our term started
        self._floor = 0  # the highest epoch an agent reported
        self._next = 0.0  # when the loop acts next
        self._failing = False  # the last store call failed (logged once per streak)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- what the runtime calls --------------------------------------------------------------

    @property
    def epoch(self) -> int | None:
        """This replica's epoch while it holds the Lease; None otherwise."""
        return self._epoch

    @property
    def wanted(self) -> bool:
        return bool(self._wanted)

    def want(self, reason: str) -> None:
        """Kopf keeps this replica active (``reason``: what says so): take the Lease."""
        if reason not in self._wanted:
            self._wanted.add(reason)
            self._wake.set()

    def unwant(self, reason: str) -> None:
        """``reason`` no longer holds; with no reason left, stop writing and release."""
        self._wanted.discard(reason)
        if not self._wanted:
            self._end("paused or stopping: this replica no longer works")
            self._wake.set()

    def superseded(self, epoch: int) -> None:
        """An agent applied a set of ``epoch``: a term above ours ended ours."""
        self._floor = max(self._floor, epoch)
        if self._epoch is not None and epoch > self._epoch:
            self._end(f"an agent applied a set of epoch {epoch}: another replica leads")
            self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self.run(), name="meshaccel-leadership"
            )

    async def close(self) -> None:
        """Stop, and release the Lease if this replica holds it."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._wanted.clear()
        self._end("stopping")
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.retry):
                await self._release()

    # -- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.tick()
            except Exception:  # a bug must not end the leadership loop for good
                log.exception("leadership step failed", extra={"event": "leadership_bug"})
                self._next = self._clock() + self.retry
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, self._next - self._clock())):
                    await self._wake.wait()

    async def tick(self) -> None:
        """One step: renew, take, observe or release the Lease, whichever is due."""
        now = self._clock()
        self._next = now + self.retry
        try:
            await self._step(now)
        except LeaseError as err:
            log.log(
                logging.DEBUG if self._failing else logging.WARNING,
                "the Lease could not be read or written",
                extra={"event": "lease_error", "error": str(err)},
            )
            self._failing = True
        else:
            self._failing = False

    async def _step(self, now: float) -> None:
        if not self._wanted:
            await self._release()
            if self._record is None or self._record.holder != self.identity:
                await self._observe(now)
            return
        if self._epoch is not None:
            await self._renew(now)
            return
        record = await self._observe(now)
        if (
            record is not None
            and record.holder not in (None, self.identity)
            and not self._expired(record, now)
        ):
            return  # another replica holds it: wait
        await self._acquire(record, now)

    # -- steps -----------------------------------------------------------------------------------

    async def _observe(self, now: float) -> LeaseRecord | None:
        record = await self._bounded(self._store.read())
        self._note(record, now)
        return record

    def _note(self, record: LeaseRecord | None, now: float) -> None:
        self._record = record
        if record is not None and (self._seen is None or self._seen[0] != record.version):
            self._seen = (record.version, now)

    def _expired(self, record: LeaseRecord, now: float) -> bool:
        """Unchanged for its whole duration since we first saw it (our clock, not theirs)."""
        return self._seen is not None and now - self._seen[1] >= record.duration

    async def _acquire(self, record: LeaseRecord | None, now: float) -> None:
        epoch = max(record.transitions if record is not None else 0, self._floor) + 1
        moment = micro_time(self._wall())
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.duration)),
            "acquireTime": moment,
            "renewTime": moment,
            "leaseTransitions": epoch,
        }
        try:
            if record is None:
                written = await self._bounded(self._store.create(spec))
            else:
                written = await self._bounded(self._store.write(record.version, spec))
        except LeaseConflict:
            self._next = now  # someone was quicker: read again at once
            return
        self._note(written, now)
        self._begin(written.transitions, now, previous=record.holder if record else None)

    async def _renew(self, now: float) -> None:
        if now < self._renewed_at + self.retry:
            self._next = self._renewed_at + self.retry
            return
        assert self._record is not None
        try:
            written = await self._bounded(
                self._store.write(self._record.version, {"renewTime": micro_time(self._wall())})
            )
        except LeaseConflict:
            record = await self._observe(now)
            if record is None or (record.holder, record.transitions) != (
                self.identity,
                self._epoch,
            ):
                self._end("the Lease was taken by another replica")
            self._next = now  # still ours (someone touched another field): renew again
            return
        except LeaseError as err:
            if self._clock() - self._renewed_at >= self.renew_deadline:
                self._end(f"could not renew the Lease for {self.renew_deadline:g} s ({err})")
            raise
        self._note(written, now)
        self._renewed_at = now
        self._next = now + self.retry

    async def _release(self) -> None:
        record = self._record
        if record is None or record.holder != self.identity:
            return
        try:
            written = await self._bounded(
                self._store.write(record.version, {"holderIdentity": None})
            )
        except LeaseConflict:
            self._record = None  # someone else wrote it: not ours to release any more
            return
        self._note(written, self._clock())
        log.info("Lease released", extra={"event": "lease_released", "identity": self.identity})

    async def _bounded(self, call: Awaitable[T]) -> T:
        """A store call that takes no longer than a retry period; any failure but a conflict
        is a :class:`LeaseError`."""
        try:
            async with asyncio.timeout(self.retry):
                return await call
        except (LeaseConflict, LeaseError):
            raise
        except TimeoutError as err:
            raise LeaseError(f"no answer within {self.retry:g} s") from err
        except Exception as err:  # the client's own errors (aiohttp, kubernetes), OSError
            raise LeaseError(f"{type(err).__name__}: {err}") from err

    def _begin(self, epoch: int, now: float, *, previous: str | None) -> None:
        self._epoch, self._renewed_at = epoch, now
        self._next = now + self.retry
        log.info(
            "this replica leads: writing to the agents",
            extra={
                "event": "lease_acquired",
                "epoch": epoch,
                "identity": self.identity,
                "previous": previous,
            },
        )
        self._notify(epoch)

    def _end(self, why: str) -> None:
        if self._epoch is None:
            return
        log.warning(
            "this replica stopped writing to the agents",
            extra={"event": "lease_lost", "epoch": self._epoch, "reason": why},
        )
        self._epoch = None
        self._notify(None)

    def _notify(self, epoch: int | None) -> None:
        if self._on_change is not None:
            try:
                self._on_change(epoch)
            except Exception:
                log.exception("leadership callback failed", extra={"event": "callback_error"})


class KubeLeases:
    """The Lease ``namespace/name`` through the API (the official client's ApiClient, as
    :mod:`.kube` uses it: no generated model classes)."""

    def __init__(self, api: k8s.ApiClient, namespace: str, name: str = LEASE_NAME) -> None:
        self._kube = Kube(api)
        self.namespace = namespace
        self.name = name

    async def read(self) -> LeaseRecord | None:
        status, obj = await self._call("GET", self.name)
        if status == 404:
            return None
        return LeaseRecord.from_object(obj)

    async def create(self, spec: Mapping[str, Any]) -> LeaseRecord:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": dict(spec),
        }
        _, obj = await self._call("POST", None, body)
        return LeaseRecord.from_object(obj)

    async def write(self, version: str, spec: Mapping[str, Any]) -> LeaseRecord:
        # A merge patch carrying resourceVersion is refused (409) if the object moved on.
        body = {"metadata": {"resourceVersion": version}, "spec": dict(spec)}
        _, obj = await self._call("PATCH", self.name, body, MERGE_PATCH)
        return LeaseRecord.from_object(obj)

    async def _call(
        self,
        method: str,
        name: str | None,
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, dict[str, Any]]:
        try:
            return await self._kube.request(
                method, "Lease", self.namespace, name, body, content_type
            )
        except KubeError as err:
            if err.status == 409:
                raise LeaseConflict(str(err)) from err
            raise LeaseError(str(err)) from err
