"""The metric families: every datapath counter in exactly one, named by Prometheus' rules.

No kernel here: the families are fed made-up counter values, one distinct value per counter, so
a counter exported under the wrong series shows as a wrong number. The live agent and operator
expose the same families (tests/test_dashboard.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from meshaccel.agent.layout import Counter
from meshaccel.agent.metrics import DATAPATH_FAMILIES, datapath_metrics
from meshaccel.contract.version import VERSION
from meshaccel.operator.metrics import process_registry

# Prometheus' metric and label name rules, narrowed to this project's style (lower snake case).
METRIC_NAME = re.compile(r"^meshaccel_datapath_[a-z][a-z0-9_]*[a-z0-9]$")
LABEL_VALUE = re.compile(r"^[a-z][a-z0-9_]*$")
# Base units a name may end with (https://prometheus.io/docs/practices/naming/).
UNITS = ("seconds", "bytes", "ratio", "celsius", "meters", "volts", "amperes", "joules", "grams")


def test_every_counter_lands_in_exactly_one_family() -> None:
    homes: dict[Counter, list[str]] = {counter: [] for counter in Counter}
    for family in DATAPATH_FAMILIES:
        for counter, value in family.members.items():
            homes[counter].append(f"{family.name}{{{family.label}={value!r}}}")
    wrong = {counter.name: found for counter, found in homes.items() if len(found) != 1}
    assert wrong == {}, "each kernel counter must feed exactly one series"


def test_family_names_follow_prometheus_naming() -> None:
    names = [family.name for family in DATAPATH_FAMILIES]
    assert len(names) == len(set(names)), "a family name is used twice"
    for family in DATAPATH_FAMILIES:
        reason = f"{family.name}: {family.documentation}"
        assert METRIC_NAME.match(family.name), reason
        # The exposition appends _total to a counter: a name with it would read _total_total.
        assert not family.name.endswith("_total"), reason
        if family.label is None:
            assert len(family.members) == 1, f"{reason}: no label, so one series only"
        else:
            assert family.label in ("hop", "reason", "call", "verdict", "kind"), reason
            values = list(family.members.values())
            assert len(values) == len(set(values)), f"{reason}: a label value twice"
            assert all(LABEL_VALUE.match(v) for v in values), f"{reason}: {values}"
    # A count of bytes says so in its name; nothing else claims a unit.
    units = {
        f.name: next((u for u in UNITS if f.name.endswith(f"_{u}")), None)
        for f in DATAPATH_FAMILIES
    }
    assert units.pop("meshaccel_datapath_redirected_bytes") == "bytes"
    assert set(units.values()) == {None}, units


class _Families(Collector):
    def __init__(self, counters: dict[Counter, int]) -> None:
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        yield from datapath_metrics(self._counters)


def test_each_counter_is_exported_with_its_own_value() -> None:
    counters = {counter: 1000 + counter.value for counter in Counter}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(counters))
    text = generate_latest(registry).decode()

    exported: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for parsed in text_string_to_metric_families(text):
        assert parsed.type == "counter", parsed.name
        for sample in parsed.samples:
            exported[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    wanted = {}
    for family in DATAPATH_FAMILIES:
        for counter, value in family.members.items():
            labels = ((family.label, value),) if family.label else ()
            wanted[(f"{family.name}_total", labels)] = float(counters[counter])
    assert exported == wanted
    assert len(exported) == len(Counter)


def test_a_missing_counter_reads_zero() -> None:
    """A kernel object older than the enum (a counter it does not have) exports 0, not a gap."""
    families = {f.name: f for f in datapath_metrics({})}
    errors = families["meshaccel_datapath_errors"]
    assert [s.value for s in errors.samples] == [0, 0, 0, 0]


def test_operator_registry_has_process_metrics_and_build_info() -> None:
    text = generate_latest(process_registry()).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("process_resident_memory_bytes", "process_cpu_seconds", "process_open_fds"):
        assert name in families, f"{name} missing from:\n{text}"
    assert families["process_resident_memory_bytes"].samples[0].value > 0
    (build,) = families["meshaccel_build_info"].samples
    assert build.labels["component"] == "operator"
    assert build.labels["version"] == VERSION
    assert build.value == 1
    assert "python_info" in families


def test_docs_list_each_counter_with_its_series() -> None:
    """docs/agent.md's counter table says what DATAPATH_FAMILIES does, row for row."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "agent.md").read_text()
    row = re.compile(r"^\| (\d+) \| `([a-z_]+)` \| `([a-z_]+)(?:\{([a-z_]+)=\"([a-z_]+)\"\})?` \|$")
    documented = {
        int(m[1]): (m[2], m[3], m[4], m[5]) for line in text.splitlines() if (m := row.match(line))
    }
    wanted = {}
    for family in DATAPATH_FAMILIES:
        for counter, value in family.members.items():
            label = (family.label, value) if family.label else (None, None)
            wanted[counter.value] = (counter.metric_name, f"{family.name}_total", *label)
    assert documented == wanted
