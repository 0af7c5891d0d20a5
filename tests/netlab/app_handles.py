"""Handles for the processes of apps.py running in pods: echo servers and clients."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from tests.waiting import wait_until

from .processes import PodProcess, RunAs

APPS_SCRIPT = Path(__file__).resolve().with_name("apps.py")


def apps_argv(*arguments: str) -> list[str]:
    """argv running apps.py by path (no package import needed in the pod) with this interpreter."""
    return [sys.executable, "-u", str(APPS_SCRIPT), *arguments]


class EchoServer:
    """An apps.py echo-server in a pod; its JSON-lines event log records every peer address."""

    def __init__(self, process: PodProcess, port: int, read_api: str, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.read_api = read_api
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def events(self) -> list[dict[str, Any]]:
        try:
            text = self.log_path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def wait_listening(self, timeout: float = 10.0) -> None:
        def listening() -> bool:
            if not self.process.is_running():
                raise RuntimeError(f"echo server exited:\n{self.process.describe()}")
            return any(event["event"] == "listening" for event in self.events())

        wait_until(listening, timeout=timeout, what=f"echo server on port {self.port}")

    def closed_connections(self) -> list[dict[str, Any]]:
        """ "close" events: {"peer": "ip:port", "local": "ip:port", "bytes": n, "error": ...}."""
        return [event for event in self.events() if event["event"] == "close"]

    def wait_closed_from(self, peer: str, timeout: float = 10.0) -> dict[str, Any]:
        """Wait for the close event of the connection whose peer address is `peer`."""
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found[:] = [event for event in self.closed_connections() if event["peer"] == peer]
            return bool(found)

        wait_until(seen, timeout=timeout, what=f"server-side close of a connection from {peer}")
        return found[0]


@dataclass(frozen=True)
class EchoClientResult:
    """The JSON line apps.py echo-client printed, plus its exit status and stderr."""

    ok: bool
    returncode: int
    connections: list[dict[str, Any]]
    raw: dict[str, Any]
    stderr: str

    @property
    def local_addresses(self) -> list[str]:
        """What each connection's getsockname() answered (what the application sees)."""
        return [c["local"] for c in self.connections if "local" in c]

    @property
    def kernel_local_addresses(self) -> list[str]:
        """Each connection's real local address (/proc/net/tcp): 127.0.0.1:* when connect4
        steered it, whatever getsockname() answers."""
        return [c["kernel_local"] for c in self.connections if "kernel_local" in c]

    @property
    def reset(self) -> bool:
        """The client ended every connection with an RST (--reset-after)."""
        return bool(self.raw.get("reset"))

    @property
    def verified(self) -> list[int]:
        """Per connection: bytes echoed byte-exactly (before the reset, with --reset-after)."""
        return [int(c.get("verified", 0)) for c in self.connections]

    @classmethod
    def parse(cls, returncode: int, stdout: str, stderr: str) -> EchoClientResult:
        """The result is the last JSON line that is not a --progress event."""
        lines = [record for record in _json_lines(stdout) if "event" not in record]
        if not lines:
            raise RuntimeError(f"echo client printed no result (rc={returncode}): {stderr[-2000:]}")
        raw = lines[-1]
        return cls(bool(raw.get("ok")), returncode, list(raw.get("connections", [])), raw, stderr)


def _json_lines(stdout: str) -> list[dict[str, Any]]:
    records = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line still being written by a running client
                continue
    return records


class EchoClientOptions(TypedDict, total=False):
    """Options of apps.py echo-client, shared by Pod.echo_client and Pod.start_echo_client."""

    nbytes: int
    connections: int
    half_close: bool
    run_as: RunAs | None
    seed: int
    timeout: float
    pace_seconds: float
    pace_chunks: int
    reset_after: int | None
    source_port: int


DEFAULT_ECHO_TIMEOUT = 20.0


def echo_client_argv(
    target: str,
    port: int,
    *,
    nbytes: int = 1 << 20,
    connections: int = 1,
    half_close: bool = True,
    run_as: RunAs | None = None,
    seed: int = 1,
    timeout: float = DEFAULT_ECHO_TIMEOUT,
    pace_seconds: float = 0.0,
    pace_chunks: int = 50,
    reset_after: int | None = None,
    progress: bool = False,
    source_port: int = 0,
) -> list[str]:
    """argv for apps.py echo-client (see its docstring for what each option does)."""
    argv = apps_argv(
        "echo-client",
        "--host",
        target,
        "--port",
        str(port),
        "--bytes",
        str(nbytes),
        "--connections",
        str(connections),
        "--seed",
        str(seed),
        "--timeout",
        str(timeout),
    )
    if not half_close:
        argv.append("--no-half-close")
    if pace_seconds:
        argv += ["--pace-seconds", str(pace_seconds), "--pace-chunks", str(pace_chunks)]
    if reset_after is not None:
        argv += ["--reset-after", str(reset_after)]
    if progress:
        argv.append("--progress")
    if source_port:
        argv += ["--source-port", str(source_port)]
    if run_as is not None:  # the client drops root itself: the interpreter may live under /root
        argv += ["--run-as", f"{run_as.uid}:{run_as.gid}"]
    return argv


def echo_client_deadline(options: EchoClientOptions) -> float:
    """Seconds after which an echo client that has not exited is hung (its own bound + slack)."""
    timeout = options.get("timeout", DEFAULT_ECHO_TIMEOUT)
    return options.get("pace_seconds", 0.0) + timeout * 3 + 10


class EchoClientRun:
    """An apps.py echo-client running in the background (started with --progress).

    Use wait_connected() before the event the connection must survive, then wait().
    """

    def __init__(self, process: PodProcess, *, connections: int, deadline: float) -> None:
        self.process = process
        self.connections = connections
        self.deadline = deadline

    @property
    def pid(self) -> int:
        return self.process.pid

    def is_running(self) -> bool:
        return self.process.is_running()

    def events(self) -> list[dict[str, Any]]:
        """The --progress events so far: connected / connect_failed / echoed."""
        return [record for record in _json_lines(self.process.stdout()) if "event" in record]

    def _wait_events(
        self, predicate: Callable[[list[dict[str, Any]]], bool], *, timeout: float, what: str
    ) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []

        def check() -> bool:
            found[:] = self.events()
            if predicate(found):
                return True
            if not self.process.is_running():
                raise RuntimeError(f"echo client exited before {what}:\n{self.process.describe()}")
            return False

        wait_until(check, timeout=timeout, what=what)
        return found

    def wait_connected(self, timeout: float = 10.0) -> list[str]:
        """Wait until every connection is established; returns their real local addresses
        (EchoClientResult.kernel_local_addresses)."""
        events = self._wait_events(
            lambda found: (
                len({e["index"] for e in found if e["event"] == "connected"}) >= self.connections
            ),
            timeout=timeout,
            what=f"{self.connections} echo client connection(s)",
        )
        connected = sorted(
            (e for e in events if e["event"] == "connected"), key=lambda e: e["index"]
        )
        return [e["kernel_local"] for e in connected]

    def wait_echoed(self, nbytes: int, timeout: float = 10.0) -> None:
        """Wait until every connection has had at least `nbytes` echoed back (and verified)."""

        def enough(found: list[dict[str, Any]]) -> bool:
            best: dict[int, int] = {}
            for e in found:
                if e["event"] == "echoed":
                    best[e["index"]] = max(best.get(e["index"], 0), e["received"])
            return len(best) >= self.connections and min(best.values()) >= nbytes

        self._wait_events(enough, timeout=timeout, what=f"{nbytes} bytes echoed per connection")

    def wait(self, timeout: float | None = None) -> EchoClientResult:
        """Wait for the client to finish (default: its own deadline) and parse its result.
        On timeout the client is stopped (by PID) and TimeoutError raised."""
        try:
            returncode = self.process.wait(self.deadline if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            self.process.stop()
            raise TimeoutError(
                f"echo client still running after {timeout}s:\n{self.process.describe()}"
            ) from None
        return EchoClientResult.parse(returncode, self.process.stdout(), self.process.stderr())

    def stop(self) -> int:
        return self.process.stop()


# ---------------------------------------------------------------- getsockopt probe


# Probe cases whose answer depends on the netns, not only on the cgroup/eBPF: SO_ORIGINAL_DST on
# the probe's own un-NATed 127.0.0.1 pair is ENOENT where conntrack is idle (e.g. the host) but
# 127.0.0.1:<listener> where conntrack is active (any pod netns with Istio's nat rules).
NETNS_DEPENDENT_CASES = frozenset(
    {
        "tcp/SO_ORIGINAL_DST",
        "tcp/SO_ORIGINAL_DST/buf8192",
        "tcp-accepted/SO_ORIGINAL_DST",
        "tcp-accepted/SO_ORIGINAL_DST/buf8192",
        # The same on IPv6 (getsockopt-probe --family ipv6), where the ip6 nat table tracks.
        "tcp/IP6T_SO_ORIGINAL_DST",
        "tcp/IP6T_SO_ORIGINAL_DST/buf8192",
        "tcp-accepted/IP6T_SO_ORIGINAL_DST",
        "tcp-accepted/IP6T_SO_ORIGINAL_DST/buf8192",
        # The send buffer a new connection starts with grows with the initial cwnd, which the
        # netns's TCP metrics cache remembers per destination (bulk loopback traffic on the
        # host raises it for 127.0.0.1 there, not in the pod).
        "tcp/SO_SNDBUF",
        "tcp/SO_SNDBUF/buf8192",
    }
)


def getsockopt_probe_argv(run_as: RunAs | None = None, family: str = "ipv4") -> list[str]:
    argv = apps_argv("getsockopt-probe", "--family", family)
    if run_as is not None:  # the probe drops root itself, after making its SO_PEERGROUPS pair
        argv += ["--run-as", f"{run_as.uid}:{run_as.gid}"]
    return argv


def parse_getsockopt_probe(returncode: int, stdout: str, stderr: str) -> dict[str, Any]:
    """{case name: {"ok", "len", "hex", "errno", ...}} from apps.py getsockopt-probe output."""
    records = _json_lines(stdout)
    if returncode != 0 or len(records) != 1:
        raise RuntimeError(f"getsockopt probe failed (rc={returncode}): {stderr[-2000:]}")
    return records[0]


def run_getsockopt_probe_here(
    run_as: RunAs | None = None,
    *,
    netns: str | None = None,
    timeout: float = 30.0,
    family: str = "ipv4",
) -> dict[str, Any]:
    """The getsockopt probe in this process's context: its cgroup, and its netns unless `netns`
    names another (entered with `ip netns exec`, still without any cgroup move). The probe only
    talks to itself on 127.0.0.1, so the host's netns is fine; but see NETNS_DEPENDENT_CASES."""
    wrapper = ["ip", "netns", "exec", netns] if netns is not None else []
    completed = subprocess.run(
        [*wrapper, *getsockopt_probe_argv(run_as, family)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    return parse_getsockopt_probe(completed.returncode, completed.stdout, completed.stderr)
