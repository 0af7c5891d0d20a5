"""The chart's monitoring objects: PodMonitors, a ServiceMonitor and the dashboard's ConfigMap.

Rendered by the real helm 3 and helm 4. The monitors are checked against prometheus-operator's
own CRD schemas (tests/chart/schemas/, vendored from its release; unknown fields refused, as in
the emulator), their metadata as an API server checks it, and the ConfigMap against the official
Kubernetes schemas. Then what the monitors point at: the agents' pods as the operator renders
them (operator/rendering.py) and the operator's pods and Service as the chart renders them.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]  # ships no py.typed
import pytest
import yaml
from cryptography import x509

from meshaccel.contract.tls import AGENT_SERVER_NAME
from meshaccel.operator import rendering
from meshaccel.operator.config import AgentImage
from meshaccel.operator.credentials import CA_CONFIGMAP, CA_CONFIGMAP_KEY
from meshaccel.operator.models import MeshAccelerationSpec
from tests.chart import helm
from tests.chart.helm import CHART, HELMS, NAMESPACE, Doc, find, template, template_error
from tests.operator.k8s_validation import BuiltinSchemas, CrdSchema, check_metadata
from tests.pki import make_pki
from tests.test_dashboard import AGENT_TARGET_LABELS

SCHEMAS = Path(__file__).parent / "schemas"
MONITOR_KINDS = {"PodMonitor": "podmonitors", "ServiceMonitor": "servicemonitors"}
# The chart's kubeVersion floor and a current release (ObjectMeta, ConfigMap).
KUBERNETES_VERSIONS = ("1.30", "1.35")
DASHBOARD = CHART / "dashboards" / "meshaccel.json"


@cache
def crd_schema(kind: str) -> CrdSchema:
    crd = yaml.safe_load(
        (SCHEMAS / f"monitoring.coreos.com_{MONITOR_KINDS[kind]}.yaml").read_text()
    )
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    assert version["name"] == "v1"
    return CrdSchema(version["schema"]["openAPIV3Schema"])


def check_monitor(doc: Doc) -> None:
    """What an API server with prometheus-operator's CRDs would accept, or pytest.fail."""
    where = f"{doc['kind']} {doc['metadata']['name']}"
    assert doc["apiVersion"] == "monitoring.coreos.com/v1", where
    error = crd_schema(doc["kind"]).validate(doc)
    assert error is None, f"{where}: {error}"
    assert check_metadata(doc["metadata"], dns_label_name=False) is None, where
    for version in KUBERNETES_VERSIONS:
        assert BuiltinSchemas(version).validate_metadata(doc["metadata"]) is None, where


def monitors(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in MONITOR_KINDS]


@dataclass(frozen=True)
class Case:
    name: str
    values: dict[str, Any]
    reason: str
    kinds: tuple[str, ...]  # (kind, ...) of the monitors rendered, sorted


#: The default: the ConfigMap the operator keeps, under the name its server certificates carry.
VERIFYING_TLS = {
    "ca": {"configMap": {"name": CA_CONFIGMAP, "key": CA_CONFIGMAP_KEY}},
    "serverName": AGENT_SERVER_NAME,
}
#: A user's choice the chart must keep as given: no verification at all.
UNVERIFIED_TLS = {"insecureSkipVerify": True}
CASES = [
    Case(
        "all-on",
        {"monitoring": {"agents": {"enabled": True}, "operator": {"enabled": True}}},
        "both monitors with their defaults",
        ("PodMonitor", "PodMonitor"),
    ),
    Case(
        "service-monitor",
        {
            "metrics": {"service": {"enabled": True}},
            "monitoring": {"operator": {"enabled": True, "kind": "ServiceMonitor"}},
        },
        "the operator through its metrics Service",
        ("ServiceMonitor",),
    ),
    Case(
        "custom",
        {
            "fullnameOverride": "accel",
            "commonLabels": {"team": "platform"},
            "operator": {"ports": {"health": 8081, "metrics": 9191}},
            "monitoring": {
                "labels": {"release": "kube-prometheus-stack"},
                "agents": {
                    "enabled": True,
                    "interval": "15s",
                    "scrapeTimeout": "10s",
                    "tlsConfig": UNVERIFIED_TLS,
                },
                "operator": {"enabled": True, "interval": "1m", "scrapeTimeout": "5s"},
            },
        },
        "every monitoring value set, the agents' certificate not verified (opted out)",
        ("PodMonitor", "PodMonitor"),
    ),
    Case(
        "prometheus-defaults",
        {
            "monitoring": {
                "agents": {"enabled": True, "interval": ""},
                "operator": {"enabled": True, "interval": ""},
            }
        },
        "no interval (Prometheus' own)",
        ("PodMonitor", "PodMonitor"),
    ),
]


@pytest.mark.parametrize("helm_name", HELMS)
def test_lint_strict_with_everything_on(helm_name: str) -> None:
    values = {
        **CASES[2].values,
        "monitoring": {**CASES[2].values["monitoring"], "dashboard": {"enabled": True}},
    }
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


@pytest.mark.parametrize("helm_name", HELMS)
def test_nothing_is_rendered_by_default(helm_name: str) -> None:
    docs = template(helm_name)
    assert monitors(docs) == []
    assert [d for d in docs if d["kind"] == "ConfigMap"] == []


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("helm_name", HELMS)
def test_monitors_match_the_prometheus_operator_crds(helm_name: str, case: Case) -> None:
    found = monitors(template(helm_name, case.values))
    assert tuple(sorted(d["kind"] for d in found)) == case.kinds, case.reason
    for doc in found:
        check_monitor(doc)
        assert doc["metadata"]["namespace"] == NAMESPACE, case.reason
        for endpoint in _endpoints(doc):
            assert endpoint["path"] == "/metrics", case.reason


def test_the_crd_schemas_refuse_what_prometheus_operator_refuses() -> None:
    """The validator itself: a wrong scheme, a wrong interval, an unknown field, no selector."""
    good = find(template("helm3", CASES[0].values), "PodMonitor", "meshaccel-agents")
    check_monitor(good)
    endpoint_fields: dict[str, dict[str, Any]] = {
        "scheme": {"scheme": "ftp"},
        "interval": {"interval": "30 seconds"},
        "unknown field": {"targetport": "api"},
        "client certificate from a file": {"tlsConfig": {"certFile": "/etc/operator.crt"}},
    }
    for reason, fields in endpoint_fields.items():
        broken = copy.deepcopy(good)
        broken["spec"]["podMetricsEndpoints"][0].update(fields)
        assert crd_schema("PodMonitor").validate(broken) is not None, reason
    broken = copy.deepcopy(good)
    del broken["spec"]["selector"]
    assert crd_schema("PodMonitor").validate(broken) is not None, "no selector"


def _endpoints(doc: Doc) -> list[dict[str, Any]]:
    key = "podMetricsEndpoints" if doc["kind"] == "PodMonitor" else "endpoints"
    endpoints: list[dict[str, Any]] = doc["spec"][key]
    return endpoints


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, "only matchLabels here"
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def _meta_label(label: str) -> str:
    """Prometheus' name for a pod label in kubernetes_sd (__meta_kubernetes_pod_label_*)."""
    return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", label)


@pytest.mark.parametrize("helm_name", HELMS)
def test_agents_podmonitor_finds_the_agents_the_operator_runs(helm_name: str) -> None:
    values = CASES[2].values  # fullnameOverride and commonLabels must not leak into the selector
    docs = template(helm_name, values)
    monitor = find(docs, "PodMonitor", "accel-agents")
    # The agents run in the operator's namespace, which is the release's.
    deployment = find(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MESHACCEL_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}

    pki = make_pki()
    for name, port in (("default", 9474), ("a-" + "long" * 20, 9475)):
        spec = MeshAccelerationSpec.model_validate(
            {"namespaceSelector": {}, "agent": {"port": port}}
        )
        objects = rendering.agent_objects(
            name, "uid-1", spec, namespace=NAMESPACE, tls=pki.agent_tls(), image=AgentImage()
        )
        (daemonset,) = [o for o in objects if o["kind"] == "DaemonSet"]
        template_ = daemonset["spec"]["template"]
        assert _selects(monitor["spec"]["selector"], template_["metadata"]["labels"]), name
        (agent,) = template_["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
        (endpoint,) = _endpoints(monitor)
        assert ports[endpoint["port"]] == port, "the API port, whatever spec.agent.port says"
        # The agents serve TLS on it (kubelet's probes say so too), asking no certificate.
        assert endpoint["scheme"] == "https"
        assert agent["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
        identity = {"cert", "keySecret"} & set(endpoint["tlsConfig"])
        assert not identity, "Prometheus gets no client certificate"
        # The labels the dashboard's check counts on, and no more.
        assert {r["targetLabel"] for r in endpoint["relabelings"]} == AGENT_TARGET_LABELS
        # The acceleration's label reaches the series through the relabeling.
        sources = {tuple(r["sourceLabels"]): r["targetLabel"] for r in endpoint["relabelings"]}
        label = _meta_label(rendering.AGENT_SELECTOR_LABEL)
        assert sources[(label,)] == "acceleration"
        assert template_["metadata"]["labels"][rendering.AGENT_SELECTOR_LABEL]
    # Given, the TLS settings replace the default whole: nothing of the verification stays.
    assert endpoint["tlsConfig"] == UNVERIFIED_TLS
    # By default the agents are verified against the operator's ConfigMap, by their name.
    default = find(template(helm_name, CASES[0].values), "PodMonitor", "meshaccel-agents")
    assert _endpoints(default)[0]["tlsConfig"] == VERIFYING_TLS
    names = pki.server.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    (san,) = names.value.get_values_for_type(x509.DNSName)
    assert san == VERIFYING_TLS["serverName"], "the name the operator's issue_server gives"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


@pytest.mark.parametrize("helm_name", HELMS)
def test_operator_monitors_find_the_operator_and_its_metrics_port(helm_name: str) -> None:
    for case in (CASES[0], CASES[1], CASES[2]):
        docs = template(helm_name, case.values)
        deployment = find(docs, "Deployment")
        pod = deployment["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        served = [a for a in container["args"] if a.startswith("--metrics-port=")]
        assert served == [f"--metrics-port={ports['metrics']}"], case.reason
        (monitor,) = [
            d
            for d in monitors(docs)
            if d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
        ]
        (endpoint,) = _endpoints(monitor)
        assert endpoint["scheme"] == "http", "the operator's metrics are plain HTTP"
        if monitor["kind"] == "PodMonitor":
            assert _selects(monitor["spec"]["selector"], pod["metadata"]["labels"]), case.reason
            assert endpoint["port"] in ports, case.reason
        else:
            service = find(docs, "Service")
            assert _selects(monitor["spec"]["selector"], service["metadata"]["labels"])
            (service_port,) = service["spec"]["ports"]
            assert service_port["name"] == endpoint["port"]
            assert service_port["targetPort"] == "metrics"


@pytest.mark.parametrize("helm_name", HELMS)
def test_service_monitor_without_the_service_is_refused(helm_name: str) -> None:
    message = template_error(
        helm_name, {"monitoring": {"operator": {"enabled": True, "kind": "ServiceMonitor"}}}
    )
    assert "metrics.service.enabled=true" in message


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"monitoring": {"agents": {"interval": "30 seconds"}}}, "interval"),
        ({"monitoring": {"operator": {"kind": "Probe"}}}, "kind"),
        ({"monitoring": {"dashboard": {"namespace": "Grafana"}}}, "namespace"),
        ({"monitoring": {"agents": {"enable": True}}}, "enable"),
    ],
    ids=["interval", "kind", "namespace", "unknown-key"],
)
@pytest.mark.parametrize("helm_name", HELMS)
def test_bad_monitoring_values_are_refused(
    helm_name: str, values: dict[str, Any], fragment: str
) -> None:
    assert fragment in template_error(helm_name, values)


@pytest.mark.parametrize("helm_name", HELMS)
def test_dashboard_configmap_holds_the_dashboard(helm_name: str) -> None:
    docs = template(helm_name, {"monitoring": {"dashboard": {"enabled": True}}})
    config_map = find(docs, "ConfigMap")
    assert config_map["metadata"]["namespace"] == NAMESPACE
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["meshaccel.json"]) == json.loads(DASHBOARD.read_text())
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(config_map, version, strict=True)

    elsewhere = {
        "monitoring": {
            "dashboard": {
                "enabled": True,
                "namespace": "grafana",
                "labels": {"grafana_dashboard": None, "dashboards": "meshaccel"},
                "annotations": {"grafana_folder": "Service mesh"},
            }
        }
    }
    config_map = find(template(helm_name, elsewhere), "ConfigMap")
    assert config_map["metadata"]["namespace"] == "grafana"
    assert "grafana_dashboard" not in config_map["metadata"]["labels"], "null drops the default"
    assert config_map["metadata"]["labels"]["dashboards"] == "meshaccel"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Service mesh"}
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(config_map, version, strict=True)
