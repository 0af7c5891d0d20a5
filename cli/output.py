"""How the CLI prints: plain tables for people (coloured only on a terminal, and never with
NO_COLOR set: https://no-color.org), JSON for machines (``-o json``)."""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Sequence
from typing import IO, Any, TypeVar

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")


class Report(BaseModel):
    """Base of every ``-o json`` document: camelCase keys, as Kubernetes objects have."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), indent=2)


R = TypeVar("R", bound=BaseModel)


def printable_text(text: str) -> str:
    out = []
    for char in text:
        if char in "\n\t\r":
            out.append(" ")
        elif unicodedata.category(char) in ("Cc", "Cf"):
            # Escape sequences and bidi overrides in a message, a termination message or an
            # agent's output must not drive the reader's terminal.
            out.append(f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return "".join(out)


def _printable(value: Any) -> Any:
    if isinstance(value, str):
        return printable_text(value)
    if isinstance(value, list):
        return [_printable(item) for item in value]
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    return value


def printable(report: R) -> R:
    """A copy of ``report`` whose every text shows control characters as escapes: what a
    table prints comes from the cluster (status messages, agents' reports), and only this
    program's own colours may reach the terminal."""
    return type(report).model_validate(_printable(report.model_dump()))


def wants_colour(stream: IO[str]) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR")


class Style:
    """ANSI colours when ``colour``, the plain text otherwise."""

    def __init__(self, colour: bool) -> None:
        self.colour = colour

    def _paint(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.colour and text else text

    def good(self, text: str) -> str:
        return self._paint("32", text)

    def bad(self, text: str) -> str:
        return self._paint("31", text)

    def warn(self, text: str) -> str:
        return self._paint("33", text)

    def bold(self, text: str) -> str:
        return self._paint("1", text)


def visible_width(text: str) -> int:
    return len(ANSI_CODES.sub("", text))


def table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Left-aligned columns two spaces apart (the last column is not padded), as kubectl
    prints them; colour codes do not count towards the widths."""
    widths = [visible_width(cell) for cell in header]
    for row in rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], visible_width(cell))
    lines = []
    for row in (header, *rows):
        cells = [
            cell + " " * (widths[index] - visible_width(cell)) if index < len(row) - 1 else cell
            for index, cell in enumerate(row)
        ]
        lines.append(indent + "  ".join(cells).rstrip())
    return lines


def plural(count: int, noun: str, many: str | None = None) -> str:
    return f"{count} {noun if count == 1 else (many or noun + 's')}"
