"""Status and conditions from what the operator knows: the pure functions, fed by hand, by the
real picture, and (at 500 nodes) by the real picture and pusher against fake agents."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from meshaccel.contract.api import PodSpec, UnresolvedPod
from meshaccel.contract.version import VERSION
from meshaccel.operator.budget import LeftOut
from meshaccel.operator.metrics import PushMetrics, ResourceMetrics
from meshaccel.operator.models import (
    MAX_NODES_LISTED,
    MAX_PROBLEMS_LISTED,
    PROBLEM_REASONS,
    ConditionStatus,
    ConditionType,
    MeshAccelerationSpec,
    MeshAccelerationStatus,
)
from meshaccel.operator.picture import Acceleration, ClusterPicture, PodTrouble
from meshaccel.operator.pusher import Pusher
from meshaccel.operator.selection import PodWarning, Verdict
from meshaccel.operator.status import NodeView, Rollout, compute_status
from tests.operator.fake_agent import FakeAgentFleet
from tests.operator.objects import OPERATOR_NAMESPACE, agent_pod, pod
from tests.operator.test_picture import ENABLED, RecordingSink, spec
from tests.operator.test_pusher import AGENT_TLS, OPERATOR
from tests.waiting import wait_for

T, F, U = ConditionStatus.TRUE, ConditionStatus.FALSE, ConditionStatus.UNKNOWN
READY, RECONCILING, STALLED = ConditionType.READY, ConditionType.RECONCILING, ConditionType.STALLED
DEGRADED, CONFLICT = ConditionType.DEGRADED, ConditionType.CONFLICT


@dataclass(frozen=True)
class Node:
    """A node's push state, as the pusher's NodeState shows it (in sync, heard from)."""

    node: str
    desired_generation: int | None = 2
    applied_generation: int | None = 2
    in_sync: bool = True
    pods_applied: int | None = 3
    pods_desired: int | None = 3
    last_error: str | None = None
    probe_error: str | None = None
    behind_since: float | None = None
    boot_id: str | None = "boot"
    agent_version: str | None = VERSION
    unresolved_pods: tuple[UnresolvedPod, ...] = ()
    unresolved_since: float | None = None
    held_back: tuple[UnresolvedPod, ...] = ()


def _is_node_view(node: NodeView) -> NodeView:
    return node  # mypy checks that Node is a NodeView


_is_node_view(Node("a"))


def unresolved(node: str, *names: str, since: float = 0.0, applied: int = 0) -> Node:
    pods = tuple(
        UnresolvedPod(uid=f"uid-{name}", namespace="shop", name=name, reason="no cgroup found")
        for name in names
    )
    return Node(
        node,
        pods_applied=applied,
        pods_desired=applied + len(pods),
        unresolved_pods=pods,
        unresolved_since=since,
    )


def acceleration(**kw: Any) -> Acceleration:
    spec = MeshAccelerationSpec.model_validate({"namespaceSelector": {}})
    return Acceleration(name="default", uid="u", created="t", sink=RecordingSink(), spec=spec, **kw)


def conditions(status: MeshAccelerationStatus) -> dict[ConditionType, tuple[ConditionStatus, str]]:
    return {c.type: (c.status, c.reason) for c in status.conditions}


def condition(status: MeshAccelerationStatus, kind: ConditionType) -> Any:
    return next(c for c in status.conditions if c.type == kind)


READY_DS = Rollout(name="meshaccel-system/meshaccel-agent-default", desired=2, ready=2, updated=2)


def test_all_in_sync_is_ready() -> None:
    nodes = {"a": Node("a"), "b": Node("b")}
    status, transitions = compute_status(acceleration(), nodes, READY_DS, generation=3, previous=[])
    assert conditions(status) == {
        READY: (T, "Accelerating"),
        RECONCILING: (F, "Reconciled"),
        STALLED: (F, "AsExpected"),
        DEGRADED: (F, "AsExpected"),
        CONFLICT: (F, "NoConflict"),
    }
    assert transitions == [], "a healthy first status posts no event"
    assert (status.nodesDesired, status.nodesReady, status.nodesInSync) == (2, 2, 2)
    assert (status.nodeCount, status.nodesWithProblems) == (2, 0)
    assert status.podsAccelerated == 6 and status.observedGeneration == 3
    assert status.operatorVersion == VERSION
    assert all(c.observedGeneration == 3 for c in status.conditions)
    assert [n.model_dump(exclude_defaults=True) for n in status.nodes] == [
        {
            "node": name,
            "agentVersion": VERSION,
            "desiredGeneration": 2,
            "appliedGeneration": 2,
            "inSync": True,
            "podsAccelerated": 3,
        }
        for name in ("a", "b")
    ]


def test_a_node_behind_is_listed_first_and_reconciling() -> None:
    nodes = {
        "a": Node("a"),
        "b": Node("b", applied_generation=1, in_sync=False, behind_since=5.0, pods_desired=4),
    }
    status, _ = compute_status(
        acceleration(), nodes, READY_DS, generation=1, previous=[], clock_now=6.0, behind_grace=10
    )
    got = conditions(status)
    assert got[READY] == (F, "PushingPodSets")
    assert got[RECONCILING] == (T, "PushingPodSets")
    assert got[STALLED] == (F, "AsExpected"), "not failing yet: within the grace"
    assert got[DEGRADED] == (F, "AsExpected")
    assert [(n.node, n.inSync, n.appliedGeneration) for n in status.nodes] == [
        ("b", False, 1),
        ("a", True, 2),
    ]
    assert status.podsNotAccelerated == {"Pending": 4}, "its newest set is not confirmed"
    assert (status.nodesInSync, status.nodesWithProblems) == (1, 1)


def test_a_node_failing_past_the_grace_stalls_with_its_error_unless_agents_roll() -> None:
    nodes = {"b": Node("b", in_sync=False, behind_since=0.0, last_error="connect: refused")}
    status, transitions = compute_status(
        acceleration(), nodes, READY_DS, generation=1, previous=[], clock_now=30.0, behind_grace=10
    )
    for kind in (STALLED, DEGRADED):
        failing = condition(status, kind)
        assert (failing.status, failing.reason) == (T, "AgentsFailing")
        assert "b" in failing.message and "connect: refused" in failing.message
    assert conditions(status)[RECONCILING] == (F, "Stalled"), "never both (kstatus)"
    assert conditions(status)[READY] == (F, "AgentsFailing")
    assert status.nodes[0].lastError == "connect: refused"
    assert {(t.type, t.warning) for t in transitions} == {(STALLED, True), (DEGRADED, True)}

    # While the agents roll out, an agent that does not answer yet is on its way.
    rolling = replace(READY_DS, updated=1)
    status, _ = compute_status(
        acceleration(), nodes, rolling, generation=1, previous=[], clock_now=30.0, behind_grace=10
    )
    got = conditions(status)
    assert got[STALLED] == (F, "AsExpected") and got[RECONCILING] == (T, "RollingOutAgents")
    assert got[DEGRADED] == (T, "AgentsFailing"), "still wrong, and said so"


def test_conflict_names_what_older_resources_keep_and_invalid_spec_says_what_to_do() -> None:
    conflicted = acceleration(
        nodes_held={"n2": "first", "n1": "first"},
        pods_held={"u1": ("first", "shop/web"), "u2": ("zeta", "shop/db")},
        nodes_kept=3,
    )
    status, transitions = compute_status(conflicted, {}, READY_DS, generation=1, previous=[])
    got = conditions(status)
    assert got[CONFLICT] == (T, "ClaimedByOlderResource")
    assert got[READY] == (T, "Accelerating"), "it runs on the nodes it keeps"
    assert [t.type for t in transitions] == [CONFLICT] and transitions[0].warning
    message = condition(status, CONFLICT).message
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
    got = conditions(status)
    assert got[READY] == (F, "Conflict") and got[STALLED] == (T, "Conflict"), "it keeps no node"

    invalid = acceleration(problems=["spec.agent.image 'x' has no tag: name a version"])
    status, _ = compute_status(invalid, {}, Rollout(), generation=1, previous=[])
    for kind in (STALLED, DEGRADED):
        assert condition(status, kind).reason == "InvalidSpec"
        assert "has no tag" in condition(status, kind).message
    assert "keeps running" in condition(status, DEGRADED).message, "the last good spec runs"


def test_nothing_is_judged_before_the_picture_is_complete() -> None:
    """Until the picture settles, Ready, Reconciling, Stalled and Conflict stay as they were
    (Reconciling at first: the operator is listing the cluster)."""
    status, transitions = compute_status(
        acceleration(), {}, READY_DS, generation=1, previous=[], judged=False
    )
    got = conditions(status)
    assert got[CONFLICT] == (U, "NotJudgedYet")
    assert got[RECONCILING] == (T, "ListingCluster") and got[READY] == (F, "ListingCluster")
    assert transitions == []
    before = acceleration(nodes_held={"n1": "first"}, nodes_kept=1)
    judged, _ = compute_status(
        before, {"a": Node("a")}, READY_DS, generation=1, previous=[], now="t1"
    )
    assert conditions(judged)[READY] == (T, "Accelerating")
    kept, transitions = compute_status(
        acceleration(), {}, READY_DS, generation=1, previous=judged.conditions, judged=False
    )
    assert conditions(kept)[CONFLICT] == (T, "ClaimedByOlderResource")
    assert conditions(kept)[READY] == (T, "Accelerating"), "the last judgement stays"
    assert transitions == [] and kept.conflicts == []

    invalid = acceleration(problems=["spec.agent.image is set but no longer read"])
    status, _ = compute_status(invalid, {}, READY_DS, generation=1, previous=[], judged=False)
    got = conditions(status)
    assert got[STALLED] == got[DEGRADED] == (T, "InvalidSpec"), "judged from the spec alone"
    assert got[READY] == (F, "InvalidSpec") and got[CONFLICT] == (U, "NotJudgedYet")


def test_pods_over_budget_stall_naming_a_few_and_are_listed() -> None:
    over = {
        f"u{i}": LeftOut(f"shop/hog{i}", "n1", "pod_ports needs 63, 52 left on the node")
        for i in range(7)
    }
    counted = acceleration(over_budget={"n1": over}, placement={f"u{i}": "n1" for i in range(9)})
    status, transitions = compute_status(counted, {}, READY_DS, generation=1, previous=[])
    assert status.podsNotAccelerated == {"OverBudget": 7}
    assert status.podsSelected == 2
    degraded = condition(status, DEGRADED)
    assert (degraded.status, degraded.reason) == (T, "PodsOverBudget")
    assert degraded.message.startswith("7 pod(s) do not fit their node's datapath maps")
    assert "shop/hog0 on n1 (pod_ports needs 63, 52 left on the node)" in degraded.message
    assert "and 2 more" in degraded.message
    assert conditions(status)[STALLED] == (T, "PodsOverBudget")
    assert [(t.type, t.reason, t.warning) for t in transitions] == [
        (STALLED, "PodsOverBudget", True),
        (DEGRADED, "PodsOverBudget", True),
    ], "Warning events"
    assert status.problemCount == 7
    assert [(p.namespace, p.name, p.node, p.reason) for p in status.problems[:2]] == [
        ("shop", "hog0", "n1", "OverBudget"),
        ("shop", "hog1", "n1", "OverBudget"),
    ]
    assert status.problems[0].message == "pod_ports needs 63, 52 left on the node"


def test_unresolved_pods_keep_ready_false_then_stall_past_the_grace() -> None:
    """Issue 13: 40 pods selected, 0 accelerated, and Ready=True. Pods the agents cannot find
    are not accelerated: first Reconciling (the agents retry), past the grace Stalled."""
    nodes = {
        "a": unresolved("a", "web", "api", since=100.0, applied=1),
        "b": Node("b"),
    }
    early, _ = compute_status(
        acceleration(),
        nodes,
        READY_DS,
        generation=1,
        previous=[],
        clock_now=105.0,
        behind_grace=10,
    )
    assert conditions(early)[READY] == (F, "ResolvingPods")
    assert conditions(early)[RECONCILING] == (T, "ResolvingPods")
    assert conditions(early)[STALLED] == (F, "AsExpected")
    assert "shop/web on a (no cgroup found)" in condition(early, READY).message

    late, transitions = compute_status(
        acceleration(),
        nodes,
        READY_DS,
        generation=1,
        previous=early.conditions,
        clock_now=111.0,
        behind_grace=10,
    )
    got = conditions(late)
    assert got[READY] == (F, "PodsUnresolved") and got[STALLED] == (T, "PodsUnresolved")
    assert got[DEGRADED] == (T, "PodsUnresolved") and got[RECONCILING] == (F, "Stalled")
    assert {(t.type, t.warning) for t in transitions} == {
        (STALLED, True),
        (DEGRADED, True),
        (RECONCILING, False),
    }, "Ready was False already: only its reason changed"
    assert late.podsNotAccelerated == {"Unresolved": 2}
    assert (late.podsAccelerated, late.problemCount) == (4, 2)
    assert [(p.name, p.node, p.reason, p.message) for p in late.problems] == [
        ("api", "a", "Unresolved", "no cgroup found"),
        ("web", "a", "Unresolved", "no cgroup found"),
    ]
    assert [(n.node, n.podsUnresolved) for n in late.nodes] == [("a", 2), ("b", 0)]
    assert late.nodesWithProblems == 1


@dataclass
class Case:
    reason: str  # why this case matters, printed on failure
    pods: list[dict[str, Any]]
    counted: dict[str, int]
    ready: bool
    spec: dict[str, Any] = field(default_factory=dict)


_IP = iter(f"10.1.0.{i}" for i in range(1, 250))


def _pod(name: str, **kw: Any) -> dict[str, Any]:
    kw.setdefault("ip", next(_IP))
    return pod(name, "shop", **kw)


CASES = [
    Case("every pod accelerated", [_pod("a"), _pod("b", node="node-2")], {}, True),
    Case(
        "a pod without a sidecar has nothing to accelerate",
        [_pod("a"), _pod("b", sidecar=False)],
        {"NoSidecar": 1},
        True,
    ),
    Case(
        "a pod that opted out chose so",
        [_pod("a", annotations={"meshaccel.io/accelerate": "false"})],
        {"OptedOut": 1},
        True,
    ),
    Case(
        "a pod not running (yet, or any more) has nothing to accelerate",
        [_pod("a", phase="Pending", ip=None), _pod("b", phase="Succeeded")],
        {"NotRunning": 2},
        True,
    ),
    Case(
        "a pod whose own interception settings the datapath cannot reproduce keeps them",
        [_pod("a", annotations={"sidecar.istio.io/interceptionMode": "TPROXY"})],
        {"UnsupportedAnnotation": 1},
        True,
    ),
    Case(
        "a node the agents' nodeSelector leaves out",
        [_pod("a", node="node-9")],
        {"NoAgentOnNode": 1},
        True,
    ),
    Case(
        "a mesh annotation meshaccel cannot read is nobody's choice",
        [_pod("a"), _pod("b", annotations={"traffic.sidecar.istio.io/excludeOutboundPorts": "x"})],
        {"InvalidAnnotation": 1},
        False,
    ),
    Case(
        "a pod its node's maps do not take",
        [
            _pod("a"),
            _pod("b", annotations={"traffic.sidecar.istio.io/excludeOutboundPorts": "1-50"}),
        ],
        {"OverBudget": 1},
        False,
        {"datapath": {"maxPodPorts": 64}},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.reason for c in CASES])
def test_ready_means_every_pod_accelerated_or_left_out_by_choice(case: Case) -> None:
    """The real picture selects, its sink's sets are what the agents confirmed: Ready is True
    only when every pod the selectors match is accelerated or left out by its own, or the
    spec's, choice (or has nothing to accelerate)."""
    picture = ClusterPicture(OPERATOR_NAMESPACE, settled=True)
    picture.namespace_changed("shop", ENABLED)
    for i, node in enumerate(("node-1", "node-2")):
        picture.pod_changed(agent_pod("default", node, f"192.0.2.{i + 1}", uid=f"agent-{i}"))
    for obj in case.pods:
        picture.pod_changed(obj)
    sink = RecordingSink()
    accel = picture.acceleration_changed("default", "uid", "t0", spec(**case.spec), sink)
    nodes = {
        node: Node(node, pods_applied=len(pods), pods_desired=len(pods))
        for node, pods in sink.sets.items()
    }
    status, _ = compute_status(accel, nodes, READY_DS, generation=1, previous=[])
    assert status.podsNotAccelerated == case.counted, case.reason
    assert (conditions(status)[READY][0] == T) == case.ready, (case.reason, status.conditions)
    problems = sum(n for reason, n in case.counted.items() if reason in PROBLEM_REASONS)
    assert status.problemCount == len(status.problems) == problems, case.reason
    if not case.ready:
        assert conditions(status)[STALLED][0] == T, case.reason
        assert status.problems[0].name == "b", case.reason


def test_invalid_annotations_name_the_pod_and_what_is_wrong() -> None:
    troubled = {
        "u1": PodTrouble(
            "shop",
            "b",
            "node-1",
            Verdict.INVALID_ANNOTATION,
            "traffic.sidecar.istio.io/excludeOutboundPorts: 'x' is not a port",
        )
    }
    accel = acceleration(skipped={"u1": Verdict.INVALID_ANNOTATION}, troubled=troubled)
    status, _ = compute_status(
        accel, {"node-1": Node("node-1")}, READY_DS, generation=1, previous=[]
    )
    stalled = condition(status, STALLED)
    assert stalled.reason == "PodAnnotationsInvalid"
    assert "shop/b (traffic.sidecar.istio.io/excludeOutboundPorts: 'x' is not a port)" in (
        stalled.message
    )
    [problem] = status.problems
    assert problem.model_dump() == {
        "namespace": "shop",
        "name": "b",
        "node": "node-1",
        "reason": "InvalidAnnotation",
        "message": "traffic.sidecar.istio.io/excludeOutboundPorts: 'x' is not a port",
    }


def test_rollout_in_progress_and_no_nodes() -> None:
    rolling = Rollout(name="x", desired=3, ready=3, updated=1)
    status, _ = compute_status(acceleration(), {}, rolling, generation=1, previous=[])
    assert conditions(status)[RECONCILING] == (T, "RollingOutAgents")
    assert conditions(status)[READY] == (F, "RollingOutAgents")
    unseen = Rollout(name="x", observed_current=False)
    status, _ = compute_status(acceleration(), {}, unseen, generation=1, previous=[])
    assert conditions(status)[RECONCILING] == (T, "RollingOutAgents"), "not judged on zeros"
    status, _ = compute_status(acceleration(), {}, Rollout(name="x"), generation=1, previous=[])
    assert conditions(status)[READY] == (F, "NoNodes")
    assert conditions(status)[STALLED] == (T, "NoNodes")
    assert conditions(status)[DEGRADED] == (F, "AsExpected"), "nothing wrong, nothing to do"


def test_agents_of_another_version_degrade_once_their_rollout_is_over() -> None:
    """Skew: a Degraded warning naming the nodes and versions; Ready stays as it is. While the
    agents roll out, other versions are expected."""
    nodes = {
        "a": Node("a"),
        "b": Node("b", agent_version="0.1.9"),
        "c": Node("c", agent_version=None),  # an agent that predates the field
        "d": Node("d", agent_version=None, boot_id=None, in_sync=False),  # not heard from
    }
    ds = replace(READY_DS, desired=4, ready=4, updated=4)
    status, transitions = compute_status(
        acceleration(), nodes, ds, generation=1, previous=[], operator_version="0.2.0"
    )
    degraded = condition(status, DEGRADED)
    assert (degraded.status, degraded.reason) == (T, "VersionSkew")
    assert "3 of 4 agent(s) run another version than the operator (0.2.0)" in degraded.message
    assert "a (" + VERSION + "), b (0.1.9), c (unknown)" in degraded.message
    assert conditions(status)[STALLED] == (F, "AsExpected")
    assert [(t.type, t.warning) for t in transitions] == [(DEGRADED, True)]
    assert [(n.node, n.agentVersion) for n in status.nodes] == [
        ("d", None),
        ("a", VERSION),
        ("b", "0.1.9"),
        ("c", None),
    ], "behind first, then other versions"
    assert status.nodesWithProblems == 4

    rolling = replace(ds, updated=2)
    status, _ = compute_status(
        acceleration(), nodes, rolling, generation=1, previous=[], operator_version="0.2.0"
    )
    assert conditions(status)[DEGRADED] == (F, "AsExpected")


def test_transition_time_moves_only_with_the_status_and_reconciling_is_no_warning() -> None:
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
    assert moved == {READY, RECONCILING}
    assert {t.type for t in transitions} == moved
    assert not any(t.warning for t in transitions), "work under way is no warning"


def test_pods_are_counted_by_reason_whether_skipped_or_warned() -> None:
    counted = acceleration(
        skipped={"u1": Verdict.NO_SIDECAR, "u2": Verdict.NO_SIDECAR},
        warned={"u3": PodWarning.INVALID_ANNOTATION},
    )
    status, _ = compute_status(counted, {}, READY_DS, generation=1, previous=[])
    assert status.podsNotAccelerated == {"NoSidecar": 2}
    assert status.podsWithWarnings == {"InvalidAnnotation": 1}
    assert conditions(status)[DEGRADED] == (F, "AsExpected"), "a warning degrades nothing"
    assert conditions(status)[READY][0] == T


def large_cluster() -> tuple[Acceleration, Mapping[str, Node]]:
    """500 nodes of 20 pods; 300 pods unresolved (on 30 nodes), 2 over budget, 3 with an
    invalid annotation, 5 nodes behind."""
    nodes: dict[str, Node] = {}
    for i in range(500):
        name = f"node-{i:03d}"
        if i < 30:
            nodes[name] = unresolved(
                name, *(f"p{i:03d}-{j:02d}" for j in range(10)), since=0.0, applied=10
            )
        elif i < 35:
            nodes[name] = Node(name, in_sync=False, behind_since=float(i), pods_desired=20)
        else:
            nodes[name] = Node(name, pods_applied=20, pods_desired=20)
    over = {f"o{j}": LeftOut(f"big/hog{j}", "node-100", "pods needs 1, 0 left") for j in range(2)}
    troubled = {
        f"t{j}": PodTrouble("typo", f"pod{j}", "node-200", Verdict.INVALID_ANNOTATION, "not a port")
        for j in range(3)
    }
    accel = acceleration(
        over_budget={"node-100": over},
        troubled=troubled,
        skipped={**dict.fromkeys(troubled, Verdict.INVALID_ANNOTATION)},
        placement={f"p{j}": "n" for j in range(10_002)},
    )
    return accel, nodes


def test_a_large_cluster_keeps_its_status_bounded_and_its_counts_exact() -> None:
    accel, nodes = large_cluster()
    ds = Rollout(name="x", desired=500, ready=500, updated=500)
    status, _ = compute_status(
        accel, nodes, ds, generation=1, previous=[], clock_now=100.0, behind_grace=10
    )
    assert (status.nodeCount, status.nodesInSync, status.nodesWithProblems) == (500, 495, 35)
    assert len(status.nodes) == MAX_NODES_LISTED
    assert [n.node for n in status.nodes[:5]] == [f"node-{i:03d}" for i in range(30, 35)]
    assert all(n.podsUnresolved == 10 for n in status.nodes[5:])
    assert status.podsNotAccelerated == {
        "Unresolved": 300,
        "OverBudget": 2,
        "InvalidAnnotation": 3,
        "Pending": 100,
    }
    assert status.podsAccelerated == 30 * 10 + 465 * 20
    assert status.podsSelected == 10_000
    assert status.problemCount == 305
    assert len(status.problems) == MAX_PROBLEMS_LISTED
    reasons = [p.reason for p in status.problems]
    assert reasons[:6] == ["Unresolved", "OverBudget", "InvalidAnnotation"] * 2, (
        "each reason in turn"
    )
    assert reasons.count("Unresolved") == MAX_PROBLEMS_LISTED - 5
    assert conditions(status)[STALLED] == (T, "PodsOverBudget")
    size = len(json.dumps(status.model_dump(mode="json", exclude_none=True)))
    assert size < 32 * 1024, f"{size} bytes for 500 nodes"


class ToFleet:
    """The picture's sink for a pusher whose agents are a fake fleet: each node's agent listens
    at its fleet address, not at the address its agent pod names."""

    def __init__(self, pusher: Pusher, fleet: FakeAgentFleet) -> None:
        self.pusher, self.fleet = pusher, fleet

    def set_endpoint(self, node: str, url: str | None) -> None:
        self.pusher.set_endpoint(node, self.fleet.by_name[node].url if url else None)

    def set_pods(self, node: str, pods: Sequence[PodSpec]) -> None:
        self.pusher.set_pods(node, pods)

    def drop_node(self, node: str) -> None:
        self.pusher.drop_node(node)


async def test_500_nodes_of_20_pods_with_300_unresolved_keep_a_bounded_status() -> None:
    """The real picture and pusher against 500 fake agents that cannot find 300 of the 10,000
    pods: every count exact, every list capped, and the status what the CRD takes."""
    picture = ClusterPicture(OPERATOR_NAMESPACE, settled=True)
    picture.namespace_changed("shop", ENABLED)
    async with (
        FakeAgentFleet(500, tls=AGENT_TLS) as fleet,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
    ):
        for i, agent in enumerate(fleet):
            picture.pod_changed(agent_pod("big", agent.name, f"10.255.{i // 250}.{i % 250 + 1}"))
            for j in range(20):
                index = i * 20 + j
                picture.pod_changed(
                    pod(
                        f"p{index:05d}",
                        "shop",
                        node=agent.name,
                        ip=f"10.{index // 250}.{index % 250}.1",
                    )
                )
            if i % 10 == 0:  # 50 nodes with 6 pods each their agent cannot find
                agent.cannot_find(*(f"shop/p{i * 20 + j:05d}" for j in range(6)))
        pusher = Pusher(
            "big",
            tls=lambda: OPERATOR,
            session=session,
            epoch=1,
            probe_interval=3600,
            metrics=PushMetrics(CollectorRegistry()),
        )
        try:
            accel = picture.acceleration_changed("big", "uid", "t0", spec(), ToFleet(pusher, fleet))

            def synced() -> bool:
                return all(s.in_sync for s in pusher.nodes().values())

            await wait_for(synced, timeout=120, what="500 nodes in sync")
            ds = Rollout(
                name="meshaccel-system/meshaccel-agent-big", desired=500, ready=500, updated=500
            )
            status, _ = compute_status(
                accel,
                pusher.nodes(),
                ds,
                generation=1,
                previous=[],
                clock_now=math.inf,
                behind_grace=10,
            )
        finally:
            await pusher.close()
    assert (status.podsSelected, status.podsAccelerated) == (10_000, 9_700)
    assert status.podsNotAccelerated == {"Unresolved": 300}
    assert (status.nodeCount, status.nodesInSync, status.nodesWithProblems) == (500, 500, 50)
    assert [(n.node, n.podsUnresolved, n.podsAccelerated) for n in status.nodes] == [
        (f"node-{i:04d}", 6, 14) for i in range(0, 200, 10)
    ], "the nodes with problems first, capped"
    assert status.problemCount == 300 and len(status.problems) == MAX_PROBLEMS_LISTED
    assert [p.name for p in status.problems[:7]] == [
        *(f"p{j:05d}" for j in range(6)),
        "p00200",
    ]
    assert conditions(status)[READY] == (F, "PodsUnresolved")
    message = condition(status, STALLED).message
    assert message.startswith("300 pod(s) on 50 node(s) stay unresolved")
    document = status.model_dump(mode="json", exclude_none=True)
    size = len(json.dumps(document))
    print(f"status of 500 nodes, 10,000 pods, 300 unresolved: {size} bytes")
    assert size < 32 * 1024, f"{size} bytes"


def test_the_status_as_gauges_and_gone_with_the_resource() -> None:
    registry = CollectorRegistry()
    gauges = ResourceMetrics(registry)

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"acceleration": "shop", **labels})

    gauges.publish(
        "shop", ready=False, selected=40, accelerated=0, not_accelerated={"Unresolved": 40}
    )
    assert sample("meshaccel_operator_resource_ready") == 0
    assert (
        sample("meshaccel_operator_pods_selected"),
        sample("meshaccel_operator_pods_accelerated"),
    ) == (40, 0)
    assert sample("meshaccel_operator_pods_not_accelerated", reason="Unresolved") == 40

    gauges.publish("shop", ready=True, selected=40, accelerated=40, not_accelerated={"OptedOut": 1})
    assert sample("meshaccel_operator_resource_ready") == 1
    assert sample("meshaccel_operator_pods_not_accelerated", reason="Unresolved") == 0, "kept at 0"
    assert sample("meshaccel_operator_pods_not_accelerated", reason="OptedOut") == 1

    gauges.forget("shop")
    for name in ("resource_ready", "pods_selected", "pods_accelerated"):
        assert sample(f"meshaccel_operator_{name}") is None, name
    for reason in ("Unresolved", "OptedOut"):
        assert sample("meshaccel_operator_pods_not_accelerated", reason=reason) is None


def test_a_stored_status_of_0_1_loses_its_retired_condition_and_the_gauges_read_the_write() -> None:
    """0.1 wrote a Progressing condition, which the models no longer parse: it is dropped before
    the operator reads the previous conditions (the list written next has none). The gauges
    read the status as the merge patch leaves it."""
    # Late: importing the handlers fixes the status timer's interval (test_operator.py sets it).
    from meshaccel.operator import handlers

    stored = {
        "conditions": [
            {
                "type": "Progressing",
                "status": "False",
                "reason": "AllApplied",
                "lastTransitionTime": "2025-01-01T00:00:00Z",
            },
            {
                "type": "Ready",
                "status": "True",
                "reason": "Accelerating",
                "lastTransitionTime": "2025-01-01T00:00:00Z",
            },
        ],
        "nodesBehind": [],
        "podsNotAccelerated": {"NoSidecar": 1},
    }
    current = handlers._known_conditions(stored)
    assert [c["type"] for c in current["conditions"]] == ["Ready"]
    assert len(stored["conditions"]) == 2, "the stored status itself is not changed"
    patch = {"nodesBehind": None, "podsNotAccelerated": {"NoSidecar": None, "Unresolved": 2}}
    assert handlers._patched(current, patch) == {
        "conditions": current["conditions"],
        "podsNotAccelerated": {"Unresolved": 2},
    }


def test_ipv6_only_pods_an_old_agent_cannot_take_are_problems_once_its_rollout_is_over() -> None:
    """An agent that predates IPv6 is sent the IPv4 part of its set (operator/pusher.py): its
    IPv6-only pods stay on the mesh's ip6tables path, which someone must end by updating it."""
    held = tuple(
        UnresolvedPod(uid=f"uid-{n}", namespace="shop", name=n, reason="the agent predates IPv6")
        for n in ("v6-a", "v6-b")
    )
    nodes = {"a": Node("a"), "b": Node("b", pods_applied=1, pods_desired=3, held_back=held)}
    rolling = Rollout(name=READY_DS.name, desired=2, ready=2, updated=1)

    during, _ = compute_status(acceleration(), nodes, rolling, generation=1, previous=[])
    assert conditions(during)[STALLED] == (F, "AsExpected"), "the rollout replaces it"
    assert conditions(during)[READY] == (F, "RollingOutAgents")

    after, _ = compute_status(acceleration(), nodes, READY_DS, generation=1, previous=[])
    got = conditions(after)
    assert got[STALLED] == (T, "AgentsWithoutIPv6") and got[DEGRADED] == (T, "AgentsWithoutIPv6")
    message = condition(after, STALLED).message
    assert "2 IPv6-only pod(s)" in message and "shop/v6-a on b" in message
    assert after.podsNotAccelerated == {"AgentWithoutIPv6": 2}
    assert after.podsAccelerated == 4
    assert [(p.name, p.node, p.reason) for p in after.problems] == [
        ("v6-a", "b", "AgentWithoutIPv6"),
        ("v6-b", "b", "AgentWithoutIPv6"),
    ]
    assert [n.node for n in after.nodes] == ["b", "a"], "the node with held-back pods first"
