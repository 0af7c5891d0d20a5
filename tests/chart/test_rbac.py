"""The chart's RBAC rules are exactly the tables in docs/rbac.md, and each is commented.

Two subjects: the operator's ServiceAccount ("The rules") and the uninstall hook's ("The
uninstall hook", the pre-delete Job's own ServiceAccount).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.chart.helm import CHART, HELMS, ROOT, find, template

# scope, API group, resource, verbs, resource names (empty: every object of the resource)
Rule = tuple[str, str, str, frozenset[str], frozenset[str]]

DOC = ROOT / "docs" / "rbac.md"
OPERATOR, HOOK = "meshaccel", "meshaccel-uninstall"  # the roles' names (release "meshaccel")
SECTIONS = {OPERATOR: "The rules", HOOK: "The uninstall hook"}
# How the hook's table names the only Deployment it may read.
NAMED = {"the operator's Deployment": OPERATOR}


def _doc_rules(role: str) -> set[Rule]:
    section = DOC.read_text().split(f"\n## {SECTIONS[role]}\n", 1)[1].split("\n## ", 1)[0]
    rules: set[Rule] = set()
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert header[:4] == ["scope", "API group", "resources", "verbs"], header
    for row in rows[1:]:
        cells = dict(zip(header, (cell.strip() for cell in row.strip("|").split("|")), strict=True))
        scope, group = cells["scope"], cells["API group"]
        assert scope in ("cluster", "namespace"), row
        group = "" if group == "core" else group
        verbs = frozenset(v.strip() for v in cells["verbs"].split(","))
        names = frozenset({NAMED[cells["names"]]} if cells.get("names") else ())
        for resource in cells["resources"].split(","):
            rules.add((scope, group, resource.strip(), verbs, names))
    return rules


def _chart_rules(helm_name: str, role: str, values: dict[str, Any] | None = None) -> set[Rule]:
    docs = template(helm_name, values)
    rules: set[Rule] = set()
    for scope, kind in (("cluster", "ClusterRole"), ("namespace", "Role")):
        for rule in find(docs, kind, role)["rules"]:
            assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}, rule
            names = frozenset(rule.get("resourceNames", ()))
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    rules.add((scope, group, resource, frozenset(rule["verbs"]), names))
    return rules


@pytest.mark.parametrize("role", [OPERATOR, HOOK])
@pytest.mark.parametrize("helm_name", HELMS)
def test_chart_rbac_is_the_documented_rbac(helm_name: str, role: str) -> None:
    chart, doc = _chart_rules(helm_name, role), _doc_rules(role)
    assert chart - doc == set(), "granted by the chart but not in docs/rbac.md"
    assert doc - chart == set(), "in docs/rbac.md but not granted by the chart"


@pytest.mark.parametrize("role", [OPERATOR, HOOK])
def test_no_wildcards_nor_dangerous_verbs(role: str) -> None:
    for _, group, resource, verbs, _ in _chart_rules("helm3", role):
        assert "*" not in (group, resource) and "*" not in verbs
        assert not verbs & {"update", "escalate", "bind", "impersonate", "deletecollection"}


def test_the_hook_reads_no_secret_and_creates_nothing() -> None:
    """The hook deletes MeshAccelerations and reads a little; it holds no key, makes no pod."""
    for _, _, resource, verbs, _ in _chart_rules("helm3", HOOK):
        assert resource != "secrets" and "create" not in verbs, resource
        if verbs & {"delete", "patch"}:
            assert resource == "meshaccelerations", resource


def test_no_hook_rbac_when_rbac_is_not_created() -> None:
    docs = template("helm3", {"rbac": {"create": False}})
    kinds = {d["kind"] for d in docs if d["metadata"]["name"] == HOOK}
    assert kinds == {"ServiceAccount", "Job"}, "the Job and its identity, no rules"


@pytest.mark.parametrize(
    "template_name",
    [
        "operator-clusterrole.yaml",
        "operator-role.yaml",
        "uninstall-hook-clusterrole.yaml",
        "uninstall-hook-role.yaml",
    ],
)
def test_every_rule_says_why(template_name: str) -> None:
    lines = (CHART / "templates" / template_name).read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*- apiGroups:", line):
            assert lines[i - 1].strip().startswith("#"), f"{template_name}:{i + 1} has no reason"


@pytest.mark.parametrize(("name", "workload"), [(OPERATOR, "Deployment"), (HOOK, "Job")])
def test_role_bindings_bind_their_own_service_account(name: str, workload: str) -> None:
    """The operator's roles bind the operator's ServiceAccount, the hook's the hook's."""
    docs = template("helm3")
    account = find(docs, "ServiceAccount", name)["metadata"]["name"]
    for kind, role in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        binding = find(docs, kind, name)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": role,
            "name": find(docs, role, name)["metadata"]["name"],
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": "meshaccel-system"}
        ]
    pod = find(docs, workload, name)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account
