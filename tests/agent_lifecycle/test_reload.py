"""A changed datapath setting takes effect: the agent replaces pins loaded otherwise.

Same settings: the restarted agent adopts (no kernel change). Another feature, sk_msg budget or
map capacity: it unloads the pinned datapath as an uninstall does (drain, detach, unpin) and
loads anew, and the pods come back with the next set; ``--no-reload-on-change`` adopts it as it
is, with a warning. Open connections carry on across a reload, byte-exact, and no new one fails.

Real agents on the real kernel, standalone, attached to the node's own test cgroup and pinned
under /sys/fs/bpf/meshaccel-test-<pid> (see conftest.py). The agents start with
``--sk-msg-redirect``, the default spelled out (StandaloneAgents.argv); a later
``--no-sk-msg-redirect`` overrides it.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

import pytest

from meshaccel.agent import config, libbpf
from meshaccel.agent.datapath import RETIRED_MAPS, Datapath, LoadedConfig, PinLayout
from meshaccel.agent.layout import DatapathFeatures
from meshaccel.agent.main import CAPACITY_MAPS, FEATURE_SETTINGS, config_differences
from meshaccel.contract.settings import AgentSettings, Capacities
from tests.agent_lifecycle.conftest import StandaloneAgents, pod_entry
from tests.agent_lifecycle.harness import PIN_ROOT, AgentProcess
from tests.agent_lifecycle.test_agent import (
    RequestLoop,
    accelerated,
    between,
    decisions,
    failures,
    pod_names,
    program_ids,
    summary,
)
from tests.netlab import ECHO_PORT
from tests.waiting import wait_until

SK_MSG = "FEATURE_SK_MSG_REDIRECT"
STREAM = 512 << 10  # per long-lived connection ...
PACE = 5.0  # ... paced over seconds: longer than a reload


# -- the tables main.py compares with (no kernel) ---------------------------------------------


def local_settings(**values: object) -> AgentSettings:
    return AgentSettings.model_validate(
        {"insecure_no_token": True, "listen_address": "127.0.0.1", **values}
    )


def test_capacity_maps_name_every_sized_map_once() -> None:
    named = [name for maps in CAPACITY_MAPS.values() for name in maps]
    assert sorted(named) == sorted(Capacities().max_entries()), "every sized map, once"
    for setting, maps in CAPACITY_MAPS.items():
        value = AgentSettings.model_fields[setting].default + 7
        sized = local_settings(**{setting: value})
        changed = {
            name
            for name, n in sized.capacities.max_entries().items()
            if n != Capacities().max_entries()[name]
        }
        assert changed == set(maps), f"{setting} sizes {sorted(changed)}, the table says {maps}"


def test_feature_settings_build_the_settings_features() -> None:
    # Every feature is a setting, but the one the kernel decides (the agent probes it at load).
    kernels = {DatapathFeatures.FEATURE_SK_MSG_TO_EVERY_APP}
    assert set(FEATURE_SETTINGS.values()) == set(DatapathFeatures) - kernels
    for setting, feature in FEATURE_SETTINGS.items():
        for on in (True, False):
            settings = local_settings(**{setting: on})
            assert (feature in config.datapath_features(settings)) == on, f"{setting}={on}"


ON = DatapathFeatures.FEATURE_SAME_NODE_INBOUND | DatapathFeatures.FEATURE_SK_MSG_REDIRECT
OFF = DatapathFeatures.FEATURE_SAME_NODE_INBOUND
MiB = 1 << 20


@pytest.mark.parametrize(
    ("pinned", "settings", "expected", "reason"),
    [
        (LoadedConfig(ON, MiB), {}, [], "the defaults, as loaded"),
        (
            LoadedConfig(ON, MiB),
            {"sk_msg_redirect_budget": 2 * MiB},
            ["sk_msg_redirect_budget 1048576 -> 2097152"],
            "the budget the sk_msg program runs with changed",
        ),
        (
            LoadedConfig(OFF, MiB),
            {"sk_msg_redirect": False, "sk_msg_redirect_budget": 2 * MiB},
            [],
            "without redirection the budget is never read: no reload for it",
        ),
        (
            LoadedConfig(OFF, MiB),
            {"sk_msg_redirect_budget": 2 * MiB},
            ["sk_msg_redirect off -> on"],
            "switching sk_msg on reloads anyway: the budget is not named twice",
        ),
        (
            LoadedConfig(ON, MiB),
            {"sk_msg_redirect": False, "same_node_inbound": False},
            ["same_node_inbound on -> off", "sk_msg_redirect on -> off"],
            "both features, in the table's order",
        ),
        (
            LoadedConfig(ON | DatapathFeatures(1 << 2), 0),
            {},
            ["sk_msg_redirect_budget 0 -> 1048576"],
            "pins from before the budget (retired FEATURE_SK_MSG_TO_APPS, pad 0): reloaded",
        ),
    ],
)
def test_config_differences(
    pinned: LoadedConfig, settings: dict[str, object], expected: list[str], reason: str
) -> None:
    found = config_differences(pinned, local_settings(**settings))
    assert [str(difference) for difference in found] == expected, reason


# -- the real agent ----------------------------------------------------------------------------


def started_with(standalone: StandaloneAgents, *extra: str) -> AgentProcess:
    """A first agent with ``extra`` settings and pods a and b; stopped (SIGTERM, pins kept)."""
    a, b = standalone.node.pods["a"], standalone.node.pods["b"]
    standalone.write_pods([pod_entry(a), pod_entry(b)])
    first = standalone.start(*extra)
    wait_until(lambda: len(first.get("/v1/pods")["pods"]) == 2, timeout=10, what="pods a and b")
    return first


def logged(agent: AgentProcess, message_start: str) -> list[dict[str, Any]]:
    return [r for r in agent.logs() if r["msg"].startswith(message_start)]


def program_exists(program_id: int) -> bool:
    shown = subprocess.run(
        ["bpftool", "prog", "show", "id", str(program_id)], capture_output=True, timeout=10
    )
    return shown.returncode == 0


def pinned(standalone: StandaloneAgents) -> Datapath:
    return Datapath.adopt(instance=standalone.instance, pin_root=PIN_ROOT)


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ((), "the same flags"),
        (("--max-pods=1024", "--sk-msg-redirect"), "the defaults spelled out"),
    ],
)
@pytest.mark.kernel
@pytest.mark.slow
def test_same_settings_are_adopted(
    standalone: StandaloneAgents, extra: tuple[str, ...], reason: str
) -> None:
    first = started_with(standalone)
    programs = program_ids(first.get("/v1/status"))
    assert first.stop() == 0
    second = standalone.start(*extra)
    assert decisions(second.logs()) == ["adopted"], reason
    status = second.get("/v1/status")
    assert program_ids(status) == programs, reason
    assert (status["startup"], status["startup_reason"]) == ("adopted", None), reason
    assert not logged(second, "the pinned datapath differs"), reason
    assert not logged(second, "the adopted datapath differs"), reason
    assert second.stop() == 0


@pytest.mark.kernel
@pytest.mark.slow
def test_a_flipped_feature_reloads(standalone: StandaloneAgents) -> None:
    a, b = standalone.node.pods["a"], standalone.node.pods["b"]
    first = started_with(standalone)
    before = first.get("/v1/status")
    assert SK_MSG in before["datapath_features"]
    assert first.stop() == 0

    second = standalone.start("--no-sk-msg-redirect", "--drain-seconds=0.2")
    assert decisions(second.logs()) == ["reloaded"]
    (replacing,) = logged(second, "the pinned datapath differs from the settings")
    assert replacing["changes"] == ["sk_msg_redirect on -> off"], replacing
    (startup,) = [r for r in second.logs() if "decision" in r]
    assert startup["reason"] == "sk_msg_redirect on -> off", startup
    assert "sk_msg_redirect" not in startup["features"], startup

    # New programs from new pins; the old ones are gone from the kernel.
    after = second.get("/v1/status")
    assert after["attached"] and SK_MSG not in after["datapath_features"]
    assert (after["startup"], after["startup_reason"]) == ("reloaded", "sk_msg_redirect on -> off")
    old, new = program_ids(before), program_ids(after)
    assert set(old) == set(new) and not set(old.values()) & set(new.values()), (old, new)
    wait_until(
        lambda: not any(program_exists(i) for i in old.values() if i is not None),
        timeout=10,
        what="the old programs freed",
    )
    with pinned(standalone) as datapath:
        assert datapath.features == DatapathFeatures.FEATURE_SAME_NODE_INBOUND
    # The pods file is applied again, into the new (empty) maps.
    wait_until(
        lambda: pod_names(second.get("/v1/pods")) == {"a": a.cgroup_id, "b": b.cgroup_id},
        timeout=10,
        what="pods a and b re-applied",
    )
    (applied, *_) = logged(second, "pods file applied")
    assert applied["added"] == 2, applied
    # New connections are steered by the new datapath, without sk_msg.
    echo = a.echo_client(str(b.ip), ECHO_PORT, nbytes=64 << 10)
    assert echo.ok and echo.kernel_local_addresses[0].startswith("127.0.0.1:"), echo.raw
    counters = second.get("/v1/status")["counters"]
    assert counters["connect_outbound_redirected"] >= 1 and counters["msg_redirected"] == 0
    assert second.stop() == 0


@pytest.mark.kernel
@pytest.mark.slow
def test_a_changed_capacity_reloads(standalone: StandaloneAgents) -> None:
    first = started_with(standalone)
    assert first.stop() == 0
    second = standalone.start("--max-pods=2048", "--max-connections=4096", "--drain-seconds=0")
    assert decisions(second.logs()) == ["reloaded"]
    (startup,) = [r for r in second.logs() if "decision" in r]
    assert startup["reason"] == "max_pods 1024 -> 2048, max_connections 65536 -> 4096"
    assert startup["max_pods"] == 2048
    maps = {m["name"]: m["max_entries"] for m in second.get("/v1/status")["maps"]}
    assert (maps["pods"], maps["pod_ips"]) == (2048, 4096), maps  # an entry per family
    with pinned(standalone) as datapath:
        assert (datapath.max_entries("pods"), datapath.max_entries("pod_ips")) == (2048, 4096)
        assert all(datapath.max_entries(name) == 4096 for name in CAPACITY_MAPS["max_connections"])
        assert datapath.max_entries("pod_ports") == Capacities.pod_ports
        assert SK_MSG in {f.name for f in DatapathFeatures if f in datapath.features}
    # A third start with these settings adopts what the second loaded.
    assert second.stop() == 0
    third = standalone.start("--max-pods=2048", "--max-connections=4096")
    assert decisions(third.logs()) == ["adopted"]
    assert third.stop() == 0


@pytest.mark.kernel
@pytest.mark.slow
def test_a_changed_sk_msg_budget_reloads(standalone: StandaloneAgents) -> None:
    first = started_with(standalone)
    assert first.stop() == 0
    second = standalone.start("--sk-msg-redirect-budget=262144", "--drain-seconds=0")
    assert decisions(second.logs()) == ["reloaded"]
    (startup,) = [r for r in second.logs() if "decision" in r]
    assert startup["reason"] == "sk_msg_redirect_budget 1048576 -> 262144", startup
    assert startup["sk_msg_redirect_budget"] == 262144, startup
    with pinned(standalone) as datapath:
        assert datapath.loaded_config == LoadedConfig(ON, 262144)
    assert second.stop() == 0
    third = standalone.start("--sk-msg-redirect-budget=262144")
    assert decisions(third.logs()) == ["adopted"]
    assert third.stop() == 0


@pytest.mark.kernel
@pytest.mark.slow
def test_an_earlier_releases_datapath_is_replaced(standalone: StandaloneAgents) -> None:
    """An upgrade: pins an earlier release left (a map this release no longer has) are
    unloaded and the current datapath is loaded, without an uninstall first."""
    first = started_with(standalone)
    assert first.stop() == 0
    pins = PinLayout(PIN_ROOT / standalone.instance)
    retired = pins.map(RETIRED_MAPS[0])
    with libbpf.Map.from_pin(pins.map("handshakes")) as stand_in:
        stand_in.pin(retired)  # what a v0.1 agent pinned, by name
    second = standalone.start("--drain-seconds=0")
    assert decisions(second.logs()) == ["reloaded"]
    (startup,) = [r for r in second.logs() if "decision" in r]
    assert startup["reason"] == "datapath an earlier release's -> this release's", startup
    assert not retired.exists()
    assert second.get("/v1/status")["attached"]
    assert second.stop() == 0
    third = standalone.start()
    assert decisions(third.logs()) == ["adopted"]
    assert third.stop() == 0


@pytest.mark.kernel
@pytest.mark.slow
def test_no_reload_on_change_adopts_with_a_warning(standalone: StandaloneAgents) -> None:
    first = started_with(standalone)
    programs = program_ids(first.get("/v1/status"))
    assert first.stop() == 0
    second = standalone.start("--no-reload-on-change", "--no-sk-msg-redirect", "--max-pods=2048")
    assert decisions(second.logs()) == ["adopted"]
    (warning,) = logged(second, "the adopted datapath differs from the settings")
    assert warning["level"] == "warning"
    assert warning["changes"] == ["sk_msg_redirect on -> off", "max_pods 1024 -> 2048"], warning
    assert "reload_on_change" in warning["msg"]
    status = second.get("/v1/status")
    assert program_ids(status) == programs, "nothing was loaded again"
    assert SK_MSG in status["datapath_features"], "it keeps what it was loaded with"
    assert {m["name"]: m["max_entries"] for m in status["maps"]}["pods"] == 1024
    assert status["startup"] == "adopted" and "max_pods 1024 -> 2048" in status["startup_reason"]
    assert second.stop() == 0


@pytest.mark.kernel
@pytest.mark.slow
def test_open_connections_survive_a_reload(standalone: StandaloneAgents) -> None:
    """Long-lived connections mid-stream through sk_msg, and a new connection every 20 ms,
    while the agent replaces the datapath (sk_msg on -> off): every byte echoed exactly,
    every request succeeds."""
    a, b = standalone.node.pods["a"], standalone.node.pods["b"]
    first = started_with(standalone)
    streams = a.start_echo_client(
        str(b.ip), ECHO_PORT, nbytes=STREAM, connections=2, pace_seconds=PACE
    )
    assert all(local.startswith("127.0.0.1:") for local in streams.wait_connected())
    streams.wait_echoed(STREAM // 4)
    assert first.get("/v1/status")["counters"]["msg_redirected"] > 0, "bytes via sk_msg"
    loop = RequestLoop(a, b, count=250)
    loop.wait_requests(15)

    assert first.stop() == 0
    stopped_at = time.time()
    second = standalone.start("--no-sk-msg-redirect", "--drain-seconds=0.5")
    ready_at = time.time()
    assert decisions(second.logs()) == ["reloaded"]
    assert streams.is_running(), "the connections must span the whole reload"

    result = streams.wait(timeout=30)
    records = loop.finish()
    during = between(records, stopped_at, ready_at)
    print(
        summary("reload under load", records, during_reload=len(during)),
        f"reload {1000 * (ready_at - stopped_at):.0f} ms (stop to ready)",
    )
    assert result.ok and len(result.connections) == 2, result.raw
    assert failures(records) == [], failures(records)[:5]
    assert during, "the load must overlap the reload"
    assert all(accelerated(r) for r in records if r["t"] < stopped_at)
    # Once the file is applied again, new connections are steered by the new datapath.
    later = between(records, ready_at + 0.5, float("inf"))
    assert later and all(accelerated(r) for r in later), later[:5]
    assert second.stop() == 0
