"""The benchmark's pure parts: rotation, output parsing, medians and ratios, perf buckets, and the
Envoy bootstrap variant it runs (no root needed, except for Envoy's own validation)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.bench import report
from tests.bench.accounting import ClientRun
from tests.bench.configs import CONFIGS, rotated
from tests.bench.profile import bucket_of, parse_report, summarize
from tests.bench.workloads import WORKLOADS_BY_NAME, load_argv, parse_load
from tests.netlab.envoy import (
    EnvoyBootstrapOptions,
    ExplicitListener,
    find_envoy_binary,
    render_envoy_bootstrap,
)
from tests.requirements import require


def client_run(stdout: str, returncode: int = 0) -> ClientRun:
    return ClientRun(["tool"], returncode, stdout, "", 0.5, 10, 1.0, False)


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
    assert aims["HTTP keep-alive, 1 connection: (d) >= +13% over (b)"]["met"] is True
    text = report.markdown(
        {
            "summary": report.summarize(records),
            "meta": {
                "started_at": "now",
                "command": "python -m tests.bench",
                "host": {"cpu_model": "cpu", "cpus": 2},
                "versions": {},
                "plan": {"rounds": 3, "duration": 10, "warmup": 2},
            },
            "aims": list(aims.values()),
            "rounds": records,
        }
    )
    assert "| (d) meshaccel | 900 |" in text
    assert "round 3 http-keepalive-1 (d)" in text  # the failed measurement is listed


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
