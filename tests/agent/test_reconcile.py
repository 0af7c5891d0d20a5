"""The reconciler against a real datapath: diff, generations, capacity, rollback, restarts.

Every assertion on the datapath reads the kernel's maps back (``Datapath.pods()``,
``Datapath.read_pods()`` or the raw map), never the reconciler's own bookkeeping.
"""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from meshaccel.agent import libbpf
from meshaccel.agent.datapath import Datapath, ProgrammedPods
from meshaccel.agent.layout import PodFlags, PodInfo, TrafficDirection
from meshaccel.agent.pods import decode_u64, port_key, u64
from meshaccel.agent.reconcile import (
    ApplyFailedError,
    ApplyRefusedError,
    CapacityError,
    GenerationConflictError,
    Reconciler,
    StaleEpochError,
    StaleGenerationError,
    UnresolvedPodError,
    same_spec,
)
from meshaccel.contract.api import PodSet, PodSpec
from meshaccel.contract.modes import MeshModeName
from meshaccel.contract.settings import Capacities
from tests.agent.conftest import (
    DatapathFactory,
    FakeResolver,
    ReconcilerFactory,
    expected_pods,
    options,
    pod_ip,
    pod_set,
    pod_spec,
    uid,
)

pytestmark = pytest.mark.kernel


def pod_ips_map(datapath: Datapath) -> dict[IPv4Address, int]:
    """The raw pod_ips map: address -> cgroup id."""
    with libbpf.Map.from_pin(datapath.pins.map("pod_ips")) as bpf_map:
        return {IPv4Address(k): decode_u64(v) for k, v in bpf_map.items()}


def test_apply_from_empty_programs_exactly_the_set(
    datapath: Datapath, reconciler: Reconciler, resolver: FakeResolver
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
    result = reconciler.apply(pod_set(1, *specs))

    assert (result.added, result.updated, result.removed) == (3, 0, 0)
    assert result.applied_generation == 1 and result.unresolved == []
    assert datapath.pods() == expected_pods(resolver, *specs)
    assert pod_ips_map(datapath) == {s.ip: resolver.cgroups[s.uid] for s in specs}
    assert reconciler.applied_generation == 1
    assert set(reconciler.snapshot.entries) == {uid(0), uid(1), uid(2)}


def test_a_change_touches_only_the_pods_that_changed(
    datapath: Datapath, reconciler: Reconciler, resolver: FakeResolver
) -> None:
    first = [pod_spec(i) for i in range(4)]
    reconciler.apply(pod_set(1, *first))
    resolver.calls.clear()

    changed = pod_spec(1, options=options(excluded_outbound_ports=[9090]))
    moved = pod_spec(2, ip=IPv4Address("198.18.1.200"))
    second = [first[0], changed, moved, pod_spec(5)]  # pod 3 leaves, pod 5 arrives
    result = reconciler.apply(pod_set(2, *second))

    assert (result.added, result.updated, result.removed) == (1, 2, 1)
    # Unchanged pods are neither resolved nor encoded again.
    assert sorted(resolver.calls) == [uid(1), uid(2), uid(5)]
    assert datapath.pods() == expected_pods(resolver, *second)
    assert pod_ips_map(datapath) == {s.ip: resolver.cgroups[s.uid] for s in second}


def test_same_generation_and_set_again_is_a_no_op(
    datapath: Datapath, reconciler: Reconciler, resolver: FakeResolver
) -> None:
    specs = [pod_spec(0), pod_spec(1)]
    reconciler.apply(pod_set(5, *specs))
    resolver.calls.clear()

    # The same set in another order, with defaults spelled out, is the same set.
    again = pod_set(5, pod_spec(1), pod_spec(0, mode="istio", options=options()))
    result = reconciler.apply(again)

    assert (result.added, result.updated, result.removed) == (0, 0, 0)
    assert result.applied_generation == 5
    assert resolver.calls == []
    assert datapath.pods() == expected_pods(resolver, *specs)


@pytest.mark.parametrize(
    ("generation", "pods", "error", "reason"),
    [
        (4, [0, 1], StaleGenerationError, "a lower generation is stale"),
        (0, [], StaleGenerationError, "generation 0 after 5 is stale, even when empty"),
        (5, [0], GenerationConflictError, "the applied generation with another set"),
    ],
)
def test_refused_generations_change_nothing(
    datapath: Datapath,
    reconciler: Reconciler,
    resolver: FakeResolver,
    generation: int,
    pods: list[int],
    error: type[Exception],
    reason: str,
) -> None:
    specs = [pod_spec(0), pod_spec(1)]
    reconciler.apply(pod_set(5, *specs))

    with pytest.raises(error) as raised:
        reconciler.apply(pod_set(generation, *(pod_spec(i) for i in pods)))

    assert "5" in str(raised.value), reason
    assert datapath.pods() == expected_pods(resolver, *specs), reason
    assert reconciler.applied_generation == 5, reason
    snapshot = reconciler.snapshot
    assert snapshot.apply_errors_total == 1, reason
    if isinstance(raised.value, StaleGenerationError):
        assert (raised.value.requested, raised.value.applied) == (generation, 5)


def test_a_set_larger_than_max_pods_is_refused_before_anything(
    datapath: Datapath, reconciler_factory: ReconcilerFactory, resolver: FakeResolver
) -> None:
    reconciler = reconciler_factory(datapath, max_pods=2)
    reconciler.apply(pod_set(1, pod_spec(0)))
    resolver.calls.clear()

    with pytest.raises(CapacityError, match="3 pods; this agent holds at most 2"):
        reconciler.apply(pod_set(2, pod_spec(0), pod_spec(1), pod_spec(2)))

    assert resolver.calls == []  # refused before resolving, let alone writing
    assert datapath.pods() == expected_pods(resolver, pod_spec(0))
    assert reconciler.applied_generation == 1


def test_max_pods_is_capped_by_the_pods_map(
    datapath_factory: DatapathFactory, reconciler_factory: ReconcilerFactory
) -> None:
    datapath = datapath_factory(Capacities(pods=4))
    assert reconciler_factory(datapath, max_pods=1000).max_pods == 4


@pytest.mark.parametrize(
    ("epoch", "generation", "pods", "outcome", "reason"),
    [
        (1, 9, [2], StaleEpochError, "a lower epoch, whatever its generation"),
        (0, 9, [2], StaleEpochError, "an operator that predates epochs (epoch 0), after one"),
        (2, 4, [0, 1], StaleGenerationError, "the applied epoch: a lower generation"),
        (2, 5, [2], GenerationConflictError, "the applied epoch and generation, another set"),
        (2, 5, [0, 1], (2, 5), "the applied epoch and generation, the same set: a no-op"),
        (3, 1, [2], (3, 1), "a higher epoch with a lower generation: a new term counts afresh"),
        (3, 1, [0, 1], (3, 1), "a higher epoch, the same set: taken, nothing written"),
    ],
)
def test_sets_are_ordered_by_epoch_then_generation(
    datapath: Datapath,
    reconciler: Reconciler,
    resolver: FakeResolver,
    epoch: int,
    generation: int,
    pods: list[int],
    outcome: type[Exception] | tuple[int, int],
    reason: str,
) -> None:
    applied = [pod_spec(0), pod_spec(1)]
    reconciler.apply(PodSet(epoch=2, generation=5, pods=applied))
    offered = PodSet(epoch=epoch, generation=generation, pods=[pod_spec(i) for i in pods])

    if isinstance(outcome, tuple):
        result = reconciler.apply(offered)
        assert (result.applied_epoch, result.applied_generation) == outcome, reason
        assert datapath.pods() == expected_pods(resolver, *offered.pods), reason
        assert (reconciler.applied_epoch, reconciler.applied_generation) == outcome, reason
        return
    with pytest.raises(outcome) as raised:
        reconciler.apply(offered)
    assert datapath.pods() == expected_pods(resolver, *applied), reason
    assert (reconciler.applied_epoch, reconciler.applied_generation) == (2, 5), reason
    assert isinstance(raised.value, ApplyRefusedError)
    assert reconciler.snapshot.apply_errors == {raised.value.reason: 1}, reason
    if isinstance(raised.value, StaleEpochError):
        assert raised.value.applied_generation is None, "nothing to retry: no generation"
        assert (raised.value.requested, raised.value.applied) == (epoch, 2), reason


def test_a_fresh_agent_takes_any_epoch(reconciler: Reconciler) -> None:
    """The epoch lives in memory: after a restart the first set is taken (the leader sees the
    new boot id and sends its own at once)."""
    result = reconciler.apply(PodSet(epoch=7, generation=3, pods=[pod_spec(0)]))
    assert (result.applied_epoch, result.applied_generation) == (7, 3)
    retried = reconciler.retry_unresolved()
    assert retried is None  # nothing unresolved; the epoch stays
    assert reconciler.snapshot.applied_epoch == 7


def test_a_set_needing_more_option_entries_than_the_maps_hold_is_refused(
    datapath_factory: DatapathFactory,
    reconciler_factory: ReconcilerFactory,
    resolver: FakeResolver,
) -> None:
    # An Istio pod needs 13 pod_ports entries (its mesh's own ports): two need 26.
    datapath = datapath_factory(Capacities(pod_ports=20))
    reconciler = reconciler_factory(datapath)
    reconciler.apply(pod_set(1, pod_spec(0)))

    with pytest.raises(CapacityError, match="pod_ports needs 26, holds 20"):
        reconciler.apply(pod_set(2, pod_spec(0), pod_spec(1)))

    assert datapath.pods() == expected_pods(resolver, pod_spec(0))
    assert reconciler.snapshot.apply_errors == {"capacity": 1}


def test_a_set_refused_for_capacity_still_removes_the_pods_it_no_longer_names(
    datapath_factory: DatapathFactory,
    reconciler_factory: ReconcilerFactory,
    resolver: FakeResolver,
) -> None:
    """Issue 12, item 7: a refused set left every pod of the applied set programmed, those it
    no longer named too (a deleted pod's address kept leading to it). The refusal now writes
    none of the new set's pods but removes the ones it dropped; the generation stays."""
    datapath = datapath_factory(Capacities(pod_ports=30))  # an Istio pod takes 13
    reconciler = reconciler_factory(datapath)
    reconciler.apply(pod_set(1, pod_spec(0), pod_spec(1)))
    hog = pod_spec(2, options=options(excluded_outbound_ports=list(range(20000, 20010))))

    with pytest.raises(CapacityError) as refused:
        reconciler.apply(pod_set(2, pod_spec(1), hog))  # pod 0 deleted, a hog came

    assert datapath.pods() == expected_pods(resolver, pod_spec(1)), "pod 0 went all the same"
    assert "the 1 pod(s) of the applied set it no longer names were removed" in str(refused.value)
    assert set(reconciler.snapshot.entries) == {uid(1)}
    assert reconciler.applied_generation == 1
    assert reconciler.snapshot.map_entries["pod_ports"] == 13
    assert reconciler.snapshot.apply_errors == {"capacity": 1}
    # The next set that fits is applied as ever.
    result = reconciler.apply(pod_set(2, pod_spec(1), pod_spec(3)))
    assert (result.added, result.removed) == (1, 0)
    assert datapath.pods() == expected_pods(resolver, pod_spec(1), pod_spec(3))


def test_a_map_filling_up_mid_apply_rolls_everything_back(
    datapath_factory: DatapathFactory,
    reconciler_factory: ReconcilerFactory,
    resolver: FakeResolver,
) -> None:
    # Room for exactly two Istio pods with one extra port each (2 x 14 pod_ports entries).
    datapath = datapath_factory(Capacities(pod_ports=28))
    reconciler = reconciler_factory(datapath)
    a = pod_spec(0, options=options(excluded_outbound_ports=[1000]))
    b = pod_spec(1, options=options(excluded_outbound_ports=[1001]))
    reconciler.apply(pod_set(1, a, b))
    before_ips = pod_ips_map(datapath)

    # The final set fits (28 entries), but a changed port is written before the old one goes:
    # b's new address is written first, then a's new port finds the map full.
    b2 = pod_spec(1, ip=IPv4Address("198.18.1.201"), options=b.options)
    a2 = pod_spec(0, options=options(excluded_outbound_ports=[2000]))
    with pytest.raises(ApplyFailedError, match="map pod_ports is full") as raised:
        reconciler.apply(pod_set(2, b2, a2))

    assert raised.value.rolled_back and raised.value.map_full
    assert raised.value.reason == "map_full"
    assert datapath.pods() == expected_pods(resolver, a, b)
    assert pod_ips_map(datapath) == before_ips
    assert reconciler.applied_generation == 1
    assert reconciler.snapshot.apply_errors == {"map_full": 1}

    # The reconciler's view stayed in step with the maps: a set that fits applies.
    result = reconciler.apply(pod_set(3, b2))
    assert (result.added, result.updated, result.removed) == (0, 1, 1)
    assert datapath.pods() == expected_pods(resolver, b2)
    assert pod_ips_map(datapath) == {b2.ip: resolver.cgroups[b2.uid]}


def test_a_failure_after_a_removal_and_an_address_swap_undoes_them_all(
    datapath_factory: DatapathFactory,
    reconciler_factory: ReconcilerFactory,
    resolver: FakeResolver,
) -> None:
    # Room for two excluded CIDRs: b replacing its CIDR needs a third for a moment.
    datapath = datapath_factory(Capacities(pod_cidrs=2))
    reconciler = reconciler_factory(datapath)
    a = pod_spec(0, options=options(excluded_outbound_cidrs=["10.0.0.0/8"]))
    b = pod_spec(1, options=options(excluded_outbound_cidrs=["172.16.0.0/12"]))
    c = pod_spec(2)
    reconciler.apply(pod_set(1, a, b, c))
    before_ips = pod_ips_map(datapath)

    # c leaves, a takes b's address, then b (moving to a's) finds the CIDR map full.
    a2 = pod_spec(0, ip=pod_ip(1), options=a.options)
    b2 = pod_spec(1, ip=pod_ip(0), options=options(excluded_outbound_cidrs=["192.168.0.0/16"]))
    with pytest.raises(ApplyFailedError, match="map outbound_excluded_cidrs is full") as raised:
        reconciler.apply(pod_set(2, a2, b2))

    assert raised.value.rolled_back and raised.value.map_full
    assert datapath.read_pods() == ProgrammedPods(expected_pods(resolver, a, b, c), orphans={})
    assert pod_ips_map(datapath) == before_ips  # b has its address back

    b3 = pod_spec(1, ip=pod_ip(0), options=b.options)
    result = reconciler.apply(pod_set(3, a2, b3))
    assert (result.added, result.updated, result.removed) == (0, 2, 1)
    assert datapath.read_pods() == ProgrammedPods(expected_pods(resolver, a2, b3), orphans={})
    assert pod_ips_map(datapath) == {s.ip: resolver.cgroups[s.uid] for s in (a2, b3)}


def test_unresolved_pods_are_reported_then_programmed_on_retry(
    datapath: Datapath, reconciler: Reconciler, resolver: FakeResolver
) -> None:
    late = resolver.cgroups.pop(uid(2))
    specs = [pod_spec(0), pod_spec(1), pod_spec(2)]

    result = reconciler.apply(pod_set(1, *specs))

    assert result.added == 2
    assert [(u.uid, u.namespace, u.name) for u in result.unresolved] == [
        (uid(2), "default", "pod-2")
    ]
    assert "no cgroup for pod uid uid-2" in result.unresolved[0].reason
    assert datapath.pods() == expected_pods(resolver, specs[0], specs[1])
    assert reconciler.retry_unresolved() is not None  # still missing: nothing changes
    assert datapath.pods() == expected_pods(resolver, specs[0], specs[1])

    resolver.cgroups[uid(2)] = late
    retried = reconciler.retry_unresolved()

    assert retried is not None and retried.added == 1 and retried.unresolved == []
    assert retried.applied_generation == 1
    assert datapath.pods() == expected_pods(resolver, *specs)
    assert reconciler.snapshot.unresolved == ()
    assert reconciler.retry_unresolved() is None  # nothing left to retry


def test_an_unresolved_pod_is_programmed_by_the_next_apply(
    datapath: Datapath, reconciler: Reconciler, resolver: FakeResolver
) -> None:
    late = resolver.cgroups.pop(uid(1))
    reconciler.apply(pod_set(1, pod_spec(0), pod_spec(1)))
    resolver.cgroups[uid(1)] = late

    result = reconciler.apply(pod_set(2, pod_spec(0), pod_spec(1)))

    assert (result.added, result.unresolved) == (1, [])
    assert datapath.pods() == expected_pods(resolver, pod_spec(0), pod_spec(1))


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (RuntimeError("resolver bug"), "resolver error: RuntimeError: resolver bug"),
        (UnresolvedPodError("kubepods/pod-x not found"), "kubepods/pod-x not found"),
    ],
)
def test_resolver_failures_leave_the_pod_unresolved(
    datapath: Datapath,
    reconciler: Reconciler,
    resolver: FakeResolver,
    failure: Exception,
    reason: str,
) -> None:
    resolver.failing[uid(1)] = failure
    result = reconciler.apply(pod_set(1, pod_spec(0), pod_spec(1)))

    assert [(u.uid, u.reason) for u in result.unresolved] == [(uid(1), reason)]
    assert datapath.pods() == expected_pods(resolver, pod_spec(0))


def test_pods_resolving_to_one_cgroup_are_both_unresolved(
    datapath: Datapath, reconciler: Reconciler, resolver: FakeResolver
) -> None:
    resolver.cgroups[uid(1)] = resolver.cgroups[uid(0)]
    result = reconciler.apply(pod_set(1, pod_spec(0), pod_spec(1), pod_spec(2)))

    assert sorted(u.uid for u in result.unresolved) == [uid(0), uid(1)]
    assert "as do pods with uid" in result.unresolved[0].reason
    assert datapath.pods() == expected_pods(resolver, pod_spec(2))


def test_two_pods_can_swap_addresses_in_one_apply(
    datapath: Datapath, reconciler: Reconciler, resolver: FakeResolver
) -> None:
    reconciler.apply(pod_set(1, pod_spec(0), pod_spec(1)))
    swapped = [pod_spec(0, ip=pod_ip(1)), pod_spec(1, ip=pod_ip(0))]

    result = reconciler.apply(pod_set(2, *swapped))

    assert result.updated == 2
    assert datapath.pods() == expected_pods(resolver, *swapped)
    assert pod_ips_map(datapath) == {s.ip: resolver.cgroups[s.uid] for s in swapped}


def test_after_a_restart_the_maps_are_matched_by_cgroup_id(
    datapath: Datapath, reconciler_factory: ReconcilerFactory, resolver: FakeResolver
) -> None:
    specs = [
        pod_spec(0, options=options(excluded_outbound_cidrs=["203.0.113.0/24"])),
        pod_spec(1, mode="kuma", options=options(included_outbound_cidrs=["10.1.0.0/16"])),
        pod_spec(2, options=options(excluded_inbound_ports=[15000], included_outbound_cidrs=[])),
    ]
    first = reconciler_factory(datapath)
    first.apply(pod_set(7, *specs))
    first.close()

    # A new agent: it adopts the pins, and reads the maps (in one pass) as the truth.
    adopted = Datapath.adopt(instance=datapath.pins.root.name, pin_root=datapath.pins.root.parent)
    try:
        second = reconciler_factory(adopted)
        assert second.snapshot.programmed == 3
        assert second.applied_generation is None  # no set since the restart

        again = second.apply(pod_set(7, *specs))
        assert (again.added, again.updated, again.removed) == (0, 0, 0)

        fewer = second.apply(pod_set(8, specs[0], specs[2]))
        assert (fewer.added, fewer.updated, fewer.removed) == (0, 0, 1)
        assert datapath.pods() == expected_pods(resolver, specs[0], specs[2])
    finally:
        adopted.close()


def test_entries_left_by_an_interrupted_write_are_removed(
    datapath: Datapath, reconciler_factory: ReconcilerFactory, resolver: FakeResolver
) -> None:
    # What an agent killed between writing a pod's options and its pod entry leaves behind.
    orphan_cgroup = 987654321
    orphan_port = port_key(orphan_cgroup, 9090, TrafficDirection.DIRECTION_OUTBOUND)
    with (
        libbpf.Map.from_pin(datapath.pins.map("pod_ports")) as ports,
        libbpf.Map.from_pin(datapath.pins.map("pod_ips")) as ips,
    ):
        ports.update(orphan_port, b"\x01")
        ips.update(IPv4Address("198.18.1.99").packed, u64(orphan_cgroup))

        reconciler = reconciler_factory(datapath)
        reconciler.apply(pod_set(1, pod_spec(0)))

        assert ports.lookup(orphan_port) is None
        assert ips.lookup(IPv4Address("198.18.1.99").packed) is None
    assert datapath.pods() == expected_pods(resolver, pod_spec(0))
    assert pod_ips_map(datapath) == {pod_ip(0): resolver.cgroups[uid(0)]}


def test_included_cidrs_none_and_empty_are_different_pods(
    datapath: Datapath, reconciler: Reconciler, resolver: FakeResolver
) -> None:
    everything = pod_spec(0)
    nothing = pod_spec(0, options=options(included_outbound_cidrs=[]))
    reconciler.apply(pod_set(1, everything))

    result = reconciler.apply(pod_set(2, nothing))

    assert result.updated == 1
    pod = datapath.pods()[resolver.cgroups[uid(0)]]
    assert pod.included_outbound_cidrs == frozenset()
    assert reconciler.apply(pod_set(3, everything)).updated == 1
    assert datapath.pods()[resolver.cgroups[uid(0)]].included_outbound_cidrs is None


def test_sk_msg_to_app_is_a_pod_flag_written_and_read_back(
    datapath: Datapath, reconciler: Reconciler, resolver: FakeResolver
) -> None:
    cgroup_id = resolver.cgroups[uid(0)]
    sidecar_only, to_app = pod_spec(0), pod_spec(0, options=options(sk_msg_to_app=True))
    reconciler.apply(pod_set(1, sidecar_only))

    result = reconciler.apply(pod_set(2, to_app))

    assert result.updated == 1, "the flag alone is a change"
    assert datapath.pods() == expected_pods(resolver, to_app)
    assert datapath.pods()[cgroup_id].sk_msg_to_app
    with libbpf.Map.from_pin(datapath.pins.map("pods")) as pods:
        raw = pods.lookup(u64(cgroup_id))
    assert raw is not None
    flags = PodFlags(PodInfo.from_buffer_copy(raw).flags)
    assert flags == PodFlags.POD_SK_MSG_TO_APP | PodFlags.POD_OUTBOUND_INCLUDE_ALL, flags
    assert reconciler.apply(pod_set(3, sidecar_only)).updated == 1
    assert not datapath.pods()[cgroup_id].sk_msg_to_app


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
