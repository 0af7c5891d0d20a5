"""Run a command of a built image the way the chart runs it, without a container engine.

No container runtime runs here, so this does the part of one that the agent and the operator
can tell apart: the image's root filesystem (``buildah mount``), read-only; the image's
environment, entry point and user; the host paths the DaemonSet mounts (bpffs, cgroup2
read-only) plus the test's own directories; and only the given capabilities (``setpriv``, inside
the image, as uid 0 like the DaemonSet or as the Deployment's uid). It keeps the host's network
and PID namespaces, as ``hostNetwork`` does for the agent: its PID is the program's own (each
step ``exec``s), so tests stop it by PID and read its ``/proc`` status as for any process.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# In the private mount namespace: the image root read-only, the host's /proc and /dev bound
# in, /sys read-only as a container gets it, then the given bind mounts on top (":ro": read-only
# all the way down); then into it, under setpriv.
_ENTER = r"""
set -eu
root=$1; shift
mount --bind "$root" "$root"
for dir in proc dev; do mount --rbind "/$dir" "$root/$dir"; done
mount --rbind -o ro=recursive /sys "$root/sys"
while [ "$1" != "--" ]; do
    spec=$1; shift
    source=${spec%%:*}; rest=${spec#*:}; target=${rest%%:*}; mode=${rest#"$target"}
    mkdir -p "$root$target" 2>/dev/null || true
    if [ "$mode" = ":ro" ]; then
        mount --rbind -o ro=recursive "$source" "$root$target"
    else
        mount --rbind "$source" "$root$target"
    fi
done
shift
mount -o remount,bind,ro "$root"
exec chroot "$root" "$@"
"""


@dataclass(frozen=True)
class ImageConfig:
    env: dict[str, str]
    entrypoint: list[str]
    user: str

    @classmethod
    def of(cls, image: str) -> ImageConfig:
        raw = subprocess.run(
            ["buildah", "inspect", "--type", "image", image],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        config = json.loads(raw)["OCIv1"]["config"]
        env = dict(item.split("=", 1) for item in config.get("Env", []))
        return cls(env, list(config.get("Entrypoint") or []), str(config.get("User") or "0"))


class ImageRoot:
    """A built image's root filesystem, mounted for the life of the context."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.config = ImageConfig.of(image)
        self._container = ""
        self.path = Path()

    def __enter__(self) -> ImageRoot:
        self._container = _buildah("from", "--pull-never", self.image)
        try:
            self.path = Path(_buildah("mount", self._container))
        except BaseException:
            _buildah("rm", self._container)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            _buildah("umount", self._container)
        _buildah("rm", self._container)

    def argv(
        self,
        args: Sequence[str],
        *,
        capabilities: Sequence[str],
        mounts: Sequence[str] = (),
        user: str | None = None,
        entrypoint: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> list[str]:
        """The command that runs ``entrypoint + args`` (or ``args`` alone) in the image.

        ``capabilities``: names without ``CAP_`` (``BPF``, ``NET_ADMIN``), the only ones the
        program gets. ``mounts``: ``host:container[:ro]``. ``user``: ``uid[:gid]``, default
        the image's. ``env``: set on top of the image's."""
        uid, _, gid = (user or self.config.user).partition(":")
        keep = ",".join(["-all", *(f"+{name.lower()}" for name in capabilities)])
        # As runc: HOME from the image, else root's for uid 0 and "/" for a user without one.
        home = {"HOME": "/root" if uid == "0" else "/"}
        environment = [f"{k}={v}" for k, v in {**home, **self.config.env, **(env or {})}.items()]
        program = [*self.config.entrypoint, *args] if entrypoint else list(args)
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            _ENTER,
            "sh",
            str(self.path),
            *mounts,
            "--",
            "setpriv",
            f"--reuid={uid}",
            f"--regid={gid or uid}",
            "--clear-groups",
            "--inh-caps=-all",
            f"--bounding-set={keep}",
            "--no-new-privs",
            "--",
            "env",
            "-i",
            *environment,
            *program,
        ]


def _buildah(*args: str) -> str:
    done = subprocess.run(
        ["buildah", *args], capture_output=True, text=True, check=True, timeout=120
    )
    return done.stdout.strip()


@contextlib.contextmanager
def mounted(image: str) -> Iterator[ImageRoot]:
    with ImageRoot(image) as root:
        yield root
