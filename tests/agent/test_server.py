"""The agent's HTTP API: the real app (``create_app``) served over mutual TLS by aiohttp's test
server (pytest-aiohttp client).

The shared tests run twice (the ``store`` fixture): with the reconciler writing the kernel's
maps, a real datapath attached to the test's own cgroup (the proof; root), and the in-memory
ones (no root). A refused request (4xx) writes nothing (hostile bodies generated with
hypothesis), a map failure is a 5xx with every change undone, and /v1 answers the operator's
client certificate only. What only a datapath answers (/readyz, /v1/status, /metrics) and real
traffic between two netlab pods with Envoy sidecars are kernel tests; failing writes on demand
are ``test_server_logic.py``'s.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from ipaddress import IPv4Address, IPv6Address
from typing import Any, cast

import pytest
from aiohttp import web
from hypothesis import event, given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, ValidationError

from meshaccel.agent import layout, libbpf
from meshaccel.agent.datapath import CGROUP_HOOKS, Datapath
from meshaccel.agent.layout import AppReuse, AppReuseLimits, Counter
from meshaccel.agent.listener import Limits
from meshaccel.agent.metrics import DATAPATH_FAMILIES
from meshaccel.agent.pods import AcceleratedPod, ProgrammedPods
from meshaccel.agent.reconcile import Reconciler, accelerated_pod
from meshaccel.agent.server import DatapathInfo, create_app
from meshaccel.agent.tls import ServerTLS
from meshaccel.contract.api import (
    ApplyResult,
    ErrorReply,
    HealthReply,
    PodSet,
    PodsReply,
    StatusReply,
)
from meshaccel.contract.settings import Capacities
from meshaccel.contract.tls import bundle_fingerprint
from meshaccel.contract.version import VERSION
from tests.agent.conftest import (
    PKI,
    Client,
    ClientFactory,
    FakeResolver,
    MakeClient,
    Store,
    body_of,
    options,
    pod_ip,
    pod_ipv6,
    pod_set,
    pod_spec,
    put,
    uid,
)
from tests.agent.hostile_bodies import (
    FUZZ,
    MALFORMED_BODIES,
    json_values,
    near_valid_sets,
    pod_sets,
)
from tests.datapath.conftest import load_datapath, unload_quietly
from tests.netlab import ECHO_PORT, EXCLUDED_PORT, Node, Pod
from tests.waiting import wait_for


@pytest.fixture
async def client(make_store_client: MakeClient) -> Client:
    """A client of the app over the test's store (both runs)."""
    return await make_store_client()


async def error_of(response: Any) -> ErrorReply:
    assert response.content_type == "application/json", await response.text()
    return ErrorReply.model_validate(await response.json())


# -- applying sets -------------------------------------------------------------------------------


async def test_put_applies_the_set_and_get_lists_it(client: Client, store: Store) -> None:
    status, payload = await put(client, body_of(3, 0, 1, 2))

    assert status == 200, payload
    result = ApplyResult.model_validate(payload)
    assert (result.applied_generation, result.added) == (3, 3)
    assert store.maps.read_pods() == store.programmed(*(pod_spec(i) for i in range(3)))

    response = await client.get("/v1/pods")
    listed = PodsReply.model_validate(await response.json())
    assert listed.applied_generation == 3
    assert [(p.uid, p.ip, p.cgroup_id) for p in listed.pods] == [
        (uid(i), pod_ip(i), store.cgroup(i)) for i in range(3)
    ]


async def test_a_dual_stack_pod_is_programmed_and_listed_with_both_addresses(
    client: Client, store: Store
) -> None:
    dual, only6 = pod_spec(0, dual_stack=True), pod_spec(1, ip=pod_ipv6(1))
    status, payload = await put(client, pod_set(2, dual, only6).model_dump_json())

    assert status == 200, payload
    assert store.maps.read_pods() == store.programmed(dual, only6)
    assert store.addresses() == {
        pod_ip(0): store.cgroup(0),
        pod_ipv6(0): store.cgroup(0),
        pod_ipv6(1): store.cgroup(1),
    }
    response = await client.get("/v1/pods")
    listed = PodsReply.model_validate(await response.json())
    assert [(p.uid, p.addresses) for p in listed.pods] == [
        (uid(0), (pod_ip(0), pod_ipv6(0))),
        (uid(1), (pod_ipv6(1),)),
    ]


@pytest.mark.parametrize(
    ("generation", "indexes", "reason"),
    [
        (4, [0], "stale: lower than the applied 5"),
        (5, [0], "conflict: generation 5 with another set"),
    ],
)
async def test_a_stale_or_conflicting_generation_is_409_and_writes_nothing(
    client: Client, store: Store, generation: int, indexes: list[int], reason: str
) -> None:
    assert (await put(client, body_of(5, 0, 1)))[0] == 200
    mark = store.mark()

    status, payload = await put(client, body_of(generation, *indexes))

    assert status == 409, reason
    error = ErrorReply.model_validate(payload)
    assert (error.applied_generation, error.applied_epoch) == (5, 0), reason
    assert store.written_since(mark) == {}, reason
    assert store.maps.read_pods() == store.programmed(pod_spec(0), pod_spec(1)), reason
    # The identical set at the applied generation is a success that writes nothing.
    status, payload = await put(client, body_of(5, 1, 0))
    assert status == 200 and payload["added"] == payload["removed"] == 0
    assert store.written_since(mark) == {}


async def test_a_standalone_agent_refuses_pushed_sets(
    make_store_client: MakeClient, store: Store
) -> None:
    client = await make_store_client(pod_set_source="the pods file /etc/meshaccel/pods.yaml")
    mark = store.mark()
    status, payload = await put(client, body_of(1, 0))

    assert status == 409, payload
    assert "the pods file /etc/meshaccel/pods.yaml" in ErrorReply.model_validate(payload).error
    assert store.written_since(mark) == {}
    assert store.maps.read_pods() == store.programmed()


# -- refusals: 4xx, nothing written --------------------------------------------------------------


@pytest.mark.parametrize(("body", "status", "loc", "reason"), MALFORMED_BODIES)
async def test_malformed_bodies_are_4xx_with_the_field_and_write_nothing(
    client: Client,
    store: Store,
    body: str | bytes,
    status: int,
    loc: list[object] | None,
    reason: str,
) -> None:
    await put(client, body_of(0, 0))
    mark = store.mark()

    got, payload = await put(client, body)

    assert got == status, (reason, payload)
    error = ErrorReply.model_validate(payload)
    if loc is None:
        assert error.detail is None, reason
    else:
        assert error.detail and error.detail[0]["loc"] == loc, (reason, error.detail)
        assert "input" not in error.detail[0], reason  # hostile input is never echoed
    assert store.written_since(mark) == {}, reason
    assert store.maps.read_pods() == store.programmed(pod_spec(0)), reason


async def test_a_body_that_is_not_json_content_is_415(client: Client, store: Store) -> None:
    mark = store.mark()
    status, payload = await put(client, body_of(1, 0), **{"Content-Type": "text/plain"})
    assert status == 415, payload
    assert "application/json" in ErrorReply.model_validate(payload).error
    assert store.written_since(mark) == {}


async def test_a_body_over_the_limit_is_413(make_store_client: MakeClient, store: Store) -> None:
    client = await make_store_client(limits=Limits(max_body_bytes=4096))
    mark = store.mark()
    status, payload = await put(client, body_of(1, *range(16)) + " " * 8192)

    assert status == 413
    assert "4096" in ErrorReply.model_validate(payload).error
    assert store.written_since(mark) == {}
    assert store.maps.read_pods() == store.programmed()


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
    client: Client, store: Store, method: str, path: str, allowed: set[str]
) -> None:
    mark = store.mark()
    response = await client.request(method, path, data=body_of(1, 0))

    assert response.status == 405, (method, path)
    assert allowed <= set(response.headers["Allow"].split(",")), response.headers["Allow"]
    await error_of(response)
    assert store.written_since(mark) == {}


async def test_an_unknown_path_is_a_json_404(client: Client) -> None:
    response = await client.get("/v2/pods")
    assert response.status == 404
    await error_of(response)


@pytest.mark.parametrize(
    ("capacities", "max_pods", "message", "reason"),
    [
        (Capacities(), 2, "3 pods; this agent holds at most 2", "more pods than max_pods"),
        (Capacities(pods=2), 1024, "3 pods; this agent holds at most 2", "than the pods map"),
        (Capacities(pod_ports=30), 1024, "pod_ports needs 39, holds 30", "more option entries"),
    ],
)
async def test_a_set_over_capacity_is_422_with_a_clear_message(
    make_store_client: MakeClient,
    store: Store,
    capacities: Capacities,
    max_pods: int,
    message: str,
    reason: str,
) -> None:
    reconciler = store.make(capacities, max_pods=max_pods)
    client = await make_store_client(reconciler)
    mark = store.mark(reconciler.datapath)

    status, payload = await put(client, body_of(1, 0, 1, 2))

    assert status == 422, (reason, payload)
    assert message in payload["error"], reason
    assert store.written_since(mark) == {}, reason
    assert reconciler.datapath.read_pods() == store.programmed(), reason


# -- map failures: 5xx, rolled back --------------------------------------------------------------


async def test_a_map_full_during_the_apply_is_507_and_rolled_back(
    make_store_client: MakeClient, store: Store
) -> None:
    reconciler = store.make(Capacities(pod_ports=14))
    maps = reconciler.datapath
    client = await make_store_client(reconciler)
    first = pod_set(1, pod_spec(0, options=options(excluded_outbound_ports=[1000])))
    assert (await put(client, first.model_dump_json()))[0] == 200
    before = store.entries(maps)

    second = pod_set(2, pod_spec(0, options=options(excluded_outbound_ports=[2000])))
    status, payload = await put(client, second.model_dump_json())

    assert status == 507, payload
    assert "map pod_ports is full" in payload["error"]
    assert "every change was undone" in payload["error"]
    assert payload["applied_generation"] == 1
    assert store.entries(maps) == before
    assert maps.read_pods() == store.programmed(*first.pods)


async def test_unexpected_errors_are_500_without_a_traceback(
    aiohttp_client: ClientFactory, store: Store
) -> None:
    app = create_app(cast(Reconciler, store.reconciler), tls=None, retry_interval=None)

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
    client: Client, store: Store, context: ssl.SSLContext, reason: str
) -> None:
    mark = store.mark()
    for method, path in (
        ("PUT", "/v1/pods"),
        ("GET", "/v1/pods"),
        ("GET", "/v1/status"),
        ("GET", "/v1/health"),
    ):
        response = await client.request(
            method,
            path,
            data=body_of(1, 0),
            ssl=context,
            headers={"Content-Type": "application/json"},
        )
        assert response.status == 403, (method, path, reason)
        assert "operator" in (await error_of(response)).error, reason
    assert store.written_since(mark) == {}, reason
    assert store.maps.read_pods() == store.programmed(), reason
    # The operator's own certificate, on the same server, is let in.
    status, payload = await put(client, body_of(1, 0))
    assert status == 200, payload
    assert store.maps.read_pods() == store.programmed(pod_spec(0))


async def test_without_tls_nothing_is_asked(make_store_client: MakeClient) -> None:
    client = await make_store_client(tls=None)
    assert (await client.get("/v1/pods")).status == 200
    assert (await put(client, body_of(1, 0)))[0] == 200
    health = HealthReply.model_validate(await (await client.get("/v1/health")).json())
    assert health.trust_bundle is None


async def test_the_probe_is_open_and_tells_nothing_of_the_set(client: Client, store: Store) -> None:
    assert (await put(client, body_of(7, 0)))[0] == 200
    response = await client.get("/healthz", ssl=PKI.anonymous_context())
    assert response.status == 200
    assert (await response.json()) == {"status": "ok", "version": VERSION}
    text = await response.text()
    assert store.reconciler.boot_id not in text and str(pod_ip(0)) not in text


async def test_the_operators_probe_names_the_boot_the_set_and_the_trust(
    client: Client, store: Store, server_tls: ServerTLS
) -> None:
    health = HealthReply.model_validate(await (await client.get("/v1/health")).json())
    assert health.boot_id == store.reconciler.boot_id
    assert (health.applied_epoch, health.applied_generation) == (0, None)  # none yet
    assert health.trust_bundle == server_tls.trust_bundle == bundle_fingerprint(PKI.ca.pem)
    body = PodSet(epoch=4, generation=2, pods=[pod_spec(0)]).model_dump_json()
    status, payload = await put(client, body)
    assert status == 200 and payload["boot_id"] == store.reconciler.boot_id

    health = HealthReply.model_validate(await (await client.get("/v1/health")).json())
    assert (health.applied_epoch, health.applied_generation) == (4, 2)


# -- two writers: epochs ---------------------------------------------------------------------------


class _PreEpochErrorReply(BaseModel):
    """ErrorReply as an operator that predates epochs has it: strict, no applied_epoch."""

    model_config = ConfigDict(extra="forbid")
    error: str
    detail: list[dict[str, object]] | None = None
    applied_generation: int | None = None


class _PreEpochApplyResult(BaseModel):
    model_config = ConfigDict(extra="forbid")
    applied_generation: int
    added: int
    updated: int
    removed: int
    unresolved: list[dict[str, object]]
    duration_ms: float
    boot_id: str


async def test_a_set_from_an_ended_term_is_409_with_the_applied_epoch_only(
    client: Client, store: Store
) -> None:
    leader = PodSet(epoch=3, generation=1, pods=[pod_spec(0)]).model_dump_json()
    assert (await put(client, leader))[0] == 200
    mark = store.mark()

    stale = PodSet(epoch=2, generation=99, pods=[pod_spec(1)]).model_dump_json()
    status, payload = await put(client, stale)

    assert status == 409
    error = ErrorReply.model_validate(payload)
    assert error.applied_epoch == 3 and "another operator replica leads" in error.error
    # No generation to go above: a client must not retry (see ErrorReply).
    assert error.applied_generation is None
    # An operator that predates epochs cannot parse it, and so takes the 409 as final.
    with pytest.raises(ValidationError, match="applied_epoch"):
        _PreEpochErrorReply.model_validate(payload)
    assert store.written_since(mark) == {}
    assert store.maps.read_pods() == store.programmed(pod_spec(0))
    # A newer term is taken with any generation.
    newer = PodSet(epoch=4, generation=1, pods=[pod_spec(1)]).model_dump_json()
    status, payload = await put(client, newer)
    assert status == 200 and payload["applied_epoch"] == 4
    assert store.maps.read_pods() == store.programmed(pod_spec(1))


async def test_an_operator_that_predates_epochs_still_works(client: Client) -> None:
    """Its sets carry no epoch (epoch 0) and its strict models parse every reply."""

    def old_body(generation: int, index: int) -> str:
        return pod_set(generation, pod_spec(index)).model_dump_json(exclude={"epoch"})

    status, payload = await put(client, old_body(7, 0))
    assert status == 200 and "applied_epoch" not in payload
    _PreEpochApplyResult.model_validate(payload)
    status, payload = await put(client, old_body(6, 1))
    assert status == 409 and set(payload) == {"error", "detail", "applied_generation"}
    assert _PreEpochErrorReply.model_validate(payload).applied_generation == 7

    # A leader's set (any epoch above 0) ends that: the old operator is refused from then on.
    leader = PodSet(epoch=1, generation=1, pods=[pod_spec(0)]).model_dump_json()
    assert (await put(client, leader))[0] == 200
    status, payload = await put(client, old_body(8, 1))
    assert status == 409 and payload["applied_epoch"] == 1


# -- the background task -------------------------------------------------------------------------


async def test_the_background_task_programs_late_pods_and_removes_vanished_ones(
    make_store_client: MakeClient, store: Store
) -> None:
    client = await make_store_client(retry_interval=0.01)
    late = store.resolver.cgroups.pop(uid(1))
    status, payload = await put(client, body_of(1, 0, 1))
    assert status == 200 and [u["uid"] for u in payload["unresolved"]] == [uid(1)]

    async def unresolved_now(uids: list[str]) -> PodsReply | None:
        reply = PodsReply.model_validate(await (await client.get("/v1/pods")).json())
        return reply if [u.uid for u in reply.unresolved] == uids else None

    store.resolver.cgroups[uid(1)] = late
    reply = await wait_for(lambda: unresolved_now([]), what="pod 1 programmed")
    assert reply is not None and [p.uid for p in reply.pods] == [uid(0), uid(1)]
    assert store.maps.read_pods() == store.programmed(pod_spec(0), pod_spec(1))

    del store.resolver.cgroups[uid(0)]  # its cgroup is gone
    reply = await wait_for(lambda: unresolved_now([uid(0)]), what="pod 0 removed")
    assert reply is not None and "is gone" in reply.unresolved[0].reason
    assert store.maps.read_pods() == store.programmed(pod_spec(1))


# -- hostile bodies ------------------------------------------------------------------------------


class FuzzCheck:
    """Sends a body; a refusal must write nothing, an accepted set leave exactly its pods."""

    def __init__(self, client: Client, store: Store) -> None:
        self.client, self.store = client, store
        self.generation = store.reconciler.applied_generation

    async def send(self, body: bytes) -> None:
        mark = self.store.mark()
        response = await self.client.put(
            "/v1/pods", data=body, headers={"Content-Type": "application/json"}
        )
        assert response.status < 500, await response.text()
        event(f"HTTP {response.status}")  # --hypothesis-show-statistics shows the mix
        assert response.content_type == "application/json"
        payload = await response.json()
        if response.status >= 400:
            ErrorReply.model_validate(payload)
            assert self.store.written_since(mark) == {}, payload
            assert self.store.reconciler.applied_generation == self.generation
            return
        # Accepted: the maps hold exactly the resolvable pods of the set, nothing else.
        result = ApplyResult.model_validate(payload)
        sent = PodSet.model_validate_json(body)
        unresolved = {u.uid for u in result.unresolved}
        cgroups = self.store.resolver.cgroups
        expected: dict[int, AcceleratedPod] = {
            cgroups[p.uid]: accelerated_pod(p, cgroups[p.uid])
            for p in sent.pods
            if p.uid not in unresolved
        }
        assert self.store.maps.read_pods() == ProgrammedPods(expected, orphans={})
        self.generation = sent.generation


@pytest.fixture
async def fuzz(client: Client, store: Store) -> FuzzCheck:
    status, payload = await put(client, body_of(10, 0, 1, 2))
    assert status == 200, payload
    return FuzzCheck(client, store)


@FUZZ
@given(document=pod_sets)
async def test_fuzz_pod_shaped_bodies(fuzz: FuzzCheck, document: dict[str, Any]) -> None:
    await fuzz.send(json.dumps(document).encode())


@FUZZ
@given(document=near_valid_sets())
async def test_fuzz_nearly_valid_sets(fuzz: FuzzCheck, document: dict[str, Any]) -> None:
    delta = document.pop("generation_delta")
    document.setdefault("generation", (fuzz.generation or 0) + delta)
    await fuzz.send(json.dumps(document).encode())


@FUZZ
@given(document=json_values)
async def test_fuzz_any_json(fuzz: FuzzCheck, document: Any) -> None:
    await fuzz.send(json.dumps(document).encode())


@FUZZ
@given(body=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
async def test_fuzz_any_bytes(fuzz: FuzzCheck, body: bytes) -> None:
    await fuzz.send(body)


# -- what only a datapath answers: probes, status, metrics ----------------------------------------


@pytest.mark.kernel
async def test_readyz_waits_for_the_first_set_and_the_attachments(
    make_client: MakeClient, datapath: Datapath
) -> None:
    """Open, it says ready or not and nothing else; why not is /v1/status's."""
    client = await make_client()

    async def why() -> str | None:
        status = StatusReply.model_validate(await (await client.get("/v1/status")).json())
        return status.not_ready

    before = await client.get("/readyz")
    assert before.status == 503
    assert await before.json() == {"error": "not ready", "detail": None, "applied_generation": None}
    assert "no pod set" in (await why() or "")

    await put(client, body_of(1))  # an empty set is a set

    after = await client.get("/readyz")
    assert after.status == 200
    assert (await after.json()) == {"status": "ok"}
    assert await why() is None

    Datapath.adopt(instance=datapath.pins.root.name, pin_root=datapath.pins.root.parent).unload(0)
    gone = await client.get("/readyz")
    assert gone.status == 503
    assert (await error_of(gone)).error == "not ready"
    assert "not attached" in (await why() or "")


@pytest.mark.kernel
async def test_probes_and_metrics_are_open_the_rest_is_not(make_client: MakeClient) -> None:
    client = await make_client()
    anonymous = PKI.anonymous_context()
    assert (await client.get("/healthz", ssl=anonymous)).status == 200
    assert (await client.get("/readyz", ssl=anonymous)).status in (200, 503)
    assert (await client.get("/metrics", ssl=anonymous)).status == 200
    assert (await client.get("/v1/status", ssl=anonymous)).status == 403
    assert (await client.get("/v1/health", ssl=anonymous)).status == 403

    closed = await make_client(metrics_require_auth=True)
    assert (await closed.get("/metrics", ssl=anonymous)).status == 403
    assert (await closed.get("/metrics")).status == 200


@pytest.mark.kernel
async def test_status_reports_attachments_generation_and_counters(
    make_client: MakeClient, datapath: Datapath, reconciler: Reconciler, resolver: FakeResolver
) -> None:
    cgroup = datapath.pins.root  # any path: the status only reports what it was told
    client = await make_client(datapath_info=DatapathInfo(attach_cgroup=cgroup))
    resolver.cgroups.pop(uid(2))
    await put(client, body_of(4, 0, 1, 2))

    response = await client.get("/v1/status")
    status = StatusReply.model_validate(await response.json())

    assert status.attached
    assert {p.hook for p in status.programs} == {h.link for h in CGROUP_HOOKS} | {"sk_msg"}
    assert all(p.attached and p.program_id for p in status.programs)
    assert status.attach_cgroup == str(cgroup)
    assert all(status.kernel_features.values()), status.kernel_features
    assert status.applied_generation == 4 and status.last_apply_time is not None
    assert status.boot_id == reconciler.boot_id
    assert status.pods_accelerated == 2
    assert [u.uid for u in status.unresolved] == [uid(2)]
    assert status.counters is not None
    assert set(status.counters) == {c.metric_name for c in Counter}
    maps = {m.name: (m.entries, m.max_entries) for m in status.maps}
    assert maps["pods"] == (2, Capacities().pods)
    assert maps["pod_ports"] == (26, Capacities().pod_ports)
    assert status.apply_errors == 0


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.kernel
async def test_metrics_parse_and_carry_the_counters_and_the_reconciler_state(
    make_client: MakeClient,
) -> None:
    client = await make_client()
    before = metric_samples(await (await client.get("/metrics")).text())
    assert ("meshaccel_agent_applied_generation", ()) not in before
    assert before[("meshaccel_agent_pods_accelerated", ())] == 0

    await put(client, body_of(9, 0, 1))
    await put(client, body_of(8, 0))  # stale: an error

    response = await client.get("/metrics")
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = metric_samples(await response.text())

    for family in DATAPATH_FAMILIES:
        for value in family.members.values():
            labels = ((family.label, value),) if family.label else ()
            assert (f"{family.name}_total", labels) in samples, (family.name, value)
    for reason in ("budget", "receiver_unknown", "redirect_failed", "draining"):
        assert samples[("meshaccel_datapath_fallbacks_total", (("reason", reason),))] == 0
    assert samples[("process_resident_memory_bytes", ())] > 0
    assert samples[("meshaccel_datapath_attached", ())] == 1
    assert samples[("meshaccel_agent_pods_accelerated", ())] == 2
    assert samples[("meshaccel_agent_applied_generation", ())] == 9
    assert samples[("meshaccel_agent_applied_epoch", ())] == 0  # an operator without epochs
    assert samples[("meshaccel_agent_last_apply_timestamp_seconds", ())] > 1.7e9
    assert samples[("meshaccel_agent_apply_errors_total", (("reason", "stale_generation"),))] == 1
    assert samples[("meshaccel_agent_apply_duration_seconds_count", ())] == 1
    assert samples[("meshaccel_agent_map_entries", (("map", "pods"),))] == 2
    assert samples[("meshaccel_datapath_short_lived_pod_addresses", ())] == 0


@pytest.mark.kernel
async def test_metrics_count_the_pod_addresses_whose_connections_are_short_lived(
    make_client: MakeClient, datapath: Datapath
) -> None:
    """Records as sk_msg and connect4 leave them in app_reuse: one short-lived, one whose
    connections are reused, one paused (its next connect starts it over). Only the count is
    exported: /metrics names no pod."""
    client = await make_client()
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    # The short-lived pod's last connect is stamped ahead of the scrape, as one made while the
    # agent reads the map would be: no stall of the test machine can turn it into a pause.
    ahead, paused = now + 3600 * 10**9, now - 2 * AppReuseLimits.APP_REUSE_PAUSE_NS
    records: dict[IPv4Address | IPv6Address, AppReuse] = {
        pod_ip(0): AppReuse(connections=30, reused=1, last_connect_ns=ahead),
        pod_ipv6(0): AppReuse(connections=30, reused=30, last_connect_ns=ahead),
        pod_ip(1): AppReuse(connections=30, reused=1, last_connect_ns=paused),
    }
    with libbpf.Map.from_pin(datapath.pins.map("app_reuse")) as app_reuse:
        for ip, record in records.items():
            app_reuse.update(bytes(layout.address(ip)), bytes(record))

    text = await (await client.get("/metrics")).text()

    assert metric_samples(text)[("meshaccel_datapath_short_lived_pod_addresses", ())] == 1
    assert str(pod_ip(0)) not in text


# -- end to end, with traffic ----------------------------------------------------------------


def mesh_pod_spec(pod: Pod) -> dict[str, Any]:
    """A netlab pod as the operator would send it (9090 excluded both ways, as its iptables)."""
    return {
        "uid": f"uid-{pod.name}",
        "namespace": "default",
        "name": pod.name,
        "ip": str(pod.ip),
        "options": {
            "excluded_outbound_ports": [EXCLUDED_PORT],
            "excluded_inbound_ports": [EXCLUDED_PORT],
        },
    }


async def echo(client_pod: Pod, server_pod: Pod) -> None:
    result = await asyncio.to_thread(
        client_pod.echo_client, str(server_pod.ip), ECHO_PORT, nbytes=64 * 1024
    )
    assert result.ok, result.raw


@pytest.mark.kernel
@pytest.mark.slow
async def test_the_applied_set_decides_which_pods_are_accelerated(
    aiohttp_client: ClientFactory, netlab_node: Node
) -> None:
    a, b = netlab_node.pods["a"], netlab_node.pods["b"]
    instance = f"{netlab_node.token}-agent"
    datapath = await asyncio.to_thread(load_datapath, netlab_node, instance=instance)
    resolver = FakeResolver({f"uid-{p.name}": p.cgroup_id for p in (a, b)})
    reconciler = Reconciler(datapath, resolver, max_pods=64)
    try:
        client = await aiohttp_client(create_app(reconciler, tls=None, retry_interval=None))

        async def apply(generation: int, *members: Pod) -> None:
            body = json.dumps(
                {"generation": generation, "pods": [mesh_pod_spec(p) for p in members]}
            )
            status, payload = await put(client, body)
            assert status == 200, payload

        async def call_b() -> dict[Counter, int]:
            before = datapath.counters()
            await echo(a, b)
            return {c: n - before[c] for c, n in datapath.counters().items()}

        await apply(1, a, b)
        both = await call_b()
        assert both[Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED] == 1  # app a -> Envoy a
        assert both[Counter.COUNTER_CONNECT_INBOUND_REDIRECTED] == 1  # Envoy a -> Envoy b
        assert both[Counter.COUNTER_CONNECT_SIDECAR_TO_OWN_POD] == 1  # Envoy b -> app b
        assert both[Counter.COUNTER_MSG_REDIRECTED] > 0
        # /metrics carries the kernel's counters, each in its family's series.
        samples = metric_samples(await (await client.get("/metrics")).text())
        counters = datapath.counters()
        for family in DATAPATH_FAMILIES:
            for counter, value in family.members.items():
                labels = ((family.label, value),) if family.label else ()
                assert samples[(f"{family.name}_total", labels)] == counters[counter], counter
        redirected = ("meshaccel_datapath_messages_total", (("verdict", "redirected"),))
        assert samples[redirected] > 0
        assert samples[("meshaccel_datapath_redirected_bytes_total", ())] >= samples[redirected]

        await apply(2, a)  # b leaves the set
        only_a = await call_b()
        assert only_a[Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED] == 1  # a still is
        assert only_a[Counter.COUNTER_CONNECT_INBOUND_REDIRECTED] == 0
        assert only_a[Counter.COUNTER_CONNECT_SIDECAR_TO_OWN_POD] == 0
        assert only_a[Counter.COUNTER_BYPASS_SIDECAR_REMOTE_DESTINATION] == 1  # b: iptables
    finally:
        reconciler.close()
        datapath.close()
        await asyncio.to_thread(unload_quietly, netlab_node, instance=instance)
