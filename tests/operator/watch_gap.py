"""The API emulator with watch outages: what a client misses while its watch is down.

:class:`WatchGapEmulator` is :class:`~tests.operator.emulator.ApiServerEmulator` plus
:meth:`~WatchGapEmulator.watch_gap`: while the gap lasts, a resource's open watch streams are
ended and new watches of it are held open with nothing sent; writes go on as usual (and are
missed). When the gap ends, every held watch is answered ``410 Gone`` (its resourceVersion is
too old, as after an etcd compaction), so the client must list again: the deletions made
during the gap reach it only as objects missing from that list, never as DELETED events.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import attrs
from kmock._internal import rendering

from tests.operator.emulator import ApiServerEmulator, Watcher


@attrs.define(kw_only=True)
class WatchGapEmulator(ApiServerEmulator):
    """The tests' emulator whose watches can be cut (see the module)."""

    _gaps: dict[str, asyncio.Event] = attrs.field(factory=dict, init=False)
    # Watches of a resource answered 410 at the end of a gap, by plural.
    expired: dict[str, int] = attrs.field(factory=dict, init=False)
    # Watches of a resource held open by a gap right now, by plural.
    held: dict[str, int] = attrs.field(factory=dict, init=False)

    @contextlib.contextmanager
    def watch_gap(self, plural: str) -> Iterator[None]:
        """Watches of ``plural`` (``pods``) are down inside the block; 410 Gone after it."""
        if plural in self._gaps:
            raise RuntimeError(f"a gap in the {plural} watch is open already")
        ended = self._gaps[plural] = asyncio.Event()
        for watcher in list(self._watchers):
            if watcher.spec.plural == plural:
                watcher.queue.put_nowait(None)  # the open streams end
        try:
            yield
        finally:
            del self._gaps[plural]
            ended.set()

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        watcher = self._results.get(request.id)
        gap = self._gaps.get(watcher.spec.plural) if isinstance(watcher, Watcher) else None
        if gap is None or not isinstance(watcher, Watcher):
            async for payload in super()._serve_watch(request):
                yield payload
            return
        plural = watcher.spec.plural
        yield b""  # the headers: a started watch that says nothing
        self.held[plural] = self.held.get(plural, 0) + 1
        try:
            await gap.wait()
        finally:
            self.held[plural] -= 1
        self.expired[plural] = self.expired.get(plural, 0) + 1
        yield {
            "type": "ERROR",
            "object": {
                "apiVersion": "v1",
                "kind": "Status",
                "metadata": {},
                "status": "Failure",
                "reason": "Expired",
                "code": 410,
                "message": f"too old resource version: {request.params.get('resourceVersion')}",
            },
        }
