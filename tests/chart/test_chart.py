"""The Helm chart, rendered by the real helm 3 and helm 4 and checked like an API server would.

Every object is validated with kubernetes-validate (the official OpenAPI schemas, strict: no
unknown fields) for several Kubernetes versions, the MeshAcceleration against the CRD's own
schema, and bad values must fail ``helm template`` with a message naming what is wrong.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]  # ships no py.typed
import pytest
import yaml

from meshaccel.operator import predelete
from meshaccel.operator.config import (
    DEFAULT_AGENT_IMAGE,
    AgentImage,
    AgentPod,
    operator_config,
    parse_args,
)
from tests.chart import helm
from tests.chart.helm import HELMS, NAMESPACE, find, template, template_error
from tests.chart.sync import load_sync

# The chart's kubeVersion floor (1.30: the agents' DaemonSet uses appArmorProfile), and two
# current releases (kubernetes-validate 1.37 ships schemas for 1.28 to 1.37).
KUBERNETES_VERSIONS = ("1.30", "1.32", "1.35")
# Kinds whose schema comes from a CRD, not from Kubernetes: checked by their CRD's schema.
CUSTOM_KINDS = {"MeshAcceleration", "ClusterKopfPeering"}


@dataclass(frozen=True)
class Case:
    name: str
    values: dict[str, Any]
    reason: str
    kinds: set[str] = field(default_factory=set)  # kinds that must be rendered


CUSTOM_VALUES: dict[str, Any] = {
    "fullnameOverride": "accel",
    "commonLabels": {"team": "platform"},
    "operator": {
        "replicas": 3,
        "image": {
            "repository": "registry.example.com/mirror/meshaccel-operator",
            "tag": "0.1.0-rc.1",
        },
        "imagePullSecrets": ["registry-credentials"],
        "logFormat": "text",
        "logLevel": "debug",
        "extraArgs": ["--push-window=0.5"],
        "extraEnv": [{"name": "TZ", "value": "UTC"}],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [
            {
                "key": "node-role.kubernetes.io/control-plane",
                "operator": "Exists",
                "effect": "NoSchedule",
            },
        ],
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "meshaccel"}},
            },
        ],
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"prometheus.io/scrape": "true"},
        "podLabels": {"cost-center": "mesh"},
        "annotations": {"example.com/owner": "platform"},
        "terminationGracePeriodSeconds": 60,
        "ports": {"health": 8081, "metrics": 9091},
        "podDisruptionBudget": {"enabled": True, "maxUnavailable": 2},
    },
    "agent": {
        "image": {"repository": "registry.example.com/mirror/meshaccel-agent", "tag": "0.1.0-rc.1"},
        "imagePullSecrets": ["registry-credentials", "second-registry"],
        "podAnnotations": {"example.com/team": "mesh"},
        "podLabels": {"cost-center": "mesh"},
        "nodeSelector": {"node.example/pool": "mesh"},
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}
                            ]
                        }
                    ]
                }
            },
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 50,
                        "podAffinityTerm": {
                            "labelSelector": {"matchLabels": {"app": "noisy"}},
                            "topologyKey": "kubernetes.io/hostname",
                        },
                    }
                ]
            },
        },
        "priorityClassName": "mesh-agents",
        "resources": {
            "requests": {"cpu": "100m", "memory": 134217728},
            "limits": {"memory": "1Gi"},
        },
    },
    "uninstallHook": {
        "enabled": True,
        "timeoutSeconds": 240,
        "operatorGraceSeconds": 60,
        "resources": {"requests": {"cpu": "20m"}},
    },
    "admissionPolicy": {"enabled": True, "validationActions": ["Deny", "Audit"]},
    "serviceAccount": {"annotations": {"example.com/role": "meshaccel"}},
    "metrics": {"service": {"enabled": True, "port": 9100, "annotations": {"a": "b"}}},
    "defaultAcceleration": {
        "enabled": True,
        "name": "mesh-wide",
        "mode": "linkerd",
        "namespaceSelector": {
            # null removes the chart's default matchLabels (Helm merges maps with defaults).
            "matchLabels": None,
            "matchExpressions": [
                {"key": "linkerd.io/inject", "operator": "In", "values": ["enabled"]},
            ],
        },
        "podSelector": {"matchLabels": {"accelerate": "yes"}},
        "agent": {
            "imagePullPolicy": "Always",
            "port": 9475,
            "nodeSelector": {"meshaccel.io/node": "yes"},
            "tolerations": [
                {
                    "key": "dedicated",
                    "operator": "Equal",
                    "value": "mesh",
                    "effect": "NoExecute",
                    "tolerationSeconds": 30,
                }
            ],
            "resources": {
                "requests": {"cpu": "100m", "memory": 128},
                "limits": {"memory": "512Mi"},
            },
            "priorityClassName": "system-node-critical",
            "logLevel": "debug",
        },
        "datapath": {
            "sameNodeInbound": False,
            "skMsgRedirect": True,
            "skMsgRedirectBudget": 4 << 20,
            "skMsgToAppsSelector": {"matchLabels": {"reads-with": "recv"}},
            "maxPods": 2048,
            "maxConnections": 131072,
            "maxPodPorts": 4096,
            "maxPodCidrs": 1024,
        },
        "exclusions": {
            "outboundPorts": [3306, 5432],
            "inboundPorts": [9000],
            "outboundCIDRs": ["169.254.0.0/16"],
        },
    },
}

CASES = [
    Case(
        "defaults",
        {},
        "what `helm install` with no values creates",
        {
            "Deployment",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "ClusterKopfPeering",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
            "PodDisruptionBudget",
            "Job",
        },
    ),
    Case(
        "default-acceleration",
        {"defaultAcceleration": {"enabled": True}},
        "the quickstart's one-flag install",
        {"MeshAcceleration"},
    ),
    Case(
        "custom",
        CUSTOM_VALUES,
        "every value set to something other than its default",
        {"Deployment", "Service", "MeshAcceleration"},
    ),
    Case(
        "digest",
        {"operator": {"image": {"digest": "sha256:" + "ab" * 32}}},
        "an image pinned by digest",
    ),
    Case(
        "agent-digest",
        {"agent": {"image": {"digest": "sha256:" + "cd" * 32}}},
        "the agents' image pinned by digest",
        {"ValidatingAdmissionPolicy"},
    ),
    Case(
        "no-admission-policy",
        {"admissionPolicy": {"enabled": False}},
        "the admission policies turned off (a cluster that enforces its own)",
    ),
    Case(
        "standalone",
        {"operator": {"replicas": 1, "peering": ""}},
        "one replica without peering: no ClusterKopfPeering",
    ),
    Case(
        "existing-service-account",
        {"serviceAccount": {"create": False, "name": "existing"}, "rbac": {"create": False}},
        "RBAC and the ServiceAccount managed outside the chart",
    ),
    Case(
        "mirror-registry",
        {"global": {"imageRegistry": "mirror.example:5000/ghcr-cache"}},
        "every image from a mirror (global.imageRegistry)",
        {"Deployment", "Job", "ValidatingAdmissionPolicy"},
    ),
    Case(
        "no-uninstall-hook-no-pdb",
        {
            "uninstallHook": {"enabled": False},
            "operator": {"podDisruptionBudget": {"enabled": False}},
        },
        "the pre-delete hook and the PodDisruptionBudget switched off",
    ),
    Case(
        "sk-msg-to-every-app",
        {"defaultAcceleration": {"enabled": True, "datapath": {"skMsgToAppsSelector": {}}}},
        "an empty selector (every pod) with skMsgRedirect at its default, on: no false alarm",
        {"MeshAcceleration"},
    ),
]


def _ids(cases: list[Case]) -> list[str]:
    return [c.name for c in cases]


@pytest.mark.parametrize("helm_name", HELMS)
def test_lint_strict(helm_name: str) -> None:
    for values in ({}, CUSTOM_VALUES):
        result = helm.run(
            helm_name,
            "lint",
            "--strict",
            "{chart}",
            "--namespace",
            NAMESPACE,
            *helm.values_args(values),
        )
        assert result.returncode == 0, f"{helm_name} lint --strict failed:\n{result.output}"


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
@pytest.mark.parametrize("helm_name", HELMS)
def test_rendered_objects_are_valid_kubernetes(helm_name: str, case: Case) -> None:
    docs = template(helm_name, case.values, crds=True)
    kinds = {d["kind"] for d in docs}
    assert case.kinds <= kinds, f"{case.reason}: missing {case.kinds - kinds}"
    for doc in docs:
        where = f"{case.name} ({case.reason}): {doc['kind']} {doc['metadata']['name']}"
        if doc["kind"] in CUSTOM_KINDS:
            continue  # test_custom_resources_match_their_crds
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{where} is invalid for Kubernetes {version}: {err}")


def test_strict_validation_catches_unknown_fields() -> None:
    """The validator itself: an unknown field in a Deployment must be refused."""
    deployment = copy.deepcopy(find(template("helm3"), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def _crd_schema(name: str) -> dict[str, Any]:
    crd = yaml.safe_load((helm.ROOT / "crds" / name).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def _unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the API server would prune: the CRD schema does not declare them."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found: list[str] = []
    if isinstance(obj, dict) and "properties" in schema:
        for key, value in obj.items():
            if key not in schema["properties"]:
                found.append(f"{path}.{key}")
            else:
                found += _unknown_fields(value, schema["properties"][key], f"{path}.{key}")
    elif isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, value in obj.items():
            found += _unknown_fields(value, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            found += _unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def _check_against_crd(doc: dict[str, Any], crd_file: str) -> None:
    schema = _crd_schema(crd_file)
    # metadata is the API server's business: the CRD schema leaves it open.
    body = {k: v for k, v in doc.items() if k != "metadata"}
    jsonschema.validate(body, schema, cls=jsonschema.Draft7Validator)
    # apiVersion and kind are never pruned, whatever the schema says.
    rest = {k: v for k, v in body.items() if k not in ("apiVersion", "kind")}
    assert _unknown_fields(rest, schema) == [], "fields the API server would prune"


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_custom_resources_match_their_crds(case: Case) -> None:
    docs = template("helm3", case.values)
    for doc in docs:
        if doc["kind"] == "MeshAcceleration":
            _check_against_crd(doc, "meshaccel.io_meshaccelerations.yaml")
            assert "namespace" not in doc["metadata"], "MeshAccelerations are cluster-scoped"
        elif doc["kind"] == "ClusterKopfPeering":
            _check_against_crd(doc, "kopf.dev_clusterkopfpeerings.yaml")


def test_default_acceleration_spec_is_the_values() -> None:
    spec = find(template("helm3", CUSTOM_VALUES), "MeshAcceleration")["spec"]
    wanted = {
        k: v
        for k, v in CUSTOM_VALUES["defaultAcceleration"].items()
        if k not in ("enabled", "name")
    }
    wanted["namespaceSelector"] = {
        "matchExpressions": wanted["namespaceSelector"]["matchExpressions"]
    }
    assert spec == wanted


def _operator_environment(docs: list[dict[str, Any]]) -> dict[str, str]:
    (container,) = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


@dataclass(frozen=True)
class ImageCase:
    reason: str
    values: dict[str, Any]
    image: AgentImage


APP_VERSION = yaml.safe_load((helm.CHART / "Chart.yaml").read_text())["appVersion"]
IMAGE_CASES = [
    ImageCase(
        "the release's own agent",
        {},
        AgentImage(f"ghcr.io/meshaccel/meshaccel-agent:{APP_VERSION}"),
    ),
    ImageCase(
        "a mirror, a tag and pull secrets",
        CUSTOM_VALUES,
        AgentImage(
            "registry.example.com/mirror/meshaccel-agent:0.1.0-rc.1",
            ("registry-credentials", "second-registry"),
        ),
    ),
    ImageCase(
        "a digest wins over the tag",
        {"agent": {"image": {"tag": "0.1.0", "digest": "sha256:" + "cd" * 32}}},
        AgentImage("ghcr.io/meshaccel/meshaccel-agent@sha256:" + "cd" * 32),
    ),
]


@pytest.mark.parametrize("case", IMAGE_CASES, ids=[c.reason for c in IMAGE_CASES])
def test_the_agent_image_is_the_operators_setting(case: ImageCase) -> None:
    """agent.image reaches the operator (MESHACCEL_AGENT_IMAGE*, read by its own parser) and
    the admission policy; no MeshAcceleration carries an image (issue 12)."""
    values = {**case.values, "defaultAcceleration": {"enabled": True}}
    docs = template("helm3", values)
    config = operator_config(parse_args([], environ=_operator_environment(docs)))
    assert config.agent_image == case.image, case.reason
    assert "image" not in (find(docs, "MeshAcceleration")["spec"].get("agent") or {})
    (policy,) = [
        d
        for d in docs
        if d["kind"] == "ValidatingAdmissionPolicy"
        and d["metadata"]["name"].endswith("-agent-daemonsets")
    ]
    variables = {v["name"]: v["expression"] for v in policy["spec"]["variables"]}
    assert variables["agentImage"] == f"'{case.image.reference}'", case.reason


def test_the_operators_default_agent_image_is_the_charts() -> None:
    """Started without MESHACCEL_AGENT_IMAGE, the operator runs the agent of its release."""
    release = f"ghcr.io/meshaccel/meshaccel-agent:{APP_VERSION}"
    assert release == DEFAULT_AGENT_IMAGE


def test_default_acceleration_is_the_quickstarts() -> None:
    docs = template("helm3", {"defaultAcceleration": {"enabled": True}})
    acceleration = find(docs, "MeshAcceleration", "default")
    assert "agent" not in acceleration["spec"], "the CRD's defaults, and no image"
    assert acceleration["spec"]["namespaceSelector"] == {
        "matchLabels": {"meshaccel.io/accelerate": "enabled"}
    }


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_helm3_and_helm4_render_the_same(case: Case) -> None:
    assert template("helm3", case.values, crds=True) == template("helm4", case.values, crds=True)


def test_operator_deployment_is_locked_down() -> None:
    deployment = find(template("helm3"), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert deployment["spec"]["replicas"] == 2
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 65532
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not pod.get("hostNetwork") and not pod.get("hostPID")
    # A writable /tmp on an emptyDir, and nothing else writable.
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
    # Kopf's liveness endpoint serves both probes; metrics on their own port.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8080, "metrics": 9090}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert container["command"] == ["meshaccel-operator"]
    assert container["args"] == [
        "--log-format=json",
        "--log-level=info",
        "--peering=meshaccel",
        "--liveness=http://0.0.0.0:8080/healthz",
        "--metrics-port=9090",
    ]
    env = {e["name"]: e for e in container["env"]}
    assert env["MESHACCEL_NAMESPACE"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.namespace"}
    }


def test_operator_arguments_follow_the_values() -> None:
    docs = template("helm3", CUSTOM_VALUES)
    (container,) = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example.com/mirror/meshaccel-operator:0.1.0-rc.1"
    assert container["args"] == [
        "--log-format=text",
        "--log-level=debug",
        "--peering=meshaccel",
        "--liveness=http://0.0.0.0:8081/healthz",
        "--metrics-port=9091",
        "--push-window=0.5",
    ]
    standalone = find(template("helm3", {"operator": {"replicas": 1, "peering": ""}}), "Deployment")
    assert "--standalone" in standalone["spec"]["template"]["spec"]["containers"][0]["args"]
    digest = find(template("helm3", CASES[3].values), "Deployment")
    image = digest["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "ghcr.io/meshaccel/meshaccel-operator@sha256:" + "ab" * 32


def test_operator_runs_the_main_module_flags() -> None:
    """The flags the chart passes are flags meshaccel-operator accepts (its own parser)."""
    for values in ({}, CUSTOM_VALUES, {"operator": {"replicas": 1, "peering": ""}}):
        (container,) = find(template("helm3", values), "Deployment")["spec"]["template"]["spec"][
            "containers"
        ]
        args = parse_args(container["args"], environ={})
        assert args.log_format == (values.get("operator", {}).get("logFormat") or "json")


def test_peering_object_matches_the_peering_flag() -> None:
    docs = template("helm3")
    assert find(docs, "ClusterKopfPeering")["metadata"]["name"] == "meshaccel"
    standalone = template("helm3", {"operator": {"replicas": 1, "peering": ""}})
    assert "ClusterKopfPeering" not in {d["kind"] for d in standalone}


@dataclass(frozen=True)
class Bad:
    name: str
    values: dict[str, Any]
    reason: str
    # Every fragment must appear in helm's output (helm 3 and 4 word schema errors differently,
    # both name the key and what was expected); "a|b" accepts either spelling.
    says: tuple[str, ...]


BAD = [
    Bad(
        "replicas-as-text",
        {"operator": {"replicas": "two"}},
        "a wrong type",
        ("replicas", "integer"),
    ),
    Bad(
        "unknown-mode",
        {"defaultAcceleration": {"enabled": True, "mode": "cilium"}},
        "a mode meshaccel does not know",
        ("mode", "istio", "linkerd", "kuma"),
    ),
    Bad("unknown-operator-key", {"operator": {"replica": 3}}, "a misspelt key", ("replica",)),
    Bad(
        "unknown-spec-key",
        {"defaultAcceleration": {"datapath": {"skMsg": True}}},
        "a key the MeshAcceleration spec does not have",
        ("skMsg",),
    ),
    Bad(
        "bad-log-format",
        {"operator": {"logFormat": "xml"}},
        "an unknown log format",
        ("logFormat", "json", "text"),
    ),
    Bad(
        "port-out-of-range",
        {"operator": {"ports": {"health": 70000}}},
        "not a TCP port",
        ("health", "65535|65,535"),
    ),
    Bad(
        "sk-msg-to-apps-selector-without-redirect",
        {
            "defaultAcceleration": {
                "enabled": True,
                # {} selects every pod: set, although empty.
                "datapath": {"skMsgRedirect": False, "skMsgToAppsSelector": {}},
            }
        },
        "skMsgToAppsSelector without skMsgRedirect",
        (
            "defaultAcceleration.datapath.skMsgToAppsSelector needs "
            "defaultAcceleration.datapath.skMsgRedirect=true",
        ),
    ),
    Bad(
        "sk-msg-redirect-budget-too-small",
        {"defaultAcceleration": {"datapath": {"skMsgRedirectBudget": 4096}}},
        "a budget below the datapath's 64 KiB floor",
        ("skMsgRedirectBudget", "65536|65,536"),
    ),
    Bad(
        "retired-sk-msg-to-apps",
        {"defaultAcceleration": {"datapath": {"skMsgToApps": True}}},
        "the retired cluster-wide switch is refused, not silently ignored",
        ("skMsgToApps",),
    ),
    Bad(
        "retired-default-acceleration-image",
        {"defaultAcceleration": {"agent": {"image": "registry.example/agent:1"}}},
        "the image a MeshAcceleration used to choose: refused, saying where it went",
        (
            "defaultAcceleration.agent.image (registry.example/agent:1) is no longer read",
            "agent.image.repository",
        ),
    ),
    Bad(
        "agent-image-latest",
        {"agent": {"image": {"tag": "latest"}}},
        "a moving tag, which the operator refuses at start",
        ("agent.image.tag=latest is a moving tag",),
    ),
    Bad(
        "agent-repository-not-a-reference",
        {"agent": {"image": {"repository": "registry.example/agent' || true || '"}}},
        "a repository that is no image name (it is written into the policy's CEL)",
        ("repository",),
    ),
    Bad(
        "agent-pull-secret-not-a-name",
        {"agent": {"imagePullSecrets": ["Registry Credentials"]}},
        "a pull secret that is no Secret name",
        ("imagePullSecrets",),
    ),
    Bad(
        "deny-and-warn",
        {"admissionPolicy": {"validationActions": ["Deny", "Warn"]}},
        "two actions the API server refuses together",
        ("Deny and Warn cannot be used together",),
    ),
    Bad(
        "unknown-validation-action",
        {"admissionPolicy": {"validationActions": ["Block"]}},
        "an action the API does not know",
        ("validationActions", "Deny"),
    ),
    Bad(
        "replicas-without-peering",
        {"operator": {"replicas": 2, "peering": ""}},
        "two active operators",
        ("operator.replicas=2 needs operator.peering",),
    ),
    Bad(
        "no-service-account",
        {"serviceAccount": {"create": False}},
        "no ServiceAccount at all",
        ("serviceAccount.create=false needs serviceAccount.name",),
    ),
    Bad(
        "same-ports",
        {"operator": {"ports": {"health": 9090, "metrics": 9090}}},
        "two listeners on one port",
        ("both 9090",),
    ),
    Bad(
        "registry-with-a-scheme",
        {"global": {"imageRegistry": "https://mirror.example"}},
        "a URL where a registry host belongs",
        ("imageRegistry",),
    ),
    Bad(
        "agent-label-that-selects-agents",
        {"agent": {"podLabels": {"meshaccel.io/acceleration": "other"}}},
        "a label the operator's DaemonSet selector uses",
        ("agent.podLabels: meshaccel.io/acceleration is one of the labels that select the agents",),
    ),
    Bad(
        "agent-annotation-the-operator-sets",
        {"agent": {"podAnnotations": {"meshaccel.io/config-hash": "0"}}},
        "the annotation that rolls the agents when their settings change",
        ("agent.podAnnotations: meshaccel.io/config-hash is an annotation the operator sets",),
    ),
    Bad(
        "agent-affinity-misspelt",
        {"agent": {"affinity": {"nodeAffinity": {"requiredDuringScheduling": {}}}}},
        "a field core/v1 NodeAffinity does not have (the operator would refuse to start)",
        ("requiredDuringScheduling",),
    ),
    Bad(
        "agent-resources-not-a-quantity",
        {"agent": {"resources": {"requests": {"memory": "lots"}}}},
        "a quantity Kubernetes cannot read",
        ("memory|resources",),
    ),
    Bad(
        "pdb-that-lets-every-replica-go",
        {"operator": {"replicas": 2, "podDisruptionBudget": {"maxUnavailable": 2}}},
        "a budget that protects nothing",
        ("operator.podDisruptionBudget.maxUnavailable=2 would let a drain take all 2",),
    ),
    Bad(
        "hook-grace-beyond-its-timeout",
        {"uninstallHook": {"timeoutSeconds": 60, "operatorGraceSeconds": 120}},
        "a grace the wait never reaches",
        ("uninstallHook.operatorGraceSeconds=120 is longer than uninstallHook.timeoutSeconds=60",),
    ),
    Bad(
        "hook-timeout-too-short",
        {"uninstallHook": {"timeoutSeconds": 1}},
        "no time for the agents' drain",
        ("timeoutSeconds",),
    ),
]


@pytest.mark.parametrize("bad", BAD, ids=[b.name for b in BAD])
@pytest.mark.parametrize("helm_name", HELMS)
def test_bad_values_fail_with_a_readable_message(helm_name: str, bad: Bad) -> None:
    output = template_error(helm_name, bad.values)
    missing = [f for f in bad.says if not any(alt in output for alt in f.split("|"))]
    assert not missing, f"{bad.reason}: {helm_name} did not say {missing}:\n{output}"
    assert "panic" not in output.lower()


def test_notes_print_commands_to_paste() -> None:
    """helm 4 renders NOTES.txt offline (install --dry-run=client); helm 3 needs a cluster."""
    for values, expected in (
        (
            {},
            [
                "kubectl get meshaccelerations",
                "kind: MeshAcceleration",
                "kubectl label namespace NAMESPACE meshaccel.io/accelerate=enabled",
            ],
        ),
        (
            {"defaultAcceleration": {"enabled": True}},
            [
                "kubectl get meshaccelerations",
                "kubectl label namespace NAMESPACE meshaccel.io/accelerate=enabled",
                "kubectl describe meshacceleration default",
            ],
        ),
    ):
        result = helm.run(
            "helm4",
            "install",
            helm.RELEASE,
            "{chart}",
            "--namespace",
            NAMESPACE,
            "--dry-run=client",
            *helm.values_args(values),
        )
        assert result.returncode == 0, result.output
        notes = result.stdout.split("NOTES:", 1)[1]
        for line in expected:
            assert line in notes, f"NOTES.txt lacks {line!r}:\n{notes}"
        assert f"kubectl -n {NAMESPACE} rollout status deployment/meshaccel" in notes
        # helm uninstall runs the pre-delete hook: where its verdict is.
        assert f"kubectl -n {NAMESPACE} logs job/meshaccel-uninstall" in notes


def test_chart_crds_are_the_repository_crds() -> None:
    sync = load_sync()
    assert sync.crd_differences() == [], "run: python charts/sync.py"
    names = {p.name for p in (helm.CHART / "crds").glob("*.yaml")}
    assert {"meshaccel.io_meshaccelerations.yaml", "kopf.dev_clusterkopfpeerings.yaml"} <= names


def test_peering_crd_is_what_kopf_expects() -> None:
    crd = yaml.safe_load((helm.ROOT / "crds" / "kopf.dev_clusterkopfpeerings.yaml").read_text())
    assert crd["metadata"]["name"] == "clusterkopfpeerings.kopf.dev"
    assert crd["spec"]["scope"] == "Cluster"
    assert crd["spec"]["names"]["kind"] == "ClusterKopfPeering"
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1" and version["served"] and version["storage"]
    properties = version["schema"]["openAPIV3Schema"]["properties"]
    for part in ("spec", "status"):
        assert properties[part] == {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


@pytest.mark.parametrize("helm_name", HELMS)
def test_kubernetes_older_than_the_floor_is_refused(helm_name: str) -> None:
    """kubeVersion in Chart.yaml: 1.30 is the floor (the agents use appArmorProfile)."""
    args = ["template", helm.RELEASE, "{chart}", "--namespace", NAMESPACE]
    old = helm.run(helm_name, *args, "--kube-version", "1.29.0")
    assert old.returncode != 0 and "kubeVersion" in old.output, old.output
    assert helm.run(helm_name, *args, "--kube-version", "1.30.0").returncode == 0


# -- images from a mirror (global.imageRegistry) ---------------------------------------------


@dataclass(frozen=True)
class RegistryCase:
    reason: str
    registry: str
    repository: str
    expected: str  # the repository the images then use


REGISTRY_CASES = [
    RegistryCase(
        "no override", "", "ghcr.io/meshaccel/meshaccel-agent", "ghcr.io/meshaccel/meshaccel-agent"
    ),
    RegistryCase(
        "a mirror's host replaces the registry",
        "mirror.example",
        "ghcr.io/meshaccel/meshaccel-agent",
        "mirror.example/meshaccel/meshaccel-agent",
    ),
    RegistryCase(
        "a pull-through cache: host, port and path",
        "harbor.example:8443/ghcr-cache/",
        "ghcr.io/meshaccel/meshaccel-agent",
        "harbor.example:8443/ghcr-cache/meshaccel/meshaccel-agent",
    ),
    RegistryCase(
        "a repository without a registry (Docker Hub) gets one",
        "mirror.example",
        "meshaccel/meshaccel-agent",
        "mirror.example/meshaccel/meshaccel-agent",
    ),
    RegistryCase(
        "localhost:5000 is a registry too",
        "mirror.example",
        "localhost:5000/meshaccel-agent",
        "mirror.example/meshaccel-agent",
    ),
]


@pytest.mark.parametrize("case", REGISTRY_CASES, ids=[c.reason for c in REGISTRY_CASES])
def test_global_image_registry_moves_every_image(case: RegistryCase) -> None:
    """The operator, the uninstall hook and the agents (the operator's setting, the admission
    policy's only image) all pull from the registry given."""
    operator_repository = case.repository.replace("meshaccel-agent", "meshaccel-operator")
    docs = template(
        "helm3",
        {
            "global": {"imageRegistry": case.registry},
            "agent": {"image": {"repository": case.repository, "tag": "1.2.3"}},
            "operator": {"image": {"repository": operator_repository, "tag": "1.2.3"}},
        },
    )
    agent_image = f"{case.expected}:1.2.3"
    operator_image = agent_image.replace("meshaccel-agent", "meshaccel-operator")
    config = operator_config(parse_args([], environ=_operator_environment(docs)))
    assert config.agent_image.reference == agent_image, case.reason
    (container,) = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == operator_image, case.reason
    (hook,) = find(docs, "Job")["spec"]["template"]["spec"]["containers"]
    assert hook["image"] == operator_image, case.reason
    policy = find(docs, "ValidatingAdmissionPolicy", "meshaccel-agent-daemonsets")
    variables = {v["name"]: v["expression"] for v in policy["spec"]["variables"]}
    assert variables["agentImage"] == f"'{agent_image}'", case.reason


# -- the rest of the agents' pods: the operator's settings ----------------------------------


def test_agent_pod_values_are_the_operators_settings() -> None:
    """agent.podAnnotations, .podLabels, .nodeSelector, .affinity, .priorityClassName and
    .resources reach the operator (its own parser reads the Deployment's environment), and
    from it every MeshAcceleration's DaemonSet."""
    agent = CUSTOM_VALUES["agent"]
    config = operator_config(
        parse_args([], environ=_operator_environment(template("helm3", CUSTOM_VALUES)))
    )
    pod = config.agent_pod
    assert pod.annotations == agent["podAnnotations"]
    assert pod.labels == agent["podLabels"]
    assert pod.node_selector == agent["nodeSelector"]
    assert pod.affinity is not None
    assert pod.affinity.model_dump(mode="json", exclude_defaults=True) == agent["affinity"]
    assert pod.priority_class_name == agent["priorityClassName"]
    assert pod.resources.model_dump(mode="json") == agent["resources"]
    defaults = operator_config(parse_args([], environ=_operator_environment(template("helm3"))))
    assert defaults.agent_pod == AgentPod(), "the chart's defaults are the operator's"


# -- the operator's PodDisruptionBudget ------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "max_unavailable"),
    [
        ({}, 1),
        ({"operator": {"replicas": 3, "podDisruptionBudget": {"maxUnavailable": 2}}}, 2),
        ({"operator": {"replicas": 1, "peering": ""}}, None),
        ({"operator": {"replicas": 1}}, None),
        ({"operator": {"podDisruptionBudget": {"enabled": False}}}, None),
    ],
    ids=["two-replicas", "three-replicas", "standalone", "one-replica", "disabled"],
)
def test_a_pod_disruption_budget_only_with_replicas_to_spare(
    values: dict[str, Any], max_unavailable: int | None
) -> None:
    docs = template("helm3", values)
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    if max_unavailable is None:
        assert budgets == []
        return
    (budget,) = budgets
    deployment = find(docs, "Deployment")
    assert budget["spec"]["maxUnavailable"] == max_unavailable
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]
    assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


# -- the uninstall hook ------------------------------------------------------------------------

HOOK = "meshaccel-uninstall"
HOOK_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Job"}


def _hook_objects(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if (d["metadata"].get("annotations") or {}).get("helm.sh/hook")]


@pytest.mark.parametrize("helm_name", HELMS)
def test_the_uninstall_hook_runs_before_helm_deletes_anything(helm_name: str) -> None:
    hooks = _hook_objects(template(helm_name))
    assert {d["kind"] for d in hooks} == HOOK_KINDS
    for doc in hooks:
        annotations = doc["metadata"]["annotations"]
        assert doc["metadata"]["name"] == HOOK
        assert annotations["helm.sh/hook"] == "pre-delete"
        # Its identity and rules exist before the Job starts (Helm creates by weight) and go
        # once it succeeded; the Job stays, with the verdict in its log, for a day.
        weight = int(annotations["helm.sh/hook-weight"])
        policy = annotations["helm.sh/hook-delete-policy"]
        if doc["kind"] == "Job":
            assert (weight, policy) == (0, "before-hook-creation")
            assert doc["spec"]["ttlSecondsAfterFinished"] == 86400
        else:
            assert weight < 0 and policy == "before-hook-creation,hook-succeeded", doc["kind"]
    assert _hook_objects(template(helm_name, {"uninstallHook": {"enabled": False}})) == []


@pytest.mark.parametrize("values", [{}, CUSTOM_VALUES], ids=["defaults", "custom"])
def test_the_uninstall_hook_runs_the_operators_pre_delete(values: dict[str, Any]) -> None:
    """The Job's command line is one `meshaccel-operator pre-delete` accepts, aimed at this
    release's operator Deployment, with the values' bounds."""
    docs = template("helm3", values)
    deployment = find(docs, "Deployment")
    job = find(docs, "Job", deployment["metadata"]["name"] + "-uninstall")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["meshaccel-operator", "pre-delete"]
    args = predelete.parse_args(container["args"], environ={})
    hook = {**template_values()["uninstallHook"], **values.get("uninstallHook", {})}
    assert args.operator_deployment == deployment["metadata"]["name"]
    assert (args.timeout, args.operator_grace) == (
        hook["timeoutSeconds"],
        hook["operatorGraceSeconds"],
    )
    env = {e["name"]: e for e in container["env"]}
    assert env["MESHACCEL_NAMESPACE"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.namespace"}
    }
    (operator,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == operator["image"]
    assert container["securityContext"] == operator["securityContext"]
    assert pod["securityContext"] == deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0
    assert job["spec"]["activeDeadlineSeconds"] > hook["timeoutSeconds"]
    assert pod.get("imagePullSecrets") == deployment["spec"]["template"]["spec"].get(
        "imagePullSecrets"
    )


def template_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((helm.CHART / "values.yaml").read_text())
    return values


@pytest.mark.parametrize("version", ("1.30", "1.35"))
@pytest.mark.parametrize("helm_name", HELMS)
def test_the_uninstall_hook_is_valid_kubernetes(helm_name: str, version: str) -> None:
    """The hook's objects, each by the official schema (strict), from both helms."""
    for values in ({}, CUSTOM_VALUES):
        hooks = _hook_objects(template(helm_name, values))
        assert {d["kind"] for d in hooks} == HOOK_KINDS
        for doc in hooks:
            kubernetes_validate.validate(doc, version, strict=True)
