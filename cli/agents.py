"""A MeshAcceleration's agents as the API shows them: its DaemonSet (named by the status) and
the DaemonSet's pods, and the agent's own commands run in them through ``exec``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshaccel.cli.kube import AccessError, Cluster, ExecResult
from meshaccel.cli.status import AccelerationStatus

JsonObj = dict[str, Any]

AGENT_COMMAND = "meshaccel-agent"
DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"


@dataclass(frozen=True)
class Agents:
    """``pods`` None: they could not be listed (``error`` says why)."""

    resource: str
    namespace: str | None
    daemonset: JsonObj | None
    pods: list[JsonObj] | None
    error: str = ""
    by_node: dict[str, JsonObj] = field(default_factory=dict)


class AgentRunner(Protocol):
    """Runs ``meshaccel-agent ARGS`` in an agent pod (:func:`run_agent`, bound to a cluster)."""

    def __call__(self, pod: Mapping[str, Any], *args: str) -> ExecResult: ...


def label_selector(selector: Mapping[str, Any]) -> str:
    """A LabelSelector object as the API's ``labelSelector`` query parameter."""
    terms = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for term in selector.get("matchExpressions") or ():
        key, operator, values = term.get("key"), term.get("operator"), term.get("values") or []
        if operator == "In":
            terms.append(f"{key} in ({','.join(values)})")
        elif operator == "NotIn":
            terms.append(f"{key} notin ({','.join(values)})")
        elif operator == "Exists":
            terms.append(str(key))
        elif operator == "DoesNotExist":
            terms.append(f"!{key}")
    return ",".join(terms)


def _owned_by(pod: Mapping[str, Any], uid: str | None) -> bool:
    owners = (pod.get("metadata") or {}).get("ownerReferences") or ()
    return any(o.get("kind") == "DaemonSet" and o.get("uid") == uid for o in owners)


def _created(pod: Mapping[str, Any]) -> str:
    return str((pod.get("metadata") or {}).get("creationTimestamp") or "")


def find_agents(cluster: Cluster, status: AccelerationStatus) -> Agents:
    if not status.daemon_set or "/" not in status.daemon_set:
        return Agents(status.name, None, None, [], "the status names no agent DaemonSet yet")
    namespace, name = status.daemon_set.split("/", 1)
    try:
        daemonset = cluster.daemonset(namespace, name)
        if daemonset is None:
            return Agents(
                status.name, namespace, None, [], f"DaemonSet {namespace}/{name} does not exist"
            )
        selector = label_selector((daemonset.get("spec") or {}).get("selector") or {})
        uid = (daemonset.get("metadata") or {}).get("uid")
        pods = [p for p in cluster.pods(namespace, selector) if _owned_by(p, uid)]
    except AccessError as err:
        return Agents(status.name, namespace, None, None, str(err))
    by_node: dict[str, JsonObj] = {}
    # During a rollout a node may briefly have two: the newest one serves.
    for pod in sorted(pods, key=_created):
        node = (pod.get("spec") or {}).get("nodeName")
        if node:
            by_node[node] = pod
    return Agents(status.name, namespace, daemonset, pods, by_node=by_node)


def agent_container(pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    named = (meta.get("annotations") or {}).get(DEFAULT_CONTAINER_ANNOTATION)
    if named:
        return str(named)
    containers = (pod.get("spec") or {}).get("containers") or [{}]
    return str(containers[0].get("name", ""))


def container_status(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    name = agent_container(pod)
    for status in (pod.get("status") or {}).get("containerStatuses") or ():
        if status.get("name") == name:
            return status  # type: ignore[no-any-return]
    return {}


def is_serving(pod: Mapping[str, Any]) -> bool:
    """Running, its agent container too (as far as the pod's status says)."""
    if (pod.get("status") or {}).get("phase") != "Running":
        return False
    state = container_status(pod).get("state")
    return state is None or "running" in state


def run_agent(cluster: Cluster, pod: Mapping[str, Any], *args: str) -> ExecResult:
    meta = pod.get("metadata") or {}
    return cluster.exec(
        str(meta.get("namespace")),
        str(meta.get("name")),
        agent_container(pod),
        [AGENT_COMMAND, *args],
    )


def parse_json(text: str) -> Any:
    """``text`` as JSON, or None when it is not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return None


def exec_failure(result: ExecResult, what: Sequence[str]) -> str:
    """Why a command run in an agent gave no answer, in a line."""
    if result.error:
        return result.error
    last = [line for line in result.stderr.splitlines() if line.strip()]
    said = f": {last[-1].strip()[:300]}" if last else ""
    return f"`{' '.join(what)}` exited with code {result.exit_code} and no JSON report{said}"
