"""Listings: TTL, one walk for many callers, last known answers while the API is slow or down."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio

from vm0fs.api import ApiClient, Artifact, Page, Version
from vm0fs.errors import NotFound, Unauthorized, Unavailable
from vm0fs.meta import Listings
from vm0fs.mount import _check_access


def artifact(aid: str) -> Artifact:
    return Artifact(aid, aid, None, 0, 0, 0.0, 0.0, None)


class SlowClient:
    def __init__(self) -> None:
        self.artifacts = [artifact("a")]
        self.calls = 0
        self.hang = trio.Event()  # set: answer at once; not set while `hanging`
        self.hanging = False
        self.error: Exception | None = None

    async def list_artifacts(self, on_more: object = None) -> list[Artifact]:
        self.calls += 1
        if self.hanging:
            await self.hang.wait()
        if self.error:
            raise self.error
        return list(self.artifacts)

    async def list_versions(self, artifact_id: str, on_more: object = None) -> list[Version]:
        return []


def run(test: object) -> None:
    async def main() -> None:
        with trio.fail_after(20):
            await test()  # type: ignore[operator]

    trio.run(main)


def test_one_walk_for_many_callers_and_the_ttl() -> None:
    client = SlowClient()
    now = [0.0]
    listings = Listings(client, ttl=60, clock=lambda: now[0])

    async def test() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(listings.artifacts)
        assert client.calls == 1
        now[0] = 59.0
        await listings.artifacts()
        assert client.calls == 1
        now[0] = 61.0
        client.artifacts.append(artifact("b"))
        assert [a.id for a in await listings.artifacts()] == ["a", "b"]
        assert client.calls == 2

    run(test)


def test_a_hanging_api_answers_with_the_last_known_listing(tmp_path: Path) -> None:
    client = SlowClient()
    listings = Listings(client, ttl=0.01, store=tmp_path)
    listings.stale_after = 0.2

    async def test() -> None:
        async with trio.open_nursery() as nursery:
            listings.nursery = nursery
            assert [a.id for a in await listings.artifacts()] == ["a"]
            await trio.sleep(0.05)  # past the TTL
            client.hanging = True
            client.artifacts.append(artifact("b"))
            with trio.fail_after(5):
                assert [a.id for a in await listings.artifacts()] == ["a"]  # stale, at once
            assert listings.stale
            client.hang.set()  # the refresh behind it completes
            await trio.sleep(0.05)
            assert [a.id for a in await listings.artifacts()] == ["a", "b"]
            assert not listings.stale

    run(test)


def test_offline_serves_known_listings_and_backs_off(tmp_path: Path) -> None:
    client = SlowClient()
    now = [0.0]
    listings = Listings(client, ttl=1, store=tmp_path, clock=lambda: now[0])

    async def test() -> None:
        await listings.artifacts()
        now[0] = 5.0
        client.error = Unavailable("down")
        assert [a.id for a in await listings.artifacts()] == ["a"]
        assert listings.offline and listings.stale
        calls = client.calls
        await listings.artifacts()  # within the back-off: no request at all
        assert client.calls == calls
        # A new process over the same store knows the listing too.
        fresh = Listings(client, ttl=1, store=tmp_path, clock=lambda: now[0])
        assert [a.id for a in await fresh.artifacts()] == ["a"]
        client.error = Unauthorized("revoked")
        now[0] = 100.0
        with pytest.raises(Unauthorized):
            await listings.artifacts()

    run(test)


def test_never_fetched_listing_fails_when_offline() -> None:
    client = SlowClient()
    client.error = Unavailable("down")
    listings = Listings(client, ttl=1)

    async def test() -> None:
        with pytest.raises(Unavailable):
            await listings.artifacts()

    run(test)


# --- listings at scale: pages, an artifact's own record, stale-while-revalidate ---------------


class PagedClient:
    """An API of `artifacts` in pages of `per_page` (the cursor is the next index). `gate`, when
    set, holds every page but the first until it is set. `requests` records every request."""

    def __init__(self, n: int, per_page: int = 2) -> None:
        self.artifacts = [artifact(f"a{i}") for i in range(n)]
        self.versions: dict[str, list[Version]] = {}
        self.per_page = per_page
        self.requests: list[str] = []
        self.gate: trio.Event | None = None
        self.error: Exception | None = None

    async def artifacts_page(self, cursor: str | None = None) -> Page[Artifact]:
        self.requests.append(f"page {cursor or 0}")
        start = int(cursor or 0)
        if start and self.gate is not None:
            await self.gate.wait()
        if self.error:
            raise self.error
        end = start + self.per_page
        return Page(self.artifacts[start:end], str(end) if end < len(self.artifacts) else None)

    async def list_artifacts(self, first: Page[Artifact] | None = None,
                             on_more: Callable[[], None] | None = None) -> list[Artifact]:
        found: dict[str, Artifact] = {}
        page = first or await self.artifacts_page()
        while True:
            for item in page.items:
                found.setdefault(item.id, item)
            if page.cursor is None:
                return list(found.values())
            if on_more is not None:
                on_more()
            page = await self.artifacts_page(page.cursor)

    async def list_versions(self, artifact_id: str,
                            on_more: Callable[[], None] | None = None) -> list[Version]:
        self.requests.append(f"versions {artifact_id}")
        if self.error:
            raise self.error
        return list(self.versions.get(artifact_id, []))

    async def get_artifact(self, artifact_id: str) -> Artifact:
        self.requests.append(f"artifact {artifact_id}")
        if self.error:
            raise self.error
        for found in self.artifacts:
            if found.id == artifact_id:
                return found
        raise NotFound(f"No such artifact: '{artifact_id}'")


def ids(artifacts: list[Artifact]) -> list[str]:
    return [a.id for a in artifacts]


async def until(condition: Callable[[], bool]) -> None:
    while not condition():  # bounded by run()'s fail_after
        await trio.sleep(0.01)


def test_probe_is_one_request_and_the_walk_goes_on_from_the_second_page() -> None:
    client = PagedClient(7, per_page=2)
    listings = Listings(client, ttl=60)

    async def test() -> None:
        await listings.probe()
        assert client.requests == ["page 0"]
        async with trio.open_nursery() as nursery:
            listings.start(nursery)
            assert ids(await listings.artifacts()) == [f"a{i}" for i in range(7)]
        assert client.requests == ["page 0", "page 2", "page 4", "page 6"]

    run(test)


def test_probe_of_a_one_page_list_is_the_whole_listing() -> None:
    client = PagedClient(3, per_page=100)
    listings = Listings(client, ttl=60)

    async def test() -> None:
        await listings.probe()
        async with trio.open_nursery() as nursery:
            listings.start(nursery)
            assert ids(await listings.artifacts()) == ["a0", "a1", "a2"]
        assert client.requests == ["page 0"]

    run(test)


def test_mount_check_makes_one_request_however_long_the_list(tmp_path: Path) -> None:
    pages: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        cursor = request.url.params.get("cursor")
        pages.append(cursor)
        start = int(cursor or 0)
        data = [{"id": f"{i}", "name": f"n{i}"} for i in range(start, start + 100)]
        return httpx.Response(200, json={"data": data, "pagination": {
            "has_more": start + 100 < 5000, "next_cursor": str(start + 100)}})

    async def test() -> None:
        async with ApiClient("http://api.test", "key",
                             transport=httpx.MockTransport(handler)) as client:
            listings = Listings(client, ttl=60, store=tmp_path)
            await _check_access(listings, "http://api.test")
            assert pages == [None]
            async with trio.open_nursery() as nursery:
                listings.start(nursery)
                assert len(await listings.artifacts()) == 5000
            assert pages == [None] + [str(n) for n in range(100, 5000, 100)]  # 50, in order

    run(test)


def test_after_the_ttl_a_walk_of_many_pages_is_not_waited_for() -> None:
    client = PagedClient(5, per_page=2)
    now = [0.0]
    listings = Listings(client, ttl=10, clock=lambda: now[0])
    listings.stale_after = 1000.0  # only "the walk needs more pages" may end a wait

    async def test() -> None:
        async with trio.open_nursery() as nursery:
            listings.start(nursery)
            first = await listings.artifacts()  # nothing known: the whole walk
            assert ids(first) == ["a0", "a1", "a2", "a3", "a4"]
            now[0] = 11.0
            client.artifacts.insert(0, artifact("new"))
            client.gate = trio.Event()  # the walk stops at its second page
            assert await listings.artifacts() is first  # the last listing, at once
            assert listings.artifacts_refreshing and not listings.stale
            assert await listings.artifacts() is first  # and again: one walk for both
            await until(lambda: len(client.requests) == 5)  # the walk, held at its page 2
            assert client.requests == ["page 0", "page 2", "page 4", "page 0", "page 2"]
            client.gate.set()
            await until(lambda: not listings.artifacts_refreshing)
            assert ids(await listings.artifacts())[0] == "new"
            count = len(client.requests)
            await listings.artifacts()  # fresh for the TTL from the end of the walk
            assert len(client.requests) == count
            nursery.cancel_scope.cancel()

    run(test)


def test_a_list_that_grows_past_one_page_is_waited_for_until_its_first_page() -> None:
    client = PagedClient(2, per_page=2)
    now = [0.0]
    listings = Listings(client, ttl=10, clock=lambda: now[0])
    listings.stale_after = 1000.0

    async def test() -> None:
        async with trio.open_nursery() as nursery:
            listings.start(nursery)
            first = await listings.artifacts()  # one page
            now[0] = 11.0
            client.artifacts.append(artifact("new"))
            client.gate = trio.Event()
            assert await listings.artifacts() is first  # its first page said "more"
            assert client.requests == ["page 0", "page 0", "page 2"]
            client.gate.set()
            await until(lambda: not listings.artifacts_refreshing)
            assert ids(await listings.artifacts()) == ["a0", "a1", "new"]
            nursery.cancel_scope.cancel()

    run(test)


def test_after_the_ttl_a_one_page_refresh_answers_at_that_access() -> None:
    client = PagedClient(2, per_page=100)
    now = [0.0]
    listings = Listings(client, ttl=10, clock=lambda: now[0])

    async def test() -> None:
        async with trio.open_nursery() as nursery:
            listings.start(nursery)
            assert ids(await listings.artifacts()) == ["a0", "a1"]
            assert await listings.versions("a0") == []
            now[0] = 11.0
            client.artifacts.append(artifact("new"))
            client.versions["a0"] = [Version("v1", "a0", 0, 1, None, None, 0.0)]
            assert ids(await listings.artifacts()) == ["a0", "a1", "new"]
            assert [v.id for v in await listings.versions("a0")] == ["v1"]
            assert client.requests == ["page 0", "versions a0", "page 0", "versions a0"]
            nursery.cancel_scope.cancel()

    run(test)


def test_an_artifact_record_comes_from_the_list_or_its_own_request(tmp_path: Path) -> None:
    client = PagedClient(3, per_page=100)
    now = [0.0]
    listings = Listings(client, ttl=10, store=tmp_path, clock=lambda: now[0])

    async def test() -> None:
        listed = await listings.artifacts()
        assert await listings.artifact("a1") == listed[1]  # fresh from the list: no request
        assert client.requests == ["page 0"]
        now[0] = 11.0
        moved = dataclasses.replace(listed[1], current_version_id="v2", updated_at=5.0)
        client.artifacts[1] = moved
        assert await listings.artifact("a1") == moved  # its own record: one request
        assert client.requests == ["page 0", "artifact a1"]
        assert listings.newest(listed[1]) == moved and listings.newest(listed[0]) == listed[0]
        del client.artifacts[2]
        now[0] = 22.0
        assert await listings.artifact("a2") is None  # gone
        assert listings.newest(listed[2]) is None
        assert client.requests == ["page 0", "artifact a1", "artifact a2"]
        # A new process over the same store, with the API down, knows both records.
        client.error = Unavailable("down")
        again = Listings(client, ttl=10, store=tmp_path, clock=lambda: now[0])
        assert await again.artifacts() == [listed[0], moved]
        # A walk that began after the records were asked for supersedes them.
        client.error = None
        now[0] = 40.0
        walked = await listings.artifacts()
        assert walked == [listed[0], moved] and listings.newest(walked[1]) is walked[1]
        assert not list(tmp_path.glob("artifact-*.json"))

    run(test)


def test_a_refresh_behind_the_last_listing_that_fails_reaches_the_next_access() -> None:
    client = PagedClient(5, per_page=2)
    now = [0.0]
    listings = Listings(client, ttl=10, clock=lambda: now[0])

    async def test() -> None:
        async with trio.open_nursery() as nursery:
            listings.start(nursery)
            first = await listings.artifacts()
            now[0] = 11.0
            client.gate = trio.Event()
            assert await listings.artifacts() is first
            client.error = Unauthorized("revoked")
            client.gate.set()
            await until(lambda: not listings.artifacts_refreshing)
            with pytest.raises(Unauthorized):
                await listings.artifacts()
            nursery.cancel_scope.cancel()

    run(test)


def test_refreshes_run_side_by_side_but_the_pages_of_a_walk_in_order() -> None:
    log: list[tuple[str, str | None]] = []
    in_flight = [0, 0]  # now, most

    async def handler(request: httpx.Request) -> httpx.Response:
        path, cursor = request.url.path, request.url.params.get("cursor")
        log.append((path, cursor))
        in_flight[0] += 1
        in_flight[1] = max(in_flight)
        await trio.sleep(0.01)
        in_flight[0] -= 1
        if path == "/v1/artifacts":
            start = int(cursor or 0)
            data = [{"id": f"{i}", "name": f"n{i}"} for i in range(start, min(start + 100, 350))]
            return httpx.Response(200, json={"data": data, "pagination": {
                "has_more": start + 100 < 350, "next_cursor": str(start + 100)}})
        return httpx.Response(200, json={"data": [], "pagination": {"has_more": False}})

    async def test() -> None:
        async with ApiClient("http://api.test", "key",
                             transport=httpx.MockTransport(handler)) as client:
            listings = Listings(client, ttl=60, concurrency=3)
            async with trio.open_nursery() as nursery:
                listings.start(nursery)
                nursery.start_soon(listings.artifacts)
                for i in range(8):
                    nursery.start_soon(listings.versions, f"{i}")
        walk = [cursor for path, cursor in log if path == "/v1/artifacts"]
        assert walk == [None, "100", "200", "300"]
        assert sum(path.endswith("/versions") for path, _ in log) == 8
        assert 1 < in_flight[1] <= 3

    run(test)


class TimedWalk(SlowClient):
    """A walk of two pages; the clock moves on by `page_time` for each page read."""

    def __init__(self, now: list[float], page_time: float) -> None:
        super().__init__()
        self.now, self.page_time = now, page_time

    async def artifacts_page(self, cursor: str | None = None) -> Page[Artifact]:
        self.now[0] += self.page_time
        return Page([artifact("a")], "a")

    async def list_artifacts(self, first: Page[Artifact] | None = None,
                             on_more: Callable[[], None] | None = None) -> list[Artifact]:
        self.calls += 1
        if first is None:
            self.now[0] += self.page_time  # page 1
        if on_more is not None:
            on_more()
        self.now[0] += self.page_time  # page 2
        return list(self.artifacts)


@pytest.mark.parametrize("probed", [False, True])
def test_a_listings_age_counts_from_its_first_request(probed: bool) -> None:
    """A walk that read its first page at t=0 and ended at t=20 is stale at TTL = 30, not at
    50: a change made on the server after page 1 shows within the TTL plus one walk."""
    now = [0.0]
    client = TimedWalk(now, page_time=10.0)
    listings = Listings(client, ttl=30, clock=lambda: now[0])

    async def test() -> None:
        if probed:  # the mount's start-up check read page 1; the walk goes on from it
            await listings.probe()
            async with trio.open_nursery() as nursery:
                listings.start(nursery)
            listings.nursery = None  # from here on, refreshes run in the caller
        await listings.artifacts()
        assert now[0] == 20.0 and client.calls == 1
        now[0] = 29.0
        await listings.artifacts()
        assert client.calls == 1  # fresh: 29 s after the walk's first request
        now[0] = 31.0
        client.artifacts.append(artifact("b"))
        assert [a.id for a in await listings.artifacts()] == ["a", "b"]
        assert client.calls == 2

    run(test)
