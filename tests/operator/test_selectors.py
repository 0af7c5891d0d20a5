"""LabelSelector semantics and the "can never match" checks (table-driven, with reasons)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from meshaccel.operator.models import LabelSelector
from meshaccel.operator.selectors import matches, overlap_possible, selector_problems


@dataclass(frozen=True)
class Case:
    reason: str
    selector: dict[str, Any]
    labels: dict[str, str]
    want: bool


CASES = [
    Case("empty selector matches everything", {}, {"a": "1"}, True),
    Case("empty selector matches no labels", {}, {}, True),
    Case("matchLabels equal", {"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
    Case("matchLabels other value", {"matchLabels": {"a": "1"}}, {"a": "2"}, False),
    Case("matchLabels absent key", {"matchLabels": {"a": "1"}}, {}, False),
    Case("matchLabels empty value", {"matchLabels": {"a": ""}}, {"a": ""}, True),
    Case(
        "In listed",
        _in := {"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]},
        {"a": "2"},
        True,
    ),
    Case("In unlisted", _in, {"a": "3"}, False),
    Case("In absent key", _in, {}, False),
    Case(
        "NotIn unlisted",
        _notin := {"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]},
        {"a": "2"},
        True,
    ),
    Case("NotIn listed", _notin, {"a": "1"}, False),
    Case("NotIn absent key holds", _notin, {}, True),
    Case(
        "Exists present",
        _ex := {"matchExpressions": [{"key": "a", "operator": "Exists"}]},
        {"a": ""},
        True,
    ),
    Case("Exists absent", _ex, {"b": "1"}, False),
    Case(
        "DoesNotExist absent",
        _dne := {"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]},
        {},
        True,
    ),
    Case("DoesNotExist present", _dne, {"a": "x"}, False),
    Case(
        "every term must hold (AND)",
        {"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "Exists"}]},
        {"a": "1"},
        False,
    ),
    Case(
        "every term holds",
        {"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "Exists"}]},
        {"a": "1", "b": "0"},
        True,
    ),
    Case(
        "prefixed keys", {"matchLabels": {"istio.io/rev": "1-24"}}, {"istio.io/rev": "1-24"}, True
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.reason for c in CASES])
def test_matches(case: Case) -> None:
    selector = LabelSelector.model_validate(case.selector)
    assert matches(selector, case.labels) is case.want, case.reason


@dataclass(frozen=True)
class ProblemCase:
    reason: str
    selector: dict[str, Any]
    problem: str | None  # a fragment of the one problem expected, or None for none


PROBLEMS = [
    ProblemCase("empty is fine", {}, None),
    ProblemCase(
        "In without values",
        {"matchExpressions": [{"key": "a", "operator": "In"}]},
        "needs at least one value",
    ),
    ProblemCase(
        "Exists with values",
        {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]},
        "must not list values",
    ),
    ProblemCase(
        "required and absent",
        {"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]},
        "required and also required to be absent",
    ),
    ProblemCase(
        "matchLabels value excluded by NotIn",
        {
            "matchLabels": {"a": "1"},
            "matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}],
        },
        "no value of label 'a'",
    ),
    ProblemCase(
        "two disjoint In terms",
        {
            "matchExpressions": [
                {"key": "a", "operator": "In", "values": ["1"]},
                {"key": "a", "operator": "In", "values": ["2"]},
            ]
        },
        "no value of label 'a'",
    ),
    ProblemCase(
        "In and NotIn leave a value",
        {
            "matchExpressions": [
                {"key": "a", "operator": "In", "values": ["1", "2"]},
                {"key": "a", "operator": "NotIn", "values": ["1"]},
            ]
        },
        None,
    ),
    ProblemCase(
        "NotIn and DoesNotExist agree",
        {
            "matchExpressions": [
                {"key": "a", "operator": "NotIn", "values": ["1"]},
                {"key": "a", "operator": "DoesNotExist"},
            ]
        },
        None,
    ),
    ProblemCase(
        "matchLabels disagrees with In",
        {
            "matchLabels": {"a": "1"},
            "matchExpressions": [{"key": "a", "operator": "In", "values": ["2"]}],
        },
        "no value of label 'a'",
    ),
]


@pytest.mark.parametrize("case", PROBLEMS, ids=[c.reason for c in PROBLEMS])
def test_selector_problems(case: ProblemCase) -> None:
    problems = selector_problems(LabelSelector.model_validate(case.selector), "spec.podSelector")
    if case.problem is None:
        assert problems == [], case.reason
    else:
        assert len(problems) == 1 and case.problem in problems[0], (case.reason, problems)
        assert problems[0].startswith("spec.podSelector"), "names the field to fix"


def test_a_contradiction_matches_nothing_indeed() -> None:
    """The checker's verdict agrees with matches() over a spread of label sets."""
    selector = LabelSelector.model_validate(
        {
            "matchLabels": {"a": "1"},
            "matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}],
        }
    )
    for labels in ({}, {"a": "1"}, {"a": "2"}, {"b": "1"}):
        assert not matches(selector, labels)


@pytest.mark.parametrize(
    ("a", "b", "want", "reason"),
    [
        ({}, {}, True, "two empty selectors pick every node"),
        ({"pool": "a"}, {}, True, "an empty selector overlaps anything"),
        ({"pool": "a"}, {"pool": "b"}, False, "one key, two values"),
        ({"pool": "a"}, {"zone": "1"}, True, "different keys can both hold on one node"),
    ],
)
def test_node_selectors_overlap(a, b, want, reason) -> None:
    assert overlap_possible(a, b) is want, reason
    assert overlap_possible(b, a) is want, reason + " (symmetric)"
