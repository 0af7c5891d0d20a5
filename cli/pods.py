"""``meshaccel pods``: each pod the MeshAccelerations select, accelerated or why not.

Selection is computed here, on the pods and namespaces the user can list, with the operator's
own :func:`~meshaccel.operator.selection.select`, so a pod gets the verdict the operator gives
it (NoSidecar, OptedOut, NotRunning, NoAgentOnNode, ...). Claims between resources follow the
operator's rule (the older resource, by creationTimestamp then name, keeps a pod both select,
and a node both run agents on). What only the agents know comes from the resource's status: a
pod the status lists as a problem (Unresolved: its cgroup was not found; OverBudget: the node's
maps do not take it) takes that reason, and a pod on a node whose agent has not applied its
newest set is Pending. The status lists only the first problems: the report says how many it
leaves out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field, ValidationError

from meshaccel.cli.output import Report, Style, table
from meshaccel.cli.status import AccelerationStatus
from meshaccel.operator.models import MeshAccelerationSpec
from meshaccel.operator.selection import (
    BEFORE_CLAIMS,
    PodFacts,
    Verdict,
    has_sidecar,
    matches_selectors,
    select,
)

JsonObj = dict[str, Any]

ACCELERATED = "Accelerated"
PENDING = "Pending"
ACCELERATION_LABEL = "meshaccel.io/acceleration"
COMPONENT_LABEL = "app.kubernetes.io/component"
_NOT_SELECTED = frozenset({Verdict.NAMESPACE_NOT_SELECTED, Verdict.POD_NOT_SELECTED})


class PodRow(Report):
    namespace: str
    name: str
    node: str | None
    resource: str
    state: str
    detail: str = ""
    # status.podIPs (a dual-stack pod has one of each family), podIP first: the addresses the
    # datapath knows the pod by.
    addresses: list[str] = Field(default_factory=list)

    @property
    def accelerated(self) -> bool:
        return self.state == ACCELERATED


class PodsReport(Report):
    scope: str  # "namespace NAME" or "all namespaces"
    pods: list[PodRow]
    notes: list[str] = Field(default_factory=list)

    def count(self, state: str) -> int:
        return sum(1 for row in self.pods if row.state == state)


@dataclass(frozen=True)
class Resource:
    """A MeshAcceleration as selection needs it: its spec (None: unreadable), seniority, the
    nodes its agents run on and its status. ``agents_error``: why its agent pods could not be
    listed (the nodes its status lists then stand in for them)."""

    name: str
    created: str
    spec: MeshAccelerationSpec | None
    spec_error: str
    agent_nodes: frozenset[str]
    status: AccelerationStatus
    agents_error: str = ""

    @property
    def seniority(self) -> tuple[str, str]:
        return (self.created, self.name)


def is_agent_pod(pod: Mapping[str, Any], agent_namespaces: Iterable[str]) -> bool:
    """One of meshaccel's own agents (the operator never selects them)."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    return (
        meta.get("namespace") in set(agent_namespaces)
        and labels.get(COMPONENT_LABEL) == "agent"
        and ACCELERATION_LABEL in labels
        and any(o.get("kind") == "DaemonSet" for o in meta.get("ownerReferences") or ())
    )


def agent_nodes(agent_pods: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    """The nodes where an agent serves: running, with an address (as the operator counts)."""
    nodes = set()
    for pod in agent_pods:
        facts = PodFacts.from_object(pod)
        if facts.running and facts.ip and facts.node:
            nodes.add(facts.node)
    return frozenset(nodes)


def make_resource(
    acceleration: Mapping[str, Any],
    status: AccelerationStatus,
    agent_pods: Sequence[Mapping[str, Any]] | None,
    agents_error: str = "",
) -> Resource:
    """``agent_pods`` None: they could not be listed (``agents_error`` says why)."""
    meta = acceleration.get("metadata") or {}
    spec: MeshAccelerationSpec | None = None
    error = ""
    try:
        spec = MeshAccelerationSpec.model_validate(acceleration.get("spec") or {})
    except ValidationError as err:
        error = (
            str(err).splitlines()[0]
            + ": "
            + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()[:3])
        )
    return Resource(
        name=str(meta.get("name", "")),
        created=str(meta.get("creationTimestamp") or ""),
        spec=spec,
        spec_error=error,
        agent_nodes=frozenset(n.node for n in status.nodes)
        if agent_pods is None
        else agent_nodes(agent_pods),
        status=status,
        agents_error=agents_error if agent_pods is None else "",
    )


def _claim(
    resource: Resource,
    older: Sequence[Resource],
    facts: PodFacts,
    labels: Mapping[str, str] | None,
) -> tuple[str, str] | None:
    """(verdict, detail) when an older resource keeps the pod, or its node."""
    for elder in older:
        spec = elder.spec
        if (
            spec
            and matches_selectors(facts, labels, spec) is None
            and has_sidecar(facts, spec.mode)
        ):
            return Verdict.POD_CLAIMED, f"kept by MeshAcceleration {elder.name}"
    for elder in older:
        if elder.spec and facts.node in elder.agent_nodes:
            return (
                Verdict.NODE_CLAIMED,
                f"node {facts.node} kept by MeshAcceleration {elder.name}",
            )
    return None


def _after_status(resource: Resource, facts: PodFacts) -> tuple[str, str]:
    """A pod selection sends to its agent: what the status says became of it."""
    status = resource.status
    if not status.conditions:
        return PENDING, "the operator has not reported on this MeshAcceleration yet"
    for problem in status.problems:
        if (problem.namespace, problem.name) == (facts.namespace, facts.name):
            return problem.reason, problem.message
    for node in status.problem_nodes:
        if node.node == facts.node and node.behind:
            return (
                PENDING,
                f"the agent on {node.node} has applied generation {node.applied_generation} "
                f"of {node.desired_generation}"
                + (f" ({node.last_error})" if node.last_error else ""),
            )
    return ACCELERATED, ""


def pod_rows(
    resources: Sequence[Resource],
    namespaces: Mapping[str, Mapping[str, str]],
    pods: Iterable[Mapping[str, Any]],
    agent_namespaces: Iterable[str],
) -> list[PodRow]:
    """A row per (pod, resource) whose selectors match the pod."""
    ranked = sorted((r for r in resources if r.spec is not None), key=lambda r: r.seniority)
    agent_namespaces = set(agent_namespaces)
    rows = []
    for pod in pods:
        if is_agent_pod(pod, agent_namespaces):
            continue
        facts = PodFacts.from_object(pod)
        labels = namespaces.get(facts.namespace)
        for index, resource in enumerate(ranked):
            assert resource.spec is not None
            selection = select(facts, labels, resource.spec, resource.agent_nodes)
            if selection.verdict in _NOT_SELECTED:
                continue
            state, detail = str(selection.verdict), selection.detail
            if selection.verdict not in BEFORE_CLAIMS:
                claim = _claim(resource, ranked[:index], facts, labels)
                if claim is not None:
                    state, detail = claim
                elif selection.verdict == Verdict.SELECTED:
                    state, detail = _after_status(resource, facts)
            if state == Verdict.NO_AGENT and resource.agents_error:
                detail += " (as far as the status lists the agents' nodes)"
            rows.append(
                PodRow(
                    namespace=facts.namespace,
                    name=facts.name,
                    node=facts.node,
                    resource=resource.name,
                    state=state,
                    detail=detail,
                    addresses=list(facts.addresses),
                )
            )
    return sorted(rows, key=lambda r: (r.namespace, r.name, r.resource))


def notes(resources: Sequence[Resource]) -> list[str]:
    """What the report cannot tell exactly, per resource."""
    found = []
    for resource in sorted(resources, key=lambda r: r.name):
        status = resource.status
        if resource.spec is None:
            found.append(
                f"MeshAcceleration {resource.name}: its spec does not validate here (an "
                "invalid spec: see its conditions; or one of another version), its pods are "
                f"not shown: {resource.spec_error}"
            )
        if resource.agents_error:
            found.append(
                f"MeshAcceleration {resource.name}: its agent pods could not be listed "
                f"({resource.agents_error}); the nodes its status lists stand in for them"
            )
        if status.problems_not_shown:
            found.append(
                f"MeshAcceleration {resource.name}: the status lists {len(status.problems)} "
                f"problem pods and leaves {status.problems_not_shown} more out: pods shown "
                f"{ACCELERATED} may be among them"
            )
        if not status.problems:
            for reason in ("Unresolved", "OverBudget"):
                if count := status.pods_not_accelerated.get(reason):
                    found.append(
                        f"MeshAcceleration {resource.name}: the status counts {count} pod(s) "
                        f"{reason} without naming them (an older operator?): they show as "
                        f"{ACCELERATED} here"
                    )
    return found


def render_pods(report: PodsReport, style: Style) -> list[str]:
    if not report.pods:
        lines = [f"No pod in {report.scope} is selected by a MeshAcceleration."]
    else:
        rows = []
        for row in report.pods:
            state = style.good(row.state) if row.accelerated else style.warn(row.state)
            addresses = ",".join(row.addresses) or "-"
            # ADDRESSES after the columns scripts may already read by position.
            rows.append(
                [
                    row.namespace,
                    row.name,
                    row.node or "-",
                    row.resource,
                    state,
                    addresses,
                    row.detail,
                ]
            )
        lines = table(
            ["NAMESPACE", "POD", "NODE", "RESOURCE", "STATE", "ADDRESSES", "DETAIL"], rows
        )
        accelerated = report.count(ACCELERATED)
        lines.append("")
        lines.append(
            f"{accelerated} of {len(report.pods)} selected pod(s) in {report.scope} accelerated"
        )
    lines += [style.warn("Note: " + note) for note in report.notes]
    return lines
