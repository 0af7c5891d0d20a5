"""Fixtures for the agent's tests: a real datapath on a test cgroup, and a fake pod resolver.

The datapath is the shipped objects, loaded and attached to our own child cgroup
``<cgroup2>/meshaccel-test-<pid>-agent-<n>`` (never the root cgroup), pinned under
``/sys/fs/bpf/meshaccel-test-<pid>/agent-<n>``, and unloaded after each test. No process lives
in that cgroup: these tests check what lands in the maps; the traffic test uses a netlab node.

Pod identity is not what these tests test, so pods resolve through :class:`FakeResolver`, a dict
from pod uid to the id of a real (empty) child cgroup. (test_vanished.py uses the real
CgroupResolver: a pod's cgroup disappearing is what it tests.)

The ``memory_*`` fixtures are the same without a kernel: the reconciler over the in-memory maps
(``memory_maps.py``), pods resolving to made-up cgroup ids, the real app served over TLS. They
need no root: the logic tests (``test_*_logic.py``, failures only those maps give on demand) use
them.

The ``store`` fixture runs a test once on each: a scenario the two share is written once
(``test_reconcile.py``, ``test_server.py``) and read back through :class:`Store`. Its kernel
run is marked ``kernel``: skipped without root by hand, a failure in CI.
"""

from __future__ import annotations

import itertools
import os
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import cached_property
from ipaddress import IPv4Address, IPv6Address
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from meshaccel.agent import layout, libbpf
from meshaccel.agent.datapath import POD_MAPS, SK_MSG_FEATURES, Datapath
from meshaccel.agent.pods import (
    AcceleratedPod,
    PodMaps,
    ProgrammedPods,
    decode_cidr_key,
    decode_port_key,
    decode_u64,
    u64,
)
from meshaccel.agent.reconcile import Reconciler, UnresolvedPodError, accelerated_pod
from meshaccel.agent.server import create_app
from meshaccel.agent.tls import ServerTLS
from meshaccel.contract.api import PodOptions, PodSet, PodSpec
from meshaccel.contract.settings import DEFAULT_CAPACITIES, Capacities
from tests.agent.memory_maps import (
    PRESENT,
    Entries,
    MemoryPodMaps,
    encode_key,
    pod_record,
    record_info,
)
from tests.datapath.conftest import PIN_ROOT
from tests.netlab.cgroups import TEST_CGROUP_PREFIX, TestCgroup
from tests.pki import make_pki
from tests.requirements import require_btf, require_kernel

POD_CGROUPS = 16  # child cgroups made per module: pods 0..15 can be resolved
PKI = make_pki()  # the operator's CA, the agents' server certificate, the operator's own
Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]
MakeClient = Callable[..., Awaitable[Client]]
_numbers = itertools.count()


@dataclass
class PodCgroups:
    """A test cgroup (the attach point) with one empty child cgroup per pod index."""

    cgroup: TestCgroup
    ids: list[int]


@pytest.fixture(scope="module")
def pod_cgroups() -> Iterator[PodCgroups]:
    require_kernel()
    require_btf()
    cgroup = TestCgroup(f"{TEST_CGROUP_PREFIX}{os.getpid()}-agent-{next(_numbers)}")
    with cgroup:
        ids = [os.stat(cgroup.child(f"pod-{i}")).st_ino for i in range(POD_CGROUPS)]
        yield PodCgroups(cgroup, ids)


DatapathFactory = Callable[..., Datapath]


@pytest.fixture
def datapath_factory(pod_cgroups: PodCgroups) -> Iterator[DatapathFactory]:
    """load(capacities=...) -> a Datapath attached to the module's test cgroup, unloaded after."""
    with ExitStack() as cleanup:

        def load(capacities: Capacities | None = None) -> Datapath:
            instance = f"agent-{next(_numbers)}"
            cleanup.callback(_unload_quietly, instance)
            datapath = Datapath.load(
                pod_cgroups.cgroup.path,
                instance=instance,
                features=SK_MSG_FEATURES,
                capacities=capacities or Capacities(),
                pin_root=PIN_ROOT,
            )
            cleanup.callback(datapath.close)
            return datapath

        yield load


def _unload_quietly(instance: str) -> None:
    try:
        datapath = Datapath.adopt(instance=instance, pin_root=PIN_ROOT)
    except Exception:
        return  # the test unloaded it itself
    datapath.unload(drain_seconds=0)


@pytest.fixture
def datapath(datapath_factory: DatapathFactory) -> Datapath:
    return datapath_factory()


@dataclass
class FakeResolver:
    """uid -> cgroup id; a uid that is missing (or listed in ``failing``) is unresolved.

    A programmed pod's cgroup has vanished when its uid is missing, or maps to another id;
    ``failing`` makes that question fail too (the reconciler must then keep the pod).
    """

    cgroups: dict[str, int] = field(default_factory=dict)
    failing: dict[str, Exception] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    def resolve(self, pod: PodSpec) -> int:
        self.calls.append(pod.uid)
        if pod.uid in self.failing:
            raise self.failing[pod.uid]
        try:
            return self.cgroups[pod.uid]
        except KeyError:
            raise UnresolvedPodError(f"no cgroup for pod uid {pod.uid} (yet)") from None

    def vanished(self, pod: PodSpec, cgroup_id: int) -> str | None:
        if pod.uid in self.failing:
            raise self.failing[pod.uid]
        now = self.cgroups.get(pod.uid)
        if now is None:
            return f"the cgroup of pod uid {pod.uid} is gone"
        if now != cgroup_id:
            return f"the cgroup of pod uid {pod.uid} is cgroup id {now} now, not {cgroup_id}"
        return None


def uid(index: int) -> str:
    return f"uid-{index}"


def pod_ip(index: int) -> IPv4Address:
    return IPv4Address("198.18.1.10") + index


def pod_ipv6(index: int) -> IPv6Address:
    return IPv6Address("fd00:198:18::1:10") + index


def pod_spec(
    index: int,
    *,
    ip: IPv4Address | IPv6Address | None = None,
    dual_stack: bool = False,
    **changes: object,
) -> PodSpec:
    """Pod ``index`` of the tests' sets: uid-<i>, default/pod-<i>, 198.18.1.(10+i); with
    ``dual_stack``, fd00:198:18::1:(10+i) too (hex)."""
    fields: dict[str, object] = {
        "uid": uid(index),
        "namespace": "default",
        "name": f"pod-{index}",
        "ip": ip if ip is not None else pod_ip(index),
    }
    if dual_stack:
        fields["ips"] = [fields["ip"], pod_ipv6(index)]
    fields.update(changes)
    return PodSpec.model_validate(fields)


def pod_set(generation: int, *pods: PodSpec) -> PodSet:
    return PodSet(generation=generation, pods=list(pods))


def options(**values: object) -> PodOptions:
    return PodOptions.model_validate(values)


@pytest.fixture
def resolver(pod_cgroups: PodCgroups) -> FakeResolver:
    """Pods 0..15 resolve to the module's child cgroups."""
    return FakeResolver({uid(i): cgroup_id for i, cgroup_id in enumerate(pod_cgroups.ids)})


def expected_pods(resolver: FakeResolver, *specs: PodSpec) -> dict[int, AcceleratedPod]:
    """What Datapath.pods() must read back once ``specs`` are applied (all resolvable)."""
    return {resolver.cgroups[s.uid]: accelerated_pod(s, resolver.cgroups[s.uid]) for s in specs}


ReconcilerFactory = Callable[..., Reconciler]


@pytest.fixture
def reconciler_factory(resolver: FakeResolver) -> Iterator[ReconcilerFactory]:
    with ExitStack() as cleanup:

        def make(datapath: Datapath, *, max_pods: int = 1024) -> Reconciler:
            reconciler = Reconciler(datapath, resolver, max_pods=max_pods)
            cleanup.callback(reconciler.close)
            return reconciler

        yield make


@pytest.fixture
def reconciler(datapath: Datapath, reconciler_factory: ReconcilerFactory) -> Reconciler:
    return reconciler_factory(datapath)


@pytest.fixture(scope="session")
def server_tls(tmp_path_factory: pytest.TempPathFactory) -> ServerTLS:
    """The agent's TLS material, from files as kubelet mounts the agents' Secret."""
    return ServerTLS(PKI.write_agent_files(tmp_path_factory.mktemp("agent-tls")))


@pytest.fixture
def make_client(
    aiohttp_client: ClientFactory, reconciler: Reconciler, server_tls: ServerTLS
) -> MakeClient:
    """make_client([reconciler], **create_app options) -> a client of the real app.

    Defaults: served over TLS with the agent's certificate, the client presenting the
    operator's (a request's ``ssl=`` takes another: ``PKI.anonymous_context()``, ...); no
    background work; no drain (an uninstall returns at once). ``tls=None``: plain HTTP, no
    authentication. The test client cannot send the agents' server name, so it checks the
    chain, not the name (the pusher's tests check both).
    """

    async def make(target: Reconciler = reconciler, **kwargs: object) -> Client:
        return await serve(aiohttp_client, target, server_tls, **kwargs)

    return make


async def serve(
    aiohttp_client: ClientFactory,
    target: Reconciler,
    server_tls: ServerTLS,
    **kwargs: object,
) -> Client:
    """The real app over ``target``, with make_client's defaults (above)."""
    kwargs.setdefault("tls", server_tls)
    kwargs.setdefault("retry_interval", None)
    kwargs.setdefault("tls_reload_interval", None)
    kwargs.setdefault("drain_seconds", 0)
    app = create_app(target, **kwargs)  # type: ignore[arg-type]
    tls = kwargs["tls"]
    if tls is None:
        return await aiohttp_client(app)
    assert isinstance(tls, ServerTLS)
    server = TestServer(app)
    await server.start_server(ssl=tls.context)
    client_context = PKI.client_context(check_hostname=False)
    connector = aiohttp.TCPConnector(ssl=client_context)
    return await aiohttp_client(server, connector=connector)


# -- without a kernel ------------------------------------------------------------------------

#: Made-up pod cgroup ids: the in-memory maps do not look for the cgroups.
MEMORY_CGROUPS = {uid(i): 7001 + i for i in range(POD_CGROUPS)}
MemoryReconciler = Reconciler[MemoryPodMaps]
MemoryReconcilerFactory = Callable[..., MemoryReconciler]


@pytest.fixture
def memory_resolver() -> FakeResolver:
    """Pods 0..15 resolve to :data:`MEMORY_CGROUPS`."""
    return FakeResolver(dict(MEMORY_CGROUPS))


@pytest.fixture
def memory_maps() -> MemoryPodMaps:
    return MemoryPodMaps()


@pytest.fixture
def memory_reconciler_factory(memory_resolver: FakeResolver) -> Iterator[MemoryReconcilerFactory]:
    """make(maps=None, *, capacities=..., max_pods=1024): a reconciler over in-memory maps
    (new ones sized by ``capacities`` unless ``maps`` is given), closed after the test."""
    with ExitStack() as cleanup:

        def make(
            maps: MemoryPodMaps | None = None,
            *,
            capacities: Capacities = DEFAULT_CAPACITIES,
            max_pods: int = 1024,
        ) -> MemoryReconciler:
            maps = maps if maps is not None else MemoryPodMaps(capacities)
            reconciler = Reconciler(maps, memory_resolver, max_pods=max_pods)
            cleanup.callback(reconciler.close)
            return reconciler

        yield make


@pytest.fixture
def memory_reconciler(
    memory_maps: MemoryPodMaps, memory_reconciler_factory: MemoryReconcilerFactory
) -> MemoryReconciler:
    return memory_reconciler_factory(memory_maps)


@pytest.fixture
def make_memory_client(
    aiohttp_client: ClientFactory, memory_reconciler: MemoryReconciler, server_tls: ServerTLS
) -> MakeClient:
    """make_client, over a reconciler of in-memory maps. The app takes a reconciler of the
    kernel's (``Reconciler[Datapath]``): what these tests ask of it is the reconciler's alone
    (/v1/status, /readyz, /metrics and /v1/uninstall read the datapath: kernel tests)."""

    async def make(target: MemoryReconciler = memory_reconciler, **kwargs: object) -> Client:
        return await serve(aiohttp_client, cast(Reconciler, target), server_tls, **kwargs)

    return make


# -- both: one scenario, the kernel's maps and the in-memory ones ----------------------------------

#: The ``store`` fixture's runs: the kernel's is marked (tests/conftest.py checks the marker).
STORES = [pytest.param("memory"), pytest.param("kernel", marks=pytest.mark.kernel)]


@dataclass(frozen=True)
class Mark:
    """What ``maps`` held at one moment, and how many writes they had counted (in memory)."""

    maps: PodMaps
    entries: Entries
    writes: int


class Store(ABC):
    """The maps a reconciler writes, as a test of both stores reads them back.

    ``maps``: the store's maps at the default capacities; :meth:`make` gives reconcilers over
    them or over new ones. Every read is of the maps themselves (:meth:`entries`: every entry of
    the five per-pod maps, decoded as ``memory_maps.Entries``), never the reconciler's books.
    """

    def __init__(self, resolver: FakeResolver, cleanup: ExitStack) -> None:
        self.resolver = resolver
        self.cleanup = cleanup
        self.maps = self.new_maps(DEFAULT_CAPACITIES)

    @abstractmethod
    def new_maps(self, capacities: Capacities) -> PodMaps: ...

    @abstractmethod
    def reopen(self, maps: PodMaps) -> PodMaps:
        """``maps`` as an agent that starts again finds them."""

    @abstractmethod
    def entries(self, maps: PodMaps | None = None) -> Entries: ...

    @abstractmethod
    def written_since(self, mark: Mark) -> dict[str, set[Any]]:
        """Map name -> the keys written since ``mark``, for the maps that had any."""

    @abstractmethod
    def plant(self, name: str, key: Any, value: Any = PRESENT) -> None:
        """An entry written into :attr:`maps` behind the reconciler's back."""

    @cached_property
    def reconciler(self) -> Reconciler[PodMaps]:
        return self.make()

    def make(
        self, capacities: Capacities | None = None, *, max_pods: int = 1024
    ) -> Reconciler[PodMaps]:
        """A reconciler over :attr:`maps`, or over new maps sized by ``capacities``."""
        maps = self.maps if capacities is None else self.new_maps(capacities)
        return self._reconciler(maps, max_pods)

    def restart(self, reconciler: Reconciler[PodMaps]) -> Reconciler[PodMaps]:
        """A new agent: ``reconciler`` is closed, a new one reads its maps as they are."""
        reconciler.close()
        return self._reconciler(self.reopen(reconciler.datapath), max_pods=1024)

    def programmed(self, *specs: PodSpec) -> ProgrammedPods:
        """What ``read_pods()`` gives once ``specs`` (all resolvable) are applied: nothing else."""
        return ProgrammedPods(expected_pods(self.resolver, *specs), orphans={})

    def cgroup(self, index: int) -> int:
        return self.resolver.cgroups[uid(index)]

    def addresses(self, maps: PodMaps | None = None) -> dict[IPv4Address | IPv6Address, int]:
        """The pod_ips map: address -> cgroup id."""
        return dict(self.entries(maps)["pod_ips"])

    def mark(self, maps: PodMaps | None = None) -> Mark:
        maps = maps if maps is not None else self.maps
        writes = maps.writes if isinstance(maps, MemoryPodMaps) else 0
        return Mark(maps, self.entries(maps), writes)

    def _reconciler(self, maps: PodMaps, max_pods: int) -> Reconciler[PodMaps]:
        reconciler = Reconciler(maps, self.resolver, max_pods=max_pods)
        self.cleanup.callback(reconciler.close)
        return reconciler


class MemoryStore(Store):
    def new_maps(self, capacities: Capacities) -> PodMaps:
        return MemoryPodMaps(capacities)

    def reopen(self, maps: PodMaps) -> PodMaps:
        return maps  # the same dicts, as the kernel keeps its maps for the next agent

    def entries(self, maps: PodMaps | None = None) -> Entries:
        return _in_memory(maps if maps is not None else self.maps).dump()

    def written_since(self, mark: Mark) -> dict[str, set[Any]]:
        """Every write the maps counted, undone ones and rewrites of a value too."""
        written: dict[str, set[Any]] = {}
        for _, name, key in _in_memory(mark.maps).log[mark.writes :]:
            written.setdefault(name, set()).add(key)
        return written

    def plant(self, name: str, key: Any, value: Any = PRESENT) -> None:
        _in_memory(self.maps).plant(name, key, value)


class KernelStore(Store):
    def __init__(
        self, resolver: FakeResolver, cleanup: ExitStack, datapath_factory: DatapathFactory
    ) -> None:
        self.datapath_factory = datapath_factory
        super().__init__(resolver, cleanup)

    def new_maps(self, capacities: Capacities) -> PodMaps:
        return self.datapath_factory(capacities)

    def reopen(self, maps: PodMaps) -> PodMaps:
        pins = _in_kernel(maps).pins
        adopted = Datapath.adopt(instance=pins.root.name, pin_root=pins.root.parent)
        self.cleanup.callback(adopted.close)
        return adopted

    def entries(self, maps: PodMaps | None = None) -> Entries:
        return kernel_entries(_in_kernel(maps if maps is not None else self.maps))

    def written_since(self, mark: Mark) -> dict[str, set[Any]]:
        """The keys whose entries differ now (added, removed or changed): the kernel keeps no
        count of writes, so a write undone or of the same value is not seen here."""
        now = self.entries(mark.maps)
        written: dict[str, set[Any]] = {}
        for name, before in mark.entries.items():
            after = now[name]
            changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
            if changed:
                written[name] = changed
        return written

    def plant(self, name: str, key: Any, value: Any = PRESENT) -> None:
        kernel_plant(_in_kernel(self.maps), name, key, value)


def _in_memory(maps: PodMaps) -> MemoryPodMaps:
    assert isinstance(maps, MemoryPodMaps), maps
    return maps


def _in_kernel(maps: PodMaps) -> Datapath:
    assert isinstance(maps, Datapath), maps
    return maps


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    """The test's maps, in memory or the kernel's (a datapath on the module's test cgroup)."""
    with ExitStack() as cleanup:
        if request.param == "kernel":
            resolver = request.getfixturevalue("resolver")
            yield KernelStore(resolver, cleanup, request.getfixturevalue("datapath_factory"))
        else:
            yield MemoryStore(request.getfixturevalue("memory_resolver"), cleanup)


@pytest.fixture
def make_store_client(
    aiohttp_client: ClientFactory, store: Store, server_tls: ServerTLS
) -> MakeClient:
    """make_client, over ``store``'s reconciler (or the one given). The app takes a reconciler of
    the kernel's: what the shared tests ask of it is the reconciler's alone (/v1/status,
    /readyz, /metrics and /v1/uninstall read the datapath: kernel tests)."""

    async def make(target: Reconciler[PodMaps] | None = None, **kwargs: object) -> Client:
        chosen = target if target is not None else store.reconciler
        return await serve(aiohttp_client, cast(Reconciler, chosen), server_tls, **kwargs)

    return make


def in_step(reconciler: Reconciler[Any], entries: Entries) -> None:
    """What the reconciler reports of the maps is what they hold (``entries``, read back)."""
    snapshot = reconciler.snapshot
    assert dict(snapshot.map_entries) == {name: len(held) for name, held in entries.items()}
    assert snapshot.programmed == len(entries["pods"])


def body_of(generation: int, *indexes: int) -> str:
    """A PUT /v1/pods body: pods ``indexes`` at ``generation``."""
    return pod_set(generation, *(pod_spec(i) for i in indexes)).model_dump_json()


async def put(client: Client, body: str | bytes, **headers: str) -> tuple[int, dict[str, Any]]:
    response = await client.put(
        "/v1/pods", data=body, headers={"Content-Type": "application/json", **headers}
    )
    return response.status, await response.json()


# -- the kernel's maps, read and written raw -------------------------------------------------------


def kernel_entries(datapath: Datapath) -> Entries:
    """The kernel's per-pod maps, read raw from their pins and decoded as the in-memory ones."""
    found: Entries = {}
    for name in POD_MAPS:
        with libbpf.Map.from_pin(datapath.pins.map(name)) as bpf_map:
            found[name] = {
                _decode_key(name, key): _decode_value(name, value) for key, value in bpf_map.items()
            }
    return found


def kernel_plant(datapath: Datapath, name: str, key: Any, value: Any) -> None:
    """Write one decoded entry (as ``memory_maps.Entries`` has it) into the kernel's map."""
    raw_key = u64(key) if name == "pods" else encode_key(name, key)
    if name == "pods":
        raw_value = bytes(record_info(value))
    elif name == "pod_ips":
        raw_value = u64(value)
    else:
        raw_value = b"\x01"
    with libbpf.Map.from_pin(datapath.pins.map(name)) as bpf_map:
        bpf_map.update(raw_key, raw_value)


def _decode_key(name: str, raw: bytes) -> Any:
    if name == "pods":
        return decode_u64(raw)
    if name == "pod_ips":
        return layout.address_of(raw)
    if name == "pod_ports":
        return decode_port_key(raw)
    return decode_cidr_key(raw)


def _decode_value(name: str, raw: bytes) -> Any:
    if name == "pods":
        return pod_record(layout.PodInfo.from_buffer_copy(raw))
    if name == "pod_ips":
        return decode_u64(raw)
    return PRESENT if raw == b"\x01" else raw
