"""The benchmark's quick variant on its smallest workload, end to end (python -m tests.bench)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.configs import CONFIGS
from tests.bench.runner import QUICK_PLAN
from tests.bench.workloads import SMALLEST_WORKLOAD
from tests.netlab import find_leftovers
from tests.requirements import require, require_btf, require_tool

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_measures_every_configuration(tmp_path: Path, netlab_requirements: None) -> None:
    require_btf()
    for tool in ("wrk", "gcc", "iperf3"):
        require_tool(tool)
    require(
        shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists(),
        "needs nginx (Debian nginx-light)",
    )
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.bench",
            "--quick",
            "--workloads",
            SMALLEST_WORKLOAD,
            "--duration",
            "1",
            "--warmup",
            "0.2",
            "--no-profile",
            "--no-chart",
            "--results-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    results = json.loads((run_dir / "results.json").read_text())

    for config in CONFIGS:
        rounds = [r for r in results["rounds"] if r["config"] == config.key]
        assert len(rounds) == QUICK_PLAN.rounds, f"({config.key}) ran {len(rounds)} rounds"
        for record in rounds:
            assert record["workload"] == SMALLEST_WORKLOAD
            failed = [c for c in record["checks"] if not c["ok"]]
            assert record["valid"], f"({config.key}) {record['error']} {failed}"
            assert record["ops"] > 0 and record["rate"] > 0, record
            assert record["cpu_us_per_op"]["total"] > 0, record
            # One keep-alive connection never comes near the redirect budget. wrk stops with
            # a request in flight: Envoy A closes that upstream connection, and Envoy B's answer
            # may meet a socket that has left the sockhash (one failed redirect, then TCP and
            # the close, as without meshaccel: docs/benchmarks.md, "Fallbacks").
            fallbacks = {k: v for w in record["warnings"] for k, v in w["detail"].items()}
            at_teardown = {"fallback_redirect_failed": fallbacks.get("fallback_redirect_failed")}
            assert fallbacks in ({}, at_teardown), f"({config.key}) {record['warnings']}"
            assert fallbacks.get("fallback_redirect_failed", 0) <= 1, record["warnings"]
            assert record["tcp_mem_pages_peak"] is not None, "sockstat was not sampled"
        entry = results["summary"][SMALLEST_WORKLOAD][config.key]
        assert entry["rate"] > 0 and entry["rounds"] == QUICK_PLAN.rounds, entry
    assert results["meta"]["tcp_mem_pressure_pages"] > 0
    text = (run_dir / "results.md").read_text()
    assert "| (d) meshaccel (default) |" in text
    assert "## Node TCP memory" in text and "## Fallbacks" in text
    # Everything the run made is gone: netns, cgroups, processes, pins.
    assert find_leftovers(results["meta"]["node"]) == []
    assert not Path(results["meta"]["pin_root"]).exists()
