"""The emulator's pods/exec subresource (pod_exec.py), driven by the official client's
``stream()`` over ``v4.channel.k8s.io``, as ``meshaccel check`` and kubectl use it."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.stream import stream

from tests.operator.conftest import KubeClient, api_path
from tests.operator.emulator import ApiServerEmulator
from tests.operator.pod_exec import FRAME_BYTES, ExecRequest, ExecResult, run_process


def exec_in(emulator: ApiServerEmulator, pod: str, command: list[str], **options: Any) -> Any:
    """Blocking, as the client is: run it in a thread. (subprotocol, stdout, stderr, status)"""
    configuration = client.Configuration(host=str(emulator.url).rstrip("/"))
    with client.ApiClient(configuration) as api_client:
        socket = stream(
            client.CoreV1Api(api_client).connect_get_namespaced_pod_exec,
            pod,
            "default",
            command=command,
            stdin=False,
            stdout=True,
            stderr=True,
            tty=False,
            _preload_content=False,
            **options,
        )
        socket.run_forever(timeout=30)
        assert not socket.is_open()
        answer = (
            socket.subprotocol,
            socket.read_stdout(),
            socket.read_stderr(),
            json.loads(socket.read_channel(3)),
        )
        socket.close()
        return answer


async def test_exec_runs_the_tests_handler(emulator: ApiServerEmulator, kube: KubeClient):
    await kube.create_pod("default", "web", node="node-1")
    long = "x" * (3 * FRAME_BYTES + 5)  # several frames on the wire

    async def handler(request: ExecRequest) -> ExecResult:
        return ExecResult(f"{long}\n{request.command}".encode(), b"to stderr", 0)

    emulator.on_exec("default", "web", handler)
    protocol, out, err, status = await asyncio.to_thread(
        exec_in, emulator, "web", ["echo", "a b"], container="app"
    )
    assert protocol == "v4.channel.k8s.io"
    assert out == f"{long}\n('echo', 'a b')"
    assert err == "to stderr"
    assert status == {"metadata": {}, "status": "Success"}
    assert emulator.execs == [ExecRequest("default", "web", "app", ("echo", "a b"))]


async def test_exec_exit_codes_as_a_kubelet_reports_them(emulator: ApiServerEmulator, kube):
    await kube.create_pod("default", "web", node="node-1")
    # A real process: exit code 3, its stderr.
    emulator.on_exec("default", "web", run_process())
    script = "import sys; print('out'); sys.exit(3)"
    _, out, _, status = await asyncio.to_thread(
        exec_in, emulator, "web", [sys.executable, "-c", script], container="app"
    )
    assert out == "out\n"
    assert status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]

    async def broken(request: ExecRequest) -> ExecResult:
        raise FileNotFoundError("no such executable: meshaccel-agent")

    emulator.on_exec("default", "web", broken)
    _, _, _, status = await asyncio.to_thread(exec_in, emulator, "web", ["x"], container="app")
    assert (status["status"], status["reason"]) == ("Failure", "InternalError")
    assert "no such executable" in status["message"]


async def test_a_pod_without_a_handler_says_so(emulator: ApiServerEmulator, kube: KubeClient):
    await kube.create_pod("default", "web", node="node-1")
    _, _, _, status = await asyncio.to_thread(exec_in, emulator, "web", ["x"], container="app")
    assert status["message"] == "the emulator has no exec handler for pod default/web"


@pytest.mark.parametrize(
    ("pod", "container", "phase", "message"),
    [
        ("absent", "app", None, 'pods \\"absent\\" not found'),
        ("web", "nope", "Running", "container nope is not valid for pod web"),
        ("web", "", "Running", "a container name must be specified for pod web"),
        ("web", "app", "Pending", 'container not found (\\"app\\")'),
        ("web", "app", "Succeeded", "cannot exec into a container in a completed pod"),
    ],
)
async def test_refused_before_the_upgrade(
    emulator: ApiServerEmulator, kube: KubeClient, pod, container, phase, message
):
    if phase is not None:
        await kube.create_pod("default", "web", node="node-1", phase=phase)
    options = {"container": container} if container else {}
    with pytest.raises(ApiException) as refused:
        await asyncio.to_thread(exec_in, emulator, pod, ["x"], **options)
    assert message in str(refused.value.reason)
    assert emulator.execs == []


async def test_a_plain_get_is_not_an_exec(emulator: ApiServerEmulator, kube: KubeClient):
    await kube.create_pod("default", "web", node="node-1")
    path = api_path("v1", "pods", "default", "web", "exec")
    status, body = await kube.request("GET", path, params={"command": "x", "container": "app"})
    assert (status, body["message"]) == (400, "Upgrade request required")
