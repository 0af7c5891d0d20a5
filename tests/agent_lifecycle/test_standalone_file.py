"""The pods file watcher, in-process against a recording reconciler (no kernel needed).

The agent-level behaviour (a real agent, real pods, real traffic) is in test_agent.py.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

from meshaccel.agent.reconcile import StaleGenerationError
from meshaccel.agent.standalone import PodsFileError, PodsFileWatcher, parse_pod_set
from meshaccel.contract.api import ApplyResult, PodSet
from tests.agent_lifecycle.harness import write_yaml


class RecordingReconciler:
    def __init__(self, applied_generation: int | None = None) -> None:
        self.applied_generation = applied_generation
        self.sets: list[PodSet] = []
        self.refuse: Exception | None = None

    def apply(self, pod_set: PodSet) -> ApplyResult:
        if self.refuse is not None:
            raise self.refuse
        self.sets.append(pod_set)
        self.applied_generation = pod_set.generation
        return ApplyResult(
            applied_generation=pod_set.generation,
            added=len(pod_set.pods),
            updated=0,
            removed=0,
            unresolved=[],
            duration_ms=0.1,
            boot_id="test-boot",
        )


def pod(name: str, ip: str = "198.18.0.10", **extra: Any) -> dict[str, Any]:
    return {
        "uid": f"uid-{name}",
        "namespace": "default",
        "name": name,
        "ip": ip,
        "cgroup": f"pods/{name}",
        **extra,
    }


@pytest.fixture
def pods_file(tmp_path: Path) -> Path:
    return tmp_path / "pods.yaml"


def records(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == message]


def test_generation_counter_when_the_file_has_none(pods_file: Path) -> None:
    reconciler = RecordingReconciler()
    watcher = PodsFileWatcher(pods_file, reconciler)
    write_yaml(pods_file, {"pods": [pod("a")]})
    assert watcher.poll()
    write_yaml(pods_file, {"pods": [pod("a"), pod("b", "198.18.0.11")]})
    assert watcher.poll()
    assert [s.generation for s in reconciler.sets] == [1, 2]
    assert [len(s.pods) for s in reconciler.sets] == [1, 2]


def test_counter_continues_after_the_applied_generation(pods_file: Path) -> None:
    """A restarted agent whose reconciler already knows generation 41 applies 42 next."""
    reconciler = RecordingReconciler(applied_generation=41)
    write_yaml(pods_file, {"pods": [pod("a")]})
    assert PodsFileWatcher(pods_file, reconciler).poll()
    assert reconciler.sets[0].generation == 42


def test_the_file_s_own_generation_is_used(pods_file: Path) -> None:
    reconciler = RecordingReconciler()
    write_yaml(pods_file, {"generation": 7, "pods": [pod("a")]})
    assert PodsFileWatcher(pods_file, reconciler).poll()
    assert reconciler.sets[0].generation == 7


def test_unchanged_or_touched_file_is_not_applied_again(pods_file: Path) -> None:
    reconciler = RecordingReconciler()
    watcher = PodsFileWatcher(pods_file, reconciler)
    write_yaml(pods_file, {"pods": [pod("a")]})
    assert watcher.poll()
    assert not watcher.poll()
    os.utime(pods_file)  # touched
    write_yaml(pods_file, {"pods": [pod("a")]})  # rewritten, same content
    assert not watcher.poll()
    assert len(reconciler.sets) == 1


def test_change_of_the_same_size_in_the_same_instant_is_seen(pods_file: Path) -> None:
    reconciler = RecordingReconciler()
    watcher = PodsFileWatcher(pods_file, reconciler)
    write_yaml(pods_file, {"pods": [pod("a")]})
    assert watcher.poll()
    before = os.stat(pods_file)
    write_yaml(pods_file, {"pods": [pod("b")]})  # same length, replaced by rename
    os.utime(pods_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert watcher.poll()
    assert reconciler.sets[-1].pods[0].name == "b"


def test_invalid_file_is_logged_with_the_field_and_the_previous_set_stays(
    pods_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reconciler = RecordingReconciler()
    watcher = PodsFileWatcher(pods_file, reconciler)
    write_yaml(pods_file, {"pods": [pod("a")]})
    assert watcher.poll()
    cases = [
        ({"pods": [pod("a"), pod("b", "not-an-ip")]}, "pods[1].ip", "default/b"),
        ({"pods": [pod("a", cgroup=None, colour="red")]}, "pods[0].colour", "default/a"),
        ({"generation": -1, "pods": []}, "generation", ""),
        ({"pods": [pod("a"), pod("a2", uid="uid-a")]}, "(the set)", ""),
        ({"pod": []}, "pods", ""),
    ]
    for document, field, pod_label in cases:
        caplog.clear()
        write_yaml(pods_file, document)
        assert not watcher.poll(), field
        (refused,) = records(caplog, "pods file refused: the applied set stays")
        assert refused.levelno == logging.ERROR
        assert refused.__dict__["field"] == field
        assert refused.__dict__.get("pod", "") == pod_label
        assert watcher.last_error is not None and watcher.last_error.startswith(field)
    assert len(reconciler.sets) == 1


def test_yaml_syntax_error_names_the_line(
    pods_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    watcher = PodsFileWatcher(pods_file, RecordingReconciler())
    pods_file.write_text("pods:\n  - uid: a\n    name: [unclosed\n")
    assert not watcher.poll()
    (refused,) = records(caplog, "pods file refused: the applied set stays")
    assert refused.__dict__["field"].startswith("line ")


def test_a_refused_apply_is_logged_and_not_counted(
    pods_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reconciler = RecordingReconciler(applied_generation=9)
    reconciler.refuse = StaleGenerationError(3, 9)
    watcher = PodsFileWatcher(pods_file, reconciler)
    write_yaml(pods_file, {"generation": 3, "pods": [pod("a")]})
    assert not watcher.poll()
    (refused,) = records(caplog, "pods file refused: the applied set stays")
    assert refused.__dict__["field"] == "generation"
    assert "older than the applied generation 9" in refused.__dict__["reason"]
    assert watcher.applied == 0


def test_missing_file_is_reported_once(pods_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    watcher = PodsFileWatcher(pods_file, RecordingReconciler())
    for _ in range(3):
        assert not watcher.poll()
    assert len(records(caplog, "pods file does not exist (yet): the applied set stays")) == 1
    write_yaml(pods_file, {"pods": []})
    assert watcher.poll()


def test_parse_accepts_what_the_api_accepts() -> None:
    pod_set, own = parse_pod_set(
        "pods:\n- {uid: u1, namespace: ns, name: a, ip: 198.18.0.10, cgroup: /x/a,\n"
        "   options: {excluded_outbound_ports: [9090], included_outbound_cidrs: [10.0.0.0/8]}}\n",
        5,
    )
    assert not own and pod_set.generation == 5
    assert pod_set.pods[0].options.excluded_outbound_ports == frozenset({9090})
    with pytest.raises(PodsFileError) as refused:
        parse_pod_set("", 1)  # an empty file is not an empty set: say so with `pods: []`
    assert refused.value.field == "pods"
