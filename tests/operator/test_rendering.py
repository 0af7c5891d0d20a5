"""The agents' objects as rendered for a MeshAcceleration (pure functions, no cluster).

Table-driven: every case carries the reason it exists, printed when it fails. The agent's side
of the contract is checked with the agent's own code: the rendered ConfigMap and container
environment go through ``meshaccel.agent.config.load_settings`` exactly as the agent would read
them, and every path the settings name must be inside a volume of the container.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]  # ships no py.typed
import pytest
import yaml

from meshaccel.agent.config import load_settings
from meshaccel.contract.settings import AgentSettings
from meshaccel.operator import rendering
from meshaccel.operator.config import AgentImage, AgentPod
from meshaccel.operator.credentials import AgentTLS
from meshaccel.operator.models import LEGACY_DEFAULT_AGENT_IMAGE, MeshAccelerationSpec
from tests.pki import make_pki

NAMESPACE = "meshaccel-system"
UID = "6f1b7a4e-2d4c-4f55-9a0e-6c1d0b1f2a3c"
TLS = make_pki().agent_tls()
# The operator's setting (not the CRD's old default, so a test can tell the two apart).
IMAGE = AgentImage("registry.example/mirror/meshaccel-agent:0.2.0")
# 1.30: the first release whose schema has securityContext.appArmorProfile (GA); 1.33: current.
KUBERNETES_VERSIONS = ("1.30", "1.33")

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
INSTANCE = re.compile(AgentSettings.model_fields["instance"].metadata[0].pattern)


def make_spec(**overrides: Any) -> MeshAccelerationSpec:
    document: dict[str, Any] = {"namespaceSelector": {}}
    document.update(overrides)
    return MeshAccelerationSpec.model_validate(document)


def render(
    name: str = "demo",
    spec: MeshAccelerationSpec | None = None,
    tls: AgentTLS = TLS,
    image: AgentImage = IMAGE,
    pod: AgentPod | None = None,
) -> dict[str, dict[str, Any]]:
    objects = rendering.agent_objects(
        name, UID, spec or make_spec(), namespace=NAMESPACE, tls=tls, image=image, pod=pod
    )
    return {obj["kind"]: obj for obj in objects}


def pod_spec(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = objects["DaemonSet"]["spec"]["template"]["spec"]
    return spec


def container(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    containers = pod_spec(objects)["containers"]
    assert len(containers) == 1
    found: dict[str, Any] = containers[0]
    return found


def dig(obj: Any, path: str) -> Any:
    """``a.b.0.c`` -> obj["a"]["b"][0]["c"]; a missing key gives the sentinel ``MISSING``."""
    for part in path.split("."):
        if isinstance(obj, list):
            obj = obj[int(part)]
        elif isinstance(obj, dict) and part in obj:
            obj = obj[part]
        else:
            return MISSING
    return obj


MISSING = object()


# -- objects ----------------------------------------------------------------------------------


def test_renders_the_four_objects_in_order() -> None:
    objects = rendering.agent_objects(
        "demo", UID, make_spec(), namespace=NAMESPACE, tls=TLS, image=IMAGE
    )
    assert [o["kind"] for o in objects] == ["ServiceAccount", "Secret", "ConfigMap", "DaemonSet"]
    assert all(o["metadata"]["namespace"] == NAMESPACE for o in objects)


def test_pure_same_input_same_output_and_spec_untouched() -> None:
    spec = make_spec(agent={"tolerations": [{"key": "k", "operator": "Exists"}]})
    before = spec.model_dump()
    first = rendering.agent_objects("demo", UID, spec, namespace=NAMESPACE, tls=TLS, image=IMAGE)
    second = rendering.agent_objects("demo", UID, spec, namespace=NAMESPACE, tls=TLS, image=IMAGE)
    assert first == second
    assert spec.model_dump() == before


def test_secret_holds_the_tls_material_and_no_token() -> None:
    secret = render()["Secret"]
    assert secret["type"] == "Opaque"
    assert secret["metadata"]["name"] == "meshaccel-agent-tls-demo"
    data = {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
    assert data == {"tls.crt": TLS.cert_pem, "tls.key": TLS.key_pem, "ca.crt": TLS.bundle_pem}


def test_service_account_mounts_no_api_credentials() -> None:
    objects = render()
    assert objects["ServiceAccount"]["automountServiceAccountToken"] is False
    assert pod_spec(objects)["automountServiceAccountToken"] is False
    assert pod_spec(objects)["serviceAccountName"] == objects["ServiceAccount"]["metadata"]["name"]


# -- security ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldCase:
    path: str
    expected: Any
    reason: str


SECURITY_CASES = [
    FieldCase("securityContext.privileged", False, "never a privileged container"),
    FieldCase("securityContext.allowPrivilegeEscalation", False, "no_new_privs: no setuid gains"),
    FieldCase("securityContext.readOnlyRootFilesystem", True, "the image is never written"),
    FieldCase("securityContext.runAsUser", 0, "bpffs and cgroupfs are root's: uid 0"),
    FieldCase("securityContext.runAsNonRoot", False, "consistent with uid 0"),
    FieldCase("securityContext.capabilities.drop", ["ALL"], "start from no capability"),
    FieldCase(
        "securityContext.capabilities.add",
        ["BPF", "NET_ADMIN", "PERFMON"],
        "exactly the measured set for the default spec, sk_msg on "
        "(tests/agent_lifecycle/test_capabilities.py)",
    ),
    FieldCase(
        "securityContext.seccompProfile",
        {"type": "RuntimeDefault"},
        "containerd's default profile allows bpf() with CAP_BPF",
    ),
    FieldCase(
        "securityContext.appArmorProfile",
        {"type": "Unconfined"},
        "the default AppArmor profile denies writes under /sys/fs/bpf (pins)",
    ),
]


@pytest.mark.parametrize("case", SECURITY_CASES, ids=lambda c: c.path)
def test_container_security_context(case: FieldCase) -> None:
    actual = dig(container(render()), case.path)
    assert actual == case.expected, f"{case.path}: {case.reason}"


POD_CASES = [
    FieldCase("hostNetwork", True, "the API on the node's address, reached by node IP"),
    FieldCase("dnsPolicy", "ClusterFirstWithHostNet", "cluster DNS despite hostNetwork"),
    FieldCase("hostPID", False, "pods are found by cgroup, never through /proc/<pid>"),
    FieldCase("hostIPC", False, "no shared memory with the host"),
    FieldCase("enableServiceLinks", False, "no service env clutter in a host-network agent"),
    FieldCase("terminationGracePeriodSeconds", 30, "stop serving + finish the apply"),
]


@pytest.mark.parametrize("case", POD_CASES, ids=lambda c: c.path)
def test_pod_spec(case: FieldCase) -> None:
    assert dig(pod_spec(render()), case.path) == case.expected, f"{case.path}: {case.reason}"


@dataclass(frozen=True)
class CapsCase:
    port: int
    sk_msg_redirect: bool
    expected: tuple[str, ...]
    reason: str


CAPS_CASES = [
    CapsCase(9474, True, ("BPF", "NET_ADMIN", "PERFMON"), "the defaults: sk_msg reads queues"),
    CapsCase(9474, False, ("BPF", "NET_ADMIN"), "no sk_msg: no PERFMON, no bind capability"),
    CapsCase(1024, False, ("BPF", "NET_ADMIN"), "1024 is the first unprivileged port"),
    CapsCase(1023, False, ("BPF", "NET_ADMIN", "NET_BIND_SERVICE"), "a privileged port needs it"),
    CapsCase(80, True, ("BPF", "NET_ADMIN", "NET_BIND_SERVICE", "PERFMON"), "both reasons at once"),
]


@pytest.mark.parametrize(
    "case", CAPS_CASES, ids=lambda c: f"{c.port}-{'sk_msg' if c.sk_msg_redirect else 'tcp'}"
)
def test_capabilities_follow_the_port_and_sk_msg(case: CapsCase) -> None:
    spec = make_spec(agent={"port": case.port}, datapath={"skMsgRedirect": case.sk_msg_redirect})
    caps = container(render(spec=spec))["securityContext"]["capabilities"]
    assert tuple(caps["add"]) == case.expected, case.reason
    assert (
        rendering.agent_capabilities(case.port, sk_msg_redirect=case.sk_msg_redirect)
        == case.expected
    ), case.reason
    assert caps["drop"] == ["ALL"]


def test_every_capability_has_a_reason() -> None:
    reasons = {
        **rendering.AGENT_CAPABILITIES,
        "PERFMON": rendering.PERFMON_REASON,
        "NET_BIND_SERVICE": rendering.NET_BIND_SERVICE_REASON,
    }
    for name, reason in reasons.items():
        assert name.isupper() and not name.startswith("CAP_"), name  # Kubernetes spelling
        assert len(reason) > 20, f"{name} needs a stated reason"
    most = rendering.agent_capabilities(80, sk_msg_redirect=True)
    assert set(most) == set(reasons), "every capability the renderer can add has its reason"
    assert "SYS_ADMIN" not in most


# -- mounts and the agent's settings ----------------------------------------------------------


def agent_view(objects: dict[str, dict[str, Any]], tmp_path: Path) -> AgentSettings:
    """The settings the agent reads in this container: its ConfigMap file and its environment."""
    config_file = tmp_path / rendering.CONFIG_KEY
    config_file.write_text(objects["ConfigMap"]["data"][rendering.CONFIG_KEY])
    environ: dict[str, str] = {}
    downward = {"status.podIP": "10.1.2.3", "spec.nodeName": "node-a"}
    for variable in container(objects)["env"]:
        if "value" in variable:
            environ[variable["name"]] = variable["value"]
        else:
            environ[variable["name"]] = downward[variable["valueFrom"]["fieldRef"]["fieldPath"]]
    # The file is where the container mounts it; here it is in tmp_path.
    assert environ["MESHACCEL_CONFIG"] == str(rendering.CONFIG_FILE)
    environ["MESHACCEL_CONFIG"] = str(config_file)
    command = container(objects)["command"]
    assert command[0] == "meshaccel-agent"
    return load_settings(command[1:], environ).settings


def mount_of(objects: dict[str, dict[str, Any]], path: PurePosixPath) -> dict[str, Any] | None:
    """The container's volumeMount that holds ``path`` (the longest mountPath that covers it)."""
    best: dict[str, Any] | None = None
    for mount in container(objects)["volumeMounts"]:
        mount_path = PurePosixPath(mount["mountPath"])
        covers = path == mount_path or mount_path in path.parents
        if covers and (best is None or len(mount_path.parts) > len(best["mountPath"].split("/"))):
            best = mount
    return best


def volume(objects: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [v for v in pod_spec(objects)["volumes"] if v["name"] == name]
    assert len(found) == 1, name
    return found[0]


def test_config_map_is_what_the_agent_accepts(tmp_path: Path) -> None:
    spec = make_spec(
        agent={"port": 9500, "logLevel": "debug"},
        datapath={
            "sameNodeInbound": False,
            "skMsgRedirect": True,
            "skMsgRedirectBudget": 3 << 20,
            "skMsgToAppsSelector": {"matchLabels": {"app": "web"}},
            "maxPods": 77,
            "maxConnections": 4096,
            "maxPodPorts": 99,
            "maxPodCidrs": 55,
        },
    )
    settings = agent_view(render("my-mesh", spec), tmp_path)
    expected = {
        "mode": "kubernetes",
        "instance": "my-mesh",
        "port": 9500,
        "log_level": "debug",
        "listen_address": "10.1.2.3",  # status.podIP: the node's address under hostNetwork
        "node_name": "node-a",  # spec.nodeName
        "same_node_inbound": False,
        "sk_msg_redirect": True,
        "sk_msg_redirect_budget": 3 << 20,
        "max_pods": 77,
        "max_connections": 4096,
        "max_pod_ports": 99,
        "max_pod_cidrs": 55,
        "uninstall_on_exit": False,
        "insecure_no_token": False,
    }
    actual = {key: getattr(settings, key) for key in expected}
    assert actual == expected


@dataclass(frozen=True)
class SkMsgCase:
    reason: str
    datapath: dict[str, Any]
    redirect: bool  # what the agent reads: sk_msg_redirect ...
    budget: int  # ... and sk_msg_redirect_budget


SK_MSG_CASES = [
    SkMsgCase("the defaults: on, 1 MiB", {}, True, 1 << 20),
    SkMsgCase("switched off", {"skMsgRedirect": False}, False, 1 << 20),
    SkMsgCase("the smallest budget", {"skMsgRedirectBudget": 64 << 10}, True, 64 << 10),
    SkMsgCase("the largest budget", {"skMsgRedirectBudget": 64 << 20}, True, 64 << 20),
    SkMsgCase(
        "the selector is the operator's: it does not reach the agent",
        {"skMsgToAppsSelector": {"matchLabels": {"app": "web"}}},
        True,
        1 << 20,
    ),
]


@pytest.mark.parametrize("case", SK_MSG_CASES, ids=lambda c: c.reason)
def test_sk_msg_settings_reach_the_agent(case: SkMsgCase, tmp_path: Path) -> None:
    settings = agent_view(render(spec=make_spec(datapath=case.datapath)), tmp_path)
    assert (settings.sk_msg_redirect, settings.sk_msg_redirect_budget) == (
        case.redirect,
        case.budget,
    ), case.reason


def test_every_path_the_agent_reads_is_mounted(tmp_path: Path) -> None:
    objects = render()
    settings = agent_view(objects, tmp_path)
    named = {
        name: PurePosixPath(str(value))
        for name, value in settings.model_dump().items()
        if isinstance(value, Path)
    }
    tls_files = {"tls_cert_file", "tls_key_file", "tls_client_ca_file"}
    assert set(named) >= {*tls_files, "pin_root"}, named
    # The kubelet makes the termination-message file itself; the rest are volumes.
    termination = named.pop("termination_message_path")
    assert str(termination) == container(objects)["terminationMessagePath"]
    for name, path in named.items():
        assert mount_of(objects, path) is not None, f"{name}={path} is on no volume"

    # The TLS files are the Secret's items, where the Secret volume puts them, whole (no
    # subPath: kubelet then updates them in place, which a rotation relies on).
    tls_volume = volume(objects, "tls")["secret"]
    assert tls_volume["secretName"] == objects["Secret"]["metadata"]["name"]
    for name in sorted(tls_files):
        mount = mount_of(objects, named[name])
        assert mount is not None and mount["name"] == "tls" and "subPath" not in mount, name
        [item] = [i for i in tls_volume["items"] if i["path"] == named[name].name]
        assert PurePosixPath(mount["mountPath"]) / item["path"] == named[name], name
        assert item["key"] in objects["Secret"]["data"], name

    # The config file is the ConfigMap's item.
    config_mount = mount_of(objects, rendering.CONFIG_FILE)
    assert config_mount is not None and config_mount["name"] == "config"
    config_volume = volume(objects, "config")["configMap"]
    assert config_volume["name"] == objects["ConfigMap"]["metadata"]["name"]
    assert PurePosixPath(config_mount["mountPath"]) / config_volume["items"][0]["path"] == (
        rendering.CONFIG_FILE
    )

    # Pins live on the host's bpffs, at the host's own path.
    pin_mount = mount_of(objects, named["pin_root"])
    assert pin_mount is not None and pin_mount["name"] == "bpffs"
    assert volume(objects, "bpffs")["hostPath"] == {"path": "/sys/fs/bpf", "type": "Directory"}
    assert pin_mount["mountPath"] == "/sys/fs/bpf", "the agent requires /sys/fs/bpf on bpffs"


def test_the_cgroup_tree_is_the_hosts(tmp_path: Path) -> None:
    """attach_cgroup/kubelet_cgroup_root default to the cgroup2 mount the agent finds.

    That must be the host's root, over the container's own /sys/fs/cgroup (inside a cgroup
    namespace the runtime's mount is only the container's cgroup, and the agent prefers it).
    """
    objects = render()
    settings = agent_view(objects, tmp_path)
    assert settings.attach_cgroup is None and settings.kubelet_cgroup_root is None
    mount = mount_of(objects, PurePosixPath("/sys/fs/cgroup"))
    assert mount is not None and mount["name"] == "cgroup"
    assert mount["mountPath"] == "/sys/fs/cgroup" and mount["readOnly"] is True
    assert volume(objects, "cgroup")["hostPath"] == {"path": "/sys/fs/cgroup", "type": "Directory"}


MOUNT_CASES = [
    FieldCase("0.mountPropagation", "HostToContainer", "see a bpffs the host mounts later"),
    FieldCase("0.readOnly", MISSING, "pins are created and removed"),
    FieldCase("1.readOnly", True, "cgroups are only opened and stat'ed"),
    FieldCase("1.mountPropagation", MISSING, "nothing is mounted below the cgroup root"),
    FieldCase("2.readOnly", True, "the TLS files are only read"),
    FieldCase("3.readOnly", True, "the config is only read"),
    FieldCase("4.mountPath", "/run/meshaccel/local", "the local socket's directory"),
    FieldCase("4.readOnly", MISSING, "the agent makes its local socket there"),
]


@pytest.mark.parametrize("case", MOUNT_CASES, ids=lambda c: c.path)
def test_volume_mounts(case: FieldCase) -> None:
    mounts = container(render())["volumeMounts"]
    assert [m["name"] for m in mounts] == ["bpffs", "cgroup", "tls", "config", "local"]
    assert dig(mounts, case.path) is case.expected or dig(mounts, case.path) == case.expected, (
        f"{case.path}: {case.reason}"
    )


def test_no_mount_is_bidirectional_and_no_host_path_is_writable_but_bpffs() -> None:
    objects = render()
    host_paths = {v["name"] for v in pod_spec(objects)["volumes"] if "hostPath" in v}
    for mount in container(objects)["volumeMounts"]:
        assert mount.get("mountPropagation") != "Bidirectional"  # privileged containers only
        if mount["name"] in host_paths and mount["name"] != "bpffs":
            assert mount.get("readOnly") is True, mount


# -- probes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeCase:
    probe: str
    path: str
    reason: str


PROBE_CASES = [
    ProbeCase("startupProbe", "/healthz", "the API answers once the datapath is loaded"),
    ProbeCase("livenessProbe", "/healthz", "alive = the process serves"),
    ProbeCase("readinessProbe", "/readyz", "ready = attached and the first set applied"),
]


@pytest.mark.parametrize("port", [9474, 8081, 443])
@pytest.mark.parametrize("case", PROBE_CASES, ids=lambda c: c.probe)
def test_probes_hit_the_agent_port(case: ProbeCase, port: int) -> None:
    agent = container(render(spec=make_spec(agent={"port": port})))
    probe = agent[case.probe]
    assert probe["httpGet"]["path"] == case.path, case.reason
    assert probe["httpGet"]["port"] == port, "hostNetwork: the probe hits the node IP:port"
    assert probe["httpGet"]["scheme"] == "HTTPS", "the agent serves nothing but TLS"
    assert "host" not in probe["httpGet"], "the pod IP is the node IP the agent binds"
    assert agent["ports"] == [
        {"name": "api", "containerPort": port, "hostPort": port, "protocol": "TCP"}
    ]


# -- owners, labels, selectors ----------------------------------------------------------------


def test_every_object_is_owned_by_the_acceleration() -> None:
    for kind, obj in render("mesh-a").items():
        assert obj["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "meshaccel.io/v1alpha1",
                "kind": "MeshAcceleration",
                "name": "mesh-a",
                "uid": UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ], kind


def test_labels_and_selector_agree() -> None:
    objects = render("mesh-a")
    expected = {
        "app.kubernetes.io/name": "meshaccel",
        "app.kubernetes.io/component": "agent",
        "app.kubernetes.io/managed-by": "meshaccel-operator",
        "meshaccel.io/acceleration": "mesh-a",
    }
    for kind, obj in objects.items():
        assert obj["metadata"]["labels"] == expected, kind
    daemon_set = objects["DaemonSet"]
    selector = daemon_set["spec"]["selector"]["matchLabels"]
    template_labels = daemon_set["spec"]["template"]["metadata"]["labels"]
    assert selector == rendering.agent_pod_selector("mesh-a")
    assert selector.items() <= template_labels.items(), "the selector must match its pods"
    assert selector[rendering.AGENT_SELECTOR_LABEL] == "mesh-a"
    assert "app.kubernetes.io/managed-by" not in selector, "selectors are immutable: stable keys"


def test_selectors_of_two_accelerations_do_not_overlap() -> None:
    a = rendering.agent_pod_selector("mesh-a")
    b_labels = render("mesh-b")["DaemonSet"]["spec"]["template"]["metadata"]["labels"]
    assert not a.items() <= b_labels.items()


def test_update_strategy_never_runs_two_agents_on_a_node() -> None:
    strategy = render()["DaemonSet"]["spec"]["updateStrategy"]
    assert strategy == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0},
    }


# -- the config hash --------------------------------------------------------------------------


@dataclass(frozen=True)
class HashCase:
    reason: str
    spec: dict[str, Any]
    changes: bool
    tls: AgentTLS = TLS


BASE_SPEC: dict[str, Any] = {"namespaceSelector": {}}
HASH_CASES = [
    HashCase("nothing changed", {}, False),
    HashCase(
        "new TLS material: the agents reload it, no restart", {}, False, make_pki().agent_tls()
    ),
    HashCase("a datapath switch", {"datapath": {"skMsgRedirect": False}}, True),
    HashCase("the sk_msg budget", {"datapath": {"skMsgRedirectBudget": 2 << 20}}, True),
    HashCase(
        "sk_msg into apps travels in the pod set",
        {"datapath": {"skMsgToAppsSelector": {"matchLabels": {"a": "b"}}}},
        False,
    ),
    HashCase("a capacity", {"datapath": {"maxPods": 2048}}, True),
    HashCase("the log level", {"agent": {"logLevel": "debug"}}, True),
    HashCase("the API port", {"agent": {"port": 9475}}, True),
    HashCase("a field that is not the agent's", {"mode": "linkerd"}, False),
    HashCase(
        "pod selection is the operator's", {"podSelector": {"matchLabels": {"a": "b"}}}, False
    ),
    HashCase("exclusions travel in the pod set", {"exclusions": {"outboundPorts": [5432]}}, False),
    HashCase(
        "the pull policy rolls the pods by itself", {"agent": {"imagePullPolicy": "Always"}}, False
    ),
    HashCase("a default written out is no change", {"datapath": {"maxPods": 1024}}, False),
]


def template_hash(spec: dict[str, Any], tls: AgentTLS) -> str:
    objects = render(spec=make_spec(**spec), tls=tls)
    annotations = objects["DaemonSet"]["spec"]["template"]["metadata"]["annotations"]
    value: str = annotations[rendering.CONFIG_HASH_ANNOTATION]
    return value


@pytest.mark.parametrize("case", HASH_CASES, ids=lambda c: c.reason)
def test_config_hash(case: HashCase) -> None:
    base = template_hash({}, TLS)
    changed = template_hash(case.spec, case.tls) != base
    assert changed is case.changes, case.reason


def test_the_key_is_only_in_the_secret() -> None:
    objects = render()
    rendered = yaml.safe_dump(objects["DaemonSet"]) + yaml.safe_dump(objects["ConfigMap"])
    assert "PRIVATE KEY" not in rendered and TLS.key_pem not in rendered


# -- passthrough from spec.agent --------------------------------------------------------------


@dataclass(frozen=True)
class PassCase:
    reason: str
    agent: dict[str, Any]
    check: Callable[[dict[str, Any]], bool]


PASS_CASES = [
    PassCase(
        "default tolerations: every taint (the node's pods need their agent)",
        {},
        lambda pod: pod["tolerations"] == [{"operator": "Exists"}],
    ),
    PassCase(
        "tolerations copied, unset fields left out",
        {
            "tolerations": [
                {"key": "gpu", "operator": "Equal", "value": "yes", "effect": "NoSchedule"},
                {"key": "x", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30},
            ]
        },
        lambda pod: (
            pod["tolerations"]
            == [
                {"key": "gpu", "operator": "Equal", "value": "yes", "effect": "NoSchedule"},
                {"key": "x", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30},
            ]
        ),
    ),
    PassCase("no tolerations", {"tolerations": []}, lambda pod: pod["tolerations"] == []),
    PassCase(
        "nodeSelector merged with linux-only",
        {"nodeSelector": {"meshaccel.io/enabled": "true"}},
        lambda pod: (
            pod["nodeSelector"] == {"kubernetes.io/os": "linux", "meshaccel.io/enabled": "true"}
        ),
    ),
    PassCase(
        "the user's kubernetes.io/os wins",
        {"nodeSelector": {"kubernetes.io/os": "other"}},
        lambda pod: pod["nodeSelector"] == {"kubernetes.io/os": "other"},
    ),
    PassCase(
        "default priority class",
        {},
        lambda pod: pod["priorityClassName"] == "system-node-critical",
    ),
    PassCase(
        "priority class copied",
        {"priorityClassName": "mesh-critical"},
        lambda pod: pod["priorityClassName"] == "mesh-critical",
    ),
    PassCase(
        "an empty priority class is left out",
        {"priorityClassName": ""},
        lambda pod: "priorityClassName" not in pod,
    ),
    PassCase(
        "pull policy copied",
        {"imagePullPolicy": "Always"},
        lambda pod: pod["containers"][0]["imagePullPolicy"] == "Always",
    ),
    PassCase(
        "default pull policy",
        {},
        lambda pod: pod["containers"][0]["imagePullPolicy"] == "IfNotPresent",
    ),
    PassCase(
        "resources copied",
        {"resources": {"requests": {"cpu": "100m", "memory": 1 << 27}, "limits": {"cpu": 1}}},
        lambda pod: (
            pod["containers"][0]["resources"]
            == {"requests": {"cpu": "100m", "memory": 1 << 27}, "limits": {"cpu": 1}}
        ),
    ),
    PassCase(
        "default resources",
        {},
        lambda pod: (
            pod["containers"][0]["resources"]
            == {"requests": {"cpu": "50m", "memory": "96Mi"}, "limits": {"memory": "256Mi"}}
        ),
    ),
    PassCase(
        "no resources at all: the field is left out",
        {"resources": {}},
        lambda pod: "resources" not in pod["containers"][0],
    ),
]


@pytest.mark.parametrize("case", PASS_CASES, ids=lambda c: c.reason)
def test_agent_spec_passthrough(case: PassCase) -> None:
    pod = pod_spec(render(spec=make_spec(agent=case.agent)))
    assert case.check(pod), f"{case.reason}: {pod}"


# -- the image: the operator's, never the resource's -------------------------------------------


@dataclass(frozen=True)
class ImageCase:
    reason: str
    image: AgentImage
    reference: str
    pull_secrets: list[dict[str, str]] | None  # None: no imagePullSecrets field at all


IMAGE_CASES = [
    ImageCase("a tag", IMAGE, IMAGE.reference, None),
    ImageCase(
        "pinned by digest",
        AgentImage("registry.example/agent@sha256:" + "b" * 64),
        "registry.example/agent@sha256:" + "b" * 64,
        None,
    ),
    ImageCase(
        "a tag and a digest (the runtime pulls the digest)",
        AgentImage("registry.example:5000/agent:1.0@sha256:" + "c" * 64),
        "registry.example:5000/agent:1.0@sha256:" + "c" * 64,
        None,
    ),
    ImageCase(
        "pull secrets, in order",
        AgentImage(IMAGE.reference, ("registry-a", "registry-b")),
        IMAGE.reference,
        [{"name": "registry-a"}, {"name": "registry-b"}],
    ),
]


@pytest.mark.parametrize("case", IMAGE_CASES, ids=lambda c: c.reason)
def test_the_image_and_pull_secrets_are_the_operators(case: ImageCase) -> None:
    pod = pod_spec(render(image=case.image))
    assert pod["containers"][0]["image"] == case.reference, case.reason
    assert pod.get("imagePullSecrets") == case.pull_secrets, case.reason


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        ("attacker.example/root-shell:1", "the review finding: a resource named any image"),
        (LEGACY_DEFAULT_AGENT_IMAGE, "the value the 0.1 CRD wrote into every resource"),
    ],
)
def test_spec_agent_image_never_reaches_the_daemonset(image: str, reason: str) -> None:
    """Before issue 12, spec.agent.image was the container's image: whoever could create a
    MeshAcceleration ran any image as uid 0 with BPF and NET_ADMIN on every node."""
    objects = render(spec=make_spec(agent={"image": image}))
    assert container(objects)["image"] == IMAGE.reference, reason
    assert image not in yaml.safe_dump(list(objects.values())), reason
    assert objects == render(), "the field changes nothing at all"


# -- the rest of the pod: the operator's settings, which a resource may narrow, not widen --------

MESH_POOL = {"pool": "mesh"}
AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {
                    "matchExpressions": [
                        {"key": "node.example/arch", "operator": "In", "values": ["amd64"]}
                    ]
                }
            ]
        },
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {
                "weight": 10,
                "preference": {"matchExpressions": [{"key": "ssd", "operator": "Exists"}]},
            }
        ],
    },
    "podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [
            {
                "labelSelector": {"matchLabels": {"app": "noisy"}},
                "topologyKey": "kubernetes.io/hostname",
            }
        ]
    },
}
OPERATOR_RESOURCES = {"requests": {"cpu": "200m", "memory": "192Mi"}, "limits": {"memory": "1Gi"}}


@dataclass(frozen=True)
class PodSettingsCase:
    reason: str
    settings: dict[str, Any]  # AgentPod fields
    agent: dict[str, Any]  # the resource's spec.agent
    check: Callable[[dict[str, Any]], bool]  # on the pod template (metadata and spec)


POD_SETTINGS_CASES = [
    PodSettingsCase(
        "annotations added beside the config hash",
        {"annotations": {"example.com/team": "mesh", "sidecar.istio.io/inject": "false"}},
        {},
        lambda t: (
            t["metadata"]["annotations"]["example.com/team"] == "mesh"
            and t["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
            and rendering.CONFIG_HASH_ANNOTATION in t["metadata"]["annotations"]
        ),
    ),
    PodSettingsCase(
        "labels added beside the selector's",
        {"labels": {"cost-center": "mesh"}},
        {},
        lambda t: (
            t["metadata"]["labels"]
            == {
                "cost-center": "mesh",
                **rendering.agent_pod_selector("demo"),
                rendering.MANAGED_BY_LABEL: "meshaccel-operator",
            }
        ),
    ),
    PodSettingsCase(
        "the operator's node selector, and the resource's on other keys",
        {"node_selector": MESH_POOL},
        {"nodeSelector": {"zone": "a"}},
        lambda t: (
            t["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux", "zone": "a", **MESH_POOL}
        ),
    ),
    PodSettingsCase(
        "the resource cannot move its agents off the operator's nodes",
        {"node_selector": MESH_POOL},
        {"nodeSelector": {"pool": "everything"}},
        lambda t: t["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux", **MESH_POOL},
    ),
    PodSettingsCase(
        "affinity as given",
        {"affinity": AFFINITY},
        {},
        lambda t: t["spec"]["affinity"] == AFFINITY,
    ),
    PodSettingsCase("no affinity: no field", {}, {}, lambda t: "affinity" not in t["spec"]),
    PodSettingsCase(
        "the operator's priority class wins over the resource's",
        {"priority_class_name": "mesh-agents"},
        {"priorityClassName": "system-node-critical"},
        lambda t: t["spec"]["priorityClassName"] == "mesh-agents",
    ),
    PodSettingsCase(
        "no operator priority class: the resource's",
        {},
        {"priorityClassName": "mesh-critical"},
        lambda t: t["spec"]["priorityClassName"] == "mesh-critical",
    ),
    PodSettingsCase(
        "a resource without resources gets the operator's default",
        {"resources": OPERATOR_RESOURCES},
        {},
        lambda t: t["spec"]["containers"][0]["resources"] == OPERATOR_RESOURCES,
    ),
    PodSettingsCase(
        "the 0.1 default stored in an older resource counts as unset",
        {"resources": OPERATOR_RESOURCES},
        {
            "resources": {
                "requests": {"cpu": "50m", "memory": "96Mi"},
                "limits": {"memory": "256Mi"},
            }
        },
        lambda t: t["spec"]["containers"][0]["resources"] == OPERATOR_RESOURCES,
    ),
    PodSettingsCase(
        "a resource's own resources win",
        {"resources": OPERATOR_RESOURCES},
        {"resources": {"requests": {"cpu": "1"}}},
        lambda t: t["spec"]["containers"][0]["resources"] == {"requests": {"cpu": "1"}},
    ),
]


@pytest.mark.parametrize("case", POD_SETTINGS_CASES, ids=lambda c: c.reason)
def test_the_operators_pod_settings(case: PodSettingsCase) -> None:
    objects = render(spec=make_spec(agent=case.agent), pod=AgentPod.model_validate(case.settings))
    template = objects["DaemonSet"]["spec"]["template"]
    assert case.check(template), f"{case.reason}: {template}"
    selector = objects["DaemonSet"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items(), "the selector still matches"


def test_pod_settings_roll_the_agents_but_are_not_their_settings() -> None:
    """The template changes (the DaemonSet rolls), the agent's settings file does not."""
    before = render()
    after = render(pod=AgentPod.model_validate({"annotations": {"example.com/a": "b"}}))
    assert before["DaemonSet"]["spec"]["template"] != after["DaemonSet"]["spec"]["template"]
    assert before["ConfigMap"] == after["ConfigMap"]
    assert render(pod=AgentPod()) == before, "the default settings are no settings"


def test_the_operators_own_keys_cannot_be_taken_over() -> None:
    """Every label and annotation the renderer sets on the agents' pods is refused as a setting
    (the DaemonSet's selector and the config hash stay the operator's)."""
    template = render()["DaemonSet"]["spec"]["template"]["metadata"]
    for label in template["labels"]:
        with pytest.raises(ValueError, match="the operator's own labels"):
            AgentPod.model_validate({"labels": {label: "x"}})
    for annotation in template["annotations"]:
        with pytest.raises(ValueError, match="the operator's own annotations"):
            AgentPod.model_validate({"annotations": {annotation: "x"}})


# -- long names -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NameCase:
    name: str
    reason: str


NAME_CASES = [
    NameCase("a", "the shortest name"),
    NameCase("x" * 41, "the longest that keeps a whole DaemonSet name (57 = 16 + 41)"),
    NameCase("x" * 42, "one longer: the DaemonSet name is hash-shortened"),
    NameCase("y" * 63, "the longest label value"),
    NameCase("y" * 64, "one longer: the label value and instance are hash-shortened"),
    NameCase("z" * 253, "the longest cluster-scoped name"),
    # The DaemonSet cut (30 characters of the name) ends in '.', the label cut (52) in '-'.
    NameCase("team.mesh." + "a" * 19 + "." + "b" * 21 + "-" + "c" * 20, "a '.' or '-' at the cut"),
    NameCase("a" * 40 + "-" * 20 + "b", "dashes at the cut are dropped, not kept before '-'"),
]


def rendered_names(name: str) -> dict[str, str]:
    return {kind: obj["metadata"]["name"] for kind, obj in render(name).items()}


@pytest.mark.parametrize("case", NAME_CASES, ids=lambda c: f"{len(c.name)}:{c.reason}")
def test_long_names(case: NameCase, tmp_path: Path) -> None:
    names = rendered_names(case.name)
    for kind, name in names.items():
        assert len(name) <= 253 and DNS_SUBDOMAIN.match(name), f"{kind} {name!r}: {case.reason}"
    assert len(names["DaemonSet"]) <= rendering.MAX_DAEMONSET_NAME, case.reason
    assert len(names["DaemonSet"] + "-abcde") <= 63, "pod names stay DNS labels"
    if len("meshaccel-agent-" + case.name) <= rendering.MAX_DAEMONSET_NAME:
        assert names["DaemonSet"] == "meshaccel-agent-" + case.name, "short names are kept"

    label = rendering.acceleration_label(case.name)
    assert len(label) <= 63 and LABEL_VALUE.match(label), case.reason
    assert (label == case.name) is (len(case.name) <= 63), case.reason
    instance = rendering.agent_instance(case.name)
    assert INSTANCE.match(instance), f"{instance!r} is not a valid agent instance"
    objects = render(case.name)
    assert agent_view(objects, tmp_path).instance == instance
    for obj in objects.values():
        for value in obj["metadata"]["labels"].values():
            assert len(value) <= 63 and LABEL_VALUE.match(value), value
    # Deterministic: the same name renders the same names.
    assert rendered_names(case.name) == names


def test_long_names_that_share_a_prefix_stay_distinct() -> None:
    first, second = "p" * 100 + "-one", "p" * 100 + "-two"
    a, b = rendered_names(first), rendered_names(second)
    for kind in a:
        assert a[kind] != b[kind], kind
    assert rendering.acceleration_label(first) != rendering.acceleration_label(second)
    assert rendering.agent_instance(first) != rendering.agent_instance(second)


# -- the official schemas ---------------------------------------------------------------------

SCHEMA_SPECS = {
    "defaults": {},
    "everything set": {
        "agent": {
            "imagePullPolicy": "Never",
            "port": 443,
            "nodeSelector": {"pool": "mesh"},
            "tolerations": [
                {
                    "key": "k",
                    "operator": "Equal",
                    "value": "v",
                    "effect": "NoExecute",
                    "tolerationSeconds": 5,
                }
            ],
            "resources": {"requests": {"cpu": 1, "memory": "1Gi"}, "limits": {"cpu": "2"}},
            "priorityClassName": "",
            "logLevel": "error",
        },
        "datapath": {"skMsgRedirect": False, "maxPods": 65536, "maxConnections": 1 << 22},
    },
}


# Every operator setting at once, each field of the affinity's kinds.
FULL_POD = AgentPod.model_validate(
    {
        "annotations": {"example.com/owner": "platform"},
        "labels": {"cost-center": "mesh"},
        "node_selector": MESH_POOL,
        "affinity": {
            **AFFINITY,
            "podAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 1,
                        "podAffinityTerm": {
                            "labelSelector": {
                                "matchExpressions": [
                                    {"key": "app", "operator": "In", "values": ["db"]}
                                ]
                            },
                            "namespaceSelector": {},
                            "namespaces": ["shop"],
                            "topologyKey": "topology.kubernetes.io/zone",
                        },
                    }
                ]
            },
        },
        "priority_class_name": "mesh-agents",
        "resources": OPERATOR_RESOURCES,
    }
)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", ["demo", "n" * 253])
@pytest.mark.parametrize("spec_name", list(SCHEMA_SPECS))
@pytest.mark.parametrize("pod", [None, FULL_POD], ids=["default-settings", "every-setting"])
def test_objects_pass_the_official_schema(
    version: str, name: str, spec_name: str, pod: AgentPod | None
) -> None:
    image = AgentImage("registry.example/agent@sha256:" + "a" * 64, ("pull-one", "pull-two"))
    for obj in rendering.agent_objects(
        name,
        UID,
        make_spec(**SCHEMA_SPECS[spec_name]),
        namespace=NAMESPACE,
        tls=TLS,
        image=image,
        pod=pod,
    ):
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_schema_check_is_strict() -> None:
    """The validation above would catch a misspelt field (so passing it means something)."""
    daemon_set = render()["DaemonSet"]
    daemon_set["spec"]["template"]["spec"]["containers"][0]["securityContext"]["priviliged"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemon_set, KUBERNETES_VERSIONS[-1], strict=True)
