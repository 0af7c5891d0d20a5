"""The operator's settings: flags over MESHACCEL_* over defaults, bad values refused."""

from __future__ import annotations

import pytest

from meshaccel.operator.config import operator_config, parse_args


def test_defaults() -> None:
    config = operator_config(parse_args([], environ={}))
    assert (config.namespace, config.push_window, config.probe_interval) == (
        "meshaccel-system",
        0.1,
        15.0,
    )
    assert (config.backoff_max, config.peering_lifetime) == (30.0, 60)


def test_environment_then_flags() -> None:
    environ = {"MESHACCEL_NAMESPACE": "mesh", "MESHACCEL_PUSH_WINDOW": "0.5"}
    assert operator_config(parse_args([], environ=environ)).push_window == 0.5
    flagged = parse_args(["--push-window", "0.2", "--namespace", "x"], environ=environ)
    assert (flagged.namespace, flagged.push_window) == ("x", 0.2)


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--push-window", "11"], {}, "--push-window (MESHACCEL_PUSH_WINDOW) must be between"),
        ([], {"MESHACCEL_BACKOFF_MAX": "0"}, "--backoff-max (MESHACCEL_BACKOFF_MAX)"),
        ([], {"MESHACCEL_METRICS_PORT": "http"}, "invalid int value"),
        (["--log-level", "loud"], {}, "invalid choice"),
        (["--peering", "p", "--standalone"], {}, "not allowed with argument"),
    ],
)
def test_bad_values_exit_2_naming_the_setting(argv, environ, message, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(argv, environ=environ)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
