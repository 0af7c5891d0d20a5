"""The agent's HTTP API, served by the real app over a real datapath (pytest-aiohttp client).

Hostile bodies are generated with hypothesis; after every refused request the datapath's maps
must read back exactly as before. The last test sends real traffic between two netlab pods
with Envoy sidecars and checks that the applied set decides which of them are accelerated.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any

import pytest
from aiohttp import web
from hypothesis import event, given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, ValidationError

from meshaccel.agent.datapath import CGROUP_HOOKS, Datapath
from meshaccel.agent.layout import Counter
from meshaccel.agent.listener import Limits
from meshaccel.agent.metrics import DATAPATH_FAMILIES
from meshaccel.agent.pods import AcceleratedPod
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
    DatapathFactory,
    FakeResolver,
    MakeClient,
    ReconcilerFactory,
    expected_pods,
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
from tests.datapath.conftest import load_datapath, unload_quietly
from tests.netlab import ECHO_PORT, EXCLUDED_PORT, Node, Pod

pytestmark = pytest.mark.kernel


@pytest.fixture
async def client(make_client: MakeClient) -> Client:
    return await make_client()


def body_of(specs_generation: int, *indexes: int) -> str:
    return pod_set(specs_generation, *(pod_spec(i) for i in indexes)).model_dump_json()


async def put(client: Client, body: str | bytes, **headers: str) -> tuple[int, dict[str, Any]]:
    response = await client.put(
        "/v1/pods", data=body, headers={"Content-Type": "application/json", **headers}
    )
    payload = await response.json()
    return response.status, payload


async def error_of(response: Any) -> ErrorReply:
    assert response.content_type == "application/json", await response.text()
    return ErrorReply.model_validate(await response.json())


# -- applying sets -------------------------------------------------------------------------------


async def test_put_applies_the_set_and_get_lists_it(
    client: Client, datapath: Datapath, resolver: FakeResolver
) -> None:
    status, payload = await put(client, body_of(3, 0, 1, 2))

    assert status == 200, payload
    result = ApplyResult.model_validate(payload)
    assert (result.applied_generation, result.added) == (3, 3)
    assert datapath.pods() == expected_pods(resolver, *(pod_spec(i) for i in range(3)))

    response = await client.get("/v1/pods")
    listed = PodsReply.model_validate(await response.json())
    assert listed.applied_generation == 3
    assert [(p.uid, p.ip, p.cgroup_id) for p in listed.pods] == [
        (uid(i), pod_ip(i), resolver.cgroups[uid(i)]) for i in range(3)
    ]


@pytest.mark.parametrize(
    ("generation", "indexes", "reason"),
    [
        (4, [0], "stale: lower than the applied 5"),
        (5, [0], "conflict: generation 5 with another set"),
    ],
)
async def test_stale_or_conflicting_generation_is_409(
    client: Client,
    datapath: Datapath,
    resolver: FakeResolver,
    generation: int,
    indexes: list[int],
    reason: str,
) -> None:
    assert (await put(client, body_of(5, 0, 1)))[0] == 200

    status, payload = await put(client, body_of(generation, *indexes))

    assert status == 409, reason
    error = ErrorReply.model_validate(payload)
    assert error.applied_generation == 5 and error.applied_epoch == 0, reason
    assert datapath.pods() == expected_pods(resolver, pod_spec(0), pod_spec(1)), reason
    # The identical set at the applied generation is a success that changes nothing.
    status, payload = await put(client, body_of(5, 1, 0))
    assert status == 200 and payload["added"] == payload["removed"] == 0


@pytest.mark.parametrize(("body", "status", "loc", "reason"), MALFORMED_BODIES)
async def test_malformed_bodies_are_4xx_with_the_field_and_change_nothing(
    client: Client,
    datapath: Datapath,
    resolver: FakeResolver,
    body: str | bytes,
    status: int,
    loc: list[object] | None,
    reason: str,
) -> None:
    await put(client, body_of(0, 0))

    got, payload = await put(client, body)

    assert got == status, (reason, payload)
    error = ErrorReply.model_validate(payload)
    if loc is None:
        assert error.detail is None, reason
    else:
        assert error.detail and error.detail[0]["loc"] == loc, (reason, error.detail)
        assert "input" not in error.detail[0], reason  # hostile input is never echoed
    assert datapath.pods() == expected_pods(resolver, pod_spec(0)), reason


async def test_a_standalone_agent_refuses_pushed_sets(
    make_client: MakeClient, datapath: Datapath
) -> None:
    client = await make_client(pod_set_source="the pods file /etc/meshaccel/pods.yaml")
    status, payload = await put(client, body_of(1, 0))

    assert status == 409, payload
    assert "the pods file /etc/meshaccel/pods.yaml" in ErrorReply.model_validate(payload).error
    assert datapath.pods() == {}


async def test_non_json_content_type_is_415(client: Client) -> None:
    status, payload = await put(client, body_of(1, 0), **{"Content-Type": "text/plain"})
    assert status == 415, payload


async def test_a_body_over_the_limit_is_413(make_client: MakeClient, datapath: Datapath) -> None:
    client = await make_client(limits=Limits(max_body_bytes=4096))
    status, payload = await put(client, body_of(1, *range(16)) + " " * 8192)

    assert status == 413
    assert "4096" in ErrorReply.model_validate(payload).error
    assert datapath.pods() == {}


async def test_a_set_over_capacity_is_422_with_a_clear_message(
    make_client: MakeClient,
    datapath: Datapath,
    reconciler_factory: ReconcilerFactory,
) -> None:
    client = await make_client(reconciler_factory(datapath, max_pods=2))

    status, payload = await put(client, body_of(1, 0, 1, 2))

    assert status == 422
    assert "3 pods; this agent holds at most 2" in payload["error"]
    assert datapath.pods() == {}


async def test_a_map_full_during_the_apply_is_507_and_rolled_back(
    make_client: MakeClient,
    datapath_factory: DatapathFactory,
    reconciler_factory: ReconcilerFactory,
    resolver: FakeResolver,
) -> None:
    datapath = datapath_factory(Capacities(pod_ports=14))
    client = await make_client(reconciler_factory(datapath))
    first = pod_set(1, pod_spec(0, options={"excluded_outbound_ports": [1000]}))
    assert (await put(client, first.model_dump_json()))[0] == 200

    second = pod_set(2, pod_spec(0, options={"excluded_outbound_ports": [2000]}))
    status, payload = await put(client, second.model_dump_json())

    assert status == 507, payload
    assert "every change was undone" in payload["error"]
    assert payload["applied_generation"] == 1
    assert datapath.pods() == expected_pods(resolver, *first.pods)


async def test_unknown_paths_and_methods_get_json_errors(client: Client) -> None:
    missing = await client.get("/v2/pods")
    assert missing.status == 404
    await error_of(missing)

    wrong = await client.post("/v1/pods")
    assert wrong.status == 405
    assert "PUT" in wrong.headers["Allow"]
    await error_of(wrong)


async def test_unexpected_errors_are_500_without_a_traceback(
    aiohttp_client: ClientFactory, reconciler: Reconciler
) -> None:
    app = create_app(reconciler, tls=None, retry_interval=None)

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("secret internals")

    app.router.add_get("/v1/broken", broken)
    client = await aiohttp_client(app)

    response = await client.get("/v1/broken")

    assert response.status == 500
    text = await response.text()
    assert "secret" not in text and "Traceback" not in text
    assert "log" in (await error_of(response)).error


async def test_the_retry_task_programs_pods_resolved_later(
    make_client: MakeClient, datapath: Datapath, resolver: FakeResolver
) -> None:
    client = await make_client(retry_interval=0.05)
    late = resolver.cgroups.pop(uid(1))
    status, payload = await put(client, body_of(1, 0, 1))
    assert status == 200 and [u["uid"] for u in payload["unresolved"]] == [uid(1)]

    resolver.cgroups[uid(1)] = late
    for _ in range(100):  # up to 5 s
        listed = PodsReply.model_validate(await (await client.get("/v1/pods")).json())
        if not listed.unresolved:
            break
        await asyncio.sleep(0.05)

    assert [p.uid for p in listed.pods] == [uid(0), uid(1)]
    assert datapath.pods() == expected_pods(resolver, pod_spec(0), pod_spec(1))


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
async def test_api_requires_the_operators_certificate(
    client: Client, datapath: Datapath, context: ssl.SSLContext, reason: str
) -> None:
    for method, path in (("PUT", "/v1/pods"), ("GET", "/v1/pods"), ("GET", "/v1/status")):
        response = await client.request(
            method,
            path,
            data=body_of(1, 0),
            ssl=context,
            headers={"Content-Type": "application/json"},
        )
        assert response.status == 403, (method, path, reason)
        assert "operator" in (await error_of(response)).error, reason
    assert datapath.pods() == {}, reason


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


async def test_without_tls_nothing_is_asked(make_client: MakeClient) -> None:
    client = await make_client(tls=None)
    assert (await client.get("/v1/pods")).status == 200
    health = HealthReply.model_validate(await (await client.get("/v1/health")).json())
    assert health.trust_bundle is None


# -- probes, status, metrics ---------------------------------------------------------------------


async def test_readyz_waits_for_the_first_set_and_the_attachments(
    client: Client, datapath: Datapath
) -> None:
    """Open, it says ready or not and nothing else; why not is /v1/status's."""

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


async def test_healthz_says_only_ok_and_the_version(client: Client, reconciler: Reconciler) -> None:
    response = await client.get("/healthz", ssl=PKI.anonymous_context())
    assert (await response.json()) == {"status": "ok", "version": VERSION}
    assert reconciler.boot_id not in await response.text()


async def test_the_operators_probe_names_the_boot_the_set_and_the_trust(
    client: Client, reconciler: Reconciler, server_tls: ServerTLS
) -> None:
    health = HealthReply.model_validate(await (await client.get("/v1/health")).json())
    assert health.boot_id == reconciler.boot_id
    assert (health.applied_epoch, health.applied_generation) == (0, None)  # none yet
    assert health.trust_bundle == server_tls.trust_bundle == bundle_fingerprint(PKI.ca.pem)
    body = PodSet(epoch=4, generation=2, pods=[pod_spec(0)]).model_dump_json()
    assert (await put(client, body))[0] == 200

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
    client: Client, datapath: Datapath, resolver: FakeResolver
) -> None:
    leader = PodSet(epoch=3, generation=1, pods=[pod_spec(0)]).model_dump_json()
    assert (await put(client, leader))[0] == 200

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
    assert datapath.pods() == expected_pods(resolver, pod_spec(0))


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


async def test_metrics_parse_and_carry_the_counters_and_the_reconciler_state(
    client: Client,
) -> None:
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


# -- hostile bodies ------------------------------------------------------------------------------


class FuzzCheck:
    """Sends a body; a refusal must leave the maps and the generation exactly as they were."""

    def __init__(self, client: Client, datapath: Datapath, reconciler: Reconciler) -> None:
        self.client, self.datapath, self.reconciler = client, datapath, reconciler
        self.pods = datapath.pods()
        self.generation = reconciler.applied_generation
        self.accepted = 0

    async def send(self, body: bytes, resolver: FakeResolver) -> None:
        response = await self.client.put(
            "/v1/pods", data=body, headers={"Content-Type": "application/json"}
        )
        assert response.status < 500, await response.text()
        event(f"HTTP {response.status}")  # --hypothesis-show-statistics shows the mix
        assert response.content_type == "application/json"
        payload = await response.json()
        if response.status >= 400:
            ErrorReply.model_validate(payload)
            assert self.datapath.pods() == self.pods, payload
            assert self.reconciler.applied_generation == self.generation
            return
        # Accepted: the maps hold exactly the resolvable pods of the set, nothing else.
        self.accepted += 1
        result = ApplyResult.model_validate(payload)
        sent = PodSet.model_validate_json(body)
        unresolved = {u.uid for u in result.unresolved}
        expected: dict[int, AcceleratedPod] = {
            resolver.cgroups[p.uid]: accelerated_pod(p, resolver.cgroups[p.uid])
            for p in sent.pods
            if p.uid not in unresolved
        }
        assert self.datapath.pods() == expected
        self.pods, self.generation = expected, sent.generation


@pytest.fixture
async def fuzz(client: Client, datapath: Datapath, reconciler: Reconciler) -> FuzzCheck:
    status, payload = await put(client, body_of(10, 0, 1, 2))
    assert status == 200, payload
    return FuzzCheck(client, datapath, reconciler)


@FUZZ
@given(document=pod_sets)
async def test_fuzz_pod_shaped_bodies(
    fuzz: FuzzCheck, resolver: FakeResolver, document: dict[str, Any]
) -> None:
    await fuzz.send(json.dumps(document).encode(), resolver)


@FUZZ
@given(document=near_valid_sets())
async def test_fuzz_nearly_valid_sets(
    fuzz: FuzzCheck, resolver: FakeResolver, document: dict[str, Any]
) -> None:
    delta = document.pop("generation_delta")
    document.setdefault("generation", (fuzz.generation or 0) + delta)
    await fuzz.send(json.dumps(document).encode(), resolver)


@FUZZ
@given(document=json_values)
async def test_fuzz_any_json(fuzz: FuzzCheck, resolver: FakeResolver, document: Any) -> None:
    await fuzz.send(json.dumps(document).encode(), resolver)


@FUZZ
@given(body=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
async def test_fuzz_any_bytes(fuzz: FuzzCheck, resolver: FakeResolver, body: bytes) -> None:
    await fuzz.send(body, resolver)


# -- end to end, with traffic ----------------------------------------------------------------------


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
