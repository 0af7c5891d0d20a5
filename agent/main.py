"""``meshaccel-agent``: the node agent's process.

    meshaccel-agent [run] [flags]     the daemon (a DaemonSet pod on every node)
    meshaccel-agent uninstall         adopt the pinned datapath, detach it with the drain, unpin
    meshaccel-agent show-config       print the effective settings and their sources
    meshaccel-agent status|pods|check|version [-o json]   reports (:mod:`.commands`)

Life cycle of ``run``:

1. Settings (flags > ``MESHACCEL_*`` > config file > defaults); an invalid one exits 2 with
   one line. Host prerequisites, once (:mod:`.preflight`, as ``meshaccel-agent check``); a
   failed one exits 1 with its cause and fix, its report the kubelet's termination message.
2. The datapath: a complete set of pins under ``<pin_root>/<instance>`` loaded with the
   features, sk_msg budget and map capacities the settings ask for is **adopted** (the kernel
   is not touched, so no connection notices the new agent); one loaded with others is
   **reloaded**: unloaded as by an uninstall (stop redirecting, detach, drain, unpin; open
   connections carry on over plain TCP) and loaded anew, unless ``reload_on_change`` is off
   (then adopted as it is, with a warning). Without pins the datapath is **loaded** and
   attached to the attach cgroup. An earlier release's datapath (maps this one no longer has)
   is reloaded too. Pins of a half-made datapath (an agent killed while loading) are refused:
   ``meshaccel-agent uninstall`` clears them.
3. The reconciler, the pod resolver (cgroups), the HTTP API on ``listen_address:port`` (mutual
   TLS with the files of the operator's Secret, re-read when they change; plain HTTP only on
   loopback with ``insecure_no_token``), its read-only view on ``local_socket`` and,
   standalone, the pods file watcher. Ready once attached and the first set is applied.
4. SIGTERM or SIGINT: stop serving, finish the apply in progress, close the map fds and
   **keep every pin**: the programs go on working without the agent (a restart or an upgrade
   drops nothing). With ``--uninstall-on-exit`` the agent instead unloads: it stops
   redirecting, detaches, waits ``drain_seconds`` and removes every pin (fail-open: open
   connections carry on over plain TCP, new ones take the mesh's iptables path).
   SIGKILL leaves the pins too; the next start adopts them. After the operator's
   ``POST /v1/uninstall`` (the same unload, done while serving) nothing is left to do.

Exit codes: 0 stopped as asked, 1 could not start or run, 2 invalid settings.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from aiohttp import web

from meshaccel.agent import commands, config, libbpf, preflight, prerequisites
from meshaccel.agent.config import LoadedSettings, SettingsError
from meshaccel.agent.datapath import (
    Datapath,
    LoadedConfig,
    PinLayout,
    earlier_release,
    unload_pins,
)
from meshaccel.agent.identity import CgroupResolver
from meshaccel.agent.layout import DatapathFeatures
from meshaccel.agent.local_api import serving_locally
from meshaccel.agent.prerequisites import DatapathError
from meshaccel.agent.reconcile import Reconciler
from meshaccel.agent.server import DatapathInfo, create_app, is_uninstalled, serving
from meshaccel.agent.standalone import PodsFileWatcher
from meshaccel.agent.tls import ServerTLS
from meshaccel.contract.api import StartupDecision as Decision
from meshaccel.contract.logs import configure_logging
from meshaccel.contract.settings import AgentSettings
from meshaccel.contract.version import VERSION

log = logging.getLogger("meshaccel.agent")

EXIT_OK = 0
EXIT_FAILED = 1
SHUTDOWN_TIMEOUT_SECONDS = 5.0  # in-flight API requests get this long to finish


class IncompleteDatapathError(DatapathError):
    pass


@dataclass(frozen=True)
class Startup:
    """What start-up decided, for the logs and the status."""

    decision: Decision
    attach_cgroup: Path
    cgroup2_mount: Path
    pins: PinLayout
    duration_ms: float
    # What the pinned datapath had that the settings do not ask for: why it was "reloaded"
    # (or, with reload_on_change off, what an "adopted" one keeps). Empty when they agree.
    differences: tuple[Difference, ...] = ()

    @property
    def reason(self) -> str | None:
        return describe(self.differences) or None


@dataclass(frozen=True)
class Difference:
    """One setting the pinned datapath was loaded with otherwise than the settings ask."""

    setting: str
    pinned: object
    wanted: object

    def __str__(self) -> str:
        return f"{self.setting} {_show(self.pinned)} -> {_show(self.wanted)}"


#: What replaces a datapath pinned by an earlier release (datapath.earlier_release).
OLDER_RELEASE = Difference("datapath", "an earlier release's", "this release's")


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def describe(differences: Sequence[Difference]) -> str:
    return ", ".join(map(str, differences))


# The setting that sizes each map (Capacities.max_entries() names the same maps).
CAPACITY_MAPS: dict[str, tuple[str, ...]] = {
    "max_pods": ("pods", "pod_ips", "inbound_listeners", "app_reuse"),
    "max_pod_ports": ("pod_ports",),
    "max_pod_cidrs": ("outbound_excluded_cidrs", "outbound_included_cidrs"),
    "max_connections": (
        "handshakes",
        "msg_senders",
        "msg_receivers",
        "receive_queues",
    ),
}
# The setting that switches each feature (config.datapath_features builds them the same way).
FEATURE_SETTINGS: dict[str, DatapathFeatures] = {
    "same_node_inbound": DatapathFeatures.FEATURE_SAME_NODE_INBOUND,
    "sk_msg_redirect": DatapathFeatures.FEATURE_SK_MSG_REDIRECT,
}


def config_differences(pinned: LoadedConfig, settings: AgentSettings) -> tuple[Difference, ...]:
    """How what a datapath was loaded with differs from ``settings``.

    The budget counts only while sk_msg redirects on both sides: without redirection it is
    never read, and a switched feature reloads anyway.
    """
    found = []
    wanted = config.datapath_features(settings)
    for setting, feature in FEATURE_SETTINGS.items():
        was_on, wanted_on = feature in pinned.features, feature in wanted
        if was_on != wanted_on:
            found.append(Difference(setting, was_on, wanted_on))
    redirecting = DatapathFeatures.FEATURE_SK_MSG_REDIRECT in pinned.features & wanted
    if redirecting and pinned.redirect_budget != settings.sk_msg_redirect_budget:
        found.append(
            Difference(
                "sk_msg_redirect_budget", pinned.redirect_budget, settings.sk_msg_redirect_budget
            )
        )
    return tuple(found)


def pinned_differences(pinned: Datapath, settings: AgentSettings) -> tuple[Difference, ...]:
    """How the adopted datapath ``pinned`` differs from ``settings``: the configuration it was
    loaded with (:func:`config_differences`) and its maps' max_entries, as it reads them from
    its pins (nothing in the kernel changes)."""
    found = list(config_differences(pinned.loaded_config, settings))
    pinned_sizes = {
        name: pinned.max_entries(name) for maps in CAPACITY_MAPS.values() for name in maps
    }
    max_entries = settings.capacities.max_entries()
    for setting, maps in CAPACITY_MAPS.items():
        sizes = [pinned_sizes[name] for name in maps]
        wanted = [max_entries[name] for name in maps]
        if sizes != wanted:
            # The first map is sized by the setting itself, the others by a multiple of it
            # (pod_ips: two a pod, one per family): name the setting's value if they agree.
            agree = all(
                size * wanted[0] == want * sizes[0]
                for size, want in zip(sizes, wanted, strict=True)
            )
            pinned_size = sizes[0] if agree else "/".join(map(str, sizes))
            found.append(Difference(setting, pinned_size, wanted[0]))
    return tuple(found)


def feature_names(features: DatapathFeatures) -> list[str]:
    return [
        (f.name or "").removeprefix("FEATURE_").lower() for f in DatapathFeatures if f in features
    ]


def _check_host(loaded: LoadedSettings) -> tuple[Path, Path]:
    """Every prerequisite, once, before anything is made: (cgroup2 mount, attach cgroup). A
    failed one stops start-up, its report written where the kubelet reads it; a failed
    warning is logged."""
    report = preflight.check_settings(loaded, mount_bpffs=True)
    for check in report.warnings:
        log.warning(
            f"check {check.name}: {check.detail}",
            extra={"check": check.name, "fix": check.fix, **check.extra},
        )
    if not report.ok:
        path = loaded.settings.termination_message_path
        if preflight.write_termination_message(report, path):
            log.info("check report written", extra={"path": str(path)})
        report.raise_for_failure()
    assert report.cgroup2_mount is not None and report.attach_cgroup is not None  # checked
    return report.cgroup2_mount, report.attach_cgroup


def open_datapath(loaded: LoadedSettings) -> tuple[Datapath, Startup]:
    """Adopt the pinned datapath, replace it when the settings changed, or load a new one."""
    settings = loaded.settings
    started = time.monotonic()
    mount, attach = _check_host(loaded)
    pins = PinLayout(settings.pin_root / settings.instance)
    replaced: tuple[Difference, ...] = ()
    earlier = earlier_release(pins, settings.bpf_objects)
    if earlier is not None:
        # An earlier release's datapath (other maps, other programs): replace it, as on a
        # change of settings, so that an upgrade needs no uninstall first.
        log.info("the pinned datapath is an earlier release's", extra={"why": earlier})
        replaced = (OLDER_RELEASE,)
        _unload_changed(pins, replaced, settings.drain_seconds)
    present = [p for p in pins.all_pins() if p.exists()]
    complete = len(present) == len(pins.all_pins())
    if not complete and any(p in present for p in pins.attachments()):
        missing = sorted(str(p) for p in pins.all_pins() if p not in present)
        raise IncompleteDatapathError(
            f"an incomplete datapath is pinned under {pins.root} (missing {', '.join(missing)}):"
            " an agent was stopped while loading it. Remove it with `meshaccel-agent uninstall`"
            " (same --pin-root and --instance), then start again"
        )
    # Adopted once: kept as it is, or read for what differs and then replaced.
    pinned = (
        Datapath.adopt(instance=settings.instance, pin_root=settings.pin_root) if complete else None
    )
    try:
        differences = pinned_differences(pinned, settings) if pinned else replaced
    except BaseException:
        if pinned is not None:
            pinned.close()
        raise
    decision: Decision = "reloaded" if replaced else "loaded"
    if pinned is not None and differences and settings.reload_on_change:
        pinned.close()
        pinned = None
        _unload_changed(pins, differences, settings.drain_seconds)
        decision = "reloaded"
    elif pinned is not None:
        decision = "adopted"
    if pinned is not None:
        datapath = pinned
    else:
        datapath = Datapath.load(
            attach,
            instance=settings.instance,
            objects_dir=settings.bpf_objects,
            features=config.datapath_features(settings),
            redirect_budget=settings.sk_msg_redirect_budget,
            capacities=settings.capacities,
            pin_root=settings.pin_root,
            host_checked=True,  # _check_host ran them
        )
    startup = Startup(
        decision=decision,
        attach_cgroup=attach,
        cgroup2_mount=mount,
        pins=pins,
        duration_ms=(time.monotonic() - started) * 1000,
        differences=differences,
    )
    return datapath, startup


def _unload_changed(
    pins: PinLayout, differences: Sequence[Difference], drain_seconds: float
) -> None:
    """Unload a pinned datapath the settings no longer describe, as an uninstall does."""
    log.info(
        f"the pinned datapath differs from the settings ({describe(differences)}): unloading "
        "it to load it anew; open connections carry on over plain TCP, new ones take the "
        f"mesh's iptables path until the new one has the pods again ({drain_seconds:g}s drain)",
        extra={
            "pins": str(pins.root),
            "changes": [str(d) for d in differences],
            "drain_seconds": drain_seconds,
        },
    )
    # Not cut short by SIGTERM: half an unload would leave pins the next start refuses.
    with _signals_deferred() as received:
        unload_pins(pins, drain_seconds)
    log.info("pinned datapath unloaded", extra={"pins": str(pins.root)})
    if received:
        raise StopDuringStartup(received[0])


@contextmanager
def _signals_deferred() -> Iterator[list[str]]:
    """SIGTERM/SIGINT are noted (in the list yielded), not acted on, until the block ends;
    then the start-up handlers are back."""
    received: list[str] = []

    def note(signum: int, _frame: FrameType | None) -> None:
        received.append(signal.Signals(signum).name)

    previous = {s: signal.signal(s, note) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _warn_if_adopted_differs(startup: Startup) -> None:
    """An adopted datapath keeps the configuration and sizes it was loaded with: say so."""
    if startup.differences:
        log.warning(
            f"the adopted datapath differs from the settings ({startup.reason}) and keeps what "
            "it was loaded with, as reload_on_change is off: it changes with a restart with "
            "reload_on_change on, or an uninstall and a fresh load",
            extra={
                "pins": str(startup.pins.root),
                "changes": [str(d) for d in startup.differences],
            },
        )


def make_resolver(loaded: LoadedSettings, startup: Startup) -> CgroupResolver:
    settings = loaded.settings
    return CgroupResolver(
        startup.cgroup2_mount,
        settings.cgroup_driver,
        kubelet_root=settings.kubelet_cgroup_root,
        explicit_cgroups=settings.mode == "standalone",
        attach_cgroup=startup.attach_cgroup,
        cgroup2_mount=startup.cgroup2_mount,
    )


async def serve(
    loaded: LoadedSettings, app: web.Application, watcher: PodsFileWatcher | None
) -> str:
    """Serve until SIGTERM or SIGINT; returns the signal's name."""
    settings = loaded.settings
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(signum: signal.Signals) -> None:
        if not received:
            log.info("signal received: stopping", extra={"signal": signum.name})
        received.append(signum.name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    tasks: list[asyncio.Task[None]] = []
    try:
        async with (
            serving(
                app,
                settings.listen_address,
                settings.port,
                shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS,
            ) as listener,
            serving_locally(app, settings.local_socket, shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS),
        ):
            tls = listener.tls
            extra: dict[str, object] = {
                "address": settings.listen_address,
                "port": settings.port,
                "auth": "mutual TLS" if tls is not None else "none, plain HTTP (loopback only)",
            }
            if tls is not None:
                extra["trust_bundle"] = tls.trust_bundle
            log.info("serving the API", extra=extra)
            if watcher is not None:
                tasks.append(asyncio.create_task(watcher.run(stop), name="pods-file"))
            try:
                await stop.wait()
            finally:
                stop.set()
                # The watcher finishes the apply it may be in (before the API stops).
                if tasks:
                    _, pending = await asyncio.wait(tasks, timeout=SHUTDOWN_TIMEOUT_SECONDS)
                    for task in pending:
                        task.cancel()
    finally:
        log.info("API stopped")
    return received[0] if received else "none"


def _hold_signals_while(what: str) -> None:
    """From here on, SIGTERM/SIGINT must not cut the shutdown short: log and carry on."""

    def ignore(signum: int, _frame: FrameType | None) -> None:
        log.warning(f"signal ignored while {what}", extra={"signal": signal.Signals(signum).name})

    signal.signal(signal.SIGTERM, ignore)
    signal.signal(signal.SIGINT, ignore)


class StopDuringStartup(Exception):
    """SIGTERM/SIGINT before the API serves: unwind (a load in progress undoes itself)."""


def _stop_during_startup(signum: int, _frame: FrameType | None) -> None:
    raise StopDuringStartup(signal.Signals(signum).name)


def run(loaded: LoadedSettings, tls: ServerTLS | None) -> int:
    settings = loaded.settings
    # Until the event loop takes the signals over: a SIGTERM in the middle of a load must not
    # kill the process between two pins (that would leave half a datapath), but unwind it.
    signal.signal(signal.SIGTERM, _stop_during_startup)
    signal.signal(signal.SIGINT, _stop_during_startup)
    datapath, startup = open_datapath(loaded)
    reloaded = startup.decision == "reloaded"
    log.info(
        f"datapath {startup.decision}" + (f" ({startup.reason})" if reloaded else ""),
        extra={
            "decision": startup.decision,
            **({"reason": startup.reason} if reloaded else {}),
            "instance": settings.instance,
            "pins": str(startup.pins.root),
            "attach_cgroup": str(startup.attach_cgroup),
            "attach_cgroup_id": os.stat(startup.attach_cgroup).st_ino,
            "features": feature_names(datapath.features),
            "sk_msg_redirect_budget": datapath.loaded_config.redirect_budget,
            "max_pods": datapath.max_entries("pods"),
            "duration_ms": round(startup.duration_ms, 1),
        },
    )
    if startup.decision == "adopted":
        _warn_if_adopted_differs(startup)
    signal_name = "none"
    reconciler: Reconciler | None = None
    try:
        resolver = make_resolver(loaded, startup)
        reconciler = Reconciler(datapath, resolver, max_pods=settings.max_pods)
        watcher = None
        if settings.mode == "standalone":
            assert settings.pods_file is not None
            watcher = PodsFileWatcher(
                settings.pods_file, reconciler, interval=settings.pods_poll_seconds
            )
            log.info(
                "standalone: watching the pods file",
                extra={"file": str(settings.pods_file), "interval": settings.pods_poll_seconds},
            )
        app = create_app(
            reconciler,
            tls=tls,
            pod_set_source=f"the pods file {settings.pods_file}" if watcher is not None else None,
            datapath_info=DatapathInfo(
                attach_cgroup=startup.attach_cgroup,
                # An adopted datapath runs with the features it was loaded with.
                features=datapath.features,
                startup=startup.decision,
                startup_reason=startup.reason,
            ),
            drain_seconds=settings.drain_seconds,
        )
        signal_name = asyncio.run(serve(loaded, app, watcher))
    except BaseException:
        if reconciler is not None:
            reconciler.close()
        datapath.close()
        log.info("datapath left running from its pins", extra={"pins": str(startup.pins.root)})
        raise
    _hold_signals_while("shutting down")
    reconciler.close()
    if is_uninstalled(app):
        datapath.close()  # its maps were closed by the unload already: a no-op
        log.info(
            "stopped; the datapath was uninstalled through the API before",
            extra={"pins": str(startup.pins.root), "signal": signal_name},
        )
    elif settings.uninstall_on_exit:
        log.info(
            "uninstalling: detaching the datapath and removing its pins",
            extra={"pins": str(startup.pins.root), "drain_seconds": settings.drain_seconds},
        )
        datapath.unload(drain_seconds=settings.drain_seconds)
        log.info("uninstalled", extra={"pins": str(startup.pins.root), "signal": signal_name})
    else:
        datapath.close()
        log.info(
            "stopped; the datapath keeps running from its pins",
            extra={"pins": str(startup.pins.root), "signal": signal_name},
        )
    return EXIT_OK


def uninstall(loaded: LoadedSettings) -> int:
    """Adopt whatever is pinned for this instance, detach it with the drain, remove every pin."""
    settings = loaded.settings
    prerequisites.check_privileges(sk_msg=False)  # removing needs no program to verify
    prerequisites.check_bpffs(settings.pin_root)
    pins = PinLayout(settings.pin_root / settings.instance)
    present = [p for p in pins.all_pins() if p.exists()]
    _hold_signals_while("uninstalling")
    if not present:
        unload_pins(pins, drain_seconds=0)
        log.info("nothing to uninstall", extra={"pins": str(pins.root)})
        return EXIT_OK
    if len(present) == len(pins.all_pins()):
        log.info(
            "uninstalling: detaching the datapath and removing its pins",
            extra={"pins": str(pins.root), "drain_seconds": settings.drain_seconds},
        )
        Datapath.adopt(instance=settings.instance, pin_root=settings.pin_root).unload(
            drain_seconds=settings.drain_seconds
        )
    else:
        log.warning(
            "uninstalling an incomplete datapath",
            extra={"pins": str(pins.root), "present": [str(p) for p in present]},
        )
        unload_pins(pins, settings.drain_seconds)
    log.info("uninstalled", extra={"pins": str(pins.root)})
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """The ``meshaccel-agent`` console script."""
    try:
        loaded = config.load_settings(argv)
        tls = config.read_tls(loaded) if loaded.command == "run" else None
    except SettingsError as err:
        print(err, file=sys.stderr)
        return config.EXIT_INVALID_SETTINGS
    if loaded.command == "show-config":
        print(json.dumps(loaded.describe(), indent=2))
        return EXIT_OK
    if loaded.command in config.REPORTS:
        return commands.report(loaded)

    settings = loaded.settings
    configure_logging(settings.log_format, settings.log_level)
    for variable in loaded.ignored_env:
        log.warning("unknown MESHACCEL_ variable ignored", extra={"variable": variable})
    log.info(
        "meshaccel-agent starting",
        extra={
            "version": VERSION,
            "command": loaded.command,
            "pid": os.getpid(),
            "node": settings.node_name,
            "mode": settings.mode,
            "config_file": str(loaded.config_file) if loaded.config_file else None,
            "uninstall_on_exit": settings.uninstall_on_exit,
        },
    )
    try:
        if loaded.command == "uninstall":
            return uninstall(loaded)
        return run(loaded, tls)
    except SettingsError as err:
        print(err, file=sys.stderr)
        return config.EXIT_INVALID_SETTINGS
    except StopDuringStartup as stop:
        log.info("stopped during start-up", extra={"signal": str(stop)})
        return EXIT_OK
    except (DatapathError, libbpf.BpfError) as err:
        log.error("cannot run the datapath", extra={"reason": str(err)})
        return EXIT_FAILED
    except OSError as err:  # e.g. the port is taken
        log.error("agent failed", extra={"reason": f"{type(err).__name__}: {err}"})
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
