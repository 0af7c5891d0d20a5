"""``meshaccel-operator pre-delete``: what ``helm uninstall`` runs before it removes anything.

    meshaccel-operator pre-delete [--namespace NS] [--operator-deployment NAME]
                                  [--timeout SECONDS] [--operator-grace SECONDS]

Helm deletes a release's objects in no order that helps here: the operator could go before
the MeshAccelerations, whose finalizer (``meshaccel.io/uninstall``) only the operator removes,
once every agent has detached its datapath (``POST /v1/uninstall``). The chart's pre-delete
hook (a Job with its own minimal RBAC) runs this first: it deletes every MeshAcceleration, then
waits, bounded and logging its progress, while the running operator finishes them. Each one
ends in one of four ways (:class:`Outcome`):

* gone, with the operator's ``Uninstalled`` event: every agent detached, its nodes are clean;
* gone, with ``UninstallIncomplete`` (the event names the agents that did not confirm), or
  with neither event to be found: its nodes may still hold its pinned datapath;
* still there when the wait ends (after ``--timeout`` seconds, or sooner once no operator
  replica has been ready for ``--operator-grace`` seconds): the hook removes the finalizer
  itself, so that nothing hangs, and its nodes may still hold the pinned datapath.

No node is called clean that has not been confirmed: for every other outcome the log names the
nodes where the resource's agents ran and how to remove what is left. Exit codes: 0 once every
resource is decided (the last line says whether every node is clean), 1 when the resources
could not be listed or deleted or a finalizer could not be removed (Helm then stops the
uninstall, and the release, operator included, stays for another try), 2 invalid arguments.
docs/operations.md ("Uninstall") tells the story.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubernetes.aio import client as k8s

from meshaccel.contract.logs import configure_logging
from meshaccel.operator import models, rendering
from meshaccel.operator.config import DEFAULT_NAMESPACE
from meshaccel.operator.handlers import FINALIZER
from meshaccel.operator.kube import api_client

log = logging.getLogger("meshaccel.operator.predelete")

ACCELERATIONS = f"/apis/{models.GROUP}/{models.VERSION}/{models.PLURAL}"
UNINSTALLED, INCOMPLETE = "Uninstalled", "UninstallIncomplete"  # the operator's events
DEFAULT_TIMEOUT = 180.0
DEFAULT_OPERATOR_GRACE = 30.0
POLL_SECONDS = 2.0
REPORT_SECONDS = 10.0
# Kopf posts its events in the background: one may arrive shortly after the resource went.
EVENT_GRACE_SECONDS = 10.0


class Outcome(enum.StrEnum):
    CLEAN = "clean"  # the operator's Uninstalled event: every agent detached
    INCOMPLETE = "incomplete"  # UninstallIncomplete: some agents did not confirm
    UNCONFIRMED = "unconfirmed"  # gone, but no event says how it went
    ABANDONED = "abandoned"  # the hook removed the finalizer: nobody uninstalled the agents


@dataclass
class Tracked:
    """One MeshAcceleration on its way out, and the nodes its agents ran on."""

    name: str
    uid: str
    nodes: set[str] = field(default_factory=set)
    outcome: Outcome | None = None
    detail: str = ""  # the operator's event message, or why the hook gave up
    gone_at: float | None = None  # when the hook first found it gone (awaiting its event)

    @property
    def instance(self) -> str:
        return rendering.agent_instance(self.name)


class ApiError(Exception):
    """A request the API server refused (or could not be sent)."""


class Cluster(Protocol):
    """The calls the hook makes (its RBAC in the chart allows exactly these)."""

    async def accelerations(self) -> list[dict[str, Any]]: ...

    async def delete(self, name: str, uid: str) -> None: ...

    async def remove_finalizer(self, obj: Mapping[str, Any]) -> bool:
        """False when the object changed meanwhile (try again) or is gone."""
        ...

    async def agent_nodes(self, name: str) -> set[str]: ...

    async def events(self, uid: str) -> list[dict[str, Any]]: ...

    async def operator_ready(self) -> int:
        """Ready replicas of the operator's Deployment (0 when it is missing)."""
        ...


class KubeCluster:
    """:class:`Cluster` over the official client's asyncio flavour, as plain JSON."""

    def __init__(self, api: k8s.ApiClient, namespace: str, operator: str) -> None:
        self._api = api
        self.namespace = namespace
        self.operator = operator

    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Sequence[tuple[str, str]] = (),
        content_type: str = "application/json",
    ) -> tuple[int, dict[str, Any]]:
        params = await self._api.param_serialize(
            method=method,
            resource_path=path,
            query_params=list(query) or None,
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = await self._api.call_api(*params)
            data = await response.read()  # type: ignore[no-untyped-call]
        except Exception as err:  # the connection itself failed
            raise ApiError(f"{method} {path}: {err}") from err
        parsed = json.loads(data) if data else {}
        if response.status >= 400 and response.status not in (404, 409):
            message = parsed.get("message", data[:300]) if isinstance(parsed, dict) else data
            raise ApiError(f"{method} {path}: HTTP {response.status}: {message}")
        return response.status, parsed if isinstance(parsed, dict) else {}

    async def accelerations(self) -> list[dict[str, Any]]:
        _, listing = await self._call("GET", ACCELERATIONS)
        return list(listing.get("items") or [])

    async def delete(self, name: str, uid: str) -> None:
        # The uid precondition: a resource created anew under the same name is not ours.
        options = {"preconditions": {"uid": uid}, "propagationPolicy": "Background"}
        await self._call("DELETE", f"{ACCELERATIONS}/{name}", body=options)

    async def remove_finalizer(self, obj: Mapping[str, Any]) -> bool:
        meta = obj["metadata"]
        kept = [f for f in meta.get("finalizers") or [] if f != FINALIZER]
        # Carrying the resourceVersion read makes it a compare-and-swap (409 if it moved).
        patch = {"metadata": {"resourceVersion": meta["resourceVersion"], "finalizers": kept}}
        status, _ = await self._call(
            "PATCH",
            f"{ACCELERATIONS}/{meta['name']}",
            body=patch,
            content_type="application/merge-patch+json",
        )
        return status < 400

    async def agent_nodes(self, name: str) -> set[str]:
        selector = ",".join(f"{k}={v}" for k, v in rendering.agent_pod_selector(name).items())
        _, pods = await self._call(
            "GET",
            f"/api/v1/namespaces/{self.namespace}/pods",
            query=(("labelSelector", selector),),
        )
        return {
            str(pod["spec"]["nodeName"])
            for pod in pods.get("items") or []
            if (pod.get("spec") or {}).get("nodeName")
        }

    async def events(self, uid: str) -> list[dict[str, Any]]:
        _, events = await self._call(
            "GET",
            f"/api/v1/namespaces/{self.namespace}/events",
            query=(("fieldSelector", f"involvedObject.uid={uid}"),),
        )
        return list(events.get("items") or [])

    async def operator_ready(self) -> int:
        status, deployment = await self._call(
            "GET", f"/apis/apps/v1/namespaces/{self.namespace}/deployments/{self.operator}"
        )
        if status == 404:
            return 0
        return int((deployment.get("status") or {}).get("readyReplicas") or 0)


@dataclass(frozen=True)
class Limits:
    timeout: float = DEFAULT_TIMEOUT  # the longest wait for the operator, in seconds
    operator_grace: float = DEFAULT_OPERATOR_GRACE  # without a ready operator replica
    poll: float = POLL_SECONDS
    report: float = REPORT_SECONDS  # between progress lines
    event_grace: float = EVENT_GRACE_SECONDS  # for the operator's event of a resource gone


async def run(
    cluster: Cluster,
    limits: Limits = Limits(),
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> list[Tracked]:
    """Delete every MeshAcceleration and see each one out (see the module's docstring).

    Raises :class:`ApiError` when the resources cannot be listed or deleted, or a finalizer
    cannot be removed: then nothing is decided.
    """
    tracked = [
        Tracked(str(item["metadata"]["name"]), str(item["metadata"]["uid"]))
        for item in await cluster.accelerations()
    ]
    if not tracked:
        log.info("no MeshAcceleration to uninstall")
        return []
    for acceleration in tracked:
        acceleration.nodes = await _nodes(cluster, acceleration)
        await cluster.delete(acceleration.name, acceleration.uid)
    log.info(
        "deleted every MeshAcceleration: waiting for the operator to uninstall their agents",
        extra={
            "accelerations": [a.name for a in tracked],
            "timeout_seconds": limits.timeout,
            "operator_grace_seconds": limits.operator_grace,
        },
    )
    start = clock()
    unready_since: float | None = None
    next_report = start + limits.report
    stop = "the wait timed out"
    while True:
        now = clock()
        present, awaiting = await _settle(cluster, tracked, now, limits.event_grace)
        pending = present + awaiting
        if not pending:
            break
        ready = await _operator_ready(cluster)
        unready_since = None if ready else (now if unready_since is None else unready_since)
        if now >= next_report:
            log.info(
                "still waiting for the operator",
                extra={
                    "accelerations": [a.name for a in pending],
                    "waited_seconds": round(now - start, 1),
                    "operator_ready_replicas": ready,
                },
            )
            next_report = now + limits.report
        if now - start >= limits.timeout:
            stop = f"the operator did not finish within {limits.timeout:g} s"
            break
        if unready_since is not None and now - unready_since >= limits.operator_grace:
            stop = f"no operator replica was ready for {limits.operator_grace:g} s"
            break
        await sleep(limits.poll)
    present, awaiting = await _settle(cluster, tracked, clock(), 0)
    for acceleration in present:
        await _abandon(cluster, acceleration, stop)
    _summarize(tracked)
    return tracked


async def _nodes(cluster: Cluster, acceleration: Tracked) -> set[str]:
    try:
        return acceleration.nodes | await cluster.agent_nodes(acceleration.name)
    except ApiError as err:
        log.warning("could not list the agents' pods", extra={"error": str(err)})
        return acceleration.nodes


async def _operator_ready(cluster: Cluster) -> int:
    try:
        return await cluster.operator_ready()
    except ApiError as err:
        log.warning("could not read the operator's Deployment", extra={"error": str(err)})
        return 0


async def _settle(
    cluster: Cluster, tracked: list[Tracked], now: float, event_grace: float
) -> tuple[list[Tracked], list[Tracked]]:
    """Decide the resources that are gone. Returns those still there (their nodes refreshed),
    and those gone whose event has not arrived yet, for up to ``event_grace`` seconds."""
    undecided = [a for a in tracked if a.outcome is None]
    try:
        listed = {str(i["metadata"]["uid"]) for i in await cluster.accelerations()}
    except ApiError as err:
        log.warning("could not list the MeshAccelerations", extra={"error": str(err)})
        return [a for a in undecided if a.gone_at is None], [a for a in undecided if a.gone_at]
    present, awaiting = [], []
    for acceleration in undecided:
        if acceleration.uid in listed:
            acceleration.nodes = await _nodes(cluster, acceleration)
            present.append(acceleration)
            continue
        if acceleration.gone_at is None:
            acceleration.gone_at = now
        outcome, detail = await _verdict(cluster, acceleration)
        if outcome == Outcome.UNCONFIRMED and now - acceleration.gone_at < event_grace:
            awaiting.append(acceleration)
            continue
        acceleration.outcome, acceleration.detail = outcome, detail
        log.info(
            "MeshAcceleration uninstalled"
            if acceleration.outcome == Outcome.CLEAN
            else "MeshAcceleration gone, its agents not all confirmed",
            extra={
                "acceleration": acceleration.name,
                "outcome": str(acceleration.outcome),
                "detail": acceleration.detail,
            },
        )
    return present, awaiting


async def _verdict(cluster: Cluster, acceleration: Tracked) -> tuple[Outcome, str]:
    try:
        events = await cluster.events(acceleration.uid)
    except ApiError as err:
        return Outcome.UNCONFIRMED, f"its events could not be read: {err}"
    reasons = {str(event.get("reason")): str(event.get("message", "")) for event in events}
    if INCOMPLETE in reasons:
        return Outcome.INCOMPLETE, reasons[INCOMPLETE]
    if UNINSTALLED in reasons:
        return Outcome.CLEAN, reasons[UNINSTALLED]
    return Outcome.UNCONFIRMED, "no Uninstalled event from the operator"


async def _abandon(cluster: Cluster, acceleration: Tracked, why: str) -> None:
    """Remove the operator's finalizer, so that the deletion ends without it."""
    for _ in range(5):  # each refusal is another writer's change: read and try again
        found = [
            item
            for item in await cluster.accelerations()
            if item["metadata"]["uid"] == acceleration.uid
        ]
        if not found or FINALIZER not in (found[0]["metadata"].get("finalizers") or []):
            break
        if await cluster.remove_finalizer(found[0]):
            break
    else:
        raise ApiError(f"the finalizer of MeshAcceleration {acceleration.name} kept changing")
    acceleration.outcome = Outcome.ABANDONED
    acceleration.detail = f"{why}: the hook removed the finalizer {FINALIZER}"
    log.warning(
        "gave up waiting: removed the finalizer without the agents' uninstall",
        extra={"acceleration": acceleration.name, "reason": why},
    )


def cleanup_advice(acceleration: Tracked) -> str:
    """What to do on the nodes that may still hold ``acceleration``'s pinned datapath."""
    nodes = ", ".join(sorted(acceleration.nodes)) or "(no agent pod was seen)"
    pins = f"{rendering.PIN_ROOT}/{acceleration.instance}"
    return (
        f"nodes that may still hold its pinned datapath ({pins}): {nodes}. It keeps "
        "accelerating the pods it had until removed (new pods take the mesh's iptables path). "
        f"To remove it: install meshaccel again, create a MeshAcceleration named "
        f"{acceleration.name} (its agents adopt the pins) and delete it while the operator "
        f"runs; or, on each of those nodes, run `meshaccel-agent uninstall --instance "
        f"{acceleration.instance}` with the host's /sys/fs/bpf (the agent image), or as root "
        f"`rm -r {pins}`; a reboot of the node removes it too"
    )


def _summarize(tracked: list[Tracked]) -> None:
    unclean = [a for a in tracked if a.outcome != Outcome.CLEAN]
    for acceleration in unclean:
        log.warning(
            f"MeshAcceleration {acceleration.name}: {acceleration.outcome}: "
            f"{acceleration.detail}; {cleanup_advice(acceleration)}",
            extra={
                "acceleration": acceleration.name,
                "outcome": str(acceleration.outcome),
                "nodes": sorted(acceleration.nodes),
            },
        )
    if unclean:
        log.warning(
            "NOT every node is clean: see the lines above for the nodes that may still hold a "
            "pinned datapath and how to remove it",
            extra={"not_confirmed": [a.name for a in unclean]},
        )
    else:
        log.info(
            "every MeshAcceleration uninstalled: every agent confirmed, no node holds a datapath",
            extra={"accelerations": [a.name for a in tracked]},
        )


# -- the command -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None, environ: Mapping[str, str] = os.environ) -> Any:
    parser = argparse.ArgumentParser(
        prog="meshaccel-operator pre-delete",
        description="Delete every MeshAcceleration and wait until the operator has uninstalled "
        "their agents (Helm's pre-delete hook).",
    )
    parser.add_argument(
        "--namespace",
        default=environ.get("MESHACCEL_NAMESPACE", DEFAULT_NAMESPACE),
        help="the release namespace: the operator's Deployment, the agents and their events",
    )
    parser.add_argument(
        "--operator-deployment",
        default="meshaccel",
        help="the operator's Deployment, whose ready replicas say whether it is running",
    )
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds")
    parser.add_argument(
        "--operator-grace",
        type=float,
        default=DEFAULT_OPERATOR_GRACE,
        help="seconds without a ready operator replica before the wait ends early",
    )
    parser.add_argument("--log-format", choices=("json", "text"), default="json")
    args = parser.parse_args(argv)
    if not 1 <= args.timeout <= 3600 or not 0 <= args.operator_grace <= args.timeout:
        parser.error("--timeout must be 1 to 3600 s, --operator-grace 0 s to the timeout")
    return args


async def _main(args: Any) -> int:
    api = await api_client()
    try:
        cluster = KubeCluster(api, args.namespace, args.operator_deployment)
        await run(cluster, Limits(timeout=args.timeout, operator_grace=args.operator_grace))
    except ApiError as err:
        log.error(
            "cannot uninstall the MeshAccelerations: the release stays, try again", exc_info=err
        )
        return 1
    finally:
        await api.close()  # type: ignore[no-untyped-call]
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_format, "info")
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
