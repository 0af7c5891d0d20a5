"""The built-image tests run only where scripts/images.sh names the images it built.

Without MESHACCEL_AGENT_IMAGE and MESHACCEL_OPERATOR_IMAGE they are deselected (not skipped):
the suite's own run builds no image; scripts/images.sh builds both, then runs these and the
agent's lifecycle tests from them.
"""

from __future__ import annotations

import os

import pytest

from tests.operator.conftest import emulator, kubeconfig

__all__ = ["emulator", "kubeconfig"]

IMAGE_VARIABLES = ("MESHACCEL_AGENT_IMAGE", "MESHACCEL_OPERATOR_IMAGE")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if all(os.environ.get(name) for name in IMAGE_VARIABLES):
        return
    deselected = [item for item in items if item.get_closest_marker("images")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("images")]
