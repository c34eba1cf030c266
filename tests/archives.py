"""Test archives (tar.gz bytes) for every kind of member the service may hand out, and a
comparator against what GNU `tar -x` makes of the same bytes.

Builders return the archive bytes; `CASES` names the ones whose mounted tree must equal
`tar -xzf` (minus the documented differences, see `tar_extract`). Everything is deterministic
(fixed mtimes, seeded random bytes), so version ids (sha256 of the bytes) are stable within a run.

    tree = snapshot(dir)                       # {relative path: Entry}, never follows links
    expected = tar_extract(data, tmp_dir)      # tar -xzf result, minus what vm0fs leaves out
    assert_same_tree(mounted, expected, explicit_dirs(data))
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import shutil
import stat
import struct
import subprocess
import tarfile
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path

T0 = 1_600_000_000  # a fixed mtime (2020-09-13)
SECURITY_BITS = stat.S_ISUID | stat.S_ISGID

# --- members ----------------------------------------------------------------------------------


def _info(name: str, kind: bytes, mode: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = mtime
    info.uid = info.gid = 1000
    info.uname = info.gname = "agent"
    return info


@dataclass
class M:
    """One member to write: a TarInfo plus the data of a regular file."""

    info: tarfile.TarInfo
    data: bytes | None = None


def reg(name: str, data: bytes | str = b"", mode: int = 0o644, mtime: float = T0) -> M:
    raw = data.encode() if isinstance(data, str) else data
    info = _info(name, tarfile.REGTYPE, mode, mtime)
    info.size = len(raw)
    return M(info, raw)


def dir_(name: str, mode: int = 0o755, mtime: float = T0) -> M:
    return M(_info(name, tarfile.DIRTYPE, mode, mtime))


def sym(name: str, target: str, mtime: float = T0) -> M:
    info = _info(name, tarfile.SYMTYPE, 0o777, mtime)
    info.linkname = target
    return M(info)


def hard(name: str, target: str, mtime: float = T0) -> M:
    info = _info(name, tarfile.LNKTYPE, 0o644, mtime)
    info.linkname = target
    return M(info)


def special(name: str, kind: bytes, major: int = 0, minor: int = 0) -> M:
    info = _info(name, kind, 0o644, T0)
    info.devmajor, info.devminor = major, minor
    return M(info)


def tar_bytes(members: Iterable[M], fmt: int = tarfile.GNU_FORMAT,
              encoding: str = "utf-8", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding=encoding,  # type: ignore[call-overload]
                      **kwargs) as tar:
        for m in members:
            tar.addfile(m.info, io.BytesIO(m.data) if m.data is not None else None)
    return buf.getvalue()


def gz(data: bytes, mtime: int = 0) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=mtime)


def tar_gz(members: Iterable[M], fmt: int = tarfile.GNU_FORMAT, **kwargs: object) -> bytes:
    return gz(tar_bytes(members, fmt, **kwargs))


# --- the cases ------------------------------------------------------------------------------


def agent_style() -> bytes:
    """Like an agent writes them: regular files only, no directory entries, no './', GNU
    format, original modes, fixed mtimes (including the epoch itself and 1)."""
    return tar_gz([
        reg("README.md", "# run 42\n", 0o644, T0),
        reg("train.py", "print('train')\n", 0o755, T0 + 1),
        reg("out/metrics.json", '{"loss": 0.1}\n', 0o644, T0 + 2),
        reg("out/ckpt/epoch-1/model.bin", bytes(range(256)) * 8, 0o600, T0 + 3),
        reg("out/ckpt/epoch-2/model.bin", bytes(range(255, -1, -1)) * 8, 0o640, T0 + 4),
        reg("logs/a/b/c/d/e/deep.log", "deep\n" * 100, 0o444, T0 + 5),
        reg("scripts/run.sh", "#!/bin/sh\necho hi\n", 0o700, T0 + 6),
        reg("epoch0.txt", "mtime 0\n", 0o644, 0),
        reg("epoch1.txt", "mtime 1\n", 0o644, 1),
        reg(".hidden", "dotfile\n", 0o644, T0 + 7),
        reg("with space/and 'quotes' & stuff.txt", "spaces\n", 0o644, T0 + 8),
    ])


def dot_slash_dirs() -> bytes:
    """`tar -C dir -c .` style: './' prefixes, explicit directories with their own modes and
    mtimes, a directory entry after its contents, a directory named twice."""
    return tar_gz([
        dir_("./", 0o750, T0 - 1000),
        dir_("./src/", 0o750, T0 - 100),
        reg("./src/main.py", "main\n", 0o644, T0 + 10),
        dir_("./src/pkg/", 0o700, T0 - 200),
        reg("./src/pkg/__init__.py", "", 0o644, T0 + 11),
        reg("./docs/guide.md", "guide\n", 0o644, T0 + 12),
        dir_("./docs/", 0o711, T0 - 300),  # after its contents
        dir_("./empty/", 0o755, T0 - 400),
        dir_("./twice/", 0o755, T0 - 500),
        dir_("./twice/", 0o701, T0 - 600),  # named again: the later attributes stand
        # Doubled slashes and '.' parts. The folder comes after its file: GNU tar compares
        # names as text, so a folder entry spelt differently from the path of a later member
        # gets its mtime set too early (then bumped by the member), a tar quirk.
        reg("./odd//slashes/./f.txt", "f\n", 0o644, T0 + 13),
        dir_(".//odd//slashes/", 0o705, T0 - 700),
    ])


def symlinks() -> bytes:
    """Relative, into subfolders, to a folder, dangling, absolute, '..' inside the version,
    a long target, and their own mtimes."""
    return tar_gz([
        reg("file.txt", "target file\n"),
        dir_("sub/", 0o755),
        reg("sub/inner.txt", "inner\n"),
        sym("rel", "file.txt", T0 - 1),
        sym("into_sub", "sub/inner.txt", T0 - 2),
        sym("sub/up", "../file.txt", T0 - 3),
        sym("to_dir", "sub", T0 - 4),
        sym("dangling", "does/not/exist", T0 - 5),
        sym("absolute", "/etc/hostname", T0 - 6),
        sym("self", "self", T0 - 7),
        sym("dot", ".", T0 - 8),
        sym("long_target", "x/" * 120 + "end", T0 - 9),  # GNU long link name
        sym("spaces", "a b/c d", T0 - 10),
    ])


def hard_links() -> bytes:
    """Hard links to earlier members (stored as copies of the same content), one through a
    './' name, one to a file that is replaced afterwards (keeps the old content, as tar -x)."""
    return tar_gz([
        reg("orig.txt", "original content\n", 0o640, T0 + 1),
        hard("same.txt", "orig.txt"),
        dir_("sub/"),
        hard("sub/deep.txt", "orig.txt"),
        reg("./dotted.bin", b"\x00\x01\x02" * 1000, 0o755, T0 + 2),
        hard("dotted_link.bin", "./dotted.bin"),
        reg("replaced.txt", "first\n", 0o644, T0 + 3),
        hard("keeps_first.txt", "replaced.txt"),
        reg("replaced.txt", "second, longer\n", 0o600, T0 + 4),
    ])


def hard_link_to_symlink() -> bytes:
    """A hard link whose target is a symlink: tar -x hard-links the symlink itself, so the new
    name is a symlink with the same target (link(2) does not follow symlinks)."""
    return tar_gz([
        reg("file.txt", "x\n"),
        sym("sym", "file.txt", T0 - 1),
        hard("hard_to_sym", "sym"),
    ])


def duplicates() -> bytes:
    """The same path twice: the later member wins. File then file, file then directory, empty
    directory then file, symlink then file, file then symlink."""
    return tar_gz([
        reg("dup.txt", "first version, longer than the second\n", 0o600, T0 + 1),
        reg("dup.txt", "second\n", 0o644, T0 + 2),
        reg("x", "x was a file\n", 0o644, T0 + 3),
        dir_("x/", 0o750, T0 + 4),
        reg("x/y", "y\n", 0o644, T0 + 5),
        dir_("e/", 0o700, T0 + 6),
        reg("e", "e is a file now\n", 0o644, T0 + 7),
        sym("l2f", "elsewhere", T0 + 8),
        reg("l2f", "now a file\n", 0o644, T0 + 9),
        reg("f2l", "a file first\n", 0o644, T0 + 10),
        sym("f2l", "dup.txt", T0 + 11),
        reg("sub/dup", "one\n", 0o644, T0 + 12),
        reg("./sub/dup", "two, via ./\n", 0o644, T0 + 13),
    ])


LONG_DIR = "/".join(f"level-{i:02d}-" + "d" * 40 for i in range(6))  # ~300 characters


def pax_long_names() -> bytes:
    """POSIX pax: 'path' records for names past 100 and past 255 characters, a single 250-byte
    component, a long symlink target, unicode names, fractional and pre-1970 mtimes, a global
    header."""
    return tar_gz([
        reg("short.txt", "short\n"),
        reg("p" * 150 + ".txt", "150-char name\n", 0o644, T0 + 1),
        reg("c" * 250, "one 250-byte component\n", 0o644, T0 + 2),
        reg(LONG_DIR + "/file-at-the-bottom.txt", "deep and long\n", 0o600, T0 + 3),
        dir_(LONG_DIR + "/explicit/", 0o750, T0 + 4),
        sym(LONG_DIR + "/link", "../" * 50 + "t" * 100, T0 + 5),
        reg("unicodé-ñ-日本.txt", "pax utf-8 path\n", 0o644, T0 + 6),
        reg("fraction.txt", "fractional mtime\n", 0o644, T0 + 0.75),
        reg("before-1970.txt", "negative mtime\n", 0o644, -1_000_000),
    ], tarfile.PAX_FORMAT, pax_headers={"comment": "a global header"})


def gnu_long_names() -> bytes:
    """GNU ././@LongLink entries for long names and long link targets, as agents write, and a
    mtime past the octal field (base-256)."""
    return tar_gz([
        reg("g" * 120 + ".txt", "120-char name\n", 0o644, T0),
        reg(LONG_DIR + "/gnu.txt", "gnu long path\n", 0o755, T0 + 1),
        sym("gnu_link", "y" * 200, T0 + 2),
        dir_("d" * 110 + "/", 0o750, T0 + 3),
        reg("d" * 110 + "/inside.txt", "inside\n", 0o644, T0 + 4),
        reg("far-future.txt", "base-256 mtime\n", 0o644, 2**33 + 5),
    ], tarfile.GNU_FORMAT)


def ustar_prefix() -> bytes:
    """Plain ustar, a 200-character path split over the prefix and name fields."""
    path = "u" * 90 + "/" + "v" * 60 + "/" + "w" * 45
    return tar_gz([
        reg(path, "ustar prefix\n", 0o644, T0),
        reg("plain.txt", "plain\n", 0o640, T0 + 1),
    ], tarfile.USTAR_FORMAT)


def unicode_names() -> bytes:
    """UTF-8 names in plain GNU headers: emoji, CJK, right-to-left, combining characters (NFC
    and NFD spellings are two different files), and a latin-1 byte name that is not UTF-8."""
    members = [
        reg("emoji-😀🚀.txt", "emoji\n"),
        reg("中文/目录/文件.txt", "cjk\n", 0o644, T0 + 1),
        reg("日本語/ファイル.md", "kana\n", 0o600, T0 + 2),
        reg("עברית.txt", "rtl\n", 0o644, T0 + 3),
        reg("caf\u00e9.txt", "nfc\n", 0o644, T0 + 4),
        reg("cafe\u0301.txt", "nfd\n", 0o644, T0 + 5),
        reg("Ω≈ç√∫/ß∂ƒ©.txt", "symbols\n", 0o644, T0 + 6),
        sym("链接", "中文/目录/文件.txt", T0 + 7),
        reg("new\nline.txt", "newline\n", 0o644, T0 + 9),
        reg("back\\slash and\ttab", "control characters\n", 0o644, T0 + 10),
        reg("-leading-dash", "dash\n", 0o644, T0 + 11),
    ]
    utf8 = tar_bytes(members)
    # A second tar stream whose name is the latin-1 byte 0xE9, glued before utf8's end blocks:
    # a name that is not valid UTF-8, as old tools write them.
    latin = tar_bytes([reg("latin1-caf\u00e9.txt", "latin-1 bytes\n", 0o644, T0 + 8)],
                      encoding="latin-1")
    return gz(_concat_tars(utf8, latin))


def _concat_tars(*tars: bytes) -> bytes:
    """One tar from several: each one's members without its end-of-archive blocks."""
    out = b""
    for data in tars:
        end = _end_of_members(data)
        out += data[:end]
    out += b"\0" * (tarfile.BLOCKSIZE * 2)
    return out + b"\0" * (-len(out) % tarfile.RECORDSIZE)


def _end_of_members(data: bytes) -> int:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        tar.getmembers()
        return tar.offset


def many_files(n: int = 3000) -> bytes:
    """Thousands of entries in one folder (many readdir calls) plus a few deep ones."""
    members = [reg(f"flat/entry-{i:05d}-{'n' * (i % 40)}.txt", f"{i}\n", 0o644, T0 + i % 97)
               for i in range(n)]
    members += [reg(f"tree/{i % 7}/{i % 11}/{i}.dat", bytes([i % 256]) * (i % 300), 0o600, T0)
                for i in range(300)]
    return tar_gz(members)


def later_wins_beyond_tar() -> bytes:
    """Replacements GNU tar -x cannot do (it reports an error and keeps the first): a folder
    with contents then a file at its path, and a file then a member below it (the file makes
    way for an implied folder). vm0fs applies "the later member wins" to both."""
    return tar_gz([
        reg("d/inner.txt", "inner\n", 0o644, T0),
        reg("d", "d is a file now\n", 0o640, T0 + 1),
        reg("x", "x is a file first\n", 0o644, T0 + 2),
        reg("x/y", "y under x\n", 0o644, T0 + 3),
    ])


def empty_file() -> bytes:
    return tar_gz([
        reg("empty.txt", b"", 0o644, T0),
        reg("sub/also-empty", b"", 0o600, T0 + 1),
        reg("not-empty.txt", "x", 0o644, T0 + 2),
    ])


def empty_archive() -> bytes:
    """No members at all (file_count 0): the service has nothing to download."""
    return tar_gz([])


CANARY = "/tmp/vm0fs-test-canary"  # the hostile archive's symlink points here


def hostile() -> bytes:
    """Names that try to leave the version, devices, a FIFO, setuid/setgid bits, links out."""
    return tar_gz([
        reg("../escape", "escape\n"),
        reg("/abs/path", "absolute\n", 0o644, T0 + 1),
        reg("a/../../b", "dotdot\n"),
        reg("./../dotdot2", "dotdot2\n"),
        reg("a/./c", "c is fine\n", 0o644, T0 + 2),
        reg("//double//slash", "double slash\n", 0o644, T0 + 3),
        special("chr", tarfile.CHRTYPE, 1, 3),  # /dev/null
        special("blk", tarfile.BLKTYPE, 7, 0),
        special("fifo", tarfile.FIFOTYPE),
        reg("suid", "#!/bin/sh\n", 0o4755, T0 + 4),
        reg("sgid", "#!/bin/sh\n", 0o2755, T0 + 5),
        reg("both", "#!/bin/sh\n", 0o6777, T0 + 6),
        dir_("sgid-dir/", 0o2775, T0 + 7),
        dir_("sticky/", 0o1777, T0 + 8),
        sym("passwd", "../../../../etc/passwd", T0 + 9),
        hard("hl_abs", "/etc/passwd"),
        hard("hl_up", "../escape"),
        hard("hl_missing", "no-such-member"),
        dir_("..", 0o777),
        dir_("a/..", 0o777),
        reg("ok.txt", "the mount keeps working\n", 0o644, T0 + 10),
    ])


def hostile_write_through() -> bytes:
    """A symlink out of the version, then a member under it: `tar -x` refuses (it creates the
    link as a placeholder first); nothing may ever land in CANARY."""
    return tar_gz([
        sym("evil", CANARY, T0),
        reg("evil/pwned", "pwned\n", 0o644, T0 + 1),
        sym("evil2", "../../../../../../../../../../.." + CANARY, T0),
        reg("evil2/pwned", "pwned\n", 0o644, T0 + 1),
    ])


LARGE_SIZE = 5 * 1024 * 1024 + 12_345


def large_bytes(seed: int = 1, size: int = LARGE_SIZE) -> bytes:
    return random.Random(seed).randbytes(size)


def large_file() -> bytes:
    """A few MB of random bytes (many FUSE read chunks, unaligned size) between small files, so
    member offsets inside the tar matter."""
    return tar_gz([
        reg("before.txt", "before\n"),
        reg("big.bin", large_bytes(1), 0o644, T0 + 1),
        reg("middle.txt", "middle\n", 0o644, T0 + 2),
        reg("big2.bin", large_bytes(2, 1024 * 1024 + 7), 0o600, T0 + 3),
        reg("after.txt", "after\n", 0o644, T0 + 4),
    ])


SPARSE_SIZE = 3 * 1024 * 1024


def sparse_file(fmt: str, work: Path) -> bytes | None:
    """A sparse member, written by GNU tar --sparse (tarfile cannot write one): data at the
    start and in the middle, holes between and at the end. fmt: 'gnu' or 'posix' (pax 1.0).
    None when GNU tar is missing."""
    if shutil.which("tar") is None:
        return None
    src = work / f"sparse-src-{fmt}"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    with open(src / "sparse.bin", "wb") as f:
        f.write(b"head" * 1024)
        f.seek(1024 * 1024)
        f.write(random.Random(3).randbytes(8192))
        f.seek(2 * 1024 * 1024 + 100)
        f.write(b"tail-ish")
        f.truncate(SPARSE_SIZE)
    (src / "plain.txt").write_text("plain\n")
    for p in (src / "sparse.bin", src / "plain.txt"):
        os.utime(p, (T0, T0))
    out = work / f"sparse-{fmt}.tar"
    extra = ["--sparse-version=1.0"] if fmt == "posix" else []
    subprocess.run(["tar", "--sparse", f"--format={fmt}", *extra, "--owner=0", "--group=0",
                    "--numeric-owner", "-cf", str(out), "-C", str(src), "sparse.bin",
                    "plain.txt"], check=True, capture_output=True, timeout=60)
    with tarfile.open(out) as tar:
        if not tar.getmember("sparse.bin").issparse():
            return None  # this tar could not find the holes
    return gz(out.read_bytes())


def tiny(i: int) -> bytes:
    """A small distinct archive (for pagination)."""
    return tar_gz([reg(f"file-{i}.txt", f"tiny archive number {i}\n", 0o644, T0 + i)])


def ambiguous_pair() -> tuple[bytes, bytes]:
    """Two valid archives of the same content whose sha256 ids share their first 8 hex
    characters: only the gzip header's mtime differs (a birthday search, ~2^16 tries)."""
    body = gz(tar_bytes([reg("same.txt", "same content\n")]))
    seen: dict[str, bytes] = {}
    for stamp in range(1, 1 << 22):
        data = body[:4] + struct.pack("<I", stamp) + body[8:]
        key = hashlib.sha256(data).hexdigest()[:8]
        if key in seen:
            return seen[key], data
        seen[key] = data
    raise AssertionError("no 8-hex-char collision found")


# --- corrupt archives (not compared with tar: they must give EIO) ---------------------------


def corrupt_garbage() -> bytes:
    return random.Random(4).randbytes(20_000)


def corrupt_truncated_gzip() -> bytes:
    """A valid archive cut in the middle of its gzip stream."""
    data = large_file()
    return data[: len(data) // 2]


def corrupt_gzip_of_text() -> bytes:
    """A valid gzip stream whose content is not a tar archive."""
    return gz(b"this is not a tar archive, just text\n" * 200)


def corrupt_tar_truncated() -> bytes:
    """A complete gzip stream of a tar that ends inside a member's data."""
    data = tar_bytes([reg("a.txt", "a\n"), reg("big.bin", large_bytes(5, 100_000))])
    return gz(data[: 3 * tarfile.BLOCKSIZE + 50_000])


def corrupt_bad_header() -> bytes:
    """A complete gzip stream: one good member, then a header with a wrong checksum."""
    good = tar_bytes([reg("a.txt", "a\n")])
    end = _end_of_members(good)
    bad = bytearray(tar_bytes([reg("b.txt", "b\n")])[: 2 * tarfile.BLOCKSIZE])
    bad[148:156] = b"0000000\0"  # chksum field: no longer matches
    return gz(good[:end] + bytes(bad) + b"\0" * (2 * tarfile.BLOCKSIZE))


CORRUPT: dict[str, Callable[[], bytes]] = {
    "garbage": corrupt_garbage,
    "truncated-gzip": corrupt_truncated_gzip,
    "gzip-of-text": corrupt_gzip_of_text,
    "tar-truncated": corrupt_tar_truncated,
    "bad-header": corrupt_bad_header,
}

# Cases whose mounted tree must equal `tar -xzf` (minus the documented differences).
CASES: dict[str, Callable[[], bytes]] = {
    "agent": agent_style,
    "dotslash": dot_slash_dirs,
    "symlinks": symlinks,
    "hardlinks": hard_links,
    "hardlink-to-symlink": hard_link_to_symlink,
    "duplicates": duplicates,
    "pax-long": pax_long_names,
    "gnu-long": gnu_long_names,
    "ustar-prefix": ustar_prefix,
    "unicode": unicode_names,
    "empty-file": empty_file,
    "hostile": hostile,
    "large": large_file,
    "many-files": many_files,
}

# GNU tar's exit status for each case: 2 where it reports errors it then skips past.
TAR_STATUS = {"hostile": 2}


# --- the comparator -------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    kind: str  # 'f' file, 'd' dir, 'l' symlink, 'c'/'b' device, 'p' fifo, 's' socket
    mode: int  # permission bits (setuid/setgid included: compare through `perm`)
    mtime: int  # seconds
    size: int
    digest: str = ""  # sha256 of a file's bytes
    target: bytes = b""  # a symlink's target
    uid: int = -1
    gid: int = -1

    @property
    def perm(self) -> int:
        return self.mode & ~SECURITY_BITS


_KINDS = [(stat.S_ISREG, "f"), (stat.S_ISDIR, "d"), (stat.S_ISLNK, "l"), (stat.S_ISCHR, "c"),
          (stat.S_ISBLK, "b"), (stat.S_ISFIFO, "p"), (stat.S_ISSOCK, "s")]


def _kind(mode: int) -> str:
    return next(k for test, k in _KINDS if test(mode))


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def snapshot(root: str | Path) -> dict[bytes, Entry]:
    """Every entry under `root` (not root itself), by relative path as bytes. lstat and
    readlink only: links are never followed; files are read to hash them."""
    out: dict[bytes, Entry] = {}
    base = os.fsencode(root)
    stack = [b""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(base, rel) if rel else base) as it:
            names = sorted(e.name for e in it)
        for name in names:
            path_rel = os.path.join(rel, name) if rel else name
            full = os.path.join(base, path_rel)
            st = os.lstat(full)
            kind = _kind(st.st_mode)
            out[path_rel] = Entry(
                kind=kind, mode=stat.S_IMODE(st.st_mode), mtime=int(st.st_mtime),
                size=st.st_size if kind == "f" else 0,
                digest=file_digest(full) if kind == "f" else "",
                target=os.readlink(full) if kind == "l" else b"",
                uid=st.st_uid, gid=st.st_gid,
            )
            if kind == "d":
                stack.append(path_rel)
    return out


def normalize(name: str) -> str | None:
    """Where a member lands under tar -x (GNU tar strips leading '/' and './'), None for the
    names with a '..' part that tar (and vm0fs) refuse."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def explicit_dirs(archive: bytes) -> dict[bytes, int]:
    """Paths named by a directory member -> the mtime (seconds) the last such member gives."""
    found = {}
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for info in tar:
            path = normalize(info.name)
            if path:
                if info.isdir():
                    found[os.fsencode(path)] = int(info.mtime // 1)
                else:
                    found.pop(os.fsencode(path), None)
    return found


def unsafe_link_target(target: str) -> bool:
    """What GNU tar calls an unsafe symlink: absolute, or with a '..' part."""
    return target.startswith("/") or ".." in target.split("/")


def late_link_dirs(archive: bytes) -> set[bytes]:
    """Folders that directly hold a symlink GNU tar creates only at the very end (an unsafe
    one: it first leaves a placeholder file). tar makes those links after it has set the
    folders' mtimes, so the folder's mtime on disk becomes the extraction time: a tar quirk.
    Their mtime is compared with the archive's instead of tar's result."""
    found = set()
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for info in tar:
            path = normalize(info.name)
            if path and info.issym() and unsafe_link_target(info.linkname) and "/" in path:
                found.add(os.fsencode(path.rsplit("/", 1)[0]))
    return found


DEVICE_KINDS = {"c", "b", "p"}


def tar_extract(archive: bytes, work: Path, expected_status: int = 0) -> dict[bytes, Entry]:
    """`tar -xzf` the archive into a fresh folder under `work` and snapshot the result, minus
    what vm0fs leaves out on purpose.

    Documented differences between vm0fs and GNU `tar -x` (run as root, umask 022,
    --no-same-owner), each one handled here or in `tree_differences`:
    - Device nodes and FIFOs: root's tar creates them; vm0fs leaves them out. They are dropped
      from tar's result.
    - setuid/setgid: root's tar restores them; vm0fs drops them. Modes are compared with both
      bits masked (and the mount is separately checked to carry neither).
    - Owner: tar --no-same-owner makes root the owner; vm0fs shows the mounting user (also root
      here). Not compared; the mount is checked to be owned by the mounting user elsewhere.
    - Directories the archive never names: tar creates them at extraction time (mtime = now),
      vm0fs gives them the version's created_at. Their mtime is not compared with tar's (their
      mode, 0755, is; the test checks their mtime is created_at).
    - A folder directly holding an unsafe symlink (absolute, or with '..'): tar creates such
      links last, after it has set the folder's mtime, which moves it to the extraction time.
      That folder's mtime is compared with the archive's (see late_link_dirs).
    - Folder entries spelt differently from later members' paths ('.//a//b/' vs './a/b/f'):
      GNU tar matches its delayed folder attributes textually and sets them too early; the
      test archives name such folders after their contents, where both agree.
    - A '.' or './' member sets the mode and mtime of tar's -C folder; vm0fs keeps the version
      folder's own attributes (0555, created_at): the root itself is never compared.
    - A member under a symlink ('evil' -> /x, then 'evil/f'): tar -x follows a safe in-archive
      link (writing into its target) and refuses an unsafe one; vm0fs replaces the link with an
      implied folder (the later member wins). Not in CASES: see test_member_under_a_symlink.
    - A hard link to a symlink: tar -x makes another symlink (link(2) does not follow); vm0fs
      must do the same (the 'hardlink-to-symlink' case).
    - Hard links: tar makes one inode with two names, vm0fs two files with the same content,
      mode and mtime: link counts and inode numbers are not compared.
    - '..' members and hard links to a missing target: tar reports an error (exit 2) and skips
      them, as vm0fs does; the exit status is checked against `expected_status`.
    """
    src = work / "archive.tar.gz"
    dest = work / "tar-x"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    src.write_bytes(archive)
    result = subprocess.run(
        ["sh", "-c", 'umask 022 && exec tar --no-same-owner -xzf "$1" -C "$2"', "sh",
         str(src), str(dest)],
        capture_output=True, timeout=120,
    )
    assert result.returncode == expected_status, (
        f"tar -xzf exited {result.returncode}: {result.stderr.decode(errors='replace')}")
    tree = snapshot(dest)
    return {p: e for p, e in tree.items() if e.kind not in DEVICE_KINDS}


def tree_differences(mounted: dict[bytes, Entry], expected: dict[bytes, Entry],
                     explicit: dict[bytes, int], late_links: AbstractSet[bytes] = frozenset(),
                     ) -> list[str]:
    """Human-readable differences (empty when the trees match). `explicit`: the folders the
    archive names, with their mtimes (see explicit_dirs); `late_links`: see late_link_dirs."""
    problems = []
    for path in sorted(set(mounted) | set(expected)):
        shown = path.decode(errors="backslashreplace")
        got, want = mounted.get(path), expected.get(path)
        if got is None:
            problems.append(f"missing in the mount: {shown} ({want})")
            continue
        if want is None:
            problems.append(f"not made by tar -x: {shown} ({got})")
            continue
        if got.kind != want.kind:
            problems.append(f"{shown}: type {got.kind!r}, tar made {want.kind!r}")
            continue
        if got.perm != want.perm:
            problems.append(f"{shown}: mode {got.perm:o}, tar made {want.perm:o}")
        if got.kind != "d":
            if got.mtime != want.mtime:
                problems.append(f"{shown}: mtime {got.mtime}, tar made {want.mtime}")
        elif path in explicit:
            wanted = explicit[path] if path in late_links else want.mtime
            if got.mtime != wanted:
                problems.append(f"{shown}: folder mtime {got.mtime}, expected {wanted}")
        if got.kind == "f" and (got.size, got.digest) != (want.size, want.digest):
            problems.append(f"{shown}: content differs ({got.size} bytes vs {want.size})")
        if got.kind == "l" and got.target != want.target:
            problems.append(f"{shown}: link target {got.target!r}, tar made {want.target!r}")
    return problems
