"""Reading ahead across files: a reader going through a folder's small files in listing order
(`grep -r`, `rg`, `cp -r`, `rsync`, `tar`) finds the next ones already in the kernel's page
cache, put there with FUSE_NOTIFY_STORE from a worker thread while it reads the previous ones.

A small file's read costs a round trip through the kernel, pyfuse3 and trio (about 100 us a
file here, against a few us to read it from the page cache), so for small files that round trip
is the whole cost. Once two files of one folder were read from their start one after the other,
the files after them in the listing (FILL_AHEAD_FILES, FILL_AHEAD_BYTES at most, each at most
FILL_FILE_MAX) are pushed; a read past what was pushed pushes the next ones.

Only bytes of a complete version, checked block by block against their checksums
(integrity.py), are pushed: what the kernel gets is what a read would have returned. A damaged
block stops the push and leaves the read path to find it and fetch the version again. The pages
are the kernel's to reclaim, as any page cache; files the kernel does not know (ENOENT) are
skipped, and a kernel without NOTIFY_STORE turns this off.

`notify_store` blocks while a page it fills is locked by a READ in flight, whose answer comes
from the event loop: it only runs in a worker thread, one at a time (its own limiter), never in
a request handler.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import cachetools
import trio

from vm0fs.integrity import BLOCK, BLOCK_SHIFT, BlockSums, Damaged, check_block
from vm0fs.tree import TreeIndex

log = logging.getLogger(__name__)

FILL_FILE_MAX = 256 << 10  # bigger files get the kernel's own readahead: few reads a file
# The rest of a file whose first read asked for less is pushed up to this size: what a reader
# of only the files' first lines (`head -1 *`, `file *`) pays for each file stays small.
REST_FILE_MAX = 64 << 10
REST_WAIT = 0.5  # seconds a first read waits for the rest of its file, at most...
REST_QUEUED = 4  # ...and rest pushes waiting for a thread, at most (more: answered at once)
FILL_AHEAD_FILES = 1024  # files pushed ahead of the reader at one time...
FILL_AHEAD_BYTES = 16 << 20  # ...and bytes
SEQUENTIAL_GAP = 8  # a read this far past the last one in the folder still counts as in order
RUNS_KEPT = 256  # folders whose reading order is followed
JOBS_QUEUED = 16  # pushes waiting their turn, at most
PUSH_THREADS = 2  # filling pages is the kernel's work, outside the GIL: two at a time
WINDOW = 1 << 20  # bytes of the tar file read and checked at a time for a push
PAGE = os.sysconf("SC_PAGE_SIZE")  # a push that starts inside a page: left to the READ

Push = Callable[[int, int, Any], None]  # pyfuse3.notify_store(inode, offset, data)


@dataclass
class _Run:
    """Where a reader is in one folder's listing: the last position it read from the start,
    and the positions pushed or queued so far, [low, high) (empty: none)."""

    last: int
    low: int
    high: int


@dataclass
class _Job:
    state: Any  # the VersionState
    index: TreeIndex
    folder: int
    positions: range  # listing positions to push, in the order the reader goes
    run: _Run


class PageFill:
    def __init__(self, push: Push) -> None:
        self._push = push
        self._runs: cachetools.LRUCache[tuple[int, int], _Run] = cachetools.LRUCache(RUNS_KEPT)
        self._jobs: deque[_Job] = deque()
        self._wake = trio.Event()
        self._limiter = trio.CapacityLimiter(PUSH_THREADS)
        self._rest_limiter = trio.CapacityLimiter(PUSH_THREADS)
        self.enabled = True
        self.files = 0  # pushed, for `vm0fs status` and the tests
        self.bytes = 0
        self.rests = 0  # files whose rest was pushed at their first read
        self._nursery: trio.Nursery | None = None  # run()'s, for the pushes of rests

    def read_from_start(self, state: Any, entry: int) -> None:
        """A read at offset 0 of the small file `entry` of a version whose data is all in.

        Readers go forward through a listing (grep -r, cp -r) or backward (rg takes a
        folder's files from a stack): the direction of the last two reads decides."""
        index = state.index
        if not self.enabled or not isinstance(index, TreeIndex) or not state.data_ready:
            return
        folder = index.parent(entry)
        position = index.position(folder, entry)
        if position is None:
            return
        key = (state.base, folder)
        run = self._runs.get(key)
        if run is None:
            self._runs[key] = _Run(position, position, position)
            return
        last, run.last = run.last, position
        pushed = run.low < run.high  # a reader past the ends of that is still in order
        if (last < position <= last + SEQUENTIAL_GAP
                or pushed and run.high <= position <= run.high + SEQUENTIAL_GAP):
            start = max(position + 1, run.high) if pushed else position + 1
            end = min(index.child_count(folder), position + 1 + FILL_AHEAD_FILES)
            if start < end:
                if not pushed:
                    run.low = start
                run.high = end  # claimed now: the next read must not queue the same files
                self._queue(_Job(state, index, folder, range(start, end), run))
        elif (last - SEQUENTIAL_GAP <= position < last
              or pushed and run.low - SEQUENTIAL_GAP <= position < run.low):
            end = min(position, run.low) if pushed else position
            start = max(0, position - FILL_AHEAD_FILES)
            if start < end:
                if not pushed:
                    run.high = end
                run.low = start
                self._queue(_Job(state, index, folder, range(end - 1, start - 1, -1), run))

    async def rest_of_file(self, state: Any, entry: int, start: int) -> None:
        """Push the small file `entry` from `start` (a page boundary: what its first read
        asked for ends there) to its end, now, in a worker thread of its own (the push
        threads may be busy with a folder); the read waits for it REST_WAIT at most. Skipped
        where a push could not be whole, or when REST_QUEUED pushes already wait."""
        index = state.index
        if (not self.enabled or start % PAGE or not isinstance(index, TreeIndex)
                or not state.data_ready):
            return
        fd, sums = state.fd, state.sums
        if fd is None or sums is None:
            return
        size, offset = index.size(entry), index.offset(entry)
        if size > REST_FILE_MAX or self._rest_limiter.statistics().tasks_waiting >= REST_QUEUED:
            return
        args = (state, fd, sums, state.base + entry, offset, start, size)
        if self._nursery is None:  # not serving (the tests drive it directly)
            await self._push_rest(*args)
            return
        # The push blocks while a page of the rest is locked by a READ in flight, which may be
        # waiting for a free request task itself: this READ waits a little, never for good.
        done = trio.Event()
        self._nursery.start_soon(self._push_rest, *args, done)
        with trio.move_on_after(REST_WAIT):
            await done.wait()

    async def _push_rest(self, state: Any, fd: int, sums: BlockSums, inode: int, offset: int,
                         start: int, size: int, done: trio.Event | None = None) -> None:
        try:
            with self._pushing(state):
                if await trio.to_thread.run_sync(push_rest, fd, sums, inode, offset, start,
                                                 size, self._push,
                                                 limiter=self._rest_limiter):
                    self.rests += 1
        except Exception:  # noqa: BLE001 - a task of the fill's nursery: never the mount's end
            log.exception("pushing the rest of a file failed; pushing ahead is off")
            self.enabled = False
        finally:
            if done is not None:
                done.set()

    @contextlib.contextmanager
    def _pushing(self, state: Any) -> Iterator[None]:
        """Around a push from the version's descriptor: kept from eviction meanwhile; a
        damaged block stops the push (the read path finds it and fetches the version again),
        and any other error turns pushing off."""
        state.reads_in_flight += 1  # eviction must not close the descriptor meanwhile
        try:
            yield
        except Damaged as exc:
            log.debug("not pushing files of version %s: %s", state.version_id[:12], exc)
        except OSError as exc:
            # ENOSYS: no NOTIFY_STORE in this kernel; ENODEV/EBADF: unmounted.
            log.info("putting files into the page cache ahead of reads is off: %s",
                     exc.strerror or exc)
            self.enabled = False
        finally:
            state.reads_in_flight -= 1
            state.close_retired()

    def _queue(self, job: _Job) -> None:
        if len(self._jobs) >= JOBS_QUEUED:  # the reader has long moved on from the oldest
            self._jobs.popleft()
        self._jobs.append(job)
        self._wake.set()

    async def run(self) -> None:
        """Push what the reads asked for, one job at a time (a task of the mount's nursery);
        the rests of files are pushed by tasks of its own nursery."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                while True:
                    await self._wake.wait()
                    self._wake = trio.Event()
                    while self._jobs and self.enabled:
                        await self._fill(self._jobs.popleft())
                    self._jobs.clear()
            finally:
                self._nursery = None

    async def _fill(self, job: _Job) -> None:
        state, index = job.state, job.index
        files: list[tuple[int, int, int, int]] = []  # (position, inode, offset in tar, size)
        total = 0
        step = job.positions.step
        for position in job.positions:
            entry = index.child(job.folder, position)
            mode, size = index.mode(entry), index.size(entry)
            if not stat.S_ISREG(mode) or size > FILL_FILE_MAX or index.extra(entry):
                continue  # folders, links, big and sparse files
            if total + size > FILL_AHEAD_BYTES:
                # The rest waits for the reader to come near it.
                if step > 0:
                    job.run.high = position
                else:
                    job.run.low = position + 1
                break
            if size:
                files.append((position, state.base + entry, index.offset(entry), size))
                total += size
        if not files:
            return
        fd, sums = state.fd, state.sums
        with self._pushing(state):
            if fd is None or sums is None or state.index is not index or not state.data_ready:
                return
            failures: list[Exception] = []

            async def push_part(part: list[tuple[int, int, int, int]]) -> None:
                try:
                    pushed, pushed_bytes = await trio.to_thread.run_sync(
                        push_files, fd, sums, part, self._push, job.run, step,
                        limiter=self._limiter)
                except (Damaged, OSError) as exc:
                    failures.append(exc)
                    return
                self.files += pushed
                self.bytes += pushed_bytes

            async with trio.open_nursery() as nursery:
                for part in halves(files, total):
                    nursery.start_soon(push_part, part)
            if failures:
                raise failures[0]


def halves(files: list[tuple[int, int, int, int]], total: int
           ) -> list[list[tuple[int, int, int, int]]]:
    """The files in PUSH_THREADS runs of about the same bytes, each in the reader's order."""
    if PUSH_THREADS < 2 or len(files) < 2:
        return [files]
    taken = 0
    for i, (_, _, _, size) in enumerate(files):
        taken += size
        if taken >= total // 2:
            return [files[:i + 1], files[i + 1:]] if i + 1 < len(files) else [files]
    return [files]


def push_files(fd: int, sums: BlockSums, files: list[tuple[int, int, int, int]], push: Push,
               run: _Run, step: int = 1) -> tuple[int, int]:
    """Read each file's bytes from the tar file `fd`, check their blocks and push them
    (blocking: a worker thread), in the order given (`step`: the reader's direction). Files
    the reader has come to meanwhile (`run.last`, moved by the event loop) are left to its own
    reads: the push goes on ahead of it. Files the kernel does not know are skipped. Returns
    (files, bytes) pushed."""
    window = _Window(fd, sums, backward=step < 0)
    pushed = pushed_bytes = 0
    for position, inode, offset, size in files:
        if (position - run.last) * step <= 1:
            continue  # read already, or about to be: its READ is on its way
        data = window.get(offset, size)
        try:
            push(inode, 0, data)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            continue  # the kernel has no inode for it (not listed, or forgotten)
        pushed += 1
        pushed_bytes += size
    return pushed, pushed_bytes


_buffers = threading.local()  # each push thread's window buffer, kept from job to job


def push_rest(fd: int, sums: BlockSums, inode: int, offset: int, start: int, size: int,
              push: Push) -> bool:
    """Push bytes [start, size) of the file at `offset` in the tar file `fd`, checked
    (blocking: a worker thread); False when the kernel does not know the inode."""
    data = _Window(fd, sums, reach=0).get(offset + start, size - start)  # its blocks alone
    try:
        push(inode, start, data)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
        return False
    return True


class _Window:
    """Checked blocks of a tar file, read WINDOW bytes at a time into one reused buffer (the
    thread's: a new one each job cost a fault of every page and a memset of it)."""

    def __init__(self, fd: int, sums: BlockSums, backward: bool = False,
                 reach: int = WINDOW) -> None:
        self._fd = fd
        self._sums = sums
        self._backward = backward  # files come in descending offsets: read up to them
        self._reach = reach  # bytes read at a time at least: the next files' too
        buf = getattr(_buffers, "buf", None)
        if buf is None:
            buf = _buffers.buf = bytearray(WINDOW)
        self._buf: bytearray = buf
        self._start = self._end = 0  # the bytes of the tar file in the buffer

    def get(self, offset: int, size: int) -> memoryview:
        """`size` bytes at `offset`, from checked blocks; raises Damaged."""
        if offset + size > self._sums.sealed:
            raise Damaged("a file of the index lies past the end of the checked data")
        if not (self._start <= offset and offset + size <= self._end):
            self._load(offset, size)
        lo = offset - self._start
        return memoryview(self._buf)[lo:lo + size]

    def _load(self, offset: int, size: int) -> None:
        first = offset >> BLOCK_SHIFT
        last_end = (offset + size + BLOCK - 1) >> BLOCK_SHIFT << BLOCK_SHIFT
        if self._backward:
            first = min(first, max(0, last_end - self._reach) >> BLOCK_SHIFT)
        start = first << BLOCK_SHIFT
        end = min(self._sums.sealed, max(start + self._reach, last_end))
        if end - start > len(self._buf):
            self._buf = bytearray(end - start)  # this job's alone: the thread's stays WINDOW
        self._start = self._end = 0  # nothing valid until it is all checked
        view = memoryview(self._buf)[:end - start]
        got = 0
        while got < len(view):
            n = os.preadv(self._fd, [view[got:]], start + got)
            if n == 0:
                break
            got += n
        for block in range(first, first + ((end - start + BLOCK - 1) >> BLOCK_SHIFT)):
            lo = (block - first) << BLOCK_SHIFT
            check_block(block, view[lo:min(lo + BLOCK, got)], self._sums)  # short reads too
        self._start, self._end = start, end
