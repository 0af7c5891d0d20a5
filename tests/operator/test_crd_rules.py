"""The CRD's CEL rules (``x-kubernetes-validations``): what ``kubectl apply`` refuses, and why.

Every rule is evaluated with a real CEL implementation (``crd_cel.py``) on good resources (no
rule refuses them) and on bad ones, each refused by the rule that names its problem, at the
path the API server would name; every bad one still passes the structural schema, so it is
the rule that stops it. The API emulator enforces the same rules on every write: a bad create,
server-side apply or patch is a 422 with the rule's message, and nothing changes.

The specs that tests/operator/test_checks.py used to find senseless after the fact (a selector
term without values, a label both required and absent, skMsgToAppsSelector without
skMsgRedirect, a name over 63 characters) are refused here now, with the same meaning.

What the API server checks when the CRD itself is written, and nothing here runs: the type
check of each rule (here: every field a rule selects exists where it runs) and its cost
estimate (here: the lists a rule iterates have a maxItems, the strings it compares a maxLength
or an enum, and comprehensions nest at most two deep). By hand, with the cost model of
k8s.io/apiserver/pkg/cel (string equality 0.1 per byte, maxLength counted 4 bytes a character):
the costliest rule, a label required and absent, iterates 64 x 64 terms comparing 317-character
keys, about 64 * 64 * (1 + 127) = 0.5 M, against a per-rule limit of 10 M and 100 M per CRD.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import pytest

from tests.operator import crd_cel
from tests.operator.conftest import ApiError, KubeClient, api_path
from tests.operator.emulator import ApiServerEmulator
from tests.operator.k8s_validation import CrdSchema, format_path
from tests.operator.objects import acceleration
from tests.operator.test_crd import openapi

NEVER = {"matchExpressions": [{"key": "reads-with", "operator": "In", "values": []}]}
MA = ("meshaccel.io/v1alpha1", "meshaccelerations")


def _terms(*terms: tuple[str, str, list[str]]) -> dict[str, Any]:
    return {"matchExpressions": [{"key": k, "operator": o, "values": v} for k, o, v in terms]}


@dataclass(frozen=True)
class RuleCase:
    reason: str
    spec: dict[str, Any]
    # (path, a fragment of the refusing rule's message) of every refusal, in document order.
    refused: tuple[tuple[str, str], ...] = ()
    name: str = "default"
    extra: dict[str, Any] = field(default_factory=dict)  # more top-level keys of the spec


VALUES = "operators In and NotIn need at least one value"
NO_VALUES = "operators Exists and DoesNotExist take no values"
ABSENT = "a label is required (matchLabels, In or Exists) and also required to be absent"
MATCH_LABELS = "matchLabels gives a label a value that an In term on the same key does not list"
TO_APPS = "skMsgToAppsSelector needs skMsgRedirect"
EXISTS_VALUE = "a toleration with operator Exists matches every value of its key"
NAME = "the name is longer than 63 characters"

GOOD = [
    RuleCase("the defaults", {}),
    RuleCase(
        "every operator, each as it should be",
        {
            "podSelector": {
                "matchLabels": {"app.kubernetes.io/part-of": "shop"},
                "matchExpressions": [
                    {"key": "tier", "operator": "NotIn", "values": ["batch"]},
                    {"key": "legacy", "operator": "DoesNotExist"},
                    {"key": "team", "operator": "Exists", "values": []},
                    {"key": "zone", "operator": "In", "values": ["a", "b"]},
                ],
            }
        },
    ),
    RuleCase(
        "matchLabels and an In that lists its value",
        {"podSelector": {"matchLabels": {"tier": "web"}, **_terms(("tier", "In", ["web", "api"]))}},
    ),
    RuleCase(
        "matchLabels and a NotIn that excludes another value",
        {"podSelector": {"matchLabels": {"tier": "web"}, **_terms(("tier", "NotIn", ["db"]))}},
    ),
    RuleCase(
        "Exists and In on one key (the In decides)",
        {"podSelector": _terms(("tier", "Exists", []), ("tier", "In", ["web"]))},
    ),
    RuleCase(
        "NotIn and DoesNotExist on one key (an absent label satisfies both)",
        {"podSelector": _terms(("tier", "NotIn", ["web"]), ("tier", "DoesNotExist", []))},
    ),
    RuleCase(
        "two In terms without a common value: the operator's check, beyond CEL's budget",
        {"podSelector": _terms(("tier", "In", ["web"]), ("tier", "In", ["db"]))},
    ),
    RuleCase(
        "sk_msg into some apps, with sk_msg on",
        {"datapath": {"skMsgToAppsSelector": {"matchLabels": {"reads-with": "recv"}}}},
    ),
    RuleCase(
        "an explicitly unset apps selector with sk_msg off (null is absent to has())",
        {"datapath": {"skMsgRedirect": False, "skMsgToAppsSelector": None}},
    ),
    RuleCase(
        "tolerations: Exists without a value, Equal with one, Exists with an empty one",
        {
            "agent": {
                "tolerations": [
                    {"operator": "Exists"},
                    {"key": "dedicated", "operator": "Equal", "value": "mesh"},
                    {"key": "gpu", "operator": "Exists", "value": ""},
                    {"key": "spot", "value": "true"},
                ]
            }
        },
    ),
    RuleCase("a name of 63 characters", {}, name="n" * 63),
]

BAD = [
    RuleCase(
        "an apps selector that can never match (In without values)",
        {"datapath": {"skMsgToAppsSelector": NEVER}},
        (("spec.datapath.skMsgToAppsSelector.matchExpressions[0]", VALUES),),
    ),
    RuleCase(
        "NotIn without values",
        {"namespaceSelector": _terms(("team", "NotIn", []))},
        (("spec.namespaceSelector.matchExpressions[0]", VALUES),),
    ),
    RuleCase(
        "Exists with values",
        {"podSelector": _terms(("tier", "Exists", ["web"]))},
        (("spec.podSelector.matchExpressions[0]", NO_VALUES),),
    ),
    RuleCase(
        "DoesNotExist with values, as the second term",
        {"podSelector": _terms(("app", "In", ["web"]), ("tier", "DoesNotExist", ["web"]))},
        (("spec.podSelector.matchExpressions[1]", NO_VALUES),),
    ),
    RuleCase(
        "matchLabels and DoesNotExist on one key",
        {
            "podSelector": {
                "matchLabels": {"tier": "web"},
                **_terms(("tier", "DoesNotExist", [])),
            }
        },
        (("spec.podSelector", ABSENT),),
    ),
    RuleCase(
        "In and DoesNotExist on one key",
        {"namespaceSelector": _terms(("team", "In", ["a"]), ("team", "DoesNotExist", []))},
        (("spec.namespaceSelector", ABSENT),),
    ),
    RuleCase(
        "Exists and DoesNotExist on one key, in the apps selector",
        {
            "datapath": {
                "skMsgToAppsSelector": _terms(("x", "DoesNotExist", []), ("x", "Exists", []))
            }
        },
        (("spec.datapath.skMsgToAppsSelector", ABSENT),),
    ),
    RuleCase(
        "matchLabels gives a value an In does not list",
        {"podSelector": {"matchLabels": {"tier": "web"}, **_terms(("tier", "In", ["db"]))}},
        (("spec.podSelector", MATCH_LABELS),),
    ),
    RuleCase(
        "matchLabels gives a value a NotIn excludes",
        {
            "namespaceSelector": {
                "matchLabels": {"team": "a"},
                **_terms(("team", "NotIn", ["b", "a"])),
            }
        },
        (("spec.namespaceSelector", MATCH_LABELS),),
    ),
    RuleCase(
        "an apps selector without sk_msg redirection",
        {
            "datapath": {
                "skMsgRedirect": False,
                "skMsgToAppsSelector": {"matchLabels": {"app": "web"}},
            }
        },
        (("spec.datapath", TO_APPS),),
    ),
    RuleCase(
        "an empty apps selector is set too",
        {"datapath": {"skMsgRedirect": False, "skMsgToAppsSelector": {}}},
        (("spec.datapath", TO_APPS),),
    ),
    RuleCase(
        "both at once, each said",
        {"datapath": {"skMsgRedirect": False, "skMsgToAppsSelector": NEVER}},
        (
            ("spec.datapath", TO_APPS),
            ("spec.datapath.skMsgToAppsSelector.matchExpressions[0]", VALUES),
        ),
    ),
    RuleCase(
        "a toleration with Exists and a value",
        {
            "agent": {
                "tolerations": [
                    {"operator": "Equal"},
                    {"key": "k", "operator": "Exists", "value": "v"},
                ]
            }
        },
        (("spec.agent.tolerations[1]", EXISTS_VALUE),),
    ),
    RuleCase(
        "a name the agents cannot pin under",
        {},
        (("<root>", NAME),),
        name="n" * 64,
    ),
]


def _defaulted(case: RuleCase) -> dict[str, Any]:
    obj = acceleration(case.name, {"namespaceSelector": {}, **copy.deepcopy(case.spec)})
    schema = CrdSchema(openapi())
    schema.default(obj)
    return obj


def _refusals(obj: dict[str, Any]) -> list[crd_cel.Violation]:
    return crd_cel.violations(obj, openapi())


@pytest.mark.parametrize("case", GOOD, ids=[c.reason for c in GOOD])
def test_good_resources_pass_every_rule(case: RuleCase) -> None:
    obj = _defaulted(case)
    assert _refusals(obj) == [], case.reason
    assert CrdSchema(openapi()).validate(obj) is None, case.reason


@pytest.mark.parametrize("case", BAD, ids=[c.reason for c in BAD])
def test_bad_resources_are_refused_by_the_rule_that_names_the_problem(case: RuleCase) -> None:
    obj = _defaulted(case)
    schema = CrdSchema(openapi())
    # The structural schema takes it: the rules are what refuse it.
    assert jsonschema.Draft202012Validator(schema.jsonschema).is_valid(obj), case.reason
    refusals = [(format_path(v.path), v.message) for v in _refusals(obj)]
    assert len(refusals) == len(case.refused), (case.reason, refusals)
    for (path, message), (want_path, fragment) in zip(refusals, case.refused, strict=True):
        assert (path, fragment in message) == (want_path, True), (case.reason, path, message)
    error = schema.validate(obj)
    assert error is not None and error.path == case.refused[0][0], (case.reason, error)


def _crd_rules() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(path, schema node, rule) of every rule in the committed CRD."""
    found: list[tuple[str, dict[str, Any], dict[str, Any]]] = []

    def walk(node: dict[str, Any], path: str) -> None:
        for rule in node.get(crd_cel.RULES, ()):
            found.append((path, node, rule))
        for name, sub in (node.get("properties") or {}).items():
            walk(sub, f"{path}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{path}[{key}]")

    walk(openapi(), "")
    return found


def test_every_rule_refuses_something() -> None:
    """No rule is dead weight: each is the one that refuses at least one bad case."""
    refusing = {v.rule for case in BAD for v in _refusals(_defaulted(case))}
    unused = {rule["rule"] for _, _, rule in _crd_rules()} - refusing
    assert unused == set()


def test_the_rules_come_from_the_models() -> None:
    """Each selector (namespace, pod, apps) carries the selector's rules, each term the
    term's, each toleration the toleration's, and the root the resource's."""
    paths = sorted({path for path, _, _ in _crd_rules()})
    assert paths == [
        "",
        ".spec.agent.tolerations[items]",
        ".spec.datapath",
        ".spec.datapath.skMsgToAppsSelector",
        ".spec.datapath.skMsgToAppsSelector.matchExpressions[items]",
        ".spec.namespaceSelector",
        ".spec.namespaceSelector.matchExpressions[items]",
        ".spec.podSelector",
        ".spec.podSelector.matchExpressions[items]",
    ]
    for _, _, rule in _crd_rules():
        assert set(rule) == {"rule", "message"} and rule["message"].strip(), rule


_STRING = re.compile(r"'[^']*'")
_SELECTED = re.compile(r"\.\s*([A-Za-z_]\w*)\b(?!\s*\()")


def _properties_below(node: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for name, sub in (node.get("properties") or {}).items():
        names.add(name)
        names |= _properties_below(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            names |= _properties_below(node[key])
    return names


def test_rules_select_fields_that_exist() -> None:
    """A stand-in for the API server's type check: a misspelt field would fail every write
    there, or pass by accident here."""
    for path, node, rule in _crd_rules():
        known = _properties_below(node) | ({"name", "generateName"} if path == "" else set())
        selected = set(_SELECTED.findall(_STRING.sub("''", rule["rule"])))
        assert selected <= known, (path, selected - known)


def _unbounded(node: dict[str, Any], path: str) -> list[str]:
    found: list[str] = []
    if node.get("type") == "array" and "maxItems" not in node:
        found.append(f"{path}: a list without maxItems")
    if node.get("type") == "string" and "maxLength" not in node and "enum" not in node:
        found.append(f"{path}: a string without maxLength or enum")
    for name, sub in (node.get("properties") or {}).items():
        found += _unbounded(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            found += _unbounded(node[key], f"{path}[{key}]")
    return found


def _nesting(rule: str) -> int:
    """How deep comprehensions (all, exists) nest in ``rule``."""
    depth = deepest = 0
    opened: list[bool] = []
    for token in re.findall(r"\.(?:all|exists)\(|\(|\)", _STRING.sub("''", rule)):
        if token == ")":
            depth -= opened.pop()
        else:
            comprehension = token != "("
            opened.append(comprehension)
            depth += comprehension
            deepest = max(deepest, depth)
    return deepest


def test_rules_stay_within_the_api_servers_cost_budget() -> None:
    """Bounded inputs and shallow loops: what the API server's estimate needs to accept them."""
    for path, node, rule in _crd_rules():
        if path == "":
            continue  # the root's rule reads metadata.name only
        assert _unbounded(node, path) == [], rule["rule"]
        assert _nesting(rule["rule"]) <= 2, rule["rule"]


# -- the emulator refuses what the rules refuse -------------------------------------------------


async def test_the_api_emulator_refuses_a_bad_apply_with_the_rules_message(
    emulator: ApiServerEmulator, kube: KubeClient
) -> None:
    bad = acceleration(
        "senseless",
        {
            "namespaceSelector": {},
            "podSelector": {"matchLabels": {"tier": "web"}, **_terms(("tier", "DoesNotExist", []))},
        },
    )
    with pytest.raises(ApiError) as refused:
        await kube.create(api_path(*MA), bad)
    assert refused.value.status == 422
    message = refused.value.body["message"]
    assert message.startswith(
        'MeshAcceleration.meshaccel.io "senseless" is invalid: spec.podSelector'
    )
    assert ABSENT in message

    # kubectl apply --server-side: the same refusal, nothing created.
    status, body = await kube.request(
        "PATCH",
        api_path(*MA, name="senseless"),
        bad,
        content_type="application/apply-patch+yaml",
        params={"fieldManager": "kubectl"},
    )
    assert status == 422 and ABSENT in body["message"]
    assert emulator.find("meshaccel.io/v1alpha1/meshaccelerations", None, "senseless") is None

    # A good resource is taken; a patch that makes it senseless is refused and changes nothing.
    good = await kube.create(api_path(*MA), acceleration("mesh", {"namespaceSelector": {}}))
    path = api_path(*MA, name="mesh")
    with pytest.raises(ApiError) as patched:
        await kube.merge(
            path,
            {"spec": {"datapath": {"skMsgRedirect": False, "skMsgToAppsSelector": {}}}},
        )
    assert patched.value.status == 422 and TO_APPS in patched.value.body["message"]
    stored = await kube.get(path)
    assert stored["metadata"]["resourceVersion"] == good["metadata"]["resourceVersion"]
    assert [r.field for r in emulator.rejections] == [
        "spec.podSelector",
        "spec.podSelector",
        "spec.datapath",
    ]
