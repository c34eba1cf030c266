"""Listings of artifacts and versions, and each artifact's own record, as the mount shows them.

How fresh an answer is (the README's "Caching and freshness" says the same):
- a listing answers without a request for `ttl` seconds from when the request that read it
  (the first page of its walk) was sent, not from when the walk ended: whatever changed on the
  server before that request shows once the TTL has passed and one walk has ended;
- an older one is refreshed, and the access waits for that refresh only while it is a single
  request, and at most `stale_after` seconds, once (after a wait in vain, accesses answer from
  the last listing at once for OFFLINE_BACKOFF seconds): a listing of one page (an artifact's
  record, the versions of most artifacts, the artifact list of an account with up to 100) is
  fresh at that access. A walk of more pages (as the last walk of that listing was, or as its
  first page says) is not waited for: the last listing answers, and the walk's result answers
  every access after it ends;
- a listing never fetched is waited for, whole.
One refresh per listing at a time, however many callers ask. Refreshes of different listings run
side by side, a few at a time; the pages of one walk come one after another. An artifact's own
record (GET /v1/artifacts/{id}) is asked for only when the artifact list does not hold a fresh
one, so opening an artifact's folder costs its record and its versions, never a walk of the list.
The last good answer of each listing is kept in memory and on disk, so that a mount goes on
showing what it knew while the API is unreachable, also after a restart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import trio

from vm0fs.api import Artifact, Page, Version
from vm0fs.errors import NotFound, Unavailable

log = logging.getLogger(__name__)

OFFLINE_BACKOFF = 10.0  # seconds to serve stale listings without asking again after a failure
STALE_AFTER = 2.0  # the longest an access that has a last listing waits for its refresh
CONCURRENCY = 4  # listing requests at once: as many again for refreshes behind a last listing

ARTIFACTS = "artifacts"  # the key of the artifact list; others: versions-<id>, artifact-<id>
_SAFE_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,150}")

Fetch = Callable[[Callable[[], None]], Awaitable[Any]]  # called with "the walk needs more pages"


class ListingClient(Protocol):
    async def list_artifacts(self, first: Page[Artifact] | None = None,
                             on_more: Callable[[], None] | None = None) -> list[Artifact]: ...
    async def artifacts_page(self, cursor: str | None = None) -> Page[Artifact]: ...
    async def list_versions(self, artifact_id: str,
                            on_more: Callable[[], None] | None = None) -> list[Version]: ...
    async def get_artifact(self, artifact_id: str) -> Artifact: ...


def listing_namespace(api_url: str, api_key: str) -> str:
    """Where one account's listings are kept: different keys may see different artifacts."""
    return hashlib.sha256(f"{api_url}\0{api_key}".encode()).hexdigest()[:16]


# What each field of a kept listing must be: a file damaged on disk is refused whole.
_KINDS: dict[str, tuple[type, ...]] = {
    "id": (str,), "artifact_id": (str,), "name": (str,), "current_version_id": (str, type(None)),
    "size": (int,), "file_count": (int,), "message": (str, type(None)),
    "created_by": (str, type(None)), "created_at": (int, float), "updated_at": (int, float),
    "current_version": (dict, type(None)),
}


def _checked(cls: type, raw: Any) -> dict[str, Any]:
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(raw, dict) or sorted(raw) != sorted(names):
        raise ValueError(f"not a kept {cls.__name__.lower()}")
    for name in names:
        value = raw[name]
        if not isinstance(value, _KINDS[name]) or isinstance(value, bool):
            raise ValueError(f"{name} is a {type(value).__name__}")
    return raw


def _version_from_dict(raw: Any) -> Version:
    return Version(**_checked(Version, raw))


def _artifact_from_dict(raw: Any) -> Artifact:
    fields = _checked(Artifact, raw)
    current = fields["current_version"]
    return Artifact(**{**fields, "current_version": _version_from_dict(current)
                       if current is not None else None})


@dataclasses.dataclass
class _Entry:
    value: Any
    at: float  # clock() when its age began: its first request was sent; -inf: not by us
    asked: float = -math.inf  # clock() when the refresh that fetched it sent its first request
    long: bool = False  # that refresh was a walk of more than one page


class _Refresh:
    """One refresh under way (a request, or a walk of pages), and its outcome."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.settled = trio.Event()  # done, or a walk of more pages: no one who knows it waits
        self.slow = False  # someone waited `stale_after` for it in vain: nobody waits again
        self.value: Any = None
        self.error: Exception | None = None


class Listings:
    def __init__(self, client: ListingClient, ttl: float, store: Path | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 offline_backoff: float = OFFLINE_BACKOFF, concurrency: int = CONCURRENCY) -> None:
        self.client = client
        self.ttl = ttl
        self.store = store  # folder for the last known listings, or None
        self._entries: dict[str, _Entry] = {}  # last good answer per key, kept past the TTL
        self._absent: set[str] = set()  # keys with nothing on disk
        self._listed: dict[str, Artifact] = {}  # the artifact list, by id
        self._refreshes: dict[str, _Refresh] = {}
        self._failures: dict[str, tuple[float, Exception]] = {}  # key -> (repeat until, error)
        self._first = trio.CapacityLimiter(concurrency)  # refreshes someone waits for, whole
        self._again = trio.CapacityLimiter(concurrency)  # refreshes behind a last listing
        self._head: Page[Artifact] | None = None  # first page of the artifact list (`probe`)
        self._head_asked = -math.inf  # clock() when the request for `_head` was sent
        self.nursery: trio.Nursery | None = None  # where refreshes run; None: in the caller
        # Told (key, new value) when a refresh changed a listing that was known before.
        self.on_change: Callable[[str, Any], None] | None = None
        self.stale_after = STALE_AFTER
        self._clock = clock
        self._offline_until = 0.0
        self._slow_until = 0.0  # a refresh was waited for in vain until then: do not wait
        self._offline_backoff = offline_backoff
        self.last_error: BaseException | None = None
        self.stale = False  # the last answer came from the last known listing: API slow or down
        self._warned = False  # "serving the last known listings" was logged
        if store is not None:
            store.mkdir(mode=0o700, parents=True, exist_ok=True)

    # -- what the file system asks -----------------------------------------------------

    async def artifacts(self) -> list[Artifact]:
        return await self._get(ARTIFACTS, self._walk_artifacts)

    async def versions(self, artifact_id: str) -> list[Version]:
        return await self._get(f"versions-{artifact_id}", self._versions_fetch(artifact_id))

    async def artifact(self, artifact_id: str) -> Artifact | None:
        """An artifact's record, fresh from the artifact list or from its own request; None once
        the API says it no longer exists. Only for artifacts of the list."""
        async def fetch(more: Callable[[], None]) -> Artifact | None:
            try:
                return await self.client.get_artifact(artifact_id)
            except NotFound:
                return None

        return await self._get(f"artifact-{artifact_id}", fetch)

    def prefetch_versions(self, artifact_id: str) -> None:
        """Start refreshing an artifact's versions unless they are fresh, without waiting: for a
        caller about to ask for something else first. Only where refreshes run in a nursery."""
        key = f"versions-{artifact_id}"
        entry = self._entries.get(key)
        if (self.nursery is None or key in self._refreshes or self.offline
                or (entry is not None and self._fresh(entry))):
            return
        self._begin(key, self._versions_fetch(artifact_id), entry)

    def newest(self, artifact: Artifact) -> Artifact | None:
        """What is known last about an artifact of the list: its own record when that was
        asked for after the list's walk began (None: it is gone), else the list's."""
        own = self._entries.get(f"artifact-{artifact.id}")
        listed = self._entries.get(ARTIFACTS)
        if own is None or (listed is not None and listed.asked >= own.asked):
            return artifact
        return own.value

    @property
    def artifacts_refreshing(self) -> bool:
        return ARTIFACTS in self._refreshes

    def known_artifact(self, artifact_id: str) -> Artifact | None:
        """What is known about an artifact, from memory, asking no one (for log lines)."""
        entry = self._own_record(artifact_id)
        return entry.value if entry is not None else self._listed.get(artifact_id)

    def invalidate(self) -> None:
        """Everything known is older than the TTL from now on."""
        for entry in self._entries.values():
            entry.at = entry.asked = -math.inf
        self._failures.clear()

    # -- mounting ----------------------------------------------------------------------

    async def probe(self) -> None:
        """The first page of the artifact list: one request, which proves that the key works and
        the API answers. A list of one page is complete at once; the walk of a longer one goes on
        in the background from `start`. Unreachable: fine when a last listing is known (then
        `stale`), else Unavailable."""
        asked = self._clock()
        try:
            page = await self.client.artifacts_page()
        except Unavailable as exc:
            if await self._known(ARTIFACTS) is None:
                raise
            self._went_offline(exc, serving_stale=True)
            self.stale = True
            return
        if page.cursor is not None:
            self._head, self._head_asked = page, asked
            return
        unique: dict[str, Artifact] = {}
        for artifact in page.items:
            unique.setdefault(artifact.id, artifact)
        await self._keep(ARTIFACTS, list(unique.values()), await self._known(ARTIFACTS), asked)

    def start(self, nursery: trio.Nursery) -> None:
        """Refreshes run in `nursery` from now on, and the walk `probe` began goes on."""
        self.nursery = nursery
        if self._head is not None and ARTIFACTS not in self._refreshes:
            self._begin(ARTIFACTS, self._walk_artifacts, self._entries.get(ARTIFACTS))

    # -- refreshing --------------------------------------------------------------------

    async def _walk_artifacts(self, more: Callable[[], None]) -> list[Artifact]:
        head, self._head = self._head, None
        if head is None:
            return await self.client.list_artifacts(on_more=more)
        return await self.client.list_artifacts(first=head, on_more=more)

    def _versions_fetch(self, artifact_id: str) -> Fetch:
        async def fetch(more: Callable[[], None]) -> list[Version]:
            return await self.client.list_versions(artifact_id, on_more=more)

        return fetch

    def _fresh(self, entry: _Entry) -> bool:
        return self._clock() < entry.at + self.ttl

    async def _get(self, key: str, fetch: Fetch) -> Any:
        entry = await self._known(key)
        if entry is not None and self._fresh(entry):
            return entry.value
        failure = self._failures.get(key)
        if failure is not None:
            if self._clock() < failure[0]:
                raise failure[1]  # a refresh failed moments ago: not again at every access
            del self._failures[key]
        if self.offline:  # the API failed moments ago: do not make every lookup wait
            if entry is not None:
                self.stale = True
                return entry.value
            raise Unavailable(f"the API is unreachable ({self.last_error})")
        refresh = self._refreshes.get(key)
        if refresh is None and self.nursery is None:  # no nursery: refresh in the caller
            refresh = self._refreshes[key] = _Refresh()
            await self._refresh(key, fetch, refresh, entry)
        elif refresh is None:
            refresh = self._begin(key, fetch, entry)
        if entry is None:
            await refresh.done.wait()
        else:
            # Wait for one request, not for a walk of many pages (as the last one was, or as
            # its first page says), and never long: past that, the last listing answers and
            # the refresh goes on behind it.
            if not entry.long and not refresh.slow and not self.slow:
                with trio.move_on_after(self.stale_after) as waited:
                    await refresh.settled.wait()
                if waited.cancelled_caught:
                    # The API is slow or hangs: for a while, every access that has a last
                    # listing answers with it at once (one `ls` is many accesses).
                    refresh.slow = True
                    self._slow_until = self._clock() + self._offline_backoff
            if not refresh.done.is_set():
                if not refresh.settled.is_set() and not entry.long:
                    self.stale = True  # a slow or hanging API
                return entry.value
        if refresh.error is None:
            return refresh.value
        if isinstance(refresh.error, Unavailable) and entry is not None:
            self._went_offline(refresh.error, serving_stale=True)
            self.stale = True
            return entry.value
        raise refresh.error

    def _begin(self, key: str, fetch: Fetch, entry: _Entry | None) -> _Refresh:
        assert self.nursery is not None
        refresh = self._refreshes[key] = _Refresh()
        self.nursery.start_soon(self._refresh, key, fetch, refresh, entry)
        return refresh

    async def _refresh(self, key: str, fetch: Fetch, refresh: _Refresh,
                       entry: _Entry | None) -> None:
        started = time.monotonic()
        try:
            async with self._first if entry is None else self._again:
                # The listing's age counts from its first request: sent now, or by `probe`.
                asked = self._head_asked if key == ARTIFACTS and self._head else self._clock()
                value = await fetch(refresh.settled.set)
            long = refresh.settled.is_set()  # set before the end: it needed more pages
            log.debug("listing %s: %s in %.3f s", key,
                      f"{len(value)} entries" if isinstance(value, list) else "record",
                      time.monotonic() - started)
        except trio.Cancelled:
            refresh.error = Unavailable("the listing request was cancelled")
            raise
        except Exception as exc:  # noqa: BLE001 - handed to every waiter
            refresh.error = exc
            if isinstance(exc, Unavailable):
                self._went_offline(exc, serving_stale=entry is not None)
                self.stale = entry is not None
            else:
                log.debug("listing %s failed: %s", key, exc)
                self._failures[key] = (self._clock() + self._offline_backoff, exc)
        else:
            if self._warned:
                log.warning("the API answers again: listings are fresh")
            self._warned = False
            self.stale = False
            self.last_error = None
            self._slow_until = 0.0
            refresh.value = await self._keep(key, value, entry, asked, long)
        finally:
            self._refreshes.pop(key, None)
            refresh.settled.set()
            refresh.done.set()

    async def _keep(self, key: str, value: Any, entry: _Entry | None, asked: float,
                    long: bool = False) -> Any:
        """Remember a refresh's result. Returns what callers get: the object they had when
        nothing changed, so that they can tell by identity."""
        changed = entry is None or entry.value != value
        if not changed:
            assert entry is not None
            value = entry.value
        self._entries[key] = _Entry(value, asked, asked, long)
        if key == ARTIFACTS:
            self._listed = {artifact.id: artifact for artifact in value}
            # Records asked for before this walk began: the list knows better now.
            self._entries = {k: e for k, e in self._entries.items()
                             if not (k.startswith("artifact-") and e.asked < asked)}
        if changed and entry is not None and self.on_change is not None:
            self.on_change(key, value)
        if changed and self.store is not None:
            if key == ARTIFACTS:
                began = time.time() - (self._clock() - asked)  # the walk's start, wall clock
                await trio.to_thread.run_sync(self._save_artifacts, value, began)
            else:
                await trio.to_thread.run_sync(self._save, key, value)
        return value

    async def _known(self, key: str) -> _Entry | None:
        """The last good answer for a key: from memory, else from disk."""
        if key.startswith("artifact-"):
            return self._own_record(key.removeprefix("artifact-"))
        entry = self._entries.get(key)
        if entry is None and self.store is not None and key not in self._absent:
            value = await trio.to_thread.run_sync(self._load, key)
            entry = self._entries.get(key)  # another caller may have filled it meanwhile
            if entry is None and value is None:
                self._absent.add(key)
            elif entry is None:
                entry = self._entries[key] = _Entry(value, -math.inf)
                if key == ARTIFACTS:
                    self._listed = {artifact.id: artifact for artifact in value}
        return entry

    def _own_record(self, artifact_id: str) -> _Entry | None:
        """An artifact's record: its own answer, unless a walk of the list began after it."""
        own = self._entries.get(f"artifact-{artifact_id}")
        listed = self._entries.get(ARTIFACTS)
        if (listed is not None and artifact_id in self._listed
                and (own is None or listed.asked >= own.asked)):
            return _Entry(self._listed[artifact_id], listed.at, listed.asked)
        return own

    # -- offline -----------------------------------------------------------------------

    @property
    def slow(self) -> bool:
        """Whether a refresh was waited for in vain moments ago (the API hangs)."""
        return self._clock() < self._slow_until

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

    # -- on disk: <key>.json, written whole and renamed into place ----------------------

    def _path(self, key: str) -> Path:
        assert self.store is not None
        kind, _, ident = key.partition("-")
        if ident and not _SAFE_KEY.fullmatch(ident):  # ids come from the API: keep them tame
            key = f"{kind}-h{hashlib.sha256(ident.encode()).hexdigest()[:40]}"
        return self.store / f"{key}.json"

    def _write(self, path: Path, data: Any) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(data))
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except OSError as exc:
            log.debug("cannot keep listing %s: %s", path.name, exc)

    def _save(self, key: str, value: Any) -> None:
        if key.startswith("artifact-"):  # a record newer than the list's: {"id", "record"}
            record = dataclasses.asdict(value) if value is not None else None
            self._write(self._path(key), {"id": key.removeprefix("artifact-"), "record": record})
        else:
            self._write(self._path(key), [dataclasses.asdict(v) for v in value])

    def _save_artifacts(self, value: list[Artifact], began: float) -> None:
        assert self.store is not None
        self._write(self._path(ARTIFACTS), [dataclasses.asdict(v) for v in value])
        for path in self.store.glob("artifact-*.json"):  # records older than the walk
            try:
                if path.stat().st_mtime < began:
                    path.unlink()
            except OSError:
                pass

    def _load(self, key: str) -> Any:
        path = self._path(key)
        try:
            raw = _read_json(path)
            if not isinstance(raw, list):
                raise ValueError("not a list")
            if key == ARTIFACTS:
                return self._with_own_records([_artifact_from_dict(r) for r in raw])
            return [_version_from_dict(r) for r in raw]
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - any content at all: never fatal
            _damaged_listing(path, exc)
            return None

    def _with_own_records(self, artifacts: list[Artifact]) -> list[Artifact]:
        """The kept list with the records asked for one by one since it was kept."""
        assert self.store is not None
        records: dict[str, Artifact | None] = {}
        for path in self.store.glob("artifact-*.json"):
            try:
                raw = _read_json(path)
                record = raw["record"]
                records[raw["id"]] = _artifact_from_dict(record) if record is not None else None
            except FileNotFoundError:
                continue
            except Exception as exc:  # noqa: BLE001 - any content at all: never fatal
                _damaged_listing(path, exc)
        if not records:
            return artifacts
        out = [records.get(a.id, a) for a in artifacts]
        return [a for a in out if a is not None]


def _read_json(path: Path) -> Any:
    """A kept listing's JSON. Nesting deep enough to exhaust the parser's recursion is refused
    (RecursionError, a RuntimeError) like any other damage."""
    return json.loads(path.read_text(encoding="utf-8"))


def _damaged_listing(path: Path, exc: BaseException) -> None:
    reason = f"{type(exc).__name__}: {exc}"[:200]
    log.warning("ignoring the damaged kept listing %s (%s): it is fetched again", path.name,
                reason)
