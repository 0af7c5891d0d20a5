"""``meshaccel`` against the API emulator, with the realistic cluster of ``scene.py``: four
nodes (one agent crash-looping and behind, one agent missing, one newer agent with a failing
check), pods left out for six different reasons, a status the operator's model built.

The command runs in-process (``main``, in a thread) and, once, as the installed kubectl plugin
through the real ``kubectl`` binary. What runs in the agent pods is the tests' exec handlers.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import re
import sys

import pytest
import yaml

from meshaccel.contract.version import VERSION
from tests.cli.scene import (
    AGENTS_NAMESPACE,
    ENABLED,
    NEWER_AGENT,
    NODE_2_ERROR,
    PODS,
    Scene,
    build_scene,
    check_report,
    lines_with,
    meshaccel,
    write_status,
)
from tests.operator.conftest import KubeClient
from tests.operator.emulator import ApiServerEmulator
from tests.operator.pod_exec import ExecHandler, ExecRequest, ExecResult
from tests.requirements import require_tool

ANSI = re.compile(r"\x1b\[")


def agent_answers(check: dict[str, object], check_code: int, version: str) -> ExecHandler:
    """An agent pod whose `meshaccel-agent check|version -o json` print these."""

    async def handler(request: ExecRequest) -> ExecResult:
        match request.command:
            case ("meshaccel-agent", "check", "-o", "json"):
                return ExecResult(json.dumps(check).encode(), b"", check_code)
            case ("meshaccel-agent", "version", "-o", "json"):
                answer = {"version": version, "python": "3.11.2", "libbpf": "1.1.0"}
                return ExecResult(json.dumps(answer | {"kernel": "6.1.0"}).encode(), b"", 0)
        return ExecResult(b"", f"unknown command {request.command}".encode(), 2)

    return handler


@pytest.fixture
async def scene(emulator: ApiServerEmulator, kubeconfig: pathlib.Path, kube: KubeClient) -> Scene:
    built = await build_scene(kube)
    emulator.on_exec(
        AGENTS_NAMESPACE, built.agent("node-1"), agent_answers(check_report("node-1"), 0, VERSION)
    )
    failing = check_report("node-4", failing=("helpers", "conflicting_programs"))
    emulator.on_exec(
        AGENTS_NAMESPACE, built.agent("node-4"), agent_answers(failing, 1, NEWER_AGENT)
    )
    return built


# -- status ---------------------------------------------------------------------------------------


async def test_status_shows_conditions_counts_problem_nodes_pods_and_versions(scene: Scene):
    run = await meshaccel("status")
    assert run.code == 1, run.stdout  # not Ready
    out = run.stdout
    assert not ANSI.search(out), "no colour when stdout is not a terminal"
    assert "MeshAcceleration default (istio): Stalled" in out
    assert lines_with(out, "Ready", "False", "AgentsFailing", "node-2")
    assert lines_with(out, "Stalled", "True", "AgentsFailing")
    assert lines_with(out, "Reconciling", "False", "Stalled")
    assert "Nodes: 4 desired, 2 ready, 2 in sync of 3" in out
    assert lines_with(out, "Pods: 4 selected, 2 accelerated, 7 not accelerated", "Unresolved 1")
    assert "Problem nodes (2):" in out
    [node_2] = lines_with(out, "node-2", "2/3")
    assert NODE_2_ERROR[:60] in node_2
    [node_1] = lines_with(out, "node-1", "4/4")
    assert node_1.split()[3:5] == ["1", "1"]  # accelerated, unresolved
    assert not lines_with(out, "node-4"), "node-4 has no problem"
    assert "Problem pods (2):" in out
    assert lines_with(out, "shop/api", "node-1", "Unresolved", "kubepods.slice")
    assert lines_with(out, "billing/worker", "node-1", "OverBudget")
    assert f"Versions: client {VERSION}, operator {VERSION}, agents {VERSION} (2 nodes)" in out


async def test_status_json(scene: Scene):
    run = await meshaccel("status", "default", "-o", "json")
    assert run.code == 1
    [status] = run.json()["accelerations"]
    assert (status["name"], status["state"], status["operatorVersion"]) == (
        "default",
        "Stalled",
        VERSION,
    )
    assert [c["type"] for c in status["conditions"][:3]] == ["Ready", "Reconciling", "Stalled"]
    assert [n["node"] for n in status["problemNodes"]] == ["node-2", "node-1"]
    assert [(p["name"], p["reason"]) for p in status["problems"]] == [
        ("api", "Unresolved"),
        ("worker", "OverBudget"),
    ]
    assert status["problemsNotShown"] == 0
    assert status["podsNotAccelerated"]["Pending"] == 1
    assert status["skew"] == []  # the status knows only VERSION: node-4 has not reported


async def test_status_exits_0_only_when_every_resource_is_ready(scene: Scene, kube: KubeClient):
    now = "2025-01-01T00:00:00Z"
    ready = {
        "observedGeneration": 1,
        "conditions": [
            {"type": t, "status": s, "reason": r, "message": "", "lastTransitionTime": now}
            for t, s, r in (
                ("Ready", "True", "Accelerating"),
                ("Reconciling", "False", "Reconciled"),
                ("Stalled", "False", "AsExpected"),
            )
        ],
        # A merge patch: what the scene's status listed must go explicitly.
        "nodes": [],
        "problems": [],
        "problemCount": 0,
        "nodesWithProblems": 0,
    }
    await write_status(kube, "default", ready)
    run = await meshaccel("status")
    assert run.code == 0, run.stdout
    assert "MeshAcceleration default (istio): Ready" in run.stdout

    # A second resource that is not Ready: the command is not satisfied any more.
    from tests.cli.scene import create_acceleration

    await create_acceleration(kube, "canary", {"team": "canary"})
    run = await meshaccel("status")
    assert run.code == 1
    assert "MeshAcceleration canary (istio): Unknown" in run.stdout
    assert "no conditions: the operator has not reported yet" in run.stdout
    assert (await meshaccel("status", "default")).code == 0


async def test_status_of_a_missing_resource_is_no_answer(scene: Scene):
    run = await meshaccel("status", "nope")
    assert run.code == 2
    assert 'MeshAcceleration "nope" not found' in run.stderr


# -- pods -----------------------------------------------------------------------------------------


def expected(namespace: str | None = None) -> list[tuple[str, str, str, str]]:
    return sorted(
        (ns, name, node, state)
        for ns, name, node, state, _ in PODS
        if state and namespace in (None, ns)
    )


async def test_pods_in_a_namespace_accelerated_or_why_not(scene: Scene):
    run = await meshaccel("pods", "-n", "shop")
    assert run.code == 0, run.stderr
    rows = [line.split()[:5] for line in run.stdout.splitlines()[1:] if line.startswith("shop ")]
    assert [(*row[:3], row[4]) for row in rows] == expected("shop")
    assert all(row[3] == "default" for row in rows)
    assert lines_with(run.stdout, "api", "Unresolved", "kubepods")
    assert lines_with(run.stdout, "cart", "Pending", "generation 2 of 3", "Connection refused")
    assert lines_with(run.stdout, "legacy", "OptedOut", "meshaccel.io/accelerate: false")
    assert "1 of 7 selected pod(s) in namespace shop accelerated" in run.stdout


async def test_pods_in_all_namespaces_as_json(scene: Scene):
    run = await meshaccel("pods", "-A", "-o", "json")
    assert run.code == 0, run.stderr
    report = run.json()
    assert report["scope"] == "all namespaces"
    got = sorted((p["namespace"], p["name"], p["node"], p["state"]) for p in report["pods"])
    # The agents' own pods are never listed; other/tool's namespace is not selected.
    assert got == expected()
    [worker] = [p for p in report["pods"] if p["name"] == "worker"]
    assert worker["detail"] == "pod_ports needs 300, a pod may take 128"
    assert report["notes"] == []


async def test_pods_default_to_the_contexts_namespace(scene: Scene, kubeconfig: pathlib.Path):
    config = yaml.safe_load(kubeconfig.read_text())
    config["contexts"][0]["context"]["namespace"] = "billing"
    kubeconfig.write_text(yaml.safe_dump(config))
    run = await meshaccel("pods", "--kubeconfig", str(kubeconfig))
    assert run.code == 0, run.stderr
    assert "1 of 2 selected pod(s) in namespace billing accelerated" in run.stdout


async def test_pods_say_how_many_problems_the_status_leaves_out(scene: Scene, kube: KubeClient):
    """The status lists the first 20 problems: 22 pods unresolved on node-1, 20 listed."""
    await kube.create_namespace("bulk", ENABLED)
    for index in range(22):
        await kube.create_pod("bulk", f"job-{index:02}", node="node-1", pod_ip=f"198.18.2.{index}")
    listed = [
        {"namespace": "bulk", "name": f"job-{i:02}", "node": "node-1", "reason": "Unresolved"}
        for i in range(20)
    ]
    await write_status(kube, "default", {"problems": listed, "problemCount": 22})
    run = await meshaccel("pods", "-n", "bulk", "-o", "json")
    report = run.json()
    states = {p["name"]: p["state"] for p in report["pods"]}
    assert [states[f"job-{i:02}"] for i in range(20)] == ["Unresolved"] * 20
    # The two the status leaves out look accelerated from here: the report says so.
    assert (states["job-20"], states["job-21"]) == ("Accelerated", "Accelerated")
    [note] = report["notes"]
    assert "lists 20 problem pods and leaves 2 more out" in note
    text = await meshaccel("pods", "-n", "bulk")
    assert "leaves 2 more out" in text.stdout
    status = await meshaccel("status")
    assert "Problem pods (20, 2 more not listed by the status):" in status.stdout


# -- check ----------------------------------------------------------------------------------------


async def test_check_every_agent_node(scene: Scene, emulator: ApiServerEmulator):
    run = await meshaccel("check")
    assert run.code == 1, run.stdout  # node-2, node-3 and node-4 fail
    out = run.stdout
    assert lines_with(out, "node-1", scene.agent("node-1"), "OK")
    # node-4: the agent answered, one check failed (with its fix).
    assert lines_with(out, "node-4", "FAILED")
    assert lines_with(
        out, "FAIL", "helpers", "fix: see docs/operations.md, Troubleshooting (helpers)"
    )
    assert lines_with(out, "warn", "conflicting_programs", "fix:")  # a warning-level check
    # node-2: not running; the report it left when it stopped.
    assert lines_with(out, "node-2", "FAILED")
    assert lines_with(out, "CrashLoopBackOff", "its report from when it exited with code 1")
    assert lines_with(out, "FAIL", "bpffs")
    # node-3: the DaemonSet covers it, no agent runs there.
    assert lines_with(out, "no agent pod on this node")
    assert "3 of 4 node(s) failed." in out
    # Exactly the agent's check, in the agent container, of the two running agents.
    assert sorted((e.pod, e.container, e.command) for e in emulator.execs) == [
        (scene.agent(node), "agent", ("meshaccel-agent", "check", "-o", "json"))
        for node in ("node-1", "node-4")
    ]


async def test_check_json(scene: Scene):
    run = await meshaccel("check", "-o", "json")
    assert run.code == 1
    nodes = {n["node"]: n for n in run.json()["nodes"]}
    assert sorted(nodes) == ["node-1", "node-2", "node-3", "node-4"]
    assert [(n["source"], n["ok"]) for _, n in sorted(nodes.items())] == [
        ("exec", True),
        ("terminationMessage", False),
        ("none", False),
        ("exec", False),
    ]
    assert [c["name"] for c in nodes["node-2"]["checks"] if not c["ok"]] == ["bpffs"]
    assert nodes["node-3"]["pod"] is None


async def test_check_passes_when_every_agent_does(scene: Scene, emulator: ApiServerEmulator, kube):
    """Only node-1's agent, healthy: the DaemonSet now selects node-1 alone."""
    await kube.merge(
        f"/apis/apps/v1/namespaces/{AGENTS_NAMESPACE}/daemonsets/{scene.daemonset['metadata']['name']}",
        {"spec": {"template": {"spec": {"nodeSelector": {"kubernetes.io/hostname": "node-1"}}}}},
    )
    for node in ("node-2", "node-4"):
        await kube.delete(f"/api/v1/namespaces/{AGENTS_NAMESPACE}/pods/{scene.agent(node)}")
    run = await meshaccel("check")
    assert run.code == 0, run.stdout
    assert "All 1 node(s) passed." in run.stdout


# -- version --------------------------------------------------------------------------------------


async def test_version_of_client_operator_and_every_agent(
    scene: Scene, emulator: ApiServerEmulator
):
    run = await meshaccel("version", "-o", "json")
    assert run.code == 0, run.stderr
    report = run.json()
    assert report["client"] == VERSION
    assert [(o["source"], o["where"], o["version"]) for o in report["operator"]] == [
        ("status", "default", VERSION),
        ("image", f"{AGENTS_NAMESPACE}/meshaccel", "0.1.0"),
    ]
    assert [(a["node"], a["source"], a["version"]) for a in report["agents"]] == [
        ("node-1", "status", VERSION),
        ("node-2", "status", VERSION),
        ("node-4", "exec", NEWER_AGENT),  # not reported in the status yet: asked
    ]
    [skew] = report["skew"]
    assert NEWER_AGENT in skew and "agents" in skew
    # Only the agent the status does not know was asked.
    assert [(e.pod, e.command) for e in emulator.execs] == [
        (scene.agent("node-4"), ("meshaccel-agent", "version", "-o", "json"))
    ]
    text = await meshaccel("version")
    assert lines_with(text.stdout, "Warning: versions differ", NEWER_AGENT)
    assert lines_with(text.stdout, "node-4", NEWER_AGENT, "asked the agent")


async def test_version_client_only_needs_no_cluster(tmp_path: pathlib.Path):
    run = await meshaccel("version", "--client", "--kubeconfig", str(tmp_path / "absent"))
    assert (run.code, run.stdout.strip()) == (0, f"Client: {VERSION}")


# -- the plugin, errors ---------------------------------------------------------------------------


async def test_kubectl_runs_it_as_a_plugin(scene: Scene, kubeconfig: pathlib.Path):
    # scripts/tools.sh puts the official kubectl beside kubectl-meshaccel in .venv/bin.
    bin_dir = pathlib.Path(sys.executable).parent
    venv_kubectl = bin_dir / "kubectl"
    kubectl = str(venv_kubectl) if venv_kubectl.exists() else require_tool("kubectl")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env |= {"KUBECONFIG": str(kubeconfig)}
    process = await asyncio.create_subprocess_exec(
        kubectl,
        "meshaccel",
        "status",
        "-o",
        "json",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == 1, stderr.decode()
    [status] = json.loads(stdout)["accelerations"]
    assert status["state"] == "Stalled"


async def test_an_unreachable_api_server_is_no_answer(tmp_path: pathlib.Path):
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "gone", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "u"}}],
        "current-context": "gone",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    run = await meshaccel("status", "--kubeconfig", str(path), "--request-timeout", "5")
    assert run.code == 2
    assert "cannot reach the API server at http://127.0.0.1:9" in run.stderr
    run = await meshaccel("status", "--kubeconfig", str(path), "--context", "absent")
    assert run.code == 2 and "cannot use the kubeconfig" in run.stderr


async def test_text_from_the_cluster_cannot_drive_the_terminal(scene: Scene, kube: KubeClient):
    """Messages come from the cluster (an agent's error, a pod's termination message): their
    control characters are shown escaped, never sent to the terminal; JSON keeps them as is."""
    hostile = "owned\x1b]0;title\x07\x1b[2J\u202eevil"
    problem = {"namespace": "shop", "name": "api", "node": "node-1", "reason": "Unresolved"}
    await write_status(kube, "default", {"problems": [problem | {"message": hostile}]})
    run = await meshaccel("status")
    assert "\x1b" not in run.stdout and "\x07" not in run.stdout and "\u202e" not in run.stdout
    assert "owned\\x1b]0;title\\x07\\x1b[2J\\u202eevil" in run.stdout
    pods = await meshaccel("pods", "-n", "shop")
    assert "\x1b" not in pods.stdout and "owned\\x1b]0;title" in pods.stdout
    as_json = await meshaccel("status", "-o", "json")
    [status] = as_json.json()["accelerations"]
    assert status["problems"][0]["message"] == hostile


async def test_no_resource_is_not_working(emulator: ApiServerEmulator, kubeconfig: pathlib.Path):
    run = await meshaccel("status")
    assert run.code == 1
    assert "No MeshAcceleration found" in run.stdout
    check = await meshaccel("check")
    assert (check.code, check.stdout.strip()) == (1, "No agent node to check.")
