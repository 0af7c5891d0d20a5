"""The workloads: what load each one runs, from which pod, and how its output is read.

| workload | tool (in the client pod) | Envoy filters | unit |
|---|---|---|---|
| http-keepalive-N | wrk -t1 -cN, keep-alive, GET / from nginx | HTTP | req/s |
| http-close-16 | wrk -t1 -c16 -H "Connection: close" (a connection per request) | HTTP | req/s |
| tcp-rr-N | C rr client: 1 KB request, 1 KB response, N connections | tcp_proxy | trans/s |
| tcp-bulk | iperf3 -c, one stream | tcp_proxy | MiB/s |
| micro-rr-1 | C rr client -> C rr server, both in the micro pod, no Envoy | none | trans/s |

The micro-benchmark shows the kernel path alone: one connection between two sockets of one pod,
plain loopback TCP without meshaccel, redirected by sk_msg with it (in the default (d) the
requests only, into the stand-in sidecar's socket; in (d+), where the pod is opted in with
sk_msg_to_app, both directions). It runs in the configurations where that makes a difference:
(a) loopback TCP, (c) steered at connect, bytes on TCP, (d), (d+).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from .accounting import ClientRun

Kind = Literal["http", "tcp-rr", "tcp-bulk", "micro"]
RR_SIZE = 1024


@dataclass(frozen=True)
class Workload:
    name: str
    kind: Kind
    connections: int = 1
    close: bool = False  # HTTP: a new connection per request
    unit: str = "req/s"
    op: str = "request"  # what the CPU time is divided by
    configs: tuple[str, ...] | None = None  # None: every configuration
    baseline: str = "b"  # ratios are taken against this configuration...
    ceiling: str | None = "e"  # ...and against this one

    def applies_to(self, config_key: str) -> bool:
        return self.configs is None or config_key in self.configs

    @property
    def request_response(self) -> bool:
        """Every workload but the bulk stream: a sender never gets far ahead of its receiver,
        so sk_msg must never fall back to TCP here."""
        return self.kind != "tcp-bulk"

    @property
    def service(self) -> Literal["http", "rr", "bulk"]:
        if self.kind == "http":
            return "http"
        if self.kind == "tcp-bulk":
            return "bulk"
        return "rr"


WORKLOADS: tuple[Workload, ...] = (
    Workload("http-keepalive-1", "http", connections=1),
    Workload("http-keepalive-16", "http", connections=16),
    Workload("http-keepalive-64", "http", connections=64),
    Workload("http-close-16", "http", connections=16, close=True),
    Workload("tcp-rr-1", "tcp-rr", connections=1, unit="trans/s", op="transaction"),
    Workload("tcp-rr-16", "tcp-rr", connections=16, unit="trans/s", op="transaction"),
    Workload("tcp-bulk", "tcp-bulk", unit="MiB/s", op="MiB"),
    Workload(
        "micro-rr-1",
        "micro",
        unit="trans/s",
        op="transaction",
        configs=("a", "c", "d", "d+"),
        baseline="a",
        ceiling=None,
    ),
)
WORKLOADS_BY_NAME = {workload.name: workload for workload in WORKLOADS}
QUICK_WORKLOADS = ("http-keepalive-16", "tcp-rr-1", "tcp-bulk", "micro-rr-1")
SMALLEST_WORKLOAD = "http-keepalive-1"


def whole_seconds(duration: float) -> int:
    """wrk and iperf3 take whole seconds."""
    return max(1, math.ceil(duration - 1e-9))


def load_argv(
    workload: Workload,
    host: str,
    port: int,
    duration: float,
    *,
    wrk: str,
    wrk_script: str,
    iperf3: str,
    rr: str,
) -> list[str]:
    """The load generator's command line (run inside a pod by the caller)."""
    if workload.kind == "http":
        argv = [
            wrk,
            "-t1",
            f"-c{workload.connections}",
            f"-d{whole_seconds(duration)}s",
            "--timeout",
            "5s",
            "-s",
            wrk_script,
        ]
        if workload.close:
            argv += ["-H", "Connection: close"]
        return [*argv, f"http://{host}:{port}/"]
    if workload.kind in ("tcp-rr", "micro"):
        return [
            rr,
            "client",
            "--host",
            host,
            "--port",
            str(port),
            "--connections",
            str(workload.connections),
            "--size",
            str(RR_SIZE),
            "--duration",
            f"{duration:g}",
        ]
    return [iperf3, "-c", host, "-p", str(port), "-t", str(whole_seconds(duration)), "-J"]


@dataclass
class LoadResult:
    """What one load run achieved. `ops` is requests, transactions or MiB; latencies in us."""

    ok: bool
    ops: float = 0.0
    seconds: float = 0.0
    p50_us: float | None = None
    p90_us: float | None = None
    p99_us: float | None = None
    errors: int = 0
    error: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0


def _last_json(stdout: str) -> dict[str, Any] | None:
    """The last line that parses as a JSON object, or the whole text (iperf3 -J)."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    try:
        value = json.loads(stdout)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def parse_load(workload: Workload, run: ClientRun) -> LoadResult:
    """Read the tool's JSON output; any error, timeout or empty run makes the result not ok."""
    record = _last_json(run.stdout)
    failure = f"rc={run.returncode}{' (timed out)' if run.timed_out else ''}: {run.stderr[-500:]}"
    if record is None:
        return LoadResult(ok=False, error=f"no JSON output, {failure}")
    if workload.kind == "http":
        result = _parse_wrk(record)
    elif workload.kind == "tcp-bulk":
        result = _parse_iperf3(record)
    else:
        result = _parse_rr(record)
    if run.returncode != 0 or run.timed_out:
        result.ok = False
        result.error = result.error or failure
    return result


def _parse_wrk(record: dict[str, Any]) -> LoadResult:
    errors = sum(int(v) for v in dict(record.get("errors", {})).values())
    requests = int(record.get("requests", 0))
    result = LoadResult(
        ok=errors == 0 and requests > 0,
        ops=requests,
        seconds=int(record.get("duration_us", 0)) / 1e6,
        p50_us=float(record["p50_us"]),
        p90_us=float(record["p90_us"]),
        p99_us=float(record["p99_us"]),
        errors=errors,
        raw=record,
    )
    if not result.ok:
        result.error = f"wrk: {requests} requests, errors {record.get('errors')}"
    return result


def _parse_rr(record: dict[str, Any]) -> LoadResult:
    requests = int(record.get("requests", 0))
    errors = int(record.get("errors", 0))
    result = LoadResult(
        ok=errors == 0 and requests > 0,
        ops=requests,
        seconds=float(record.get("seconds", 0.0)),
        p50_us=float(record["p50_us"]),
        p90_us=float(record["p90_us"]),
        p99_us=float(record["p99_us"]),
        errors=errors,
        error=str(record.get("error", "")),
        raw=record,
    )
    if not result.ok and not result.error:
        result.error = f"rr: {requests} transactions"
    return result


def _parse_iperf3(record: dict[str, Any]) -> LoadResult:
    if record.get("error"):
        return LoadResult(ok=False, errors=1, error=f"iperf3: {record['error']}", raw=record)
    received = dict(dict(record.get("end", {})).get("sum_received", {}))
    mib = float(received.get("bytes", 0)) / (1 << 20)
    compact = {
        "sum_received": received,
        "sum_sent": dict(record.get("end", {})).get("sum_sent", {}),
        "cpu_utilization_percent": dict(record.get("end", {})).get("cpu_utilization_percent"),
    }
    return LoadResult(
        ok=mib > 0,
        ops=mib,
        seconds=float(received.get("seconds", 0.0)),
        raw=compact,
        error="" if mib > 0 else "iperf3: nothing received",
    )
