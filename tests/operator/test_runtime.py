"""The runtime without Kopf: the API emulator, a fake agent, and the test playing Kopf's watches.

The test feeds the runtime the events Kopf would (``pod_event`` and the like) and leaves some
out, as a watch gap does; the runtime's own clock is a stopped one, so the periodic resync
comes when the test moves it, not after five minutes. (``test_operator.py`` runs the real
handlers in Kopf.)
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from meshaccel.operator import rendering
from meshaccel.operator.config import OperatorConfig
from meshaccel.operator.kube import api_client
from meshaccel.operator.models import MeshAccelerationSpec
from meshaccel.operator.runtime import Operator
from tests.operator.conftest import KubeClient, agent_tls, api_path, run_agent_pod
from tests.operator.fake_agent import FakeAgent
from tests.operator.objects import OPERATOR_NAMESPACE
from tests.waiting import StoppedClock, wait_for

ENABLED = {"meshaccel.io/accelerate": "enabled"}
AGENT_IP = "127.0.0.2"
PODS = api_path("v1", "pods", "shop")


@dataclass
class Setup:
    runtime: Operator
    agent: FakeAgent
    clock: StoppedClock
    kube: KubeClient

    def applied(self) -> list[str] | None:
        last = self.agent.last_set
        return None if last is None else sorted(f"{p.namespace}/{p.name}" for p in last.pods)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((AGENT_IP, 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def setup(kubeconfig: Any, kube: KubeClient) -> AsyncIterator[Setup]:
    """A running runtime that leads, one MeshAcceleration, its agent on node-1 with its set."""
    await kube.create_namespace(OPERATOR_NAMESPACE)
    await kube.create_namespace("shop", ENABLED)
    await kube.create_node("node-1")
    pods = [
        await kube.create_pod("shop", name, node="node-1", pod_ip=ip)
        for name, ip in (("web", "198.18.1.10"), ("api", "198.18.1.11"))
    ]
    clock = StoppedClock()
    config = OperatorConfig(namespace=OPERATOR_NAMESPACE, push_window=0.01, probe_interval=3600)
    runtime = Operator(config, await api_client(), aiohttp.ClientSession(), clock=clock)
    runtime.start()
    port = free_port()
    try:
        async with FakeAgent(tls=None, host=AGENT_IP, port=port) as agent:
            # Kopf's first listing, then the handlers' work.
            runtime.namespace_event("shop", ENABLED, None)
            for body in pods:
                runtime.pod_event(body, None)
            runtime.want("test")  # the writer daemon: Kopf keeps this replica active
            await wait_for(lambda: runtime.epoch == 1, what="the first term")
            raw = {"namespaceSelector": {"matchLabels": ENABLED}, "agent": {"port": port}}
            made = await kube.create(
                api_path("meshaccel.io/v1alpha1", "meshaccelerations"),
                {
                    "apiVersion": "meshaccel.io/v1alpha1",
                    "kind": "MeshAcceleration",
                    "metadata": {"name": "default"},
                    "spec": raw,
                },
            )
            meta = made["metadata"]
            spec = MeshAccelerationSpec.model_validate(raw)
            converged = await runtime.reconcile(
                "default", meta["uid"], meta["creationTimestamp"], spec
            )
            assert converged.daemonset is not None
            await agent.use_tls(await agent_tls(kube, OPERATOR_NAMESPACE, "default"))
            await run_agent_pod(kube, converged.daemonset, "node-1", AGENT_IP)
            name = f"{rendering.daemonset_name('default')}-node-1"
            body = await kube.get(api_path("v1", "pods", OPERATOR_NAMESPACE, name))
            runtime.pod_event(body, "ADDED")
            ready = Setup(runtime, agent, clock, kube)
            await wait_for(lambda: ready.applied() == ["shop/api", "shop/web"], what="the set")
            yield ready
    finally:
        await runtime.close()


async def test_a_pod_deleted_unseen_leaves_the_set_at_the_periodic_resync(setup: Setup) -> None:
    resyncer = setup.runtime.resyncer
    passes = resyncer.passes
    await setup.kube.delete(f"{PODS}/web")  # no event reaches the runtime: a watch gap

    setup.clock.now = resyncer.next_due  # the interval is up (no re-list was seen)
    resyncer.wake()

    await wait_for(lambda: setup.applied() == ["shop/api"], what="the periodic resync")
    assert resyncer.passes == passes + 1
    assert resyncer.last is not None and resyncer.last.pods == ("shop/web",)
    last = setup.agent.last_set
    assert last is not None and last.epoch == setup.runtime.epoch == 1


async def test_a_term_ends_at_once_and_the_next_starts_with_a_resync(setup: Setup) -> None:
    runtime, agent = setup.runtime, setup.agent
    [pusher] = runtime.pushers.values()

    runtime.unwant("test")  # Kopf paused the replica: no pusher writes from now on
    assert runtime.epoch is None and pusher.epoch is None
    state = pusher.nodes()["node-1"]
    assert state.next_push is None and not state.pushing
    await wait_for(lambda: runtime.leadership.epoch is None, what="the term's end")

    await setup.kube.delete(f"{PODS}/web")  # while paused: Kopf tells nothing
    passes = runtime.resyncer.passes
    runtime.want("test")  # resumed: a new term, a resync, then the sets

    await wait_for(lambda: runtime.epoch == 2, what="the second term")
    assert runtime.resyncer.passes == passes + 1
    await wait_for(lambda: agent.applied_epoch == 2, what="the set of the new term")
    assert setup.applied() == ["shop/api"]
    assert [a.pod_set.generation for a in agent.accepted if a.pod_set.epoch == 2] == [1]


async def test_an_agent_with_a_higher_epoch_ends_the_term(setup: Setup) -> None:
    runtime, agent = setup.runtime, setup.agent
    [pusher] = runtime.pushers.values()
    agent.preset(1, agent.last_set.pods if agent.last_set else [], epoch=7)

    await setup.kube.create_pod("shop", "late", node="node-1", pod_ip="198.18.1.12")
    late = await setup.kube.get(f"{PODS}/late")
    runtime.pod_event(late, "ADDED")  # a change: the PUT meets epoch 7

    # The Lease still names this replica (an agent's epoch came from elsewhere, as after
    # the Lease was deleted): it takes a term above the agent's and carries on.
    await wait_for(lambda: runtime.epoch == 8, what="a term above the agent's epoch")
    await wait_for(lambda: agent.applied_epoch == 8, what="the set in that term")
    assert setup.applied() == ["shop/api", "shop/late", "shop/web"]
    assert pusher.nodes()["node-1"].superseded_by is None


# -- two resources: conflicts per node, judged on the complete picture ---------------------------


def pods_of(agent: FakeAgent) -> list[str] | None:
    last = agent.last_set
    return None if last is None else sorted(f"{p.namespace}/{p.name}" for p in last.pods)


async def test_the_start_up_order_retires_no_resource(kubeconfig: Any, kube: KubeClient) -> None:
    """Issue 12, item 6: at start Kopf may hand the operator the younger resource, its agents
    and the older resource before any node; the picture then judged on the selectors alone,
    put the younger resource in Conflict and uninstalled its agents on every node. Now the
    first resync's list is the complete picture: the older resource keeps node-1, the younger
    one node-2, and nothing is uninstalled."""
    await kube.create_namespace(OPERATOR_NAMESPACE)
    await kube.create_namespace("shop", ENABLED)
    await kube.create_node("node-1", labels={"pool": "a"})
    await kube.create_node("node-2", labels={"pool": "b"})
    pods = [
        await kube.create_pod(
            "shop", "a", node="node-1", pod_ip="198.18.1.10", labels={"team": "a"}
        ),
        await kube.create_pod(
            "shop", "b", node="node-2", pod_ip="198.18.1.11", labels={"team": "b"}
        ),
    ]
    with socket.socket() as one, socket.socket() as two:  # ports free on both addresses
        one.bind((AGENT_IP, 0))
        two.bind(("127.0.0.3", 0))
        first_port, second_port = int(one.getsockname()[1]), int(two.getsockname()[1])
    raw = {
        "first": {
            "namespaceSelector": {"matchLabels": ENABLED},
            "podSelector": {"matchLabels": {"team": "a"}},
            "agent": {"port": first_port, "nodeSelector": {"pool": "a"}},
        },
        "second": {"namespaceSelector": {"matchLabels": ENABLED}, "agent": {"port": second_port}},
    }
    made = {}
    for name in ("first", "second"):  # "first" is the older (by time, or else by name)
        made[name] = await kube.create(
            api_path("meshaccel.io/v1alpha1", "meshaccelerations"),
            {
                "apiVersion": "meshaccel.io/v1alpha1",
                "kind": "MeshAcceleration",
                "metadata": {"name": name},
                "spec": raw[name],
            },
        )
    config = OperatorConfig(namespace=OPERATOR_NAMESPACE, push_window=0.01, probe_interval=3600)
    runtime = Operator(config, await api_client(), aiohttp.ClientSession(), clock=StoppedClock())
    runtime.start()
    agents = {
        ("first", "node-1"): FakeAgent(tls=None, host=AGENT_IP, port=first_port),
        ("second", "node-1"): FakeAgent(tls=None, host=AGENT_IP, port=second_port),
        ("second", "node-2"): FakeAgent(tls=None, host="127.0.0.3", port=second_port),
    }
    try:
        for agent in agents.values():
            await agent.start()

        async def reconcile(name: str) -> None:
            meta = made[name]["metadata"]
            spec = MeshAccelerationSpec.model_validate(raw[name])
            converged = await runtime.reconcile(name, meta["uid"], meta["creationTimestamp"], spec)
            assert converged.daemonset is not None
            for (owner, node), agent in agents.items():
                if owner == name:
                    await agent.use_tls(await agent_tls(kube, OPERATOR_NAMESPACE, name))
                    await run_agent_pod(kube, converged.daemonset, node, agent.host)
                    pod_name = f"{rendering.daemonset_name(name)}-{node}"
                    body = await kube.get(api_path("v1", "pods", OPERATOR_NAMESPACE, pod_name))
                    runtime.pod_event(body, None)

        # Kopf's order at start, as it may come: the writer daemon, the younger resource, the
        # older one, pods, nodes last; then the younger one's status timer.
        runtime.want("test")
        await reconcile("second")
        await reconcile("first")
        runtime.namespace_event("shop", ENABLED, None)
        for body in pods:
            runtime.pod_event(body, None)
        for node, pool in (("node-1", "a"), ("node-2", "b")):
            labels = {"kubernetes.io/hostname": node, "kubernetes.io/os": "linux", "pool": pool}
            runtime.node_event(node, labels, None)
        await runtime.converge(runtime.picture.accelerations["second"])
        assert [agent.uninstalls for agent in agents.values()] == [0, 0, 0], "none retired"

        await wait_for(lambda: pods_of(agents["second", "node-2"]) == ["shop/b"], what="node-2")
        await wait_for(lambda: pods_of(agents["first", "node-1"]) == ["shop/a"], what="node-1")
        await wait_for(lambda: pods_of(agents["second", "node-1"]) == [], what="an empty set")
        assert [agent.uninstalls for agent in agents.values()] == [0, 0, 0]
        second = runtime.picture.accelerations["second"]
        assert second.held_by() == {"first": (["node-1"], ["shop/a"])}
        status, _ = runtime.status("second", 1, {}, None)
        assert status is not None and status["conflicts"] == [
            {
                "heldBy": "first",
                "nodes": ["node-1"],
                "nodeCount": 1,
                "pods": ["shop/a"],
                "podCount": 1,
            }
        ]
        conflict = next(c for c in status["conditions"] if c["type"] == "Conflict")
        assert conflict["status"] == "True" and "'first'" in conflict["message"]
    finally:
        await runtime.close()
        for agent in agents.values():
            await agent.close()


async def test_the_periodic_resync_rechecks_the_conflicts(setup: Setup) -> None:
    """The periodic re-check the picture's docstring promises runs with every resync: here
    the periodic one, on the runtime's stopped clock."""
    resyncer, picture = setup.runtime.resyncer, setup.runtime.picture
    rechecks = picture.rechecks
    setup.clock.now = resyncer.next_due
    resyncer.wake()
    await wait_for(lambda: picture.rechecks == rechecks + 1, what="the periodic re-check")
