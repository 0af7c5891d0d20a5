"""A MeshAcceleration's status, computed from what the operator knows: pure functions.

Conditions follow the Kubernetes conventions: one entry per type, ``lastTransitionTime``
changes only when ``status`` does, reasons are CamelCase words, messages say what to do.

* ``Conflict`` True: older resources keep some of the nodes or pods this one selects (it runs
  on the rest; ``status.conflicts`` says which, and whose); Unknown until the operator has
  listed nodes and resources after its start (the last judgement stays meanwhile).
* ``Degraded`` True: the spec makes no sense (``InvalidSpec``, the last good spec keeps
  running), agents cannot be reached or refuse their sets (``AgentsFailing``), or pods do not
  fit their node's maps and stay on iptables (``PodsOverBudget``, naming a few).
* ``Progressing`` True: agents are being rolled out or pod sets are on their way.
* ``Ready`` True: every desired agent is ready and has applied its node's newest set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from meshaccel.operator.engine import Acceleration
from meshaccel.operator.models import (
    MAX_CONFLICTS_LISTED,
    MAX_NODES_LISTED,
    Condition,
    ConditionStatus,
    ConditionType,
    HeldByOlder,
    MeshAccelerationStatus,
    NodeLag,
)

EXAMPLES = 5  # names in a condition's message


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
    def last_error(self) -> str | None: ...
    @property
    def behind_since(self) -> float | None: ...


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


@dataclass(frozen=True)
class Transition:
    """A condition that changed status: worth a Kubernetes Event."""

    type: ConditionType
    status: ConditionStatus
    reason: str
    message: str

    @property
    def warning(self) -> bool:
        bad = {ConditionType.DEGRADED, ConditionType.CONFLICT}
        return (self.type in bad) == (self.status == ConditionStatus.TRUE)


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
) -> tuple[MeshAccelerationStatus, list[Transition]]:
    """The new status and the conditions whose status changed since ``previous``.

    ``judged``: the engine has settled (conflicts are judged); until then the ``Conflict``
    condition stays as ``previous`` has it.
    """
    behind = sorted(
        (state for state in nodes.values() if not state.in_sync),
        key=lambda s: (s.behind_since if s.behind_since is not None else float("inf"), s.node),
    )
    failing = [s for s in behind if s.last_error and _waited(s, clock_now) > behind_grace]
    in_sync = len(nodes) - len(behind)
    wanted = _conditions(acceleration, rollout, len(nodes), behind, failing)
    if not judged:
        wanted[ConditionType.CONFLICT] = _unjudged(previous)
    conditions, transitions = _merge(wanted, previous, generation, now or now_rfc3339())
    status = MeshAccelerationStatus(
        observedGeneration=generation,
        conditions=conditions,
        daemonSet=rollout.name,
        nodesDesired=rollout.desired,
        nodesReady=rollout.ready,
        nodesInSync=in_sync,
        nodesBehind=[
            NodeLag(
                node=s.node,
                desiredGeneration=s.desired_generation,
                appliedGeneration=s.applied_generation,
                error=(s.last_error or None) and s.last_error[:1024],
            )
            for s in behind[:MAX_NODES_LISTED]
        ],
        podsSelected=acceleration.pods_selected(),
        podsAccelerated=sum(s.pods_applied or 0 for s in nodes.values() if s.in_sync),
        podsNotAccelerated=acceleration.skipped_by_reason(),
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


def _unjudged(previous: Sequence[Condition]) -> tuple[ConditionStatus, str, str]:
    old = next((c for c in previous if c.type == ConditionType.CONFLICT), None)
    if old is not None:
        return old.status, old.reason, old.message
    return (
        ConditionStatus.UNKNOWN,
        "NotJudgedYet",
        "conflicts with other MeshAccelerations are judged once the operator has listed the "
        "nodes and MeshAccelerations",
    )


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


def _waited(state: NodeView, clock_now: float) -> float:
    return clock_now - state.behind_since if state.behind_since is not None else 0.0


Wanted = dict[ConditionType, tuple[ConditionStatus, str, str]]


def _conditions(
    acceleration: Acceleration,
    rollout: Rollout,
    node_count: int,
    behind: Sequence[NodeView],
    failing: Sequence[NodeView],
) -> Wanted:
    T, F = ConditionStatus.TRUE, ConditionStatus.FALSE
    wanted: Wanted = {}
    held = acceleration.held_by()
    if held:
        wanted[ConditionType.CONFLICT] = (T, "ClaimedByOlderResource", _conflict_message(held))
    else:
        wanted[ConditionType.CONFLICT] = (F, "NoConflict", "")
    # Every node it selects is kept by an older resource: it accelerates nothing.
    crowded_out = bool(acceleration.nodes_held) and acceleration.nodes_kept == 0
    left_out = acceleration.left_out()

    if acceleration.problems:
        kept = (
            "the last valid spec keeps running"
            if acceleration.spec is not None
            else "nothing is programmed"
        )
        message = "; ".join(acceleration.problems) + f" ({kept} until this is fixed)"
        wanted[ConditionType.DEGRADED] = (T, "InvalidSpec", message)
    elif failing:
        names = ", ".join(s.node for s in failing[:5]) + (" ..." if len(failing) > 5 else "")
        first = failing[0].last_error or ""
        wanted[ConditionType.DEGRADED] = (
            T,
            "AgentsFailing",
            f"{len(failing)} node(s) cannot take their pod set ({names}); first error: {first}",
        )
    elif left_out:
        pods = _examples([f"{item.pod} on {item.node} ({item.reason})" for item in left_out])
        wanted[ConditionType.DEGRADED] = (
            T,
            "PodsOverBudget",
            f"{len(left_out)} pod(s) do not fit their node's datapath maps and stay on the mesh's "
            f"iptables path: {pods}. Raise spec.datapath.maxPodPorts, maxPodCidrs or maxPods, or "
            "have those pods exclude fewer ports and ranges (docs/operator.md, Budgets)",
        )
    else:
        wanted[ConditionType.DEGRADED] = (F, "AsExpected", "")

    rolling = rollout.desired > 0 and (
        rollout.updated < rollout.desired or not rollout.observed_current
    )
    if not acceleration.active:
        wanted[ConditionType.PROGRESSING] = (F, "NotProgrammed", "")
    elif rolling:
        wanted[ConditionType.PROGRESSING] = (
            T,
            "RollingOutAgents",
            f"{rollout.updated} of {rollout.desired} agents run the current spec",
        )
    elif behind:
        wanted[ConditionType.PROGRESSING] = (
            T,
            "PushingPodSets",
            f"{len(behind)} of {node_count} node(s) have not applied their newest pod set",
        )
    else:
        wanted[ConditionType.PROGRESSING] = (F, "AllApplied", "")

    if crowded_out:
        wanted[ConditionType.READY] = (
            F,
            "Conflict",
            "every node this resource selects is kept by an older MeshAcceleration: see the "
            "Conflict condition",
        )
    elif acceleration.spec is None:
        wanted[ConditionType.READY] = (F, "InvalidSpec", "see the Degraded condition")
    elif rollout.desired == 0:
        wanted[ConditionType.READY] = (
            F,
            "NoNodes",
            "no node runs an agent yet: check spec.agent.nodeSelector and tolerations",
        )
    elif rollout.ready < rollout.desired:
        wanted[ConditionType.READY] = (
            F,
            "AgentsNotReady",
            f"{rollout.ready} of {rollout.desired} agents are ready",
        )
    elif behind:
        wanted[ConditionType.READY] = (
            F,
            "PodSetsPending",
            f"{len(behind)} node(s) have not applied their newest pod set",
        )
    else:
        wanted[ConditionType.READY] = (
            T,
            "Accelerating",
            f"{rollout.ready} agents ready, every node's pod set applied",
        )
    return wanted


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
        if old is None:
            # A first status: only a conflict or a degradation is worth an event.
            if status == ConditionStatus.TRUE and kind in (
                ConditionType.CONFLICT,
                ConditionType.DEGRADED,
            ):
                transitions.append(Transition(kind, status, reason, message))
        elif changed:
            transitions.append(Transition(kind, status, reason, message))
    return conditions, transitions
