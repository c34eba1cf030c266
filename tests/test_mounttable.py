"""Which mount a path is in, from the kernel's table alone (no look into any mount)."""

from __future__ import annotations

import pytest

from vm0fs import mounttable
from vm0fs.mounttable import MountEntry, mount_at, vm0fs_mount_of

TABLE = """\
/dev/root / ext4 rw,relatime 0 0
tmpfs /tmp tmpfs rw,nosuid,nodev 0 0
vm0fs:api.vm0.ai /home/ann/my\\040vm0 fuse.vm0fs ro,nosuid,nodev,user_id=1000,group_id=1000 0 0
vm0fs:old /srv/stacked fuse.vm0fs ro,user_id=0,group_id=0 0 0
tmpfs /srv/stacked tmpfs rw 0 0
vm0fs:x /home/ann/my\\040vm0/artifacts/inner fuse.vm0fs ro,user_id=1000 0 0
"""


@pytest.fixture(autouse=True)
def table(monkeypatch: pytest.MonkeyPatch) -> None:
    entries = [MountEntry(mounttable._unescape(f[0]), mounttable._unescape(f[1]), f[2],
                          frozenset(f[3].split(","))) for f in map(str.split, TABLE.splitlines())]
    monkeypatch.setattr(mounttable, "mounts", lambda: entries)


def test_paths_with_spaces_and_the_deepest_mount() -> None:
    found = vm0fs_mount_of("/home/ann/my vm0/artifacts/run/current/file")
    assert found is not None and found[0].path == "/home/ann/my vm0" and found[0].user_id == 1000
    inner = vm0fs_mount_of("/home/ann/my vm0/artifacts/inner/x")
    assert inner is not None and inner[0].path == "/home/ann/my vm0/artifacts/inner"
    assert vm0fs_mount_of("/home/ann/my vm0x/file") is None  # a prefix of a name is not inside


def test_the_top_of_stacked_mounts_counts() -> None:
    entry = mount_at("/srv/stacked")
    assert entry is not None and entry.fstype == "tmpfs" and not entry.is_vm0fs
    assert vm0fs_mount_of("/srv/stacked/a") is None  # the tmpfs on top hides the vm0fs mount


def test_not_a_mount_point() -> None:
    assert mount_at("/home/ann") is None
    assert vm0fs_mount_of("/tmp/x") is None
