"""The agent's HTTP API: an aiohttp application over a reconciler (:mod:`.reconcile`).

PUT /v1/pods (the node's set), POST /v1/uninstall, GET /v1/pods, /v1/status and /v1/health
need the operator (mutual TLS, :mod:`.listener`; its identity in the client certificate);
/healthz, /readyz and /metrics are open and say nothing an attacker could use. docs/agent.md,
"API", has every path's replies; docs/security.md why each is open or not. ``tls=None`` turns
authentication off (plain HTTP): only for a demo bound to loopback (``main`` checks).

Every 4xx and 5xx body is an :class:`~meshaccel.contract.api.ErrorReply`, and a refused request
changes nothing; an unexpected error is a 500 whose traceback is logged, never sent.

Blocking work runs in threads: applies and the uninstall on one dedicated thread behind an
asyncio lock (one at a time, in arrival order; nothing applies after an uninstall), reads on
the loop's default executor. Background tasks remove pods whose cgroup is gone and retry
unresolved ones (every ``retry_interval``), and re-read changed TLS files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from aiohttp import hdrs, web
from pydantic import BaseModel, ValidationError

from meshaccel.agent import prerequisites
from meshaccel.agent.datapath import AppConnectionUse, Datapath
from meshaccel.agent.layout import DatapathFeatures
from meshaccel.agent.libbpf import BpfError
from meshaccel.agent.listener import Limits, Listener
from meshaccel.agent.metrics import AgentMetrics
from meshaccel.agent.prerequisites import DatapathError
from meshaccel.agent.reconcile import (
    POD_MAPS,
    ApplyFailedError,
    ApplyRefusedError,
    GenerationConflictError,
    Reconciler,
    StaleEpochError,
    StaleGenerationError,
)
from meshaccel.agent.tls import ServerTLS
from meshaccel.contract.api import (
    VERSION_HEADER,
    AppConnections,
    AppliedPod,
    ErrorReply,
    HealthReply,
    MapUsage,
    PodSet,
    PodsReply,
    ProbeReply,
    ProgramStatus,
    StartupDecision,
    StatusReply,
    UninstallReply,
)
from meshaccel.contract.tls import is_operator
from meshaccel.contract.version import VERSION

log = logging.getLogger(__name__)

RETRY_INTERVAL_SECONDS = 5.0
TLS_RELOAD_SECONDS = 5.0  # kubelet takes up to a minute or so to update a mounted Secret
DEFAULT_DRAIN_SECONDS = 2.0  # as the agent's drain_seconds setting
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})


@dataclass(frozen=True)
class DatapathInfo:
    """What the agent knows of how its datapath was set up (for /v1/status), if it knows."""

    attach_cgroup: Path | None = None
    features: DatapathFeatures | None = None
    startup: StartupDecision | None = None
    startup_reason: str | None = None  # why a pinned datapath was reloaded (or kept)


@dataclass(frozen=True)
class _Auth:
    required: bool  # serving TLS: /v1 needs the operator's client certificate
    metrics_require_auth: bool


@dataclass
class _Worker:
    """The apply thread and its lock; made by the app's cleanup context, at start-up."""

    executor: ThreadPoolExecutor | None = None
    lock: asyncio.Lock | None = None

    def executor_and_lock(self) -> tuple[ThreadPoolExecutor, asyncio.Lock]:
        if self.executor is None or self.lock is None:
            raise RuntimeError("the application has not been started")
        return self.executor, self.lock


@dataclass
class _Uninstall:
    """POST /v1/uninstall's progress. ``requested`` is set on the loop before the lock is
    awaited (sets are refused from then on); ``done`` and ``error`` are set on the apply thread,
    so that an uninstall cut off by a shutdown still records its outcome."""

    drain_seconds: float
    requested: bool = False
    done: bool = False
    error: str | None = None


RECONCILER = web.AppKey("reconciler", Reconciler[Datapath])
METRICS = web.AppKey("metrics", AgentMetrics)
DATAPATH_INFO = web.AppKey("datapath_info", DatapathInfo)
AUTH = web.AppKey("auth", _Auth)
WORKER = web.AppKey("worker", _Worker)
UNINSTALL = web.AppKey("uninstall", _Uninstall)
RETRY_INTERVAL = web.AppKey("retry_interval", float)
LISTENER = web.AppKey("listener", Listener)
TLS_RELOAD_INTERVAL = web.AppKey("tls_reload_interval", float)
POD_SET_SOURCE: web.AppKey[str | None] = web.AppKey("pod_set_source")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- replies -------------------------------------------------------------------------------------


def json_reply(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(
        text=model.model_dump_json(), status=status, content_type="application/json"
    )


def error_reply(
    status: int,
    message: str,
    *,
    detail: list[dict[str, object]] | None = None,
    applied_generation: int | None = None,
    applied_epoch: int = 0,
    headers: dict[str, str] | None = None,
) -> web.Response:
    reply = ErrorReply(
        error=message,
        detail=detail,
        applied_generation=applied_generation,
        applied_epoch=applied_epoch,
    )
    response = json_reply(reply, status)
    response.headers.update(headers or {})
    return response


# -- middlewares ---------------------------------------------------------------------------------

# Headers of an HTTPException worth keeping on the JSON reply (Allow for 405, and so on).
_KEPT_HEADERS = (hdrs.ALLOW, hdrs.WWW_AUTHENTICATE, hdrs.RETRY_AFTER)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error becomes a JSON ErrorReply; unexpected ones a 500 without a traceback."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {str(name): exc.headers[name] for name in _KEPT_HEADERS if name in exc.headers}
        return error_reply(exc.status, exc.text or exc.reason, headers=headers)
    except Exception:
        log.exception(
            "request failed",
            extra={"event": "http_error", "method": request.method, "path": request.path},
        )
        return error_reply(500, "internal error: the agent's log has the details")


@web.middleware
async def connection_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tell the listener a request's headers are in (its header deadline is off), and done."""
    listener = request.app[LISTENER]
    listener.request_started(request.transport)
    try:
        return await handler(request)
    finally:
        listener.request_finished(request.transport)


def _is_public(request: web.Request) -> bool:
    resource = request.match_info.route.resource
    path = resource.canonical if resource is not None else None
    if path in PUBLIC_PATHS:
        return True
    return path == "/metrics" and not request.app[AUTH].metrics_require_auth


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Past the open paths, only the operator: its verified client certificate names it."""
    if not request.app[AUTH].required or _is_public(request):
        return await handler(request)
    transport = request.transport
    peercert = transport.get_extra_info("peercert") if transport is not None else None
    if not peercert:
        raise web.HTTPForbidden(text="the operator's client certificate is required")
    if not is_operator(peercert):
        log.warning(
            "client certificate refused: not the operator's",
            extra={
                "event": "auth_failed",
                "remote": request.remote,
                "path": request.path,
                "subject_alt_name": [list(n) for n in peercert.get("subjectAltName", ())],
            },
        )
        raise web.HTTPForbidden(text="this client certificate does not name the operator")
    return await handler(request)


# -- handlers ------------------------------------------------------------------------------------


def _is_json(content_type: str) -> bool:
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (
        mime.startswith("application/") and mime.endswith("+json")
    )


def _loc(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(body)"


def _validation_reply(err: ValidationError) -> web.Response:
    errors = err.errors(include_url=False, include_input=False, include_context=False)
    first = errors[0]
    if any(e["type"] == "json_invalid" for e in errors):
        return error_reply(400, f"the body is not valid JSON: {first['msg']}")
    return error_reply(
        422,
        f"invalid pod set ({len(errors)} error{'s' if len(errors) > 1 else ''}): "
        f"{_loc(first['loc'])}: {first['msg']}",
        detail=[dict(e) for e in errors],
    )


def _standalone_refusal(app: web.Application) -> web.Response | None:
    if (source := app[POD_SET_SOURCE]) is not None:
        return error_reply(409, f"this agent takes its pod set from {source}, not from the API")
    return None


def _uninstalled_refusal(app: web.Application) -> web.Response | None:
    if not app[UNINSTALL].requested:
        return None
    return error_reply(
        409,
        "this agent was uninstalled (POST /v1/uninstall): it takes no pod sets; "
        "restart it to load the datapath again",
    )  # no applied_generation: on a 409 it means "send a higher generation" (ErrorReply)


def is_uninstalled(app: web.Application) -> bool:
    """POST /v1/uninstall has removed the datapath (for ``main`` at shutdown)."""
    return app[UNINSTALL].done


async def put_pods(request: web.Request) -> web.Response:
    """PUT /v1/pods: apply the node's complete desired set."""
    if (
        refused := _standalone_refusal(request.app) or _uninstalled_refusal(request.app)
    ) is not None:
        return refused
    if hdrs.CONTENT_TYPE in request.headers and not _is_json(request.headers[hdrs.CONTENT_TYPE]):
        return error_reply(415, "send the pod set as application/json")
    seconds = request.app[LISTENER].limits.body_timeout
    try:
        async with asyncio.timeout(seconds):
            body = await request.read()  # 413 beyond client_max_size
    except TimeoutError:
        response = error_reply(408, f"the body did not arrive within {seconds:g} s")
        response.force_close()
        return response
    try:
        # Strict: JSON's own types only (no true for a port, no number for an address).
        pod_set = await asyncio.to_thread(partial(PodSet.model_validate_json, strict=True), body)
    except ValidationError as err:
        return _validation_reply(err)
    reconciler = request.app[RECONCILER]
    executor, lock = request.app[WORKER].executor_and_lock()
    async with lock:
        # An uninstall may have been queued on the lock ahead of this set.
        if (refused := _uninstalled_refusal(request.app)) is not None:
            return refused
        try:
            result = await asyncio.get_running_loop().run_in_executor(
                executor, reconciler.apply, pod_set
            )
        except StaleEpochError as err:  # no applied_generation: nothing to retry
            return error_reply(409, err.message, applied_epoch=err.applied)
        except (StaleGenerationError, GenerationConflictError) as err:
            return error_reply(409, err.message, applied_generation=err.applied_generation)
        except ApplyRefusedError as err:
            return error_reply(422, err.message, applied_generation=err.applied_generation)
        except ApplyFailedError as err:
            status = 507 if err.map_full and err.rolled_back else 500
            return error_reply(status, err.message, applied_generation=err.applied_generation)
    request.app[METRICS].observe_apply(result.duration_ms / 1000)
    if knows_version(request):
        result = result.model_copy(update={"version": VERSION})
    return json_reply(result)


def _unload(state: _Uninstall, datapath: Datapath) -> float:
    """On the apply thread: the same unload as ``meshaccel-agent uninstall`` of a complete
    datapath. Records the outcome itself (see :class:`_Uninstall`); returns milliseconds."""
    started = time.perf_counter()
    try:
        # Closes the maps (the reconciler's writes go through them), then unload_pins().
        datapath.unload(drain_seconds=state.drain_seconds)
    except Exception as err:
        state.error = f"{type(err).__name__}: {err}"
        raise
    state.done, state.error = True, None
    return (time.perf_counter() - started) * 1000


async def post_uninstall(request: web.Request) -> web.Response:
    """POST /v1/uninstall: remove the datapath; take no sets afterwards. Idempotent."""
    if (refused := _standalone_refusal(request.app)) is not None:
        return refused
    app = request.app
    state, reconciler = app[UNINSTALL], app[RECONCILER]
    executor, lock = app[WORKER].executor_and_lock()
    first = not state.requested
    state.requested = True  # before the lock: sets that arrive from now on are refused
    if first:
        log.info(
            "uninstall requested: taking no more pod sets",
            extra={"event": "uninstall_requested", "remote": request.remote},
        )
    async with lock:
        if state.done:
            return json_reply(
                UninstallReply(already=True, duration_ms=0, boot_id=reconciler.boot_id)
            )
        pins = str(reconciler.datapath.pins.root)
        log.info(
            "uninstalling: detaching the datapath and removing its pins",
            extra={"event": "uninstall", "pins": pins, "drain_seconds": state.drain_seconds},
        )
        try:
            duration_ms = await asyncio.get_running_loop().run_in_executor(
                executor, _unload, state, reconciler.datapath
            )
        except Exception:
            log.exception("uninstall failed", extra={"event": "uninstall_failed", "pins": pins})
            return error_reply(
                500,
                f"uninstall failed ({state.error}); the agent's log has the details, "
                "and a repeated request tries again",
            )
    log.info("uninstalled", extra={"event": "uninstalled", "pins": pins})
    return json_reply(
        UninstallReply(already=False, duration_ms=duration_ms, boot_id=reconciler.boot_id)
    )


async def get_pods(request: web.Request) -> web.Response:
    """GET /v1/pods: the pods of the applied set, programmed or unresolved."""
    return await pods_reply(request.app)


async def pods_reply(app: web.Application) -> web.Response:
    reconciler = app[RECONCILER]
    snapshot = reconciler.snapshot
    use = {} if is_uninstalled(app) else await asyncio.to_thread(app_connections, reconciler)
    entries = sorted(snapshot.entries.values(), key=lambda e: (e.spec.namespace, e.spec.name))
    return json_reply(
        PodsReply(
            applied_generation=snapshot.applied_generation,
            pods=[
                AppliedPod(
                    uid=e.spec.uid,
                    namespace=e.spec.namespace,
                    name=e.spec.name,
                    ip=e.spec.ip,
                    ips=e.spec.ips,
                    cgroup_id=e.cgroup_id,
                    app_connections=tuple(
                        AppConnections(ip=ip, **asdict(use[ip]))
                        for ip in e.spec.addresses
                        if ip in use
                    ),
                )
                for e in entries
            ],
            unresolved=list(snapshot.unresolved),
        )
    )


def app_connections(
    reconciler: Reconciler,
) -> Mapping[IPv4Address | IPv6Address, AppConnectionUse]:
    """The datapath's records of application connections; none, which the log says, if the
    kernel does not give them: /v1/pods still answers with what the reconciler knows."""
    try:
        return reconciler.datapath.app_connections()
    except (BpfError, DatapathError, OSError) as err:
        log.warning("app_reuse unreadable: %s", err, extra={"event": "pods"})
        return {}


def knows_version(request: web.Request) -> bool:
    """The client knows the replies' ``version`` field: it sent its own (VERSION_HEADER)."""
    return VERSION_HEADER in request.headers


async def get_status(request: web.Request) -> web.Response:
    """GET /v1/status."""
    return await status_reply(request.app, version=knows_version(request))


async def status_reply(app: web.Application, *, version: bool) -> web.Response:
    status = await asyncio.to_thread(build_status, app[RECONCILER], app[DATAPATH_INFO])
    update: dict[str, object] = {"not_ready": not_ready(app)}
    if version:
        update["version"] = VERSION
    if app[UNINSTALL].done:
        update["uninstalled"] = True
    return json_reply(status.model_copy(update=update))


async def get_health(request: web.Request) -> web.Response:
    """GET /v1/health: the operator's probe (its process, its set, its trust)."""
    return health_reply(request.app, version=knows_version(request))


def health_reply(app: web.Application, *, version: bool) -> web.Response:
    snapshot = app[RECONCILER].snapshot
    tls = app[LISTENER].tls
    return json_reply(
        HealthReply(
            boot_id=snapshot.boot_id,
            applied_generation=snapshot.applied_generation,
            applied_epoch=snapshot.applied_epoch,
            trust_bundle=tls.trust_bundle if tls is not None else None,
            version=VERSION if version else None,
        )
    )


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the process serves requests, and which build it is; nothing else."""
    return json_reply(ProbeReply(version=VERSION))


def not_ready(app: web.Application) -> str | None:
    """Why /readyz says 503 (None: ready)."""
    state = app[UNINSTALL]
    if state.done:
        return "uninstalled (POST /v1/uninstall): nothing is attached"
    if state.requested:
        why = f"it failed: {state.error}" if state.error else "in progress"
        return f"an uninstall was requested ({why})"
    reconciler = app[RECONCILER]
    missing = reconciler.datapath.missing_attachments()
    if missing:
        return f"not attached: missing pins {', '.join(missing)}"
    if reconciler.snapshot.applied_generation is None:
        return "no pod set has been applied yet"
    return None


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: ok or not; why not is behind /v1/status."""
    if not_ready(request.app) is not None:
        return error_reply(503, "not ready")
    return json_reply(ProbeReply())


async def metrics(request: web.Request) -> web.Response:
    body, content_type = await asyncio.to_thread(
        request.app[METRICS].render, request.headers.get(hdrs.ACCEPT, "")
    )
    return web.Response(body=body, headers={hdrs.CONTENT_TYPE: content_type})


ROUTES = [
    web.put("/v1/pods", put_pods),
    web.get("/v1/pods", get_pods),
    web.post("/v1/uninstall", post_uninstall),
    web.get("/v1/status", get_status),
    web.get("/v1/health", get_health),
    web.get("/healthz", healthz),
    web.get("/readyz", readyz),
    web.get("/metrics", metrics),
]


# -- status ----------------------------------------------------------------------------------------


def build_status(reconciler: Reconciler, info: DatapathInfo) -> StatusReply:
    """GET /v1/status's reply. Blocks (reads pins and a map): run it in a thread."""
    snapshot = reconciler.snapshot
    pins = reconciler.datapath.pins
    programs = [
        ProgramStatus(
            hook=p.hook,
            program=p.program,
            pin=str(p.pin),
            attached=p.attached,
            link_id=p.link_id,
            program_id=p.program_id,
        )
        for p in reconciler.datapath.programs()
    ]
    try:
        counters: dict[str, int] | None = {
            c.metric_name: n for c, n in reconciler.datapath.counters().items()
        }
    except Exception:
        log.warning("datapath counters unreadable", exc_info=True, extra={"event": "status"})
        counters = None
    return StatusReply(
        boot_id=snapshot.boot_id,
        started_at=snapshot.started_at,
        pin_root=str(pins.root),
        attach_cgroup=None if info.attach_cgroup is None else str(info.attach_cgroup),
        datapath_features=None
        if info.features is None
        else sorted(f.name or str(f.value) for f in DatapathFeatures if f in info.features),
        startup=info.startup,
        startup_reason=info.startup_reason,
        attached=all(p.attached for p in programs),
        programs=programs,
        kernel_features=prerequisites.kernel_features(),
        applied_generation=snapshot.applied_generation,
        applied_epoch=snapshot.applied_epoch,
        last_apply_time=snapshot.last_apply_time,
        pods_accelerated=snapshot.programmed,
        unresolved=list(snapshot.unresolved),
        maps=[
            MapUsage(
                name=name,
                entries=snapshot.map_entries.get(name, 0),
                max_entries=snapshot.map_capacity.get(name, 0),
            )
            for name in POD_MAPS
        ],
        counters=counters,
        apply_errors=snapshot.apply_errors_total,
        apply_errors_by_reason=dict(snapshot.apply_errors),
        pods_vanished=snapshot.pods_vanished,
    )


# -- background work -----------------------------------------------------------------------------


async def _tend_pods(app: web.Application) -> None:
    """Every ``retry_interval``: remove the pods whose cgroup is gone, then retry the unresolved
    (in that order: a pod whose cgroup was made again is programmed with its new id at once).
    Both run on the apply thread, behind the apply lock."""
    reconciler, interval = app[RECONCILER], app[RETRY_INTERVAL]
    executor, lock = app[WORKER].executor_and_lock()
    loop = asyncio.get_running_loop()
    uninstall = app[UNINSTALL]
    while True:
        await asyncio.sleep(interval)
        snapshot = reconciler.snapshot
        if not (snapshot.entries or snapshot.unresolved) or uninstall.requested:
            continue
        result = None
        async with lock:
            if uninstall.requested:  # the maps are closed, or about to be
                continue
            try:
                await loop.run_in_executor(executor, reconciler.remove_vanished)
            except ApplyFailedError:
                pass  # the reconciler logged it and counted it; the unresolved are retried
            except Exception:
                log.exception(
                    "removing pods whose cgroup is gone failed", extra={"event": "vanish_failed"}
                )
            if reconciler.snapshot.unresolved:
                try:
                    result = await loop.run_in_executor(executor, reconciler.retry_unresolved)
                except (ApplyRefusedError, ApplyFailedError):
                    continue  # the reconciler logged it and counted it
                except Exception:
                    log.exception(
                        "retrying unresolved pods failed", extra={"event": "retry_failed"}
                    )
                    continue
        if result is not None and result.added:
            app[METRICS].observe_apply(result.duration_ms / 1000)


async def _apply_worker(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the apply thread, its lock and the pod-tending task, for the app's
    lifetime."""
    worker = app[WORKER]
    worker.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshaccel-apply")
    worker.lock = asyncio.Lock()
    retry = None
    if app[RETRY_INTERVAL] > 0:
        retry = asyncio.create_task(_tend_pods(app), name="meshaccel-tend-pods")
    try:
        yield
    finally:
        if retry is not None:
            retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retry
        # An apply in flight finishes (it is all or nothing anyway) before the app is gone.
        await asyncio.to_thread(worker.executor.shutdown, wait=True)
        worker.executor = worker.lock = None


async def _reload_tls(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: every ``tls_reload_interval``, the TLS files again if they changed."""
    tls, interval = app[LISTENER].tls, app[TLS_RELOAD_INTERVAL]

    async def watch(tls: ServerTLS) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                tls.reload_if_changed()  # a few small files: read on the loop
            except Exception:  # a bug here must not end the reloads for good
                log.exception("TLS reload failed", extra={"event": "tls_reload_failed"})

    task = None
    if tls is not None and interval > 0:
        task = asyncio.create_task(watch(tls), name="meshaccel-tls-reload")
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# -- the factory, and serving --------------------------------------------------------------------


def create_app(
    reconciler: Reconciler,
    *,
    tls: ServerTLS | None,
    limits: Limits | None = None,
    datapath_info: DatapathInfo | None = None,
    metrics_require_auth: bool = False,
    retry_interval: float | None = RETRY_INTERVAL_SECONDS,
    tls_reload_interval: float | None = TLS_RELOAD_SECONDS,
    pod_set_source: str | None = None,
    drain_seconds: float = DEFAULT_DRAIN_SECONDS,
) -> web.Application:
    """The agent's API over ``reconciler``. ``tls=None`` disables authentication (plain HTTP,
    a demo on loopback only); ``limits`` bound what clients may hold (the app's
    :data:`LISTENER` serves it with them: ``main``); ``retry_interval=None`` disables the
    background work (removing pods whose cgroup is gone, retrying unresolved pods), and
    ``tls_reload_interval=None`` the TLS files' reload; ``pod_set_source`` names where the pod
    set comes from when it is not the API (standalone mode's file): PUT /v1/pods and POST
    /v1/uninstall are then refused, so that two writers never fight; ``drain_seconds`` is POST
    /v1/uninstall's drain (the agent's setting)."""
    if drain_seconds < 0:
        raise ValueError(f"drain_seconds must not be negative, not {drain_seconds}")
    limits = limits or Limits()
    app = web.Application(
        middlewares=[connection_middleware, error_middleware, auth_middleware],
        client_max_size=limits.max_body_bytes,
    )
    app[RECONCILER] = reconciler
    app[DATAPATH_INFO] = datapath_info or DatapathInfo()
    app[AUTH] = _Auth(required=tls is not None, metrics_require_auth=metrics_require_auth)
    app[LISTENER] = Listener(limits, tls)
    app[METRICS] = AgentMetrics(
        reconciler, attached=lambda: not reconciler.datapath.missing_attachments()
    )
    app[WORKER] = _Worker()
    app[RETRY_INTERVAL] = float(retry_interval or 0)
    app[TLS_RELOAD_INTERVAL] = float(tls_reload_interval or 0)
    app[POD_SET_SOURCE] = pod_set_source
    app[UNINSTALL] = _Uninstall(drain_seconds=drain_seconds)
    app.router.add_routes(ROUTES)
    app.cleanup_ctx.append(_apply_worker)
    app.cleanup_ctx.append(_reload_tls)
    return app


@contextlib.asynccontextmanager
async def serving(
    app: web.Application, host: str, port: int, *, shutdown_timeout: float
) -> AsyncIterator[Listener]:
    """``app`` served on ``host:port`` by its :data:`LISTENER` (limits, TLS) until the block
    ends; then no new connection is taken and the open ones get ``shutdown_timeout``."""
    listener = app[LISTENER]
    runner = web.AppRunner(
        app,
        shutdown_timeout=shutdown_timeout,
        keepalive_timeout=listener.limits.keepalive_timeout,
        handle_signals=False,
    )
    await runner.setup()
    try:
        assert runner.server is not None  # made by setup()
        await listener.start(runner.server, host, port)
        yield listener
    finally:
        await listener.stop()
        await runner.cleanup()
