"""Fixtures for the CLI's tests: the operator tests' API emulator (tests/operator/conftest.py),
serving the MeshAcceleration CRD generated from the operator's models (what crds/ holds:
tests/operator/test_crd.py checks that), so every status a test writes is checked against
the schema the operator writes it under."""

from __future__ import annotations

from collections.abc import AsyncIterator

import kmock
import pytest

from meshaccel.operator.crd import custom_resource_definition
from tests.operator.conftest import kube, kubeconfig
from tests.operator.emulator import ApiServerEmulator

__all__ = ["emulator", "kube", "kubeconfig"]


@pytest.fixture
async def emulator() -> AsyncIterator[ApiServerEmulator]:
    emu = ApiServerEmulator()
    emu.add_crd(custom_resource_definition())
    async with emu, kmock.Server(emu):
        yield emu
    assert emu.rejections == [], "a test wrote something a real API server refuses"
