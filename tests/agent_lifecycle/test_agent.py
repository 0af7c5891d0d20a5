"""The real agent process on the real kernel, against netlab pods with real Envoy sidecars.

Every agent here runs standalone (pods from a YAML file), attached to the node's own test
cgroup, pinned under /sys/fs/bpf/meshaccel-test-<pid>, serving mutual TLS on 127.0.0.1.
The load tests send a request every 20 ms from pod a to pod b:8080 (a new connection each,
through both Envoys, 64 bytes echoed and compared) while the agent is killed, restarted or
uninstalls, and require every single request to succeed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from meshaccel.agent.datapath import CGROUP_HOOKS, Datapath, PinLayout
from tests.agent_lifecycle.conftest import StandaloneAgents, pod_entry
from tests.agent_lifecycle.harness import PIN_ROOT, PKI, AgentProcess, attached_programs
from tests.netlab import ECHO_PORT, Pod, PodProcess
from tests.pki import make_pki
from tests.waiting import wait_until

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

LOOP_MODULE = "tests.agent_lifecycle.request_loop"
REPO = Path(__file__).resolve().parents[2]
INTERVAL = 0.02  # the issue's "a request every 20 ms"
PROGRAMS = {hook.program for hook in CGROUP_HOOKS}


class RequestLoop:
    """request_loop.py running in ``client`` (its netns and cgroup) against ``server``:8080."""

    def __init__(self, client: Pod, server: Pod, count: int) -> None:
        self.count = count
        self.process: PodProcess = client.run(
            [
                sys.executable,
                "-u",
                "-m",
                LOOP_MODULE,
                "--host",
                str(server.ip),
                "--port",
                str(ECHO_PORT),
                "--count",
                str(count),
                "--interval",
                str(INTERVAL),
            ],
            name="request-loop",
            cwd=REPO,  # for -m
        )

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.process.stdout().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the line being written
                continue
            if "i" in record:
                out.append(record)
        return out

    def wait_requests(self, n: int, timeout: float = 10.0) -> None:
        def enough() -> bool:
            if not self.process.is_running() and len(self.records()) < n:
                raise RuntimeError(f"request loop ended early:\n{self.process.describe()}")
            return len(self.records()) >= n

        wait_until(enough, timeout=timeout, what=f"{n} requests")

    def finish(self) -> list[dict[str, Any]]:
        self.process.wait(timeout=self.count * INTERVAL + 30)
        records = self.records()
        assert len(records) == self.count, self.process.describe()
        return records


def failures(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if not r["ok"]]


def between(records: list[dict[str, Any]], start: float, end: float) -> list[dict[str, Any]]:
    return [r for r in records if start <= r["t"] <= end]


def accelerated(record: dict[str, Any]) -> bool:
    """connect4 steered it: the app's socket is on loopback, talking to its sidecar."""
    return str(record.get("kernel_local", "")).startswith("127.0.0.1:")


def pod_names(reply: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["cgroup_id"] for p in reply["pods"]}


def program_ids(status: dict[str, Any]) -> dict[str, int | None]:
    return {p["hook"]: p["program_id"] for p in status["programs"]}


def decisions(agent_logs: list[dict[str, Any]]) -> list[str]:
    return [r["decision"] for r in agent_logs if "decision" in r]


def summary(name: str, records: list[dict[str, Any]], **windows: int) -> str:
    ok = len(records) - len(failures(records))
    line = f"{name}: {ok}/{len(records)} requests ok ({100 * ok / len(records):.1f}%)"
    return line + "".join(f", {k}={v}" for k, v in windows.items())


# -- standalone mode -------------------------------------------------------------------------


def test_standalone_pods_file_drives_the_datapath(standalone: StandaloneAgents) -> None:
    a, b = standalone.node.pods["a"], standalone.node.pods["b"]
    agent = standalone.start(wait_ready=False)
    # No file yet: alive, not ready.
    wait_until(lambda: agent.status_of("/healthz") == 200, timeout=15, what="healthz")
    status, body = agent.request("GET", "/readyz")
    assert status == 503 and body["error"] == "not ready", body  # open: no more than that
    assert "no pod set has been applied" in agent.get("/v1/status")["not_ready"]

    standalone.write_pods([pod_entry(a), pod_entry(b)])
    agent.wait_ready(timeout=10)
    pods = agent.get("/v1/pods")
    assert pod_names(pods) == {"a": a.cgroup_id, "b": b.cgroup_id}
    assert pods["applied_generation"] == 1  # the file has none: the watcher counts
    before = agent.get("/v1/status")
    assert before["attached"] and before["attach_cgroup"] == str(standalone.node.cgroup.path)
    assert {p["program"] for p in before["programs"]} >= PROGRAMS

    echo = a.echo_client(str(b.ip), ECHO_PORT, nbytes=64 << 10)
    assert echo.ok, echo.raw
    assert echo.kernel_local_addresses[0].startswith("127.0.0.1:"), "connect4 steered it to Envoy a"
    after = agent.get("/v1/status")["counters"]
    moved = {name: after[name] - before["counters"][name] for name in after}
    assert moved["connect_outbound_redirected"] == 1, moved
    assert moved["connect_inbound_redirected"] == 1, moved  # Envoy a -> b's 15006
    assert moved["original_dst_answered"] >= 2, moved  # both Envoys asked
    assert moved["msg_redirected"] > 0, moved  # bytes went socket to socket

    # The API wants the operator's certificate; a certificate of another CA gets no answer.
    assert agent.request("GET", "/v1/pods", context=PKI.anonymous_context())[0] == 403
    someone = PKI.client_context(PKI.issue_client("urn:meshaccel:someone"), check_hostname=False)
    assert agent.request("GET", "/v1/pods", context=someone)[0] == 403
    stranger = make_pki()
    with pytest.raises(OSError):
        agent.request("GET", "/v1/pods", context=stranger.client_context(check_hostname=False))

    # b leaves the file: it leaves the maps.
    standalone.write_pods([pod_entry(a)])
    wait_until(
        lambda: pod_names(agent.get("/v1/pods")) == {"a": a.cgroup_id},
        timeout=10,
        what="b removed",
    )
    assert agent.get("/v1/pods")["applied_generation"] == 2

    # A broken file is refused with the field at fault; the applied set stays.
    standalone.write_pods([pod_entry(a, ip="198.18.0.999")])
    refusal = wait_until(
        lambda: [r for r in agent.logs() if r["msg"].startswith("pods file refused")],
        timeout=10,
        what="the refusal in the log",
    )
    assert refusal[0]["field"] == "pods[0].ip" and refusal[0]["pod"] == "default/a", refusal
    assert refusal[0]["level"] == "error"
    assert pod_names(agent.get("/v1/pods")) == {"a": a.cgroup_id}
    assert agent.get("/v1/pods")["applied_generation"] == 2

    # A pod whose cgroup does not exist is reported with what was looked for.
    ghost = {**pod_entry(b), "name": "ghost", "uid": "uid-ghost", "cgroup": "no/such/pod"}
    standalone.write_pods([pod_entry(a), ghost])
    wait_until(lambda: agent.get("/v1/pods")["unresolved"], timeout=10, what="the unresolved pod")
    (unresolved,) = agent.get("/v1/pods")["unresolved"]
    assert unresolved["name"] == "ghost" and "no/such/pod" in unresolved["reason"]
    assert "does not exist" in unresolved["reason"]
    assert agent.stop() == 0


def test_insecure_loopback_demo_serves_without_token(standalone: StandaloneAgents) -> None:
    standalone.write_pods([])
    argv = [arg for arg in standalone.argv() if not arg.startswith("--tls-")]
    agent = AgentProcess(
        [*argv, "--insecure-no-token"],
        workdir=standalone.workdir,
        name="insecure",
        port=standalone.port,
        tls=False,
    )
    standalone.stack.callback(agent.stop)
    agent.wait_ready()
    assert agent.request("GET", "/v1/status")[0] == 200
    assert any(r.get("auth") == "none, plain HTTP (loopback only)" for r in agent.logs())
    assert agent.stop() == 0


# -- restarts and uninstalls under load --------------------------------------------------------


def test_restart_under_load_drops_nothing(standalone: StandaloneAgents) -> None:
    """SIGKILL + start, then SIGTERM + start, while a request goes every 20 ms: all succeed,
    all stay accelerated, and the restarted agents adopt the very same programs."""
    a, b = standalone.node.pods["a"], standalone.node.pods["b"]
    standalone.write_pods([pod_entry(a), pod_entry(b)])
    first = standalone.start()
    status = first.get("/v1/status")
    programs, boot = program_ids(status), status["boot_id"]
    redirected = status["counters"]["connect_outbound_redirected"]
    pods = pod_names(first.get("/v1/pods"))

    loop = RequestLoop(a, b, count=350)
    loop.wait_requests(25)
    killed_at = time.time()
    assert first.kill() == -9
    loop.wait_requests(len(loop.records()) + 10)  # requests while the node has no agent
    second = standalone.start()
    second_ready = time.time()
    done = len(loop.records())
    loop.wait_requests(done + 25)
    terminated_at = time.time()
    assert second.stop() == 0
    loop.wait_requests(len(loop.records()) + 10)
    third = standalone.start()
    third_ready = time.time()
    records = loop.finish()

    after_kill = between(records, killed_at, second_ready)
    after_term = between(records, terminated_at, third_ready)
    print(
        summary(
            "restart under load",
            records,
            during_sigkill_restart=len(after_kill),
            during_sigterm_restart=len(after_term),
        )
    )
    assert failures(records) == [], failures(records)[:5]
    assert all(accelerated(r) for r in records), [r for r in records if not accelerated(r)][:5]
    assert after_kill and after_term, "the load must overlap both restarts"

    assert decisions(first.logs()) == ["loaded"]
    assert decisions(second.logs()) == ["adopted"]
    assert decisions(third.logs()) == ["adopted"]
    status = third.get("/v1/status")
    assert program_ids(status) == programs, "the same programs: nothing was loaded again"
    assert status["attached"] and status["boot_id"] != boot
    assert pod_names(third.get("/v1/pods")) == pods
    assert status["counters"]["connect_outbound_redirected"] - redirected >= len(records)
    # Re-applying the file after a restart changes nothing in the maps.
    for agent in (second, third):
        applied = [r for r in agent.logs() if r["msg"] == "pods file applied"]
        assert (applied[0]["added"], applied[0]["removed"], applied[0]["updated"]) == (0, 0, 0)


def test_uninstall_on_sigterm_under_load_fails_open(standalone: StandaloneAgents) -> None:
    a, b = standalone.node.pods["a"], standalone.node.pods["b"]
    standalone.write_pods([pod_entry(a), pod_entry(b)])
    agent = standalone.start("--uninstall-on-exit", "--drain-seconds=1")
    loop = RequestLoop(a, b, count=200)
    loop.wait_requests(25)
    started = time.time()
    assert agent.stop(timeout=20) == 0
    finished = time.time()
    records = loop.finish()
    print(
        summary(
            "uninstall on SIGTERM under load",
            records,
            during_uninstall=len(between(records, started, finished)),
            after_uninstall=len(between(records, finished, float("inf"))),
        )
    )
    assert failures(records) == [], failures(records)[:5]
    assert all(accelerated(r) for r in records if r["t"] < started)
    after = between(records, finished, float("inf"))
    assert after and all(r["kernel_local"].startswith(f"{a.ip}:") for r in after), "iptables path"
    assert_uninstalled(standalone)
    assert any(r["msg"] == "uninstalled" for r in agent.logs())


def test_uninstall_command_under_load_fails_open(standalone: StandaloneAgents) -> None:
    a, b = standalone.node.pods["a"], standalone.node.pods["b"]
    standalone.write_pods([pod_entry(a), pod_entry(b)])
    agent = standalone.start()
    loop = RequestLoop(a, b, count=200)
    loop.wait_requests(15)
    assert agent.stop() == 0  # a plain stop keeps everything
    assert (PIN_ROOT / standalone.instance).exists()
    loop.wait_requests(len(loop.records()) + 15)
    started = time.time()
    result = subprocess.run(
        [*standalone.argv("--drain-seconds=1", command="uninstall")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    finished = time.time()
    assert result.returncode == 0, result.stderr
    records = loop.finish()
    print(
        summary(
            "uninstall command under load",
            records,
            during_uninstall=len(between(records, started, finished)),
            after_uninstall=len(between(records, finished, float("inf"))),
        )
    )
    assert failures(records) == [], failures(records)[:5]
    assert all(accelerated(r) for r in records if r["t"] < started - 0.1)
    assert_uninstalled(standalone)
    logs = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert logs[-1]["msg"] == "uninstalled"


def assert_uninstalled(standalone: StandaloneAgents) -> None:
    assert not (PIN_ROOT / standalone.instance).exists()
    attached = attached_programs(standalone.node.cgroup.path)
    assert attached == [], attached


def test_incomplete_pins_are_refused_then_uninstalled(standalone: StandaloneAgents) -> None:
    """An agent killed half-way through a load leaves some pins: start refuses, uninstall
    clears them."""
    Datapath.load(
        standalone.node.cgroup.path, instance=standalone.instance, pin_root=PIN_ROOT
    ).close()
    pins = PinLayout(PIN_ROOT / standalone.instance)
    pins.link("connect4").unlink()  # the last reference: the link goes with its pin
    standalone.write_pods([])
    refused = subprocess.run(standalone.argv(), capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    (error,) = [json.loads(x) for x in refused.stderr.splitlines() if '"error"' in x]
    assert "incomplete datapath" in error["reason"] and "uninstall" in error["reason"]
    assert {p["name"] for p in attached_programs(standalone.node.cgroup.path)} == {
        hook.program for hook in CGROUP_HOOKS if hook.link != "connect4"
    }
    result = subprocess.run(
        standalone.argv("--drain-seconds=0", command="uninstall"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert_uninstalled(standalone)
