"""A realistic cluster in the API emulator for the CLI's tests, and the CLI run against it.

What the operator and the kubelets would write is written here through the API (the emulator
runs neither): the operator's own rendering of the agents' DaemonSet, agent pods as the
DaemonSet controller makes them, the resource's status through its status subresource
(checked by the CRD's schema, generated from the operator's models), a crashed agent's
container status with its termination message. The pods/exec handlers say what runs in each
agent pod.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshaccel.cli.main import main
from meshaccel.operator import rendering
from tests.operator.conftest import KubeClient, api_path, report_rollout, run_agent_pod

JsonObj = dict[str, Any]
AGENTS_NAMESPACE = "meshaccel-system"
ENABLED = {"meshaccel.io/accelerate": "enabled"}
MA = ("meshaccel.io/v1alpha1", "meshaccelerations")
AGENT_IMAGE = "registry.example/meshaccel-agent:0.1.0"
OPERATOR_IMAGE = "registry.example/meshaccel-operator:0.1.0"


@dataclass(frozen=True)
class Run:
    """What one run of the command printed, and its exit code."""

    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


async def meshaccel(*argv: str) -> Run:
    """The command, in a thread (it blocks; the emulator serves on this loop)."""
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(main, list(argv), out, err)
    return Run(code, out.getvalue(), err.getvalue())


async def create_acceleration(
    kube: KubeClient, name: str, namespace_labels: Mapping[str, str] = ENABLED, **spec: Any
) -> JsonObj:
    body = {
        "apiVersion": "meshaccel.io/v1alpha1",
        "kind": "MeshAcceleration",
        "metadata": {"name": name},
        "spec": {"namespaceSelector": {"matchLabels": dict(namespace_labels)}, **spec},
    }
    return await kube.create(api_path(*MA), body)


async def create_agents(
    kube: KubeClient, acceleration: JsonObj, nodes: Mapping[str, str]
) -> JsonObj:
    """The agents' DaemonSet for ``acceleration`` as far as the CLI reads it (the operator's
    names, labels, selector, container and owner), and a running agent pod on each of
    ``nodes`` (node -> its address), as the DaemonSet controller and kubelet make them."""
    meta = acceleration["metadata"]
    name = meta["name"]
    labels = {
        **rendering.agent_pod_selector(name),
        rendering.MANAGED_BY_LABEL: "meshaccel-operator",
    }
    owner = {
        "apiVersion": "meshaccel.io/v1alpha1",
        "kind": "MeshAcceleration",
        "name": name,
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    container = {
        "name": rendering.CONTAINER_NAME,
        "image": AGENT_IMAGE,
        "command": ["meshaccel-agent"],
        "args": ["run"],
    }
    daemonset = await kube.create(
        api_path("apps/v1", "daemonsets", AGENTS_NAMESPACE),
        {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {
                "name": rendering.daemonset_name(name),
                "namespace": AGENTS_NAMESPACE,
                "labels": labels,
                "ownerReferences": [owner],
            },
            "spec": {
                "selector": {"matchLabels": rendering.agent_pod_selector(name)},
                "template": {
                    "metadata": {
                        "labels": labels,
                        "annotations": {
                            "kubectl.kubernetes.io/default-container": rendering.CONTAINER_NAME
                        },
                    },
                    "spec": {
                        "hostNetwork": True,
                        "nodeSelector": {"kubernetes.io/os": "linux"},
                        "tolerations": [{"operator": "Exists"}],
                        "containers": [container],
                    },
                },
            },
        },
    )
    for node, ip in nodes.items():
        await run_agent_pod(kube, daemonset, node, ip)
    await report_rollout(kube, daemonset, len(nodes))
    return daemonset


def agent_pod_name(daemonset: JsonObj, node: str) -> str:
    """As tests/operator/conftest.run_agent_pod names them."""
    return f"{daemonset['metadata']['name']}-{node}"


async def write_status(kube: KubeClient, name: str, status: Mapping[str, Any]) -> JsonObj:
    return await kube.merge(
        api_path(*MA, name=name, subresource="status"), {"status": dict(status)}
    )


async def crash_agent(kube: KubeClient, pod: str, message: str, exit_code: int = 1) -> None:
    """The agent container stopped at start-up and kubelet is backing off its restarts; its
    last run's termination message is ``message``."""
    await kube.merge(
        api_path("v1", "pods", AGENTS_NAMESPACE, pod, "status"),
        {
            "status": {
                "containerStatuses": [
                    {
                        "name": rendering.CONTAINER_NAME,
                        "image": AGENT_IMAGE,
                        "imageID": "",
                        "ready": False,
                        "restartCount": 4,
                        "state": {
                            "waiting": {
                                "reason": "CrashLoopBackOff",
                                "message": "back-off 1m20s restarting failed container",
                            }
                        },
                        "lastState": {
                            "terminated": {
                                "exitCode": exit_code,
                                "reason": "Error",
                                "message": message,
                                "startedAt": "2025-01-01T00:00:00Z",
                                "finishedAt": "2025-01-01T00:00:01Z",
                            }
                        },
                    }
                ]
            }
        },
    )


async def create_operator_deployment(kube: KubeClient, image: str = OPERATOR_IMAGE) -> JsonObj:
    """The chart's operator Deployment, as far as the CLI reads it (labels and image)."""
    labels = {
        "app.kubernetes.io/name": "meshaccel",
        "app.kubernetes.io/instance": "meshaccel",
        "app.kubernetes.io/component": "operator",
        "app.kubernetes.io/part-of": "meshaccel",
    }
    return await kube.create(
        api_path("apps/v1", "deployments", AGENTS_NAMESPACE),
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "meshaccel", "namespace": AGENTS_NAMESPACE, "labels": labels},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "containers": [
                            {"name": "operator", "image": image, "command": ["meshaccel-operator"]}
                        ]
                    },
                },
            },
        },
    )


def lines_with(text: str, *words: str) -> Sequence[str]:
    """The lines of ``text`` that contain every one of ``words``."""
    return [line for line in text.splitlines() if all(word in line for word in words)]


# --- the realistic cluster -----------------------------------------------------------------------

NODES = {
    "node-1": "198.18.0.1",
    "node-2": "198.18.0.2",
    "node-3": "198.18.0.3",
    "node-4": "198.18.0.4",
}
AGENT_NODES = ("node-1", "node-2", "node-4")  # node-3: its agent pod was never created
NEWER_AGENT = "0.2.0"  # what node-4's freshly rolled agent answers
# (namespace, name, node, what the test expects `meshaccel pods` to say, create_pod options)
PODS: tuple[tuple[str, str, str, str, dict[str, Any]], ...] = (
    ("shop", "web", "node-1", "Accelerated", {}),
    ("shop", "batch", "node-1", "NoSidecar", {"sidecar": False}),
    ("shop", "legacy", "node-4", "OptedOut", {"annotations": {"meshaccel.io/accelerate": "false"}}),
    ("shop", "api", "node-1", "Unresolved", {}),
    ("shop", "cart", "node-2", "Pending", {}),
    ("shop", "edge", "node-3", "NoAgentOnNode", {}),
    ("shop", "starting", "node-4", "NotRunning", {"phase": "Pending"}),
    ("billing", "ledger", "node-4", "Accelerated", {}),
    ("billing", "worker", "node-1", "OverBudget", {}),
    ("other", "tool", "node-1", "", {}),  # its namespace is not selected: not listed
)
NODE_2_ERROR = "connect: [Errno 111] Connection refused (https://198.18.0.2:9474)"


# The checks `meshaccel-agent check -o json` reports (agent/preflight.py), with their levels.
AGENT_CHECKS = (
    ("capabilities", "error"),
    ("btf", "error"),
    ("kernel_features", "error"),
    ("cgroup2", "error"),
    ("attach_cgroup", "error"),
    ("bpffs", "error"),
    ("objects", "error"),
    ("helpers", "error"),
    ("conflicting_programs", "warning"),
)


def check_report(node: str, failing: Sequence[str] = ()) -> JsonObj:
    """What `meshaccel-agent check -o json` prints, with the ``failing`` checks failed (its
    ``ok``: no error-level check failed)."""
    checks = [
        {
            "name": name,
            "ok": name not in failing,
            "detail": f"{name}: " + ("not as needed" if name in failing else "as needed"),
            "fix": f"see docs/operations.md, Troubleshooting ({name})" if name in failing else "",
            "level": level,
        }
        for name, level in AGENT_CHECKS
    ]
    ok = all(c["ok"] or c["level"] == "warning" for c in checks)
    return {"node": node, "ok": ok, "checks": checks}


def scene_status(daemonset: JsonObj) -> JsonObj:
    """The status the operator would write for the scene, built with its own model (so it is
    the operator's shape) and checked again by the CRD's schema on the way in."""
    from meshaccel.contract.version import VERSION
    from meshaccel.operator.models import MeshAccelerationStatus

    now = "2025-01-01T00:00:00Z"
    failing = f"1 node(s) cannot take their pod set (node-2); first error: {NODE_2_ERROR}"

    def condition(kind: str, status: str, reason: str, message: str = "") -> JsonObj:
        return {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": now,
            "observedGeneration": 1,
        }

    meta = daemonset["metadata"]
    status = MeshAccelerationStatus.model_validate(
        {
            "observedGeneration": 1,
            "operatorVersion": VERSION,
            "conditions": [
                condition("Ready", "False", "AgentsFailing", failing),
                condition("Reconciling", "False", "Stalled", "see the Stalled condition"),
                condition("Stalled", "True", "AgentsFailing", failing),
                condition("Degraded", "True", "AgentsFailing", failing),
                condition("Conflict", "False", "NoConflict"),
            ],
            "daemonSet": f"{meta['namespace']}/{meta['name']}",
            "nodesDesired": 4,
            "nodesReady": 2,
            "nodeCount": 3,
            "nodesInSync": 2,
            "nodesWithProblems": 2,
            "nodes": [
                {
                    "node": "node-2",
                    "agentVersion": VERSION,
                    "desiredGeneration": 3,
                    "appliedGeneration": 2,
                    "inSync": False,
                    "lastError": NODE_2_ERROR,
                },
                {
                    "node": "node-1",
                    "agentVersion": VERSION,
                    "desiredGeneration": 4,
                    "appliedGeneration": 4,
                    "inSync": True,
                    "podsAccelerated": 1,
                    "podsUnresolved": 1,
                },
                # Rolled a moment ago: the operator has not heard its version yet.
                {
                    "node": "node-4",
                    "desiredGeneration": 2,
                    "appliedGeneration": 2,
                    "inSync": True,
                    "podsAccelerated": 1,
                },
            ],
            "podsSelected": 4,
            "podsAccelerated": 2,
            "podsNotAccelerated": {
                "NoSidecar": 1,
                "OptedOut": 1,
                "NotRunning": 1,
                "NoAgentOnNode": 1,
                "Pending": 1,
                "Unresolved": 1,
                "OverBudget": 1,
            },
            "problemCount": 2,
            "problems": [
                {
                    "namespace": "shop",
                    "name": "api",
                    "node": "node-1",
                    "reason": "Unresolved",
                    "message": "no cgroup for pod uid 3f2a9c1e under "
                    "/sys/fs/cgroup/kubepods.slice (cgroup driver systemd)",
                },
                {
                    "namespace": "billing",
                    "name": "worker",
                    "node": "node-1",
                    "reason": "OverBudget",
                    "message": "pod_ports needs 300, a pod may take 128",
                },
            ],
        }
    )
    return status.model_dump(mode="json", exclude_none=True)


@dataclass
class Scene:
    acceleration: JsonObj
    daemonset: JsonObj

    def agent(self, node: str) -> str:
        return agent_pod_name(self.daemonset, node)


async def build_scene(kube: KubeClient) -> Scene:
    """Four nodes, one MeshAcceleration; agents on node-1 (fine, one pod unresolved, one over
    budget), node-2 (crash-looping, behind), node-4 (newer version, a failing check); none on
    node-3; pods left out for six different reasons (:data:`PODS`); the operator's Deployment."""
    await kube.create_namespace(AGENTS_NAMESPACE)
    for namespace, labels in (("shop", ENABLED), ("billing", ENABLED), ("other", {})):
        await kube.create_namespace(namespace, labels)
    for node, address in NODES.items():
        await kube.create_node(node, address=address)
    acceleration = await create_acceleration(kube, "default")
    daemonset = await create_agents(kube, acceleration, {n: NODES[n] for n in AGENT_NODES})
    for index, (namespace, name, node, _, options) in enumerate(PODS):
        await kube.create_pod(
            namespace, name, node=node, pod_ip=f"198.18.1.{10 + index}", **options
        )
    await write_status(kube, "default", scene_status(daemonset))
    await create_operator_deployment(kube)
    crashed = check_report("node-2", failing=("bpffs",))
    await crash_agent(kube, agent_pod_name(daemonset, "node-2"), json.dumps(crashed))
    return Scene(acceleration, daemonset)
