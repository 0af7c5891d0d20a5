"""The agent's HTTP API over in-memory maps (no kernel, no root): the real app (``create_app``)
served over mutual TLS by aiohttp's test server, its reconciler writing ``memory_maps``.

A refused request (4xx) writes nothing, a failing write is a 5xx with every change undone, and
/v1 answers the operator's client certificate only. ``test_server.py`` proves the same over the
kernel's maps, and what only a datapath answers (/v1/status, /readyz, /metrics, /v1/uninstall).
"""

from __future__ import annotations

import json
import ssl
from typing import Any, cast

import pytest
from aiohttp import web
from hypothesis import event, given
from hypothesis import strategies as st

from meshaccel.agent.listener import Limits
from meshaccel.agent.pods import ProgrammedPods
from meshaccel.agent.reconcile import Reconciler, accelerated_pod
from meshaccel.agent.server import create_app
from meshaccel.agent.tls import ServerTLS
from meshaccel.contract.api import ApplyResult, ErrorReply, HealthReply, PodSet, PodsReply
from meshaccel.contract.settings import Capacities
from meshaccel.contract.tls import bundle_fingerprint
from tests.agent.conftest import (
    MEMORY_CGROUPS,
    PKI,
    Client,
    ClientFactory,
    FakeResolver,
    MakeClient,
    MemoryReconciler,
    MemoryReconcilerFactory,
    expected_pods,
    options,
    pod_ip,
    pod_set,
    pod_spec,
    uid,
)
from tests.agent.hostile_bodies import (
    FUZZ,
    MALFORMED_BODIES,
    json_values,
    near_valid_sets,
    pod_sets,
)
from tests.agent.memory_maps import MemoryPodMaps
from tests.waiting import wait_for


@pytest.fixture
async def client(make_memory_client: MakeClient) -> Client:
    return await make_memory_client()


def body_of(generation: int, *indexes: int) -> str:
    return pod_set(generation, *(pod_spec(i) for i in indexes)).model_dump_json()


async def put(client: Client, body: str | bytes, **headers: str) -> tuple[int, dict[str, Any]]:
    response = await client.put(
        "/v1/pods", data=body, headers={"Content-Type": "application/json", **headers}
    )
    return response.status, await response.json()


def programmed(maps: MemoryPodMaps, *indexes: int) -> ProgrammedPods:
    """What the maps read back once pods ``indexes`` (all resolvable) are applied."""
    specs = [pod_spec(i) for i in indexes]
    return ProgrammedPods(expected_pods(FakeResolver(dict(MEMORY_CGROUPS)), *specs), orphans={})


# -- applying sets -------------------------------------------------------------------------------


async def test_put_applies_the_set_and_get_lists_it(
    client: Client, memory_maps: MemoryPodMaps
) -> None:
    status, payload = await put(client, body_of(3, 0, 1, 2))

    assert status == 200, payload
    result = ApplyResult.model_validate(payload)
    assert (result.applied_generation, result.added) == (3, 3)
    assert memory_maps.read_pods() == programmed(memory_maps, 0, 1, 2)
    listed = PodsReply.model_validate(await (await client.get("/v1/pods")).json())
    assert listed.applied_generation == 3
    assert [(p.uid, p.ip, p.cgroup_id) for p in listed.pods] == [
        (uid(i), pod_ip(i), MEMORY_CGROUPS[uid(i)]) for i in range(3)
    ]


@pytest.mark.parametrize(
    ("generation", "indexes", "reason"),
    [
        (4, [0], "stale: lower than the applied 5"),
        (5, [0], "conflict: generation 5 with another set"),
    ],
)
async def test_a_stale_or_conflicting_generation_is_409_and_writes_nothing(
    client: Client, memory_maps: MemoryPodMaps, generation: int, indexes: list[int], reason: str
) -> None:
    assert (await put(client, body_of(5, 0, 1)))[0] == 200
    writes = memory_maps.writes

    status, payload = await put(client, body_of(generation, *indexes))

    assert status == 409, reason
    error = ErrorReply.model_validate(payload)
    assert (error.applied_generation, error.applied_epoch) == (5, 0), reason
    assert memory_maps.writes == writes, reason
    # The identical set at the applied generation is a success that writes nothing.
    status, payload = await put(client, body_of(5, 1, 0))
    assert status == 200 and payload["added"] == payload["removed"] == 0
    assert memory_maps.writes == writes


async def test_a_set_from_an_ended_term_is_409_with_the_applied_epoch_only(
    client: Client, memory_maps: MemoryPodMaps
) -> None:
    leader = PodSet(epoch=3, generation=1, pods=[pod_spec(0)]).model_dump_json()
    assert (await put(client, leader))[0] == 200
    writes = memory_maps.writes

    stale = PodSet(epoch=2, generation=99, pods=[pod_spec(1)]).model_dump_json()
    status, payload = await put(client, stale)

    assert status == 409
    error = ErrorReply.model_validate(payload)
    assert error.applied_epoch == 3 and "another operator replica leads" in error.error
    assert error.applied_generation is None  # nothing to go above: a client must not retry
    assert memory_maps.writes == writes
    # A newer term is taken with any generation.
    newer = PodSet(epoch=4, generation=1, pods=[pod_spec(1)]).model_dump_json()
    status, payload = await put(client, newer)
    assert status == 200 and payload["applied_epoch"] == 4
    assert memory_maps.read_pods() == programmed(memory_maps, 1)


# -- refusals: 4xx, nothing written --------------------------------------------------------------


@pytest.mark.parametrize(("body", "status", "loc", "reason"), MALFORMED_BODIES)
async def test_malformed_bodies_are_4xx_with_the_field_and_write_nothing(
    client: Client,
    memory_maps: MemoryPodMaps,
    body: str | bytes,
    status: int,
    loc: list[object] | None,
    reason: str,
) -> None:
    await put(client, body_of(0, 0))
    writes = memory_maps.writes

    got, payload = await put(client, body)

    assert got == status, (reason, payload)
    error = ErrorReply.model_validate(payload)
    if loc is None:
        assert error.detail is None, reason
    else:
        assert error.detail and error.detail[0]["loc"] == loc, (reason, error.detail)
        assert "input" not in error.detail[0], reason  # hostile input is never echoed
    assert memory_maps.writes == writes, reason


async def test_a_body_that_is_not_json_content_is_415(
    client: Client, memory_maps: MemoryPodMaps
) -> None:
    status, payload = await put(client, body_of(1, 0), **{"Content-Type": "text/plain"})
    assert status == 415, payload
    assert "application/json" in ErrorReply.model_validate(payload).error
    assert memory_maps.writes == 0


async def test_a_body_over_the_limit_is_413(
    make_memory_client: MakeClient, memory_maps: MemoryPodMaps
) -> None:
    client = await make_memory_client(limits=Limits(max_body_bytes=4096))
    status, payload = await put(client, body_of(1, *range(16)) + " " * 8192)

    assert status == 413
    assert "4096" in ErrorReply.model_validate(payload).error
    assert memory_maps.writes == 0


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/v1/pods", {"GET", "PUT"}),
        ("DELETE", "/v1/pods", {"GET", "PUT"}),
        ("PUT", "/v1/health", {"GET"}),
        ("GET", "/v1/uninstall", {"POST"}),
    ],
)
async def test_a_wrong_method_is_405_naming_the_right_ones(
    client: Client, memory_maps: MemoryPodMaps, method: str, path: str, allowed: set[str]
) -> None:
    response = await client.request(method, path, data=body_of(1, 0))

    assert response.status == 405, (method, path)
    assert allowed <= set(response.headers["Allow"].split(",")), response.headers["Allow"]
    assert response.content_type == "application/json"
    ErrorReply.model_validate(await response.json())
    assert memory_maps.writes == 0


async def test_an_unknown_path_is_a_json_404(client: Client) -> None:
    response = await client.get("/v2/pods")
    assert response.status == 404
    assert response.content_type == "application/json"
    ErrorReply.model_validate(await response.json())


async def test_a_standalone_agent_refuses_pushed_sets(
    make_memory_client: MakeClient, memory_maps: MemoryPodMaps
) -> None:
    client = await make_memory_client(pod_set_source="the pods file /etc/meshaccel/pods.yaml")
    status, payload = await put(client, body_of(1, 0))

    assert status == 409, payload
    assert "the pods file /etc/meshaccel/pods.yaml" in ErrorReply.model_validate(payload).error
    assert memory_maps.writes == 0


@pytest.mark.parametrize(
    ("capacities", "max_pods", "message", "reason"),
    [
        (Capacities(), 2, "3 pods; this agent holds at most 2", "more pods than max_pods"),
        (Capacities(pods=2), 1024, "3 pods; this agent holds at most 2", "than the pods map"),
        (Capacities(pod_ports=30), 1024, "pod_ports needs 39, holds 30", "more option entries"),
    ],
)
async def test_a_set_over_capacity_is_422_with_a_clear_message(
    make_memory_client: MakeClient,
    memory_reconciler_factory: MemoryReconcilerFactory,
    capacities: Capacities,
    max_pods: int,
    message: str,
    reason: str,
) -> None:
    reconciler = memory_reconciler_factory(capacities=capacities, max_pods=max_pods)
    client = await make_memory_client(reconciler)

    status, payload = await put(client, body_of(1, 0, 1, 2))

    assert status == 422, (reason, payload)
    assert message in payload["error"], reason
    assert reconciler.datapath.writes == 0, reason


# -- map failures: 5xx, rolled back --------------------------------------------------------------


async def test_a_map_full_during_the_apply_is_507_and_rolled_back(
    make_memory_client: MakeClient, memory_reconciler_factory: MemoryReconcilerFactory
) -> None:
    reconciler = memory_reconciler_factory(capacities=Capacities(pod_ports=14))
    maps = reconciler.datapath
    client = await make_memory_client(reconciler)
    first = pod_set(1, pod_spec(0, options=options(excluded_outbound_ports=[1000])))
    assert (await put(client, first.model_dump_json()))[0] == 200
    before = maps.dump()

    second = pod_set(2, pod_spec(0, options=options(excluded_outbound_ports=[2000])))
    status, payload = await put(client, second.model_dump_json())

    assert status == 507, payload
    assert "map pod_ports is full" in payload["error"]
    assert "every change was undone" in payload["error"]
    assert payload["applied_generation"] == 1
    assert maps.dump() == before


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
    assert memory_maps.read_pods() == programmed(memory_maps, 0, 2, 3, 4)


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
    assert memory_maps.read_pods() == programmed(memory_maps, 0, 2, 3, 4)


async def test_unexpected_errors_are_500_without_a_traceback(
    aiohttp_client: ClientFactory, memory_reconciler: MemoryReconciler
) -> None:
    app = create_app(cast(Reconciler, memory_reconciler), tls=None, retry_interval=None)

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("secret internals")

    app.router.add_get("/v1/broken", broken)
    client = await aiohttp_client(app)

    response = await client.get("/v1/broken")

    assert response.status == 500
    text = await response.text()
    assert "secret" not in text and "Traceback" not in text
    assert "log" in ErrorReply.model_validate_json(text).error


# -- authentication --------------------------------------------------------------------------------

OTHER_IDENTITY = PKI.client_context(
    PKI.issue_client("urn:meshaccel:someone-else"), check_hostname=False
)


@pytest.mark.parametrize(
    ("context", "reason"),
    [
        (PKI.anonymous_context(), "no client certificate (a pod, kubelet)"),
        (OTHER_IDENTITY, "a certificate of the CA that does not name the operator"),
    ],
)
async def test_v1_needs_the_operators_certificate(
    client: Client, memory_maps: MemoryPodMaps, context: ssl.SSLContext, reason: str
) -> None:
    for method, path in (("PUT", "/v1/pods"), ("GET", "/v1/pods"), ("GET", "/v1/health")):
        response = await client.request(
            method,
            path,
            data=body_of(1, 0),
            ssl=context,
            headers={"Content-Type": "application/json"},
        )
        assert response.status == 403, (method, path, reason)
        assert "operator" in ErrorReply.model_validate(await response.json()).error, reason
    assert memory_maps.writes == 0, reason
    # The operator's own certificate, on the same server, is let in.
    status, payload = await put(client, body_of(1, 0))
    assert status == 200, payload
    assert memory_maps.read_pods() == programmed(memory_maps, 0)


async def test_the_probe_is_open_and_tells_nothing_of_the_set(
    client: Client, memory_reconciler: MemoryReconciler
) -> None:
    assert (await put(client, body_of(7, 0)))[0] == 200
    response = await client.get("/healthz", ssl=PKI.anonymous_context())
    assert response.status == 200
    assert (await response.json())["status"] == "ok"
    text = await response.text()
    assert memory_reconciler.boot_id not in text and str(pod_ip(0)) not in text


async def test_without_tls_nothing_is_asked(make_memory_client: MakeClient) -> None:
    client = await make_memory_client(tls=None)
    assert (await put(client, body_of(1, 0)))[0] == 200
    health = HealthReply.model_validate(await (await client.get("/v1/health")).json())
    assert health.trust_bundle is None


async def test_the_operators_probe_names_the_boot_the_set_and_the_trust(
    client: Client, memory_reconciler: MemoryReconciler, server_tls: ServerTLS
) -> None:
    health = HealthReply.model_validate(await (await client.get("/v1/health")).json())
    assert health.boot_id == memory_reconciler.boot_id
    assert (health.applied_epoch, health.applied_generation) == (0, None)
    assert health.trust_bundle == server_tls.trust_bundle == bundle_fingerprint(PKI.ca.pem)
    body = PodSet(epoch=4, generation=2, pods=[pod_spec(0)]).model_dump_json()
    status, payload = await put(client, body)
    assert status == 200 and payload["boot_id"] == memory_reconciler.boot_id

    health = HealthReply.model_validate(await (await client.get("/v1/health")).json())
    assert (health.applied_epoch, health.applied_generation) == (4, 2)


# -- the background task -------------------------------------------------------------------------


async def test_the_background_task_programs_late_pods_and_removes_vanished_ones(
    make_memory_client: MakeClient, memory_maps: MemoryPodMaps, memory_resolver: FakeResolver
) -> None:
    client = await make_memory_client(retry_interval=0.01)
    late = memory_resolver.cgroups.pop(uid(1))
    status, payload = await put(client, body_of(1, 0, 1))
    assert status == 200 and [u["uid"] for u in payload["unresolved"]] == [uid(1)]

    async def listed() -> PodsReply:
        return PodsReply.model_validate(await (await client.get("/v1/pods")).json())

    async def unresolved_now(uids: list[str]) -> PodsReply | None:
        reply = await listed()
        return reply if [u.uid for u in reply.unresolved] == uids else None

    memory_resolver.cgroups[uid(1)] = late
    await wait_for(lambda: unresolved_now([]), what="pod 1 programmed")
    assert memory_maps.read_pods() == programmed(memory_maps, 0, 1)

    del memory_resolver.cgroups[uid(0)]  # its cgroup is gone
    reply = await wait_for(lambda: unresolved_now([uid(0)]), what="pod 0 removed")
    assert reply is not None and "is gone" in reply.unresolved[0].reason
    assert memory_maps.read_pods() == programmed(memory_maps, 1)


# -- hostile bodies ------------------------------------------------------------------------------


class FuzzCheck:
    """Sends a body; a refusal must write nothing, an accepted set leave exactly its pods."""

    def __init__(self, client: Client, maps: MemoryPodMaps, reconciler: MemoryReconciler) -> None:
        self.client, self.maps, self.reconciler = client, maps, reconciler
        self.generation = reconciler.applied_generation

    async def send(self, body: bytes, resolver: FakeResolver) -> None:
        writes = self.maps.writes
        response = await self.client.put(
            "/v1/pods", data=body, headers={"Content-Type": "application/json"}
        )
        assert response.status < 500, await response.text()
        event(f"HTTP {response.status}")
        assert response.content_type == "application/json"
        payload = await response.json()
        if response.status >= 400:
            ErrorReply.model_validate(payload)
            assert self.maps.writes == writes, payload
            assert self.reconciler.applied_generation == self.generation
            return
        result = ApplyResult.model_validate(payload)
        sent = PodSet.model_validate_json(body)
        unresolved = {u.uid for u in result.unresolved}
        expected = {
            resolver.cgroups[p.uid]: accelerated_pod(p, resolver.cgroups[p.uid])
            for p in sent.pods
            if p.uid not in unresolved
        }
        assert self.maps.read_pods() == ProgrammedPods(expected, orphans={})
        self.generation = sent.generation


@pytest.fixture
async def fuzz(
    client: Client, memory_maps: MemoryPodMaps, memory_reconciler: MemoryReconciler
) -> FuzzCheck:
    status, payload = await put(client, body_of(10, 0, 1, 2))
    assert status == 200, payload
    return FuzzCheck(client, memory_maps, memory_reconciler)


@FUZZ
@given(document=pod_sets)
async def test_fuzz_pod_shaped_bodies(
    fuzz: FuzzCheck, memory_resolver: FakeResolver, document: dict[str, Any]
) -> None:
    await fuzz.send(json.dumps(document).encode(), memory_resolver)


@FUZZ
@given(document=near_valid_sets())
async def test_fuzz_nearly_valid_sets(
    fuzz: FuzzCheck, memory_resolver: FakeResolver, document: dict[str, Any]
) -> None:
    delta = document.pop("generation_delta")
    document.setdefault("generation", (fuzz.generation or 0) + delta)
    await fuzz.send(json.dumps(document).encode(), memory_resolver)


@FUZZ
@given(document=json_values)
async def test_fuzz_any_json(fuzz: FuzzCheck, memory_resolver: FakeResolver, document: Any) -> None:
    await fuzz.send(json.dumps(document).encode(), memory_resolver)


@FUZZ
@given(body=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
async def test_fuzz_any_bytes(fuzz: FuzzCheck, memory_resolver: FakeResolver, body: bytes) -> None:
    await fuzz.send(body, memory_resolver)
