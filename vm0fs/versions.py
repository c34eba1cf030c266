"""Version contents in this process: one download per version however many readers wait, the
tree grown member by member while the archive arrives, and reads that wait only for their bytes.

A `VersionState` belongs to one version folder. Its `load` task fills the folder from the cache
if the version is there, or else downloads it: the HTTP stream is inflated into a staging file
by one worker thread while another reads tar headers from the same file and publishes members
(see archive.py). Waiters sleep on a trio Event that is replaced at every step.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Any, Protocol

import trio

from vm0fs.archive import GrowingFile, Member, Progress, TarSink, scan_members
from vm0fs.cache import Cache
from vm0fs.errors import Vm0fsError
from vm0fs.tree import ContentTree, Dir, File, InodeTable

log = logging.getLogger("vm0fs.versions")

PUBLISH_BATCH = 512  # members handed from the parser thread to the event loop at once
PROGRESS_LOG_INTERVAL = 5.0
DISK_RESERVE = 256 << 20  # never fill the disk past this much free space


class Downloader(Protocol):
    def download(self, artifact_id: str, version_id: str | None = None) -> Any: ...


class VersionState:
    """The contents of one version folder and where its bytes are."""

    def __init__(self, artifact_id: str, version_id: str, root: Dir, table: InodeTable,
                 implied_mtime_ns: int) -> None:
        self.artifact_id = artifact_id
        self.version_id = version_id
        self.root = root
        self.tree = ContentTree(table, root, self, implied_mtime_ns)
        self.fd: int | None = None  # the tar file: staging while downloading, then the cache
        self.progress = Progress()
        self.tree_complete = False  # every member is in the tree
        self.error: BaseException | None = None
        self.failed_at = 0.0
        self.loading = False
        self.open_handles = 0
        self.bytes_total: int | None = None  # archive bytes received / expected, for status
        self.bytes_received = 0
        self._changed = trio.Event()

    @property
    def data_ready(self) -> bool:
        return self.fd is not None and self.progress.ended and self.progress.error is None

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def add_members(self, members: list[Member]) -> None:
        for member in members:
            self.tree.add(member)
        self.notify()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    async def wait_tree(self) -> None:
        """Until every member is known (for listings)."""
        while not self.tree_complete:
            self._raise_if_failed()
            await self._changed.wait()
        self._raise_if_failed()

    async def wait_name(self, folder: Dir, name: str) -> None:
        """Until `name` exists in `folder` or the tree is complete."""
        while name not in folder.children and not self.tree_complete:
            self._raise_if_failed()
            await self._changed.wait()
        self._raise_if_failed()

    async def wait_bytes(self, end: int) -> int:
        """Until the tar file holds `end` bytes; returns the file descriptor to read."""
        while self.fd is None or (self.progress.durable < end and not self.progress.ended):
            self._raise_if_failed()
            if not self.loading and self.fd is None:
                raise Vm0fsError("version data is not loaded")
            await self._changed.wait()
        self._raise_if_failed()
        if self.progress.durable < end:
            raise Vm0fsError("read past the end of the version data")
        return self.fd


class VersionStore:
    """Starts and tracks the loads of versions; owns the worker tasks."""

    def __init__(self, cache: Cache, client: Downloader, table: InodeTable, *,
                 max_version_bytes: int | None = None, retry_failed_after: float = 5.0) -> None:
        self.cache = cache
        self.client = client
        self.table = table
        self.max_version_bytes = max_version_bytes
        self.retry_failed_after = retry_failed_after
        self.states: dict[tuple[str, str], VersionState] = {}
        self.downloads = 0  # archives fetched over the network by this process
        self._nursery: trio.Nursery | None = None

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Host the load tasks until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def get(self, artifact_id: str, version_id: str, root: Dir, created_ns: int,
            file_count: int) -> VersionState:
        """The state of a version folder, starting its load if nothing usable is under way."""
        key = (artifact_id, version_id)
        state = self.states.get(key)
        if state is not None:
            if state.error is None:
                if state.fd is None and not state.loading:  # data released: fetch it again
                    self._start(state, build_tree=False)
                return state
            if time.monotonic() - state.failed_at < self.retry_failed_after:
                return state  # failed moments ago: answer EIO again rather than hammer the API
        root.children = {}  # a failed load's partial tree goes
        state = VersionState(artifact_id, version_id, root, self.table, created_ns)
        self.states[key] = state
        if file_count == 0:  # nothing to download: the service has no archive for it
            state.fd = -1
            state.progress.end()
            state.tree_complete = True
        else:
            self._start(state, build_tree=True)
        return state

    def _start(self, state: VersionState, build_tree: bool) -> None:
        assert self._nursery is not None, "VersionStore.run() is not running"
        state.loading = True
        state.error = None
        state.progress = Progress()
        self._nursery.start_soon(self._load, state, build_tree,
                                 name=f"load {state.version_id[:12]}")

    async def _load(self, state: VersionState, build_tree: bool) -> None:
        try:
            entry = await trio.to_thread.run_sync(self.cache.open_entry, state.version_id)
            if entry is not None:
                state.fd = entry.fd
                state.progress.advance(entry.size)
                state.progress.end()
                if build_tree:
                    for start in range(0, len(entry.members), PUBLISH_BATCH * 4):
                        state.add_members(entry.members[start:start + PUBLISH_BATCH * 4])
                        await trio.lowlevel.checkpoint()
            else:
                await self._download(state, build_tree)
            state.tree_complete = True
        except Exception as exc:  # noqa: BLE001 - every failure becomes EIO for this version
            self._fail(state, exc)
        finally:
            state.loading = False
            state.notify()
        if self.cache.max_bytes is not None and state.error is None:
            await self.enforce_cache_size()

    def _fail(self, state: VersionState, exc: Exception) -> None:
        log.error("version %s of artifact %s: %s", state.version_id[:12], state.artifact_id, exc)
        state.error = exc if isinstance(exc, Vm0fsError) else Vm0fsError(str(exc))
        state.failed_at = time.monotonic()
        state.progress.end(exc)
        state.fd = None

    async def _download(self, state: VersionState, build_tree: bool) -> None:
        self.downloads += 1
        staging = await trio.to_thread.run_sync(self.cache.stage, state.version_id)
        progress = state.progress
        state.fd = staging.fd
        sink = TarSink(staging.fd, await trio.to_thread.run_sync(self._size_limit))
        members: list[Member] = []
        parsed = trio.Event()
        parse_error: list[BaseException] = []
        receive_error: list[Exception] = []
        emit = self._emitter(state, members, build_tree)
        token = trio.lowlevel.current_trio_token()

        def parse() -> None:
            def flush() -> None:
                emit(token, flush=True)

            try:
                scan_members(GrowingFile(staging.fd, progress, flush),
                             lambda m: (members.append(m), emit(token)))
                flush()
            except BaseException as exc:  # noqa: BLE001 - reported to the downloader
                parse_error.append(exc)

        async def run_parser() -> None:
            try:
                await trio.to_thread.run_sync(parse)
            finally:
                parsed.set()

        started = time.monotonic()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_parser)
                try:
                    await self._receive(state, sink)
                except Exception as exc:
                    receive_error.append(exc)
                    progress.end(exc)  # wakes the parser thread
                finally:
                    await parsed.wait()
            # A failed download makes the parser fail too: report the cause, not the echo.
            if receive_error or parse_error:
                raise (receive_error or parse_error)[0]
            entry = await trio.to_thread.run_sync(self.cache.publish, staging, members)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.cache.discard, staging)
            raise
        state.fd = entry.fd
        elapsed = max(time.monotonic() - started, 1e-6)
        log.info("version %s: %d members, %.1f MB in %.1f s (%.1f MB/s)", state.version_id[:12],
                 len(members), sink.written / 1e6, elapsed, sink.written / 1e6 / elapsed)

    async def _receive(self, state: VersionState, sink: TarSink) -> None:
        """Feed the download into the sink, telling waiters at every step."""
        last_log = time.monotonic()
        async for chunk in self.client.download(state.artifact_id, state.version_id):
            state.bytes_received += len(chunk)
            total = await trio.to_thread.run_sync(sink.feed, chunk)
            state.progress.advance(total)
            state.notify()
            if time.monotonic() - last_log > PROGRESS_LOG_INTERVAL:
                last_log = time.monotonic()
                log.info("downloading version %s: %.1f MB received", state.version_id[:12],
                         state.bytes_received / 1e6)
        total = await trio.to_thread.run_sync(sink.finish)
        state.progress.advance(total)
        state.progress.end()
        state.notify()

    def _emitter(self, state: VersionState, members: list[Member],
                 build_tree: bool) -> Callable[..., None]:
        """Hands parsed members to the event loop in batches (called in the parser thread)."""
        sent = 0

        def emit(token: trio.lowlevel.TrioToken, flush: bool = False) -> None:
            nonlocal sent
            if len(members) - sent < (1 if flush else PUBLISH_BATCH):
                return
            batch = members[sent:]
            sent = len(members)
            if build_tree:
                trio.from_thread.run_sync(state.add_members, batch, trio_token=token)

        return emit

    def _size_limit(self) -> int:
        free = shutil.disk_usage(self.cache.root).free - DISK_RESERVE
        limits = [max(free, 0)]
        if self.max_version_bytes is not None:
            limits.append(self.max_version_bytes)
        if self.cache.max_bytes is not None:
            limits.append(self.cache.max_bytes)
        return min(limits)

    # -- open files and eviction -------------------------------------------------------

    def opened(self, node: File) -> None:
        state: VersionState = node.owner
        state.open_handles += 1
        if state.fd is None and not state.loading and state.error is None:
            self._start(state, build_tree=False)  # its data was evicted: fetch it again

    def released(self, node: File) -> None:
        node.owner.open_handles -= 1

    async def enforce_cache_size(self) -> None:
        """Bring the cache under its cap: idle versions let go of their data first."""
        if self.cache.max_bytes is None:
            return
        usage = await trio.to_thread.run_sync(self.cache.usage)
        if usage <= self.cache.max_bytes:
            return
        busy = set()
        for state in self.states.values():
            if state.loading or state.open_handles > 0:
                busy.add(state.version_id)
            elif state.fd is not None and state.fd >= 0:
                os.close(state.fd)  # drops our shared lock; the next open fetches it again
                state.fd = None
        await trio.to_thread.run_sync(self.cache.evict, None, frozenset(busy))

    def close(self) -> None:
        for state in self.states.values():
            if state.fd is not None and state.fd >= 0:
                try:
                    os.close(state.fd)
                except OSError as exc:
                    if exc.errno != errno.EBADF:
                        raise
                state.fd = None
