"""The local demo: meshaccel accelerating two Istio-style pods on this machine, no cluster needed.

    python -m tests.netlab.demo [--rounds 3] [--seconds 3] [--connections 1] [--apps-too]

It builds a node (network namespaces on a bridge, cgroups) with a client pod and a server pod,
each with Istio's iptables rules and a real Envoy sidecar (uid 1337), starts `meshaccel-agent`
in standalone mode with a pods file, and alternates, round by round, between the iptables path
(an empty pod set) and the accelerated path (both pods in the set), measuring 1 KB
request/response traffic from the client app to the server app through both sidecars. Then it
prints requests/s and p50/p99 latency for each path and the datapath's counters, and removes
everything it made, also on Ctrl-C. The load generator is Python (tests/netlab/apps.py
rr-client), which bounds the absolute numbers; `scripts/bench.sh` is the real benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from .app_handles import apps_argv
from .cgroups import find_cgroup2_mount
from .mesh import ECHO_PORT, MeshPodSpec, mesh_node
from .topology import Node, Pod

PATHS = ("iptables", "meshaccel")


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class StandaloneAgent:
    """meshaccel-agent in standalone mode on this node's cgroup, driven through its pods file."""

    def __init__(self, node: Node, *, apps_too: bool) -> None:
        self.node = node
        self.apps_too = apps_too
        self.cgroup2 = find_cgroup2_mount()
        self.pods_file = node.workdir / "pods.yaml"
        self.port = free_port()
        self.generation = 0
        self.write([])
        argv = [
            str(Path(sys.executable).with_name("meshaccel-agent")), "run",
            "--mode", "standalone", "--pods-file", str(self.pods_file),
            "--attach-cgroup", str(node.cgroup.path),
            "--pin-root", f"/sys/fs/bpf/meshaccel-demo-{os.getpid()}",
            "--listen-address", "127.0.0.1", "--port", str(self.port), "--insecure-no-token",
            "--uninstall-on-exit", "--drain-seconds", "0.5", "--log-format", "text",
        ]  # fmt: skip
        self.log_path = node.workdir / "agent.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )

    def write(self, pods: list[Pod]) -> None:
        """Replace the pod set; the agent notices the file change within a second."""
        self.generation += 1
        document = {
            "generation": self.generation,
            "pods": [
                {
                    "uid": f"demo-{pod.name}",
                    "namespace": "demo",
                    "name": pod.name,
                    "ip": str(pod.ip),
                    "cgroup": str(pod.cgroup_dir.relative_to(self.cgroup2)),
                    "options": {"sk_msg_to_app": self.apps_too},
                }
                for pod in pods
            ],
        }
        temporary = self.pods_file.with_suffix(".tmp")
        temporary.write_text(yaml.safe_dump(document))
        temporary.replace(self.pods_file)  # atomic: the agent never reads half a file

    def get(self, path: str) -> tuple[int, Any]:
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as error:
            return error.code, None
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0, None

    def wait_applied(self, timeout: float = 20.0) -> None:
        """Until the agent reports the generation last written."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the agent exited:\n{self.log_path.read_text()[-3000:]}")
            status, body = self.get("/v1/status")
            if status == 200 and body["applied_generation"] == self.generation:
                return
            time.sleep(0.1)
        raise TimeoutError(f"the agent did not apply generation {self.generation} in {timeout}s")

    def counters(self) -> dict[str, int]:
        status, body = self.get("/v1/status")
        return dict(body.get("counters") or {}) if status == 200 else {}

    def stop(self) -> None:
        """SIGTERM: with --uninstall-on-exit the agent drains, detaches and removes its pins."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@contextlib.contextmanager
def running_agent(node: Node, *, apps_too: bool) -> Iterator[StandaloneAgent]:
    agent = StandaloneAgent(node, apps_too=apps_too)
    try:
        agent.wait_applied()
        yield agent
    finally:
        agent.stop()


def request_response(
    client: Pod, server: Pod, *, seconds: float, connections: int
) -> dict[str, Any]:
    argv = apps_argv(
        "rr-client", "--host", str(server.ip), "--port", str(ECHO_PORT),
        "--connections", str(connections), "--duration", str(seconds), "--size", "1024",
    )  # fmt: skip
    completed = client.run_to_completion(argv, timeout=seconds + 30)
    result: dict[str, Any] = json.loads(completed.stdout.splitlines()[-1])
    if result["errors"]:
        raise RuntimeError(f"request/response errors: {result['errors']}")
    return result


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    def median(path: str, key: str) -> float:
        return float(statistics.median(r[key] for r in results[path]))

    base = median("iptables", "rps")
    lines = [
        "| path | requests/s | p50 (us) | p99 (us) | requests/s vs iptables |",
        "|---|---:|---:|---:|---:|",
    ]
    for path in PATHS:
        rps = median(path, "rps")
        lines.append(
            f"| {path} | {rps:,.0f} | {median(path, 'p50_us'):.0f} | "
            f"{median(path, 'p99_us'):.0f} | {rps / base - 1:+.1%} |"
        )
    return "\n".join(lines)


def run(rounds: int, seconds: float, connections: int, apps_too: bool) -> None:
    say("building a node: pods 'client' and 'server', Istio iptables, Envoy sidecars (uid 1337)")
    with mesh_node((MeshPodSpec("client"), MeshPodSpec("server"))) as node:
        client, server = node.pods["client"], node.pods["server"]
        say(f"client {client.ip}, server {server.ip}:{ECHO_PORT}; starting meshaccel-agent")
        with running_agent(node, apps_too=apps_too) as agent:
            results: dict[str, list[dict[str, Any]]] = {path: [] for path in PATHS}
            for round_number in range(rounds):
                order = PATHS if round_number % 2 == 0 else PATHS[::-1]
                for path in order:
                    agent.write([client, server] if path == "meshaccel" else [])
                    agent.wait_applied()
                    result = request_response(
                        client, server, seconds=seconds, connections=connections
                    )
                    results[path].append(result)
                    say(
                        f"round {round_number + 1}/{rounds} {path:>9}: {result['rps']:,.0f} "
                        f"req/s, p50 {result['p50_us']:.0f} us, p99 {result['p99_us']:.0f} us"
                    )
            counters = agent.counters()
            say("stopping the agent (uninstall: drain, detach, remove pins)")
        print()
        print(
            f"1 KB request/response, {connections} connection(s), {seconds:g} s x {rounds} "
            "rounds per path, medians:"
        )
        print(table(results))
        print()
        print("datapath counters (non-zero):")
        for name, value in sorted(counters.items()):
            if value:
                print(f"  {name:<40} {value:>14,}")
        say("removing the node (namespaces, cgroups, processes)")
    say("done: nothing is left behind")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument(
        "--apps-too", action="store_true",
        help="opt both pods in to sk_msg delivery into their apps (docs/datapath.md)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the demo needs root (network namespaces, cgroups, eBPF)", file=sys.stderr)
        return 1
    try:
        run(args.rounds, args.seconds, args.connections, args.apps_too)
    except KeyboardInterrupt:
        say("interrupted: everything was removed")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
