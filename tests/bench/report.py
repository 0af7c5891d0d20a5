"""From the rounds to medians, ratios, a Markdown report and a chart.

Ratios are paired: in every round, a configuration's rate is divided by the baseline's rate of
the same round (the rounds interleave configurations, so a round's numbers share the machine's
state), and the median of those per-round ratios is reported with their range.
"""

from __future__ import annotations

import importlib
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .configs import CONFIGS_BY_KEY, DEFAULT_CONFIG
from .counters import FALLBACK_COUNTERS, FALLBACK_TABLE
from .workloads import WORKLOADS_BY_NAME

RATIO_AXIS_LIMIT = 2.5
FAILED_STUB_HEIGHT = 0.12  # a failed cell's bar in the chart: visible, clearly not a result
MEMORY_BASELINE = "b"  # node TCP memory is compared with iptables interception's
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
    records: Sequence[dict[str, Any]],
    workload: str,
    config: str,
    baseline: str | None,
    *,
    value: str = "rate",
    valid_only: bool = True,
) -> list[float]:
    """Per round, `config`'s `value` over `baseline`'s (rounds where both have one)."""
    if baseline is None:
        return []
    by_round: dict[tuple[int, str], float] = {
        (r["round"], r["config"]): float(r[value])
        for r in records
        if r["workload"] == workload and (r["valid"] or not valid_only) and r.get(value) is not None
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
            "rounds_warned": sum(1 for r in mine if r.get("warnings")),
            **_memory(records, mine, workload_name, config),
            **_fallbacks(mine),
        }
    return summary


def _memory(
    records: Sequence[dict[str, Any]], mine: Sequence[dict[str, Any]], workload: str, config: str
) -> dict[str, Any]:
    """Node TCP memory over every measured round, valid or not: a round that failed because
    memory ran out is exactly the one that must count."""
    peaks = [r.get("tcp_mem_pages_peak") for r in mine]
    present = [p for p in peaks if p is not None]
    vs_baseline = _paired_ratios(
        records, workload, config, MEMORY_BASELINE, value="tcp_mem_pages_peak", valid_only=False
    )
    return {
        "tcp_mem_pages_before": _median(r.get("tcp_mem_pages_before") for r in mine),
        "tcp_mem_pages_peak": _median(peaks),
        "tcp_mem_pages_peak_max": max(present) if present else None,
        "tcp_mem_peak_vs_b": _median(vs_baseline),
        "tcp_mem_peak_vs_b_range": _range(vs_baseline),
    }


def _fallbacks(mine: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median datapath counter deltas (every measured round; None without meshaccel) and how
    many rounds fell back to TCP at least once."""
    deltas: list[dict[str, int]] = [
        r["datapath_counters"] for r in mine if r.get("datapath_counters") is not None
    ]
    if not deltas:
        return {"counters": None, "rounds_with_fallback": None}
    names = sorted({*FALLBACK_TABLE, *FALLBACK_COUNTERS, *(n for d in deltas for n in d)})
    return {
        "counters": {name: _median(d.get(name, 0) for d in deltas) for name in names},
        "rounds_with_fallback": sum(
            1 for d in deltas if any(d.get(name) for name in FALLBACK_COUNTERS)
        ),
    }


# ---------------------------------------------------------------- aims

#: Every HTTP and TCP request/response workload: the default must reach the ceiling (e).
AT_CEILING_WORKLOADS = (
    "http-keepalive-1",
    "http-keepalive-16",
    "http-keepalive-64",
    "http-close-16",
    "tcp-rr-1",
    "tcp-rr-16",
)
BULK_WORKLOAD = "tcp-bulk"


def aims(summary: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The issue's goals ("fast by default"), each for the default configuration: met or missed
    and by how much; None where not measured. A ratio whose every round failed is missed."""
    d = DEFAULT_CONFIG.key
    found = [
        _ratio_aim(summary, f"{w}: ({d}) at or above the ceiling (e)", w, "vs_ceiling", 1.0)
        for w in AT_CEILING_WORKLOADS
    ]
    found += [
        _ratio_aim(summary, f"tcp-rr-1: ({d}) >= +25% over (b)", "tcp-rr-1", "vs_baseline", 1.25),
        _ratio_aim(
            summary, f"http-close-16: ({d}) at or above (b)", "http-close-16", "vs_baseline", 1.0
        ),
        _bulk_passes(summary),
        _ratio_aim(
            summary,
            f"tcp-bulk: ({d}) throughput at or above (b)",
            BULK_WORKLOAD,
            "vs_baseline",
            1.0,
        ),
        _ratio_aim(
            summary,
            f"tcp-bulk: ({d}) peak node TCP memory at most 2x (b)",
            BULK_WORKLOAD,
            "tcp_mem_peak_vs_b",
            2.0,
            at_most=True,
        ),
        _ratio_aim(
            summary,
            f"micro-rr-1: ({d}) against loopback TCP (a)",
            "micro-rr-1",
            "vs_baseline",
            None,
        ),
    ]
    return found


def _ratio_aim(
    summary: dict[str, dict[str, dict[str, Any]]],
    text: str,
    workload: str,
    key: str,
    target: float | None,
    *,
    at_most: bool = False,
) -> dict[str, Any]:
    entry = summary.get(workload, {}).get(DEFAULT_CONFIG.key)
    value = entry.get(key) if entry else None
    if entry and value is None and entry["rounds"] == 0:
        detail = f"all {entry['rounds_failed']} rounds failed"
        return _aim(text, None, target, at_most=at_most, failed=True, detail=detail)
    return _aim(text, None if value is None else float(value), target, at_most=at_most)


def _bulk_passes(summary: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """tcp-bulk passes every round in every configuration: the share of rounds that passed."""
    text = "tcp-bulk: every round passes in every configuration"
    per_config = summary.get(BULK_WORKLOAD, {})
    total = sum(e["rounds"] + e["rounds_failed"] for e in per_config.values())
    if not total:
        return _aim(text, None, 1.0)
    passed = sum(e["rounds"] for e in per_config.values())
    short = [
        f"({key}) {e['rounds']} of {e['rounds'] + e['rounds_failed']}"
        for key in _ordered(per_config)
        if (e := per_config[key])["rounds_failed"]
    ]
    detail = "passed: " + ", ".join(short) if short else f"{passed} of {total} rounds"
    return _aim(text, passed / total, 1.0, detail=detail)


def _aim(
    text: str,
    value: float | None,
    target: float | None,
    *,
    at_most: bool = False,
    failed: bool = False,
    detail: str = "",
) -> dict[str, Any]:
    """One aim. `target` None: a figure to report, no goal; `at_most`: lower is better."""
    aim: dict[str, Any] = {
        "aim": text,
        "target": target,
        "comparison": None if target is None else "<=" if at_most else ">=",
        "value": None if value is None else round(value, 3),
        "met": False if failed else None,
        "short_by": None,
        "detail": detail,
    }
    if value is None or target is None:
        return aim
    met = value <= target if at_most else value >= target
    aim["met"] = met
    aim["short_by"] = None if met else round(abs(value - target), 3)
    return aim


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
        lines.append(f"- **{config.label}**: {config.description}")
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
            row = (
                f"| {_label(key)} | {_fmt(entry['rate'])} | "
                f"{_fmt(entry['p50_us'], 1)} | {_fmt(entry['p99_us'], 1)} | "
                f"{_fmt(entry['cpu_us_per_op'], 1)} | {_fmt(entry['cpu_sidecars_us_per_op'], 1)} | "
                f"{_fmt(entry['context_switches_per_op'], 1)} | "
                f"{_ratio(entry['vs_baseline'], entry['vs_baseline_range'])} |"
            )
            if ceiling:
                row += f" {_ratio(entry['vs_ceiling'], entry['vs_ceiling_range'])} |"
            lines.append(row + f" {_rounds(entry)} |")
        lines.append("")
    lines += _aims_section(results.get("aims", []))
    lines += _memory_section(summary, meta)
    lines += _fallbacks_section(summary)
    lines += _bpf_section(summary)
    lines += _profile_section(results.get("profiles", []))
    lines += _noise_section(summary)
    lines += _warnings_section(results["rounds"])
    lines += _failures_section(results["rounds"])
    return "\n".join(lines) + "\n"


def _label(key: str) -> str:
    config = CONFIGS_BY_KEY.get(key)
    return config.label if config else f"({key})"


def _rounds(entry: dict[str, Any]) -> str:
    notes = []
    if entry["rounds_failed"]:
        notes.append(f"{entry['rounds_failed']} failed")
    if entry.get("rounds_warned"):
        notes.append(f"{entry['rounds_warned']} with a warning")
    return f"{entry['rounds']}" + (f" ({', '.join(notes)})" if notes else "")


def _ordered(per_config: dict[str, Any]) -> list[str]:
    order = list(CONFIGS_BY_KEY)
    return sorted(per_config, key=lambda key: order.index(key) if key in order else len(order))


def _aims_section(found: list[dict[str, Any]]) -> list[str]:
    if not found:
        return []
    lines = [
        f"## Aims (for {DEFAULT_CONFIG.label})",
        "",
        "| aim | target | measured | | |",
        "|---|---|---|---|---|",
    ]
    for aim in found:
        target = "-" if aim["target"] is None else f"{aim['comparison']} {aim['target']:.2f}"
        value = "-" if aim["value"] is None else f"{aim['value']:.3f}"
        lines.append(
            f"| {aim['aim']} | {target} | {value} | {_verdict(aim)} | {aim.get('detail', '')} |"
        )
    return [*lines, ""]


def _verdict(aim: dict[str, Any]) -> str:
    if aim["met"] is True:
        return "met"
    if aim["met"] is False:
        return "missed" if aim["short_by"] is None else f"missed by {aim['short_by']:.3f}"
    if aim["value"] is None:
        return "not measured"
    return "reported"


def _memory_section(
    summary: dict[str, dict[str, dict[str, Any]]], meta: dict[str, Any]
) -> list[str]:
    keys = _ordered({k: None for per_config in summary.values() for k in per_config})
    rows = []
    for workload, per_config in summary.items():
        if all(e.get("tcp_mem_pages_peak") is None for e in per_config.values()):
            continue
        cells = []
        for key in keys:
            entry = per_config.get(key, {})
            peak, ratio = entry.get("tcp_mem_pages_peak"), entry.get("tcp_mem_peak_vs_b")
            cells.append("-" if peak is None else _fmt(peak) + (f" ({ratio:.2f})" if ratio else ""))
        rows.append(f"| {workload} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    pressure = meta.get("tcp_mem_pressure_pages")
    page_size = meta.get("page_size") or 4096
    threshold = (
        f"net.ipv4.tcp_mem's pressure threshold here: {pressure:,} pages "
        f"({pressure * page_size / (1 << 20):,.0f} MiB)."
        if pressure
        else "net.ipv4.tcp_mem could not be read."
    )
    highest = max(
        (
            (entry["tcp_mem_pages_peak_max"], workload, key)
            for workload, per_config in summary.items()
            for key, entry in per_config.items()
            if entry.get("tcp_mem_pages_peak_max") is not None
        ),
        default=None,
    )
    if highest is not None:
        pages, workload, key = highest
        share = f", {pages / pressure:.1%} of the threshold" if pressure else ""
        threshold += (
            f" Highest peak of any measurement: {pages:,} pages{share}, {workload} ({key})."
        )
    return [
        "## Node TCP memory (/proc/net/sockstat, pages)",
        "",
        "Peak of the node's TCP memory during each measurement (sampled at 20 Hz), median over "
        f"every measured round, valid or not; in brackets the median of per-round ratios to "
        f"({MEMORY_BASELINE}). {threshold}",
        "",
        "| workload | " + " | ".join(_label(k) for k in keys) + " |",
        "|" + "---|" * (len(keys) + 1),
        *rows,
        "",
    ]


def _fallbacks_section(summary: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    rows = []
    for workload_name, per_config in summary.items():
        workload = WORKLOADS_BY_NAME.get(workload_name)
        for key in _ordered(per_config):
            entry = per_config[key]
            counters = entry.get("counters")
            if counters is None:
                continue
            fell_back = entry.get("rounds_with_fallback") or 0
            measured = entry["rounds"] + entry["rounds_failed"]
            note = f"{fell_back} of {measured}"
            if fell_back and workload is not None and workload.request_response:
                note += " (warning: request/response)"
            cells = " | ".join(_fmt(counters.get(name)) for name in FALLBACK_TABLE)
            rows.append(f"| {workload_name} | {_label(key)} | {cells} | {note} |")
    if not rows:
        return []
    return [
        "## Fallbacks (datapath counters, median per measurement)",
        "",
        "A direction of a connection that has been redirecting falls back to TCP for good when "
        "its receiver holds more than the redirect budget unread (fallback_budget), has no "
        "receive queue (fallback_receiver_unknown) or the redirect fails "
        "(fallback_redirect_failed). Expected on tcp-bulk; on request/response workloads it is "
        "a finding (see Warnings). msg_peer_not_target is no fallback: a direction whose first "
        "message has no redirect target, such as the app socket of a pod not opted in, takes "
        "TCP from the start.",
        "",
        "| workload | config | " + " | ".join(FALLBACK_TABLE) + " | rounds with a fallback |",
        "|" + "---|" * (len(FALLBACK_TABLE) + 3),
        *rows,
        "",
    ]


def _warnings_section(records: Sequence[dict[str, Any]]) -> list[str]:
    warned = [r for r in records if r.get("warnings")]
    if not warned:
        return []
    lines = ["## Warnings (the measurements stay in the medians)", ""]
    for r in warned:
        for warning in r["warnings"]:
            lines.append(
                f"- round {r['round'] + 1} {r['workload']} ({r['config']}): "
                f"{warning['name']}: {_detail(warning['detail'])}"
            )
    return [*lines, ""]


def _detail(detail: object) -> str:
    if isinstance(detail, dict):
        return ", ".join(f"{name} {value}" for name, value in detail.items())
    return str(detail)


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
        "CPU used on this machine by processes outside the benchmark while it measured, in "
        f"CPUs busy: {statistics.median(shares):.2f} (median over workloads and "
        f"configurations), {max(shares):.2f} at worst.",
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


@dataclass
class ChartSeries:
    """One configuration's bars in both panels, and the cells where every round failed."""

    key: str
    label: str
    color: str
    xs: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    low: list[float] = field(default_factory=list)
    high: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    failed_xs: list[float] = field(default_factory=list)


@dataclass
class ChartLayout:
    workloads: list[str]
    width: float
    series: list[ChartSeries]


def chart_layout(summary: dict[str, dict[str, dict[str, Any]]]) -> ChartLayout:
    """What the chart draws, without matplotlib: per configuration, bar positions and heights
    relative to each workload's baseline, and where a failed cell's stub goes."""
    workloads = list(summary)
    keys = [key for key in CONFIGS_BY_KEY if any(key in summary[w] for w in workloads)]
    width = 0.8 / max(1, len(keys))
    layout = ChartLayout(workloads, width, [])
    for index, key in enumerate(keys):
        series = ChartSeries(key, CONFIGS_BY_KEY[key].label, f"C{index}")
        for position, workload in enumerate(workloads):
            x = position + (index - (len(keys) - 1) / 2) * width
            entry = summary[workload].get(key)
            if entry is not None and entry["rounds"] == 0 and entry["rounds_failed"]:
                series.failed_xs.append(x)
                continue
            known = WORKLOADS_BY_NAME.get(workload)
            base = summary[workload].get(known.baseline if known else "b")
            if entry is None or entry["vs_baseline"] is None or base is None:
                continue
            series.xs.append(x)
            series.ratios.append(entry["vs_baseline"])
            spread = entry["vs_baseline_range"] or (entry["vs_baseline"],) * 2
            series.low.append(entry["vs_baseline"] - spread[0])
            series.high.append(spread[1] - entry["vs_baseline"])
            base_cpu, own_cpu = base["cpu_us_per_op"], entry["cpu_us_per_op"]
            series.cpu.append(own_cpu / base_cpu if base_cpu and own_cpu else 0)
        layout.series.append(series)
    return layout


def figure(results: dict[str, Any]) -> Any:
    """The chart as a matplotlib Figure (the caller saves and closes it); raises ImportError
    without matplotlib."""
    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    pyplot: Any = importlib.import_module("matplotlib.pyplot")
    layout = chart_layout(results["summary"])
    workloads, width = layout.workloads, layout.width
    fig, (top, bottom) = pyplot.subplots(2, 1, figsize=(max(8, 1.6 * len(workloads)), 9))
    for series in layout.series:
        top.bar(
            series.xs,
            series.ratios,
            width,
            yerr=[series.low, series.high],
            capsize=2,
            label=series.label,
            color=series.color,
        )
        bottom.bar(series.xs, series.cpu, width, label=series.label, color=series.color)
        for axes in (top, bottom):
            _failed_stubs(axes, series, width)
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
    fig.suptitle(f"meshaccel benchmark {results['meta']['started_at']}")
    fig.tight_layout()
    return fig


def _failed_stubs(axes: Any, series: ChartSeries, width: float) -> None:
    """A hatched grey stub in the configuration's edge colour with "failed" above it: an empty
    slot would read as "not measured"."""
    if not series.failed_xs:
        return
    heights = [FAILED_STUB_HEIGHT] * len(series.failed_xs)
    axes.bar(
        series.failed_xs,
        heights,
        width,
        color="lightgrey",
        edgecolor=series.color,
        hatch="///",
        label="_nolegend_",
    )
    for x in series.failed_xs:
        axes.text(
            x,
            FAILED_STUB_HEIGHT * 1.2,
            "failed",
            ha="center",
            va="bottom",
            rotation=90,
            fontsize="small",
            color="dimgrey",
        )


def chart(results: dict[str, Any], path: Path) -> str | None:
    """Rate and CPU per operation against each workload's baseline; None when written, else why
    not (matplotlib comes with the `bench` extra)."""
    try:
        fig = figure(results)
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]')"
    pyplot: Any = importlib.import_module("matplotlib.pyplot")
    fig.savefig(path, dpi=110)
    pyplot.close(fig)
    return None
