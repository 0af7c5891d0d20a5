"""The operator end to end: Kopf (KopfRunner) against the API emulator, real fake agents over HTTP.

No DaemonSet controller runs in the emulator: :func:`schedule_agents` plays it (agent pods on
each node, host network, the DaemonSet's status), as the real controller would after the
operator created the DaemonSet. Every write the operator makes is validated by the emulator
(kubernetes-validate for built-in kinds, the CRD schema for MeshAccelerations); each test ends
by asserting that nothing was refused.
"""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kmock
import pytest

# Before the handlers are imported: Kopf registers the status timer's interval at import.
os.environ.setdefault("MESHACCEL_STATUS_INTERVAL", "0.3")


from meshaccel.contract.version import VERSION
from meshaccel.operator import handlers, metrics, rendering
from meshaccel.operator.budget import usage
from meshaccel.operator.credentials import CA_CONFIGMAP, CA_CONFIGMAP_KEY, CA_SECRET, CAState
from meshaccel.operator.leadership import LEASE_NAME
from meshaccel.operator.models import LEGACY_DEFAULT_AGENT_IMAGE
from tests.operator.conftest import (
    CRDS,
    ApiError,
    KubeClient,
    agent_tls,
    api_path,
    kopf_running,
    report_rollout,
    run_agent_pod,
)
from tests.operator.fake_agent import NODES, FakeAgent, common_free_port
from tests.operator.watch_gap import WatchGapEmulator
from tests.waiting import wait_for

NAMESPACE = "meshaccel-system"
ENABLED = {"meshaccel.io/accelerate": "enabled"}
MA = ("meshaccel.io/v1alpha1", "meshaccelerations")
# The operator's settings (MESHACCEL_AGENT_IMAGE*), as the chart passes them.
AGENT_IMAGE = "registry.example/mirror/meshaccel-agent:0.2.0"
PULL_SECRET = "mirror-credentials"
FOREIGN_IMAGE = "attacker.example/root-shell:1"

pytestmark = pytest.mark.slow


@pytest.fixture
async def emulator() -> AsyncIterator[WatchGapEmulator]:
    """conftest's emulator, whose watches can be cut (tests/operator/watch_gap.py)."""
    emu = WatchGapEmulator()
    emu.load_crds(CRDS)
    async with emu, kmock.Server(emu):
        yield emu


@dataclass
class Cluster:
    emulator: WatchGapEmulator
    kube: KubeClient
    agents: dict[str, FakeAgent]
    port: int

    async def create_acceleration(self, name: str = "default", **spec: Any) -> dict[str, Any]:
        body = {
            "apiVersion": "meshaccel.io/v1alpha1",
            "kind": "MeshAcceleration",
            "metadata": {"name": name},
            "spec": {
                "namespaceSelector": {"matchLabels": ENABLED},
                "agent": {"port": self.port, **spec.pop("agent", {})},
                **spec,
            },
        }
        return await self.kube.create(api_path(*MA), body)

    async def acceleration(self, name: str = "default") -> dict[str, Any]:
        return await self.kube.get(api_path(*MA, name=name))

    async def condition(self, name: str, kind: str) -> dict[str, Any] | None:
        status = (await self.acceleration(name)).get("status") or {}
        return next((c for c in status.get("conditions", []) if c["type"] == kind), None)

    async def read(self, kind_plural: str, name: str, api_version: str = "v1") -> Any:
        try:
            return await self.kube.get(api_path(api_version, kind_plural, NAMESPACE, name))
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    async def schedule_agents(self, name: str = "default") -> None:
        """Play the DaemonSet controller: an agent pod per node, then the DaemonSet's status."""
        ds_name = rendering.daemonset_name(name)
        daemonset = await wait_for(lambda: self.read("daemonsets", ds_name, "apps/v1"))
        tls = await agent_tls(self.kube, NAMESPACE, name)
        for agent in self.agents.values():
            await agent.use_tls(tls)
        for node, ip in NODES.items():
            await run_agent_pod(self.kube, daemonset, node, ip)
        await report_rollout(self.kube, daemonset, len(NODES))

    async def lease(self) -> dict[str, Any]:
        """The writer's Lease (operator/leadership.py)."""
        return await self.kube.get(
            api_path("coordination.k8s.io/v1", "leases", NAMESPACE, LEASE_NAME)
        )

    def pods_on(self, node: str) -> list[str] | None:
        last = self.agents[node].last_set
        return None if last is None else sorted(f"{p.namespace}/{p.name}" for p in last.pods)


@pytest.fixture
async def cluster(
    emulator: WatchGapEmulator, kubeconfig: Any, kube: KubeClient, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Cluster]:
    monkeypatch.setenv("MESHACCEL_NAMESPACE", NAMESPACE)
    monkeypatch.setenv("MESHACCEL_PUSH_WINDOW", "0.05")
    monkeypatch.setenv("MESHACCEL_PROBE_INTERVAL", "0.5")
    monkeypatch.setenv("MESHACCEL_BACKOFF_MAX", "0.5")
    monkeypatch.setenv("MESHACCEL_AGENT_IMAGE", AGENT_IMAGE)
    monkeypatch.setenv("MESHACCEL_AGENT_IMAGE_PULL_SECRETS", PULL_SECRET)
    await kube.create_namespace(NAMESPACE)
    await kube.create_namespace("shop")
    for node in NODES:
        await kube.create_node(node)
    port = common_free_port()
    agents = {
        node: FakeAgent(tls=None, host=ip, port=port, name=node) for node, ip in NODES.items()
    }
    for agent in agents.values():
        await agent.start()
    try:
        yield Cluster(emulator, kube, agents, port)
    finally:
        for agent in agents.values():
            await agent.close()
    assert emulator.rejections == [], "the operator wrote something a real API server refuses"


def operator(*extra: str, standalone: bool = True) -> Any:
    return kopf_running(
        "-A",
        "-m",
        handlers.__name__,
        *extra,
        registry=handlers.REGISTRY,
        timeout=20,
        standalone=standalone,
    )


async def test_lifecycle_from_create_to_uninstall(cluster: Cluster) -> None:
    kube = cluster.kube
    await kube.create_pod("shop", "web", node="node-1", pod_ip="198.18.1.10")
    await kube.create_pod("shop", "db", node="node-2", pod_ip="198.18.1.11")
    await kube.create_pod("shop", "batch", node="node-1", pod_ip="198.18.1.12", sidecar=False)
    async with operator() as runner:
        ma = await cluster.create_acceleration()
        uid = ma["metadata"]["uid"]

        # Created: the agents' objects, all owned by the resource.
        await cluster.schedule_agents()
        for plural, name, version in (
            ("serviceaccounts", rendering.serviceaccount_name("default"), "v1"),
            ("secrets", rendering.secret_name("default"), "v1"),
            ("configmaps", rendering.configmap_name("default"), "v1"),
            ("daemonsets", rendering.daemonset_name("default"), "apps/v1"),
        ):
            obj = await cluster.read(plural, name, version)
            assert obj is not None, plural
            owners = obj["metadata"]["ownerReferences"]
            assert [(o["kind"], o["uid"], o.get("controller")) for o in owners] == [
                ("MeshAcceleration", uid, True)
            ], plural
        # Once, owned by nothing: the CA's certificates alone, which Prometheus verifies with.
        published = await wait_for(
            lambda: cluster.read("configmaps", CA_CONFIGMAP), timeout=10, what="the CA ConfigMap"
        )
        secret = await cluster.read("secrets", CA_SECRET)
        assert published["data"] == {CA_CONFIGMAP_KEY: CAState.from_secret(secret).trusted_pem}
        assert "ownerReferences" not in published["metadata"]

        # Every agent gets its node's set, empty while no namespace is labelled.
        await wait_for(lambda: all(cluster.pods_on(n) == [] for n in NODES), timeout=10)
        ready = await wait_for(lambda: _true(cluster, "default", "Ready"), timeout=10)
        assert ready["reason"] == "Accelerating"
        status = (await cluster.acceleration())["status"]
        assert (status["nodesDesired"], status["nodesReady"], status["nodesInSync"]) == (2, 2, 2)
        assert status["observedGeneration"] == ma["metadata"]["generation"]

        # Labelling the namespace: the right pods reach the right node's agent.
        await kube.merge(
            api_path("v1", "namespaces", name="shop"), {"metadata": {"labels": ENABLED}}
        )
        await wait_for(lambda: cluster.pods_on("node-1") == ["shop/web"], timeout=10)
        await wait_for(lambda: cluster.pods_on("node-2") == ["shop/db"], timeout=10)
        web = cluster.agents["node-1"].last_set
        assert web is not None and str(web.pods[0].ip) == "198.18.1.10"

        # Options from the pod's annotations; an opt-out removes the pod.
        await kube.merge(
            api_path("v1", "pods", "shop", "db"),
            {
                "metadata": {
                    "annotations": {"traffic.sidecar.istio.io/excludeOutboundPorts": "5432"}
                }
            },
        )
        await wait_for(
            lambda: _options(cluster, "node-2") == {5432},
            timeout=10,
        )
        await kube.merge(
            api_path("v1", "pods", "shop", "db"),
            {"metadata": {"annotations": {"meshaccel.io/accelerate": "false"}}},
        )
        await wait_for(lambda: cluster.pods_on("node-2") == [], timeout=10)

        # A pod deleted is gone from its agent's set.
        await kube.delete(api_path("v1", "pods", "shop", "web"))
        await wait_for(lambda: cluster.pods_on("node-1") == [], timeout=10)

        # Status counts what is not accelerated and why.
        async def counted() -> bool:
            status = (await cluster.acceleration()).get("status") or {}
            return status.get("podsNotAccelerated") == {"NoSidecar": 1, "OptedOut": 1}

        await wait_for(counted, timeout=10)

        # Deleted: every agent is told to uninstall, then the resource and its objects go.
        await kube.delete(api_path(*MA, name="default"))
        await wait_for(lambda: all(a.uninstalls for a in cluster.agents.values()), timeout=15)
        await wait_for(lambda: _gone(cluster), timeout=15)
        assert (
            await cluster.read("daemonsets", rendering.daemonset_name("default"), "apps/v1") is None
        )
        await wait_for(lambda: "Uninstalled" in _event_reasons(cluster, "default"), timeout=10)
    assert runner.exception is None, runner.output


async def test_spec_change_rolls_the_agents(cluster: Cluster) -> None:
    async with operator():
        await cluster.create_acceleration()
        await cluster.schedule_agents()
        ds_name = rendering.daemonset_name("default")
        before = await cluster.read("daemonsets", ds_name, "apps/v1")
        await cluster.kube.merge(
            api_path(*MA, name="default"), {"spec": {"datapath": {"sameNodeInbound": False}}}
        )

        async def rolled() -> bool:
            after = await cluster.read("daemonsets", ds_name, "apps/v1")
            return _template_hash(after) != _template_hash(before)

        await wait_for(rolled, timeout=10)
        config = await cluster.read("configmaps", rendering.configmap_name("default"))
        assert "same_node_inbound: false" in config["data"]["agent.yaml"]


async def test_restarted_agent_gets_the_full_set_again(cluster: Cluster) -> None:
    await cluster.kube.create_namespace("mesh", ENABLED)
    await cluster.kube.create_pod("mesh", "web", node="node-1", pod_ip="198.18.1.20")
    async with operator():
        await cluster.create_acceleration()
        await cluster.schedule_agents()
        agent = cluster.agents["node-1"]
        await wait_for(lambda: cluster.pods_on("node-1") == ["mesh/web"], timeout=10)
        await agent.restart()  # a new process: new boot id, nothing applied
        assert agent.applied_generation is None
        await wait_for(lambda: agent.applied_generation is not None, timeout=10)
        assert cluster.pods_on("node-1") == ["mesh/web"]


async def test_agent_failing_shows_in_status_then_recovers(cluster: Cluster) -> None:
    await cluster.kube.create_namespace("mesh", ENABLED)
    async with operator():
        await cluster.create_acceleration()
        await cluster.schedule_agents()
        await wait_for(lambda: _true(cluster, "default", "Ready"), timeout=10)
        agent = cluster.agents["node-2"]
        agent.fail_next(1000, 503)
        await cluster.kube.create_pod("mesh", "late", node="node-2", pod_ip="198.18.1.30")

        async def behind() -> dict[str, Any] | None:
            status = (await cluster.acceleration()).get("status") or {}
            nodes = status.get("nodes") or []
            first = nodes[0] if nodes else {}
            late = first.get("node") == "node-2" and not first.get("inSync")
            return first if late and "injected failure 503" in first.get("lastError", "") else None

        await wait_for(behind, timeout=10)
        ready = await cluster.condition("default", "Ready")
        # Pushing (Reconciling) at first; failing (Stalled) once it lasts past the grace.
        assert ready is not None and ready["status"] == "False"
        assert ready["reason"] in ("PushingPodSets", "AgentsFailing"), ready
        agent.heal()
        await wait_for(lambda: cluster.pods_on("node-2") == ["mesh/late"], timeout=15)
        await wait_for(lambda: _true(cluster, "default", "Ready"), timeout=10)


async def test_pods_their_agents_cannot_find_keep_the_resource_from_being_ready(
    cluster: Cluster,
) -> None:
    """Issue 13: Ready=True (Accelerating) while pods were selected and none accelerated, the
    agents' unresolved pods never reaching the status. Now they are counted, listed with their
    node and the agent's reason, and Ready waits for them; pods left out by choice do not
    count against it. The agents resolve them later by themselves: the status follows."""
    kube, name = cluster.kube, "unresolved"
    await kube.create_namespace("mesh", ENABLED)
    for i in range(4):
        await kube.create_pod("mesh", f"web{i}", node="node-1", pod_ip=f"198.18.2.{10 + i}")
    await kube.create_pod("mesh", "db", node="node-2", pod_ip="198.18.2.20")
    await kube.create_pod("mesh", "batch", node="node-2", pod_ip="198.18.2.21", sidecar=False)
    opted_out = {"meshaccel.io/accelerate": "false"}
    await kube.create_pod("mesh", "legacy", node="node-2", annotations=opted_out)
    cluster.agents["node-1"].cannot_find("mesh/web1", "mesh/web3", reason="no cgroup found")
    gauge = functools.partial(metrics.REGISTRY.get_sample_value, labels={"acceleration": name})

    async with operator():
        await cluster.create_acceleration(name)
        await cluster.schedule_agents(name)
        await wait_for(lambda: cluster.pods_on("node-1") is not None, timeout=10)

        async def counted() -> dict[str, Any] | None:
            """Once both agents confirmed their sets."""
            status = (await cluster.acceleration(name)).get("status") or {}
            return status if status.get("nodesInSync") == 2 else None

        status = await wait_for(counted, timeout=10)
        assert (status["podsSelected"], status["podsAccelerated"]) == (5, 3)
        assert status["podsNotAccelerated"] == {"Unresolved": 2, "NoSidecar": 1, "OptedOut": 1}
        assert status["problemCount"] == 2
        assert [(p["name"], p["node"], p["reason"], p["message"]) for p in status["problems"]] == [
            ("web1", "node-1", "Unresolved", "no cgroup found"),
            ("web3", "node-1", "Unresolved", "no cgroup found"),
        ]
        first = status["nodes"][0]
        assert (first["node"], first["podsUnresolved"], first["podsAccelerated"]) == (
            "node-1",
            2,
            2,
        )
        assert first["agentVersion"] == status["operatorVersion"] == VERSION
        assert (status["nodeCount"], status["nodesWithProblems"]) == (2, 1)
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["Ready"]["status"] == "False"
        # The agents retry (Reconciling); past the grace it is Stalled, never both.
        assert conditions["Ready"]["reason"] in ("ResolvingPods", "PodsUnresolved")
        assert {conditions["Reconciling"]["status"], conditions["Stalled"]["status"]} == {
            "True",
            "False",
        }
        await wait_for(lambda: gauge("meshaccel_operator_resource_ready") == 0, timeout=10)
        assert gauge("meshaccel_operator_pods_selected") == 5
        assert gauge("meshaccel_operator_pods_accelerated") == 3
        unresolved = {"acceleration": name, "reason": "Unresolved"}
        assert (
            metrics.REGISTRY.get_sample_value("meshaccel_operator_pods_not_accelerated", unresolved)
            == 2
        )

        # The agent finds them (its own retry): the next probe's refresh brings the news.
        cluster.agents["node-1"].finds("mesh/web1", "mesh/web3")
        ready = await wait_for(lambda: _true(cluster, name, "Ready"), timeout=15)
        assert ready["reason"] == "Accelerating"
        status = (await cluster.acceleration(name))["status"]
        assert (status["podsAccelerated"], status["problemCount"]) == (5, 0)
        assert (status["problems"], status["nodesWithProblems"]) == ([], 0)
        assert status["podsNotAccelerated"] == {"NoSidecar": 1, "OptedOut": 1}
        await wait_for(lambda: gauge("meshaccel_operator_resource_ready") == 1, timeout=10)
        assert (
            metrics.REGISTRY.get_sample_value("meshaccel_operator_pods_not_accelerated", unresolved)
            == 0
        )

        await kube.delete(api_path(*MA, name=name))
        await wait_for(lambda: _gone(cluster, name), timeout=15)
        await wait_for(lambda: gauge("meshaccel_operator_resource_ready") is None, timeout=10)
        assert (
            metrics.REGISTRY.get_sample_value("meshaccel_operator_pods_not_accelerated", unresolved)
            is None
        ), "the resource's series go with it"


async def test_a_younger_resource_on_the_same_nodes_keeps_none_and_is_not_retired(
    cluster: Cluster,
) -> None:
    """Conflicts per node (issue 12, item 6): the older resource's agents select every node,
    so the younger one keeps none of them (Conflict, Ready False, its agents there would get
    empty sets). Nothing is uninstalled and its DaemonSet stays, ready for when the older
    resource goes or narrows."""
    async with operator():
        await cluster.create_acceleration("first")
        await cluster.schedule_agents("first")
        await wait_for(lambda: _true(cluster, "first", "Ready"), timeout=10)
        await cluster.create_acceleration("second", namespaceSelector={})
        conflict = await wait_for(lambda: _true(cluster, "second", "Conflict"), timeout=10)
        assert "'first' (created earlier) keeps node(s) node-1, node-2" in conflict["message"]
        [held] = (await cluster.acceleration("second"))["status"]["conflicts"]
        assert (held["heldBy"], held["nodes"], held["nodeCount"]) == (
            "first",
            ["node-1", "node-2"],
            2,
        )
        ready = await cluster.condition("second", "Ready")
        assert ready is not None and (ready["status"], ready["reason"]) == ("False", "Conflict")
        daemonset = rendering.daemonset_name("second")
        assert await cluster.read("daemonsets", daemonset, "apps/v1") is not None
        assert [agent.uninstalls for agent in cluster.agents.values()] == [0, 0]
        first = await cluster.condition("first", "Conflict")
        assert first is not None and first["status"] == "False"
        await wait_for(
            lambda: "ClaimedByOlderResource" in _event_reasons(cluster, "second", "Warning"),
            timeout=10,
        )


async def test_pods_over_budget_stay_on_iptables_and_the_rest_is_pushed(cluster: Cluster) -> None:
    """Budgets (issue 12, item 7): pods excluding many ports would overflow node-1's pod_ports
    map (128 entries here) and the agent would refuse the node's whole set. The operator
    pushes what fits, the plain pod first, and says which pods stay on iptables."""
    kube = cluster.kube
    await kube.create_namespace("mesh", ENABLED)
    ports = {"traffic.sidecar.istio.io/excludeOutboundPorts": "20000-20049"}  # 63 entries each
    for i in range(3):
        await kube.create_pod(
            "mesh", f"hog{i}", node="node-1", pod_ip=f"198.18.1.{60 + i}", annotations=ports
        )
    await kube.create_pod("mesh", "web", node="node-1", pod_ip="198.18.1.70")
    async with operator():
        await cluster.create_acceleration(
            datapath={"maxPods": 4, "maxPodPorts": 128, "maxPodCidrs": 8}
        )
        await cluster.schedule_agents()
        await wait_for(lambda: cluster.pods_on("node-1") == ["mesh/hog0", "mesh/web"], timeout=10)
        degraded = await wait_for(lambda: _true(cluster, "default", "Degraded"), timeout=10)
        assert degraded["reason"] == "PodsOverBudget"
        assert (
            "mesh/hog1 on node-1 (pod_ports needs 63, 52 left on the node)" in (degraded["message"])
        )
        status = (await cluster.acceleration())["status"]
        assert status["podsNotAccelerated"] == {"OverBudget": 2}
        await wait_for(
            lambda: "PodsOverBudget" in _event_reasons(cluster, "default", "Warning"), timeout=10
        )
        sent = [a.pod_set.pods for a in cluster.agents["node-1"].accepted]
        assert all(sum(usage(p)[0] for p in pods) <= 128 for pods in sent), "none overflows"

        for i in range(3):
            await kube.delete(api_path("v1", "pods", "mesh", f"hog{i}"))
        await wait_for(lambda: cluster.pods_on("node-1") == ["mesh/web"], timeout=10)
        await wait_for(lambda: _false(cluster, "default", "Degraded"), timeout=10)


async def test_ipv6_only_and_dual_stack_pods_reach_their_agents_with_every_address(
    cluster: Cluster,
) -> None:
    """IPv6 (issue 15): a pod goes with every address of status.podIPs and the ranges of its
    families; an agent that predates IPv6 (node-2's) gets the IPv4 part, and the status names
    the IPv6-only pod it could not take."""
    kube = cluster.kube
    await kube.create_namespace("mesh", ENABLED)
    ranges = {"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.8.0.0/16,fd00:8::/64"}
    await kube.create_pod("mesh", "v4", node="node-1", pod_ip="198.18.1.80", annotations=ranges)
    await kube.create_pod(
        "mesh",
        "dual",
        node="node-1",
        pod_ip="198.18.1.81",
        pod_ips=("198.18.1.81", "fd00:198:18::1:81"),
        annotations=ranges,
    )
    await kube.create_pod(
        "mesh", "v6", node="node-1", pod_ip="fd00:198:18::1:82", annotations=ranges
    )
    await kube.create_pod(
        "mesh",
        "dual-old",
        node="node-2",
        pod_ip="198.18.2.81",
        pod_ips=("198.18.2.81", "fd00:198:18::2:81"),
    )
    await kube.create_pod("mesh", "v6-old", node="node-2", pod_ip="fd00:198:18::2:82")
    cluster.agents["node-2"].ipv6 = False
    async with operator():
        await cluster.create_acceleration(exclusions={"outboundCIDRs": ["2001:db8::/32"]})
        await cluster.schedule_agents()
        await wait_for(
            lambda: cluster.pods_on("node-1") == ["mesh/dual", "mesh/v4", "mesh/v6"], timeout=10
        )
        last = cluster.agents["node-1"].last_set
        assert last is not None
        sent = {p.name: p for p in last.pods}
        assert [str(a) for a in sent["dual"].addresses] == ["198.18.1.81", "fd00:198:18::1:81"]
        assert [str(a) for a in sent["v6"].addresses] == ["fd00:198:18::1:82"]
        assert sent["v4"].ips == () and sent["v6"].ips == ()
        cidrs = {
            name: sorted(map(str, p.options.excluded_outbound_cidrs)) for name, p in sent.items()
        }
        assert cidrs == {
            "v4": ["10.8.0.0/16"],
            "dual": ["10.8.0.0/16", "2001:db8::/32", "fd00:8::/64"],
            "v6": ["2001:db8::/32", "fd00:8::/64"],
        }

        await wait_for(lambda: cluster.pods_on("node-2") == ["mesh/dual-old"], timeout=10)
        old_last = cluster.agents["node-2"].last_set
        assert old_last is not None
        [dual_old] = old_last.pods
        assert (str(dual_old.ip), dual_old.ips) == ("198.18.2.81", ())
        degraded = await wait_for(lambda: _true(cluster, "default", "Degraded"), timeout=10)
        assert degraded["reason"] == "AgentsWithoutIPv6", degraded
        assert "mesh/v6-old on node-2" in degraded["message"]
        status = (await cluster.acceleration())["status"]
        assert status["podsNotAccelerated"] == {"AgentWithoutIPv6": 1}
        assert status["podsAccelerated"] == 4
        [problem] = status["problems"]
        assert (problem["name"], problem["reason"]) == ("v6-old", "AgentWithoutIPv6")


async def test_sensible_schema_but_senseless_spec_is_stalled(cluster: Cluster) -> None:
    """What admission cannot see (a retired field still set) the operator refuses after the
    fact: Stalled and Degraded (InvalidSpec), nothing programmed. A selector that can never
    match is refused at admission (the CRD's CEL rules) and never reaches the operator."""
    async with operator():
        with pytest.raises(ApiError) as refused:
            await cluster.create_acceleration(
                "senseless",
                podSelector={
                    "matchLabels": {"tier": "web"},
                    "matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}],
                },
            )
        assert refused.value.status == 422 and "can never match" in str(refused.value.body)
        cluster.emulator.rejections.clear()  # refused on purpose: not the operator's write
        await cluster.create_acceleration("senseless", agent={"image": FOREIGN_IMAGE})
        degraded = await wait_for(lambda: _true(cluster, "senseless", "Degraded"), timeout=10)
        assert degraded["reason"] == "InvalidSpec"
        message = degraded["message"]
        assert f"spec.agent.image is set ('{FOREIGN_IMAGE}') but no longer read" in message
        stalled = await cluster.condition("senseless", "Stalled")
        assert stalled is not None and (stalled["status"], stalled["reason"]) == (
            "True",
            "InvalidSpec",
        )
        assert (
            await cluster.read("daemonsets", rendering.daemonset_name("senseless"), "apps/v1")
            is None
        )


async def test_a_resource_cannot_choose_its_agents_image(cluster: Cluster) -> None:
    """Issue 12's finding: spec.agent.image was the agents' image, so "create MeshAcceleration"
    meant any image as uid 0 with BPF and NET_ADMIN on every node. The agents run the
    operator's image; a resource that names another is refused and its DaemonSet left as is."""
    ds_name = rendering.daemonset_name("default")
    async with operator():
        # What the 0.1 CRD wrote into every resource: nobody chose it, so it is ignored.
        await cluster.create_acceleration(agent={"image": LEGACY_DEFAULT_AGENT_IMAGE})
        await cluster.schedule_agents()
        rendered = await cluster.read("daemonsets", ds_name, "apps/v1")
        template = rendered["spec"]["template"]
        assert template["spec"]["containers"][0]["image"] == AGENT_IMAGE
        assert template["spec"]["imagePullSecrets"] == [{"name": PULL_SECRET}]
        await wait_for(lambda: _true(cluster, "default", "Ready"), timeout=10)

        path = api_path(*MA, name="default")
        await cluster.kube.merge(path, {"spec": {"agent": {"image": FOREIGN_IMAGE}}})
        degraded = await wait_for(lambda: _true(cluster, "default", "Degraded"), timeout=10)
        assert degraded["reason"] == "InvalidSpec"
        assert "set it there; then remove the field" in degraded["message"]
        # Decided (the condition says so) and nothing rolled: the same agents, same image.
        stored = await cluster.read("daemonsets", ds_name, "apps/v1")
        assert stored["spec"]["template"] == template

        await cluster.kube.json_patch(path, [{"op": "remove", "path": "/spec/agent/image"}])
        await wait_for(lambda: _false(cluster, "default", "Degraded"), timeout=10)
        stored = await cluster.read("daemonsets", ds_name, "apps/v1")
        assert stored["spec"]["template"] == template


async def test_invalid_fields_are_refused_by_the_schema(cluster: Cluster) -> None:
    for spec, field in (
        ({"namespaceSelector": {}, "mode": "cilium"}, "mode"),
        ({"namespaceSelector": {}, "agent": {"port": 70000}}, "port"),
        ({"mode": "istio"}, "namespaceSelector"),
    ):
        with pytest.raises(ApiError) as refused:
            await cluster.kube.create(
                api_path(*MA),
                {
                    "apiVersion": "meshaccel.io/v1alpha1",
                    "kind": "MeshAcceleration",
                    "metadata": {"name": "bad"},
                    "spec": spec,
                },
            )
        assert refused.value.status == 422 and field in str(refused.value.body)
    cluster.emulator.rejections.clear()  # refused on purpose: not the operator's writes


# -- helpers ------------------------------------------------------------------------------------


async def _true(cluster: Cluster, name: str, kind: str) -> dict[str, Any] | None:
    condition = await cluster.condition(name, kind)
    return condition if condition is not None and condition["status"] == "True" else None


async def _false(cluster: Cluster, name: str, kind: str) -> dict[str, Any] | None:
    condition = await cluster.condition(name, kind)
    return condition if condition is not None and condition["status"] == "False" else None


def _options(cluster: Cluster, node: str) -> set[int] | None:
    last = cluster.agents[node].last_set
    if last is None or not last.pods:
        return None
    return set(last.pods[0].options.excluded_outbound_ports)


async def _gone(cluster: Cluster, name: str = "default") -> bool:
    try:
        await cluster.acceleration(name)
    except ApiError as err:
        return err.status == 404
    return False


def _event_reasons(cluster: Cluster, name: str, kind: str | None = None) -> set[str]:
    return {
        event.get("reason", "")
        for event in cluster.emulator.events_for(name)
        if event["involvedObject"].get("kind") == "MeshAcceleration"
        and (kind is None or event.get("type") == kind)
    }


def _template_hash(daemonset: dict[str, Any]) -> dict[str, str]:
    return dict(daemonset["spec"]["template"]["metadata"].get("annotations") or {})


async def test_two_replicas_one_active_and_the_other_takes_over(cluster: Cluster) -> None:
    """Kopf peering: two replicas, one works; when it stops, the other finishes the job."""
    peering = api_path("kopf.dev/v1", "clusterkopfpeerings")
    await cluster.kube.create(
        peering,
        {
            "apiVersion": "kopf.dev/v1",
            "kind": "ClusterKopfPeering",
            "metadata": {"name": "meshaccel"},
        },
    )

    async def peers() -> dict[str, Any]:
        return dict((await cluster.kube.get(f"{peering}/meshaccel")).get("status") or {})

    first = operator("--peering=meshaccel", standalone=False)
    second = operator("--peering=meshaccel", standalone=False)
    await first.__aenter__()
    try:
        await wait_for(lambda: _count(peers, 1), timeout=10)
        await second.__aenter__()
        try:
            registered = await wait_for(lambda: _count(peers, 2), timeout=10)
            priorities = sorted(p["priority"] for p in registered.values())
            assert priorities[0] != priorities[1], "equal priorities would pause both"

            await cluster.create_acceleration()
            await cluster.schedule_agents()
            await wait_for(lambda: _true(cluster, "default", "Ready"), timeout=15)
            # Kopf's peering lets both replicas run for a moment at start: their writes to the
            # Lease, the CA Secret and the resource's status are compare-and-swap, so one of
            # them may be refused there (the mechanism at work). What the agents are made of,
            # and what they are sent (Lease-fenced), has one writer.
            agents = [c for c in cluster.emulator.conflicts if "/meshaccel-agent" in c]
            assert agents == [], f"one writer of the agents' objects: {agents}"
        finally:
            # Stop the active replica (the higher priority); whichever it is, one remains.
            await second.__aexit__(None, None, None)
        await wait_for(lambda: _count(peers, 1), timeout=10)
        # The remaining replica (paused until now, or active all along) handles the deletion.
        await cluster.kube.delete(api_path(*MA, name="default"))
        await wait_for(lambda: all(a.uninstalls for a in cluster.agents.values()), timeout=20)
        await wait_for(lambda: _gone(cluster), timeout=15)
    finally:
        await first.__aexit__(None, None, None)


async def _count(peers: Any, wanted: int) -> dict[str, Any] | None:
    found: dict[str, Any] = await peers()
    return found if len(found) == wanted else None


async def test_a_pod_deleted_while_the_watch_was_down_leaves_its_nodes_set(
    cluster: Cluster,
) -> None:
    """After a watch gap the API answers 410 Gone and Kopf lists again: a pod deleted meanwhile
    is only missing from that list (no DELETED event); it must leave its node's set."""
    await cluster.kube.create_namespace("mesh", ENABLED)
    await cluster.kube.create_pod("mesh", "web", node="node-1", pod_ip="198.18.1.40")
    await cluster.kube.create_pod("mesh", "api", node="node-1", pod_ip="198.18.1.41")
    async with operator():
        await cluster.create_acceleration()
        await cluster.schedule_agents()
        await wait_for(lambda: cluster.pods_on("node-1") == ["mesh/api", "mesh/web"], timeout=10)

        with cluster.emulator.watch_gap("pods"):
            # The operator's pod watch is down (it came back and is held) ...
            await wait_for(lambda: cluster.emulator.held.get("pods"), timeout=10)
            await cluster.kube.delete(api_path("v1", "pods", "mesh", "web"))
        # ... and answered 410 Gone: the operator lists the pods again.
        await wait_for(lambda: cluster.emulator.expired.get("pods"), timeout=10)

        await wait_for(lambda: cluster.pods_on("node-1") == ["mesh/api"], timeout=15)


async def test_a_paused_replica_stops_writing_and_resumes_in_a_new_term(cluster: Cluster) -> None:
    """Issue 12: the pushers were plain tasks that Kopf's peering pause did not stop. Paused,
    the replica now stops writing and releases the writer's Lease; resumed, it takes a new
    term (a higher epoch), resyncs, and only then writes."""
    kube, agent = cluster.kube, cluster.agents["node-1"]
    peering = api_path("kopf.dev/v1", "clusterkopfpeerings")
    await kube.create(
        peering,
        {
            "apiVersion": "kopf.dev/v1",
            "kind": "ClusterKopfPeering",
            "metadata": {"name": "meshaccel"},
        },
    )
    await kube.create_namespace("mesh", ENABLED)
    await kube.create_pod("mesh", "web", node="node-1", pod_ip="198.18.1.50")
    await kube.create_pod("mesh", "api", node="node-1", pod_ip="198.18.1.51")
    async with operator("--peering=meshaccel", standalone=False):
        await cluster.create_acceleration()
        await cluster.schedule_agents()
        await wait_for(lambda: cluster.pods_on("node-1") == ["mesh/api", "mesh/web"], timeout=10)
        assert agent.applied_epoch == 1
        assert (await cluster.lease())["spec"]["leaseTransitions"] == 1

        # A replica with a higher priority shows up: Kopf pauses this one.
        intruder = {
            "priority": 10**7,
            "lifetime": 60,
            "lastseen": datetime.now(UTC).isoformat(),
        }
        await kube.merge(f"{peering}/meshaccel", {"status": {"intruder": intruder}})
        await wait_for(lambda: _released(cluster), timeout=10, what="the Lease released")

        # While it is paused, a pod goes (no event reaches it) and the agent restarts empty.
        await kube.delete(api_path("v1", "pods", "mesh", "web"))
        await agent.restart()
        since_restart = len(agent.accepted)

        # The other replica leaves: this one resumes, in a new term.
        await kube.merge(f"{peering}/meshaccel", {"status": {"intruder": None}})
        await wait_for(lambda: agent.applied_epoch == 2, timeout=15, what="a set of the new term")

        sets = [a.pod_set for a in agent.accepted[since_restart:]]
        assert sets and all(s.epoch == 2 for s in sets), "nothing was written while paused"
        assert sorted(p.name for p in sets[0].pods) == ["api"], "resynced before writing"
        lease = await cluster.lease()
        assert lease["spec"]["leaseTransitions"] == 2 and lease["spec"]["holderIdentity"]
        await wait_for(lambda: cluster.agents["node-2"].applied_epoch == 2, timeout=10)


async def _released(cluster: Cluster) -> bool:
    return "holderIdentity" not in (await cluster.lease())["spec"]
