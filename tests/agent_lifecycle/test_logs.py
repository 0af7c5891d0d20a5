"""Structured logs: one JSON object a line with every extra field, or key=value text."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshaccel.contract.logs import configure_logging


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    yield buffer
    for handler in list(root.handlers):
        if handler not in saved_handlers:
            root.removeHandler(handler)
    root.setLevel(saved_level)


def test_json_lines_carry_every_extra_field(stream: io.StringIO) -> None:
    configure_logging("json", "info", stream)
    log = logging.getLogger("meshaccel.agent.test")
    log.info(
        "pod removed",
        extra={
            "pod": "default/b",
            "namespace": "default",
            "uid": "u-1",
            "reason": "not in set",
            "generation": 4,
            "file": Path("/x"),
            "level": "clash",
        },
    )
    log.debug("not shown at info")
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["level"] == "info" and record["logger"] == "meshaccel.agent.test"
    assert record["msg"] == "pod removed" and record["level_"] == "clash"
    assert record["ts"].endswith("Z") and "T" in record["ts"]
    assert {k: record[k] for k in ("pod", "namespace", "uid", "reason", "generation", "file")} == {
        "pod": "default/b",
        "namespace": "default",
        "uid": "u-1",
        "reason": "not in set",
        "generation": 4,
        "file": "/x",
    }


def test_exceptions_stay_on_one_line(stream: io.StringIO) -> None:
    configure_logging("json", "info", stream)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("t").exception("failed")
    (line,) = stream.getvalue().splitlines()
    assert "ValueError: boom" in json.loads(line)["exc"]


def test_key_value_text(stream: io.StringIO) -> None:
    configure_logging("text", "debug", stream)
    logging.getLogger("t").debug(
        "pod unresolved", extra={"pod": "ns/a", "reason": 'no "cgroup" here', "ok": True, "n": None}
    )
    (line,) = stream.getvalue().splitlines()
    assert line.split(" ", 1)[0].startswith("ts=")
    assert ' level=debug logger=t msg="pod unresolved" pod=ns/a ' in line
    assert 'reason="no \\"cgroup\\" here" ok=true n=null' in line


def test_configuring_twice_replaces_the_handler(stream: io.StringIO) -> None:
    configure_logging("json", "info", stream)
    configure_logging("text", "info", stream)
    logging.getLogger("t").info("once")
    assert len(stream.getvalue().splitlines()) == 1
