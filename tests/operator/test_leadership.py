"""The writer's Lease: terms, epochs, renewals and expiry (an in-memory Lease, a stopped clock).

Each replica is a :class:`Leadership` stepped by hand (:meth:`Leadership.tick`) on a clock the
test moves; the Lease is :class:`LeaseBackend`, which applies writes with the API server's
optimistic concurrency, and each replica reaches it through its own :class:`Link`, which the
test can cut (a partition). ``tests/operator/test_operator.py`` runs the same against the API
emulator and Kopf's peering.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from meshaccel.operator.leadership import (
    Leadership,
    LeaseConflict,
    LeaseError,
    LeaseRecord,
)
from tests.waiting import StoppedClock

DURATION = 15.0


@dataclass
class LeaseBackend:
    """One Lease, written one request at a time, each against the resourceVersion it read."""

    spec: dict[str, Any] | None = None
    version: int = 0

    def record(self) -> LeaseRecord | None:
        if self.spec is None:
            return None
        return LeaseRecord.from_object(
            {"metadata": {"resourceVersion": str(self.version)}, "spec": self.spec}
        )

    def store(self, spec: dict[str, Any]) -> LeaseRecord:
        self.spec = {key: value for key, value in spec.items() if value is not None}
        self.version += 1
        record = self.record()
        assert record is not None
        return record


@dataclass
class Link:
    """A replica's way to the Lease; ``cut`` makes every request fail (a partition)."""

    backend: LeaseBackend
    cut: bool = False
    requests: list[str] = field(default_factory=list)

    async def _reach(self, what: str) -> None:
        self.requests.append(what)
        await asyncio.sleep(0)  # another replica may run in between (a real round trip)
        if self.cut:
            raise LeaseError("connection refused")

    async def read(self) -> LeaseRecord | None:
        await self._reach("read")
        return self.backend.record()

    async def create(self, spec: Mapping[str, Any]) -> LeaseRecord:
        await self._reach("create")
        if self.backend.spec is not None:
            raise LeaseConflict("exists")
        return self.backend.store(dict(spec))

    async def write(self, version: str, spec: Mapping[str, Any]) -> LeaseRecord:
        await self._reach("write")
        if self.backend.spec is None or version != str(self.backend.version):
            raise LeaseConflict("moved on")
        return self.backend.store({**self.backend.spec, **spec})


@dataclass
class Replica:
    leadership: Leadership
    link: Link
    terms: list[int | None]  # what on_change was told

    @property
    def epoch(self) -> int | None:
        return self.leadership.epoch


def epochs(*replicas: Replica) -> tuple[int | None, ...]:
    """The replicas' epochs now (a function: each call reads them afresh)."""
    return tuple(r.epoch for r in replicas)


@pytest.fixture
def clock() -> StoppedClock:
    return StoppedClock()


@pytest.fixture
def backend() -> LeaseBackend:
    return LeaseBackend()


MakeReplica = Callable[[str], Replica]


@pytest.fixture
def replica(backend: LeaseBackend, clock: StoppedClock) -> MakeReplica:
    def make(name: str) -> Replica:
        link = Link(backend)
        terms: list[int | None] = []
        leadership = Leadership(
            link, identity=name, duration=DURATION, on_change=terms.append, clock=clock
        )
        return Replica(leadership, link, terms)

    return make


async def test_two_replicas_racing_for_the_lease_never_share_an_epoch(replica: MakeReplica) -> None:
    a, b = replica("a"), replica("b")
    a.leadership.want("test")
    b.leadership.want("test")

    # Both read the same (absent) Lease before either writes: one create wins.
    await asyncio.gather(a.leadership.tick(), b.leadership.tick())
    await asyncio.gather(a.leadership.tick(), b.leadership.tick())

    assert sorted([a.terms, b.terms], key=len) == [[], [1]]
    leader, follower = (a, b) if a.epoch else (b, a)
    assert epochs(leader, follower) == (1, None)
    # Released (not expired): the other takes it at once, with the next epoch.
    leader.leadership.unwant("test")
    await leader.leadership.tick()
    await follower.leadership.tick()
    assert epochs(leader, follower) == (None, 2)
    assert leader.terms[-1] is None and follower.terms == [2]


async def test_every_term_has_a_higher_epoch(replica: MakeReplica, backend: LeaseBackend) -> None:
    a, b = replica("a"), replica("b")
    taken = []
    for holder in (a, b, a, a):
        holder.leadership.want("test")
        await holder.leadership.tick()
        taken.append(holder.epoch)
        holder.leadership.unwant("test")  # paused: stops writing at once ...
        assert holder.epoch is None and holder.terms[-1] is None
        await holder.leadership.tick()  # ... and releases
        assert backend.spec is not None and "holderIdentity" not in backend.spec
    assert taken == [1, 2, 3, 4]
    assert backend.spec is not None
    assert backend.spec["leaseTransitions"] == 4  # the count is kept across releases


async def test_a_cut_off_holder_stops_writing_before_another_may_take_the_lease(
    replica: MakeReplica, clock: StoppedClock
) -> None:
    a, b = replica("a"), replica("b")
    a.leadership.want("test")
    await a.leadership.tick()
    b.leadership.want("test")
    await b.leadership.tick()  # b sees a's Lease, now
    assert epochs(a, b) == (1, None)

    a.link.cut = True  # a partition: a reaches the agents, not the API
    deadline = a.leadership.renew_deadline
    clock.now += deadline - 0.5
    await a.leadership.tick()
    await b.leadership.tick()
    assert epochs(a, b) == (1, None), "within its deadline, a still writes"

    clock.now += 0.5  # a's deadline: it stops by itself ...
    await a.leadership.tick()
    assert a.epoch is None and a.terms == [1, None]
    await b.leadership.tick()
    assert b.epoch is None, "... and b still waits: the Lease has not been silent long enough"

    clock.now += DURATION - deadline  # silent for its whole duration, by b's clock
    await b.leadership.tick()
    assert b.epoch == 2

    a.link.cut = False  # a is back: b holds and renews, a waits
    clock.now += b.leadership.retry
    await b.leadership.tick()
    await a.leadership.tick()
    assert epochs(a, b) == (None, 2)


async def test_a_renewal_keeps_the_term(
    replica: MakeReplica, clock: StoppedClock, backend: LeaseBackend
) -> None:
    a, b = replica("a"), replica("b")
    a.leadership.want("test")
    b.leadership.want("test")
    await a.leadership.tick()
    for _ in range(10):  # far past the duration, but renewed all along
        clock.now += a.leadership.retry
        await a.leadership.tick()
        await b.leadership.tick()
    assert epochs(a, b) == (1, None) and a.terms == [1]
    assert backend.spec is not None and backend.spec["leaseTransitions"] == 1


@pytest.mark.parametrize(
    ("holder_after", "expected", "reason"),
    [
        ("a", 8, "the Lease still names a (it was made again): a takes a term above the agent's"),
        ("b", None, "b took the Lease: a follows"),
    ],
)
async def test_an_agents_higher_epoch_ends_the_term(
    replica: MakeReplica,
    backend: LeaseBackend,
    holder_after: str,
    expected: int | None,
    reason: str,
) -> None:
    a, b = replica("a"), replica("b")
    a.leadership.want("test")
    await a.leadership.tick()
    if holder_after == "b":
        b.leadership.want("test")
        backend.store({**(backend.spec or {}), "holderIdentity": None})  # as if released
        await b.leadership.tick()
        assert b.epoch == 2
        a.leadership.superseded(2)
    else:
        a.leadership.superseded(7)  # an agent holds 7: the Lease lost its count
    assert a.epoch is None and a.terms == [1, None], reason

    await a.leadership.tick()

    assert a.epoch == expected, reason


async def test_a_deleted_lease_is_made_again_above_every_epoch_seen(
    replica: MakeReplica, backend: LeaseBackend
) -> None:
    a = replica("a")
    a.leadership.want("test")
    await a.leadership.tick()
    a.leadership.superseded(5)
    backend.spec = None  # someone deleted the Lease
    await a.leadership.tick()
    assert a.epoch == 6 and backend.spec is not None and backend.spec["leaseTransitions"] == 6


async def test_close_releases_the_lease(replica: MakeReplica, backend: LeaseBackend) -> None:
    a = replica("a")
    a.leadership.want("test")
    await a.leadership.tick()
    await a.leadership.close()
    assert a.epoch is None and a.terms == [1, None]
    assert backend.spec is not None and "holderIdentity" not in backend.spec
