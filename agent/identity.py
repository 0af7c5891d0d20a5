"""Pod identity: from a pod of the desired set to the cgroup id the datapath keys on.

The datapath recognises a pod's processes by the pod-level cgroup (its id is the inode number
of the cgroup's directory on cgroup2, what ``bpf_get_current_ancestor_cgroup_id`` returns).
Kubelet names that directory after the pod UID, differently for its two cgroup drivers::

    systemd   kubepods.slice/kubepods-pod<uid_>.slice                          Guaranteed
              kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice
              kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice
    cgroupfs  kubepods/pod<uid>                                                Guaranteed
              kubepods/burstable/pod<uid>
              kubepods/besteffort/pod<uid>

(``uid_`` is the UID with ``-`` replaced by ``_``: systemd reserves ``-`` for nesting.) The
QoS class is not part of the pod set, so every class is tried; ``auto`` tries both drivers. A
pod found in more than one place is not guessed at: it stays unresolved.

A standalone agent instead takes the directory from the pod's ``cgroup`` field, relative to the
cgroup root (``/proc/<pid>/cgroup`` style, a leading ``/`` is allowed), never above it.

Whether a programmed pod's cgroup is still there is told by its id, in the same places
(:meth:`CgroupResolver.vanished`): cgroup ids are not reused (on 64-bit kernels), so a cgroup
removed and made again under the same name is another cgroup, and the pod's is gone.
"""

from __future__ import annotations

import enum
import os
import stat
from pathlib import Path, PurePosixPath

from meshaccel.agent.reconcile import UnresolvedPodError
from meshaccel.contract.api import PodSpec

# connect4 looks for the pod among the current task's cgroup ancestors at levels 1..8
# (bpf/include/helpers.h MAX_CGROUP_LEVEL): a pod cgroup deeper than that is never found.
MAX_CGROUP_LEVEL = 8


class CgroupDriver(enum.StrEnum):
    SYSTEMD = "systemd"
    CGROUPFS = "cgroupfs"
    AUTO = "auto"


class QosClass(enum.StrEnum):
    GUARANTEED = "guaranteed"
    BURSTABLE = "burstable"
    BESTEFFORT = "besteffort"


def kubelet_pod_cgroup(uid: str, driver: CgroupDriver, qos: QosClass) -> PurePosixPath:
    """Where kubelet with ``driver`` puts the cgroup of pod ``uid`` of class ``qos``."""
    if driver is CgroupDriver.SYSTEMD:
        escaped = uid.replace("-", "_")
        if qos is QosClass.GUARANTEED:
            return PurePosixPath("kubepods.slice", f"kubepods-pod{escaped}.slice")
        return PurePosixPath(
            "kubepods.slice", f"kubepods-{qos}.slice", f"kubepods-{qos}-pod{escaped}.slice"
        )
    if driver is CgroupDriver.CGROUPFS:
        if qos is QosClass.GUARANTEED:
            return PurePosixPath("kubepods", f"pod{uid}")
        return PurePosixPath("kubepods", str(qos), f"pod{uid}")
    raise ValueError(f"{driver} is not a concrete cgroup driver")


_UID_MARK = "\0"  # stands for the UID in path templates (a NUL never is in a path)


def _within(path: str, directory: str) -> bool:
    """``path`` is ``directory`` or below it (both absolute and normalised: lexical)."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


class CgroupResolver:
    """Implements the reconciler's ``PodResolver``: ``resolve(pod) -> cgroup id``, and
    ``vanished(pod, cgroup_id)``: whether that cgroup is gone since.

    ``cgroup_root``: the root explicit ``cgroup`` paths are relative to (the agent passes the
    cgroup2 mount). ``kubelet_root``: where kubelet's ``kubepods`` hierarchy starts (default:
    ``cgroup_root``). ``explicit_cgroups=False`` (Kubernetes mode) ignores a pod's ``cgroup``
    field and always goes by UID. With ``attach_cgroup``, a pod outside it is refused (the
    programs would never see it); with ``cgroup2_mount``, so is a pod deeper than connect4
    looks.

    Fast enough for a thousand pods per apply (about 10 us a pod): the roots are resolved
    once, here; a pod costs one ``stat`` per place looked at and lexical checks. That is
    exact because the answer must be a directory on the cgroup filesystem of ``cgroup_root``
    (same device), and cgroupfs has no symlinks: a path that leaves it through a symlink or
    a mount is on another device and refused.
    """

    def __init__(
        self,
        cgroup_root: Path,
        driver: CgroupDriver | str = CgroupDriver.AUTO,
        *,
        kubelet_root: Path | None = None,
        explicit_cgroups: bool = True,
        attach_cgroup: Path | None = None,
        cgroup2_mount: Path | None = None,
    ) -> None:
        self.cgroup_root = cgroup_root
        self.driver = CgroupDriver(driver)
        self.kubelet_root = kubelet_root if kubelet_root is not None else cgroup_root
        self.explicit_cgroups = explicit_cgroups
        self.attach_cgroup = attach_cgroup
        self.cgroup2_mount = cgroup2_mount
        self._root = os.path.realpath(cgroup_root)
        self._kubelet_root = os.path.realpath(self.kubelet_root)
        self._device = os.stat(self._root).st_dev
        self._attach = None if attach_cgroup is None else os.path.realpath(attach_cgroup)
        self._mount = None if cgroup2_mount is None else os.path.realpath(cgroup2_mount)
        drivers = (
            [CgroupDriver.SYSTEMD, CgroupDriver.CGROUPFS]
            if self.driver is CgroupDriver.AUTO
            else [self.driver]
        )
        # Every place a pod can be, in the order tried, with a marker for its UID.
        self._templates = [
            (driver, str(kubelet_pod_cgroup(_UID_MARK, driver, qos)))
            for driver in drivers
            for qos in QosClass
        ]

    def resolve(self, pod: PodSpec) -> int:
        """The pod's cgroup id; raises :class:`UnresolvedPodError` saying what was looked for."""
        return self._find(pod)[1].st_ino

    def locate(self, pod: PodSpec) -> Path:
        """The pod's cgroup directory (checked to be a cgroup, inside the attach cgroup)."""
        return Path(self._find(pod)[0])

    def vanished(self, pod: PodSpec, cgroup_id: int) -> str | None:
        """Why the cgroup ``pod`` resolved to, ``cgroup_id``, is gone; None while it is there.

        By id, not by name: the cgroup is there while one of the places the pod's cgroup is
        looked for is a directory of the cgroup filesystem whose inode number is ``cgroup_id``.
        It is gone when those places hold nothing (the pod was deleted) or only other
        directories (its cgroup was removed and made again under the same name: a new cgroup
        has a new id, and the datapath keys on the id). Only that is an answer: a place that
        cannot be looked at (EACCES, EIO, ...) gives None, for a removal stops the pod's
        acceleration and must never be a guess. One ``stat`` per place, stopping at the pod's.
        """
        if self.explicit_cgroups and pod.cgroup is not None:
            try:
                places = [self._explicit_path(pod.cgroup)]
            except UnresolvedPodError:  # never resolved, so never programmed: not ours to say
                return None
        else:
            places = [path for _, path in self._uid_places(pod.uid)]
        others: list[str] = []
        for path in places:
            try:
                st = os.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except (OSError, ValueError):
                return None
            if st.st_ino == cgroup_id and st.st_dev == self._device and stat.S_ISDIR(st.st_mode):
                return None
            others.append(path)
        if others:
            return (
                f"cgroup {others[0]} was replaced: it is no longer cgroup id {cgroup_id} "
                "(removed and made again)"
            )
        if len(places) == 1:
            return f"cgroup {places[0]} disappeared (cgroup id {cgroup_id})"
        return (
            f"the cgroup of pod uid {pod.uid} (cgroup id {cgroup_id}) disappeared from under "
            f"{self.kubelet_root}"
        )

    def _find(self, pod: PodSpec) -> tuple[str, os.stat_result]:
        if self.explicit_cgroups and pod.cgroup is not None:
            path, st = self._explicit(pod.cgroup)
        else:
            path, st = self._by_uid(pod.uid)
        self._check_visible(path)
        return path, st

    def _stat_cgroup(self, path: str) -> os.stat_result | None:
        """The stat of a cgroup directory at ``path``; None if there is nothing there."""
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError) as err:
            raise UnresolvedPodError(f"cannot look at {path}: {err}") from err
        return st

    def _explicit_path(self, cgroup: str) -> str:
        parts = [part for part in cgroup.split("/") if part not in ("", ".")]
        if ".." in parts:
            raise UnresolvedPodError(
                f"cgroup {cgroup!r} must stay below {self.cgroup_root}: '..' is not allowed"
            )
        if "\0" in cgroup or not parts:
            raise UnresolvedPodError(
                f"cgroup {cgroup!r} names no directory below {self.cgroup_root} (the root "
                "cgroup is not a pod)"
            )
        return os.path.join(self._root, *parts)

    def _explicit(self, cgroup: str) -> tuple[str, os.stat_result]:
        path = self._explicit_path(cgroup)
        st = self._stat_cgroup(path)
        if st is None:
            raise UnresolvedPodError(
                f"cgroup {path} does not exist (the pod's cgroup {cgroup!r} below "
                f"{self.cgroup_root})"
            )
        if st.st_dev != self._device:
            raise UnresolvedPodError(
                f"cgroup {cgroup!r} leads out of the cgroup filesystem of {self.cgroup_root} "
                "(through a symlink or a mount)"
            )
        if not stat.S_ISDIR(st.st_mode):
            raise UnresolvedPodError(f"{path} is not a cgroup v2 directory")
        return path, st

    def _uid_places(self, uid: str) -> list[tuple[str, str]]:
        """Where kubelet may have put pod ``uid``'s cgroup: (relative, absolute) in order."""
        escaped = uid.replace("-", "_")
        places = []
        for driver, template in self._templates:
            relative = template.replace(
                _UID_MARK, escaped if driver is CgroupDriver.SYSTEMD else uid
            )
            places.append((relative, os.path.join(self._kubelet_root, relative)))
        return places

    def _by_uid(self, uid: str) -> tuple[str, os.stat_result]:
        looked: list[str] = []
        found: list[tuple[str, os.stat_result]] = []
        for relative, path in self._uid_places(uid):
            looked.append(relative)
            st = self._stat_cgroup(path)
            if st is not None and st.st_dev == self._device and stat.S_ISDIR(st.st_mode):
                found.append((path, st))
        if len(found) == 1:
            return found[0]
        if not found:
            raise UnresolvedPodError(
                f"no cgroup for pod uid {uid} under {self.kubelet_root} (cgroup driver "
                f"{self.driver}): looked for {', '.join(looked)}"
            )
        raise UnresolvedPodError(
            f"pod uid {uid} has more than one cgroup under {self.kubelet_root}: "
            f"{', '.join(path for path, _ in found)}; set the kubelet's cgroup driver "
            "(--cgroup-driver) to choose"
        )

    def _check_visible(self, path: str) -> None:
        if self._attach is not None and not _within(path, self._attach):
            raise UnresolvedPodError(
                f"cgroup {path} is outside the attach cgroup {self.attach_cgroup}: the "
                "datapath cannot see its processes"
            )
        if self._mount is not None:
            if not _within(path, self._mount):
                raise UnresolvedPodError(
                    f"cgroup {path} is not under the cgroup2 mount {self.cgroup2_mount}"
                )
            level = len(os.path.relpath(path, self._mount).split("/"))
            if level > MAX_CGROUP_LEVEL:
                raise UnresolvedPodError(
                    f"cgroup {path} is at level {level} of the hierarchy; the datapath looks "
                    f"for pods at levels 1..{MAX_CGROUP_LEVEL} only"
                )
