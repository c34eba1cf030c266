"""The archive layer: inflating, indexing while bytes arrive, and refusing what is broken."""

from __future__ import annotations

import gzip
import io
import os
import random
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

from vm0fs.archive import (
    DIR,
    FILE,
    INFLATER,
    INFLATERS,
    LINK,
    GrowingFile,
    Member,
    Progress,
    TarSink,
    normalize_path,
    scan_members,
)
from vm0fs.errors import ArchiveError, ArchiveTooLarge
from vm0fs.integrity import BLOCK


def make_tar(entries: list[tuple[tarfile.TarInfo, bytes | None]],
             fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def info(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, mtime: float = 1_700_000_000,
         linkname: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime, ti.linkname = kind, mode, mtime, linkname
    return ti


@pytest.fixture(params=sorted(INFLATERS))
def inflater(request: pytest.FixtureRequest) -> str:
    """Each inflater the sink can use: isal's, and the standard library's zlib (the fallback)."""
    return request.param


def test_both_inflaters_are_there() -> None:
    assert sorted(INFLATERS) == ["isal", "zlib"] and INFLATER == "isal"


def index(archive: bytes, tmp_path: Path, limit: int = 1 << 40,
          chunk: int = 65536, inflater: str = INFLATER) -> tuple[list[Member], bytes]:
    """Inflate and index `archive` as the mount does; return the members and the tar bytes."""
    path = tmp_path / "data.tar"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        progress = Progress()
        sink = TarSink(fd, limit, inflater=inflater)
        members: list[Member] = []
        errors: list[BaseException] = []

        def parse() -> None:
            try:
                scan_members(GrowingFile(fd, progress, lambda: None), members.append)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        parser = threading.Thread(target=parse)
        parser.start()
        try:
            for start in range(0, len(archive), chunk):
                progress.advance(sink.feed(archive[start:start + chunk]))
            progress.advance(sink.finish())
            progress.end()
        except BaseException as exc:
            progress.end(exc)
            raise
        finally:
            parser.join(10)
        assert not parser.is_alive()
        if errors:
            raise errors[0]
        return members, path.read_bytes()
    finally:
        os.close(fd)


def content(tar_bytes: bytes, member: Member) -> bytes:
    return tar_bytes[member.offset:member.offset + member.size]


def test_normalize_path() -> None:
    assert normalize_path("a/b.txt") == "a/b.txt"
    assert normalize_path("./a//b/./c") == "a/b/c"
    assert normalize_path("/etc/passwd") == "etc/passwd"
    assert normalize_path("a/") == "a"
    for bad in ("", ".", "./", "/", "..", "../x", "a/../../b", "a/.."):
        assert normalize_path(bad) is None, bad


def test_members_offsets_modes_and_links(tmp_path: Path) -> None:
    archive = gzip.compress(make_tar([
        (info("./dir", tarfile.DIRTYPE, 0o750, 1_600_000_000), None),
        (info("./dir/a.txt", mode=0o4755), b"alpha"),
        (info("b.bin"), os.urandom(70_000)),
        (info("link", tarfile.SYMTYPE, linkname="dir/a.txt"), None),
        (info("hard", tarfile.LNKTYPE, linkname="./dir/a.txt"), None),
        (info("dangling-hard", tarfile.LNKTYPE, linkname="missing"), None),
        (info("hard-to-link", tarfile.LNKTYPE, linkname="link"), None),
        (info("dev", tarfile.CHRTYPE), None),
        (info("fifo", tarfile.FIFOTYPE), None),
        (info("../escape"), b"no"),
        (info("/abs/file"), b"abs"),
    ]))
    members, data = index(archive, tmp_path, chunk=1000)
    by_path = {m.path: m for m in members}
    assert list(by_path) == ["dir", "dir/a.txt", "b.bin", "link", "hard", "hard-to-link",
                             "abs/file"]
    assert by_path["hard-to-link"].kind == LINK and by_path["hard-to-link"].target == "dir/a.txt"
    assert by_path["dir"].kind == DIR and by_path["dir"].mode == 0o750
    assert by_path["dir"].mtime_ns == 1_600_000_000 * 10**9
    assert by_path["dir/a.txt"].mode == 0o755  # setuid dropped
    assert content(data, by_path["dir/a.txt"]) == b"alpha"
    assert len(content(data, by_path["b.bin"])) == 70_000
    assert by_path["link"].kind == LINK and by_path["link"].target == "dir/a.txt"
    assert by_path["hard"].kind == FILE and content(data, by_path["hard"]) == b"alpha"
    assert content(data, by_path["abs/file"]) == b"abs"


def test_long_and_unicode_names(tmp_path: Path) -> None:
    long_name = "/".join(["segment-" + "x" * 40] * 8) + "/file.txt"
    names = [long_name, "données/日本語/emoji-🎉.txt", "e\u0301cole.md"]
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        archive = gzip.compress(make_tar([(info(n), n.encode()) for n in names], fmt))
        members, data = index(archive, tmp_path)
        assert [m.path for m in members] == names
        assert [content(data, m) for m in members] == [n.encode() for n in names]


def test_non_utf8_name_round_trips_as_bytes(tmp_path: Path) -> None:
    raw = make_tar([(info("ok.txt"), b"1")])
    # Patch the name field of the only header to hold a Latin-1 byte, and fix the checksum.
    header = bytearray(raw[:512])
    header[0:7] = b"caf\xe9.tx"
    header[148:156] = b"        "
    header[148:155] = f"{sum(header):06o}\0".encode()
    archive = gzip.compress(bytes(header) + raw[512:])
    members, _ = index(archive, tmp_path)
    assert os.fsencode(members[0].path) == b"caf\xe9.tx"


def test_pax_fractional_mtime(tmp_path: Path) -> None:
    archive = gzip.compress(make_tar([(info("f", mtime=1_700_000_000.25), b"x")],
                                     tarfile.PAX_FORMAT))
    members, _ = index(archive, tmp_path)
    assert members[0].mtime_ns == 1_700_000_000_250_000_000


def test_concatenated_gzip_members_and_trailing_garbage(tmp_path: Path, inflater: str) -> None:
    tar = make_tar([(info("a"), b"a" * 5000), (info("b"), b"b" * 5000)])
    archive = gzip.compress(tar[:4096]) + gzip.compress(tar[4096:]) + b"\0\0garbage"
    members, data = index(archive, tmp_path, chunk=333, inflater=inflater)
    assert [content(data, m) for m in members] == [b"a" * 5000, b"b" * 5000]
    assert data == tar[:len(data)]  # byte for byte what gzip -d gives, up to the tar's end


def test_big_archive_is_byte_exact_with_either_inflater(tmp_path: Path, inflater: str) -> None:
    """Members of every size across gzip members of uneven lengths, with garbage after."""
    rng = random.Random(5)
    files = [(info(f"f{i}"), rng.randbytes(rng.choice([0, 1, 511, 512, 70_000, 300_000])))
             for i in range(40)]
    tar = make_tar(files)
    cuts = sorted(rng.sample(range(1, len(tar)), 5))
    parts = [tar[a:b] for a, b in zip([0, *cuts], [*cuts, len(tar)], strict=True)]
    archive = b"".join(gzip.compress(p, rng.choice([1, 6, 9])) for p in parts) + b"junk"
    members, data = index(archive, tmp_path, chunk=7777, inflater=inflater)
    assert [content(data, m) for m in members] == [body for _, body in files]
    assert data == tar[:len(data)]


@pytest.mark.parametrize("archive, message", [
    (b"this is not gzip at all" * 10, "not a valid gzip"),
    (gzip.compress(make_tar([(info("a"), os.urandom(50_000))]))[:20_000], "truncated"),
    (gzip.compress(b"plain text, not a tar archive\n" * 100), "tar"),
    (b"", "empty"),
])
def test_broken_archives(tmp_path: Path, archive: bytes, message: str, inflater: str) -> None:
    with pytest.raises(ArchiveError, match=message):
        index(archive, tmp_path, inflater=inflater)


def test_tar_truncated_inside_a_member_is_an_error(tmp_path: Path) -> None:
    tar = make_tar([(info("a"), b"a" * 10_000)])
    with pytest.raises(ArchiveError):
        index(gzip.compress(tar[:3000]), tmp_path)


def test_garbage_after_members_is_an_error(tmp_path: Path) -> None:
    tar = make_tar([(info("a"), b"a")])
    body = tar[:1024] + b"\x01" * 512 + b"\0" * 1024
    with pytest.raises(ArchiveError, match="header"):
        index(gzip.compress(body), tmp_path)


def test_decompression_bomb_stops_at_the_limit(tmp_path: Path) -> None:
    archive = gzip.compress(make_tar([(info("zeros"), b"\0" * (20 << 20))]))
    assert len(archive) < 100_000
    with pytest.raises(ArchiveTooLarge):
        index(archive, tmp_path, limit=5 << 20)
    assert (tmp_path / "data.tar").stat().st_size <= 5 << 20


def test_members_are_published_before_the_archive_ends(tmp_path: Path) -> None:
    tar = make_tar([(info("first.txt"), b"hello")] +
                   [(info(f"big-{i}"), os.urandom(200_000)) for i in range(5)])
    archive = gzip.compress(tar)
    fd = os.open(tmp_path / "data.tar", os.O_RDWR | os.O_CREAT, 0o600)
    progress, sink = Progress(), TarSink(fd, 1 << 40)
    seen = threading.Event()
    members: list[Member] = []

    def emit(member: Member) -> None:
        members.append(member)
        seen.set()

    parser = threading.Thread(
        target=scan_members, args=(GrowingFile(fd, progress, lambda: None), emit))
    parser.start()
    # Enough for the first checked block (the first header and its data are in it); the
    # bytes of a block are visible once the whole block is under its checksum.
    head = BLOCK + 3000
    progress.advance(sink.feed(archive[:head]))
    assert seen.wait(10)
    assert members[0].path == "first.txt"
    assert progress.durable < len(tar)  # the rest has not arrived yet
    progress.advance(sink.feed(archive[head:]))
    progress.advance(sink.finish())
    progress.end()
    parser.join(10)
    assert [m.path for m in members][1:] == [f"big-{i}" for i in range(5)]
    os.close(fd)


def test_gnu_sparse_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    sparse = src / "sparse.bin"
    with open(sparse, "wb") as f:
        f.write(b"head")
        f.seek(1 << 20)
        f.write(b"middle")
        f.truncate(3 << 20)
    archive = tmp_path / "s.tar.gz"
    subprocess.run(["tar", "--sparse", "-czf", str(archive), "-C", str(src), "sparse.bin"],
                   check=True)
    (tmp_path / "idx").mkdir()
    members, data = index(archive.read_bytes(), tmp_path / "idx")
    (member,) = members
    assert member.size == 3 << 20
    assert member.sparse is not None
    rebuilt = bytearray(member.size)
    stored = member.offset
    for run_offset, run_length in member.sparse:
        rebuilt[run_offset:run_offset + run_length] = data[stored:stored + run_length]
        stored += run_length
    assert bytes(rebuilt) == sparse.read_bytes()


def test_read_at_waits_for_the_least_and_returns_what_is_there(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "data.tar", os.O_RDWR | os.O_CREAT, 0o600)
    progress = Progress()
    waits: list[int] = []
    growing = GrowingFile(fd, progress, lambda: waits.append(progress.durable))
    os.write(fd, b"0123456789")
    progress.advance(10)
    assert growing.read_at(2, 3, 100) == b"23456789"  # all that is there, no waiting
    assert growing.tell() == 0 and not waits
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(growing.read_at(8, 4, 6)))
    reader.start()
    for _ in range(1000):  # on_wait comes before blocking
        if waits:
            break
        reader.join(0.01)
    assert waits == [10] and reader.is_alive()
    os.write(fd, b"abcdef")
    progress.advance(16)
    reader.join(10)
    assert result == [b"89abcd"]
    progress.end()
    assert growing.read_at(14, 512, 1 << 20) == b"ef"  # fewer only where the file ends
    assert growing.read_at(16, 512, 1 << 20) == b""
    os.close(fd)
