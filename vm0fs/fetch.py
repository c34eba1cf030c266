"""One download of a version into the cache: the HTTP stream is inflated into a staging file by
one worker thread while another reads tar headers from the same file, then the entry is
published. Used by the mount (members go into the index as they are read, so files can be
served before the archive ends) and by `vm0fs prefetch`.

The index (a `TreeBuilder`) is grown in the parser thread itself, with no object kept per member;
the event loop is told every PUBLISH_BATCH members, and whenever the parser waits for bytes.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Any, Protocol

import trio

from vm0fs.archive import GrowingFile, Member, Progress, TarSink, scan_members
from vm0fs.cache import Cache, Entry
from vm0fs.tree import TreeBuilder
from vm0fs.units import human

log = logging.getLogger("vm0fs.fetch")

PUBLISH_BATCH = 512  # members added between two wake-ups of the event loop
PROGRESS_LOG_INTERVAL = 5.0
DISK_RESERVE = 256 << 20  # never fill the disk past this much free space


class Downloader(Protocol):
    def download(self, artifact_id: str, version_id: str | None = None) -> Any: ...


def size_limit(cache: Cache, max_version_bytes: int | None) -> int:
    """How far one version may expand: a decompression bomb stops here (blocking: a thread)."""
    limits = [max(shutil.disk_usage(cache.root).free - DISK_RESERVE, 0)]
    if max_version_bytes is not None:
        limits.append(max_version_bytes)
    if cache.max_bytes is not None:
        limits.append(cache.max_bytes)
    return min(limits)


class Fetch:
    def __init__(self, client: Downloader, cache: Cache, artifact_id: str, version_id: str,
                 progress: Progress | None = None, expected_size: int = 0,
                 implied_mtime_ns: int = 0) -> None:
        self.client = client
        self.cache = cache
        self.artifact_id = artifact_id
        self.version_id = version_id
        self.progress = progress or Progress()  # tar bytes written, shared with readers
        self.expected_size = expected_size  # the API's uncompressed size, for progress reports
        self.fd: int | None = None  # the tar file being written, then the published one
        self.received = 0  # archive bytes received
        self.members = 0  # members read so far
        # The version's entries as they are read; mtime of the folders the archive implies.
        self.index = TreeBuilder(implied_mtime_ns)

    async def run(self, max_version_bytes: int | None = None,
                  on_members: Callable[[], None] | None = None,
                  on_step: Callable[[], None] = lambda: None) -> Entry:
        """Download, inflate, index and publish; `on_members` is called (on the event loop)
        when `index` has grown, `on_step` whenever more bytes are there."""
        limit = await trio.to_thread.run_sync(size_limit, self.cache, max_version_bytes)
        staging = await trio.to_thread.run_sync(self.cache.stage, self.version_id)
        self.fd = staging.fd
        on_step()
        sink = TarSink(staging.fd, limit)
        parsed = trio.Event()
        errors: dict[str, BaseException] = {}
        token = trio.lowlevel.current_trio_token()
        sent = 0

        def emit(flush: bool = False) -> None:  # in the parser thread
            nonlocal sent
            if on_members is None or self.members - sent < (1 if flush else PUBLISH_BATCH):
                return
            sent = self.members
            trio.from_thread.run_sync(on_members, trio_token=token)

        def parse() -> None:
            def add(member: Member) -> None:
                self.index.add(member)
                self.members += 1
                emit()

            try:
                scan_members(GrowingFile(staging.fd, self.progress, lambda: emit(True)), add,
                             self.index.resolve)
                emit(True)
            except BaseException as exc:  # noqa: BLE001 - reported to the downloader
                errors["parse"] = exc

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
                    await self._receive(sink, on_step)
                except BaseException as exc:  # cancelled too (an unmount): stop the parser
                    errors["receive"] = exc
                    self.progress.end(exc)  # wakes the parser thread
                finally:
                    with trio.CancelScope(shield=True):  # the thread ends promptly now
                        await parsed.wait()
            # A failed download makes the parser fail too: report the cause, not the echo.
            if errors:
                raise errors.get("receive") or errors["parse"]
            entry = await trio.to_thread.run_sync(self.cache.publish, staging, self.index)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.cache.discard, staging)
            self.fd = None
            raise
        self.fd = entry.fd
        if entry.fd != staging.fd:  # another process published it first: use theirs
            on_step()  # readers move to the published file before ours is closed
            os.close(staging.fd)
        elapsed = max(time.monotonic() - started, 1e-6)
        log.info("version %s: %d members, download %s, unpacked %s in %.1f s (%s/s)",
                 self.version_id[:12], self.members, human(self.received), human(sink.written),
                 elapsed, human(sink.written / elapsed))
        return entry

    async def _receive(self, sink: TarSink, on_step: Callable[[], None]) -> None:
        log.info("downloading version %s of artifact %s (files %s)",
                 self.version_id[:12], self.artifact_id, human(self.expected_size))
        last_log = time.monotonic()
        async for chunk in self.client.download(self.artifact_id, self.version_id):
            self.received += len(chunk)
            self.progress.advance(await trio.to_thread.run_sync(sink.feed, chunk))
            on_step()
            if time.monotonic() - last_log > PROGRESS_LOG_INTERVAL:
                last_log = time.monotonic()
                log.info("downloading version %s: download %s so far, unpacked %s (files %s)",
                         self.version_id[:12], human(self.received),
                         human(self.progress.durable), human(self.expected_size))
        self.progress.advance(await trio.to_thread.run_sync(sink.finish))
        self.progress.end()
        on_step()
