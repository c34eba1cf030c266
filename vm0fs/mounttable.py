"""The kernel's table of mounts (/proc/self/mounts): which mounts are vm0fs's, whose they are,
and which mount a path is in. Reading the table never touches a mount, so a dead or hanging
mount cannot make a command hang or fail."""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator
from dataclasses import dataclass

FSTYPE = "fuse.vm0fs"


@dataclass(frozen=True)
class MountEntry:
    source: str
    path: str
    fstype: str
    options: frozenset[str]

    @property
    def is_vm0fs(self) -> bool:
        return self.fstype == FSTYPE

    @property
    def user_id(self) -> int | None:
        """Who mounted it (FUSE mounts say so), or None."""
        for option in self.options:
            if option.startswith("user_id="):
                value = option.removeprefix("user_id=")
                return int(value) if value.isdigit() else None
        return None


def _unescape(text: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        text = text.replace(code, char)
    return text


def mounts() -> list[MountEntry]:
    try:
        with open("/proc/self/mounts") as table:
            lines = table.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 4:
            found.append(MountEntry(_unescape(fields[0]), _unescape(fields[1]), fields[2],
                                    frozenset(fields[3].split(","))))
    return found


def _candidates(path: str) -> Iterator[str]:
    """The path as given (made absolute, never stat'ed), then with symlinks resolved (only
    asked for when the first did not match: resolving looks into the mount)."""
    plain = os.path.abspath(path)
    yield plain
    real = os.path.realpath(plain)  # non-strict: errors (a dead mount) leave the rest as is
    if real != plain:
        yield real


def mount_at(path: str) -> MountEntry | None:
    """The mount whose mount point is `path` (the top one when several are stacked)."""
    for candidate in _candidates(path):
        found = [m for m in mounts() if m.path == candidate]
        if found:
            return found[-1]
    return None


def vm0fs_mount_of(path: str) -> tuple[MountEntry, str] | None:
    """The vm0fs mount `path` lies in, and `path` itself (absolute, as matched)."""
    for candidate in _candidates(path):
        best: MountEntry | None = None
        for entry in mounts():
            inside = candidate == entry.path or candidate.startswith(entry.path.rstrip("/") + "/")
            if inside and (best is None or len(entry.path) >= len(best.path)):
                best = entry  # the deepest mount wins; among equals, the top (last) one
        if best is not None and best.is_vm0fs:
            return best, candidate
    return None


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
