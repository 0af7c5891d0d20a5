"""What admission cannot refuse: each problem a sentence naming the field to fix.

Senseless specs the CRD's CEL rules refuse at admission (selector terms without values or
contradicting matchLabels, skMsgToAppsSelector without skMsgRedirect, a toleration's value
with Exists, a name over 63 characters) are tests/operator/test_crd_rules.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from meshaccel.operator.checks import spec_problems
from meshaccel.operator.models import LEGACY_DEFAULT_AGENT_IMAGE, MeshAccelerationSpec


def _terms(*terms: tuple[str, str, list[str]]) -> dict[str, Any]:
    return {"matchExpressions": [{"key": k, "operator": o, "values": v} for k, o, v in terms]}


@dataclass(frozen=True)
class CheckCase:
    reason: str
    spec: dict[str, Any]
    problems: tuple[str, ...] = ()  # a fragment of each problem, in order


CASES = [
    CheckCase("the defaults", {}),
    CheckCase(
        "sk_msg into every app: an empty selector",
        {"datapath": {"skMsgToAppsSelector": {}}},
    ),
    CheckCase(
        "sk_msg into some apps",
        {"datapath": {"skMsgToAppsSelector": {"matchLabels": {"reads-with": "recv"}}}},
    ),
    CheckCase(
        "sk_msg off, no apps selector",
        {"datapath": {"skMsgRedirect": False, "skMsgToAppsSelector": None}},
    ),
    CheckCase(
        "In and NotIn that leave a value",
        {"podSelector": _terms(("tier", "In", ["web", "api"]), ("tier", "NotIn", ["web"]))},
    ),
    CheckCase(
        "two In terms with no value in common",
        {"podSelector": _terms(("tier", "In", ["web"]), ("tier", "In", ["db"]))},
        ("spec.podSelector can never match: no value of label 'tier' satisfies every In",),
    ),
    CheckCase(
        "an In whose every value a NotIn excludes",
        {
            "datapath": {
                "skMsgToAppsSelector": _terms(
                    ("reads-with", "In", ["recv"]), ("reads-with", "NotIn", ["recv", "splice"])
                )
            }
        },
        ("spec.datapath.skMsgToAppsSelector can never match: no value of label 'reads-with'",),
    ),
    CheckCase(
        "each selector said, in order",
        {
            "namespaceSelector": _terms(("team", "In", ["a"]), ("team", "NotIn", ["a"])),
            "podSelector": _terms(("tier", "In", ["web"]), ("tier", "In", ["db"])),
        },
        ("spec.namespaceSelector can never match", "spec.podSelector can never match"),
    ),
    CheckCase(
        "a CIDR with host bits set (the schema checks the spelling only)",
        {"exclusions": {"outboundCIDRs": ["169.254.0.0/16", "10.1.2.3/8"]}},
        ("spec.exclusions.outboundCIDRs: '10.1.2.3/8' is not a network",),
    ),
    CheckCase(
        "an octet over 255",
        {"exclusions": {"outboundCIDRs": ["300.0.0.0/8"]}},
        ("'300.0.0.0/8' is not a network",),
    ),
    CheckCase(
        "IPv6 networks are networks too",
        {"exclusions": {"outboundCIDRs": ["fd00::/8", "2001:db8::1/128", "::/0", "10.0.0.0/8"]}},
        (),
    ),
    CheckCase(
        "an IPv6 CIDR with host bits set",
        {"exclusions": {"outboundCIDRs": ["fd00::1/8"]}},
        ("spec.exclusions.outboundCIDRs: 'fd00::1/8' is not a network",),
    ),
    CheckCase(
        "an IPv6 spelling that is no address",
        {"exclusions": {"outboundCIDRs": ["fd00:::1/128"]}},
        ("'fd00:::1/128' is not a network",),
    ),
    CheckCase(
        "an IPv4-mapped range matches no IPv6 packet",
        {"exclusions": {"outboundCIDRs": ["::ffff:10.0.0.0/104"]}},
        ("'::ffff:10.0.0.0/104' is IPv4-mapped",),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.reason for c in CASES])
def test_spec_problems(case: CheckCase) -> None:
    spec = MeshAccelerationSpec.model_validate({"namespaceSelector": {}, **case.spec})
    problems = spec_problems("default", spec)
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
