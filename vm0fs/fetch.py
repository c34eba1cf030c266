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
import time
from collections.abc import Callable
from contextlib import aclosing
from typing import Any, Protocol

import trio

from vm0fs.archive import GrowingFile, Member, Progress, TarSink, scan_members
from vm0fs.cache import Cache, Entry
from vm0fs.integrity import BlockSums
from vm0fs.tree import TreeBuilder
from vm0fs.units import human

log = logging.getLogger(__name__)

PUBLISH_BATCH = 512  # members added between two wake-ups of the event loop
PIPELINE_CHUNKS = 16  # downloaded chunks (of up to 256 KiB) queued for the inflating thread
PROGRESS_LOG_INTERVAL = 5.0
# What a version may expand to, beyond the sizes of its files that the API tells: a header and
# padding per file (and a long name or a pax header), and a margin for folders, links and the
# tar's own end. A tar.gz that inflates past that is a bomb, or not what the API describes.
HEADER_ALLOWANCE = 4096  # bytes a file
SIZE_MARGIN = 64 << 20


class Downloader(Protocol):
    """The client's side of a download: `download` (an async iterator of the archive's bytes),
    and `download_to` (the bytes handed to a callback; parallel parts) where it has one."""

    def download(self, artifact_id: str, version_id: str | None = None) -> Any: ...


def api_bound(size: int, file_count: int) -> int:
    """The most a version of `file_count` files of `size` bytes in all may expand to."""
    return size + size // 16 + file_count * HEADER_ALLOWANCE + SIZE_MARGIN


def size_limit(cache: Cache, max_version_bytes: int | None, size: int = 0,
               file_count: int = 0) -> tuple[int, str]:
    """How far one version may expand, and why (blocking: a thread): the free space of the
    cache's filesystem less what is kept free, the cache's cap, and `--max-version-size` or
    else what the API says the version holds."""
    room = cache.disk_room()
    free = max(room.bytes, 0)
    limits = [(free, f"{human(free)}, the room left on the cache's filesystem ({room.reason})")]
    if max_version_bytes is not None:
        limits.append((max_version_bytes, f"{human(max_version_bytes)} (--max-version-size)"))
    elif size or file_count:
        bound = api_bound(size, file_count)
        limits.append((bound, f"{human(bound)}, far more than the {human(size)} in {file_count} "
                              "file(s) the API lists for this version (--max-version-size "
                              "allows more)"))
    if cache.max_bytes is not None:
        limits.append((cache.max_bytes, f"{human(cache.max_bytes)}, the cache's cap "
                                        "(--cache-size)"))
    return min(limits)


class Fetch:
    def __init__(self, client: Downloader, cache: Cache, artifact_id: str, version_id: str,
                 progress: Progress | None = None, expected_size: int = 0,
                 implied_mtime_ns: int = 0, file_count: int = 0) -> None:
        self.client = client
        self.cache = cache
        self.artifact_id = artifact_id
        self.version_id = version_id
        self.progress = progress or Progress()  # tar bytes written, shared with readers
        self.expected_size = expected_size  # the API's uncompressed size of the files
        self.file_count = file_count  # and how many there are (both bound the download)
        self.sums: BlockSums | None = None  # checksums of the tar file's blocks, as written
        self.fd: int | None = None  # the tar file being written, then the published one
        self.received = 0  # archive bytes received
        self.members = 0  # members read so far
        # The version's entries as they are read; mtime of the folders the archive implies.
        self.index = TreeBuilder(implied_mtime_ns)

    async def run(self, max_version_bytes: int | None = None,
                  on_members: Callable[[], None] | None = None,
                  on_step: Callable[[], None] = lambda: None,
                  retire: Callable[[int], None] = os.close) -> Entry:
        """Download, inflate, index and publish; `on_members` is called (on the event loop)
        when `index` has grown, `on_step` whenever more bytes are there. When another process
        published the version first, `retire` gets the staging file's descriptor (reads may
        still use it: the caller closes it once they are done)."""
        limit, limit_text = await trio.to_thread.run_sync(
            size_limit, self.cache, max_version_bytes, self.expected_size, self.file_count)
        staging = await trio.to_thread.run_sync(self.cache.stage, self.version_id)
        self.fd = staging.fd
        sink = TarSink(staging.fd, limit, self.progress, limit_text)
        self.sums = sink.sums
        on_step()
        parsed = trio.Event()
        errors: dict[str, BaseException] = {}
        token = trio.lowlevel.current_trio_token()
        sent = 0

        def emit(flush: bool = False) -> None:  # in the parser thread
            nonlocal sent
            if on_members is None or self.members - sent < (1 if flush else PUBLISH_BATCH):
                return
            sent = self.members
            # Not waited for: the event loop only wakes the waiters, the parser goes on.
            token.run_sync_soon(on_members, idempotent=True)

        def parse() -> None:
            def add(member: Member) -> None:
                self.index.add(member)
                self.members += 1
                emit()

            end = None
            try:
                end = scan_members(GrowingFile(staging.fd, self.progress, lambda: emit(True)),
                                   add, self.index.resolve)
                emit(True)
            except BaseException as exc:  # noqa: BLE001 - reported to the downloader
                errors["parse"] = exc
            finally:
                self.progress.parser_done(end)  # a writer past its limit waits for this

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
            assert self.progress.archive_end is not None
            tar_size = sink.cut(self.progress.archive_end)  # what follows the end is not kept
            self.progress.advance(tar_size)
            entry = await trio.to_thread.run_sync(self.cache.publish, staging, self.index,
                                                  sink.sums)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.cache.discard, staging)
            self.fd = None
            raise
        self.fd = entry.fd
        if entry.fd != staging.fd:  # another process published it first: use theirs
            on_step()  # readers move to the published file before ours is closed
            retire(staging.fd)
        elapsed = max(time.monotonic() - started, 1e-6)
        log.info("version %s: %d members, download %s, unpacked %s in %.1f s (%s/s)",
                 self.version_id[:12], self.members, human(self.received), human(sink.written),
                 elapsed, human(sink.written / elapsed))
        return entry

    async def _receive(self, sink: TarSink, on_step: Callable[[], None]) -> None:
        """Download and inflate side by side: the download hands chunks over a bounded queue,
        and each hop to the inflating thread takes every chunk queued by then."""
        log.info("downloading version %s of artifact %s (files %s)",
                 self.version_id[:12], self.artifact_id, human(self.expected_size))
        send, queued = trio.open_memory_channel[bytes](PIPELINE_CHUNKS)

        async def deliver(chunk: bytes) -> bool:
            self.received += len(chunk)
            await send.send(chunk)
            return True

        failures: list[Exception] = []  # raised as themselves, not in a group

        async def download() -> None:
            async with send:
                try:
                    download_to = getattr(self.client, "download_to", None)
                    if download_to is not None:
                        await download_to(self.artifact_id, self.version_id, deliver)
                        return
                    async with aclosing(self.client.download(self.artifact_id,
                                                             self.version_id)) as chunks:
                        async for chunk in chunks:
                            await deliver(chunk)
                except Exception as exc:  # noqa: BLE001
                    failures.append(exc)

        def feed(chunks: list[bytes]) -> int:  # in a worker thread
            for chunk in chunks:
                durable = sink.feed(chunk)
                if sink.done:
                    break
            return durable

        last_log = time.monotonic()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(download)
            try:
                async with queued:
                    async for chunk in queued:
                        chunks = [chunk]
                        while True:
                            try:
                                chunks.append(queued.receive_nowait())
                            except (trio.WouldBlock, trio.EndOfChannel):
                                break
                        self.progress.advance(await trio.to_thread.run_sync(feed, chunks))
                        on_step()
                        # The tar ended long before the stream: the rest is not needed.
                        if sink.done:
                            log.info("version %s: the tar ends at byte %d; the rest of the download"
                                     " is dropped", self.version_id[:12], sink.end)
                            nursery.cancel_scope.cancel()
                            break
                        if time.monotonic() - last_log > PROGRESS_LOG_INTERVAL:
                            last_log = time.monotonic()
                            log.info("downloading version %s: download %s so far, unpacked %s "
                                     "(files %s)", self.version_id[:12], human(self.received),
                                     human(self.progress.durable), human(self.expected_size))
            except Exception as exc:  # noqa: BLE001 - raised below, as itself
                failures.insert(0, exc)
                nursery.cancel_scope.cancel()
        if failures:
            raise failures[0]
        self.progress.advance(await trio.to_thread.run_sync(sink.finish))
        self.progress.end()
        on_step()
