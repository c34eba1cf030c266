"""The header walk of `vm0fs.archive.scan_members` against the tarfile-only scan it replaced
(kept below as the reference): the same members, in the same order, for every archive shape
we can make (the builders of tests/archives.py, GNU tar in each format, tarfile in each format,
a seeded random generator), read whole or while it is written in small pieces; and for
corrupted archives, an ArchiveError (never a hang, never another exception) wherever the
reference fails.

Where the two differ on purpose (see the module docstring of vm0fs.archive), the tests say so.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import random
import shutil
import stat
import subprocess
import tarfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

import pytest
from archives import (
    CASES,
    CORRUPT,
    M,
    ambiguous_pair,
    dir_,
    empty_archive,
    hard,
    hostile_write_through,
    later_wins_beyond_tar,
    reg,
    sparse_file,
    special,
    sym,
    tar_bytes,
    tiny,
)

from vm0fs import archive
from vm0fs.archive import (
    INFLATERS,
    GrowingFile,
    Member,
    Progress,
    normalize_path,
    scan_members,
)
from vm0fs.errors import ArchiveError

pytestmark = pytest.mark.timeout(300)

WAIT = 20.0  # seconds any one parse may take before it counts as a hang
HAS_TAR = shutil.which("tar") is not None

# --- the reference: vm0fs.archive's scan before the header walk (verbatim but for a guard
# against tarfile's endless loop, and without the logging) ------------------------------------


def ref_mtime_ns(info: tarfile.TarInfo) -> int:
    text = info.pax_headers.get("mtime")
    try:
        return int(Decimal(text) * 10**9) if text else int(info.mtime) * 10**9
    except (InvalidOperation, ValueError, OverflowError):
        return int(float(info.mtime) * 1e9)


def ref_member_from_tarinfo(info: tarfile.TarInfo, seen: dict[str, Member]) -> Member | None:
    path = normalize_path(info.name)
    if path is None:
        return None
    mode = stat.S_IMODE(info.mode) & ~(stat.S_ISUID | stat.S_ISGID)
    mtime_ns = ref_mtime_ns(info)
    if info.isreg():
        sparse = [(int(a), int(b)) for a, b in info.sparse] if info.sparse is not None else None
        return Member(path, archive.FILE, mode, mtime_ns, info.size, info.offset_data,
                      sparse=sparse)
    if info.isdir():
        return Member(path, archive.DIR, mode, mtime_ns)
    if info.issym():
        return Member(path, archive.LINK, 0o777, mtime_ns, target=info.linkname)
    if info.islnk():
        target_path = normalize_path(info.linkname)
        target = seen.get(target_path) if target_path else None
        if target is None or target.kind == archive.DIR:
            return None
        return Member(path, target.kind, target.mode, target.mtime_ns, target.size,
                      target.offset, target.target, target.sparse)
    return None


def ref_scan_members(fileobj: GrowingFile, emit: Callable[[Member], None],
                     header_ends: list[int] | None = None) -> None:
    """`header_ends` gets, for each member emitted, where its headers end (tarfile's
    offset_data): the walk may not emit it before those bytes exist, and must once they do."""
    seen: dict[str, Member] = {}
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
            # The guard: a negative size sends tarfile back to a header it has read (forever).
            if tar.offset <= info.offset:
                raise ArchiveError("reference: tarfile would loop")
            tar.members.clear()
            member = ref_member_from_tarinfo(info, seen)
            if member is not None:
                seen[member.path] = member
                emit(member)
                if header_ends is not None:
                    header_ends.append(info.offset_data)
        end = tar.offset
    if fileobj.final_size() < end:
        raise ArchiveError("the archive is truncated (tar data ends inside a member)")
    fileobj.seek(end)
    if fileobj.read(tarfile.BLOCKSIZE).strip(b"\0"):
        raise ArchiveError(f"corrupt tar archive: unreadable header at byte {end}")


# --- running a scan ---------------------------------------------------------------------------


@dataclass
class Outcome:
    members: list[Member]
    error: BaseException | None = None
    header_ends: list[int] | None = None

    def __str__(self) -> str:
        return f"error {self.error!r}" if self.error else f"{len(self.members)} members"


class WatchedProgress(Progress):
    """A Progress that tells the writer whenever the parser blocks for more bytes: then it
    has emitted every member it can (Progress.wait_for, plus the `blocked` signal)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocked = threading.Event()

    def wait_for(self, end: int, on_wait: Callable[[], None] | None = None) -> int:
        with self._cond:
            short = self.durable < end and not self.ended
        if short and on_wait is not None:
            on_wait()
        with self._cond:
            while self.durable < end and not self.ended:
                self.blocked.set()  # under the lock: the writer's next advance comes after
                self._cond.wait()
            if self.error is not None:
                raise ArchiveError(f"download failed: {self.error}")
            return self.durable


def run_scan(scan: Callable[..., None], fd: int, progress: Progress,
             on_wait: Callable[[], None] = lambda: None, **kwargs: object,
             ) -> tuple[threading.Thread, Outcome]:
    """Start `scan` in a thread (daemon: a hang must not keep pytest alive)."""
    outcome = Outcome([])

    def parse() -> None:
        try:
            scan(GrowingFile(fd, progress, on_wait), outcome.members.append, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - judged by the test
            outcome.error = exc

    thread = threading.Thread(target=parse, daemon=True)
    thread.start()
    return thread, outcome


def finished(thread: threading.Thread, outcome: Outcome) -> Outcome:
    thread.join(WAIT)
    assert not thread.is_alive(), "the scan hangs"
    return outcome


def scan_complete(tar: bytes, tmp: Path, reference: bool = False) -> Outcome:
    """Scan a tar file written in full beforehand."""
    path = tmp / ("ref.tar" if reference else "new.tar")
    path.write_bytes(tar)
    fd = os.open(path, os.O_RDONLY)
    try:
        progress = Progress()
        progress.advance(len(tar))
        progress.end()
        if reference:
            ends: list[int] = []
            outcome = finished(*run_scan(ref_scan_members, fd, progress, header_ends=ends))
            outcome.header_ends = ends
            return outcome
        return finished(*run_scan(scan_members, fd, progress))
    finally:
        os.close(fd)


def scan_streaming(tar: bytes, tmp: Path, rng: random.Random, max_chunk: int,
                   ref: Outcome | None = None) -> Outcome:
    """Scan while the file is written in random pieces. After each piece, wait until the
    parser blocks for more (its `on_wait`) or stops, and check it has emitted exactly the
    members whose headers are all written (`ref.header_ends`), no fewer: promptness."""
    path = tmp / "stream.tar"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    progress = WatchedProgress()
    thread, outcome = run_scan(scan_members, fd, progress)
    try:
        written = 0
        while written < len(tar):
            piece = tar[written:written + rng.randint(1, max_chunk)]
            progress.blocked.clear()
            os.pwrite(fd, piece, written)
            written += len(piece)
            progress.advance(written)
            deadline = time.monotonic() + WAIT
            while thread.is_alive() and not progress.blocked.wait(0.002):
                assert time.monotonic() < deadline, "the scan neither blocks nor ends"
            if ref is not None and ref.header_ends is not None and thread.is_alive():
                due = sum(1 for end in ref.header_ends if end <= written)
                assert len(outcome.members) >= due, (
                    f"{due} members are readable at byte {written}, "
                    f"{len(outcome.members)} emitted")
                assert len(outcome.members) <= due or ref.error is not None
        progress.end()
        return finished(thread, outcome)
    finally:
        progress.end()
        thread.join(WAIT)
        os.close(fd)


def scan_free_running(tar: bytes, tmp: Path, rng: random.Random, max_chunk: int) -> Outcome:
    """Scan while a writer appends random pieces as fast as it can."""
    path = tmp / "free.tar"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    progress = Progress()
    thread, outcome = run_scan(scan_members, fd, progress)
    try:
        written = 0
        while written < len(tar):
            piece = tar[written:written + rng.randint(1, max_chunk)]
            os.pwrite(fd, piece, written)
            written += len(piece)
            progress.advance(written)
        progress.end()
        return finished(thread, outcome)
    finally:
        progress.end()
        thread.join(WAIT)
        os.close(fd)


def assert_agree(new: Outcome, ref: Outcome, label: str) -> None:
    """The walk gives the reference's members; where the reference fails, an ArchiveError (the
    reference's own crashes, a few of tarfile's other exceptions, may become either)."""
    if new.error is not None and not isinstance(new.error, ArchiveError):
        raise AssertionError(f"{label}: unexpected {new.error!r}") from new.error
    if ref.error is None:
        assert new.error is None, f"{label}: the reference reads it, the walk says {new.error}"
        assert new.members == ref.members, f"{label}: members differ"
    elif isinstance(ref.error, ArchiveError):
        assert new.error is not None, f"{label}: the reference fails ({ref.error}), not the walk"


def piece_size(tar: bytes, rng: random.Random) -> int:
    """The largest piece to write at once: a few to a few hundred pieces per archive (some
    of one byte), so headers arrive cut everywhere without the test crawling."""
    return max(1, len(tar) // rng.choice([4, 40, 150]))


def check(tar: bytes, tmp: Path, label: str, rng: random.Random | None = None,
          free_running: bool = True) -> Outcome:
    """Compare the walk with the reference on `tar`, whole and streamed; return the walk's."""
    ref = scan_complete(tar, tmp, reference=True)
    new = scan_complete(tar, tmp)
    assert_agree(new, ref, label)
    if rng is not None:
        max_chunk = piece_size(tar, rng)
        streamed = scan_streaming(tar, tmp, rng, max_chunk, ref)
        assert_agree(streamed, ref, f"{label} (streamed)")
        assert streamed.members == new.members, f"{label}: streamed differently"
        assert (streamed.error is None) == (new.error is None), label
        if free_running:
            free = scan_free_running(tar, tmp, rng, max_chunk)
            assert free.members == new.members and (free.error is None) == (new.error is None)
    return new


def gunzip(data: bytes) -> bytes:
    """The tar bytes TarSink would write for `data` (as many as inflate, for a broken one)."""
    out = []
    while data:
        inflater = zlib.decompressobj(wbits=31)
        try:
            out.append(inflater.decompress(data))
        except zlib.error:
            break
        if not inflater.eof:
            out.append(inflater.flush())
            break
        data = inflater.unused_data
        if not data.startswith(b"\x1f\x8b"):
            break
    return b"".join(out)


# --- the corpus -------------------------------------------------------------------------------


def builder_archives(work: Path) -> Iterator[tuple[str, bytes]]:
    for name, build in CASES.items():
        yield name, gunzip(build())
    for name, build in CORRUPT.items():
        yield f"corrupt-{name}", gunzip(build())
    yield "later-wins", gunzip(later_wins_beyond_tar())
    yield "empty-archive", gunzip(empty_archive())
    yield "hostile-write-through", gunzip(hostile_write_through())
    yield "tiny", gunzip(tiny(7))
    yield "ambiguous-pair", gunzip(ambiguous_pair()[1])
    for fmt in ("gnu", "posix"):
        data = sparse_file(fmt, work)
        if data is not None:
            yield f"sparse-{fmt}", gunzip(data)


def make_tree(root: Path, long_names: bool) -> None:
    """Folders, files (one sparse), symlinks, hard links, a FIFO and a device, odd names."""
    (root / "d" / "e").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "d" / "f.txt").write_bytes(b"f" * 700)
    (root / "d" / "e" / "g.bin").write_bytes(bytes(range(256)) * 9)
    (root / "zero").write_bytes(b"")
    os.symlink("d/f.txt", root / "link")
    os.symlink("../nowhere", root / "d" / "dangling")
    os.link(root / "d" / "f.txt", root / "hard")
    os.link(root / "link", root / "hard-to-link", follow_symlinks=False)
    os.mkfifo(root / "fifo")
    with contextlib.suppress(OSError):  # not allowed here: no device then
        os.mknod(root / "null", 0o600 | 0o020000, os.makedev(1, 3))
    (root / "unicodé ✓.txt").write_text("u\n")
    with open(os.path.join(os.fsencode(root), b"latin-caf\xe9"), "wb") as f:
        f.write(b"not utf-8\n")
    (root / "setuid").write_text("#!/bin/sh\n")
    os.chmod(root / "setuid", 0o4755)
    with open(root / "sparse.bin", "wb") as f:
        f.write(b"start")
        f.seek(300_000)
        f.write(b"middle" * 100)
        f.truncate(700_000)
    if long_names:
        deep = root / ("long-" + "n" * 90) / ("deeper-" + "é" * 60)
        deep.mkdir(parents=True)
        (deep / ("file-" + "x" * 120)).write_text("long\n")
        os.symlink("t/" * 80 + "target", root / "long-link")
        os.link(deep / ("file-" + "x" * 120), root / "hard-to-long")
    else:
        mid = root / ("p" * 90) / ("q" * 60)  # 200 characters: the ustar prefix field
        mid.mkdir(parents=True)
        (mid / "r.txt").write_text("prefix\n")
    for path in sorted(root.rglob("*"), reverse=True):
        os.utime(path, (1_600_000_000.5, 1_600_000_000.25), follow_symlinks=False)


def gnu_tar_archives(work: Path) -> Iterator[tuple[str, bytes]]:
    if not HAS_TAR:
        return
    for fmt in ("gnu", "oldgnu", "posix", "ustar", "v7"):
        long_names = fmt in ("gnu", "oldgnu", "posix")
        src = work / f"tree-{fmt}"
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        make_tree(src, long_names)
        variants = [[]]
        if long_names:
            variants.append(["--sparse"])
        if fmt == "posix":
            variants += [["--sparse", f"--sparse-version={v}"] for v in ("0.0", "0.1", "1.0")]
        for extra in variants:
            out = work / f"{fmt}.tar"
            result = subprocess.run(
                ["tar", f"--format={fmt}", *extra, "-cf", str(out), "-C", str(src), "."],
                capture_output=True, timeout=60)
            assert result.returncode in (0, 2), result.stderr  # 2: a name the format cannot hold
            yield f"gnu-tar-{fmt}{''.join(extra)}", out.read_bytes()


def random_name(rng: random.Random, fmt: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789-_. "
    odd = ["é", "日本", "🎉", "\u0301", "ß", "\\", "\t", "~", "'"]
    parts = []
    for _ in range(rng.choice([1, 1, 2, 3, 4, 6])):
        length = rng.choice([1, 8, 30, 60, 120]) if rng.random() < 0.3 else rng.randint(1, 10)
        part = "".join(rng.choice(alphabet) for _ in range(length))
        if rng.random() < 0.15:
            part += rng.choice(odd)
        parts.append(part)
    name = "/".join(parts)
    r = rng.random()
    if r < 0.05:
        name = "./" + name
    elif r < 0.07:
        name = "/" + name
    elif r < 0.09:
        name = name.replace("/", "//", 1)
    elif r < 0.10:
        name = "../" + name
    elif r < 0.11:
        name = name + "/."
    if fmt == tarfile.USTAR_FORMAT:
        name = name.encode()[:200].decode(errors="ignore").strip("/") or "u"
    return name


def random_members(rng: random.Random, fmt: int) -> list[M]:
    members: list[M] = []
    names: list[str] = []
    for _ in range(rng.randint(0, 30)):
        r = rng.random()
        name = rng.choice(names) if names and r < 0.1 else random_name(rng, fmt)  # duplicates
        mtime: float = rng.choice([0, 1, 1_600_000_000, 2**33 + 5, -1_000_000])
        if fmt == tarfile.PAX_FORMAT and rng.random() < 0.4:
            mtime = 1_600_000_000 + rng.randint(0, 10**6) / rng.choice([4, 1000, 10**6])
        mode = rng.choice([0o644, 0o755, 0o600, 0o4755, 0o2775, 0o1777, 0o000])
        kind = rng.random()
        if kind < 0.6:
            m = reg(name, rng.randbytes(rng.choice([0, 1, 511, 512, 513, rng.randint(0, 5000)])),
                    mode, mtime)
        elif kind < 0.72:
            m = dir_(name + rng.choice(["", "/"]), mode, mtime)
        elif kind < 0.84:
            target = rng.choice(names) if names and rng.random() < 0.5 else random_name(rng, fmt)
            m = sym(name, target, mtime)
        elif kind < 0.95:
            target = rng.choice(names) if names and rng.random() < 0.8 else "missing"
            m = hard(name, target, mtime)
        else:
            m = special(name, rng.choice([tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE]),
                        1, 3)
        if rng.random() < 0.1:
            m.info.uid = rng.choice([0, 2**21, 2**40])
        if fmt == tarfile.PAX_FORMAT and rng.random() < 0.15:
            m.info.pax_headers = rng.choice([
                {"comment": "a comment"},
                {"mtime": f"{rng.randint(-10**9, 10**10)}.{rng.randint(0, 10**9):09d}"},
                {"uname": "ü", "gname": "grp", "atime": "1.5"},
                {"path": random_name(rng, fmt)},
                {"unknown.key": "x=y\nz"},
            ])
        members.append(m)
        names.append(name)
    return members


def random_globals(rng: random.Random) -> dict[str, str] | None:
    return rng.choice([
        None, None, None,
        {"comment": "global"},
        {"mtime": "1234567890.123456789"},
        {"uname": "agent", "hdrcharset": "BINARY"},
        {"path": "every/member/is/this"},  # only tarfile's reading applies it
        {"linkpath": "global-target"},
    ])


def to_v7(tar: bytes) -> bytes | None:
    """The same archive with v7 headers (no magic), when it has only plain GNU headers; a v7
    regular file named with a trailing '/' is a folder to tarfile."""
    out = bytearray(tar)
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as t:
        infos = t.getmembers()
    for info in infos:
        if info.offset_data - info.offset != tarfile.BLOCKSIZE:
            return None  # a long-name header: v7 has none
        header = out[info.offset:info.offset + tarfile.BLOCKSIZE]
        header[257:265] = bytes(8)
        kind = header[156:157]
        slash = header[0:100].rstrip(b"\0").endswith(b"/")
        if kind == tarfile.REGTYPE or (kind == tarfile.DIRTYPE and slash):
            header[156:157] = tarfile.AREGTYPE
        fix_checksum(header)
        out[info.offset:info.offset + tarfile.BLOCKSIZE] = header
    return bytes(out)


def fix_checksum(header: bytearray) -> None:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)


def random_archives(count: int, seed: int) -> Iterator[tuple[str, bytes]]:
    rng = random.Random(seed)
    formats = [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT]
    for i in range(count):
        fmt = formats[i % 3]
        members = random_members(rng, fmt)
        kwargs: dict[str, object] = {}
        if fmt == tarfile.PAX_FORMAT and (pax := random_globals(rng)) is not None:
            kwargs["pax_headers"] = pax
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt, **kwargs) as tar:  # type: ignore[call-overload]
            for m in members:
                with contextlib.suppress(ValueError):  # a name or number the format lacks
                    tar.addfile(m.info, io.BytesIO(m.data) if m.data is not None else None)
        data = buf.getvalue()
        r = rng.random()
        if r < 0.1 and members:  # no end-of-archive blocks: EOF right after the last member
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as t:
                t.getmembers()
                data = data[:t.offset]
        elif r < 0.15:
            data += b"\0" * rng.randint(1, 1500)
        elif r < 0.25 and fmt == tarfile.GNU_FORMAT and (v7 := to_v7(data)) is not None:
            data = v7
        yield f"random-{seed}-{i}", data


# --- hand-made headers: unusual chains, odd number fields, pax records -------------------------

B = tarfile.BLOCKSIZE


def octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def header(name: bytes = b"f", kind: bytes = b"0", size: int | bytes = 0, *,
           mode: bytes = b"0000644\0", ids: bytes = b"0001750\0" * 2,
           mtime: bytes = b"13700000000\0", linkname: bytes = b"", magic: bytes = b"ustar\0",
           version: bytes = b"00", prefix: bytes = b"", devs: bytes = b"0000000\0" * 2,
           chksum: str = "unsigned", tail: bytes = b"") -> bytes:
    """One header block, every field as given (`chksum`: 'unsigned', 'signed', 'spaces' for
    a space-terminated checksum, or 'bad'); `tail`: bytes 500..512."""
    raw = bytearray(B)
    raw[0:100] = name.ljust(100, b"\0")[:100]
    raw[100:108] = mode
    raw[108:124] = ids
    raw[124:136] = octal(size, 12) if isinstance(size, int) else size
    raw[136:148] = mtime
    raw[156:157] = kind
    raw[157:257] = linkname.ljust(100, b"\0")[:100]
    raw[257:263] = magic
    raw[263:265] = version
    raw[329:345] = devs
    raw[345:500] = prefix.ljust(155, b"\0")[:155]
    raw[500:500 + len(tail)] = tail
    raw[148:156] = b" " * 8
    unsigned, signed = tarfile.calc_chksums(bytes(raw))
    value = {"unsigned": unsigned, "signed": signed, "spaces": unsigned, "bad": unsigned + 1}
    field = b"%06o\0 " % value[chksum] if chksum != "spaces" else b"%07o " % unsigned
    raw[148:156] = field if value[chksum] >= 0 else b"%07o\0" % (value[chksum] & 0o7777777)
    return bytes(raw)


def padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % B)


def entry(data: bytes = b"", name: bytes = b"f", kind: bytes = b"0", **fields: object) -> bytes:
    """A header and its data (the size field says len(data) unless given)."""
    size = fields.pop("size", len(data))
    return header(name, kind, size, **fields) + padded(data)  # type: ignore[arg-type]


def long_name(name: bytes, kind: bytes = b"L") -> bytes:
    return entry(name + b"\0", b"././@LongLink", kind, magic=b"ustar ", version=b" \0")


def pax(*records: tuple[bytes, bytes] | bytes, kind: bytes = b"x") -> bytes:
    """A pax header of the given (keyword, value) records, or raw record bytes."""
    body = b""
    for record in records:
        if isinstance(record, bytes):
            body += record
            continue
        key, value = record
        text = b" " + key + b"=" + value + b"\n"
        length = len(text) + 1
        length = len(text) + len(str(length + len(str(length)) - 1))
        body += str(length).encode() + text
    return entry(body, b"PaxHeaders/f", kind)


END = b"\0" * (2 * B)


def crafted_archives() -> dict[str, bytes]:
    f = entry(b"data", b"file.txt")
    sym_ = entry(b"", b"sym", b"2", linkname=b"file.txt")
    cases = {
        # number fields in every spelling tarfile accepts (or refuses)
        "mode-spaces": entry(b"x", mode=b"  644 \0\0"),
        "mode-no-nul": entry(b"x", mode=b"00000644"),
        "mode-empty": entry(b"x", mode=b"\0" * 8),
        "mode-base256": entry(b"x", mode=b"\x80" + b"\0" * 5 + b"\x01\xa4"),
        "mode-negative": entry(b"x", mode=b"\xff" * 8),
        "mode-plus": entry(b"x", mode=b"+000644\0"),
        "mode-underscore": entry(b"x", mode=b"0_644\0\0\0"),
        "mode-bad": entry(b"x", mode=b"0000648\0"),
        "mode-control": entry(b"x", mode=b"\x1c000644\0"),
        "mode-tab": entry(b"x", mode=b"\t000644\0"),
        "mode-0o": entry(b"x", mode=b"0o644\0\0\0"),
        "size-space-terminated": entry(b"hello", size=b"00000000005 "),
        "size-12-digits": entry(b"hello", size=b"000000000005"),
        "size-nul-early": entry(b"hello", size=b"5\0" + b"9" * 10),
        "size-base256": entry(b"hello", size=b"\x80" + b"\0" * 10 + b"\x05"),
        "mtime-base256": entry(b"x", mtime=b"\x80" + b"\0" * 6 + b"\x12\x34\x56\x78\x9a"),
        "mtime-negative": entry(b"x", mtime=b"\xff" * 11 + b"\xfe"),
        "mtime-blank": entry(b"x", mtime=b" " * 12),
        "uid-bad": entry(b"x", ids=b"00017x0\0" + b"0001750\0"),
        "uid-base256": entry(b"x", ids=b"\x80" + b"\1" * 7 + b"0001750\0"),
        "devs-bad": entry(b"x", devs=b"zzzzzzz\0" + b"0000000\0"),
        "chksum-signed": entry(b"x", b"caf\xe9-\xff\xfe"[:8], chksum="signed"),
        "chksum-spaces": entry(b"x", chksum="spaces"),
        "chksum-bad-first": entry(b"x", chksum="bad") + f,
        "chksum-bad-later": f + entry(b"x", chksum="bad"),
        "chksum-garbage-field": f + header(b"g")[:148] + b"zz\0\0\0\0\0\0" + header(b"g")[156:],
        # names
        "ustar-prefix": entry(b"x", b"name.txt", prefix=b"some/prefix"),
        "ustar-prefix-dir": entry(b"", b"name/", b"5", prefix=b"pre"),
        "ustar-prefix-bad-version": entry(b"x", b"n", prefix=b"p", version=b"\0\0"),
        "v7-name": entry(b"x", b"n", magic=b"\0" * 6, version=b"\0\0"),
        "v7-dir": entry(b"", b"folder/", b"\0", magic=b"\0" * 6, version=b"\0\0"),
        "v7-dir-with-size": entry(b"", b"folder/", b"\0", size=600, magic=b"\0" * 6) + f,
        "v7-file": entry(b"abc", b"file", b"\0", magic=b"\0" * 6, version=b"\0\0"),
        "dir-with-size": entry(b"", b"d", b"5", size=5) + f,
        "contiguous": entry(b"x", b"c", b"7"),
        "latin1-name": entry(b"x", b"caf\xe9"),
        "name-no-nul": entry(b"x", b"n" * 100),
        "name-empty": entry(b"x", b""),
        "name-dotdot": entry(b"x", b"a/../../b"),
        "long-name": long_name(b"L" * 300) + f,
        "long-name-latin1": long_name(b"caf\xe9/" * 50) + f,
        "long-name-no-nul": long_name(b"a" * 512)[:B] + b"a" * 512 + f,
        "long-name-dir-slash": long_name(b"dir/") + entry(b"", b"dir", b"5"),
        "long-name-v7-slash": long_name(b"notadir/") + entry(b"x", b"n", b"\0"),
        "v7-slash-under-long-name": long_name(b"name") + entry(b"", b"x/", b"\0"),
        "long-link": long_name(b"T" * 200, b"K") + sym_,
        "long-name-and-link": long_name(b"N" * 200) + long_name(b"T" * 200, b"K") + sym_,
        "long-link-and-name": long_name(b"T" * 200, b"K") + long_name(b"N" * 200) + sym_,
        "two-long-names": long_name(b"first") + long_name(b"second") + f,
        "two-long-links": long_name(b"t1", b"K") + long_name(b"t2", b"K") + sym_,
        "long-name-then-end": f + long_name(b"x" * 200) + END,
        "long-name-then-eof": f + long_name(b"x" * 200),
        "long-name-cut": f + long_name(b"x" * 2000)[:B + 700],
        "long-name-on-device": long_name(b"D" * 120) + entry(b"", b"dev", b"3"),
        "long-name-on-hard-link": f + long_name(b"H" * 120) + entry(b"", b"h", b"1",
                                                                     linkname=b"file.txt"),
        # pax records
        "pax-path": pax((b"path", "ünï/cödé.txt".encode())) + f,
        "pax-path-latin1": pax((b"path", b"caf\xe9")) + f,
        "pax-binary": pax((b"hdrcharset", b"BINARY"), (b"path", b"caf\xe9")) + f,
        "pax-charset-not-utf8": pax((b"hdrcharset", b"\xff\xfe")) + f,
        "pax-charset-in-comment": pax((b"comment", b"9 hdrcharset=BINARY\n")) + f,
        "pax-linkpath": pax((b"linkpath", b"elsewhere"), (b"path", b"s")) + sym_,
        "pax-hardlink": f + pax((b"linkpath", b"file.txt")) + entry(b"", b"h", b"1"),
        "pax-size": pax((b"size", b"4")) + f,
        "pax-size-smaller": pax((b"size", b"2")) + f + f,
        "pax-size-larger": pax((b"size", b"600")) + f + f + f,
        "pax-size-bad": pax((b"size", b"abc")) + f,
        "pax-size-on-dir": pax((b"size", b"512")) + entry(b"", b"d", b"5") + f,
        "pax-mtime": pax((b"mtime", b"1700000000.123456789")) + f,
        "pax-mtime-exponent": pax((b"mtime", b"1.7e9")) + f,
        "pax-mtime-empty": pax((b"mtime", b"")) + f,
        "pax-mtime-bad": pax((b"mtime", b"x")) + f,
        "pax-mtime-negative": pax((b"mtime", b"-1.5")) + f,
        "pax-uid-bad": pax((b"uid", b"x"), (b"gid", b"y"), (b"uname", b"\xff")) + f,
        "pax-unknown": pax((b"SCHILY.xattr.user.x", b"\0\1\2"), (b"a=b", b"c")) + f,
        "pax-keyword-latin1": pax((b"caf\xe9", b"x")) + f,
        "pax-path-twice": pax((b"path", b"one"), (b"path", b"two")) + f,
        "pax-length-zero": pax(b"0 path=x\n") + f,
        "pax-length-short": pax(b"5 path=abcdef\n") + f,
        "pax-length-long": pax(b"900 path=abc\n") + f,
        "pax-length-huge": pax(b"9" * 5000 + b" path=x\n") + f,
        "pax-garbage": pax(b"hello world\n12 path=x\n") + f,
        "pax-no-newline": pax(b"10 path=xyz") + f,
        "pax-empty": pax() + f,
        "pax-then-end": f + pax((b"path", b"p")) + END,
        "pax-then-eof": f + pax((b"path", b"p")),
        "pax-then-bad": f + pax((b"path", b"p")) + entry(b"x", chksum="bad"),
        "pax-twice": pax((b"path", b"first")) + pax((b"mtime", b"5")) + f,
        "pax-and-long-name": pax((b"path", b"pax")) + long_name(b"gnu") + f,
        "long-name-and-pax": long_name(b"gnu") + pax((b"path", b"pax")) + f,
        "solaris-pax": pax((b"path", b"solaris"), kind=b"X") + f,
        # global headers
        "global-mtime": pax((b"mtime", b"12.5"), kind=b"g") + f + f,
        "global-then-pax": pax((b"mtime", b"12"), kind=b"g") + pax((b"comment", b"c")) + f,
        "global-and-pax-mtime": pax((b"mtime", b"12"), kind=b"g") + pax((b"mtime", b"13")) + f,
        "global-twice": pax((b"mtime", b"1"), kind=b"g") + pax((b"uname", b"u"), kind=b"g") + f,
        "global-in-chain": pax((b"comment", b"c")) + pax((b"mtime", b"7"), kind=b"g") + f + f,
        "global-after-long-name": long_name(b"n") + pax((b"mtime", b"7"), kind=b"g") + f + f,
        "global-path": f + pax((b"path", b"all"), kind=b"g") + f + sym_ + f,
        "global-size": pax((b"size", b"1"), kind=b"g") + f + f,
        "global-linkpath": pax((b"linkpath", b"t"), kind=b"g") + sym_ + f,
        "global-sparse": pax((b"GNU.sparse.map", b"0,4"), kind=b"g") + f + f,
        "global-binary": pax((b"hdrcharset", b"BINARY"), kind=b"g") + pax((b"path", b"\xe9")) + f,
        "global-then-end": f + pax((b"mtime", b"1"), kind=b"g") + END,
        "global-only": pax((b"comment", b"c"), kind=b"g") + END,
        # sparse and other types only tarfile reads
        "pax-sparse-map": pax((b"GNU.sparse.map", b"0,2,10,2"), (b"GNU.sparse.realsize", b"12"))
        + entry(b"abcd"),
        "pax-sparse-map-bad": pax((b"GNU.sparse.map", b"0,x")) + f,
        "pax-sparse-00": pax((b"GNU.sparse.size", b"8"), (b"GNU.sparse.numblocks", b"1"),
                             (b"GNU.sparse.offset", b"4"), (b"GNU.sparse.numbytes", b"4"))
        + entry(b"abcd"),
        "pax-sparse-10": pax((b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"),
                             (b"GNU.sparse.name", b"sp"), (b"GNU.sparse.realsize", b"100"))
        + entry(padded(b"1\n50\n4\n") + b"abcd"),
        "pax-sparse-10-bad": pax((b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"))
        + entry(padded(b"x\n")),
        "pax-sparse-10-no-newline": pax((b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"))
        + entry(b"1" * 600),
        "gnu-sparse": entry(b"abcd", b"sp", b"S", magic=b"ustar ", version=b" \0",
                            tail=b"")[:386] + octal(10, 12) + octal(4, 12) + bytes(96 - 24)
        + b"\0" + octal(100, 12) + bytes(17) + padded(b"abcd"),
        "volume-label": entry(b"", b"label", b"V") + f,
        "volume-label-with-data": entry(b"label data", b"label", b"V") + f,
        "multivolume": entry(b"xyz", b"m", b"M") + f,
        "dumpdir": entry(b"Yfile\0\0", b"d/", b"D") + f,
        "vendor-type": entry(b"vendor data", b"v", b"A") + f,
        "fifo-with-size": entry(b"", b"p", b"6", size=1000) + f,
        # endings
        "no-end-blocks": f,
        "one-end-block": f + b"\0" * B,
        "partial-zero-block": f + b"\0" * 100,
        "partial-garbage-block": f + b"\1" * 100,
        "garbage-after-end": f + END + b"garbage" * 100,
        "zero-block-first": b"\0" * B + f,
        "data-cut": f[:B + 3],
        "data-cut-in-padding": f[:B + 100],
    }
    # the same member after each checksum and signedness variant
    cases["gnu-sparse"] = fix_sum(cases["gnu-sparse"])
    return {name: tar if name.startswith(("data-cut", "partial", "no-end", "one-end",
                                         "long-name-then-eof", "long-name-cut",
                                         "pax-then-eof", "garbage-after", "global-then-end",
                                         "pax-then-end", "long-name-then-end", "global-only"))
            else tar + END for name, tar in cases.items()}


def fix_sum(tar: bytes) -> bytes:
    """`tar` with a right checksum in its first header."""
    head = bytearray(tar[:B])
    fix_checksum(head)
    return bytes(head) + tar[B:]


CRAFTED = crafted_archives()


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_archives(tmp_path: Path, name: str) -> None:
    check(CRAFTED[name], tmp_path, name, random.Random(name))


# --- corruption -------------------------------------------------------------------------------

# Header bytes where the walk follows GNU tar, not tarfile, once the checksum is made valid
# again: the magic (it decides whether the prefix field counts) and the prefix field itself,
# outside a ustar header.
MAGIC_FIELD, PREFIX_FIELD = range(257, 263), range(345, 500)


def corruptions(tar: bytes, rng: random.Random, count: int) -> Iterator[tuple[str, bytes, bool]]:
    """(label, corrupted tar, whether the walk must agree exactly with the reference)."""
    spans: list[tuple[int, int]] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as t:
            spans += ((info.offset, info.offset_data) for info in t)
    except (tarfile.TarError, ValueError, IndexError):
        pass  # corrupt already: the spans read so far
    spans = spans or [(0, min(len(tar), 1024))]
    for n in range(count):
        r = rng.random()
        if r < 0.3:
            cut = rng.randrange(len(tar) + 1)
            if rng.random() < 0.5:
                cut -= cut % tarfile.BLOCKSIZE
            yield f"cut-{cut}", tar[:cut], True
            continue
        start, end = rng.choice(spans)
        out = bytearray(tar)
        fixed: list[int] = []  # flipped bytes of headers whose checksum was made right again
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(start, max(end, start + 1))
            if pos >= len(out):
                continue
            out[pos] = rng.choice([0, 0x20, 0x30, 0x37, 0x38, 0x80, 0xFF, 0x2F, 0x0A, 0x3D,
                                   rng.randrange(256)])
            block = pos - pos % B
            header = out[block:block + B]
            if r < 0.75 and len(header) == B and is_header(tar, block):
                fix_checksum(header)  # reaches the field parsers, not just the checksum
                out[block:block + B] = header
                fixed.append(pos)
        exact = not any(pos % B in MAGIC_FIELD or (
            pos % B in PREFIX_FIELD and out[pos - pos % B + 257:][:6] != b"ustar\0")
            for pos in fixed)
        yield f"flip-{n}", bytes(out), exact


def is_header(tar: bytes, block: int) -> bool:
    header = tar[block:block + tarfile.BLOCKSIZE]
    try:
        return tarfile.nti(header[148:156]) in tarfile.calc_chksums(header)
    except tarfile.HeaderError:
        return False


def check_corrupt(tar: bytes, tmp: Path, label: str, exact: bool) -> None:
    ref = scan_complete(tar, tmp, reference=True)
    new = scan_complete(tar, tmp)
    if exact:
        assert_agree(new, ref, label)
    elif new.error is not None:
        assert isinstance(new.error, ArchiveError), f"{label}: {new.error!r}"


# --- the tests --------------------------------------------------------------------------------


@pytest.fixture(params=["default", "tiny"])
def windows(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run with the real window sizes, and with windows smaller than a header, so that
    headers and long names straddle every window edge."""
    if request.param == "tiny":
        monkeypatch.setattr(archive, "WINDOW", 700)
        monkeypatch.setattr(archive, "SHORT_READ", 100)
    return str(request.param)


def test_builder_archives(tmp_path: Path, windows: str) -> None:
    rng = random.Random(1)
    for label, tar in builder_archives(tmp_path / "work"):
        check(tar, tmp_path, label, rng, free_running=windows == "default")


@pytest.mark.skipif(not HAS_TAR, reason="needs GNU tar")
def test_gnu_tar_archives(tmp_path: Path, windows: str) -> None:
    rng = random.Random(2)
    labels = []
    for label, tar in gnu_tar_archives(tmp_path / "work"):
        new = check(tar, tmp_path, label, rng)
        assert new.error is None and new.members, label
        labels.append(label)
    assert len(labels) == 11


@pytest.mark.parametrize("seed", range(4))
def test_random_archives(tmp_path: Path, seed: int, windows: str) -> None:
    rng = random.Random(100 + seed)
    for label, tar in random_archives(80, seed):
        check(tar, tmp_path, label, rng, free_running=rng.random() < 0.3)


@pytest.mark.parametrize("seed", range(4))
def test_corrupted_archives(tmp_path: Path, seed: int) -> None:
    rng = random.Random(200 + seed)
    sources = list(random_archives(40, seed))
    sources += [(label, tar) for label, tar in builder_archives(tmp_path / "work")
                if label not in ("many-files", "large")]
    if HAS_TAR:
        sources += list(gnu_tar_archives(tmp_path / "work"))
    for label, tar in sources:
        if not tar:
            continue
        for name, bad, exact in corruptions(tar, rng, 12):
            check_corrupt(bad, tmp_path, f"{label}/{name}", exact)


def test_corrupted_archives_streamed(tmp_path: Path) -> None:
    """A few corrupted archives read while written: the same outcome as read whole."""
    rng = random.Random(300)
    for label, tar in random_archives(30, 9):
        if not tar:
            continue
        for name, bad, _exact in corruptions(tar, rng, 4):
            whole = scan_complete(bad, tmp_path)
            streamed = scan_streaming(bad, tmp_path, rng, piece_size(bad, rng))
            assert streamed.members == whole.members, f"{label}/{name}"
            assert (streamed.error is None) == (whole.error is None), f"{label}/{name}"


# --- where the walk differs from tarfile on purpose -------------------------------------------


def gnu_header_with_times(name: str = "file.txt") -> bytes:
    """A GNU-format member whose atime/ctime fields (tarfile's prefix field) are set, as
    `tar --incremental` writes them."""
    tar = bytearray(tar_bytes([reg(name, "x\n")], tarfile.GNU_FORMAT))
    header = tar[:tarfile.BLOCKSIZE]
    header[345:357] = b"%011o\0" % 1_600_000_000  # atime
    header[357:369] = b"%011o\0" % 1_600_000_001  # ctime
    fix_checksum(header)
    tar[:tarfile.BLOCKSIZE] = header
    return bytes(tar)


@pytest.mark.skipif(not HAS_TAR, reason="needs GNU tar")
def test_prefix_field_counts_only_under_the_ustar_magic(tmp_path: Path) -> None:
    tar = gnu_header_with_times()
    listed = subprocess.run(["tar", "-tf", "-"], input=tar, capture_output=True, check=True,
                            timeout=30).stdout.decode().split()
    assert listed == ["file.txt"]
    new = scan_complete(tar, tmp_path)
    assert [m.path for m in new.members] == listed
    ref = scan_complete(tar, tmp_path, reference=True)
    assert ref.members[0].path.endswith("/file.txt")  # tarfile reads atime as a prefix


@pytest.mark.skipif(not HAS_TAR, reason="needs GNU tar")
def test_incremental_gnu_tar_archive(tmp_path: Path) -> None:
    """`tar --incremental` writes atime/ctime and 'D' (dumpdir) members: the names are the
    ones tar lists (tarfile's are prefixed with the atime), dumpdirs are left out (an unknown
    type to tarfile: their folders are implied by the files)."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.txt").write_text("a\n")
    (src / "b.txt").write_text("b\n")
    out = tmp_path / "inc.tar"
    subprocess.run(["tar", "--format=gnu", "-G", "-cf", str(out), "-C", str(src), "."],
                   check=True, capture_output=True, timeout=60)
    listed = subprocess.run(["tar", "-tf", str(out)], capture_output=True, check=True,
                            timeout=30).stdout.decode().split()
    assert listed == ["./", "./sub/", "./b.txt", "./sub/a.txt"]
    new = scan_complete(out.read_bytes(), tmp_path)
    assert new.error is None
    assert [m.path for m in new.members] == ["b.txt", "sub/a.txt"]


def base256(value: int, width: int) -> bytes:
    return (b"\xff" if value < 0 else b"\x80") + (value % 256 ** (width - 1)).to_bytes(
        width - 1, "big")


@pytest.mark.parametrize("kind", [tarfile.REGTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE])
@pytest.mark.parametrize("size", [-1, -512, -1024])
def test_negative_sizes_are_refused(tmp_path: Path, kind: bytes, size: int) -> None:
    """tarfile would step back to a header it has read (forever, for a multiple of 512)."""
    tar = bytearray(tar_bytes([reg("a", "a"), reg("b", "b")]))
    header = tar[:tarfile.BLOCKSIZE]
    header[124:136] = base256(size, 12)
    header[156:157] = kind
    fix_checksum(header)
    tar[:tarfile.BLOCKSIZE] = header
    new = scan_complete(bytes(tar), tmp_path)
    assert isinstance(new.error, ArchiveError), new


def test_a_giant_extended_header_is_refused(tmp_path: Path) -> None:
    tar = bytearray(tar_bytes([reg("a", "a")]))
    header = tar[:tarfile.BLOCKSIZE]
    header[124:136] = b"%011o\0" % (archive.MAX_EXTENDED + 1)
    header[156:157] = tarfile.GNUTYPE_LONGNAME
    fix_checksum(header)
    tar[:tarfile.BLOCKSIZE] = header
    new = scan_complete(bytes(tar), tmp_path)
    assert isinstance(new.error, ArchiveError) and "extended header" in str(new.error)


@pytest.mark.parametrize("mtime", ["nan", "inf", "-inf", "1e999999999", "1e999999", "", "abc",
                                   "1_5", "1e20"])
def test_odd_pax_mtimes(tmp_path: Path, mtime: str) -> None:
    """The reference crashed on some of these (ValueError, OverflowError), or spent its time
    and memory on a million-digit number: the value, or 0 where it makes no sense."""
    info = reg("f", "x").info
    info.pax_headers = {"mtime": mtime}
    tar = tar_bytes([M(info, b"x")], tarfile.PAX_FORMAT)
    new = scan_complete(tar, tmp_path)
    assert new.error is None
    expected = {"1_5": 15 * 10**9, "1e20": 10**29}.get(mtime, 0)
    assert new.members[0].mtime_ns == expected


def test_scan_of_a_growing_file_is_prompt_for_the_first_member(tmp_path: Path) -> None:
    """The first member is out while its data, and everything after, is still to come."""
    tar = tar_bytes([reg("first.txt", os.urandom(300_000))] +
                    [reg(f"more-{i}", os.urandom(100)) for i in range(100)])
    fd = os.open(tmp_path / "t.tar", os.O_RDWR | os.O_CREAT, 0o600)
    progress = Progress()
    blocked = threading.Event()
    thread, outcome = run_scan(scan_members, fd, progress, blocked.set)
    try:
        assert blocked.wait(WAIT)  # nothing written yet: on_wait, then it blocks
        blocked.clear()
        os.pwrite(fd, tar[:600], 0)
        progress.advance(600)
        assert blocked.wait(WAIT)  # on_wait comes after what could be emitted was
        assert [m.path for m in outcome.members] == ["first.txt"]
        os.pwrite(fd, tar[600:], 600)
        progress.advance(len(tar))
        progress.end()
        finished(thread, outcome)
        assert outcome.error is None and len(outcome.members) == 101
    finally:
        progress.end()
        thread.join(WAIT)
        os.close(fd)


def test_download_failure_stops_the_scan(tmp_path: Path) -> None:
    tar = tar_bytes([reg("a", os.urandom(5000)), reg("b", "b")])
    fd = os.open(tmp_path / "t.tar", os.O_RDWR | os.O_CREAT, 0o600)
    progress = Progress()
    thread, outcome = run_scan(scan_members, fd, progress)
    try:
        os.pwrite(fd, tar[:1000], 0)
        progress.advance(1000)
        progress.end(ConnectionError("reset"))
        finished(thread, outcome)
        assert isinstance(outcome.error, ArchiveError) and "download failed" in str(outcome.error)
    finally:
        os.close(fd)


@pytest.mark.parametrize("inflater", sorted(INFLATERS))
def test_gzip_round_trip_of_the_corpus_matches(tmp_path: Path, inflater: str) -> None:
    """The random corpus through gzip and TarSink (with each inflater), as the mount feeds it."""
    from vm0fs.archive import TarSink

    for label, tar in random_archives(20, 42):
        data = gzip.compress(tar)
        fd = os.open(tmp_path / "g.tar", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        progress = Progress()
        thread, outcome = run_scan(scan_members, fd, progress)
        sink = TarSink(fd, 1 << 30, inflater=inflater)
        try:
            for i in range(0, len(data), 999):
                progress.advance(sink.feed(data[i:i + 999]))
            progress.advance(sink.finish())
            progress.end()
            finished(thread, outcome)
        finally:
            progress.end()
            os.close(fd)
        whole = scan_complete(tar, tmp_path)
        assert outcome.members == whole.members, label
        assert (outcome.error is None) == (whole.error is None), label
