"""Upgrades, end to end against the API emulator: what ``helm upgrade`` changes reaches the agents.

``helm upgrade`` changes the operator's settings (its Deployment's environment): the replica
that starts with them re-renders every resource's agents. A new agent image, or new pod
settings, change the DaemonSet's pod template (the DaemonSet controller rolls the agents, one
node at a time, and each new agent adopts the pins: tests/agent_lifecycle), never the agents'
settings file; a changed ``spec.datapath`` changes the settings file and its hash (the rolled
agent reloads the datapath: tests/agent_lifecycle/test_reload.py). Neither deletes the resource
nor uninstalls an agent. Every object written is validated by the emulator (the official
schemas), so the rendered pod settings are valid Kubernetes.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from meshaccel.operator import rendering
from meshaccel.operator.models import LEGACY_DEFAULT_AGENT_RESOURCES
from tests.operator import test_operator as harness
from tests.operator.conftest import api_path
from tests.operator.test_operator import AGENT_IMAGE, MA, Cluster, _true, operator
from tests.waiting import wait_for

pytestmark = pytest.mark.slow
# test_operator.py's fixtures: its emulator (cuttable watches) and cluster (two nodes, agents).
emulator = harness.emulator
cluster = harness.cluster

NEW_IMAGE = "registry.example/mirror/meshaccel-agent:0.3.0"
AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {
                    "matchExpressions": [
                        {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}
                    ]
                }
            ]
        }
    }
}
POD_SETTINGS = {
    "MESHACCEL_AGENT_POD_ANNOTATIONS": json.dumps({"example.com/team": "mesh"}),
    "MESHACCEL_AGENT_POD_LABELS": json.dumps({"cost-center": "mesh"}),
    "MESHACCEL_AGENT_NODE_SELECTOR": json.dumps({"pool": "mesh"}),
    "MESHACCEL_AGENT_AFFINITY": json.dumps(AFFINITY),
    "MESHACCEL_AGENT_PRIORITY_CLASS": "mesh-agents",
    "MESHACCEL_AGENT_RESOURCES": json.dumps({"requests": {"cpu": "100m", "memory": "128Mi"}}),
}


async def _daemonset(cluster: Cluster, name: str = "default") -> dict[str, Any]:
    found: dict[str, Any] = await cluster.read(
        "daemonsets", rendering.daemonset_name(name), "apps/v1"
    )
    return found


def _template(daemonset: dict[str, Any]) -> dict[str, Any]:
    template: dict[str, Any] = daemonset["spec"]["template"]
    return template


async def test_new_operator_settings_roll_the_agents_and_keep_the_resource(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """helm upgrade with a new agent image and pod settings: the operator that starts with
    them re-renders the DaemonSet; the settings file (and so the datapath) stays as it was."""
    async with operator():
        created = await cluster.create_acceleration()
        await cluster.schedule_agents()
        await wait_for(lambda: _true(cluster, "default", "Ready"), timeout=10)
        before = await _daemonset(cluster)
        assert _template(before)["spec"]["containers"][0]["image"] == AGENT_IMAGE
        pod = _template(before)["spec"]
        assert pod["containers"][0]["resources"] == LEGACY_DEFAULT_AGENT_RESOURCES
        assert "affinity" not in pod and pod["priorityClassName"] == "system-node-critical"

    monkeypatch.setenv("MESHACCEL_AGENT_IMAGE", NEW_IMAGE)
    for variable, value in POD_SETTINGS.items():
        monkeypatch.setenv(variable, value)
    async with operator():

        async def rolled() -> dict[str, Any] | None:
            daemonset = await _daemonset(cluster)
            image = _template(daemonset)["spec"]["containers"][0]["image"]
            return daemonset if image == NEW_IMAGE else None

        after = await wait_for(rolled, timeout=15, what="the DaemonSet with the new image")
        template = _template(after)
        pod = template["spec"]
        assert pod["affinity"] == AFFINITY
        assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", "pool": "mesh"}
        assert pod["priorityClassName"] == "mesh-agents"
        assert pod["containers"][0]["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}}
        assert template["metadata"]["labels"]["cost-center"] == "mesh"
        assert template["metadata"]["annotations"]["example.com/team"] == "mesh"
        # The same settings file: the rolled agents adopt the pinned datapath as it is.
        hash_ = rendering.CONFIG_HASH_ANNOTATION
        assert (
            template["metadata"]["annotations"][hash_]
            == (_template(before)["metadata"]["annotations"][hash_])
        )
        assert after["spec"]["selector"] == before["spec"]["selector"], "immutable, unchanged"
    resource = await cluster.acceleration()
    assert resource["metadata"]["uid"] == created["metadata"]["uid"]
    assert [agent.uninstalls for agent in cluster.agents.values()] == [0, 0]


async def test_a_changed_datapath_setting_takes_effect_without_deleting_the_resource(
    cluster: Cluster,
) -> None:
    async with operator():
        created = await cluster.create_acceleration()
        await cluster.schedule_agents()
        await wait_for(lambda: _true(cluster, "default", "Ready"), timeout=10)
        before = await _daemonset(cluster)
        await cluster.kube.merge(
            api_path(*MA, name="default"),
            {"spec": {"datapath": {"skMsgRedirectBudget": 262144, "maxPods": 2048}}},
        )
        hash_ = rendering.CONFIG_HASH_ANNOTATION

        async def rolled() -> dict[str, Any] | None:
            daemonset = await _daemonset(cluster)
            annotations = _template(daemonset)["metadata"]["annotations"]
            return (
                daemonset
                if annotations[hash_] != _template(before)["metadata"]["annotations"][hash_]
                else None
            )

        await wait_for(rolled, timeout=10, what="a new settings hash on the pod template")
        config = await cluster.read("configmaps", rendering.configmap_name("default"))
        assert "sk_msg_redirect_budget: 262144" in config["data"]["agent.yaml"]
        assert "max_pods: 2048" in config["data"]["agent.yaml"]
        resource = await cluster.acceleration()
        assert resource["metadata"]["uid"] == created["metadata"]["uid"]
        assert resource["metadata"].get("deletionTimestamp") is None
        assert [agent.uninstalls for agent in cluster.agents.values()] == [0, 0]
