"""``meshaccel-agent status|pods|check|version``, the local socket and the termination message.

Everything runs for real: ``check`` against this machine's kernel, with a program of our own
attached to a cgroup of our own (never the root cgroup) to be found as another owner's;
``status`` and ``pods`` against a real agent (standalone, its own cgroup and pins) started here
and stopped by its PID. The report logic (the termination message's size, the socket's
bookkeeping) also has fast tests without the kernel.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import socket
import stat
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from meshaccel.agent import libbpf, preflight, prerequisites
from meshaccel.agent.commands import pods_text
from meshaccel.agent.datapath import CGROUP_HOOKS, PinLayout, default_objects_dir
from meshaccel.agent.libbpf import introspect
from meshaccel.agent.listener import LocalSocket
from meshaccel.agent.preflight import Check, HostReport
from meshaccel.contract.api import AppConnections, AppliedPod, PodsReply
from meshaccel.contract.version import VERSION
from meshaccel.operator.models import DEFAULT_AGENT_PORT
from meshaccel.operator.rendering import agent_capabilities
from tests.agent_lifecycle.harness import (
    PIN_ROOT,
    AgentProcess,
    agent_argv,
    free_port,
    standalone_argv,
    tls_args,
    unload_instance,
    write_yaml,
)
from tests.netlab.cgroups import TEST_CGROUP_PREFIX, TestCgroup, find_cgroup2_mount
from tests.requirements import require_kernel, require_tool

_numbers = itertools.count()
CHECKS = [
    "capabilities",
    "btf",
    "kernel_features",
    "cgroup2",
    "attach_cgroup",
    "bpffs",
    "objects",
    "helpers",
    "conflicting_programs",
]
HOOKS = sorted(hook.link for hook in CGROUP_HOOKS)


@dataclass(frozen=True)
class Done:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def agent(*argv: str, capabilities: Sequence[str] | None = None) -> Done:
    """One ``meshaccel-agent`` command, as ``kubectl exec`` runs it (no MESHACCEL_ variables);
    with ``capabilities``, limited to them as the agent's container is."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHACCEL_")}
    done = subprocess.run(
        [*agent_argv(capabilities), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    return Done(done.returncode, done.stdout, done.stderr)


# -- version --------------------------------------------------------------------------------------


def test_version_names_the_build_python_libbpf_and_kernel() -> None:
    done = agent("version", "-o", "json")
    assert done.returncode == 0, done.stderr
    document = done.json()
    assert set(document) == {"version", "python", "libbpf", "kernel"}
    assert document["version"] == VERSION
    assert document["kernel"] == os.uname().release
    assert re.fullmatch(r"v\d+\.\d+(\.\d+)?", document["libbpf"]), document
    assert re.fullmatch(r"3\.\d+\.\d+\S*", document["python"]), document
    text = agent("version")
    assert text.returncode == 0
    assert text.stdout.splitlines()[0].split() == ["version", VERSION]


def test_output_is_only_for_the_reports() -> None:
    done = agent("run", "-o", "json")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "invalid command line: -o/--output is for check, pods, status, version, not run "
        "(see meshaccel-agent --help)"
    ]


# -- check: this machine ---------------------------------------------------------------------------


@pytest.fixture
def cgroups() -> Iterator[TestCgroup]:
    """A test cgroup (never the root) with children ``node`` (the attach cgroup) and
    ``other`` (a sibling)."""
    require_kernel()
    with TestCgroup(f"{TEST_CGROUP_PREFIX}{os.getpid()}-commands-{next(_numbers)}") as cgroup:
        cgroup.child("node")
        cgroup.child("other")
        yield cgroup


def check(attach: Path, *extra: str, instance: str = "commands") -> Done:
    return agent(
        "check",
        "-o",
        "json",
        f"--attach-cgroup={attach}",
        f"--pin-root={PIN_ROOT}",
        f"--instance={instance}",
        "--node-name=commands",
        *extra,
    )


def by_name(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in document["checks"]}


def test_check_passes_on_this_machine(cgroups: TestCgroup) -> None:
    done = check(cgroups.path / "node")
    assert done.returncode == 0, done.stdout + done.stderr
    document = done.json()
    assert document["node"] == "commands" and document["ok"] is True
    assert [c["name"] for c in document["checks"]] == CHECKS
    for entry in document["checks"]:
        assert set(entry) >= {"name", "ok", "detail", "fix", "level"}, entry
        assert entry["ok"] is True, entry
    checks = by_name(document)
    assert checks["conflicting_programs"]["level"] == "warning"
    assert checks["conflicting_programs"]["programs"] == []
    assert all(checks[name]["level"] == "error" for name in CHECKS[:-1])
    assert str(cgroups.path / "node") in checks["attach_cgroup"]["detail"]
    # Every helper call of the shipped programs was probed (as root: nothing left unprobed).
    programs = len({hook.program for hook in CGROUP_HOOKS}) + 1  # and sk_msg
    assert f"helper calls of {programs} programs offered" in checks["helpers"]["detail"]
    assert "may not probe" not in checks["helpers"]["detail"]
    text = agent("check", f"--attach-cgroup={cgroups.path / 'node'}", f"--pin-root={PIN_ROOT}")
    assert text.returncode == 0
    assert text.stdout.splitlines()[0].endswith(": ok")
    assert [line.split()[0] for line in text.stdout.splitlines()[2:]] == CHECKS


def test_check_fails_with_the_cause_and_the_fix(cgroups: TestCgroup, tmp_path: Path) -> None:
    """Two real failures: no objects where they are looked for, pins not on bpffs."""
    done = check(
        cgroups.path / "node", f"--bpf-objects={tmp_path}", f"--pin-root={tmp_path / 'pins'}"
    )
    assert done.returncode == 1
    document = done.json()
    assert document["ok"] is False
    checks = by_name(document)
    assert [name for name in CHECKS if not checks[name]["ok"]] == [
        "bpffs",
        "objects",
        "helpers",
        "conflicting_programs",
    ]
    assert "is not on a bpf filesystem" in checks["bpffs"]["detail"]
    assert "mount -t bpf bpf /sys/fs/bpf" in checks["bpffs"]["fix"]
    assert str(tmp_path / "connect.bpf.o") in checks["objects"]["detail"]
    assert "make -C bpf" in checks["objects"]["fix"]
    assert checks["helpers"]["detail"].startswith("not checked")
    text = agent("check", f"--bpf-objects={tmp_path}", f"--attach-cgroup={cgroups.path}")
    assert text.returncode == 1
    assert "FAILED (2 checks failed)" in text.stdout.splitlines()[0]
    assert "fix: build them with `make -C bpf`" in text.stdout


class ForeignConnect4:
    """The shipped connect4 program loaded as an object of its own (its own maps, no pins):
    another owner's program, attached to test cgroups only."""

    def __init__(self, stack: ExitStack) -> None:
        self.obj = stack.enter_context(
            libbpf.BpfObject.open(default_objects_dir() / "connect.bpf.o")
        )
        self.obj.load()
        self.program = self.obj.program("redirect_connect4")
        self.info = self.program.info()
        self._stack = stack

    def attach(self, cgroup: Path) -> libbpf.Link:
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            link = self.program.attach_cgroup(fd)
        finally:
            os.close(fd)
        self._stack.callback(link.destroy)
        return link


def test_check_names_another_owners_program_on_an_ancestor(cgroups: TestCgroup) -> None:
    node, other = cgroups.path / "node", cgroups.path / "other"
    with ExitStack() as stack:
        foreign = ForeignConnect4(stack)
        foreign.attach(cgroups.path)  # the attach cgroup's parent: it runs for node's sockets
        on_sibling = ForeignConnect4(stack)
        on_sibling.attach(other)  # runs for other's sockets only: no conflict for node

        done = check(node)
        assert done.returncode == 0, "a conflict is a warning: start-up goes on"
        document = done.json()
        assert document["ok"] is True
        conflict = by_name(document)["conflicting_programs"]
        assert conflict["ok"] is False and conflict["level"] == "warning"
        assert conflict["programs"] == [
            {
                "hook": "connect4",
                "id": foreign.info.id,
                "name": foreign.info.name,
                "cgroup": str(cgroups.path),
            }
        ]
        assert f"connect4: program {foreign.info.id} {foreign.info.name}" in conflict["detail"]
        assert "bpftool cgroup tree" in conflict["fix"]

        # Attached to the attach cgroup itself, it is found there too.
        assert by_name(check(other).json())["conflicting_programs"]["programs"] == [
            {"hook": "connect4", "id": pid, "name": foreign.info.name, "cgroup": where}
            for pid, where in (
                (on_sibling.info.id, str(other)),
                (foreign.info.id, str(cgroups.path)),
            )
        ]
    assert by_name(check(node).json())["conflicting_programs"]["ok"] is True


def test_check_runs_with_the_agents_own_capabilities(cgroups: TestCgroup) -> None:
    """In the agent's pod (`kubectl exec`) the check has the DaemonSet's capabilities only:
    every check still runs; another owner's program is found, its name needs CAP_SYS_ADMIN."""
    require_tool("setpriv")
    capabilities = agent_capabilities(DEFAULT_AGENT_PORT, sk_msg_redirect=True)
    with ExitStack() as stack:
        foreign = ForeignConnect4(stack)
        foreign.attach(cgroups.path)
        done = agent(
            "check",
            "-o",
            "json",
            f"--attach-cgroup={cgroups.path / 'node'}",
            f"--pin-root={PIN_ROOT}",
            capabilities=capabilities,
        )
    assert done.returncode == 0, done.stdout + done.stderr
    checks = by_name(done.json())
    assert all(checks[name]["ok"] for name in CHECKS[:-1]), checks
    assert "CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON held" in checks["capabilities"]["detail"]
    assert "may not probe" not in checks["helpers"]["detail"]
    conflict = checks["conflicting_programs"]
    assert conflict["programs"] == [
        {"hook": "connect4", "id": foreign.info.id, "name": None, "cgroup": str(cgroups.path)}
    ]
    assert f"`bpftool prog show id {foreign.info.id}` names it" in conflict["fix"]


def test_helper_probes_tell_what_a_program_type_may_call() -> None:
    """The probe behind the helpers check, on this kernel (docs/datapath.md: sockops may not
    look sockets up, connect4 may)."""
    require_kernel()
    sock_addr, connect4 = libbpf.ProgType.CGROUP_SOCK_ADDR, libbpf.AttachType.CGROUP_INET4_CONNECT
    sock_ops, attach_ops = libbpf.ProgType.SOCK_OPS, libbpf.AttachType.CGROUP_SOCK_OPS
    names = {name: value for value, name in prerequisites.helper_names().items()}
    assert introspect.probe_helper(sock_addr, connect4, names["bpf_sk_lookup_tcp"])
    assert introspect.probe_helper(sock_addr, connect4, names["bpf_get_current_cgroup_id"])
    assert not introspect.probe_helper(sock_ops, attach_ops, names["bpf_sk_lookup_tcp"])
    assert not introspect.probe_helper(sock_addr, connect4, names["bpf_msg_redirect_hash"])
    assert not introspect.probe_helper(sock_addr, connect4, max(names.values()) + 1000)


# -- status and pods: a running agent -------------------------------------------------------------


@dataclass
class RunningAgent:
    process: AgentProcess
    cgroup: TestCgroup
    pod: Path  # the resolvable pod's cgroup
    socket: Path
    instance: str
    workdir: Path

    def command(self, *argv: str) -> Done:
        return agent(*argv, f"--local-socket={self.socket}")


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    """A standalone agent on a test cgroup with two pods: ``a`` resolves, ``b`` (no cgroup)
    does not."""
    require_kernel()
    workdir = tmp_path_factory.mktemp("commands")
    instance = f"commands-{os.getpid()}-{next(_numbers)}"
    mount = find_cgroup2_mount()
    with ExitStack() as stack:
        cgroup = stack.enter_context(
            TestCgroup(f"{TEST_CGROUP_PREFIX}{os.getpid()}-commands-{next(_numbers)}")
        )
        pod = cgroup.child("pod-a")
        pods_file = workdir / "pods.yaml"
        write_yaml(
            pods_file,
            {
                "generation": 3,
                "pods": [
                    pod_entry("a", "198.18.0.10", pod.relative_to(mount)),
                    pod_entry("b", "198.18.0.11", (cgroup.path / "pod-b").relative_to(mount)),
                ],
            },
        )
        socket_path = workdir / "run" / "agent.sock"
        port = free_port()
        stack.callback(unload_instance, instance)  # after the agent stopped (LIFO)
        process = AgentProcess(
            [
                *standalone_argv(
                    pods_file=pods_file,
                    attach_cgroup=cgroup.path,
                    instance=instance,
                    tls=tls_args(workdir / "tls"),
                    port=port,
                    node_name="commands",
                ),
                f"--local-socket={socket_path}",
                "--drain-seconds=0",
            ],
            workdir=workdir,
            name="agent",
            port=port,
        )
        stack.callback(process.stop)
        process.wait_ready()
        yield RunningAgent(process, cgroup, pod, socket_path, instance, workdir)


def pod_entry(name: str, ip: str, cgroup: Path) -> dict[str, Any]:
    return {
        "uid": f"uid-{name}",
        "namespace": "default",
        "name": name,
        "ip": ip,
        "cgroup": str(cgroup),
    }


def test_status_is_what_the_running_agent_reports(running: RunningAgent) -> None:
    done = running.command("status", "-o", "json")
    assert done.returncode == 0, done.stderr
    local = done.json()
    remote = running.process.get("/v1/status")  # over mutual TLS, as the operator
    assert local["boot_id"] == remote["boot_id"]
    assert local["version"] == VERSION, "the local socket's clients know every field"
    assert local["applied_generation"] == remote["applied_generation"] == 3
    assert local["attached"] is True and local["startup"] == "loaded"
    assert local["attach_cgroup"] == str(running.cgroup.path)
    assert local["pods_accelerated"] == 1
    assert [u["name"] for u in local["unresolved"]] == ["b"]
    assert "not_ready" not in local  # ready: left out while it holds its default
    text = running.command("status")
    assert text.returncode == 0
    assert text.stdout.splitlines()[0].split() == ["version", VERSION]
    assert "1 accelerated, 1 unresolved" in text.stdout
    assert "default/b" in text.stdout


def test_pods_lists_the_applied_and_the_unresolved(running: RunningAgent) -> None:
    done = running.command("pods", "-o", "json")
    assert done.returncode == 1, "an unresolved pod is a problem found"
    document = done.json()
    assert document == running.process.get("/v1/pods")
    assert document["applied_generation"] == 3
    assert [(p["name"], p["ip"], p["cgroup_id"]) for p in document["pods"]] == [
        ("a", "198.18.0.10", os.stat(running.pod).st_ino)
    ]
    ((unresolved),) = document["unresolved"]
    assert unresolved["name"] == "b" and "pod-b" in unresolved["reason"]
    text = running.command("pods").stdout.splitlines()
    assert text[0] == "applied set: generation 3; 1 accelerated, 1 unresolved"
    assert text[2].split()[:4] == ["default", "a", "198.18.0.10", "accelerated"]
    assert text[3].split()[:4] == ["default", "b", "-", "unresolved"]


def test_pods_text_names_the_addresses_whose_app_connections_are_short_lived() -> None:
    a, b = IPv4Address("198.18.0.10"), IPv4Address("198.18.0.11")

    def pod(ip: IPv4Address, use: AppConnections) -> AppliedPod:
        name = str(ip)
        return AppliedPod(
            uid=name, namespace="ns", name=name, ip=ip, cgroup_id=1, app_connections=(use,)
        )

    short = AppConnections(ip=a, connections=40, reused=3, short_lived=True)
    reused = AppConnections(ip=b, connections=40, reused=40, short_lived=False)
    pods = PodsReply(applied_generation=1, pods=[pod(a, short), pod(b, reused)], unresolved=[])

    rows = pods_text(pods).splitlines()[2:]
    assert rows[0].endswith("cgroup id 1; short-lived app connections on 198.18.0.10"), rows
    assert rows[1].endswith("cgroup id 1"), rows


def test_check_does_not_count_the_datapaths_own_programs(running: RunningAgent) -> None:
    own = check(running.cgroup.path, instance=running.instance)
    assert own.returncode == 0, own.stdout
    assert by_name(own.json())["conflicting_programs"]["programs"] == []
    # Seen from another instance, the same programs are another owner's: one per hook.
    other = by_name(check(running.cgroup.path, instance="another").json())
    found = other["conflicting_programs"]["programs"]
    assert sorted(p["hook"] for p in found) == HOOKS
    assert {p["cgroup"] for p in found} == {str(running.cgroup.path)}
    assert {p["id"] for p in found} == preflight.own_program_ids(
        PinLayout(PIN_ROOT / running.instance)
    )


def local_request(path: Path, method: str, resource: str, body: bytes = b"") -> tuple[int, Any]:
    """One HTTP/1.1 request on the unix socket, read to the end (the reply closes it)."""
    request = (
        f"{method} {resource} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(request)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(payload) if payload else None


def test_the_local_socket_is_read_only(running: RunningAgent) -> None:
    status, health = local_request(running.socket, "GET", "/v1/health")
    assert status == 200 and health["version"] == VERSION
    before = running.process.get("/v1/status")
    new_set = json.dumps({"generation": 99, "pods": []}).encode()
    assert local_request(running.socket, "PUT", "/v1/pods", new_set)[0] == 405
    assert local_request(running.socket, "POST", "/v1/uninstall")[0] == 404
    assert local_request(running.socket, "GET", "/metrics")[0] == 404
    after = running.process.get("/v1/status")
    assert after["applied_generation"] == before["applied_generation"] == 3
    assert after["attached"] is True and after["uninstalled"] is False
    assert all(p.exists() for p in PinLayout(PIN_ROOT / running.instance).all_pins())


def test_the_local_socket_is_the_agents_alone(running: RunningAgent) -> None:
    info = os.lstat(running.socket)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.stat(f"/proc/{running.process.pid}").st_uid
    # Its only other way in is the API port: the agent listens on no other TCP socket.
    assert listening_tcp_ports(running.process.pid) == {running.process.port}


def listening_tcp_ports(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_status_of_no_agent_says_so(tmp_path: Path) -> None:
    for command in ("status", "pods"):
        done = agent(command, "-o", "json", f"--local-socket={tmp_path / 'agent.sock'}")
        assert done.returncode == 1
        assert done.stdout == ""
        assert f"no agent answers on {tmp_path / 'agent.sock'}" in done.stderr
    off = agent("status", "--local-socket=none")
    assert (off.returncode, off.stdout) == (1, "")
    assert "the agent's local socket is off (local_socket: none)" in off.stderr
    too_long = "/run/" + "x" * 103
    refused = agent("status", f"--local-socket={too_long}")
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        f"invalid setting local_socket={too_long} (from --local-socket): a unix socket path "
        "holds at most 107 bytes"
    ]


def test_the_socket_is_removed_when_the_agent_stops(tmp_path: Path) -> None:
    """Started and stopped here: a socket in a directory the agent made, gone after."""
    require_kernel()
    instance = f"commands-{os.getpid()}-{next(_numbers)}"
    socket_path = tmp_path / "made" / "by-agent" / "agent.sock"
    with ExitStack() as stack:
        cgroup = stack.enter_context(
            TestCgroup(f"{TEST_CGROUP_PREFIX}{os.getpid()}-commands-{next(_numbers)}")
        )
        write_yaml(tmp_path / "pods.yaml", {"pods": []})
        stack.callback(unload_instance, instance)
        port = free_port()
        process = AgentProcess(
            [
                *agent_argv(),
                "--mode=standalone",
                f"--pods-file={tmp_path / 'pods.yaml'}",
                f"--attach-cgroup={cgroup.path}",
                f"--pin-root={PIN_ROOT}",
                f"--instance={instance}",
                "--insecure-no-token",
                "--listen-address=127.0.0.1",
                f"--port={port}",
                f"--local-socket={socket_path}",
            ],
            workdir=tmp_path,
            name="agent",
            port=port,
            tls=False,
        )
        stack.callback(process.stop)
        process.wait_ready()
        assert stat.S_IMODE(os.stat(socket_path.parent).st_mode) == 0o700
        assert agent("status", f"--local-socket={socket_path}").returncode == 0
        assert process.stop() == 0, process.describe()
    assert not (tmp_path / "made").exists()


# -- the local socket's bookkeeping (no kernel) ---------------------------------------------------


def test_local_socket_replaces_a_dead_one_and_refuses_a_live_one(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    first = LocalSocket.bind(path)
    first.sock.listen()
    with pytest.raises(OSError) as live:
        LocalSocket.bind(path)
    assert live.value.errno == errno.EADDRINUSE
    first.sock.close()  # the agent died: its file is left
    assert stat.S_ISSOCK(path.lstat().st_mode)
    second = LocalSocket.bind(path)
    second.sock.listen()
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))  # the new socket has the path
    second.unlink()
    second.close()
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(OSError) as other:
        LocalSocket.bind(path)
    assert other.value.errno == errno.EEXIST
    assert path.read_text() == "not a socket"


# -- the termination message ----------------------------------------------------------------------


def test_a_failed_start_writes_the_check_report_for_the_kubelet(tmp_path: Path) -> None:
    require_kernel()
    message = tmp_path / "termination-log"
    message.touch()  # the kubelet makes the file
    absent = tmp_path / "no-such-dir" / "termination-log"
    for path in (message, absent):
        done = agent(
            "run",
            "--insecure-no-token",
            "--listen-address=127.0.0.1",
            f"--bpf-objects={tmp_path}",
            f"--pin-root={PIN_ROOT}",
            "--instance=never-loaded",
            f"--termination-message-path={path}",
            "--node-name=commands",
        )
        assert done.returncode == 1, done.stderr
    text = message.read_text()
    assert len(text.encode()) <= preflight.TERMINATION_MESSAGE_LIMIT
    document = json.loads(text)
    assert document["node"] == "commands" and document["ok"] is False
    failed = [c["name"] for c in document["checks"] if not c["ok"]]
    assert failed[0] == "objects" and "make -C bpf" in by_name(document)["objects"]["fix"]
    assert not absent.parent.exists(), "outside Kubernetes nothing is written"
    assert not (PIN_ROOT / "never-loaded").exists()


def report(checks: Sequence[Check]) -> HostReport:
    return HostReport("node-1", tuple(checks))


def test_the_termination_message_fits_the_kubelets_4_kib() -> None:
    passed = [Check(f"fine-{i}", True, "x" * 300) for i in range(20)]
    failed = [Check(f"bad-{i}", False, "why " * 500, "fix " * 500) for i in range(3)]
    warned = Check("conflicting_programs", False, "w" * 3000, "f", "warning")
    text = preflight.termination_message(report([*passed, *failed, warned]))
    assert len(text.encode()) <= preflight.TERMINATION_MESSAGE_LIMIT
    document = json.loads(text)
    assert document["ok"] is False
    assert [c["name"] for c in document["checks"]] == [
        "bad-0",
        "bad-1",
        "bad-2",
        "conflicting_programs",
    ], "the failed checks are kept, the passed ones left out"
    assert document["omitted"] == "checks that passed"
    assert all(c["detail"].startswith("why why") for c in document["checks"][:3])
    small = [Check("capabilities", True, "ok"), Check("btf", False, "missing", "rebuild")]
    assert json.loads(preflight.termination_message(report(small))) == {
        "node": "node-1",
        "ok": False,
        "checks": [c.as_json() for c in small],
    }, "a report that fits is written whole"
