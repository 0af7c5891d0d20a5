"""The chart's RBAC rules are exactly the table in docs/rbac.md, and each is commented."""

from __future__ import annotations

import re

import pytest

from tests.chart.helm import CHART, HELMS, ROOT, find, template

Rule = tuple[str, str, str, frozenset[str]]  # scope, API group, resource, verbs

DOC = ROOT / "docs" / "rbac.md"


def _doc_rules() -> set[Rule]:
    rules: set[Rule] = set()
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert header[:4] == ["scope", "API group", "resources", "verbs"], header
    for row in rows[1:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        scope, group, resources, verbs = cells[:4]
        assert scope in ("cluster", "namespace"), row
        group = "" if group == "core" else group
        for resource in resources.split(","):
            rules.add(
                (scope, group, resource.strip(), frozenset(v.strip() for v in verbs.split(",")))
            )
    return rules


def _chart_rules(helm_name: str) -> set[Rule]:
    docs = template(helm_name)
    rules: set[Rule] = set()
    for scope, kind in (("cluster", "ClusterRole"), ("namespace", "Role")):
        for rule in find(docs, kind)["rules"]:
            assert set(rule) == {"apiGroups", "resources", "verbs"}, rule
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    rules.add((scope, group, resource, frozenset(rule["verbs"])))
    return rules


@pytest.mark.parametrize("helm_name", HELMS)
def test_chart_rbac_is_the_documented_rbac(helm_name: str) -> None:
    chart, doc = _chart_rules(helm_name), _doc_rules()
    assert chart - doc == set(), "granted by the chart but not in docs/rbac.md"
    assert doc - chart == set(), "in docs/rbac.md but not granted by the chart"


def test_no_wildcards_nor_dangerous_verbs() -> None:
    for _, group, resource, verbs in _chart_rules("helm3"):
        assert "*" not in (group, resource) and "*" not in verbs
        assert not verbs & {"update", "escalate", "bind", "impersonate", "deletecollection"}


@pytest.mark.parametrize("template_name", ["operator-clusterrole.yaml", "operator-role.yaml"])
def test_every_rule_says_why(template_name: str) -> None:
    lines = (CHART / "templates" / template_name).read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*- apiGroups:", line):
            assert lines[i - 1].strip().startswith("#"), f"{template_name}:{i + 1} has no reason"


def test_role_bindings_bind_the_operator() -> None:
    docs = template("helm3")
    account = find(docs, "ServiceAccount")["metadata"]["name"]
    for kind, role in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        binding = find(docs, kind)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": role,
            "name": find(docs, role)["metadata"]["name"],
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": "meshaccel-system"}
        ]
    deployment = find(docs, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account
