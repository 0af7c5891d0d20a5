"""The operator at scale: the real operator process against the API emulator and a fake fleet.

    python -m tests.operator.bench_operator [--nodes 500] [--pods 10000] [--changes 300]
        [--concurrency 1 8] [--push-window 0.1] [--json out.json] [--no-validate]

In this process: an :class:`~tests.operator.emulator.ApiServerEmulator` on 127.0.0.1 (the
repository's CRDs loaded), a kubeconfig file pointing at it, and a
:class:`~tests.operator.fake_agent.FakeAgentFleet` of ``--nodes`` agents on one port
(127.1.x.y). The operator runs as a separate process (``python -m meshaccel.operator.main
--standalone``), so its RSS and CPU time are its own (read from ``/proc``).

1. Populate: the operator's namespace, ``--namespaces`` application namespaces labelled
   ``meshaccel.io/accelerate: enabled``, the nodes, and ``--pods`` meshed pods (an
   ``istio-proxy`` container, Running with a unique IP in 10.0.0.0/8), spread evenly over the
   nodes; concurrent requests through the API.
2. Start the operator, create a MeshAcceleration, wait for its DaemonSet, give its Secret
   (TLS certificate, key, CA bundle) to every fake agent, and play the DaemonSet controller (as
   ``Cluster.schedule_agents`` in ``test_operator.py``): an agent pod per node, Running with the
   node's fake agent address.
   Initial convergence: until every agent has accepted a set with exactly its node's pods.
3. Steady state, per ``--concurrency`` level: ``--warmup`` discarded changes then ``--changes``
   measured ones, at most ``concurrency`` in flight. Each change is one pod change through the
   API, in pairs on one pod: opt out (annotation) then back in, or delete then create a
   replacement on the same node. Latency runs from just before the API request to the moment
   the node's fake agent accepted a set that shows the change (the pod's uid gone or present).

The emulator here differs from the tests' in two bench-only ways (:class:`BenchEmulator`): it
forgets each request once answered (kmock otherwise matches every request against every one
seen so far: quadratic, minutes at this scale), and it runs no garbage collection (nothing the
benchmark deletes owns anything; the stock collector scans every object on each delete).

The emulator, the fleet and this harness share one event loop, and the machine's cores with
the operator: latencies include their time too. Performance numbers come from this, never from
timed unit tests. See docs/operator-benchmark.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import math
import os
import pathlib
import platform
import random
import signal
import socket
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from ipaddress import IPv4Address
from typing import Any

import aiohttp
import attrs
import kmock
import yaml

from meshaccel.operator import rendering as operator_rendering
from tests.operator.conftest import (
    CRDS,
    REPO,
    TOKEN,
    KubeClient,
    agent_tls,
    api_path,
    report_rollout,
    run_agent_pod,
)
from tests.operator.emulator import ApiServerEmulator, ResourceSpec
from tests.operator.fake_agent import FLEET_NETWORK, Accepted, FakeAgent, FakeAgentFleet

NAMESPACE = "meshaccel-system"
ENABLED = {"meshaccel.io/accelerate": "enabled"}
OPT_OUT = "meshaccel.io/accelerate"
MA = ("meshaccel.io/v1alpha1", "meshaccelerations")
POD_NETWORK = IPv4Address("10.0.0.1")  # the initial pods'; replacements from 10.128.0.1
REPLACEMENT_NETWORK = IPv4Address("10.128.0.1")
AIM_P99_SECONDS = 1.0
AIM_RSS_MB = 250.0
CHANGE_TIMEOUT = 30.0  # a change not seen by then counts as missed
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the emulator, made to scale -----------------------------------------------------------------


@attrs.define(kw_only=True)
class BenchEmulator(ApiServerEmulator):
    """The tests' emulator, minus two costs that grow with what it has served (see module)."""

    validate_builtins: bool = True  # kubernetes-validate on built-in kinds (CRDs always)
    forget_requests: bool = True  # kmock's request log is scanned per request: quadratic

    def _admit(self, spec: ResourceSpec, obj: dict[str, Any], verb: str) -> None:
        if self.validate_builtins or spec.crd is not None:
            super()._admit(spec, obj, verb)

    def _collect_garbage(self) -> None:
        """Nothing the benchmark deletes owns anything, and every owner outlives its dependents."""


# -- the benchmark's settings and bookkeeping ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Options:
    nodes: int = 500
    pods: int = 10_000
    namespaces: int = 50
    changes: int = 300
    warmup: int = 20
    concurrency: tuple[int, ...] = (1, 8)
    push_window: float = 0.1
    idle: float = 10.0  # seconds of no changes, to measure the operator's background CPU
    validate: bool = True
    seed: int = 1
    json: pathlib.Path | None = None
    keep_log: pathlib.Path | None = None
    py_spy: pathlib.Path | None = None  # a folder: py-spy profiles of the operator per phase
    freeze: bool = True  # gc.freeze() this process's objects after populating


class GcPauses:
    """This process's garbage collections (gc.callbacks): the harness's own stalls."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []  # (generation, seconds)
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._started))

    def take(self) -> dict[str, float | int]:
        pauses, self.pauses = self.pauses, []
        full = [seconds for generation, seconds in pauses if generation == 2]
        return {
            "collections": len(pauses),
            "total_ms": round(1000 * sum(s for _, s in pauses), 1),
            "gen2": len(full),
            "max_ms": round(1000 * max((s for _, s in pauses), default=0.0), 1),
        }


@contextlib.asynccontextmanager
async def py_spy(folder: pathlib.Path | None, pid: int, name: str) -> AsyncIterator[None]:
    """``py-spy record`` on the operator while the block runs (collapsed stacks)."""
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    recorder = await asyncio.create_subprocess_exec(
        "py-spy", "record", "--nonblocking", "--rate", "200", "--format", "raw",
        "--pid", str(pid), "--output", str(folder / f"{name}.txt"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield
    finally:
        if recorder.returncode is None:
            recorder.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                await asyncio.wait_for(recorder.wait(), 30)
            except TimeoutError:
                recorder.kill()
                await recorder.wait()


@dataclasses.dataclass
class Pod:
    namespace: str
    name: str
    node: str
    uid: str
    ip: str


@dataclasses.dataclass
class Waiter:
    uid: str
    present: bool  # the change is seen when the uid is (True) or is not (False) in a set
    since: float
    done: asyncio.Future[float]


@dataclasses.dataclass
class Change:
    index: int
    kind: str  # opt-out, opt-in, delete, create
    node: str
    latency: float | None  # seconds; None: not seen within CHANGE_TIMEOUT


class Watch:
    """Every agent's accepted sets, as they come (FakeAgent.on_accept): convergence and changes."""

    def __init__(self, fleet: FakeAgentFleet) -> None:
        self.waiters: defaultdict[str, list[Waiter]] = defaultdict(list)
        self.expected: dict[str, set[str]] = {}  # node -> pod uids, for initial convergence
        self.converged_at: dict[str, float] = {}
        self.all_converged = asyncio.Event()
        self.agents = fleet.by_name
        for agent in fleet:
            agent.on_accept = self._accepted

    def _accepted(self, agent: FakeAgent, accepted: Accepted) -> None:
        uids = {pod.uid for pod in accepted.pod_set.pods}
        node = agent.name
        if node not in self.converged_at and uids == self.expected.get(node):
            self.converged_at[node] = accepted.at
            if len(self.converged_at) == len(self.expected):
                self.all_converged.set()
        waiters = self.waiters.get(node)
        if waiters:
            for waiter in list(waiters):
                if (waiter.uid in uids) == waiter.present and not waiter.done.done():
                    waiter.done.set_result(accepted.at)
                    waiters.remove(waiter)

    async def seen(self, node: str, uid: str, *, present: bool, since: float) -> float | None:
        """When the node's agent took a set (after ``since``) with ``uid`` (or without it)."""
        for accepted in reversed(self.agents[node].accepted):  # already there?
            if accepted.at < since:
                break
            if (uid in {p.uid for p in accepted.pod_set.pods}) == present:
                return accepted.at
        waiter = Waiter(uid, present, since, asyncio.get_running_loop().create_future())
        self.waiters[node].append(waiter)
        try:
            return await asyncio.wait_for(waiter.done, CHANGE_TIMEOUT)
        except TimeoutError:
            return None
        finally:
            if waiter in self.waiters[node]:
                self.waiters[node].remove(waiter)


# -- the operator process ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Usage:
    rss_mb: float
    hwm_mb: float
    cpu_seconds: float


def usage(pid: int) -> Usage:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    kb = {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    after_name = stat.rsplit(")", 1)[1].split()  # the name may hold spaces
    utime, stime = int(after_name[11]), int(after_name[12])  # fields 14 and 15
    return Usage(kb["VmRSS"] / 1024, kb["VmHWM"] / 1024, (utime + stime) / CLK_TCK)


@contextlib.asynccontextmanager
async def operator_process(
    kubeconfig: pathlib.Path, push_window: float, log: pathlib.Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "MESHACCEL_NAMESPACE": NAMESPACE,
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("KUBERNETES_SERVICE_HOST", None)  # no in-cluster login
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "meshaccel.operator.main",
            "--standalone",
            "--namespace",
            NAMESPACE,
            "--liveness",
            "",
            "--metrics-port",
            "0",
            "--push-window",
            str(push_window),
            cwd=REPO,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)  # Kopf stops gracefully on it
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
                await process.wait()


def write_kubeconfig(path: pathlib.Path, server: str) -> None:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emulator", "cluster": {"server": server}}],
                "users": [{"name": "bench", "user": {"token": TOKEN}}],
                "contexts": [
                    {
                        "name": "emulator",
                        "context": {"cluster": "emulator", "user": "bench", "namespace": "default"},
                    }
                ],
                "current-context": "emulator",
            }
        )
    )


# -- the fleet -----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def fleet_on_one_port(count: int) -> AsyncIterator[FakeAgentFleet]:
    """A fleet whose agents all listen on one port (the DaemonSet has one port for all)."""
    for _ in range(10):
        with socket.socket() as probe:
            probe.bind((str(FLEET_NETWORK), 0))
            port = int(probe.getsockname()[1])
        fleet = FakeAgentFleet(count, tls=None, port=port, max_pods=4096)
        try:
            await fleet.start()
        except OSError:  # taken on some other address: another port
            await fleet.close()
            continue
        try:
            yield fleet
        finally:
            await fleet.close()
        return
    raise RuntimeError("no port free on every fleet address")


# -- the benchmark -------------------------------------------------------------------------------


class Bench:
    def __init__(self, options: Options, kube: KubeClient, fleet: FakeAgentFleet) -> None:
        self.options = options
        self.kube = kube
        self.fleet = fleet
        self.nodes = [agent.name for agent in fleet]
        self.watch = Watch(fleet)
        self.pods: list[Pod] = []
        self.busy: set[int] = set()
        self.replacements = 0
        self.random = random.Random(options.seed)
        self.semaphore = asyncio.Semaphore(32)

    async def _limited(self, coroutines: Sequence[Any]) -> list[Any]:
        async def one(coroutine: Any) -> Any:
            async with self.semaphore:
                return await coroutine

        return await asyncio.gather(*(one(c) for c in coroutines))

    async def populate(self) -> dict[str, Any]:
        started = time.monotonic()
        o = self.options
        await self.kube.create_namespace(NAMESPACE)
        namespaces = [f"app-{i:03d}" for i in range(o.namespaces)]
        await self._limited([self.kube.create_namespace(ns, ENABLED) for ns in namespaces])
        await self._limited(
            [
                self.kube.create_node(node, address=f"198.18.{i // 250}.{i % 250 + 1}")
                for i, node in enumerate(self.nodes)
            ]
        )
        specs = [
            (namespaces[i % o.namespaces], f"app-{i:05d}", self.nodes[i % o.nodes], POD_NETWORK + i)
            for i in range(o.pods)
        ]
        created = await self._limited(
            [
                self.kube.create_pod(ns, name, node=node, pod_ip=str(ip))
                for ns, name, node, ip in specs
            ]
        )
        for (ns, name, node, ip), obj in zip(specs, created, strict=True):
            self.pods.append(Pod(ns, name, node, obj["metadata"]["uid"], str(ip)))
        expected: dict[str, set[str]] = {node: set() for node in self.nodes}
        for pod in self.pods:
            expected[pod.node].add(pod.uid)
        self.watch.expected = expected
        return {
            "seconds": round(time.monotonic() - started, 2),
            "namespaces": o.namespaces + 1,
            "nodes": o.nodes,
            "pods": o.pods,
            "validated": o.validate,
        }

    async def create_acceleration(self) -> None:
        port = self.fleet.agents[0].port
        await self.kube.create(
            api_path(*MA),
            {
                "apiVersion": "meshaccel.io/v1alpha1",
                "kind": "MeshAcceleration",
                "metadata": {"name": "default"},
                "spec": {"namespaceSelector": {"matchLabels": ENABLED}, "agent": {"port": port}},
            },
        )

    async def schedule_agents(self, timeout: float = 120) -> float:
        """Play the DaemonSet controller: an agent pod per node, Running at its fake agent.
        Returns when (time.monotonic()) the DaemonSet was first seen."""
        ds_name = operator_rendering.daemonset_name("default")
        ds_path = api_path("apps/v1", "daemonsets", NAMESPACE, ds_name)
        deadline = time.monotonic() + timeout
        while True:
            status, daemonset = await self.kube.request("GET", ds_path)
            if status == 200:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no DaemonSet {ds_name} within {timeout} s")
            await asyncio.sleep(0.05)
        seen = time.monotonic()
        await self.fleet.use_tls(await agent_tls(self.kube, NAMESPACE, "default"))
        await self._limited(
            [run_agent_pod(self.kube, daemonset, agent.name, agent.host) for agent in self.fleet]
        )
        await report_rollout(self.kube, daemonset, len(self.fleet))
        return seen

    # -- changes ---------------------------------------------------------------------------

    def _pick(self) -> int:
        while True:
            index = self.random.randrange(len(self.pods))
            if index not in self.busy:
                self.busy.add(index)
                return index

    async def _timed(
        self, kind: str, index: int, node: str, request: Any, uid: str | None, present: bool
    ) -> Change:
        since = time.monotonic()
        result = await request
        uid = uid if uid is not None else result["metadata"]["uid"]
        seen = await self.watch.seen(node, uid, present=present, since=since)
        return Change(index, kind, node, None if seen is None else seen - since)

    async def opt_out_and_in(self, first: int) -> list[Change]:
        slot = self._pick()
        try:
            return await self._opt_out_and_in(first, self.pods[slot])
        finally:
            self.busy.discard(slot)

    async def _opt_out_and_in(self, first: int, pod: Pod) -> list[Change]:
        path = api_path("v1", "pods", pod.namespace, pod.name)
        out = await self._timed(
            "opt-out",
            first,
            pod.node,
            self.kube.merge(path, {"metadata": {"annotations": {OPT_OUT: "false"}}}),
            pod.uid,
            False,
        )
        back = await self._timed(
            "opt-in",
            first + 1,
            pod.node,
            self.kube.merge(path, {"metadata": {"annotations": {OPT_OUT: None}}}),
            pod.uid,
            True,
        )
        return [out, back]

    async def delete_and_replace(self, first: int) -> list[Change]:
        slot = self._pick()
        try:
            return await self._delete_and_replace(first, slot, self.pods[slot])
        finally:
            self.busy.discard(slot)

    async def _delete_and_replace(self, first: int, slot: int, pod: Pod) -> list[Change]:
        gone = await self._timed(
            "delete",
            first,
            pod.node,
            self.kube.delete(api_path("v1", "pods", pod.namespace, pod.name)),
            pod.uid,
            False,
        )
        self.replacements += 1
        name = f"{pod.name.split('-r')[0]}-r{self.replacements}"
        ip = str(REPLACEMENT_NETWORK + self.replacements)
        since = time.monotonic()
        # As a kubelet does: the pod is created, then its status says Running with an IP.
        created = await self.kube.create_pod(pod.namespace, name, node=pod.node, pod_ip=ip)
        uid = created["metadata"]["uid"]
        seen = await self.watch.seen(pod.node, uid, present=True, since=since)
        new = Change(first + 1, "create", pod.node, None if seen is None else seen - since)
        self.pods[slot] = Pod(pod.namespace, name, pod.node, uid, ip)
        return [gone, new]

    async def changes(self, concurrency: int, total: int) -> list[Change]:
        """``total`` changes (rounded up to pairs), at most ``concurrency`` in flight."""
        pairs = iter(range(math.ceil(total / 2)))
        done: list[Change] = []

        async def worker() -> None:
            for pair in pairs:
                step = self.opt_out_and_in if pair % 2 == 0 else self.delete_and_replace
                done.extend(await step(2 * pair))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return sorted(done, key=lambda c: c.index)


# -- statistics and reporting --------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest rank: the smallest value at least ``fraction`` of the values are not above."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def summary(latencies: Sequence[float]) -> dict[str, float | int]:
    values = sorted(latencies)
    if not values:
        return {"count": 0}
    ms = [v * 1000 for v in values]
    return {
        "count": len(ms),
        "p50_ms": round(percentile(ms, 0.50), 1),
        "p90_ms": round(percentile(ms, 0.90), 1),
        "p99_ms": round(percentile(ms, 0.99), 1),
        "max_ms": round(ms[-1], 1),
        "mean_ms": round(sum(ms) / len(ms), 1),
    }


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def markdown(result: dict[str, Any]) -> str:
    initial = result["initial"]
    lines = [
        f"Operator benchmark: {result['config']['nodes']} nodes, {result['config']['pods']} pods, "
        f"push window {result['config']['push_window']} s",
        "",
        "| phase | value |",
        "|---|---|",
        f"| populate (API objects, validated={result['populate']['validated']}) | "
        f"{result['populate']['seconds']} s |",
        f"| operator start -> DaemonSet | {initial['daemonset_s']} s |",
        f"| agent pods scheduled (by the harness) | {initial['agents_scheduled_s']} s |",
        f"| initial convergence, from operator start | {initial['from_operator_start_s']} s |",
        f"| initial convergence, from last agent pod Running | "
        f"{initial['from_agents_running_s']} s |",
        f"| operator RSS after convergence (VmRSS / VmHWM) | "
        f"{initial['rss_mb']} / {initial['hwm_mb']} MB |",
        f"| operator CPU until convergence | {initial['cpu_s']} s |",
        f"| operator background CPU, idle | {result['idle_cpu_per_s']} s/s |",
        "",
        "| concurrency | changes | missed | p50 ms | p90 ms | p99 ms | max ms | "
        "CPU ms/change (net of idle) | RSS / HWM MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for level in result["steady"]:
        lat = level["latency"]
        lines.append(
            f"| {level['concurrency']} | {lat['count']} | {level['missed']} | "
            f"{lat.get('p50_ms')} | {lat.get('p90_ms')} | {lat.get('p99_ms')} | "
            f"{lat.get('max_ms')} | {level['cpu_ms_per_change']} "
            f"({level['cpu_ms_per_change_net']}) | {level['rss_mb']} / {level['hwm_mb']} |"
        )
    lines += [
        "",
        "| concurrency | kind | count | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|",
    ]
    for level in result["steady"]:
        for kind, lat in level["by_kind"].items():
            lines.append(
                f"| {level['concurrency']} | {kind} | {lat['count']} | {lat.get('p50_ms')} | "
                f"{lat.get('p99_ms')} | {lat.get('max_ms')} |"
            )
    aims = result["aims"]
    lines += [
        "",
        f"Aim p99 < {AIM_P99_SECONDS * 1000:.0f} ms: {'met' if aims['p99'] else 'missed'} "
        f"(worst p99 {aims['worst_p99_ms']} ms); "
        f"aim RSS < {AIM_RSS_MB:.0f} MB: {'met' if aims['rss'] else 'missed'} "
        f"(peak {aims['peak_hwm_mb']} MB)",
    ]
    return "\n".join(lines)


# -- the run -------------------------------------------------------------------------------------


async def run(options: Options) -> dict[str, Any]:
    result: dict[str, Any] = {
        "config": {
            key: (str(value) if isinstance(value, pathlib.Path) else value)
            for key, value in dataclasses.asdict(options).items()
        },
        "machine": machine(),
    }
    async with contextlib.AsyncExitStack() as stack:
        workdir = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-op-")))
        emulator = BenchEmulator(validate_builtins=options.validate)
        emulator.load_crds(CRDS)
        await stack.enter_async_context(emulator)
        await stack.enter_async_context(kmock.Server(emulator))
        kubeconfig = workdir / "kubeconfig"
        write_kubeconfig(kubeconfig, str(emulator.url).rstrip("/"))
        session = await stack.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        )
        kube = KubeClient(session, str(emulator.url))
        fleet = await stack.enter_async_context(fleet_on_one_port(options.nodes))
        bench = Bench(options, kube, fleet)

        result["populate"] = await bench.populate()
        print(f"populated in {result['populate']['seconds']} s", file=sys.stderr)
        if options.freeze:
            # The emulator's objects and history are millions of long-lived objects: without
            # this, each full collection here stalls the API and the fleet for ~0.1-0.5 s.
            gc.collect()
            gc.freeze()
            stack.callback(gc.unfreeze)
        pauses = GcPauses()
        gc.callbacks.append(pauses)
        stack.callback(gc.callbacks.remove, pauses)

        log = options.keep_log or workdir / "operator.log"
        started = time.monotonic()
        process = await stack.enter_async_context(
            operator_process(kubeconfig, options.push_window, log)
        )
        result["operator_pid"] = process.pid
        async with py_spy(options.py_spy, process.pid, "initial"):
            await bench.create_acceleration()
            daemonset_at = await bench.schedule_agents()
            scheduled = time.monotonic()
            try:
                await asyncio.wait_for(bench.watch.all_converged.wait(), 600)
            except TimeoutError:
                missing = len(bench.watch.expected) - len(bench.watch.converged_at)
                raise RuntimeError(f"{missing} agents never got their full set in 600 s") from None
        converged = max(bench.watch.converged_at.values())
        at_convergence = usage(process.pid)
        result["initial"] = {
            "daemonset_s": round(daemonset_at - started, 2),
            "agents_scheduled_s": round(scheduled - daemonset_at, 2),
            "from_operator_start_s": round(converged - started, 2),
            "from_agents_running_s": round(converged - scheduled, 2),
            "rss_mb": round(at_convergence.rss_mb, 1),
            "hwm_mb": round(at_convergence.hwm_mb, 1),
            "cpu_s": round(at_convergence.cpu_seconds, 2),
            "harness_gc": pauses.take(),
        }
        print(f"converged {result['initial']}", file=sys.stderr)

        # Background: probes (each agent every 15 s), the status timer (every 5 s).
        before = usage(process.pid)
        await asyncio.sleep(options.idle)
        idle_rate = (usage(process.pid).cpu_seconds - before.cpu_seconds) / options.idle
        result["idle_cpu_per_s"] = round(idle_rate, 3)

        result["steady"] = []
        for concurrency in options.concurrency:
            await bench.changes(concurrency, options.warmup)
            pauses.take()
            async with py_spy(options.py_spy, process.pid, f"steady-c{concurrency}"):
                before, t0 = usage(process.pid), time.monotonic()
                changes = await bench.changes(concurrency, options.changes)
                after, t1 = usage(process.pid), time.monotonic()
            seen = [c for c in changes if c.latency is not None]
            cpu = after.cpu_seconds - before.cpu_seconds
            by_kind: dict[str, list[float]] = defaultdict(list)
            for change in seen:
                assert change.latency is not None
                by_kind[change.kind].append(change.latency)
            level = {
                "concurrency": concurrency,
                "changes": len(changes),
                "missed": len(changes) - len(seen),
                "seconds": round(t1 - t0, 2),
                "latency": summary([c.latency for c in seen if c.latency is not None]),
                "by_kind": {kind: summary(values) for kind, values in sorted(by_kind.items())},
                "cpu_s": round(cpu, 2),
                "cpu_ms_per_change": round(1000 * cpu / max(1, len(changes)), 2),
                "cpu_ms_per_change_net": round(
                    1000 * (cpu - idle_rate * (t1 - t0)) / max(1, len(changes)), 2
                ),
                "rss_mb": round(after.rss_mb, 1),
                "hwm_mb": round(after.hwm_mb, 1),
                "harness_gc": pauses.take(),
            }
            result["steady"].append(level)
            print(f"concurrency {concurrency}: {level['latency']}", file=sys.stderr)
        result["emulator_rejections"] = len(emulator.rejections)
    result["operator_exit"] = process.returncode
    p99s = [lvl["latency"].get("p99_ms", math.inf) for lvl in result["steady"]]
    peak = max([result["initial"]["hwm_mb"], *(lvl["hwm_mb"] for lvl in result["steady"])])
    result["aims"] = {
        "p99": bool(p99s) and max(p99s) < AIM_P99_SECONDS * 1000,
        "worst_p99_ms": max(p99s) if p99s else None,
        "rss": peak < AIM_RSS_MB,
        "peak_hwm_mb": peak,
    }
    return result


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m tests.operator.bench_operator", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--pods", type=int, default=10_000)
    parser.add_argument("--namespaces", type=int, default=50)
    parser.add_argument("--changes", type=int, default=300, help="measured changes per level")
    parser.add_argument("--warmup", type=int, default=20, help="discarded changes per level")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 8], help="changes in flight (levels)"
    )
    parser.add_argument("--push-window", type=float, default=0.1)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds to measure idle CPU")
    parser.add_argument(
        "--no-validate",
        dest="validate",
        action="store_false",
        help="skip kubernetes-validate on built-in kinds (faster populate)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--operator-log", type=pathlib.Path, help="keep the operator's log here")
    parser.add_argument(
        "--py-spy",
        type=pathlib.Path,
        metavar="DIR",
        help="profile the operator with py-spy per phase (collapsed stacks in DIR)",
    )
    parser.add_argument(
        "--no-freeze", dest="freeze", action="store_false", help="no gc.freeze() in the harness"
    )
    args = parser.parse_args(argv)
    if not 0 < args.nodes <= 60_000 or args.pods < args.nodes or args.namespaces < 1:
        parser.error("need 0 < nodes <= 60000, pods >= nodes, namespaces >= 1")
    if args.changes < 2 or args.warmup < 0 or min(args.concurrency) < 1:
        parser.error("need changes >= 2, warmup >= 0, concurrency >= 1")
    if min(args.concurrency) * 2 > args.pods:
        parser.error("too few pods for that concurrency")
    return Options(
        nodes=args.nodes,
        pods=args.pods,
        namespaces=args.namespaces,
        changes=args.changes,
        warmup=args.warmup,
        concurrency=tuple(args.concurrency),
        push_window=args.push_window,
        idle=args.idle,
        validate=args.validate,
        seed=args.seed,
        json=args.json,
        keep_log=args.operator_log,
        py_spy=args.py_spy,
        freeze=args.freeze,
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    options = parse_args(argv)
    result = asyncio.run(run(options))
    print(markdown(result))
    if options.json is not None:
        options.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
