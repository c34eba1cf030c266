"""Listings: TTL, one walk for many callers, last known answers while the API is slow or down."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from vm0fs.api import Artifact, Version
from vm0fs.errors import Unauthorized, Unavailable
from vm0fs.meta import Listings


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
