"""``meshaccel`` reads what the real operator writes: Kopf runs the operator's handlers against
the API emulator, fake agents (tests/operator/fake_agent.py) take the pod sets over mutual TLS,
one of them cannot find a pod's cgroup and one is an older version; the command then reads
the status the operator computed, not one a test wrote."""

from __future__ import annotations

import os
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

# Before the handlers are imported: Kopf registers the status timer's interval at import.
os.environ.setdefault("MESHACCEL_STATUS_INTERVAL", "0.3")

from meshaccel.contract.version import VERSION
from meshaccel.operator import handlers, rendering
from tests.cli.scene import AGENTS_NAMESPACE, ENABLED, create_acceleration, meshaccel
from tests.operator.conftest import (
    KubeClient,
    agent_tls,
    api_path,
    kopf_running,
    report_rollout,
    run_agent_pod,
)
from tests.operator.emulator import ApiServerEmulator
from tests.operator.fake_agent import NODES, FakeAgent, common_free_port
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

OLDER_AGENT = "0.0.9"


@pytest.fixture
async def agents(
    emulator: ApiServerEmulator,
    kubeconfig: pathlib.Path,
    kube: KubeClient,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[dict[str, FakeAgent]]:
    monkeypatch.setenv("MESHACCEL_NAMESPACE", AGENTS_NAMESPACE)
    monkeypatch.setenv("MESHACCEL_PUSH_WINDOW", "0.05")
    monkeypatch.setenv("MESHACCEL_PROBE_INTERVAL", "0.5")
    monkeypatch.setenv("MESHACCEL_BACKOFF_MAX", "0.5")
    monkeypatch.setenv("MESHACCEL_AGENT_IMAGE", "registry.example/meshaccel-agent:0.1.0")
    await kube.create_namespace(AGENTS_NAMESPACE)
    for node in NODES:
        await kube.create_node(node)
    port = common_free_port()
    running = {
        node: FakeAgent(
            tls=None,
            host=ip,
            port=port,
            name=node,
            version=OLDER_AGENT if node == "node-2" else VERSION,
        )
        for node, ip in NODES.items()
    }
    for agent in running.values():
        await agent.start()
    try:
        yield running
    finally:
        for agent in running.values():
            await agent.close()


async def schedule_agents(kube: KubeClient, agents: dict[str, FakeAgent]) -> None:
    """The DaemonSet controller's part: an agent pod per node, mounting the operator's Secret."""
    name = rendering.daemonset_name("default")
    path = api_path("apps/v1", "daemonsets", AGENTS_NAMESPACE, name)

    async def daemonset() -> Any:
        status, body = await kube.request("GET", path)
        return body if status == 200 else None

    created = await wait_for(daemonset, timeout=10)
    tls = await agent_tls(kube, AGENTS_NAMESPACE, "default")
    for agent in agents.values():
        await agent.use_tls(tls)
    for node, ip in NODES.items():
        await run_agent_pod(kube, created, node, ip)
    await report_rollout(kube, created, len(NODES))


async def test_the_command_reads_the_status_the_operator_wrote(
    kube: KubeClient, agents: dict[str, FakeAgent]
):
    await kube.create_namespace("shop", ENABLED)
    await kube.create_pod("shop", "web", node="node-1", pod_ip="198.18.1.10")
    await kube.create_pod("shop", "api", node="node-1", pod_ip="198.18.1.11")
    await kube.create_pod("shop", "db", node="node-2", pod_ip="198.18.1.12")
    await kube.create_pod("shop", "batch", node="node-1", pod_ip="198.18.1.13", sidecar=False)
    await kube.create_pod(
        "shop",
        "legacy",
        node="node-2",
        pod_ip="198.18.1.14",
        annotations={"meshaccel.io/accelerate": "false"},
    )
    agents["node-1"].cannot_find("shop/api")
    async with kopf_running(
        "-A", "-m", handlers.__name__, registry=handlers.REGISTRY, timeout=20
    ) as runner:
        acceleration = await create_acceleration(
            kube, "default", agent={"port": agents["node-1"].port}
        )
        await schedule_agents(kube, agents)

        async def reported() -> Any:
            run = await meshaccel("status", "-o", "json")
            [status] = run.json()["accelerations"]
            names = [p["name"] for p in status["problems"]]
            versions = {n["node"]: n.get("agentVersion") for n in status["nodes"]}
            settled = names == ["api"] and versions == {"node-1": VERSION, "node-2": OLDER_AGENT}
            return (run, status) if settled else None

        run, status = await wait_for(reported, timeout=20)
        assert run.code == 1  # an unresolved pod: not Ready
        assert status["state"] in ("Stalled", "Reconciling")
        assert status["operatorVersion"] == VERSION
        assert status["daemonSet"] == f"{AGENTS_NAMESPACE}/{rendering.daemonset_name('default')}"
        assert status["observedGeneration"] == acceleration["metadata"]["generation"]
        [problem] = status["problems"]
        assert (problem["namespace"], problem["node"], problem["reason"]) == (
            "shop",
            "node-1",
            "Unresolved",
        )

        pods = await meshaccel("pods", "-n", "shop", "-o", "json")
        states = {p["name"]: p["state"] for p in pods.json()["pods"]}
        assert states == {
            "web": "Accelerated",
            "db": "Accelerated",
            "api": "Unresolved",
            "batch": "NoSidecar",
            "legacy": "OptedOut",
        }

        version = await meshaccel("version", "-o", "json")
        got = {(a["node"], a["source"], a["version"]) for a in version.json()["agents"]}
        assert got == {("node-1", "status", VERSION), ("node-2", "status", OLDER_AGENT)}
        [skew] = version.json()["skew"]
        assert OLDER_AGENT in skew
    assert runner.exception is None, runner.output
