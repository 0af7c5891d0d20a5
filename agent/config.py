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
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, get_args, get_origin

import yaml
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from meshaccel.agent.layout import DatapathFeatures
from meshaccel.agent.tls import ServerTLS
from meshaccel.contract.settings import AgentSettings, SettingConflict
from meshaccel.contract.tls import TLSError
from meshaccel.contract.version import VERSION

EXIT_INVALID_SETTINGS = 2
ENV_PREFIX = "MESHACCEL_"
CONFIG_ENV = f"{ENV_PREFIX}CONFIG"
# MESHACCEL_* variables that are not settings but are known (scripts, the loader).
_KNOWN_OTHER_ENV = frozenset({CONFIG_ENV, f"{ENV_PREFIX}BOOTSTRAPPED"})

Command = Literal["run", "uninstall", "show-config", "status", "pods", "check", "version"]
COMMANDS: tuple[Command, ...] = (
    "run",
    "uninstall",
    "show-config",
    "status",
    "pods",
    "check",
    "version",
)
#: The commands that report (``meshaccel-agent status`` ...): a table, or JSON with ``-o json``.
REPORTS: frozenset[Command] = frozenset({"status", "pods", "check", "version"})
Output = Literal["text", "json"]


FIELDS: tuple[str, ...] = tuple(AgentSettings.model_fields)
BOOLEAN_FIELDS = frozenset(
    name for name, info in AgentSettings.model_fields.items() if info.annotation is bool
)


def datapath_features(settings: AgentSettings) -> DatapathFeatures:
    """The datapath's feature bits that these settings ask for."""
    features = DatapathFeatures(0)
    if settings.same_node_inbound:
        features |= DatapathFeatures.FEATURE_SAME_NODE_INBOUND
    if settings.sk_msg_redirect:
        features |= DatapathFeatures.FEATURE_SK_MSG_REDIRECT
    return features


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
    output: Output = "text"

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
        "the drain and remove every pin; show-config: print the effective settings and exit; "
        "status, pods: what the running agent reports (through local_socket); check: the "
        "host's prerequisites and other owners' programs on the datapath's hooks; version: "
        "this build, Python, libbpf and the kernel",
    )
    parser.add_argument(
        "-o",
        "--output",
        choices=("text", "json"),
        help="status, pods, check, version: a table (text, the default) or one JSON document",
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
    given_output = parsed.pop("output", None)
    if given_output is not None and command not in REPORTS:
        raise SettingsError(
            f"invalid command line: -o/--output is for {', '.join(sorted(REPORTS))}, "
            f"not {command} (see meshaccel-agent --help)"
        )
    output: Output = given_output or "text"

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
        output=output,
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
