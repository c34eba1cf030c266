"""Robustness and security of a real vm0fs mount (FUSE, `vm0fs mount` subprocesses) over
`vm0fs dev-server` and its fault switches: nothing is lost, nothing hangs, nothing leaks.

- API and blob faults: 500s, 429s with Retry-After, latency, cut-off downloads (resumed with
  Range), downloads that keep failing (EIO in bounded time, nothing left in the cache, a later
  access works), expired presigned links (a new one is asked for).
- The API unreachable: cached versions and the last known listings keep serving (also across a
  remount), the rest fails with EIO, everything recovers when the server is back.
- A key revoked while mounted: EACCES and one log line, not a flood.
- Hostile and broken archives beyond test_mount.py: pax and GNU long names with '..', hard
  links to refused, forward, self and folder members, non-UTF-8 folders and link targets, a
  component longer than NAME_MAX, corrupt versions leave nothing in the cache, decompression
  bombs stay within the limit.
- The cache: kill -9 mid-download then a new mount over the same cache, the --cache-size cap
  and LRU eviction (a file held open still reads right), two mounts sharing one cache, 32
  processes opening one uncached version at once.
- Security: the key never reaches the object store, the logs (--debug), error messages, the
  command line, /proc/PID/environ, `ps`, the control files or the cache; owner-only cache
  modes (even under umask 0); ro,nosuid,nodev and no allow_other unless asked.
- A bounded soak (VM0FS_SOAK_SECONDS, default 60): random concurrent stat/read/readdir under
  500s, 429s and cut-off downloads with a short metadata TTL and a small cache cap; every byte
  checked against tar -x, no growth of the mount's descriptors or threads.

Every call into a mount is bounded (`Mount.run`, `bounded`), every wait is polled with a bound,
and every server, mount and process is cleaned up even on failure.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import mmap
import os
import random
import re
import secrets
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import archives
import pytest
from archives import (
    T0,
    M,
    dir_,
    gz,
    hard,
    reg,
    snapshot,
    special,
    sym,
    tar_bytes,
    tar_gz,
)
from conftest import DevServer
from mounting import (
    CLI,
    REPO,
    Hung,
    Mount,
    MountFactory,
    bounded,
    is_mounted,
    lazy_unmount,
    mount_env,
    pid_alive,
    pids_using,
    run_cli,
    start_mount,
    stop_pid,
    stop_process,
    watchdog,
)

from vm0fs.api import PART_SIZE
from vm0fs.tree import TreeIndex

pytest_plugins = ["mounting"]
pytestmark = pytest.mark.timeout(120)

EPOCH = datetime(2024, 1, 1, tzinfo=UTC).timestamp()
EIO_BOUND = 60.0  # generous: the mount's API retry budget is about 10 s
OFFLINE_BOUND = 40.0  # an access while the API is down must end within this
RETRY_FAILED_AFTER = 5.0  # the mount tries a failed version again after this long
SOAK_SECONDS = float(os.environ.get("VM0FS_SOAK_SECONDS", "60"))

Server = Callable[..., DevServer]


# --- data dir ------------------------------------------------------------------------------


def vid(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_artifact(data_dir: Path, folder: str, versions: list[bytes], *,
                   current: int | None = None, created: float = EPOCH) -> list[str]:
    """One artifact folder with versions v000.tar.gz... (oldest first, one second apart);
    returns the version ids. Files are renamed into place, so a running server never sees
    half of one."""
    path = data_dir / folder
    path.mkdir(parents=True, exist_ok=True)
    side: dict[str, Any] = {"created_at": iso(created), "versions": {}}
    for i, data in enumerate(versions):
        fname = f"v{i:03d}.tar.gz"
        tmp = path / f".{fname}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, path / fname)
        side["versions"][fname] = {"created_at": iso(created + i)}
    if current is not None:
        side["current"] = f"v{current:03d}.tar.gz"
    tmp = path / ".artifact.json.tmp"
    tmp.write_text(json.dumps(side))
    os.replace(tmp, path / "artifact.json")
    return [vid(d) for d in versions]


def random_archive(tag: str, files: int = 3, size: int = 200_000, small: int = 1) -> bytes:
    """Incompressible files (so the tar and the download are about `size * files` bytes),
    then `small` small ones (a long member index)."""
    members = [reg(f"{tag}/part-{i}.bin", archives.large_bytes(seed_of(tag, i), size),
                   0o644, T0 + i) for i in range(files)]
    members += [reg(f"{tag}/small/{j}.txt", f"small file {j} of {tag}\n", 0o600, T0 + 99)
                for j in range(small)]
    return tar_gz(members)


def seed_of(tag: str, i: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{tag}-{i}".encode()).digest()[:4], "big")


# --- checks --------------------------------------------------------------------------------


def assert_like_tar(m: Mount, root: Path, data: bytes, work: Path, status: int = 0,
                    timeout: float = 60.0) -> None:
    """The mounted version folder equals `tar -xzf` of its archive (see archives.tar_extract)."""
    mounted = m.run(snapshot, root, timeout=timeout)
    expected = archives.tar_extract(data, work, status)
    problems = archives.tree_differences(mounted, expected, archives.explicit_dirs(data),
                                         archives.late_link_dirs(data))
    assert not problems, "\n".join(problems)


def errno_of(m: Mount, fn: Callable[..., Any], *args: Any, timeout: float = 60.0) -> int | None:
    """The errno `fn(*args)` fails with inside the mount (bounded), None if it succeeds."""
    try:
        m.run(fn, *args, timeout=timeout)
    except OSError as exc:
        return exc.errno
    return None


def assert_errno(code: int, m: Mount, fn: Callable[..., Any], *args: Any,
                 timeout: float = 60.0) -> None:
    got = errno_of(m, fn, *args, timeout=timeout)
    assert got == code, (f"{fn.__name__}{args}: "
                         f"{errno.errorcode.get(got, 'success') if got else 'success'} instead of "
                         f"{errno.errorcode[code]}\n{m.log()[-3000:]}")


def poll(fn: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if fn():
            return
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(interval)


def succeeds(m: Mount, fn: Callable[..., Any], *args: Any, timeout: float = 60.0) -> bool:
    """For polls: whether fn(*args) works in the mount now (OSError means not yet)."""
    try:
        m.run(fn, *args, timeout=timeout)
    except OSError:
        return False
    return True


def tree_bytes(root: Path) -> int:
    """Bytes of every file under root (allocated size would hide nothing: no holes here)."""
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def staging_left(cache: Path) -> list[str]:
    return sorted(os.listdir(cache / "staging"))


def cached_versions(cache: Path) -> set[str]:
    return set(os.listdir(cache / "versions"))


def assert_entry_sound(cache: Path, version_id: str) -> None:
    """A published entry: its index matches its data (what a crash must never break)."""
    folder = cache / "versions" / version_id
    index = TreeIndex.load(folder / "index.bin")
    assert index.tar_size == (folder / "data.tar").stat().st_size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Sampler:
    """Calls `measure` every `interval` seconds in a thread; keeps the samples."""

    measure: Callable[[], Any]
    interval: float = 0.02
    samples: list[tuple[float, Any]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        def run() -> None:
            while not self._stop.is_set():
                with contextlib.suppress(OSError):
                    self.samples.append((time.monotonic(), self.measure()))
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=run, daemon=True, name="sampler")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(10)

    def values(self) -> list[Any]:
        return [v for _, v in self.samples]


def read_file(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_direct(path: Path, chunk: int = 128 * 1024) -> bytes:
    """The whole file with O_DIRECT: every read goes to the filesystem, not the page cache."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, chunk)  # page-aligned
        out = bytearray()
        while n := os.preadv(fd, [buf], len(out)):
            out += buf[:n]
        return bytes(out)
    finally:
        os.close(fd)


# --- 1. network and API faults -------------------------------------------------------------


def test_api_faults_listings_and_reads_stay_correct(dev_server: Server,
                                                    mount_vm0fs: MountFactory,
                                                    tmp_path: Path) -> None:
    """500 on every 3rd API request, 429 + Retry-After on every 7th, added latency, from the
    mount's first request on: listings (two pages) and contents are still exactly right."""
    data_dir = tmp_path / "data"
    cases = {"agent": archives.agent_style(), "symlinks": archives.symlinks(),
             "hardlinks": archives.hard_links(), "large": archives.large_file(),
             "many": archives.many_files(800)}
    ids = {name: write_artifact(data_dir, name, [data])[0] for name, data in cases.items()}
    bulk = [f"bulk-{k:03d}" for k in range(105)]  # the artifacts listing needs two pages
    for k, name in enumerate(bulk):
        write_artifact(data_dir, name, [archives.tiny(k)], created=EPOCH - 1000 - k)
    srv = dev_server(data_dir, "--fail-every", "3", "--throttle-every", "7", "--latency-ms", "20")
    m = mount_vm0fs(srv, "--metadata-ttl", "1")
    for _ in range(2):  # the second walk comes after the TTL: asked for again, under faults
        assert sorted(m.run(os.listdir, m.artifacts)) == sorted([*cases, *bulk])
        time.sleep(1.2)
    for name, data in cases.items():
        folder = m.artifacts / name
        assert sorted(m.run(os.listdir, folder)) == sorted(["current", "history", ids[name]])
        assert_like_tar(m, folder / ids[name], data, tmp_path / f"tar-{name}")
        assert m.run(os.readlink, folder / "current") == ids[name]
    requests = srv.stats()["requests"]
    api = sum(v for k, v in requests.items() if k != "blob")
    assert api >= 21, requests  # so six or more answers were a 500 and three a 429
    assert requests["download"] >= len(cases), requests
    assert "Traceback" not in m.log()


def test_cut_off_download_is_resumed(dev_server: Server, mount_vm0fs: MountFactory,
                                     tmp_path: Path) -> None:
    """Three blob transfers in a row break off halfway: each (a part of a ranged download) is
    resumed with a Range request where it stopped (no byte is sent twice) and the files equal
    tar -x."""
    data = archives.large_file()
    [version] = write_artifact(tmp_path / "data", "cut", [data])
    srv = dev_server(tmp_path / "data")
    m = mount_vm0fs(srv)
    m.run(os.listdir, m.artifacts / "cut")
    srv.set_faults(truncate_blob=3)
    srv.reset()
    assert_like_tar(m, m.artifacts / "cut" / version, data, tmp_path / "tar")
    stats = srv.stats()
    # One stream (on loopback it is fast: no parts), or one GET a part when the machine is
    # slow; and one resume for each cut.
    parts = -(-len(data) // PART_SIZE)
    assert 1 + 3 <= stats["requests"]["blob"] <= parts + 3, stats
    assert stats["blob_bytes"] == len(data), stats  # resumed, never started over
    assert srv.faults()["truncate_blob"] == 0
    assert staging_left(m.cache_dir) == []
    assert_entry_sound(m.cache_dir, version)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("fault", ["blob_fail", "truncate_blob"])
def test_download_that_keeps_failing_ends_in_eio_and_leaves_nothing(
        dev_server: Server, mount_vm0fs: MountFactory, tmp_path: Path, fault: str) -> None:
    """Every blob request fails (500) or breaks off: EIO within a bounded time, nothing of the
    version in the cache, the mount still answers; once the fault is gone, the next access
    (the mount retries a failed version after 5 s) gets the right bytes."""
    data_dir = tmp_path / "data"
    data = archives.large_file()
    [doomed] = write_artifact(data_dir, "doomed", [data])
    [fine] = write_artifact(data_dir, "fine", [archives.agent_style()])
    srv = dev_server(data_dir)
    m = mount_vm0fs(srv)
    root = m.artifacts / "doomed" / doomed
    assert_like_tar(m, m.artifacts / "fine" / fine, archives.agent_style(), tmp_path / "fine")
    m.run(os.listdir, m.artifacts / "doomed")
    srv.set_faults(**{fault: -1})
    srv.reset()

    assert_errno(errno.EIO, m, os.listdir, root, timeout=EIO_BOUND)
    assert_errno(errno.EIO, m, read_file, root / "big.bin", timeout=EIO_BOUND)
    assert srv.stats()["requests"]["blob"] >= 2  # it did try more than once
    assert doomed not in cached_versions(m.cache_dir)
    assert staging_left(m.cache_dir) == []
    # The rest of the mount works meanwhile (listings, and versions already cached).
    assert sorted(m.run(os.listdir, m.artifacts)) == ["doomed", "fine"]
    assert m.run((m.artifacts / "fine" / "current" / "README.md").read_text) == "# run 42\n"

    srv.set_faults(blob_fail=0, truncate_blob=0)
    poll(lambda: succeeds(m, os.listdir, root), RETRY_FAILED_AFTER + 30,
         "the version after the fault was cleared", interval=0.5)
    assert_like_tar(m, root, data, tmp_path / "doomed")
    assert staging_left(m.cache_dir) == []
    assert_entry_sound(m.cache_dir, doomed)


def test_expired_link_is_replaced_by_a_new_one(dev_server: Server, mount_vm0fs: MountFactory,
                                               tmp_path: Path) -> None:
    """A presigned link that has expired (the object store answers 403) makes the mount ask
    the API for a new link rather than fail."""
    data = archives.large_file()
    [version] = write_artifact(tmp_path / "data", "links", [data])
    srv = dev_server(tmp_path / "data")
    m = mount_vm0fs(srv)
    m.run(os.listdir, m.artifacts / "links")
    srv.set_faults(link_ttl=0)
    srv.reset()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(m.run, read_file, m.artifacts / "links" / version / "big.bin")
        try:
            poll(lambda: srv.stats()["requests"]["blob"] >= 1, 30, "a first blob request",
                 interval=0.01)
        finally:
            srv.set_faults(link_ttl=3600)
        assert future.result(timeout=90) == archives.large_bytes(1)
    requests = srv.stats()["requests"]
    assert requests["download"] >= 2, requests  # a second link was asked for
    assert requests["blob"] >= 2, requests
    assert_like_tar(m, m.artifacts / "links" / version, data, tmp_path / "tar")


# --- 2. the API unreachable ----------------------------------------------------------------


@pytest.mark.timeout(300)
def test_api_unreachable_then_back(dev_server: Server, mount_vm0fs: MountFactory,
                                   tmp_path: Path) -> None:
    """The dev-server stops: what was cached keeps serving (versions and the last known
    listings, also for a mount started during the outage over the same cache), what never was
    fails with EIO in bounded time, nothing hangs; the server comes back on the same ports and
    both mounts recover without a remount."""
    data_dir = tmp_path / "data"
    a_data, b_data, c_data = archives.agent_style(), archives.hard_links(), archives.symlinks()
    [a] = write_artifact(data_dir, "a", [a_data])  # its version is read: cached
    [b] = write_artifact(data_dir, "b", [b_data], created=EPOCH + 10)  # listed, never read
    [c] = write_artifact(data_dir, "c", [c_data], created=EPOCH + 20)  # versions never listed
    ports = ("--port", str(free_port()), "--blob-port", str(free_port()))
    srv = dev_server(data_dir, *ports)
    cache = tmp_path / "cache"
    m1 = mount_vm0fs(srv, "--metadata-ttl", "1", cache_dir=cache)
    assert sorted(m1.run(os.listdir, m1.artifacts)) == ["a", "b", "c"]
    a_listing = sorted(m1.run(os.listdir, m1.artifacts / "a"))
    b_listing = sorted(m1.run(os.listdir, m1.artifacts / "b"))
    assert a_listing == sorted(["current", "history", a])
    assert b_listing == sorted(["current", "history", b])
    a_tree = m1.run(snapshot, m1.artifacts / "a" / a)
    assert_like_tar(m1, m1.artifacts / "a" / a, a_data, tmp_path / "tar-a")

    assert srv.stop() == 0
    time.sleep(1.5)  # past the metadata TTL: every listing is due to be asked for again

    def at_once(m: Mount, calls: dict[str, Callable[[], Any]]) -> dict[str, Any]:
        """Every call at the same time, each bounded: no call may hang while the API is down.
        Returns each one's result, or the OSError it raised."""
        def attempt(fn: Callable[[], Any]) -> Any:
            try:
                return fn()
            except OSError as exc:
                return exc

        with ThreadPoolExecutor(len(calls)) as pool:
            futures = {k: pool.submit(m.run, attempt, fn, timeout=OFFLINE_BOUND)
                       for k, fn in calls.items()}
            return {k: f.result() for k, f in futures.items()}

    def offline_calls(m: Mount) -> dict[str, Callable[[], Any]]:
        return {
            "top": lambda: sorted(os.listdir(m.artifacts)),
            "a": lambda: sorted(os.listdir(m.artifacts / "a")),
            "b": lambda: sorted(os.listdir(m.artifacts / "b")),
            "a-tree": lambda: snapshot(m.artifacts / "a" / a),
            "a-current": lambda: os.readlink(m.artifacts / "a" / "current"),
            "b-version": lambda: os.listdir(m.artifacts / "b" / b),
            "c": lambda: os.listdir(m.artifacts / "c"),
        }

    def check_offline(got: dict[str, Any]) -> None:
        assert got["top"] == ["a", "b", "c"], got
        assert got["a"] == a_listing and got["b"] == b_listing, got
        assert got["a-tree"] == a_tree, got
        assert got["a-current"] == a, got
        for never in ("b-version", "c"):  # never fetched: EIO, not a hang, not ENOENT
            assert isinstance(got[never], OSError) and got[never].errno == errno.EIO, got

    # Meanwhile a new mount starts over the same cache, with the API still down: it must come
    # up on the last known listings. (Mounts are started from the main thread: a mount process
    # gets SIGTERM when the thread that started it ends.)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(at_once, m1, offline_calls(m1))
        m2 = mount_vm0fs(srv, "--metadata-ttl", "1", cache_dir=cache)
        check_offline(first.result(timeout=90))
    # Both mounts, again: m2 for the first time, m1 once its offline back-off has passed (a
    # second failed refresh must serve the last known listings just the same).
    with ThreadPoolExecutor(2) as pool:
        second = pool.submit(at_once, m2, offline_calls(m2))
        again = pool.submit(at_once, m1, {"top": offline_calls(m1)["top"]})
        check_offline(second.result(timeout=90))
        assert again.result(timeout=90)["top"] == ["a", "b", "c"]

    # The server comes back on the same ports, with one more artifact.
    [d] = write_artifact(data_dir, "d", [archives.tiny(4)], created=EPOCH + 30)
    dev_server(data_dir, *ports)
    for m in (m1, m2):
        poll(lambda m=m: "d" in m.run(os.listdir, m.artifacts, timeout=OFFLINE_BOUND), 60,
             "the fresh listing after the API came back", interval=0.5)
        poll(lambda m=m: succeeds(m, os.listdir, m.artifacts / "b" / b), 60,
             "the never-fetched version after the API came back", interval=0.5)
        assert_like_tar(m, m.artifacts / "b" / b, b_data, tmp_path / "tar-b")
        poll(lambda m=m: succeeds(m, os.listdir, m.artifacts / "c" / c), 60,
             "the never-listed artifact after the API came back", interval=0.5)
        assert_like_tar(m, m.artifacts / "c" / c, c_data, tmp_path / "tar-c")
        assert m.run(os.listdir, m.artifacts / "d" / d) == ["file-4.txt"]
        assert "Traceback" not in m.log()


# --- 3. a revoked key ----------------------------------------------------------------------


def key_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.search(r"key", line, re.IGNORECASE)]


def test_revoked_key_is_eacces_with_one_log_line(dev_server: Server, mount_vm0fs: MountFactory,
                                                 tmp_path: Path) -> None:
    [version] = write_artifact(tmp_path / "data", "art", [archives.agent_style()])
    srv = dev_server(tmp_path / "data")
    m = mount_vm0fs(srv, "--metadata-ttl", "1")
    assert m.run(os.listdir, m.artifacts) == ["art"]
    assert sorted(m.run(os.listdir, m.artifacts / "art")) == sorted(["current", "history", version])
    before = len(m.log())
    srv.set_faults(reject_all=True)
    time.sleep(1.5)  # past the TTL
    for _ in range(5):
        assert_errno(errno.EACCES, m, os.listdir, m.artifacts)
        assert_errno(errno.EACCES, m, os.listdir, m.artifacts / "art")
        time.sleep(0.3)
    lines = key_lines(m.log()[before:])
    assert 1 <= len(lines) <= 2, "\n".join(lines)
    srv.set_faults(reject_all=False)
    poll(lambda: succeeds(m, os.listdir, m.artifacts), 30, "listing once the key works again")
    assert m.run(os.listdir, m.artifacts) == ["art"]


# --- 4. hostile and broken archives --------------------------------------------------------

LONG_COMPONENT = "L" * 300  # longer than NAME_MAX (255): tar -x cannot create it either


def pax_override(name: str, path: str, data: str) -> M:
    """A member whose ustar name is harmless but whose pax 'path' record says otherwise."""
    m = reg(name, data)
    m.info.pax_headers = {"path": path}
    return m


def hostile_extra() -> bytes:
    """What test_mount.py's hostile archive does not have: '..' through pax and GNU long
    names, hard links to refused, folder, self, later and absolute members, a component longer
    than NAME_MAX, a folder named '..' inside a path, plus non-UTF-8 names below."""
    utf8_members = [
        reg("ok.txt", "still fine\n", 0o644, T0),
        pax_override("benign-pax", "../pax-escape", "pax escape\n"),
        pax_override("benign-pax2", "/sub/../../pax-escape2", "pax escape 2\n"),
        reg("deep/" * 30 + "../" * 40 + "gnu-escape", "gnu escape\n"),  # GNU long name
        reg("../refused", "refused\n"),
        hard("hl-to-refused", "../refused"),
        hard("hl-to-refused-stripped", "refused"),
        dir_("adir/", 0o755),
        hard("hl-to-dir", "adir"),
        hard("hl-self", "hl-self"),
        hard("hl-forward", "later.txt"),
        reg("later.txt", "later\n", 0o644, T0 + 1),
        hard("hl-abs", "/ok.txt"),  # the leading '/' is stripped, as tar does: a copy of ok.txt
        reg(LONG_COMPONENT, "too long a name\n"),
        reg("nested/" + LONG_COMPONENT + "/inner.txt", "under a too long name\n"),
        special("devs/null", tarfile.CHRTYPE, 1, 3),
        special("devs/fifo", tarfile.FIFOTYPE),
        reg("devs/kept.txt", "beside the devices\n"),
        reg("suid/inside", "#!/bin/sh\n", 0o4755, T0 + 2),
        sym("loop-a", "loop-b"),
        sym("loop-b", "loop-a"),
        sym("up-and-out", "../../../../../../../../../../../../../../../tmp"),
        reg("p/q", "q\n", 0o644, T0 + 3),
        reg("p", "p as a file\n", 0o644, T0 + 4),
        reg("p/r", "r under p\n", 0o644, T0 + 5),
    ]
    utf8 = tar_bytes(utf8_members, tarfile.PAX_FORMAT)
    latin = tar_bytes([reg("latin-caf\u00e9-dir/inner.txt", "under a latin-1 folder\n"),
                       sym("latin-link", "caf\u00e9\u00ff"),
                       reg("\u00ff\u00fe", "two bytes that are not UTF-8\n")],
                      tarfile.GNU_FORMAT, encoding="latin-1")
    return gz(archives._concat_tars(utf8, latin))


def test_hostile_archive_beyond_the_basics(dev_server: Server, mount_vm0fs: MountFactory,
                                           tmp_path: Path) -> None:
    data = hostile_extra()
    data_dir = tmp_path / "data"
    [version] = write_artifact(data_dir, "hostile", [data])
    [good] = write_artifact(data_dir, "good", [archives.agent_style()], created=EPOCH + 5)
    srv = dev_server(data_dir)
    m = mount_vm0fs(srv)
    root = m.artifacts / "hostile" / version
    names = set(m.run(os.listdir, root))
    for bad in ("pax-escape", "pax-escape2", "benign-pax", "benign-pax2", "gnu-escape",
                "refused", "hl-to-refused", "hl-to-refused-stripped", "hl-to-dir", "hl-self",
                "hl-forward", ".."):
        assert bad not in names, bad
    # Every name listed can be looked up (FUSE passes names longer than NAME_MAX through),
    # and the whole folder walks like any other.
    tree = m.run(snapshot, root)
    paths = set(tree)
    assert not any(b"escape" in p or b"refused" in p for p in paths), sorted(paths)
    assert not any(e.kind not in ("f", "d", "l") for e in tree.values())
    assert not any(e.mode & archives.SECURITY_BITS for e in tree.values())
    assert m.run((root / "ok.txt").read_text) == "still fine\n"
    assert m.run((root / "hl-abs").read_text) == "still fine\n"
    assert m.run((root / "later.txt").read_text) == "later\n"
    assert m.run((root / "devs" / "kept.txt").read_text) == "beside the devices\n"
    assert sorted(m.run(os.listdir, root / "devs")) == ["kept.txt"]
    assert tree[b"suid/inside"].perm == 0o755
    assert tree[b"up-and-out"].target == b"../" * 15 + b"tmp"  # verbatim, never followed
    assert_errno(errno.ELOOP, m, read_file, root / "loop-a")
    # The later member wins: p/q went with the folder, p/r made p a folder again.
    assert tree[b"p"].kind == "d" and b"p/q" not in tree
    assert m.run((root / "p" / "r").read_text) == "r under p\n"
    # Names that are not UTF-8 keep their bytes.
    broot = os.fsencode(root)
    assert m.run(read_file, os.path.join(broot, b"latin-caf\xe9-dir", b"inner.txt")) == (
        b"under a latin-1 folder\n")
    assert m.run(os.readlink, os.path.join(broot, b"latin-link")) == b"caf\xe9\xff"
    assert m.run(read_file, os.path.join(broot, b"\xff\xfe")) == b"two bytes that are not UTF-8\n"

    # Nothing landed outside the version: not in the mount, not on the disk.
    assert sorted(m.run(os.listdir, m.artifacts / "hostile")) == sorted(
        ["current", "history", version])
    assert sorted(m.run(os.listdir, m.artifacts)) == ["good", "hostile"]
    for outside in (tmp_path, tmp_path.parent, Path("/tmp"), m.cache_dir, m.path.parent):
        leaked = [n for n in os.listdir(outside) if n in (
            "pax-escape", "pax-escape2", "gnu-escape", "refused", "benign-pax", LONG_COMPONENT)]
        assert not leaked, (outside, leaked)
    assert not os.path.lexists(archives.CANARY)
    cache_files = {p.relative_to(m.cache_dir).as_posix() for p in m.cache_dir.rglob("*")
                   if p.is_file()}
    assert {f for f in cache_files if f.startswith("versions/")} == {
        f"versions/{version}/data.tar", f"versions/{version}/index.bin"}
    assert staging_left(m.cache_dir) == []
    # The mount keeps working.
    assert m.run((m.artifacts / "good" / good / "README.md").read_text) == "# run 42\n"


def multi_member_gzip() -> bytes:
    """Two gzip members back to back, the tar split between them (`cat a.gz b.gz`): a valid
    gzip file, which `tar -xzf` reads whole."""
    tar = tar_bytes([reg("first.txt", "in the first gzip member\n"),
                     reg("second.bin", archives.large_bytes(7, 300_000), 0o600, T0 + 1)])
    cut = 3 * tarfile.BLOCKSIZE + 1000
    return gz(tar[:cut]) + gz(tar[cut:])


@pytest.mark.timeout(150)
def test_broken_versions_are_eio_alone_and_leave_nothing(dev_server: Server,
                                                         mount_vm0fs: MountFactory,
                                                         tmp_path: Path) -> None:
    """Garbage, a truncated gzip, a gzip of text, a tar cut inside a member: EIO for that
    version (again after the 5 s retry, with a new download), nothing of it in the cache,
    while the good versions of the same artifact are read at the same time."""
    broken = {kind: archives.CORRUPT[kind]() for kind in
              ("garbage", "truncated-gzip", "gzip-of-text", "tar-truncated", "bad-header")}
    good, multi = archives.agent_style(), multi_member_gzip()
    ids = write_artifact(tmp_path / "data", "mixed", [good, multi, *broken.values()],
                         current=0)
    srv = dev_server(tmp_path / "data")
    m = mount_vm0fs(srv)
    folder = m.artifacts / "mixed"
    assert sorted(m.run(os.listdir, folder)) == sorted(["current", "history", *ids])
    good_id, multi_id, broken_ids = ids[0], ids[1], dict(zip(broken, ids[2:], strict=True))

    def attempt(version: str) -> int | None:
        return errno_of(m, os.listdir, folder / version, timeout=EIO_BOUND)

    with ThreadPoolExecutor(8) as pool:
        first = dict(zip(broken, pool.map(attempt, broken_ids.values()), strict=True))
        good_tree = pool.submit(m.run, snapshot, folder / good_id)
        assert first == dict.fromkeys(broken, errno.EIO), first
        assert good_tree.result(timeout=90)
    assert_like_tar(m, folder / good_id, good, tmp_path / "good")
    assert_like_tar(m, folder / multi_id, multi, tmp_path / "multi")
    assert not set(broken_ids.values()) & cached_versions(m.cache_dir)
    assert staging_left(m.cache_dir) == []

    srv.reset()
    time.sleep(RETRY_FAILED_AFTER + 0.5)
    with ThreadPoolExecutor(8) as pool:
        again = dict(zip(broken, pool.map(attempt, broken_ids.values()), strict=True))
    assert again == dict.fromkeys(broken, errno.EIO), again
    assert srv.stats()["requests"]["blob"] == len(broken)  # each tried once more, not hammered
    assert not set(broken_ids.values()) & cached_versions(m.cache_dir)
    assert staging_left(m.cache_dir) == []
    assert m.run((folder / "current" / "README.md").read_text) == "# run 42\n"
    assert "Traceback" not in m.log()


BOMB_BYTES = 50 * 1024 * 1024
LIMIT = 5 * 1024 * 1024


@pytest.mark.parametrize("option", ["--max-version-size", "--cache-size"])
def test_decompression_bomb(dev_server: Server, mount_vm0fs: MountFactory, tmp_path: Path,
                            option: str) -> None:
    """A ~50 KB tar.gz of 50 MB of zeros under a 5 MiB limit: EIO, the cache never grows much
    past the limit while it inflates, and nothing is left behind; other versions still work."""
    bomb = gz(tar_bytes([reg("zeros.bin", bytes(BOMB_BYTES))]))
    assert len(bomb) < 200_000
    data_dir = tmp_path / "data"
    [bomb_id] = write_artifact(data_dir, "bomb", [bomb])
    small = archives.agent_style()
    [small_id] = write_artifact(data_dir, "small", [small], created=EPOCH + 5)
    srv = dev_server(data_dir)
    m = mount_vm0fs(srv, option, "5M")
    m.run(os.listdir, m.artifacts / "bomb")
    with Sampler(lambda: tree_bytes(m.cache_dir), interval=0.002) as sizes:
        assert_errno(errno.EIO, m, os.listdir, m.artifacts / "bomb" / bomb_id,
                     timeout=EIO_BOUND)
    assert sizes.samples
    assert max(sizes.values()) <= LIMIT + 1_500_000, max(sizes.values())
    assert bomb_id not in cached_versions(m.cache_dir)
    assert staging_left(m.cache_dir) == []
    assert_like_tar(m, m.artifacts / "small" / small_id, small, tmp_path / "small")
    assert "Traceback" not in m.log()


# --- 5. cache integrity and limits ---------------------------------------------------------


def mount_id(path: Path) -> str | None:
    """The id of the mount on top at `path` (from /proc/self/mountinfo), None if none."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 4 and parts[4] == str(path):
                found = parts[0]
    return found


def _answers(path: Path) -> bool:
    try:
        os.statvfs(path)
    except OSError:
        return False
    return True


def start_over_dead_mount(srv: DevServer, mountpoint: Path, cache_dir: Path,
                          log_path: Path, *extra: str, timeout: float = 30.0) -> Mount:
    """`vm0fs mount --foreground` on a mount point that still holds a dead vm0fs mount (its
    process was killed): vm0fs is expected to unmount it itself. Waits until a new mount is
    there and answers; on failure nothing is left running."""
    args = [*CLI, "mount", str(mountpoint), "--foreground", "--api-url", srv.url,
            "--cache-dir", str(cache_dir), *extra]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, cwd=REPO, env=mount_env(srv.token),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    watchdog.add(proc.pid, mountpoint)
    mount = Mount(mountpoint, proc, cache_dir, log_path, args)
    try:
        deadline = time.monotonic() + timeout
        # Mount ids are reused, so wait for a mount that answers statfs (a dead one cannot)
        # and that our process has announced.
        while not (mount_id(mountpoint) and _answers(mountpoint) and b"mounted" in
                   Path(log_path).read_bytes()):
            assert proc.poll() is None, f"exited with {proc.returncode}:\n{mount.log()}"
            assert time.monotonic() < deadline, f"no mount within {timeout} s:\n{mount.log()}"
            time.sleep(0.05)
        bounded(os.listdir, mountpoint, timeout=timeout)  # the new mount answers
    except BaseException:
        mount.cleanup()
        raise
    return mount


def mount_pid_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def mount_pid_threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Threads:")).split()[1])


@pytest.mark.timeout(150)
def test_kill_9_during_a_download_then_a_new_mount(dev_server: Server,
                                                   mount_vm0fs: MountFactory,
                                                   tmp_path: Path) -> None:
    data = archives.large_file()
    [version] = write_artifact(tmp_path / "data", "slow", [data])
    srv = dev_server(tmp_path / "data")
    cache = tmp_path / "cache"
    m = mount_vm0fs(srv, cache_dir=cache)
    m.run(os.listdir, m.artifacts / "slow")
    srv.set_faults(bandwidth=300_000)  # about 20 s for the whole archive
    reader = subprocess.Popen(["cat", str(m.artifacts / "slow" / version / "big.bin")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second: Mount | None = None
    try:
        def half_way() -> bool:
            return any((cache / "staging" / s / "data.tar").exists()
                       and (cache / "staging" / s / "data.tar").stat().st_size > 500_000
                       for s in staging_left(cache))

        poll(half_way, 30, "the download under way", interval=0.05)
        os.kill(m.proc.pid, signal.SIGKILL)
        m.proc.wait(10)
        assert reader.wait(30) != 0  # the reader saw the mount die, it did not hang
        assert is_mounted(m.path)  # a dead mount is left behind...
        assert staging_left(cache)  # ...and a half-written entry
        assert version not in cached_versions(cache)

        srv.set_faults(bandwidth=0)
        srv.reset()
        subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=True, timeout=30)
        second = start_mount(srv.url, srv.token, m.path, cache, log_path=tmp_path / "2.log")
        assert staging_left(cache) == []  # the leftovers of the dead writer are gone
        assert_like_tar(second, second.artifacts / "slow" / version, data, tmp_path / "tar")
        assert srv.stats()["requests"]["download"] == 1
        assert_entry_sound(cache, version)
        assert second.unmount() == 0, second.log()
        assert not is_mounted(m.path)
    finally:
        stop_process(reader)
        if second is not None:
            second.cleanup()


def test_vm0fs_mount_over_a_dead_mount_point(dev_server: Server, mount_vm0fs: MountFactory,
                                             tmp_path: Path) -> None:
    """A mount whose process was killed leaves a dead mount behind; `vm0fs mount` on it
    unmounts it and mounts anew (mount.check_mountpoint), right away, not only once the
    kernel has stopped trusting what it cached about the dead mount's root."""
    write_artifact(tmp_path / "data", "art", [archives.tiny(1)])
    srv = dev_server(tmp_path / "data")
    m = mount_vm0fs(srv)
    assert m.run(os.listdir, m.artifacts) == ["art"]
    m.run(os.lstat, m.path)  # as `ls -ld`, a shell prompt or a file manager would
    os.kill(m.proc.pid, signal.SIGKILL)
    m.proc.wait(10)
    assert is_mounted(m.path)
    again = start_over_dead_mount(srv, m.path, m.cache_dir, tmp_path / "again.log")
    try:
        assert again.run(os.listdir, again.artifacts) == ["art"]
        assert again.unmount() == 0, again.log()
        assert not is_mounted(m.path)
    finally:
        again.cleanup()


def versions_usage(cache: Path) -> int:
    return tree_bytes(cache / "versions")


MIB = 1024 * 1024
CAP = "3.5M"  # three of the 1 MiB versions below fit, four do not
CAP_BYTES = int(3.5 * MIB)


def one_mib_archive(tag: str) -> bytes:
    return tar_gz([reg("blob.bin", archives.large_bytes(seed_of(tag, 0), MIB - 4096)),
                   reg("tag.txt", f"{tag}\n")])


@pytest.fixture
def capped(dev_server: Server, mount_vm0fs: MountFactory,
           tmp_path: Path) -> tuple[DevServer, Mount, dict[str, bytes], dict[str, str]]:
    """Five artifacts of one ~1 MiB version each, mounted with --cache-size 3.5M and no grace
    for versions read recently (test_open_modes.py tests the grace)."""
    archives_ = {tag: one_mib_archive(tag) for tag in ("hold", "a", "b", "c", "d")}
    ids = {}
    for i, (tag, data) in enumerate(archives_.items()):
        [ids[tag]] = write_artifact(tmp_path / "data", tag, [data], created=EPOCH + i)
    srv = dev_server(tmp_path / "data")
    m = mount_vm0fs(srv, "--cache-size", CAP, "--cache-grace", "0")
    assert sorted(m.run(os.listdir, m.artifacts)) == sorted(archives_)
    for tag in archives_:
        m.run(os.listdir, m.artifacts / tag)
    return srv, m, archives_, ids


def drop_page_cache() -> None:
    """Make the kernel forget cached file pages (as root), so reads reach the mount."""
    os.sync()
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")


def blob_of(data: bytes) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        f = tar.extractfile("blob.bin")
        assert f is not None
        return f.read()


@pytest.mark.fallback
def test_cache_cap_is_kept_and_an_open_file_still_reads_right(capped: Any) -> None:
    """Nothing counts open files (the stateless mode has no opens to count): a version held
    open may be evicted, and its next read fetches it again."""
    srv, m, data, ids = capped
    cache = m.cache_dir
    held = m.run(open, m.artifacts / "hold" / ids["hold"] / "blob.bin", "rb", buffering=0)
    try:
        assert m.run(held.read, 1000) == blob_of(data["hold"])[:1000]
        with Sampler(lambda: tree_bytes(cache), interval=0.01) as sizes:
            for tag in ("a", "b", "c", "d", "a", "b"):
                path = m.artifacts / tag / ids[tag] / "blob.bin"
                assert m.run(read_file, path) == blob_of(data[tag]), tag
                poll(lambda: versions_usage(cache) <= CAP_BYTES, 20,
                     f"the cache back under its cap after reading {tag}", interval=0.05)
        one = max(len(blob_of(d)) for d in data.values()) + 64 * 1024
        # Within the cap, plus at most the one version in flight and the one being deleted
        # (an evicted entry is renamed away, then removed: its bytes count until then).
        assert max(sizes.values()) <= CAP_BYTES + 2 * one + 64 * 1024, max(sizes.values())
        assert len(cached_versions(cache)) < len(data), "nothing was evicted"
        # The held version's bytes are all still readable through the descriptor held open,
        # also when the kernel has forgotten them and its data was evicted: the read fetches
        # it again.
        evicted = ids["hold"] not in cached_versions(cache)
        downloads = srv.stats()["requests"]["download"]
        drop_page_cache()
        assert m.run(os.pread, held.fileno(), 2 * MIB, 0) == blob_of(data["hold"])
        if evicted:
            assert srv.stats()["requests"]["download"] == downloads + 1
    finally:
        m.run(held.close)
    assert staging_left(cache) == []
    for version in cached_versions(cache):
        assert_entry_sound(cache, version)


@pytest.mark.fallback
def test_cache_evicts_the_least_recently_used(capped: Any) -> None:
    """a, b, c fill the cache; a is used again; d comes: b, the least recently used, goes."""
    srv, m, data, ids = capped
    cache = m.cache_dir

    def read(tag: str) -> None:
        assert m.run(read_file, m.artifacts / tag / ids[tag] / "blob.bin") == blob_of(data[tag])
        m.run(os.listdir, m.artifacts / tag / ids[tag])  # until it is whole and in the cache

    for tag in ("a", "b", "c"):
        read(tag)
        time.sleep(0.2)  # distinct last-used times
    assert {ids[t] for t in "abc"} <= cached_versions(cache)
    assert m.run((m.artifacts / "a" / ids["a"] / "tag.txt").read_text) == "a\n"  # a is used
    time.sleep(0.2)
    read("d")
    poll(lambda: versions_usage(cache) <= CAP_BYTES, 20, "eviction")
    assert ids["b"] not in cached_versions(cache), "b was the least recently used"
    assert {ids["a"], ids["c"], ids["d"]} <= cached_versions(cache), (
        "a version used more recently than b was evicted instead")


def test_two_mounts_share_one_cache(dev_server: Server, mount_vm0fs: MountFactory,
                                    tmp_path: Path) -> None:
    """Two mounts over one cache folder read the same and different versions at the same
    time (both download the shared ones and race to publish them): every byte right, no
    errors, sound entries; a third mount over the cache downloads nothing."""
    tags = [f"s{i}" for i in range(10)]
    # Big files to read while the download ends, and a long index (the publish takes longer).
    data = {t: random_archive(t, files=2, size=400_000, small=4000) for t in tags}
    ids = {t: write_artifact(tmp_path / "data", t, [d], created=EPOCH + i)[0]
           for i, (t, d) in enumerate(data.items())}
    expected = {t: {m.info.name: m.data for m in members_of(d)} for t, d in data.items()}
    big = {t: [n for n in expected[t] if n.endswith(".bin")] for t in tags}
    srv = dev_server(tmp_path / "data")
    cache = tmp_path / "cache"
    m1 = mount_vm0fs(srv, cache_dir=cache)
    m2 = mount_vm0fs(srv, cache_dir=cache)
    srv.reset()
    shared, only1, only2 = tags[:8], tags[8:9], tags[9:]
    errors: list[str] = []

    def read_all(m: Mount, tag: str, seed: int = 0, passes: int = 1,
                 sample: int | None = None) -> None:
        names = sorted(expected[tag])
        random.Random(seed).shuffle(names)
        if sample is not None:
            names = big[tag] + names[:sample]
        for _ in range(passes):
            for name in names:
                path = m.artifacts / tag / ids[tag] / name
                try:
                    if read_direct(path) != expected[tag][name]:
                        errors.append(f"{path}: wrong bytes")
                except OSError as exc:
                    errors.append(f"{path}: {exc!r}")

    # Two readers per mount for every shared version, one for the others.
    jobs = [(m, t) for t in shared for m in (m1, m2, m1, m2)] + [(m1, t) for t in only1] + [
        (m2, t) for t in only2]
    random.Random(5).shuffle(jobs)
    barrier = threading.Barrier(len(jobs))

    def job(m: Mount, tag: str, seed: int) -> None:
        barrier.wait(30)
        read_all(m, tag, seed, sample=10)  # the first read waits for the download
        until = time.monotonic() + 1.0  # reads go on while the downloads are published
        while time.monotonic() < until and not errors:
            read_all(m, tag, seed, sample=0)

    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(bounded, job, m, t, i, timeout=90,
                               on_timeout=lambda: m1._abort() + m2._abort())
                   for i, (m, t) in enumerate(jobs)]
        for f in futures:
            f.result()
    assert not errors, "\n".join(errors)
    assert cached_versions(cache) == set(ids.values())
    for version in ids.values():
        assert_entry_sound(cache, version)
    assert staging_left(cache) == []
    assert srv.stats()["requests"]["blob"] <= len(shared) * 2 + 2
    for m in (m1, m2):
        assert " ERROR " not in m.log() and "Traceback" not in m.log(), m.log()
    srv.reset()
    m3 = mount_vm0fs(srv, cache_dir=cache)
    for tag in tags:
        m3.run(read_all, m3, tag, sample=200)
    assert not errors, "\n".join(errors)
    assert srv.stats()["requests"]["blob"] == 0


def members_of(data: bytes) -> list[M]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for info in tar:
            if info.isreg():
                f = tar.extractfile(info)
                assert f is not None
                out.append(M(info, f.read()))
    return out


READER = """
import hashlib, os, sys, time
ready, gate, path = sys.argv[1:4]
open(ready, "w").close()
while not os.path.exists(gate):
    time.sleep(0.002)
with open(path, "rb") as f:
    print(hashlib.sha256(f.read()).hexdigest())
"""


def test_32_processes_open_one_uncached_version_at_once(dev_server: Server,
                                                        mount_vm0fs: MountFactory,
                                                        tmp_path: Path) -> None:
    n = 32
    members = [reg(f"data/f{i:02d}.bin", archives.large_bytes(1000 + i, 50_000 + i * 997),
                   0o644, T0 + i) for i in range(n)]
    data = tar_gz(members)
    [version] = write_artifact(tmp_path / "data", "crowd", [data])
    srv = dev_server(tmp_path / "data")
    m = mount_vm0fs(srv)
    m.run(os.listdir, m.artifacts / "crowd")  # listed, not downloaded
    srv.reset()
    gate = tmp_path / "go"
    procs: list[subprocess.Popen[str]] = []
    try:
        for i in range(n):
            procs.append(subprocess.Popen(
                [sys.executable, "-I", "-c", READER, str(tmp_path / f"ready-{i}"), str(gate),
                 str(m.artifacts / "crowd" / version / "data" / f"f{i:02d}.bin")],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        poll(lambda: all((tmp_path / f"ready-{i}").exists() for i in range(n)), 60,
             "all readers started")
        gate.touch()
        results = []
        deadline = time.monotonic() + 90
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                m.cleanup()  # unblocks whoever hangs in the mount
                raise Hung(f"a reader hung:\n{m.log()}") from None
            results.append((proc.returncode, out.strip(), err))
    finally:
        for proc in procs:
            stop_process(proc)
    for i, (code, digest, err) in enumerate(results):
        assert code == 0, (i, err)
        assert digest == hashlib.sha256(members[i].data or b"").hexdigest(), i
    stats = srv.stats()
    assert stats["requests"]["download"] == 1 and stats["requests"]["blob"] == 1, stats
    assert stats["blob_bytes"] == len(data)


# --- 6. security ---------------------------------------------------------------------------


def mount_options(path: Path) -> set[str]:
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4 and parts[1] == str(path):
                return set(parts[3].split(","))
    raise AssertionError(f"{path} is not in /proc/mounts")


def proc_bytes(pid: int, what: str) -> bytes:
    with open(f"/proc/{pid}/{what}", "rb") as f:
        return f.read()


def assert_owner_only(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(os.lstat(path).st_mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"


def grep_tree(root: Path, needle: bytes) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError):
                if needle in path.read_bytes():
                    found.append(path)
    return found


@pytest.mark.timeout(180)
def test_the_key_never_leaks(dev_server: Server, mount_vm0fs: MountFactory,
                             tmp_path: Path) -> None:
    token = "vm0_live_" + secrets.token_hex(20)
    data_dir = tmp_path / "data"
    large = archives.large_file()
    [large_id] = write_artifact(data_dir, "large", [large])
    corrupt_ids = write_artifact(data_dir, "corrupt", [archives.agent_style(),
                                                       archives.corrupt_garbage()],
                                 current=0, created=EPOCH + 5)
    bad_crc = bytearray(archives.agent_style())
    bad_crc[-8] ^= 0xFF  # the gzip trailer's CRC no longer matches: another kind of error
    [agent_id] = write_artifact(data_dir, "agent", [bytes(bad_crc)], created=EPOCH + 9)
    # The key goes to the server through its environment, so `ps -ef` shows it nowhere.
    srv = dev_server(data_dir, "--verbose", token=None, env={"VM0_API_KEY": token})
    assert srv.token == token
    m = mount_vm0fs(srv, "--debug", "--metadata-ttl", "1")
    pid = m.proc.pid

    # Work the mount through successes and every kind of failure, with the key in use.
    srv.set_faults(fail_every=4, truncate_blob=2)
    assert_like_tar(m, m.artifacts / "large" / large_id, large, tmp_path / "large")
    srv.set_faults(fail_every=0, truncate_blob=0, link_ttl=0)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(m.run, os.listdir, m.artifacts / "corrupt" / corrupt_ids[0])
        poll(lambda: srv.stats()["requests"]["blob"] >= 1, 30, "an expired link refused",
             interval=0.01)
        srv.set_faults(link_ttl=3600)
        assert future.result(timeout=60)
    assert_errno(errno.EIO, m, os.listdir, m.artifacts / "corrupt" / corrupt_ids[1])
    assert_errno(errno.EIO, m, os.listdir, m.artifacts / "agent" / agent_id)
    assert_errno(errno.ENOENT, m, os.lstat, m.artifacts / "corrupt" / ("0" * 64))
    srv.set_faults(reject_all=True)
    time.sleep(1.2)
    assert_errno(errno.EACCES, m, os.listdir, m.artifacts)
    srv.set_faults(reject_all=False)
    poll(lambda: succeeds(m, os.listdir, m.artifacts), 30, "the key accepted again")
    status = m.run((m.path / ".vm0fs" / "status").read_bytes)
    status_json = m.run((m.path / ".vm0fs" / "status.json").read_bytes)

    secret = token.encode()
    # Never sent to the object store: it would have answered 400 (verbose server log).
    server_log = srv.log()
    blob_lines = re.findall(r'"(?:GET|HEAD) /blobs/[^"]*" (\d{3})', server_log)
    assert blob_lines, "the server's request log is empty"
    assert "400" not in blob_lines, [line for line in server_log.splitlines() if '" 400' in line]
    # Not in the logs (--debug), not even a presigned signature.
    log = m.log()
    assert agent_id[:12] in log and corrupt_ids[1][:12] in log  # the failures were logged
    assert token not in log
    assert "sig=" not in log, [line for line in log.splitlines() if "sig=" in line][:5]
    assert secret not in status and secret not in status_json
    # Not in the process: command line, environment, `ps`.
    assert secret not in proc_bytes(pid, "cmdline")
    assert secret not in proc_bytes(pid, "environ")
    assert b"VM0_API_KEY" not in proc_bytes(pid, "environ")
    ps_ef = subprocess.run(["ps", "-ef"], capture_output=True, text=True, timeout=30).stdout
    assert str(pid) in ps_ef and token not in ps_ef
    ps_e = subprocess.run(["ps", "eww", "-p", str(pid)], capture_output=True, text=True,
                          timeout=30).stdout
    assert str(pid) in ps_e and token not in ps_e
    # Not in the cache (listings are filed under a hash).
    assert grep_tree(m.cache_dir, secret) == []
    assert_owner_only(m.cache_dir)

    # Not in error messages: a wrong key and an unreachable API, foreground and background.
    wrong = "vm0_live_" + secrets.token_hex(20)
    unreachable = f"http://127.0.0.1:{free_port()}"
    for key, url, fg in ((wrong, srv.url, []), (wrong, srv.url, ["--foreground"]),
                         (token, unreachable, ["--foreground"])):
        mnt = tmp_path / f"mnt-{secrets.token_hex(4)}"
        mnt.mkdir()
        try:
            result = run_cli("mount", str(mnt), "--api-url", url, "--cache-dir",
                             str(tmp_path / "c2"), *fg, token=key, timeout=90)
        finally:
            for child in pids_using(mnt):
                stop_pid(child)
            lazy_unmount(mnt)
        assert result.returncode != 0
        assert key not in result.stderr + result.stdout, result.stderr
    assert grep_tree(tmp_path / "c2", wrong.encode()) == []
    assert grep_tree(tmp_path / "c2", secret) == []


def test_background_mount_under_umask_0(dev_server: Server, tmp_path: Path) -> None:
    """`vm0fs mount` (background) started with umask 0 over a cache folder that exists with
    mode 0777: the cache and its log end up owner-only, the key is in no process."""
    token = "vm0_live_" + secrets.token_hex(20)
    data = archives.agent_style()
    [version] = write_artifact(tmp_path / "data", "art", [data])
    srv = dev_server(tmp_path / "data", token=token)
    cache = tmp_path / "cache"
    cache.mkdir()
    os.chmod(cache, 0o777)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    children: list[int] = []
    try:
        result = subprocess.run(
            [*CLI, "mount", str(mnt), "--api-url", srv.url, "--cache-dir", str(cache)],
            cwd=REPO, env=mount_env(token), stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=90, preexec_fn=lambda: os.umask(0))
        children = pids_using(mnt)
        for child in children:
            watchdog.add(child, mnt)
        assert result.returncode == 0, result.stderr
        assert len(children) == 1
        root = mnt / "artifacts" / "art" / version
        mounted = bounded(snapshot, root)
        expected = archives.tar_extract(data, tmp_path / "tar")
        assert not archives.tree_differences(mounted, expected, archives.explicit_dirs(data))
        assert (cache / "vm0fs.log").exists()
        assert_owner_only(cache)
        for child in children:
            assert token.encode() not in proc_bytes(child, "environ")
            assert token.encode() not in proc_bytes(child, "cmdline")
        assert grep_tree(cache, token.encode()) == []
        options = mount_options(mnt)
        assert {"ro", "nosuid", "nodev"} <= options and "allow_other" not in options, options
        done = run_cli("unmount", str(mnt))
        assert done.returncode == 0, done.stderr
    finally:
        if is_mounted(mnt):
            run_cli("unmount", "--lazy", str(mnt))
        for child in children:
            stop_pid(child)
            watchdog.remove(child, mnt)


@pytest.mark.parametrize("allow_other", [False, True], ids=["default", "allow-other"])
def test_mount_options(dev_server: Server, mount_vm0fs: MountFactory, tmp_path: Path,
                       allow_other: bool) -> None:
    write_artifact(tmp_path / "data", "art", [archives.tiny(1)])
    srv = dev_server(tmp_path / "data")
    m = mount_vm0fs(srv, *(["--allow-other"] if allow_other else []))
    options = mount_options(m.path)
    assert {"ro", "nosuid", "nodev"} <= options, options
    assert ("allow_other" in options) == allow_other, options
    if allow_other:
        assert "default_permissions" in options, options
    assert m.run(os.listdir, m.artifacts) == ["art"]


# --- 7. soak -------------------------------------------------------------------------------


@dataclass
class Expect:
    """What tar -x makes of one version: files (bytes), folders (names), links (targets)."""

    files: dict[str, bytes] = field(default_factory=dict)
    dirs: dict[str, set[str]] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)


def expect_from(data: bytes, work: Path) -> Expect:
    archives.tar_extract(data, work)
    base = work / "tar-x"
    out = Expect(dirs={"": set()})
    for dirpath, dirnames, filenames in os.walk(base):
        rel = os.path.relpath(dirpath, base)
        rel = "" if rel == "." else rel
        out.dirs[rel] = set(dirnames) | set(filenames)
        for name in [*dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            key = os.path.join(rel, name) if rel else name
            if os.path.islink(full):
                out.links[key] = os.readlink(full)
            elif os.path.isfile(full):
                with open(full, "rb") as f:
                    out.files[key] = f.read()
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return out


def soak_archive(i: int) -> bytes:
    rng = random.Random(i)
    members = [reg(f"big-{i}.bin", archives.large_bytes(500 + i, 600_000 + i * 1013), 0o644,
                   T0 + i)]
    for j in range(25):
        members.append(reg(f"d{j % 4}/sub{j % 3}/f{j}.txt",
                           f"version {i} file {j}\n" * rng.randrange(1, 400), 0o644, T0 + j))
    members += [sym("link-big", f"big-{i}.bin"), sym("d0/up", "../d1"), dir_("empty/")]
    return tar_gz(members)


@pytest.mark.timeout(int(SOAK_SECONDS) + 240)
def test_soak_random_access_under_faults(dev_server: Server, mount_vm0fs: MountFactory,
                                         tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    arts: dict[str, dict[str, bytes]] = {}
    for k in range(4):
        versions = [soak_archive(10 * k + v) for v in range(2)]
        ids = write_artifact(data_dir, f"soak-{k}", versions, created=EPOCH + 10 * k)
        arts[f"soak-{k}"] = dict(zip(ids, versions, strict=True))
    expect = {(a, v): expect_from(d, tmp_path / f"x-{a}-{v[:8]}")
              for a, vs in arts.items() for v, d in vs.items()}
    srv = dev_server(data_dir, "--fail-every", "7", "--throttle-every", "13", "--latency-ms", "5")
    # A cap that holds about half the versions: they are evicted and fetched again, under
    # cut-off transfers, all through the soak.
    m = mount_vm0fs(srv, "--metadata-ttl", "1", "--cache-size", "3M", "--cache-grace", "0")
    pid = m.proc.pid
    keys = sorted(expect)
    stop = threading.Event()
    errors: list[str] = []
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def check(cond: bool, what: str) -> None:
        if not cond:
            with lock:
                errors.append(what)

    def one_op(rng: random.Random) -> str:
        art, version = rng.choice(keys)
        exp = expect[(art, version)]
        root = m.artifacts / art / version
        op = rng.choice(["read", "read", "pread", "stat", "readdir", "readdir", "top",
                         "artifact", "readlink"])
        if op == "read":
            name = rng.choice(sorted(exp.files))
            check(read_file(root / name) == exp.files[name], f"read {art}/{version}/{name}")
        elif op == "pread":
            name = rng.choice(sorted(exp.files))
            body = exp.files[name]
            with open(root / name, "rb", buffering=0) as f:
                for _ in range(4):
                    off = rng.randrange(len(body) + 1)
                    size = rng.randrange(1, 200_000)
                    got = os.pread(f.fileno(), size, off)
                    check(got == body[off:off + size], f"pread {name} {off}+{size}")
        elif op == "stat":
            name = rng.choice(sorted([*exp.files, *exp.dirs.keys() - {""}, *exp.links]))
            st = os.lstat(root / name)
            if name in exp.files:
                check(stat.S_ISREG(st.st_mode) and st.st_size == len(exp.files[name]),
                      f"stat {name}")
            elif name in exp.links:
                check(stat.S_ISLNK(st.st_mode), f"stat link {name}")
            else:
                check(stat.S_ISDIR(st.st_mode), f"stat dir {name}")
        elif op == "readdir":
            name = rng.choice(sorted(exp.dirs))
            check(set(os.listdir(root / name)) == exp.dirs[name], f"readdir {art}/{name}")
        elif op == "top":
            check(sorted(os.listdir(m.artifacts)) == sorted(arts), "readdir artifacts")
        elif op == "artifact":
            check(set(os.listdir(m.artifacts / art)) == {"current", "history", *arts[art]},
                  f"readdir {art}")
        else:
            name = rng.choice(sorted(exp.links))
            check(os.readlink(root / name) == exp.links[name], f"readlink {name}")
        return op

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            try:
                op = one_op(rng)
            except Exception as exc:  # noqa: BLE001 - every failure is recorded
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                counts[op] = counts.get(op, 0) + 1

    def cut_transfers() -> None:  # re-arm the budgeted fault: downloads keep breaking off
        while not stop.wait(2.0):
            with contextlib.suppress(Exception):
                srv.set_faults(truncate_blob=2)

    threads = [threading.Thread(target=reader, args=(s,), daemon=True) for s in range(8)]
    threads.append(threading.Thread(target=cut_transfers, daemon=True))
    started = time.monotonic()
    warmup = max(SOAK_SECONDS * 0.25, 8.0)
    samples: list[tuple[float, int, int]] = []
    for t in threads:
        t.start()
    try:
        while time.monotonic() - started < SOAK_SECONDS:
            time.sleep(1.0)
            samples.append((time.monotonic() - started, mount_pid_fds(pid),
                            mount_pid_threads(pid)))
            assert pid_alive(pid), f"the mount died:\n{m.log()[-5000:]}"
            if len(errors) > 20:
                break
    finally:
        stop.set()
        deadline = time.monotonic() + 90  # every op in flight must finish
        for t in threads:
            t.join(max(deadline - time.monotonic(), 0.1))
        hung = [t for t in threads if t.is_alive()]
        if hung:
            detail = m._abort()
            pytest.fail(f"{len(hung)} soak thread(s) hung in the mount\n{detail}")
    assert not errors, f"{len(errors)} failures, first ones:\n" + "\n".join(errors[:20]) + (
        f"\n{m.log()[-5000:]}")
    assert sum(counts.values()) > 100, counts
    # Alive and right at the end.
    assert sorted(m.run(os.listdir, m.artifacts)) == sorted(arts)
    for key in keys:
        big = next(n for n in expect[key].files if n.startswith("big-"))
        assert m.run(read_file, m.artifacts / key[0] / key[1] / big) == expect[key].files[big]
    # No growth of descriptors or threads after the warm-up (a little slack for pools).
    warm = [s for s in samples if s[0] <= warmup]
    late = [s for s in samples if s[0] >= SOAK_SECONDS * 0.75]
    assert warm and late, samples
    fds_warm, fds_late = max(s[1] for s in warm), max(s[1] for s in late)
    threads_warm, threads_late = max(s[2] for s in warm), max(s[2] for s in late)
    assert fds_late <= fds_warm + 16, samples
    assert threads_late <= threads_warm + 8, samples
    print(f"soak: {sum(counts.values())} ops {counts}, fds {fds_warm}->{fds_late}, "
          f"threads {threads_warm}->{threads_late}, downloads {srv.stats()}")
    assert "Traceback" not in m.log(), m.log()[-5000:]
