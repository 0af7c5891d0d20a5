"""What every fd-backed map or program shares: its fd, its pins by path, and closing it."""

from __future__ import annotations

import errno as _errno
import os
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from .closing import Closing
from .errors import BpfError, PinError
from .native import _call_int, _error, _path_arg, _pin_hints

if TYPE_CHECKING:
    from .objects import BpfObject


class FdHandle(Closing):
    """A kernel map or program reached through an fd: owned (from a pin; closed by
    :meth:`close`) or borrowed from a loaded :class:`BpfObject` (valid while it is open;
    :meth:`close` lets go without closing the object's fd)."""

    _error_type: ClassVar[type[BpfError]] = BpfError

    def __init__(
        self,
        fd: int,
        *,
        label: str,
        pin_path: Path | None = None,
        lender: BpfObject | None = None,
    ) -> None:
        """Internal; use the subclass's ``from_pin`` or :meth:`ObjectMap.handle`. ``label``
        names it in messages (``map 'pods'``)."""
        self._fd: int | None = fd
        self._label = label
        self._pin_path = pin_path
        self._lender = lender

    @property
    def fd(self) -> int:
        """The fd; a borrowed one only while its object is open."""
        if self._fd is None:
            raise self._error_type(
                f"{self._label} is closed; fix: use it before close(), or open it again",
                errno=_errno.EBADF,
                func="close",
            )
        if self._lender is not None and self._lender.closed:
            raise self._error_type(
                f"{self._label} belongs to closed object {self._lender.path}; "
                "fix: keep the BpfObject open while its maps are used",
                errno=_errno.EBADF,
                func="bpf_object__close",
            )
        return self._fd

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._fd is None

    @property
    def pin_path(self) -> Path | None:
        """Where it was opened from or last pinned by :meth:`pin`, if anywhere."""
        return self._pin_path

    def pin(self, path: Path | str) -> None:
        """``bpf_obj_pin``: pin it at ``path`` on bpffs (one more pin; the path must be free)."""
        rc, log = _call_int("bpf_obj_pin", self.fd, _path_arg(path))
        if rc < 0:
            raise _error(
                PinError, "bpf_obj_pin", -rc, f"pin {self._label} at {path}", _pin_hints(path), log
            )
        self._pin_path = Path(path)

    def unpin(self, path: Path | str | None = None) -> None:
        """Remove the pin at ``path`` (default: :attr:`pin_path`); the kernel object lives on
        while an fd or another pin holds it."""
        target = path if path is not None else self._pin_path
        if target is None:
            raise PinError(
                f"{self._label} has no pin path; fix: pass the path to unpin()",
                errno=_errno.EINVAL,
                func="unlink",
            )
        try:
            os.unlink(target)
        except OSError as exc:
            raise _error(
                PinError, "unlink", exc.errno or _errno.EIO, f"unpin {self._label} at {target}"
            ) from exc

    def close(self) -> None:
        """Close an owned fd (once); a borrowed one stays open with its object."""
        fd, self._fd = self._fd, None
        if fd is not None and self._lender is None:
            os.close(fd)
