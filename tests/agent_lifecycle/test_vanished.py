"""The real agent removes a pod whose cgroup is removed, with no new pod set (issue 11).

A standalone agent (its set from a file that keeps naming the pod, as an operator that is
away would) programs a pod whose cgroup is one we make below the netlab node's test cgroup
(never the root cgroup). Removing that cgroup must take the pod out of the kernel's maps and
report it unresolved, by the agent's own background check.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshaccel.agent.datapath import Datapath
from meshaccel.agent.pods import AcceleratedPod
from tests.agent_lifecycle.conftest import StandaloneAgents, pod_entry
from tests.agent_lifecycle.harness import PIN_ROOT
from tests.netlab import find_cgroup2_mount
from tests.netlab.cgroups import cgroup_id
from tests.waiting import wait_until

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

# The agent checks every retry_interval (5 s): generous, it only turns a hang into a failure.
TIMEOUT = 60.0
DOOMED_IP = "198.19.250.10"  # outside the node's subnet: no traffic ever goes there


def maps(standalone: StandaloneAgents) -> dict[int, AcceleratedPod]:
    """The pods in the agent's maps, read from its pins."""
    with Datapath.adopt(instance=standalone.instance, pin_root=PIN_ROOT) as datapath:
        return datapath.pods()


@pytest.fixture
def pod_cgroup(standalone: StandaloneAgents) -> Iterator[Path]:
    """A pod cgroup of our own below the node's test cgroup; removed if the test did not."""
    directory = standalone.node.cgroup.child("vanishing-pod")
    yield directory
    if directory.exists():
        directory.rmdir()


def test_a_pod_whose_cgroup_is_removed_leaves_the_maps(
    standalone: StandaloneAgents, pod_cgroup: Path
) -> None:
    a = standalone.node.pods["a"]
    directory, doomed_id = pod_cgroup, cgroup_id(pod_cgroup)
    doomed: dict[str, Any] = {
        "uid": f"uid-{standalone.node.token}-vanishing",
        "namespace": "default",
        "name": "vanishing",
        "ip": DOOMED_IP,
        "cgroup": str(directory.relative_to(find_cgroup2_mount())),
    }
    standalone.write_pods([pod_entry(a), doomed])
    agent = standalone.start()
    wait_until(
        lambda: len(agent.get("/v1/pods")["pods"]) == 2, timeout=TIMEOUT, what="both programmed"
    )
    assert str(maps(standalone)[doomed_id].ip) == DOOMED_IP

    directory.rmdir()  # the pod is deleted; the file (the operator) still names it

    listed = wait_until(
        lambda: (reply := agent.get("/v1/pods"))["unresolved"] and reply,
        timeout=TIMEOUT,
        what="the pod reported unresolved",
    )
    (unresolved,) = listed["unresolved"]
    assert unresolved["name"] == "vanishing", unresolved
    assert f"cgroup {directory} disappeared (cgroup id {doomed_id})" in unresolved["reason"]
    assert [p["name"] for p in listed["pods"]] == ["a"]
    programmed = maps(standalone)
    assert doomed_id not in programmed and a.cgroup_id in programmed
    assert all(str(pod.ip) != DOOMED_IP for pod in programmed.values())

    status = agent.get("/v1/status")
    assert (status["pods_vanished"], status["pods_accelerated"]) == (1, 1), status
    _, text = agent.request("GET", "/metrics")
    vanished = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }["meshaccel_agent_pods_vanished_total"]
    assert vanished == 1
    (event,) = [r for r in agent.logs() if r.get("event") == "pod_vanished"]
    assert (event["pod"], event["cgroup_id"]) == ("default/vanishing", doomed_id), event
    assert event["level"] == "warning" and event["reason"] == unresolved["reason"]
    assert agent.stop() == 0
