"""The picture: re-selection on every kind of change, per-node sets, conflicts per node and per
pod, the complete picture before any judgement, budgets (no Kopf, no I/O)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytest

from meshaccel.contract.api import PodSpec
from meshaccel.operator.budget import Budget, usage
from meshaccel.operator.models import MeshAccelerationSpec
from meshaccel.operator.picture import ClusterPicture, ListedAcceleration, PodTrouble
from meshaccel.operator.selection import PodWarning, Verdict
from tests.operator.objects import OPERATOR_NAMESPACE, agent_pod, pod

ENABLED = {"meshaccel.io/accelerate": "enabled"}
TO_APP = "meshaccel.io/sk-msg-to-app"


class RecordingSink:
    """A PodSink that keeps the last set and endpoint per node, and counts pushes."""

    def __init__(self) -> None:
        self.sets: dict[str, list[str]] = {}  # node -> pod names
        self.endpoints: dict[str, str | None] = {}
        self.calls = 0

    def set_endpoint(self, node: str, url: str | None) -> None:
        self.endpoints[node] = url

    def set_pods(self, node: str, pods: Sequence[PodSpec]) -> None:
        self.calls += 1
        self.sets[node] = sorted(f"{p.namespace}/{p.name}" for p in pods)

    def drop_node(self, node: str) -> None:
        self.sets.pop(node, None)
        self.endpoints.pop(node, None)


def spec(**overrides: Any) -> MeshAccelerationSpec:
    return MeshAccelerationSpec.model_validate(
        {"namespaceSelector": {"matchLabels": ENABLED}, **overrides}
    )


@pytest.fixture
def picture() -> ClusterPicture:
    picture = ClusterPicture(OPERATOR_NAMESPACE, settled=True)
    picture.namespace_changed("shop", ENABLED)
    picture.namespace_changed("other", {})
    picture.pod_changed(agent_pod("default", "node-1", "192.0.2.1", uid="agent-1"))
    picture.pod_changed(agent_pod("default", "node-2", "192.0.2.2", uid="agent-2"))
    return picture


def add(
    picture: ClusterPicture, name: str = "default", created: str = "2026-01-01T00:00:00Z", **kw: Any
):
    sink = RecordingSink()
    acceleration = picture.acceleration_changed(name, f"uid-{name}", created, spec(**kw), sink)
    return acceleration, sink


def test_pods_reach_their_own_nodes_agent(picture: ClusterPicture) -> None:
    picture.pod_changed(pod("a", "shop", node="node-1", ip="10.1.0.1"))
    picture.pod_changed(pod("b", "shop", node="node-2", ip="10.1.0.2"))
    picture.pod_changed(pod("c", "other", node="node-1", ip="10.1.0.3"))
    _, sink = add(picture)
    assert sink.sets == {"node-1": ["shop/a"], "node-2": ["shop/b"]}
    assert sink.endpoints == {
        "node-1": "https://192.0.2.1:9474",
        "node-2": "https://192.0.2.2:9474",
    }


def test_labelling_a_namespace_selects_its_pods_and_unlabelling_removes_them(picture) -> None:
    picture.pod_changed(pod("c", "other", node="node-1", ip="10.1.0.3"))
    _, sink = add(picture)
    assert sink.sets["node-1"] == []
    picture.namespace_changed("other", ENABLED)
    assert sink.sets["node-1"] == ["other/c"]
    picture.namespace_changed("other", {"meshaccel.io/accelerate": "disabled"})
    assert sink.sets["node-1"] == []


def test_pod_deleted_leaves_its_nodes_set(picture: ClusterPicture) -> None:
    a = pod("a", "shop", node="node-1", ip="10.1.0.1")
    picture.pod_changed(a)
    picture.pod_changed(pod("b", "shop", node="node-1", ip="10.1.0.2"))
    _, sink = add(picture)
    picture.pod_changed(a, deleted=True)
    assert sink.sets["node-1"] == ["shop/b"]


def test_an_irrelevant_pod_update_pushes_nothing(picture: ClusterPicture) -> None:
    a = pod("a", "shop", node="node-1", ip="10.1.0.1")
    picture.pod_changed(a)
    _, sink = add(picture)
    calls = sink.calls
    a["metadata"]["annotations"]["prometheus.io/scrape"] = "true"
    a["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    picture.pod_changed(a)
    assert sink.calls == calls


def test_pod_running_later_and_moving_ip(picture: ClusterPicture) -> None:
    _, sink = add(picture)
    pending = pod("a", "shop", node="node-1", ip=None, phase="Pending")
    picture.pod_changed(pending)
    assert sink.sets["node-1"] == []
    running = pod("a", "shop", node="node-1", ip="10.1.0.9", uid=pending["metadata"]["uid"])
    picture.pod_changed(running)
    assert sink.sets["node-1"] == ["shop/a"]


def test_spec_change_reselects(picture: ClusterPicture) -> None:
    picture.pod_changed(pod("a", "shop", node="node-1", ip="10.1.0.1", labels={"tier": "web"}))
    picture.pod_changed(pod("b", "shop", node="node-1", ip="10.1.0.2", labels={"tier": "db"}))
    acceleration, sink = add(picture)
    assert sink.sets["node-1"] == ["shop/a", "shop/b"]
    picture.acceleration_changed(
        "default",
        acceleration.uid,
        acceleration.created,
        spec(podSelector={"matchLabels": {"tier": "web"}}),
        sink,
    )
    assert sink.sets["node-1"] == ["shop/a"]


def test_agent_leaving_a_node_drops_it_and_its_pods(picture: ClusterPicture) -> None:
    picture.pod_changed(pod("a", "shop", node="node-2", ip="10.1.0.2"))
    acceleration, sink = add(picture)
    assert sink.sets["node-2"] == ["shop/a"]
    picture.pod_changed(agent_pod("default", "node-2", "192.0.2.2", uid="agent-2"), deleted=True)
    assert "node-2" not in sink.sets and "node-2" not in sink.endpoints
    assert acceleration.skipped_by_reason() == {"NoAgentOnNode": 1}


def test_agent_restarting_with_a_new_ip_moves_the_endpoint(picture: ClusterPicture) -> None:
    _, sink = add(picture)
    old = agent_pod("default", "node-1", "192.0.2.1", uid="agent-1")
    new = agent_pod("default", "node-1", "192.0.2.11", uid="agent-1b")
    picture.pod_changed(new)
    picture.pod_changed(old, deleted=True)
    assert sink.endpoints["node-1"] == "https://192.0.2.11:9474"


def test_a_pod_merely_labelled_like_an_agent_gets_no_sets(picture: ClusterPicture) -> None:
    """The token and pod sets go to the DaemonSet's pods in the operator's namespace only."""
    _, sink = add(picture)
    impostor = agent_pod("default", "node-3", "192.0.2.66", namespace="shop")
    picture.pod_changed(impostor)
    orphan = agent_pod("default", "node-4", "192.0.2.67")
    orphan["metadata"]["ownerReferences"] = []
    picture.pod_changed(orphan)
    assert set(sink.endpoints) == {"node-1", "node-2"}


def test_skipped_pods_are_counted_by_reason(picture: ClusterPicture) -> None:
    picture.pod_changed(pod("a", "shop", node="node-1", ip="10.1.0.1", sidecar=False))
    picture.pod_changed(
        pod(
            "b",
            "shop",
            node="node-1",
            ip="10.1.0.2",
            annotations={"meshaccel.io/accelerate": "false"},
        )
    )
    picture.pod_changed(pod("c", "other", node="node-1", ip="10.1.0.3"))
    acceleration, _ = add(picture)
    assert acceleration.skipped_by_reason() == {Verdict.NO_SIDECAR: 1, Verdict.OPTED_OUT: 1}


def test_an_ignored_annotation_is_a_warning_not_a_skip(
    picture: ClusterPicture, caplog: pytest.LogCaptureFixture
) -> None:
    """An invalid meshaccel.io/sk-msg-to-app leaves the pod accelerated (the selector decides),
    counted by reason and logged once; fixing or deleting the pod clears it."""
    a = pod("a", "shop", node="node-1", ip="10.1.0.1", annotations={TO_APP: "yes"})
    picture.pod_changed(a)
    picture.pod_changed(pod("b", "shop", node="node-1", ip="10.1.0.2"))
    with caplog.at_level(logging.WARNING, logger="meshaccel.operator.picture"):
        acceleration, sink = add(picture)
        picture.pod_changed(a)  # the same pod again: no second line
    uid = a["metadata"]["uid"]
    assert sink.sets["node-1"] == ["shop/a", "shop/b"]
    assert acceleration.skipped_by_reason() == {}
    assert acceleration.warned_by_reason() == {PodWarning.INVALID_ANNOTATION: 1}
    logged = [r.getMessage() for r in caplog.records if TO_APP in r.getMessage()]
    assert logged == [
        f'pod shop/a: {TO_APP}: \'yes\' is neither "true" nor "false": '
        "ignored, spec.datapath.skMsgToAppsSelector decides"
    ], logged
    assert not acceleration.per_node["node-1"][uid].options.sk_msg_to_app

    a["metadata"]["annotations"][TO_APP] = "true"
    picture.pod_changed(a)
    assert acceleration.warned_by_reason() == {}
    assert acceleration.per_node["node-1"][uid].options.sk_msg_to_app, "pushed with the option"

    a["metadata"]["annotations"][TO_APP] = "no"
    picture.pod_changed(a)
    assert acceleration.warned_by_reason() == {PodWarning.INVALID_ANNOTATION: 1}
    picture.pod_changed(a, deleted=True)
    assert acceleration.warned_by_reason() == {}


def test_the_apps_selector_reselects_on_a_spec_change(picture: ClusterPicture) -> None:
    picture.pod_changed(pod("a", "shop", node="node-1", ip="10.1.0.1", labels={"tier": "web"}))
    acceleration, sink = add(picture)
    (before,) = acceleration.per_node["node-1"].values()
    assert not before.options.sk_msg_to_app
    calls = sink.calls
    picture.acceleration_changed(
        "default",
        acceleration.uid,
        acceleration.created,
        spec(datapath={"skMsgToAppsSelector": {"matchLabels": {"tier": "web"}}}),
        sink,
    )
    (after,) = acceleration.per_node["node-1"].values()
    assert after.options.sk_msg_to_app and sink.calls > calls, "the new option is pushed"


def test_invalid_spec_on_a_new_resource_programs_nothing(picture: ClusterPicture) -> None:
    picture.pod_changed(pod("a", "shop", node="node-1", ip="10.1.0.1"))
    sink = RecordingSink()
    bad = spec(agent={"image": "example/agent:1"})
    acceleration = picture.acceleration_changed("default", "uid", "t", bad, sink)
    assert acceleration.problems and "no longer read" in acceleration.problems[0]
    assert not acceleration.active and sink.sets == {} and sink.endpoints == {}


def test_invalid_edit_keeps_the_last_good_spec_running(picture: ClusterPicture) -> None:
    picture.pod_changed(pod("a", "shop", node="node-1", ip="10.1.0.1"))
    acceleration, sink = add(picture)
    picture.acceleration_changed(
        "default",
        acceleration.uid,
        acceleration.created,
        spec(namespaceSelector={"matchExpressions": [{"key": "x", "operator": "In"}]}),
        sink,
    )
    assert acceleration.problems and acceleration.active
    assert sink.sets["node-1"] == ["shop/a"], "nothing half-applied"
    fixed = spec(namespaceSelector={"matchLabels": {"none": "x"}})
    picture.acceleration_changed("default", acceleration.uid, acceleration.created, fixed, sink)
    assert not acceleration.problems and sink.sets["node-1"] == []


def test_a_pod_both_claim_is_the_older_ones_and_the_younger_takes_over_later(picture) -> None:
    """Pod-level: the younger resource leaves the pod the older one claims (even where the
    older one has no agent) and keeps its other pods; it takes the pod once the older goes."""
    picture.pod_changed(pod("web", "shop", node="node-1", ip="10.1.0.1", labels={"tier": "web"}))
    picture.pod_changed(pod("db", "shop", node="node-1", ip="10.1.0.2", labels={"tier": "db"}))
    picture.pod_changed(agent_pod("second", "node-1", "192.0.2.1", uid="agent-second"))
    first, _ = add(picture, "first", podSelector={"matchLabels": {"tier": "web"}})
    second, second_sink = add(picture, "second", created="2026-01-02T00:00:00Z")
    assert second_sink.sets == {"node-1": ["shop/db"]}, "the rest of its pods are its own"
    assert first.held_by() == {}
    assert second.held_by() == {"first": ([], ["shop/web"])}
    assert second.skipped_by_reason() == {Verdict.POD_CLAIMED: 1}

    picture.acceleration_removed("first")
    assert second.held_by() == {} and second_sink.sets == {"node-1": ["shop/db", "shop/web"]}


def test_relabelling_one_node_moves_that_node_only(picture: ClusterPicture) -> None:
    """Issue 12, item 6: a node relabelled into an older resource's pool put the younger
    resource in Conflict everywhere. Now the older one keeps that node, the younger one's
    agent there gets an empty set, and its other nodes carry on; relabelled back, it returns."""
    picture.node_changed("node-1", {"pool-a": "yes"})
    picture.node_changed("node-2", {"pool-b": "yes"})
    picture.node_changed("node-3", {"pool-b": "yes"})
    for node, ip in (("node-2", "192.0.2.12"), ("node-3", "192.0.2.13")):
        picture.pod_changed(agent_pod("second", node, ip, uid=f"second-{node}"))
    picture.pod_changed(pod("b2", "shop", node="node-2", ip="10.1.0.2"))
    picture.pod_changed(pod("b3", "shop", node="node-3", ip="10.1.0.3"))
    first, _ = add(
        picture,
        "first",
        agent={"nodeSelector": {"pool-a": "yes"}},
        namespaceSelector={"matchLabels": {"team": "x"}},
    )
    second, sink = add(
        picture, "second", created="2026-02-01T00:00:00Z", agent={"nodeSelector": {"pool-b": "yes"}}
    )
    assert sink.sets == {"node-2": ["shop/b2"], "node-3": ["shop/b3"]}

    picture.node_changed("node-3", {"pool-a": "yes", "pool-b": "yes"})

    assert second.active
    assert sink.sets == {"node-2": ["shop/b2"], "node-3": []}, "only node-3 moved"
    assert first.held_by() == {} and first.nodes_kept == 2
    assert second.held_by() == {"first": (["node-3"], [])}
    assert second.skipped_by_reason() == {Verdict.NODE_CLAIMED: 1}
    assert second.nodes_kept == 1

    picture.node_changed("node-3", {"pool-b": "yes"})
    assert second.held_by() == {} and sink.sets["node-3"] == ["shop/b3"]


def test_the_older_resource_wins_by_creation_time_then_name(picture: ClusterPicture) -> None:
    picture.pod_changed(agent_pod("b", "node-1", "192.0.2.21", uid="agent-b"))
    picture.pod_changed(agent_pod("a", "node-1", "192.0.2.22", uid="agent-a"))
    picture.pod_changed(pod("web", "shop", node="node-1", ip="10.1.0.1"))
    b, b_sink = add(picture, "b", created="2026-01-01T00:00:00Z")
    _, a_sink = add(picture, "a", created="2026-01-01T00:00:00Z")  # same second: the name
    assert (a_sink.sets, b_sink.sets) == ({"node-1": ["shop/web"]}, {"node-1": []})
    assert b.held_by() == {"a": (["node-1"], ["shop/web"])}
    assert picture.owners["node-1"] == "a"


def test_nothing_is_judged_or_handed_out_before_the_picture_is_complete() -> None:
    """Issue 12, item 6: at start, resources met before the nodes were judged on the
    selectors alone ("any node") and the younger one was retired everywhere. An unsettled
    picture hands out nothing and judges nothing; the first census with nodes and resources
    settles it, and each node goes to the older resource that selects it."""
    picture = ClusterPicture(OPERATOR_NAMESPACE)
    picture.namespace_changed("shop", ENABLED)
    # Kopf's order: the younger resource first, the older one's handler not run yet, no node.
    picture.pod_changed(agent_pod("second", "node-1", "192.0.2.1", uid="second-1"))
    picture.pod_changed(agent_pod("second", "node-2", "192.0.2.2", uid="second-2"))
    picture.pod_changed(pod("a", "shop", node="node-1", ip="10.1.0.1", labels={"team": "a"}))
    picture.pod_changed(pod("b", "shop", node="node-2", ip="10.1.0.2", labels={"team": "b"}))
    second, sink = add(picture, "second", created="2026-02-01T00:00:00Z")
    assert sink.sets == {} and second.held_by() == {} and not picture.settled

    older = spec(agent={"nodeSelector": {"pool": "a"}}, podSelector={"matchLabels": {"team": "a"}})
    census = picture.begin_census()
    picture.end_census(
        census,
        pods=set(picture.pods) | set(picture.agents),
        namespaces={"shop"},
        nodes={"node-1", "node-2"},
        labels={"node-1": {"pool": "a"}, "node-2": {"pool": "b"}},
        accelerations=[
            ListedAcceleration("first", "uid-first", "2026-01-01T00:00:00Z", older),
            ListedAcceleration("second", "uid-second", "2026-02-01T00:00:00Z", spec()),
            ListedAcceleration("broken", "uid-broken", "2025-01-01T00:00:00Z", None),
        ],
    )

    assert picture.settled and "broken" not in picture.accelerations
    first = picture.accelerations["first"]
    assert first.listed, "known from the list: it claims, and programs nothing yet"
    assert second.held_by() == {"first": (["node-1"], ["shop/a"])}
    assert sink.sets == {"node-1": [], "node-2": ["shop/b"]}

    # Its handler runs: the sets go to its sink.
    first_sink = RecordingSink()
    picture.acceleration_changed("first", "uid-first", "2026-01-01T00:00:00Z", older, first_sink)
    assert not first.listed and first_sink.sets == {}, "no agent of its own yet"
    picture.pod_changed(agent_pod("first", "node-1", "192.0.2.11", uid="first-1"))
    assert first_sink.sets == {"node-1": ["shop/a"]}


def test_a_listed_resource_the_next_list_lacks_is_dropped() -> None:
    picture = ClusterPicture(OPERATOR_NAMESPACE)
    listed = ListedAcceleration("gone", "uid-gone", "2026-01-01T00:00:00Z", spec())
    for accelerations, kept in (([listed], True), ([], False)):
        census = picture.begin_census()
        dropped = picture.end_census(
            census, pods=set(), namespaces=set(), nodes=set(), accelerations=accelerations
        )
        assert ("gone" in picture.accelerations) == kept
    assert dropped.accelerations == ("gone",)


def test_every_census_rechecks_every_conflict(picture: ClusterPicture) -> None:
    """The periodic re-check the picture promises: every census (each resync) judges again."""
    rechecks = picture.rechecks
    census = picture.begin_census()
    picture.end_census(
        census,
        pods=set(picture.pods) | set(picture.agents),
        namespaces={"shop", "other"},
        nodes=set(),
    )
    assert picture.rechecks == rechecks + 1


def test_one_pod_event_publishes_one_nodes_set_once(picture: ClusterPicture) -> None:
    """Among 2,000 pods, a new pod re-publishes its own node's set and nothing else."""
    _, sink = add(picture)
    for i in range(2000):
        picture.pod_changed(
            pod(f"p{i}", "shop", node=f"node-{1 + i % 2}", ip=f"10.2.{i // 250}.{i % 250 + 1}")
        )
    calls = sink.calls
    picture.pod_changed(pod("late", "shop", node="node-1", ip="10.3.0.1"))
    assert sink.calls == calls + 1
    assert len(sink.sets["node-1"]) == 1001 and len(sink.sets["node-2"]) == 1000


def test_two_running_pods_with_one_ip_are_both_left_out(picture: ClusterPicture) -> None:
    """The agent refuses a set with a repeated IP whole: the picture never sends one."""
    _, sink = add(picture)
    picture.pod_changed(pod("old", "shop", node="node-1", ip="10.1.0.7"))
    picture.pod_changed(pod("new", "shop", node="node-1", ip="10.1.0.7"))
    picture.pod_changed(pod("other", "shop", node="node-1", ip="10.1.0.8"))
    assert sink.sets["node-1"] == ["shop/other"]


# -- a full list: what the watches missed ---------------------------------------------------------


@pytest.mark.parametrize(
    ("during", "kept", "reason"),
    [
        (None, False, "known before the list, missing from it: deleted while unwatched"),
        ("modified", True, "an event touched it meanwhile: newer than the list, kept"),
        ("deleted", False, "its DELETED event came meanwhile: gone either way"),
    ],
)
def test_a_census_drops_pods_the_list_no_longer_has(
    picture: ClusterPicture, during: str | None, kept: bool, reason: str
) -> None:
    web = pod("web", "shop", node="node-1", ip="10.1.0.1")
    picture.pod_changed(web)
    picture.pod_changed(pod("api", "shop", node="node-1", ip="10.1.0.2", uid="uid-api"))
    _, sink = add(picture)
    census = picture.begin_census()
    listed = {"uid-api", "agent-1", "agent-2"}  # the list: web is gone
    if during == "modified":
        web["metadata"]["labels"] = {"tier": "web"}
        picture.pod_changed(web)
    elif during == "deleted":
        picture.pod_changed(web, deleted=True)

    dropped = picture.end_census(census, pods=listed, namespaces={"shop", "other"}, nodes=set())

    expected = ["shop/api", "shop/web"] if kept else ["shop/api"]
    assert sink.sets["node-1"] == expected, reason
    assert dropped.pods == (() if kept or during == "deleted" else ("shop/web",)), reason
    assert not picture.begin_census().touched, "the census is closed: events are not recorded"


def test_a_census_keeps_what_appeared_after_it_began(picture: ClusterPicture) -> None:
    """A pod created after the list was taken is not in it, and must stay."""
    _, sink = add(picture)
    census = picture.begin_census()
    picture.pod_changed(pod("late", "shop", node="node-1", ip="10.1.0.7"))
    dropped = picture.end_census(
        census, pods={"agent-1", "agent-2"}, namespaces={"shop", "other"}, nodes=set()
    )
    assert not dropped and sink.sets["node-1"] == ["shop/late"]


def test_a_census_drops_agents_namespaces_and_nodes(picture: ClusterPicture) -> None:
    picture.node_changed("node-1", {})
    picture.node_changed("node-9", {})
    picture.pod_changed(pod("a", "shop", node="node-2", ip="10.1.0.1", uid="uid-a"))
    _, sink = add(picture)
    census = picture.begin_census()
    picture.namespace_changed("fresh", {})  # appeared after the list began: kept

    dropped = picture.end_census(
        census, pods={"uid-a", "agent-1"}, namespaces={"other"}, nodes={"node-1"}
    )

    assert dropped.pods == ("agent default on node-2",)
    assert (dropped.namespaces, dropped.nodes) == (("shop",), ("node-9",))
    assert "node-2" not in sink.endpoints and "node-2" not in sink.sets  # its agent is gone
    assert set(picture.namespaces) == {"other", "fresh"} and set(picture.nodes) == {"node-1"}


def test_an_abandoned_census_drops_nothing(picture: ClusterPicture) -> None:
    picture.pod_changed(pod("a", "shop", node="node-1", ip="10.1.0.1"))
    _, sink = add(picture)
    census = picture.begin_census()
    picture.abandon_census(census)
    picture.abandon_census(census)  # twice is fine
    assert sink.sets["node-1"] == ["shop/a"]


# -- budgets: what a node's maps hold ------------------------------------------------------------

SMALL = {"maxPods": 4, "maxPodPorts": 128, "maxPodCidrs": 8}  # shares: 32 ports, 2 CIDRs
EXCLUDE_PORTS = "traffic.sidecar.istio.io/excludeOutboundPorts"


def created(obj: dict[str, Any], at: str) -> dict[str, Any]:
    obj["metadata"]["creationTimestamp"] = at
    return obj


def fits(sets: dict[str, list[PodSpec]], budget: Budget) -> bool:
    for pods in sets.values():
        needed = [sum(usage(p)[i] for p in pods) for i in range(len(budget.capacity))]
        if len(pods) > budget.max_pods or any(
            n > c for n, c in zip(needed, budget.capacity, strict=True)
        ):
            return False
    return True


class KeepingSink(RecordingSink):
    """A RecordingSink that keeps the pods themselves too."""

    def __init__(self) -> None:
        super().__init__()
        self.pods: dict[str, list[PodSpec]] = {}

    def set_pods(self, node: str, pods: Sequence[PodSpec]) -> None:
        super().set_pods(node, pods)
        self.pods[node] = list(pods)


def test_pods_that_overflow_the_maps_are_left_out_never_the_node(picture: ClusterPicture) -> None:
    """Issue 12, item 7: pods whose annotations exclude many ports overflowed the node's
    pod_ports map, and the agent refused the whole node's set. Each pod now has a budget:
    those that do not fit are left out (OverBudget), the rest of the node's set goes out, and
    the pods within their share (the plain meshed pods) always fit."""
    # An Istio pod takes 13 pod_ports entries (the mesh's own ports); each hog 13 + 50. Oldest
    # first, two hogs would leave the plain pod no room.
    hogs = [
        created(
            pod(
                f"hog{i}", "shop", ip=f"10.1.0.{10 + i}", annotations={EXCLUDE_PORTS: "20000-20049"}
            ),
            f"2026-01-01T00:00:0{i}Z",
        )
        for i in range(3)
    ]
    for hog in hogs:
        picture.pod_changed(hog)
    picture.pod_changed(
        created(pod("web", "shop", node="node-1", ip="10.1.0.1"), "2026-01-02T00:00:00Z")
    )
    sink = KeepingSink()
    small = spec(datapath=SMALL)
    acceleration = picture.acceleration_changed(
        "default", "uid-default", "2026-01-01T00:00:00Z", small, sink
    )
    assert fits(sink.pods, Budget.of(small)), "never a set the agent refuses"
    assert sink.sets["node-1"] == ["shop/hog0", "shop/web"], "the plain pod first, then the oldest"
    assert acceleration.skipped_by_reason() == {Verdict.OVER_BUDGET: 2}
    assert [(item.pod, item.reason) for item in acceleration.left_out()] == [
        ("shop/hog1", "pod_ports needs 63, 52 left on the node"),
        ("shop/hog2", "pod_ports needs 63, 52 left on the node"),
    ]
    assert acceleration.pods_selected() == 2

    # The oldest hog goes: the next one takes its room.
    picture.pod_changed(hogs[0], deleted=True)
    assert sink.sets["node-1"] == ["shop/hog1", "shop/web"]
    assert [item.pod for item in acceleration.left_out()] == ["shop/hog2"]


def test_a_pod_over_its_limit_is_left_out_wherever_there_is_room(picture: ClusterPicture) -> None:
    """A pod may take 8 shares beyond what every pod of the resource needs: 0 + 8 x 4
    excluded CIDRs here, though the node's map has room for 64."""
    roomy = {"maxPods": 16, "maxPodPorts": 4096, "maxPodCidrs": 64}  # shares: 256, 4
    picture.pod_changed(
        pod(
            "wide",
            "shop",
            node="node-1",
            ip="10.1.0.1",
            annotations={
                "traffic.sidecar.istio.io/excludeOutboundIPRanges": ",".join(
                    f"10.{i}.0.0/16" for i in range(40)
                )
            },
        )
    )
    acceleration, sink = add(picture, datapath=roomy)
    assert sink.sets["node-1"] == []
    assert [item.reason for item in acceleration.left_out()] == [
        "outbound_excluded_cidrs needs 40, a pod may take 32"
    ]


def test_a_pod_with_an_unreadable_annotation_is_kept_with_what_is_wrong(
    picture: ClusterPicture,
) -> None:
    """Such a pod is left out for a reason nobody chose: the status lists it with the detail,
    until the annotation is fixed or the pod goes."""
    bad = pod(
        "a",
        "shop",
        node="node-1",
        ip="10.1.0.1",
        annotations={"traffic.sidecar.istio.io/excludeOutboundPorts": "http"},
    )
    picture.pod_changed(bad)
    picture.pod_changed(pod("b", "shop", node="node-1", ip="10.1.0.2", sidecar=False))
    acceleration, sink = add(picture)
    uid = bad["metadata"]["uid"]
    assert sink.sets["node-1"] == []
    assert acceleration.skipped_by_reason() == {
        Verdict.INVALID_ANNOTATION: 1,
        Verdict.NO_SIDECAR: 1,
    }
    assert acceleration.troubled == {
        uid: PodTrouble(
            "shop",
            "a",
            "node-1",
            Verdict.INVALID_ANNOTATION,
            "traffic.sidecar.istio.io/excludeOutboundPorts: 'http' is not a port",
        )
    }, "only the problem is kept: a pod without a sidecar is nobody's problem"

    bad["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeOutboundPorts"] = "8080"
    picture.pod_changed(bad)
    assert acceleration.troubled == {} and sink.sets["node-1"] == ["shop/a"]
    bad["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeOutboundPorts"] = "x"
    picture.pod_changed(bad)
    assert uid in acceleration.troubled
    picture.pod_changed(bad, deleted=True)
    assert acceleration.troubled == {}


# -- two pods claiming one address ------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "first", "second"),
    [
        ("one IPv4 address", ("10.1.0.7",), ("10.1.0.7",)),
        ("one IPv6 address", ("fd00::7",), ("fd00::7",)),
        (
            "the IPv6 address of a dual-stack pod, another IPv4 address as podIP",
            ("10.1.0.7", "fd00::7"),
            ("10.1.0.8", "fd00::7"),
        ),
        (
            "a dual-stack pod's second address, an IPv6-only pod's only",
            ("10.1.0.7", "fd00::7"),
            ("fd00::7",),
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_pods_that_share_an_address_are_both_left_out_until_one_goes(
    picture: ClusterPicture, reason: str, first: tuple[str, ...], second: tuple[str, ...]
) -> None:
    """Two running pods with one address (a deletion not seen yet): the agent would refuse the
    set whole, so both are left out, and the other pods of the node still go."""
    _, sink = add(picture)
    old = pod("old", "shop", node="node-1", ip=first[0], ips=first)
    picture.pod_changed(old)
    picture.pod_changed(pod("new", "shop", node="node-1", ip=second[0], ips=second))
    picture.pod_changed(
        pod("other", "shop", node="node-1", ip="10.1.0.99", ips=("10.1.0.99", "fd00::99"))
    )
    assert sink.sets["node-1"] == ["shop/other"], reason
    picture.pod_changed(old, deleted=True)
    assert sink.sets["node-1"] == ["shop/new", "shop/other"], reason


def test_pods_of_one_node_with_distinct_addresses_of_both_families_all_go(
    picture: ClusterPicture,
) -> None:
    _, sink = add(picture)
    picture.pod_changed(pod("v4", "shop", node="node-1", ip="10.1.0.7"))
    picture.pod_changed(pod("v6", "shop", node="node-1", ip="fd00::7"))
    picture.pod_changed(
        pod("dual", "shop", node="node-1", ip="10.1.0.8", ips=("10.1.0.8", "fd00::8"))
    )
    assert sink.sets["node-1"] == ["shop/dual", "shop/v4", "shop/v6"]
