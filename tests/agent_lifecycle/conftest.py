"""Fixtures: a netlab node with pods a and b (Envoy sidecars, Istio iptables), and agents.

Every agent a test starts is stopped by its PID at teardown, and whatever it left pinned is
unloaded, also when the test failed half-way. Agents attach to the node's own test cgroup
(never the root cgroup) and pin under /sys/fs/bpf/meshaccel-test-<pid>.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.agent_lifecycle.harness import (
    AgentProcess,
    free_port,
    standalone_argv,
    tls_args,
    unload_instance,
    write_yaml,
)
from tests.netlab import MeshPodSpec, Node, Pod, find_cgroup2_mount, find_leftovers, mesh_node
from tests.requirements import require_btf, require_tool

_instances = itertools.count()


@pytest.fixture(scope="package")
def mesh(netlab_requirements: None) -> Iterator[Node]:
    """Pods a and b, each with an Envoy sidecar (uid 1337), Istio iptables and echo servers."""
    require_btf()
    require_tool("bpftool")
    node = mesh_node((MeshPodSpec("a"), MeshPodSpec("b")))
    with node:
        yield node
    leftovers = find_leftovers(node.token)
    if leftovers:
        pytest.fail("netlab teardown left: " + "; ".join(leftovers), pytrace=False)


def pod_entry(pod: Pod, **extra: Any) -> dict[str, Any]:
    """The pods-file entry of a netlab pod: its cgroup relative to the cgroup2 root."""
    cgroup2 = find_cgroup2_mount()
    return {
        "uid": f"uid-{pod.node.token}-{pod.name}",
        "namespace": "default",
        "name": pod.name,
        "ip": str(pod.ip),
        "cgroup": str(pod.cgroup_dir.relative_to(cgroup2)),
        **extra,
    }


@dataclass
class StandaloneAgents:
    """Starts standalone agents on one node and one instance; all share the pods file."""

    node: Node
    workdir: Path
    instance: str
    pods_file: Path
    tls: list[str]  # the agent's TLS flags (files under workdir)
    port: int
    stack: ExitStack
    started: list[AgentProcess] = field(default_factory=list)

    def write_pods(self, pods: list[dict[str, Any]], generation: int | None = None) -> None:
        document: dict[str, Any] = {"pods": pods}
        if generation is not None:
            document = {"generation": generation, **document}
        write_yaml(self.pods_file, document)

    def argv(self, *extra: str, command: str = "run") -> list[str]:
        return [
            *standalone_argv(
                pods_file=self.pods_file,
                attach_cgroup=self.node.cgroup.path,
                instance=self.instance,
                tls=self.tls,
                port=self.port,
                node_name="netlab",
                command=command,
            ),
            "--log-format=json",
            "--sk-msg-redirect",  # the default, spelled out: the tests watch sk_msg at work
            *extra,
        ]

    def start(self, *extra: str, wait_ready: bool = True) -> AgentProcess:
        name = f"agent-{len(self.started)}"
        agent = AgentProcess(self.argv(*extra), workdir=self.workdir, name=name, port=self.port)
        self.started.append(agent)
        self.stack.callback(agent.stop)
        if wait_ready:
            agent.wait_ready()
        return agent


@pytest.fixture
def standalone(mesh: Node, tmp_path: Path) -> Iterator[StandaloneAgents]:
    instance = f"{mesh.token}-{next(_instances)}"
    with ExitStack() as stack:
        # LIFO: agents are stopped (registered later) before the datapath is unloaded.
        stack.callback(unload_instance, instance)
        yield StandaloneAgents(
            node=mesh,
            workdir=tmp_path,
            instance=instance,
            pods_file=tmp_path / "pods.yaml",
            tls=tls_args(tmp_path / "tls"),
            port=free_port(),
            stack=stack,
        )


StartAgent = Callable[..., AgentProcess]
