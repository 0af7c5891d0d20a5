"""kubectl-apply-like merging: the merge patch from the last rendered object, and drift."""

from __future__ import annotations

import pytest

from meshaccel.operator.kube import contains, removals


@pytest.mark.parametrize(
    ("last", "new", "patch", "reason"),
    [
        ({"a": 1}, {"a": 2}, {"a": 2}, "a changed value is set"),
        ({"a": 1, "b": 2}, {"a": 1}, {"a": 1, "b": None}, "a dropped key is deleted"),
        (
            {"spec": {"nodeSelector": {"pool": "a", "zone": "z"}}},
            {"spec": {"nodeSelector": {"pool": "a"}}},
            {"spec": {"nodeSelector": {"pool": "a", "zone": None}}},
            "nested keys dropped are deleted, siblings kept",
        ),
        ({"l": [1, 2]}, {"l": [1]}, {"l": [1]}, "lists are replaced whole (RFC 7386)"),
        ({}, {"a": {"b": 1}}, {"a": {"b": 1}}, "no previous render: the object itself"),
        ({"a": {"b": 1}}, {"a": 3}, {"a": 3}, "a map replaced by a scalar"),
    ],
)
def test_removals(last, new, patch, reason) -> None:
    assert removals(last, new) == patch, reason


@pytest.mark.parametrize(
    ("live", "wanted", "want", "reason"),
    [
        ({"a": 1, "server": "x"}, {"a": 1}, True, "server-added fields are not drift"),
        ({"a": 1}, {"a": 2}, False, "a changed value is drift"),
        ({"a": 1}, {"a": 1, "b": 2}, False, "a missing field is drift"),
        ({"l": [{"x": 1, "d": 0}]}, {"l": [{"x": 1}]}, True, "defaults inside list items"),
        ({"l": [1, 2]}, {"l": [1]}, False, "a list of another length"),
    ],
)
def test_contains(live, wanted, want, reason) -> None:
    assert contains(live, wanted) is want, reason
