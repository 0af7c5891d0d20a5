"""The agent's settings as plain data: what the agent can be told, its defaults and bounds.

The agent reads them (``meshaccel.agent.config``: file < environment < flags); the operator
renders and checks them for the DaemonSet it writes. Field names are the YAML keys.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from meshaccel.contract.logs import LogFormat, LogLevel
from meshaccel.contract.tls import TLSFiles

PIN_ROOT = Path("/sys/fs/bpf/meshaccel")
#: Unread bytes a receiving socket may hold before its sender falls back to TCP. Measured
#: (docs/benchmarks.md): request/response traffic never reached it, a bulk stream falls back
#: after about this much, and 64 KiB to 4 MiB changed no workload's rate; a single response
#: larger than it, on a connection whose receiver sends nothing meanwhile, takes TCP.
DEFAULT_REDIRECT_BUDGET = 1 << 20
MIN_REDIRECT_BUDGET = 64 << 10
MAX_REDIRECT_BUDGET = 64 << 20

# 9474: unassigned by IANA and clear of what usually listens on a node's host network
# (kubelet 10250, 9443 controller-runtime webhooks, 9100 node-exporter, Istio's 150xx).
DEFAULT_PORT = 9474
MAX_PODS_LIMIT = 65536
# The local, read-only channel of `meshaccel-agent status|pods` (an emptyDir in the pod).
LOCAL_SOCKET = Path("/run/meshaccel/local/agent.sock")
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the terminating NUL
# Kubernetes' default terminationMessagePath: the kubelet makes the file and reads 4 KiB of it.
TERMINATION_MESSAGE_PATH = Path("/dev/termination-log")


@dataclass(frozen=True)
class Capacities:
    """max_entries of the maps; every object must agree, so they are set in one place."""

    pods: int = 1024
    pod_ports: int = 16384
    pod_cidrs: int = 4096
    connections: int = 65536

    def max_entries(self) -> dict[str, int]:
        return {
            "pods": self.pods,
            "pod_ips": 2 * self.pods,
            "inbound_listeners": self.pods,
            "app_reuse": 2 * self.pods,
            "pod_ports": self.pod_ports,
            "outbound_excluded_cidrs": self.pod_cidrs,
            "outbound_included_cidrs": self.pod_cidrs,
            "handshakes": self.connections,
            "msg_senders": self.connections,
            "msg_receivers": self.connections,
            "receive_queues": self.connections,
        }


DEFAULT_CAPACITIES = Capacities()


class SettingConflict(ValueError):
    """A value that is valid alone but not together with the others: names its field."""

    def __init__(self, field_name: str, why: str) -> None:
        super().__init__(why)
        self.field_name = field_name
        self.why = why


class AgentSettings(BaseModel):
    """Everything the agent can be told. Field names are the YAML keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # -- API ---------------------------------------------------------------------------------
    listen_address: str = Field(default="0.0.0.0", description="IP address the HTTP API listens on")
    port: int = Field(default=DEFAULT_PORT, ge=1, le=65535, description="TCP port of the API")
    tls_cert_file: Path | None = Field(
        default=None,
        description="the API's TLS server certificate, PEM (the operator's Secret, mounted)",
    )
    tls_key_file: Path | None = Field(
        default=None, description="the private key of tls_cert_file, PEM"
    )
    tls_client_ca_file: Path | None = Field(
        default=None,
        description="the CA bundle, PEM, that the operator's client certificate must chain to; "
        "the three files are read again when they change",
    )
    insecure_no_token: bool = Field(
        default=False,
        description="serve plain HTTP without authentication (no TLS, no client certificate); "
        "only allowed on a loopback listen address",
    )
    local_socket: Path | None = Field(
        default=LOCAL_SOCKET,
        description="unix socket serving GET /v1/status, /v1/pods and /v1/health to "
        "`meshaccel-agent status|pods` inside the agent's pod (mode 0600, no TLS: whoever "
        "can exec into the pod); none: no local socket",
    )
    termination_message_path: Path | None = Field(
        default=TERMINATION_MESSAGE_PATH,
        description="where a start-up stopped by a failed check writes the check report "
        "(the kubelet's terminationMessagePath; written only if the file exists)",
    )
    # -- datapath ----------------------------------------------------------------------------
    attach_cgroup: Path | None = Field(
        default=None,
        description="cgroup v2 directory the programs attach to (default: the cgroup2 mount)",
    )
    pin_root: Path = Field(default=PIN_ROOT, description="bpffs directory holding the instances")
    instance: str = Field(
        default="default",
        pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$",
        description="name of this datapath under pin_root (one per node unless testing)",
    )
    bpf_objects: Path | None = Field(
        default=None, description="directory of the *.bpf.o objects (default: the package's)"
    )
    max_pods: int = Field(
        default=Capacities.pods,
        ge=1,
        le=MAX_PODS_LIMIT,
        description="pods this node can accelerate (size of the pods maps; needs a fresh load)",
    )
    max_pod_ports: int = Field(
        default=Capacities.pod_ports,
        ge=1,
        le=1 << 20,
        description="excluded ports of all pods together, mesh ports included",
    )
    max_pod_cidrs: int = Field(
        default=Capacities.pod_cidrs,
        ge=1,
        le=1 << 20,
        description="excluded (and, separately, included) CIDRs of all pods together",
    )
    max_connections: int = Field(
        default=Capacities.connections,
        ge=1024,
        le=1 << 22,
        description="steered connections and sockets tracked at once (LRU maps, sockhashes)",
    )
    same_node_inbound: bool = Field(
        default=True, description="steer sidecars' connects to same-node pods to their 15006"
    )
    sk_msg_redirect: bool = Field(
        default=True,
        description="move bytes socket-to-socket between same-node sockets while the receiver "
        "keeps up: each direction of a connection falls back to TCP for good once its "
        "receiver holds more than sk_msg_redirect_budget bytes unread (docs/datapath.md)",
    )
    sk_msg_redirect_budget: int = Field(
        default=DEFAULT_REDIRECT_BUDGET,
        ge=MIN_REDIRECT_BUDGET,
        le=MAX_REDIRECT_BUDGET,
        description="bytes a receiving socket may hold unread before that direction falls "
        "back to TCP (needs a fresh load)",
    )
    drain_seconds: float = Field(
        default=2.0,
        ge=0,
        le=600,
        description="grace period of an uninstall in which accepted connections still get "
        "SO_ORIGINAL_DST",
    )
    uninstall_on_exit: bool = Field(
        default=False,
        description="on SIGTERM/SIGINT detach everything and remove the pins (default: keep "
        "them, a restart or upgrade)",
    )
    reload_on_change: bool = Field(
        default=True,
        description="at start, replace a pinned datapath whose features, sk_msg budget or map "
        "capacities differ from these settings (unload with the drain, load anew) instead of "
        "adopting it (default: yes; no: adopt it as it is and log a warning)",
    )
    # -- pods --------------------------------------------------------------------------------
    node_name: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        max_length=253,
        description="this node's name, for the logs",
    )
    mode: Literal["kubernetes", "standalone"] = Field(
        default="kubernetes",
        description="kubernetes: the operator PUTs the pod set; standalone: read pods_file",
    )
    pods_file: Path | None = Field(
        default=None, description="standalone: YAML pod set (generation + pods), watched"
    )
    pods_poll_seconds: float = Field(
        default=1.0, gt=0, le=60, description="standalone: how often pods_file is checked"
    )
    cgroup_driver: Literal["systemd", "cgroupfs", "auto"] = Field(
        default="auto", description="kubelet's cgroup driver, to find a pod's cgroup by UID"
    )
    kubelet_cgroup_root: Path | None = Field(
        default=None,
        description="directory holding kubelet's kubepods hierarchy (default: the cgroup2 mount)",
    )
    # -- logs --------------------------------------------------------------------------------
    log_format: LogFormat = Field(
        default="json", description="json: one object a line; text: key=value pairs"
    )
    log_level: LogLevel = Field(default="info", description="the least severe level logged")

    @field_validator("listen_address")
    @classmethod
    def _ip_address(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError("must be an IPv4 or IPv6 address") from None

    @field_validator(
        "attach_cgroup",
        "pin_root",
        "kubelet_cgroup_root",
        "local_socket",
        "termination_message_path",
    )
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError("must be an absolute path")
        return value

    @field_validator("local_socket", mode="before")
    @classmethod
    def _socket_path(cls, value: object) -> object:
        if isinstance(value, str) and value.lower() == "none":
            return None
        if value is not None and len(os.fsencode(str(value))) > MAX_SOCKET_PATH:
            raise ValueError(f"a unix socket path holds at most {MAX_SOCKET_PATH} bytes")
        return value

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> AgentSettings:
        # Only `run` serves and reads pods (`show-config` shows what `run` would use):
        # `uninstall` and the inspection commands (status, pods, check, version) need neither.
        serving = (info.context or {}).get("command", "run") in ("run", "show-config")
        loopback = ipaddress.ip_address(self.listen_address).is_loopback
        if self.insecure_no_token and not loopback:
            raise SettingConflict(
                "insecure_no_token",
                f"allowed only when listen_address is a loopback address, not "
                f"{self.listen_address}: an unauthenticated API must not be reachable "
                "from the network",
            )
        tls = {
            name: getattr(self, name)
            for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file")
        }
        given = [name for name, path in tls.items() if path is not None]
        if self.insecure_no_token and given:
            raise SettingConflict(
                "insecure_no_token", f"{given[0]} is set too: choose TLS or no authentication"
            )
        if given and len(given) < len(tls):
            missing = next(name for name in tls if name not in given)
            raise SettingConflict(
                missing, f"{given[0]} is set: TLS needs the certificate, its key and the CA bundle"
            )
        if serving and not given and not self.insecure_no_token:
            raise SettingConflict(
                "tls_cert_file",
                "the API needs TLS: give --tls-cert-file, --tls-key-file and "
                "--tls-client-ca-file (the operator's Secret), or --insecure-no-token with "
                "--listen-address 127.0.0.1 for a local demo",
            )
        if serving and self.mode == "standalone" and self.pods_file is None:
            raise SettingConflict(
                "pods_file", "standalone mode reads its pod set from this file: give --pods-file"
            )
        if self.mode == "kubernetes" and self.pods_file is not None:
            raise SettingConflict(
                "pods_file", "only standalone mode reads a pods file (mode is kubernetes)"
            )
        return self

    # -- what the settings mean to the other modules -----------------------------------------

    @property
    def capacities(self) -> Capacities:
        return Capacities(
            pods=self.max_pods,
            pod_ports=self.max_pod_ports,
            pod_cidrs=self.max_pod_cidrs,
            connections=self.max_connections,
        )

    @property
    def api_is_loopback(self) -> bool:
        return ipaddress.ip_address(self.listen_address).is_loopback

    @property
    def tls_files(self) -> TLSFiles | None:
        """The API's TLS files; None: plain HTTP (insecure_no_token)."""
        if self.tls_cert_file is None or self.tls_key_file is None:
            return None
        if self.tls_client_ca_file is None:
            return None
        return TLSFiles(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)
