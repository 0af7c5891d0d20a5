"""The reconciler: diff, generations and epochs, capacity, rollback, restarts, unresolved pods.

Each test runs twice (the ``store`` fixture): on the kernel's maps, a real datapath attached to
the test's own cgroup (the proof; root), and on the in-memory maps (no root). Every assertion
reads the maps back (``read_pods()``, :meth:`Store.entries`), never the reconciler's own
bookkeeping. Failures only the in-memory maps give on demand are in ``test_reconcile_logic.py``.
"""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from meshaccel.agent.datapath import Datapath
from meshaccel.agent.layout import PodFlags, TrafficDirection
from meshaccel.agent.reconcile import (
    ApplyFailedError,
    ApplyRefusedError,
    CapacityError,
    GenerationConflictError,
    StaleEpochError,
    StaleGenerationError,
    UnresolvedPodError,
    same_spec,
)
from meshaccel.contract.api import PodSet, PodSpec
from meshaccel.contract.modes import MeshModeName
from meshaccel.contract.settings import Capacities
from tests.agent.conftest import (
    Store,
    in_step,
    kernel_entries,
    options,
    pod_ip,
    pod_set,
    pod_spec,
    uid,
)


def pod_ips_map(datapath: Datapath) -> dict[IPv4Address, int]:
    """The kernel's pod_ips map, read raw: address -> cgroup id (test_vanished.py reads it)."""
    return dict(kernel_entries(datapath)["pod_ips"])


# -- applying sets -------------------------------------------------------------------------------


def test_apply_from_empty_programs_exactly_the_set(store: Store) -> None:
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
    result = store.reconciler.apply(pod_set(1, *specs))

    assert (result.added, result.updated, result.removed) == (3, 0, 0)
    assert result.applied_generation == 1 and result.unresolved == []
    assert store.maps.read_pods() == store.programmed(*specs)
    assert store.addresses() == {s.ip: store.resolver.cgroups[s.uid] for s in specs}
    assert store.reconciler.applied_generation == 1
    assert set(store.reconciler.snapshot.entries) == {uid(0), uid(1), uid(2)}
    in_step(store.reconciler, store.entries())


def test_a_change_writes_only_the_pods_that_changed(store: Store) -> None:
    first = [pod_spec(i) for i in range(4)]
    store.reconciler.apply(pod_set(1, *first))
    store.resolver.calls.clear()
    mark = store.mark()

    changed = pod_spec(1, options=options(excluded_outbound_ports=[9090]))
    moved = pod_spec(2, ip=IPv4Address("198.18.1.200"))
    second = [first[0], changed, moved, pod_spec(5)]  # pod 3 leaves, pod 5 arrives
    result = store.reconciler.apply(pod_set(2, *second))

    assert (result.added, result.updated, result.removed) == (1, 2, 1)
    # Unchanged pods are neither resolved nor encoded again.
    assert sorted(store.resolver.calls) == [uid(1), uid(2), uid(5)]
    written = store.written_since(mark)
    # A pods key is the pod's cgroup id; an option key starts with it.
    owners = {
        k if name == "pods" else k[0]
        for name, keys in written.items()
        for k in keys
        if name != "pod_ips"
    }
    assert owners == {store.cgroup(i) for i in (1, 2, 3, 5)}
    assert written["pod_ips"] == {pod_ip(2), moved.ip, pod_ip(3), pod_ip(5)}
    assert store.maps.read_pods() == store.programmed(*second)
    assert store.addresses() == {s.ip: store.resolver.cgroups[s.uid] for s in second}
    in_step(store.reconciler, store.entries())


def test_the_same_set_at_the_same_generation_writes_nothing(store: Store) -> None:
    specs = [pod_spec(0), pod_spec(1)]
    store.reconciler.apply(pod_set(5, *specs))
    store.resolver.calls.clear()
    mark = store.mark()

    # The same set in another order, with defaults spelled out, is the same set.
    again = pod_set(5, pod_spec(1), pod_spec(0, mode="istio", options=options()))
    result = store.reconciler.apply(again)

    assert (result.added, result.updated, result.removed, result.applied_generation) == (0, 0, 0, 5)
    assert (store.resolver.calls, store.written_since(mark)) == ([], {})
    assert store.maps.read_pods() == store.programmed(*specs)


@pytest.mark.parametrize(
    ("generation", "pods", "error", "reason"),
    [
        (4, [0, 1], StaleGenerationError, "a lower generation is stale"),
        (0, [], StaleGenerationError, "generation 0 after 5 is stale, even when empty"),
        (5, [0], GenerationConflictError, "the applied generation with another set"),
    ],
)
def test_refused_generations_write_nothing(
    store: Store,
    generation: int,
    pods: list[int],
    error: type[ApplyRefusedError],
    reason: str,
) -> None:
    specs = [pod_spec(0), pod_spec(1)]
    store.reconciler.apply(pod_set(5, *specs))
    mark = store.mark()

    with pytest.raises(error) as raised:
        store.reconciler.apply(pod_set(generation, *(pod_spec(i) for i in pods)))

    assert "5" in str(raised.value), reason
    assert store.written_since(mark) == {}, reason
    assert store.maps.read_pods() == store.programmed(*specs), reason
    assert store.reconciler.applied_generation == 5, reason
    snapshot = store.reconciler.snapshot
    assert snapshot.apply_errors_total == 1, reason
    assert snapshot.apply_errors == {error.reason: 1}, reason
    if isinstance(raised.value, StaleGenerationError):
        assert (raised.value.requested, raised.value.applied) == (generation, 5)


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
    store: Store,
    epoch: int,
    generation: int,
    pods: list[int],
    outcome: type[ApplyRefusedError] | tuple[int, int],
    reason: str,
) -> None:
    reconciler = store.reconciler
    applied = [pod_spec(0), pod_spec(1)]
    reconciler.apply(PodSet(epoch=2, generation=5, pods=applied))
    offered = PodSet(epoch=epoch, generation=generation, pods=[pod_spec(i) for i in pods])

    if isinstance(outcome, tuple):
        result = reconciler.apply(offered)
        assert (result.applied_epoch, result.applied_generation) == outcome, reason
        assert store.maps.read_pods() == store.programmed(*offered.pods), reason
        assert (reconciler.applied_epoch, reconciler.applied_generation) == outcome, reason
        snapshot = reconciler.snapshot
        assert (snapshot.applied_epoch, snapshot.applied_generation) == outcome, reason
        return
    mark = store.mark()
    with pytest.raises(outcome) as raised:
        reconciler.apply(offered)
    assert store.written_since(mark) == {}, reason
    assert store.maps.read_pods() == store.programmed(*applied), reason
    assert (reconciler.applied_epoch, reconciler.applied_generation) == (2, 5), reason
    assert isinstance(raised.value, ApplyRefusedError)
    assert raised.value.reason == outcome.reason, reason
    assert reconciler.snapshot.apply_errors == {outcome.reason: 1}, reason
    if isinstance(raised.value, StaleEpochError):
        assert raised.value.applied_generation is None, "nothing to retry: no generation"
        assert (raised.value.requested, raised.value.applied) == (epoch, 2), reason


def test_a_fresh_agent_takes_any_epoch(store: Store) -> None:
    """The epoch lives in memory: after a restart the first set is taken (the leader sees the
    new boot id and sends its own at once)."""
    result = store.reconciler.apply(PodSet(epoch=7, generation=3, pods=[pod_spec(0)]))
    assert (result.applied_epoch, result.applied_generation) == (7, 3)
    assert store.reconciler.retry_unresolved() is None  # nothing unresolved; the epoch stays
    assert store.reconciler.snapshot.applied_epoch == 7


def test_two_pods_can_swap_addresses_in_one_apply(store: Store) -> None:
    store.reconciler.apply(pod_set(1, pod_spec(0), pod_spec(1)))
    swapped = [pod_spec(0, ip=pod_ip(1)), pod_spec(1, ip=pod_ip(0))]

    assert store.reconciler.apply(pod_set(2, *swapped)).updated == 2
    assert store.maps.read_pods() == store.programmed(*swapped)
    assert store.addresses() == {s.ip: store.resolver.cgroups[s.uid] for s in swapped}


def test_included_cidrs_none_and_empty_are_different_pods(store: Store) -> None:
    everything = pod_spec(0)
    nothing = pod_spec(0, options=options(included_outbound_cidrs=[]))
    store.reconciler.apply(pod_set(1, everything))

    result = store.reconciler.apply(pod_set(2, nothing))

    assert result.updated == 1
    assert store.maps.read_pods().pods[store.cgroup(0)].included_outbound_cidrs == frozenset()
    assert store.reconciler.apply(pod_set(3, everything)).updated == 1
    assert store.maps.read_pods().pods[store.cgroup(0)].included_outbound_cidrs is None


def test_sk_msg_to_app_is_a_pod_flag_written_and_read_back(store: Store) -> None:
    cgroup_id = store.cgroup(0)
    sidecar_only, to_app = pod_spec(0), pod_spec(0, options=options(sk_msg_to_app=True))
    store.reconciler.apply(pod_set(1, sidecar_only))

    result = store.reconciler.apply(pod_set(2, to_app))

    assert result.updated == 1, "the flag alone is a change"
    assert store.maps.read_pods() == store.programmed(to_app)
    assert store.maps.read_pods().pods[cgroup_id].sk_msg_to_app
    _, _, _, _, raw_flags, *_ = store.entries()["pods"][cgroup_id]  # the pods entry's flags
    flags = PodFlags(raw_flags)
    assert flags == PodFlags.POD_SK_MSG_TO_APP | PodFlags.POD_OUTBOUND_INCLUDE_ALL, flags
    assert store.reconciler.apply(pod_set(3, sidecar_only)).updated == 1
    assert not store.maps.read_pods().pods[cgroup_id].sk_msg_to_app


# -- capacity ------------------------------------------------------------------------------------


def test_a_set_larger_than_max_pods_is_refused_before_anything(store: Store) -> None:
    reconciler = store.make(max_pods=2)
    reconciler.apply(pod_set(1, pod_spec(0)))
    store.resolver.calls.clear()
    mark = store.mark()

    with pytest.raises(CapacityError, match="3 pods; this agent holds at most 2"):
        reconciler.apply(pod_set(2, pod_spec(0), pod_spec(1), pod_spec(2)))

    # Refused before resolving, let alone writing.
    assert (store.resolver.calls, store.written_since(mark)) == ([], {})
    assert store.maps.read_pods() == store.programmed(pod_spec(0))
    assert reconciler.applied_generation == 1


def test_max_pods_is_capped_by_the_pods_map(store: Store) -> None:
    assert store.make(Capacities(pods=4), max_pods=1000).max_pods == 4


def test_a_set_needing_more_option_entries_than_the_maps_hold_is_refused(store: Store) -> None:
    # An Istio pod needs 13 pod_ports entries (its mesh's own ports): two need 26.
    reconciler = store.make(Capacities(pod_ports=20))
    maps = reconciler.datapath
    reconciler.apply(pod_set(1, pod_spec(0)))
    mark = store.mark(maps)

    with pytest.raises(CapacityError, match="pod_ports needs 26, holds 20"):
        reconciler.apply(pod_set(2, pod_spec(0), pod_spec(1)))

    assert store.written_since(mark) == {}
    assert maps.read_pods() == store.programmed(pod_spec(0))
    assert reconciler.snapshot.apply_errors == {"capacity": 1}


def test_a_set_refused_for_capacity_still_removes_the_pods_it_no_longer_names(
    store: Store,
) -> None:
    """Issue 12, item 7: a refused set left every pod of the applied set programmed, those it
    no longer named too (a deleted pod's address kept leading to it). The refusal now writes
    none of the new set's pods but removes the ones it dropped; the generation stays."""
    reconciler = store.make(Capacities(pod_ports=30))  # an Istio pod takes 13
    maps = reconciler.datapath
    reconciler.apply(pod_set(1, pod_spec(0), pod_spec(1)))
    hog = pod_spec(2, options=options(excluded_outbound_ports=list(range(20000, 20010))))

    with pytest.raises(CapacityError) as refused:
        reconciler.apply(pod_set(2, pod_spec(1), hog))  # pod 0 deleted, a hog came

    assert maps.read_pods() == store.programmed(pod_spec(1)), "pod 0 went all the same"
    assert "the 1 pod(s) of the applied set it no longer names were removed" in str(refused.value)
    assert set(reconciler.snapshot.entries) == {uid(1)}
    assert reconciler.applied_generation == 1
    assert reconciler.snapshot.map_entries["pod_ports"] == 13
    assert reconciler.snapshot.apply_errors == {"capacity": 1}
    in_step(reconciler, store.entries(maps))
    # The next set that fits is applied as ever.
    result = reconciler.apply(pod_set(2, pod_spec(1), pod_spec(3)))
    assert (result.added, result.removed) == (1, 0)
    assert maps.read_pods() == store.programmed(pod_spec(1), pod_spec(3))


def test_a_map_filling_up_mid_apply_rolls_everything_back(store: Store) -> None:
    # Room for exactly two Istio pods with one extra port each (2 x 14 pod_ports entries).
    reconciler = store.make(Capacities(pod_ports=28))
    maps = reconciler.datapath
    a = pod_spec(0, options=options(excluded_outbound_ports=[1000]))
    b = pod_spec(1, options=options(excluded_outbound_ports=[1001]))
    reconciler.apply(pod_set(1, a, b))
    before = store.entries(maps)

    # The final set fits (28 entries), but a changed port is written before the old one goes:
    # b's new address is written first, then a's new port finds the map full.
    b2 = pod_spec(1, ip=IPv4Address("198.18.1.201"), options=b.options)
    a2 = pod_spec(0, options=options(excluded_outbound_ports=[2000]))
    with pytest.raises(ApplyFailedError, match="map pod_ports is full") as raised:
        reconciler.apply(pod_set(2, b2, a2))

    assert raised.value.rolled_back and raised.value.map_full
    assert raised.value.reason == "map_full"
    assert store.entries(maps) == before  # every entry, b's address included
    assert maps.read_pods() == store.programmed(a, b)
    assert reconciler.applied_generation == 1
    assert reconciler.snapshot.apply_errors == {"map_full": 1}

    # The reconciler's view stayed in step with the maps: a set that fits applies.
    result = reconciler.apply(pod_set(3, b2))
    assert (result.added, result.updated, result.removed) == (0, 1, 1)
    assert maps.read_pods() == store.programmed(b2)
    assert store.addresses(maps) == {b2.ip: store.resolver.cgroups[b2.uid]}


def test_a_failure_after_a_removal_and_an_address_swap_undoes_them_all(store: Store) -> None:
    # Room for two excluded CIDRs: b replacing its CIDR needs a third for a moment.
    reconciler = store.make(Capacities(pod_cidrs=2))
    maps = reconciler.datapath
    a = pod_spec(0, options=options(excluded_outbound_cidrs=["10.0.0.0/8"]))
    b = pod_spec(1, options=options(excluded_outbound_cidrs=["172.16.0.0/12"]))
    c = pod_spec(2)
    reconciler.apply(pod_set(1, a, b, c))
    before = store.entries(maps)

    # c leaves, a takes b's address, then b (moving to a's) finds the CIDR map full.
    a2 = pod_spec(0, ip=pod_ip(1), options=a.options)
    b2 = pod_spec(1, ip=pod_ip(0), options=options(excluded_outbound_cidrs=["192.168.0.0/16"]))
    with pytest.raises(ApplyFailedError, match="map outbound_excluded_cidrs is full") as raised:
        reconciler.apply(pod_set(2, a2, b2))

    assert raised.value.rolled_back and raised.value.map_full
    assert store.entries(maps) == before  # c is back, b has its address back
    assert maps.read_pods() == store.programmed(a, b, c)

    b3 = pod_spec(1, ip=pod_ip(0), options=b.options)
    result = reconciler.apply(pod_set(3, a2, b3))
    assert (result.added, result.updated, result.removed) == (0, 2, 1)
    assert maps.read_pods() == store.programmed(a2, b3)
    assert store.addresses(maps) == {s.ip: store.resolver.cgroups[s.uid] for s in (a2, b3)}


# -- restarts, entries of no pod, unresolved pods -------------------------------------------------


def test_after_a_restart_the_maps_are_matched_by_cgroup_id(store: Store) -> None:
    specs = [
        pod_spec(0, options=options(excluded_outbound_cidrs=["203.0.113.0/24"])),
        pod_spec(1, mode="kuma", options=options(included_outbound_cidrs=["10.1.0.0/16"])),
        pod_spec(2, options=options(excluded_inbound_ports=[15000], included_outbound_cidrs=[])),
    ]
    store.reconciler.apply(pod_set(7, *specs))

    # A new agent (on the kernel: one that adopts the pins) reads the maps, in one pass, as
    # the truth.
    second = store.restart(store.reconciler)
    assert second.snapshot.programmed == 3
    assert second.applied_generation is None  # no set since the restart
    mark = store.mark()

    again = second.apply(pod_set(7, *specs))
    assert (again.added, again.updated, again.removed) == (0, 0, 0)
    assert store.written_since(mark) == {}

    fewer = second.apply(pod_set(8, specs[0], specs[2]))
    assert (fewer.added, fewer.updated, fewer.removed) == (0, 0, 1)
    assert store.maps.read_pods() == store.programmed(specs[0], specs[2])


def test_entries_left_by_an_interrupted_write_are_removed(store: Store) -> None:
    # What an agent killed between writing a pod's options and its pod entry leaves behind.
    orphan_cgroup, orphan_ip = 987654321, IPv4Address("198.18.1.99")
    orphan_port = (orphan_cgroup, 9090, TrafficDirection.DIRECTION_OUTBOUND)
    store.plant("pod_ports", orphan_port)
    store.plant("pod_ips", orphan_ip, orphan_cgroup)

    reconciler = store.make()  # reads them at start
    assert reconciler.snapshot.programmed == 0
    reconciler.apply(pod_set(1, pod_spec(0)))

    assert orphan_port not in store.entries()["pod_ports"]
    assert orphan_ip not in store.addresses()
    assert store.maps.read_pods() == store.programmed(pod_spec(0))
    assert store.addresses() == {pod_ip(0): store.cgroup(0)}


def test_unresolved_pods_are_reported_then_programmed_on_retry(store: Store) -> None:
    late = store.resolver.cgroups.pop(uid(2))
    specs = [pod_spec(0), pod_spec(1), pod_spec(2)]

    result = store.reconciler.apply(pod_set(1, *specs))

    assert result.added == 2
    assert [(u.uid, u.namespace, u.name) for u in result.unresolved] == [
        (uid(2), "default", "pod-2")
    ]
    assert "no cgroup for pod uid uid-2" in result.unresolved[0].reason
    assert store.maps.read_pods() == store.programmed(specs[0], specs[1])
    assert store.reconciler.retry_unresolved() is not None  # still missing: nothing changes
    assert store.maps.read_pods() == store.programmed(specs[0], specs[1])

    store.resolver.cgroups[uid(2)] = late
    retried = store.reconciler.retry_unresolved()

    assert retried is not None and retried.added == 1 and retried.unresolved == []
    assert retried.applied_generation == 1
    assert store.maps.read_pods() == store.programmed(*specs)
    assert store.reconciler.snapshot.unresolved == ()
    assert store.reconciler.retry_unresolved() is None  # nothing left to retry


def test_an_unresolved_pod_is_programmed_by_the_next_apply(store: Store) -> None:
    late = store.resolver.cgroups.pop(uid(1))
    store.reconciler.apply(pod_set(1, pod_spec(0), pod_spec(1)))
    store.resolver.cgroups[uid(1)] = late

    result = store.reconciler.apply(pod_set(2, pod_spec(0), pod_spec(1)))

    assert (result.added, result.unresolved) == (1, [])
    assert store.maps.read_pods() == store.programmed(pod_spec(0), pod_spec(1))


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (RuntimeError("resolver bug"), "resolver error: RuntimeError: resolver bug"),
        (UnresolvedPodError("kubepods/pod-x not found"), "kubepods/pod-x not found"),
    ],
)
def test_resolver_failures_leave_the_pod_unresolved(
    store: Store, failure: Exception, reason: str
) -> None:
    store.resolver.failing[uid(1)] = failure
    result = store.reconciler.apply(pod_set(1, pod_spec(0), pod_spec(1)))

    assert [(u.uid, u.reason) for u in result.unresolved] == [(uid(1), reason)]
    assert store.maps.read_pods() == store.programmed(pod_spec(0))


def test_pods_resolving_to_one_cgroup_are_both_unresolved(store: Store) -> None:
    store.resolver.cgroups[uid(1)] = store.cgroup(0)
    result = store.reconciler.apply(pod_set(1, pod_spec(0), pod_spec(1), pod_spec(2)))

    assert sorted(u.uid for u in result.unresolved) == [uid(0), uid(1)]
    assert "as do pods with uid" in result.unresolved[0].reason
    assert store.maps.read_pods() == store.programmed(pod_spec(2))


# -- no maps -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("other", "reason"),
    [
        (pod_spec(0), "equal, separate objects"),
        (pod_spec(0, options=options(sk_msg_to_app=True)), "sk_msg into the app differs"),
        (pod_spec(0, mode="istio", options=options(), cgroup=None), "defaults spelled out"),
        (pod_spec(0, options=options(excluded_outbound_ports=[1])), "an option differs"),
        (pod_spec(0, options=options(included_outbound_cidrs=[])), "None vs empty includes"),
        (pod_spec(0, ip=pod_ip(1)), "the address differs"),
        (pod_spec(0, name="other"), "the name differs"),
        (pod_spec(0, mode="kuma"), "the mode differs"),
        (pod_spec(0, cgroup="kubepods/x"), "the cgroup differs"),
    ],
)
def test_same_spec_agrees_with_equality(other: PodSpec, reason: str) -> None:
    spec = PodSpec.model_validate_json(pod_spec(0).model_dump_json())
    assert same_spec(spec, other) == (spec == other), reason
    assert same_spec(other, spec) == (other == spec), reason
