"""compact_when_settled: compacts once the pod count settles, again only after real growth."""

from __future__ import annotations

import asyncio
import gc

import pytest

from meshaccel.operator import memory


class Done(Exception):
    pass


async def test_compacts_after_settling_and_after_regrowth(monkeypatch) -> None:
    counts = iter([0, 100, 900, 1000, 1000, 1000, 1100, 1100, 2000, 2000, 2000])
    seen: list[int] = []
    current = 0

    def count() -> int:
        nonlocal current
        current = next(counts, -1)
        if current < 0:
            raise Done
        return current

    monkeypatch.setattr(memory, "compact", lambda: seen.append(current))
    task = asyncio.create_task(memory.compact_when_settled(count, interval=0.001))
    with pytest.raises(Done):
        await task
    assert seen == [1000, 2000], "not while growing, not for +10 %, again at +100 %"


def test_compact_freezes_the_survivors() -> None:
    try:
        survivor = [object() for _ in range(1000)]
        memory.compact()
        assert gc.get_freeze_count() >= len(survivor)
    finally:
        gc.unfreeze()
