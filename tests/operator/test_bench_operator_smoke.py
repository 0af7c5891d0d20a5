"""The operator benchmark (``python -m tests.operator.bench_operator``) still runs end to end.

A tiny cluster (3 nodes, 30 pods, 10 changes): nothing here is a performance claim; it checks
that the harness starts, measures and stops everything, and that every change was seen.
"""

from __future__ import annotations

import json
import pathlib

import pytest

from tests.operator import bench_operator

pytestmark = pytest.mark.slow


def test_bench_runs_and_sees_every_change(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "result.json"
    bench_operator.main(
        [
            "--nodes", "3",
            "--pods", "30",
            "--namespaces", "3",
            "--changes", "10",
            "--warmup", "2",
            "--concurrency", "1", "2",
            "--idle", "0.5",
            "--json", str(out),
        ]
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["populate"]["pods"] == 30
    initial = result["initial"]
    assert initial["from_operator_start_s"] > 0  # measured (a figure, not a claim)
    assert 0 < initial["rss_mb"] <= initial["hwm_mb"]
    assert [level["concurrency"] for level in result["steady"]] == [1, 2]
    for level in result["steady"]:
        assert level["missed"] == 0, level
        assert level["latency"]["count"] == level["changes"] == 10
        latency = level["latency"]
        assert 0 < latency["p50_ms"] <= latency["p90_ms"] <= latency["p99_ms"] <= latency["max_ms"]
        assert set(level["by_kind"]) == {"opt-out", "opt-in", "delete", "create"}
        assert level["cpu_s"] >= 0 and level["rss_mb"] > 0
    assert result["emulator_rejections"] == 0, "the operator wrote something a server refuses"
    assert result["operator_exit"] == 0, "the operator did not stop cleanly"
    assert isinstance(result["aims"]["p99"], bool) and isinstance(result["aims"]["rss"], bool)
