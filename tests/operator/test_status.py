"""Status and conditions from what the operator knows (pure functions)."""

from __future__ import annotations

from dataclasses import dataclass

from meshaccel.operator.budget import LeftOut
from meshaccel.operator.engine import Acceleration
from meshaccel.operator.models import ConditionStatus, ConditionType, MeshAccelerationSpec
from meshaccel.operator.selection import PodWarning, Verdict
from meshaccel.operator.status import Rollout, compute_status
from tests.operator.test_engine import RecordingSink

T, F = ConditionStatus.TRUE, ConditionStatus.FALSE


@dataclass(frozen=True)
class Node:
    node: str
    desired_generation: int | None = 2
    applied_generation: int | None = 2
    in_sync: bool = True
    pods_applied: int | None = 3
    last_error: str | None = None
    behind_since: float | None = None


def acceleration(**kw) -> Acceleration:
    spec = MeshAccelerationSpec.model_validate({"namespaceSelector": {}})
    return Acceleration(name="default", uid="u", created="t", sink=RecordingSink(), spec=spec, **kw)


def conditions(status) -> dict[ConditionType, tuple[ConditionStatus, str]]:
    return {c.type: (c.status, c.reason) for c in status.conditions}


READY_DS = Rollout(name="meshaccel-system/meshaccel-agent-default", desired=2, ready=2, updated=2)


def test_all_in_sync_is_ready() -> None:
    nodes = {"a": Node("a"), "b": Node("b")}
    status, _ = compute_status(acceleration(), nodes, READY_DS, generation=3, previous=[])
    assert conditions(status) == {
        ConditionType.READY: (T, "Accelerating"),
        ConditionType.PROGRESSING: (F, "AllApplied"),
        ConditionType.DEGRADED: (F, "AsExpected"),
        ConditionType.CONFLICT: (F, "NoConflict"),
    }
    assert (status.nodesDesired, status.nodesReady, status.nodesInSync) == (2, 2, 2)
    assert status.podsAccelerated == 6 and status.observedGeneration == 3
    assert all(c.observedGeneration == 3 for c in status.conditions)


def test_a_node_behind_is_listed_and_progressing() -> None:
    nodes = {"a": Node("a"), "b": Node("b", applied_generation=1, in_sync=False, behind_since=5.0)}
    status, _ = compute_status(
        acceleration(), nodes, READY_DS, generation=1, previous=[], clock_now=6.0, behind_grace=10
    )
    got = conditions(status)
    assert got[ConditionType.READY] == (F, "PodSetsPending")
    assert got[ConditionType.PROGRESSING] == (T, "PushingPodSets")
    assert got[ConditionType.DEGRADED] == (F, "AsExpected"), "not failing yet: within the grace"
    assert [lag.node for lag in status.nodesBehind] == ["b"]
    assert status.nodesBehind[0].appliedGeneration == 1


def test_a_node_failing_past_the_grace_degrades_with_its_error() -> None:
    nodes = {"b": Node("b", in_sync=False, behind_since=0.0, last_error="connect: refused")}
    status, _ = compute_status(
        acceleration(), nodes, READY_DS, generation=1, previous=[], clock_now=30.0, behind_grace=10
    )
    degraded = next(c for c in status.conditions if c.type == ConditionType.DEGRADED)
    assert (degraded.status, degraded.reason) == (T, "AgentsFailing")
    assert "b" in degraded.message and "connect: refused" in degraded.message


def test_conflict_names_what_older_resources_keep_and_invalid_spec_says_what_to_do() -> None:
    conflicted = acceleration(
        nodes_held={"n2": "first", "n1": "first"},
        pods_held={"u1": ("first", "shop/web"), "u2": ("zeta", "shop/db")},
        nodes_kept=3,
    )
    status, transitions = compute_status(conflicted, {}, READY_DS, generation=1, previous=[])
    got = conditions(status)
    assert got[ConditionType.CONFLICT] == (T, "ClaimedByOlderResource")
    assert got[ConditionType.READY] == (T, "Accelerating"), "it runs on the nodes it keeps"
    assert [t.type for t in transitions] == [ConditionType.CONFLICT] and transitions[0].warning
    message = next(c.message for c in status.conditions if c.type == ConditionType.CONFLICT)
    assert "'first' (created earlier) keeps node(s) n1, n2 and pod(s) shop/web" in message
    assert "'zeta' (created earlier) keeps pod(s) shop/db" in message
    assert [c.model_dump(exclude_defaults=True) for c in status.conflicts] == [
        {
            "heldBy": "first",
            "nodes": ["n1", "n2"],
            "nodeCount": 2,
            "pods": ["shop/web"],
            "podCount": 1,
        },
        {"heldBy": "zeta", "pods": ["shop/db"], "podCount": 1},
    ]

    crowded_out = acceleration(nodes_held={"n1": "first"}, nodes_kept=0)
    status, _ = compute_status(crowded_out, {}, READY_DS, generation=1, previous=[])
    assert conditions(status)[ConditionType.READY] == (F, "Conflict"), "it keeps no node"

    invalid = acceleration(problems=["spec.agent.image 'x' has no tag: name a version"])
    status, _ = compute_status(invalid, {}, Rollout(), generation=1, previous=[])
    degraded = next(c for c in status.conditions if c.type == ConditionType.DEGRADED)
    assert degraded.reason == "InvalidSpec" and "has no tag" in degraded.message
    assert "keeps running" in degraded.message, "an edit that fails keeps the last good spec"


def test_no_conflict_is_judged_before_the_picture_is_complete() -> None:
    """Until the engine settles, the Conflict condition stays as it was (Unknown at first)."""
    status, transitions = compute_status(
        acceleration(), {}, READY_DS, generation=1, previous=[], judged=False
    )
    assert conditions(status)[ConditionType.CONFLICT] == (ConditionStatus.UNKNOWN, "NotJudgedYet")
    assert transitions == []
    before = acceleration(nodes_held={"n1": "first"}, nodes_kept=1)
    judged, _ = compute_status(before, {}, READY_DS, generation=1, previous=[], now="t1")
    kept, transitions = compute_status(
        acceleration(), {}, READY_DS, generation=1, previous=judged.conditions, judged=False
    )
    assert conditions(kept)[ConditionType.CONFLICT] == (T, "ClaimedByOlderResource")
    assert transitions == [] and kept.conflicts == []


def test_pods_over_budget_degrade_naming_a_few() -> None:
    over = {
        f"u{i}": LeftOut(f"shop/hog{i}", "n1", "pod_ports needs 63, 52 left on the node")
        for i in range(7)
    }
    counted = acceleration(over_budget={"n1": over}, placement={f"u{i}": "n1" for i in range(9)})
    status, transitions = compute_status(counted, {}, READY_DS, generation=1, previous=[])
    assert status.podsNotAccelerated == {"OverBudget": 7}
    assert status.podsSelected == 2
    degraded = next(c for c in status.conditions if c.type == ConditionType.DEGRADED)
    assert (degraded.status, degraded.reason) == (T, "PodsOverBudget")
    assert degraded.message.startswith("7 pod(s) do not fit their node's datapath maps")
    assert "shop/hog0 on n1 (pod_ports needs 63, 52 left on the node)" in degraded.message
    assert "and 2 more" in degraded.message
    assert [t.reason for t in transitions] == ["PodsOverBudget"], "a Warning event"


def test_rollout_in_progress_and_no_nodes() -> None:
    rolling = Rollout(name="x", desired=3, ready=3, updated=1)
    status, _ = compute_status(acceleration(), {}, rolling, generation=1, previous=[])
    assert conditions(status)[ConditionType.PROGRESSING] == (T, "RollingOutAgents")
    status, _ = compute_status(acceleration(), {}, Rollout(name="x"), generation=1, previous=[])
    assert conditions(status)[ConditionType.READY] == (F, "NoNodes")


def test_transition_time_moves_only_with_the_status() -> None:
    first, _ = compute_status(
        acceleration(), {"a": Node("a")}, READY_DS, generation=1, previous=[], now="t1"
    )
    again, transitions = compute_status(
        acceleration(),
        {"a": Node("a")},
        READY_DS,
        generation=2,
        previous=first.conditions,
        now="t2",
    )
    assert transitions == []
    assert {c.lastTransitionTime for c in again.conditions} == {"t1"}
    behind = {"a": Node("a", in_sync=False, behind_since=0.0)}
    later, transitions = compute_status(
        acceleration(), behind, READY_DS, generation=2, previous=again.conditions, now="t3"
    )
    moved = {c.type for c in later.conditions if c.lastTransitionTime == "t3"}
    assert moved == {ConditionType.READY, ConditionType.PROGRESSING}
    assert {t.type for t in transitions} == moved


def test_pods_are_counted_by_reason_whether_skipped_or_warned() -> None:
    counted = acceleration(
        skipped={"u1": Verdict.NO_SIDECAR, "u2": Verdict.NO_SIDECAR},
        warned={"u3": PodWarning.INVALID_ANNOTATION},
    )
    status, _ = compute_status(counted, {}, READY_DS, generation=1, previous=[])
    assert status.podsNotAccelerated == {"NoSidecar": 2}
    assert status.podsWithWarnings == {"InvalidAnnotation": 1}
    assert conditions(status)[ConditionType.DEGRADED] == (F, "AsExpected"), (
        "a warning degrades nothing"
    )
