"""A cache that cannot lie and a mount that cannot die (issue 14), on real mounts.

Every test damages real cache files itself, or starves the mount of disk, or makes the servers
stall, and checks three things: no wrong byte is ever served (what is served equals `tar -x`
of the archive), the mount stays alive and heals (a damaged copy is fetched again, also under a
running mount), and every failure is bounded in time and says why (in the log and `vm0fs
status`).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import random
import shutil
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import archives
import pytest
from archives import T0, reg, tar_bytes, tar_gz
from conftest import DevServer
from mounting import Mount, MountFactory, bounded, run_cli
from test_robustness import (
    assert_errno,
    assert_like_tar,
    cached_versions,
    poll,
    read_direct,
    read_file,
    tree_bytes,
    write_artifact,
)

from vm0fs.tree import ROOT_ENTRY, TreeIndex

pytest_plugins = ["mounting"]
pytestmark = pytest.mark.timeout(180)

Server = Callable[..., DevServer]
BIG = 700_000  # bytes of each incompressible file: several checked blocks each


def version_of(tag: str, files: int = 4) -> bytes:
    """A folder of incompressible files and a few small ones."""
    members = [reg(f"{tag}/part-{i}.bin", archives.large_bytes(1000 + i, BIG), 0o644, T0 + i)
               for i in range(files)]
    members += [reg(f"{tag}/small-{j}.txt", f"small {j}\n", 0o644, T0) for j in range(5)]
    return tar_gz(members)


def status_of(m: Mount) -> dict[str, Any]:
    return json.loads(m.run(read_file, m.path / ".vm0fs" / "status.json"))


def errors_text(m: Mount) -> str:
    return "\n".join(e["message"] for e in status_of(m)["last_errors"])


def entry_span(cache_dir: Path, version_id: str, *path: str) -> tuple[int, int]:
    """(offset in data.tar, size) of a file of a cached version, from its index."""
    index = TreeIndex.load(cache_dir / "versions" / version_id / "index.bin")
    entry = ROOT_ENTRY
    for part in path:
        found = index.find(entry, part)
        assert found is not None, part
        entry = found
    return index.offset(entry), index.size(entry)


def flip(path: Path, offset: int, count: int = 1) -> None:
    """Change `count` bytes at `offset` of a file in place (each XOR 0xff)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(count))
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def downloads(srv: DevServer) -> int:
    return srv.stats()["requests"].get("blob", 0)


@pytest.fixture
def one_version(dev_server: Server, tmp_path: Path) -> tuple[DevServer, str, bytes]:
    data = version_of("run")
    data_dir = tmp_path / "data"
    [version_id] = write_artifact(data_dir, "run", [data])
    return dev_server(data_dir), version_id, data


def cache_once(mount_vm0fs: MountFactory, srv: DevServer, version_id: str, data: bytes,
               tmp_path: Path, *args: str) -> Path:
    """Mount, read the whole version (it is cached), unmount; returns the cache folder."""
    m = mount_vm0fs(srv, *args)
    assert_like_tar(m, m.artifacts / "run" / version_id, data, tmp_path / "tar-0")
    assert m.unmount() == 0
    return m.cache_dir


# --- 1. damaged index and data: never served, fetched again --------------------------------


def test_random_bytes_in_the_index_between_mounts(one_version: Any, mount_vm0fs: MountFactory,
                                                  tmp_path: Path) -> None:
    """64 random bytes into the middle of index.bin: the next mount finds it damaged, fetches
    the version again and serves every file, and says so in the log and status."""
    srv, version_id, data = one_version
    cache = cache_once(mount_vm0fs, srv, version_id, data, tmp_path)
    index = cache / "versions" / version_id / "index.bin"
    size = index.stat().st_size
    with open(index, "r+b") as f:
        f.seek(size // 2 - 32)
        f.write(random.Random(7).randbytes(64))
    before = downloads(srv)
    m = mount_vm0fs(srv, cache_dir=cache)
    assert_like_tar(m, m.artifacts / "run" / version_id, data, tmp_path / "tar-1")
    assert downloads(srv) == before + 1
    assert "is damaged (index file damaged (checksum mismatch))" in errors_text(m)


def test_one_flipped_bit_in_an_offset_or_a_size(one_version: Any, mount_vm0fs: MountFactory,
                                                tmp_path: Path) -> None:
    """One bit of an entry's offset (then of its size) in the index: never a wrong byte."""
    srv, version_id, data = one_version
    cache = cache_once(mount_vm0fs, srv, version_id, data, tmp_path)
    index_path = cache / "versions" / version_id / "index.bin"
    raw = index_path.read_bytes()
    offset, size = entry_span(cache, version_id, "run", "part-1.bin")
    for field_value in (offset, size):  # find the 8-byte field in the file and flip a bit
        at = raw.find(field_value.to_bytes(8, "little"), 72)
        assert at > 0
        flip(index_path, at, 1)
        m = mount_vm0fs(srv, cache_dir=cache)
        assert_like_tar(m, m.artifacts / "run" / version_id, data, tmp_path / f"t{field_value}")
        assert "checksum mismatch" in errors_text(m)
        assert m.unmount() == 0
        raw = index_path.read_bytes()  # fetched again: a sound index to damage next


def test_flipped_bytes_in_the_data_under_a_running_mount(one_version: Any,
                                                         mount_vm0fs: MountFactory,
                                                         tmp_path: Path) -> None:
    """Bytes changed inside data.tar while mounted, in a file not read yet: its reader waits
    for a new copy and gets the right bytes; the damage is in the log and status."""
    srv, version_id, data = one_version
    cache = cache_once(mount_vm0fs, srv, version_id, data, tmp_path)
    m = mount_vm0fs(srv, cache_dir=cache)
    root = m.artifacts / "run" / version_id / "run"
    expected = archives.large_bytes(1000, BIG)
    assert m.run(read_file, root / "part-0.bin") == expected  # served from the cache
    before = downloads(srv)
    offset, size = entry_span(cache, version_id, "run", "part-2.bin")
    flip(cache / "versions" / version_id / "data.tar", offset + size // 2, 16)
    assert m.run(read_direct, root / "part-2.bin") == archives.large_bytes(1002, BIG)
    assert downloads(srv) == before + 1
    status = status_of(m)
    assert status["cache"]["damaged_copies"] == 1
    assert "does not match its checksum" in errors_text(m)
    assert "fetching it again" in errors_text(m)
    # Everything else still reads right, from the new copy.
    assert_like_tar(m, m.artifacts / "run" / version_id, data, tmp_path / "tar-2")


def test_data_truncated_under_a_running_mount(one_version: Any, mount_vm0fs: MountFactory,
                                              tmp_path: Path) -> None:
    """data.tar cut to half while mounted: the files past the cut are fetched again, with the
    reason in the log; nothing is EIO and nothing is short."""
    srv, version_id, data = one_version
    cache = cache_once(mount_vm0fs, srv, version_id, data, tmp_path)
    m = mount_vm0fs(srv, cache_dir=cache)
    root = m.artifacts / "run" / version_id / "run"
    assert m.run(read_file, root / "part-0.bin") == archives.large_bytes(1000, BIG)
    tar = cache / "versions" / version_id / "data.tar"
    os.truncate(tar, tar.stat().st_size // 2)
    assert m.run(read_direct, root / "part-3.bin") == archives.large_bytes(1003, BIG)
    assert "shorter than its index says" in errors_text(m)
    assert_like_tar(m, m.artifacts / "run" / version_id, data, tmp_path / "tar-2")


def test_index_truncated_under_a_running_mount_does_not_kill_it(one_version: Any,
                                                                mount_vm0fs: MountFactory,
                                                                tmp_path: Path) -> None:
    """index.bin truncated while mounted (once a SIGBUS of the whole mount: it was mapped):
    the mount lives on; once it lets go of the index (the kernel forgot its entries), the next
    access reads the damaged file, fetches the version again and serves it right."""
    srv, version_id, data = one_version
    m = mount_vm0fs(srv)
    assert_like_tar(m, m.artifacts / "run" / version_id, data, tmp_path / "tar-1")
    os.truncate(m.cache_dir / "versions" / version_id / "index.bin", 100)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")  # the kernel forgets the entries

    def index_dropped() -> bool:
        Path("/proc/sys/vm/drop_caches").write_text("2\n")
        return status_of(m)["memory"]["versions_in_memory"] == 0

    poll(index_dropped, 30, "the index let go")
    assert_like_tar(m, m.artifacts / "run" / version_id, data, tmp_path / "tar-2")
    assert m.proc.poll() is None
    assert f"cache entry {version_id[:12]} is damaged" in errors_text(m)


def test_data_deleted_with_its_index_kept_heals(one_version: Any, mount_vm0fs: MountFactory,
                                                tmp_path: Path) -> None:
    """data.tar deleted, index.bin kept: deleted under a running mount it is still served
    (the mount holds it open); at the next mount it is fetched again; and `cache clear` removes
    such a remnant."""
    srv, version_id, data = one_version
    m = mount_vm0fs(srv)
    assert_like_tar(m, m.artifacts / "run" / version_id, data, tmp_path / "tar-1")
    (m.cache_dir / "versions" / version_id / "data.tar").unlink()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    assert_like_tar(m, m.artifacts / "run" / version_id, data, tmp_path / "tar-2")
    assert m.unmount() == 0
    (m.cache_dir / "versions" / version_id / "data.tar").unlink(missing_ok=True)
    m = mount_vm0fs(srv, cache_dir=m.cache_dir)
    assert_like_tar(m, m.artifacts / "run" / version_id, data, tmp_path / "tar-3")
    assert m.unmount() == 0
    (m.cache_dir / "versions" / version_id / "data.tar").unlink()
    cleared = run_cli("cache", "clear", "--cache-dir", str(m.cache_dir))
    assert cleared.returncode == 0, cleared.stderr
    assert cached_versions(m.cache_dir) == set()


def test_the_whole_cache_folder_removed_under_a_mount(dev_server: Server,
                                                       mount_vm0fs: MountFactory,
                                                       tmp_path: Path) -> None:
    """`rm -rf` of the cache folder while mounted: the mount lives on, a cached version is
    still served (the mount holds its files open), and the next version fetched has a folder
    to go to (made again) rather than EIO."""
    first, second = version_of("run"), version_of("other")
    [first_id] = write_artifact(tmp_path / "data", "run", [first])
    [second_id] = write_artifact(tmp_path / "data", "other", [second])
    srv = dev_server(tmp_path / "data")
    m = mount_vm0fs(srv)
    assert_like_tar(m, m.artifacts / "run" / first_id, first, tmp_path / "tar-1")
    shutil.rmtree(m.cache_dir)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    assert_like_tar(m, m.artifacts / "other" / second_id, second, tmp_path / "tar-2")
    assert_like_tar(m, m.artifacts / "run" / first_id, first, tmp_path / "tar-3")
    assert m.proc.poll() is None
    assert (m.cache_dir / "versions" / second_id / "data.tar").exists()
    assert "was removed while in use" in m.log()
    assert m.unmount() == 0


def test_damaged_copy_while_the_api_is_down_is_eio_with_its_reason(
        one_version: Any, mount_vm0fs: MountFactory, tmp_path: Path) -> None:
    srv, version_id, data = one_version
    cache = cache_once(mount_vm0fs, srv, version_id, data, tmp_path)
    m = mount_vm0fs(srv, cache_dir=cache)
    root = m.artifacts / "run" / version_id / "run"
    assert m.run(read_file, root / "small-0.txt") == b"small 0\n"
    offset, size = entry_span(cache, version_id, "run", "part-1.bin")
    flip(cache / "versions" / version_id / "data.tar", offset + 10)
    srv.stop()
    assert_errno(errno.EIO, m, read_direct, root / "part-1.bin", timeout=60)
    text = errors_text(m)
    assert "does not match its checksum" in text, text
    assert "gave up after" in text or "unreachable" in text, text


# --- 2. bombs and the end of the tar ----------------------------------------------------------


def zeros_after(tar: bytes, members: int, member_bytes: int) -> bytes:
    """A gzip stream of `tar`, then `members` gzip members of `member_bytes` zeros each (made
    without holding the zeros: each compresses to about 1/1000 of its size)."""
    out = [gzip.compress(tar)]
    block = bytes(1 << 20)
    for _ in range(members):
        z = zlib.compressobj(9, zlib.DEFLATED, 31)
        parts = [z.compress(block) for _ in range(member_bytes >> 20)]
        parts.append(z.flush())
        out.append(b"".join(parts))
    return b"".join(out)


def test_zeros_after_the_tar_are_not_written(dev_server: Server, mount_vm0fs: MountFactory,
                                             tmp_path: Path) -> None:
    """A small tar, then 2 GiB of zeros in ten gzip members (a 2 MB download), with default
    options: the files are served as `tar -x` gives them, the cache holds about the tar, and
    the rest of the download is dropped."""
    tar = tar_bytes([reg("readme.txt", "hello\n"), reg("data/a.bin", bytes(range(256)) * 40)])
    bomb = zeros_after(tar, 10, 200 << 20)
    assert len(bomb) < 3_000_000
    data_dir = tmp_path / "data"
    [bomb_id] = write_artifact(data_dir, "bomb", [bomb])
    srv = dev_server(data_dir)
    m = mount_vm0fs(srv)
    root = m.artifacts / "bomb" / bomb_id
    assert m.run(read_file, root / "readme.txt", timeout=60) == b"hello\n"
    assert m.run(read_file, root / "data" / "a.bin") == bytes(range(256)) * 40
    assert sorted(m.run(os.listdir, root)) == ["data", "readme.txt"]
    assert tree_bytes(m.cache_dir / "versions") < 1 << 20
    assert "the rest of the download is dropped" in m.log()


def test_a_version_may_not_expand_far_past_what_the_api_lists(tmp_path: Path) -> None:
    """The API says 1 KiB in one file; the archive inflates to 100 MiB of real tar: refused at
    the bound (size + headers + 64 MiB), with a line that says why, and nothing is kept."""
    import trio

    from vm0fs.cache import Cache
    from vm0fs.errors import ArchiveTooLarge
    from vm0fs.fetch import SIZE_MARGIN, Fetch

    archive = tar_gz([reg("huge.bin", bytes(100 << 20))])

    class Client:
        async def download(self, artifact_id: str, version_id: str | None = None) -> Any:
            for i in range(0, len(archive), 1 << 16):
                yield archive[i:i + (1 << 16)]

    cache = Cache(tmp_path / "cache")
    fetch = Fetch(Client(), cache, "a", "v" * 64, expected_size=1024, file_count=1)
    with pytest.raises(ArchiveTooLarge, match="the API lists for this version") as info:
        trio.run(fetch.run)
    assert "1.0 KiB in 1 file(s)" in str(info.value)
    assert list(cache.staging.iterdir()) == [] and list(cache.versions.iterdir()) == []
    assert SIZE_MARGIN < 100 << 20


# --- 3. cache filesystems: tmpfs, a small ext4 ---------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                   check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], timeout=30)


@contextlib.contextmanager
def ext4(path: Path, megabytes: int) -> Iterator[Path]:
    image = path.with_suffix(".img")
    with open(image, "wb") as f:
        f.truncate(megabytes << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True, timeout=60,
                   capture_output=True)
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(path)], check=True, timeout=30)
    try:
        shutil.rmtree(path / "lost+found", ignore_errors=True)  # an empty folder for a cache
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], timeout=30)
        image.unlink()


def small_and_big(tmp_path: Path) -> tuple[Path, bytes, bytes]:
    data_dir = tmp_path / "data"
    small = tar_gz([reg("note.txt", "a small version\n")])
    big = version_of("big", files=30)  # about 21 MB
    write_artifact(data_dir, "small", [small])
    write_artifact(data_dir, "big", [big])
    return data_dir, small, big


@contextlib.contextmanager
def overlay(path: Path) -> Iterator[Path]:
    """An overlayfs (what a container's root is) over folders of the test's own disk."""
    layers = [path.with_name(f"{path.name}-{n}") for n in ("lower", "upper", "work")]
    for folder in (*layers, path):
        folder.mkdir(parents=True, exist_ok=True)
    lower, upper, work = layers
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work}", str(path)],
                   check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], timeout=30)


def test_a_cache_on_overlayfs(one_version: Any, mount_vm0fs: MountFactory,
                              tmp_path: Path) -> None:
    srv, version_id, data = one_version
    with overlay(tmp_path / "fs") as fs:
        m = mount_vm0fs(srv, cache_dir=fs / "cache")
        try:
            assert_like_tar(m, m.artifacts / "run" / version_id, data, tmp_path / "t1")
            assert m.run(read_direct, m.artifacts / "run" / version_id / "run" /
                         "part-1.bin") == archives.large_bytes(1001, BIG)
        finally:
            m.cleanup()


@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
def test_a_small_cache_filesystem_caches_small_versions(dev_server: Server,
                                                        mount_vm0fs: MountFactory,
                                                        tmp_path: Path, kind: str) -> None:
    """A 20 MiB cache filesystem (tmpfs: no RWF_NOWAIT; ext4 on a loop device): a small
    version caches and reads right; one larger than the room left is EIO with the room and why
    in the log; the filesystem never goes below the 5% kept free; the cap says why."""
    data_dir, small, big = small_and_big(tmp_path)
    srv = dev_server(data_dir)
    holder = tmpfs(tmp_path / "fs", "20m") if kind == "tmpfs" else ext4(tmp_path / "fs", 20)
    with holder as fs:
        m = mount_vm0fs(srv, cache_dir=fs / "cache")
        try:
            [small_id] = [v for v in m.run(os.listdir, m.artifacts / "small") if len(v) == 64]
            assert_like_tar(m, m.artifacts / "small" / small_id, small, tmp_path / "t1")
            status = status_of(m)
            assert "keeps 5% of the cache's filesystem" in status["cache"]["cap_reason"]
            assert status["cache"]["cap"] < 20 << 20
            [big_id] = [v for v in m.run(os.listdir, m.artifacts / "big") if len(v) == 64]
            assert_errno(errno.EIO, m, os.listdir, m.artifacts / "big" / big_id, timeout=60)
            assert "the room left on the cache's filesystem" in errors_text(m)
            assert shutil.disk_usage(fs).free >= shutil.disk_usage(fs).total * 0.04
            assert_like_tar(m, m.artifacts / "small" / small_id, small, tmp_path / "t2")
        finally:
            m.cleanup()


# --- 4. damaged listings ----------------------------------------------------------------------


@pytest.mark.parametrize("content", ["[" * 200_000, '[{"id": 5}]', '{"a": 1}', "\xff\xfe",
                                     '[{"id": "x", "name": "y"}]'])
def test_a_damaged_listings_file_is_ignored(dev_server: Server, mount_vm0fs: MountFactory,
                                            tmp_path: Path, content: str) -> None:
    data_dir = tmp_path / "data"
    write_artifact(data_dir, "run", [tar_gz([reg("f.txt", "x\n")])])
    srv = dev_server(data_dir)
    m = mount_vm0fs(srv)
    assert m.run(os.listdir, m.artifacts) == ["run"]
    assert m.unmount() == 0
    [listing] = (m.cache_dir / "listings").glob("*/artifacts.json")
    listing.write_text(content, errors="surrogateescape")
    m = mount_vm0fs(srv, cache_dir=m.cache_dir)  # the API answers: the listing is fetched
    assert m.run(os.listdir, m.artifacts) == ["run"]
    assert m.unmount() == 0
    listing.write_text(content, errors="surrogateescape")
    srv.stop()  # the API down: no usable last listing, so one clear line and no mount
    (tmp_path / "mnt2").mkdir()
    result = run_cli("mount", str(tmp_path / "mnt2"), "--foreground", "--api-url", srv.url,
                     "--cache-dir", str(m.cache_dir), token=srv.token, timeout=90)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("vm0fs: cannot reach the vm0 API")


# --- 5. servers that stall, trickle or never answer ----------------------------------------

READER_BOUND = 60.0  # what the README promises a reader of a stalled download


@pytest.mark.parametrize("fault", [{"blob_stall_after": 100}, {"blob_trickle_ms": 5000}])
def test_a_stalled_or_trickling_download_fails_in_bounded_time(
        one_version: Any, mount_vm0fs: MountFactory, fault: dict[str, int]) -> None:
    srv, version_id, _ = one_version
    m = mount_vm0fs(srv)
    srv.set_faults(**fault)
    started = time.monotonic()
    assert_errno(errno.EIO, m, read_file, m.artifacts / "run" / version_id / "run" /
                 "part-3.bin", timeout=READER_BOUND + 30)
    assert time.monotonic() - started < READER_BOUND
    assert "download stalled" in errors_text(m)
    srv.set_faults(blob_stall_after=-1, blob_trickle_ms=0)
    poll(lambda: _reads(m, m.artifacts / "run" / version_id / "run" / "small-0.txt"), 30,
         "the version after the fault")


def _reads(m: Mount, path: Path) -> bool:
    try:
        return m.run(read_file, path) == b"small 0\n"
    except OSError:
        return False


def test_an_api_that_never_answers(dev_server: Server, mount_vm0fs: MountFactory,
                                   tmp_path: Path) -> None:
    """The API accepts connections and never answers: a listing past its TTL answers from
    the last one within the promised 2 s (a little more here: the test's own calls), a folder
    never listed and a version never fetched fail with EIO within the retry budget, and
    `stat current` answers from the last listing."""
    data_dir = tmp_path / "data"
    ids = write_artifact(data_dir, "run", [tar_gz([reg("f.txt", "x\n")])] * 1 +
                         [tar_gz([reg("g.txt", "y\n")])])
    write_artifact(data_dir, "other", [tar_gz([reg("h.txt", "z\n")])])
    srv = dev_server(data_dir)
    m = mount_vm0fs(srv, "--metadata-ttl", "1")
    assert sorted(m.run(os.listdir, m.artifacts)) == ["other", "run"]
    assert "current" in m.run(os.listdir, m.artifacts / "run")
    m.run(os.stat, m.artifacts / "run" / "current")
    srv.set_faults(api_stall=-1)
    time.sleep(1.5)  # past the TTL

    def took(fn: Callable[..., Any], *args: Any) -> float:
        started = time.monotonic()
        with contextlib.suppress(OSError):
            bounded(fn, *args, timeout=90)
        return time.monotonic() - started

    assert took(os.listdir, m.artifacts) < 5
    assert took(os.listdir, m.artifacts / "run") < 5
    assert took(os.stat, m.artifacts / "run" / "current") < 5
    assert took(subprocess.run, ["ls", "-l", str(m.artifacts / "run")]) < 8
    never_listed = took(os.listdir, m.artifacts / "other")
    assert never_listed < 20
    started = time.monotonic()
    assert_errno(errno.EIO, m, os.listdir, m.artifacts / "run" / ids[0], timeout=90)
    assert time.monotonic() - started < 25
    srv.set_faults(api_stall=0)
