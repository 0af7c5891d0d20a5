"""Settings: precedence of the sources, and start-up refusals as the real process shows them.

The precedence is checked in-process (load_settings) and once through the console script
(`meshaccel-agent show-config`); every refusal runs the agent as a subprocess and checks the
exit code 2 and the single line on stderr.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from meshaccel.agent.config import (
    EXIT_INVALID_SETTINGS,
    FIELDS,
    SettingsError,
    datapath_features,
    env_name,
    flag_name,
    load_settings,
    read_tls,
)
from meshaccel.agent.layout import DatapathFeatures
from meshaccel.contract.settings import DEFAULT_PORT
from meshaccel.contract.tls import bundle_fingerprint
from meshaccel.operator.credentials import AgentTLS
from tests.agent_lifecycle.harness import MODULE_ARGV, PIN_ROOT, PKI, agent_argv
from tests.pki import make_pki, write_secret_volume

TLS_CONFIG = {
    "tls_cert_file": "/run/tls/tls.crt",
    "tls_key_file": "/run/tls/tls.key",
    "tls_client_ca_file": "/run/tls/ca.crt",
}
TLS_ARGS = [f"--{name.replace('_', '-')}={path}" for name, path in TLS_CONFIG.items()]


def write_config(tmp_path: Path, document: dict[str, object]) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def run_agent(
    argv: list[str], env: dict[str, str] | None = None, *, module: bool = False
) -> subprocess.CompletedProcess[str]:
    base = list(MODULE_ARGV) if module else agent_argv()
    guard = {
        # Should a case ever get past the settings, it must not attach to the root cgroup
        # nor pin next to a real agent: a settings error (exit 2) stops it instead.
        "MESHACCEL_ATTACH_CGROUP": "/nonexistent/meshaccel-test-guard",
        "MESHACCEL_PIN_ROOT": str(PIN_ROOT),
    }
    return subprocess.run(
        [*base, *argv],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **guard, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


# -- precedence -----------------------------------------------------------------------------


def test_defaults() -> None:
    loaded = load_settings(TLS_ARGS, environ={})
    s = loaded.settings
    assert loaded.command == "run"
    assert (s.listen_address, s.port, s.mode, s.cgroup_driver) == (
        "0.0.0.0",
        DEFAULT_PORT,
        "kubernetes",
        "auto",
    )
    assert s.attach_cgroup is None  # the cgroup2 mount, found at start
    assert str(s.pin_root) == "/sys/fs/bpf/meshaccel" and s.instance == "default"
    assert datapath_features(s) == (
        DatapathFeatures.FEATURE_SAME_NODE_INBOUND | DatapathFeatures.FEATURE_SK_MSG_REDIRECT
    ), "sk_msg redirection is on by default"
    assert s.sk_msg_redirect_budget == 1 << 20
    assert not s.uninstall_on_exit and s.drain_seconds == 2.0
    assert loaded.sources == {
        "tls_cert_file": "--tls-cert-file",
        "tls_key_file": "--tls-key-file",
        "tls_client_ca_file": "--tls-client-ca-file",
    }


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {
            "port": 1001,
            "max_pods": 11,
            "log_format": "text",
            "drain_seconds": 7,
            **TLS_CONFIG,
        },
    )
    environ = {
        "MESHACCEL_CONFIG": str(config),
        "MESHACCEL_PORT": "1002",
        "MESHACCEL_MAX_PODS": "12",
        "MESHACCEL_SK_MSG_REDIRECT": "false",
    }
    loaded = load_settings(["--port", "1003", "--no-same-node-inbound"], environ=environ)
    s = loaded.settings
    assert s.port == 1003, "a flag beats env, file and default"
    assert s.max_pods == 12, "env beats the file"
    assert s.log_format == "text" and s.drain_seconds == 7, "the file beats the default"
    assert s.log_level == "info", "the default when nobody says otherwise"
    assert not s.sk_msg_redirect and not s.same_node_inbound
    assert loaded.sources["port"] == "--port"
    assert loaded.sources["max_pods"] == "env MESHACCEL_MAX_PODS"
    assert loaded.sources["log_format"] == f"config file {config}"
    assert loaded.sources["same_node_inbound"] == "--no-same-node-inbound"
    assert loaded.config_file == config


def test_config_flag_beats_config_env(tmp_path: Path) -> None:
    one = write_config(tmp_path, {"port": 1, **TLS_CONFIG})
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump({"port": 2, **TLS_CONFIG}))
    loaded = load_settings(["--config", str(two)], environ={"MESHACCEL_CONFIG": str(one)})
    assert loaded.settings.port == 2


# One valid value per setting, as a string: a new setting must be added here.
SAMPLES = {
    "listen_address": "127.0.0.1",
    "port": "1",
    **TLS_CONFIG,
    "insecure_no_token": "false",
    "local_socket": "/run/x/agent.sock",
    "termination_message_path": "/dev/x-log",
    "attach_cgroup": "/sys/fs/cgroup/x",
    "pin_root": "/sys/fs/bpf/x",
    "instance": "x",
    "bpf_objects": "/opt/objects",
    "max_pods": "5",
    "max_pod_ports": "6",
    "max_pod_cidrs": "7",
    "max_connections": "2048",
    "same_node_inbound": "false",
    "sk_msg_redirect": "false",
    "sk_msg_redirect_budget": "131072",
    "drain_seconds": "1.5",
    "uninstall_on_exit": "true",
    "reload_on_change": "false",
    "node_name": "node-1",
    "mode": "standalone",
    "pods_file": "/etc/pods.yaml",
    "pods_poll_seconds": "0.5",
    "cgroup_driver": "systemd",
    "kubelet_cgroup_root": "/sys/fs/cgroup/k",
    "log_format": "text",
    "log_level": "debug",
}


def test_every_setting_has_an_env_variable_and_a_flag() -> None:
    assert set(SAMPLES) == set(FIELDS)
    from_env = load_settings([], {env_name(name): value for name, value in SAMPLES.items()})
    argv = []
    for name, value in SAMPLES.items():
        if value in ("true", "false"):
            argv.append(flag_name(name) if value == "true" else "--no-" + flag_name(name)[2:])
        else:
            argv.append(f"{flag_name(name)}={value}")
    from_flags = load_settings(argv, {})
    assert from_env.settings == from_flags.settings
    for name in FIELDS:
        assert from_env.sources[name] == f"env {env_name(name)}", name
        assert from_flags.sources[name].endswith(flag_name(name)[2:]), name
    assert from_env.settings.pods_file == Path("/etc/pods.yaml")
    help_text = run_agent(["--help"])
    assert help_text.returncode == 0
    for name in FIELDS:
        assert flag_name(name) in help_text.stdout, name


def test_empty_env_is_unset_and_unknown_env_is_reported() -> None:
    loaded = load_settings(
        TLS_ARGS, environ={"MESHACCEL_PORT": "", "MESHACCEL_PROT": "1", "MESHACCEL_CONFIG": ""}
    )
    assert loaded.settings.port == DEFAULT_PORT
    assert loaded.ignored_env == ("MESHACCEL_PROT",)


def test_show_config_through_the_console_script(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"port": 1001, "max_pods": 11, "instance": "from-file"})
    result = run_agent(
        ["show-config", "--port", "1003", *TLS_ARGS],
        {"MESHACCEL_CONFIG": str(config), "MESHACCEL_MAX_PODS": "12"},
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["settings"]["port"] == 1003 and shown["sources"]["port"] == "--port"
    assert shown["settings"]["max_pods"] == 12
    assert shown["sources"]["max_pods"] == "env MESHACCEL_MAX_PODS"
    assert shown["settings"]["instance"] == "from-file"
    assert shown["sources"]["instance"] == f"config file {config}"
    assert shown["sources"]["log_level"] == "default"


@dataclass(frozen=True)
class BudgetCase:
    value: str
    accepted: int | None  # the budget, or None: refused with ``why``
    why: str = ""


BUDGET_CASES = [
    BudgetCase("65536", 64 << 10),  # 64 KiB, the smallest
    BudgetCase("1048576", 1 << 20),  # the default, spelled out
    BudgetCase("67108864", 64 << 20),  # 64 MiB, the largest
    BudgetCase("65535", None, "must be >= 65536"),
    BudgetCase("67108865", None, "must be <= 67108864"),
    BudgetCase("0", None, "must be >= 65536"),
    BudgetCase("1MiB", None, "must be an integer"),
]


@pytest.mark.parametrize("case", BUDGET_CASES, ids=[c.value for c in BUDGET_CASES])
def test_sk_msg_redirect_budget_bounds(case: BudgetCase) -> None:
    argv = [*TLS_ARGS, f"--sk-msg-redirect-budget={case.value}"]
    if case.accepted is not None:
        assert load_settings(argv, environ={}).settings.sk_msg_redirect_budget == case.accepted
        return
    with pytest.raises(SettingsError) as refused:
        load_settings(argv, environ={})
    assert str(refused.value) == (
        f"invalid setting sk_msg_redirect_budget={case.value} (from --sk-msg-redirect-budget): "
        f"{case.why}"
    )


def test_the_retired_sk_msg_to_apps_is_refused(tmp_path: Path) -> None:
    """Delivery into apps is per pod now: the old switch is refused from the file and the
    command line, and, like any unknown variable, reported (logged) from the environment."""
    config = write_config(tmp_path, {"sk_msg_to_apps": True, **TLS_CONFIG})
    with pytest.raises(SettingsError, match=r"sk_msg_to_apps=true \(from config file .*\): not a"):
        load_settings(["--config", str(config)], environ={})
    with pytest.raises(SettingsError, match="unrecognized arguments: --sk-msg-to-apps"):
        load_settings([*TLS_ARGS, "--sk-msg-to-apps"], environ={})
    assert load_settings(TLS_ARGS, {"MESHACCEL_SK_MSG_TO_APPS": "true"}).ignored_env == (
        "MESHACCEL_SK_MSG_TO_APPS",
    )


# -- refusals, through the real process ----------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    argv: list[str]
    env: dict[str, str]
    line: str  # the exact line on stderr
    reason: str
    module: bool = False


def refusals(tmp_path: Path) -> list[Refusal]:
    bad_file = write_config(tmp_path, {"port": 70000, **TLS_CONFIG})
    unknown_key = tmp_path / "unknown.yaml"
    unknown_key.write_text("prot: 9000\n")
    good = PKI.write_agent_files(tmp_path / "good")
    other = make_pki()
    mismatched = write_secret_volume(
        tmp_path / "mismatched", AgentTLS(PKI.server.cert_pem, other.server.key_pem, PKI.ca.pem)
    )
    no_ca = write_secret_volume(
        tmp_path / "no-ca", AgentTLS(PKI.server.cert_pem, PKI.server.key_pem, "no CA here\n")
    )

    def tls(cert: Path, key: Path, ca: Path) -> list[str]:
        return [f"--tls-cert-file={cert}", f"--tls-key-file={key}", f"--tls-client-ca-file={ca}"]

    return [
        Refusal(
            ["--port", "70000", *TLS_ARGS],
            {},
            "invalid setting port=70000 (from --port): must be <= 65535",
            "a flag out of range",
        ),
        Refusal(
            TLS_ARGS,
            {"MESHACCEL_PORT": "70000"},
            "invalid setting port=70000 (from env MESHACCEL_PORT): must be <= 65535",
            "the same from the environment names the variable",
            module=True,
        ),
        Refusal(
            ["--config", str(bad_file)],
            {},
            f"invalid setting port=70000 (from config file {bad_file}): must be <= 65535",
            "the same from the file names the file",
        ),
        Refusal(
            ["--config", str(unknown_key), *TLS_ARGS],
            {},
            f"invalid setting prot=9000 (from config file {unknown_key}): not a known setting",
            "a misspelt key is refused, not ignored",
        ),
        Refusal(
            ["--mode", "swarm", *TLS_ARGS],
            {},
            "invalid setting mode=swarm (from --mode): must be one of 'kubernetes' or 'standalone'",
            "an enum",
        ),
        Refusal(
            ["--drain-seconds", "soon", *TLS_ARGS],
            {},
            "invalid setting drain_seconds=soon (from --drain-seconds): must be a number",
            "not a number",
        ),
        Refusal(
            [],
            {},
            "invalid setting tls_cert_file=null (from default): the API needs TLS: give "
            "--tls-cert-file, --tls-key-file and --tls-client-ca-file (the operator's Secret), "
            "or --insecure-no-token with --listen-address 127.0.0.1 for a local demo",
            "no TLS and not told to run without",
        ),
        Refusal(
            ["--tls-cert-file=/run/tls/tls.crt"],
            {},
            "invalid setting tls_key_file=null (from default): tls_cert_file is set: TLS needs "
            "the certificate, its key and the CA bundle",
            "half the TLS settings",
        ),
        Refusal(
            ["--insecure-no-token", "--listen-address=127.0.0.1", *TLS_ARGS],
            {},
            "invalid setting insecure_no_token=true (from --insecure-no-token): tls_cert_file "
            "is set too: choose TLS or no authentication",
            "TLS and no authentication at once",
        ),
        Refusal(
            ["--insecure-no-token"],
            {},
            "invalid setting insecure_no_token=true (from --insecure-no-token): allowed only "
            "when listen_address is a loopback address, not 0.0.0.0: an unauthenticated API "
            "must not be reachable from the network",
            "no token on a non-loopback address",
        ),
        Refusal(
            ["--insecure-no-token", "--listen-address", "198.18.0.1"],
            {},
            "invalid setting insecure_no_token=true (from --insecure-no-token): allowed only "
            "when listen_address is a loopback address, not 198.18.0.1: an unauthenticated API "
            "must not be reachable from the network",
            "no token on any other address either",
        ),
        Refusal(
            tls(good.cert, tmp_path / "missing", good.client_ca),
            {},
            f"invalid setting tls_key_file={tmp_path / 'missing'} (from --tls-key-file): cannot "
            "read it: No such file or directory",
            "a key file that is not there",
        ),
        Refusal(
            tls(mismatched.cert, mismatched.key, mismatched.client_ca),
            {},
            f"invalid setting tls_cert_file={mismatched.cert} (from --tls-cert-file): "
            "certificate and key: KEY_VALUES_MISMATCH",
            "a key that is not the certificate's",
        ),
        Refusal(
            [],
            {
                "MESHACCEL_TLS_CERT_FILE": str(no_ca.cert),
                "MESHACCEL_TLS_KEY_FILE": str(no_ca.key),
                "MESHACCEL_TLS_CLIENT_CA_FILE": str(no_ca.client_ca),
            },
            f"invalid setting tls_client_ca_file={no_ca.client_ca} (from env "
            "MESHACCEL_TLS_CLIENT_CA_FILE): the client CA bundle: no PEM certificate in it",
            "a CA bundle without a certificate",
        ),
        Refusal(
            ["--mode", "standalone", *TLS_ARGS],
            {},
            "invalid setting pods_file=null (from default): standalone mode reads its pod set "
            "from this file: give --pods-file",
            "standalone without its file",
        ),
        Refusal(
            ["--bogus", *TLS_ARGS],
            {},
            "invalid command line: unrecognized arguments: --bogus (see meshaccel-agent --help)",
            "an unknown flag is one line and exit 2 too",
        ),
    ]


def test_invalid_settings_stop_start_up_with_one_line(tmp_path: Path) -> None:
    for case in refusals(tmp_path):
        result = run_agent(case.argv, case.env, module=case.module)
        assert result.returncode == EXIT_INVALID_SETTINGS, (case.reason, result.stderr)
        assert result.stderr.splitlines() == [case.line], case.reason
        assert result.stdout == "", case.reason


def test_loopback_without_token_is_accepted() -> None:
    for address in ("127.0.0.1", "::1"):
        loaded = load_settings(["--insecure-no-token", "--listen-address", address], environ={})
        assert read_tls(loaded) is None
        assert loaded.settings.api_is_loopback


def test_tls_is_read_and_only_paths_are_shown(tmp_path: Path) -> None:
    files = PKI.write_agent_files(tmp_path / "tls")
    argv = [
        f"--tls-cert-file={files.cert}",
        f"--tls-key-file={files.key}",
        f"--tls-client-ca-file={files.client_ca}",
    ]
    loaded = load_settings(argv, environ={})
    tls = read_tls(loaded)
    assert tls is not None and tls.trust_bundle == bundle_fingerprint(PKI.ca.pem)
    shown = json.dumps(loaded.describe())
    assert str(files.key) in shown and "PRIVATE KEY" not in shown


def test_uninstall_needs_no_tls() -> None:
    loaded = load_settings(["uninstall"], environ={})
    assert loaded.command == "uninstall"
    with pytest.raises(SettingsError):
        load_settings(["run"], environ={})
