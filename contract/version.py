"""Which meshaccel this is: the installed distribution's version, one for agent and operator."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "meshaccel"


def installed_version() -> str:
    """The version pip installed (pyproject.toml's); "unknown" when run from an uninstalled tree."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


VERSION = installed_version()
