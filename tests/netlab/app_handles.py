"""Handles for the processes of apps.py running in pods: echo servers and clients."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .processes import PodProcess, wait_until

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
        return [c["local"] for c in self.connections if "local" in c]

    @classmethod
    def parse(cls, returncode: int, stdout: str, stderr: str) -> EchoClientResult:
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise RuntimeError(f"echo client printed no result (rc={returncode}): {stderr[-2000:]}")
        raw = json.loads(lines[-1])
        return cls(bool(raw.get("ok")), returncode, list(raw.get("connections", [])), raw, stderr)
