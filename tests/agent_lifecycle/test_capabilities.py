"""The agent's Linux capabilities, measured: the DaemonSet's set is enough, and each one needed.

Each agent here is the real console script, started through ``setpriv`` as uid 0 with the
bounding set cut down to the capabilities under test and ``no_new_privs`` set, which is what a
container runtime gives a container with ``capabilities: {drop: [ALL], add: [...]}`` and
``allowPrivilegeEscalation: false``. The set comes from the operator's renderer
(:func:`meshaccel.operator.rendering.agent_capabilities`), so the DaemonSet and this proof
cannot drift apart. Settings are the rendered ``agent.yaml``, with flags for what differs on a
test machine (standalone pods file, a test cgroup to attach to, a test pin root, loopback).

"Needed" is shown twice for every capability: the agent refuses to start with a message that
names the missing capabilities (its own up-front check), and with that check and the feature
probes switched off, the kernel itself refuses the load (EPERM from bpf()), so the check is not
stricter than the kernel. Every agent attaches to its own test cgroup, never the root cgroup,
and pins under /sys/fs/bpf/meshaccel-test-<pid>; teardown unloads whatever was left.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshaccel.agent.datapath import PinLayout
from meshaccel.operator import rendering
from meshaccel.operator.config import AgentImage
from meshaccel.operator.models import DEFAULT_AGENT_PORT, MeshAccelerationSpec
from tests.agent_lifecycle.harness import (
    PIN_ROOT,
    PKI,
    AgentProcess,
    agent_argv,
    attached_programs,
    free_port,
    setpriv,
    tls_args,
    unload_instance,
    write_yaml,
)
from tests.netlab.cgroups import TEST_CGROUP_PREFIX, TestCgroup, find_cgroup2_mount
from tests.requirements import require, require_tool
from tests.waiting import wait_until

pytestmark = [pytest.mark.kernel]

# capability(7) numbers of the capabilities the renderer may ask for.
CAPABILITY_BITS = {"BPF": 39, "PERFMON": 38, "NET_ADMIN": 12, "NET_BIND_SERVICE": 10}
EXIT_FAILED = 1
_numbers = itertools.count()

# The agent with its up-front privilege check and the kernel feature probes switched off (an
# unprivileged probe reads as "the kernel lacks it"): what remains is what the kernel says.
UNGATED_AGENT = """\
import sys
from meshaccel.agent import main, prerequisites
prerequisites.check_privileges = lambda **_: None
prerequisites.check_kernel_features = lambda: None
sys.exit(main.main(sys.argv[1:]))
"""


def spec(port: int, sk_msg_redirect: bool) -> MeshAccelerationSpec:
    return MeshAccelerationSpec.model_validate(
        {
            "namespaceSelector": {},
            "agent": {"port": port},
            "datapath": {"skMsgRedirect": sk_msg_redirect},
        }
    )


def rendered_capabilities(
    port: int = DEFAULT_AGENT_PORT, *, sk_msg_redirect: bool = True
) -> tuple[str, ...]:
    """The capabilities the rendered DaemonSet's container adds (read from the object)."""
    objects = rendering.agent_objects(
        "caps",
        "uid-caps",
        spec(port, sk_msg_redirect),
        namespace="meshaccel-system",
        tls=PKI.agent_tls(),
        image=AgentImage(),
    )
    (daemon_set,) = [o for o in objects if o["kind"] == "DaemonSet"]
    (container,) = daemon_set["spec"]["template"]["spec"]["containers"]
    context = container["securityContext"]
    assert context["capabilities"]["drop"] == ["ALL"]
    assert context["allowPrivilegeEscalation"] is False and context["runAsUser"] == 0
    return tuple(context["capabilities"]["add"])


def effective_capabilities(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no CapEff in /proc/{pid}/status")


@dataclass
class CapsLab:
    """A test cgroup with one pod cgroup, a pods file, the rendered config and TLS files."""

    cgroup: TestCgroup
    pod_cgroup: Path
    workdir: Path
    instance: str
    stack: ExitStack
    tls: list[str]  # the agent's TLS flags (files in workdir)

    @property
    def pins(self) -> PinLayout:
        return PinLayout(PIN_ROOT / self.instance)

    def write_config(self, port: int, sk_msg_redirect: bool) -> Path:
        objects = rendering.agent_objects(
            "caps",
            "uid-caps",
            spec(port, sk_msg_redirect),
            namespace="meshaccel-system",
            tls=PKI.agent_tls(),
            image=AgentImage(),
        )
        (config_map,) = [o for o in objects if o["kind"] == "ConfigMap"]
        path = self.workdir / f"agent-{port}-{'sk_msg' if sk_msg_redirect else 'tcp'}.yaml"
        path.write_text(config_map["data"][rendering.CONFIG_KEY])
        return path

    def argv(self, command: str, port: int, sk_msg_redirect: bool) -> list[str]:
        return [
            command,
            f"--config={self.write_config(port, sk_msg_redirect)}",
            # What differs from a node: pods from a file, our cgroup, our pins, loopback.
            "--mode=standalone",
            f"--pods-file={self.workdir / 'pods.yaml'}",
            "--pods-poll-seconds=0.2",
            f"--attach-cgroup={self.cgroup.path}",
            f"--pin-root={PIN_ROOT}",
            f"--instance={self.instance}",
            *self.tls,  # over the rendered paths (a Secret volume there)
            "--listen-address=127.0.0.1",
            f"--port={port}",
            "--node-name=caps",
            "--drain-seconds=0",
        ]

    def start(
        self,
        capabilities: tuple[str, ...],
        *,
        command: str = "run",
        port: int | None = None,
        sk_msg_redirect: bool = True,
        ungated: bool = False,
    ) -> AgentProcess:
        port = free_port() if port is None else port
        if ungated:
            script = self.workdir / "ungated_agent.py"
            script.write_text(UNGATED_AGENT)
            program = [*setpriv(capabilities), sys.executable, str(script)]
        else:
            program = agent_argv(capabilities)
        name = f"{command}-{next(_numbers)}"
        agent = AgentProcess(
            [*program, *self.argv(command, port, sk_msg_redirect)],
            workdir=self.workdir,
            name=name,
            port=port,
        )
        self.stack.callback(agent.stop)
        return agent

    def nothing_left(self) -> None:
        """No pin of this instance and no program on the test cgroup."""
        pinned = [str(p) for p in self.pins.all_pins() if p.exists()]
        assert pinned == [], f"left pinned: {pinned}"
        assert attached_programs(self.cgroup.path) == []


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[CapsLab]:
    require_tool("setpriv")
    require_tool("bpftool")
    mount = find_cgroup2_mount()
    instance = f"caps-{os.getpid()}-{next(_numbers)}"
    tls = tls_args(tmp_path / "tls")
    with TestCgroup(f"{TEST_CGROUP_PREFIX}{os.getpid()}-caps-{next(_numbers)}") as cgroup:
        pod = cgroup.child("pod-a")
        write_yaml(
            tmp_path / "pods.yaml",
            {
                "pods": [
                    {
                        "uid": "uid-caps-a",
                        "namespace": "default",
                        "name": "a",
                        "ip": "198.18.0.10",
                        "cgroup": str(pod.relative_to(mount)),
                    }
                ]
            },
        )
        with ExitStack() as stack:
            # LIFO: agents (registered later) are stopped before the datapath is unloaded.
            stack.callback(unload_instance, instance)
            yield CapsLab(cgroup, pod, tmp_path, instance, stack, tls)


def wait_exit(agent: AgentProcess, timeout: float = 30.0) -> int:
    return agent.wait(timeout=timeout)


def error_reasons(agent: AgentProcess) -> list[str]:
    return [str(r.get("reason")) for r in agent.logs() if r.get("level") == "error"]


# -- enough -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sk_msg_redirect", "expected"),
    [(True, {"BPF", "NET_ADMIN", "PERFMON"}), (False, {"BPF", "NET_ADMIN"})],
    ids=["sk_msg", "tcp"],
)
def test_the_agent_runs_with_exactly_the_rendered_capabilities(
    lab: CapsLab, sk_msg_redirect: bool, expected: set[str]
) -> None:
    capabilities = rendered_capabilities(sk_msg_redirect=sk_msg_redirect)
    assert set(capabilities) == expected

    # Load, attach, serve, apply the pod set.
    first = lab.start(capabilities, sk_msg_redirect=sk_msg_redirect)
    first.wait_ready()
    wanted = sum(1 << CAPABILITY_BITS[name] for name in capabilities)
    assert effective_capabilities(first.pid) == wanted, "the agent ran with more than the set"
    pods = first.get("/v1/pods")
    assert [(p["name"], p["cgroup_id"]) for p in pods["pods"]] == [
        ("a", os.stat(lab.pod_cgroup).st_ino)
    ]
    status = first.get("/v1/status")
    assert status["attached"] and status["attach_cgroup"] == str(lab.cgroup.path)
    assert ("FEATURE_SK_MSG_REDIRECT" in status["datapath_features"]) == sk_msg_redirect
    assert len(attached_programs(lab.cgroup.path)) >= 3  # connect4, getsockopt, sockops
    assert first.stop() == 0, first.describe()
    assert all(p.exists() for p in lab.pins.all_pins()), "SIGTERM keeps the datapath pinned"

    # Restart: adopt the pins (an upgrade), same set.
    second = lab.start(capabilities, sk_msg_redirect=sk_msg_redirect)
    second.wait_ready()
    assert "adopted" in [r.get("decision") for r in second.logs()], second.describe()
    assert second.stop() == 0, second.describe()

    # Uninstall: detach everything and remove every pin, same set.
    uninstall = lab.start(capabilities, command="uninstall", sk_msg_redirect=sk_msg_redirect)
    assert wait_exit(uninstall) == 0, uninstall.describe()
    lab.nothing_left()


# -- needed -----------------------------------------------------------------------------------


# How the kernel refuses the load without each capability (the agent's check switched off).
KERNEL_REFUSAL = {
    # bpf() itself, and the networking map and program types.
    "BPF": ("Operation not permitted", "lack of privilege"),
    "NET_ADMIN": ("Operation not permitted", "lack of privilege"),
    # The verifier: the helper the sk_msg program reads its receiver's queue with.
    "PERFMON": ("cannot use helper bpf_skc_to_tcp_sock",),
}


@pytest.mark.parametrize("dropped", sorted(KERNEL_REFUSAL))
def test_each_rendered_capability_is_needed(lab: CapsLab, dropped: str) -> None:
    capabilities = rendered_capabilities()  # the default spec: sk_msg on
    assert set(capabilities) == set(KERNEL_REFUSAL), "every capability is tried here"
    remaining = tuple(name for name in capabilities if name != dropped)

    # The agent's own check names what is missing, before it touches the kernel.
    gated = lab.start(remaining)
    assert wait_exit(gated) == EXIT_FAILED, gated.describe()
    reasons = error_reasons(gated)
    assert any(
        "loading the datapath needs root, or CAP_BPF" in r and f"missing CAP_{dropped} (" in r
        for r in reasons
    ), reasons
    lab.nothing_left()

    # Without that check the kernel refuses the load itself: the check is not too strict.
    ungated = lab.start(remaining, ungated=True)
    assert wait_exit(ungated) == EXIT_FAILED, ungated.describe()
    reasons = error_reasons(ungated)
    assert any(
        "bpf_object__load() failed" in r and all(said in r for said in KERNEL_REFUSAL[dropped])
        for r in reasons
    ), reasons
    lab.nothing_left()


def free_privileged_port() -> int | None:
    """A port below 1024 that nothing listens on at 127.0.0.1 (we are root here)."""
    for port in range(1023, 900, -1):
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", port))
            return port
    return None


def test_a_privileged_api_port_needs_net_bind_service(lab: CapsLab) -> None:
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    port = free_privileged_port()
    require(port is not None and port < start, "needs a free port below 1024 that is privileged")
    assert port is not None
    capabilities = rendered_capabilities(port)
    assert "NET_BIND_SERVICE" in capabilities

    agent = lab.start(capabilities, port=port)
    agent.wait_ready()
    assert agent.stop() == 0, agent.describe()

    without = tuple(name for name in capabilities if name != "NET_BIND_SERVICE")
    refused = lab.start(without, port=port)
    assert wait_exit(refused) == EXIT_FAILED, refused.describe()
    reasons = error_reasons(refused)
    assert any(f"[Errno {errno.EACCES}]" in r and str(port) in r for r in reasons), reasons
    # The datapath loaded before the bind failed; it stays pinned for the next agent.
    wait_until(lambda: not refused.is_running(), timeout=5, what="the agent to exit")
