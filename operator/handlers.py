"""Kopf handlers: thin, each translating one kind of event into :class:`~.runtime.Operator` calls.

Which replica writes to the agents follows Kopf's peering: :func:`writer`, a daemon per
MeshAcceleration, runs only while Kopf keeps this replica active (Kopf stops every daemon when
peering pauses the replica, and starts them again when it resumes), and while one runs the
replica takes the writer's Lease (:mod:`.leadership`). Kopf marks the objects of a listing with
no event type: the watch handlers pass it on, so that a re-list after a watch gap is noticed.

Kopf keeps its bookkeeping in annotations under ``meshaccel.io`` (never in ``.status``, whose
schema the CRD defines completely), the finalizer is ``meshaccel.io/uninstall``, and its own
log lines are posted as Events only from WARNING up: the operator posts its own Events
(``kopf.event``, which that level does not filter) for condition changes and the uninstall.
Every status written is also published as gauges (:class:`~.metrics.ResourceMetrics`), which
go with the resource.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf
from pydantic import ValidationError

from meshaccel.operator import memory, models
from meshaccel.operator.config import OperatorConfig, operator_config, parse_args
from meshaccel.operator.kube import api_client
from meshaccel.operator.metrics import resource_metrics
from meshaccel.operator.models import ConditionStatus, ConditionType, MeshAccelerationSpec
from meshaccel.operator.runtime import Operator
from meshaccel.operator.status import Transition

# The operator's own registry (not Kopf's global default): explicit, and immune to whatever
# else in the process registers handlers. main.py and the tests run exactly this one.
REGISTRY = kopf.OperatorRegistry()
MESH_ACCELERATIONS = (models.GROUP, models.VERSION, models.PLURAL)
FINALIZER = "meshaccel.io/uninstall"
# Seconds between status refreshes of each resource. Read once, when Kopf registers the
# timer (tests shorten it through the environment before importing this module).
STATUS_INTERVAL = float(os.environ.get("MESHACCEL_STATUS_INTERVAL", "5"))
UNINSTALL_ATTEMPTS = 3

log = logging.getLogger("meshaccel.operator")


def configure(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="meshaccel.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="meshaccel.io", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    # A deletion waits for the status timer to exit; Kopf re-checks a timer still running at
    # that moment only after this many seconds (default 60): the finalizer would wait as long.
    settings.background.cancellation_polling = 1
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    if not settings.peering.standalone:
        if settings.peering.priority == 0:
            # Equal priorities freeze every replica: each picks its own, the highest works.
            settings.peering.priority = random.randint(1, 1_000_000)
        # A replica not heard of for this long is dead: the paused one takes over.
        settings.peering.lifetime = config.peering_lifetime


@kopf.on.login(registry=REGISTRY)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod, the ServiceAccount; elsewhere (tests, a laptop), $KUBECONFIG."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup(registry=REGISTRY)
async def startup(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> None:
    if "config" not in memo:
        # Started by `kopf run -m meshaccel.operator.handlers` (tests): settings from MESHACCEL_*.
        memo.config = operator_config(parse_args([]))
    config: OperatorConfig = memo.config
    configure(settings, config)
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=config.request_timeout),
        # Pushes to every node at once (aiohttp would queue past 100 connections), and kept
        # alive between pushes: health probes every 15 s keep them warm.
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
    )
    runtime = Operator(config, await api_client(), session)
    runtime.start()
    resource_metrics()  # its families are scraped (empty) before the first status
    memo.runtime = runtime
    memo.compactor = asyncio.create_task(
        memory.compact_when_settled(lambda: len(runtime.picture.pods))
    )


@kopf.on.cleanup(registry=REGISTRY)
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    compactor: asyncio.Task[None] | None = memo.get("compactor")
    if compactor is not None:
        compactor.cancel()
    runtime: Operator | None = memo.get("runtime")
    if runtime is not None:
        await runtime.close()


@kopf.on.probe(id="accelerations", registry=REGISTRY)
def probe(memo: kopf.Memo, **_: Any) -> dict[str, int | None]:
    runtime: Operator = memo.runtime
    return {
        "accelerations": len(runtime.picture.accelerations),
        "pods_known": len(runtime.picture.pods),
        "epoch": runtime.epoch,  # the term this replica writes in; None: it does not write
    }


# -- the cluster as the picture sees it ---------------------------------------------------------
# async on purpose: Kopf runs plain functions in threads, and the picture and the pushers
# belong to the event loop.


@kopf.on.event("", "v1", "namespaces", registry=REGISTRY)
async def namespace_event(
    name: str, labels: kopf.Labels, type: str | None, memo: kopf.Memo, **_: Any
) -> None:
    memo.runtime.namespace_event(name, dict(labels), type)


@kopf.on.event("", "v1", "nodes", registry=REGISTRY)
async def node_event(
    name: str, labels: kopf.Labels, type: str | None, memo: kopf.Memo, **_: Any
) -> None:
    memo.runtime.node_event(name, dict(labels), type)


@kopf.on.event("", "v1", "pods", registry=REGISTRY)
async def pod_event(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    memo.runtime.pod_event(body, type)


# -- MeshAccelerations -------------------------------------------------------------------------


def _spec(spec: kopf.Spec) -> MeshAccelerationSpec:
    try:
        return MeshAccelerationSpec.model_validate(dict(spec))
    except ValidationError as err:
        # The CRD schema admits it but the models do not: the two are out of step.
        raise kopf.PermanentError(f"spec does not match the operator's model: {err}") from err


@kopf.on.resume(*MESH_ACCELERATIONS, registry=REGISTRY)
@kopf.on.create(*MESH_ACCELERATIONS, registry=REGISTRY)
@kopf.on.update(*MESH_ACCELERATIONS, field="spec", registry=REGISTRY)
async def reconcile(
    name: str,
    uid: str,
    spec: kopf.Spec,
    meta: kopf.Meta,
    body: kopf.Body,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    runtime: Operator = memo.runtime
    created = str(meta.get("creationTimestamp") or "")
    converged = await runtime.reconcile(name, uid, created, _spec(spec))
    log.info("reconciled %s: %s", name, converged.summary())
    _report(runtime, name, body, meta, status, patch, converged.daemonset)


@kopf.timer(*MESH_ACCELERATIONS, interval=STATUS_INTERVAL, initial_delay=0.5, registry=REGISTRY)
async def refresh(
    name: str,
    body: kopf.Body,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Keep the agents' objects as rendered (and take over after a conflict), report status."""
    runtime: Operator = memo.runtime
    acceleration = runtime.picture.accelerations.get(name)
    if acceleration is None or meta.get("deletionTimestamp"):
        return
    converged = await runtime.converge(acceleration)
    _report(runtime, name, body, meta, status, patch, converged.daemonset)


@kopf.daemon(*MESH_ACCELERATIONS, cancellation_timeout=5, registry=REGISTRY)
async def writer(name: str, stopped: kopf.DaemonStopped, memo: kopf.Memo, **_: Any) -> None:
    """Kopf runs this only while the replica is active: while any runs, it may write."""
    runtime: Operator = memo.runtime
    reason = f"MeshAcceleration {name}"
    runtime.want(reason)
    try:
        await stopped.wait()
    finally:
        runtime.unwant(reason)


@kopf.on.delete(*MESH_ACCELERATIONS, retries=UNINSTALL_ATTEMPTS, backoff=5, registry=REGISTRY)
async def uninstall(
    name: str, uid: str, spec: kopf.Spec, body: kopf.Body, retry: int, memo: kopf.Memo, **_: Any
) -> None:
    """Every agent detaches before the resource (and, by ownership, its agents) goes."""
    runtime: Operator = memo.runtime
    port = int(spec.get("agent", {}).get("port", models.DEFAULT_AGENT_PORT))
    failed = await runtime.uninstall(name, uid, port)
    if failed and retry + 1 < UNINSTALL_ATTEMPTS:
        raise kopf.TemporaryError(f"agents on {sorted(failed)} did not uninstall yet", delay=5)
    if failed:
        kopf.event(
            body,
            type="Warning",
            reason="UninstallIncomplete",
            message=f"agents on {sorted(failed)} did not confirm: run `meshaccel-agent "
            f"uninstall` on those nodes to remove the pinned datapath ({failed})",
        )
    else:
        kopf.event(
            body, type="Normal", reason="Uninstalled", message="every agent detached its datapath"
        )
    await runtime.forget(name)
    resource_metrics().forget(name)


def _report(
    runtime: Operator,
    name: str,
    body: kopf.Body,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    daemonset: dict[str, Any] | None,
) -> None:
    current = _known_conditions(status)
    change, transitions = runtime.status(name, meta.get("generation"), current, daemonset)
    if change is not None:
        patch.status.update(change)
    _publish(name, current if change is None else _patched(current, change))
    for transition in transitions:
        _post(body, transition)


def _known_conditions(status: Mapping[str, Any]) -> dict[str, Any]:
    """The stored status without conditions of a type no longer written (0.1's Progressing):
    the status written next has none of them."""
    current = dict(status)
    if "conditions" in current:
        known = set(ConditionType)
        current["conditions"] = [c for c in current["conditions"] or () if c.get("type") in known]
    return current


def _patched(target: Any, patch: Any) -> Any:
    """``target`` with a JSON merge patch applied (RFC 7386), as the API server will store it."""
    if not isinstance(patch, Mapping):
        return patch
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _patched(result.get(key), value)
    return result


def _publish(name: str, status: Mapping[str, Any]) -> None:
    """The status as written, as gauges (operator/metrics.py ResourceMetrics)."""
    ready = any(
        c.get("type") == ConditionType.READY and c.get("status") == ConditionStatus.TRUE
        for c in status.get("conditions") or ()
    )
    resource_metrics().publish(
        name,
        ready=ready,
        selected=int(status.get("podsSelected") or 0),
        accelerated=int(status.get("podsAccelerated") or 0),
        not_accelerated={
            str(k): int(v) for k, v in (status.get("podsNotAccelerated") or {}).items()
        },
    )


def _post(body: kopf.Body, change: Transition) -> None:
    message = f"{change.type}={change.status} ({change.reason}) {change.message}".strip()
    kind = "Warning" if change.warning else "Normal"
    kopf.event(body, type=kind, reason=change.reason, message=message)
