"""The operator's picture of the cluster, and each MeshAcceleration's per-node pod sets.

:class:`ClusterPicture` is plain, synchronous and free of Kopf and I/O: handlers feed it
namespaces, nodes, pods and MeshAccelerations as they change; it re-selects only what a change
can affect and hands each node's complete new set to the resource's :class:`PodSink` (the
:class:`~.pusher.Pusher`) when, and only when, that set changed, cut to the node's maps
(:mod:`.budget`).

It hands out no set and judges no conflict until it is *settled* by a first census of the nodes
and resources (:mod:`.resync`). Conflicts go per node and per pod to the older resource
(docs/operator.md, "Conflicts"), judged on every change that can move them and again after
every census. Between :meth:`ClusterPicture.begin_census` and :meth:`ClusterPicture.end_census`
it drops what the list lacks and no event touched (deletions missed in a watch gap).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshaccel.contract.api import PodSpec
from meshaccel.operator.budget import Budget, LeftOut
from meshaccel.operator.checks import spec_problems
from meshaccel.operator.models import MeshAccelerationSpec
from meshaccel.operator.selection import (
    BEFORE_CLAIMS,
    PodFacts,
    PodWarning,
    Selection,
    Verdict,
    has_sidecar,
    matches_selectors,
    select,
)

log = logging.getLogger("meshaccel.operator.picture")

ACCELERATION_LABEL = "meshaccel.io/acceleration"
COMPONENT_LABEL = "app.kubernetes.io/component"
AGENT_COMPONENT = "agent"

# Verdicts that are not counted as "matched, not accelerated".
_NOT_COUNTED = frozenset(
    {Verdict.NAMESPACE_NOT_SELECTED, Verdict.POD_NOT_SELECTED, Verdict.SELECTED}
)
# Verdicts of select() that nobody chose (models.PROBLEM_REASONS): the status lists such pods.
_PROBLEMS = frozenset({Verdict.INVALID_ANNOTATION})


def agent_url(ip: str, port: int) -> str:
    """The base URL of an agent's API (agents serve on their node's address)."""
    host = f"[{ip}]" if ":" in ip else ip
    return f"https://{host}:{port}"


class PodSink(Protocol):
    """Where a resource's per-node sets go (the :class:`~.pusher.Pusher`)."""

    def set_endpoint(self, node: str, url: str | None) -> None: ...

    def set_pods(self, node: str, pods: Sequence[PodSpec]) -> None: ...

    def drop_node(self, node: str) -> None: ...


class _Withheld:
    """The sink of a resource a census listed and no handler has fed yet: it takes nothing."""

    def set_endpoint(self, node: str, url: str | None) -> None:
        pass

    def set_pods(self, node: str, pods: Sequence[PodSpec]) -> None:
        pass

    def drop_node(self, node: str) -> None:
        pass


WITHHELD: PodSink = _Withheld()


@dataclass(frozen=True, slots=True)
class PodTrouble:
    """A pod the selectors match, left out for a reason nobody chose, and what is wrong."""

    namespace: str
    name: str
    node: str | None
    reason: Verdict
    message: str


@dataclass
class Acceleration:
    """One MeshAcceleration as the picture tracks it.

    ``spec`` is the last spec without problems: a resource edited into nonsense keeps
    running as it was (nothing half-applied) and reports ``problems`` until fixed; a new
    resource with problems has no spec and programs nothing.
    """

    name: str
    uid: str
    created: str  # metadata.creationTimestamp: RFC 3339 in UTC sorts as time
    sink: PodSink
    spec: MeshAccelerationSpec | None = None
    budget: Budget | None = None  # of the spec
    problems: list[str] = field(default_factory=list)
    agent_ips: dict[str, str] = field(default_factory=dict)  # node -> its agent's IP
    placement: dict[str, str] = field(default_factory=dict)  # pod uid -> node
    per_node: dict[str, dict[str, PodSpec]] = field(default_factory=dict)
    skipped: dict[str, Verdict] = field(default_factory=dict)  # matched, not accelerated
    warned: dict[str, PodWarning] = field(default_factory=dict)  # accelerated, with a warning
    troubled: dict[str, PodTrouble] = field(default_factory=dict)  # skipped, for a problem
    # What older resources keep of what this one selects: node -> the older resource, and pod
    # uid -> (the older resource, namespace/name).
    nodes_held: dict[str, str] = field(default_factory=dict)
    pods_held: dict[str, tuple[str, str]] = field(default_factory=dict)
    nodes_kept: int = 0  # nodes this resource selects that no older one keeps
    # Placed pods the node's maps do not take: node -> pod uid -> why (see .budget).
    over_budget: dict[str, dict[str, LeftOut]] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        """It has a valid spec: it selects pods and claims nodes (a conflict leaves it active
        on what no older resource keeps)."""
        return self.spec is not None

    @property
    def listed(self) -> bool:
        """Known from a census only: no handler has given it a sink yet."""
        return self.sink is WITHHELD

    @property
    def seniority(self) -> tuple[str, str]:
        return (self.created, self.name)

    def endpoint(self, node: str) -> str | None:
        ip = self.agent_ips.get(node)
        if ip is None or self.spec is None:
            return None
        return agent_url(ip, self.spec.agent.port)

    def pods_selected(self) -> int:
        """Pods its agents are sent."""
        return len(self.placement) - self.pods_over_budget()

    def pods_over_budget(self) -> int:
        return sum(len(pods) for pods in self.over_budget.values())

    def left_out(self) -> list[LeftOut]:
        """The pods over budget, by node and name."""
        return sorted(
            (item for pods in self.over_budget.values() for item in pods.values()),
            key=lambda item: (item.node, item.pod),
        )

    def skipped_by_reason(self) -> dict[str, int]:
        counted = Counter(str(verdict) for verdict in self.skipped.values())
        if over := self.pods_over_budget():
            counted[str(Verdict.OVER_BUDGET)] = over
        return dict(counted)

    def warned_by_reason(self) -> dict[str, int]:
        return dict(Counter(str(warning) for warning in self.warned.values()))

    def held_by(self) -> dict[str, tuple[list[str], list[str]]]:
        """Older resource -> (the nodes, the pods as namespace/name) it keeps of this one's;
        resources and names sorted."""
        held: dict[str, tuple[list[str], list[str]]] = {}
        for node, elder in self.nodes_held.items():
            held.setdefault(elder, ([], []))[0].append(node)
        for elder, pod in self.pods_held.values():
            held.setdefault(elder, ([], []))[1].append(pod)
        for nodes, pods in held.values():
            nodes.sort()
            pods.sort()
        return dict(sorted(held.items()))


@dataclass(frozen=True)
class ListedAcceleration:
    """A MeshAcceleration as a census lists it; ``spec`` None when it does not parse (its
    handler refuses it too: it claims nothing)."""

    name: str
    uid: str
    created: str
    spec: MeshAccelerationSpec | None


@dataclass(frozen=True, slots=True)
class AgentPod:
    acceleration: str
    node: str
    ip: str


@dataclass(eq=False)
class Census:
    """What the picture knew when a full list began (:meth:`ClusterPicture.begin_census`), and
    which of those objects events touched since (an event is at least as new as the list)."""

    pods: frozenset[str]  # uids, agent pods included
    namespaces: frozenset[str]
    nodes: frozenset[str]
    touched: set[tuple[str, str]] = field(default_factory=set)  # (kind, uid or name)


@dataclass(frozen=True)
class Dropped:
    """What a census dropped: pods as ``namespace/name`` (agents as ``agent <resource> on
    <node>``), namespaces, nodes and listed-only MeshAccelerations by name."""

    pods: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()
    accelerations: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.pods or self.namespaces or self.nodes or self.accelerations)


class ClusterPicture:
    def __init__(self, namespace: str, *, settled: bool = False) -> None:
        self.namespace = namespace  # where the agents run (the operator's namespace)
        self.namespaces: dict[str, dict[str, str]] = {}
        self.nodes: dict[str, dict[str, str]] = {}
        self.pods: dict[str, PodFacts] = {}
        self.pods_by_namespace: defaultdict[str, set[str]] = defaultdict(set)
        self.pods_by_node: defaultdict[str, set[str]] = defaultdict(set)
        self.agents: dict[str, AgentPod] = {}  # agent pod uid -> where it serves
        self.accelerations: dict[str, Acceleration] = {}
        self.owners: dict[str, str] = {}  # node -> the resource that keeps it (settled only)
        # settled: the picture is complete (see the module); rechecks: full re-judgements.
        self.settled = settled
        self.rechecks = 0
        self._ranked: list[Acceleration] = []  # self.accelerations, the oldest first
        self._censuses: list[Census] = []  # open ones (a resync's list is on its way)

    # -- cluster objects --------------------------------------------------------------------

    def namespace_changed(self, name: str, labels: Mapping[str, str] | None) -> None:
        """A namespace was added, relabelled (``labels``) or deleted (``None``)."""
        self._touch("namespace", name)
        before = self.namespaces.get(name)
        if labels is None:
            self.namespaces.pop(name, None)
        else:
            self.namespaces[name] = dict(labels)
        if before == self.namespaces.get(name):
            return
        for uid in list(self.pods_by_namespace.get(name, ())):
            self._reselect_pod(uid)

    def node_changed(self, name: str, labels: Mapping[str, str] | None) -> None:
        self._touch("node", name)
        before = self.nodes.get(name)
        if labels is None:
            self.nodes.pop(name, None)
        else:
            self.nodes[name] = dict(labels)
        if before != self.nodes.get(name):
            self._rejudge_node(name)

    def pod_changed(self, pod: Mapping[str, Any], *, deleted: bool = False) -> None:
        """Any pod event: application pods and this operator's agent pods alike."""
        facts = PodFacts.from_object(pod)
        if not facts.uid:
            return
        self._touch("pod", facts.uid)
        if self._is_agent(pod):
            self._agent_changed(facts, pod, deleted=deleted)
            return
        if deleted:
            self._forget_pod(facts.uid)
            return
        before = self.pods.get(facts.uid)
        if before == facts:
            return  # a status or metadata change that selection does not read
        if before is not None:
            self._unindex(before)
        self.pods[facts.uid] = facts
        self.pods_by_namespace[facts.namespace].add(facts.uid)
        if facts.node:
            self.pods_by_node[facts.node].add(facts.uid)
        self._reselect_pod(facts.uid)

    def knows_pod(self, uid: str) -> bool:
        return uid in self.pods or uid in self.agents

    # -- what a full list found ---------------------------------------------------------------

    def begin_census(self) -> Census:
        """Before a full list is requested: what the picture knows now. End it with
        :meth:`end_census` or :meth:`abandon_census`."""
        census = Census(
            pods=frozenset(self.pods) | frozenset(self.agents),
            namespaces=frozenset(self.namespaces),
            nodes=frozenset(self.nodes),
        )
        self._censuses.append(census)
        return census

    def abandon_census(self, census: Census) -> None:
        with contextlib.suppress(ValueError):
            self._censuses.remove(census)

    def end_census(
        self,
        census: Census,
        *,
        pods: AbstractSet[str],
        namespaces: AbstractSet[str],
        nodes: AbstractSet[str],
        labels: Mapping[str, Mapping[str, str]] | None = None,
        accelerations: Sequence[ListedAcceleration] | None = None,
    ) -> Dropped:
        """The list came back (``pods`` by uid, ``namespaces`` and ``nodes`` by name): drop
        what the picture knew at :meth:`begin_census`, the list lacks and no event touched
        since. (A pod uid never comes back; a name may, and then its event touches it.)

        ``labels`` (node -> labels) and ``accelerations``, when listed, are taken where no
        event touched them since; with ``accelerations`` the picture is complete and the
        picture settles. Conflicts are then judged all over again.
        """
        self.abandon_census(census)
        gone_pods: list[str] = []
        for uid in sorted(census.pods - pods):
            if ("pod", uid) in census.touched:
                continue
            agent = self.agents.get(uid)
            facts = self.pods.get(uid)
            if agent is not None:
                gone_pods.append(f"agent {agent.acceleration} on {agent.node}")
                self._forget_agent(uid)
            elif facts is not None:
                gone_pods.append(f"{facts.namespace}/{facts.name}")
                self._forget_pod(uid)
        gone_namespaces = [
            name
            for name in sorted(census.namespaces - namespaces)
            if ("namespace", name) not in census.touched and name in self.namespaces
        ]
        for name in gone_namespaces:
            self.namespace_changed(name, None)
        gone_nodes = [
            name
            for name in sorted(census.nodes - nodes)
            if ("node", name) not in census.touched and name in self.nodes
        ]
        for name in gone_nodes:
            self.node_changed(name, None)
        for name, listed_labels in sorted((labels or {}).items()):
            if ("node", name) not in census.touched and self.nodes.get(name) != listed_labels:
                self.node_changed(name, listed_labels)
        gone_accelerations: list[str] = []
        if accelerations is not None:
            gone_accelerations = self._take_listed(census, accelerations)
            self.settle()
        else:
            self.recheck_conflicts()
        return Dropped(
            tuple(gone_pods), tuple(gone_namespaces), tuple(gone_nodes), tuple(gone_accelerations)
        )

    def _take_listed(
        self, census: Census, accelerations: Sequence[ListedAcceleration]
    ) -> list[str]:
        """Listed resources no handler fed yet join as listed; listed-only ones the list lacks
        go. Returns those that went. (Kopf's handlers see every change of a resource they
        fed: the list is not needed for those.)"""
        listed = {item.name: item for item in accelerations if item.spec is not None}
        gone = sorted(
            name
            for name, acceleration in self.accelerations.items()
            if acceleration.listed
            and name not in listed
            and ("acceleration", name) not in census.touched
        )
        for name in gone:
            self.acceleration_removed(name)
        for name, item in sorted(listed.items()):
            current = self.accelerations.get(name)
            if ("acceleration", name) in census.touched or (current and not current.listed):
                continue
            assert item.spec is not None
            self.acceleration_changed(name, item.uid, item.created, item.spec, WITHHELD)
        return gone

    def _touch(self, kind: str, key: str) -> None:
        for census in self._censuses:
            census.touched.add((kind, key))

    # -- MeshAccelerations ------------------------------------------------------------------

    def acceleration_changed(
        self, name: str, uid: str, created: str, spec: MeshAccelerationSpec, sink: PodSink
    ) -> Acceleration:
        """A MeshAcceleration was created or its spec changed: re-select everything for it,
        and for the resources younger than it (what it claims may have changed). A new
        ``sink`` (a listed resource's handler ran) receives every node's set afresh."""
        if sink is not WITHHELD:
            self._touch("acceleration", name)
        current = self.accelerations.get(name)
        if current is not None and current.uid != uid:
            self.acceleration_removed(name)  # deleted and re-created under the same name
            current = None
        if current is None:
            current = Acceleration(name=name, uid=uid, created=created, sink=sink)
            self.accelerations[name] = current
            self._ranked = sorted(self.accelerations.values(), key=lambda a: a.seniority)
            for agent in self.agents.values():
                if agent.acceleration == name:
                    current.agent_ips[agent.node] = agent.ip
        elif current.sink is not sink and sink is not WITHHELD:
            self.replace_sink(current, sink)
        current.problems = spec_problems(name, spec)
        if current.problems or current.spec == spec:
            return current
        current.spec = spec
        current.budget = Budget.of(spec)
        self._standing_changed(current)
        return current

    def acceleration_removed(self, name: str) -> Acceleration | None:
        removed = self.accelerations.pop(name, None)
        if removed is not None:
            self._touch("acceleration", name)
            self._ranked = [a for a in self._ranked if a is not removed]
            self._standing_changed(removed)  # the younger ones may take over
        return removed

    def replace_sink(self, acceleration: Acceleration, sink: PodSink) -> None:
        """Hand a resource's sets to a new sink, which receives every node's set afresh."""
        acceleration.sink = sink
        self._reselect_all(acceleration)

    def settle(self) -> None:
        """The picture is complete: judge conflicts, and hand every set to its sink."""
        if not self.settled:
            self.settled = True
            log.info(
                "the picture is complete: conflicts judged, sets handed out",
                extra={"event": "settled", "accelerations": len(self.accelerations)},
            )
        self.recheck_conflicts()

    def recheck_conflicts(self) -> None:
        """Judge every node and re-select every resource's pods (after every census: the
        periodic backstop). Sets that did not change are handed out again: sinks ignore them."""
        if not self.settled:
            return
        self.rechecks += 1
        for node in self._known_nodes():
            self._judge_node(node)
        for acceleration in self._ranked:
            self._reselect_all(acceleration)

    # -- conflicts --------------------------------------------------------------------------

    def _standing_changed(self, changed: Acceleration) -> None:
        """``changed`` came, went or changed its spec: what it claims moved. Re-judge every
        node, and re-select it (if still there) and every resource younger than it."""
        if not self.settled:  # nothing is judged yet: only its own pods changed
            if changed in self._ranked:
                self._reselect_all(changed)
            return
        for node in self._known_nodes():
            self._judge_node(node)
        for acceleration in self._ranked:
            if acceleration is changed or acceleration.seniority > changed.seniority:
                self._reselect_all(acceleration)

    def _known_nodes(self) -> set[str]:
        return set(self.nodes) | {agent.node for agent in self.agents.values()}

    def _selects_node(self, acceleration: Acceleration, node: str) -> bool:
        spec = acceleration.spec
        return spec is not None and _node_matches(
            self.nodes.get(node), spec.agent.nodeSelector, node in acceleration.agent_ips
        )

    def _judge_node(self, node: str) -> set[str]:
        """Who keeps ``node``: the oldest resource whose agents select it. Returns the
        resources whose standing on it changed (kept by another now, or no longer)."""
        selecting = [a for a in self._ranked if self._selects_node(a, node)]
        owner = selecting[0] if selecting else None
        before = self.owners.get(node)
        if before != (owner.name if owner else None):
            if before is not None and before in self.accelerations:
                self.accelerations[before].nodes_kept -= 1
            if owner is None:
                self.owners.pop(node, None)
            else:
                self.owners[node] = owner.name
                owner.nodes_kept += 1
        changed: set[str] = set()
        younger = {a.name for a in selecting[1:]}
        for acceleration in self._ranked:
            holder = owner.name if owner is not None and acceleration.name in younger else None
            if acceleration.nodes_held.get(node) == holder:
                continue
            if holder is None:
                del acceleration.nodes_held[node]
            else:
                acceleration.nodes_held[node] = holder
            changed.add(acceleration.name)
        return changed

    def _rejudge_node(self, node: str) -> None:
        """A node's labels or agents changed: re-select its pods for those whose standing on
        it changed."""
        if not self.settled:
            return
        for name in self._judge_node(node):
            acceleration = self.accelerations[name]
            for uid in list(self.pods_by_node.get(node, ())):
                self._reselect_for(acceleration, uid, publish=False)
            self._publish(acceleration, node)

    def _elder_claiming(self, acceleration: Acceleration, facts: PodFacts) -> Acceleration | None:
        """The oldest resource older than ``acceleration`` whose selectors claim the pod."""
        labels = self.namespaces.get(facts.namespace)
        for elder in self._ranked:
            if elder is acceleration:
                return None
            spec = elder.spec
            if (
                spec is not None
                and matches_selectors(facts, labels, spec) is None
                and has_sidecar(facts, spec.mode)
            ):
                return elder
        return None

    def _judged(
        self, acceleration: Acceleration, facts: PodFacts, selection: Selection
    ) -> Selection:
        """``selection`` as other resources' claims leave it (settled only)."""
        if not self.settled or selection.verdict in BEFORE_CLAIMS:
            return selection
        elder = self._elder_claiming(acceleration, facts)
        if elder is not None:
            acceleration.pods_held[facts.uid] = (elder.name, f"{facts.namespace}/{facts.name}")
            return Selection(Verdict.POD_CLAIMED, detail=f"kept by {elder.name!r}")
        holder = acceleration.nodes_held.get(facts.node) if facts.node else None
        if holder is not None:
            return Selection(Verdict.NODE_CLAIMED, detail=f"node {facts.node} kept by {holder!r}")
        return selection

    # -- internals ---------------------------------------------------------------------------

    def _is_agent(self, pod: Mapping[str, Any]) -> bool:
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        owners = meta.get("ownerReferences") or ()
        return (
            meta.get("namespace") == self.namespace
            and labels.get(COMPONENT_LABEL) == AGENT_COMPONENT
            and ACCELERATION_LABEL in labels
            # Only pods of a DaemonSet get the token and the pod sets: not any pod labelled so.
            and any(owner.get("kind") == "DaemonSet" for owner in owners)
        )

    def _agent_changed(self, facts: PodFacts, pod: Mapping[str, Any], *, deleted: bool) -> None:
        name = (pod["metadata"].get("labels") or {})[ACCELERATION_LABEL]
        before = self.agents.pop(facts.uid, None)
        if not deleted and facts.running and facts.ip and facts.node:
            self.agents[facts.uid] = AgentPod(name, facts.node, facts.ip)
        self._agent_moved(name, before, self.agents.get(facts.uid))

    def _forget_agent(self, uid: str) -> None:
        before = self.agents.pop(uid, None)
        if before is not None:
            self._agent_moved(before.acceleration, before, None)

    def _agent_moved(self, name: str, before: AgentPod | None, after: AgentPod | None) -> None:
        acceleration = self.accelerations.get(name)
        if acceleration is None or before == after:
            return
        for node in {agent.node for agent in (before, after) if agent is not None}:
            # During a rollout two agent pods may briefly share a node: the newest one serves.
            serving = [
                a.ip for a in self.agents.values() if a.acceleration == name and a.node == node
            ]
            self._set_agent(acceleration, node, serving[-1] if serving else None)
            if node not in self.nodes:
                self._rejudge_node(node)  # known from agents only: they are its selectors

    def _set_agent(self, acceleration: Acceleration, node: str, ip: str | None) -> None:
        had = node in acceleration.agent_ips
        if ip is None:
            acceleration.agent_ips.pop(node, None)
        else:
            acceleration.agent_ips[node] = ip
        if acceleration.active:
            acceleration.sink.set_endpoint(node, acceleration.endpoint(node))
        if had == (node in acceleration.agent_ips):
            return
        # Pods on that node become selectable, or stop being so.
        for uid in list(self.pods_by_node.get(node, ())):
            self._reselect_for(acceleration, uid, publish=False)
        if ip is None:
            acceleration.per_node.pop(node, None)
            acceleration.over_budget.pop(node, None)
            if acceleration.active:
                acceleration.sink.drop_node(node)
        else:
            self._publish(acceleration, node)

    def _forget_pod(self, uid: str) -> None:
        facts = self.pods.pop(uid, None)
        if facts is None:
            return
        self._unindex(facts)
        for acceleration in self.accelerations.values():
            acceleration.skipped.pop(uid, None)
            acceleration.warned.pop(uid, None)
            acceleration.troubled.pop(uid, None)
            acceleration.pods_held.pop(uid, None)
            node = acceleration.placement.pop(uid, None)
            if node is not None:
                acceleration.per_node[node].pop(uid, None)
                self._publish(acceleration, node)

    def _unindex(self, facts: PodFacts) -> None:
        for index, key in (
            (self.pods_by_namespace, facts.namespace),
            (self.pods_by_node, facts.node),
        ):
            if key is not None and key in index:
                index[key].discard(facts.uid)
                if not index[key]:
                    del index[key]

    def _reselect_pod(self, uid: str) -> None:
        for acceleration in self._ranked:
            self._reselect_for(acceleration, uid)

    def _reselect_all(self, acceleration: Acceleration) -> None:
        """Re-decide every pod for ``acceleration``; hand every node's set to its sink (an
        unchanged one is a no-op there)."""
        if acceleration.active:
            for node in acceleration.agent_ips:
                acceleration.sink.set_endpoint(node, acceleration.endpoint(node))
        touched: set[str] = set()
        for uid in list(self.pods):
            touched |= self._reselect_for(acceleration, uid, publish=False)
        for node in touched | set(acceleration.agent_ips):
            self._publish(acceleration, node)

    def _reselect_for(
        self, acceleration: Acceleration, uid: str, *, publish: bool = True
    ) -> set[str]:
        """Re-decide one pod for one resource; returns the nodes whose sets changed."""
        facts = self.pods.get(uid)
        selection = None
        acceleration.pods_held.pop(uid, None)
        if facts is not None and acceleration.spec is not None:
            selection = self._judged(
                acceleration,
                facts,
                select(
                    facts,
                    self.namespaces.get(facts.namespace),
                    acceleration.spec,
                    acceleration.agent_ips,
                ),
            )
        acceleration.skipped.pop(uid, None)
        acceleration.troubled.pop(uid, None)
        if selection is not None and selection.verdict not in _NOT_COUNTED:
            acceleration.skipped[uid] = selection.verdict
        if selection is not None and facts is not None and selection.verdict in _PROBLEMS:
            acceleration.troubled[uid] = PodTrouble(
                facts.namespace, facts.name, facts.node, selection.verdict, selection.detail
            )
        warned_before = acceleration.warned.pop(uid, None)
        if selection is not None and selection.warning is not None:
            acceleration.warned[uid] = selection.warning
            if selection.warning != warned_before and facts is not None:
                log.warning(
                    "pod %s/%s: %s",
                    facts.namespace,
                    facts.name,
                    selection.detail,
                    extra={"acceleration": acceleration.name, "reason": str(selection.warning)},
                )
        old_node = acceleration.placement.get(uid)
        old = acceleration.per_node.get(old_node, {}).get(uid) if old_node else None
        new = selection.pod if selection is not None else None
        new_node = facts.node if new is not None and facts is not None else None
        if old == new and old_node == new_node:
            return set()
        changed: set[str] = set()
        if old_node is not None:
            acceleration.per_node[old_node].pop(uid, None)
            acceleration.placement.pop(uid, None)
            changed.add(old_node)
        if new is not None and new_node is not None:
            acceleration.per_node.setdefault(new_node, {})[uid] = new
            acceleration.placement[uid] = new_node
            changed.add(new_node)
        if publish:
            for node in changed:
                self._publish(acceleration, node)
        return changed

    def _publish(self, acceleration: Acceleration, node: str) -> None:
        """Hand ``node``'s set to the sink: its placed pods, less those that share an address
        and those the node's maps do not take (oldest pods first, see .budget)."""
        budget = acceleration.budget
        if not self.settled or budget is None or node not in acceleration.agent_ips:
            return
        placed = acceleration.per_node.get(node, {})
        owners = Counter(address for pod in placed.values() for address in pod.addresses)
        clashes = {address for address, count in owners.items() if count > 1}
        if clashes:
            # Two running pods with one address (of either family): a deletion not seen yet.
            # The agent refuses such a set whole, so neither pod is accelerated until the watch
            # catches up.
            log.warning("pods on %s share addresses %s: left out", node, sorted(map(str, clashes)))
        oldest_first = sorted(
            (pod for pod in placed.values() if clashes.isdisjoint(pod.addresses)), key=self._age
        )
        pods, left_out = budget.fit(node, oldest_first)
        before = acceleration.over_budget.get(node, {})
        for uid in sorted(left_out.keys() - before.keys()):  # each pod once, as it is left out
            item = left_out[uid]
            log.warning(
                "pod %s on %s is over budget: left out of the node's set (%s)",
                item.pod,
                node,
                item.reason,
                extra={"acceleration": acceleration.name, "reason": str(Verdict.OVER_BUDGET)},
            )
        if left_out:
            acceleration.over_budget[node] = left_out
        else:
            acceleration.over_budget.pop(node, None)
        acceleration.sink.set_pods(node, pods)

    def _age(self, pod: PodSpec) -> tuple[str, str, str]:
        facts = self.pods.get(pod.uid)
        return (facts.created if facts is not None else "", pod.namespace, pod.name)


def _node_matches(
    labels: Mapping[str, str] | None, selector: Mapping[str, str], seen: bool
) -> bool:
    if labels is None:
        return seen  # a node known only from an agent pod: the agent's own word
    return all(labels.get(key) == value for key, value in selector.items())
