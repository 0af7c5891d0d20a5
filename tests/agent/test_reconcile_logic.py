"""The reconciler's logic over in-memory maps (``memory_maps.py``): no kernel, no root.

Generations and epochs, capacity, a failing write at every step of an apply rolled back, an
undo that fails too, an interrupted apply, entries of no pod, restarts, vanished pods. The
kernel's maps are the proof (``test_reconcile.py``, ``test_vanished.py``); these are the fast
feedback, and reach failures the kernel does not give on demand. Every assertion on the maps
reads them back (``read_pods()``, the entries), not the reconciler's bookkeeping.
"""

from __future__ import annotations

import logging
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshaccel.agent.layout import TrafficDirection
from meshaccel.agent.pods import ProgrammedPods
from meshaccel.agent.reconcile import (
    ApplyFailedError,
    ApplyRefusedError,
    CapacityError,
    GenerationConflictError,
    Reconciler,
    StaleEpochError,
    StaleGenerationError,
    UnresolvedPodError,
    accelerated_pod,
)
from meshaccel.contract.api import PodSet, PodSpec
from meshaccel.contract.modes import MeshModeName
from meshaccel.contract.settings import Capacities
from tests.agent.conftest import (
    MEMORY_CGROUPS,
    FakeResolver,
    MemoryReconciler,
    MemoryReconcilerFactory,
    expected_pods,
    options,
    pod_ip,
    pod_set,
    pod_spec,
    uid,
)
from tests.agent.memory_maps import MemoryPodMaps


class Killed(BaseException):
    """The apply thread ended by something that is not an error (as KeyboardInterrupt)."""


def programmed(maps: MemoryPodMaps, resolver: FakeResolver, *specs: PodSpec) -> None:
    """The maps hold exactly ``specs``, and nothing of any other pod."""
    assert maps.read_pods() == ProgrammedPods(expected_pods(resolver, *specs), orphans={})


def addresses(maps: MemoryPodMaps) -> dict[IPv4Address, int]:
    return dict(maps.entries["pod_ips"])


def in_step(reconciler: MemoryReconciler, maps: MemoryPodMaps) -> None:
    """What the reconciler reports of the maps is what they hold."""
    snapshot = reconciler.snapshot
    assert dict(snapshot.map_entries) == maps.usage()
    assert snapshot.programmed == len(maps.entries["pods"])


def written_since(maps: MemoryPodMaps, since: int) -> tuple[set[int], set[IPv4Address]]:
    """The pods (cgroup ids) and the addresses whose entries were written since write ``since``."""
    cgroups, ips = set(), set()
    for _, name, key in maps.log[since:]:
        if name == "pod_ips":
            ips.add(key)
        else:
            cgroups.add(key if name == "pods" else key[0])
    return cgroups, ips


# -- applying sets -------------------------------------------------------------------------------


def test_apply_from_empty_programs_exactly_the_set(
    memory_maps: MemoryPodMaps, memory_reconciler: MemoryReconciler, memory_resolver: FakeResolver
) -> None:
    specs = [
        pod_spec(0),
        pod_spec(1, options=options(excluded_outbound_ports=[9090, 5432])),
        pod_spec(
            2,
            mode=MeshModeName.LINKERD,
            options=options(
                excluded_inbound_ports=[8443],
                excluded_outbound_cidrs=["10.0.0.0/8"],
                included_outbound_cidrs=["10.0.0.0/8", "172.16.0.0/12"],
            ),
        ),
    ]
    result = memory_reconciler.apply(pod_set(1, *specs))

    assert (result.added, result.updated, result.removed) == (3, 0, 0)
    assert result.applied_generation == 1 and result.unresolved == []
    programmed(memory_maps, memory_resolver, *specs)
    assert addresses(memory_maps) == {s.ip: MEMORY_CGROUPS[s.uid] for s in specs}
    assert set(memory_reconciler.snapshot.entries) == {uid(0), uid(1), uid(2)}
    in_step(memory_reconciler, memory_maps)


def test_a_change_writes_only_the_pods_that_changed(
    memory_maps: MemoryPodMaps, memory_reconciler: MemoryReconciler, memory_resolver: FakeResolver
) -> None:
    first = [pod_spec(i) for i in range(4)]
    memory_reconciler.apply(pod_set(1, *first))
    memory_resolver.calls.clear()
    since = memory_maps.writes

    changed = pod_spec(1, options=options(excluded_outbound_ports=[9090]))
    moved = pod_spec(2, ip=IPv4Address("198.18.1.200"))
    second = [first[0], changed, moved, pod_spec(5)]  # pod 3 leaves, pod 5 arrives
    result = memory_reconciler.apply(pod_set(2, *second))

    assert (result.added, result.updated, result.removed) == (1, 2, 1)
    assert sorted(memory_resolver.calls) == [uid(1), uid(2), uid(5)]
    cgroups, ips = written_since(memory_maps, since)
    assert cgroups == {MEMORY_CGROUPS[uid(i)] for i in (1, 2, 3, 5)}
    assert ips == {pod_ip(2), moved.ip, pod_ip(3), pod_ip(5)}
    programmed(memory_maps, memory_resolver, *second)
    in_step(memory_reconciler, memory_maps)


def test_the_same_set_at_the_same_generation_writes_nothing(
    memory_maps: MemoryPodMaps, memory_reconciler: MemoryReconciler, memory_resolver: FakeResolver
) -> None:
    memory_reconciler.apply(pod_set(5, pod_spec(0), pod_spec(1)))
    memory_resolver.calls.clear()
    writes = memory_maps.writes

    # The same set in another order, with defaults spelled out, is the same set.
    again = pod_set(5, pod_spec(1), pod_spec(0, mode="istio", options=options()))
    result = memory_reconciler.apply(again)

    assert (result.added, result.updated, result.removed, result.applied_generation) == (0, 0, 0, 5)
    assert (memory_resolver.calls, memory_maps.writes) == ([], writes)


@pytest.mark.parametrize(
    ("generation", "pods", "error", "reason"),
    [
        (4, [0, 1], StaleGenerationError, "a lower generation is stale"),
        (0, [], StaleGenerationError, "generation 0 after 5 is stale, even when empty"),
        (5, [0], GenerationConflictError, "the applied generation with another set"),
    ],
)
def test_refused_generations_write_nothing(
    memory_maps: MemoryPodMaps,
    memory_reconciler: MemoryReconciler,
    memory_resolver: FakeResolver,
    generation: int,
    pods: list[int],
    error: type[ApplyRefusedError],
    reason: str,
) -> None:
    memory_reconciler.apply(pod_set(5, pod_spec(0), pod_spec(1)))
    writes = memory_maps.writes

    with pytest.raises(error):
        memory_reconciler.apply(pod_set(generation, *(pod_spec(i) for i in pods)))

    assert memory_maps.writes == writes, reason
    programmed(memory_maps, memory_resolver, pod_spec(0), pod_spec(1))
    assert memory_reconciler.applied_generation == 5, reason
    assert memory_reconciler.snapshot.apply_errors == {error.reason: 1}, reason


@pytest.mark.parametrize(
    ("epoch", "generation", "pods", "outcome", "reason"),
    [
        (1, 9, [2], StaleEpochError, "a lower epoch, whatever its generation"),
        (0, 9, [2], StaleEpochError, "an operator that predates epochs (epoch 0), after one"),
        (2, 4, [0, 1], StaleGenerationError, "the applied epoch: a lower generation"),
        (2, 5, [2], GenerationConflictError, "the applied epoch and generation, another set"),
        (2, 5, [0, 1], (2, 5), "the applied epoch and generation, the same set: a no-op"),
        (2, 6, [2], (2, 6), "the applied epoch, a higher generation"),
        (3, 1, [2], (3, 1), "a higher epoch with a lower generation: a new term counts afresh"),
        (3, 1, [0, 1], (3, 1), "a higher epoch, the same set: taken, nothing written"),
    ],
)
def test_sets_are_ordered_by_epoch_then_generation(
    memory_maps: MemoryPodMaps,
    memory_reconciler: MemoryReconciler,
    memory_resolver: FakeResolver,
    epoch: int,
    generation: int,
    pods: list[int],
    outcome: type[ApplyRefusedError] | tuple[int, int],
    reason: str,
) -> None:
    applied = [pod_spec(0), pod_spec(1)]
    memory_reconciler.apply(PodSet(epoch=2, generation=5, pods=applied))
    offered = PodSet(epoch=epoch, generation=generation, pods=[pod_spec(i) for i in pods])

    if isinstance(outcome, tuple):
        result = memory_reconciler.apply(offered)
        assert (result.applied_epoch, result.applied_generation) == outcome, reason
        programmed(memory_maps, memory_resolver, *offered.pods)
        snapshot = memory_reconciler.snapshot
        assert (snapshot.applied_epoch, snapshot.applied_generation) == outcome, reason
        return
    writes = memory_maps.writes
    with pytest.raises(outcome) as raised:
        memory_reconciler.apply(offered)
    assert memory_maps.writes == writes, reason
    snapshot = memory_reconciler.snapshot
    assert (snapshot.applied_epoch, snapshot.applied_generation) == (2, 5), reason
    assert snapshot.apply_errors == {outcome.reason: 1}, reason
    if isinstance(raised.value, StaleEpochError):
        assert raised.value.applied_generation is None, "nothing to retry: no generation"
        assert (raised.value.requested, raised.value.applied) == (epoch, 2), reason


def test_a_fresh_reconciler_takes_any_epoch(memory_reconciler: MemoryReconciler) -> None:
    result = memory_reconciler.apply(PodSet(epoch=7, generation=3, pods=[pod_spec(0)]))
    assert (result.applied_epoch, result.applied_generation) == (7, 3)
    assert memory_reconciler.retry_unresolved() is None  # nothing unresolved; the epoch stays
    assert memory_reconciler.snapshot.applied_epoch == 7


# -- capacity ------------------------------------------------------------------------------------


def test_a_set_larger_than_max_pods_is_refused_before_anything(
    memory_maps: MemoryPodMaps,
    memory_reconciler_factory: MemoryReconcilerFactory,
    memory_resolver: FakeResolver,
) -> None:
    reconciler = memory_reconciler_factory(memory_maps, max_pods=2)
    reconciler.apply(pod_set(1, pod_spec(0)))
    memory_resolver.calls.clear()
    writes = memory_maps.writes

    with pytest.raises(CapacityError, match="3 pods; this agent holds at most 2"):
        reconciler.apply(pod_set(2, pod_spec(0), pod_spec(1), pod_spec(2)))

    assert (memory_resolver.calls, memory_maps.writes) == ([], writes)
    programmed(memory_maps, memory_resolver, pod_spec(0))


def test_max_pods_is_capped_by_the_pods_map(
    memory_reconciler_factory: MemoryReconcilerFactory,
) -> None:
    assert memory_reconciler_factory(capacities=Capacities(pods=4), max_pods=1000).max_pods == 4


def test_a_set_needing_more_option_entries_than_the_maps_hold_is_refused(
    memory_reconciler_factory: MemoryReconcilerFactory, memory_resolver: FakeResolver
) -> None:
    # An Istio pod needs 13 pod_ports entries (its mesh's own ports): two need 26.
    reconciler = memory_reconciler_factory(capacities=Capacities(pod_ports=20))
    maps = reconciler.datapath
    reconciler.apply(pod_set(1, pod_spec(0)))
    writes = maps.writes

    with pytest.raises(CapacityError, match="pod_ports needs 26, holds 20"):
        reconciler.apply(pod_set(2, pod_spec(0), pod_spec(1)))

    assert maps.writes == writes
    programmed(maps, memory_resolver, pod_spec(0))
    assert reconciler.snapshot.apply_errors == {"capacity": 1}


def test_a_set_refused_for_capacity_still_removes_the_pods_it_no_longer_names(
    memory_reconciler_factory: MemoryReconcilerFactory, memory_resolver: FakeResolver
) -> None:
    reconciler = memory_reconciler_factory(capacities=Capacities(pod_ports=30))
    maps = reconciler.datapath
    reconciler.apply(pod_set(1, pod_spec(0), pod_spec(1)))
    hog = pod_spec(2, options=options(excluded_outbound_ports=list(range(20000, 20010))))

    with pytest.raises(CapacityError) as refused:
        reconciler.apply(pod_set(2, pod_spec(1), hog))  # pod 0 deleted, a hog came

    programmed(maps, memory_resolver, pod_spec(1))
    assert "the 1 pod(s) of the applied set it no longer names were removed" in str(refused.value)
    assert set(reconciler.snapshot.entries) == {uid(1)}
    assert reconciler.applied_generation == 1
    in_step(reconciler, maps)
    result = reconciler.apply(pod_set(2, pod_spec(1), pod_spec(3)))
    assert (result.added, result.removed) == (1, 0)
    programmed(maps, memory_resolver, pod_spec(1), pod_spec(3))


def test_a_map_filling_up_mid_apply_rolls_everything_back(
    memory_reconciler_factory: MemoryReconcilerFactory, memory_resolver: FakeResolver
) -> None:
    # Room for exactly two Istio pods with one extra port each (2 x 14 pod_ports entries).
    reconciler = memory_reconciler_factory(capacities=Capacities(pod_ports=28))
    maps = reconciler.datapath
    a = pod_spec(0, options=options(excluded_outbound_ports=[1000]))
    b = pod_spec(1, options=options(excluded_outbound_ports=[1001]))
    reconciler.apply(pod_set(1, a, b))
    before = maps.dump()

    # The final set fits, but a changed port is written before the old one goes.
    b2 = pod_spec(1, ip=IPv4Address("198.18.1.201"), options=b.options)
    a2 = pod_spec(0, options=options(excluded_outbound_ports=[2000]))
    with pytest.raises(ApplyFailedError, match="map pod_ports is full") as raised:
        reconciler.apply(pod_set(2, b2, a2))

    assert raised.value.rolled_back and raised.value.reason == "map_full"
    assert maps.dump() == before
    assert reconciler.applied_generation == 1
    assert reconciler.snapshot.apply_errors == {"map_full": 1}
    result = reconciler.apply(pod_set(3, b2))
    assert (result.added, result.updated, result.removed) == (0, 1, 1)
    programmed(maps, memory_resolver, b2)
    assert addresses(maps) == {b2.ip: MEMORY_CGROUPS[b2.uid]}


# -- a failing write at every step ---------------------------------------------------------------

#: The applied set, and one that removes, updates (options, an address swap) and adds.
BEFORE = [
    pod_spec(0),
    pod_spec(1, options=options(excluded_outbound_ports=[8080])),
    pod_spec(2, options=options(excluded_outbound_cidrs=["10.0.0.0/8"])),
    pod_spec(3, options=options(included_outbound_cidrs=["10.1.0.0/16"])),
]
AFTER = [
    pod_spec(0),
    pod_spec(1, ip=pod_ip(2), options=options(excluded_inbound_ports=[9100])),
    pod_spec(2, ip=pod_ip(1), options=options(excluded_outbound_cidrs=["172.16.0.0/12"])),
    pod_spec(4, options=options(sk_msg_to_app=True, included_outbound_cidrs=[])),
    pod_spec(5, mode="kuma"),
]


def writes_of_the_change(make: MemoryReconcilerFactory) -> int:
    reconciler = make()
    reconciler.apply(pod_set(1, *BEFORE))
    start = reconciler.datapath.writes
    reconciler.apply(pod_set(2, *AFTER))
    return reconciler.datapath.writes - start


def test_a_failing_write_at_any_step_is_rolled_back(
    memory_reconciler_factory: MemoryReconcilerFactory, memory_resolver: FakeResolver
) -> None:
    total = writes_of_the_change(memory_reconciler_factory)
    assert total > 40  # every kind of write is in there: removals, updates, an address swap

    for nth in range(1, total + 1):
        step = f"write {nth} of {total}"
        reconciler = memory_reconciler_factory()
        maps = reconciler.datapath
        reconciler.apply(pod_set(1, *BEFORE))
        before, entries = maps.dump(), dict(reconciler.snapshot.entries)
        maps.fail(nth)

        with pytest.raises(ApplyFailedError) as raised:
            reconciler.apply(pod_set(2, *AFTER))

        failed = raised.value
        assert failed.rolled_back and failed.reason == "datapath_error", step
        assert "injected write failure" in failed.message, step
        assert failed.applied_generation == 1, step
        assert maps.dump() == before, step
        assert dict(reconciler.snapshot.entries) == entries, step
        assert reconciler.snapshot.apply_errors == {"datapath_error": 1}, step
        in_step(reconciler, maps)
        # Nothing is left of the failed apply: the same set goes through next.
        result = reconciler.apply(pod_set(2, *AFTER))
        assert (result.added, result.updated, result.removed) == (2, 2, 1), step
        programmed(maps, memory_resolver, *AFTER)


def test_when_undoing_fails_too_the_maps_are_read_again_before_the_next_apply(
    memory_reconciler_factory: MemoryReconcilerFactory,
    memory_resolver: FakeResolver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    total = writes_of_the_change(memory_reconciler_factory)
    not_rolled_back = 0
    for nth in range(1, total + 1):
        step = f"write {nth} of {total}, and every one after"
        reconciler = memory_reconciler_factory()
        maps = reconciler.datapath
        reconciler.apply(pod_set(1, *BEFORE))
        maps.fail(nth, onward=True)

        with pytest.raises(ApplyFailedError) as raised:
            reconciler.apply(pod_set(2, *AFTER))

        if not raised.value.rolled_back:
            not_rolled_back += 1
            assert raised.value.reason == "rollback_failed", step
            assert "the maps are read again before the next apply" in raised.value.message, step
        maps.heal()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="meshaccel.agent.reconcile"):
            result = reconciler.apply(pod_set(2, *AFTER))
        resynced = [r for r in caplog.records if r.__dict__.get("event") == "maps_resynced"]
        assert len(resynced) == (0 if raised.value.rolled_back else 1), step
        assert result.applied_generation == 2, step
        # Whatever the failed undo left (entries of no pod included) is gone.
        programmed(maps, memory_resolver, *AFTER)
        in_step(reconciler, maps)
    assert not_rolled_back == total - 1, "only the first write's failure leaves nothing to undo"


def test_the_applied_set_sent_again_after_a_failed_rollback_is_written_again(
    memory_reconciler_factory: MemoryReconcilerFactory, memory_resolver: FakeResolver
) -> None:
    """Not taken for a repeat that changes nothing: a pod of the failed set is in the maps."""
    reconciler = memory_reconciler_factory()
    maps = reconciler.datapath
    applied = [pod_spec(0), pod_spec(1)]
    reconciler.apply(pod_set(1, *applied))
    maps.fail(20, onward=True)  # pod 2 is written (15 entries), pod 3 fails half-way
    with pytest.raises(ApplyFailedError) as raised:
        reconciler.apply(pod_set(2, *applied, pod_spec(2), pod_spec(3)))
    assert not raised.value.rolled_back
    assert MEMORY_CGROUPS[uid(2)] in maps.read_pods().pods
    maps.heal()

    result = reconciler.apply(pod_set(1, *applied))

    assert (result.applied_generation, result.removed) == (1, 1)
    programmed(maps, memory_resolver, *applied)
    in_step(reconciler, maps)


def test_included_cidrs_left_on_a_pod_that_includes_everything_do_not_come_back(
    memory_reconciler_factory: MemoryReconcilerFactory, memory_resolver: FakeResolver
) -> None:
    """A failed undo can leave an included CIDR on a pod whose flag says "everything": unseen,
    it would take effect again the day the pod names included CIDRs of its own."""
    reconciler = memory_reconciler_factory()
    maps = reconciler.datapath
    reconciler.apply(
        pod_set(1, pod_spec(0, options=options(included_outbound_cidrs=["10.1.0.0/16"])))
    )
    maps.fail(2, onward=True)  # the flag is written, the CIDR's removal and the undo fail
    with pytest.raises(ApplyFailedError):
        reconciler.apply(pod_set(2, pod_spec(0)))
    maps.heal()

    reconciler.apply(pod_set(2, pod_spec(0)))
    programmed(maps, memory_resolver, pod_spec(0))
    narrowed = pod_spec(0, options=options(included_outbound_cidrs=["10.2.0.0/16"]))
    reconciler.apply(pod_set(3, narrowed))

    (pod,) = maps.read_pods().pods.values()
    assert pod.included_outbound_cidrs == frozenset({IPv4Network("10.2.0.0/16")})
    programmed(maps, memory_resolver, narrowed)


def test_an_apply_interrupted_by_a_base_exception_is_undone_and_raises_it(
    memory_reconciler_factory: MemoryReconcilerFactory,
    memory_resolver: FakeResolver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    reconciler = memory_reconciler_factory()
    maps = reconciler.datapath
    reconciler.apply(pod_set(1, *BEFORE))
    before = maps.dump()
    maps.fail(20, Killed())

    with pytest.raises(Killed):  # not an error reply's to make: raised as it came
        reconciler.apply(pod_set(2, *AFTER))

    assert maps.dump() == before  # every write undone all the same
    assert reconciler.snapshot.apply_errors == {}
    with caplog.at_level(logging.WARNING, logger="meshaccel.agent.reconcile"):
        reconciler.apply(pod_set(2, *AFTER))
    assert [r for r in caplog.records if r.__dict__.get("event") == "maps_resynced"]
    programmed(maps, memory_resolver, *AFTER)


def test_entries_of_no_pod_go_first_and_a_rollback_does_not_bring_them_back(
    memory_maps: MemoryPodMaps,
    memory_reconciler_factory: MemoryReconcilerFactory,
    memory_resolver: FakeResolver,
) -> None:
    # What an agent killed between writing a pod's options and its pod entry leaves behind.
    memory_maps.plant("pod_ports", (987654321, 9090, TrafficDirection.DIRECTION_OUTBOUND))
    memory_maps.plant("pod_ips", IPv4Address("198.18.1.99"), 987654321)
    reconciler = memory_reconciler_factory(memory_maps)
    assert reconciler.snapshot.programmed == 0
    start = memory_maps.writes
    memory_maps.fail(3)  # the first write after the two removals

    with pytest.raises(ApplyFailedError) as raised:
        reconciler.apply(pod_set(1, pod_spec(0)))

    assert raised.value.rolled_back
    assert [(op, name) for op, name, _ in memory_maps.log[start : start + 2]] == [
        ("delete", "pod_ports"),
        ("delete", "pod_ips"),
    ]
    assert memory_maps.read_pods() == ProgrammedPods({}, orphans={})
    reconciler.apply(pod_set(1, pod_spec(0)))
    programmed(memory_maps, memory_resolver, pod_spec(0))
    assert addresses(memory_maps) == {pod_ip(0): MEMORY_CGROUPS[uid(0)]}


def test_a_failure_after_a_removal_and_an_address_swap_undoes_them_all(
    memory_reconciler_factory: MemoryReconcilerFactory, memory_resolver: FakeResolver
) -> None:
    # Room for two excluded CIDRs: b replacing its CIDR needs a third for a moment.
    reconciler = memory_reconciler_factory(capacities=Capacities(pod_cidrs=2))
    maps = reconciler.datapath
    a = pod_spec(0, options=options(excluded_outbound_cidrs=["10.0.0.0/8"]))
    b = pod_spec(1, options=options(excluded_outbound_cidrs=["172.16.0.0/12"]))
    c = pod_spec(2)
    reconciler.apply(pod_set(1, a, b, c))
    before = maps.dump()

    a2 = pod_spec(0, ip=pod_ip(1), options=a.options)
    b2 = pod_spec(1, ip=pod_ip(0), options=options(excluded_outbound_cidrs=["192.168.0.0/16"]))
    with pytest.raises(ApplyFailedError, match="map outbound_excluded_cidrs is full") as raised:
        reconciler.apply(pod_set(2, a2, b2))

    assert raised.value.rolled_back and raised.value.map_full
    assert maps.dump() == before  # b has its address back
    b3 = pod_spec(1, ip=pod_ip(0), options=b.options)
    result = reconciler.apply(pod_set(3, a2, b3))
    assert (result.added, result.updated, result.removed) == (0, 2, 1)
    programmed(maps, memory_resolver, a2, b3)


def test_two_pods_can_swap_addresses_in_one_apply(
    memory_maps: MemoryPodMaps, memory_reconciler: MemoryReconciler, memory_resolver: FakeResolver
) -> None:
    memory_reconciler.apply(pod_set(1, pod_spec(0), pod_spec(1)))
    swapped = [pod_spec(0, ip=pod_ip(1)), pod_spec(1, ip=pod_ip(0))]

    assert memory_reconciler.apply(pod_set(2, *swapped)).updated == 2
    programmed(memory_maps, memory_resolver, *swapped)
    assert addresses(memory_maps) == {s.ip: MEMORY_CGROUPS[s.uid] for s in swapped}


# -- restarts, unresolved and vanished pods -------------------------------------------------------


def test_after_a_restart_the_maps_are_matched_by_cgroup_id(
    memory_maps: MemoryPodMaps,
    memory_reconciler_factory: MemoryReconcilerFactory,
    memory_resolver: FakeResolver,
) -> None:
    specs = [
        pod_spec(0, options=options(excluded_outbound_cidrs=["203.0.113.0/24"])),
        pod_spec(1, mode="kuma", options=options(included_outbound_cidrs=["10.1.0.0/16"])),
        pod_spec(2, options=options(excluded_inbound_ports=[15000], included_outbound_cidrs=[])),
    ]
    memory_reconciler_factory(memory_maps).apply(pod_set(7, *specs))

    second = memory_reconciler_factory(memory_maps)  # a new agent, the same maps
    assert second.snapshot.programmed == 3 and second.applied_generation is None
    writes = memory_maps.writes
    again = second.apply(pod_set(7, *specs))
    assert (again.added, again.updated, again.removed) == (0, 0, 0)
    assert memory_maps.writes == writes
    fewer = second.apply(pod_set(8, specs[0], specs[2]))
    assert (fewer.added, fewer.updated, fewer.removed) == (0, 0, 1)
    programmed(memory_maps, memory_resolver, specs[0], specs[2])


def test_unresolved_pods_are_reported_then_programmed_on_retry(
    memory_maps: MemoryPodMaps, memory_reconciler: MemoryReconciler, memory_resolver: FakeResolver
) -> None:
    late = memory_resolver.cgroups.pop(uid(2))
    specs = [pod_spec(0), pod_spec(1), pod_spec(2)]

    result = memory_reconciler.apply(pod_set(1, *specs))

    assert result.added == 2
    assert [(u.uid, u.name) for u in result.unresolved] == [(uid(2), "pod-2")]
    assert memory_reconciler.retry_unresolved() is not None  # still missing: nothing changes
    programmed(memory_maps, memory_resolver, specs[0], specs[1])
    memory_resolver.cgroups[uid(2)] = late
    retried = memory_reconciler.retry_unresolved()
    assert retried is not None and (retried.added, retried.unresolved) == (1, [])
    assert retried.applied_generation == 1
    programmed(memory_maps, memory_resolver, *specs)
    assert memory_reconciler.retry_unresolved() is None


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (RuntimeError("resolver bug"), "resolver error: RuntimeError: resolver bug"),
        (UnresolvedPodError("kubepods/pod-x not found"), "kubepods/pod-x not found"),
    ],
)
def test_resolver_failures_leave_the_pod_unresolved(
    memory_maps: MemoryPodMaps,
    memory_reconciler: MemoryReconciler,
    memory_resolver: FakeResolver,
    failure: Exception,
    reason: str,
) -> None:
    memory_resolver.failing[uid(1)] = failure
    result = memory_reconciler.apply(pod_set(1, pod_spec(0), pod_spec(1)))
    assert [(u.uid, u.reason) for u in result.unresolved] == [(uid(1), reason)]
    programmed(memory_maps, memory_resolver, pod_spec(0))


def test_pods_resolving_to_one_cgroup_are_both_unresolved(
    memory_maps: MemoryPodMaps, memory_reconciler: MemoryReconciler, memory_resolver: FakeResolver
) -> None:
    memory_resolver.cgroups[uid(1)] = memory_resolver.cgroups[uid(0)]
    result = memory_reconciler.apply(pod_set(1, pod_spec(0), pod_spec(1), pod_spec(2)))
    assert sorted(u.uid for u in result.unresolved) == [uid(0), uid(1)]
    programmed(memory_maps, memory_resolver, pod_spec(2))


def test_a_failing_write_of_a_removal_of_vanished_pods_undoes_it_all(
    memory_reconciler_factory: MemoryReconcilerFactory, memory_resolver: FakeResolver
) -> None:
    specs = [pod_spec(i) for i in range(4)]
    cgroups = dict(memory_resolver.cgroups)
    probe = memory_reconciler_factory()
    probe.apply(pod_set(1, *specs))
    del memory_resolver.cgroups[uid(1)], memory_resolver.cgroups[uid(2)]  # both vanished
    start = probe.datapath.writes
    assert len(probe.remove_vanished()) == 2
    total = probe.datapath.writes - start

    for nth in range(1, total + 1):
        step = f"write {nth} of {total}"
        memory_resolver.cgroups.update(cgroups)
        reconciler = memory_reconciler_factory()
        maps = reconciler.datapath
        reconciler.apply(pod_set(1, *specs))
        before = maps.dump()
        del memory_resolver.cgroups[uid(1)], memory_resolver.cgroups[uid(2)]
        maps.fail(nth)

        with pytest.raises(ApplyFailedError) as raised:
            reconciler.remove_vanished()

        assert raised.value.rolled_back and "removing 2 pods whose cgroup is gone" in str(
            raised.value
        ), step
        assert maps.dump() == before, step
        snapshot = reconciler.snapshot
        assert (snapshot.unresolved, snapshot.pods_vanished) == ((), 0), step
        assert set(snapshot.entries) == {uid(i) for i in range(4)}, step
        # Nothing was lost: the next check removes both.
        assert sorted(u.uid for u in reconciler.remove_vanished()) == [uid(1), uid(2)], step
        programmed(maps, memory_resolver, specs[0], specs[3])


def test_after_a_failed_rollback_no_vanished_pod_is_removed_until_the_maps_are_read(
    memory_reconciler_factory: MemoryReconcilerFactory, memory_resolver: FakeResolver
) -> None:
    reconciler = memory_reconciler_factory()
    maps = reconciler.datapath
    reconciler.apply(pod_set(1, *BEFORE))
    maps.fail(10, onward=True)
    with pytest.raises(ApplyFailedError) as raised:
        reconciler.apply(pod_set(2, *AFTER))
    assert not raised.value.rolled_back
    maps.heal()
    del memory_resolver.cgroups[uid(0)]
    writes = maps.writes

    assert reconciler.remove_vanished() == []  # what is programmed is not known
    assert maps.writes == writes
    reconciler.apply(pod_set(3, *BEFORE))  # reads the maps again
    assert [u.uid for u in reconciler.remove_vanished()] == [uid(0)]
    programmed(maps, memory_resolver, *BEFORE[1:])


# -- any sequence --------------------------------------------------------------------------------

#: A pod of a generated set: index (6 and 7 never resolve), address index, options.
pod_choices = st.tuples(
    st.integers(0, 7),
    st.integers(0, 9),
    st.lists(st.integers(1000, 1009), max_size=4, unique=True),
    st.sampled_from([None, ["10.0.0.0/8"], ["10.0.0.0/8", "192.168.0.0/16"]]),
    st.sampled_from([None, [], ["10.1.0.0/16"]]),
)
#: A write that fails (the nth from the step's start), and how.
failures = st.none() | st.tuples(st.integers(1, 60), st.sampled_from(["error", "onward", "killed"]))
#: A step: a set (how its epoch and generation relate to the last one's), a pod's cgroup
#: going away or coming back (perhaps as a new one), the background work, an agent restart.
steps = st.one_of(
    st.tuples(
        st.just("apply"),
        st.lists(pod_choices, max_size=6, unique_by=(lambda p: p[0], lambda p: p[1])),
        st.integers(0, 1),
        st.integers(-1, 2),
        failures,
    ),
    st.tuples(st.just("vanish"), st.integers(0, 5)),
    st.tuples(st.just("appear"), st.integers(0, 5), st.booleans()),
    st.tuples(st.just("remove_vanished"), failures),
    st.tuples(st.just("retry"), failures),
    st.tuples(st.just("restart")),
)


def generated_spec(
    index: int, address: int, ports: list[int], excluded: Any, included: Any
) -> PodSpec:
    return pod_spec(
        index,
        ip=pod_ip(address),
        options=options(
            excluded_outbound_ports=ports,
            excluded_outbound_cidrs=excluded or [],
            included_outbound_cidrs=included,
        ),
    )


def holds_what_it_reports(maps: MemoryPodMaps, reconciler: MemoryReconciler) -> None:
    """The maps hold exactly the programmed pods of the applied set, and nothing else."""
    entries = reconciler.snapshot.entries
    expected = {e.cgroup_id: accelerated_pod(e.spec, e.cgroup_id) for e in entries.values()}
    assert maps.read_pods() == ProgrammedPods(expected, orphans={})
    assert dict(reconciler.snapshot.map_entries) == maps.usage()


@settings(max_examples=150, deadline=None)
@given(sequence=st.lists(steps, min_size=1, max_size=10))
def test_any_sequence_of_sets_and_failures_leaves_the_maps_as_promised(
    sequence: list[tuple[Any, ...]],
) -> None:
    """After every set applied the maps hold its resolved pods and nothing else; a refusal or a
    rolled-back failure leaves the pods as they were; after a failed rollback, an interrupted
    apply or a restart, the next set that applies repairs whatever was left."""
    resolver = FakeResolver({uid(i): MEMORY_CGROUPS[uid(i)] for i in range(6)})
    maps = MemoryPodMaps(Capacities(pods=5, pod_ports=80, pod_cidrs=6))
    reconciler = Reconciler(maps, resolver, max_pods=1024)
    epoch, generation = 0, 0

    def arm(failure: tuple[int, str] | None) -> None:
        if failure is not None:
            nth, kind = failure
            maps.fail(nth, Killed() if kind == "killed" else None, onward=kind == "onward")

    for step in sequence:
        before = maps.read_pods().pods
        try:
            if step[0] == "apply":
                _, pods, epoch_step, generation_step, failure = step
                epoch, generation = epoch + epoch_step, max(0, generation + generation_step)
                specs = [generated_spec(*choice) for choice in pods]
                arm(failure)
                result = reconciler.apply(PodSet(epoch=epoch, generation=generation, pods=specs))
                unresolved = {u.uid for u in result.unresolved}
                assert set(reconciler.snapshot.entries) == {s.uid for s in specs} - unresolved
                holds_what_it_reports(maps, reconciler)
            elif step[0] == "vanish":
                resolver.cgroups.pop(uid(step[1]), None)
            elif step[0] == "appear":
                _, index, anew = step
                resolver.cgroups[uid(index)] = MEMORY_CGROUPS[uid(index)] + (100 if anew else 0)
            elif step[0] == "remove_vanished":
                arm(step[1])
                for gone in reconciler.remove_vanished():
                    assert gone.uid not in reconciler.snapshot.entries
            elif step[0] == "retry":
                arm(step[1])
                reconciler.retry_unresolved()
            else:
                reconciler.close()
                reconciler = Reconciler(maps, resolver, max_pods=1024)
                assert reconciler.snapshot.programmed == len(before)
        except (Killed, ApplyFailedError) as err:
            if not isinstance(err, Killed) and err.rolled_back:
                assert maps.read_pods().pods == before
        except CapacityError:
            assert set(maps.read_pods().pods.items()) <= set(before.items())  # removals only
        except ApplyRefusedError:
            assert maps.read_pods().pods == before
        finally:
            maps.heal()
    # A new term's set that fits is applied exactly, whatever came before.
    for index in range(4):
        resolver.cgroups.setdefault(uid(index), MEMORY_CGROUPS[uid(index)])
    final = [generated_spec(i, i, [1000], None, None) for i in range(4)]
    result = reconciler.apply(PodSet(epoch=epoch + 1, generation=1, pods=final))
    assert result.unresolved == []
    holds_what_it_reports(maps, reconciler)
