"""The chart's ValidatingAdmissionPolicies, their CEL evaluated by a real CEL implementation.

cel-expr-python wraps Google's C++ CEL runtime; kube-apiserver runs cel-go. Both implement the
same language and standard library, and the policies use nothing Kubernetes adds to it (no
``.?``, no Kubernetes library functions), so an expression means here what it means there.
Each policy is evaluated as the API server does: matchConditions first, then the variables in
order, then every validation (an error counts as a refusal: ``failurePolicy: Fail``).

* The DaemonSet the operator renders, for every kind of spec and with the chart's agent image
  as the operator reads it from its Deployment, passes every rule.
* Tampered DaemonSets, each a way a compromised operator could run something else with the
  agents' privileges, are each refused by the rule that names the problem, and only by it;
  each is still a valid object by the official schema, so it is the policy that stops it.
* Only the operator's ServiceAccount is matched; it may create no Pod or other workload.

Not reproduced here: the API server's type-check of each expression against the DaemonSet's
schema (instead, every field an expression selects must exist in the official schema), CEL
cost limits, and the server's defaulting of the object before admission (it adds fields such
as ``terminationMessagePath``, none of which a rule reads).
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]  # ships no py.typed
import pytest

from meshaccel.operator import rendering
from meshaccel.operator.config import AgentImage, AgentPod, operator_config, parse_args
from meshaccel.operator.models import DEFAULT_AGENT_PORT, MeshAccelerationSpec
from tests.chart.helm import NAMESPACE, find, template
from tests.pki import make_pki
from tests.requirements import require

try:
    from cel_expr_python import cel  # type: ignore[import-untyped]  # ships no py.typed
except ImportError:  # pragma: no cover - the test extra installs it
    cel = None

Doc = dict[str, Any]

OPERATOR = f"system:serviceaccount:{NAMESPACE}:meshaccel"
AGENT_POLICY = "meshaccel-agent-daemonsets"
WORKLOAD_POLICY = "meshaccel-operator-workloads"
# The floor of the chart's kubeVersion: the field names must exist from there on.
SCHEMA_VERSION = "1.30"


# -- the evaluator -----------------------------------------------------------------------------


@functools.cache
def _environment() -> Any:
    require(cel is not None, "needs cel-expr-python (pip install -e '.[test]')")
    dyn = cel.Type.DYN
    names = ("object", "oldObject", "request", "params", "namespaceObject", "variables")
    return cel.NewEnv(variables=dict.fromkeys(names, dyn))


@functools.cache
def _compiled(expression: str) -> Any:
    return _environment().compile(expression)


class CelError(Exception):
    """An expression evaluated to an error (a missing key, a type mismatch, ...)."""


def evaluate(expression: str, activation: Mapping[str, Any]) -> Any:
    value = _compiled(expression).eval(data=dict(activation))
    if value.type() == cel.Type.ERROR:
        raise CelError(str(value.plain_value()))
    return value.plain_value()


@dataclass(frozen=True)
class Verdict:
    matched: bool  # the matchConditions selected the request
    refused: tuple[str, ...]  # the messages of the validations that failed (or errored)
    errors: tuple[str, ...]  # expressions that could not be evaluated


def admit(policy: Doc, obj: Doc, *, user: str = OPERATOR, operation: str = "CREATE") -> Verdict:
    """What kube-apiserver decides for ``obj`` written by ``user`` under ``policy``."""
    spec = policy["spec"]
    request = {
        "operation": operation,
        "userInfo": {"username": user},
        "namespace": obj["metadata"].get("namespace", ""),
        "name": obj["metadata"]["name"],
    }
    activation: dict[str, Any] = {"object": obj, "oldObject": None, "request": request}
    for condition in spec.get("matchConditions", []):
        if evaluate(condition["expression"], activation) is not True:
            return Verdict(False, (), ())
    variables: dict[str, Any] = {}
    for variable in spec.get("variables", []):
        variables[variable["name"]] = evaluate(
            variable["expression"], {**activation, "variables": variables}
        )
    refused: list[str] = []
    errors: list[str] = []
    for rule in spec["validations"]:
        try:
            allowed = evaluate(rule["expression"], {**activation, "variables": variables})
        except CelError as err:  # failurePolicy: Fail
            errors.append(f"{rule['expression']}: {err}")
            allowed = False
        if allowed is not True:
            refused.append(rule["message"])
    return Verdict(True, tuple(refused), tuple(errors))


# -- what the chart renders and what the operator renders ---------------------------------------


def _chart(values: dict[str, Any] | None = None) -> list[Doc]:
    return template("helm3", values or {})


def _policy(docs: list[Doc], name: str) -> Doc:
    return find(docs, "ValidatingAdmissionPolicy", name)


def _operator_image(docs: list[Doc]) -> AgentImage:
    """The agent image as the operator reads it: its own parser, on the Deployment's env."""
    (container,) = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    environ = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    return operator_config(parse_args(container["args"], environ=environ)).agent_image


TLS = make_pki().agent_tls()


def rendered_daemonset(
    image: AgentImage, name: str = "demo", pod: AgentPod | None = None, **spec: Any
) -> Doc:
    objects = rendering.agent_objects(
        name,
        "6f1b7a4e-2d4c-4f55-9a0e-6c1d0b1f2a3c",
        MeshAccelerationSpec.model_validate({"namespaceSelector": {}, **spec}),
        namespace=NAMESPACE,
        tls=TLS,
        image=image,
        pod=pod,
    )
    (daemonset,) = [o for o in objects if o["kind"] == "DaemonSet"]
    return daemonset


# -- the operator's own DaemonSets pass ----------------------------------------------------------


@dataclass(frozen=True)
class AllowedCase:
    reason: str
    spec: dict[str, Any]
    name: str = "demo"


ALLOWED = [
    AllowedCase("the defaults (sk_msg on: PERFMON)", {}),
    AllowedCase("sk_msg off: BPF and NET_ADMIN only", {"datapath": {"skMsgRedirect": False}}),
    AllowedCase("an API port below 1024: NET_BIND_SERVICE", {"agent": {"port": 443}}),
    AllowedCase(
        "every agent field the resource may set",
        {
            "agent": {
                "imagePullPolicy": "Always",
                "nodeSelector": {"pool": "mesh"},
                "tolerations": [{"key": "k", "operator": "Equal", "value": "v"}],
                "resources": {"requests": {"cpu": 1}, "limits": {"memory": "1Gi"}},
                "priorityClassName": "",
                "logLevel": "debug",
            }
        },
    ),
    AllowedCase("a name that is hash-shortened", {}, name="n" * 253),
    AllowedCase(
        "a retired image in the spec changes nothing",
        {"agent": {"image": "attacker.example/root-shell:1"}},
    ),
]

VALUES = [
    pytest.param({}, id="chart-defaults"),
    pytest.param(
        {
            "agent": {
                "image": {"repository": "registry.example:5000/mirror/meshaccel-agent"},
                "imagePullSecrets": ["mirror-credentials"],
            }
        },
        id="mirror-with-pull-secret",
    ),
    pytest.param(
        {"agent": {"image": {"digest": "sha256:" + "ab" * 32}}, "fullnameOverride": "accel"},
        id="digest",
    ),
]


@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("case", ALLOWED, ids=[c.reason for c in ALLOWED])
def test_the_operators_daemonset_is_admitted(case: AllowedCase, values: dict[str, Any]) -> None:
    docs = _chart(values)
    fullname = values.get("fullnameOverride", "meshaccel")
    policy = _policy(docs, f"{fullname}-agent-daemonsets")
    daemonset = rendered_daemonset(_operator_image(docs), case.name, **case.spec)
    user = f"system:serviceaccount:{NAMESPACE}:{fullname}"  # the chart's ServiceAccount
    for operation in ("CREATE", "UPDATE"):
        verdict = admit(policy, daemonset, user=user, operation=operation)
        assert verdict == Verdict(True, (), ()), f"{case.reason}: {verdict}"


def test_the_operators_pod_settings_are_admitted() -> None:
    """The chart's agent.* pod values (annotations, labels, node selector, affinity, priority
    class, resources) are the operator's settings: its DaemonSets with them still pass."""
    values = {
        "agent": {
            "podAnnotations": {"example.com/team": "mesh"},
            "podLabels": {"cost-center": "mesh"},
            "nodeSelector": {"pool": "mesh"},
            "affinity": {
                "nodeAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "weight": 1,
                            "preference": {
                                "matchExpressions": [{"key": "ssd", "operator": "Exists"}]
                            },
                        }
                    ]
                }
            },
            "priorityClassName": "mesh-agents",
            "resources": {"requests": {"cpu": "1"}},
        }
    }
    docs = _chart(values)
    (container,) = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    environ = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    config = operator_config(parse_args(container["args"], environ=environ))
    assert config.agent_pod != AgentPod(), "the values reached the operator"
    daemonset = rendered_daemonset(config.agent_image, pod=config.agent_pod)
    assert _pod(daemonset)["affinity"] and _pod(daemonset)["priorityClassName"] == "mesh-agents"
    for operation in ("CREATE", "UPDATE"):
        verdict = admit(_policy(docs, AGENT_POLICY), daemonset, operation=operation)
        assert verdict == Verdict(True, (), ()), verdict


# -- tampered DaemonSets are refused, each by its own rule ---------------------------------------

Pod = dict[str, Any]
Container = dict[str, Any]


def _pod(daemonset: Doc) -> Pod:
    pod: Pod = daemonset["spec"]["template"]["spec"]
    return pod


def _container(daemonset: Doc) -> Container:
    container: Container = _pod(daemonset)["containers"][0]
    return container


def _on_container(change: Callable[[Container], None]) -> Callable[[Doc], None]:
    return lambda daemonset: change(_container(daemonset))


def _on_pod(change: Callable[[Pod], None]) -> Callable[[Doc], None]:
    return lambda daemonset: change(_pod(daemonset))


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set ``a.b.c`` (creating the mappings on the way) in a container or pod."""

    def change(target: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value

    return change


def _delete(path: str) -> Callable[[dict[str, Any]], None]:
    def change(target: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for part in parents:
            target = target[part]
        del target[last]

    return change


def _add_volume(volume: dict[str, Any], mount_path: str) -> Callable[[Doc], None]:
    def change(daemonset: Doc) -> None:
        _pod(daemonset)["volumes"].append(volume)
        _container(daemonset)["volumeMounts"].append(
            {"name": volume["name"], "mountPath": mount_path}
        )

    return change


def _cgroup_writable(container: Container) -> None:
    for mount in container["volumeMounts"]:
        if mount["name"] == "cgroup":
            del mount["readOnly"]


def _bpffs_at(path: str) -> Callable[[Pod], None]:
    def change(pod: Pod) -> None:
        for volume in pod["volumes"]:
            if volume["name"] == "bpffs":
                volume["hostPath"]["path"] = path

    return change


def _second_container(pod: Pod) -> None:
    shell = copy.deepcopy(pod["containers"][0])
    shell.update(name="shell", command=["/bin/sh", "-c", "sleep infinity"])
    pod["containers"].append(shell)


def _init_container(pod: Pod) -> None:
    init = copy.deepcopy(pod["containers"][0])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        del init[probe]
    init.update(name="init", image="attacker.example/root-shell:1")
    pod["initContainers"] = [init]


@dataclass(frozen=True)
class TamperCase:
    reason: str
    tamper: Callable[[Doc], None]
    refused_by: str  # a fragment of the one rule's message that must refuse it


FOREIGN = "attacker.example/root-shell:1"
EXEC = {"exec": {"command": ["python3", "-c", "import os; os.system('sh')"]}}

TAMPERED = [
    TamperCase(
        "a foreign image (the review finding)",
        _on_container(_set("image", FOREIGN)),
        "run the agent image",
    ),
    TamperCase(
        "the agent repository at another tag",
        _on_container(_set("image", "ghcr.io/meshaccel/meshaccel-agent:0.0.9")),
        "run the agent image",
    ),
    TamperCase(
        "a second container running a shell",
        _on_pod(_second_container),
        "runs `meshaccel-agent run`",
    ),
    TamperCase(
        "an init container with a foreign image",
        _on_pod(_init_container),
        "no init or ephemeral containers",
    ),
    TamperCase(
        "the agent image running Python with a script",
        _on_container(_set("command", ["python3", "-c", "import os; os.system('sh')"])),
        "runs `meshaccel-agent run`",
    ),
    TamperCase(
        "the agent with an extra argument",
        _on_container(_set("args", ["--config=/tmp/evil.yaml"])),
        "runs `meshaccel-agent run`",
    ),
    TamperCase(
        "the image's own entry point (no command)",
        _on_container(_delete("command")),
        "runs `meshaccel-agent run`",
    ),
    TamperCase(
        "a postStart hook",
        _on_container(_set("lifecycle", {"postStart": EXEC})),
        "no lifecycle hooks and no exec probes",
    ),
    TamperCase(
        "an exec liveness probe",
        _on_container(_set("livenessProbe", {**EXEC, "periodSeconds": 10})),
        "no lifecycle hooks and no exec probes",
    ),
    TamperCase(
        "LD_PRELOAD from the ConfigMap volume",
        _on_container(
            lambda c: c["env"].append({"name": "LD_PRELOAD", "value": "/etc/meshaccel/x.so"})
        ),
        "only the agent's own variables",
    ),
    TamperCase(
        "variables from a ConfigMap",
        _on_container(_set("envFrom", [{"configMapRef": {"name": "anything"}}])),
        "only the agent's own variables",
    ),
    TamperCase(
        "privileged",
        _on_container(_set("securityContext.privileged", True)),
        "are not privileged",
    ),
    TamperCase(
        "privilege escalation allowed",
        _on_container(_set("securityContext.allowPrivilegeEscalation", True)),
        "allowPrivilegeEscalation to false",
    ),
    TamperCase(
        "CAP_SYS_ADMIN added",
        _on_container(lambda c: c["securityContext"]["capabilities"]["add"].append("SYS_ADMIN")),
        "add none but BPF, NET_ADMIN, PERFMON and NET_BIND_SERVICE",
    ),
    TamperCase(
        "CAP_SYS_PTRACE spelt with its prefix",
        _on_container(
            lambda c: c["securityContext"]["capabilities"]["add"].append("CAP_SYS_PTRACE")
        ),
        "add none but BPF, NET_ADMIN, PERFMON and NET_BIND_SERVICE",
    ),
    TamperCase(
        "the runtime's default capabilities kept (no drop ALL)",
        _on_container(_set("securityContext.capabilities.drop", ["NET_RAW"])),
        "drop ALL capabilities",
    ),
    TamperCase(
        "the host's root filesystem",
        _add_volume({"name": "host", "hostPath": {"path": "/"}}, "/host"),
        "mount no host path but /sys/fs/bpf and /sys/fs/cgroup",
    ),
    TamperCase(
        "the container runtime's socket",
        _add_volume(
            {"name": "cri", "hostPath": {"path": "/run/containerd/containerd.sock"}},
            "/run/containerd/containerd.sock",
        ),
        "mount no host path but /sys/fs/bpf and /sys/fs/cgroup",
    ),
    TamperCase(
        "the bpffs volume pointed above itself",
        _on_pod(_bpffs_at("/sys/fs/bpf/../../..")),
        "mount no host path but /sys/fs/bpf and /sys/fs/cgroup",
    ),
    TamperCase(
        "a projected ServiceAccount token",
        _add_volume(
            {
                "name": "token-of-another",
                "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]},
            },
            "/var/run/other",
        ),
        "hostPath, Secret and ConfigMap volumes only",
    ),
    TamperCase(
        "a scratch volume to stage a binary",
        _add_volume({"name": "scratch", "emptyDir": {}}, "/scratch"),
        "hostPath, Secret and ConfigMap volumes only",
    ),
    TamperCase(
        "the local socket's volume on the node's disk",
        _add_volume({"name": "local", "emptyDir": {}}, "/scratch"),
        "hostPath, Secret and ConfigMap volumes only",
    ),
    TamperCase(
        "the host's cgroup tree writable",
        _on_container(_cgroup_writable),
        "mount the host's /sys/fs/cgroup read-only",
    ),
    TamperCase(
        "the host's PID namespace",
        _on_pod(_set("hostPID", True)),
        "share no host PID or IPC namespace",
    ),
    TamperCase(
        "the host's IPC namespace",
        _on_pod(_set("hostIPC", True)),
        "share no host PID or IPC namespace",
    ),
    TamperCase(
        "a ServiceAccount token mounted",
        _on_pod(_set("automountServiceAccountToken", True)),
        "mount no ServiceAccount token",
    ),
    TamperCase(
        "the token setting left to the ServiceAccount",
        _on_pod(_delete("automountServiceAccountToken")),
        "mount no ServiceAccount token",
    ),
    TamperCase(
        "seccomp Unconfined",
        _on_container(_set("securityContext.seccompProfile", {"type": "Unconfined"})),
        "under a seccomp profile",
    ),
    TamperCase(
        "no seccomp profile anywhere (the kubelet's default)",
        _on_container(_delete("securityContext.seccompProfile")),
        "under a seccomp profile",
    ),
    TamperCase(
        "an unmasked /proc",
        _on_container(_set("securityContext.procMount", "Unmasked")),
        "no unmasked /proc",
    ),
    TamperCase(
        "a Windows HostProcess container",
        _on_container(_set("securityContext.windowsOptions.hostProcess", True)),
        "no Windows HostProcess",
    ),
    TamperCase(
        "sysctls",
        _on_pod(_set("securityContext.sysctls", [{"name": "net.core.somaxconn", "value": "1"}])),
        "set no sysctls",
    ),
]


def _image() -> AgentImage:
    return _operator_image(_chart())


@pytest.mark.parametrize("case", TAMPERED, ids=[c.reason for c in TAMPERED])
def test_tampered_daemonsets_are_refused(case: TamperCase) -> None:
    policy = _policy(_chart(), AGENT_POLICY)
    daemonset = rendered_daemonset(_image())
    case.tamper(daemonset)
    # The API server would accept the object itself: the policy is what stops it.
    kubernetes_validate.validate(daemonset, SCHEMA_VERSION, strict=True)
    for operation in ("CREATE", "UPDATE"):
        verdict = admit(policy, daemonset, operation=operation)
        assert verdict.matched and not verdict.errors, (case.reason, verdict)
        assert len(verdict.refused) == 1, (case.reason, verdict.refused)
        assert case.refused_by in verdict.refused[0], (case.reason, verdict.refused)


def test_every_rule_refuses_something() -> None:
    """No rule is dead weight: each is the one that refuses at least one tampered case."""
    policy = _policy(_chart(), AGENT_POLICY)
    messages = [rule["message"] for rule in policy["spec"]["validations"]]
    unused = [m for m in messages if not any(case.refused_by in m for case in TAMPERED)]
    assert unused == []


def test_a_rule_that_cannot_be_evaluated_refuses() -> None:
    """failurePolicy Fail: an error is a refusal (and the evaluator reports errors as such)."""
    policy = _policy(_chart(), AGENT_POLICY)
    daemonset = rendered_daemonset(_image())
    del _pod(daemonset)["containers"]
    verdict = admit(policy, daemonset)
    assert verdict.errors and len(verdict.refused) >= len(verdict.errors)


def test_seccomp_may_come_from_the_pod() -> None:
    """A profile set on the pod (the container inheriting it) is as good as the container's."""
    policy = _policy(_chart(), AGENT_POLICY)
    daemonset = rendered_daemonset(_image())
    profile = _container(daemonset)["securityContext"].pop("seccompProfile")
    _pod(daemonset)["securityContext"] = {"seccompProfile": profile}
    assert admit(policy, daemonset) == Verdict(True, (), ())


# -- who is matched --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "matched"),
    [
        (OPERATOR, True),
        (f"system:serviceaccount:{NAMESPACE}:meshaccel-agent-demo", False),
        ("system:serviceaccount:other:meshaccel", False),
        ("system:serviceaccount:kube-system:daemon-set-controller", False),
        ("kubernetes-admin", False),
    ],
)
def test_only_the_operators_writes_are_checked(user: str, matched: bool) -> None:
    docs = _chart()
    daemonset = rendered_daemonset(_image())
    _container(daemonset)["image"] = FOREIGN
    assert admit(_policy(docs, AGENT_POLICY), daemonset, user=user).matched is matched
    assert admit(_policy(docs, WORKLOAD_POLICY), daemonset, user=user).matched is matched


def test_a_custom_service_account_is_the_one_matched() -> None:
    docs = _chart({"serviceAccount": {"create": False, "name": "existing"}})
    user = f"system:serviceaccount:{NAMESPACE}:existing"
    daemonset = rendered_daemonset(_operator_image(docs))
    for name in (AGENT_POLICY, WORKLOAD_POLICY):
        assert admit(_policy(docs, name), daemonset, user=user).matched
        assert not admit(_policy(docs, name), daemonset, user=OPERATOR).matched


POD: Doc = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "anything", "namespace": NAMESPACE},
    "spec": {"containers": [{"name": "c", "image": FOREIGN}]},
}


def test_the_operator_creates_no_pods_or_other_workloads() -> None:
    policy = _policy(_chart(), WORKLOAD_POLICY)
    verdict = admit(policy, POD)
    assert verdict.matched and len(verdict.refused) == 1 and not verdict.errors
    assert "creates no Pods or workloads" in verdict.refused[0]
    covered = {
        (group, resource, operation)
        for rule in policy["spec"]["matchConstraints"]["resourceRules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for operation in rule["operations"]
    }
    for group, resource in (
        ("", "pods"),
        ("", "pods/ephemeralcontainers"),
        ("", "replicationcontrollers"),
        ("apps", "deployments"),
        ("apps", "replicasets"),
        ("apps", "statefulsets"),
        ("batch", "jobs"),
        ("batch", "cronjobs"),
    ):
        for operation in ("CREATE", "UPDATE"):
            assert (group, resource, operation) in covered


def test_the_agent_policy_covers_daemonset_writes() -> None:
    policy = _policy(_chart(), AGENT_POLICY)
    assert policy["spec"]["failurePolicy"] == "Fail"
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
    assert (rule["apiGroups"], rule["resources"]) == (["apps"], ["daemonsets"])
    assert set(rule["operations"]) == {"CREATE", "UPDATE"}


# -- the policy and the renderer say the same thing ------------------------------------------


def _variables(policy: Doc) -> dict[str, Any]:
    return {
        v["name"]: evaluate(v["expression"], {"object": None})
        for v in policy["spec"]["variables"]
        if "object" not in v["expression"]
    }


def _rendered_variants() -> Iterator[Doc]:
    image = _image()
    for port in (443, DEFAULT_AGENT_PORT):
        for redirect in (True, False):
            yield rendered_daemonset(
                image, agent={"port": port}, datapath={"skMsgRedirect": redirect}
            )


def test_the_allowed_sets_are_what_the_renderer_uses() -> None:
    """Capabilities, environment, command and host paths: exactly what rendering.py can
    render (none allowed that no spec needs), so the two cannot drift apart unnoticed."""
    variables = _variables(_policy(_chart(), AGENT_POLICY))
    capabilities: set[str] = set()
    environment: set[str] = set()
    host_paths: set[str] = set()
    for daemonset in _rendered_variants():
        container = _container(daemonset)
        capabilities |= set(container["securityContext"]["capabilities"]["add"])
        environment |= {e["name"] for e in container["env"]}
        host_paths |= {v["hostPath"]["path"] for v in _pod(daemonset)["volumes"] if "hostPath" in v}
        assert container["command"] == variables["command"]
    assert set(variables["capabilities"]) == capabilities
    assert capabilities == {*rendering.AGENT_CAPABILITIES, "PERFMON", "NET_BIND_SERVICE"}
    assert set(variables["environment"]) == environment
    assert set(variables["hostPaths"]) == host_paths
    assert variables["readOnlyHostPaths"] == [str(rendering.CGROUP_PATH)]
    assert list(rendering.AGENT_COMMAND) == variables["command"]


# -- the expressions select only fields that exist ----------------------------------------------


@functools.cache
def _schema_properties() -> frozenset[str]:
    """Every property name reachable from DaemonSet in the official schema (SCHEMA_VERSION)."""
    root = resources.files("kubernetes_validate").joinpath(
        "kubernetes-json-schema", f"v{SCHEMA_VERSION}.0-local-strict", "_definitions.json"
    )
    definitions = json.loads(root.read_text(encoding="utf-8"))["$defs"]
    seen: set[str] = set()
    names: set[str] = set()
    pending = ["io.k8s.api.apps.v1.DaemonSet"]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        text = json.dumps(definitions[name])
        names |= set(definitions[name].get("properties", {}))
        pending += re.findall(r'"#/\$defs/([^"]+)"', text)
    return frozenset(names)


_STRING = re.compile(r"'[^']*'")
_SELECTED = re.compile(r"\.\s*([A-Za-z_]\w*)\b(?!\s*\()")


@pytest.mark.parametrize("name", [AGENT_POLICY, WORKLOAD_POLICY])
def test_expressions_select_fields_that_exist(name: str) -> None:
    """A stand-in for the API server's type-check: a misspelt field (``capabilites``) would
    make a rule fail on every object there, or pass by accident here."""
    policy = _policy(_chart(), name)
    spec = policy["spec"]
    variables = {v["name"] for v in spec.get("variables", [])}
    known = _schema_properties() | variables | {"userInfo", "username"}
    expressions = [
        item["expression"]
        for key in ("matchConditions", "variables", "validations")
        for item in spec.get(key, [])
    ]
    unknown = {
        field
        for expression in expressions
        for field in _SELECTED.findall(_STRING.sub("''", expression))
        if field not in known
    }
    assert unknown == set()
