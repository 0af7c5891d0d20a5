"""One measurement: a workload under the configuration in place, with everything read around it."""

from __future__ import annotations

import time
from typing import Any

from tests.netlab.tcpmem import PeakSampler

from . import bpfstats
from .accounting import (
    ClientRun,
    MachineCpu,
    cpu_delta,
    cpu_snapshot,
    run_client,
    switches_snapshot,
)
from .configs import Config
from .counters import (
    CONNECT_OUTBOUND_REDIRECTED,
    ERROR_COUNTERS,
    FALLBACK_COUNTERS,
    MSG_REDIRECTED,
)
from .lab import ACTIVITY_REGEX, WRK_SCRIPT, BenchLab, envoy_stats, listener_activity
from .workloads import LoadResult, Workload, load_argv, parse_load

CLIENT_TIMEOUT_SLACK_S = 30.0


def long_running_pids(lab: BenchLab, workload: Workload) -> dict[str, int]:
    """The processes whose CPU time a measurement of `workload` accounts (besides the client)."""
    if workload.kind == "micro":
        return {"server_app": lab.micro_server.pid}
    return {**lab.sidecar_pids(), "server_app": lab.servers[workload.service].pid}


def run_load(
    lab: BenchLab, workload: Workload, config: Config, duration: float
) -> tuple[LoadResult, ClientRun, str]:
    """Run the load generator once; returns its result, the run and the target."""
    if workload.kind == "micro":
        host, port = lab.micro_target()
        pod = lab.micro
    else:
        host, port = lab.target(workload.service, config)
        pod = lab.client
    argv = load_argv(
        workload,
        host,
        port,
        duration,
        wrk=lab.tools.wrk,
        wrk_script=str(WRK_SCRIPT),
        iperf3=lab.tools.iperf3,
        rr=str(lab.rr),
    )
    run = run_client(pod.command(argv), timeout=duration + CLIENT_TIMEOUT_SLACK_S)
    return parse_load(workload, run), run, f"{host}:{port}"


def _counters(lab: BenchLab) -> dict[str, int] | None:
    if lab.datapath is None:
        return None
    return {counter.metric_name: value for counter, value in lab.datapath.counters().items()}


def _activity(lab: BenchLab) -> dict[str, dict[str, int]]:
    return {
        "A": listener_activity(envoy_stats(lab.envoy_a, ACTIVITY_REGEX)),
        "B": listener_activity(envoy_stats(lab.envoy_b, ACTIVITY_REGEX)),
    }


def _diff(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {key: after.get(key, 0) - before.get(key, 0) for key in sorted(set(before) | set(after))}


def measure(
    lab: BenchLab,
    workload: Workload,
    config: Config,
    *,
    duration: float,
    warmup: float,
) -> dict[str, Any]:
    """Warm up, then one measured run; returns the JSON record of it (see docs/benchmarks.md)."""
    if warmup > 0:
        run_load(lab, workload, config, warmup)
    pids = long_running_pids(lab, workload)
    activity_before = _activity(lab)
    counters_before = _counters(lab)
    programs_before = bpfstats.read_program_stats(lab.program_ids)
    switches_before = switches_snapshot(pids)
    cpu_before = cpu_snapshot(pids)
    machine_before = MachineCpu.read()
    started = time.time()

    with PeakSampler() as tcp_mem:
        result, client, target = run_load(lab, workload, config, duration)

    machine_after = MachineCpu.read()
    cpu = cpu_delta(cpu_before, cpu_snapshot(pids))
    switches = _diff(switches_before, switches_snapshot(pids))
    switches["client_app"] = client.context_switches
    programs_after = bpfstats.read_program_stats(lab.program_ids)
    counters_after = _counters(lab)
    activity_after = _activity(lab)

    cpu["client_app"] = round(client.cpu_seconds, 6)
    ours = sum(cpu.values())
    machine_busy = machine_after.busy_seconds_since(machine_before)
    activity = {
        side: {k: v for k, v in _diff(activity_before[side], activity_after[side]).items() if v}
        for side in ("A", "B")
    }
    counters = (
        None
        if counters_before is None or counters_after is None
        else {k: v for k, v in _diff(counters_before, counters_after).items() if v}
    )
    programs = bpfstats.stats_delta(programs_before, programs_after) if lab.program_ids else None
    record: dict[str, Any] = {
        "workload": workload.name,
        "config": config.key,
        "started": round(started, 3),
        "target": target,
        "ok": result.ok,
        "error": result.error,
        "unit": workload.unit,
        "op": workload.op,
        "ops": round(result.ops, 3),
        "seconds": round(result.seconds, 4),
        "rate": round(result.rate, 2),
        "p50_us": result.p50_us,
        "p90_us": result.p90_us,
        "p99_us": result.p99_us,
        "cpu_seconds": cpu,
        "cpu_us_per_op": _per_op(cpu, result.ops),
        "context_switches": switches,
        "context_switches_per_op": (
            round(sum(switches.values()) / result.ops, 3) if result.ops > 0 else None
        ),
        "machine_busy_seconds": round(machine_busy, 3),
        "foreign_cpu_seconds": round(max(0.0, machine_busy - ours), 3),
        "tcp_mem_pages_before": tcp_mem.before,
        "tcp_mem_pages_peak": tcp_mem.peak,
        "tcp_mem_samples": tcp_mem.samples,
        "envoy_activity": activity,
        "datapath_counters": counters,
        "bpf_programs": programs,
        "tool": result.raw,
    }
    if programs is not None and result.ops > 0:
        record["bpf_ns_per_op"] = {
            name: round(values["run_time_ns"] / result.ops, 1) for name, values in programs.items()
        }
    record["checks"] = checks(lab, workload, config, record)
    record["warnings"] = fallback_warnings(workload, config, counters)
    record["valid"] = result.ok and all(check["ok"] for check in record["checks"])
    return record


def _per_op(cpu: dict[str, float], ops: float) -> dict[str, float] | None:
    if ops <= 0:
        return None
    sidecars = cpu.get("envoy_client", 0.0) + cpu.get("envoy_server", 0.0)
    apps = cpu.get("server_app", 0.0) + cpu.get("client_app", 0.0)
    return {
        "total": round((sidecars + apps) * 1e6 / ops, 3),
        "sidecars": round(sidecars * 1e6 / ops, 3),
        "apps": round(apps * 1e6 / ops, 3),
    }


def _check(name: str, ok: bool, detail: object) -> dict[str, Any]:
    return {"name": name, "ok": bool(ok), "detail": detail}


def checks(
    lab: BenchLab, workload: Workload, config: Config, record: dict[str, Any]
) -> list[dict[str, Any]]:
    """That the measurement took the path its configuration claims (Envoy listeners, counters)."""
    found: list[dict[str, Any]] = []
    activity = record["envoy_activity"]
    expected = (
        None if workload.kind == "micro" else lab.expected_listeners(workload.service, config)
    )
    if expected is None:
        found.append(_check("no sidecar hop", not activity["A"] and not activity["B"], activity))
    else:
        for side, listener in zip(("A", "B"), expected, strict=True):
            others = {k: v for k, v in activity[side].items() if k != listener}
            found.append(
                _check(
                    f"Envoy {side} carried it on {listener} only",
                    activity[side].get(listener, 0) > 0 and not others,
                    activity[side],
                )
            )
    return found + counter_checks(config, record["datapath_counters"])


def counter_checks(config: Config, counters: dict[str, int] | None) -> list[dict[str, Any]]:
    """With meshaccel loaded: it steered, sk_msg redirected exactly when the configuration
    says so, and no COUNTER_ERROR_* moved (`counters`: the measurement's non-zero deltas)."""
    if config.features is None:
        return []
    counters = counters or {}
    steered = counters.get(CONNECT_OUTBOUND_REDIRECTED, 0)
    redirected = counters.get(MSG_REDIRECTED, 0)
    errors = {name: counters[name] for name in ERROR_COUNTERS if counters.get(name)}
    found = [_check("meshaccel steered the client's connects", steered > 0, counters)]
    if config.redirects_messages:
        found.append(_check("sk_msg redirected messages", redirected > 0, redirected))
    else:
        found.append(_check("sk_msg redirected nothing", redirected == 0, redirected))
    found.append(_check("no datapath errors", not errors, errors))
    return found


def fallback_warnings(
    workload: Workload, config: Config, counters: dict[str, int] | None
) -> list[dict[str, Any]]:
    """Findings that do not invalidate a measurement: a fallback to TCP on request/response
    traffic. Such a round still measures what the configuration does (the direction that fell
    back took TCP from then on), so it stays in the medians: leaving it out would make the
    configuration look better than it is. On tcp-bulk a fallback is the budget doing its job."""
    if config.features is None or not workload.request_response:
        return []
    moved = counters or {}
    fallbacks = {name: moved[name] for name in FALLBACK_COUNTERS if moved.get(name)}
    if not fallbacks:
        return []
    return [{"name": "sk_msg fell back to TCP on request/response traffic", "detail": fallbacks}]
