"""Turns a tar.gz byte stream into what the cache stores: the tar bytes, inflated once into a
file, and the list of members with the offset of each one's data in that file.

Two halves that run in two worker threads while the download goes on:
- `TarSink.feed` inflates gzip bytes and appends them to the tar file;
- `scan_members` walks the tar headers over a `GrowingFile`, a view of the file whose reads block
  until the sink has written the bytes they ask for, and hands out each member as soon as its
  header has been read (a reader may be waiting for the first file while the rest arrives).

The header walk is hand-written. It used to be the standard library's `tarfile` alone, but
that costs ~20 us a member (512-byte reads, a checksum summed in Python, a TarInfo each): over
a second for an agent's 50,000 files, most of a cold first access. The walk reads the file in
large windows and decodes the common headers itself: ustar, GNU and v7 headers; files,
folders, links, devices and FIFOs; GNU long names and links; pax extended and global headers.
It follows `tarfile`'s reading rules field by field (checksums, number fields, name decoding,
pax records), and parts from them on purpose only where GNU tar reads otherwise (the ustar
prefix field counts only under the ustar magic: `tar --incremental` puts times there), where
`tarfile` would loop or balloon (negative sizes, giant headers, million-digit mtimes), and
where it would crash on hostile bytes (an ArchiveError instead). Whatever else turns up (GNU or
pax sparse files, unknown types, unusual header sequences) is handed to `tarfile`, one member
at a time, and the walk goes on after it. tests/test_archive_differential.py holds the walk to
the results of the old tarfile-only scan.

Member names are untrusted: `normalize_path` decides what may appear in a version.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import struct
import tarfile
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from vm0fs.errors import ArchiveError, ArchiveTooLarge
from vm0fs.integrity import BLOCK_SHIFT, BlockSums, blocks_in

log = logging.getLogger(__name__)

# Inflaters by name, with the same interface and the same bytes out: ISA-L's (python-isal)
# inflates the log archives of the bench about 2.7 times as fast as zlib does here (1,155 against
# 430 MB/s on one core); the standard library's zlib is the fallback where isal is missing.
try:
    from isal import isal_zlib
except ImportError:  # pragma: no cover - isal is a dependency; this is the fallback
    isal_zlib = None
INFLATERS: dict[str, Callable[..., Any]] = {"zlib": zlib.decompressobj}
INFLATE_ERRORS: tuple[type[Exception], ...] = (zlib.error,)
if isal_zlib is not None:
    INFLATERS["isal"] = isal_zlib.decompressobj
    INFLATE_ERRORS += (isal_zlib.error,)
INFLATER = "isal" if "isal" in INFLATERS else "zlib"

BLOCK = tarfile.BLOCKSIZE
INFLATE_STEP = 1 << 20  # inflate at most this much per call, so a bomb cannot balloon memory
GZIP_MAGIC = b"\x1f\x8b"
DRAIN_LIMIT = 4 << 20  # bytes inflated past the tar's end before the rest is dropped
WINDOW = 1 << 20  # headers are read in windows this large...
SHORT_READ = 64 << 10  # ...or this large right after a big member (the next is likely big too)
MAX_EXTENDED = 16 << 20  # the largest long name or pax header read (tarfile reads any size)

FILE, DIR, LINK = "f", "d", "l"
PERMISSIONS = 0o7777 & ~(stat.S_ISUID | stat.S_ISGID)  # what a member's mode keeps


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
    bounded = f"/{name}/"
    if "//" not in bounded and "/./" not in bounded and "/../" not in bounded:
        return name  # already normal: the usual case, without splitting
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


class Progress:
    """How far the tar file has been written, shared by the writer, the parser and readers.

    `durable` counts only bytes under a checksum (whole blocks, then the rest once the file is
    complete): nobody reads a byte that could not be checked."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.durable = 0  # bytes of tar data written and under a checksum so far
        self.ended = False  # the writer will add nothing more
        self.error: BaseException | None = None
        self.archive_end: int | None = None  # where the parser found the tar's end
        self.parsed = False  # the parser is done (archive_end set, or it failed)
        self.parser_wants: int | None = None  # the bytes the parser waits for, if it waits

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

    def parser_done(self, archive_end: int | None) -> None:
        with self._cond:
            self.archive_end = archive_end
            self.parsed = True
            self._cond.notify_all()

    def wait_for_parser(self) -> int | None:
        """For a writer about to pass its limit: block until the parser has found the tar's
        end (returned), or waits for bytes past what is written, or failed (None)."""
        with self._cond:
            while not self.parsed and self.error is None and (
                    self.parser_wants is None or self.parser_wants <= self.durable):
                self._cond.wait()
            return self.archive_end

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
                self.parser_wants = end
                self._cond.notify_all()
                self._cond.wait()
            self.parser_wants = None
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

    def read_at(self, pos: int, least: int, most: int) -> bytes:
        """Up to `most` bytes at `pos`, as soon as `least` of them are written (fewer only where
        the file ends); the read position does not move."""
        available = self._progress.wait_for(pos + least, self._on_wait)
        size = min(available, pos + most) - pos
        return os.pread(self._fd, size, pos) if size > 0 else b""

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
    """Inflates a gzip stream (one or more concatenated members) into a tar file, with the
    checksums of its blocks (`sums`), and stops writing where the tar ends.

    The tar ends at its end-of-archive blocks, as GNU tar reads it: once the parser has found
    them (`progress.archive_end`), what follows is inflated but not written, up to DRAIN_LIMIT
    bytes (enough for any record padding, so that a damaged gzip stream is still noticed), and
    then the rest of the stream is not needed (`done`). Nothing is written past `limit`: a
    writer about to pass it waits for the parser, which either finds the end (a bomb of zeros
    after a small tar) or needs the bytes (the tar really is that big: ArchiveTooLarge)."""

    def __init__(self, fd: int, limit: int, progress: Progress | None = None,
                 limit_text: str = "", inflater: str = INFLATER) -> None:
        self._fd = fd
        self._limit = limit
        self._decompressobj = INFLATERS[inflater]
        # What the error says of the limit: how much, and why.
        self._limit_text = limit_text or f"{limit} bytes, the limit for one version"
        self._progress = progress
        self._inflater = self._decompressobj(wbits=31)
        self._started = False  # some gzip member has been begun
        self._trailing = False  # past the last gzip member: the rest is ignored, like gzip -d
        self.written = 0
        self.sums = BlockSums()
        self.end: int | None = None  # where the tar ends, once the parser has said
        self.drained = 0  # bytes inflated past the end and dropped
        self.done = False  # the rest of the stream is not needed

    def feed(self, data: bytes) -> int:
        """Inflate `data` and append the result; return the tar bytes under a checksum."""
        while data and not self._trailing and not self.done:
            if self._inflater.eof:
                if not data.startswith(GZIP_MAGIC[: len(data)]):
                    self._trailing = True  # trailing garbage after a complete gzip stream
                    break
                self._inflater = self._decompressobj(wbits=31)
            try:
                out = self._inflater.decompress(data, INFLATE_STEP)
            except INFLATE_ERRORS as exc:
                raise ArchiveError(f"not a valid gzip stream: {exc}") from None
            self._started = True
            self._take(out)
            data = self._inflater.unconsumed_tail or self._inflater.unused_data
        return self.sums.sealed

    def finish(self) -> int:
        """Check the gzip stream ended properly, cut the file where the tar ends; return the
        size of the tar file."""
        if not self._started:
            raise ArchiveError("the archive is empty")
        if not self._inflater.eof and not self.done:
            self._take(self._inflater.flush())
            raise ArchiveError("the archive is truncated (gzip stream ended early)")
        self.sums.finish(self.written)
        return self.written

    def cut(self, archive_end: int) -> int:
        """The parser found the tar's end at `archive_end`: drop the whole blocks written past
        it (never part of a block: readers may hold its checksum); return the file's size."""
        keep = min(self.written, blocks_in(archive_end) << BLOCK_SHIFT)
        if keep < self.written:
            os.ftruncate(self._fd, keep)
            del self.sums.sums[blocks_in(keep):]
            self.sums.size = keep
            self.written = keep
        return self.written

    def _take(self, out: bytes) -> None:
        if not out:
            return
        if self.end is None and self._progress is not None:
            self.end = self._progress.archive_end
        if self.end is None and self.written + len(out) > self._limit:
            if self._progress is not None:
                self.end = self._progress.wait_for_parser()
            if self.end is None:
                raise ArchiveTooLarge(f"the archive expands past {self._limit_text}")
        if self.end is not None:  # past the tar's end: inflated only to check the stream
            self.drained += len(out)
            self.done = self.drained > DRAIN_LIMIT
            return
        view = memoryview(out)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self.sums.add(out)
        self.written += len(out)
        if self._progress is not None:  # the parser may go on (and find the end) at once
            self._progress.advance(self.sums.sealed)


def _mtime_ns(text: str | None, mtime: float) -> int:
    """Exact nanoseconds from a pax mtime `text` ('1700000000.25' does not survive a float),
    else from `mtime`, what tarfile makes of the header field or of that text."""
    try:
        if not text:
            return int(mtime) * 10**9
        seconds = Decimal(text)
        if seconds.adjusted() > 30:  # '1e999999' would be a million-digit int: absurd anyway
            raise ValueError(text)
        return int(seconds * 10**9)
    except (ArithmeticError, ValueError):  # not a number, infinite, NaN
        try:
            return int(float(mtime) * 1e9)
        except (ArithmeticError, ValueError):
            return 0


Resolve = Callable[[str], "Member | None"]  # the member now at a path, for hard links


def _member(name: str, kind: bytes, mode: int, mtime_ns: int, size: int, offset: int,
            linkname: str, sparse: list[tuple[int, int]] | None,
            seen: Resolve) -> Member | None:
    """The member a header makes (`kind`: tarfile's type byte), or None when it is left out
    (logged at DEBUG). `seen` finds the member at a path, for hard links."""
    path = normalize_path(name)
    if path is None:
        log.debug("left out %r: unsafe or empty name", name)
        return None
    mode &= PERMISSIONS
    if kind in tarfile.REGULAR_TYPES:
        return Member(path, FILE, mode, mtime_ns, size, offset, sparse=sparse)
    if kind == tarfile.DIRTYPE:
        return Member(path, DIR, mode, mtime_ns)
    if kind == tarfile.SYMTYPE:
        return Member(path, LINK, 0o777, mtime_ns, target=linkname)
    if kind == tarfile.LNKTYPE:
        # A hard link is the same content as its target, which must come earlier in the archive.
        target_path = normalize_path(linkname)
        target = seen(target_path) if target_path else None
        if target is None or target.kind == DIR:
            log.debug("left out %r: hard link to missing %r", name, linkname)
            return None
        # link(2) does not follow symlinks: a hard link to a symlink is the same symlink.
        return Member(path, target.kind, target.mode, target.mtime_ns, target.size,
                      target.offset, target.target, target.sparse)
    log.debug("left out %r: device, fifo or unknown type %r", name, kind)
    return None


def member_from_tarinfo(info: tarfile.TarInfo, seen: Resolve) -> Member | None:
    """The member `info` becomes, or None when it is left out (logged at DEBUG)."""
    sparse = [(int(a), int(b)) for a, b in info.sparse] if info.sparse is not None else None
    return _member(info.name, info.type, info.mode,
                   _mtime_ns(info.pax_headers.get("mtime"), info.mtime), info.size,
                   info.offset_data, info.linkname, sparse, seen)


# --- the header walk ---------------------------------------------------------------------------

# The fields of a header the walk reads: name, mode, uid+gid, size, mtime, chksum, typeflag,
# linkname, magic, (version, uname, gname: not needed), devmajor+devminor, prefix.
HEADER = struct.Struct("100s8s16s12s12s8sc100s6s2x64x16s155s")
USTAR_MAGIC = b"ustar\0"  # the prefix field exists only under this magic (GNU tar's rule)
ENCODING = tarfile.ENCODING  # how tarfile decodes header names (the filesystem's encoding)
LONGNAME, LONGLINK = tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK
PAX_HEADER, PAX_GLOBAL = tarfile.XHDTYPE, tarfile.XGLTYPE
EXTENDED_TYPES = frozenset((LONGNAME, LONGLINK, PAX_HEADER, PAX_GLOBAL))
V7_REGULAR = tarfile.AREGTYPE
FILE_TYPES = frozenset((tarfile.REGTYPE, V7_REGULAR, tarfile.CONTTYPE))  # GNU sparse: tarfile's
FAST_TYPES = FILE_TYPES | {tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                              tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE}
PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")  # tarfile's own patterns, for the same results
PAX_HDRCHARSET = re.compile(rb"\d+ hdrcharset=([^\n]+)\n")


def _number(field: bytes) -> int:
    """A number field as tarfile reads it: octal text up to the first NUL, or GNU base-256."""
    try:
        return int(field.split(b"\0", 1)[0], 8)  # the usual case, all in C
    except ValueError:
        return tarfile.nti(field)  # base-256, blank, or InvalidHeaderError


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def _text(raw: bytes) -> str:
    """A NUL-terminated name field, decoded like tarfile does."""
    return raw.split(b"\0", 1)[0].decode(ENCODING, "surrogateescape")


def _pax_decode(raw: bytes, encoding: str, fallback: str) -> str:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError:
        return raw.decode(fallback, "surrogateescape")


def _pax_records(data: bytes, inherited: dict[str, str]) -> dict[str, str]:
    """`inherited` updated with the records of a pax header's data, read the way tarfile
    reads them (the records of a global header, or those of an extended one on top of them)."""
    records = dict(inherited)
    match = PAX_HDRCHARSET.search(data) if b"hdrcharset=" in data else None  # a slow search
    try:
        if match is not None:
            records["hdrcharset"] = match.group(1).decode("utf-8")
        names = ENCODING if records.get("hdrcharset") == "BINARY" else "utf-8"
        pos = 0
        while (match := PAX_RECORD.match(data, pos)) is not None:
            length = int(match.group(1))
            if length == 0:
                raise ValueError("a record of length 0")
            value = data[match.end(2) + 1:match.start(1) + length - 1]
            keyword = _pax_decode(match.group(2), "utf-8", "utf-8")
            if keyword in tarfile.PAX_NAME_FIELDS:
                records[keyword] = _pax_decode(value, names, ENCODING)
            else:
                records[keyword] = _pax_decode(value, "utf-8", "utf-8")
            pos += length
    except ValueError as exc:  # a bad length or charset
        raise ArchiveError(f"corrupt tar archive: bad pax header ({exc})") from None
    return records


def _pax_number(text: str, convert: Callable[[str], float]) -> float:
    try:
        return convert(text)
    except ValueError:
        return 0  # as tarfile does


def _plain_globals(records: dict[str, str]) -> bool:
    """Whether the walk may apply these global records itself (tarfile's handling of a global
    name, size or sparse map is left to tarfile)."""
    return not any(key in ("path", "linkpath", "size") or key.startswith("GNU.sparse.")
                   for key in records)


class _Walker:
    """Walks the headers of a growing tar file; see the module docstring."""

    def __init__(self, fileobj: GrowingFile, emit: Callable[[Member], None],
                 resolve: Resolve | None = None) -> None:
        self.file = fileobj
        self.emit = emit
        # For hard links: the latest member at each path, unless the caller knows them.
        self.seen: dict[str, Member] = {}
        self.keep_seen = resolve is None
        self.resolve = resolve or self.seen.get
        self.pax_globals: dict[str, str] = {}  # the records of the pax global headers so far
        self.plain_globals = True
        self.buf = b""  # the file's bytes from self.base on, as last read
        self.base = 0
        self.end = 0  # where the member being read starts; at the end, where the tar ends
        # Fields that repeat from header to header (owners, devices, modes), already decoded;
        # no larger than `seen` however they vary.
        self.valid_ids: set[bytes] = set()
        self.modes: dict[bytes, int] = {}

    def run(self) -> int:
        """Walk every member; return where the tar ends (its end-of-archive block, or EOF)."""
        pos: int | None = 0
        while pos is not None:
            self.end = pos
            pos = self.member_at(pos)
        return self.end

    def window(self, pos: int, least: int) -> tuple[bytes, int]:
        """A buffer and the index in it of the file's bytes at `pos`: at least `least` of them,
        unless the file ends sooner. Waits only for those."""
        i = pos - self.base
        if i >= 0 and i + least <= len(self.buf):
            return self.buf, i
        most = WINDOW if pos < self.base + len(self.buf) + WINDOW else SHORT_READ
        self.buf = self.file.read_at(pos, least, max(least, most))
        self.base = pos
        return self.buf, 0

    def member_at(self, start: int) -> int | None:
        """Read one member's headers (with the long-name and pax headers before it) from
        `start`, emit it, and return where the next member starts; None at the end."""
        globals_before = self.pax_globals
        tarfile_only = not self.plain_globals  # something only tarfile reads as it should
        longname = longlink = None
        pax: dict[str, str] | None = None
        pos = start
        while True:
            header = self.header_at(pos, start)
            if header is None:
                return None
            fields, mode, size, mtime = header
            kind = fields[6]
            if kind not in EXTENDED_TYPES:
                break
            # A long name or pax header: its data is about the header that follows.
            if not 0 <= size <= MAX_EXTENDED:
                raise ArchiveError(f"corrupt tar archive: extended header of {size} bytes at "
                                   f"byte {pos}")
            length = _padded(size)
            buf, i = self.window(pos + BLOCK, length)
            if len(buf) - i < length:
                raise ArchiveError("corrupt tar archive: it ends inside an extended header")
            data = buf[i:i + length]
            pos += BLOCK + length
            if kind == PAX_GLOBAL:
                tarfile_only |= pax is not None or longname is not None or longlink is not None
                self.pax_globals = _pax_records(data, self.pax_globals)
                self.plain_globals = _plain_globals(self.pax_globals)
                tarfile_only |= not self.plain_globals
            elif kind == PAX_HEADER:
                tarfile_only |= pax is not None or longname is not None or longlink is not None
                pax = _pax_records(data, self.pax_globals)
                tarfile_only |= b"GNU.sparse." in data and any(
                    key.startswith("GNU.sparse.") for key in pax)
            elif kind == LONGNAME:
                tarfile_only |= pax is not None or longname is not None
                longname = _text(data)
            else:
                tarfile_only |= pax is not None or longlink is not None
                longlink = _text(data)
        if tarfile_only or kind not in FAST_TYPES:
            self.pax_globals = globals_before
            return self.delegate(start)

        name = fields[0].split(b"\0", 1)[0]
        # tarfile's v7 rule: an old-style regular file whose own name ends in '/' is a folder.
        if kind == V7_REGULAR and name.endswith(b"/"):
            kind = tarfile.DIRTYPE
        if longname is not None:
            path = longname
        elif fields[8] == USTAR_MAGIC and fields[10][0]:
            path = _text(fields[10]) + "/" + name.decode(ENCODING, "surrogateescape")
        else:
            path = name.decode(ENCODING, "surrogateescape")
        linkname = fields[7]
        link = longlink if longlink is not None else _text(linkname) if linkname[0] else ""
        records = pax if pax is not None else self.pax_globals
        if records:
            if pax is not None:
                path = pax.get("path", path)
                link = pax.get("linkpath", link)
                if "size" in pax:
                    size = int(_pax_number(pax["size"], int))
            text = records.get("mtime")
            if text is not None:
                mtime = _pax_number(text, float)
            mtime_ns = _mtime_ns(text, mtime)
        else:
            mtime_ns = mtime * 1_000_000_000
        offset = pos + BLOCK
        end = offset
        if kind in FILE_TYPES:
            if size < 0:
                raise ArchiveError(f"corrupt tar archive: negative size at byte {pos}")
            end += _padded(size)
        member = _member(path, kind, mode, mtime_ns, size, offset, link, None, self.resolve)
        if member is not None:
            self.record(member)
        return end

    def header_at(self, pos: int, start: int,
                  ) -> tuple[tuple[bytes, ...], int, int, int] | None:
        """The header block at `pos` (of the member that starts at `start`), checked as tarfile
        checks it: (raw fields, mode, size, mtime); None at the end of the archive."""
        buf, i = self.buf, pos - self.base
        if i < 0 or i + BLOCK > len(buf):
            buf, i = self.window(pos, BLOCK)
            if len(buf) - i < BLOCK:
                self.end_of_file(buf[i:], pos, start)
                return None
        fields = HEADER.unpack_from(buf, i)
        try:
            try:  # the usual octal fields, all in C
                chksum = int(fields[5].split(b"\0", 1)[0], 8)
                size = int(fields[3].split(b"\0", 1)[0], 8)
                mtime = int(fields[4].split(b"\0", 1)[0], 8)
            except ValueError:
                chksum, size, mtime = _number(fields[5]), _number(fields[3]), _number(fields[4])
            # The sum of the block's bytes, the checksum field counted as spaces; adler32 of
            # 256 bytes holds their exact sum in its low half (255 * 256 < 65521).
            unsigned = (256 + (zlib.adler32(buf[i:i + 256], 0) & 0xFFFF)
                        + (zlib.adler32(buf[i + 256:i + BLOCK], 0) & 0xFFFF) - sum(fields[5]))
            if chksum != unsigned and chksum not in tarfile.calc_chksums(buf[i:i + BLOCK]):
                raise tarfile.InvalidHeaderError("bad checksum")
            mode = self.modes.get(fields[1])
            if mode is None:
                mode = _number(fields[1])
                self.modes[fields[1]] = mode
            if fields[2] not in self.valid_ids or fields[9] not in self.valid_ids:
                self.check_ids(fields[2], fields[9])
        except tarfile.HeaderError as exc:
            if not buf[i:i + BLOCK].strip(b"\0"):
                if pos != start:
                    raise ArchiveError("corrupt tar archive: it ends right after an extended "
                                       "header") from None
                return None  # the end-of-archive marker
            if pos == 0:
                raise ArchiveError(f"not a tar archive: {exc}") from None
            raise ArchiveError(f"corrupt tar archive: unreadable header at byte {pos} "
                               f"({exc})") from None
        return fields, mode, size, mtime

    def check_ids(self, *fields: bytes) -> None:
        """uid/gid and devmajor/devminor are never used, but tarfile refuses a header where
        they are not numbers: so do we. Raises tarfile.InvalidHeaderError."""
        for pair in fields:
            tarfile.nti(pair[:8])
            tarfile.nti(pair[8:])
            self.valid_ids.add(pair)

    def end_of_file(self, rest: bytes, pos: int, start: int) -> None:
        """Judge a file that ends at or inside the header block at `pos`: a clean end (EOF on a
        block boundary, or zeros), or an error."""
        if not rest and self.file.final_size() < pos:
            raise ArchiveError("the archive is truncated (tar data ends inside a member)")
        if pos != start:
            raise ArchiveError("corrupt tar archive: it ends right after an extended header")
        if pos == 0:
            raise ArchiveError("not a tar archive: " + ("truncated header" if rest else
                                                        "empty file"))
        if rest.strip(b"\0"):
            raise ArchiveError(f"corrupt tar archive: unreadable header at byte {pos}")

    def delegate(self, start: int) -> int:
        """Let tarfile read the member whose first header is at `start` (sparse files, unknown
        types, unusual header sequences); return where the next member starts."""
        self.file.seek(start)
        try:
            # Its pax_headers argument carries the global records in force into the new reader.
            tar = tarfile.TarFile(fileobj=self.file, mode="r",  # type: ignore[arg-type]
                                  format=tarfile.PAX_FORMAT, pax_headers=dict(self.pax_globals))
        except ArchiveError:
            raise
        except (tarfile.TarError, ValueError, IndexError, ArithmeticError) as exc:
            # tarfile meets malformed input with more than TarError (a bad sparse map...).
            prefix = "not a tar archive" if start == 0 else "corrupt tar archive"
            raise ArchiveError(f"{prefix}: {exc} (at byte {start})") from None
        info, end = tar.firstmember, tar.offset
        if info is None or end <= start:  # only tarfile found it unreadable, or it would loop
            raise ArchiveError(f"corrupt tar archive: unreadable header at byte {start}")
        self.pax_globals = tar.pax_headers
        self.plain_globals = _plain_globals(tar.pax_headers)
        member = member_from_tarinfo(info, self.resolve)
        if member is not None:
            self.record(member)
        return end

    def record(self, member: Member) -> None:
        if self.keep_seen:
            self.seen[member.path] = member
        self.emit(member)


def scan_members(fileobj: GrowingFile, emit: Callable[[Member], None],
                 resolve: Resolve | None = None) -> int:
    """Read every header of the tar in `fileobj` and emit the members that may appear, each as
    soon as its header has been read; return where the tar ends (its end-of-archive block).
    `resolve(path)` gives the member now at a path (for hard links) when the caller keeps
    them; otherwise the walk keeps every member for that."""
    return _Walker(fileobj, emit, resolve).run()
