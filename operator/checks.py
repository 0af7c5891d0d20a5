"""Checks of a MeshAcceleration that admission cannot make: what the operator reports itself.

The CRD's schema and its CEL rules (:func:`~.models.cel_rules`) refuse most senseless specs at
``kubectl apply``, with their message. What is left to the operator, each problem one sentence
that says what is wrong and what to change:

* ``spec.agent.image``, retired: set in resources the API server stored before it was retired,
  which admission never sees again (docs/operations.md, "Upgrading from 0.1");
* a CIDR with host bits set, or that is no network (CEL on Kubernetes 1.30 has no CIDR
  functions; the schema's pattern checks the spelling only);
* In and NotIn terms on one label whose value lists leave no value: comparing lists of up to
  256 values, pair by pair over 64 terms, is beyond the API server's CEL cost budget.

A resource with any problem gets ``Degraded=True`` (reason ``InvalidSpec``) and programs
nothing until it is fixed.
"""

from __future__ import annotations

import ipaddress
import json

from meshaccel.operator.models import (
    LEGACY_DEFAULT_AGENT_IMAGE,
    LabelSelector,
    MeshAccelerationSpec,
    SelectorOperator,
)

#: Where a dual-stack socket shows an IPv4 peer: no IPv6 packet carries such an address.
IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
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


def value_set_problems(selector: LabelSelector, where: str) -> list[str]:
    """Labels on which ``selector``'s In and NotIn terms leave no value (it can never match).

    Only the In/NotIn lists among themselves: ``matchLabels`` against them, a label both
    required and absent, and an In or NotIn without values are the CRD's CEL rules.
    """
    allowed: dict[str, set[str]] = {}
    excluded: dict[str, set[str]] = {}
    for term in selector.matchExpressions:
        if term.operator == SelectorOperator.IN:
            values = set(term.values)
            allowed[term.key] = allowed[term.key] & values if term.key in allowed else values
        elif term.operator == SelectorOperator.NOT_IN:
            excluded.setdefault(term.key, set()).update(term.values)
    return [
        f"{where} can never match: no value of label {key!r} satisfies every In and NotIn term "
        "on it; remove or change one of them"
        for key in sorted(allowed)
        if not allowed[key] - excluded.get(key, set())
    ]


def spec_problems(name: str, spec: MeshAccelerationSpec) -> list[str]:
    problems: list[str] = []
    problems += value_set_problems(spec.namespaceSelector, "spec.namespaceSelector")
    problems += value_set_problems(spec.podSelector, "spec.podSelector")
    to_apps = spec.datapath.skMsgToAppsSelector
    if to_apps is not None:
        problems += value_set_problems(to_apps, "spec.datapath.skMsgToAppsSelector")
    image = retired_image_problem(name, spec.agent.image)
    if image:
        problems.append(image)
    for cidr in spec.exclusions.outboundCIDRs:
        try:
            network = ipaddress.ip_network(cidr, strict=True)
        except ValueError as err:
            problems.append(f"spec.exclusions.outboundCIDRs: {cidr!r} is not a network ({err})")
            continue
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(IPV4_MAPPED):
            problems.append(
                f"spec.exclusions.outboundCIDRs: {cidr!r} is IPv4-mapped, which no IPv6 packet "
                "carries: write the IPv4 network it maps"
            )
    return problems
