"""The run: the lab, the interleaved rounds, the profile pass, and the files it writes."""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.netlab import Node, find_envoy_binary, remove_stale_leftovers
from tests.netlab.requirements import missing_netlab_requirements
from tests.netlab.tcpmem import read_tcp_mem_limits

from . import report
from .bpfstats import bpf_stats_enabled
from .configs import CONFIGS, CONFIGS_BY_KEY, Config, rotated
from .lab import PIN_ROOT, BenchLab, Tools, remove_stale_pins
from .measure import measure
from .profile import profile_one
from .workloads import QUICK_WORKLOADS, WORKLOADS, WORKLOADS_BY_NAME, Workload

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS_DIR = ROOT / "bench-results"
SWITCH_SECONDS = 2.0  # rough cost of a configuration switch, for the estimate only


@dataclass(frozen=True)
class Plan:
    rounds: int
    duration: float
    warmup: float
    workloads: tuple[str, ...]
    configs: tuple[str, ...]
    profile_workloads: tuple[str, ...] = ()
    profile_configs: tuple[str, ...] = ()
    profile_duration: float = 5.0
    chart: bool = True
    quick: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def workload_objects(self) -> tuple[Workload, ...]:
        return tuple(WORKLOADS_BY_NAME[name] for name in self.workloads)

    def config_objects(self) -> tuple[Config, ...]:
        return tuple(CONFIGS_BY_KEY[key] for key in self.configs)

    def estimate_seconds(self) -> float:
        per_round = 0.0
        for config in self.config_objects():
            applicable = [w for w in self.workload_objects() if w.applies_to(config.key)]
            if applicable:
                per_round += SWITCH_SECONDS + len(applicable) * (self.duration + self.warmup + 0.5)
        profile = (
            len(self.profile_workloads)
            * len(self.profile_configs)
            * (SWITCH_SECONDS + self.profile_duration + self.warmup + 3)
        )
        return self.rounds * per_round + profile + 15


FULL_PLAN = Plan(
    rounds=5,
    duration=10.0,
    warmup=2.0,
    workloads=tuple(w.name for w in WORKLOADS),
    configs=tuple(c.key for c in CONFIGS),
    profile_workloads=("http-keepalive-16", "tcp-rr-1", "micro-rr-1"),
    profile_configs=("b", "e", "c", "d", "d+"),
    profile_duration=5.0,
)
QUICK_PLAN = Plan(
    rounds=2,
    duration=2.0,
    warmup=0.5,
    workloads=QUICK_WORKLOADS,
    configs=tuple(c.key for c in CONFIGS),
    profile_workloads=("tcp-rr-1",),
    profile_configs=("b", "d"),
    profile_duration=2.0,
    quick=True,
)


def _first_line(argv: Sequence[str]) -> str | None:
    try:
        completed = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (completed.stdout or completed.stderr).strip()
    return text.splitlines()[0].strip() if text else None


def versions(tools: Tools) -> dict[str, str | None]:
    envoy_line = _first_line([str(find_envoy_binary()), "--version"]) or ""
    envoy = envoy_line.split("version:")[-1].strip() if "version:" in envoy_line else envoy_line
    found: dict[str, str | None] = {
        "kernel": platform.release(),
        "envoy": envoy.split("/")[1] if envoy.count("/") >= 2 else envoy or None,
        "envoy_build": envoy or None,
        "wrk": _first_line([tools.wrk, "-v"]),
        "nginx": (_first_line([tools.nginx, "-v"]) or "").removeprefix("nginx version: ") or None,
        "iperf3": _first_line([tools.iperf3, "--version"]),
        "gcc": _first_line([tools.gcc, "-dumpfullversion"]),
        "perf": _first_line([tools.perf, "--version"]) if tools.perf else None,
        "bpftool": _first_line([tools.bpftool, "version"]) if tools.bpftool else None,
        "python": platform.python_version(),
        "git": _first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
    }
    wrk = found["wrk"]
    if wrk:
        found["wrk"] = wrk.split(" [")[0].removeprefix("wrk ").strip()
    return found


def host_info() -> dict[str, Any]:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": model, "cpus": os.cpu_count(), "hostname": platform.node()}


class Results:
    """results.json, rewritten after every measurement so that an interrupted run keeps its
    rounds."""

    def __init__(self, directory: Path, meta: dict[str, Any]) -> None:
        self.directory = directory
        self.data: dict[str, Any] = {"meta": meta, "rounds": [], "profiles": []}

    @property
    def path(self) -> Path:
        return self.directory / "results.json"

    def add(self, kind: str, record: dict[str, Any]) -> None:
        self.data[kind].append(record)
        self.save()

    def save(self) -> None:
        temporary = self.path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.data, indent=1, sort_keys=False) + "\n")
        temporary.replace(self.path)


def _config_meta(config: Config) -> dict[str, Any]:
    return {
        "name": config.name,
        "label": config.label,
        "description": config.description,
        "default": config.default,
        "features": None if config.features is None else config.features.name,
        "redirect_budget": None if config.features is None else config.redirect_budget,
        "sk_msg_to_app": config.sk_msg_to_app,
    }


def _describe(record: dict[str, Any]) -> str:
    latency = (
        f" p50 {record['p50_us']:.0f}us p99 {record['p99_us']:.0f}us"
        if record.get("p50_us") is not None
        else ""
    )
    cpu = record.get("cpu_us_per_op") or {}
    status = "ok" if record["valid"] else f"INVALID: {record['error'] or _failed(record)}"
    for warning in record.get("warnings") or []:
        status += f"; WARNING: {warning['name']} {warning['detail']}"
    memory = record.get("tcp_mem_pages_peak")
    return (
        f"{record['workload']} ({record['config']}): {record['rate']:,.0f} {record['unit']}"
        f"{latency} cpu {cpu.get('total', 0):.1f}us/{record['op']}"
        + (f" tcp mem peak {memory} pages" if memory is not None else "")
        + f" [{status}]"
    )


def _failed(record: dict[str, Any]) -> str:
    return ", ".join(c["name"] for c in record["checks"] if not c["ok"])


def check_machine() -> None:
    problems = missing_netlab_requirements()
    if problems:
        raise SystemExit("the benchmark cannot run here: " + "; ".join(problems))


def run(plan: Plan, results_root: Path = DEFAULT_RESULTS_DIR) -> Path:
    """Run the plan; returns the results directory."""
    check_machine()
    tools = Tools.find()
    for leftover in [*remove_stale_leftovers(), *remove_stale_pins()]:
        log.info("removed a leftover of an earlier killed run: %s", leftover)
    started = datetime.now(UTC)
    directory = results_root / started.strftime("%Y%m%dT%H%M%SZ")
    directory.mkdir(parents=True, exist_ok=False)
    meta: dict[str, Any] = {
        "started_at": started.isoformat(timespec="seconds"),
        "command": "python -m tests.bench " + shlex.join(sys.argv[1:]),
        "plan": {k: v for k, v in asdict(plan).items() if k != "extra"},
        "versions": versions(tools),
        "host": host_info(),
        "pin_root": str(PIN_ROOT),
        "configs": {c.key: _config_meta(c) for c in CONFIGS},
    }
    limits = read_tcp_mem_limits()
    meta["tcp_mem_pages"] = None if limits is None else asdict(limits)
    meta["tcp_mem_pressure_pages"] = None if limits is None else limits.pressure_pages
    meta["page_size"] = os.sysconf("SC_PAGESIZE")
    results = Results(directory, meta)
    log.info("results in %s; estimated %.0f min", directory, plan.estimate_seconds() / 60)
    try:
        with bpf_stats_enabled() as stats_on, Node() as node:
            meta["bpf_stats"] = stats_on
            meta["node"] = node.token
            lab = BenchLab(node, tools)
            _rounds(lab, plan, results)
            _profiles(lab, plan, results)
    except BaseException as exc:  # keep the rounds measured so far, and say why it stopped
        meta["aborted"] = f"{type(exc).__name__}: {exc}"
        results.save()
        log.error("run aborted (%s); partial results in %s", meta["aborted"], results.path)
        raise
    return _finish(plan, results)


def _rounds(lab: BenchLab, plan: Plan, results: Results) -> None:
    workloads = plan.workload_objects()
    for round_index in range(plan.rounds):
        position = 0
        for config in rotated(plan.config_objects(), round_index):
            applicable = [w for w in workloads if w.applies_to(config.key)]
            if not applicable:
                continue
            lab.apply(config)
            shift = round_index % len(applicable)
            for workload in applicable[shift:] + applicable[:shift]:
                record = measure(lab, workload, config, duration=plan.duration, warmup=plan.warmup)
                record["round"] = round_index
                record["position"] = position
                position += 1
                results.add("rounds", record)
                log.info("[round %d/%d] %s", round_index + 1, plan.rounds, _describe(record))


def _profiles(lab: BenchLab, plan: Plan, results: Results) -> None:
    if not plan.profile_workloads:
        return
    if lab.tools.perf is None:
        log.warning("perf does not work here: profiles have eBPF statistics only")
    for name in plan.profile_workloads:
        workload = WORKLOADS_BY_NAME[name]
        for key in plan.profile_configs:
            if not workload.applies_to(key):
                continue
            record = profile_one(
                lab,
                workload,
                CONFIGS_BY_KEY[key],
                duration=plan.profile_duration,
                warmup=plan.warmup,
                out_dir=results.directory / "profile",
            )
            results.add("profiles", record)
            log.info("[profile] %s", _describe(record))


def _finish(plan: Plan, results: Results) -> Path:
    data = results.data
    data["meta"]["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    data["summary"] = report.summarize(data["rounds"])
    data["aims"] = report.aims(data["summary"])
    chart_path = results.directory / "chart.png"
    note = report.chart(data, chart_path) if plan.chart else "--no-chart"
    data["chart"] = None if note else chart_path.name
    data["chart_note"] = note
    results.save()
    (results.directory / "results.md").write_text(report.markdown(data))
    if note:
        log.warning("no chart: %s", note)
    return results.directory
