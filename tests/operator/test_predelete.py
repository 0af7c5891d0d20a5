"""``meshaccel-operator pre-delete``, Helm's pre-delete hook, against the API emulator.

The command runs as the hook's Job runs it: the installed console script in its own process,
logging JSON lines, talking to the emulator through a kubeconfig. With the operator running
(Kopf in this process, fake agents over mutual TLS) every resource goes with its agents'
uninstall; with no operator, or one that never finishes, the hook removes the finalizer itself
after its bound and names the nodes that may still hold a datapath, never calling them clean.
No DaemonSet controller runs: the tests play it (test_operator.py's ``schedule_agents``), and
the operator's Deployment, whose ready replicas tell the hook whether an operator runs.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import pathlib
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from meshaccel.operator import predelete, rendering
from meshaccel.operator.handlers import FINALIZER
from tests.operator import test_operator as harness
from tests.operator.conftest import KubeClient, api_path
from tests.operator.fake_agent import NODES
from tests.operator.test_operator import MA, NAMESPACE, Cluster, _event_reasons, operator
from tests.requirements import require
from tests.waiting import StoppedClock, wait_for

pytestmark = pytest.mark.slow
# test_operator.py's fixtures: its emulator (cuttable watches) and cluster (two nodes, agents).
emulator = harness.emulator
cluster = harness.cluster

OPERATOR_DEPLOYMENT = "meshaccel"


@pytest.fixture
def kubeconfig(kubeconfig: pathlib.Path) -> pathlib.Path:
    """conftest's, with the release namespace as the context's namespace: Kopf posts the events
    of cluster-scoped objects there, as it does from the operator's pod (its own namespace)."""
    config = yaml.safe_load(kubeconfig.read_text())
    config["contexts"][0]["context"]["namespace"] = NAMESPACE
    kubeconfig.write_text(yaml.safe_dump(config))
    return kubeconfig


@dataclass(frozen=True)
class Hook:
    returncode: int
    lines: list[dict[str, Any]]  # the JSON log lines
    text: str  # everything it wrote

    def messages(self, level: str | None = None) -> list[str]:
        return [line["msg"] for line in self.lines if level in (None, line["level"])]


async def run_hook(*extra: str) -> Hook:
    """The console script, as the chart's Job runs it (MESHACCEL_NAMESPACE from the pod)."""
    script = shutil.which("meshaccel-operator") or str(
        pathlib.Path(__file__).resolve().parents[2] / ".venv" / "bin" / "meshaccel-operator"
    )
    require(os.access(script, os.X_OK), "needs the meshaccel-operator console script")
    process = await asyncio.create_subprocess_exec(
        script,
        "pre-delete",
        f"--operator-deployment={OPERATOR_DEPLOYMENT}",
        "--log-format=json",
        *extra,
        env={**os.environ, "MESHACCEL_NAMESPACE": NAMESPACE},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    text = output.decode()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert process.returncode is not None
    return Hook(process.returncode, lines, text)


async def operator_deployment(kube: KubeClient, ready: int) -> None:
    """The chart's operator Deployment as the hook sees it: its ready replicas."""
    labels = {"app.kubernetes.io/name": "meshaccel", "app.kubernetes.io/component": "operator"}
    path = api_path("apps/v1", "deployments", NAMESPACE)
    await kube.create(
        path,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": OPERATOR_DEPLOYMENT, "namespace": NAMESPACE},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "containers": [
                            {
                                "name": "operator",
                                "image": "ghcr.io/meshaccel/meshaccel-operator:0.1.0",
                            }
                        ]
                    },
                },
            },
        },
    )
    await kube.merge(
        f"{path}/{OPERATOR_DEPLOYMENT}/status",
        {"status": {"replicas": 2, "readyReplicas": ready, "availableReplicas": ready}},
    )


async def accelerations(cluster: Cluster) -> list[str]:
    listing = await cluster.kube.get(api_path(*MA))
    return [item["metadata"]["name"] for item in listing["items"]]


async def _finalized(cluster: Cluster) -> bool:
    return FINALIZER in ((await cluster.acceleration())["metadata"].get("finalizers") or [])


async def test_with_the_operator_running_every_agent_uninstalls(cluster: Cluster) -> None:
    await operator_deployment(cluster.kube, ready=2)
    async with operator():
        await cluster.create_acceleration()
        await cluster.schedule_agents()
        # A second resource whose agents never ran anywhere: nothing to uninstall, still clean.
        await cluster.create_acceleration("quiet", agent={"nodeSelector": {"pool": "none"}})
        await wait_for(lambda: all(a.last_set is not None for a in cluster.agents.values()))

        hook = await run_hook("--timeout=60")

        assert hook.returncode == 0, hook.text
        assert await accelerations(cluster) == []
        assert [agent.uninstalls for agent in cluster.agents.values()] == [1, 1]
        assert "Uninstalled" in _event_reasons(cluster, "default")
        outcomes = {
            line["acceleration"]: line["outcome"] for line in hook.lines if "outcome" in line
        }
        assert outcomes == {"default": "clean", "quiet": "clean"}, hook.text
        assert hook.messages()[-1].startswith("every MeshAcceleration uninstalled")
        assert hook.messages("warning") == []
        # The agents' objects went with their resource (owner references).
        daemonset = rendering.daemonset_name("default")
        assert await cluster.read("daemonsets", daemonset, "apps/v1") is None


async def test_an_agent_that_does_not_confirm_is_named_not_called_clean(cluster: Cluster) -> None:
    await operator_deployment(cluster.kube, ready=1)
    async with operator():
        await cluster.create_acceleration()
        await cluster.schedule_agents()
        await wait_for(lambda: cluster.agents["node-2"].last_set is not None)
        cluster.agents["node-2"].fail_next(100, 503, path="/v1/uninstall")

        hook = await run_hook("--timeout=90")

        assert hook.returncode == 0, hook.text
        assert await accelerations(cluster) == []
        decided, summed_up = [line for line in hook.lines if line.get("outcome") == "incomplete"]
        assert "node-2" in decided["detail"], decided  # the operator's UninstallIncomplete
        assert summed_up["nodes"] == sorted(NODES), summed_up
        summary = hook.messages("warning")
        assert any("may still hold its pinned datapath" in m for m in summary), hook.text
        assert summary[-1].startswith("NOT every node is clean")
        assert "every MeshAcceleration uninstalled" not in hook.text


async def test_without_an_operator_the_finalizer_goes_and_the_nodes_are_named(
    cluster: Cluster,
) -> None:
    """The operator ran (the finalizer is on, agents run on both nodes), then stopped: its
    Deployment has no ready replica. The hook gives up after --operator-grace."""
    await operator_deployment(cluster.kube, ready=0)
    async with operator():
        await cluster.create_acceleration()
        await cluster.schedule_agents()
        await wait_for(lambda: all(a.last_set is not None for a in cluster.agents.values()))
    stored = await cluster.acceleration()
    assert FINALIZER in stored["metadata"]["finalizers"]

    hook = await run_hook("--timeout=60", "--operator-grace=1")

    assert hook.returncode == 0, hook.text
    assert await accelerations(cluster) == [], "nothing hangs on the finalizer"
    assert [agent.uninstalls for agent in cluster.agents.values()] == [0, 0]
    (gave_up,) = [line for line in hook.lines if line.get("outcome") == "abandoned"]
    assert gave_up["acceleration"] == "default" and gave_up["nodes"] == sorted(NODES)
    message = gave_up["msg"]
    assert "no operator replica was ready for 1 s" in message
    instance = rendering.agent_instance("default")
    assert f"meshaccel-agent uninstall --instance {instance}" in message
    assert f"/sys/fs/bpf/meshaccel/{instance}" in message
    assert "node-1, node-2" in message
    assert hook.messages()[-1].startswith("NOT every node is clean")
    assert "Uninstalled" not in _event_reasons(cluster, "default")


async def test_an_operator_that_never_finishes_is_waited_for_until_the_timeout(
    cluster: Cluster, kube: KubeClient
) -> None:
    """The Deployment says an operator is ready, but none handles the deletion (stuck)."""
    await operator_deployment(kube, ready=2)
    async with operator():
        await cluster.create_acceleration()
        await wait_for(lambda: _finalized(cluster), what="the operator's finalizer")
    hook = await run_hook("--timeout=2", "--operator-grace=1")
    assert hook.returncode == 0, hook.text
    assert await accelerations(cluster) == []
    (gave_up,) = [line for line in hook.lines if line.get("outcome") == "abandoned"]
    assert "the operator did not finish within 2 s" in gave_up["msg"]
    assert "(no agent pod was seen)" in gave_up["msg"]


async def test_nothing_to_uninstall(cluster: Cluster) -> None:
    hook = await run_hook()
    assert hook.returncode == 0, hook.text
    assert hook.messages() == ["no MeshAcceleration to uninstall"]


async def test_bad_arguments_exit_2() -> None:
    hook = await run_hook("--timeout=0")
    assert hook.returncode == 2
    assert "--timeout must be 1 to 3600 s" in hook.text


# -- the decisions, in memory (no emulator, a clock the test moves) ----------------------------


@dataclass
class MemoryCluster:
    """The hook's view of a cluster, changed by the test through the hook's own sleeps."""

    clock: StoppedClock
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> resource
    posted: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # uid -> events
    ready: int = 1
    conflicts: int = 0  # finalizer patches to refuse before one is taken
    on_sleep: list[Callable[[MemoryCluster], None]] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    def add(self, name: str) -> None:
        self.objects[name] = {
            "metadata": {
                "name": name,
                "uid": f"uid-{name}",
                "resourceVersion": "1",
                "finalizers": [FINALIZER, "example.com/other"],
            }
        }

    async def accelerations(self) -> list[dict[str, Any]]:
        return [copy.deepcopy(obj) for obj in self.objects.values()]

    async def delete(self, name: str, uid: str) -> None:
        self.deleted.append(name)

    async def remove_finalizer(self, obj: Mapping[str, Any]) -> bool:
        if self.conflicts:
            self.conflicts -= 1
            return False
        live = self.objects[obj["metadata"]["name"]]
        live["metadata"]["finalizers"].remove(FINALIZER)
        return True

    async def agent_nodes(self, name: str) -> set[str]:
        return {"node-1"}

    async def events(self, uid: str) -> list[dict[str, Any]]:
        return self.posted.get(uid, [])

    async def operator_ready(self) -> int:
        return self.ready

    async def sleep(self, seconds: float) -> None:
        self.clock.now += seconds
        if self.on_sleep:
            self.on_sleep.pop(0)(self)


def _finish(name: str, reason: str | None) -> Callable[[MemoryCluster], None]:
    """The operator's finalizer handler: the resource goes; its event, if any, comes later."""

    def finish(cluster: MemoryCluster) -> None:
        del cluster.objects[name]
        if reason is not None:
            cluster.on_sleep.append(
                lambda c: c.posted.setdefault(f"uid-{name}", []).append(
                    {"reason": reason, "message": "every agent detached its datapath"}
                )
            )

    return finish


def _decide(cluster: MemoryCluster) -> list[predelete.Tracked]:
    limits = predelete.Limits(timeout=30, operator_grace=6, poll=2, event_grace=5)
    return asyncio.run(predelete.run(cluster, limits, clock=cluster.clock, sleep=cluster.sleep))


def test_an_event_that_arrives_after_its_resource_went_still_counts() -> None:
    """Kopf posts events in the background: Uninstalled may come after the finalizer went."""
    cluster = MemoryCluster(StoppedClock())
    cluster.add("mesh")
    cluster.on_sleep.append(_finish("mesh", "Uninstalled"))
    (mesh,) = _decide(cluster)
    assert (mesh.outcome, mesh.nodes) == (predelete.Outcome.CLEAN, {"node-1"})
    assert cluster.deleted == ["mesh"]


def test_no_event_at_all_is_unconfirmed_not_clean() -> None:
    cluster = MemoryCluster(StoppedClock())
    cluster.add("mesh")
    cluster.on_sleep.append(_finish("mesh", None))
    (mesh,) = _decide(cluster)
    assert mesh.outcome == predelete.Outcome.UNCONFIRMED
    assert "node-1" in predelete.cleanup_advice(mesh)


def test_an_operator_that_goes_away_midway_is_given_its_grace_then_left() -> None:
    cluster = MemoryCluster(StoppedClock())
    cluster.add("mesh")
    cluster.on_sleep.append(lambda c: setattr(c, "ready", 0))
    cluster.conflicts = 2  # another writer twice: the hook reads again and retries
    start = cluster.clock.now
    (mesh,) = _decide(cluster)
    assert mesh.outcome == predelete.Outcome.ABANDONED
    assert "no operator replica was ready for 6 s" in mesh.detail
    assert cluster.clock.now - start < 30, "ended before the timeout"
    # Only the operator's finalizer went: another owner's stays.
    assert cluster.objects["mesh"]["metadata"]["finalizers"] == ["example.com/other"]


def test_a_finalizer_that_cannot_be_removed_fails_the_hook() -> None:
    cluster = MemoryCluster(StoppedClock(), ready=0)
    cluster.add("mesh")
    cluster.conflicts = 100
    with pytest.raises(predelete.ApiError, match="kept changing"):
        _decide(cluster)
