"""The agent's settings: defaults < YAML config file < ``MESHACCEL_*`` environment < flags.

Every setting has one name, spelled three ways: the YAML key ``max_pods``, the environment
variable ``MESHACCEL_MAX_PODS`` and the flag ``--max-pods`` (booleans also ``--no-...``). The
config file is named by ``--config`` or ``MESHACCEL_CONFIG``. Values from the environment and
the command line are strings that pydantic converts (``"9474"`` -> 9474, ``"true"``/``"1"`` ->
True); an empty environment variable counts as unset.

An invalid value stops start-up with exactly one line naming the field, the value, where the
value came from and why, and exit code 2 (:data:`EXIT_INVALID_SETTINGS`)::

    invalid setting port=70000 (from --port): must be <= 65535
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from meshaccel.agent.datapath import (
    DEFAULT_REDIRECT_BUDGET,
    MAX_REDIRECT_BUDGET,
    MIN_REDIRECT_BUDGET,
    PIN_ROOT,
    Capacities,
)
from meshaccel.agent.layout import DatapathFeatures
from meshaccel.agent.logs import LogFormat, LogLevel
from meshaccel.agent.tls import ServerTLS, TLSError, TLSFiles
from meshaccel.agent.version import VERSION

EXIT_INVALID_SETTINGS = 2
ENV_PREFIX = "MESHACCEL_"
CONFIG_ENV = f"{ENV_PREFIX}CONFIG"
# MESHACCEL_* variables that are not settings but are known (scripts, the loader).
_KNOWN_OTHER_ENV = frozenset({CONFIG_ENV, f"{ENV_PREFIX}BOOTSTRAPPED"})

# 9474: unassigned by IANA and clear of what usually listens on a node's host network
# (kubelet 10250, 9443 controller-runtime webhooks, 9100 node-exporter, Istio's 150xx).
DEFAULT_PORT = 9474
MAX_PODS_LIMIT = 65536

Command = Literal["run", "uninstall", "show-config"]
COMMANDS: tuple[Command, ...] = ("run", "uninstall", "show-config")


class SettingConflict(ValueError):
    """A value that is valid alone but not together with the others: names its field."""

    def __init__(self, field_name: str, why: str) -> None:
        super().__init__(why)
        self.field_name = field_name
        self.why = why


class AgentSettings(BaseModel):
    """Everything the agent can be told. Field names are the YAML keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # -- API ---------------------------------------------------------------------------------
    listen_address: str = Field(default="0.0.0.0", description="IP address the HTTP API listens on")
    port: int = Field(default=DEFAULT_PORT, ge=1, le=65535, description="TCP port of the API")
    tls_cert_file: Path | None = Field(
        default=None,
        description="the API's TLS server certificate, PEM (the operator's Secret, mounted)",
    )
    tls_key_file: Path | None = Field(
        default=None, description="the private key of tls_cert_file, PEM"
    )
    tls_client_ca_file: Path | None = Field(
        default=None,
        description="the CA bundle, PEM, that the operator's client certificate must chain to; "
        "the three files are read again when they change",
    )
    insecure_no_token: bool = Field(
        default=False,
        description="serve plain HTTP without authentication (no TLS, no client certificate); "
        "only allowed on a loopback listen address",
    )
    # -- datapath ----------------------------------------------------------------------------
    attach_cgroup: Path | None = Field(
        default=None,
        description="cgroup v2 directory the programs attach to (default: the cgroup2 mount)",
    )
    pin_root: Path = Field(default=PIN_ROOT, description="bpffs directory holding the instances")
    instance: str = Field(
        default="default",
        pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$",
        description="name of this datapath under pin_root (one per node unless testing)",
    )
    bpf_objects: Path | None = Field(
        default=None, description="directory of the *.bpf.o objects (default: the package's)"
    )
    max_pods: int = Field(
        default=Capacities.pods,
        ge=1,
        le=MAX_PODS_LIMIT,
        description="pods this node can accelerate (size of the pods maps; needs a fresh load)",
    )
    max_pod_ports: int = Field(
        default=Capacities.pod_ports,
        ge=1,
        le=1 << 20,
        description="excluded ports of all pods together, mesh ports included",
    )
    max_pod_cidrs: int = Field(
        default=Capacities.pod_cidrs,
        ge=1,
        le=1 << 20,
        description="excluded (and, separately, included) CIDRs of all pods together",
    )
    max_connections: int = Field(
        default=Capacities.connections,
        ge=1024,
        le=1 << 22,
        description="steered connections and sockets tracked at once (LRU maps, sockhashes)",
    )
    same_node_inbound: bool = Field(
        default=True, description="steer sidecars' connects to same-node pods to their 15006"
    )
    sk_msg_redirect: bool = Field(
        default=True,
        description="move bytes socket-to-socket between same-node sockets while the receiver "
        "keeps up: each direction of a connection falls back to TCP for good once its "
        "receiver holds more than sk_msg_redirect_budget bytes unread (docs/datapath.md)",
    )
    sk_msg_redirect_budget: int = Field(
        default=DEFAULT_REDIRECT_BUDGET,
        ge=MIN_REDIRECT_BUDGET,
        le=MAX_REDIRECT_BUDGET,
        description="bytes a receiving socket may hold unread before that direction falls "
        "back to TCP (needs a fresh load)",
    )
    drain_seconds: float = Field(
        default=2.0,
        ge=0,
        le=600,
        description="grace period of an uninstall in which accepted connections still get "
        "SO_ORIGINAL_DST",
    )
    uninstall_on_exit: bool = Field(
        default=False,
        description="on SIGTERM/SIGINT detach everything and remove the pins (default: keep "
        "them, a restart or upgrade)",
    )
    reload_on_change: bool = Field(
        default=True,
        description="at start, replace a pinned datapath whose features, sk_msg budget or map "
        "capacities differ from these settings (unload with the drain, load anew) instead of "
        "adopting it (default: yes; no: adopt it as it is and log a warning)",
    )
    # -- pods --------------------------------------------------------------------------------
    node_name: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        max_length=253,
        description="this node's name, for the logs",
    )
    mode: Literal["kubernetes", "standalone"] = Field(
        default="kubernetes",
        description="kubernetes: the operator PUTs the pod set; standalone: read pods_file",
    )
    pods_file: Path | None = Field(
        default=None, description="standalone: YAML pod set (generation + pods), watched"
    )
    pods_poll_seconds: float = Field(
        default=1.0, gt=0, le=60, description="standalone: how often pods_file is checked"
    )
    cgroup_driver: Literal["systemd", "cgroupfs", "auto"] = Field(
        default="auto", description="kubelet's cgroup driver, to find a pod's cgroup by UID"
    )
    kubelet_cgroup_root: Path | None = Field(
        default=None,
        description="directory holding kubelet's kubepods hierarchy (default: the cgroup2 mount)",
    )
    # -- logs --------------------------------------------------------------------------------
    log_format: LogFormat = Field(
        default="json", description="json: one object a line; text: key=value pairs"
    )
    log_level: LogLevel = Field(default="info", description="the least severe level logged")

    @field_validator("listen_address")
    @classmethod
    def _ip_address(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError("must be an IPv4 or IPv6 address") from None

    @field_validator("attach_cgroup", "pin_root", "kubelet_cgroup_root")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError("must be an absolute path")
        return value

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> AgentSettings:
        # `meshaccel-agent uninstall` serves nothing and reads no pods: it needs neither.
        serving = (info.context or {}).get("command", "run") != "uninstall"
        loopback = ipaddress.ip_address(self.listen_address).is_loopback
        if self.insecure_no_token and not loopback:
            raise SettingConflict(
                "insecure_no_token",
                f"allowed only when listen_address is a loopback address, not "
                f"{self.listen_address}: an unauthenticated API must not be reachable "
                "from the network",
            )
        tls = {
            name: getattr(self, name)
            for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file")
        }
        given = [name for name, path in tls.items() if path is not None]
        if self.insecure_no_token and given:
            raise SettingConflict(
                "insecure_no_token", f"{given[0]} is set too: choose TLS or no authentication"
            )
        if given and len(given) < len(tls):
            missing = next(name for name in tls if name not in given)
            raise SettingConflict(
                missing, f"{given[0]} is set: TLS needs the certificate, its key and the CA bundle"
            )
        if serving and not given and not self.insecure_no_token:
            raise SettingConflict(
                "tls_cert_file",
                "the API needs TLS: give --tls-cert-file, --tls-key-file and "
                "--tls-client-ca-file (the operator's Secret), or --insecure-no-token with "
                "--listen-address 127.0.0.1 for a local demo",
            )
        if serving and self.mode == "standalone" and self.pods_file is None:
            raise SettingConflict(
                "pods_file", "standalone mode reads its pod set from this file: give --pods-file"
            )
        if self.mode == "kubernetes" and self.pods_file is not None:
            raise SettingConflict(
                "pods_file", "only standalone mode reads a pods file (mode is kubernetes)"
            )
        return self

    # -- what the settings mean to the other modules -----------------------------------------

    @property
    def capacities(self) -> Capacities:
        return Capacities(
            pods=self.max_pods,
            pod_ports=self.max_pod_ports,
            pod_cidrs=self.max_pod_cidrs,
            connections=self.max_connections,
        )

    @property
    def features(self) -> DatapathFeatures:
        features = DatapathFeatures(0)
        if self.same_node_inbound:
            features |= DatapathFeatures.FEATURE_SAME_NODE_INBOUND
        if self.sk_msg_redirect:
            features |= DatapathFeatures.FEATURE_SK_MSG_REDIRECT
        return features

    @property
    def api_is_loopback(self) -> bool:
        return ipaddress.ip_address(self.listen_address).is_loopback

    @property
    def tls_files(self) -> TLSFiles | None:
        """The API's TLS files; None: plain HTTP (insecure_no_token)."""
        if self.tls_cert_file is None or self.tls_key_file is None:
            return None
        if self.tls_client_ca_file is None:
            return None
        return TLSFiles(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)


FIELDS: tuple[str, ...] = tuple(AgentSettings.model_fields)
BOOLEAN_FIELDS = frozenset(
    name for name, info in AgentSettings.model_fields.items() if info.annotation is bool
)


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


class SettingsError(Exception):
    """Start-up must stop: ``str()`` is the one line to print."""


@dataclass(frozen=True)
class LoadedSettings:
    """The settings, the command to run, and where each setting's value came from."""

    settings: AgentSettings
    command: Command
    sources: dict[str, str]
    config_file: Path | None = None
    ignored_env: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        """Effective settings and their sources, JSON-ready (paths, never the keys)."""
        values = self.settings.model_dump(mode="json")
        return {
            "command": self.command,
            "config_file": str(self.config_file) if self.config_file else None,
            "settings": values,
            "sources": {name: self.sources.get(name, "default") for name in values},
            "ignored_env": list(self.ignored_env),
        }


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line and exit code 2 like any invalid setting."""

    def error(self, message: str) -> NoReturn:
        raise SettingsError(f"invalid command line: {message} (see meshaccel-agent --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="meshaccel-agent",
        description="meshaccel node agent: loads (or adopts) the eBPF datapath on this node, "
        "keeps its pods equal to the set it is given and serves the operator's API.",
        epilog=f"Every flag --x-y is also the environment variable {ENV_PREFIX}X_Y and the "
        "config file key x_y. Precedence: defaults < config file < environment < flags.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=COMMANDS,
        default="run",
        help="run (default): the daemon; uninstall: adopt the pinned datapath, detach it with "
        "the drain and remove every pin; show-config: print the effective settings and exit",
    )
    parser.add_argument("--config", metavar="FILE", help=f"YAML config file (also {CONFIG_ENV})")
    parser.add_argument("--version", action="version", version=f"meshaccel-agent {VERSION}")
    for name, info in AgentSettings.model_fields.items():
        help_text = info.description or ""
        if "(default" not in help_text:
            help_text += f" (default: {_default_text(info)})"
        if name in BOOLEAN_FIELDS:
            parser.add_argument(
                flag_name(name), action=argparse.BooleanOptionalAction, help=help_text
            )
            continue
        choices = get_args(info.annotation) if get_origin(info.annotation) is Literal else ()
        metavar = "{" + ",".join(map(str, choices)) + "}" if choices else "VALUE"
        parser.add_argument(flag_name(name), metavar=metavar, help=help_text)
    return parser


def _default_text(info: FieldInfo) -> str:
    if info.default_factory is not None:
        return "the host name"
    if info.default is None:
        return "none"
    if isinstance(info.default, bool):
        return "yes" if info.default else "no"
    return str(info.default)


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    try:
        return json.dumps(value)
    except TypeError:
        return str(value)


_WHY = {
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "literal_error": "must be one of {expected}",
    "extra_forbidden": "not a known setting",
    "string_pattern_mismatch": "must match {pattern}",
    "string_too_short": "must not be empty",
    "string_too_long": "must be at most {max_length} characters",
    "string_type": "must be a string",
    "path_type": "must be a path",
}


def _why(error: Mapping[str, Any]) -> tuple[str | None, str]:
    """(field named by the error, or None, the reason in a few words)."""
    ctx = error.get("ctx") or {}
    loc = error.get("loc") or ()
    field_name = str(loc[0]) if loc else None
    cause = ctx.get("error")
    if isinstance(cause, SettingConflict):
        return cause.field_name, cause.why
    template = _WHY.get(error.get("type", ""))
    if template is not None:
        try:
            return field_name, template.format(**ctx)
        except (KeyError, IndexError):
            pass
    message = str(cause) if isinstance(cause, ValueError) else str(error.get("msg", "invalid"))
    message = message.removeprefix("Value error, ")
    return field_name, message[:1].lower() + message[1:]


def _invalid(name: str, value: Any, source: str, why: str) -> SettingsError:
    return SettingsError(f"invalid setting {name}={_show(value)} (from {source}): {why}")


def _read_config_file(path: Path, source: str) -> dict[str, Any]:
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as err:
        raise _invalid("config", path, source, f"cannot read it: {err.strerror}") from err
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise _invalid("config", path, source, f"not valid YAML{at}") from err
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise _invalid("config", path, source, "must be a YAML mapping of setting: value")
    return {str(key): value for key, value in document.items()}


def load_settings(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> LoadedSettings:
    """Parse flags, environment and config file into validated settings.

    Raises :class:`SettingsError` with the one line to print; reads no file but the config.
    """
    environ = os.environ if environ is None else environ
    parsed = vars(build_parser().parse_args(list(argv) if argv is not None else None))
    command: Command = parsed.pop("command", "run")

    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}

    config_file: Path | None = None
    if "config" in parsed:
        config_file, config_source = Path(parsed.pop("config")), "--config"
    elif environ.get(CONFIG_ENV):
        config_file, config_source = Path(environ[CONFIG_ENV]), f"env {CONFIG_ENV}"
    if config_file is not None:
        for key, value in _read_config_file(config_file, config_source).items():
            raw[key] = value
            sources[key] = f"config file {config_file}"

    ignored = []
    for variable, value in environ.items():
        if not variable.startswith(ENV_PREFIX) or variable in _KNOWN_OTHER_ENV:
            continue
        name = variable.removeprefix(ENV_PREFIX).lower()
        if name not in FIELDS:
            ignored.append(variable)
        elif value != "":
            raw[name] = value
            sources[name] = f"env {variable}"

    for name, value in parsed.items():
        raw[name] = value
        negated = name in BOOLEAN_FIELDS and value is False
        sources[name] = "--no-" + flag_name(name)[2:] if negated else flag_name(name)

    try:
        settings = AgentSettings.model_validate(raw, context={"command": command})
    except ValidationError as err:
        field_name, why = _why(err.errors()[0])
        if field_name is None:
            raise SettingsError(f"invalid settings: {why}") from None
        value = raw[field_name] if field_name in raw else getattr(_defaults(), field_name, None)
        raise _invalid(field_name, value, sources.get(field_name, "default"), why) from None
    return LoadedSettings(
        settings=settings,
        command=command,
        sources=sources,
        config_file=config_file,
        ignored_env=tuple(sorted(ignored)),
    )


def _defaults() -> Any:
    """Default values without validation (for naming the value of a failed check)."""
    return AgentSettings.model_construct()


def read_tls(loaded: LoadedSettings) -> ServerTLS | None:
    """The API's TLS material, read and checked (None: plain HTTP, insecure_no_token)."""
    files = loaded.settings.tls_files
    if files is None:
        return None
    named = {"tls_cert_file": files.cert, "tls_key_file": files.key}
    named["tls_client_ca_file"] = files.client_ca
    for name, path in named.items():
        try:
            path.read_bytes()
        except OSError as err:
            source = loaded.sources.get(name, "default")
            raise _invalid(name, path, source, f"cannot read it: {err.strerror}") from err
    try:
        return ServerTLS(files)
    except TLSError as err:
        name = "tls_client_ca_file" if err.file == "client_ca" else "tls_cert_file"
        source = loaded.sources.get(name, "default")
        raise _invalid(name, named[name], source, str(err)) from err


def check_cgroup_settings(loaded: LoadedSettings, cgroup2_mount: Path) -> None:
    """attach_cgroup and kubelet_cgroup_root must be directories of the cgroup2 hierarchy."""
    for name in ("attach_cgroup", "kubelet_cgroup_root"):
        path = getattr(loaded.settings, name)
        if path is None:
            continue
        source = loaded.sources.get(name, "default")
        if not path.resolve().is_relative_to(cgroup2_mount.resolve()):
            raise _invalid(name, path, source, f"not under the cgroup2 mount {cgroup2_mount}")
        if name == "attach_cgroup" and not (path / "cgroup.procs").is_file():
            raise _invalid(name, path, source, "not a cgroup v2 directory")
        if not path.is_dir():
            raise _invalid(name, path, source, "no such directory")
