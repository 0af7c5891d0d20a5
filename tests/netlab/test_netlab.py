"""The iptables-only control path end to end with real Envoy sidecars, and the harness's promises.

App A -> (nat OUTPUT REDIRECT) Envoy A :15001 -> pod B :8080 -> (nat PREROUTING REDIRECT)
Envoy B :15006 -> from 127.0.0.6 -> echo server B :8080; over IPv6 the same through ip6tables,
Envoy learning [fd00:198:18::B]:8080 with IP6T_SO_ORIGINAL_DST and going on from ::6.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .app_handles import NETNS_DEPENDENT_CASES, run_getsockopt_probe_here
from .apps import GROUPS_FOR_PEERGROUPS, READ_APIS, connection_plan, send_on_plan, send_plan
from .cgroups import cgroup_pids, find_cgroup2_mount
from .counters import parse_proc_net_counters
from .envoy import EnvoyBootstrapOptions, find_envoy_binary, path_usable_by, render_envoy_bootstrap
from .families import PASSTHROUGH_SOURCE, Family, address_prefix
from .fixtures import BOTH_FAMILIES, NodeFactory
from .istio_iptables import (
    IstioInterception,
    dump_nat_table,
    nat_table_exists,
    render_istio_nat_rules,
    restore_rules,
)
from .leftovers import find_leftovers, remove_stale_leftovers
from .mesh import ECHO_PORT, EXCLUDED_PORT, MeshPodSpec, mesh_node
from .netns import create_netns, delete_netns, list_netns, run_in_netns
from .processes import SIDECAR_IDENTITY, RunAs
from .topology import Node, lab_ipv6

# Fixtures (netlab_node, netlab_factory, netlab_requirements) come from the tests.netlab.fixtures
# plugin, which tests/conftest.py loads.
kernel = pytest.mark.kernel

MIB = 1 << 20


# ---------------------------------------------------------------- pure helpers (no root needed)


def test_istio_rules_match_istio_iptables_layout() -> None:
    rules = render_istio_nat_rules(
        IstioInterception(exclude_inbound_ports=(9090,), exclude_outbound_ports=(9091,))
    )
    lines = rules.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    output = [line for line in lines if line.startswith("-A ISTIO_OUTPUT")]
    assert output == [
        "-A ISTIO_OUTPUT -p tcp --dport 9091 -j RETURN",
        "-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN",
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp ! --dport 15008"
        " -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp ! --dport 15008"
        " -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
    ]
    inbound = [line for line in lines if line.startswith("-A ISTIO_INBOUND")]
    assert inbound == [
        "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -m multiport --dports 15090,15021,15020 -j RETURN",
        "-A ISTIO_INBOUND -p tcp --dport 9090 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
    ]
    assert "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006" in lines
    assert "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in lines
    assert "-A PREROUTING -p tcp -j ISTIO_INBOUND" in lines
    assert "-A OUTPUT -p tcp -j ISTIO_OUTPUT" in lines


def test_istio_ip6tables_rules_are_the_ipv4_ones_with_ipv6_loopback_and_passthrough() -> None:
    """istio-iptables with IPv6 (testdata/ipv6-*.golden): the same chains, ::1/128 for
    127.0.0.1/32 and ::6/128 for the passthrough source, nothing else changed."""
    config = IstioInterception(exclude_inbound_ports=(9090,), exclude_outbound_ports=(9091,))
    ipv4, ipv6 = render_istio_nat_rules(config), render_istio_nat_rules(config, "ipv6")
    assert "127." not in ipv6
    assert "-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN" in ipv6.splitlines()
    assert "-A ISTIO_OUTPUT -d ::1/128 -j RETURN" in ipv6.splitlines()
    assert ipv6 == ipv4.replace("127.0.0.1/32", "::1/128").replace("127.0.0.6/32", "::6/128")


def test_the_lab_s_ipv6_addresses_read_like_the_ipv4_ones() -> None:
    import ipaddress

    assert str(lab_ipv6(ipaddress.IPv4Address("198.18.0.10"))) == "fd00:198:18::10"
    assert str(lab_ipv6(ipaddress.IPv4Address("198.18.3.255"))) == "fd00:198:18:3::255"
    assert str(lab_ipv6(ipaddress.IPv4Address("198.19.0.1"))) == "fd00:198:19::1"


def test_cgroup2_mount_is_found_in_hybrid_mountinfo(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n"
        "31 30 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "41 30 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n"
    )
    assert find_cgroup2_mount(mountinfo) == Path("/sys/fs/cgroup/unified")


def test_proc_net_counters_parse() -> None:
    text = "Tcp: InSegs OutSegs\nTcp: 5 7\nTcpExt: TCPOrigDataSent\nTcpExt: 3\n"
    assert parse_proc_net_counters(text) == {
        "Tcp.InSegs": 5,
        "Tcp.OutSegs": 7,
        "TcpExt.TCPOrigDataSent": 3,
    }


class ManualClock:
    """time.monotonic and time.sleep for :func:`send_on_plan`: sleeping moves the clock."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_paced_sending_spreads_the_chunks_and_holds_the_connection() -> None:
    args = argparse.Namespace(pace_seconds=1.0, pace_chunks=50, chunk=16384)
    plan = send_plan(args, 64 * 1024)
    clock = ManualClock()
    sent: list[tuple[float, int]] = []

    send_on_plan(
        lambda size: sent.append((clock.now, size)),
        plan,
        started=clock.now,
        hold=1.0,
        clock=clock,
        sleep=clock.sleep,
    )

    assert len(sent) == 50 and sum(size for _, size in sent) == 64 * 1024
    assert [at - 100.0 for at, _ in sent] == pytest.approx([i * 0.02 for i in range(50)])
    assert clock.now == pytest.approx(101.0)  # open for the whole pace after the last chunk


def test_a_late_paced_sender_catches_up_without_sleeping() -> None:
    args = argparse.Namespace(pace_seconds=1.0, pace_chunks=4, chunk=16384)
    clock = ManualClock()
    sent: list[float] = []

    def slow_send(size: int) -> None:  # each send takes 0.3 s, longer than the 0.25 s gap
        sent.append(clock.now)
        clock.now += 0.3

    send_on_plan(
        slow_send, send_plan(args, 4096), started=100.0, hold=1.0, clock=clock, sleep=clock.sleep
    )

    assert sent == pytest.approx([100.0, 100.3, 100.6, 100.9])  # each as soon as it can
    assert clock.sleeps == []  # and past the pace's end already: no wait after the last


def test_rr_client_plan_reads_steps_in_order_and_refuses_what_it_cannot_follow() -> None:
    assert connection_plan("40x1, 20x2") == [(40, 1), (20, 2)]
    for bad in ("40", "x2", "40x", "0x1", "3x0", "2x1,", "ax1"):
        with pytest.raises(argparse.ArgumentTypeError):
            connection_plan(bad)


def test_path_usable_by_sees_private_parent(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    tool = private / "tool"
    tool.write_text("")
    tool.chmod(0o755)
    tmp_path.chmod(0o755)
    assert not path_usable_by(tool, 1337, 1337)
    private.chmod(0o711)
    assert path_usable_by(tool, 1337, 1337) == all(
        p.stat().st_mode & 0o001 for p in tool.resolve().parents
    )


# ---------------------------------------------------------------- the control path (root)


@kernel
@BOTH_FAMILIES
def test_echo_through_both_sidecars_is_byte_exact(netlab_node: Node, family: Family) -> None:
    a, b = netlab_node.pods["a"], netlab_node.pods["b"]
    assert a.sidecar is not None and b.sidecar is not None
    result = a.echo_client(b.host(family), ECHO_PORT, nbytes=MIB)
    assert result.ok, result.raw
    (connection,) = result.connections
    assert connection["received"] == MIB and connection["peer"] == b.address(ECHO_PORT, family)
    app_a = connection["local"]
    assert app_a.startswith(address_prefix(a.ip_of(family)))  # the app's own address: REDIRECT
    # keeps the source; the kernel's own tuple says so too
    assert connection["kernel_local"] == app_a

    # Envoy A caught the app's connection on 15001 and learned pod B:8080 through
    # SO_ORIGINAL_DST (IP6T_SO_ORIGINAL_DST on IPv6).
    (out,) = a.sidecar.wait_access_log(lambda e: e.downstream_remote == app_a)
    assert out.listener == "virtualOutbound"
    assert out.downstream_local == b.address(ECHO_PORT, family)
    assert out.upstream_host == b.address(ECHO_PORT, family)
    assert out.bytes_received == MIB and out.bytes_sent == MIB
    assert out.upstream_local.startswith(address_prefix(a.ip_of(family)))

    # Envoy B caught Envoy A's connection on 15006, also learned pod B:8080, went on from
    # 127.0.0.6 (::6 on IPv6).
    (inbound,) = b.sidecar.wait_access_log(lambda e: e.downstream_remote == out.upstream_local)
    assert inbound.listener == "virtualInbound"
    assert inbound.downstream_local == b.address(ECHO_PORT, family)
    assert inbound.upstream_host == b.address(ECHO_PORT, family)
    passthrough = PASSTHROUGH_SOURCE[family]
    assert inbound.upstream_local.startswith(address_prefix(passthrough))
    assert inbound.bytes_received == MIB and inbound.bytes_sent == MIB

    # The echo server saw that very connection coming from the passthrough source.
    served = b.servers[ECHO_PORT].wait_closed_from(inbound.upstream_local)
    assert served["bytes"] == MIB and served["error"] is None


@kernel
def test_without_ip6tables_rules_ipv6_goes_straight_to_the_app(netlab_node: Node) -> None:
    """The control for the test above: pod b's IPv6 nat table is what sends its IPv6 inbound
    to Envoy B. A sidecar-identity client (not redirected by a) to b over IPv6 reaches Envoy B,
    and without b's ip6 nat table the same reaches b's app directly."""
    a, b = netlab_node.pods["a"], netlab_node.pods["b"]
    assert b.sidecar is not None
    via = a.echo_client(b.host("ipv6"), ECHO_PORT, nbytes=64 * 1024, run_as=SIDECAR_IDENTITY)
    assert via.ok, via.raw
    b.sidecar.wait_access_log(lambda e: e.downstream_remote == via.local_addresses[0])
    saved = dump_nat_table(b.netns, "ipv6")
    run_in_netns(b.netns, ["nft", "delete", "table", "ip6", "nat"])
    try:
        direct = a.echo_client(b.host("ipv6"), ECHO_PORT, nbytes=64 * 1024, run_as=SIDECAR_IDENTITY)
        assert direct.ok, direct.raw
        (client,) = direct.local_addresses
        served = b.servers[ECHO_PORT].wait_closed_from(client)  # the app saw a itself
        assert served["bytes"] == 64 * 1024
        assert not [e for e in b.sidecar.access_log() if e.downstream_remote == client]
    finally:
        restore_rules(b.netns, saved, "ipv6")
    assert nat_table_exists(b.netns, "ipv6")


@kernel
@BOTH_FAMILIES
@pytest.mark.parametrize(
    "identity", [RunAs(1337, 1337), RunAs(1000, 1337)], ids=["uid1337", "gid1337"]
)
def test_sidecar_identity_traffic_is_not_redirected_to_its_own_sidecar(
    netlab_node: Node, identity: RunAs, family: Family
) -> None:
    a, b = netlab_node.pods["a"], netlab_node.pods["b"]
    assert a.sidecar is not None and b.sidecar is not None
    result = a.echo_client(b.host(family), ECHO_PORT, nbytes=64 * 1024, run_as=identity)
    assert result.ok, result.raw
    assert result.raw["uid"] == identity.uid
    client = result.connections[0]["local"]
    # It reached pod B directly (Envoy B sees the client's own address and port) ...
    (inbound,) = b.sidecar.wait_access_log(lambda e: e.downstream_remote == client)
    assert inbound.downstream_local == b.address(ECHO_PORT, family)
    # ... so Envoy A never saw it.
    assert not [e for e in a.sidecar.access_log() if e.downstream_remote == client]


@kernel
@BOTH_FAMILIES
def test_excluded_port_bypasses_both_sidecars(netlab_node: Node, family: Family) -> None:
    a, b = netlab_node.pods["a"], netlab_node.pods["b"]
    assert a.sidecar is not None and b.sidecar is not None
    result = a.echo_client(b.host(family), EXCLUDED_PORT, nbytes=64 * 1024)
    assert result.ok, result.raw
    client = result.connections[0]["local"]
    served = b.servers[EXCLUDED_PORT].wait_closed_from(client)  # the server saw the app itself
    assert served["bytes"] == 64 * 1024
    for sidecar in (a.sidecar, b.sidecar):
        assert not [e for e in sidecar.access_log() if e.downstream_remote == client]


@kernel
def test_concurrent_connections_without_half_close(netlab_node: Node) -> None:
    a, c = netlab_node.pods["a"], netlab_node.pods["c"]
    result = a.echo_client(
        str(c.ip), ECHO_PORT, nbytes=128 * 1024, connections=16, half_close=False
    )
    assert result.ok, result.raw
    assert len(result.connections) == 16 and len(set(result.local_addresses)) == 16


@kernel
@pytest.mark.parametrize("read_api", READ_APIS)
def test_echo_server_read_apis_through_the_sidecars(netlab_node: Node, read_api: str) -> None:
    a, b = netlab_node.pods["a"], netlab_node.pods["b"]
    port = 8100 + READ_APIS.index(read_api)
    server = b.servers.get(port) or b.start_echo_server(port, read_api=read_api)
    result = a.echo_client(str(b.ip), port, nbytes=256 * 1024, seed=port)
    assert result.ok, result.raw
    assert any(event.get("read_api") == read_api for event in server.events())


@kernel
@BOTH_FAMILIES
def test_one_shot_request(netlab_node: Node, family: Family) -> None:
    a, b = netlab_node.pods["a"], netlab_node.pods["b"]
    result = a.request(b.host(family), ECHO_PORT, "hello meshaccel")
    assert result["ok"] and result["response"] == "hello meshaccel", result
    assert result["peer"] == b.address(ECHO_PORT, family)


@kernel
def test_tcp_counters_show_payload_on_the_iptables_path(netlab_node: Node) -> None:
    a, b = netlab_node.pods["a"], netlab_node.pods["b"]
    before = a.net_counters()
    assert a.echo_client(str(b.ip), ECHO_PORT, nbytes=MIB).ok
    delta = a.net_counters() - before
    # App -> Envoy A over loopback, then Envoy A -> pod B: 1 MiB of payload crosses the stack twice.
    assert delta.tcp_data_segments_sent >= 2 * MIB // (64 * 1024)
    assert delta["Tcp.InSegs"] > 0 and delta["Tcp.OutSegs"] > 0


@kernel
def test_pod_processes_live_in_the_pod_netns_and_cgroup(netlab_node: Node) -> None:
    for pod in netlab_node.pods.values():
        assert pod.sidecar is not None
        envoy_pid = pod.sidecar.pid
        assert envoy_pid in cgroup_pids(pod.cgroup_dir)
        assert pod.servers[ECHO_PORT].pid in cgroup_pids(pod.cgroup_dir)
        assert (
            os.stat(f"/proc/{envoy_pid}/ns/net").st_ino == os.stat(f"/run/netns/{pod.netns}").st_ino
        )
        status = Path(f"/proc/{envoy_pid}/status").read_text()
        assert (
            "\nUid:\t1337\t1337\t1337\t1337\n" in status
            and "\nGid:\t1337\t1337\t1337\t1337\n" in status
        )
        assert pod.cgroup_dir.parent == netlab_node.cgroup.path
        assert "REDIRECT --to-ports 15001" in dump_nat_table(pod.netns)
    assert os.getpid() not in cgroup_pids(netlab_node.cgroup.path)


@kernel
def test_short_commands_run_in_the_pod_with_an_optional_identity(netlab_node: Node) -> None:
    pod = netlab_node.pods["c"]
    as_root = pod.run_to_completion(["cat", "/proc/self/cgroup"], timeout=10)
    relative = pod.cgroup_dir.relative_to(netlab_node.cgroup.root)
    assert f"0::/{relative}" in as_root.stdout.splitlines()
    as_sidecar = pod.run_to_completion(["id", "-u"], timeout=10, run_as=SIDECAR_IDENTITY)
    assert as_sidecar.stdout.strip() == "1337", as_sidecar.stderr
    addresses = pod.run_to_completion(["ip", "-4", "-o", "addr", "show", "dev", "eth0"], timeout=10)
    assert f"inet {pod.ip}/24" in addresses.stdout
    # Its IPv6 twin, usable at once (no DAD: never tentative), and ::6 for Istio's passthrough.
    addresses6 = pod.run_to_completion(["ip", "-6", "-o", "addr", "show"], timeout=10)
    (line,) = [line for line in addresses6.stdout.splitlines() if f"inet6 {pod.ipv6}/64" in line]
    assert " eth0 " in line and "tentative" not in line, line
    assert "inet6 ::6/128" in addresses6.stdout
    routes6 = pod.run_to_completion(["ip", "-6", "route", "show"], timeout=10)
    assert f"{netlab_node.subnet6} dev eth0" in routes6.stdout
    assert "default" not in routes6.stdout  # IPv6 stays on the lab's link


@kernel
def test_bridge_netfilter_is_off_in_the_node_netns_only(netlab_node: Node) -> None:
    sysctl = "/proc/sys/net/bridge/bridge-nf-call-iptables"
    assert run_in_netns(netlab_node.netns, ["cat", sysctl]).strip() == "0"
    # Per-netns on this kernel: the host's own setting is not ours to change (and was not changed).
    host_value = Path(sysctl).read_text().strip()
    assert host_value in {"0", "1"}


@kernel
@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "dual-stack"])
def test_http_variant_bootstrap_is_valid_envoy_config(
    tmp_path: Path, netlab_requirements: None, ipv6: bool
) -> None:
    options = EnvoyBootstrapOptions(
        node_id="validate", access_log_path=tmp_path / "access.log", protocol="http", ipv6=ipv6
    )
    bootstrap = tmp_path / "bootstrap.yaml"
    bootstrap.write_text(json.dumps(render_envoy_bootstrap(options)))
    completed = subprocess.run(
        [
            str(find_envoy_binary()),
            "--mode",
            "validate",
            "-c",
            str(bootstrap),
            "--disable-hot-restart",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]


# ---------------------------------------------------------------- app capabilities


@kernel
@pytest.mark.parametrize("identity", [None, SIDECAR_IDENTITY], ids=["app", "uid1337"])
def test_paced_background_client_keeps_its_connections_open(
    netlab_node: Node, identity: RunAs | None
) -> None:
    a, b = netlab_node.pods["a"], netlab_node.pods["b"]
    pace, chunks, nbytes = 1.0, 50, 64 * 1024
    run = a.start_echo_client(
        str(b.ip),
        ECHO_PORT,
        pace_seconds=pace,
        pace_chunks=chunks,
        nbytes=nbytes,
        connections=2,
        run_as=identity,
    )
    locals_ = run.wait_connected(timeout=10)
    assert len(set(locals_)) == 2
    run.wait_echoed(nbytes // 4, timeout=10)
    assert run.is_running()  # mid-way: both connections are open and have echoed a quarter
    result = run.wait(timeout=30)
    assert result.ok, result.raw
    assert result.local_addresses == locals_ and result.raw["uid"] == (identity or RunAs(0, 0)).uid
    for connection in result.connections:
        # Every chunk of the pace went out on the one connection; that they were spread over
        # the pace is send_on_plan's, tested above on a manual clock.
        assert connection["received"] == nbytes and connection["chunks"] == chunks
    echoed = [e for e in run.events() if e["event"] == "echoed"]
    assert len(echoed) >= 2 * 40  # ~50 chunks per connection, verified as they came back


@kernel
@pytest.mark.parametrize(
    ("port", "pace"), [(EXCLUDED_PORT, 0.0), (ECHO_PORT, 0.3)], ids=["direct", "paced-sidecars"]
)
def test_reset_client_and_the_server_keeps_serving(
    netlab_node: Node, port: int, pace: float
) -> None:
    a, b = netlab_node.pods["a"], netlab_node.pods["b"]
    reset_after = 48 * 1024
    result = a.echo_client(
        str(b.ip), port, nbytes=64 * 1024, reset_after=reset_after, pace_seconds=pace
    )
    assert result.ok and result.reset, result.raw
    assert result.verified == [reset_after]
    assert result.connections[0]["left_behind"] == []  # an RST: no FIN_WAIT, no TIME_WAIT
    if port == EXCLUDED_PORT:  # no sidecar in between: the server itself saw the RST
        served = b.servers[port].wait_closed_from(result.connections[0]["local"])
        assert served["errno"] == errno.ECONNRESET and served["bytes"] == reset_after, served
    fresh = a.echo_client(str(b.ip), port, nbytes=64 * 1024)
    assert fresh.ok and not fresh.reset, fresh.raw
    assert b.servers[port].process.is_running()


@kernel
def test_getsockopt_probe_is_deterministic_and_the_pod_matches_the_host(
    netlab_node: Node,
) -> None:
    c = netlab_node.pods["c"]
    first, second = c.getsockopt_probe(), c.getsockopt_probe()
    assert first == second
    assert c.getsockopt_probe(run_as=SIDECAR_IDENTITY) == first
    host, host_again = run_getsockopt_probe_here(), run_getsockopt_probe_here()
    assert host == host_again
    # The same netns outside the pod's cgroup: identical, case for case.
    assert run_getsockopt_probe_here(netns=c.netns) == first
    # The host's netns: identical except SO_ORIGINAL_DST, which conntrack answers in the pod
    # (Istio's nat rules make it track even this un-NATed loopback pair).
    assert set(host) == set(first)
    assert {k: v for k, v in host.items() if k not in NETNS_DEPENDENT_CASES} == {
        k: v for k, v in first.items() if k not in NETNS_DEPENDENT_CASES
    }
    assert first["tcp/SO_ORIGINAL_DST"] == {
        "ok": True,
        "len": 16,
        "hex": "020000007f0000010000000000000000",  # AF_INET 127.0.0.1:<listener port, masked>
        "errno": None,
        "masked": "port==listener",
    }
    assert first["tcp/SO_ORIGINAL_DST/buf8"]["errno"] == errno.EINVAL

    # The kernel's own answers, as the probe recorded them.
    assert first["tcp/SO_TYPE"] == {"ok": True, "len": 4, "hex": "01000000", "errno": None}
    assert first["tcp/SO_TYPE/buf8192"] == first["tcp/SO_TYPE"]
    assert first["udp/SO_TYPE"]["hex"] == "02000000"
    assert first["tcp/SO_RCVBUF/buf2"]["len"] == 2  # truncated, not an error
    assert first["tcp/SO_RCVBUF/buf2"]["hex"] == first["tcp/SO_RCVBUF"]["hex"][:4]
    assert first["tcp/TCP_CONGESTION"]["len"] == 16
    assert first["tcp/TCP_INFO"]["ok"] and first["tcp/TCP_INFO"]["hex"] == ""
    needed = 4 * len(GROUPS_FOR_PEERGROUPS)
    assert needed > 4096
    big = first["unix/SO_PEERGROUPS/buf16384"]
    assert big["ok"] and big["len"] == needed and len(big["sha256"]) == 64
    small = first["unix/SO_PEERGROUPS/buf4096"]
    assert not small["ok"] and small["errno"] == errno.ERANGE and small["len"] == needed


@kernel
def test_the_ipv6_getsockopt_probe_is_deterministic_and_the_pod_matches_the_host(
    netlab_node: Node,
) -> None:
    c = netlab_node.pods["c"]
    first = c.getsockopt_probe(family="ipv6")
    assert c.getsockopt_probe(family="ipv6") == first
    host = run_getsockopt_probe_here(family="ipv6")
    assert set(host) == set(first)
    assert {k: v for k, v in host.items() if k not in NETNS_DEPENDENT_CASES} == {
        k: v for k, v in first.items() if k not in NETNS_DEPENDENT_CASES
    }
    # The pod's ip6 nat table makes conntrack track the probe's own pair: netfilter answers
    # with a sockaddr_in6 (AF_INET6, [::1]:<listener port, masked>) and leaves optlen as given.
    family = socket.AF_INET6.to_bytes(2, sys.byteorder).hex()
    assert first["tcp/IP6T_SO_ORIGINAL_DST"] == {
        "ok": True,
        "len": 28,
        "hex": family + "0000" + "00000000" + "00" * 15 + "01" + "00000000",
        "errno": None,
        "masked": "port==listener",
    }
    assert first["tcp/IP6T_SO_ORIGINAL_DST/buf16"]["errno"] == errno.EINVAL
    assert first["tcp/IPV6_UNICAST_HOPS"]["ok"] and first["udp/SO_TYPE"]["hex"] == "02000000"


# ---------------------------------------------------------------- nothing left behind


@kernel
def test_nat_table_removal_deletes_the_table(netlab_factory: NodeFactory) -> None:
    node = netlab_factory((MeshPodSpec("n", sidecar=False, echo_ports=()),), subnet="198.18.1.0/24")
    pod = node.pods["n"]
    assert nat_table_exists(pod.netns) and nat_table_exists(pod.netns, "ipv6")
    assert "-A ISTIO_OUTPUT -d ::1/128 -j RETURN" in dump_nat_table(pod.netns, "ipv6")
    pod.remove_istio_iptables()
    assert not nat_table_exists(pod.netns)
    assert not nat_table_exists(pod.netns, "ipv6")


@kernel
def test_teardown_leaves_nothing(netlab_requirements: None) -> None:
    with mesh_node((MeshPodSpec("x"),), subnet="198.18.2.0/24") as node:
        pod = node.pods["x"]
        assert pod.sidecar is not None
        pids = [pod.sidecar.pid, *(server.pid for server in pod.servers.values())]
        cgroups = [node.cgroup.path, pod.cgroup_dir]
        assert all(path.is_dir() for path in cgroups)
        assert {node.netns, pod.netns} <= set(list_netns())
        assert find_leftovers(node.token)  # the scanner does see a live node
    assert find_leftovers(node.token) == []
    assert not any(path.exists() for path in cgroups)
    assert not {node.netns, pod.netns} & set(list_netns())
    assert not node.workdir.exists()
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists()
            or node.token not in Path(f"/proc/{pid}/cmdline").read_text()
        )


@kernel
def test_failed_setup_leaves_nothing(netlab_requirements: None) -> None:
    specs = (
        MeshPodSpec("ok"),
        MeshPodSpec("bad", echo_ports=(ECHO_PORT, ECHO_PORT)),
    )  # 2nd bind fails
    node = mesh_node(specs, subnet="198.18.3.0/24")
    with pytest.raises(RuntimeError, match="echo server exited"), node:
        pytest.fail("setup should have failed")
    assert node.pods["ok"].sidecar is not None  # it got as far as a running Envoy
    assert find_leftovers(node.token) == []
    assert not (find_cgroup2_mount() / node.cgroup.path.name).exists()


@kernel
def test_sidecar_runs_when_envoy_sits_where_uid_1337_cannot_reach(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, netlab_requirements: None
) -> None:
    hidden = tmp_path / "private"
    hidden.mkdir(mode=0o700)
    binary = hidden / "envoy"
    os.link(find_envoy_binary(), binary)  # same filesystem as /tmp: no 100 MB copy
    monkeypatch.setenv("MESHACCEL_ENVOY", str(binary))
    assert not path_usable_by(binary, 1337, 1337)
    with mesh_node((MeshPodSpec("h", echo_ports=()),), subnet="198.18.4.0/24") as node:
        sidecar = node.pods["h"].sidecar
        assert sidecar is not None and sidecar.is_ready()
        exe = Path(os.readlink(f"/proc/{sidecar.pid}/exe"))
        assert exe.parent == node.workdir
    assert find_leftovers(node.token) == []


@kernel
def test_stale_leftovers_of_a_dead_run_are_removed(netlab_requirements: None) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, timeout=10, check=True)  # fmt: skip
    dead_pid = int(dead.stdout)
    assert not Path(f"/proc/{dead_pid}").exists()
    stale_netns = f"meshaccel-{dead_pid}-0-node"
    stale_cgroup = find_cgroup2_mount() / f"meshaccel-test-{dead_pid}-0"
    create_netns(stale_netns)
    stale_cgroup.mkdir()
    (stale_cgroup / "pod-a").mkdir()
    try:
        removed = remove_stale_leftovers()
        assert f"netns {stale_netns}" in removed and f"cgroup {stale_cgroup}" in removed
        assert stale_netns not in list_netns() and not stale_cgroup.exists()
    finally:
        delete_netns(stale_netns)
        for path in (stale_cgroup / "pod-a", stale_cgroup):
            if path.exists():
                path.rmdir()
