"""Pods whose cgroup is gone leave the maps (issue 11: never fail closed).

A pod deleted while no new set says so (the operator, or its watch, away) must not keep its
address leading to a dead pod's inbound port. These tests resolve pods with the real
CgroupResolver over real cgroups made under a test cgroup of our own (never the root cgroup),
remove or remake those cgroups, and read the kernel's maps back. The datapath is the one of
conftest.py.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshaccel.agent import libbpf
from meshaccel.agent.datapath import Datapath
from meshaccel.agent.identity import CgroupDriver, CgroupResolver, QosClass, kubelet_pod_cgroup
from meshaccel.agent.pods import AcceleratedPod
from meshaccel.agent.reconcile import ApplyFailedError, Reconciler, accelerated_pod
from meshaccel.contract.api import PodSpec, PodsReply, StatusReply
from tests.agent.conftest import (
    FakeResolver,
    MakeClient,
    expected_pods,
    pod_ip,
    pod_set,
    pod_spec,
    uid,
)
from tests.agent.test_reconcile import pod_ips_map
from tests.netlab.cgroups import TEST_CGROUP_PREFIX, TestCgroup, cgroup_id
from tests.waiting import wait_for

pytestmark = pytest.mark.kernel

_numbers = itertools.count()


@dataclass(frozen=True)
class Layout:
    """Where a pod's cgroup is, and how the resolver finds it: named in the set, or by uid."""

    name: str
    qos: QosClass | None  # None: the set names the cgroup (standalone); else kubelet's place
    driver: CgroupDriver = CgroupDriver.AUTO

    def __str__(self) -> str:
        return self.name

    def relative(self, index: int) -> str:
        if self.qos is None:
            return f"pods/pod-{index}"
        return str(kubelet_pod_cgroup(uid(index), self.driver, self.qos))

    def spec(self, index: int, **changes: Any) -> PodSpec:
        if self.qos is None:
            changes.setdefault("cgroup", self.relative(index))
        return pod_spec(index, **changes)

    def resolver(self, root: Path) -> CgroupResolver:
        # AUTO: a pod found by uid is looked for in all six places of both drivers.
        return CgroupResolver(root, CgroupDriver.AUTO, explicit_cgroups=self.qos is None)

    def gone(self, root: Path, index: int, cgroup: int) -> str:
        """A piece of the reason a vanished pod is reported with."""
        if self.qos is None:
            return f"cgroup {root / self.relative(index)} disappeared (cgroup id {cgroup})"
        return f"the cgroup of pod uid {uid(index)} (cgroup id {cgroup}) disappeared"


LAYOUTS = [
    Layout("explicit", None),
    Layout("systemd-burstable", QosClass.BURSTABLE, CgroupDriver.SYSTEMD),
    Layout("cgroupfs-besteffort", QosClass.BESTEFFORT, CgroupDriver.CGROUPFS),
]


@dataclass
class Cgroups:
    """A test cgroup of our own, in which pod cgroups are made and removed."""

    cgroup: TestCgroup
    layout: Layout

    @property
    def root(self) -> Path:
        return Path(os.path.realpath(self.cgroup.path))

    def path(self, index: int) -> Path:
        return self.root / self.layout.relative(index)

    def make(self, *indexes: int) -> list[int]:
        return [cgroup_id(self.cgroup.child(self.layout.relative(i))) for i in indexes]

    def remove(self, index: int) -> None:
        self.path(index).rmdir()


@pytest.fixture(params=LAYOUTS, ids=str)
def cgroups(request: pytest.FixtureRequest) -> Iterator[Cgroups]:
    layout: Layout = request.param
    cgroup = TestCgroup(f"{TEST_CGROUP_PREFIX}{os.getpid()}-vanish-{next(_numbers)}")
    with cgroup:
        yield Cgroups(cgroup, layout)


@pytest.fixture
def explicit_cgroups() -> Iterator[Cgroups]:
    """As ``cgroups``, one layout only (for tests about the reconciler, not the resolver)."""
    cgroup = TestCgroup(f"{TEST_CGROUP_PREFIX}{os.getpid()}-vanish-{next(_numbers)}")
    with cgroup:
        yield Cgroups(cgroup, LAYOUTS[0])


MakeReconciler = Callable[..., Reconciler]


@pytest.fixture
def make_reconciler() -> Iterator[MakeReconciler]:
    made: list[Reconciler] = []

    def make(datapath: Datapath, cgroups: Cgroups) -> Reconciler:
        reconciler = Reconciler(datapath, cgroups.layout.resolver(cgroups.root), max_pods=64)
        made.append(reconciler)
        return reconciler

    yield make
    for reconciler in made:
        reconciler.close()


def programmed(pairs: list[tuple[PodSpec, int]]) -> dict[int, AcceleratedPod]:
    """What Datapath.pods() must read back: these specs with these cgroup ids."""
    return {cgroup: accelerated_pod(spec, cgroup) for spec, cgroup in pairs}


class WriteSpy:
    """Stands in for the datapath's writes: records each call and writes nothing."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, datapath: Datapath) -> None:
        self.calls: list[str] = []
        for name in ("put_pod", "delete_pod", "remove_orphans"):
            monkeypatch.setattr(datapath, name, self._recorder(name))

    def _recorder(self, name: str) -> Callable[..., None]:
        def record(*args: object, **kwargs: object) -> None:
            self.calls.append(name)

        return record


# -- the reconciler with the real resolver -----------------------------------------------------


def test_a_pod_whose_cgroup_disappeared_is_removed_and_reported_unresolved(
    datapath: Datapath,
    make_reconciler: MakeReconciler,
    cgroups: Cgroups,
    caplog: pytest.LogCaptureFixture,
) -> None:
    layout = cgroups.layout
    specs = [layout.spec(i) for i in range(3)]
    ids = cgroups.make(0, 1, 2)
    reconciler = make_reconciler(datapath, cgroups)
    assert reconciler.apply(pod_set(1, *specs)).added == 3

    cgroups.remove(1)
    caplog.set_level(logging.INFO, logger="meshaccel.agent.reconcile")
    removed = reconciler.remove_vanished()

    assert [u.uid for u in removed] == [uid(1)]
    assert layout.gone(cgroups.root, 1, ids[1]) in removed[0].reason, removed[0].reason
    assert datapath.pods() == programmed([(specs[0], ids[0]), (specs[2], ids[2])])
    assert pod_ip(1) not in pod_ips_map(datapath), "the address leads nowhere any more"
    snapshot = reconciler.snapshot
    assert snapshot.unresolved == tuple(removed)
    assert set(snapshot.entries) == {uid(0), uid(2)}
    assert (snapshot.programmed, snapshot.map_entries["pods"]) == (2, 2)
    assert snapshot.pods_vanished == 1
    assert snapshot.applied_generation == 1
    (event,) = [r for r in caplog.records if r.__dict__.get("event") == "pod_vanished"]
    assert event.levelno == logging.WARNING
    assert (event.__dict__["uid"], event.__dict__["cgroup_id"]) == (uid(1), ids[1])
    assert event.__dict__["reason"] == removed[0].reason
    assert reconciler.remove_vanished() == [], "removed once"
    assert reconciler.snapshot.pods_vanished == 1


def test_a_cgroup_made_again_under_the_same_name_counts_as_vanished(
    datapath: Datapath, make_reconciler: MakeReconciler, cgroups: Cgroups
) -> None:
    spec = cgroups.layout.spec(0)
    (old,) = cgroups.make(0)
    reconciler = make_reconciler(datapath, cgroups)
    reconciler.apply(pod_set(1, spec))

    cgroups.remove(0)
    (new,) = cgroups.make(0)
    assert new != old, "a new cgroup has a new id"
    (removed,) = reconciler.remove_vanished()

    assert f"cgroup {cgroups.path(0)} was replaced" in removed.reason, removed.reason
    assert datapath.pods() == {}
    # The pod is still in the set and its place has a cgroup: a retry programs the new one.
    retried = reconciler.retry_unresolved()
    assert retried is not None and retried.added == 1 and retried.unresolved == []
    assert datapath.pods() == programmed([(spec, new)])
    assert reconciler.snapshot.entries[uid(0)].cgroup_id == new


def test_pods_whose_cgroups_are_there_are_not_touched(
    datapath: Datapath,
    make_reconciler: MakeReconciler,
    cgroups: Cgroups,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    specs = [cgroups.layout.spec(i) for i in range(3)]
    ids = cgroups.make(0, 1, 2)
    reconciler = make_reconciler(datapath, cgroups)
    reconciler.apply(pod_set(1, *specs))
    layout = cgroups.layout
    if layout.qos is not None:
        # A second cgroup for the pod's uid, in another of the places it is looked for (resolve
        # would refuse to guess now): the pod's own cgroup is there, so it stays.
        other = QosClass.GUARANTEED if layout.qos is not QosClass.GUARANTEED else layout.qos
        cgroups.cgroup.child(str(kubelet_pod_cgroup(uid(1), layout.driver, other)))
    before = reconciler.snapshot

    spy = WriteSpy(monkeypatch, datapath)
    assert reconciler.remove_vanished() == []

    assert spy.calls == []
    assert reconciler.snapshot is before, "nothing changed, nothing published"
    monkeypatch.undo()
    assert datapath.pods() == programmed(list(zip(specs, ids, strict=True)))


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (PermissionError(errno.EACCES, "Permission denied"), "EACCES: cannot tell"),
        (OSError(errno.EIO, "Input/output error"), "EIO: cannot tell"),
    ],
)
def test_a_cgroup_that_cannot_be_looked_at_is_not_removed(
    datapath: Datapath,
    make_reconciler: MakeReconciler,
    explicit_cgroups: Cgroups,
    monkeypatch: pytest.MonkeyPatch,
    error: OSError,
    reason: str,
) -> None:
    cgroups = explicit_cgroups
    specs = [cgroups.layout.spec(i) for i in range(2)]
    ids = cgroups.make(0, 1)
    reconciler = make_reconciler(datapath, cgroups)
    reconciler.apply(pod_set(1, *specs))
    before = reconciler.snapshot
    hidden = str(cgroups.path(1))
    real_stat = os.stat

    def stat(path: str | os.PathLike[str], *args: object, **kwargs: object) -> os.stat_result:
        if os.fspath(path) == hidden:
            raise error
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    with monkeypatch.context() as patched:
        patched.setattr(os, "stat", stat)
        assert cgroups.layout.resolver(cgroups.root).vanished(specs[1], ids[1]) is None, reason
        assert reconciler.remove_vanished() == [], reason

    assert reconciler.snapshot is before, reason
    assert datapath.pods() == programmed(list(zip(specs, ids, strict=True))), reason


def test_after_a_restart_the_first_set_removes_pods_whose_cgroup_went_away(
    datapath: Datapath, make_reconciler: MakeReconciler, explicit_cgroups: Cgroups
) -> None:
    cgroups = explicit_cgroups
    specs = [cgroups.layout.spec(i) for i in range(2)]
    ids = cgroups.make(0, 1)
    make_reconciler(datapath, cgroups).apply(pod_set(4, *specs))

    cgroups.remove(1)  # while no agent runs
    adopted = Datapath.adopt(instance=datapath.pins.root.name, pin_root=datapath.pins.root.parent)
    try:
        restarted = make_reconciler(adopted, cgroups)
        # Adopted pods are known by cgroup id only until a set names them: nothing to check.
        assert restarted.remove_vanished() == []
        assert restarted.snapshot.programmed == 2

        # The first set resolves every pod afresh: the one whose cgroup is gone leaves.
        result = restarted.apply(pod_set(4, *specs))
        assert (result.added, result.updated, result.removed) == (0, 0, 1)
        assert [u.uid for u in result.unresolved] == [uid(1)]
        assert datapath.pods() == programmed([(specs[0], ids[0])])
    finally:
        adopted.close()


def test_the_reason_stays_until_the_pod_resolves_or_leaves_the_set(
    datapath: Datapath, make_reconciler: MakeReconciler, explicit_cgroups: Cgroups
) -> None:
    cgroups = explicit_cgroups
    specs = [cgroups.layout.spec(i) for i in range(2)]
    ids = cgroups.make(0, 1)
    reconciler = make_reconciler(datapath, cgroups)
    reconciler.apply(pod_set(1, *specs))
    cgroups.remove(1)
    (removed,) = reconciler.remove_vanished()
    gone = cgroups.layout.gone(cgroups.root, 1, ids[1])

    # Neither a retry nor the same pod in a new set replaces why it is not accelerated.
    retried = reconciler.retry_unresolved()
    assert retried is not None and [u.reason for u in retried.unresolved] == [removed.reason]
    again = reconciler.apply(pod_set(2, *specs))
    assert [u.reason for u in again.unresolved] == [removed.reason]
    assert gone in removed.reason

    # A changed pod is another question: the resolver's own answer.
    moved = cgroups.layout.spec(1, cgroup="pods/elsewhere")
    changed = reconciler.apply(pod_set(3, specs[0], moved))
    assert [u.reason for u in changed.unresolved] != [removed.reason]
    assert "does not exist" in changed.unresolved[0].reason

    # Back as it was, with its cgroup back: programmed with the new cgroup's id.
    (new,) = cgroups.make(1)
    back = reconciler.apply(pod_set(4, *specs))
    assert (back.added, back.unresolved) == (1, [])
    assert datapath.pods() == programmed([(specs[0], ids[0]), (specs[1], new)])
    assert reconciler.snapshot.pods_vanished == 1


# -- the reconciler with a fake resolver ---------------------------------------------------------


def test_a_resolver_that_fails_to_answer_removes_nothing(
    datapath: Datapath,
    reconciler: Reconciler,
    resolver: FakeResolver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    specs = [pod_spec(0), pod_spec(1)]
    reconciler.apply(pod_set(1, *specs))
    resolver.failing[uid(1)] = RuntimeError("resolver bug")
    before = reconciler.snapshot

    assert reconciler.remove_vanished() == []

    assert reconciler.snapshot is before
    assert datapath.pods() == expected_pods(resolver, *specs)
    (logged,) = [r for r in caplog.records if r.__dict__.get("event") == "resolver_error"]
    assert logged.__dict__["uid"] == uid(1)


def test_the_removal_is_all_or_nothing(
    datapath: Datapath,
    reconciler: Reconciler,
    resolver: FakeResolver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    specs = [pod_spec(i) for i in range(4)]
    reconciler.apply(pod_set(1, *specs))
    maps_before, ips_before = datapath.read_pods(), pod_ips_map(datapath)
    cgroups = dict(resolver.cgroups)
    del resolver.cgroups[uid(1)], resolver.cgroups[uid(2)]  # both vanished
    real_delete = datapath.delete_pod
    deleted: list[int] = []

    def delete_then_fail(cgroup: int, **kwargs: object) -> bool:
        if deleted:  # the second pod's removal fails, after the first one's
            raise libbpf.BpfError("injected", errno=errno.EIO, func="bpf_map_delete_elem")
        deleted.append(cgroup)
        return real_delete(cgroup, **kwargs)  # type: ignore[arg-type]

    with monkeypatch.context() as patched:
        patched.setattr(datapath, "delete_pod", delete_then_fail)
        with pytest.raises(ApplyFailedError) as raised:
            reconciler.remove_vanished()

    assert deleted == [cgroups[uid(1)]], "the first removal was written, then undone"
    assert raised.value.rolled_back and raised.value.reason == "datapath_error"
    assert "removing 2 pods whose cgroup is gone failed" in raised.value.message
    assert datapath.read_pods() == maps_before
    assert pod_ips_map(datapath) == ips_before
    snapshot = reconciler.snapshot
    assert (snapshot.unresolved, snapshot.pods_vanished) == ((), 0)
    assert set(snapshot.entries) == {uid(i) for i in range(4)}
    assert snapshot.apply_errors == {"datapath_error": 1}

    # Nothing was lost: the next check removes both.
    assert sorted(u.uid for u in reconciler.remove_vanished()) == [uid(1), uid(2)]
    assert datapath.pods() == expected_pods(resolver, specs[0], specs[3])
    assert reconciler.snapshot.pods_vanished == 2


# -- the agent's background task -----------------------------------------------------------------


async def test_the_background_task_removes_pods_whose_cgroup_is_gone(
    make_client: MakeClient,
    datapath: Datapath,
    make_reconciler: MakeReconciler,
    explicit_cgroups: Cgroups,
) -> None:
    cgroups = explicit_cgroups
    specs = [cgroups.layout.spec(i) for i in range(2)]
    ids = cgroups.make(0, 1)
    client = await make_client(make_reconciler(datapath, cgroups), retry_interval=0.05)
    response = await client.put(
        "/v1/pods",
        data=pod_set(1, *specs).model_dump_json(),
        headers={"Content-Type": "application/json"},
    )
    assert response.status == 200, await response.text()

    async def listed() -> PodsReply:
        return PodsReply.model_validate(await (await client.get("/v1/pods")).json())

    async def unresolved() -> PodsReply | None:
        reply = await listed()
        return reply if reply.unresolved else None

    cgroups.remove(1)
    reply = await wait_for(unresolved, what="pod 1 reported unresolved")
    assert reply is not None

    assert [p.uid for p in reply.pods] == [uid(0)]
    assert [u.uid for u in reply.unresolved] == [uid(1)]
    assert cgroups.layout.gone(cgroups.root, 1, ids[1]) in reply.unresolved[0].reason
    assert datapath.pods() == programmed([(specs[0], ids[0])])
    status = StatusReply.model_validate(await (await client.get("/v1/status")).json())
    assert status.pods_vanished == 1 and status.pods_accelerated == 1
    metrics = {
        sample.name: sample.value
        for family in text_string_to_metric_families(await (await client.get("/metrics")).text())
        for sample in family.samples
    }
    assert metrics["meshaccel_agent_pods_vanished_total"] == 1

    # The cgroup is made again: the same task's retry programs the pod with its new id.
    (new,) = cgroups.make(1)

    async def programmed_again() -> PodsReply | None:
        reply = await listed()
        return None if reply.unresolved else reply

    reply = await wait_for(programmed_again, what="pod 1 programmed again")
    assert reply is not None
    assert [(p.uid, p.cgroup_id) for p in reply.pods] == [(uid(0), ids[0]), (uid(1), new)]
    assert datapath.pods() == programmed([(specs[0], ids[0]), (specs[1], new)])
