"""The reconciler's logic over in-memory maps (``memory_maps.py``) alone: no kernel, no root.

What only those maps give on demand: a failing write at every step of an apply rolled back, an
undo that fails too, an apply interrupted by a BaseException, entries of no pod across a
rollback, a failing removal of vanished pods, and any sequence of sets and failures. The
scenarios the kernel's maps give as well run on both in ``test_reconcile.py`` (the kernel's
run is the proof). Every assertion on the maps reads them back (``read_pods()``, the entries),
not the reconciler's bookkeeping.
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
    Reconciler,
    accelerated_pod,
)
from meshaccel.contract.api import PodSet, PodSpec
from meshaccel.contract.settings import Capacities
from tests.agent.conftest import (
    MEMORY_CGROUPS,
    FakeResolver,
    MemoryReconciler,
    MemoryReconcilerFactory,
    expected_pods,
    in_step,
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
        in_step(reconciler, maps.dump())
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
        in_step(reconciler, maps.dump())
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
    in_step(reconciler, maps.dump())


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


# -- vanished pods ------------------------------------------------------------------------------


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
