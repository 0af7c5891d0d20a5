"""The benchmark's lab: one netlab node, its pods and servers, and switching between configurations.

Pods (netns + cgroup each, on the node's bridge):

* ``client``: Envoy A (uid 1337); the load generators run here (wrk, rr client, iperf3 client).
* ``server``: Envoy B (uid 1337); nginx on 8080 (HTTP), the C rr server on 8081 (1 KB
  request/response), an iperf3 server on 5201 (bulk).
* ``micro``: no Envoy, no iptables; a C rr server as uid 1337 on 15001 (a stand-in sidecar
  listener) and the rr client as root, for the kernel-path micro-benchmark.

Both Envoys run Istio-like virtual listeners (15001 outbound, 15006 inbound, original_dst) with an
HTTP connection manager chain for port 8080 and tcp_proxy for everything else, and the ceiling's
explicit listeners (CEILING_PORTS): the same filters, addressed directly, static clusters.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import quote

from meshaccel.agent.datapath import Datapath
from meshaccel.agent.pods import AcceleratedPod
from meshaccel.contract.modes import ISTIO
from tests.netlab import (
    SIDECAR_IDENTITY,
    EnvoySidecar,
    ExplicitListener,
    IstioInterception,
    Node,
    Pod,
    PodProcess,
)
from tests.netlab.envoy import INBOUND_PASSTHROUGH_SOURCE
from tests.netlab.netns import run_in_netns, socket_in_netns
from tests.waiting import wait_until

from . import bpfstats
from .configs import Config, Route

log = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
RR_SOURCE = BENCH_DIR / "c" / "rr.c"
WRK_SCRIPT = BENCH_DIR / "wrk_json.lua"
PIN_ROOT_PREFIX = "meshaccel-bench-"
PIN_ROOT = Path(f"/sys/fs/bpf/{PIN_ROOT_PREFIX}{os.getpid()}")
INSTANCE = "bench"

Service = Literal["http", "rr", "bulk"]
HTTP_PORT, RR_PORT, BULK_PORT = 8080, 8081, 5201
SERVICE_PORTS: dict[Service, int] = {"http": HTTP_PORT, "rr": RR_PORT, "bulk": BULK_PORT}
SERVICE_PROTOCOLS: dict[Service, Literal["tcp", "http"]] = {
    "http": "http",
    "rr": "tcp",
    "bulk": "tcp",
}
# (Envoy A's explicit listener, Envoy B's explicit listener) of the ceiling, per service.
CEILING_PORTS: dict[Service, tuple[int, int]] = {
    "http": (15101, 15106),
    "rr": (15111, 15116),
    "bulk": (15112, 15117),
}
MICRO_LISTENER_PORT = 15001  # the micro pod's stand-in sidecar listens where Envoy would
MICRO_STEERED_PORT = 7000  # what the micro client connects to when meshaccel steers it
MICRO_STEERED_HOST_INDEX = 250  # an unused address of the node's subnet (never reached)
HTTP_BODY = "meshaccel benchmark: a small static body served by nginx from memory.\n"
UPSTREAM_IDLE_TIMEOUT_S = 1.0  # pooled upstream connections must not outlive a configuration
SERVER_LIFETIME_S = 6 * 3600  # the rr servers exit by themselves after this


@dataclass(frozen=True)
class Tools:
    """Executables the benchmark runs; perf is optional (profiles are skipped without it)."""

    wrk: str
    iperf3: str
    nginx: str
    gcc: str
    bpftool: str | None
    perf: str | None

    @classmethod
    def find(cls) -> Tools:
        required = {name: shutil.which(name) for name in ("wrk", "iperf3", "nginx", "gcc")}
        for name in ("nginx",):  # Debian puts it in /usr/sbin, not always on a root PATH
            if required[name] is None and Path(f"/usr/sbin/{name}").exists():
                required[name] = f"/usr/sbin/{name}"
        missing = sorted(name for name, path in required.items() if path is None)
        if missing:
            raise RuntimeError(
                f"missing tools: {', '.join(missing)} (bash scripts/bootstrap.sh installs them: "
                "wrk, iperf3, nginx-light, gcc)"
            )
        return cls(
            wrk=str(required["wrk"]),
            iperf3=str(required["iperf3"]),
            nginx=str(required["nginx"]),
            gcc=str(required["gcc"]),
            bpftool=shutil.which("bpftool") or _sbin("bpftool"),
            perf=_working_perf(),
        )


def _sbin(name: str) -> str | None:
    path = Path("/usr/sbin") / name
    return str(path) if path.exists() else None


def _working_perf() -> str | None:
    """perf, if it runs on this kernel (Debian's wrapper refuses kernels it has no build for)."""
    perf = shutil.which("perf")
    if perf is None:
        return None
    try:
        completed = subprocess.run(
            [perf, "stat", "-e", "task-clock", "--", "true"],
            capture_output=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return perf if completed.returncode == 0 else None


def compile_rr(gcc: str, out_dir: Path) -> Path:
    """Build the C request/response tool into out_dir (reachable by the sidecar uid)."""
    binary = out_dir / "rr"
    subprocess.run(
        [gcc, "-O2", "-Wall", "-pthread", "-o", str(binary), str(RR_SOURCE)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    binary.chmod(0o755)
    return binary


def render_nginx_conf(prefix: Path, port: int) -> str:
    """nginx-light as one process (no master) answering every request with a fixed body from
    memory, keep-alive connections never closed by the server during a run."""
    body = HTTP_BODY.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f"""daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {{
        listen {port};
        location / {{
            default_type text/plain;
            return 200 "{body}";
        }}
    }}
}}
"""


def wait_listening(netns: str, host: str, port: int, *, timeout: float = 15.0) -> None:
    """Poll a TCP connect from inside the netns (as the harness: no pod cgroup, no datapath)."""

    def accepts() -> bool:
        with contextlib.closing(socket_in_netns(netns, timeout=1.0)) as sock:
            try:
                sock.connect((host, port))
            except OSError:
                return False
            return True

    wait_until(accepts, timeout=timeout, interval=0.05, what=f"a listener on {host}:{port}")


def envoy_stats(sidecar: EnvoySidecar, regex: str) -> dict[str, int]:
    """Integer stats whose name matches `regex` (Envoy's admin /stats?filter=)."""
    _, body = sidecar.admin_get(f"/stats?filter={quote(regex)}", timeout=5.0)
    stats: dict[str, int] = {}
    for line in body.splitlines():
        key, sep, value = line.partition(": ")
        if sep and value.strip().isdigit():
            stats[key] = int(value)
    return stats


# Traffic a listener's chains carried: HTTP requests, and bytes for tcp_proxy (no pooling there).
ACTIVITY_REGEX = r"^(http\..*\.downstream_rq_total|tcp\..*\.downstream_cx_rx_bytes_total)$"
# Connections still open: pooled upstreams and downstreams (the admin listener excluded).
OPEN_CONNECTIONS_REGEX = (
    r"^(cluster\..*\.upstream_cx_active|listener\.0\.0\.0\.0_.*\.downstream_cx_active)$"
)


def listener_activity(stats: Mapping[str, int]) -> dict[str, int]:
    """{stat prefix (listener name): requests or bytes} from ACTIVITY_REGEX stats."""
    activity: dict[str, int] = {}
    for name, value in stats.items():
        kind, _, rest = name.partition(".")
        prefix = rest.rsplit(".", 1)[0]
        if kind in ("http", "tcp") and prefix != "admin":
            activity[prefix] = activity.get(prefix, 0) + value
    return activity


class BenchLab:
    """The pods, servers and Envoys of the benchmark on an entered Node; see the module doc."""

    def __init__(self, node: Node, tools: Tools) -> None:
        self.node = node
        self.tools = tools
        self.rr = compile_rr(tools.gcc, node.workdir)
        # IPv4-only pods: the benchmark measures the IPv4 path, its Envoys and rules exactly
        # as before the lab became dual-stack (comparable with earlier results).
        self.client = node.add_pod("client", ipv6=False)
        self.server = node.add_pod("server", ipv6=False)
        self.micro = node.add_pod("micro", ipv6=False)
        for pod in (self.client, self.server):
            # http-close opens a connection per request: let TIME_WAIT ports be reused.
            run_in_netns(pod.netns, ["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])
        self.micro_steered_host = str(node.subnet.network_address + MICRO_STEERED_HOST_INDEX)
        self.servers: dict[Service, PodProcess] = {}
        self._start_servers()
        self.envoy_a = self._start_envoy(self.client, outbound=True)
        self.envoy_b = self._start_envoy(self.server, outbound=False)
        self.datapath: Datapath | None = None
        self.program_ids: dict[str, int] = {}
        self.config: Config | None = None
        node.callback(self.unload_datapath)

    # ------------------------------------------------------------------ setup

    def _start_servers(self) -> None:
        server = self.server
        prefix = server.workdir / "nginx"
        for sub in ("", "tmp"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(render_nginx_conf(prefix, HTTP_PORT))
        self.servers["http"] = server.run(
            [self.tools.nginx, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)],
            name="nginx",
        )
        self.servers["rr"] = server.run(
            [
                str(self.rr),
                "server",
                "--port",
                str(RR_PORT),
                "--lifetime",
                str(SERVER_LIFETIME_S),
            ],
            name="rr-server",
        )
        self.servers["bulk"] = server.run(
            [self.tools.iperf3, "-s", "-p", str(BULK_PORT)], name="iperf3-server"
        )
        self.micro_server = self.micro.run(
            [
                str(self.rr),
                "server",
                "--port",
                str(MICRO_LISTENER_PORT),
                "--lifetime",
                str(SERVER_LIFETIME_S),
            ],
            name="micro-server",
            run_as=SIDECAR_IDENTITY,
        )
        for service, port in SERVICE_PORTS.items():
            try:
                wait_listening(server.netns, str(server.ip), port)
            except TimeoutError:
                raise RuntimeError(
                    f"{service} server did not listen:\n{self.servers[service].describe()}"
                ) from None
        wait_listening(self.micro.netns, "127.0.0.1", MICRO_LISTENER_PORT)

    def _start_envoy(self, pod: Pod, *, outbound: bool) -> EnvoySidecar:
        explicit = []
        for service, (client_port, server_port) in CEILING_PORTS.items():
            protocol = SERVICE_PROTOCOLS[service]
            if outbound:
                listener = ExplicitListener(
                    f"ceiling-{service}-out",
                    client_port,
                    protocol,
                    upstream=(str(self.server.ip), server_port),
                )
            else:
                listener = ExplicitListener(
                    f"ceiling-{service}-in",
                    server_port,
                    protocol,
                    upstream=(str(self.server.ip), SERVICE_PORTS[service]),
                    source_address=INBOUND_PASSTHROUGH_SOURCE,
                )
            explicit.append(listener)
        return pod.start_envoy(
            protocol="tcp",
            http_ports=(HTTP_PORT,),
            explicit_listeners=tuple(explicit),
            access_log=False,  # Istio's default; a log line per request is not interception
            upstream_idle_timeout_s=UPSTREAM_IDLE_TIMEOUT_S,
        )

    # ------------------------------------------------------------------ addressing

    def target(self, service: Service, config: Config) -> tuple[str, int]:
        """Where the client connects for `service` under `config`."""
        if config.route is Route.EXPLICIT:
            return "127.0.0.1", CEILING_PORTS[service][0]
        return str(self.server.ip), SERVICE_PORTS[service]

    def micro_target(self) -> tuple[str, int]:
        """With meshaccel loaded, any destination (connect4 steers it to the stand-in
        sidecar on 127.0.0.1:15001); without, 127.0.0.1:15001 itself over loopback TCP."""
        if self.datapath is not None:
            return self.micro_steered_host, MICRO_STEERED_PORT
        return "127.0.0.1", MICRO_LISTENER_PORT

    def expected_listeners(self, service: Service, config: Config) -> tuple[str, str] | None:
        """The (Envoy A, Envoy B) listeners that must carry the traffic; None: neither Envoy."""
        if config.route is Route.DIRECT:
            return None
        if config.route is Route.EXPLICIT:
            return f"ceiling-{service}-out", f"ceiling-{service}-in"
        return "virtualOutbound", "virtualInbound"

    def sidecar_pids(self) -> dict[str, int]:
        return {"envoy_client": self.envoy_a.pid, "envoy_server": self.envoy_b.pid}

    # ------------------------------------------------------------------ configurations

    def apply(self, config: Config) -> None:
        """Put `config` in place: no connection from the previous one may be reused."""
        self.wait_quiet()
        self.unload_datapath()
        for pod in (self.client, self.server):
            if config.iptables and pod.interception is None:
                pod.install_istio_iptables(IstioInterception())
            elif not config.iptables and pod.interception is not None:
                pod.remove_istio_iptables()
        if config.features is not None:
            self.datapath = Datapath.load(
                self.node.cgroup.path,
                instance=INSTANCE,
                features=config.features,
                redirect_budget=config.redirect_budget,
                pin_root=PIN_ROOT,
            )
            # (d+) opts in every pod: client and server, and the micro pod, whose "sidecar"
            # answers its app over the app's own socket.
            for pod in (self.client, self.server, self.micro):
                self.datapath.put_pod(
                    AcceleratedPod.in_mesh(
                        ISTIO, pod.cgroup_id, pod.ip, sk_msg_to_app=config.sk_msg_to_app
                    )
                )
            self.program_ids = bpfstats.program_ids(self.datapath.pins)
        self.config = config

    def unload_datapath(self) -> None:
        if self.datapath is not None:
            datapath, self.datapath, self.program_ids = self.datapath, None, {}
            datapath.unload(drain_seconds=0.2)

    def open_connections(self) -> dict[str, int]:
        stats = {}
        for label, envoy in (("A", self.envoy_a), ("B", self.envoy_b)):
            for name, value in envoy_stats(envoy, OPEN_CONNECTIONS_REGEX).items():
                if value:
                    stats[f"{label}:{name}"] = value
        return stats

    def wait_quiet(self, timeout: float = 20.0) -> None:
        """Until neither Envoy holds a connection (pools close after UPSTREAM_IDLE_TIMEOUT_S)."""
        deadline = time.monotonic() + timeout
        while True:
            still_open = self.open_connections()
            if not still_open:
                return
            if time.monotonic() > deadline:
                log.warning("connections still open after %ss: %s", timeout, still_open)
                return
            time.sleep(0.2)


def remove_stale_pins() -> list[str]:
    """Unload benchmark datapaths whose process is gone (a run that was SIGKILLed)."""
    removed = []
    for root in Path("/sys/fs/bpf").glob(f"{PIN_ROOT_PREFIX}*"):
        pid_text = root.name.removeprefix(PIN_ROOT_PREFIX)
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _alive(int(pid_text)):
            continue
        for instance in [p for p in root.iterdir() if p.is_dir()]:
            with contextlib.suppress(Exception):
                Datapath.adopt(instance=instance.name, pin_root=root).unload(drain_seconds=0)
                removed.append(str(instance))
        with contextlib.suppress(OSError):
            root.rmdir()
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
