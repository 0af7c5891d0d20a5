"""``meshaccel status``: each MeshAcceleration as its status tells it.

The status is read leniently, field by field, rather than through the operator's strict model:
an operator of another version may write fields this client does not know, or lack some it
does, and the command must still say what it can (and show the version skew).

A resource's state follows kstatus (what Argo CD and Flux read): ``Stalled`` when the Stalled
condition is True, ``Reconciling`` when Reconciling is True or the operator has not yet seen the
newest spec (``observedGeneration`` behind ``metadata.generation``), ``Ready`` when Ready is
True, else ``NotReady``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, Field, ValidationError

from meshaccel.cli.output import Report, Style, plural, table

JsonObj = dict[str, Any]
M = TypeVar("M", bound=BaseModel)

# Condition types shown first, in this order; any others follow as the status lists them.
CONDITION_ORDER = ("Ready", "Reconciling", "Stalled")
GOOD_WHEN_FALSE = frozenset({"Reconciling", "Stalled", "Degraded", "Conflict", "Progressing"})


class Condition(Report):
    type: str
    status: str
    reason: str = ""
    message: str = ""


class NodeState(Report):
    """A node as the status lists it (``nodes``, or an older operator's ``nodesBehind``)."""

    node: str
    agent_version: str | None = None
    desired_generation: int | None = None
    applied_generation: int | None = None
    in_sync: bool | None = None  # None: not reported (then judged by the generations)
    pods_accelerated: int | None = None
    pods_unresolved: int | None = None
    last_error: str | None = None
    problem: str = ""  # what the CLI found wrong (only in problemNodes)

    @property
    def behind(self) -> bool:
        """Its agent has not confirmed the newest set sent to it."""
        if self.in_sync is not None:
            return not self.in_sync
        return self.desired_generation is not None and (
            self.applied_generation != self.desired_generation
        )

    def problems(self, operator_version: str | None) -> list[str]:
        """What is wrong, as the operator counts it: behind, failing, pods unresolved, or
        another version than the operator's."""
        found = []
        if self.behind:
            found.append("behind")
        if self.pods_unresolved:
            found.append(f"{self.pods_unresolved} unresolved")
        if operator_version and self.agent_version and self.agent_version != operator_version:
            found.append(f"version {self.agent_version}, operator {operator_version}")
        if self.last_error:
            found.append(self.last_error[:160])
        return found


class ProblemPod(Report):
    namespace: str
    name: str
    node: str | None = None
    reason: str
    message: str = ""


class Conflict(Report):
    held_by: str
    nodes: list[str] = Field(default_factory=list)
    node_count: int = 0
    pods: list[str] = Field(default_factory=list)
    pod_count: int = 0


class AccelerationStatus(Report):
    """One MeshAcceleration: its state, counts, problems and versions."""

    name: str
    mode: str | None = None
    state: str
    generation: int | None = None
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    daemon_set: str | None = None
    operator_version: str | None = None
    nodes_desired: int = 0
    nodes_ready: int = 0
    nodes_in_sync: int = 0
    node_count: int | None = None
    nodes: list[NodeState] = Field(default_factory=list)
    problem_nodes: list[NodeState] = Field(default_factory=list)
    problem_nodes_not_shown: int = 0
    pods_selected: int = 0
    pods_accelerated: int = 0
    pods_not_accelerated: dict[str, int] = Field(default_factory=dict)
    pods_with_warnings: dict[str, int] = Field(default_factory=dict)
    problems: list[ProblemPod] = Field(default_factory=list)
    problems_not_shown: int = 0
    conflicts: list[Conflict] = Field(default_factory=list)
    agent_versions: dict[str, int] = Field(default_factory=dict)
    skew: list[str] = Field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.state == "Ready"

    def condition(self, kind: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == kind), None)

    @property
    def agent_namespace(self) -> str | None:
        """Where the agents (and the operator) run: the namespace of ``status.daemonSet``."""
        if self.daemon_set and "/" in self.daemon_set:
            return self.daemon_set.split("/", 1)[0]
        return None


class StatusReport(Report):
    client_version: str
    accelerations: list[AccelerationStatus]

    @property
    def all_ready(self) -> bool:
        return bool(self.accelerations) and all(a.ready for a in self.accelerations)


# -- reading -----------------------------------------------------------------------------------


def _int(raw: Mapping[str, Any], key: str) -> int | None:
    value = raw.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(raw: Mapping[str, Any], key: str) -> str | None:
    value = raw.get(key)
    return value if isinstance(value, str) else None


def _counts(raw: Any) -> dict[str, int]:
    if not isinstance(raw, Mapping):
        return {}
    return {str(k): v for k, v in raw.items() if isinstance(v, int) and not isinstance(v, bool)}


def _items(model: type[M], raw: Any) -> list[M]:
    """The entries of a status list that parse; an entry this client cannot read is skipped."""
    parsed = []
    for entry in raw if isinstance(raw, list) else ():
        try:
            parsed.append(model.model_validate(entry))
        except ValidationError:
            continue
    return parsed


def kstatus_state(
    conditions: Sequence[Condition], generation: int | None, observed: int | None
) -> str:
    by_type = {c.type: c.status for c in conditions}
    if by_type.get("Stalled") == "True":
        return "Stalled"
    if by_type.get("Reconciling") == "True" or (
        generation is not None and observed is not None and observed < generation
    ):
        return "Reconciling"
    if by_type.get("Ready") == "True":
        return "Ready"
    return "NotReady" if "Ready" in by_type else "Unknown"


def version_skew(versions: Mapping[str, Iterable[str]]) -> list[str]:
    """Warnings when the components (name -> the versions it runs) do not all run one version."""
    seen = {name: sorted({v for v in vs if v and v != "unknown"}) for name, vs in versions.items()}
    distinct = {v for vs in seen.values() for v in vs}
    if len(distinct) <= 1:
        return []
    parts = [f"{name} {', '.join(vs)}" for name, vs in seen.items() if vs]
    return ["versions differ: " + "; ".join(parts)]


def read_status(acceleration: Mapping[str, Any], client_version: str) -> AccelerationStatus:
    meta = acceleration.get("metadata") or {}
    spec = acceleration.get("spec") or {}
    raw = acceleration.get("status") or {}
    conditions = _items(Condition, raw.get("conditions"))
    rank = {kind: index for index, kind in enumerate(CONDITION_ORDER)}
    conditions.sort(key=lambda c: rank.get(c.type, len(rank)))
    generation, observed = _int(meta, "generation"), _int(raw, "observedGeneration")
    operator_version = _str(raw, "operatorVersion")
    nodes = _items(NodeState, raw.get("nodes"))
    problem_nodes = [
        n.model_copy(update={"problem": "; ".join(n.problems(operator_version))})
        for n in nodes
        if n.problems(operator_version)
    ]
    listed = {n.node for n in problem_nodes}
    for lag in raw.get("nodesBehind") or ():  # an operator before issue 13 lists only these
        name = lag.get("node") if isinstance(lag, Mapping) else None
        if isinstance(name, str) and name not in listed:
            listed.add(name)
            problem_nodes.append(
                NodeState(
                    node=name,
                    desired_generation=_int(lag, "desiredGeneration"),
                    applied_generation=_int(lag, "appliedGeneration"),
                    last_error=_str(lag, "error"),
                    problem="behind",
                )
            )
    problems = _items(ProblemPod, raw.get("problems"))
    problem_total = _int(raw, "problemCount")
    problem_node_total = _int(raw, "nodesWithProblems")
    agent_versions = Counter(n.agent_version for n in nodes if n.agent_version)
    return AccelerationStatus(
        name=str(meta.get("name", "")),
        mode=_str(spec, "mode"),
        state=kstatus_state(conditions, generation, observed),
        generation=generation,
        observed_generation=observed,
        conditions=conditions,
        daemon_set=_str(raw, "daemonSet"),
        operator_version=operator_version,
        nodes_desired=_int(raw, "nodesDesired") or 0,
        nodes_ready=_int(raw, "nodesReady") or 0,
        nodes_in_sync=_int(raw, "nodesInSync") or 0,
        node_count=_int(raw, "nodeCount"),
        nodes=nodes,
        problem_nodes=problem_nodes,
        problem_nodes_not_shown=max(0, (problem_node_total or 0) - len(problem_nodes)),
        pods_selected=_int(raw, "podsSelected") or 0,
        pods_accelerated=_int(raw, "podsAccelerated") or 0,
        pods_not_accelerated=_counts(raw.get("podsNotAccelerated")),
        pods_with_warnings=_counts(raw.get("podsWithWarnings")),
        problems=problems,
        problems_not_shown=max(0, (problem_total or 0) - len(problems)),
        conflicts=_items(Conflict, raw.get("conflicts")),
        agent_versions=dict(sorted(agent_versions.items())),
        skew=version_skew(
            {
                "client": [client_version],
                "operator": [operator_version] if operator_version else [],
                "agents": list(agent_versions),
            }
        ),
    )


def status_report(accelerations: Iterable[Mapping[str, Any]], client_version: str) -> StatusReport:
    statuses = [read_status(a, client_version) for a in accelerations]
    return StatusReport(
        client_version=client_version, accelerations=sorted(statuses, key=lambda s: s.name)
    )


# -- printing ----------------------------------------------------------------------------------


def _state(status: AccelerationStatus, style: Style) -> str:
    text = status.state
    if status.ready:
        return style.good(text)
    return style.bad(text) if status.state in ("Stalled", "NotReady") else style.warn(text)


def _condition_status(condition: Condition, style: Style) -> str:
    bad = "True" if condition.type in GOOD_WHEN_FALSE else "False"
    if condition.status == bad:
        return style.bad(condition.status)
    return condition.status if condition.status == "Unknown" else style.good(condition.status)


def _by_reason(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items()))


def _node_line(node: NodeState) -> list[str]:
    applied = "-" if node.applied_generation is None else str(node.applied_generation)
    desired = "-" if node.desired_generation is None else str(node.desired_generation)
    return [
        node.node,
        node.agent_version or "-",
        f"{applied}/{desired}",
        "-" if node.pods_accelerated is None else str(node.pods_accelerated),
        "-" if node.pods_unresolved is None else str(node.pods_unresolved),
        node.problem,
    ]


def render_status(report: StatusReport, style: Style) -> list[str]:
    if not report.accelerations:
        return ["No MeshAcceleration found: nothing is accelerated (docs/quickstart.md)."]
    lines: list[str] = []
    for status in report.accelerations:
        if lines:
            lines.append("")
        mode = f" ({status.mode})" if status.mode else ""
        lines.append(
            f"{style.bold('MeshAcceleration ' + status.name)}{mode}: {_state(status, style)}"
        )
        rows = [
            [c.type, _condition_status(c, style), c.reason, c.message] for c in status.conditions
        ]
        if rows:
            lines += table(["CONDITION", "STATUS", "REASON", "MESSAGE"], rows, indent="  ")
        else:
            lines.append("  " + style.warn("no conditions: the operator has not reported yet"))
        if status.observed_generation is not None and status.observed_generation != (
            status.generation
        ):
            lines.append(
                "  "
                + style.warn(
                    f"the operator has seen generation {status.observed_generation} of the "
                    f"spec, the newest is {status.generation}"
                )
            )
        count = f" of {status.node_count}" if status.node_count is not None else ""
        lines.append(
            f"  Nodes: {status.nodes_desired} desired, {status.nodes_ready} ready, "
            f"{status.nodes_in_sync} in sync{count}"
            + (f"  (agents: DaemonSet {status.daemon_set})" if status.daemon_set else "")
        )
        not_accelerated = sum(status.pods_not_accelerated.values())
        pods = (
            f"  Pods: {status.pods_selected} selected, {status.pods_accelerated} accelerated, "
            f"{not_accelerated} not accelerated"
        )
        if status.pods_not_accelerated:
            pods += f" ({_by_reason(status.pods_not_accelerated)})"
        lines.append(pods)
        if status.pods_with_warnings:
            lines.append(f"  Accelerated with warnings: {_by_reason(status.pods_with_warnings)}")
        if status.problem_nodes:
            more = (
                f", {status.problem_nodes_not_shown} more not listed by the status"
                if status.problem_nodes_not_shown
                else ""
            )
            lines.append(f"  Problem nodes ({len(status.problem_nodes)}{more}):")
            rows = [_node_line(node) for node in status.problem_nodes]
            lines += table(
                ["NODE", "AGENT", "APPLIED/DESIRED", "ACCELERATED", "UNRESOLVED", "PROBLEM"],
                rows,
                indent="    ",
            )
        if status.problems:
            more = (
                f", {status.problems_not_shown} more not listed by the status"
                if status.problems_not_shown
                else ""
            )
            lines.append(f"  Problem pods ({len(status.problems)}{more}):")
            rows = [
                [f"{p.namespace}/{p.name}", p.node or "-", style.warn(p.reason), p.message]
                for p in status.problems
            ]
            lines += table(["POD", "NODE", "REASON", "MESSAGE"], rows, indent="    ")
        for conflict in status.conflicts:
            held = []
            if conflict.node_count:
                held.append(plural(conflict.node_count, "node"))
            if conflict.pod_count:
                held.append(plural(conflict.pod_count, "pod"))
            lines.append(
                f"  Conflict: older MeshAcceleration {conflict.held_by} keeps "
                + " and ".join(held or ["some of its nodes or pods"])
            )
        agents = ", ".join(f"{v} ({plural(n, 'node')})" for v, n in status.agent_versions.items())
        lines.append(
            f"  Versions: client {report.client_version}, operator "
            f"{status.operator_version or 'not reported'}, agents {agents or 'not reported'}"
        )
        lines += ["  " + style.warn("Warning: " + warning) for warning in status.skew]
    return lines
