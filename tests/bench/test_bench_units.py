"""The benchmark's pure parts: configurations, rotation, output parsing, node TCP memory, counter
checks, medians and ratios, aims, the report and chart, perf buckets, and the Envoy bootstrap
variant it runs (no root needed, except for Envoy's own validation)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from meshaccel.agent.datapath import CONNECT_FEATURES, DEFAULT_FEATURES, SK_MSG_FEATURES
from meshaccel.contract.settings import DEFAULT_REDIRECT_BUDGET
from tests.bench import report
from tests.bench.accounting import ClientRun
from tests.bench.configs import CONFIGS, CONFIGS_BY_KEY, DEFAULT_CONFIG, rotated
from tests.bench.counters import ERROR_COUNTERS, FALLBACK_COUNTERS
from tests.bench.measure import counter_checks, fallback_warnings
from tests.bench.profile import bucket_of, parse_report, summarize
from tests.bench.workloads import WORKLOADS_BY_NAME, load_argv, parse_load
from tests.netlab.envoy import (
    EnvoyBootstrapOptions,
    ExplicitListener,
    find_envoy_binary,
    render_envoy_bootstrap,
)
from tests.netlab.tcpmem import (
    PeakSampler,
    TcpMemLimits,
    parse_sockstat_tcp_mem,
    parse_tcp_mem_sysctl,
    read_tcp_mem_pages,
)
from tests.requirements import require


def client_run(stdout: str, returncode: int = 0) -> ClientRun:
    return ClientRun(["tool"], returncode, stdout, "", 0.5, 10, 1.0, False)


# ---------------------------------------------------------------- configurations


@pytest.mark.parametrize(
    ("key", "features", "sk_msg_to_app", "default", "label"),
    [
        ("c", CONNECT_FEATURES, False, False, "(c) meshaccel-connect"),
        ("d", SK_MSG_FEATURES, False, True, "(d) meshaccel (default)"),
        ("d+", SK_MSG_FEATURES, True, False, "(d+) meshaccel-apps"),
    ],
)  # fmt: skip
def test_meshaccel_configurations(key, features, sk_msg_to_app, default, label) -> None:
    config = CONFIGS_BY_KEY[key]
    assert config.features == features
    assert config.sk_msg_to_app is sk_msg_to_app  # per pod, not a feature flag
    assert config.default is default
    assert config.label == label
    assert config.redirect_budget == DEFAULT_REDIRECT_BUDGET


def test_the_default_configuration_is_what_the_agent_loads_by_default() -> None:
    """(d) is labelled the default: it must stay what Datapath.load does without arguments."""
    assert DEFAULT_CONFIG.key == "d"
    assert DEFAULT_CONFIG.features == DEFAULT_FEATURES
    assert DEFAULT_CONFIG.redirect_budget == DEFAULT_REDIRECT_BUDGET
    assert [c.key for c in CONFIGS if c.default] == ["d"]


# ---------------------------------------------------------------- rounds


def test_every_round_runs_every_configuration_in_a_new_order() -> None:
    orders = [[c.key for c in rotated(CONFIGS, r)] for r in range(len(CONFIGS))]
    for order in orders:
        assert sorted(order) == sorted(c.key for c in CONFIGS)
    assert len({order[0] for order in orders}) > 1
    assert len({tuple(order) for order in orders}) == len(orders)


# ---------------------------------------------------------------- tool output


WRK = json.dumps(
    {
        "requests": 2000,
        "duration_us": 1_000_000,
        "bytes": 1,
        "errors": {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0},
        "p50_us": 400,
        "p90_us": 500,
        "p99_us": 900,
        "mean_us": 410.0,
        "max_us": 2000,
    }
)
RR = json.dumps(
    {
        "requests": 500,
        "seconds": 0.5,
        "rps": 1000.0,
        "p50_us": 10.0,
        "p90_us": 11.0,
        "p99_us": 20.0,
        "mean_us": 10.5,
        "errors": 0,
        "error": "",
    }
)
IPERF3 = json.dumps({"end": {"sum_received": {"bytes": 4 << 20, "seconds": 2.0}}})


@pytest.mark.parametrize(
    ("workload", "stdout", "returncode", "ok", "rate", "reason"),
    [
        ("http-keepalive-1", WRK, 0, True, 2000.0, "wrk's JSON line"),
        ("http-keepalive-1", "noise\n" + WRK + "\n", 0, True, 2000.0, "last JSON line wins"),
        ("http-keepalive-1", WRK.replace('"status": 0', '"status": 3'), 0, False, 2000.0,
         "HTTP errors make it fail"),
        ("tcp-rr-1", RR, 0, True, 1000.0, "rr client"),
        ("tcp-rr-1", RR, 1, False, 1000.0, "non-zero exit fails"),
        ("tcp-rr-1", RR.replace('"requests": 500', '"requests": 0'), 0, False, 0.0,
         "no transaction fails"),
        ("tcp-bulk", IPERF3, 0, True, 2.0, "iperf3 -J, MiB/s received"),
        ("tcp-bulk", json.dumps({"error": "busy"}), 1, False, 0.0, "iperf3 error"),
        ("tcp-rr-1", "", 1, False, 0.0, "no output"),
    ],
)  # fmt: skip
def test_parse_load(workload, stdout, returncode, ok, rate, reason) -> None:
    result = parse_load(WORKLOADS_BY_NAME[workload], client_run(stdout, returncode))
    assert result.ok is ok, reason
    assert result.rate == pytest.approx(rate), reason


def test_load_commands() -> None:
    tools = {"wrk": "wrk", "wrk_script": "s.lua", "iperf3": "iperf3", "rr": "rr"}
    close = load_argv(WORKLOADS_BY_NAME["http-close-16"], "198.18.0.11", 8080, 1.5, **tools)
    assert close[:4] == ["wrk", "-t1", "-c16", "-d2s"]
    assert close[-3:-1] == ["-H", "Connection: close"]
    rr = load_argv(WORKLOADS_BY_NAME["tcp-rr-16"], "127.0.0.1", 15111, 2, **tools)
    assert rr[rr.index("--connections") + 1] == "16" and rr[rr.index("--size") + 1] == "1024"


# ---------------------------------------------------------------- node TCP memory

SOCKSTAT = """sockets: used 14
TCP: inuse 4 orphan 0 tw 0 alloc 4 mem 274
UDP: inuse 0 mem 7
"""


@pytest.mark.parametrize(
    ("text", "pages", "reason"),
    [
        (SOCKSTAT, 274, "the TCP line's mem, not UDP's"),
        ("TCP: inuse 1 orphan 0 tw 0 alloc 1 mem 0\n", 0, "zero is a value"),
        ("TCP: inuse 1 mem 123456789\n", 123456789, "field order does not matter"),
        ("TCP6: inuse 1\nTCP: inuse 2 mem 9\n", 9, "sockstat6's TCP6 line is not TCP"),
        ("TCP: inuse 4 orphan 0 tw 0 alloc 4\n", None, "no mem field"),
        ("TCP: inuse 4 mem\n", None, "mem without a value"),
        ("UDP: inuse 0 mem 7\n", None, "no TCP line"),
        ("", None, "empty"),
    ],
)  # fmt: skip
def test_sockstat_tcp_mem(text: str, pages: int | None, reason: str) -> None:
    assert parse_sockstat_tcp_mem(text) == pages, reason


def test_sockstat_file(tmp_path: Path) -> None:
    path = tmp_path / "sockstat"
    path.write_text(SOCKSTAT)
    assert read_tcp_mem_pages(path) == 274
    assert read_tcp_mem_pages(tmp_path / "missing") is None


@pytest.mark.parametrize(
    ("text", "limits"),
    [
        ("287907\t383877\t575814\n", TcpMemLimits(287907, 383877, 575814)),
        ("1 2 3", TcpMemLimits(1, 2, 3)),
        ("1 2", None),
        ("1 two 3", None),
        ("", None),
    ],
)
def test_tcp_mem_sysctl(text: str, limits: TcpMemLimits | None) -> None:
    assert parse_tcp_mem_sysctl(text) == limits


@pytest.mark.parametrize(
    ("readings", "before", "peak", "samples", "reason"),
    [
        ([100, 250, 180, 120], 100, 250, 4, "the peak between start and stop"),
        ([100, 90, 80, 300], 100, 300, 4, "stop's own reading counts: the end is covered"),
        ([500, 100, 100], 500, 500, 3, "the value before can be the peak"),
        ([None, 5, None], None, 5, 1, "unreadable sockstat is ignored"),
        ([None, None], None, None, 0, "nothing readable: no peak"),
    ],
)  # fmt: skip
def test_peak_sampler(readings, before, peak, samples, reason) -> None:
    values = iter(readings)
    # The thread would wait an hour before its first reading: every reading here is explicit.
    sampler = PeakSampler(read=lambda: next(values), interval=3600)
    sampler.start()
    for _ in range(len(readings) - 2):
        sampler.sample()  # what the thread does on every tick
    sampler.stop()
    assert (sampler.before, sampler.peak, sampler.samples) == (before, peak, samples), reason
    assert next(values, "exhausted") == "exhausted", "exactly one reading per start/tick/stop"


def test_peak_sampler_thread_reads_until_stopped() -> None:
    calls = 0
    lock = threading.Lock()
    enough = threading.Event()

    def read() -> int:
        nonlocal calls
        with lock:
            calls += 1
            if calls >= 5:
                enough.set()
            return calls * 10

    with PeakSampler(read=read, interval=0) as sampler:
        assert enough.wait(timeout=30), "the sampler thread never read"
    assert sampler.before == 10
    assert sampler.peak == calls * 10  # stop's reading is the last and the highest
    assert sampler.samples == calls


# ---------------------------------------------------------------- datapath counters


def test_counter_families_come_from_the_enum() -> None:
    assert "error_socket_state" in ERROR_COUNTERS
    assert {"error_map_update", "error_sockhash_update"} <= set(ERROR_COUNTERS)
    assert set(FALLBACK_COUNTERS) == {
        "fallback_budget",
        "fallback_receiver_unknown",
        "fallback_redirect_failed",
        "fallback_draining",
    }


STEERED = {"connect_outbound_redirected": 3}


@pytest.mark.parametrize(
    ("config", "counters", "failed", "reason"),
    [
        ("b", None, [], "no meshaccel, no counter checks"),
        ("c", STEERED, [], "connect-time only: nothing redirected"),
        ("c", {**STEERED, "msg_redirected": 2}, ["sk_msg redirected nothing"],
         "sk_msg must stay off in (c)"),
        ("d", {**STEERED, "msg_redirected": 9}, [], "the default redirects"),
        ("d", STEERED, ["sk_msg redirected messages"], "the default must redirect"),
        ("d+", {**STEERED, "msg_redirected": 9, "error_socket_state": 1},
         ["no datapath errors"], "the new error counter invalidates"),
        ("d", {"msg_redirected": 9}, ["meshaccel steered the client's connects"], "not steered"),
        ("d", {**STEERED, "msg_redirected": 9, "fallback_budget": 4}, [],
         "a fallback is no failed check"),
    ],
)  # fmt: skip
def test_counter_checks(config, counters, failed, reason) -> None:
    found = counter_checks(CONFIGS_BY_KEY[config], counters)
    assert [c["name"] for c in found if not c["ok"]] == failed, reason


@pytest.mark.parametrize(
    ("workload", "config", "counters", "warned", "reason"),
    [
        ("tcp-rr-1", "d", {"msg_redirected": 9}, None, "no fallback"),
        ("tcp-rr-1", "d", {"fallback_budget": 1}, {"fallback_budget": 1},
         "request/response must not fall back"),
        ("http-close-16", "d+", {"fallback_receiver_unknown": 2, "msg_peer_not_target": 5},
         {"fallback_receiver_unknown": 2}, "peer_not_target is no fallback"),
        ("micro-rr-1", "d", {"fallback_redirect_failed": 1}, {"fallback_redirect_failed": 1},
         "the micro-benchmark is request/response too"),
        ("tcp-bulk", "d", {"fallback_budget": 3}, None, "bulk: the budget doing its job"),
        ("tcp-rr-1", "b", None, None, "no meshaccel"),
    ],
)  # fmt: skip
def test_fallback_warnings(workload, config, counters, warned, reason) -> None:
    found = fallback_warnings(WORKLOADS_BY_NAME[workload], CONFIGS_BY_KEY[config], counters)
    assert (found[0]["detail"] if found else None) == warned, reason


# ---------------------------------------------------------------- summaries


def record(round_index: int, config: str, rate: float, *, valid: bool = True) -> dict[str, Any]:
    return {
        "round": round_index,
        "config": config,
        "workload": "http-keepalive-1",
        "valid": valid,
        "rate": rate,
        "unit": "req/s",
        "op": "request",
        "ops": rate * 10,
        "seconds": 10.0,
        "p50_us": 1e6 / rate,
        "p99_us": 2e6 / rate,
        "cpu_us_per_op": {"total": 300.0, "sidecars": 250.0, "apps": 50.0},
        "context_switches_per_op": 6.0,
        "foreign_cpu_seconds": 1.0,
        "checks": [],
        "error": "",
    }


def test_ratios_are_paired_by_round_and_invalid_rounds_are_left_out() -> None:
    records = [
        record(0, "b", 1000),
        record(0, "d", 1200),
        record(0, "e", 1100),
        record(1, "b", 500),  # a noisy round: both configurations slow
        record(1, "d", 600),
        record(1, "e", 550),
        record(2, "b", 1000),
        record(2, "d", 9999, valid=False),
        record(2, "e", 1100),
    ]
    summary = report.summarize(records)["http-keepalive-1"]
    assert summary["d"]["rounds"] == 2 and summary["d"]["rounds_failed"] == 1
    assert summary["d"]["rate"] == pytest.approx(900)  # median of 1200 and 600
    assert summary["d"]["vs_baseline"] == pytest.approx(1.2)  # every round said 1.2
    assert summary["d"]["vs_ceiling"] == pytest.approx(1200 / 1100)
    aims = {aim["aim"]: aim for aim in report.aims(report.summarize(records))}
    assert aims["http-keepalive-1: (d) at or above the ceiling (e)"]["met"] is True
    text = report.markdown(results(records))
    assert "| (d) meshaccel (default) | 900 |" in text
    assert "round 3 http-keepalive-1 (d)" in text  # the failed measurement is listed


META = {
    "started_at": "now",
    "command": "python -m tests.bench",
    "host": {"cpu_model": "cpu", "cpus": 2},
    "versions": {},
    "plan": {"rounds": 3, "duration": 10, "warmup": 2},
    "tcp_mem_pressure_pages": 383877,
    "page_size": 4096,
}


def results(records: list[dict[str, Any]]) -> dict[str, Any]:
    summary = report.summarize(records)
    return {"summary": summary, "meta": META, "aims": report.aims(summary), "rounds": records}


def measured(
    workload: str,
    round_index: int,
    config: str,
    rate: float,
    *,
    counters: dict[str, int] | None = None,
    peak: int | None = None,
    valid: bool = True,
    warned: bool = False,
) -> dict[str, Any]:
    """A record of any workload, with datapath counters, node TCP memory and warnings."""
    known = WORKLOADS_BY_NAME[workload]
    return {
        **record(round_index, config, rate, valid=valid),
        "workload": workload,
        "unit": known.unit,
        "op": known.op,
        "datapath_counters": counters,
        "tcp_mem_pages_before": 200,
        "tcp_mem_pages_peak": peak,
        "warnings": [{"name": "fell back", "detail": counters}] if warned else [],
    }


def test_noise_is_the_median_and_the_worst_of_the_cpus_others_used() -> None:
    quiet, busy = record(0, "b", 1000), record(0, "d", 1000)
    quiet["foreign_cpu_seconds"], busy["foreign_cpu_seconds"] = 0.5, 3.0  # over 10 s each
    text = report.markdown(
        results([quiet, busy, {**record(0, "e", 1000), "foreign_cpu_seconds": 1.0}])
    )
    assert "in CPUs busy: 0.10 (median over workloads and configurations), 0.30 at worst." in text


def test_node_tcp_memory_counts_every_round_against_iptables() -> None:
    records = [
        measured("tcp-bulk", 0, "b", 1000, peak=1000),
        measured("tcp-bulk", 0, "d", 1100, peak=1500, counters={"msg_redirected": 1}),
        measured("tcp-bulk", 1, "b", 1000, peak=2000),
        measured("tcp-bulk", 1, "d", 1, peak=90000, valid=False),  # ran out of memory
        measured("tcp-bulk", 2, "b", 1000, peak=1000),
        measured("tcp-bulk", 2, "d", 1200, peak=1800, counters={"msg_redirected": 1}),
    ]
    entry = report.summarize(records)["tcp-bulk"]["d"]
    assert entry["tcp_mem_pages_peak"] == 1800  # median of 1500, 90000, 1800: failed included
    assert entry["tcp_mem_pages_peak_max"] == 90000
    assert entry["tcp_mem_pages_before"] == 200
    assert entry["tcp_mem_peak_vs_b"] == pytest.approx(1.8)  # per round: 1.5, 45, 1.8
    text = report.markdown(results(records))
    assert "## Node TCP memory" in text and "383,877 pages (1,500 MiB)" in text
    assert "Highest peak of any measurement: 90,000 pages, 23.4% of the threshold" in text
    assert "| tcp-bulk | 1,000 (1.00) | 1,800 (1.80) |" in text


def test_fallbacks_table_and_warnings() -> None:
    bulk = {"msg_redirected": 40, "fallback_budget": 2}
    rr = {"msg_redirected": 900, "msg_peer_not_target": 10}
    records = [
        measured("tcp-bulk", 0, "d", 1100, counters=bulk),
        measured("tcp-bulk", 1, "d", 1200, counters={**bulk, "fallback_budget": 4}),
        measured("tcp-bulk", 0, "b", 1000),
        measured("tcp-rr-1", 0, "d", 9000, counters=rr),
        measured("tcp-rr-1", 1, "d", 9000, counters={**rr, "fallback_budget": 1}, warned=True),
        measured("tcp-rr-1", 0, "c", 8000, counters={"connect_outbound_redirected": 1}),
    ]
    summary = report.summarize(records)
    assert summary["tcp-bulk"]["d"]["counters"]["fallback_budget"] == 3
    assert summary["tcp-bulk"]["d"]["rounds_with_fallback"] == 2
    assert summary["tcp-bulk"]["b"]["counters"] is None  # meshaccel not loaded
    assert summary["tcp-rr-1"]["d"]["rounds_warned"] == 1
    text = report.markdown(results(records))
    assert "## Fallbacks" in text
    header = (
        "| workload | config | msg_redirected | fallback_budget | fallback_receiver_unknown | "
        "fallback_redirect_failed | msg_peer_not_target | rounds with a fallback |"
    )
    assert header in text
    assert "| tcp-bulk | (d) meshaccel (default) | 40 | 3 | 0 | 0 | 0 | 2 of 2 |" in text
    assert (
        "| tcp-rr-1 | (d) meshaccel (default) | 900 | 0 | 0 | 0 | 10 | "
        "1 of 2 (warning: request/response) |"
    ) in text
    assert "| tcp-rr-1 | (c) meshaccel-connect | 0 | 0 | 0 | 0 | 0 | 0 of 1 |" in text
    assert "(b) iptables | -" not in text.split("## Fallbacks")[1].split("##")[0]
    assert "- round 2 tcp-rr-1 (d): fell back: msg_redirected 900, msg_peer_not_target 10, " in text
    assert "| 2 (1 with a warning) |" in text  # the warned round stays in the medians


# ---------------------------------------------------------------- aims


def entry(
    *,
    rounds: int = 5,
    failed: int = 0,
    vs_baseline: float | None = None,
    vs_ceiling: float | None = None,
    memory: float | None = None,
) -> dict[str, Any]:
    return {
        "rounds": rounds,
        "rounds_failed": failed,
        "vs_baseline": vs_baseline,
        "vs_ceiling": vs_ceiling,
        "tcp_mem_peak_vs_b": memory,
    }


SUMMARY: dict[str, dict[str, dict[str, Any]]] = {
    "http-keepalive-1": {"d": entry(vs_ceiling=1.02)},
    "http-keepalive-16": {"d": entry(vs_ceiling=0.95)},
    # http-keepalive-64: not measured
    "http-close-16": {"d": entry(vs_baseline=0.93, vs_ceiling=1.0)},
    "tcp-rr-1": {"d": entry(vs_baseline=1.3, vs_ceiling=1.1)},
    "tcp-rr-16": {"d": entry(vs_ceiling=1.04)},
    "tcp-bulk": {
        "b": entry(),
        "d": entry(vs_baseline=1.1, memory=2.5),
        "d+": entry(rounds=3, failed=2),
    },
    "micro-rr-1": {"d": entry(vs_baseline=1.2)},
}


@pytest.mark.parametrize(
    ("aim", "target", "value", "verdict", "detail"),
    [
        ("http-keepalive-1: (d) at or above the ceiling (e)", ">= 1.00", "1.020", "met", ""),
        ("http-keepalive-16: (d) at or above the ceiling (e)", ">= 1.00", "0.950",
         "missed by 0.050", ""),
        ("http-keepalive-64: (d) at or above the ceiling (e)", ">= 1.00", "-", "not measured", ""),
        ("http-close-16: (d) at or above the ceiling (e)", ">= 1.00", "1.000", "met", ""),
        ("tcp-rr-1: (d) at or above the ceiling (e)", ">= 1.00", "1.100", "met", ""),
        ("tcp-rr-16: (d) at or above the ceiling (e)", ">= 1.00", "1.040", "met", ""),
        ("tcp-rr-1: (d) >= +25% over (b)", ">= 1.25", "1.300", "met", ""),
        ("http-close-16: (d) at or above (b)", ">= 1.00", "0.930", "missed by 0.070", ""),
        ("tcp-bulk: every round passes in every configuration", ">= 1.00", "0.867",
         "missed by 0.133", "passed: (d+) 3 of 5"),
        ("tcp-bulk: (d) throughput at or above (b)", ">= 1.00", "1.100", "met", ""),
        ("tcp-bulk: (d) peak node TCP memory at most 2x (b)", "<= 2.00", "2.500",
         "missed by 0.500", ""),
        ("micro-rr-1: (d) against loopback TCP (a)", "-", "1.200", "reported", ""),
    ],
)  # fmt: skip
def test_aims_of_the_default(aim, target, value, verdict, detail) -> None:
    found = report.aims(SUMMARY)
    assert [a["aim"] for a in found].count(aim) == 1
    lines = report.markdown({"summary": {}, "meta": META, "aims": found, "rounds": []})
    assert f"| {aim} | {target} | {value} | {verdict} | {detail} |" in lines.splitlines()


def test_an_aim_whose_every_round_failed_is_missed() -> None:
    summary = {**SUMMARY, "tcp-bulk": {"b": entry(), "d": entry(rounds=0, failed=5)}}
    (throughput,) = [a for a in report.aims(summary) if "throughput" in a["aim"]]
    assert throughput["met"] is False and throughput["value"] is None
    assert throughput["detail"] == "all 5 rounds failed"
    (passes,) = [a for a in report.aims(summary) if "every round passes" in a["aim"]]
    assert passes["met"] is False and passes["detail"] == "passed: (d) 0 of 5"


# ---------------------------------------------------------------- chart


def failed_cell_results() -> dict[str, Any]:
    """(d) failed every round of tcp-bulk; every other cell has numbers."""
    records = []
    for round_index in range(2):
        for config, rate in (("b", 1000.0), ("e", 1100.0), ("c", 1050.0), ("d", 1200.0)):
            records.append(measured("tcp-rr-1", round_index, config, rate))
            valid = config != "d"
            records.append(measured("tcp-bulk", round_index, config, rate, valid=valid))
    return results(records)


def test_chart_layout_marks_a_failed_cell() -> None:
    layout = report.chart_layout(failed_cell_results()["summary"])
    assert layout.workloads == ["tcp-rr-1", "tcp-bulk"]
    series = {s.key: s for s in layout.series}
    assert series["d"].label == "(d) meshaccel (default)"
    assert len(series["d"].xs) == 1 and len(series["d"].failed_xs) == 1
    assert series["d"].failed_xs[0] > 0.5  # in tcp-bulk's group, not tcp-rr-1's
    assert all(not s.failed_xs for key, s in series.items() if key != "d")


def test_chart_draws_a_failed_cell_and_names_the_default(tmp_path: Path) -> None:
    require(
        importlib.util.find_spec("matplotlib") is not None,
        "needs matplotlib (the bench extra: pip install -e '.[bench]')",
    )
    import matplotlib.pyplot as pyplot
    from matplotlib.text import Text

    data = failed_cell_results()
    path = tmp_path / "chart.png"
    assert report.chart(data, path) is None
    assert path.stat().st_size > 0
    fig = report.figure(data)
    try:
        texts = [t.get_text() for t in fig.findobj(Text)]
        assert texts.count("failed") == 2  # the rate panel and the CPU panel
        legend = fig.axes[0].get_legend()
        assert "(d) meshaccel (default)" in [t.get_text() for t in legend.get_texts()]
    finally:
        pyplot.close(fig)


# ---------------------------------------------------------------- perf buckets


@pytest.mark.parametrize(
    ("dso", "symbol", "bucket", "reason"),
    [
        ("[kernel.kallsyms]", "[k] nf_hook_slow", "netfilter", "netfilter hook"),
        ("[kernel.kallsyms]", "[k] nft_do_chain", "netfilter", "nft rules"),
        ("[kernel.kallsyms]", "[k] br_nf_forward", "netfilter", "bridge netfilter"),
        ("[kernel.kallsyms]", "[k] tcp_bpf_sendmsg", "ebpf/sockmap", "sockmap send path"),
        ("[kernel.kallsyms]", "[k] bpf_prog_6deef7357e7b4530_redirect_msg", "ebpf/sockmap",
         "a JIT-ed program"),
        ("[kernel.kallsyms]", "[k] bpf_lsm_file_permission", "syscalls/epoll/vfs",
         "an LSM stub is not our program"),
        ("[kernel.kallsyms]", "[k] tcp_sendmsg_locked", "tcp/ip", "TCP"),
        ("[kernel.kallsyms]", "[k] finish_task_switch.isra.0", "scheduler/wakeup", "skid"),
        ("[kernel.kallsyms]", "[k] do_epoll_wait", "syscalls/epoll/vfs", "epoll"),
        ("[kernel.kallsyms]", "[k] kfree", "other kernel", "anything else"),
        ("/tmp/x/envoy", "[.] 0x0000000005b480e4", "envoy (user)", "Envoy's own code"),
        ("libc.so.6", "[.] __GI___readv", "other user", "libc"),
    ],
)  # fmt: skip
def test_perf_buckets(dso: str, symbol: str, bucket: str, reason: str) -> None:
    assert bucket_of(dso, symbol) == bucket, reason


def test_perf_report_parsing() -> None:
    text = " 30  |[kernel.kallsyms]|[k] nf_hook_slow\n 10  |envoy|[.] 0x1\n\n# comment\n"
    rows = parse_report(text)
    assert rows == [(30, "[kernel.kallsyms]", "[k] nf_hook_slow"), (10, "envoy", "[.] 0x1")]
    summary = summarize(rows, ops=1000)
    assert summary["samples"] == 40
    assert summary["buckets_share"]["netfilter"] == pytest.approx(0.75)


# ---------------------------------------------------------------- Envoy variant


def bench_bootstrap(tmp_path: Path) -> dict[str, Any]:
    return render_envoy_bootstrap(
        EnvoyBootstrapOptions(
            node_id="bench",
            access_log_path=tmp_path / "access.log",
            http_ports=(8080,),
            explicit_listeners=(
                ExplicitListener("ceiling-http-out", 15101, "http", ("198.18.0.11", 15106)),
                ExplicitListener(
                    "ceiling-rr-in",
                    15116,
                    "tcp",
                    ("198.18.0.11", 8081),
                    source_address="127.0.0.6",
                ),
            ),
            access_log=False,
            upstream_idle_timeout_s=1.0,
        )
    )


def test_explicit_listeners_mirror_the_virtual_ones(tmp_path: Path) -> None:
    resources = bench_bootstrap(tmp_path)["static_resources"]
    listeners = {listener["name"]: listener for listener in resources["listeners"]}
    outbound, explicit = listeners["virtualOutbound"], listeners["ceiling-http-out"]
    assert explicit["listener_filters"] == outbound["listener_filters"]  # original_dst on both
    # virtual: blackhole, HTTP for 8080, tcp_proxy; explicit: inert, the one chain.
    assert [c.get("filter_chain_match") for c in outbound["filter_chains"]] == [
        {"destination_port": 15001},
        {"destination_port": 8080},
        None,
    ]
    assert explicit["filter_chains"][0]["filter_chain_match"] == {"destination_port": 15001}
    http = explicit["filter_chains"][1]["filters"][0]
    assert http["name"] == "envoy.filters.network.http_connection_manager"
    assert http["typed_config"]["access_log"] == []
    clusters = {cluster["name"]: cluster for cluster in resources["clusters"]}
    rr_in = clusters["ceiling-rr-in-upstream"]
    assert rr_in["type"] == "STATIC"
    assert rr_in["upstream_bind_config"]["source_address"]["address"] == "127.0.0.6"
    assert "typed_extension_protocol_options" in clusters["PassthroughCluster"]


def test_the_default_bootstrap_is_unchanged_by_the_variant_options(tmp_path: Path) -> None:
    plain = render_envoy_bootstrap(EnvoyBootstrapOptions("x", tmp_path / "a.log"))
    listeners = plain["static_resources"]["listeners"]
    assert [listener["name"] for listener in listeners] == ["virtualOutbound", "virtualInbound"]
    assert all(len(listener["filter_chains"]) == 2 for listener in listeners)
    assert "typed_extension_protocol_options" not in json.dumps(plain)


def test_the_bench_bootstrap_is_valid_envoy_config(tmp_path: Path) -> None:
    try:
        envoy = find_envoy_binary()
    except FileNotFoundError as exc:
        require(False, str(exc))
        raise
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(bench_bootstrap(tmp_path)))
    completed = subprocess.run(
        [str(envoy), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
