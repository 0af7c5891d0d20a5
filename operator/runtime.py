"""The operator's state and what it does, apart from Kopf: :class:`Operator`, plain async code.

The Kopf handlers (:mod:`.handlers`) only translate events into calls on :class:`Operator`,
which owns the cluster picture (:mod:`.picture`), the API client, one :class:`~.pusher.Pusher`
per resource, the writer's Lease (:mod:`.leadership`) and the resyncs (:mod:`.resync`).

Writing to the agents: while Kopf keeps this replica active, the handlers say so
(:meth:`Operator.want`) and the replica takes the Lease. A term starts with a resync (the picture
was not fed while the replica was paused), then every pusher writes with the term's epoch;
when the term ends (paused, the Lease lost, an agent naming a higher epoch) every pusher stops
at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from kubernetes.aio import client as k8s

from meshaccel.operator import rendering
from meshaccel.operator.config import OperatorConfig
from meshaccel.operator.credentials import AgentTLS, Credentials, KubeConfigMaps, KubeSecrets
from meshaccel.operator.kube import Kube, removals
from meshaccel.operator.leadership import KubeLeases, Leadership, LeaseStore
from meshaccel.operator.models import Condition, MeshAccelerationSpec
from meshaccel.operator.picture import Acceleration, ClusterPicture, agent_url
from meshaccel.operator.pusher import Pusher
from meshaccel.operator.resync import Lister, Listing, RelistDetector, Resyncer, list_cluster
from meshaccel.operator.status import Rollout, Transition, compute_status

log = logging.getLogger("meshaccel.operator")


@dataclass(frozen=True)
class Converged:
    """What :meth:`Operator.converge` did: the objects it wrote (``Kind/name created`` or
    ``updated``), whether the spec was too invalid to program anything, and the agents'
    DaemonSet as it is stored now."""

    written: tuple[str, ...] = ()
    daemonset: dict[str, Any] | None = None
    invalid_spec: bool = False

    def summary(self) -> str:
        if self.invalid_spec:
            return "nothing programmed (invalid spec)"
        return ", ".join(self.written) or "unchanged"


@dataclass
class Operator:
    """The operator's state: its settings, the API client, the cluster picture, one pusher per
    resource, the writer's Lease and epoch, the resyncs and the credentials."""

    config: OperatorConfig
    api: k8s.ApiClient
    session: aiohttp.ClientSession
    # Tests replace these: the Lease's store, what a resync lists, the clock of both.
    leases: LeaseStore | None = None
    lister: Lister | None = None
    clock: Callable[[], float] = time.monotonic
    picture: ClusterPicture = field(init=False)
    kube: Kube = field(init=False)
    leadership: Leadership = field(init=False)
    resyncer: Resyncer = field(init=False)
    relists: RelistDetector = field(default_factory=RelistDetector)
    pushers: dict[str, Pusher] = field(default_factory=dict)
    credentials: Credentials = field(init=False)  # the CA, the agents' and our certificates
    _legacy_gone: set[str] = field(default_factory=set, init=False)  # token Secrets deleted
    epoch: int | None = None  # the pushers' (a term whose resync finished); None: not writing
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, init=False)
    _term: asyncio.Task[None] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.picture = ClusterPicture(self.config.namespace)
        self.kube = Kube(self.api)
        self.credentials = Credentials(
            KubeSecrets(self.api, self.config.namespace),
            self.config.namespace,
            KubeConfigMaps(self.api, self.config.namespace),
        )
        self.leadership = Leadership(
            self.leases or KubeLeases(self.api, self.config.namespace),
            duration=self.config.lease_duration,
            on_change=self._term_changed,
            clock=self.clock,
        )
        self.resyncer = Resyncer(
            self.picture,
            self.lister or self._list_cluster,
            interval=self.config.resync_interval,
            active=lambda: self.epoch is not None,
            clock=self.clock,
        )

    def start(self) -> None:
        """Start the Lease's and the resyncs' loops (on the event loop)."""
        loop = asyncio.get_running_loop()
        self.leadership.start()
        self._tasks.append(loop.create_task(self.resyncer.run(), name="meshaccel-resync"))

    async def close(self) -> None:
        await self.leadership.close()  # stops writing, releases the Lease
        for task in [*self._tasks, *([self._term] if self._term else [])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for pusher in self.pushers.values():
            await pusher.close()
        self.pushers.clear()
        await self.session.close()
        await self.api.close()  # type: ignore[no-untyped-call]

    # -- leading ------------------------------------------------------------------------------

    def want(self, reason: str) -> None:
        """Kopf keeps this replica active (``reason``: a daemon that runs only then)."""
        self.leadership.want(reason)

    def unwant(self, reason: str) -> None:
        self.leadership.unwant(reason)

    def _term_changed(self, epoch: int | None) -> None:
        if self._term is not None:
            self._term.cancel()
            self._term = None
        if epoch is None:
            self._lead(None)
            return
        self._term = asyncio.get_running_loop().create_task(
            self._start_term(epoch), name=f"meshaccel-term-{epoch}"
        )

    async def _start_term(self, epoch: int) -> None:
        """A new term: resync first (what was deleted while this replica did not watch), then
        every pusher writes with the epoch. A failed list does not hold the term up."""
        try:
            await self.resyncer.resync("a new term")
        except Exception as err:
            log.warning(
                "resync at the start of the term failed: writing anyway",
                extra={"event": "resync_failed", "epoch": epoch, "error": str(err)},
            )
        if self.leadership.epoch == epoch:
            self._lead(epoch)

    def _lead(self, epoch: int | None) -> None:
        self.epoch = epoch
        for pusher in self.pushers.values():
            pusher.lead(epoch)
        self.resyncer.wake()

    # -- what the watches say -------------------------------------------------------------------

    def namespace_event(self, name: str, labels: Mapping[str, str], kind: str | None) -> None:
        """A namespace event; ``kind`` is its type (None: listed, DELETED: gone)."""
        self._relisted("namespaces", typed=kind is not None, known=name in self.picture.namespaces)
        self.picture.namespace_changed(name, None if kind == "DELETED" else labels)

    def node_event(self, name: str, labels: Mapping[str, str], kind: str | None) -> None:
        self._relisted("nodes", typed=kind is not None, known=name in self.picture.nodes)
        self.picture.node_changed(name, None if kind == "DELETED" else labels)

    def pod_event(self, body: Mapping[str, Any], kind: str | None) -> None:
        uid = str((body.get("metadata") or {}).get("uid") or "")
        self._relisted("pods", typed=kind is not None, known=self.picture.knows_pod(uid))
        self.picture.pod_changed(body, deleted=kind == "DELETED")

    def _relisted(self, kind: str, *, typed: bool, known: bool) -> None:
        if self.relists.saw(kind, typed=typed, known=known):
            log.info("Kopf lists %s again: a resync follows", kind, extra={"event": "relist"})
            self.resyncer.request(f"{kind} listed again")

    async def _list_cluster(self) -> Listing:
        return await list_cluster(self.api)

    # -- a resource's life ------------------------------------------------------------------

    async def agent_tls(self, name: str) -> AgentTLS:
        """The agents' TLS material (:mod:`.credentials`); on first use, the rotation's next
        step if one is due, and the Secret of their former bearer token deleted."""
        await self.credentials.tend(self._trust_reports, writing=self.epoch is not None)
        if name not in self._legacy_gone:
            ns = self.config.namespace
            await self.kube.delete("Secret", ns, rendering.legacy_secret_name(name))
            self._legacy_gone.add(name)
        return await self.credentials.agent_tls(name, rendering.secret_name(name))

    def _trust_reports(self) -> dict[str, str | None]:
        """Every agent the pushers reach, with the CA bundle it last reported."""
        return {
            f"{name}/{node}": state.trust_bundle
            for name, pusher in self.pushers.items()
            for node, state in pusher.nodes().items()
            if state.url is not None and state.probe_error is None
        }

    def _pusher(self, name: str) -> Pusher:
        pusher = self.pushers.get(name)
        if pusher is None:
            pusher = Pusher(
                name,
                tls=self.credentials.client_context,
                session=self.session,
                epoch=self.epoch,
                on_superseded=self.leadership.superseded,
                window=self.config.push_window,
                request_timeout=self.config.request_timeout,
                backoff_max=self.config.backoff_max,
                probe_interval=self.config.probe_interval,
            )
            self.pushers[name] = pusher
        return pusher

    async def reconcile(
        self, name: str, uid: str, created: str, spec: MeshAccelerationSpec
    ) -> Converged:
        """Take a new or changed spec: select, then create or update the agents' objects."""
        await self.credentials.load()
        pusher = self._pusher(name)
        acceleration = self.picture.acceleration_changed(name, uid, created, spec, pusher)
        return await self.converge(acceleration)

    async def converge(self, acceleration: Acceleration) -> Converged:
        """Bring the agents' objects in line with the picture's verdict. A conflict changes
        nothing here: the picture sends empty sets to the nodes an older resource keeps."""
        name = acceleration.name
        if acceleration.spec is None:
            return Converged(invalid_spec=True)
        tls = await self.agent_tls(name)
        if name not in self.pushers:
            # Known from a census only (its handler has not run yet): the sets go out now.
            self.picture.replace_sink(acceleration, self._pusher(name))
        objects = rendering.agent_objects(
            name,
            acceleration.uid,
            acceleration.spec,
            namespace=self.config.namespace,
            tls=tls,
            image=self.config.agent_image,
            pod=self.config.agent_pod,
        )
        written: list[str] = []
        daemonset = None
        for obj in objects:
            what, stored = await self.kube.apply(obj)
            if what != "unchanged":
                written.append(f"{obj['kind']}/{obj['metadata']['name']} {what}")
            if obj["kind"] == "DaemonSet":
                daemonset = stored
        return Converged(tuple(written), daemonset)

    async def uninstall(self, name: str, uid: str, port: int) -> dict[str, str]:
        """The resource is being deleted: every agent detaches. Returns the nodes that failed.

        A replica that never reconciled the resource (it was deleted while this replica was
        paused or starting) first learns the token and the agents' addresses.
        """
        pusher = self.pushers.get(name)
        if pusher is None:
            await self.credentials.load()
            pusher = self._pusher(name)
            for agent in self.picture.agents.values():
                if agent.acceleration == name:
                    pusher.set_endpoint(agent.node, agent_url(agent.ip, port))
        results = await pusher.uninstall(timeout=self.config.uninstall_timeout)
        failed = {node: error for node, error in results.items() if error}
        daemonset = await self.kube.read(
            "DaemonSet", self.config.namespace, rendering.daemonset_name(name)
        )
        scheduled = int(((daemonset or {}).get("status") or {}).get("currentNumberScheduled", 0))
        if scheduled > len(results):
            # Agents run that this replica has not seen yet (its pod watch is just starting).
            failed["(unseen)"] = f"{scheduled} agents scheduled, {len(results)} known"
        return failed

    async def forget(self, name: str) -> None:
        self.credentials.forget(name)
        pusher = self.pushers.pop(name, None)
        if pusher is not None:
            await pusher.close()
        self.picture.acceleration_removed(name)

    # -- status -----------------------------------------------------------------------------

    def status(
        self,
        name: str,
        generation: int | None,
        current: Mapping[str, Any],
        daemonset: Mapping[str, Any] | None,
    ) -> tuple[dict[str, Any] | None, list[Transition]]:
        """A merge patch for ``.status`` (``None`` if nothing changed) and condition changes.

        ``daemonset`` is the agents' DaemonSet as :meth:`converge` left it (None: there is none).
        """
        acceleration = self.picture.accelerations.get(name)
        if acceleration is None:
            return None, []
        pusher = self.pushers.get(name)
        nodes = pusher.nodes() if pusher is not None and acceleration.active else {}
        previous = [Condition.model_validate(c) for c in current.get("conditions") or ()]
        status, transitions = compute_status(
            acceleration,
            nodes,
            Rollout.from_daemonset(daemonset if acceleration.active else None),
            generation=generation,
            previous=previous,
            behind_grace=self.config.failing_after,
            clock_now=time.monotonic(),
            judged=self.picture.settled,
        )
        wanted = status.model_dump(mode="json", exclude_none=True)
        if _same(current, wanted):
            return None, transitions
        return removals(dict(current), wanted), transitions


def _same(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Equal, ignoring null and empty fields the API server may drop."""

    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items() if v not in (None, {}, [])}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return bool(clean(current) == clean(wanted))
