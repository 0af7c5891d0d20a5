"""Nodes and pods: a node netns holding a bridge, pod netns on veths, one child cgroup per pod.

Every pod has an IPv4 address in the node's subnet and, unless asked not to, an IPv6 ULA address
in the lab's own prefix: 198.18.X.N -> fd00:198:18:X::N (the node's bridge is ...::1/64), added
without DAD so that it is usable at once, and routed on the bridge's link only.

Nothing is created in the host's root netns: the bridge and both ends of every veth live in
namespaces this harness made. Everything is undone by Node.__exit__ (an ExitStack), also when setup
fails half-way.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Unpack

from .app_handles import (
    EchoClientOptions,
    EchoClientResult,
    EchoClientRun,
    EchoServer,
    apps_argv,
    echo_client_argv,
    echo_client_deadline,
    getsockopt_probe_argv,
    parse_getsockopt_probe,
)
from .cgroups import TEST_CGROUP_PREFIX, TestCgroup, cgroup_id
from .commands import run_command
from .counters import NetCounters, read_net_counters
from .envoy import (
    ISTIO_LISTENERS,
    EnvoyBootstrapOptions,
    EnvoySidecar,
    ExplicitListener,
    ProxyListeners,
    envoy_binary_for,
)
from .families import Family, IPAddress, format_address
from .istio_iptables import IstioInterception, remove_istio_iptables
from .meshes import Interception, LabMesh, install_interception
from .netns import create_netns, delete_netns, netns_cookie, run_in_netns, socket_in_netns
from .processes import SIDECAR_IDENTITY, PodProcess, RunAs, pod_command

NETLAB_PREFIX = "meshaccel"
ALLOWED_NETWORK = ipaddress.IPv4Network("198.18.0.0/15")  # RFC 2544 benchmark range
ALLOWED_NETWORK6 = ipaddress.IPv6Network("fd00::/8")  # unique local addresses (RFC 4193)
DEFAULT_SUBNET = "198.18.0.0/24"
BRIDGE_NAME = "mxbr0"
POD_INTERFACE = "eth0"
FIRST_POD_HOST = 10
_POD_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,11}$")  # "mx-<name>" must fit IFNAMSIZ (15)
_node_numbers = itertools.count()


def lab_ipv6(ip: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    """The lab's IPv6 twin of an IPv4 address: 198.18.X.N -> fd00:198:18:X::N (the decimal
    octets written as they are, so that the two read alike)."""
    _, second, third, fourth = ip.packed
    return ipaddress.IPv6Address(f"fd00:198:{second}:{third}::{fourth}")


def lab_ipv6_network(network: ipaddress.IPv4Network) -> ipaddress.IPv6Network:
    """The /64 holding the IPv6 twins of a node subnet's addresses."""
    twin = lab_ipv6(network.network_address)
    return ipaddress.IPv6Network(f"{twin}/64", strict=False)


class Node:
    """One test node: netns `meshaccel-<pid>-<n>-node` with bridge mxbr0, cgroup
    `<cgroup2>/meshaccel-test-<pid>-<n>`, temp dir `/tmp/meshaccel-<pid>-<n>-*`.
    Use as a context manager.
    """

    def __init__(self, *, subnet: str = DEFAULT_SUBNET) -> None:
        network = ipaddress.ip_network(subnet)
        if not (isinstance(network, ipaddress.IPv4Network) and network.subnet_of(ALLOWED_NETWORK)):
            raise ValueError(f"node subnet {subnet} must lie in {ALLOWED_NETWORK}")
        if network.prefixlen > 28:
            raise ValueError(f"node subnet {subnet} is too small")
        self.number = next(_node_numbers)
        self.token = f"{NETLAB_PREFIX}-{os.getpid()}-{self.number}"
        self.netns = f"{self.token}-node"
        self.subnet = network
        self.gateway = network.network_address + 1
        self.subnet6 = lab_ipv6_network(network)
        if not self.subnet6.subnet_of(ALLOWED_NETWORK6):  # traffic stays in the lab's ULAs
            raise ValueError(f"node IPv6 subnet {self.subnet6} must lie in {ALLOWED_NETWORK6}")
        self.gateway6 = lab_ipv6(self.gateway)
        self.bridge = BRIDGE_NAME
        self.cgroup = TestCgroup(f"{TEST_CGROUP_PREFIX}{os.getpid()}-{self.number}")
        self.pods: dict[str, Pod] = {}
        self.workdir = Path()
        self._hosts = itertools.count(FIRST_POD_HOST)
        self._stack = contextlib.ExitStack()
        self._entered = False

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Node:
        if self._entered:
            raise RuntimeError("a Node can be entered once")
        self._entered = True
        try:
            self._setup()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def callback(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run function(*args) at teardown (LIFO, before everything created earlier is removed)."""
        self._stack.callback(function, *args, **kwargs)

    def _setup(self) -> None:
        stack = self._stack
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.token}-"))
        stack.callback(shutil.rmtree, self.workdir, ignore_errors=True)
        self.workdir.chmod(0o755)  # the sidecar uid must reach its files below
        self.cgroup.create()
        stack.callback(self.cgroup.remove)
        create_netns(self.netns)
        stack.callback(delete_netns, self.netns)
        # Per-netns on this kernel (br_netfilter built in): bridged frames skip iptables here only.
        for family in ("iptables", "ip6tables", "arptables"):
            run_in_netns(self.netns, ["sysctl", "-qw", f"net.bridge.bridge-nf-call-{family}=0"])
        ip = ["ip", "-n", self.netns]
        run_command([*ip, "link", "set", "lo", "up"])
        run_command([*ip, "link", "add", self.bridge, "type", "bridge"])
        run_command(
            [*ip, "addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge]
        )
        run_command([*ip, "link", "set", self.bridge, "up"])
        gateway6 = f"{self.gateway6}/{self.subnet6.prefixlen}"
        run_command([*ip, "-6", "addr", "add", gateway6, "dev", self.bridge, "nodad"])

    # ------------------------------------------------------------------ pods

    def add_pod(self, name: str, *, cgroup_subpath: str | None = None, ipv6: bool = True) -> Pod:
        """A pod netns `<token>-<name>` with eth0 on the bridge, lo up, a default route via the
        bridge address, and its own cgroup `<test cgroup>/<cgroup_subpath or "pod-<name>">`.
        ``ipv6``: also its IPv6 twin address (lab_ipv6), on-link on the bridge's /64."""
        if not self._entered:
            raise RuntimeError("enter the Node (with ...) before adding pods")
        if not _POD_NAME.match(name) or name in self.pods:
            raise ValueError(f"bad or duplicate pod name {name!r}")
        address = self.subnet.network_address + next(self._hosts)
        if address not in self.subnet or address == self.subnet.broadcast_address:
            raise ValueError(f"subnet {self.subnet} is full")
        pod = Pod(self, name, address, self.cgroup.child(cgroup_subpath or f"pod-{name}"))
        pod.ipv6 = lab_ipv6(address) if ipv6 else None
        self.pods[name] = pod
        pod_ns, node_side = pod.netns, f"mx-{name}"
        create_netns(pod_ns)
        self.callback(delete_netns, pod_ns)
        run_command(["ip", "-n", pod_ns, "link", "set", "lo", "up"])
        run_command(
            [
                "ip",
                "-n",
                self.netns,
                "link",
                "add",
                node_side,
                "type",
                "veth",
                "peer",
                "name",
                POD_INTERFACE,
                "netns",
                pod_ns,
            ]
        )
        run_command(["ip", "-n", self.netns, "link", "set", node_side, "master", self.bridge, "up"])
        run_command(
            [
                "ip",
                "-n",
                pod_ns,
                "addr",
                "add",
                f"{address}/{self.subnet.prefixlen}",
                "dev",
                POD_INTERFACE,
            ]
        )
        run_command(["ip", "-n", pod_ns, "link", "set", POD_INTERFACE, "up"])
        run_command(["ip", "-n", pod_ns, "route", "add", "default", "via", str(self.gateway)])
        if pod.ipv6 is not None:
            prefix = f"{pod.ipv6}/{self.subnet6.prefixlen}"
            # nodad: usable at once, no tentative second during which bind() and REDIRECT fail.
            run_command(
                ["ip", "-n", pod_ns, "-6", "addr", "add", prefix, "dev", POD_INTERFACE, "nodad"]
            )
        pod.workdir.mkdir()
        pod.workdir.chmod(0o755)  # whatever the umask: the sidecar uid traverses it
        return pod

    def track(self, process: PodProcess) -> PodProcess:
        """Stop this process (by PID) at teardown."""
        self.callback(process.stop)
        return process


class Pod:
    """A pod on a Node. Create with Node.add_pod()."""

    def __init__(self, node: Node, name: str, ip: ipaddress.IPv4Address, cgroup_dir: Path) -> None:
        self.node = node
        self.name = name
        self.ip = ip
        self.ipv6: ipaddress.IPv6Address | None = None  # set by Node.add_pod
        self.netns = f"{node.token}-{name}"
        self.cgroup_dir = cgroup_dir
        self.workdir = node.workdir / name
        self.interception: Interception | None = None
        self.mesh: LabMesh | None = None  # the mesh that built it (mesh.add_mesh_pod)
        self.sidecar: EnvoySidecar | None = None
        self.servers: dict[int, EchoServer] = {}
        self._process_numbers = itertools.count()

    def __repr__(self) -> str:
        return f"Pod({self.name!r}, ip={self.ip}, ipv6={self.ipv6}, netns={self.netns!r})"

    @property
    def cgroup_id(self) -> int:
        return cgroup_id(self.cgroup_dir)

    def netns_cookie(self) -> int:
        return netns_cookie(self.netns)

    def ip_of(self, family: Family) -> IPAddress:
        """The pod's address of that family (an error if it has none)."""
        if family == "ipv4":
            return self.ip
        if self.ipv6 is None:
            raise ValueError(f"{self} has no IPv6 address")
        return self.ipv6

    def host(self, family: Family = "ipv4") -> str:
        """The pod's address of that family as a client names it."""
        return str(self.ip_of(family))

    def address(self, port: int, family: Family = "ipv4") -> str:
        """ "ip:port" ("[ip]:port" for IPv6), as Envoy's access log and apps.py print it."""
        return format_address(self.ip_of(family), port)

    # ------------------------------------------------------------------ processes

    def command(self, argv: Sequence[str], run_as: RunAs | None = None) -> list[str]:
        """The argv that runs `argv` in this pod's netns and cgroup (optionally via setpriv)."""
        return pod_command(self.netns, self.cgroup_dir, argv, run_as)

    def run(
        self,
        argv: Sequence[str],
        *,
        name: str | None = None,
        run_as: RunAs | None = None,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> PodProcess:
        """Start a long-running process in the pod; stopped by PID at node teardown."""
        label = f"{name or Path(argv[0]).name}-{next(self._process_numbers)}"
        process = PodProcess(
            label, self.command(argv, run_as), log_dir=self.workdir, cwd=cwd, env=env
        )
        return self.node.track(process)

    def run_to_completion(
        self, argv: Sequence[str], *, timeout: float, run_as: RunAs | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command in the pod (netns + cgroup); killed after `timeout` seconds."""
        return subprocess.run(
            self.command(argv, run_as),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    def socket(
        self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM, timeout: float = 5.0
    ) -> socket.socket:
        """A socket in the pod's netns owned by the test process (root, NOT the pod's cgroup)."""
        return socket_in_netns(self.netns, family, kind, timeout=timeout)

    def net_counters(self) -> NetCounters:
        return read_net_counters(self.netns)

    # ------------------------------------------------------------------ mesh pieces

    def install_istio_iptables(self, config: IstioInterception | None = None) -> str:
        """Istio's rules, for ip6tables too when the pod has an IPv6 address."""
        return self.install_interception(config or IstioInterception())

    def install_interception(self, config: Interception) -> str:
        """Any mesh's rules (tests/netlab/meshes.py); they live in the pod's nat tables, ip and
        (when the pod has an IPv6 address) ip6."""
        self.interception = config
        return install_interception(self.netns, config, ipv6=self.ipv6 is not None)

    def remove_istio_iptables(self) -> None:
        remove_istio_iptables(self.netns)
        self.interception = None

    def start_envoy(
        self,
        *,
        protocol: Literal["tcp", "http"] = "tcp",
        identity: RunAs = SIDECAR_IDENTITY,
        listeners: ProxyListeners = ISTIO_LISTENERS,
        ready_timeout: float = 20.0,
        http_ports: tuple[int, ...] = (),
        explicit_listeners: tuple[ExplicitListener, ...] = (),
        access_log: bool = True,
        upstream_idle_timeout_s: float | None = None,
    ) -> EnvoySidecar:
        """Start the sidecar as ``identity`` (Istio's 1337) on ``listeners`` (Istio's) and wait
        until its admin /ready says LIVE. The other options go to EnvoyBootstrapOptions (the
        benchmark's variants)."""
        if self.sidecar is not None:
            raise RuntimeError(f"{self} already has a sidecar")
        envoy_dir = self.workdir / "envoy"
        envoy_dir.mkdir()
        envoy_dir.chmod(0o755)
        os.chown(envoy_dir, identity.uid, identity.gid)
        options = EnvoyBootstrapOptions(
            node_id=f"{self.name}.{self.node.token}",
            access_log_path=envoy_dir / "access.log",
            protocol=protocol,
            admin_port=listeners.admin_port,
            outbound_port=listeners.outbound_port,
            inbound_port=listeners.inbound_port,
            outbound_address=listeners.outbound_address,
            inbound_passthrough_source=listeners.inbound_passthrough_source,
            http_ports=http_ports,
            explicit_listeners=explicit_listeners,
            access_log=access_log,
            upstream_idle_timeout_s=upstream_idle_timeout_s,
            ipv6=self.ipv6 is not None,
        )
        binary = envoy_binary_for(identity.uid, identity.gid, self.node.workdir)
        sidecar = EnvoySidecar(
            netns=self.netns,
            cgroup_dir=self.cgroup_dir,
            workdir=envoy_dir,
            options=options,
            identity=identity,
            binary=binary,
        )
        self.node.track(sidecar.process)
        sidecar.wait_ready(ready_timeout)
        self.sidecar = sidecar
        return sidecar

    def start_echo_server(
        self, port: int, *, read_api: str = "recv", read_pause: float = 0.0
    ) -> EchoServer:
        """An echo server reading with ``read_api``, sleeping ``read_pause`` after every read."""
        log_path = self.workdir / f"echo-{port}-{next(self._process_numbers)}.jsonl"
        argv = ["echo-server", "--port", str(port), "--read-api", read_api]
        argv += ["--read-pause", str(read_pause), "--log", str(log_path)]
        process = self.run(apps_argv(*argv), name=f"echo-{port}")
        server = EchoServer(process, port, read_api, log_path)
        server.wait_listening()
        self.servers[port] = server
        return server

    def echo_client(
        self, target: str, port: int, **options: Unpack[EchoClientOptions]
    ) -> EchoClientResult:
        """Run apps.py echo-client in this pod (its netns and cgroup) against target:port."""
        argv = echo_client_argv(target, port, **options)
        completed = self.run_to_completion(argv, timeout=echo_client_deadline(options))
        return EchoClientResult.parse(completed.returncode, completed.stdout, completed.stderr)

    def start_echo_client(
        self, target: str, port: int, **options: Unpack[EchoClientOptions]
    ) -> EchoClientRun:
        """Start an echo client in the background, usually paced (``pace_seconds``) so that each
        connection stays open while its bytes trickle through: run.wait_connected(), cause the
        event, then run.wait() -> EchoClientResult. Stopped by PID at node teardown."""
        options.setdefault("nbytes", 256 * 1024)
        argv = echo_client_argv(target, port, progress=True, **options)
        process = self.run(argv, name="echo-client")
        return EchoClientRun(
            process,
            connections=options.get("connections", 1),
            deadline=echo_client_deadline(options),
        )

    def getsockopt_probe(
        self, run_as: RunAs | None = None, family: Family = "ipv4"
    ) -> dict[str, Any]:
        """apps.py getsockopt-probe in this pod's netns and cgroup (as run_as after setup), on
        sockets of ``family``."""
        completed = self.run_to_completion(getsockopt_probe_argv(run_as, family), timeout=30)
        return parse_getsockopt_probe(completed.returncode, completed.stdout, completed.stderr)

    def request(
        self, target: str, port: int, message: str = "ping", *, timeout: float = 10.0
    ) -> dict[str, Any]:
        """One-shot request/response (apps.py request) from this pod; returns its JSON result."""
        argv = apps_argv(
            "request",
            "--host",
            target,
            "--port",
            str(port),
            "--message",
            message,
            "--timeout",
            str(timeout),
        )
        completed = self.run_to_completion(argv, timeout=timeout + 10)
        lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise RuntimeError(
                f"request printed nothing (rc={completed.returncode}): {completed.stderr[-2000:]}"
            )
        result: dict[str, Any] = json.loads(lines[-1])
        return result
