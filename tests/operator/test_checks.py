"""What passes the schema but makes no sense: each problem a sentence naming the field to fix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from meshaccel.operator.checks import spec_problems
from meshaccel.operator.models import LEGACY_DEFAULT_AGENT_IMAGE, MeshAccelerationSpec

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


@dataclass(frozen=True)
class ImageCase:
    reason: str
    image: str | None
    refused: bool


IMAGE_CASES = [
    ImageCase("unset: the agents run the operator's image", None, False),
    ImageCase(
        "the 0.1 CRD's default, which the API server wrote", LEGACY_DEFAULT_AGENT_IMAGE, False
    ),
    ImageCase("any other image: refused, never run", "attacker.example/root-shell:1", True),
    ImageCase(
        "the old default's repository at another tag", "ghcr.io/meshaccel/meshaccel-agent:9", True
    ),
    ImageCase(
        "pinned by digest: still not the resource's to choose",
        "r.example/a@sha256:" + "a" * 64,
        True,
    ),
    ImageCase("empty", "", True),
]


@pytest.mark.parametrize("case", IMAGE_CASES, ids=[c.reason for c in IMAGE_CASES])
def test_the_retired_agent_image(case: ImageCase) -> None:
    """spec.agent.image is retired (issue 12): a value is refused with what to do instead."""
    spec = MeshAccelerationSpec.model_validate(
        {"namespaceSelector": {}, "agent": {"image": case.image}}
    )
    problems = spec_problems("mesh", spec)
    if not case.refused:
        assert problems == [], case.reason
        return
    (problem,) = problems
    assert f"spec.agent.image is set ({case.image!r}) but no longer read" in problem, case.reason
    assert "Helm value agent.image" in problem
    assert (
        "kubectl patch meshacceleration mesh --type=json "
        """-p '[{"op": "remove", "path": "/spec/agent/image"}]'"""
    ) in problem
