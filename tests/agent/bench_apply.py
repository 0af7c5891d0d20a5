"""Benchmark (not a test): how long applying pod sets takes, and the agent's resident memory.

Run as root from the repository::

    .venv/bin/python -m tests.agent.bench_apply [--pods 1000] [--runs 9] [--log]

It loads the real datapath, attached to a fresh empty test cgroup
``<cgroup2>/meshaccel-test-<pid>-bench`` (never the root cgroup; pins under
``/sys/fs/bpf/meshaccel-test-<pid>/bench``), and measures, as the median of ``--runs`` runs:

* a ``--pods``-pod set applied from empty (every pod an Istio pod: 1 ``pods``, 1 ``pod_ips``
  and 13 ``pod_ports`` entries each, plus one extra excluded port on every tenth pod);
* one-pod changes on top of it: one pod's options changed, one pod added, one pod removed;
* the same set re-sent with a new generation (nothing to write);
* reading the maps back at start-up (what a restarted agent does before its first apply);

each both in-process (``Reconciler.apply``) and end to end (``PUT /v1/pods`` through the real
aiohttp app on loopback: JSON parsing, validation, the apply thread). Every set is parsed from
JSON before it is applied, as the server does, so no pod object is shared with the last set.

Resident memory is measured in a fresh child process that does only what an agent does (the
timing runs above keep a hundred pre-built sets alive, which would count against the agent):
it imports the agent's modules, loads the datapath, serves the real app on 127.0.0.1, takes
the set by ``PUT /v1/pods`` and answers ``/v1/pods``, ``/v1/status`` and ``/metrics``; then
``VmRSS`` and ``VmHWM`` are read from ``/proc/self/status``.

Pods resolve to synthetic cgroup ids (``1 << 40`` + n) instead of a thousand real cgroups:
only the map writes are measured, and the maps take any id (connect4 would just never meet
such a cgroup). Nothing sends traffic. Everything is removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from aiohttp import web

from meshaccel.agent.datapath import Datapath
from meshaccel.agent.reconcile import Reconciler, UnresolvedPodError
from meshaccel.agent.server import create_app
from meshaccel.contract.api import PodSet, PodSpec
from tests.netlab.cgroups import TEST_CGROUP_PREFIX, TestCgroup

PIN_ROOT = Path(f"/sys/fs/bpf/meshaccel-test-{os.getpid()}")
SYNTHETIC_CGROUP_BASE = 1 << 40
FIRST_IP = IPv4Address("198.18.0.0") + 256


class SyntheticResolver:
    """pod-<n> -> cgroup id 2**40 + n; anything else is unresolved."""

    def resolve(self, pod: PodSpec) -> int:
        prefix, _, number = pod.uid.partition("-")
        if prefix != "pod" or not number.isdigit():
            raise UnresolvedPodError(f"not a benchmark pod: {pod.uid}")
        return SYNTHETIC_CGROUP_BASE + int(number)

    def vanished(self, pod: PodSpec, cgroup_id: int) -> str | None:
        return None  # synthetic ids: no cgroup to lose


def spec(index: int, *, extra_port: int | None = None) -> PodSpec:
    ports = [extra_port] if extra_port else ([9090] if index % 10 == 0 else [])
    return PodSpec.model_validate(
        {
            "uid": f"pod-{index}",
            "namespace": f"ns-{index % 20}",
            "name": f"workload-{index}",
            "ip": str(FIRST_IP + index),
            "options": {"excluded_outbound_ports": ports},
        }
    )


def memory_kib() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


class Generations:
    def __init__(self) -> None:
        self.value = 0

    def next(self) -> int:
        self.value += 1
        return self.value


SCENARIOS = (
    "from empty",
    "one pod changed",
    "one pod added",
    "one pod removed",
    "same set re-sent",
)


def steps(pods: int, runs: int, generations: Generations) -> list[tuple[str | None, PodSet]]:
    """The applies of every run in order; the named ones are timed, None ones set the stage."""
    base = [spec(i) for i in range(pods)]
    sets = {
        "from empty": base,
        "one pod changed": [*base[:-1], spec(pods - 1, extra_port=7000)],
        "one pod added": [*base, spec(pods)],
        "one pod removed": base[:-1],
        "same set re-sent": base,
    }
    sequence: list[tuple[str | None, PodSet]] = []

    def add(name: str | None, specs: list[PodSpec]) -> None:
        # Parsed from JSON like the server does: fresh objects, none shared with the last set.
        text = PodSet(generation=generations.next(), pods=specs).model_dump_json()
        sequence.append((name, PodSet.model_validate_json(text)))

    for _ in range(runs):
        add(None, [])
        for name in SCENARIOS:
            if name != "from empty":  # each change starts from the full set
                add(None, base)
            add(name, sets[name])
    return sequence


def run_direct(
    reconciler: Reconciler, pods: int, runs: int, generations: Generations
) -> dict[str, list[float]]:
    """Times (ms) of Reconciler.apply per scenario."""
    timings: dict[str, list[float]] = {name: [] for name in SCENARIOS}
    for name, pod_set in steps(pods, runs, generations):
        started = time.perf_counter()
        reconciler.apply(pod_set)
        if name is not None:
            timings[name].append((time.perf_counter() - started) * 1000)
    return timings


async def run_http(
    reconciler: Reconciler, pods: int, runs: int, generations: Generations
) -> dict[str, list[float]]:
    """Times (ms) of PUT /v1/pods per scenario (bodies serialised before the clock starts)."""
    from aiohttp.test_utils import TestClient, TestServer  # not in the memory child

    app = create_app(reconciler, tls=None, retry_interval=None)  # the apply, not TLS, is timed
    headers = {"Content-Type": "application/json"}
    bodies = [(name, s.model_dump_json().encode()) for name, s in steps(pods, runs, generations)]
    timings: dict[str, list[float]] = {name: [] for name in SCENARIOS}
    async with TestClient(TestServer(app)) as client:
        for name, body in bodies:
            started = time.perf_counter()
            response = await client.put("/v1/pods", data=body, headers=headers)
            await response.read()
            elapsed = (time.perf_counter() - started) * 1000
            if response.status != 200:
                raise RuntimeError(f"PUT /v1/pods: {response.status} {await response.text()}")
            if name is not None:
                timings[name].append(elapsed)
    return timings


def restart_read(datapath: Datapath, runs: int) -> list[float]:
    """Reconciler construction over the programmed maps: the one full read after a restart."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        reconciler = Reconciler(datapath, SyntheticResolver(), max_pods=1 << 20)
        times.append((time.perf_counter() - started) * 1000)
        reconciler.close()
    return times


def pod_set_body(pods: int, generation: int) -> bytes:
    """The JSON of a set of ``spec(0..pods-1)``, built from plain dicts (no models kept)."""
    return json.dumps(
        {
            "generation": generation,
            "pods": [
                {
                    "uid": f"pod-{i}",
                    "namespace": f"ns-{i % 20}",
                    "name": f"workload-{i}",
                    "ip": str(FIRST_IP + i),
                    "options": {"excluded_outbound_ports": [9090] if i % 10 == 0 else []},
                }
                for i in range(pods)
            ],
        }
    ).encode()


def http_call(port: int, method: str, path: str, body: bytes | None = None) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Content-Type": "application/json"}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


async def serve_and_apply(reconciler: Reconciler, pods: int) -> dict[str, int]:
    runner = web.AppRunner(create_app(reconciler, tls=None))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        body = pod_set_body(pods, 1)
        calls = [("PUT", "/v1/pods", body), ("GET", "/v1/pods", None)]
        calls += [("GET", "/v1/status", None), ("GET", "/metrics", None)]
        for method, path, data in calls:
            status = await asyncio.to_thread(http_call, port, method, path, data)
            if status != 200:
                raise RuntimeError(f"{method} {path}: HTTP {status}")
        del body
        return memory_kib()
    finally:
        await runner.cleanup()


def measure_memory(pods: int) -> dict[str, Any]:
    """The child process's work: an agent's imports and state, with the set applied."""
    after_imports = memory_kib()
    cgroup = TestCgroup(f"{TEST_CGROUP_PREFIX}{os.getpid()}-bench-memory")
    with cgroup:
        datapath = Datapath.load(cgroup.path, instance="bench-memory", pin_root=PIN_ROOT)
        try:
            with Reconciler(datapath, SyntheticResolver(), max_pods=1 << 20) as reconciler:
                serving = asyncio.run(serve_and_apply(reconciler, pods))
                programmed = reconciler.snapshot.programmed
        finally:
            datapath.close()
            Datapath.adopt(instance="bench-memory", pin_root=PIN_ROOT).unload(drain_seconds=0)
    return {"after_imports": after_imports, "serving": serving, "programmed": programmed}


def memory_in_child(pods: int) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "-m", "tests.agent.bench_apply", "--memory-child", "--pods", str(pods)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"memory child failed: {completed.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def table(rows: list[tuple[str, list[float], list[float] | None]], pods: int, runs: int) -> str:
    def cell(values: list[float] | None) -> str:
        if not values:
            return "-"
        return f"{statistics.median(values):8.2f} ({min(values):.2f}-{max(values):.2f})"

    lines = [
        f"{pods} pods, median of {runs} runs, ms (min-max)",
        f"{'scenario':<28} {'Reconciler.apply':>26} {'PUT /v1/pods':>26}",
    ]
    lines += [f"{name:<28} {cell(direct):>26} {cell(http):>26}" for name, direct, http in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument(
        "--log", action="store_true", help="log every decision at INFO (to /dev/null)"
    )
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        print(json.dumps(measure_memory(args.pods)))
        return 0
    if os.geteuid() != 0:
        print("run as root: the benchmark loads the eBPF datapath", file=sys.stderr)
        return 2
    if args.log:
        logging.basicConfig(level=logging.INFO, stream=open(os.devnull, "w"))  # noqa: SIM115

    cgroup = TestCgroup(f"{TEST_CGROUP_PREFIX}{os.getpid()}-bench")
    with cgroup:
        datapath = Datapath.load(cgroup.path, instance="bench", pin_root=PIN_ROOT)
        try:
            # max_pods is capped by the pods map's capacity (1024 by default).
            reconciler = Reconciler(datapath, SyntheticResolver(), max_pods=1 << 20)
            try:
                generations = Generations()
                direct = run_direct(reconciler, args.pods, args.runs, generations)
                http = asyncio.run(run_http(reconciler, args.pods, args.runs, generations))
                reconciler.apply(
                    PodSet(generation=generations.next(), pods=[spec(i) for i in range(args.pods)])
                )
                entries = dict(reconciler.snapshot.map_entries)
            finally:
                reconciler.close()
            restart = restart_read(datapath, args.runs)
        finally:
            datapath.close()
            Datapath.adopt(instance="bench", pin_root=PIN_ROOT).unload(drain_seconds=0)

    rows: list[tuple[str, list[float], list[float] | None]] = [
        (name, times, http[name]) for name, times in direct.items()
    ]
    rows.append(("maps read back at start-up", restart, None))
    print(table(rows, args.pods, args.runs))
    print(f"map entries with the set applied: {entries}")
    memory = memory_in_child(args.pods)
    serving, imports = memory["serving"], memory["after_imports"]
    print(
        f"agent process with {memory['programmed']} pods applied over HTTP: VmRSS "
        f"{serving['VmRSS'] / 1024:.1f} MiB, peak VmHWM {serving['VmHWM'] / 1024:.1f} MiB "
        f"(after the imports alone: {imports['VmRSS'] / 1024:.1f} MiB)"
    )
    print(f"decision logs: {'INFO to /dev/null' if args.log else 'off (WARNING)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
