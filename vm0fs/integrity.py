"""Checksums of what the cache holds: nothing read back from disk is served unchecked.

- A version's index file ends its header with an xxh3-64 of all its other bytes, checked
  whenever the file is loaded (tree.TreeIndex.load).
- Its tar data is checked in blocks of BLOCK bytes: the download computes one xxh3-64 per block
  from the bytes it writes (`BlockSums`), the index keeps them, and every block read back from
  disk is checked against its sum before a byte of it is served (`BlockReader`). Reads the
  kernel's page cache answers never reach vm0fs and cost nothing.
A mismatch, a short read or a file that shrank raises `Damaged`: the caller drops the entry and
fetches the version again.

xxh3-64 runs at about 15 GB/s on one core here (zlib.crc32: 3.6 GB/s): a 64 KiB block costs
about 4 us to check, less than reading it from the page cache.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from array import array
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import trio
import xxhash

from vm0fs.errors import CacheError

log = logging.getLogger(__name__)

Buffer = bytes | bytearray

BLOCK_SHIFT = 16
BLOCK = 1 << BLOCK_SHIFT  # bytes of tar data under one checksum
VERIFIED_BLOCKS = 128  # checked blocks kept in memory (8 MiB): small files share blocks
READAHEAD = 8 << 20  # bytes to prefetch after a read that had to wait for the disk

digest = xxhash.xxh3_64_intdigest
Hasher = xxhash.xxh3_64


class Damaged(CacheError):
    """A cached file does not hold what its checksums say (changed, truncated or deleted)."""


def blocks_in(size: int) -> int:
    return (size + BLOCK - 1) >> BLOCK_SHIFT


class BlockSums:
    """The checksums of a tar file's blocks, grown block by block as the file is written.

    `sums[b]` covers bytes [b * BLOCK, (b + 1) * BLOCK) of the file, the last block only up to
    `size` once the file is complete; `sealed` is how many bytes they cover (readers may use
    no byte past it)."""

    def __init__(self, sums: Iterable[int] = (), size: int | None = None) -> None:
        self.sums = array("Q", sums)
        self.size = size  # the whole file's size, once known
        self._hasher = Hasher()
        self._filled = 0  # bytes of the block being written so far

    @property
    def sealed(self) -> int:
        covered = len(self.sums) << BLOCK_SHIFT
        return covered if self.size is None else min(covered, self.size)

    def add(self, data: Any) -> None:
        """Account for `data`, the next bytes written to the file."""
        view = memoryview(data).cast("B")
        pos = 0
        if self._filled:
            take = min(BLOCK - self._filled, len(view))
            self._hasher.update(view[:take])
            self._filled += take
            pos = take
            if self._filled == BLOCK:
                self.sums.append(self._hasher.intdigest())
                self._hasher.reset()
                self._filled = 0
        while len(view) - pos >= BLOCK:
            self.sums.append(digest(view[pos:pos + BLOCK]))
            pos += BLOCK
        if pos < len(view):
            self._hasher.update(view[pos:])
            self._filled += len(view) - pos

    def finish(self, size: int) -> None:
        """The file is complete at `size` bytes (what `add` was given, in all)."""
        if self._filled:
            self.sums.append(self._hasher.intdigest())
            self._hasher.reset()
            self._filled = 0
        self.size = size

    def cut(self, fd: int, size: int) -> None:
        """The file was cut to `size` bytes (`add` saw more): sums past it go, and the last
        block's is made again from the file (bytes this process wrote moments ago)."""
        self._hasher.reset()
        self._filled = 0
        keep = size >> BLOCK_SHIFT
        del self.sums[keep:]
        if size & (BLOCK - 1):
            start = keep << BLOCK_SHIFT
            data = os.pread(fd, size - start, start)
            if len(data) != size - start:
                raise CacheError("the cache file shrank while it was being written")
            self.sums.append(digest(data))
        self.size = size


def _length(sums: BlockSums, block: int) -> int:
    return min(BLOCK, sums.sealed - (block << BLOCK_SHIFT))


def check_block(block: int, data: Any, sums: BlockSums) -> None:
    want = _length(sums, block)
    if len(data) != want:
        raise Damaged(f"the cached data is shorter than its index says (block {block}: "
                      f"{len(data)} of {want} bytes)")
    if digest(data) != sums.sums[block]:
        raise Damaged(f"the cached data does not match its checksum (block {block}, "
                      f"bytes {block << BLOCK_SHIFT}-{(block << BLOCK_SHIFT) + want - 1})")


class BlockReader:
    """Reads byte ranges of cached tar files block by block, each block checked against its
    sum before use; the last few checked blocks are kept, so that small files read one after
    another from one block check it once."""

    def __init__(self, keep: int = VERIFIED_BLOCKS) -> None:
        self._keep = keep
        self._blocks: OrderedDict[tuple[str, int], Buffer] = OrderedDict()
        self.nowait = True  # this kernel and cache filesystem take RWF_NOWAIT
        self.checked = 0  # blocks read from disk and checked (for tests and the bench)

    def forget(self, key: str) -> None:
        """Drop the kept blocks of one file (it is being replaced)."""
        for found in [k for k in self._blocks if k[0] == key]:
            del self._blocks[found]

    async def read(self, key: str, fd: int, sums: BlockSums, start: int, length: int,
                   ahead: int = 0) -> bytes | memoryview:
        """`length` bytes at `start` of the file `fd` (named `key` in the kept blocks), all
        within `sums.sealed`; raises Damaged."""
        first, last = start >> BLOCK_SHIFT, (start + length - 1) >> BLOCK_SHIFT
        found: dict[int, Buffer] = {}
        missing = []
        for block in range(first, last + 1):
            data = self._blocks.get((key, block))
            if data is None:
                missing.append(block)
            else:
                self._blocks.move_to_end((key, block))
                found[block] = data
        if missing:
            await self._load(key, fd, sums, missing, found, ahead)
        offset = start - (first << BLOCK_SHIFT)
        if first == last:
            return memoryview(found[first])[offset:offset + length]
        out = bytearray(length)
        pos = 0
        for block in range(first, last + 1):
            piece = memoryview(found[block])[offset:offset + length - pos]
            out[pos:pos + len(piece)] = piece
            pos += len(piece)
            offset = 0
        return memoryview(out)

    async def _load(self, key: str, fd: int, sums: BlockSums, missing: list[int],
                    found: dict[int, Buffer], ahead: int) -> None:
        cold = []
        for block in missing:
            data = self._read_nowait(fd, sums, block)
            if data is None:
                cold.append(block)
            else:
                found[block] = data
        if cold:  # not in the page cache: read in a worker thread, and ask for more ahead
            found.update(await trio.to_thread.run_sync(read_blocks, fd, sums, cold,
                                                       max(ahead, READAHEAD)))
        for block in missing:
            check_block(block, found[block], sums)
            self.checked += 1
            # Small reads share blocks (small files), and a sequential reader's next read
            # starts in the last block of this one: keep those, not the middle of a big read.
            if len(missing) <= 2 or block == missing[-1]:
                self._blocks[(key, block)] = found[block]
                if len(self._blocks) > self._keep:
                    self._blocks.popitem(last=False)

    def _read_nowait(self, fd: int, sums: BlockSums, block: int) -> Buffer | None:
        """A block straight from the page cache without blocking, or None."""
        if not self.nowait:
            return None
        buf = bytearray(_length(sums, block))
        try:
            got = os.preadv(fd, [buf], block << BLOCK_SHIFT, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            # tmpfs and some other filesystems refuse the flag: read in a thread from now on.
            log.info("the cache's filesystem does not take RWF_NOWAIT (%s): reading in worker "
                     "threads", exc.strerror)
            self.nowait = False
            return None
        if got != len(buf):
            return None  # partly cached, or short: the thread's read decides
        return buf


def read_blocks(fd: int, sums: BlockSums, blocks: list[int], ahead: int) -> dict[int, Buffer]:
    """Read whole blocks, blocking; a short read gives a short block (the check tells)."""
    start = blocks[0] << BLOCK_SHIFT
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, start, ahead, os.POSIX_FADV_WILLNEED)
    out: dict[int, Buffer] = {}
    for block in blocks:
        want = _length(sums, block)
        buf = bytearray(want)
        view = memoryview(buf)
        got = 0
        while got < want:
            n = os.preadv(fd, [view[got:]], (block << BLOCK_SHIFT) + got)
            if n == 0:
                break
            got += n
        out[block] = bytes(buf[:got]) if got < want else buf
    return out
