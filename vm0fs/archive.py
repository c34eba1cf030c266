"""Turns a tar.gz byte stream into what the cache stores: the tar bytes, inflated once into a
file, and the list of members with the offset of each one's data in that file.

Two halves that run in two worker threads while the download goes on:
- `TarSink.feed` inflates gzip bytes and appends them to the tar file;
- `scan_members` reads tar headers with the standard library's `tarfile` over a `GrowingFile`,
  a file object whose reads block until the sink has written the bytes they ask for, and hands
  out each member as soon as its header has been read.

Member names are untrusted: `normalize_path` decides what may appear in a version.
"""

from __future__ import annotations

import logging
import os
import stat
import tarfile
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from vm0fs.errors import ArchiveError, ArchiveTooLarge

log = logging.getLogger("vm0fs.archive")

BLOCK = tarfile.BLOCKSIZE
INFLATE_STEP = 1 << 20  # inflate at most this much per call, so a bomb cannot balloon memory
GZIP_MAGIC = b"\x1f\x8b"

FILE, DIR, LINK = "f", "d", "l"


@dataclass(slots=True)
class Member:
    """One entry of a version, as `tar -x` would leave it."""

    path: str  # normalized, relative, '/'-separated; never empty, no '.' or '..' parts
    kind: str  # FILE, DIR or LINK
    mode: int  # permission bits, setuid/setgid dropped
    mtime_ns: int
    size: int = 0
    offset: int = 0  # where the data starts in the tar file
    target: str = ""  # symlink target
    sparse: list[tuple[int, int]] | None = None  # (offset in file, length) runs of a sparse file

    def to_json(self) -> list:
        return [self.path, self.kind, self.mode, self.mtime_ns, self.size, self.offset,
                self.target, self.sparse]

    @classmethod
    def from_json(cls, row: list) -> Member:
        path, kind, mode, mtime_ns, size, offset, target, sparse = row
        runs = [(int(a), int(b)) for a, b in sparse] if sparse is not None else None
        return cls(path, kind, mode, mtime_ns, size, offset, target, runs)


def normalize_path(name: str) -> str | None:
    """The path a member lands on, or None when it must be left out.

    Like GNU tar: leading '/' and './' are stripped and empty or '.' parts dropped; a name with
    a '..' part is refused outright (it could climb out of the version).
    """
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


class Progress:
    """How far the tar file has been written, shared by the writer, the parser and readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.durable = 0  # bytes of tar data written so far
        self.ended = False  # the writer will add nothing more
        self.error: BaseException | None = None

    def advance(self, total: int) -> None:
        with self._cond:
            self.durable = total
            self._cond.notify_all()

    def end(self, error: BaseException | None = None) -> None:
        with self._cond:
            self.ended = True
            if error is not None and self.error is None:
                self.error = error
            self._cond.notify_all()

    def wait_for(self, end: int, on_wait: Callable[[], None] | None = None) -> int:
        """Block until `end` bytes exist or the writer ended; return the bytes available."""
        with self._cond:
            if self.durable < end and not self.ended and on_wait is not None:
                self._cond.release()
                try:
                    on_wait()
                finally:
                    self._cond.acquire()
            while self.durable < end and not self.ended:
                self._cond.wait()
            if self.error is not None:
                raise ArchiveError(f"download failed: {self.error}")
            return self.durable


class GrowingFile:
    """A read-only, seekable view of a tar file that is still being written."""

    def __init__(self, fd: int, progress: Progress, on_wait: Callable[[], None]) -> None:
        self._fd = fd
        self._progress = progress
        self._on_wait = on_wait
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(self.final_size() - self._pos, 0)
        available = self._progress.wait_for(self._pos + size, self._on_wait)
        size = max(min(size, available - self._pos), 0)
        data = os.pread(self._fd, size, self._pos) if size else b""
        self._pos += len(data)
        return data

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            self._pos = pos
        elif whence == os.SEEK_CUR:
            self._pos += pos
        else:  # SEEK_END: only meaningful once everything is written
            self._pos = self.final_size() + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def final_size(self) -> int:
        """The size of the whole tar file, once the writer has ended."""
        return self._progress.wait_for(1 << 62, self._on_wait)

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


class TarSink:
    """Inflates a gzip stream (one or more concatenated members) into a tar file."""

    def __init__(self, fd: int, limit: int) -> None:
        self._fd = fd
        self._limit = limit
        self._inflater = zlib.decompressobj(wbits=31)
        self._started = False  # some gzip member has been begun
        self._trailing = False  # past the last gzip member: the rest is ignored, like gzip -d
        self.written = 0

    def feed(self, data: bytes) -> int:
        """Inflate `data` and append the result; return the total tar bytes written."""
        while data and not self._trailing:
            if self._inflater.eof:
                if not data.startswith(GZIP_MAGIC[: len(data)]):
                    self._trailing = True  # trailing garbage after a complete gzip stream
                    break
                self._inflater = zlib.decompressobj(wbits=31)
            try:
                out = self._inflater.decompress(data, INFLATE_STEP)
            except zlib.error as exc:
                raise ArchiveError(f"not a valid gzip stream: {exc}") from None
            self._started = True
            self._write(out)
            data = self._inflater.unconsumed_tail or self._inflater.unused_data
        return self.written

    def finish(self) -> int:
        """Check the gzip stream ended properly; return the total tar bytes."""
        if not self._started:
            raise ArchiveError("the archive is empty")
        if not self._inflater.eof:
            self._write(self._inflater.flush())
            raise ArchiveError("the archive is truncated (gzip stream ended early)")
        return self.written

    def _write(self, out: bytes) -> None:
        if not out:
            return
        if self.written + len(out) > self._limit:
            raise ArchiveTooLarge(
                f"the archive expands to more than {self._limit} bytes (the limit for one version)"
            )
        view = memoryview(out)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self.written += len(out)


def _mtime_ns(info: tarfile.TarInfo) -> int:
    """Exact nanoseconds: a pax mtime like '1700000000.25' does not survive a float."""
    text = info.pax_headers.get("mtime")
    try:
        return int(Decimal(text) * 10**9) if text else int(info.mtime) * 10**9
    except (InvalidOperation, ValueError, OverflowError):
        return int(float(info.mtime) * 1e9)


def member_from_tarinfo(info: tarfile.TarInfo, seen: dict[str, Member]) -> Member | None:
    """The member `info` becomes, or None when it is left out (logged at DEBUG)."""
    path = normalize_path(info.name)
    if path is None:
        log.debug("left out %r: unsafe or empty name", info.name)
        return None
    mode = stat.S_IMODE(info.mode) & ~(stat.S_ISUID | stat.S_ISGID)
    mtime_ns = _mtime_ns(info)
    if info.isreg():
        sparse = [(int(a), int(b)) for a, b in info.sparse] if info.sparse is not None else None
        return Member(path, FILE, mode, mtime_ns, info.size, info.offset_data, sparse=sparse)
    if info.isdir():
        return Member(path, DIR, mode, mtime_ns)
    if info.issym():
        return Member(path, LINK, 0o777, mtime_ns, target=info.linkname)
    if info.islnk():
        # A hard link is the same content as its target, which must come earlier in the archive.
        target_path = normalize_path(info.linkname)
        target = seen.get(target_path) if target_path else None
        if target is None or target.kind == DIR:
            log.debug("left out %r: hard link to missing %r", info.name, info.linkname)
            return None
        # link(2) does not follow symlinks: a hard link to a symlink is the same symlink.
        return Member(path, target.kind, target.mode, target.mtime_ns, target.size,
                      target.offset, target.target, target.sparse)
    log.debug("left out %r: device, fifo or unknown type %r", info.name, info.type)
    return None


def scan_members(fileobj: GrowingFile, emit: Callable[[Member], None]) -> None:
    """Read every header of the tar in `fileobj` and emit the members that may appear."""
    seen: dict[str, Member] = {}  # for hard links: the latest member at each path
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r:")  # type: ignore[call-overload]  # noqa: SIM115
    except tarfile.TarError as exc:
        raise ArchiveError(f"not a tar archive: {exc}") from None
    with tar:
        while True:
            try:
                info = tar.next()
            except tarfile.TarError as exc:
                raise ArchiveError(f"corrupt tar archive: {exc}") from None
            if info is None:
                break
            tar.members.clear()  # tarfile keeps every TarInfo otherwise; we keep our own
            member = member_from_tarinfo(info, seen)
            if member is not None:
                seen[member.path] = member
                emit(member)
        end = tar.offset
    _check_clean_end(fileobj, end)


def _check_clean_end(fileobj: GrowingFile, end: int) -> None:
    """`tarfile` stops quietly at a bad or missing header; tar -x would complain: so do we."""
    if fileobj.final_size() < end:
        raise ArchiveError("the archive is truncated (tar data ends inside a member)")
    fileobj.seek(end)
    if fileobj.read(BLOCK).strip(b"\0"):
        raise ArchiveError(f"corrupt tar archive: unreadable header at byte {end}")
