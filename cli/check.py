"""``meshaccel check``: the agents' preflight on every node, through the API.

For each agent pod of each MeshAcceleration, ``meshaccel-agent check -o json`` runs in the pod
(the exec subresource, as ``kubectl exec``): kernel features, BTF, cgroup2, bpffs,
capabilities, programs already attached. An agent that is not running (it stopped at start-up)
cannot be asked: the report it wrote to its termination message is shown instead. A node the
DaemonSet should cover but where no agent pod runs is reported as such.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import Field, ValidationError

from meshaccel.cli.agents import (
    AgentRunner,
    Agents,
    container_status,
    exec_failure,
    is_serving,
    parse_json,
)
from meshaccel.cli.output import Report, Style, table

CHECK_ARGS = ("check", "-o", "json")
# Taints every DaemonSet pod tolerates (the DaemonSet controller adds these tolerations).
_DAEMONSET_TOLERATED = frozenset(
    {
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
        "node.kubernetes.io/disk-pressure",
        "node.kubernetes.io/memory-pressure",
        "node.kubernetes.io/pid-pressure",
        "node.kubernetes.io/unschedulable",
        "node.kubernetes.io/network-unavailable",
    }
)
MAX_PARALLEL_EXECS = 8


class CheckItem(Report):
    """One check; a failed ``warning`` one does not stop the agent (nor fail the node)."""

    name: str
    ok: bool
    detail: str = ""
    fix: str = ""
    level: str = "error"


class AgentReport(Report):
    """What ``meshaccel-agent check -o json`` prints."""

    node: str = ""
    ok: bool
    checks: list[CheckItem] = Field(default_factory=list)


class NodeCheck(Report):
    resource: str
    node: str
    pod: str | None = None
    # exec: the agent answered now; terminationMessage: its report from when it stopped;
    # none: no report.
    source: str
    ok: bool
    checks: list[CheckItem] = Field(default_factory=list)
    error: str = ""


class CheckReport(Report):
    nodes: list[NodeCheck]
    notes: list[str] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every node passed (and there was one to check)."""
        return bool(self.nodes) and all(node.ok for node in self.nodes)


def parse_agent_report(data: Any) -> AgentReport | None:
    if not isinstance(data, Mapping) or "checks" not in data:
        return None
    try:
        return AgentReport.model_validate(data)
    except ValidationError:
        return None


def tolerates(tolerations: Sequence[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    for toleration in tolerations:
        if toleration.get("effect") and toleration.get("effect") != taint.get("effect"):
            continue
        if (toleration.get("operator") or "Equal") == "Exists":
            if not toleration.get("key") or toleration.get("key") == taint.get("key"):
                return True
        elif toleration.get("key") == taint.get("key") and (toleration.get("value") or "") == (
            taint.get("value") or ""
        ):
            return True
    return False


def should_run_agent(daemonset: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    """Whether the DaemonSet places an agent on ``node`` (its nodeSelector and tolerations)."""
    pod_spec = ((daemonset.get("spec") or {}).get("template") or {}).get("spec") or {}
    labels = (node.get("metadata") or {}).get("labels") or {}
    selector = pod_spec.get("nodeSelector") or {}
    if any(labels.get(key) != value for key, value in selector.items()):
        return False
    tolerations = pod_spec.get("tolerations") or []
    for taint in (node.get("spec") or {}).get("taints") or ():
        if taint.get("effect") not in ("NoSchedule", "NoExecute"):
            continue
        if taint.get("key") in _DAEMONSET_TOLERATED or tolerates(tolerations, taint):
            continue
        return False
    return True


def _not_running(pod: Mapping[str, Any]) -> str:
    status = container_status(pod)
    waiting = (status.get("state") or {}).get("waiting") or {}
    if waiting:
        reason = waiting.get("reason", "Waiting")
        said = f": {waiting['message']}" if waiting.get("message") else ""
        return f"the agent is not running ({reason}{said})"
    phase = (pod.get("status") or {}).get("phase") or "unknown"
    return f"the agent pod is {phase}, its agent not running"


def _last_report(pod: Mapping[str, Any]) -> tuple[AgentReport | None, str]:
    """The report the agent left in its termination message, and how it ended."""
    status = container_status(pod)
    for which in ("state", "lastState"):
        terminated = (status.get(which) or {}).get("terminated") or {}
        message = terminated.get("message")
        if not message:
            continue
        ended = f"it exited with code {terminated.get('exitCode')}" + (
            f" at {terminated['finishedAt']}" if terminated.get("finishedAt") else ""
        )
        report = parse_agent_report(parse_json(message))
        if report is None:
            return None, f"{ended}: {message.strip()[:500]}"
        return report, ended
    return None, ""


def check_agent(resource: str, node: str, pod: Mapping[str, Any], run: AgentRunner) -> NodeCheck:
    name = str((pod.get("metadata") or {}).get("name"))
    if is_serving(pod):
        result = run(pod, *CHECK_ARGS)
        report = parse_agent_report(parse_json(result.stdout))
        if report is not None:
            consistent = report.ok == (result.exit_code == 0)
            return NodeCheck(
                resource=resource,
                node=node,
                pod=name,
                source="exec",
                ok=report.ok and consistent,
                checks=report.checks,
                error=""
                if consistent
                else f"the report says ok={report.ok} but the exit code is {result.exit_code}",
            )
        return NodeCheck(
            resource=resource,
            node=node,
            pod=name,
            source="none",
            ok=False,
            error=exec_failure(result, ["meshaccel-agent", *CHECK_ARGS]),
        )
    report, ended = _last_report(pod)
    why = _not_running(pod)
    if report is not None:
        return NodeCheck(
            resource=resource,
            node=node,
            pod=name,
            source="terminationMessage",
            ok=False,
            checks=report.checks,
            error=f"{why}; its report from when {ended}",
        )
    return NodeCheck(
        resource=resource,
        node=node,
        pod=name,
        source="none",
        ok=False,
        error=why + (f"; {ended}" if ended else ""),
    )


def check_nodes(
    agents: Sequence[Agents],
    nodes: Sequence[Mapping[str, Any]] | None,
    run: AgentRunner,
) -> list[NodeCheck]:
    """Every node each resource's agents should cover (those with an agent pod, and those the
    DaemonSet selects: ``nodes``, None when they could not be listed)."""
    work: list[tuple[str, str, Mapping[str, Any] | None]] = []
    for agent in agents:
        covered = set(agent.by_node)
        if agent.daemonset is not None and nodes is not None:
            for node in nodes:
                name = (node.get("metadata") or {}).get("name")
                if name and should_run_agent(agent.daemonset, node):
                    covered.add(name)
        work += [(agent.resource, node, agent.by_node.get(node)) for node in sorted(covered)]

    daemonsets = {a.resource: a.daemonset for a in agents}

    def one(item: tuple[str, str, Mapping[str, Any] | None]) -> NodeCheck:
        resource, node, pod = item
        if pod is None:
            meta = (daemonsets.get(resource) or {}).get("metadata") or {}
            return NodeCheck(
                resource=resource,
                node=node,
                source="none",
                ok=False,
                error="no agent pod on this node, though its DaemonSet selects it: "
                f"`kubectl -n {meta.get('namespace')} describe daemonset {meta.get('name')}` "
                "says why",
            )
        return check_agent(resource, node, pod, run)

    with ThreadPoolExecutor(max_workers=MAX_PARALLEL_EXECS) as pool:
        return list(pool.map(one, work))


def render_check(report: CheckReport, style: Style) -> list[str]:
    lines: list[str] = []
    for node in report.nodes:
        if lines:
            lines.append("")
        verdict = style.good("OK") if node.ok else style.bad("FAILED")
        where = f" (pod {node.pod})" if node.pod else ""
        lines.append(f"{style.bold(node.node)}{where}, MeshAcceleration {node.resource}: {verdict}")
        if node.error:
            lines.append("  " + style.bad(node.error))
        rows = []
        for check in node.checks:
            if check.ok:
                mark = style.good("ok")
            else:
                mark = style.warn("warn") if check.level == "warning" else style.bad("FAIL")
            fix = f"  fix: {check.fix}" if check.fix and not check.ok else ""
            rows.append([mark, check.name, check.detail + fix])
        if rows:
            lines += table(["", "CHECK", "DETAIL"], rows, indent="  ")
    if not report.nodes:
        lines.append("No agent node to check.")
    lines += [style.warn("Note: " + note) for note in report.notes]
    failed = sum(1 for node in report.nodes if not node.ok)
    if report.nodes:
        lines.append("")
        lines.append(
            style.good(f"All {len(report.nodes)} node(s) passed.")
            if report.ok
            else style.bad(f"{failed} of {len(report.nodes)} node(s) failed.")
        )
    return lines
