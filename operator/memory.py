"""Keeping the operator's memory, and its garbage collector's pauses, small at 10,000 pods.

After the first listing the operator holds hundreds of thousands of long-lived objects (every
pod's facts and spec, Kopf's bookkeeping). CPython's full collections walk all of them: the
benchmark measured pauses of 300-500 ms that delayed pushes. Once the number of pods has
settled, :func:`compact` collects once, moves the survivors to the permanent generation
(``gc.freeze``: later collections skip them; freed objects are still released by reference
counting) and hands freed heap back to the kernel (glibc's ``malloc_trim``), so the memory
the first listing's JSON needed does not stay resident.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
from collections.abc import Callable

log = logging.getLogger("meshaccel.operator.memory")

# Compact again only when the object count has grown by this factor since the last time.
REGROWTH = 1.5


def _malloc_trim() -> bool:
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    trim = getattr(libc, "malloc_trim", None)  # glibc only
    return bool(trim is not None and trim(0))


def compact() -> None:
    collected = gc.collect()
    gc.freeze()
    trimmed = _malloc_trim()
    log.info(
        "memory compacted",
        extra={"collected": collected, "frozen": gc.get_freeze_count(), "trimmed": trimmed},
    )


async def compact_when_settled(count: Callable[[], int], *, interval: float = 5.0) -> None:
    """Run :func:`compact` whenever ``count()`` (the pods known) stops growing after growth."""
    compacted_at = 0
    last = -1
    while True:
        await asyncio.sleep(interval)
        current = count()
        if current == last and current > 0 and current >= compacted_at * REGROWTH:
            compact()
            compacted_at = current
        last = current
