"""``meshaccel version``: the client's, the operator's and every agent's version, and skew.

The operator's version comes from each resource's status (``operatorVersion``, what the
running operator wrote) and from its Deployment's image tag (what is being rolled out). Each
agent's comes from the status's per-node ``agentVersion``; an agent the status does not list
is asked itself (``meshaccel-agent version -o json`` through exec).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import Field

from meshaccel.cli.agents import AgentRunner, Agents, exec_failure, is_serving, parse_json
from meshaccel.cli.kube import AccessError, Cluster
from meshaccel.cli.output import Report, Style, table
from meshaccel.cli.status import AccelerationStatus, version_skew

VERSION_ARGS = ("version", "-o", "json")
OPERATOR_SELECTOR = "app.kubernetes.io/part-of=meshaccel,app.kubernetes.io/component=operator"
OPERATOR_CONTAINER = "operator"
MAX_PARALLEL_EXECS = 8
_VERSION_TAG = re.compile(r"^v?[0-9]+(\.[0-9]+)*([-+][0-9A-Za-z.-]+)?$")


class OperatorVersion(Report):
    """``source``: status (a resource's operatorVersion) or image (a Deployment's tag)."""

    source: str
    where: str  # the resource, or the Deployment (namespace/name)
    version: str | None = None
    image: str | None = None


class AgentVersion(Report):
    """``source``: status (its node in the resource's status) or exec (the agent's answer)."""

    resource: str
    node: str
    pod: str | None = None
    source: str
    version: str | None = None
    detail: str = ""


class VersionReport(Report):
    client: str
    operator: list[OperatorVersion] = Field(default_factory=list)
    agents: list[AgentVersion] = Field(default_factory=list)
    skew: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


def image_tag(image: str) -> str | None:
    """The tag of an image reference (None when it has none, e.g. pinned by digest only)."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def tag_version(tag: str | None) -> str | None:
    """The version an image tag names ("v0.2.0" -> "0.2.0"); None for a tag that names none
    ("main", "latest"): only a version is compared with the others."""
    if tag is None or not _VERSION_TAG.match(tag):
        return None
    return tag[1:] if tag.startswith("v") else tag


def operator_images(deployments: Sequence[Mapping[str, Any]]) -> list[OperatorVersion]:
    found = []
    for deployment in deployments:
        meta = deployment.get("metadata") or {}
        pod_spec = ((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}
        containers = pod_spec.get("containers") or [{}]
        container = next(
            (c for c in containers if c.get("name") == OPERATOR_CONTAINER), containers[0]
        )
        image = container.get("image")
        tag = image_tag(image) if isinstance(image, str) else None
        found.append(
            OperatorVersion(
                source="image",
                where=f"{meta.get('namespace')}/{meta.get('name')}",
                version=tag_version(tag),
                image=image if isinstance(image, str) else None,
            )
        )
    return found


def agent_versions(
    statuses: Mapping[str, AccelerationStatus],
    agents: Sequence[Agents],
    run: AgentRunner,
) -> list[AgentVersion]:
    """Every agent: from the status where it lists the node's version, else asked by exec."""
    found: list[AgentVersion] = []
    to_ask: list[tuple[str, str, Mapping[str, Any]]] = []
    for agent in agents:
        listed = {
            node.node: node.agent_version
            for node in statuses[agent.resource].nodes
            if node.agent_version
        }
        for node, version in sorted(listed.items()):
            pod = agent.by_node.get(node)
            name = (pod.get("metadata") or {}).get("name") if pod else None
            found.append(
                AgentVersion(
                    resource=agent.resource, node=node, pod=name, source="status", version=version
                )
            )
        to_ask += [
            (agent.resource, node, pod)
            for node, pod in sorted(agent.by_node.items())
            if node not in listed
        ]

    def ask(item: tuple[str, str, Mapping[str, Any]]) -> AgentVersion:
        resource, node, pod = item
        name = str((pod.get("metadata") or {}).get("name"))
        if not is_serving(pod):
            return AgentVersion(
                resource=resource,
                node=node,
                pod=name,
                source="exec",
                detail="the agent is not running: it cannot be asked",
            )
        result = run(pod, *VERSION_ARGS)
        answer = parse_json(result.stdout)
        if isinstance(answer, Mapping) and isinstance(answer.get("version"), str):
            return AgentVersion(
                resource=resource, node=node, pod=name, source="exec", version=answer["version"]
            )
        return AgentVersion(
            resource=resource,
            node=node,
            pod=name,
            source="exec",
            detail=exec_failure(result, ["meshaccel-agent", *VERSION_ARGS]),
        )

    with ThreadPoolExecutor(max_workers=MAX_PARALLEL_EXECS) as pool:
        found += pool.map(ask, to_ask)
    return sorted(found, key=lambda a: (a.resource, a.node))


def version_report(
    cluster: Cluster,
    client_version: str,
    statuses: Sequence[AccelerationStatus],
    agents: Sequence[Agents],
    operator_namespaces: Sequence[str],
    run: AgentRunner,
) -> VersionReport:
    notes = [f"MeshAcceleration {a.resource}: {a.error}" for a in agents if a.error]
    operator = [
        OperatorVersion(source="status", where=s.name, version=s.operator_version) for s in statuses
    ]
    for namespace in operator_namespaces:
        try:
            operator += operator_images(cluster.deployments(namespace, OPERATOR_SELECTOR))
        except AccessError as err:
            notes.append(f"the operator's Deployment: {err}")
    agents_found = agent_versions({s.name: s for s in statuses}, agents, run)
    skew = version_skew(
        {
            "client": [client_version],
            "operator": [v.version for v in operator if v.version],
            "agents": [a.version for a in agents_found if a.version],
        }
    )
    return VersionReport(
        client=client_version, operator=operator, agents=agents_found, skew=skew, notes=notes
    )


def render_version(report: VersionReport, style: Style) -> list[str]:
    lines = [f"Client: {report.client}"]
    if report.operator:
        rows = [
            [
                "resource status" if v.source == "status" else "Deployment image",
                v.where,
                v.version or style.warn("not reported"),
                v.image or "",
            ]
            for v in report.operator
        ]
        lines.append("Operator:")
        lines += table(["FROM", "WHERE", "VERSION", "IMAGE"], rows, indent="  ")
    if report.agents:
        rows = [
            [
                a.resource,
                a.node,
                a.version or style.warn("unknown"),
                "status" if a.source == "status" else "asked the agent",
                a.detail,
            ]
            for a in report.agents
        ]
        lines.append("Agents:")
        lines += table(["RESOURCE", "NODE", "VERSION", "FROM", "DETAIL"], rows, indent="  ")
    lines += [style.warn("Warning: " + warning) for warning in report.skew]
    by_version: dict[str, list[str]] = {}
    for agent in report.agents:
        if agent.version:
            by_version.setdefault(agent.version, []).append(agent.node)
    if report.skew and len(by_version) > 1:
        for version, nodes in sorted(by_version.items()):
            lines.append(style.warn(f"  agents at {version}: {', '.join(sorted(set(nodes)))}"))
    lines += [style.warn("Note: " + note) for note in report.notes]
    return lines
