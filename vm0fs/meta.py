"""Listings of artifacts and versions: cached for the metadata TTL, refreshed by one request walk
however many callers wait, and kept as the last known answer (in memory and on disk) so that a
mount goes on showing what it knew while the API is unreachable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import cachetools
import trio

from vm0fs.api import Artifact, Version
from vm0fs.errors import Unavailable

log = logging.getLogger("vm0fs.meta")

OFFLINE_BACKOFF = 10.0  # seconds to serve stale listings without asking again after a failure
STALE_AFTER = 2.0  # seconds a refresh may take before the last known listing answers instead

T = TypeVar("T")


class ListingClient(Protocol):
    async def list_artifacts(self) -> list[Artifact]: ...
    async def list_versions(self, artifact_id: str) -> list[Version]: ...


def listing_namespace(api_url: str, api_key: str) -> str:
    """Where one account's listings are kept: different keys may see different artifacts."""
    return hashlib.sha256(f"{api_url}\0{api_key}".encode()).hexdigest()[:16]


def _artifact_from_dict(raw: dict[str, Any]) -> Artifact:
    current = raw.get("current_version")
    return Artifact(**{**raw, "current_version": Version(**current) if current else None})


class _Refresh:
    """One listing request walk under way, and its outcome."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: list[Any] = []
        self.error: Exception | None = None


class Listings:
    def __init__(self, client: ListingClient, ttl: float, store: Path | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 offline_backoff: float = OFFLINE_BACKOFF) -> None:
        self.client = client
        self.ttl = ttl
        self.store = store  # folder for the last known listings, or None
        self._fresh: cachetools.TTLCache[str, Any] = cachetools.TTLCache(
            maxsize=100_000, ttl=max(ttl, 1e-9), timer=clock)
        self._known: dict[str, Any] = {}  # last good answer per key, kept past the TTL
        self._refreshes: dict[str, _Refresh] = {}
        self.nursery: trio.Nursery | None = None  # where refreshes run on past `stale_after`
        self.stale_after = STALE_AFTER
        self._clock = clock
        self._offline_until = 0.0
        self._offline_backoff = offline_backoff
        self.last_error: BaseException | None = None
        self.stale = False  # the last answer came from the last known listing
        self._warned = False  # "serving the last known listings" was logged
        if store is not None:
            store.mkdir(mode=0o700, parents=True, exist_ok=True)

    async def artifacts(self) -> list[Artifact]:
        return await self._get("artifacts", self.client.list_artifacts, _artifact_from_dict)

    async def versions(self, artifact_id: str) -> list[Version]:
        async def fetch() -> list[Version]:
            return await self.client.list_versions(artifact_id)

        return await self._get(f"versions-{artifact_id}", fetch, lambda raw: Version(**raw))

    def known_artifacts(self) -> list[Artifact]:
        """The last good artifacts listing held in memory, asking no one (for log lines)."""
        return self._known.get("artifacts") or []

    def invalidate(self) -> None:
        self._fresh.clear()

    async def _get(self, key: str, fetch: Callable[[], Awaitable[list[T]]],
                   decode: Callable[[dict[str, Any]], T]) -> list[T]:
        if key in self._fresh:
            return self._fresh[key]
        known = self._known.get(key)
        if known is None and self.store is not None:
            known = await trio.to_thread.run_sync(self._load, key, decode)
            if key in self._fresh:  # another caller refreshed it meanwhile
                return self._fresh[key]
        if self.offline:  # the API failed moments ago: do not make every lookup wait
            if known is not None:
                return known
            raise Unavailable(f"the API is unreachable ({self.last_error})")
        refresh = self._refreshes.get(key)
        if refresh is None:  # one walk of the pages per key; the others wait for it
            refresh = self._refreshes[key] = _Refresh()
            if self.nursery is not None:
                self.nursery.start_soon(self._refresh, key, fetch, refresh, known)
            else:
                await self._refresh(key, fetch, refresh, known)
        if known is None:
            await refresh.done.wait()
        else:
            # A slow or failing API must not make `ls` hang: past a moment, the last known
            # listing answers and the refresh goes on behind it.
            with trio.move_on_after(self.stale_after):
                await refresh.done.wait()
            if not refresh.done.is_set():
                self.stale = True
                return known
        if refresh.error is None:
            return refresh.value
        if isinstance(refresh.error, Unavailable) and known is not None:
            return known
        raise refresh.error

    async def _refresh(self, key: str, fetch: Callable[[], Awaitable[list[Any]]],
                       refresh: _Refresh, known: list[Any] | None) -> None:
        started = time.monotonic()
        try:
            value = await fetch()
            log.debug("listing %s: %d entries in %.3f s", key, len(value),
                      time.monotonic() - started)
        except trio.Cancelled:
            refresh.error = Unavailable("the listing request was cancelled")
            raise
        except Exception as exc:  # noqa: BLE001 - handed to every waiter
            refresh.error = exc
            if isinstance(exc, Unavailable):
                self._went_offline(exc, serving_stale=known is not None)
                self.stale = known is not None
        else:
            if self._warned:
                log.warning("the API answers again: listings are fresh")
            self._warned = False
            self.stale = False
            self.last_error = None
            refresh.value = value
            self._fresh[key] = value
            if value != known:
                self._known[key] = value
                await trio.to_thread.run_sync(self._save, key, value)
        finally:
            self._refreshes.pop(key, None)
            refresh.done.set()

    @property
    def offline(self) -> bool:
        """Whether the API failed so recently that asking again is not worth the wait."""
        return self._clock() < self._offline_until

    def _went_offline(self, exc: BaseException, serving_stale: bool) -> None:
        if serving_stale and not self._warned:  # else the caller reports the failure
            self._warned = True
            log.warning("the API is unreachable (%s): serving the last known listings and "
                        "cached versions", exc)
        self.last_error = exc
        self._offline_until = self._clock() + self._offline_backoff

    def _path(self, key: str) -> Path | None:
        return None if self.store is None else self.store / f"{key}.json"

    def _save(self, key: str, value: list[Any]) -> None:
        path = self._path(key)
        if path is None:
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps([dataclasses.asdict(v) for v in value]))
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except OSError as exc:
            log.debug("cannot keep listing %s: %s", key, exc)

    def _load(self, key: str, decode: Callable[[dict[str, Any]], T]) -> list[T] | None:
        path = self._path(key)
        if path is None:
            return None
        try:
            value = [decode(raw) for raw in json.loads(path.read_text())]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            log.debug("ignoring unreadable listing %s: %s", path, exc)
            return None
        self._known[key] = value
        return value
