"""``meshaccel check`` and ``version`` against a real agent: the exec into node-1's agent pod
runs the real ``meshaccel-agent check -o json`` (and ``version -o json``) on this machine, as
root, with the environment the DaemonSet gives it (its node's name). The command must show
exactly what the agent reported, check by check.

The agent's check only reads: it probes the kernel and reads the cgroup, bpffs and the
programs attached to the node's root cgroup, and attaches and pins nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import sys
from typing import Any

import pytest

from meshaccel.contract.version import VERSION
from tests.cli.scene import AGENTS_NAMESPACE, Scene, build_scene, meshaccel
from tests.operator.conftest import KubeClient
from tests.operator.emulator import ApiServerEmulator
from tests.operator.pod_exec import run_process
from tests.requirements import require_kernel

pytestmark = pytest.mark.kernel

BIN = pathlib.Path(sys.executable).parent  # meshaccel-agent is installed beside it


def agent_env(node: str) -> dict[str, str]:
    """This process's environment without MESHACCEL_ settings, plus what the DaemonSet sets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHACCEL_")}
    return env | {"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "MESHACCEL_NODE_NAME": node}


async def agent_says(*args: str) -> tuple[int, Any]:
    """The real agent's own answer, run directly."""
    process = await asyncio.create_subprocess_exec(
        str(BIN / "meshaccel-agent"),
        *args,
        env=agent_env("node-1"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode is not None
    assert stdout, stderr.decode()
    return process.returncode, json.loads(stdout)


@pytest.fixture
async def scene(emulator: ApiServerEmulator, kubeconfig: pathlib.Path, kube: KubeClient) -> Scene:
    require_kernel()
    built = await build_scene(kube)
    emulator.on_exec(AGENTS_NAMESPACE, built.agent("node-1"), run_process(env=agent_env("node-1")))
    return built


async def test_check_shows_what_the_real_agent_reports(scene: Scene, emulator: ApiServerEmulator):
    code, direct = await agent_says("check", "-o", "json")
    assert direct["node"] == "node-1"
    run = await meshaccel("check", "-o", "json")
    [node_1] = [n for n in run.json()["nodes"] if n["node"] == "node-1"]
    assert (node_1["pod"], node_1["source"]) == (scene.agent("node-1"), "exec")
    assert node_1["ok"] == direct["ok"] == (code == 0)
    shown = [(c["name"], c["ok"], c["level"], c["detail"], c["fix"]) for c in node_1["checks"]]
    assert shown == [
        (c["name"], c["ok"], c["level"], c["detail"], c["fix"]) for c in direct["checks"]
    ]
    assert len(shown) >= 5, "a real report has every prerequisite"
    [request] = [e for e in emulator.execs if e.pod == scene.agent("node-1")]
    assert request.command == ("meshaccel-agent", "check", "-o", "json")

    text = await meshaccel("check")
    for check in direct["checks"]:
        assert check["name"] in text.stdout
    assert (
        f"{'node-1'} (pod {scene.agent('node-1')}), MeshAcceleration default: "
        + ("OK" if direct["ok"] else "FAILED")
        in text.stdout
    )


async def test_version_asks_the_real_agent_the_status_does_not_list(scene: Scene, kube: KubeClient):
    """With node-1 gone from the status's list, its version comes from the agent itself."""
    from tests.cli.scene import write_status

    await write_status(kube, "default", {"nodes": []})
    _, direct = await agent_says("version", "-o", "json")
    run = await meshaccel("version", "-o", "json")
    [node_1] = [a for a in run.json()["agents"] if a["node"] == "node-1"]
    assert (node_1["source"], node_1["version"]) == ("exec", direct["version"])
    assert direct["version"] == VERSION  # the agent is this build
