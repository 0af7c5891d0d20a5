"""The node agents' objects for one MeshAcceleration: pure functions, no I/O.

:func:`agent_objects` turns a MeshAcceleration's name, uid and spec, the agents' image and
the rest of their pod from the operator's settings (:class:`~.config.AgentImage`, never from the
spec, and :class:`~.config.AgentPod`, which the spec may narrow but not widen) and their TLS
material (:class:`~.credentials.AgentTLS`), into the four objects the operator applies in its
namespace: a ServiceAccount, the Secret holding the API's TLS server certificate, its key and
the CA bundle the operator's client certificate must chain to, the ConfigMap holding the
agent's settings file (``agent.yaml``) and the agents' DaemonSet. The same input always gives
the same output, byte for byte, so the operator can compare what it rendered with what is
stored and a spec change shows up as a new pod-template hash. The TLS material is not in that
hash: agents re-read it when kubelet updates the mounted Secret, and a rotation restarts
nothing (docs/security.md).

Why each security setting of the DaemonSet is what it is (and what was measured on a real
kernel to decide it) is in ``docs/security.md``; the capability set is :func:`agent_capabilities`
(:data:`AGENT_CAPABILITIES`, plus PERFMON with skMsgRedirect), which
``tests/agent_lifecycle/test_capabilities.py`` proves both sufficient and minimal by running the
real agent under it. The chart's ValidatingAdmissionPolicy
(``charts/meshaccel/templates/agent-admission-policy.yaml``) allows the operator's ServiceAccount
no DaemonSet beyond what this module renders; ``tests/chart/test_admission_policy.py`` holds
the two together.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any, Final

import yaml

from meshaccel.contract.settings import LOCAL_SOCKET, TERMINATION_MESSAGE_PATH, AgentSettings
from meshaccel.operator.config import AgentImage, AgentPod
from meshaccel.operator.credentials import TLS_CA, TLS_CERT, TLS_KEY, AgentTLS
from meshaccel.operator.models import (
    API_VERSION,
    KIND,
    LEGACY_DEFAULT_AGENT_RESOURCES,
    MeshAccelerationSpec,
    ResourceRequirements,
)

# -- names ------------------------------------------------------------------------------------

AGENT_SELECTOR_LABEL: Final = "meshaccel.io/acceleration"
NAME_LABEL: Final = "app.kubernetes.io/name"
COMPONENT_LABEL: Final = "app.kubernetes.io/component"
MANAGED_BY_LABEL: Final = "app.kubernetes.io/managed-by"
CONFIG_HASH_ANNOTATION: Final = "meshaccel.io/config-hash"

CONTAINER_NAME: Final = "agent"
AGENT_COMMAND: Final = ("meshaccel-agent", "run")
CONFIG_KEY: Final = "agent.yaml"
TLS_KEYS: Final = (TLS_CERT, TLS_KEY, TLS_CA)  # the Secret's keys, the files of its volume

# A DNS subdomain (ServiceAccount, Secret, ConfigMap, DaemonSet names).
MAX_RESOURCE_NAME: Final = 253
# Label values, and the agent's `instance` (pattern ^[a-z0-9][a-z0-9_.-]{0,62}$).
MAX_LABEL_VALUE: Final = 63
# The DaemonSet's pods are named "<daemonset>-<5 random characters>": keeping the DaemonSet's
# name to 57 characters keeps every pod name a valid 63-character DNS label (a pod's hostname)
# that still starts with the whole DaemonSet name, so `kubectl get pods` shows whose it is.
MAX_DAEMONSET_NAME: Final = 63 - len("-xxxxx")
_HASH_CHARS: Final = 10  # 40 bits of sha256: collisions between two names are not a concern


def _fit(name: str, limit: int) -> str:
    """``name`` if it fits in ``limit`` characters, else a prefix of it plus a hash of all of it.

    Deterministic (the same long name always gives the same result) and distinct for names that
    share the kept prefix. The prefix loses trailing '-' and '.' so that the result stays a valid
    DNS subdomain and label value (a DNS label must not end in '-' nor be followed by '.-').
    """
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:_HASH_CHARS]
    prefix = name[: limit - _HASH_CHARS - 1].rstrip("-.")
    return f"{prefix}-{digest}"


def _named(prefix: str, acceleration: str, limit: int = MAX_RESOURCE_NAME) -> str:
    # Hash the whole generated name, not just the acceleration: names stay distinct per prefix.
    return _fit(f"{prefix}{acceleration}", limit)


def serviceaccount_name(acceleration: str) -> str:
    return _named("meshaccel-agent-", acceleration)


def secret_name(acceleration: str) -> str:
    return _named("meshaccel-agent-tls-", acceleration)


def legacy_secret_name(acceleration: str) -> str:
    """The Secret that held the agents' bearer token before mutual TLS (the operator deletes
    it: no agent accepts a token any more)."""
    return _named("meshaccel-agent-token-", acceleration)


def configmap_name(acceleration: str) -> str:
    return _named("meshaccel-agent-config-", acceleration)


def daemonset_name(acceleration: str) -> str:
    return _named("meshaccel-agent-", acceleration, MAX_DAEMONSET_NAME)


def acceleration_label(acceleration: str) -> str:
    """The value of :data:`AGENT_SELECTOR_LABEL`: the name, hash-shortened past 63 characters."""
    return _fit(acceleration, MAX_LABEL_VALUE)


def agent_instance(acceleration: str) -> str:
    """The agent's ``instance`` (its pins live in ``<pin_root>/<instance>``).

    Derived from the name only, never from the spec: a spec change rolls the agents, and the new
    agent must find and adopt the datapath the old one pinned (no connection notices).
    MeshAcceleration names are DNS subdomains (lowercase letters, digits, '-', '.'), which the
    agent's pattern accepts once they are at most 63 characters long.
    """
    return _fit(acceleration, MAX_LABEL_VALUE)


def agent_pod_selector(acceleration: str) -> dict[str, str]:
    """Labels that select exactly this acceleration's agent pods (the DaemonSet's selector).

    A DaemonSet's selector cannot change after creation: it holds only labels that never do.
    """
    return {
        NAME_LABEL: "meshaccel",
        COMPONENT_LABEL: "agent",
        AGENT_SELECTOR_LABEL: acceleration_label(acceleration),
    }


def _labels(acceleration: str) -> dict[str, str]:
    return {**agent_pod_selector(acceleration), MANAGED_BY_LABEL: "meshaccel-operator"}


# -- what the container sees ------------------------------------------------------------------

# bpffs of the host, at the same path as on the host: the pins outlive the agent (restarts and
# upgrades adopt them), and `bpftool` on the node finds them where the docs say. The agent
# insists that /sys/fs/bpf itself is a bpffs (it would mount one there, which a container
# without CAP_SYS_ADMIN cannot), so no other container path would do.
BPFFS_PATH: Final = PurePosixPath("/sys/fs/bpf")
PIN_ROOT: Final = BPFFS_PATH / "meshaccel"
# The host's cgroup2 root over the container's own /sys/fs/cgroup. The agent finds the cgroup2
# mount in /proc/self/mountinfo and prefers a mount whose root is "/": in a container with a
# cgroup namespace the runtime's /sys/fs/cgroup is such a mount, but it is only the container's
# own cgroup. A host root mounted anywhere else shows up with root "/.." and is passed over, and
# the agent would then refuse to attach outside "the cgroup2 mount". Mounted here, the only
# cgroup2 tree at /sys/fs/cgroup is the host's: the programs attach to the node's root cgroup
# and pods are found by UID under kubepods, whatever the hierarchy (unified or hybrid).
CGROUP_PATH: Final = PurePosixPath("/sys/fs/cgroup")
CONFIG_DIR: Final = PurePosixPath("/etc/meshaccel")
CONFIG_FILE: Final = CONFIG_DIR / CONFIG_KEY
TLS_DIR: Final = PurePosixPath("/var/run/meshaccel/tls")

# Linux capabilities of the agent container (after dropping ALL), with the reason for each.
# Measured on Linux 6.18 by tests/agent_lifecycle/test_capabilities.py: the agent loads,
# attaches, serves, applies a pod set, restarts (adopting its pins) and uninstalls with exactly
# these (PERFMON only with skMsgRedirect), and fails without any one of them. Not needed
# (measured): CAP_SYS_ADMIN, CAP_PERFMON without skMsgRedirect (the programs then never reach
# the one helper that needs it), CAP_SYS_RESOURCE (BPF memory is charged to the cgroup since
# 5.11, no RLIMIT_MEMLOCK), CAP_DAC_OVERRIDE (every file it touches is root's).
AGENT_CAPABILITIES: Final[Mapping[str, str]] = {
    # map_create and prog_load refuse every map type meshaccel uses (hash, LRU, LPM trie,
    # per-CPU array, sockhash) without CAP_BPF (or CAP_SYS_ADMIN, which is far broader).
    "BPF": "create the datapath's maps and load its programs (bpf(BPF_MAP_CREATE, BPF_PROG_LOAD))",
    # cgroup/connect4, cgroup/getsockopt, sockops and sk_msg are "networking" program types and
    # SOCKHASH a networking map: the kernel loads them only for CAP_NET_ADMIN.
    "NET_ADMIN": "load the cgroup/connect4, cgroup/getsockopt, sockops and sk_msg programs and "
    "create the SOCKHASH",
}
# Only with skMsgRedirect (the default): the sk_msg program reads how much its receiving socket
# holds unread through bpf_skc_to_tcp_sock, which the kernel offers only to loaders with
# CAP_PERFMON ("program of this type cannot use helper bpf_skc_to_tcp_sock#137" without it).
PERFMON_REASON: Final = (
    "let the sk_msg program read how much the receiving socket holds unread "
    "(bpf_skc_to_tcp_sock), which bounds what skMsgRedirect queues on it"
)
# Only when the API port is below 1024 (the default, 9474, is not): binding it needs this.
NET_BIND_SERVICE_REASON: Final = "bind the API to a port below 1024"
PRIVILEGED_PORTS_END: Final = 1024


def agent_capabilities(port: int, *, sk_msg_redirect: bool) -> tuple[str, ...]:
    """The capabilities the agent container adds for an API on ``port`` and a datapath with
    or without sk_msg redirection (sorted)."""
    names = set(AGENT_CAPABILITIES)
    if sk_msg_redirect:
        names.add("PERFMON")
    if port < PRIVILEGED_PORTS_END:
        names.add("NET_BIND_SERVICE")
    return tuple(sorted(names))


# -- the objects ------------------------------------------------------------------------------


def agent_settings(acceleration: str, spec: MeshAccelerationSpec) -> dict[str, Any]:
    """The agent's settings file, as a mapping (the ConfigMap holds it as YAML).

    Only what does not differ between nodes: the listen address (the node's IP) and the node
    name come from the pod's environment (MESHACCEL_LISTEN_ADDRESS, MESHACCEL_NODE_NAME), which
    take precedence over the file. attach_cgroup and kubelet_cgroup_root stay at their default,
    the cgroup2 mount the agent finds, which is the host's root (see :data:`CGROUP_PATH`).
    """
    datapath = spec.datapath
    return {
        "mode": "kubernetes",
        "instance": agent_instance(acceleration),
        "port": spec.agent.port,
        "tls_cert_file": str(TLS_DIR / TLS_CERT),
        "tls_key_file": str(TLS_DIR / TLS_KEY),
        "tls_client_ca_file": str(TLS_DIR / TLS_CA),
        "pin_root": str(PIN_ROOT),
        "same_node_inbound": datapath.sameNodeInbound,
        "sk_msg_redirect": datapath.skMsgRedirect,
        "sk_msg_redirect_budget": datapath.skMsgRedirectBudget,
        "max_pods": datapath.maxPods,
        "max_connections": datapath.maxConnections,
        "max_pod_ports": datapath.maxPodPorts,
        "max_pod_cidrs": datapath.maxPodCidrs,
        # A restart or an upgrade keeps the datapath; removing it is the operator's decision.
        "uninstall_on_exit": False,
        "log_format": "json",
        "log_level": str(spec.agent.logLevel),
    }


def render_agent_config(acceleration: str, spec: MeshAccelerationSpec) -> str:
    """``agent.yaml``, checked by the agent's own settings model (a ValueError if refused)."""
    settings = agent_settings(acceleration, spec)
    # The same validation the agent runs at start-up: a spec the agent would refuse (exit 2,
    # crash-looping on every node) fails here instead, before anything is applied.
    AgentSettings.model_validate(settings, context={"command": "run"})
    return yaml.safe_dump(settings, sort_keys=False)


def config_hash(config: str) -> str:
    """The pod-template annotation: changes when the settings do, and only then (not with the
    TLS material, which the agents reload)."""
    return hashlib.sha256(config.encode()).hexdigest()


def _owner_reference(acceleration: str, uid: str) -> dict[str, Any]:
    # A namespaced dependent of a cluster-scoped owner is allowed (the reverse is not): deleting
    # the MeshAcceleration garbage-collects all four objects.
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": acceleration,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(name: str, acceleration: str, uid: str, namespace: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "labels": _labels(acceleration),
        "ownerReferences": [_owner_reference(acceleration, uid)],
    }


def agent_objects(
    acceleration: str,
    uid: str,
    spec: MeshAccelerationSpec,
    *,
    namespace: str,
    tls: AgentTLS,
    image: AgentImage,
    pod: AgentPod | None = None,
) -> list[dict[str, Any]]:
    """[ServiceAccount, Secret, ConfigMap, DaemonSet] of the agents of ``acceleration``.

    ``tls`` is the agents' server certificate and key and the CA bundle they accept the
    operator's client certificate from (the Secret holds them).
    ``image`` is the operator's agent image; ``spec.agent.image`` is never read. ``pod`` is
    the rest of the operator's settings for the agents' pods (None: the defaults).
    Raises ValueError (pydantic's ValidationError) when the agent would refuse its settings.
    """
    config = render_agent_config(acceleration, spec)
    service_account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(serviceaccount_name(acceleration), acceleration, uid, namespace),
        # The agent never talks to the API server: no credentials to steal from a node.
        "automountServiceAccountToken": False,
    }
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(secret_name(acceleration), acceleration, uid, namespace),
        "type": "Opaque",
        "data": {
            key: base64.b64encode(value.encode()).decode()
            for key, value in zip(
                TLS_KEYS, (tls.cert_pem, tls.key_pem, tls.bundle_pem), strict=True
            )
        },
    }
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(configmap_name(acceleration), acceleration, uid, namespace),
        "data": {CONFIG_KEY: config},
    }
    daemon_set = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _metadata(daemonset_name(acceleration), acceleration, uid, namespace),
        "spec": {
            "selector": {"matchLabels": agent_pod_selector(acceleration)},
            "updateStrategy": {
                "type": "RollingUpdate",
                # One node at a time and never two agents on a node: two agents would adopt
                # the same pinned datapath and both write its maps.
                "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0},
            },
            "template": _pod_template(
                acceleration, spec, image, pod or AgentPod(), config_hash(config)
            ),
        },
    }
    return [service_account, secret, config_map, daemon_set]


def agent_resources(spec: MeshAccelerationSpec, pod: AgentPod) -> ResourceRequirements:
    """The resource's ``spec.agent.resources``, or the operator's default when it sets none
    (the 0.1 CRD's default, which the API server stored in every resource then, is none)."""
    chosen = spec.agent.resources
    if chosen is None or chosen.model_dump(mode="json") == LEGACY_DEFAULT_AGENT_RESOURCES:
        return pod.resources
    return chosen


def _pod_template(
    acceleration: str, spec: MeshAccelerationSpec, image: AgentImage, pod: AgentPod, hash_: str
) -> dict[str, Any]:
    agent = spec.agent
    template: dict[str, Any] = {
        "serviceAccountName": serviceaccount_name(acceleration),
        "automountServiceAccountToken": False,
        # The API on the node's own address: the operator reaches https://<node IP>:<port>
        # without a Service, and the agent sees the node's network namespace it serves.
        "hostNetwork": True,
        "dnsPolicy": "ClusterFirstWithHostNet",
        # Pods are found by their cgroup (kubelet's kubepods tree), never through /proc/<pid>:
        # the host's PID and IPC namespaces are not needed.
        "hostPID": False,
        "hostIPC": False,
        "enableServiceLinks": False,
        # SIGTERM: stop serving (at most 5 s for requests in flight), finish the apply in
        # progress, close the maps; the pins stay. 30 s is plenty and bounds a stuck rollout.
        "terminationGracePeriodSeconds": 30,
        # The operator's node selector last: a resource adds keys, it cannot change the
        # operator's (so its agents never run on nodes the operator's settings exclude).
        "nodeSelector": {"kubernetes.io/os": "linux", **agent.nodeSelector, **pod.node_selector},
        "tolerations": [t.model_dump(mode="json", exclude_none=True) for t in agent.tolerations],
        "containers": [_container(spec, image, agent_resources(spec, pod))],
        "volumes": [
            {"name": "bpffs", "hostPath": {"path": str(BPFFS_PATH), "type": "Directory"}},
            {"name": "cgroup", "hostPath": {"path": str(CGROUP_PATH), "type": "Directory"}},
            {
                # Not a subPath mount: kubelet updates the files in place (a rotation).
                "name": "tls",
                "secret": {
                    "secretName": secret_name(acceleration),
                    "defaultMode": 0o400,
                    "items": [{"key": key, "path": key} for key in TLS_KEYS],
                },
            },
            {
                "name": "config",
                "configMap": {
                    "name": configmap_name(acceleration),
                    "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}],
                },
            },
            # The read-only unix socket of `meshaccel-agent status|pods` (the root file system is
            # read-only); in memory, gone with the pod.
            {"name": "local", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        ],
    }
    if image.pull_secrets:
        # Secrets in this namespace (the operator's settings name them, the chart's values).
        template["imagePullSecrets"] = [{"name": name} for name in image.pull_secrets]
    if pod.affinity is not None:
        template["affinity"] = pod.affinity.model_dump(mode="json", exclude_defaults=True)
    # The operator's priority class, when it has one, over the resource's.
    if priority := pod.priority_class_name or agent.priorityClassName:
        template["priorityClassName"] = priority
    return {
        "metadata": {
            # The operator's keys win; its settings cannot name them anyway (config.py).
            "labels": {**pod.labels, **_labels(acceleration)},
            "annotations": {
                **pod.annotations,
                CONFIG_HASH_ANNOTATION: hash_,
                "kubectl.kubernetes.io/default-container": CONTAINER_NAME,
            },
        },
        "spec": template,
    }


def _probe(path: str, port: int, *, period: int, failures: int) -> dict[str, Any]:
    # With hostNetwork the pod's IP is the node's: kubelet probes the address the agent binds,
    # over TLS without a client certificate (it verifies nothing; /healthz and /readyz are open
    # and say only ok or not ok).
    return {
        "httpGet": {"path": path, "port": port, "scheme": "HTTPS"},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def _container(
    spec: MeshAccelerationSpec, image: AgentImage, resources: ResourceRequirements
) -> dict[str, Any]:
    agent = spec.agent
    port = agent.port
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        # The operator's image, whatever spec.agent.image says: this container gets uid 0,
        # BPF and NET_ADMIN and the host's bpffs on every node.
        "image": image.reference,
        "imagePullPolicy": str(agent.imagePullPolicy),
        "command": list(AGENT_COMMAND),
        # A failed start-up check writes its report there; any other failure leaves the
        # log's tail instead. `meshaccel check` and `kubectl describe` show either.
        "terminationMessagePath": str(TERMINATION_MESSAGE_PATH),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "env": [
            {"name": "MESHACCEL_CONFIG", "value": str(CONFIG_FILE)},
            # The agent binds the node's IP (status.podIP under hostNetwork), not 0.0.0.0:
            # its API is not offered on every address the node has.
            {
                "name": "MESHACCEL_LISTEN_ADDRESS",
                "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}},
            },
            {
                "name": "MESHACCEL_NODE_NAME",
                "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.nodeName"}},
            },
            # The root filesystem is read-only: do not even try to write .pyc files.
            {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        ],
        "ports": [{"name": "api", "containerPort": port, "hostPort": port, "protocol": "TCP"}],
        # Loading the datapath comes before the API answers: give it a minute, then liveness.
        "startupProbe": _probe("/healthz", port, period=2, failures=30),
        "livenessProbe": _probe("/healthz", port, period=10, failures=3),
        # Ready = programs attached and the operator's first pod set applied: a rolling update
        # moves to the next node only once this node's agent is really in charge.
        "readinessProbe": _probe("/readyz", port, period=5, failures=2),
        "securityContext": {
            "privileged": False,
            # uid 0: bpffs (mode 0700 on most hosts) and the cgroup tree are root's, and the
            # capabilities below only count for the kernel's owner checks as uid 0 (no
            # CAP_DAC_OVERRIDE needed because every file touched is owned by root).
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {
                "drop": ["ALL"],
                "add": list(agent_capabilities(port, sk_msg_redirect=spec.datapath.skMsgRedirect)),
            },
            # containerd >= 1.7 (and 1.6 since late 2022) allows bpf() in its default profile
            # when CAP_BPF is in the container's bounding set; docs/security.md has the details
            # and the runtimes whose default profile still wants CAP_SYS_ADMIN.
            "seccompProfile": {"type": "RuntimeDefault"},
            # The container runtimes' default AppArmor profile denies "w" on /sys/fs/[^c]*/**:
            # creating and removing pins under /sys/fs/bpf would fail (EACCES) on AppArmor nodes.
            "appArmorProfile": {"type": "Unconfined"},
        },
        "volumeMounts": [
            {
                "name": "bpffs",
                "mountPath": str(BPFFS_PATH),
                # Bidirectional is for privileged containers only, and the agent mounts
                # nothing. HostToContainer: a bpffs the host mounts after the pod started
                # (or mounts again) is seen by the agent instead of the empty sysfs directory.
                "mountPropagation": "HostToContainer",
            },
            # Read-only: the agent opens cgroups O_RDONLY to attach and stats pod cgroups.
            {"name": "cgroup", "mountPath": str(CGROUP_PATH), "readOnly": True},
            {"name": "tls", "mountPath": str(TLS_DIR), "readOnly": True},
            {"name": "config", "mountPath": str(CONFIG_DIR), "readOnly": True},
            {"name": "local", "mountPath": str(LOCAL_SOCKET.parent)},
        ],
    }
    wanted = {key: value for key, value in resources.model_dump(mode="json").items() if value}
    if wanted:
        container["resources"] = wanted
    return container
