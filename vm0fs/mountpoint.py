"""The mount point, before and after a mount: what a mount needs, the checks before mounting, and
unmounting. Standard library only, so that `vm0fs mount` (which hands the mount to a process of
its own) and `vm0fs unmount` start fast.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from vm0fs.errors import Vm0fsError
from vm0fs.mounttable import mount_at, user_name, vm0fs_mount_of

log = logging.getLogger(__name__)

DEFAULT_MAX_TASKS = 8  # concurrent FUSE requests; only the ones waiting on the network need many


@dataclass
class MountConfig:
    mountpoint: Path
    api_url: str
    api_key: str
    cache_dir: Path
    metadata_ttl: float = 60.0
    cache_size: int | None = None
    cache_grace: float | None = None  # None: versions.RECENTLY_READ
    max_version_size: int | None = None
    allow_other: bool = False
    fuse_options: list[str] = field(default_factory=list)
    max_tasks: int = DEFAULT_MAX_TASKS
    api_retry_time: float = 10.0
    xattrs: bool = False


class MountError(Vm0fsError):
    """The mount could not be started; the message is for the user as it is."""


def check_mountpoint(path: Path) -> None:
    if _is_dead_mount(path):
        # "Transport endpoint is not connected": a vm0fs process died and left its mount.
        entry = mount_at(str(path))
        if entry is None or not entry.is_vm0fs:
            raise MountError(f"{path} is a dead mount of another filesystem: "
                             f"fusermount3 -u -z {path}")
        log.warning("%s is a dead vm0fs mount (its process ended): unmounting it", path)
        unmount(path, lazy=True)
    try:
        _check_mountpoint(path)
    except OSError as exc:
        raise MountError(f"cannot use mount point {path}: {exc.strerror}") from None


def _is_dead_mount(path: Path) -> bool:
    """statfs always reaches the filesystem's process, where stat may be answered from the
    kernel's cache of a dead mount's root."""
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


class MountLock:
    """An exclusive flock on the mount point folder, held from the checks until the kernel
    mount is in place: two mounts started on one folder at the same time cannot both pass
    the checks (the second then finds a mount point there)."""

    def __init__(self, path: Path) -> None:
        try:
            self.fd: int | None = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            self.fd = None  # missing, unreadable or dead: the checks say what is wrong

    def acquire(self) -> bool:
        """Take the lock if it is free; True once held (or when there is nothing to lock)."""
        if self.fd is None:
            return True
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _check_mountpoint(path: Path) -> None:
    inside = vm0fs_mount_of(str(path))
    if inside is not None and inside[0].path != inside[1]:
        raise MountError(f"{path} is inside the vm0fs mount at {inside[0].path}: mount on a "
                         "folder outside it")
    if not path.exists():
        raise MountError(f"mount point {path} does not exist")
    if not path.is_dir():
        raise MountError(f"mount point {path} is not a directory")
    if os.path.ismount(path):
        raise MountError(f"{path} is already a mount point (vm0fs unmount {path} first?)")
    try:
        if any(os.scandir(path)):
            raise MountError(f"mount point {path} is not empty")
    except PermissionError:
        raise MountError(f"cannot read mount point {path}: permission denied") from None


def unmount(mountpoint: Path, lazy: bool = False) -> None:
    """Unmount a vm0fs mount (fusermount3 works for root and for the user who mounted), and
    nothing else: other filesystems are not ours to unmount."""
    entry = mount_at(str(mountpoint))
    if entry is None:
        if not os.path.lexists(mountpoint):
            raise MountError(f"{mountpoint} does not exist")
        raise MountError(f"{mountpoint} is not a mount point")
    if not entry.is_vm0fs:
        raise MountError(f"{mountpoint} is not a vm0fs mount (it is {entry.fstype}): "
                         "vm0fs unmounts only its own mounts")
    owner = entry.user_id
    if os.getuid() != 0 and owner is not None and owner != os.getuid():
        raise MountError(f"{mountpoint} is mounted by {user_name(owner)}: only that user "
                         "or root can unmount it")
    command = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [entry.path]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise MountError("fusermount3 is not installed (Debian package fuse3)") from None
    except subprocess.TimeoutExpired:
        raise MountError(f"unmounting {mountpoint} timed out") from None
    if result.returncode != 0:
        message = result.stderr.strip().removeprefix("fusermount3: ") or "failed"
        message = " ".join(message.split())  # one line
        hint = " (a process still uses it: close it, or use --lazy)" if "busy" in message else ""
        raise MountError(f"cannot unmount {mountpoint}: {message}{hint}")
