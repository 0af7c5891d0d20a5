"""What every binding type shares: ``with`` lets go of it (its ``close``)."""

from __future__ import annotations

from typing import Self


class Closing:
    """A context manager whose exit is :meth:`close`."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
