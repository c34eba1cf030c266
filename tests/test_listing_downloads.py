"""Downloads that only listings asked for (a file manager counting the items of each version
folder): bounded and queued, never ahead of a lookup or a read, and reported once as a burst.
Driven like tests/test_fs.py: fs.Operations with a fake API client, no kernel."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio
from test_fs import FakeClient, Harness, open_mode, run, tar_gz  # noqa: F401 - both modes

from vm0fs.namespace import FOLLOW_WINDOW
from vm0fs.versions import BURST_GAP, GNOME_SETTING, ListingBurst


class GatedClient(FakeClient):
    """Every download waits for its version's gate after the first chunk, and the client
    records which versions started, in order, and the most that ran at once."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[str, trio.Event] = {}
        self.started: list[str] = []
        self.active = 0
        self.peak = 0

    def hold(self, *version_ids: str) -> None:
        for vid in version_ids:
            self.gates[vid] = trio.Event()

    def release(self, version_id: str) -> None:
        self.gates[version_id].set()

    async def download(self, artifact_id: str, version_id: str | None = None
                       ) -> AsyncIterator[bytes]:
        assert version_id is not None
        self.started.append(version_id)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            first = True
            async for chunk in super().download(artifact_id, version_id):
                yield chunk
                if first and version_id in self.gates:
                    await self.gates[version_id].wait()
                first = False
        finally:
            self.active -= 1


@pytest.fixture(autouse=True)
def concurrent_readdir(monkeypatch: pytest.MonkeyPatch) -> None:
    """readdir replies go into the dict passed as the token (Harness.listdir swaps the
    function for the time of one call, which concurrent listings would undo)."""

    def reply(token: dict[str, Any], name: bytes, attrs: Any, next_id: int) -> bool:
        token[os.fsdecode(name)] = attrs
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)


async def listdir(h: Harness, path: str) -> set[str]:
    """`ls`, safe to run in several tasks at once."""
    inode = (await h.resolve(path)).st_ino
    fh = await h.opendir(inode)
    entries: dict[str, Any] = {}
    try:
        await h.ops.readdir(inode if fh is None else fh, 0, entries)
    finally:
        if fh is not None:
            await h.ops.releasedir(fh)
    return set(entries) - {".", ".."}


def archives(n: int) -> list[bytes]:
    return [tar_gz({"README.md": f"version {i}\n".encode(), "data.bin": os.urandom(20_000)})
            for i in range(n)]


async def until(condition: object, what: str) -> None:
    """Let the other tasks run until `condition()` holds (bounded by run()'s fail_after)."""
    while not condition():  # type: ignore[operator]
        await trio.sleep(0.005)


def test_listings_download_one_at_a_time_newest_first(tmp_path: Path) -> None:
    client = GatedClient()
    ids = client.add("a1", "reports", archives(4))
    client.hold(*ids)

    async def test(h: Harness) -> None:
        listed: dict[str, set[str]] = {}

        async def count(vid: str) -> None:  # what a file manager does for an item count
            listed[vid] = (await listdir(h, f"artifacts/reports/{vid}"))

        async with trio.open_nursery() as nursery:
            for n, vid in enumerate(ids):
                nursery.start_soon(count, vid)
                await until(lambda n=n: h.store.listing_only == n + 1, "asked, in this order")
            await until(lambda: len(client.started) == 1 and h.store.listing_queue == 3, "queued")
            assert client.started == [ids[0]]
            status = json.loads(await h.read(".vm0fs/status.json"))
            assert status["listing_only_downloads"] == {"total": 4, "queued": 3, "at_once": 4}
            for step in range(3):
                client.release(client.started[-1])
                await until(lambda n=step: len(client.started) == n + 2, "next")
            client.release(client.started[-1])
        # The first came first; then the newest request went next.
        assert client.started == [ids[0], ids[3], ids[2], ids[1]]
        assert client.peak == 1 and h.store.listing_queue == 0
        assert all(names == {"README.md", "data.bin"} for names in listed.values())
        assert len(listed) == 4

    run(tmp_path, client, test)


def test_listings_of_many_artifacts_run_side_by_side(tmp_path: Path) -> None:
    """A sweep (`rg` over artifacts/*/current/) lists one version of each of many artifacts:
    those run side by side, up to the bound, while a second version of one artifact (what a
    file manager's item count lists) waits for the first."""
    client = GatedClient()
    sweep = [client.add(f"a{i}", f"run-{i}", archives(1))[0] for i in range(6)]
    first, extra = client.add("b", "reports", archives(2))
    client.hold(*sweep, first, extra)

    async def test(h: Harness) -> None:
        listed: dict[str, set[str]] = {}

        async def count(path: str) -> None:
            listed[path] = await listdir(h, path)

        async with trio.open_nursery() as nursery:
            for i, vid in enumerate(sweep[:3]):
                nursery.start_soon(count, f"artifacts/run-{i}/{vid}")
            await until(lambda: len(client.started) == 3, "three artifacts side by side")
            nursery.start_soon(count, f"artifacts/reports/{first}")
            await until(lambda: len(client.started) == 4, "a fourth artifact")
            nursery.start_soon(count, f"artifacts/reports/{extra}")
            for i, vid in enumerate(sweep[3:], start=3):
                nursery.start_soon(count, f"artifacts/run-{i}/{vid}")
            await until(lambda: h.store.listing_queue == 4, "the rest queue")
            assert client.peak == 4 and extra not in client.started
            for vid in list(client.gates):
                client.release(vid)
        assert client.peak == 4 and len(listed) == 8

    run(tmp_path, client, test)


def test_following_current_fetches_ahead_in_the_order_asked(tmp_path: Path) -> None:
    """`artifacts/*/current/` in a shell looks up `current`, then the folder it names, in each
    artifact before the command reads any: in three artifacts or more in a row, those
    downloads start ahead, behind any listing; a lookup of a version by its id alone fetches
    nothing, and so does following one artifact's `current` (a file manager drawing it)."""
    client = GatedClient()
    ids = [client.add(f"a{i}", f"run-{i}", archives(1))[0] for i in range(7)]
    other = client.add("b", "reports", archives(1))[0]
    client.hold(*ids, other)

    async def test(h: Harness) -> None:
        await h.lookup(f"artifacts/reports/{other}")  # by id: no download
        await h.resolve("artifacts/reports/current")
        await trio.sleep(0.05)
        assert client.started == []
        await trio.sleep(FOLLOW_WINDOW)  # not in a row with what follows
        for i in range(7):
            await h.resolve(f"artifacts/run-{i}/current")
        await until(lambda: len(client.started) == 4, "four ahead")
        assert set(client.started) == set(ids[:4])  # those followed first (trio picks the order)
        await until(lambda: h.store.listing_queue == 3, "three wait")
        listed: set[str] | None = None
        async with trio.open_nursery() as nursery:
            async def count() -> None:
                nonlocal listed
                listed = await listdir(h, f"artifacts/run-6/{ids[6]}")
            nursery.start_soon(count)  # listed now: it goes before those fetched ahead
            await until(lambda: h.store.listing_queue == 3, "still queued")
            client.release(ids[0])
            await until(lambda: len(client.started) == 5, "the next")
            assert client.started[4] == ids[6]
            for vid in ids:
                client.release(vid)
        assert listed == {"README.md", "data.bin"}
        await until(lambda: len(client.started) == 7, "all of them")
        assert client.started[4] == ids[6] and set(client.started[5:]) == {ids[4], ids[5]}
        assert other not in client.started

    run(tmp_path, client, test)


def test_lookups_and_reads_do_not_wait_for_listings(tmp_path: Path) -> None:
    client = GatedClient()
    ids = client.add("a1", "reports", archives(3))
    client.hold(*ids)

    async def test(h: Harness) -> None:
        async with trio.open_nursery() as nursery:
            for n, vid in enumerate(ids[:2]):
                nursery.start_soon(listdir, h, f"artifacts/reports/{vid}")
                await until(lambda n=n: h.store.listing_only == n + 1, "asked, in this order")
            await until(lambda: client.started == [ids[0]], "v0 downloading")
            assert h.store.listing_queue == 1

            # A path named inside a queued version: it leaves the queue and starts now.
            client.release(ids[1])
            assert (await h.read(f"artifacts/reports/{ids[1]}/README.md")) == b"version 1\n"
            assert client.started == [ids[0], ids[1]] and h.store.listing_queue == 0
            # A path named inside a version nobody listed: no slot needed either.
            client.release(ids[2])
            assert (await h.read(f"artifacts/reports/{ids[2]}/README.md")) == b"version 2\n"
            assert client.started == ids
            assert h.store.states[("a1", ids[0])].loading  # the listing's download still runs
            client.release(ids[0])
        assert h.store.listing_only == 2  # v1 was counted when it queued
        assert h.store.bursts.notice is None  # v1 was read: not a burst of listings

    run(tmp_path, client, test)


def test_listing_a_version_whose_data_was_released_downloads_nothing(tmp_path: Path) -> None:
    client = FakeClient()
    (vid,) = client.add("a1", "one", [tar_gz({"f": os.urandom(50_000)})])
    client.add("a2", "two", [tar_gz({"g": os.urandom(100_000)})])

    async def test(h: Harness) -> None:
        await listdir(h, "artifacts/one/current")
        await h.read("artifacts/two/current/g")
        await listdir(h, "artifacts/two/current")
        await h.store.enforce_cache_size()  # over the cap: "one" is idle, its data goes
        state = h.store.states[("a1", vid)]
        assert state.fd is None
        assert (await listdir(h, "artifacts/one/current")) == {"f"}
        assert (await h.resolve("artifacts/one/current/f")).st_size == 50_000
        assert client.downloads == 2 and state.fd is None  # the tree is enough
        assert len(await h.read("artifacts/one/current/f")) == 50_000
        assert client.downloads == 3  # a read brings the data back

    run(tmp_path, client, test, cache_size=120_000)


def test_a_burst_of_listing_only_downloads_is_reported_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    client = FakeClient()
    ids = client.add("a1", "reports", archives(5))
    others = client.add("a2", "logs", archives(3))

    async def test(h: Harness) -> None:
        for vid in ids[:2]:
            await listdir(h, f"artifacts/reports/{vid}")
            await h.lookup(f"artifacts/reports/{vid}/README.md")  # `ls -l`: the tree answers
        assert h.store.bursts.notice is None
        await listdir(h, f"artifacts/reports/{ids[2]}")
        notice = h.store.bursts.notice
        assert notice is not None and notice["artifact"] == "reports"
        assert notice["versions"] == 3 and notice["fix"] == GNOME_SETTING
        for vid in [*ids[3:], *others]:
            await listdir(h, f"artifacts/{'reports' if vid in ids else 'logs'}/{vid}")
        status = json.loads(await h.read(".vm0fs/status.json"))
        assert status["notice"]["artifact"] == "logs"  # the latest run; logged only once
        assert status["notice"]["fix"] == GNOME_SETTING
        assert status["listing_only_downloads"]["total"] == 8
        text = (await h.read(".vm0fs/status")).decode()
        assert "notice:" in text and GNOME_SETTING in text
        assert "listing-only:   8 download(s)" in text

    with caplog.at_level(logging.WARNING, logger="vm0fs.versions"):
        run(tmp_path, client, test)
    said = [r.getMessage() for r in caplog.records if GNOME_SETTING in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("artifacts/reports: 3 versions in a row")


def test_burst_detection_needs_a_run_of_unused_versions(
        caplog: pytest.LogCaptureFixture) -> None:
    burst = ListingBurst()
    # Two artifacts interleaved: two versions each is not a burst.
    for t, (artifact, version) in enumerate([("a", "a0"), ("b", "b0"), ("a", "a1"),
                                             ("b", "b1")]):
        burst.listed(artifact, version, now=float(t))
    assert burst.notice is None
    # A pause longer than the gap starts a new run, counted from the last download's end.
    burst.ended("a", "a1", now=5.0)
    burst.listed("a", "a2", now=5.0 + BURST_GAP + 1)
    burst.listed("a", "a3", now=6.0 + BURST_GAP)
    assert burst.notice is None
    # A version of the run that was used (looked into or read) breaks it.
    burst.used("a", "a2")
    burst.listed("a", "a4", now=7.0 + BURST_GAP)
    burst.listed("a", "a5", now=8.0 + BURST_GAP)
    assert burst.notice is None
    with caplog.at_level(logging.WARNING, logger="vm0fs.versions"):
        burst.listed("a", "a6", now=9.0 + BURST_GAP)
        assert burst.notice is not None and burst.notice["versions"] == 3
        assert burst.notice["artifact_id"] == "a"
        # Later runs update what `vm0fs status` shows, and are not logged again.
        for n, version in enumerate(["b2", "b3", "b4"]):
            burst.listed("b", version, now=10.0 + BURST_GAP + n)
    assert burst.notice["artifact_id"] == "b"
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["artifacts/a"]


def test_unmount_while_listings_wait_in_the_queue(tmp_path: Path) -> None:
    client = GatedClient()
    ids = client.add("a1", "reports", archives(3))
    client.hold(*ids)

    async def test(h: Harness) -> None:
        async with trio.open_nursery() as nursery:
            for vid in ids:
                nursery.start_soon(listdir, h, f"artifacts/reports/{vid}")
            await until(lambda: h.store.listing_queue == 2, "queued")
            assert h.store._nursery is not None
            h.store._nursery.cancel_scope.cancel()  # what unmounting does to the loads
            await until(lambda: not any(s.loading for s in h.store.states.values()), "ended")
            assert h.store.listing_queue == 0 and h.store._listing_running == 0
            nursery.cancel_scope.cancel()  # and the kernel gives up on the listings

    run(tmp_path, client, test)
