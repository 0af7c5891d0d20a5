"""Checks a MeshAcceleration passes the schema with, yet makes no sense.

Each problem is one sentence that says what is wrong and what to change; a resource with any
problem gets ``Degraded=True`` (reason ``InvalidSpec``) and programs nothing until it is fixed.
"""

from __future__ import annotations

import ipaddress
import re

from meshaccel.operator.models import MeshAccelerationSpec
from meshaccel.operator.selectors import selector_problems

# The agent names its pinned datapath after the resource (agent setting `instance`).
_INSTANCE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
# repository[:tag][@digest]; the tag is what follows the last ":" after the last "/".
_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def image_problem(image: str) -> str | None:
    if any(ch.isspace() for ch in image):
        return f"spec.agent.image {image!r} contains whitespace"
    if _DIGEST.search(image):
        return None
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return (
            f"spec.agent.image {image!r} has no tag: name a version (for example "
            f"{image}:0.1.0) or a digest, so every node runs the same agent"
        )
    if last.endswith(":latest"):
        return f"spec.agent.image {image!r} uses the moving tag 'latest': pin a version"
    return None


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
    image = image_problem(spec.agent.image)
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
