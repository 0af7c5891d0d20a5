"""The agent's HTTP API when a map write fails, and what it reports of the datapath's
app_reuse: what only the in-memory maps (``memory_maps.py``) give on demand. No kernel, no root.

A failing write is a 500 with every change undone; a failing undo too is a 500 that says the
maps are read again, and the next set repairs them. The API's other scenarios run on both
stores in ``test_server.py`` (the kernel's run is the proof); the datapath's reading of
app_reuse is checked against connect4's decisions in ``tests/datapath/test_short_connections.py``.
"""

from __future__ import annotations

import errno
from ipaddress import IPv4Address

import pytest

from meshaccel.agent.datapath import AppConnectionUse
from meshaccel.agent.pods import ProgrammedPods
from meshaccel.contract.api import AppConnections, ErrorReply, PodsReply
from tests.agent.conftest import (
    MEMORY_CGROUPS,
    Client,
    FakeResolver,
    MakeClient,
    body_of,
    expected_pods,
    pod_ip,
    pod_ipv6,
    pod_set,
    pod_spec,
    put,
    uid,
)
from tests.agent.memory_maps import MemoryPodMaps


@pytest.fixture
async def client(make_memory_client: MakeClient) -> Client:
    return await make_memory_client()


def programmed(*indexes: int) -> ProgrammedPods:
    """What the maps read back once pods ``indexes`` (all resolvable) are applied."""
    specs = [pod_spec(i) for i in indexes]
    return ProgrammedPods(expected_pods(FakeResolver(dict(MEMORY_CGROUPS)), *specs), orphans={})


async def test_a_failing_write_is_500_and_rolled_back(
    client: Client, memory_maps: MemoryPodMaps
) -> None:
    assert (await put(client, body_of(1, 0, 1)))[0] == 200
    before = memory_maps.dump()
    memory_maps.fail(35)  # pod 1's removal and pod 2 took 30 writes: in the middle of pod 3

    status, payload = await put(client, body_of(2, 0, 2, 3, 4))

    assert status == 500, payload
    error = ErrorReply.model_validate(payload)
    assert "injected write failure" in error.error and "every change was undone" in error.error
    assert error.applied_generation == 1
    assert memory_maps.dump() == before
    status, payload = await put(client, body_of(2, 0, 2, 3, 4))  # the same set again: applied
    assert status == 200, payload
    assert memory_maps.read_pods() == programmed(0, 2, 3, 4)


async def test_a_failed_rollback_is_500_and_the_next_set_repairs_the_maps(
    client: Client, memory_maps: MemoryPodMaps
) -> None:
    assert (await put(client, body_of(1, 0, 1)))[0] == 200
    memory_maps.fail(35, onward=True)  # that write fails, and so does undoing those before it

    status, payload = await put(client, body_of(2, 0, 2, 3, 4))

    assert status == 500, payload
    assert "the maps are read again before the next apply" in payload["error"]
    assert memory_maps.read_pods().orphans, "the failed undo left entries of no pod"
    memory_maps.heal()
    status, payload = await put(client, body_of(2, 0, 2, 3, 4))
    assert status == 200, payload
    assert memory_maps.read_pods() == programmed(0, 2, 3, 4)


async def test_pods_show_how_their_application_connections_are_used(
    client: Client, memory_maps: MemoryPodMaps
) -> None:
    """Each pod lists the records of its own addresses, whichever family; a record of an
    address no pod of the set has (a pod gone, until the LRU map drops it) is nobody's, and a
    pod without one has no ``app_connections`` at all, as readers older than the field need."""
    dual = pod_spec(0, dual_stack=True)
    status, payload = await put(
        client, pod_set(1, dual, pod_spec(1), pod_spec(2)).model_dump_json()
    )
    assert status == 200, payload
    memory_maps.app_use = {
        pod_ip(0): AppConnectionUse(connections=60, reused=2, short_lived=True),
        pod_ipv6(0): AppConnectionUse(connections=20, reused=20, short_lived=False),
        pod_ip(1): AppConnectionUse(connections=3, reused=1, short_lived=False),
        IPv4Address("198.18.9.9"): AppConnectionUse(connections=50, reused=0, short_lived=True),
    }

    document = await (await client.get("/v1/pods")).json()

    listed = {p.uid: p.app_connections for p in PodsReply.model_validate(document).pods}
    assert listed == {
        uid(0): (
            AppConnections(ip=pod_ip(0), connections=60, reused=2, short_lived=True),
            AppConnections(ip=pod_ipv6(0), connections=20, reused=20, short_lived=False),
        ),
        uid(1): (AppConnections(ip=pod_ip(1), connections=3, reused=1, short_lived=False),),
        uid(2): (),
    }
    assert [("app_connections" in pod) for pod in document["pods"]] == [True, True, False]


async def test_pods_answer_without_app_connections_when_the_kernel_does_not_give_them(
    client: Client, memory_maps: MemoryPodMaps, caplog: pytest.LogCaptureFixture
) -> None:
    assert (await put(client, body_of(1, 0)))[0] == 200
    memory_maps.app_use = OSError(errno.EBADF, "app_reuse's pin went away")

    response = await client.get("/v1/pods")

    assert response.status == 200
    (pod,) = (await response.json())["pods"]
    assert pod["uid"] == uid(0) and "app_connections" not in pod
    assert "app_reuse unreadable: [Errno 9] app_reuse's pin went away" in caplog.messages
