"""What every libbpf failure becomes: errno, function, cause and fix, and the libbpf log."""

from __future__ import annotations

# --- errors ---


class BpfError(Exception):
    """A libbpf or bpf() failure: ``errno``, libbpf ``func`` and the captured libbpf ``log``."""

    def __init__(self, message: str, *, errno: int, func: str, log: str = "") -> None:
        super().__init__(message)
        self.errno = errno
        self.func = func
        self.log = log


class ObjectOpenError(BpfError):
    """The ELF object is missing or not a usable BPF object."""


class LoadError(BpfError):
    """``bpf_object__load`` failed (map creation, pinned-map reuse, relocation ...)."""


class VerifierError(LoadError):
    """The kernel refused a program; ``log`` holds the verifier log."""


class AttachError(BpfError):
    """Attaching or detaching a program failed."""


class MapError(BpfError):
    """A map operation failed or was called with the wrong sizes or state."""


class PinError(BpfError):
    """Pinning, unpinning or opening a pin failed (or bpffs could not be mounted)."""


class BtfError(BpfError):
    """BTF could not be parsed or does not describe the requested type."""
