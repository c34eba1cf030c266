"""Listings at scale, through real mounts: opening an artifact's folder costs that artifact's
record and versions, never a walk of the artifact list; after the TTL the last list answers
while a walk of many pages runs, and what it brings shows once it ends; the mount's own check is
the first page of the first walk. Requests are counted with the dev-server's /_dev/stats."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import archives
import pytest
from conftest import DevServer
from mounting import MountFactory

pytest_plugins = ["mounting"]
pytestmark = pytest.mark.timeout(120)

EPOCH = datetime(2024, 1, 1, tzinfo=UTC).timestamp()
TTL = 2.0


def add_version(data_dir: Path, folder: str, data: bytes, created: float, file: str) -> str:
    """An archive in an artifact's folder (created_at is its mtime); returns the version id."""
    path = data_dir / folder
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".{file}.tmp"  # not *.tar.gz: the server never sees it half-written
    tmp.write_bytes(data)
    os.utime(tmp, (created, created))
    os.replace(tmp, path / file)
    return hashlib.sha256(data).hexdigest()


def many(data_dir: Path, n: int) -> None:
    for i in range(n):
        add_version(data_dir, f"bulk-{i:03d}", archives.tiny(i), EPOCH + i, "v1.tar.gz")


def poll(fn: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not fn():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.1)


def past_the_ttl() -> None:
    time.sleep(TTL + 0.5)


def test_a_fresh_mount_walks_the_list_once_from_its_first_page(
        dev_server: Callable[..., DevServer], mount_vm0fs: MountFactory, tmp_path: Path) -> None:
    many(tmp_path / "data", 250)
    srv = dev_server(tmp_path / "data")
    m = mount_vm0fs(srv)
    assert len(m.run(os.listdir, m.artifacts)) == 250
    # The mount's check was the first page; the walk went on from the second.
    assert srv.stats()["requests"]["list_artifacts"] == 3


def test_opening_a_folder_after_the_ttl_costs_its_record_and_versions(
        dev_server: Callable[..., DevServer], mount_vm0fs: MountFactory, tmp_path: Path) -> None:
    data = tmp_path / "data"
    many(data, 130)  # two pages
    srv = dev_server(data)
    m = mount_vm0fs(srv, "--metadata-ttl", str(TTL))
    assert len(m.run(os.listdir, m.artifacts)) == 130
    folder = m.artifacts / "bulk-007"
    v1 = hashlib.sha256(archives.tiny(7)).hexdigest()
    assert sorted(m.run(os.listdir, folder)) == sorted(["current", "history", v1])

    v2 = add_version(data, "bulk-007", archives.tiny(1007), EPOCH + 5000, "v2.tar.gz")
    shutil.rmtree(data / "bulk-003")
    past_the_ttl()
    srv.reset()
    assert sorted(m.run(os.listdir, folder)) == sorted(["current", "history", v1, v2])
    assert m.run(os.readlink, folder / "current") == v2
    counts = srv.stats()["requests"]
    assert counts["list_artifacts"] == 0, counts
    assert counts["get_artifact"] <= 1 and counts["list_versions"] <= 1, counts

    # An artifact deleted since the last walk: its own record says so, no walk needed.
    srv.reset()
    assert not m.run(os.path.exists, m.artifacts / "bulk-003")
    counts = srv.stats()["requests"]
    assert counts["list_artifacts"] == 0 and counts["get_artifact"] == 1, counts


def test_after_the_ttl_the_last_list_answers_while_the_walk_runs(
        dev_server: Callable[..., DevServer], mount_vm0fs: MountFactory, tmp_path: Path) -> None:
    data = tmp_path / "data"
    many(data, 130)  # two pages
    srv = dev_server(data)
    m = mount_vm0fs(srv, "--metadata-ttl", str(TTL))
    assert len(m.run(os.listdir, m.artifacts)) == 130

    add_version(data, "new-one", archives.tiny(999), EPOCH + 9000, "v1.tar.gz")  # on page 1
    past_the_ttl()
    srv.set_faults(latency_ms=500)  # the walk's second page comes half a second later
    srv.reset()
    first = m.run(os.listdir, m.artifacts)
    assert len(first) == 130 and "new-one" not in first  # the last list, not the walk's end
    assert not m.run(os.path.exists, m.artifacts / "new-one")
    poll(lambda: "new-one" in m.run(os.listdir, m.artifacts), 15, "the walk's new artifact")
    # A miss answered while the walk ran was not cached by the kernel.
    assert m.run(os.path.exists, m.artifacts / "new-one")
    srv.set_faults(latency_ms=0)
    assert srv.stats()["requests"]["list_artifacts"] == 2  # one walk, its two pages


def test_a_change_shows_within_the_ttl_plus_one_walk(
        dev_server: Callable[..., DevServer], mount_vm0fs: MountFactory, tmp_path: Path) -> None:
    """A listing's age counts from the walk's first request: an artifact added just after a
    walk read its first page shows within the TTL plus one walk (plus slack for a busy
    machine), where counting from the walk's end would take a second TTL."""
    data = tmp_path / "data"
    many(data, 250)  # three pages
    ttl, latency = 4.0, 0.5
    walk = 3 * latency  # three pages, one after another
    srv = dev_server(data)
    m = mount_vm0fs(srv, "--metadata-ttl", str(ttl))
    assert len(m.run(os.listdir, m.artifacts)) == 250
    srv.set_faults(latency_ms=latency * 1000)
    srv.reset()

    def second_page_asked() -> bool:  # page 1 is answered: this walk misses what comes now
        m.run(os.listdir, m.artifacts)
        return srv.stats()["requests"]["list_artifacts"] >= 2

    poll(second_page_asked, ttl + walk + 15, "a walk of the list")
    add_version(data, "new-one", archives.tiny(999), EPOCH + 9000, "v1.tar.gz")  # on page 1
    added = time.monotonic()
    poll(lambda: "new-one" in m.run(os.listdir, m.artifacts), ttl + walk + 2.0,
         "the new artifact within the TTL plus one walk")
    srv.set_faults(latency_ms=0)
    assert time.monotonic() - added > ttl - walk  # it was missed by the walk under way
