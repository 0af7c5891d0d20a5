"""The agent's local, read-only API: GET /v1/status, /v1/pods and /v1/health of the API
application (:mod:`.server`) on a unix socket in the agent's pod (:class:`~.listener.LocalSocket`),
for ``meshaccel-agent status|pods`` (:mod:`.commands`). No route changes anything; who can reach
it: docs/security.md, "The local socket"."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from meshaccel.agent.listener import LocalSocket
from meshaccel.agent.server import error_middleware, health_reply, pods_reply, status_reply

log = logging.getLogger(__name__)

API_APP = web.AppKey("api_app", web.Application)


# Its clients are this release's `meshaccel-agent`: they know every field.
async def local_status(request: web.Request) -> web.Response:
    return await status_reply(request.app[API_APP], version=True)


async def local_pods(request: web.Request) -> web.Response:
    return await pods_reply(request.app[API_APP])


async def local_health(request: web.Request) -> web.Response:
    return health_reply(request.app[API_APP], version=True)


LOCAL_ROUTES = [
    web.get("/v1/status", local_status),
    web.get("/v1/pods", local_pods),
    web.get("/v1/health", local_health),
]


def create_local_app(api: web.Application) -> web.Application:
    """The read-only view of ``api`` for its local socket: GET /v1/status, /v1/pods and
    /v1/health, answered from ``api``'s state. It has no other route (PUT /v1/pods is 405,
    POST /v1/uninstall 404): nothing through it changes anything."""
    app = web.Application(middlewares=[error_middleware])
    app[API_APP] = api
    app.router.add_routes(LOCAL_ROUTES)
    return app


@contextlib.asynccontextmanager
async def serving_locally(
    api: web.Application, path: Path | None, *, shutdown_timeout: float
) -> AsyncIterator[LocalSocket | None]:
    """:func:`create_local_app` of ``api`` on the unix socket ``path`` until the block ends
    (``path`` None: nowhere). A socket that cannot be made is a warning, not a failure: the
    datapath and the operator's API do not depend on it (yields None)."""
    if path is None:
        yield None
        return
    local: LocalSocket | None = None
    try:
        local = LocalSocket.bind(path)
    except OSError as err:
        log.warning(
            "no local socket: `meshaccel-agent status` and `pods` cannot reach this agent",
            extra={"socket": str(path), "reason": f"{type(err).__name__}: {err}"},
        )
    if local is None:
        yield None
        return
    runner = web.AppRunner(
        create_local_app(api), shutdown_timeout=shutdown_timeout, handle_signals=False
    )
    try:
        await runner.setup()
        await web.SockSite(runner, local.sock).start()
        log.info("serving the local read-only API", extra={"socket": str(path)})
        yield local
    finally:
        local.unlink()  # while it still listens: the path is still this socket's
        await runner.cleanup()
        local.close()
