"""Structured logs: one JSON object a line, or ``key=value`` text; configured once at start-up.

Every field a caller passes in ``extra=`` (pod, namespace, uid, reason, generation, ...) becomes
a field of the line, next to ``ts``, ``level``, ``logger`` and ``msg``::

    log.info("pod removed", extra={"pod": "default/b", "uid": "1234", "reason": "not in the set"})

    {"ts": "2025-01-01T10:00:00.123Z", "level": "info", "logger": "meshaccel.agent.reconcile",
     "msg": "pod removed", "pod": "default/b", "uid": "1234", "reason": "not in the set"}
    ts=2025-01-01T10:00:00.123Z level=info logger=meshaccel.agent.reconcile msg="pod removed"
     pod=default/b uid=1234 reason="not in the set"
"""

from __future__ import annotations

import datetime as _dt
import enum
import json
import logging
import sys
from collections.abc import Mapping
from typing import Any, Literal, TextIO

LogFormat = Literal["json", "text"]
LogLevel = Literal["debug", "info", "warning", "error"]

# Attributes every LogRecord has: whatever else a record carries came from `extra=`.
_STANDARD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

# Reserved output keys: an `extra` field of the same name is written with a trailing underscore.
_RESERVED = ("ts", "level", "logger", "msg", "exc")

_HANDLER_NAME = "meshaccel-agent"


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a caller added to ``record`` through ``extra=``, in the order given."""
    return {key: value for key, value in record.__dict__.items() if key not in _STANDARD_ATTRIBUTES}


def _timestamp(record: logging.LogRecord) -> str:
    moment = _dt.datetime.fromtimestamp(record.created, tz=_dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _plain(value: Any) -> Any:
    """A JSON-friendly version of a field value (paths, addresses, enums become strings)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_plain(v) for v in value]
        return sorted(items, key=str) if isinstance(value, set | frozenset) else items
    return str(value)


def _fields(record: logging.LogRecord, formatter: logging.Formatter) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "ts": _timestamp(record),
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    for key, value in extra_fields(record).items():
        fields[f"{key}_" if key in _RESERVED else key] = _plain(value)
    if record.exc_info:
        fields["exc"] = formatter.formatException(record.exc_info)
    elif record.exc_text:
        fields["exc"] = record.exc_text
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record, self), ensure_ascii=False)


class KeyValueFormatter(logging.Formatter):
    """``key=value`` pairs on one line (logfmt); values with spaces, quotes or ``=`` are quoted."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(
            f"{key}={_logfmt_value(value)}" for key, value in _fields(record, self).items()
        )


def _logfmt_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if text and not any(c in text for c in ' "=\\\n\t'):
        return text
    return json.dumps(text, ensure_ascii=False)


def configure_logging(
    log_format: LogFormat = "json", level: LogLevel = "info", stream: TextIO | None = None
) -> None:
    """Send every log record of the process to ``stream`` (stderr) in ``log_format``.

    Idempotent: a second call replaces the handler the first one installed.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if log_format == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        if existing.get_name() == _HANDLER_NAME:
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's access log is one line per request (the operator's PUT every few seconds,
    # probes every few seconds): only at debug.
    logging.getLogger("aiohttp.access").setLevel(
        logging.DEBUG if level == "debug" else logging.WARNING
    )
