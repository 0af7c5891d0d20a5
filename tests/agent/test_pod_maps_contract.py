"""One list of scenarios, run on the in-memory maps (``memory_maps.py``) and on the kernel's (a
Datapath loaded into the test's own cgroup), compared after every step: what each call returned
or raised, the pods read back, every entry of the five per-pod maps, and the reconciler's report.
The in-memory maps the logic tests trust cannot drift from the real ones unseen.

Scenarios are PodMaps calls (writes, refused addresses, full maps, entries of no pod) and
reconciler runs over each (generations, capacity, a map filling up, restarts, vanished pods).
Each step says whether it raises; that is checked on the in-memory maps without root too, so a
scenario that does not do what it says fails there first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest

from meshaccel.agent.datapath import Datapath, MapFullError
from meshaccel.agent.pods import AcceleratedPod, PodMaps
from meshaccel.agent.reconcile import (
    ApplyFailedError,
    ApplyRefusedError,
    CapacityError,
    GenerationConflictError,
    Reconciler,
    StaleEpochError,
    StaleGenerationError,
)
from meshaccel.contract.api import ApplyResult, PodSet, PodSpec, UnresolvedPod
from meshaccel.contract.modes import ISTIO, LINKERD
from meshaccel.contract.settings import DEFAULT_CAPACITIES, Capacities
from tests.agent.conftest import (
    DatapathFactory,
    FakeResolver,
    kernel_entries,
    kernel_plant,
    options,
    pod_ip,
    pod_ipv6,
    pod_spec,
    uid,
)
from tests.agent.memory_maps import INBOUND, OUTBOUND, PRESENT, Entries, MemoryPodMaps

# -- the two stores --------------------------------------------------------------------------------


CGROUPS = {uid(i): 8001 + i for i in range(8)}  # made up: neither store looks for the cgroups


@dataclass
class Run:
    """A scenario's maps, with a reconciler over them and what it resolves pods with."""

    maps: PodMaps
    entries: Callable[[], Entries]  # every entry of the per-pod maps, decoded
    plant: Callable[[str, Any, Any], None]  # an entry written behind the maps' back
    resolver: FakeResolver = field(default_factory=lambda: FakeResolver(dict(CGROUPS)))
    reconciler: Reconciler[PodMaps] = field(init=False)

    def __post_init__(self) -> None:
        self.reconciler = Reconciler(self.maps, self.resolver, max_pods=1024)

    def restart(self) -> None:
        """A new agent: a new reconciler reads the same maps."""
        self.reconciler.close()
        self.reconciler = Reconciler(self.maps, self.resolver, max_pods=1024)


def memory_run(capacities: Capacities) -> Run:
    maps = MemoryPodMaps(capacities)
    return Run(maps, maps.dump, maps.plant)


def kernel_run(datapath: Datapath) -> Run:
    return Run(datapath, lambda: kernel_entries(datapath), lambda *e: kernel_plant(datapath, *e))


# -- steps ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One call; ``raises``: the error it must end in (None: it returns)."""

    raises: type[Exception] | None = field(default=None, kw_only=True)

    def run(self, run: Run) -> object:
        raise NotImplementedError

    def label(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class Put(Step):
    pod: AcceleratedPod
    previous: AcceleratedPod | None
    take_ip: bool = False

    def run(self, run: Run) -> object:
        return run.maps.put_pod(self.pod, previous=self.previous, take_ip=self.take_ip)

    def label(self) -> str:
        addresses = ",".join(map(str, self.pod.addresses))
        return f"put {self.pod.cgroup_id} {addresses}" + (" take_ip" if self.take_ip else "")


@dataclass(frozen=True)
class Delete(Step):
    cgroup_id: int
    previous: AcceleratedPod | None

    def run(self, run: Run) -> object:
        return run.maps.delete_pod(self.cgroup_id, previous=self.previous)

    def label(self) -> str:
        return f"delete {self.cgroup_id}"


@dataclass(frozen=True)
class Plant(Step):
    name: str
    key: Any
    value: Any = PRESENT

    def run(self, run: Run) -> object:
        run.plant(self.name, self.key, self.value)
        return None

    def label(self) -> str:
        return f"plant {self.name} {self.key}"


@dataclass(frozen=True)
class RemoveOrphans(Step):
    def run(self, run: Run) -> object:
        return run.maps.remove_orphans(run.maps.read_pods().orphans)


@dataclass(frozen=True)
class Apply(Step):
    generation: int
    pods: Sequence[PodSpec]
    epoch: int = 0

    def run(self, run: Run) -> object:
        pod_set = PodSet(epoch=self.epoch, generation=self.generation, pods=list(self.pods))
        return run.reconciler.apply(pod_set)

    def label(self) -> str:
        return f"apply {self.epoch}/{self.generation} {[p.uid for p in self.pods]}"


@dataclass(frozen=True)
class Retry(Step):
    def run(self, run: Run) -> object:
        return run.reconciler.retry_unresolved()


@dataclass(frozen=True)
class RemoveVanished(Step):
    def run(self, run: Run) -> object:
        return run.reconciler.remove_vanished()


@dataclass(frozen=True)
class Resolve(Step):
    """The pod's cgroup is there again (``cgroup_id``) or gone (None)."""

    index: int
    cgroup_id: int | None

    def run(self, run: Run) -> object:
        if self.cgroup_id is None:
            run.resolver.cgroups.pop(uid(self.index))
        else:
            run.resolver.cgroups[uid(self.index)] = self.cgroup_id
        return None

    def label(self) -> str:
        return f"pod {self.index} cgroup {self.cgroup_id}"


@dataclass(frozen=True)
class Restart(Step):
    def run(self, run: Run) -> object:
        run.restart()
        return None


@dataclass(frozen=True)
class Scenario:
    name: str
    steps: Sequence[Step]
    capacities: Capacities = DEFAULT_CAPACITIES


# -- the scenarios -------------------------------------------------------------------------------


def istio(cgroup_id: int, ip: str, **options: Any) -> AcceleratedPod:
    return AcceleratedPod.in_mesh(ISTIO, cgroup_id, ip, **options)


def nets(*cidrs: str) -> frozenset[IPv4Network | IPv6Network]:
    return frozenset(IPv6Network(c) if ":" in c else IPv4Network(c) for c in cidrs)


A = istio(
    1001,
    "198.18.1.1",
    excluded_outbound_ports=frozenset({5432}),
    excluded_inbound_ports=frozenset({9100}),
    excluded_outbound_cidrs=nets("10.96.0.0/12"),
    included_outbound_cidrs=nets("198.18.0.0/15", "0.0.0.0/0"),
)
B = AcceleratedPod.in_mesh(LINKERD, 1002, "198.18.1.2")
SLIMMER = istio(1001, "198.18.1.3")
SWAPPED_A, SWAPPED_B = dataclasses.replace(A, ip=B.ip), dataclasses.replace(B, ip=A.ip)
FIRST, SECOND = istio(3001, "198.18.3.1"), istio(3002, "198.18.3.2")
GROWN = istio(3002, "198.18.3.3", excluded_outbound_ports=frozenset(range(1000, 1008)))
TWO_CIDRS = istio(4001, "198.18.4.1", excluded_outbound_cidrs=nets("10.0.0.0/8", "172.16.0.0/12"))
ONE_CIDR = istio(4002, "198.18.4.2", excluded_outbound_cidrs=nets("192.168.0.0/16"))
OTHER_CIDRS = istio(4001, "198.18.4.1", excluded_outbound_cidrs=nets("10.0.0.0/8", "10.1.0.0/16"))
EVERYTHING = istio(5001, "198.18.5.1")
NOTHING = dataclasses.replace(EVERYTHING, included_outbound_cidrs=frozenset())
TO_APP = dataclasses.replace(EVERYTHING, sk_msg_to_app=True)
C = istio(1003, "198.18.1.9")
DUAL = istio(
    1101,
    "198.18.11.1",
    ipv6="fd00:198:18::11:1",
    excluded_outbound_cidrs=nets("10.96.0.0/12", "fd00:10:96::/108"),
    included_outbound_cidrs=nets("0.0.0.0/0", "::/0"),
)
ONLY6 = istio(1102, "fd00:198:18::11:2", excluded_outbound_cidrs=nets("fd00::/8"))
DUAL_AS_4 = dataclasses.replace(DUAL, ipv6=None)
DUAL_AS_6 = dataclasses.replace(DUAL, ip=None)
A6, B6 = (
    dataclasses.replace(p, ipv6=IPv6Address(f"fd00:198:18::1:{n}")) for p, n in ((A, 1), (B, 2))
)
SWAPPED_A6 = dataclasses.replace(A6, ip=B6.ip, ipv6=B6.ipv6)
SWAPPED_B6 = dataclasses.replace(B6, ip=A6.ip, ipv6=A6.ipv6)

PORT_OPTIONS = options(excluded_outbound_ports=[8080], excluded_inbound_ports=[9100])
HOG = pod_spec(2, options=options(excluded_outbound_ports=list(range(20000, 20010))))
MOVED = pod_spec(0, ip=pod_ip(9))
MOVED_DUAL = pod_spec(0, ip=pod_ip(9), ips=[pod_ip(9), pod_ipv6(0)])

MAP_SCENARIOS = [
    Scenario(
        "pods are written, updated, read back and deleted",
        [
            Put(A, None),
            Put(B, None),
            Put(SLIMMER, A),  # fewer options and another address: nothing stale is left
            Put(SLIMMER, None),  # what is there already, written again in place
            Delete(1001, SLIMMER),
            Delete(1001, None),
            Delete(1002, B),
        ],
    ),
    Scenario(
        "an address another pod holds is refused unless taken",
        [
            Put(A, None),
            Put(dataclasses.replace(C, ip=A.ip), None, raises=ValueError),
            Put(dataclasses.replace(C, ip=A.ip), None, take_ip=True),
            Put(dataclasses.replace(A, ip=C.ip), A),  # the address it lost is not released
            Delete(1003, dataclasses.replace(C, ip=A.ip)),
        ],
    ),
    Scenario(
        "two pods swap addresses",
        [
            Put(A, None),
            Put(B, None),
            Put(SWAPPED_A, A, raises=ValueError),
            Put(SWAPPED_A, A, take_ip=True),
            Put(SWAPPED_B, B, take_ip=True),
        ],
    ),
    Scenario(
        "a new pod that does not fit is refused whole",
        [
            Put(FIRST, None),
            Put(SECOND, None, raises=MapFullError),  # 13 ports more than 20 hold
            Delete(3001, FIRST),
            Put(SECOND, None),
            Put(GROWN, SECOND, raises=MapFullError),  # its new ports go in before the old out
        ],
        Capacities(pods=4, pod_ports=20),
    ),
    Scenario(
        "a full pods map takes updates of its pods, not a new pod or a new address",
        # pod_ips is full once it holds both addresses of two dual-stack pods (Capacities sizes
        # it two a pod: test_pod_ips_holds_two_addresses_a_pod).
        [
            Put(A6, None),
            Put(B6, None),
            Put(dataclasses.replace(A6, sk_msg_to_app=True), A6),
            Put(C, None, raises=MapFullError),
            Put(
                dataclasses.replace(SLIMMER, ipv6=A6.ipv6),
                dataclasses.replace(A6, sk_msg_to_app=True),
                raises=MapFullError,
            ),
        ],
        Capacities(pods=2),
    ),
    Scenario(
        "dual-stack and IPv6-only pods, and pods that drop or gain a family",
        [
            Put(DUAL, None),
            Put(ONLY6, None),
            Put(DUAL_AS_4, DUAL),  # its IPv6 address is released
            Put(DUAL, DUAL_AS_4),
            Put(DUAL_AS_6, DUAL),  # and its IPv4 one
            Delete(1102, ONLY6),
            Delete(1101, DUAL_AS_6),
        ],
    ),
    Scenario(
        "an IPv6 address another pod holds is refused unless taken",
        [
            Put(DUAL, None),
            Put(dataclasses.replace(ONLY6, ipv6=DUAL.ipv6), None, raises=ValueError),
            Put(dataclasses.replace(ONLY6, ipv6=DUAL.ipv6), None, take_ip=True),
            Put(DUAL_AS_4, DUAL),  # the address it lost is not released
            Delete(1102, dataclasses.replace(ONLY6, ipv6=DUAL.ipv6)),
        ],
    ),
    Scenario(
        "two dual-stack pods swap both addresses",
        [
            Put(A6, None),
            Put(B6, None),
            Put(SWAPPED_A6, A6, raises=ValueError),
            Put(SWAPPED_A6, A6, take_ip=True),
            Put(SWAPPED_B6, B6, take_ip=True),
        ],
    ),
    Scenario(
        "full CIDR tries",
        [
            Put(TWO_CIDRS, None),
            Put(ONE_CIDR, None, raises=MapFullError),
            Put(OTHER_CIDRS, TWO_CIDRS, raises=MapFullError),
            Delete(4001, TWO_CIDRS),
            Put(ONE_CIDR, None),
            Put(
                dataclasses.replace(ONE_CIDR, included_outbound_cidrs=nets("10.0.0.0/8")), ONE_CIDR
            ),
        ],
        Capacities(pod_cidrs=2),
    ),
    Scenario(
        "entries of no pod are found and removed",
        [
            Put(A, None),
            Plant("pod_ports", (1999, 9090, OUTBOUND)),
            Plant("pod_ports", (1999, 9091, INBOUND)),
            Plant("outbound_excluded_cidrs", (1999, IPv4Network("10.0.0.0/8"))),
            Plant("outbound_included_cidrs", (1999, IPv4Network("0.0.0.0/0"))),
            Plant("pod_ips", IPv4Address("198.18.1.50"), 1999),  # a pod that is not there
            Plant("pod_ips", IPv4Address("198.18.1.51"), 1001),  # A's address before a move
            Plant("pod_ips", IPv6Address("fd00:198:18::1:51"), 1001),  # A has no IPv6 address
            Plant("outbound_excluded_cidrs", (1999, IPv6Network("fd00::/8"))),
            RemoveOrphans(),
            RemoveOrphans(),
            Put(EVERYTHING, None),
            # An included CIDR of a pod that includes everything: left by a failed undo.
            Plant("outbound_included_cidrs", (5001, IPv4Network("10.1.0.0/16"))),
            RemoveOrphans(),
        ],
    ),
    Scenario(
        "included CIDRs: none means everything, empty means nothing",
        [
            Put(EVERYTHING, None),
            Put(NOTHING, EVERYTHING),
            Put(TO_APP, NOTHING),
            Put(EVERYTHING, TO_APP),
        ],
    ),
    Scenario(
        "previous must be the same pod",
        [
            Put(A, None),
            Put(SLIMMER, B, raises=ValueError),
            Delete(1001, B, raises=ValueError),
        ],
    ),
]

RECONCILER_SCENARIOS = [
    Scenario(
        "sets ordered by epoch and generation",
        [
            Apply(1, [pod_spec(0), pod_spec(1, options=PORT_OPTIONS), pod_spec(2, mode="kuma")]),
            Apply(2, [MOVED, pod_spec(1), pod_spec(3, options=options(sk_msg_to_app=True))]),
            Apply(1, [pod_spec(0)], raises=StaleGenerationError),
            Apply(2, [pod_spec(0)], raises=GenerationConflictError),
            Apply(2, [pod_spec(3, options=options(sk_msg_to_app=True)), pod_spec(1), MOVED]),
            Apply(1, [pod_spec(4)], epoch=2),
            Apply(9, [pod_spec(5)], epoch=1, raises=StaleEpochError),
        ],
    ),
    Scenario(
        "a set over capacity removes what it no longer names",
        [
            Apply(1, [pod_spec(0), pod_spec(1)]),
            Apply(2, [pod_spec(1), HOG], raises=CapacityError),
            Apply(2, [pod_spec(1), pod_spec(3)]),
        ],
        Capacities(pod_ports=30),
    ),
    Scenario(
        "a map filling up mid-apply is rolled back",
        [
            Apply(1, [pod_spec(0, options=options(excluded_outbound_ports=[1000])), pod_spec(1)]),
            Apply(
                2,
                [
                    pod_spec(1, ip=pod_ip(8)),
                    pod_spec(0, options=options(excluded_outbound_ports=[2000])),
                ],
                raises=ApplyFailedError,
            ),
            Apply(3, [pod_spec(1, ip=pod_ip(8))]),
        ],
        Capacities(pod_ports=27),
    ),
    Scenario(
        "a removal and an address swap undone when a CIDR does not fit",
        [
            Apply(
                1,
                [
                    pod_spec(0, options=options(excluded_outbound_cidrs=["10.0.0.0/8"])),
                    pod_spec(1, options=options(excluded_outbound_cidrs=["172.16.0.0/12"])),
                    pod_spec(2),
                ],
            ),
            Apply(
                2,
                [
                    pod_spec(
                        0, ip=pod_ip(1), options=options(excluded_outbound_cidrs=["10.0.0.0/8"])
                    ),
                    pod_spec(
                        1, ip=pod_ip(0), options=options(excluded_outbound_cidrs=["192.168.0.0/16"])
                    ),
                ],
                raises=ApplyFailedError,
            ),
            Apply(
                3,
                [
                    pod_spec(
                        0, ip=pod_ip(1), options=options(excluded_outbound_cidrs=["10.0.0.0/8"])
                    ),
                    pod_spec(
                        1, ip=pod_ip(0), options=options(excluded_outbound_cidrs=["172.16.0.0/12"])
                    ),
                ],
            ),
        ],
        Capacities(pod_cidrs=2),
    ),
    Scenario(
        "a full node cannot move a pod to a new address",
        [  # three dual-stack pods fill pod_ips (two addresses a pod)
            Apply(1, [pod_spec(i, dual_stack=True) for i in range(3)]),
            Apply(
                2,
                [MOVED_DUAL, pod_spec(1, dual_stack=True), pod_spec(2, dual_stack=True)],
                raises=ApplyFailedError,
            ),
            Apply(2, [MOVED_DUAL, pod_spec(1, dual_stack=True)]),
        ],
        Capacities(pods=3),
    ),
    Scenario(
        "unresolved pods, retried, and pods whose cgroup vanished",
        [
            Resolve(2, None),
            Apply(1, [pod_spec(0), pod_spec(1), pod_spec(2)]),
            Retry(),
            Resolve(2, 8003),
            Retry(),
            Resolve(1, None),
            RemoveVanished(),
            Resolve(1, 8101),  # made again: a new cgroup id
            Retry(),
            Retry(),
        ],
    ),
    Scenario(
        "a restart adopts the maps and clears entries of no pod",
        [
            Apply(7, [pod_spec(0, options=PORT_OPTIONS), pod_spec(1, mode="linkerd"), pod_spec(2)]),
            Plant("pod_ports", (1999, 9090, OUTBOUND)),
            Plant("pod_ips", IPv4Address("198.18.1.99"), 1999),
            Restart(),
            Apply(7, [pod_spec(0, options=PORT_OPTIONS), pod_spec(1, mode="linkerd"), pod_spec(2)]),
            Apply(8, [pod_spec(0, options=PORT_OPTIONS), pod_spec(2)]),
        ],
    ),
    Scenario(
        "dual-stack pods: both addresses, swapped, and a family dropped",
        [
            Apply(1, [pod_spec(0, dual_stack=True), pod_spec(1, dual_stack=True), pod_spec(2)]),
            Apply(
                2,
                [
                    pod_spec(0, ip=pod_ip(1), ips=[pod_ip(1), pod_ipv6(1)]),
                    pod_spec(1, ip=pod_ip(0), ips=[pod_ip(0), pod_ipv6(0)]),
                    pod_spec(2, dual_stack=True),
                ],
            ),
            Apply(3, [pod_spec(0, ip=pod_ipv6(0)), pod_spec(2)]),
        ],
    ),
    Scenario(
        "a dual-stack pod takes two pod_ips entries",
        [
            Apply(1, [pod_spec(0, dual_stack=True)]),
            Apply(
                2,
                [pod_spec(0, dual_stack=True), pod_spec(1, dual_stack=True)],
            ),
            Apply(3, [pod_spec(0), pod_spec(1)]),
            Apply(4, [pod_spec(i, dual_stack=True) for i in range(3)], raises=CapacityError),
        ],
        Capacities(pods=2),
    ),
    Scenario(
        "two pods that resolve to one cgroup are both left out",
        [Resolve(1, 8001), Apply(1, [pod_spec(0), pod_spec(1), pod_spec(2)])],
    ),
]

SCENARIOS = MAP_SCENARIOS + RECONCILER_SCENARIOS


# -- running them ----------------------------------------------------------------------------------


def outcome(value: object) -> object:
    """What a call returned, as the two stores can be compared on it."""
    if isinstance(value, ApplyResult):
        return value.model_dump(exclude={"duration_ms", "boot_id"})
    if isinstance(value, list) and all(isinstance(v, UnresolvedPod) for v in value):
        return [v.model_dump() for v in value]
    return value


def failure(err: Exception) -> tuple[object, ...]:
    details: tuple[object, ...] = (type(err).__name__, str(err))
    if isinstance(err, ApplyFailedError):
        details += (err.reason, err.rolled_back, err.map_full, err.applied_generation)
    elif isinstance(err, ApplyRefusedError):
        details += (err.reason, err.applied_generation)
    return details


def report(reconciler: Reconciler[PodMaps]) -> tuple[object, ...]:
    snapshot = reconciler.snapshot
    return (
        snapshot.applied_epoch,
        snapshot.applied_generation,
        sorted((uid, e.cgroup_id) for uid, e in snapshot.entries.items()),
        [u.model_dump() for u in snapshot.unresolved],
        snapshot.programmed,
        dict(snapshot.map_entries),
        dict(snapshot.apply_errors),
        snapshot.pods_vanished,
    )


@dataclass(frozen=True)
class Observed:
    step: str
    result: object  # what it returned, or ("raised", type, message, ...)
    pods: object  # read_pods(): the pods and the entries of none
    entries: Entries
    report: tuple[object, ...]


def trace(scenario: Scenario, run: Run) -> list[Observed]:
    """Run every step, checking that it raises what it says; what was seen after each."""
    seen = []
    for number, step in enumerate(scenario.steps, 1):
        label = f"{scenario.name}, step {number}: {step.label()}"
        result: object
        try:
            result = ("returned", outcome(step.run(run)))
        except Exception as err:
            assert step.raises is not None and isinstance(err, step.raises), (label, err)
            result = ("raised", *failure(err))
        else:
            assert step.raises is None, (label, f"expected {step.raises.__name__}", result)
        seen.append(
            Observed(label, result, run.maps.read_pods(), run.entries(), report(run.reconciler))
        )
    run.reconciler.close()
    return seen


def test_pod_ips_holds_two_addresses_a_pod() -> None:
    """The scenarios that fill pod_ips are written for two addresses a pod (one per family): a
    change in its sizing must fail here, not quietly change what they test."""
    assert Capacities(pods=1).max_entries()["pod_ips"] == 2


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_each_step_does_what_it_says_on_the_memory_maps(scenario: Scenario) -> None:
    seen = trace(scenario, memory_run(scenario.capacities))
    assert len(seen) == len(scenario.steps)


@pytest.mark.kernel
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_the_memory_maps_behave_as_the_kernels(
    scenario: Scenario, datapath_factory: DatapathFactory
) -> None:
    kernel = trace(scenario, kernel_run(datapath_factory(scenario.capacities)))
    memory = trace(scenario, memory_run(scenario.capacities))

    for in_kernel, in_memory in zip(kernel, memory, strict=True):
        assert in_memory == in_kernel, in_kernel.step
