"""From the rounds to medians, ratios, a Markdown report and a chart.

Ratios are paired: in every round, a configuration's rate is divided by the baseline's rate of
the same round (the rounds interleave configurations, so a round's numbers share the machine's
state), and the median of those per-round ratios is reported with their range.
"""

from __future__ import annotations

import importlib
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .configs import CONFIGS_BY_KEY
from .workloads import WORKLOADS_BY_NAME

RATIO_AXIS_LIMIT = 2.5
PROFILE_BUCKETS = (
    "netfilter",
    "ebpf/sockmap",
    "tcp/ip",
    "scheduler/wakeup",
    "syscalls/epoll/vfs",
    "other kernel",
    "envoy (user)",
    "other user",
)


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _range(values: Iterable[float | None]) -> tuple[float, float] | None:
    present = [v for v in values if v is not None]
    return (min(present), max(present)) if present else None


def _paired_ratios(
    records: Sequence[dict[str, Any]], workload: str, config: str, baseline: str | None
) -> list[float]:
    if baseline is None:
        return []
    by_round: dict[tuple[int, str], float] = {
        (r["round"], r["config"]): float(r["rate"])
        for r in records
        if r["workload"] == workload and r["valid"]
    }
    ratios = []
    for (round_index, key), rate in by_round.items():
        if key != config:
            continue
        base = by_round.get((round_index, baseline))
        if base:
            ratios.append(rate / base)
    return ratios


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{workload: {config: medians, ranges, paired ratios}} over the valid rounds."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    seen = list(dict.fromkeys((r["workload"], r["config"]) for r in records))
    for workload_name, config in seen:
        workload = WORKLOADS_BY_NAME.get(workload_name)
        mine = [r for r in records if r["workload"] == workload_name and r["config"] == config]
        valid = [r for r in mine if r["valid"]]
        per_op = [r["cpu_us_per_op"] or {} for r in valid]
        vs_baseline = _paired_ratios(
            records, workload_name, config, workload.baseline if workload else None
        )
        vs_ceiling = _paired_ratios(
            records, workload_name, config, workload.ceiling if workload else None
        )
        programs: dict[str, list[float]] = {}
        for r in valid:
            for name, ns in (r.get("bpf_ns_per_op") or {}).items():
                programs.setdefault(name, []).append(ns)
        runs: dict[str, list[float]] = {}
        for r in valid:
            for name, values in (r.get("bpf_programs") or {}).items():
                if r["ops"]:
                    runs.setdefault(name, []).append(values["run_cnt"] / r["ops"])
        summary.setdefault(workload_name, {})[config] = {
            "rounds": len(valid),
            "rounds_failed": len(mine) - len(valid),
            "unit": mine[0]["unit"],
            "op": mine[0]["op"],
            "rate": _median(r["rate"] for r in valid),
            "rate_range": _range(r["rate"] for r in valid),
            "p50_us": _median(r["p50_us"] for r in valid),
            "p99_us": _median(r["p99_us"] for r in valid),
            "cpu_us_per_op": _median(p.get("total") for p in per_op),
            "cpu_sidecars_us_per_op": _median(p.get("sidecars") for p in per_op),
            "cpu_apps_us_per_op": _median(p.get("apps") for p in per_op),
            "context_switches_per_op": _median(r.get("context_switches_per_op") for r in valid),
            "vs_baseline": _median(vs_baseline),
            "vs_baseline_range": _range(vs_baseline),
            "vs_ceiling": _median(vs_ceiling),
            "vs_ceiling_range": _range(vs_ceiling),
            "bpf_ns_per_op": {name: _median(v) for name, v in programs.items()},
            "bpf_runs_per_op": {name: _median(v) for name, v in runs.items()},
            "foreign_cpu_share": _median(
                r["foreign_cpu_seconds"] / r["seconds"] if r["seconds"] else None for r in valid
            ),
        }
    return summary


# ---------------------------------------------------------------- aims


def aims(summary: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The issue's goals, each met or missed by how much (None where not measured)."""

    def ratio(workload: str, config: str, against: str) -> float | None:
        entry = summary.get(workload, {}).get(config, {})
        key = "vs_ceiling" if against == "e" else "vs_baseline"
        value = entry.get(key)
        return float(value) if value is not None else None

    goals = [
        (
            "HTTP keep-alive, 1 connection: (d) reaches the ceiling (e)",
            "http-keepalive-1",
            "e",
            1.0,
        ),
        ("HTTP keep-alive, 16 conns: (d) reaches the ceiling (e)", "http-keepalive-16", "e", 1.0),
        ("HTTP keep-alive, 1 connection: (d) >= +13% over (b)", "http-keepalive-1", "b", 1.13),
        ("TCP 1 KB request/response: (d) >= +25% over (b)", "tcp-rr-1", "b", 1.25),
    ]
    found = []
    for text, workload, against, target in goals:
        value = ratio(workload, "d", against)
        found.append(_aim(text, value, target))
    micro = ratio("micro-rr-1", "d+", "a")
    found.append(_aim("micro-benchmark: sk_msg (d+) >= 2x loopback TCP (a)", micro, 2.0))
    return found


def _aim(text: str, value: float | None, target: float) -> dict[str, Any]:
    if value is None:
        return {"aim": text, "target": target, "value": None, "met": None, "short_by": None}
    return {
        "aim": text,
        "target": target,
        "value": round(value, 3),
        "met": value >= target,
        "short_by": None if value >= target else round(target - value, 3),
    }


# ---------------------------------------------------------------- Markdown


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None, spread: tuple[float, float] | None) -> str:
    if value is None:
        return "-"
    text = f"{value:.3f}"
    if spread is not None and spread[0] != spread[1]:
        text += f" ({spread[0]:.2f}-{spread[1]:.2f})"
    return text


def markdown(results: dict[str, Any]) -> str:
    summary: dict[str, dict[str, dict[str, Any]]] = results["summary"]
    meta = results["meta"]
    lines = [
        f"# meshaccel benchmark, {meta['started_at']}",
        "",
        f"`{meta['command']}` on {meta['host']['cpu_model']} ({meta['host']['cpus']} CPUs), "
        f"kernel {meta['versions'].get('kernel')}, Envoy {meta['versions'].get('envoy')}, "
        f"wrk {meta['versions'].get('wrk')}, nginx {meta['versions'].get('nginx')}, "
        f"iperf3 {meta['versions'].get('iperf3')}.",
        f"{meta['plan']['rounds']} rounds, {meta['plan']['duration']} s per measurement "
        f"after {meta['plan']['warmup']} s of warm-up; medians over the valid rounds; ratios are "
        "medians of per-round ratios (range in brackets). CPU per operation is utime+stime of "
        "both Envoys, the server app and the client over the measurement.",
        "",
    ]
    for config in CONFIGS_BY_KEY.values():
        lines.append(f"- **({config.key}) {config.name}**: {config.description}")
    lines.append("")
    for workload_name, per_config in summary.items():
        workload = WORKLOADS_BY_NAME.get(workload_name)
        first = next(iter(per_config.values()))
        unit, op = first["unit"], first["op"]
        baseline = workload.baseline if workload else "b"
        ceiling = workload.ceiling if workload else None
        header = (
            f"| config | {unit} | p50 us | p99 us | CPU us/{op} | of which Envoys | ctx sw/{op} | "
            f"vs ({baseline}) |" + (f" vs ({ceiling}) |" if ceiling else "") + " rounds |"
        )
        lines += [f"## {workload_name}", "", header]
        lines.append("|" + "---|" * (header.count("|") - 1))
        for key in _ordered(per_config):
            entry = per_config[key]
            rounds = f"{entry['rounds']}" + (
                f" ({entry['rounds_failed']} failed)" if entry["rounds_failed"] else ""
            )
            row = (
                f"| ({key}) {CONFIGS_BY_KEY[key].name} | {_fmt(entry['rate'])} | "
                f"{_fmt(entry['p50_us'], 1)} | {_fmt(entry['p99_us'], 1)} | "
                f"{_fmt(entry['cpu_us_per_op'], 1)} | {_fmt(entry['cpu_sidecars_us_per_op'], 1)} | "
                f"{_fmt(entry['context_switches_per_op'], 1)} | "
                f"{_ratio(entry['vs_baseline'], entry['vs_baseline_range'])} |"
            )
            if ceiling:
                row += f" {_ratio(entry['vs_ceiling'], entry['vs_ceiling_range'])} |"
            lines.append(row + f" {rounds} |")
        lines.append("")
    lines += _aims_section(results.get("aims", []))
    lines += _bpf_section(summary)
    lines += _profile_section(results.get("profiles", []))
    lines += _noise_section(summary)
    lines += _failures_section(results["rounds"])
    return "\n".join(lines) + "\n"


def _ordered(per_config: dict[str, Any]) -> list[str]:
    order = list(CONFIGS_BY_KEY)
    return sorted(per_config, key=lambda key: order.index(key) if key in order else len(order))


def _aims_section(found: list[dict[str, Any]]) -> list[str]:
    if not found:
        return []
    lines = ["## Aims", "", "| aim | target | measured | |", "|---|---|---|---|"]
    for aim in found:
        if aim["met"] is None:
            verdict, value = "not measured", "-"
        else:
            verdict = "met" if aim["met"] else f"missed by {aim['short_by']:.3f}"
            value = f"{aim['value']:.3f}"
        lines.append(f"| {aim['aim']} | {aim['target']:.2f} | {value} | {verdict} |")
    return [*lines, ""]


def _bpf_section(summary: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    rows = []
    for workload, per_config in summary.items():
        for key in _ordered(per_config):
            entry = per_config[key]
            for program, ns in sorted(entry["bpf_ns_per_op"].items()):
                runs = entry["bpf_runs_per_op"].get(program)
                if runs:
                    rows.append(
                        f"| {workload} | ({key}) | {program} | {_fmt(runs, 2)} | "
                        f"{_fmt(ns / runs if runs else None, 0)} | {_fmt(ns, 0)} |"
                    )
    if not rows:
        return []
    return [
        "## eBPF programs (kernel.bpf_stats_enabled)",
        "",
        "| workload | config | program | runs/op | ns/run | ns/op |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _profile_section(profiles: list[dict[str, Any]]) -> list[str]:
    usable = [p for p in profiles if p.get("profile")]
    if not usable:
        return []
    lines = [
        "## Where the time goes (perf, CPU us per operation)",
        "",
        "| workload | config | process | total | " + " | ".join(PROFILE_BUCKETS) + " |",
        "|" + "---|" * (4 + len(PROFILE_BUCKETS)),
    ]
    for record in usable:
        for role, summary in record["profile"].items():
            buckets = summary["buckets_us_per_op"]
            cells = " | ".join(_fmt(buckets.get(b), 1) for b in PROFILE_BUCKETS)
            lines.append(
                f"| {record['workload']} | ({record['config']}) | {role} | "
                f"{_fmt(summary['cpu_us_per_op'], 1)} | {cells} |"
            )
    return [*lines, ""]


def _noise_section(summary: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    shares = [
        entry["foreign_cpu_share"]
        for per_config in summary.values()
        for entry in per_config.values()
        if entry["foreign_cpu_share"] is not None
    ]
    if not shares:
        return []
    return [
        "## Noise",
        "",
        "CPU used on this machine by processes outside the benchmark while it measured (CPUs "
        f"busy, median over measurements): {statistics.median(shares):.2f} of "
        f"{max(shares):.2f} at worst.",
        "",
    ]


def _failures_section(records: Sequence[dict[str, Any]]) -> list[str]:
    failed = [r for r in records if not r["valid"]]
    if not failed:
        return []
    lines = ["## Failed measurements (left out of the medians)", ""]
    for r in failed:
        reasons = [c["name"] for c in r["checks"] if not c["ok"]]
        lines.append(
            f"- round {r['round'] + 1} {r['workload']} ({r['config']}): "
            f"{r['error'] or ', '.join(reasons) or 'invalid'}"
        )
    return [*lines, ""]


# ---------------------------------------------------------------- chart


def chart(results: dict[str, Any], path: Path) -> str | None:
    """Rate and CPU per operation against each workload's baseline; None when written, else why
    not (matplotlib comes with the `bench` extra)."""
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]')"
    matplotlib.use("Agg")
    pyplot: Any = importlib.import_module("matplotlib.pyplot")
    summary: dict[str, dict[str, dict[str, Any]]] = results["summary"]
    workloads = list(summary)
    keys = [key for key in CONFIGS_BY_KEY if any(key in summary[w] for w in workloads)]
    figure, (top, bottom) = pyplot.subplots(2, 1, figsize=(max(8, 1.6 * len(workloads)), 9))
    width = 0.8 / max(1, len(keys))
    for index, key in enumerate(keys):
        xs, ratios, low, high, cpu = [], [], [], [], []
        for position, workload in enumerate(workloads):
            entry = summary[workload].get(key)
            known = WORKLOADS_BY_NAME.get(workload)
            base = summary[workload].get(known.baseline if known else "b")
            if entry is None or entry["vs_baseline"] is None or base is None:
                continue
            xs.append(position + (index - (len(keys) - 1) / 2) * width)
            ratios.append(entry["vs_baseline"])
            spread = entry["vs_baseline_range"] or (entry["vs_baseline"],) * 2
            low.append(entry["vs_baseline"] - spread[0])
            high.append(spread[1] - entry["vs_baseline"])
            base_cpu, own_cpu = base["cpu_us_per_op"], entry["cpu_us_per_op"]
            cpu.append(own_cpu / base_cpu if base_cpu and own_cpu else 0)
        label = f"({key}) {CONFIGS_BY_KEY[key].name}"
        top.bar(xs, ratios, width, yerr=[low, high], capsize=2, label=label)
        bottom.bar(xs, cpu, width, label=label)
    limit = RATIO_AXIS_LIMIT
    for patch in top.patches:  # (a) no-mesh is many times faster: clip, and say by how much
        if patch.get_height() > limit:
            x = patch.get_x() + patch.get_width() / 2
            top.annotate(
                f"{patch.get_height():.1f}x",
                (x, limit),
                ha="center",
                va="top",
                fontsize="x-small",
                rotation=90,
            )
    top.set_ylim(0, limit)
    for axes, title in (
        (top, "rate relative to the baseline ((b) iptables; micro: (a) loopback TCP)"),
        (bottom, "CPU time per operation relative to the baseline (lower is better)"),
    ):
        axes.axhline(1.0, color="black", linewidth=0.8)
        axes.set_xticks(range(len(workloads)))
        axes.set_xticklabels(workloads, rotation=20, ha="right")
        axes.set_title(title)
        axes.grid(axis="y", alpha=0.3)
    top.legend(fontsize="small", ncol=3)
    figure.suptitle(f"meshaccel benchmark {results['meta']['started_at']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return None
