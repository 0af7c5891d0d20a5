"""A measurement, not a test: the agent's resident memory with a 1,000-pod standalone file.

    sudo .venv/bin/python -m tests.agent_lifecycle.measure_rss [--pods 1000]

Makes a test cgroup with one child cgroup per pod (no netns: only identity matters here),
writes the pods file, starts a real agent standalone attached to that test cgroup, waits until
it is ready and prints its VmRSS/VmHWM (from /proc/<pid>/status) and the apply durations the
agent logged: the whole set from empty, then a one-pod change. Everything is removed after.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.agent_lifecycle.harness import (
    PIN_ROOT,
    AgentProcess,
    agent_argv,
    free_port,
    tls_args,
    unload_instance,
    write_yaml,
)
from tests.netlab.cgroups import TEST_CGROUP_PREFIX, TestCgroup
from tests.waiting import wait_until


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def applied(agent: AgentProcess, count: int) -> list[dict[str, Any]]:
    return [r for r in agent.logs() if r["msg"] == "pods file applied"][:count]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pods", type=int, default=1000)
    args = parser.parse_args()
    network = ipaddress.IPv4Network("198.19.0.0/16")  # inside 198.18.0.0/15; nothing is sent
    cgroup = TestCgroup(f"{TEST_CGROUP_PREFIX}{os.getpid()}-990")
    instance = f"rss-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix=f"meshaccel-{os.getpid()}-990-") as tmp, cgroup:
        workdir = Path(tmp)
        pods = []
        for i in range(args.pods):
            directory = cgroup.child(f"kubepods/besteffort/pod-{i:05d}")
            pods.append(
                {
                    "uid": f"00000000-0000-4000-8000-{i:012d}",
                    "namespace": f"ns-{i % 50}",
                    "name": f"pod-{i:05d}",
                    "ip": str(network.network_address + 10 + i),
                    "cgroup": str(directory.relative_to(cgroup.root)),
                    "options": {"excluded_outbound_ports": [9090]},
                }
            )
        pods_file = workdir / "pods.yaml"
        write_yaml(pods_file, {"pods": pods})
        port = free_port()
        argv = [
            *agent_argv(),
            "--mode=standalone",
            f"--pods-file={pods_file}",
            f"--attach-cgroup={cgroup.path}",
            f"--pin-root={PIN_ROOT}",
            f"--instance={instance}",
            *tls_args(workdir / "tls"),
            "--listen-address=127.0.0.1",
            f"--port={port}",
            f"--max-pods={max(1024, args.pods)}",
            "--uninstall-on-exit",
            "--drain-seconds=0",
        ]
        agent = AgentProcess(argv, workdir=workdir, name="agent", port=port)
        try:
            started = time.monotonic()
            agent.wait_ready(timeout=60)
            ready_s = time.monotonic() - started
            assert len(agent.get("/v1/pods")["pods"]) == args.pods
            time.sleep(1.0)  # settle: the first status, the retry task, the GC
            agent.get("/v1/status")
            at_start = proc_status(agent.pid)
            if not pods:
                print(json.dumps({"pods": 0, "VmRSS_after_start": at_start["VmRSS"]}))
                return 0
            pods[0] = {**pods[0], "options": {"excluded_outbound_ports": [9090, 9091]}}
            write_yaml(pods_file, {"pods": pods})
            wait_until(lambda: len(applied(agent, 2)) == 2, timeout=10, what="the one-pod change")
            first, change = applied(agent, 2)
            after = proc_status(agent.pid)
            print(
                json.dumps(
                    {
                        "pods": args.pods,
                        "ready_seconds": round(ready_s, 3),
                        "apply_from_empty_ms": first["duration_ms"],
                        "apply_one_pod_change_ms": change["duration_ms"],
                        "one_pod_change": {k: change[k] for k in ("added", "updated", "removed")},
                        "VmRSS_after_start": at_start["VmRSS"],
                        "VmHWM_after_start": at_start["VmHWM"],
                        "VmRSS_after_change": after["VmRSS"],
                    },
                    indent=2,
                )
            )
            assert agent.stop(timeout=20) == 0
        finally:
            agent.stop()
            unload_instance(instance)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
