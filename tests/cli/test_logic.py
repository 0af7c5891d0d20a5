"""The CLI's decisions without an API: reading a status, kstatus states, claims between
resources, which nodes a DaemonSet covers, exec exit statuses, image tags, colour."""

from __future__ import annotations

import io
import pathlib
from typing import Any

import pytest
import yaml
from kubernetes.config import kube_config

from meshaccel.cli.agents import label_selector
from meshaccel.cli.check import check_agent, should_run_agent
from meshaccel.cli.kube import AccessError, ExecResult, exit_status, login
from meshaccel.cli.output import ANSI_CODES, Style, table, visible_width, wants_colour
from meshaccel.cli.pods import PodsReport, make_resource, notes, pod_rows, render_pods
from meshaccel.cli.status import Condition, kstatus_state, read_status, version_skew
from meshaccel.cli.versions import image_tag, tag_version

# -- status ------------------------------------------------------------------------------------


def cond(kind: str, status: str) -> Condition:
    return Condition(type=kind, status=status, reason="R")


@pytest.mark.parametrize(
    ("conditions", "generation", "observed", "state", "reason"),
    [
        ([cond("Ready", "True")], 2, 2, "Ready", "Ready alone"),
        ([cond("Ready", "True")], 3, 2, "Reconciling", "the newest spec is not observed yet"),
        ([cond("Ready", "False"), cond("Reconciling", "True")], 1, 1, "Reconciling", "work"),
        ([cond("Ready", "False"), cond("Stalled", "True")], 1, 1, "Stalled", "stuck"),
        (
            [cond("Reconciling", "True"), cond("Stalled", "True")],
            1,
            1,
            "Stalled",
            "Stalled wins over Reconciling",
        ),
        ([cond("Ready", "False")], 1, 1, "NotReady", "Ready False without a cause"),
        ([], 1, None, "Unknown", "no status yet"),
        ([cond("Degraded", "True")], 1, 1, "Unknown", "an operator without Ready"),
    ],
)
def test_kstatus_state(conditions, generation, observed, state, reason):
    assert kstatus_state(conditions, generation, observed) == state, reason


def test_a_status_is_read_leniently():
    """Another operator version's status: unknown fields, entries of the wrong shape, the
    0.1 nodesBehind list; what can be read is, the rest is skipped."""
    acceleration = {
        "metadata": {"name": "x", "generation": 2},
        "spec": {"mode": "istio"},
        "status": {
            "observedGeneration": 2,
            "someFutureField": {"a": 1},
            "conditions": [
                {"type": "Stalled", "status": "False", "reason": "AsExpected"},
                "not a condition",
                {"type": "Ready", "status": "True", "reason": "Accelerating", "new": 1},
            ],
            "nodes": [
                {"node": "a", "agentVersion": "0.3.0", "inSync": True, "podsUnresolved": 0},
                {"agentVersion": "no node name"},
            ],
            "nodesBehind": [{"node": "b", "desiredGeneration": 4, "appliedGeneration": 3}],
            "podsNotAccelerated": {"NoSidecar": 2, "Weird": "x"},
            "problems": [{"namespace": "n", "name": "p", "reason": "Unresolved"}],
            "problemCount": 5,
            "nodesWithProblems": 1,
            "operatorVersion": "0.3.0",
        },
    }
    status = read_status(acceleration, client_version="0.2.0")
    assert status.state == "Ready"
    assert [c.type for c in status.conditions] == ["Ready", "Stalled"]  # Ready first
    assert [n.node for n in status.nodes] == ["a"]
    assert [(n.node, n.behind) for n in status.problem_nodes] == [("b", True)]
    assert status.problem_nodes_not_shown == 0
    assert status.pods_not_accelerated == {"NoSidecar": 2}
    assert status.problems_not_shown == 4
    assert status.agent_versions == {"0.3.0": 1}
    assert status.skew == ["versions differ: client 0.2.0; operator 0.3.0; agents 0.3.0"]


@pytest.mark.parametrize(
    ("node", "problem", "reason"),
    [
        ({"node": "a", "inSync": True}, None, "in sync, nothing wrong"),
        ({"node": "a", "inSync": False}, "behind", "behind"),
        ({"node": "a", "desiredGeneration": 2, "appliedGeneration": 1}, "behind", "0.1 shape"),
        ({"node": "a", "inSync": True, "podsUnresolved": 2}, "2 unresolved", "unresolved pods"),
        ({"node": "a", "inSync": True, "lastError": "probe failed"}, "probe failed", "an error"),
        ({"node": "a", "inSync": True, "agentVersion": "2"}, "version 2, operator 1", "skew"),
        ({"node": "a", "inSync": True, "agentVersion": "1"}, None, "the same version"),
        (
            {"node": "a", "inSync": False, "lastError": "refused", "podsUnresolved": 1},
            "behind; 1 unresolved; refused",
            "all at once",
        ),
    ],
)
def test_problem_nodes(node, problem, reason):
    status = read_status(
        {"metadata": {"name": "x"}, "status": {"nodes": [node], "operatorVersion": "1"}}, "1"
    )
    assert [n.problem for n in status.problem_nodes] == ([problem] if problem else []), reason


def test_version_skew():
    assert version_skew({"client": ["1.0"], "operator": ["1.0"], "agents": ["1.0", "1.0"]}) == []
    assert version_skew({"client": ["unknown"], "operator": ["1.0"], "agents": []}) == []
    [warning] = version_skew({"client": ["1.0"], "operator": ["1.0"], "agents": ["1.1", "1.0"]})
    assert warning == "versions differ: client 1.0; operator 1.0; agents 1.0, 1.1"


# -- pods -------------------------------------------------------------------------------------


def pod(namespace: str, name: str, node: str, *, sidecar: bool = True, **labels: str) -> Any:
    containers = [{"name": "app"}] + ([{"name": "istio-proxy"}] if sidecar else [])
    return {
        "metadata": {"namespace": namespace, "name": name, "uid": f"uid-{name}", "labels": labels},
        "spec": {"nodeName": node, "containers": containers},
        "status": {"phase": "Running", "podIP": "198.18.3.1"},
    }


def agent(resource: str, node: str) -> Any:
    return {
        "metadata": {
            "namespace": "meshaccel-system",
            "name": f"meshaccel-agent-{resource}-{node}",
            "uid": f"agent-{resource}-{node}",
            "labels": {
                "app.kubernetes.io/component": "agent",
                "meshaccel.io/acceleration": resource,
            },
            "ownerReferences": [{"kind": "DaemonSet", "name": "x", "uid": "ds"}],
        },
        "spec": {"nodeName": node, "containers": [{"name": "agent"}]},
        "status": {"phase": "Running", "podIP": "198.18.0.9"},
    }


def resource(name: str, created: str, agents_on: list[str], **spec: Any) -> Any:
    acceleration = {
        "metadata": {"name": name, "creationTimestamp": created},
        "spec": {"namespaceSelector": {}, **spec},
        "status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "Accelerating"}],
            "daemonSet": f"meshaccel-system/meshaccel-agent-{name}",
        },
    }
    status = read_status(acceleration, "1")
    return make_resource(acceleration, status, [agent(name, n) for n in agents_on])


def test_claims_between_resources_follow_the_operators_rule():
    """The older resource keeps a pod both select, and a node both run agents on."""
    old = resource("old", "2025-01-01T00:00:00Z", ["n1"], podSelector={"matchLabels": {"a": "1"}})
    young = resource("young", "2025-02-01T00:00:00Z", ["n1", "n2"])
    pods = [
        pod("ns", "both", "n2", a="1"),  # both select it: old keeps it (on young's node)
        pod("ns", "young-only-n1", "n1"),  # only young selects it, on old's node
        pod("ns", "young-only-n2", "n2"),
        pod("ns", "no-sidecar", "n2", sidecar=False),  # before any claim
        agent("young", "n2"),  # an agent: never listed
    ]
    rows = pod_rows([young, old], {"ns": {}}, pods, ["meshaccel-system"])
    got = [(r.name, r.resource, r.state) for r in rows]
    assert got == [
        ("both", "old", "NoAgentOnNode"),  # old has no agent on n2
        ("both", "young", "PodClaimedByOlderResource"),
        ("no-sidecar", "young", "NoSidecar"),
        ("young-only-n1", "young", "NodeClaimedByOlderResource"),
        ("young-only-n2", "young", "Accelerated"),
    ]


def test_a_pods_row_shows_every_address_of_the_pod():
    """A dual-stack pod's row shows both addresses, podIP first, in the table and the JSON."""
    fresh = resource("r", "2025-01-01T00:00:00Z", ["n1"])
    dual, single = pod("ns", "dual", "n1"), pod("ns", "single", "n1")
    dual["status"]["podIPs"] = [{"ip": "198.18.3.1"}, {"ip": "fd00:198:18::3:1"}]
    rows = pod_rows([fresh], {"ns": {}}, [dual, single], ["meshaccel-system"])
    assert [(r.name, r.addresses) for r in rows] == [
        ("dual", ["198.18.3.1", "fd00:198:18::3:1"]),
        ("single", ["198.18.3.1"]),
    ]
    lines = render_pods(PodsReport(scope="namespace ns", pods=rows), Style(colour=False))
    assert "ADDRESSES" in lines[0]
    assert "198.18.3.1,fd00:198:18::3:1" in lines[1] and "Accelerated" in lines[1]


def test_a_spec_this_client_cannot_read_is_said_not_guessed():
    odd = resource("odd", "2025-01-01T00:00:00Z", ["n1"], futureField=True)
    assert odd.spec is None
    assert pod_rows([odd], {"ns": {}}, [pod("ns", "p", "n1")], []) == []
    [note] = notes([odd])
    assert "its spec does not validate here" in note and "futureField" in note


def test_a_resource_the_operator_has_not_reported_on_leaves_its_pods_pending():
    acceleration = {"metadata": {"name": "new"}, "spec": {"namespaceSelector": {}}}
    fresh = make_resource(acceleration, read_status(acceleration, "1"), [agent("new", "n1")])
    [row] = pod_rows([fresh], {"ns": {}}, [pod("ns", "p", "n1")], ["meshaccel-system"])
    assert (row.state, row.detail) == (
        "Pending",
        "the operator has not reported on this MeshAcceleration yet",
    )


# -- check ------------------------------------------------------------------------------------


def daemonset(**pod_spec: Any) -> Any:
    return {"spec": {"template": {"spec": pod_spec}}}


def node(labels: dict[str, str] | None = None, taints: list[Any] | None = None) -> Any:
    return {"metadata": {"name": "n", "labels": labels or {}}, "spec": {"taints": taints or []}}


GPU = {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}


@pytest.mark.parametrize(
    ("ds", "target", "runs", "reason"),
    [
        (daemonset(), node(), True, "no selector, no taint"),
        (daemonset(nodeSelector={"os": "linux"}), node({"os": "linux"}), True, "selector matches"),
        (daemonset(nodeSelector={"os": "linux"}), node({"os": "windows"}), False, "it does not"),
        (daemonset(), node(taints=[GPU]), False, "a taint not tolerated"),
        (daemonset(tolerations=[{"operator": "Exists"}]), node(taints=[GPU]), True, "all"),
        (
            daemonset(tolerations=[{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]),
            node(taints=[GPU]),
            True,
            "that taint",
        ),
        (
            daemonset(tolerations=[{"key": "dedicated", "value": "cpu"}]),
            node(taints=[GPU]),
            False,
            "another value",
        ),
        (
            daemonset(),
            node(taints=[{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]),
            True,
            "DaemonSets tolerate cordoned nodes",
        ),
        (
            daemonset(),
            node(taints=[{"key": "x", "effect": "PreferNoSchedule"}]),
            True,
            "a preference only",
        ),
    ],
)
def test_which_nodes_a_daemonset_covers(ds, target, runs, reason):
    assert should_run_agent(ds, target) == runs, reason


RUNNING = {
    "metadata": {"name": "a"},
    "spec": {"containers": [{"name": "agent"}]},
    "status": {"phase": "Running"},
}


@pytest.mark.parametrize(
    ("result", "ok", "error", "reason"),
    [
        (ExecResult('{"ok": true, "checks": []}', "", 0), True, "", "a passing report"),
        (ExecResult('{"ok": false, "checks": []}', "", 1), False, "", "a failing report"),
        (
            ExecResult('{"ok": true, "checks": []}', "", 1),
            False,
            "the report says ok=True but the exit code is 1",
            "report and exit code disagree",
        ),
        (
            ExecResult("", "usage: ...\nmeshaccel-agent: error: invalid choice: 'check'\n", 2),
            False,
            "`meshaccel-agent check -o json` exited with code 2 and no JSON report: "
            "meshaccel-agent: error: invalid choice: 'check'",
            "an agent older than the command",
        ),
        (
            ExecResult("", "", None, "exec refused: forbidden"),
            False,
            "exec refused: forbidden",
            "RBAC",
        ),
    ],
)
def test_an_agents_check_answer(result, ok, error, reason):
    checked = check_agent("r", "n", RUNNING, lambda pod, *args: result)
    assert (checked.ok, checked.error) == (ok, error), reason


# -- exec, images, selectors, output ----------------------------------------------------------


@pytest.mark.parametrize(
    ("channel", "expected"),
    [
        ('{"metadata":{},"status":"Success"}', (0, "")),
        (
            '{"status":"Failure","reason":"NonZeroExitCode","message":"exit code 3",'
            '"details":{"causes":[{"reason":"ExitCode","message":"3"}]}}',
            (3, ""),
        ),
        (
            '{"status":"Failure","reason":"InternalError","message":"executable file not found"}',
            (None, "executable file not found"),
        ),
        ("", (None, "the exec ended without an exit status")),
        ("{not json", (None, "unreadable exit status: {not json")),
    ],
)
def test_exit_status(channel, expected):
    assert exit_status(channel) == expected


@pytest.mark.parametrize(
    ("image", "tag"),
    [
        ("ghcr.io/meshaccel/meshaccel-operator:0.2.0", "0.2.0"),
        ("registry:5000/meshaccel-operator:v0.2.0", "v0.2.0"),
        ("registry:5000/meshaccel-operator", None),
        ("ghcr.io/m/op@sha256:" + "0" * 64, None),
        ("ghcr.io/m/op:0.2.0@sha256:" + "0" * 64, "0.2.0"),
    ],
)
def test_image_tag(image, tag):
    assert image_tag(image) == tag


@pytest.mark.parametrize(
    ("tag", "version"),
    [("0.2.0", "0.2.0"), ("v0.2.0", "0.2.0"), ("0.2.0-rc.1", "0.2.0-rc.1"), ("latest", None)],
)
def test_only_a_tag_that_names_a_version_is_compared(tag, version):
    assert tag_version(tag) == version


def test_label_selector():
    selector = {
        "matchLabels": {"b": "2", "a": "1"},
        "matchExpressions": [
            {"key": "c", "operator": "In", "values": ["x", "y"]},
            {"key": "d", "operator": "DoesNotExist"},
        ],
    }
    assert label_selector(selector) == "a=1,b=2,c in (x,y),!d"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colour_only_on_a_terminal_without_no_color(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert wants_colour(Terminal()) and not wants_colour(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not wants_colour(Terminal())
    assert Style(True).bad("x") == "\x1b[31mx\x1b[0m" and Style(False).bad("x") == "x"


def test_table_aligns_on_visible_text():
    painted = Style(True).good("ok")
    lines = table(["A", "B"], [[painted, "1"], ["long", "2"]])
    plain = [ANSI_CODES.sub("", line) for line in lines]
    assert plain == ["A     B", "ok    1", "long  2"]  # colour codes take no width
    assert visible_width(lines[1]) == len(plain[1]) < len(lines[1])


def test_agents_that_cannot_be_listed_are_taken_from_the_status():
    acceleration = {
        "metadata": {"name": "r", "creationTimestamp": "2025-01-01T00:00:00Z"},
        "spec": {"namespaceSelector": {}},
        "status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "Accelerating"}],
            "nodes": [{"node": "n1", "inSync": True}],
        },
    }
    status = read_status(acceleration, "1")
    forbidden = "cannot list pods in namespace meshaccel-system: forbidden"
    blind = make_resource(acceleration, status, None, forbidden)
    rows = pod_rows([blind], {"ns": {}}, [pod("ns", "a", "n1"), pod("ns", "b", "n2")], [])
    assert [(r.name, r.state, r.detail) for r in rows] == [
        ("a", "Accelerated", ""),
        ("b", "NoAgentOnNode", "node n2 (as far as the status lists the agents' nodes)"),
    ]
    [note] = notes([blind])
    assert forbidden in note and "the nodes its status lists stand in" in note


# -- login ------------------------------------------------------------------------------------


def test_in_a_pod_without_a_kubeconfig_the_service_account_is_used(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
):
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("pod-token")
    (account / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    (account / "namespace").write_text("tools\n")
    monkeypatch.setattr(
        kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "no-kubeconfig")
    )
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "198.18.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    found = login(service_account=account)
    assert (found.source, found.namespace) == ("in-cluster", "tools")
    assert found.configuration.host == "https://198.18.0.1:6443"
    assert found.configuration.api_key == {"BearerToken": "bearer pod-token"}
    # A kubeconfig, when there is one, wins: the user's own credentials.
    given = tmp_path / "kubeconfig"
    given.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://198.18.0.9"}}],
                "users": [{"name": "u", "user": {"token": "mine"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    mine = login(str(given), service_account=account)
    assert (mine.source, mine.namespace) == (f"kubeconfig {given}", "default")
    assert mine.configuration.host == "https://198.18.0.9"
    (account / "token").unlink()
    with pytest.raises(AccessError, match="in-cluster service account"):
        login(service_account=account)
