"""Checks a MeshAcceleration passes the schema with, yet makes no sense.

Each problem is one sentence that says what is wrong and what to change; a resource with any
problem gets ``Degraded=True`` (reason ``InvalidSpec``) and programs nothing until it is fixed.
"""

from __future__ import annotations

import ipaddress
import json
import re

from meshaccel.operator.models import LEGACY_DEFAULT_AGENT_IMAGE, MeshAccelerationSpec
from meshaccel.operator.selectors import selector_problems

# The agent names its pinned datapath after the resource (agent setting `instance`).
_INSTANCE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_REMOVE_IMAGE = json.dumps([{"op": "remove", "path": "/spec/agent/image"}])


def retired_image_problem(name: str, image: str | None) -> str | None:
    """``spec.agent.image`` is retired: the agents' image is the operator's setting.

    A value is refused, not ignored, so that nobody finds their agents running another image
    than the one they wrote; the value the 0.1 CRD defaulted it to is ignored (the API server
    wrote it, nobody chose it).
    """
    if image is None or image == LEGACY_DEFAULT_AGENT_IMAGE:
        return None
    return (
        f"spec.agent.image is set ({image!r}) but no longer read: the agents run the image the "
        "operator is configured with (Helm value agent.image), never one a MeshAcceleration "
        f"names. If {image!r} is the image you want, set it there; then remove the field: "
        f"kubectl patch meshacceleration {name} --type=json -p '{_REMOVE_IMAGE}'"
    )


def spec_problems(name: str, spec: MeshAccelerationSpec) -> list[str]:
    problems: list[str] = []
    if not _INSTANCE.match(name):
        problems.append(
            f"the name {name!r} is not usable as the agents' datapath name: use at most 63 "
            "lowercase letters, digits, '-', '_' or '.'"
        )
    problems += selector_problems(spec.namespaceSelector, "spec.namespaceSelector")
    problems += selector_problems(spec.podSelector, "spec.podSelector")
    to_apps = spec.datapath.skMsgToAppsSelector
    if to_apps is not None:
        problems += selector_problems(to_apps, "spec.datapath.skMsgToAppsSelector")
        if not spec.datapath.skMsgRedirect:
            problems.append(
                "spec.datapath.skMsgToAppsSelector is set but spec.datapath.skMsgRedirect is "
                "false: without sk_msg redirection nothing is delivered into application "
                "sockets; remove the selector or set skMsgRedirect to true"
            )
    image = retired_image_problem(name, spec.agent.image)
    if image:
        problems.append(image)
    for cidr in spec.exclusions.outboundCIDRs:
        try:
            ipaddress.IPv4Network(cidr, strict=True)
        except ValueError as err:
            problems.append(f"spec.exclusions.outboundCIDRs: {cidr!r} is not a network ({err})")
    for toleration in spec.agent.tolerations:
        if toleration.operator == "Exists" and toleration.value:
            problems.append(
                f"spec.agent.tolerations: key {toleration.key!r} with operator Exists must "
                "not have a value"
            )
    return problems
