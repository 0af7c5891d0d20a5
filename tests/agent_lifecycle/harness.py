"""The agent as a real process: start it, talk to its API, stop it by PID, read its logs.

Its API is mutual TLS with the test PKI's files (:func:`tls_args`), as the agents' Secret gives
them; requests present the operator's certificate unless told otherwise (``context=``). The
client checks the agent's chain, not its name: urllib sends the address it connects to.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import EllipsisType
from typing import Any

import yaml

from meshaccel.agent.datapath import Datapath, PinLayout, unload_pins
from meshaccel.operator.models import DEFAULT_AGENT_PORT
from meshaccel.operator.rendering import BPFFS_PATH, CGROUP_PATH, agent_capabilities
from tests.images.runtime import ImageRoot
from tests.pki import make_pki
from tests.waiting import wait_until

# The console script the package installs, next to this interpreter; `python -m` as a fallback.
CONSOLE_SCRIPT = Path(sys.executable).with_name("meshaccel-agent")
MODULE_ARGV = [sys.executable, "-m", "meshaccel.agent.main"]
PIN_ROOT = Path(f"/sys/fs/bpf/meshaccel-test-{os.getpid()}")
PKI = make_pki()
OPERATOR = PKI.client_context(check_hostname=False)


#: Set by scripts/images.sh: the agents of these tests then run from that built image, as the
#: DaemonSet runs them (tests/images/runtime.py), instead of from the source tree.
AGENT_IMAGE = os.environ.get("MESHACCEL_AGENT_IMAGE", "")


def agent_argv(capabilities: Sequence[str] | None = None) -> list[str]:
    """The agent's command: with ``capabilities``, limited to them as a container runtime
    limits a container (from the image: always, the DaemonSet's set by default)."""
    if AGENT_IMAGE:
        return _image_root().argv(
            [],
            capabilities=agent_capabilities(DEFAULT_AGENT_PORT, sk_msg_redirect=True)
            if capabilities is None
            else capabilities,
            mounts=[f"{BPFFS_PATH}:{BPFFS_PATH}", f"{CGROUP_PATH}:{CGROUP_PATH}:ro", "/tmp:/tmp"],
        )
    program = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else list(MODULE_ARGV)
    return program if capabilities is None else [*setpriv(capabilities), *program]


def standalone_argv(
    *,
    pods_file: Path,
    attach_cgroup: Path,
    instance: str,
    tls: Sequence[str],
    port: int,
    node_name: str,
    command: str = "run",
) -> list[str]:
    """A standalone agent of the tests: pods from a file, the test's cgroup and pins, its
    API on loopback (more flags may follow; the last of a repeated flag wins)."""
    return [
        *agent_argv(),
        command,
        "--mode=standalone",
        f"--pods-file={pods_file}",
        "--pods-poll-seconds=0.2",
        f"--attach-cgroup={attach_cgroup}",
        f"--pin-root={PIN_ROOT}",
        f"--instance={instance}",
        *tls,
        "--listen-address=127.0.0.1",
        f"--port={port}",
        f"--node-name={node_name}",
    ]


def setpriv(capabilities: Sequence[str]) -> list[str]:
    """uid 0 limited to ``capabilities``, as a container runtime starts the agent."""
    keep = ",".join(["-all", *(f"+{name.lower()}" for name in capabilities)])
    return ["setpriv", "--inh-caps=-all", f"--bounding-set={keep}", "--no-new-privs", "--"]


@functools.cache
def _image_root() -> ImageRoot:
    root = ImageRoot(AGENT_IMAGE).__enter__()
    atexit.register(root.__exit__, None, None, None)
    return root


def tls_args(directory: Path) -> list[str]:
    """The agent's TLS flags, for files written in ``directory`` as kubelet mounts a Secret."""
    files = PKI.write_agent_files(directory)
    return [
        f"--tls-cert-file={files.cert}",
        f"--tls-key-file={files.key}",
        f"--tls-client-ca-file={files.client_ca}",
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class AgentProcess:
    """One ``meshaccel-agent`` process; stdout and stderr go to files in ``workdir``."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        workdir: Path,
        name: str,
        port: int | None = None,
        tls: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.port = port
        self.tls = tls
        self.stdout_path = workdir / f"{name}.stdout"
        self.stderr_path = workdir / f"{name}.stderr"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("MESHACCEL_")}
        # No local socket unless a test asks (a flag or env wins): the default path is the
        # node's, /run/meshaccel/local, which a killed agent would leave behind on this machine.
        full_env["MESHACCEL_LOCAL_SOCKET"] = "none"
        full_env.update(env or {})
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=full_env,
                start_new_session=True,
            )
        self.pid = self.popen.pid
        self.started = time.time()

    # -- process -----------------------------------------------------------------------------

    def is_running(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:  # not reaped: the PID is still ours
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.popen.wait(timeout=timeout)

    def kill(self) -> int:
        self.signal(signal.SIGKILL)
        return self.popen.wait(timeout=10)

    # -- output ------------------------------------------------------------------------------

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log lines so far (a line still being written is skipped)."""
        records = []
        for line in self.stderr().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    records.append(json.loads(line))
        return records

    def describe(self) -> str:
        return (
            f"agent pid={self.pid} rc={self.popen.poll()} argv={self.argv}\n"
            f"--- stderr ---\n{self.stderr()[-6000:]}\n--- stdout ---\n{self.stdout()[-2000:]}"
        )

    # -- API ---------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        context: ssl.SSLContext | EllipsisType = ...,
        timeout: float = 5.0,
    ) -> tuple[int, Any]:
        """(status, parsed JSON or text) of one API call, with the operator's certificate or
        ``context`` (``PKI.anonymous_context()``: none)."""
        if self.port is None:
            raise RuntimeError("this agent serves no API")
        scheme = "https" if self.tls else "http"
        use = None if not self.tls else OPERATOR if isinstance(context, EllipsisType) else context
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{scheme}://127.0.0.1:{self.port}{path}", data=data, method=method
        )
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=use) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        text = raw.decode(errors="replace")
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text

    def get(self, path: str, **kwargs: Any) -> Any:
        status, body = self.request("GET", path, **kwargs)
        assert status == 200, f"GET {path}: {status} {body}\n{self.describe()}"
        return body

    def status_of(self, path: str) -> int | None:
        """The HTTP status of GET ``path``, None while nothing listens."""
        if not self.is_running():
            raise RuntimeError(f"the agent exited:\n{self.describe()}")
        try:
            return self.request("GET", path, timeout=1.0)[0]
        except OSError:
            return None

    def ready(self) -> bool:
        if not self.is_running():
            raise RuntimeError(f"the agent exited:\n{self.describe()}")
        try:
            status, _ = self.request("GET", "/readyz", timeout=1.0)
        except OSError:
            return False
        return status == 200

    def wait_ready(self, timeout: float = 30.0) -> float:
        """Wait for /readyz; returns the wall-clock time it answered 200."""
        wait_until(self.ready, timeout=timeout, interval=0.02, what=f"agent {self.pid} ready")
        return time.time()


def write_yaml(path: Path, document: Any) -> None:
    """Replace ``path`` atomically (write a temp file, rename over): never half-read."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(yaml.safe_dump(document, sort_keys=False))
    os.replace(temporary, path)


def unload_instance(instance: str, pin_root: Path = PIN_ROOT) -> None:
    """Teardown: remove whatever an agent left pinned for ``instance`` (complete or not)."""
    pins = PinLayout(pin_root / instance)
    if all(p.exists() for p in pins.all_pins()):
        Datapath.adopt(instance=instance, pin_root=pin_root).unload(drain_seconds=0)
    elif any(p.exists() for p in pins.all_pins()):
        unload_pins(pins, drain_seconds=0)
    with contextlib.suppress(OSError):
        pin_root.rmdir()


def attached_programs(cgroup: Path) -> list[dict[str, Any]]:
    """``bpftool -j cgroup show``: the programs attached to exactly this cgroup."""
    out = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", str(cgroup)],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    found: list[dict[str, Any]] = json.loads(out.strip() or "[]")
    return found
