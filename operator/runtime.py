"""What the operator does for one MeshAcceleration, apart from Kopf: plain async functions.

The Kopf handlers (:mod:`.handlers`) only translate events into calls on :class:`Runtime`,
which owns the engine, the API client and one :class:`~.pusher.Pusher` per resource.
"""

from __future__ import annotations

import base64
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from kubernetes.aio import client as k8s

from meshaccel.operator import rendering
from meshaccel.operator.config import OperatorConfig
from meshaccel.operator.engine import Acceleration, Engine, agent_url
from meshaccel.operator.kube import Kube, removals
from meshaccel.operator.models import Condition, MeshAccelerationSpec
from meshaccel.operator.pusher import Pusher
from meshaccel.operator.status import Rollout, Transition, compute_status

log = logging.getLogger("meshaccel.operator")


@dataclass(frozen=True)
class Converged:
    """What :meth:`Runtime.converge` did, and the agents' DaemonSet as it is stored now."""

    done: str
    daemonset: dict[str, Any] | None = None


@dataclass
class Runtime:
    config: OperatorConfig
    api: k8s.ApiClient
    session: aiohttp.ClientSession
    engine: Engine = field(init=False)
    kube: Kube = field(init=False)
    pushers: dict[str, Pusher] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)  # resource -> the agents' token
    retired: set[str] = field(default_factory=set)  # conflict losers whose agents are gone

    def __post_init__(self) -> None:
        self.engine = Engine(self.config.namespace)
        self.kube = Kube(self.api)

    async def close(self) -> None:
        for pusher in self.pushers.values():
            await pusher.close()
        self.pushers.clear()
        await self.session.close()
        await self.api.close()  # type: ignore[no-untyped-call]

    # -- a resource's life ------------------------------------------------------------------

    async def token(self, name: str) -> str:
        """The agents' bearer token: the one in the Secret the operator owns, read once, or a
        new one (the Secret is then created with it)."""
        token = self.tokens.get(name)
        if token is None:
            secret = await self.kube.read(
                "Secret", self.config.namespace, rendering.secret_name(name)
            )
            data = (secret or {}).get("data") or {}
            token = (
                base64.b64decode(data["token"]).decode()
                if "token" in data
                else secrets.token_urlsafe(32)
            )
            self.tokens[name] = token
        return token

    def _pusher(self, name: str, token: str) -> Pusher:
        pusher = self.pushers.get(name)
        if pusher is None:
            pusher = Pusher(
                name,
                token=token,
                session=self.session,
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
        pusher = self._pusher(name, await self.token(name))
        acceleration = self.engine.acceleration_changed(name, uid, created, spec, pusher)
        return await self.converge(acceleration)

    async def converge(self, acceleration: Acceleration) -> Converged:
        """Bring the agents' objects in line with the engine's verdict."""
        name = acceleration.name
        if acceleration.conflict is not None:
            return Converged(await self.retire_agents(acceleration))
        if acceleration.spec is None:
            return Converged("nothing programmed (invalid spec)")
        token = await self.token(name)
        self.retired.discard(name)
        if name not in self.pushers:
            # Taking over after a conflict ended: a fresh pusher, the engine re-sends the sets.
            self.engine.replace_sink(acceleration, self._pusher(name, token))
        objects = rendering.agent_objects(
            name,
            acceleration.uid,
            acceleration.spec,
            namespace=self.config.namespace,
            token=token,
        )
        done: list[str] = []
        daemonset = None
        for obj in objects:
            what, stored = await self.kube.apply(obj)
            if what != "unchanged":
                done.append(f"{obj['kind']}/{obj['metadata']['name']} {what}")
            if obj["kind"] == "DaemonSet":
                daemonset = stored
        return Converged(", ".join(done) or "unchanged", daemonset)

    async def retire_agents(self, acceleration: Acceleration) -> str:
        """A resource that lost a conflict: its agents detach and its DaemonSet goes (once)."""
        if acceleration.name in self.retired:
            return "nothing programmed (conflict)"
        pusher = self.pushers.pop(acceleration.name, None)
        failed: dict[str, str | None] = {}
        if pusher is not None:
            failed = await pusher.uninstall(timeout=self.config.uninstall_timeout)
            await pusher.close()
        ns = self.config.namespace
        removed = await self.kube.delete(
            "DaemonSet", ns, rendering.daemonset_name(acceleration.name)
        )
        await self.kube.delete("ConfigMap", ns, rendering.configmap_name(acceleration.name))
        errors = {node: err for node, err in failed.items() if err}
        if errors:
            log.warning("agents could not uninstall", extra={"nodes": errors})
        self.retired.add(acceleration.name)
        return "agents retired" if removed or pusher else "nothing programmed (conflict)"

    async def uninstall(self, name: str, uid: str, port: int) -> dict[str, str]:
        """The resource is being deleted: every agent detaches. Returns the nodes that failed.

        A replica that never reconciled the resource (it was deleted while this replica was
        paused or starting) first learns the token and the agents' addresses.
        """
        pusher = self.pushers.get(name)
        if pusher is None:
            pusher = self._pusher(name, await self.token(name))
            for agent in self.engine.agents.values():
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
        self.tokens.pop(name, None)
        self.retired.discard(name)
        pusher = self.pushers.pop(name, None)
        if pusher is not None:
            await pusher.close()
        self.engine.acceleration_removed(name)

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
        acceleration = self.engine.accelerations.get(name)
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
