"""vm0fs mounted for real (FUSE, a `vm0fs mount` subprocess) over `vm0fs dev-server`.

One data dir, one dev-server and one mount serve most of the module (module-scoped `world`);
tests that need their own mount (remount, TTL, signals, CLI errors) make it. Every version of a
case archive must look exactly like `tar -xzf` of the same bytes, minus the differences that
`archives.tar_extract` documents. Calls into the mount are bounded (`Mount.run`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import archives
import pytest
from archives import Entry, snapshot
from conftest import DevServer, start_dev_server
from mounting import (
    Mount,
    MountFactory,
    bounded,
    is_mounted,
    pid_alive,
    pids_using,
    run_cli,
    stop_pid,
    watchdog,
)

pytest_plugins = ["mounting"]
pytestmark = [pytest.mark.timeout(120), pytest.mark.fallback]

EPOCH = datetime(2024, 1, 1, tzinfo=UTC).timestamp()
N_BULK = 125  # artifacts beyond the cases: more than one page of 100
N_VERSIONS = 107  # versions of one artifact: more than one page of 100
N_CONCURRENT = 20  # files of the concurrency artifact (16 readers)


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def vid(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Art:
    """One artifact folder of the data dir, as the tests expect to see it."""

    folder: str
    versions: dict[str, bytes] = field(default_factory=dict)  # file name -> archive bytes
    created: dict[str, float] = field(default_factory=dict)  # file name -> created_at
    current: str | None = None  # file name
    name: str | None = None
    artifact_id: str | None = None

    def id_of(self, fname: str) -> str:
        return vid(self.versions[fname])

    @property
    def current_id(self) -> str:
        assert self.current is not None
        return self.id_of(self.current)

    @property
    def updated_at(self) -> float:
        return max(self.created.values())


def write_art(data_dir: Path, art: Art) -> None:
    path = data_dir / art.folder
    path.mkdir(parents=True, exist_ok=True)
    for fname, data in art.versions.items():
        tmp = path / f".{fname}.tmp"  # not *.tar.gz: a running server never sees it half-written
        tmp.write_bytes(data)
        os.utime(tmp, (art.created[fname], art.created[fname]))
        os.replace(tmp, path / fname)
    side: dict[str, Any] = {
        "versions": {f: {"created_at": iso(t)} for f, t in art.created.items()},
        "created_at": iso(EPOCH),
    }
    for key, value in (("current", art.current), ("name", art.name), ("id", art.artifact_id)):
        if value is not None:
            side[key] = value
    tmp = path / ".artifact.json.tmp"
    tmp.write_text(json.dumps(side))
    os.replace(tmp, path / "artifact.json")


def single(folder: str, data: bytes, created: float, **kwargs: Any) -> Art:
    return Art(folder, {"v1.tar.gz": data}, {"v1.tar.gz": created}, "v1.tar.gz", **kwargs)


def concurrent_archive(tag: str, n: int, size: int) -> tuple[bytes, dict[str, bytes]]:
    files = {f"part-{i:02d}.bin": archives.large_bytes(zlib.crc32(f"{tag}-{i}".encode()), size)
             for i in range(n)}
    members = [archives.reg(f"data/{name}", body, 0o644, archives.T0 + i)
               for i, (name, body) in enumerate(files.items())]
    return archives.tar_gz(members), files


@dataclass
class World:
    data_dir: Path
    server: DevServer
    mount: Mount
    arts: dict[str, Art]
    compare: dict[str, bytes]  # case name -> archive, for the tar comparison
    skipped: dict[str, str]  # case name -> why it could not be built
    concurrent_files: dict[str, bytes]

    def art_dir(self, folder: str) -> Path:
        return self.mount.artifacts / folder

    def version_dir(self, folder: str, fname: str = "v1.tar.gz") -> Path:
        return self.art_dir(folder) / self.arts[folder].id_of(fname)

    def requests(self) -> dict[str, int]:
        return self.server.stats()["requests"]


def build_world(data_dir: Path, work: Path) -> tuple[dict[str, Art], dict[str, bytes],
                                                     dict[str, str], dict[str, bytes]]:
    arts: dict[str, Art] = {}
    compare: dict[str, bytes] = {}
    skipped: dict[str, str] = {}
    t = EPOCH

    def add(art: Art) -> None:
        arts[art.folder] = art

    for i, (case, builder) in enumerate(archives.CASES.items()):
        compare[case] = builder()
        add(single(case, compare[case], t + 60 * i))
    for fmt in ("gnu", "posix"):
        data = archives.sparse_file(fmt, work)
        if data is None:
            skipped[f"sparse-{fmt}"] = "GNU tar cannot write a sparse member here"
        else:
            compare[f"sparse-{fmt}"] = data
            add(single(f"sparse-{fmt}", data, t + 3000))
    add(single("write-through", archives.hostile_write_through(), t + 3100))
    add(single("later-wins", archives.later_wins_beyond_tar(), t + 3150))
    add(single("empty-archive", archives.empty_archive(), t + 3200))

    corrupt = Art("corrupt")
    for j, (kind, builder) in enumerate(archives.CORRUPT.items()):
        corrupt.versions[f"{kind}.tar.gz"] = builder()
        corrupt.created[f"{kind}.tar.gz"] = t + 4000 + j
    corrupt.versions["good.tar.gz"] = archives.agent_style()
    corrupt.created["good.tar.gz"] = t + 3900  # the oldest; current on purpose
    corrupt.current = "good.tar.gz"
    add(corrupt)

    # The request-count tests each need a version nobody else looks inside.
    add(single("counted", archives.tar_gz([archives.reg("a.txt", "counted a\n"),
                                           archives.reg("d/b.txt", "counted b\n")]), t + 5000))
    concurrent, files = concurrent_archive("concurrent", N_CONCURRENT, 200_000)
    add(single("concurrent", concurrent, t + 5100))

    many = Art("many-versions")
    for k in range(N_VERSIONS):
        fname = f"v{k:03d}.tar.gz"
        many.versions[fname] = archives.tiny(10_000 + k)
        many.created[fname] = t + 6000 + k * 10
    many.current = "v003.tar.gz"  # not the newest, and on the second page of versions
    add(many)
    first, second = archives.ambiguous_pair()
    add(Art("ambiguous", {"a.tar.gz": first, "b.tar.gz": second},
            {"a.tar.gz": t + 7000, "b.tar.gz": t + 7001}, "b.tar.gz"))

    twin = archives.tiny(1)
    add(single("twin-a", twin, t + 8000, name="twin",
               artifact_id="00000000-0000-4000-8000-00000000000a"))
    add(single("twin-b", archives.tiny(2), t + 8001, name="twin",
               artifact_id="00000000-0000-4000-8000-00000000000b"))
    for folder, name in (("name-slash", "a/b"), ("name-dot", "."), ("name-dotdot", ".."),
                         ("name-nul", "x\0y")):
        add(single(folder, archives.tiny(len(folder)), t + 8100, name=name))
    add(Art("no-versions"))  # a folder with no archive: an artifact without versions
    for k in range(N_BULK):
        add(single(f"bulk-{k:03d}", archives.tiny(k), t + 9000 + k))

    for art in arts.values():
        write_art(data_dir, art)
    return arts, compare, skipped, files


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory,
          module_mount_vm0fs: MountFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("world")
    data_dir = base / "data"
    data_dir.mkdir()
    arts, compare, skipped, files = build_world(data_dir, base)
    server = start_dev_server(data_dir, log_path=base / "dev-server.log")
    watchdog.add(server.proc.pid)
    try:
        mount = module_mount_vm0fs(server)
        yield World(data_dir, server, mount, arts, compare, skipped, files)
        module_mount_vm0fs.close()
    finally:
        server.stop()
        watchdog.remove(server.proc.pid)


def folder_name(art: Art) -> str:
    """The folder vm0fs shows for an artifact (names shared by two get '@<id>')."""
    return art.name if art.name is not None else art.folder


def ls_l(path: Path) -> dict[str, os.stat_result]:
    """What `ls -l` does: list, lstat every entry, readlink the links."""
    out = {}
    for name in os.listdir(path):
        st = os.lstat(path / name)
        if stat.S_ISLNK(st.st_mode):
            os.readlink(path / name)
        out[name] = st
    return out


def assert_errno(code: int, fn: Callable[..., Any], *args: Any) -> None:
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno == code, (
        f"{fn.__name__}{args}: {errno.errorcode.get(info.value.errno)} instead of "
        f"{errno.errorcode[code]}")


# --- every case equals tar -x --------------------------------------------------------------

COMPARED = [*archives.CASES, "sparse-gnu", "sparse-posix"]


@pytest.mark.parametrize("case", COMPARED)
def test_version_tree_equals_tar_x(world: World, case: str, tmp_path: Path) -> None:
    if case in world.skipped:
        pytest.skip(world.skipped[case])
    data = world.compare[case]
    art = world.arts[case]
    root = world.version_dir(case)
    mounted = world.mount.run(snapshot, root)
    expected = archives.tar_extract(data, tmp_path, archives.TAR_STATUS.get(case, 0))
    explicit = archives.explicit_dirs(data)
    problems = archives.tree_differences(mounted, expected, explicit, archives.late_link_dirs(data))
    assert not problems, "\n".join(problems)

    created = int(art.created["v1.tar.gz"])
    for path, entry in mounted.items():
        where = path.decode(errors="backslashreplace")
        assert (entry.uid, entry.gid) == (os.getuid(), os.getgid()), where
        assert not entry.mode & archives.SECURITY_BITS, f"{where}: setuid/setgid kept"
        assert entry.kind in ("f", "d", "l"), f"{where}: a {entry.kind!r} in a version"
        if entry.kind == "d" and path not in explicit:
            assert (entry.perm, entry.mtime) == (0o755, created), f"implied dir {where}"
    assert int(world.mount.run(os.lstat, root).st_mtime) == created


def test_hostile_archive_stays_inside(world: World) -> None:
    root = world.version_dir("hostile")
    tree = world.mount.run(snapshot, root)
    names = {os.path.basename(p) for p in tree}
    for bad in (b"escape", b"b", b"dotdot2", b"chr", b"blk", b"fifo", b"hl_abs", b"hl_up",
                b"hl_missing"):
        assert bad not in names, bad
    assert set(tree) >= {b"abs", b"abs/path", b"a", b"a/c", b"double/slash", b"passwd"}
    assert tree[b"passwd"].target == b"../../../../etc/passwd"  # verbatim, never followed
    for perm_name in (b"suid", b"sgid", b"both", b"sgid-dir"):
        assert not tree[perm_name].mode & archives.SECURITY_BITS, perm_name
    assert tree[b"both"].perm == 0o777 and tree[b"sticky"].mode == 0o1777
    # Nothing landed beside the version, the artifact or the mount root.
    assert "artifacts" in (top := world.mount.run(os.listdir, world.mount.path))
    assert not {"escape", "b", "dotdot2", "abs", "passwd", "etc"} & set(top)
    assert sorted(world.mount.run(os.listdir, world.art_dir("hostile"))) == sorted(
        ["current", "history", world.arts["hostile"].current_id])
    for outside in ("escape", "b", "dotdot2", "abs"):
        assert_errno(errno.ENOENT, world.mount.run, os.lstat, world.mount.artifacts / outside)
        assert_errno(errno.ENOENT, world.mount.run, os.lstat, world.art_dir("hostile") / outside)
    # The mount keeps working.
    assert world.mount.run((root / "ok.txt").read_text) == "the mount keeps working\n"
    assert "agent" in world.mount.run(os.listdir, world.mount.artifacts)


def test_member_under_an_outside_symlink(world: World) -> None:
    """'evil' -> /outside, then 'evil/pwned': vm0fs lets the later member win (evil becomes an
    implied folder); tar -x refuses the second member. Nothing is ever written outside."""
    assert not os.path.lexists(archives.CANARY)
    root = world.version_dir("write-through")
    tree = world.mount.run(snapshot, root)
    created = int(world.arts["write-through"].created["v1.tar.gz"])
    for top in (b"evil", b"evil2"):
        assert tree[top].kind == "d" and (tree[top].perm, tree[top].mtime) == (0o755, created)
        assert tree[top + b"/pwned"].kind == "f"
    assert not os.path.lexists(archives.CANARY)


def test_later_member_wins_where_tar_gives_up(world: World) -> None:
    """tar -x fails on these two (exit 2) and keeps the first; the spec says the later wins."""
    tree = world.mount.run(snapshot, world.version_dir("later-wins"))
    created = int(world.arts["later-wins"].created["v1.tar.gz"])
    assert sorted(tree) == [b"d", b"x", b"x/y"]
    assert (tree[b"d"].kind, tree[b"d"].perm, tree[b"d"].mtime) == ("f", 0o640, archives.T0 + 1)
    assert world.mount.run((world.version_dir("later-wins") / "d").read_text) == (
        "d is a file now\n")
    assert (tree[b"x"].kind, tree[b"x"].perm, tree[b"x"].mtime) == ("d", 0o755, created)
    assert tree[b"x/y"].kind == "f"


def test_large_file_random_reads(world: World) -> None:
    path = world.version_dir("large") / "big.bin"
    expected = archives.large_bytes(1)

    def reads() -> None:
        with open(path, "rb", buffering=0) as f:
            assert os.fstat(f.fileno()).st_size == len(expected)
            rng = __import__("random").Random(9)
            spots = [(0, 1), (len(expected) - 1, 1), (len(expected) - 10, 100),
                     (len(expected), 10), (len(expected) + 5000, 10), (131071, 3),
                     (131072 * 3 - 1, 262_145)]
            spots += [(rng.randrange(len(expected)), rng.randrange(1, 300_000))
                      for _ in range(40)]
            for off, size in spots:
                assert os.pread(f.fileno(), size, off) == expected[off:off + size], (off, size)
            f.seek(0)
            whole = b"".join(iter(lambda: f.read(65_536 + 17), b""))
            assert whole == expected

    world.mount.run(reads)
    root = world.version_dir("large")
    assert world.mount.run((root / "big2.bin").read_bytes) == archives.large_bytes(
        2, 1024 * 1024 + 7)
    assert world.mount.run((root / "after.txt").read_text) == "after\n"


def test_sparse_file_reads_holes_as_zeroes(world: World) -> None:
    for case in ("sparse-gnu", "sparse-posix"):
        if case in world.skipped:
            continue
        data = world.mount.run((world.version_dir(case) / "sparse.bin").read_bytes)
        assert len(data) == archives.SPARSE_SIZE
        assert data[:4096] == b"head" * 1024
        assert data[4096:1024 * 1024] == bytes(1024 * 1024 - 4096)
        assert data[-1000:] == bytes(1000)


# --- listings, pagination, names -----------------------------------------------------------


def expected_folders(world: World) -> list[str]:
    names = []
    for art in world.arts.values():
        name = folder_name(art)
        if name == "twin":
            name = f"twin@{art.artifact_id}"
        names.append(name.replace("/", "\uff0f").replace("\0", "\u2400")
                     if name not in (".", "..") else "\uff0e" * len(name))
    return names


def test_artifacts_listed_once_across_pages(world: World) -> None:
    listed = world.mount.run(os.listdir, world.mount.artifacts)
    assert len(listed) == len(set(listed)), "an artifact listed twice"
    assert len(listed) > 100
    assert sorted(listed) == sorted(expected_folders(world))


def test_many_versions_current_and_prefixes(world: World) -> None:
    art = world.arts["many-versions"]
    folder = world.art_dir("many-versions")
    m = world.mount
    listed = m.run(os.listdir, folder)
    assert len(listed) == len(set(listed)) == N_VERSIONS + 2
    assert sorted(listed) == sorted([*map(art.id_of, art.versions), "current", "history"])
    assert m.run(os.readlink, folder / "current") == art.current_id
    assert art.current_id != art.id_of(f"v{N_VERSIONS - 1:03d}.tar.gz")
    assert m.run(os.listdir, folder / "current") == [f"file-{10_003}.txt"]

    for fname in ("v000.tar.gz", "v003.tar.gz", "v042.tar.gz", "v106.tar.gz"):
        full = art.id_of(fname)
        for n in (8, 12, 63):
            prefix = folder / full[:n]
            assert m.run(os.readlink, prefix) == full
            assert m.run(os.listdir, prefix) == m.run(os.listdir, folder / full)
        assert_errno(errno.ENOENT, m.run, os.lstat, folder / full[:7])
        assert full[:8] not in listed
    assert_errno(errno.ENOENT, m.run, os.lstat, folder / ("0" * 64))
    assert_errno(errno.ENOENT, m.run, os.lstat, folder / "current2")


def test_ambiguous_prefix_resolves_nowhere(world: World) -> None:
    art = world.arts["ambiguous"]
    a, b = art.id_of("a.tar.gz"), art.id_of("b.tar.gz")
    common = len(os.path.commonprefix([a, b]))
    assert common >= 8
    folder = world.art_dir("ambiguous")
    for n in range(8, common + 1):
        assert_errno(errno.ENOENT, world.mount.run, os.lstat, folder / a[:n])
    assert world.mount.run(os.readlink, folder / a[:common + 1]) == a
    assert world.mount.run(os.readlink, folder / b[:common + 1]) == b
    assert world.mount.run(os.readlink, folder / "current") == b


def test_duplicate_and_odd_names(world: World) -> None:
    m = world.mount
    listed = set(m.run(os.listdir, m.artifacts))
    for suffix, folder in (("a", "twin-a"), ("b", "twin-b")):
        name = f"twin@00000000-0000-4000-8000-00000000000{suffix}"
        assert name in listed
        art = world.arts[folder]
        assert sorted(m.run(os.listdir, m.artifacts / name)) == sorted(
            ["current", "history", art.current_id])
        inner = m.run(os.listdir, m.artifacts / name / "current")
        assert inner == [f"file-{1 if suffix == 'a' else 2}.txt"]
    assert "twin" not in listed
    assert_errno(errno.ENOENT, m.run, os.lstat, m.artifacts / "twin")
    for name in ("a\uff0fb", "\uff0e", "\uff0e\uff0e", "x\u2400y"):
        assert name in listed
        assert "current" in m.run(os.listdir, m.artifacts / name)


def test_artifact_without_versions_has_no_current(world: World) -> None:
    folder = world.art_dir("no-versions")
    assert world.mount.run(os.listdir, folder) == ["history"]
    assert world.mount.run(os.listdir, folder / "history") == []
    assert_errno(errno.ENOENT, world.mount.run, os.lstat, folder / "current")


def test_folder_mtimes_and_owner(world: World) -> None:
    m = world.mount
    for folder in ("agent", "many-versions", "corrupt"):
        art = world.arts[folder]
        st = m.run(os.lstat, world.art_dir(folder))
        assert stat.S_ISDIR(st.st_mode) and int(st.st_mtime) == int(art.updated_at), folder
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
        for fname, created in art.created.items():
            vst = m.run(os.lstat, world.art_dir(folder) / art.id_of(fname))
            assert stat.S_ISDIR(vst.st_mode) and int(vst.st_mtime) == int(created)


# --- request counts ------------------------------------------------------------------------


def test_ls_l_never_downloads(world: World) -> None:
    m = world.mount
    world.server.reset()
    top = m.run(ls_l, m.artifacts)
    assert len(top) == len(world.arts)
    for folder in ("many-versions", "corrupt", "counted", "concurrent", "empty-archive", "large"):
        entries = m.run(ls_l, world.art_dir(folder))
        assert "current" in entries and stat.S_ISLNK(entries["current"].st_mode)
    counts = world.requests()
    assert counts["download"] == 0 and counts["blob"] == 0, counts
    assert counts["list_artifacts"] >= 0 and counts["list_versions"] >= 1, counts


def test_first_look_inside_downloads_once(world: World) -> None:
    m = world.mount
    root = world.version_dir("counted")
    m.run(os.listdir, world.art_dir("counted"))
    world.server.reset()
    assert sorted(m.run(os.listdir, root)) == ["a.txt", "d"]
    stats = world.server.stats()
    assert stats["requests"]["download"] == 1 and stats["requests"]["blob"] == 1, stats
    assert stats["blob_bytes"] == len(world.arts["counted"].versions["v1.tar.gz"])
    world.server.reset()
    for _ in range(3):
        assert m.run((root / "a.txt").read_text) == "counted a\n"
        assert m.run((root / "d" / "b.txt").read_text) == "counted b\n"
        assert m.run(snapshot, root)
        assert m.run((world.art_dir("counted") / "current" / "a.txt").read_text) == "counted a\n"
    counts = world.requests()
    assert counts["download"] == 0 and counts["blob"] == 0, counts


def test_concurrent_first_reads_download_once(world: World) -> None:
    m = world.mount
    m.run(os.listdir, world.art_dir("concurrent"))  # lists only
    world.server.reset()
    root = world.version_dir("concurrent")
    names = sorted(world.concurrent_files)[-16:]  # the last members: they arrive last
    barrier = threading.Barrier(16)

    def read(name: str) -> bytes:
        barrier.wait(timeout=30)
        with open(root / "data" / name, "rb") as f:
            return f.read()

    def all_reads() -> list[bytes]:
        with ThreadPoolExecutor(16) as pool:
            return list(pool.map(read, names))

    results = m.run(all_reads)
    for name, data in zip(names, results, strict=True):
        assert data == world.concurrent_files[name], name
    stats = world.server.stats()
    assert stats["requests"]["download"] == 1 and stats["requests"]["blob"] == 1, stats
    assert stats["blob_bytes"] == len(world.arts["concurrent"].versions["v1.tar.gz"])


def test_remount_with_same_cache_never_downloads(world: World, mount_vm0fs: MountFactory,
                                                 tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    readable = [c for c in world.compare if c in world.arts]

    def read_all(m: Mount) -> dict[str, dict[bytes, Entry]]:
        return {c: m.run(snapshot, m.artifacts / c / world.arts[c].current_id)
                for c in readable}

    first = mount_vm0fs(world.server, cache_dir=cache)
    world.server.reset()
    before = read_all(first)
    assert world.requests()["download"] == len(readable)
    assert first.unmount() == 0, first.log()
    assert not is_mounted(first.path)

    world.server.reset()
    second = mount_vm0fs(world.server, cache_dir=cache)
    after = read_all(second)
    assert after == before
    counts = world.requests()
    assert counts["download"] == 0 and counts["blob"] == 0, counts
    assert second.unmount() == 0, second.log()


# --- errors --------------------------------------------------------------------------------


def test_everything_is_read_only(world: World) -> None:
    m = world.mount
    version = world.version_dir("agent")
    existing = version / "README.md"
    attempts: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
    for folder in (m.path, m.artifacts, world.art_dir("agent"), version, version / "out"):
        attempts += [
            (os.open, (folder / "new.txt", os.O_WRONLY | os.O_CREAT, 0o644)),
            (os.mkdir, (folder / "newdir",)),
            (os.symlink, ("x", folder / "newlink")),
            (os.mknod, (folder / "fifo", stat.S_IFIFO | 0o644)),
        ]
    attempts += [
        (os.open, (existing, os.O_WRONLY)),
        (os.open, (existing, os.O_RDWR)),
        (os.open, (existing, os.O_WRONLY | os.O_TRUNC)),
        (os.open, (existing, os.O_WRONLY | os.O_APPEND)),
        (os.truncate, (existing, 0)),
        (os.unlink, (existing,)),
        (os.rename, (existing, version / "renamed.md")),
        (os.rename, (version / "out", version / "out2")),
        (os.rename, (world.art_dir("agent"), m.artifacts / "renamed")),
        (os.link, (existing, version / "hardlink")),
        (os.chmod, (existing, 0o777)),
        (os.chmod, (version, 0o777)),
        (os.chown, (existing, 1, 1)),
        (os.utime, (existing, (0, 0))),
        (os.rmdir, (version / "out" / "ckpt" / "epoch-1",)),
        (os.rmdir, (version,)),
        (os.unlink, (world.art_dir("agent") / "current",)),
        (os.setxattr, (existing, "user.x", b"1")),
    ]
    for fn, args in attempts:
        assert_errno(errno.EROFS, m.run, fn, *args)
    assert m.run(existing.read_text) == "# run 42\n"


def test_unknown_names(world: World) -> None:
    m = world.mount
    for path in (m.path / "nope", m.artifacts / "nope", world.art_dir("agent") / "nope",
                 world.version_dir("agent") / "nope", world.version_dir("agent") / "out" / "x",
                 world.art_dir("agent") / ("f" * 64), world.art_dir("agent") / "current2"):
        assert_errno(errno.ENOENT, m.run, os.lstat, path)
        assert_errno(errno.ENOENT, m.run, os.listdir, path)
    assert_errno(errno.ENOTDIR, m.run, os.listdir, world.version_dir("agent") / "README.md")


def test_corrupt_versions_give_eio_and_others_still_work(world: World) -> None:
    m = world.mount
    art = world.arts["corrupt"]
    folder = world.art_dir("corrupt")
    good = folder / art.id_of("good.tar.gz")
    assert m.run(os.readlink, folder / "current") == art.id_of("good.tar.gz")
    for kind in archives.CORRUPT:
        broken = folder / art.id_of(f"{kind}.tar.gz")
        assert stat.S_ISDIR(m.run(os.lstat, broken).st_mode)  # listed: no download yet
        assert_errno(errno.EIO, m.run, os.listdir, broken)
        assert_errno(errno.EIO, m.run, os.listdir, broken)  # still, not a hang or ENOENT
        if kind == "truncated-gzip":  # members before the cut are not served either
            assert_errno(errno.EIO, m.run, os.open, broken / "before.txt", os.O_RDONLY)
        assert m.run((good / "README.md").read_text) == "# run 42\n"
        assert m.run(os.listdir, folder / "current")
    assert "agent" in m.run(os.listdir, m.artifacts)


def test_empty_version_is_an_empty_folder_without_download(world: World) -> None:
    m = world.mount
    folder = world.art_dir("empty-archive")
    m.run(os.listdir, folder)
    world.server.reset()
    version = world.version_dir("empty-archive")
    assert m.run(os.listdir, version) == []
    assert m.run(os.listdir, folder / "current") == []
    assert stat.S_ISDIR(m.run(os.lstat, version).st_mode)
    assert_errno(errno.ENOENT, m.run, os.lstat, version / "anything")
    counts = world.requests()
    assert counts["download"] == 0 and counts["blob"] == 0, counts


# --- metadata TTL --------------------------------------------------------------------------


def poll(fn: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not fn():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.2)


def test_metadata_ttl_new_version_and_current(dev_server: Callable[..., DevServer],
                                              mount_vm0fs: MountFactory,
                                              tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    art = single("live", archives.tiny(1), EPOCH)
    write_art(data_dir, art)
    write_art(data_dir, single("doomed", archives.tiny(4), EPOCH + 50))
    srv = dev_server(data_dir)
    quick = mount_vm0fs(srv, "--metadata-ttl", "1")
    slow = mount_vm0fs(srv, "--metadata-ttl", "3600")
    v1 = art.id_of("v1.tar.gz")
    for m in (quick, slow):
        assert sorted(m.run(os.listdir, m.artifacts / "live")) == sorted(
            ["current", "history", v1])
        assert m.run(os.readlink, m.artifacts / "live" / "current") == v1
        assert sorted(m.run(os.listdir, m.artifacts)) == ["doomed", "live"]

    art.versions["v2.tar.gz"] = archives.tiny(2)
    art.created["v2.tar.gz"] = EPOCH + 100
    art.current = "v2.tar.gz"
    write_art(data_dir, art)
    write_art(data_dir, single("newcomer", archives.tiny(3), EPOCH + 200))
    shutil.rmtree(data_dir / "doomed")
    v2 = art.id_of("v2.tar.gz")

    live = quick.artifacts / "live"
    poll(lambda: v2 in quick.run(os.listdir, live), 15, "the new version")
    poll(lambda: quick.run(os.readlink, live / "current") == v2, 15, "current moving")
    assert quick.run(os.listdir, live / "current") == ["file-2.txt"]
    poll(lambda: sorted(quick.run(os.listdir, quick.artifacts)) == ["live", "newcomer"], 15,
         "the new artifact, without the removed one")
    poll(lambda: not quick.run(os.path.lexists, quick.artifacts / "doomed"), 15,
         "the removed artifact gone")  # the kernel may keep its entry for one more TTL
    assert_errno(errno.ENOENT, quick.run, os.lstat, quick.artifacts / "doomed")
    assert int(quick.run(os.lstat, live).st_mtime) == int(EPOCH + 100)
    # The mount with a long TTL still shows what it listed first.
    assert sorted(slow.run(os.listdir, slow.artifacts / "live")) == sorted(
        ["current", "history", v1])
    assert slow.run(os.readlink, slow.artifacts / "live" / "current") == v1
    assert sorted(slow.run(os.listdir, slow.artifacts)) == ["doomed", "live"]


# --- vm0fs mount / unmount as a command ----------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_one_line_error(result: Any, mountpoint: Path) -> None:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vm0fs: "), result.stderr
    assert result.stdout == ""
    assert not is_mounted(mountpoint)


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    data_dir = tmp_path_factory.mktemp("cli-data")
    write_art(data_dir, single("one", archives.tiny(1), EPOCH))
    server = start_dev_server(data_dir)
    watchdog.add(server.proc.pid)
    yield server
    server.stop()
    watchdog.remove(server.proc.pid)


@pytest.mark.parametrize("foreground", [True, False], ids=["foreground", "background"])
@pytest.mark.parametrize("problem", ["no key", "wrong key", "unreachable", "missing mount point",
                                     "mount point not empty"])
def test_mount_errors(cli_server: DevServer, tmp_path: Path, problem: str,
                      foreground: bool) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    url, token = cli_server.url, cli_server.token
    if problem == "no key":
        token = None
    elif problem == "wrong key":
        token = "not-the-key"
    elif problem == "unreachable":
        url = f"http://127.0.0.1:{closed_port()}"
    elif problem == "missing mount point":
        mountpoint = tmp_path / "missing"
    else:
        (mountpoint / "something").write_text("x")
    args = ["mount", str(mountpoint), "--api-url", url, "--cache-dir", str(tmp_path / "cache")]
    try:
        result = run_cli(*args, *(["--foreground"] if foreground else []), token=token)
    finally:
        for pid in pids_using(mountpoint):  # a background child that should not exist
            stop_pid(pid)
        if is_mounted(mountpoint):
            run_cli("unmount", "--lazy", str(mountpoint))
    assert_one_line_error(result, mountpoint)
    assert not pids_using(mountpoint), "a mount process was left running"
    if problem == "mount point not empty":
        assert os.listdir(mountpoint) == ["something"]
    if problem == "wrong key":
        assert "key" in result.stderr.lower()


def test_background_mount_and_unmount(cli_server: DevServer, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    args = ["mount", str(mountpoint), "--api-url", cli_server.url, "--cache-dir",
            str(tmp_path / "cache")]
    children: list[int] = []
    try:
        result = run_cli(*args, token=cli_server.token)
        children = pids_using(mountpoint)
        for pid in children:
            watchdog.add(pid, mountpoint)
        assert result.returncode == 0, result.stderr
        assert is_mounted(mountpoint)  # mounted by the time the command returns
        assert len(children) == 1
        assert bounded(os.listdir, mountpoint / "artifacts") == ["one"]
        done = run_cli("unmount", str(mountpoint))
        assert done.returncode == 0, done.stderr
        assert not is_mounted(mountpoint)
        deadline = time.monotonic() + 15
        while any(pid_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(pid_alive(p) for p in children), "the mount process outlived unmount"
        again = run_cli("unmount", str(mountpoint))
        assert_one_line_error(again, mountpoint)
    finally:
        if is_mounted(mountpoint):
            run_cli("unmount", "--lazy", str(mountpoint))
        for pid in children:
            stop_pid(pid)
            watchdog.remove(pid, mountpoint)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_unmounts_cleanly(cli_server: DevServer, mount_vm0fs: MountFactory,
                                 sig: signal.Signals) -> None:
    m = mount_vm0fs(cli_server)
    assert m.run(os.listdir, m.artifacts) == ["one"]
    m.proc.send_signal(sig)
    assert m.proc.wait(20) == 0, m.log()
    assert not is_mounted(m.path)
    assert "Traceback" not in m.log()


# --- the other API spelling, a broken transfer ---------------------------------------------


def test_camel_case_api_and_a_broken_transfer(dev_server: Callable[..., DevServer],
                                              mount_vm0fs: MountFactory,
                                              tmp_path: Path) -> None:
    """The service's later release spells every field in camelCase; a blob transfer that breaks
    halfway must still end in the right bytes (one version, read correctly)."""
    data_dir = tmp_path / "data"
    art = single("camel", archives.large_file(), EPOCH)
    write_art(data_dir, art)
    srv = dev_server(data_dir, "--camel-case")
    m = mount_vm0fs(srv)
    folder = m.artifacts / "camel"
    assert sorted(m.run(os.listdir, folder)) == sorted(["current", "history", art.current_id])
    assert int(m.run(os.lstat, folder / art.current_id).st_mtime) == int(EPOCH)
    srv.set_faults(truncate_blob=1)
    data = m.run((folder / "current" / "big.bin").read_bytes)
    assert data == archives.large_bytes(1)
    assert m.run((folder / "current" / "after.txt").read_text) == "after\n"
    assert srv.stats()["requests"]["blob"] >= 2  # the fault did break the first transfer


# --- memory ----------------------------------------------------------------------------------


def inode_numbers(root: Path) -> dict[str, int]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, root)] = os.lstat(path).st_ino
    return found


def held_in_memory(m: Mount) -> int:
    status = json.loads(m.run((m.path / ".vm0fs" / "status.json").read_text))
    return status["memory"]["versions_in_memory"]


def test_dropped_kernel_caches_let_the_index_go(dev_server: Callable[..., DevServer],
                                                mount_vm0fs: MountFactory,
                                                tmp_path: Path) -> None:
    """`echo 2 > drop_caches` makes the kernel forget the version's entries: the mount lets
    go of its index, and everything reads the same, under the same inode numbers, after."""
    if os.geteuid() != 0:
        pytest.skip("drop_caches needs root")
    data_dir = tmp_path / "data"
    members = [archives.reg(f"d{i % 7}/sub{i % 3}/f{i:04d}.txt", f"file {i}\n" * (i % 50),
                            0o644, archives.T0 + i) for i in range(3000)]
    art = single("many", archives.tar_gz(members), EPOCH)
    write_art(data_dir, art)
    m = mount_vm0fs(dev_server(data_dir))
    root = m.artifacts / "many" / art.id_of("v1.tar.gz")
    before = m.run(snapshot, root)
    numbers = m.run(inode_numbers, root)
    assert len(before) == 3000 + 7 + 21
    assert held_in_memory(m) == 1
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")
    poll(lambda: held_in_memory(m) == 0, 60, "the index let go")
    assert m.run(inode_numbers, root) == numbers
    assert m.run(snapshot, root) == before
    assert "Traceback" not in m.log()
