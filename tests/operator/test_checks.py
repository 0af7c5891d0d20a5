"""What passes the schema but makes no sense: each problem a sentence naming the field to fix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from meshaccel.operator.checks import spec_problems
from meshaccel.operator.models import MeshAccelerationSpec

NEVER = {"matchExpressions": [{"key": "reads-with", "operator": "In", "values": []}]}


@dataclass(frozen=True)
class CheckCase:
    reason: str
    spec: dict[str, Any]
    problems: tuple[str, ...] = ()  # a fragment of each problem, in order
    name: str = "default"


CASES = [
    CheckCase("the defaults", {}),
    CheckCase("sk_msg into every app: an empty selector", {"skMsgToAppsSelector": {}}),
    CheckCase(
        "sk_msg into some apps",
        {"skMsgToAppsSelector": {"matchLabels": {"reads-with": "recv"}}},
    ),
    CheckCase(
        "sk_msg off, no apps selector",
        {"skMsgRedirect": False, "skMsgToAppsSelector": None},
    ),
    CheckCase(
        "an apps selector without sk_msg redirection",
        {"skMsgRedirect": False, "skMsgToAppsSelector": {"matchLabels": {"app": "web"}}},
        (
            "spec.datapath.skMsgToAppsSelector is set but spec.datapath.skMsgRedirect is false: "
            "without sk_msg redirection nothing is delivered into application sockets",
        ),
    ),
    CheckCase(
        "an empty apps selector is set too",
        {"skMsgRedirect": False, "skMsgToAppsSelector": {}},
        ("spec.datapath.skMsgToAppsSelector is set but spec.datapath.skMsgRedirect is false",),
    ),
    CheckCase(
        "an apps selector that can never match",
        {"skMsgToAppsSelector": NEVER},
        ("spec.datapath.skMsgToAppsSelector.matchExpressions[0] (reads-with In) needs",),
    ),
    CheckCase(
        "both at once, each said",
        {"skMsgRedirect": False, "skMsgToAppsSelector": NEVER},
        (
            "spec.datapath.skMsgToAppsSelector.matchExpressions[0]",
            "spec.datapath.skMsgRedirect is false",
        ),
    ),
    CheckCase(
        "a name the agents cannot pin under",
        {},
        ("is not usable as the agents' datapath name",),
        name="n" * 64,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.reason for c in CASES])
def test_spec_problems(case: CheckCase) -> None:
    spec = MeshAccelerationSpec.model_validate({"namespaceSelector": {}, "datapath": case.spec})
    problems = spec_problems(case.name, spec)
    assert len(problems) == len(case.problems), (case.reason, problems)
    for problem, fragment in zip(problems, case.problems, strict=True):
        assert fragment in problem, (case.reason, problem)
