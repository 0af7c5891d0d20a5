"""Status and conditions from what the operator knows (pure functions)."""

from __future__ import annotations

from dataclasses import dataclass

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


def test_conflict_and_invalid_spec_say_what_to_do() -> None:
    conflicted = acceleration(conflict="nodes n1 are already claimed by 'first'")
    status, transitions = compute_status(conflicted, {}, Rollout(), generation=1, previous=[])
    got = conditions(status)
    assert got[ConditionType.CONFLICT] == (T, "ClaimedByOlderResource")
    assert got[ConditionType.READY] == (F, "Conflict")
    assert [t.type for t in transitions] == [ConditionType.CONFLICT] and transitions[0].warning

    invalid = acceleration(problems=["spec.agent.image 'x' has no tag: name a version"])
    status, _ = compute_status(invalid, {}, Rollout(), generation=1, previous=[])
    degraded = next(c for c in status.conditions if c.type == ConditionType.DEGRADED)
    assert degraded.reason == "InvalidSpec" and "has no tag" in degraded.message
    assert "keeps running" in degraded.message, "an edit that fails keeps the last good spec"


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
