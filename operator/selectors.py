"""Kubernetes LabelSelector semantics, and whether a selector can ever match.

The rules are the API server's (k8s.io/apimachinery ``LabelSelectorAsSelector``): every
``matchLabels`` pair and every ``matchExpressions`` term must hold; an empty selector matches
everything. ``In`` needs the key with one of the values; ``NotIn`` holds when the key is
absent or its value is not listed; ``Exists``/``DoesNotExist`` look at the key only.
"""

from __future__ import annotations

from collections.abc import Mapping

from meshaccel.operator.models import LabelSelector, LabelSelectorRequirement, SelectorOperator

Labels = Mapping[str, str]


def requirement_holds(term: LabelSelectorRequirement, labels: Labels) -> bool:
    match term.operator:
        case SelectorOperator.IN:
            return term.key in labels and labels[term.key] in term.values
        case SelectorOperator.NOT_IN:
            return term.key not in labels or labels[term.key] not in term.values
        case SelectorOperator.EXISTS:
            return term.key in labels
        case SelectorOperator.DOES_NOT_EXIST:
            return term.key not in labels


def matches(selector: LabelSelector, labels: Labels) -> bool:
    return all(labels.get(k) == v for k, v in selector.matchLabels.items()) and all(
        requirement_holds(term, labels) for term in selector.matchExpressions
    )


def selector_problems(selector: LabelSelector, where: str) -> list[str]:
    """What makes ``selector`` invalid or unable to match any object, each a sentence to fix.

    The API server's own checks (values present for In/NotIn, absent for Exists/DoesNotExist)
    come first; then contradictions between terms on one key.
    """
    problems: list[str] = []
    for index, term in enumerate(selector.matchExpressions):
        at = f"{where}.matchExpressions[{index}] ({term.key} {term.operator})"
        if term.operator in (SelectorOperator.IN, SelectorOperator.NOT_IN) and not term.values:
            problems.append(f"{at} needs at least one value")
        if term.operator in (SelectorOperator.EXISTS, SelectorOperator.DOES_NOT_EXIST) and (
            term.values
        ):
            problems.append(f"{at} must not list values")
    if problems:
        return problems

    keys = {term.key for term in selector.matchExpressions} | set(selector.matchLabels)
    for key in sorted(keys):
        problem = _contradiction(selector, key)
        if problem:
            problems.append(f"{where} can never match: {problem}; remove or change one of them")
    return problems


def _contradiction(selector: LabelSelector, key: str) -> str | None:
    """Why no value of ``key`` (present or absent) satisfies every term on it, if none does."""
    terms = [t for t in selector.matchExpressions if t.key == key]
    must_exist = key in selector.matchLabels or any(
        t.operator in (SelectorOperator.IN, SelectorOperator.EXISTS) for t in terms
    )
    must_not_exist = any(t.operator == SelectorOperator.DOES_NOT_EXIST for t in terms)
    if must_exist and must_not_exist:
        return f"label {key!r} is required and also required to be absent"
    if not must_exist:
        return None
    allowed: set[str] | None = None  # None: any value so far
    if key in selector.matchLabels:
        allowed = {selector.matchLabels[key]}
    for term in terms:
        if term.operator == SelectorOperator.IN:
            allowed = set(term.values) if allowed is None else allowed & set(term.values)
    if allowed is None:
        return None  # Exists/NotIn alone: some value always fits
    for term in terms:
        if term.operator == SelectorOperator.NOT_IN:
            allowed -= set(term.values)
    if not allowed:
        return f"no value of label {key!r} satisfies every term on it"
    return None


def overlap_possible(a: Mapping[str, str], b: Mapping[str, str]) -> bool:
    """Whether one node could carry both nodeSelectors (equality maps; empty = every node)."""
    return all(b.get(key, value) == value for key, value in a.items())
