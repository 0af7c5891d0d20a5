"""The operator's picture of the cluster, and each MeshAcceleration's per-node pod sets.

:class:`Engine` is plain, synchronous and free of Kopf and I/O: handlers feed it namespaces,
nodes, pods and MeshAccelerations as they change; it re-selects only what a change can affect
(a pod: that pod; a namespace: its pods; a resource: all pods) and hands each node's complete
new set to the resource's :class:`PodSink` (the :class:`~.pusher.Pusher`) when, and only
when, that set changed.

Conflicts: two resources conflict when their agents could run on one node (node selectors
overlapping on a known node) or their selectors claim one pod. The resource created later
(ties broken by name) gets ``Conflict`` and programs nothing; when the earlier one goes away
the later one takes over. Pod-level claims are re-checked on resource and namespace changes
and by :meth:`Engine.recheck_conflicts` (called periodically), not on every pod event.

Deletions nobody reported: after a watch gap Kopf lists again without DELETED events, so a
resync (:mod:`.resync`) lists the cluster and hands the engine what is there; between
:meth:`Engine.begin_census` and :meth:`Engine.end_census` the engine drops what it knew when
the census began, that the list does not have and that no event touched meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshaccel.agent.api_models import PodSpec
from meshaccel.operator.checks import spec_problems
from meshaccel.operator.models import MeshAccelerationSpec
from meshaccel.operator.selection import (
    PodFacts,
    PodWarning,
    Verdict,
    has_sidecar,
    matches_selectors,
    select,
)
from meshaccel.operator.selectors import overlap_possible

log = logging.getLogger("meshaccel.operator.engine")

ACCELERATION_LABEL = "meshaccel.io/acceleration"
COMPONENT_LABEL = "app.kubernetes.io/component"
AGENT_COMPONENT = "agent"


def agent_url(ip: str, port: int) -> str:
    """The base URL of an agent's API (agents serve on their node's address)."""
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}"


class PodSink(Protocol):
    """Where a resource's per-node sets go (the :class:`~.pusher.Pusher`)."""

    def set_endpoint(self, node: str, url: str | None) -> None: ...

    def set_pods(self, node: str, pods: Sequence[PodSpec]) -> None: ...

    def drop_node(self, node: str) -> None: ...


@dataclass
class Acceleration:
    """One MeshAcceleration as the engine tracks it.

    ``spec`` is the last spec without problems: a resource edited into nonsense keeps
    running as it was (nothing half-applied) and reports ``problems`` until fixed; a new
    resource with problems has no spec and programs nothing.
    """

    name: str
    uid: str
    created: str  # metadata.creationTimestamp: RFC 3339 in UTC sorts as time
    sink: PodSink
    spec: MeshAccelerationSpec | None = None
    problems: list[str] = field(default_factory=list)
    conflict: str | None = None  # why this resource is not programming anything
    agent_ips: dict[str, str] = field(default_factory=dict)  # node -> its agent's IP
    placement: dict[str, str] = field(default_factory=dict)  # pod uid -> node
    per_node: dict[str, dict[str, PodSpec]] = field(default_factory=dict)
    skipped: dict[str, Verdict] = field(default_factory=dict)  # matched, not accelerated
    warned: dict[str, PodWarning] = field(default_factory=dict)  # accelerated, with a warning

    @property
    def active(self) -> bool:
        return self.spec is not None and self.conflict is None

    @property
    def seniority(self) -> tuple[str, str]:
        return (self.created, self.name)

    def endpoint(self, node: str) -> str | None:
        ip = self.agent_ips.get(node)
        if ip is None or self.spec is None:
            return None
        return agent_url(ip, self.spec.agent.port)

    def pods_selected(self) -> int:
        return len(self.placement)

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(str(verdict) for verdict in self.skipped.values()))

    def warned_by_reason(self) -> dict[str, int]:
        return dict(Counter(str(warning) for warning in self.warned.values()))


@dataclass(frozen=True, slots=True)
class AgentPod:
    acceleration: str
    node: str
    ip: str


@dataclass(eq=False)
class Census:
    """What the engine knew when a full list began (:meth:`Engine.begin_census`), and which of
    those objects events touched since (an event is at least as new as the list)."""

    pods: frozenset[str]  # uids, agent pods included
    namespaces: frozenset[str]
    nodes: frozenset[str]
    touched: set[tuple[str, str]] = field(default_factory=set)  # (kind, uid or name)


@dataclass(frozen=True)
class Dropped:
    """What a census dropped: pods as ``namespace/name`` (agents as ``agent <resource> on
    <node>``), namespaces and nodes by name."""

    pods: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.pods or self.namespaces or self.nodes)


class Engine:
    def __init__(self, namespace: str) -> None:
        self.namespace = namespace  # where the agents run (the operator's namespace)
        self.namespaces: dict[str, dict[str, str]] = {}
        self.nodes: dict[str, dict[str, str]] = {}
        self.pods: dict[str, PodFacts] = {}
        self.pods_by_namespace: defaultdict[str, set[str]] = defaultdict(set)
        self.pods_by_node: defaultdict[str, set[str]] = defaultdict(set)
        self.agents: dict[str, AgentPod] = {}  # agent pod uid -> where it serves
        self.accelerations: dict[str, Acceleration] = {}
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
        self.recheck_conflicts()

    def node_changed(self, name: str, labels: Mapping[str, str] | None) -> None:
        self._touch("node", name)
        before = self.nodes.get(name)
        if labels is None:
            self.nodes.pop(name, None)
        else:
            self.nodes[name] = dict(labels)
        if before != self.nodes.get(name):
            self._recheck_node_conflicts()

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
        """Before a full list is requested: what the engine knows now. End it with
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
    ) -> Dropped:
        """The list came back (``pods`` by uid, ``namespaces`` and ``nodes`` by name): drop
        what the engine knew at :meth:`begin_census`, the list lacks and no event touched
        since. (A pod uid never comes back; a name may, and then its event touches it.)"""
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
        return Dropped(tuple(gone_pods), tuple(gone_namespaces), tuple(gone_nodes))

    def _touch(self, kind: str, key: str) -> None:
        for census in self._censuses:
            census.touched.add((kind, key))

    # -- MeshAccelerations ------------------------------------------------------------------

    def acceleration_changed(
        self, name: str, uid: str, created: str, spec: MeshAccelerationSpec, sink: PodSink
    ) -> Acceleration:
        """A MeshAcceleration was created or its spec changed: re-select everything for it."""
        current = self.accelerations.get(name)
        if current is not None and current.uid != uid:
            self.acceleration_removed(name)  # deleted and re-created under the same name
            current = None
        if current is None:
            current = Acceleration(name=name, uid=uid, created=created, sink=sink)
            self.accelerations[name] = current
            for agent in self.agents.values():
                if agent.acceleration == name:
                    current.agent_ips[agent.node] = agent.ip
        current.problems = spec_problems(name, spec)
        if current.problems or current.spec == spec:
            self.recheck_conflicts()
            return current
        current.spec = spec
        if name not in self.recheck_conflicts():
            self._reselect_all(current)  # its standing did not change: the spec did
        return current

    def acceleration_removed(self, name: str) -> Acceleration | None:
        removed = self.accelerations.pop(name, None)
        if removed is not None:
            self.recheck_conflicts()  # a later resource may now take over
        return removed

    def replace_sink(self, acceleration: Acceleration, sink: PodSink) -> None:
        """Hand a resource's sets to a new sink, which receives every node's set afresh."""
        acceleration.sink = sink
        self._reselect_all(acceleration)

    def recheck_conflicts(self) -> set[str]:
        """Recompute every resource's conflict; re-select those whose standing changed.

        Returns the names of those re-selected.
        """
        reselected: set[str] = set()
        by_seniority = sorted(self.accelerations.values(), key=lambda a: a.seniority)
        for index, acceleration in enumerate(by_seniority):
            was_active = acceleration.active
            acceleration.conflict = None
            if acceleration.spec is not None:
                for elder in by_seniority[:index]:
                    if elder.active:
                        reason = self._claims_overlap(elder, acceleration)
                        if reason:
                            acceleration.conflict = (
                                f"{reason} already claimed by MeshAcceleration "
                                f"{elder.name!r} (created earlier): change this resource's "
                                "selectors so that they claim neither its pods nor its nodes"
                            )
                            break
            if was_active != acceleration.active:
                self._reselect_all(acceleration)
                reselected.add(acceleration.name)
        return reselected

    def _recheck_node_conflicts(self) -> None:
        if len(self.accelerations) > 1:
            self.recheck_conflicts()

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
        for acceleration in self.accelerations.values():
            self._reselect_for(acceleration, uid)

    def _reselect_all(self, acceleration: Acceleration) -> None:
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
        if facts is not None and acceleration.active and acceleration.spec is not None:
            selection = select(
                facts,
                self.namespaces.get(facts.namespace),
                acceleration.spec,
                acceleration.agent_ips,
            )
        acceleration.skipped.pop(uid, None)
        if selection is not None and selection.verdict not in (
            Verdict.NAMESPACE_NOT_SELECTED,
            Verdict.POD_NOT_SELECTED,
            Verdict.SELECTED,
        ):
            acceleration.skipped[uid] = selection.verdict
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
        if not acceleration.active or node not in acceleration.agent_ips:
            return
        pods = sorted(acceleration.per_node.get(node, {}).values(), key=lambda p: p.uid)
        owners = Counter(pod.ip for pod in pods)
        clashes = {ip for ip, count in owners.items() if count > 1}
        if clashes:
            # Two running pods with one IP: a deletion not seen yet. The agent refuses such a
            # set whole, so neither pod is accelerated until the watch catches up.
            log.warning("pods on %s share addresses %s: left out", node, sorted(map(str, clashes)))
        acceleration.sink.set_pods(node, [pod for pod in pods if pod.ip not in clashes])

    def _claims_overlap(self, elder: Acceleration, younger: Acceleration) -> str | None:
        nodes = self._shared_nodes(elder, younger)
        if nodes:
            shown = ", ".join(sorted(nodes)[:3]) + (" ..." if len(nodes) > 3 else "")
            return f"nodes {shown} are"
        shared = self._shared_pod(elder, younger)
        if shared is not None:
            return f"pod {shared.namespace}/{shared.name} is"
        return None

    def _shared_nodes(self, a: Acceleration, b: Acceleration) -> set[str]:
        assert a.spec is not None and b.spec is not None
        a_sel, b_sel = a.spec.agent.nodeSelector, b.spec.agent.nodeSelector
        known = set(self.nodes) | set(a.agent_ips) | set(b.agent_ips)
        if not known:
            # No node seen yet: judge by the selectors alone.
            return {"(any node)"} if overlap_possible(a_sel, b_sel) else set()
        return {
            node
            for node in known
            if _node_matches(self.nodes.get(node), a_sel, node in a.agent_ips)
            and _node_matches(self.nodes.get(node), b_sel, node in b.agent_ips)
        }

    def _shared_pod(self, a: Acceleration, b: Acceleration) -> PodFacts | None:
        for namespace, uids in self.pods_by_namespace.items():
            labels = self.namespaces.get(namespace)
            if labels is None:
                continue
            for uid in uids:
                facts = self.pods[uid]
                if all(
                    x.spec is not None
                    and matches_selectors(facts, labels, x.spec) is None
                    and has_sidecar(facts, x.spec.mode)
                    for x in (a, b)
                ):
                    return facts
        return None


def _node_matches(
    labels: Mapping[str, str] | None, selector: Mapping[str, str], seen: bool
) -> bool:
    if labels is None:
        return seen  # a node known only from an agent pod: the agent's own word
    return all(labels.get(key) == value for key, value in selector.items())
