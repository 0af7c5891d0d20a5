"""A MeshAcceleration's status, computed from what the operator knows: pure functions.

Conditions follow the Kubernetes conventions (one entry per type, ``lastTransitionTime``
changes only when ``status`` does, reasons are CamelCase words, messages say what to do) and
kstatus's (``Reconciling`` and ``Stalled``, never both True: kstatus reads Reconciling first).

* ``Reconciling`` True: work under way that needs nobody: the operator has not listed the
  cluster since it started, agents roll out or are not ready yet, sets are on their way, or
  agents have not found some pods yet (within ``behind_grace``).
* ``Stalled`` True: it gets no further without someone: the spec makes no sense, no node runs
  an agent, older resources keep every node, agents refuse or cannot take their set (past the
  grace, outside a rollout), pods do not fit their node's maps, pods stay unresolved (past the
  grace), pods carry a mesh annotation meshaccel cannot read, or agents that predate IPv6 are
  left (outside a rollout) with IPv6-only pods they cannot take.
* ``Ready`` True when neither: every agent runs the current spec and is ready, every node
  applied its newest set, and every pod the selectors match is accelerated or left out for a
  reason someone chose (:data:`~.models.PROBLEM_REASONS` are the others). Otherwise False,
  with Stalled's reason and message, or else Reconciling's.
* ``Degraded`` True: what is wrong (the Stalled reasons about the spec, agents and pods), or
  agents run another version than the operator once their rollout is over (``VersionSkew``,
  which leaves Ready as it is).
* ``Conflict`` True: older resources keep some of the nodes or pods this one selects (it runs
  on the rest; ``status.conflicts`` says which, and whose).

Until the operator has listed nodes and resources after its start (``judged``), Ready,
Reconciling, Stalled and Conflict keep their last judgement (an invalid spec, judged from the
spec alone, excepted).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from meshaccel.contract.api import UnresolvedPod
from meshaccel.contract.version import VERSION
from meshaccel.operator.models import (
    AGENT_WITHOUT_IPV6,
    MAX_CONFLICTS_LISTED,
    MAX_ERROR_LENGTH,
    MAX_NODES_LISTED,
    MAX_PROBLEMS_LISTED,
    PENDING,
    UNRESOLVED,
    Condition,
    ConditionStatus,
    ConditionType,
    HeldByOlder,
    MeshAccelerationStatus,
    NodeReport,
    PodProblem,
)
from meshaccel.operator.picture import Acceleration
from meshaccel.operator.selection import Verdict

EXAMPLES = 5  # names in a condition's message
T, F, U = ConditionStatus.TRUE, ConditionStatus.FALSE, ConditionStatus.UNKNOWN


class NodeView(Protocol):
    """What status reads of a node's push state (the pusher's ``NodeState``)."""

    @property
    def node(self) -> str: ...
    @property
    def desired_generation(self) -> int | None: ...
    @property
    def applied_generation(self) -> int | None: ...
    @property
    def in_sync(self) -> bool: ...
    @property
    def pods_applied(self) -> int | None: ...
    @property
    def pods_desired(self) -> int | None: ...
    @property
    def last_error(self) -> str | None: ...
    @property
    def probe_error(self) -> str | None: ...
    @property
    def behind_since(self) -> float | None: ...
    @property
    def boot_id(self) -> str | None: ...
    @property
    def agent_version(self) -> str | None: ...
    @property
    def unresolved_pods(self) -> Sequence[UnresolvedPod]: ...
    @property
    def unresolved_since(self) -> float | None: ...
    @property
    def held_back(self) -> Sequence[UnresolvedPod]: ...


@dataclass(frozen=True)
class Rollout:
    """The agents' DaemonSet, as its status reports it (zeros when it does not exist)."""

    name: str | None = None
    desired: int = 0
    ready: int = 0
    updated: int = 0
    observed_current: bool = True  # status.observedGeneration == metadata.generation

    @classmethod
    def from_daemonset(cls, daemonset: Mapping[str, Any] | None) -> Rollout:
        if not daemonset:
            return cls()
        meta, status = daemonset.get("metadata", {}), daemonset.get("status") or {}
        return cls(
            name=f"{meta.get('namespace')}/{meta.get('name')}",
            desired=int(status.get("desiredNumberScheduled", 0)),
            ready=int(status.get("numberReady", 0)),
            updated=int(status.get("updatedNumberScheduled", 0)),
            observed_current=status.get("observedGeneration") == meta.get("generation"),
        )

    @property
    def rolling(self) -> bool:
        """Agents are being replaced by ones of the current spec (or the DaemonSet controller
        has not taken that spec yet)."""
        return not self.observed_current or self.updated < self.desired


@dataclass(frozen=True)
class Transition:
    """A condition that changed status: worth a Kubernetes Event (``warning``: of that type)."""

    type: ConditionType
    status: ConditionStatus
    reason: str
    message: str
    warning: bool = False


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class _Nodes:
    """The nodes' push states, sorted into what the conditions are judged from."""

    all: Sequence[NodeView]
    behind: list[NodeView]  # not in sync, the longest waiting first
    failing: list[NodeView]  # behind with an error, past the grace
    unresolved: list[NodeView]  # in sync, with pods their agent cannot find
    unresolved_late: list[NodeView]  # ... for longer than the grace
    skewed: list[NodeView]  # heard from, another version than the operator's
    skewed_names: frozenset[str]
    late_names: frozenset[str]
    held_back: list[NodeView]  # in sync, with pods their agent (predating IPv6) was not sent

    @classmethod
    def of(
        cls, nodes: Mapping[str, NodeView], grace: float, clock_now: float, version: str
    ) -> _Nodes:
        every = sorted(nodes.values(), key=lambda s: s.node)
        behind = sorted(
            (s for s in every if not s.in_sync),
            key=lambda s: (s.behind_since if s.behind_since is not None else float("inf"), s.node),
        )
        unresolved = [s for s in every if s.in_sync and s.unresolved_pods]
        late = [s for s in unresolved if _waited(s.unresolved_since, clock_now) > grace]
        skewed = [s for s in every if s.boot_id is not None and s.agent_version != version]
        return cls(
            all=every,
            behind=behind,
            failing=[
                s for s in behind if s.last_error and _waited(s.behind_since, clock_now) > grace
            ],
            unresolved=unresolved,
            unresolved_late=late,
            skewed=skewed,
            skewed_names=frozenset(s.node for s in skewed),
            late_names=frozenset(s.node for s in late),
            held_back=[s for s in every if s.in_sync and s.held_back],
        )

    def unresolved_count(self) -> int:
        return sum(len(s.unresolved_pods) for s in self.unresolved)

    def pending_count(self) -> int:
        return sum(s.pods_desired or 0 for s in self.behind)

    def held_back_count(self) -> int:
        return sum(len(s.held_back) for s in self.held_back)


def compute_status(
    acceleration: Acceleration,
    nodes: Mapping[str, NodeView],
    rollout: Rollout,
    *,
    generation: int | None,
    previous: Sequence[Condition],
    now: str | None = None,
    behind_grace: float = 0.0,
    clock_now: float = 0.0,
    judged: bool = True,
    operator_version: str = VERSION,
) -> tuple[MeshAccelerationStatus, list[Transition]]:
    """The new status and the conditions whose status changed since ``previous``.

    ``judged``: the picture has settled (conflicts are judged); until then Ready, Reconciling,
    Stalled and Conflict stay as ``previous`` has them. ``behind_grace``: seconds a node may
    stay behind with an error, or keep pods unresolved, before it counts as a problem
    (``clock_now`` and the nodes' times are the pusher's clock).
    """
    seen = _Nodes.of(nodes, behind_grace, clock_now, operator_version)
    problems = _pod_problems(acceleration, seen)
    wanted = _conditions(acceleration, rollout, seen, operator_version)
    if not judged:
        # An invalid spec is judged from the spec alone; the rest needs the whole picture.
        _keep_unjudged(wanted, previous, conflict_only=bool(acceleration.problems))
    conditions, transitions = _merge(wanted, previous, generation, now or now_rfc3339())
    not_accelerated = acceleration.skipped_by_reason()
    if unresolved := seen.unresolved_count():
        not_accelerated[UNRESOLVED] = unresolved
    if pending := seen.pending_count():
        not_accelerated[PENDING] = pending
    if held_back := seen.held_back_count():
        not_accelerated[AGENT_WITHOUT_IPV6] = held_back
    ranked = sorted(seen.all, key=lambda s: _node_rank(s, seen))
    status = MeshAccelerationStatus(
        observedGeneration=generation,
        operatorVersion=operator_version,
        conditions=conditions,
        daemonSet=rollout.name,
        nodesDesired=rollout.desired,
        nodesReady=rollout.ready,
        nodeCount=len(seen.all),
        nodesInSync=len(seen.all) - len(seen.behind),
        nodesWithProblems=sum(1 for s in seen.all if _node_rank(s, seen)[0] < _HEALTHY),
        nodes=[_report(s) for s in ranked[:MAX_NODES_LISTED]],
        podsSelected=acceleration.pods_selected(),
        podsAccelerated=sum(s.pods_applied or 0 for s in seen.all if s.in_sync),
        podsNotAccelerated=not_accelerated,
        problemCount=sum(len(group) for group in problems),
        problems=[_problem(row) for row in _round_robin(problems, MAX_PROBLEMS_LISTED)],
        podsWithWarnings=acceleration.warned_by_reason(),
        conflicts=[
            HeldByOlder(
                heldBy=elder,
                nodes=held_nodes[:MAX_NODES_LISTED],
                nodeCount=len(held_nodes),
                pods=held_pods[:MAX_NODES_LISTED],
                podCount=len(held_pods),
            )
            for elder, (held_nodes, held_pods) in list(acceleration.held_by().items())[
                :MAX_CONFLICTS_LISTED
            ]
        ]
        if judged
        else [],
    )
    return status, transitions


# -- nodes and pods ---------------------------------------------------------------------------

_BEHIND, _TROUBLED, _SKEWED, _HEALTHY = range(4)


def _node_rank(state: NodeView, seen: _Nodes) -> tuple[int, float, str]:
    """Problems first: behind (the longest waiting first), then unresolved or held-back pods or
    a failing probe (the most pods first), then another version; the rest by name."""
    if not state.in_sync:
        since = state.behind_since if state.behind_since is not None else float("inf")
        return (_BEHIND, since, state.node)
    if state.unresolved_pods or state.probe_error or state.held_back:
        return (_TROUBLED, -len(state.unresolved_pods) - len(state.held_back), state.node)
    if state.node in seen.skewed_names:
        return (_SKEWED, 0.0, state.node)
    return (_HEALTHY, 0.0, state.node)


def _report(state: NodeView) -> NodeReport:
    error = state.last_error or (state.probe_error and f"health probe: {state.probe_error}")
    return NodeReport(
        node=state.node,
        agentVersion=state.agent_version,
        desiredGeneration=state.desired_generation,
        appliedGeneration=state.applied_generation,
        inSync=state.in_sync,
        podsAccelerated=state.pods_applied or 0,
        podsUnresolved=len(state.unresolved_pods),
        lastError=error[:MAX_ERROR_LENGTH] if error else None,
    )


# namespace, name, node, reason, message: models are made only for the pods listed.
_Row = tuple[str, str, str | None, str, str]


def _pod_problems(acceleration: Acceleration, seen: _Nodes) -> list[list[_Row]]:
    """The pods left out for a reason nobody chose, one list per reason, each by namespace
    and name (unresolved ones only of sets their agent confirmed: the others are pending)."""
    unresolved: list[_Row] = sorted(
        (pod.namespace, pod.name, state.node, UNRESOLVED, pod.reason)
        for state in seen.unresolved
        for pod in state.unresolved_pods
    )
    over_budget: list[_Row] = []
    for item in acceleration.left_out():
        namespace, _, name = item.pod.partition("/")
        over_budget.append((namespace, name, item.node, str(Verdict.OVER_BUDGET), item.reason))
    troubled: list[_Row] = sorted(
        (t.namespace, t.name, t.node, str(t.reason), t.message)
        for t in acceleration.troubled.values()
    )
    held_back: list[_Row] = sorted(
        (pod.namespace, pod.name, state.node, AGENT_WITHOUT_IPV6, pod.reason)
        for state in seen.held_back
        for pod in state.held_back
    )
    groups = (unresolved, sorted(over_budget), troubled, held_back)
    return [group for group in groups if group]


def _problem(row: _Row) -> PodProblem:
    namespace, name, node, reason, message = row
    return PodProblem(
        namespace=namespace,
        name=name,
        node=node,
        reason=reason,
        message=message[:MAX_ERROR_LENGTH],
    )


def _round_robin(groups: Sequence[Sequence[_Row]], limit: int) -> Iterator[_Row]:
    """Up to ``limit`` items, one of each group in turn: every reason shows."""
    taken = 0
    for depth in range(max((len(g) for g in groups), default=0)):
        for group in groups:
            if depth < len(group):
                if taken == limit:
                    return
                taken += 1
                yield group[depth]


# -- conditions -------------------------------------------------------------------------------

Wanted = dict[ConditionType, tuple[ConditionStatus, str, str]]


def _waited(since: float | None, clock_now: float) -> float:
    return clock_now - since if since is not None else 0.0


def _examples(names: Sequence[str]) -> str:
    shown = ", ".join(names[:EXAMPLES])
    return shown + (f" and {len(names) - EXAMPLES} more" if len(names) > EXAMPLES else "")


def _conflict_message(held: Mapping[str, tuple[list[str], list[str]]]) -> str:
    parts = []
    for elder, (nodes, pods) in held.items():
        kept = []
        if nodes:
            kept.append(f"node(s) {_examples(nodes)}")
        if pods:
            kept.append(f"pod(s) {_examples(pods)}")
        parts.append(f"MeshAcceleration {elder!r} (created earlier) keeps " + " and ".join(kept))
    nodes_held = any(nodes for nodes, _ in held.values())
    return (
        "; ".join(parts)
        + ", which this resource selects too"
        + (": its agents on those nodes get an empty set" if nodes_held else "")
        + ". It accelerates the rest of its nodes and pods. To end the conflict, narrow "
        "spec.agent.nodeSelector or the pod selectors so that the resources do not overlap"
    )


def _unresolved_examples(states: Sequence[NodeView]) -> str:
    pods = [
        f"{pod.namespace}/{pod.name} on {state.node} ({pod.reason})"
        for state in states
        for pod in state.unresolved_pods[:EXAMPLES]
    ]
    return _examples(pods)


def _stalled(acceleration: Acceleration, rollout: Rollout, seen: _Nodes) -> list[tuple[str, str]]:
    """Why it gets no further without someone, the first the most fundamental."""
    reasons: list[tuple[str, str]] = []
    if acceleration.problems:
        kept = (
            "the last valid spec keeps running"
            if acceleration.spec is not None
            else "nothing is programmed"
        )
        message = "; ".join(acceleration.problems) + f" ({kept} until this is fixed)"
        reasons.append(("InvalidSpec", message))
    if acceleration.nodes_held and acceleration.nodes_kept == 0:
        reasons.append(
            (
                "Conflict",
                "every node this resource selects is kept by an older MeshAcceleration: see "
                "the Conflict condition",
            )
        )
    if acceleration.active and rollout.observed_current and rollout.desired == 0:
        reasons.append(
            ("NoNodes", "no node runs an agent: check spec.agent.nodeSelector and tolerations")
        )
    if seen.failing and not rollout.rolling:
        reasons.append(("AgentsFailing", _failing_message(seen.failing)))
    if left_out := acceleration.left_out():
        pods = _examples([f"{item.pod} on {item.node} ({item.reason})" for item in left_out])
        reasons.append(
            (
                "PodsOverBudget",
                f"{len(left_out)} pod(s) do not fit their node's datapath maps and stay on the "
                f"mesh's iptables path: {pods}. Raise spec.datapath.maxPodPorts, maxPodCidrs or "
                "maxPods, or have those pods exclude fewer ports and ranges (docs/operator.md, "
                "Budgets)",
            )
        )
    if late := seen.unresolved_late:
        count = sum(len(s.unresolved_pods) for s in late)
        reasons.append(
            (
                "PodsUnresolved",
                f"{count} pod(s) on {len(late)} node(s) stay unresolved, on the mesh's iptables "
                f"path: {_unresolved_examples(late)}. The agents keep trying; if this lasts, "
                "the nodes' pods are not where the agent looks for them (cgroup v1 or hybrid "
                "nodes: docs/operations.md, Troubleshooting)",
            )
        )
    if troubled := sorted(
        acceleration.troubled.values(), key=lambda item: (item.namespace, item.name)
    ):
        pods = _examples([f"{item.namespace}/{item.name} ({item.message})" for item in troubled])
        reasons.append(
            (
                "PodAnnotationsInvalid",
                f"{len(troubled)} pod(s) carry a mesh annotation meshaccel cannot read and stay "
                f"on the mesh's iptables path: {pods}. Fix the annotations (status.problems "
                "lists the pods)",
            )
        )
    if seen.held_back and not rollout.rolling:
        pods = _examples(
            [
                f"{pod.namespace}/{pod.name} on {s.node}"
                for s in seen.held_back
                for pod in s.held_back
            ]
        )
        reasons.append(
            (
                "AgentsWithoutIPv6",
                f"{seen.held_back_count()} IPv6-only pod(s) are not sent to their node's agent, "
                f"which predates IPv6, and stay on the mesh's ip6tables path: {pods}. The agents "
                "run the operator's agent image setting (the chart's agent.image): make it this "
                "operator's version",
            )
        )
    return reasons


def _failing_message(failing: Sequence[NodeView]) -> str:
    names = ", ".join(s.node for s in failing[:EXAMPLES]) + (
        " ..." if len(failing) > EXAMPLES else ""
    )
    first = failing[0].last_error or ""
    return f"{len(failing)} node(s) cannot take their pod set ({names}); first error: {first}"


def _reconciling(rollout: Rollout, seen: _Nodes) -> list[tuple[str, str]]:
    """Work under way, the first the one that comes first."""
    reasons: list[tuple[str, str]] = []
    if rollout.rolling:
        reasons.append(
            (
                "RollingOutAgents",
                f"{rollout.updated} of {rollout.desired} agents run the current spec"
                if rollout.observed_current
                else "the DaemonSet controller has not taken the agents' current spec yet",
            )
        )
    if rollout.ready < rollout.desired:
        reasons.append(("AgentsNotReady", f"{rollout.ready} of {rollout.desired} agents are ready"))
    if seen.behind:
        reasons.append(
            (
                "PushingPodSets",
                f"{len(seen.behind)} of {len(seen.all)} node(s) have not applied their newest "
                f"pod set ({seen.pending_count()} pods): see status.nodes",
            )
        )
    if early := [s for s in seen.unresolved if s.node not in seen.late_names]:
        count = sum(len(s.unresolved_pods) for s in early)
        reasons.append(
            (
                "ResolvingPods",
                f"{count} pod(s) on {len(early)} node(s) are not found by their agent yet: "
                f"{_unresolved_examples(early)}; it tries again",
            )
        )
    return reasons


# The Stalled reasons that say something is wrong (not merely that nothing can happen yet).
_DEGRADING = frozenset(
    {
        "InvalidSpec",
        "AgentsFailing",
        "PodsOverBudget",
        "PodsUnresolved",
        "PodAnnotationsInvalid",
        "AgentsWithoutIPv6",
    }
)


def _degraded(
    rollout: Rollout,
    seen: _Nodes,
    stalled: Sequence[tuple[str, str]],
    version: str,
) -> tuple[ConditionStatus, str, str]:
    for reason, message in stalled:
        if reason in _DEGRADING:
            return T, reason, message
    if seen.failing:  # during a rollout: not stalled, still wrong
        return T, "AgentsFailing", _failing_message(seen.failing)
    if seen.skewed and not rollout.rolling:
        agents = _examples([f"{s.node} ({s.agent_version or 'unknown'})" for s in seen.skewed])
        return (
            T,
            "VersionSkew",
            f"{len(seen.skewed)} of {len(seen.all)} agent(s) run another version than the "
            f"operator ({version}): {agents}. The agents run the operator's agent image "
            "setting (the chart's agent.image): make it this operator's version",
        )
    return F, "AsExpected", ""


def _conditions(acceleration: Acceleration, rollout: Rollout, seen: _Nodes, version: str) -> Wanted:
    wanted: Wanted = {}
    held = acceleration.held_by()
    if held:
        wanted[ConditionType.CONFLICT] = (T, "ClaimedByOlderResource", _conflict_message(held))
    else:
        wanted[ConditionType.CONFLICT] = (F, "NoConflict", "")
    stalled = _stalled(acceleration, rollout, seen)
    reconciling = _reconciling(rollout, seen) if acceleration.active else []
    wanted[ConditionType.DEGRADED] = _degraded(rollout, seen, stalled, version)
    if stalled:
        wanted[ConditionType.STALLED] = (T, *stalled[0])
        wanted[ConditionType.RECONCILING] = (F, "Stalled", "see the Stalled condition")
        wanted[ConditionType.READY] = (F, *stalled[0])
    elif reconciling:
        wanted[ConditionType.STALLED] = (F, "AsExpected", "")
        wanted[ConditionType.RECONCILING] = (T, *reconciling[0])
        wanted[ConditionType.READY] = (F, *reconciling[0])
    else:
        wanted[ConditionType.STALLED] = (F, "AsExpected", "")
        wanted[ConditionType.RECONCILING] = (F, "Reconciled", "")
        wanted[ConditionType.READY] = (T, "Accelerating", _ready_message(acceleration, seen))
    return wanted


def _ready_message(acceleration: Acceleration, seen: _Nodes) -> str:
    accelerated = sum(s.pods_applied or 0 for s in seen.all)
    message = f"{accelerated} pod(s) accelerated on {len(seen.all)} node(s), every set applied"
    if left := sum(acceleration.skipped_by_reason().values()):
        message += f"; {left} pod(s) left out by choice or with nothing to accelerate"
    return message


_UNJUDGED: Wanted = {
    ConditionType.CONFLICT: (
        U,
        "NotJudgedYet",
        "conflicts with other MeshAccelerations are judged once the operator has listed the "
        "nodes and MeshAccelerations",
    ),
    ConditionType.RECONCILING: (
        T,
        "ListingCluster",
        "the operator lists the nodes and MeshAccelerations before it judges anything",
    ),
    ConditionType.READY: (F, "ListingCluster", "see the Reconciling condition"),
    ConditionType.STALLED: (F, "AsExpected", ""),
}


def _keep_unjudged(wanted: Wanted, previous: Sequence[Condition], *, conflict_only: bool) -> None:
    """Before the operator has the whole picture: the last judgement stays."""
    before = {c.type: c for c in previous}
    for kind, fallback in _UNJUDGED.items():
        if conflict_only and kind != ConditionType.CONFLICT:
            continue
        old = before.get(kind)
        wanted[kind] = (old.status, old.reason, old.message) if old is not None else fallback


def _warning(kind: ConditionType, status: ConditionStatus, wanted: Wanted) -> bool:
    """True for what needs someone: trouble turning True, or Ready turning False for it."""
    if kind == ConditionType.READY:
        return status != T and wanted[ConditionType.STALLED][0] == T
    return kind in _TROUBLE and status == T


_TROUBLE = frozenset({ConditionType.STALLED, ConditionType.DEGRADED, ConditionType.CONFLICT})


def _merge(
    wanted: Wanted, previous: Sequence[Condition], generation: int | None, now: str
) -> tuple[list[Condition], list[Transition]]:
    before = {c.type: c for c in previous}
    conditions: list[Condition] = []
    transitions: list[Transition] = []
    for kind in ConditionType:
        status, reason, message = wanted[kind]
        old = before.get(kind)
        changed = old is None or old.status != status
        since = old.lastTransitionTime if old is not None and not changed else now
        conditions.append(
            Condition(
                type=kind,
                status=status,
                reason=reason,
                message=message,
                lastTransitionTime=since,
                observedGeneration=generation,
            )
        )
        warning = _warning(kind, status, wanted)
        # A first status: only trouble is worth an event.
        if (old is None and kind in _TROUBLE and status == T) or (old is not None and changed):
            transitions.append(Transition(kind, status, reason, message, warning))
    return conditions, transitions
