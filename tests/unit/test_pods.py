"""A pod from the agent's API to its pods-map entry: its flags (no kernel needed).

Reading the maps back into an AcceleratedPod is tested against the real maps in
``tests/agent/test_reconcile.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any

import pytest

from meshaccel.agent.layout import PodFlags
from meshaccel.agent.reconcile import accelerated_pod
from meshaccel.contract.api import PodSpec

CGROUP_ID = 4242


@dataclass(frozen=True)
class FlagsCase:
    reason: str
    options: dict[str, Any]  # PodOptions, as the operator sends them (JSON)
    flags: PodFlags


FLAGS_CASES = [
    FlagsCase("the defaults", {}, PodFlags.POD_OUTBOUND_INCLUDE_ALL),
    FlagsCase(
        "sk_msg into the app",
        {"sk_msg_to_app": True},
        PodFlags.POD_OUTBOUND_INCLUDE_ALL | PodFlags.POD_SK_MSG_TO_APP,
    ),
    FlagsCase(
        "sk_msg into the sidecar only, spelled out",
        {"sk_msg_to_app": False},
        PodFlags.POD_OUTBOUND_INCLUDE_ALL,
    ),
    FlagsCase(
        "included CIDRs, sidecar only", {"included_outbound_cidrs": ["10.0.0.0/8"]}, PodFlags(0)
    ),
    FlagsCase(
        "included CIDRs and sk_msg into the app",
        {"included_outbound_cidrs": ["10.0.0.0/8"], "sk_msg_to_app": True},
        PodFlags.POD_SK_MSG_TO_APP,
    ),
]


@pytest.mark.parametrize("case", FLAGS_CASES, ids=[c.reason for c in FLAGS_CASES])
def test_pod_options_become_pod_flags(case: FlagsCase) -> None:
    body = {"uid": "u-1", "namespace": "shop", "name": "web-1", "ip": "198.18.0.10"}
    spec = PodSpec.model_validate_json(json.dumps({**body, "options": case.options}))
    pod = accelerated_pod(spec, CGROUP_ID)
    assert pod.sk_msg_to_app == case.options.get("sk_msg_to_app", False), case.reason
    assert PodFlags(pod.info().flags) == case.flags, case.reason
    if "included_outbound_cidrs" in case.options:
        assert pod.included_outbound_cidrs == frozenset({IPv4Network("10.0.0.0/8")})
