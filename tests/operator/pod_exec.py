"""The ``pods/exec`` subresource for the API emulator: what ``kubectl exec`` and the kubernetes
client's ``stream()`` talk to, over the websocket channel protocol ``v4.channel.k8s.io``.

A test says what "runs" in a pod (:meth:`~tests.operator.emulator.ApiServerEmulator.on_exec`):
an :data:`ExecHandler` gets the command and returns stdout, stderr and an exit code;
:func:`run_process` runs a real process on this machine instead (a real agent's command).

On the wire, as the kubelet answers through a real API server: every binary frame starts with
its channel byte (1 stdout, 2 stderr, 3 the error channel); when the command ends the error
channel carries one JSON ``Status``: ``Success``, or ``Failure`` with reason
``NonZeroExitCode`` and the exit code as the message of a cause of reason ``ExitCode``, or
``Failure`` with another reason when the command could not run.

Refused before the upgrade, as a real API server refuses: a missing pod (404), a container the
pod does not have, or no container named in a pod with several (400), a completed pod (400),
a pod that is not running (400, the kubelet's "container not found"), a request that is not a
websocket upgrade (400). Not emulated: stdin, tty and resize (400), SPDY, ``v5.channel.k8s.io``
(its close frames), RBAC on ``pods/exec``.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp.web

V4_CHANNEL_PROTOCOL = "v4.channel.k8s.io"
STDOUT, STDERR, ERROR = 1, 2, 3
FRAME_BYTES = 16 * 1024  # long output goes out in several frames, as from a kubelet
_EXEC_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/exec$")


@dataclass(frozen=True)
class ExecRequest:
    namespace: str
    pod: str
    container: str
    command: tuple[str, ...]


@dataclass(frozen=True)
class ExecResult:
    stdout: bytes = b""
    stderr: bytes = b""
    exit_code: int = 0


ExecHandler = Callable[[ExecRequest], Awaitable[ExecResult]]


def run_process(
    argv_prefix: Sequence[str] = (), env: Mapping[str, str] | None = None
) -> ExecHandler:
    """A handler that runs the exec'd command as a real process on this machine (its argv
    after ``argv_prefix``), with ``env`` if given."""

    async def handler(request: ExecRequest) -> ExecResult:
        process = await asyncio.create_subprocess_exec(
            *argv_prefix,
            *request.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env) if env is not None else None,
        )
        stdout, stderr = await process.communicate()
        assert process.returncode is not None
        return ExecResult(stdout, stderr, process.returncode)

    return handler


def exec_target(path: str) -> tuple[str, str] | None:
    """(namespace, pod) when ``path`` is a pod's exec subresource."""
    match = _EXEC_PATH.match(path)
    return (match[1], match[2]) if match else None


def _status(code: int, reason: str, message: str) -> aiohttp.web.Response:
    body = {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return aiohttp.web.json_response(body, status=code)


def _exit_status(command: Sequence[str], exit_code: int) -> dict[str, Any]:
    if exit_code == 0:
        return {"metadata": {}, "status": "Success"}
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: error executing command "
        f"{list(command)}, exit code {exit_code}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(exit_code)}]},
    }


def _refusal(
    pod: Mapping[str, Any] | None, request: ExecRequest, query: Mapping[str, str]
) -> aiohttp.web.Response | None:
    """The API server's answer before any upgrade, or None when the exec may go ahead."""
    if pod is None:
        return _status(404, "NotFound", f'pods "{request.pod}" not found')
    if any(query.get(flag) in ("true", "1") for flag in ("stdin", "tty")):
        return _status(400, "BadRequest", "the emulator's exec takes no stdin and no tty")
    if not request.command:
        return _status(400, "BadRequest", "you must specify at least 1 command")
    names = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or ()]
    if request.container not in names:
        if not request.container:
            return _status(
                400,
                "BadRequest",
                f"a container name must be specified for pod {request.pod}, choose one of: {names}",
            )
        return _status(
            400, "BadRequest", f"container {request.container} is not valid for pod {request.pod}"
        )
    phase = (pod.get("status") or {}).get("phase")
    if phase in ("Succeeded", "Failed"):
        return _status(
            400,
            "BadRequest",
            f"cannot exec into a container in a completed pod; current phase is {phase}",
        )
    if phase != "Running":
        return _status(
            400,
            "BadRequest",
            f'unable to upgrade connection: container not found ("{request.container}")',
        )
    return None


async def serve_exec(
    raw: aiohttp.web.BaseRequest,
    pod: Mapping[str, Any] | None,
    handlers: Mapping[tuple[str, str], ExecHandler],
    record: Callable[[ExecRequest], None],
) -> aiohttp.web.StreamResponse:
    """Answer one exec request for ``pod`` (None: there is none) with the test's handler."""
    target = exec_target(raw.path)
    assert target is not None
    namespace, name = target
    query = raw.query
    containers = [c.get("name") for c in ((pod or {}).get("spec") or {}).get("containers") or ()]
    default = containers[0] if len(containers) == 1 else ""
    request = ExecRequest(
        namespace, name, query.get("container") or default, tuple(query.getall("command", ()))
    )
    refusal = _refusal(pod, request, query)
    if refusal is not None:
        return refusal
    socket = aiohttp.web.WebSocketResponse(protocols=(V4_CHANNEL_PROTOCOL,))
    if not socket.can_prepare(raw).ok:
        return _status(400, "BadRequest", "Upgrade request required")
    await socket.prepare(raw)
    record(request)
    handler = handlers.get((namespace, name))
    if handler is None:
        status: dict[str, Any] = {
            "metadata": {},
            "status": "Failure",
            "reason": "InternalError",
            "message": f"the emulator has no exec handler for pod {namespace}/{name}",
        }
    else:
        try:
            result = await handler(request)
        except Exception as e:  # what the test's handler raised: the command "could not run"
            status = {
                "metadata": {},
                "status": "Failure",
                "reason": "InternalError",
                "message": f"{type(e).__name__}: {e}",
            }
        else:
            for channel, data in ((STDOUT, result.stdout), (STDERR, result.stderr)):
                for start in range(0, len(data), FRAME_BYTES):
                    await socket.send_bytes(bytes([channel]) + data[start : start + FRAME_BYTES])
            status = _exit_status(request.command, result.exit_code)
    await socket.send_bytes(bytes([ERROR]) + json.dumps(status).encode())
    await socket.close()
    return socket
