"""A BPF link: an attachment that lives while a handle or a pin holds it."""

from __future__ import annotations

import errno as _errno
import os
from pathlib import Path

from .closing import Closing
from .errors import AttachError, PinError
from .info import LinkInfo, _BpfLinkInfo, _get_info
from .native import _call_int, _call_ptr, _error, _lib, _path_arg, _pin_hints


class Link(Closing):
    """A BPF link (``struct bpf_link *``): the attachment lives while a handle or a pin holds it."""

    def __init__(self, ptr: int) -> None:
        """Wrap a ``struct bpf_link *``; use :meth:`ObjectProgram.attach_cgroup` or
        :meth:`open_pinned`."""
        self._ptr: int | None = ptr

    @classmethod
    def open_pinned(cls, path: Path | str) -> Link:
        """``bpf_link__open``: a handle on a pinned link (its pin path is remembered for unpin)."""
        ptr, err, log = _call_ptr("bpf_link__open", _path_arg(path))
        if ptr is None:
            raise _error(
                PinError,
                "bpf_link__open",
                err,
                f"open pinned link {path}",
                {
                    _errno.ENOENT: (
                        "nothing is pinned at this path",
                        "check the path and the bpffs mount",
                    ),
                    _errno.EINVAL: (
                        "the pinned object is not a link",
                        "use Map.from_pin / Program.from_pin",
                    ),
                },
                log,
            )
        return cls(ptr)

    def _checked(self, func: str) -> int:
        if self._ptr is None:
            raise AttachError("link is destroyed", errno=_errno.EBADF, func=func)
        return self._ptr

    @property
    def fd(self) -> int:
        """The link fd."""
        return int(_lib().bpf_link__fd(self._checked("bpf_link__fd")))

    @property
    def pin_path(self) -> Path | None:
        """Where the link is pinned, if it is."""
        raw = _lib().bpf_link__pin_path(self._checked("bpf_link__pin_path"))
        return Path(os.fsdecode(raw)) if raw else None

    def info(self) -> LinkInfo:
        """``bpf_obj_get_info_by_fd``: link type, link id, program id."""
        info = _BpfLinkInfo()
        _get_info(self.fd, info, AttachError, "read link info")
        return LinkInfo(link_type=info.type, id=info.id, prog_id=info.prog_id)

    def pin(self, path: Path | str) -> None:
        """``bpf_link__pin``: keep the attachment after this process exits."""
        rc, log = _call_int("bpf_link__pin", self._checked("bpf_link__pin"), _path_arg(path))
        if rc < 0:
            raise _error(
                PinError, "bpf_link__pin", -rc, f"pin link at {path}", _pin_hints(path), log
            )

    def unpin(self) -> None:
        """``bpf_link__unpin``: remove the pin (the attachment then lives as long as the handle)."""
        rc, log = _call_int("bpf_link__unpin", self._checked("bpf_link__unpin"))
        if rc < 0:
            raise _error(
                PinError,
                "bpf_link__unpin",
                -rc,
                "unpin link",
                {_errno.EINVAL: ("the link is not pinned", "nothing to unpin")},
                log,
            )

    def detach(self) -> None:
        """``bpf_link__detach``: detach now, even while pinned (the handle stays; destroy it)."""
        rc, log = _call_int("bpf_link__detach", self._checked("bpf_link__detach"))
        if rc < 0:
            raise _error(AttachError, "bpf_link__detach", -rc, "detach link", None, log)

    def destroy(self) -> None:
        """``bpf_link__destroy`` (once): drop this handle; detaches unless pinned elsewhere."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            rc, log = _call_int("bpf_link__destroy", ptr)
            if rc < 0:
                raise _error(AttachError, "bpf_link__destroy", -rc, "destroy link", None, log)

    @property
    def destroyed(self) -> bool:
        """True after :meth:`destroy`."""
        return self._ptr is None

    def close(self) -> None:
        """The same as :meth:`destroy` (what ``with`` calls)."""
        self.destroy()
