"""Waiting in tests: poll a condition until it holds (``wait_for`` on an event loop,
``wait_until`` in plain code).

The timeout only turns a hang into a failure: it claims nothing about speed, so it is generous.
No test asserts how long something took (figures belong in the benchmarks), and none sleeps to
show that something did not happen: the code under test offers a state to check instead.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar, overload

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0


@overload
async def wait_for(
    predicate: Callable[[], Awaitable[T]],
    *,
    timeout: float = ...,
    interval: float = ...,
    what: str = ...,
) -> T: ...


@overload
async def wait_for(
    predicate: Callable[[], T], *, timeout: float = ..., interval: float = ..., what: str = ...
) -> T: ...


async def wait_for(
    predicate: Callable[[], object],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    interval: float = 0.01,
    what: str = "",
) -> object:
    """Poll ``predicate()`` (plain or async) until it returns something truthy, and return that.

    Raises AssertionError naming ``what`` if it is still falsy after ``timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        await asyncio.sleep(interval)


def wait_until(
    predicate: Callable[[], T], *, timeout: float, interval: float = 0.05, what: str = ""
) -> T:
    """Poll ``predicate()`` until it returns something truthy, and return that; TimeoutError
    naming ``what`` if it is still falsy after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(interval)


@dataclass
class StoppedClock:
    """A clock for code that takes one (``clock=``), moved only by the test: windows, backoffs,
    leases and intervals read exactly. Real timers still run; while it stands, nothing falls due."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now
