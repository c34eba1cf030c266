"""The on-disk cache: publish by rename, damaged entries, leftovers, eviction, permissions."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Any

import vm0fs.cache
from vm0fs.archive import FILE, Member
from vm0fs.cache import Cache
from vm0fs.tree import TreeBuilder


def builder(*members: Member) -> TreeBuilder:
    index = TreeBuilder(0)
    for member in members:
        index.add(member)
    return index


def publish(cache: Cache, version_id: str, data: bytes) -> None:
    staging = cache.stage(version_id)
    os.write(staging.fd, data)
    entry = cache.publish(staging, builder(Member("f", FILE, 0o644, 0, len(data), 0)))
    os.close(entry.fd)


def test_publish_then_open(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")
    assert cache.open_entry("v1") is None
    publish(cache, "v1", b"hello")
    entry = cache.open_entry("v1")
    assert entry is not None
    assert os.pread(entry.fd, 5, 0) == b"hello"
    f = entry.index.find(0, "f")
    assert f is not None and entry.index.size(f) == 5 and entry.index.mode(f) == 0o100644
    assert entry.index.tar_size == 5
    os.close(entry.fd)
    assert list(cache.staging.iterdir()) == []


def test_owner_only_permissions(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")
    publish(cache, "v1", b"secret")
    for path in [cache.root, *cache.root.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"


def test_second_publisher_of_the_same_version_uses_the_first(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")
    first, second = cache.stage("v1"), cache.stage("v1")
    for staging in (first, second):
        os.write(staging.fd, b"same bytes")
    members = builder(Member("f", FILE, 0o644, 0, 10, 0))
    os.close(cache.publish(first, members).fd)
    entry = cache.publish(second, members)
    assert entry.fd != second.fd
    assert os.pread(entry.fd, 10, 0) == b"same bytes"
    os.close(entry.fd)
    os.close(second.fd)  # left open for the caller, whose readers may still use it
    assert [p.name for p in cache.versions.iterdir()] == ["v1"]
    assert list(cache.staging.iterdir()) == []


def test_damaged_entry_is_removed(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")
    publish(cache, "v1", b"hello")
    with open(cache.versions / "v1" / "data.tar", "ab") as f:
        f.write(b"more")  # size no longer matches the index
    assert cache.open_entry("v1") is None
    assert not (cache.versions / "v1").exists()
    publish(cache, "v2", b"x")
    (cache.versions / "v2" / "index.bin").write_bytes(b"not an index")
    assert cache.open_entry("v2") is None
    assert not (cache.versions / "v2").exists()


def test_entry_of_an_older_vm0fs_is_fetched_again(tmp_path: Path) -> None:
    """index.json (before the binary index): the entry goes, so that it is downloaded again."""
    cache = Cache(tmp_path / "c")
    publish(cache, "v1", b"hello")
    folder = cache.versions / "v1"
    (folder / "index.bin").rename(folder / "index.json")
    assert cache.open_entry("v1") is None
    assert not folder.exists()


def test_leftovers_of_dead_writers_are_cleaned(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")
    live = cache.stage("live")
    dead = cache.stage("dead")
    os.close(dead.fd)  # its writer is gone: nobody holds the lock any more
    assert cache.clean_staging() == 1
    assert live.path.exists() and not dead.path.exists()
    cache.discard(live)


def test_eviction_is_lru_and_spares_what_is_open(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c", max_bytes=2500)
    for i, vid in enumerate(["old", "held", "mid", "new"]):
        publish(cache, vid, bytes(1000))
        past = time.time() - 1000 + i * 100
        os.utime(cache.versions / vid, (past, past))
    cache = Cache(cache.root, max_bytes=2500)  # another process: it knows only the mtimes
    held = cache.open_entry("held")  # a reader holds it open
    assert held is not None
    os.utime(cache.versions / "held", (time.time() - 1000, time.time() - 1000))
    cache._used.clear()
    cache.evict()
    remaining = sorted(p.name for p in cache.versions.iterdir())
    assert remaining == ["held", "new"]
    assert cache.usage() <= 2500 + 1000  # over the cap only by what is open
    os.close(held.fd)
    cache.evict(max_bytes=0)
    assert list(cache.versions.iterdir()) == []


def test_eviction_keeps_named_versions(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c", max_bytes=0)
    publish(cache, "a", b"1" * 100)
    publish(cache, "b", b"2" * 100)
    cache.evict(keep=frozenset({"a"}))
    assert [p.name for p in cache.versions.iterdir()] == ["a"]


def test_use_in_this_process_orders_eviction(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c", max_bytes=2500)  # two entries fit, not three
    for vid in ("a", "b"):
        publish(cache, vid, bytes(1000))
    cache.touch("a")  # used after b: b is now the least recently used
    publish(cache, "c", bytes(1000))
    cache.evict()
    assert sorted(p.name for p in cache.versions.iterdir()) == ["a", "c"]


def test_usage_follows_entries_added_removed_and_changed_in_place(
        tmp_path: Path, monkeypatch: Any) -> None:
    """Sizes are remembered by folder between checks of the cap; a folder that changes is
    counted again, and a file changed in place (its folder untouched) within SIZE_MEMO_AGE."""
    cache = Cache(tmp_path / "cache")
    publish(cache, "v1", b"a" * 1000)
    publish(cache, "v2", b"b" * 3000)
    first = cache.usage()
    assert cache.usage() == first  # from the memo
    publish(cache, "v3", b"c" * 500)
    third = cache.usage() - first
    assert third >= 500
    for name in os.listdir(cache.versions / "v2"):  # as `rm -rf` by hand would
        os.unlink(cache.versions / "v2" / name)
    os.rmdir(cache.versions / "v2")
    assert cache.usage() < first + third - 3000 + 1
    data = cache.versions / "v1" / "data.tar"
    before = cache.usage()
    size = data.stat().st_size
    os.truncate(data, 0)  # damaged in place: the folder's stat does not change
    monkeypatch.setattr(vm0fs.cache, "SIZE_MEMO_AGE", 0.0)
    assert cache.usage() == before - size
