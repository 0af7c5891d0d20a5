"""The images scripts/images.sh built, run as the chart runs them (tests/images/runtime.py).

What the agent image does on a node, with exactly the DaemonSet's capabilities and mounts, is
proven by the agent's own lifecycle tests, which scripts/images.sh runs again with
MESHACCEL_AGENT_IMAGE set (tests/agent_lifecycle/harness.py then starts every agent from the
image): load on a lab node, accelerate a pod pair byte-exact, adopt after a restart, uninstall,
and fail with a clear error without each capability. Here: what only the images can show.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshaccel.agent.datapath import OBJECT_FILES
from meshaccel.operator.models import DEFAULT_AGENT_PORT
from meshaccel.operator.rendering import BPFFS_PATH, CGROUP_PATH, agent_capabilities
from tests.images.runtime import ImageRoot
from tests.operator.emulator import ApiServerEmulator

pytestmark = pytest.mark.images

REPO = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
COMPILERS = ("cc", "gcc", "clang", "c++", "g++", "ld", "as", "make")
OPERATOR_UID = "65532"


def image(variable: str) -> str:
    name = os.environ.get(variable, "")
    assert name, f"{variable} names the built image (scripts/images.sh sets it)"
    return name


@pytest.fixture(scope="module")
def agent_root() -> Iterator[ImageRoot]:
    with ImageRoot(image("MESHACCEL_AGENT_IMAGE")) as root:
        yield root


@pytest.fixture(scope="module")
def operator_root() -> Iterator[ImageRoot]:
    with ImageRoot(image("MESHACCEL_OPERATOR_IMAGE")) as root:
        yield root


def run_in(root: ImageRoot, *args: str, entrypoint: bool = False) -> str:
    done = subprocess.run(
        root.argv(args, capabilities=(), entrypoint=entrypoint),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("which", ["agent", "operator"])
def test_no_runtime_image_carries_a_compiler(
    which: str, agent_root: ImageRoot, operator_root: ImageRoot
) -> None:
    root = agent_root if which == "agent" else operator_root
    probe = "for tool in " + " ".join(COMPILERS) + '; do command -v "$tool" || true; done'
    assert run_in(root, "sh", "-c", probe).split() == []


def test_the_agent_image_is_this_version_with_its_objects_and_libbpf(agent_root: ImageRoot) -> None:
    assert run_in(agent_root, "--version", entrypoint=True).strip() == f"meshaccel-agent {VERSION}"
    assert agent_root.config.user == "0"  # bpffs and cgroups are root's; capabilities limit it
    check = (
        "import ctypes, json\n"
        "from meshaccel.agent.datapath import default_objects_dir\n"
        "ctypes.CDLL('libbpf.so.1')\n"
        "print(json.dumps(sorted(p.name for p in default_objects_dir().glob('*.bpf.o'))))\n"
    )
    shipped = json.loads(run_in(agent_root, "python", "-c", check))
    assert set(OBJECT_FILES) <= set(shipped), shipped


def test_a_program_in_the_agent_image_has_exactly_the_daemonsets_capabilities(
    agent_root: ImageRoot,
) -> None:
    """What the lifecycle tests started from the image rely on: inside the image, with the
    DaemonSet's mounts, a program holds the DaemonSet's capabilities and no other."""
    capabilities = agent_capabilities(DEFAULT_AGENT_PORT, sk_msg_redirect=True)
    mounts = [f"{BPFFS_PATH}:{BPFFS_PATH}", f"{CGROUP_PATH}:{CGROUP_PATH}:ro"]
    probe = ["sh", "-c", "grep CapEff /proc/self/status"]
    done = subprocess.run(
        agent_root.argv(probe, capabilities=capabilities, mounts=mounts, entrypoint=False),
        capture_output=True,
        text=True,
        timeout=60,
    )
    bits = {"BPF": 39, "PERFMON": 38, "NET_ADMIN": 12}
    assert int(done.stdout.split()[1], 16) == sum(1 << bits[name] for name in capabilities)


async def test_the_operator_image_serves_its_health_as_the_chart_runs_it(
    operator_root: ImageRoot, emulator: ApiServerEmulator, kubeconfig: Path, tmp_path: Path
) -> None:
    """As the Deployment runs it: uid 65532, no capabilities, read-only root, against the API
    (the emulator), its liveness endpoint answering."""
    assert operator_root.config.user.split(":")[0] == OPERATOR_UID
    kubeconfig.chmod(0o644)
    tmp_path.chmod(0o755)
    port = free_port()
    argv = operator_root.argv(
        [
            "--standalone",
            "--namespace=meshaccel-system",
            f"--liveness=http://127.0.0.1:{port}/healthz",
            "--metrics-port=0",
            "--log-format=json",
        ],
        capabilities=(),
        mounts=[f"{tmp_path}:{tmp_path}:ro"],
        # The chart's environment (POD_ID also spares Kopf a passwd lookup uid 65532 has none
        # for), and the emulator for the API.
        env={
            "KUBECONFIG": str(kubeconfig),
            "MESHACCEL_NAMESPACE": "meshaccel-system",
            "MESHACCEL_AGENT_IMAGE": "registry.test/meshaccel-agent:1.0",
            "POD_ID": "meshaccel-operator-test",
        },
    )
    log = tmp_path / "operator.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        status = await wait_healthy(f"http://127.0.0.1:{port}/healthz", process, log)
        assert status == 200
        assert effective_uid(process.pid) == int(OPERATOR_UID)
    finally:
        process.terminate()
        process.wait(timeout=30)


async def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> int:
    for _ in range(600):  # bounded: 60 s at 0.1 s
        if process.poll() is not None:
            raise AssertionError(f"the operator exited ({process.returncode}):\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return int(response.status)
        except OSError:
            await asyncio.sleep(0.1)
    raise AssertionError(f"no health answer at {url}:\n{log.read_text()[-3000:]}")


def effective_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])
    raise AssertionError(f"no Uid in /proc/{pid}/status")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
