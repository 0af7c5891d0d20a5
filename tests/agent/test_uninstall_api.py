"""POST /v1/uninstall and the boot id in PUT replies, against the real app over a real datapath.

The datapath is attached to the module's own test cgroup (tests/agent/conftest.py); after an
uninstall nothing of it may be pinned, and bpftool must show nothing attached to that cgroup.
"""

from __future__ import annotations

import asyncio
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from meshaccel.agent.datapath import Datapath, PinLayout
from meshaccel.agent.reconcile import Reconciler
from meshaccel.agent.server import is_uninstalled
from meshaccel.contract.api import (
    ApplyResult,
    ErrorReply,
    HealthReply,
    StatusReply,
    UninstallReply,
)
from tests.agent.conftest import PKI, Client, MakeClient, PodCgroups, pod_set, pod_spec
from tests.agent_lifecycle.harness import (
    PIN_ROOT,
    AgentProcess,
    agent_argv,
    attached_programs,
    free_port,
    tls_args,
    unload_instance,
)
from tests.waiting import wait_until

pytestmark = pytest.mark.kernel


@pytest.fixture
async def client(make_client: MakeClient) -> Client:
    return await make_client()


async def put(client: Client, generation: int, *indexes: int) -> tuple[int, dict[str, Any]]:
    body = pod_set(generation, *(pod_spec(i) for i in indexes)).model_dump_json()
    response = await client.put("/v1/pods", data=body, headers={"Content-Type": "application/json"})
    return response.status, await response.json()


async def uninstall(client: Client) -> tuple[int, dict[str, Any]]:
    response = await client.post("/v1/uninstall")
    return response.status, await response.json()


def pinned(datapath: Datapath) -> list[str]:
    return [str(p) for p in datapath.pins.all_pins() if p.exists()]


async def test_uninstall_detaches_unpins_and_refuses_sets_afterwards(
    client: Client, datapath: Datapath, pod_cgroups: PodCgroups, reconciler: Reconciler
) -> None:
    assert (await put(client, 3, 0, 1))[0] == 200
    assert attached_programs(pod_cgroups.cgroup.path), "the fixture's datapath is attached"

    status, payload = await uninstall(client)

    assert status == 200, payload
    reply = UninstallReply.model_validate(payload)
    assert reply.uninstalled and not reply.already and reply.boot_id == reconciler.boot_id
    assert pinned(datapath) == []
    assert not datapath.pins.root.exists()
    assert attached_programs(pod_cgroups.cgroup.path) == []
    assert is_uninstalled(client.app)

    status, payload = await put(client, 4, 0)
    assert status == 409, payload
    error = ErrorReply.model_validate(payload)
    assert "uninstalled" in error.error
    assert error.applied_generation is None  # not a generation refusal: nothing to retry

    ready = await client.get("/readyz")
    assert ready.status == 503
    assert ErrorReply.model_validate(await ready.json()).error == "not ready"

    response = await client.get("/v1/status")
    assert response.status == 200
    report = StatusReply.model_validate(await response.json())
    assert not report.attached and report.uninstalled
    assert report.not_ready is not None and "uninstalled" in report.not_ready
    assert not any(p.attached for p in report.programs)

    # The process keeps serving: the liveness probe and the scrape still answer.
    assert (await client.get("/healthz")).status == 200
    metrics = await client.get("/metrics")
    assert metrics.status == 200
    assert "meshaccel_datapath_attached 0.0" in await metrics.text()


async def test_a_second_uninstall_is_200_already(client: Client, datapath: Datapath) -> None:
    first = await uninstall(client)
    second = await uninstall(client)

    assert first[0] == second[0] == 200, (first, second)
    assert not UninstallReply.model_validate(first[1]).already
    again = UninstallReply.model_validate(second[1])
    assert again.already and again.duration_ms == 0
    assert pinned(datapath) == []


@pytest.mark.parametrize(
    ("identity", "reason"),
    [(None, "no client certificate"), ("urn:meshaccel:someone-else", "not the operator's")],
)
async def test_uninstall_needs_the_operator(
    client: Client,
    datapath: Datapath,
    pod_cgroups: PodCgroups,
    identity: str | None,
    reason: str,
) -> None:
    context = (
        PKI.anonymous_context()
        if identity is None
        else PKI.client_context(PKI.issue_client(identity), check_hostname=False)
    )
    response = await client.post("/v1/uninstall", ssl=context)

    assert response.status == 403, reason
    ErrorReply.model_validate(await response.json())
    assert len(pinned(datapath)) == len(datapath.pins.all_pins()), reason
    assert attached_programs(pod_cgroups.cgroup.path), reason
    assert (await put(client, 1, 0))[0] == 200, reason  # still taking sets


async def test_a_standalone_agent_refuses_uninstall(
    make_client: MakeClient, datapath: Datapath
) -> None:
    client = await make_client(pod_set_source="the pods file /etc/meshaccel/pods.yaml")

    status, payload = await uninstall(client)

    assert status == 409, payload
    assert "pods file" in ErrorReply.model_validate(payload).error
    assert len(pinned(datapath)) == len(datapath.pins.all_pins())
    assert not is_uninstalled(client.app)


async def test_sets_are_refused_from_the_request_on_while_it_drains(
    make_client: MakeClient, datapath: Datapath, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_client(drain_seconds=0.4)
    assert (await put(client, 1, 0))[0] == 200
    drains: list[float] = []
    real_unload = datapath.unload

    def recorded_unload(drain_seconds: float = 0) -> None:
        drains.append(drain_seconds)
        real_unload(drain_seconds=drain_seconds)

    monkeypatch.setattr(datapath, "unload", recorded_unload)

    pending = asyncio.create_task(uninstall(client))
    while True:  # until the handler has taken the request (it drains for 0.4 s)
        ready = await client.get("/readyz")
        if ready.status == 503:
            break
        await asyncio.sleep(0.01)
    assert ErrorReply.model_validate(await ready.json()).error == "not ready"
    report = StatusReply.model_validate(await (await client.get("/v1/status")).json())
    assert report.not_ready is not None and "in progress" in report.not_ready
    status, payload = await put(client, 2, 0, 1)
    assert status == 409 and "uninstalled" in payload["error"], payload

    status, payload = await pending
    assert status == 200, payload
    UninstallReply.model_validate(payload)
    assert drains == [0.4]  # the agent's drain, given to the unload
    assert pinned(datapath) == []


async def test_a_failed_uninstall_is_500_and_a_repeat_finishes_it(
    client: Client, datapath: Datapath, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_unload = datapath.unload

    def failing_unload(drain_seconds: float = 0) -> None:
        raise OSError(16, "Device or resource busy")

    monkeypatch.setattr(datapath, "unload", failing_unload)
    status, payload = await uninstall(client)

    assert status == 500, payload
    assert "Device or resource busy" in ErrorReply.model_validate(payload).error
    status_reply = StatusReply.model_validate(await (await client.get("/v1/status")).json())
    assert status_reply.not_ready is not None and "failed" in status_reply.not_ready
    assert (await put(client, 1, 0))[0] == 409  # still taking no sets

    monkeypatch.setattr(datapath, "unload", real_unload)
    status, payload = await uninstall(client)
    assert status == 200, payload
    assert not UninstallReply.model_validate(payload).already
    assert pinned(datapath) == []


async def test_put_replies_carry_the_boot_id(client: Client, reconciler: Reconciler) -> None:
    health = HealthReply.model_validate(await (await client.get("/v1/health")).json())

    applied = [await put(client, 1, 0), await put(client, 1, 0)]  # an apply, then a no-op

    for status, payload in applied:
        assert status == 200, payload
        assert ApplyResult.model_validate(payload).boot_id == health.boot_id == reconciler.boot_id


# -- the agent process ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "reason"),
    [([], "plain SIGTERM"), (["--uninstall-on-exit"], "SIGTERM with --uninstall-on-exit")],
)
def test_the_process_serves_on_after_an_uninstall_and_stops_cleanly(
    pod_cgroups: PodCgroups, tmp_path: Path, flags: list[str], reason: str
) -> None:
    """What the DaemonSet's deletion does right after the operator's uninstall."""
    instance = f"uninstall-api-{tmp_path.name}"
    port = free_port()
    argv = [
        *agent_argv(),
        "run",
        f"--attach-cgroup={pod_cgroups.cgroup.path}",
        f"--pin-root={PIN_ROOT}",
        f"--instance={instance}",
        *tls_args(tmp_path / "tls"),
        "--listen-address=127.0.0.1",
        f"--port={port}",
        "--node-name=test",
        "--log-format=json",
        "--drain-seconds=0.2",
        *flags,
    ]
    pins = PinLayout(PIN_ROOT / instance)
    with ExitStack() as cleanup:
        cleanup.callback(unload_instance, instance, PIN_ROOT)
        agent = AgentProcess(argv, workdir=tmp_path, name="agent", port=port)
        cleanup.callback(agent.stop)
        wait_until(lambda: agent.status_of("/healthz") == 200, timeout=30, what="the API")
        status, body = agent.request("PUT", "/v1/pods", {"generation": 1, "pods": []})
        assert status == 200 and body["boot_id"] == agent.get("/v1/health")["boot_id"], body

        status, body = agent.request("POST", "/v1/uninstall")

        assert status == 200, (body, agent.describe())
        UninstallReply.model_validate(body)
        (uninstalled,) = [r for r in agent.logs() if r.get("event") == "uninstall"]
        assert uninstalled["drain_seconds"] == 0.2, uninstalled  # the agent's drain setting
        assert not any(p.exists() for p in pins.all_pins()), reason
        assert attached_programs(pod_cgroups.cgroup.path) == [], reason
        assert agent.request("GET", "/readyz")[0] == 503
        assert agent.request("PUT", "/v1/pods", {"generation": 2, "pods": []})[0] == 409
        assert agent.is_running(), reason

        assert agent.stop() == 0, agent.describe()
        messages = [r.get("msg") for r in agent.logs()]
        assert "uninstalled" in messages, messages
        assert "stopped; the datapath was uninstalled through the API before" in messages
        errors = [r for r in agent.logs() if r.get("level") in ("error", "critical")]
        assert errors == [], agent.describe()
