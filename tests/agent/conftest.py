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
need no root: the logic tests (``test_*_logic.py``) use them.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import cast

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from meshaccel.agent.datapath import SK_MSG_FEATURES, Datapath
from meshaccel.agent.pods import AcceleratedPod
from meshaccel.agent.reconcile import Reconciler, UnresolvedPodError, accelerated_pod
from meshaccel.agent.server import create_app
from meshaccel.agent.tls import ServerTLS
from meshaccel.contract.api import PodOptions, PodSet, PodSpec
from meshaccel.contract.settings import DEFAULT_CAPACITIES, Capacities
from tests.agent.memory_maps import MemoryPodMaps
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


def pod_spec(index: int, *, ip: IPv4Address | None = None, **changes: object) -> PodSpec:
    """Pod ``index`` of the tests' sets: uid-<i>, default/pod-<i>, 198.18.1.(10+i)."""
    fields: dict[str, object] = {
        "uid": uid(index),
        "namespace": "default",
        "name": f"pod-{index}",
        "ip": ip if ip is not None else pod_ip(index),
    }
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
