"""The filesystem operations driven directly (no kernel): a fake API client, the real cache,
the real version store and listings, under trio."""

from __future__ import annotations

import copy
import errno
import io
import json
import os
import stat
import subprocess
import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from vm0fs.api import Artifact, Version
from vm0fs.cache import Cache
from vm0fs.errors import ArchiveError, NotFound, Unauthorized, Unavailable
from vm0fs.fs import CONTENT_TIMEOUT, Operations
from vm0fs.integrity import BLOCK
from vm0fs.meta import Listings
from vm0fs.namespace import counted_back, folder_names, history_names, safe_name, time_name
from vm0fs.tree import InodeTable
from vm0fs.versions import VersionStore

TTL = 60.0


Entries = dict[str, bytes | str] | list[tuple[str, bytes | str]]


def tar_gz(files: Entries, *, mtime: int = 1_700_000_000) -> bytes:
    """Members in order; a str value makes a symlink, a name ending in '/' a directory."""
    buf = io.BytesIO()
    items = files.items() if isinstance(files, dict) else files
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name, body in items:
            info = tarfile.TarInfo(name.rstrip("/"))
            info.mtime, info.mode = mtime, 0o644
            if name.endswith("/"):
                info.type, info.mode = tarfile.DIRTYPE, 0o700
                tar.addfile(info)
            elif isinstance(body, str):
                info.type, info.linkname = tarfile.SYMTYPE, body
                tar.addfile(info)
            else:
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def version(vid: str, artifact_id: str, file_count: int = 1, created: float = 1e9) -> Version:
    return Version(vid, artifact_id, 0, file_count, None, "agent", created)


def artifact(aid: str, name: str, versions: list[Version]) -> Artifact:
    current = versions[0] if versions else None
    return Artifact(aid, name, current.id if current else None, 0, 1, 1e9, 2e9, current)


class FakeClient:
    """The API, in memory. `gate` (a trio.Event) pauses downloads after their first chunk."""

    def __init__(self) -> None:
        self.artifacts: list[Artifact] = []
        self.versions: dict[str, list[Version]] = {}
        self.archives: dict[str, bytes] = {}
        self.downloads = 0
        self.list_calls = 0
        self.gate: trio.Event | None = None
        self.list_error: Exception | None = None
        self.download_error: Exception | None = None
        self.chunk = 4096

    def add(self, aid: str, name: str, archives: list[bytes]) -> list[str]:
        ids = [f"{i:x}{aid}".ljust(64, "0")[:64] for i in range(len(archives))]
        for vid, data in zip(ids, archives, strict=True):
            self.archives[vid] = data
        versions = [version(vid, aid) for vid in ids]
        self.versions[aid] = versions
        self.artifacts.append(artifact(aid, name, versions))
        return ids

    async def list_artifacts(self, on_more: Any = None) -> list[Artifact]:
        self.list_calls += 1
        if self.list_error:
            raise self.list_error
        return list(self.artifacts)

    async def list_versions(self, artifact_id: str, on_more: Any = None) -> list[Version]:
        self.list_calls += 1
        if self.list_error:
            raise self.list_error
        return list(self.versions[artifact_id])

    async def get_artifact(self, artifact_id: str) -> Artifact:
        self.list_calls += 1
        if self.list_error:
            raise self.list_error
        for found in self.artifacts:
            if found.id == artifact_id:
                return found
        raise NotFound(f"no artifact {artifact_id}")

    async def download(self, artifact_id: str, version_id: str | None = None
                       ) -> AsyncIterator[bytes]:
        self.downloads += 1
        if self.download_error:
            raise self.download_error
        data = self.archives[version_id or ""]
        for start in range(0, len(data), self.chunk):
            yield data[start:start + self.chunk]
            await trio.sleep(0)
            if self.gate is not None:
                await self.gate.wait()


class Harness:
    def __init__(self, ops: Operations, client: FakeClient, store: VersionStore) -> None:
        self.ops, self.client, self.store = ops, client, store

    async def lookup(self, path: str) -> pyfuse3.EntryAttributes:
        attrs = await self.ops.getattr(pyfuse3.ROOT_INODE)
        for part in [p for p in path.split("/") if p]:
            attrs = await self.ops.lookup(attrs.st_ino, os.fsencode(part))
            if attrs.st_ino == 0:
                raise FileNotFoundError(path)
        return attrs

    async def resolve(self, path: str) -> pyfuse3.EntryAttributes:
        """Like lookup, following symlinks (relative ones, inside the mount) as the kernel does."""
        parts = [p for p in path.split("/") if p]
        done: list[str] = []
        while parts:
            done.append(parts.pop(0))
            attrs = await self.lookup("/".join(done))
            if stat.S_ISLNK(attrs.st_mode):
                target = os.fsdecode(await self.ops.readlink(attrs.st_ino))
                done.pop()
                parts = [p for p in target.split("/") if p] + parts
        return await self.lookup("/".join(done))

    async def opendir(self, inode: int) -> int | None:
        """The handle readdir gets, as the kernel does it: after ENOSYS, none (the inode)."""
        try:
            return await self.ops.opendir(inode)
        except pyfuse3.FUSEError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            return None

    async def listdir(self, path: str, batch: int | None = None, with_dots: bool = False
                      ) -> dict[str, pyfuse3.EntryAttributes]:
        """The entries of a folder; `batch` entries per readdir call (default: all in one)."""
        return await self.list_inode((await self.resolve(path)).st_ino, batch, with_dots)

    async def list_inode(self, inode: int, batch: int | None = None, with_dots: bool = False
                         ) -> dict[str, pyfuse3.EntryAttributes]:
        fh = await self.opendir(inode)
        entries: dict[str, pyfuse3.EntryAttributes] = {}
        original = pyfuse3.readdir_reply
        per_call = batch or 1 << 30
        room, start = 0, 0

        def reply(token: Any, name: bytes, attrs: Any, next_id: int) -> bool:
            nonlocal room, start
            if room == 0:  # the kernel's buffer is full
                return False
            room -= 1
            entries[os.fsdecode(name)] = copy.copy(attrs)  # libfuse copies them at once
            start = next_id
            return True

        pyfuse3.readdir_reply = reply  # type: ignore[assignment]
        try:
            while room == 0:  # until a call leaves room: the end of the folder
                room = per_call
                await self.ops.readdir(inode if fh is None else fh, start, None)
        finally:
            pyfuse3.readdir_reply = original  # type: ignore[assignment]
            if fh is not None:
                await self.ops.releasedir(fh)
        if not with_dots:
            entries.pop(".", None)
            entries.pop("..", None)
        return entries

    async def read(self, path: str, chunk: int = 128 * 1024) -> bytes:
        attrs = await self.resolve(path)
        try:
            fh: int | None = (await self.ops.open(attrs.st_ino, os.O_RDONLY)).fh
        except pyfuse3.FUSEError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            fh = None  # stateless: reads get the inode
        out = bytearray()
        try:
            while True:
                data = await self.ops.read(attrs.st_ino if fh is None else fh, len(out), chunk)
                if not data:
                    return bytes(out)
                out += data
        finally:
            if fh is not None:
                await self.ops.release(fh)


@pytest.fixture(autouse=True, params=["stateless", "classic"])
def open_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test here runs in both ways of serving opens."""
    global STATELESS
    STATELESS = request.param == "stateless"
    yield request.param


STATELESS = True


def run(tmp_path: Path, client: FakeClient, test: Callable[[Harness], Awaitable[None]],
        cache_size: int | None = None, ttl: float = TTL, recently_read: float = 0.0) -> None:
    async def main() -> None:
        cache = Cache(tmp_path / "cache", cache_size)
        store = VersionStore(cache, client, InodeTable(pyfuse3.ROOT_INODE + 1),
                             retry_failed_after=0, recently_read=recently_read)
        listings = Listings(client, ttl, tmp_path / "listings", offline_backoff=0)
        ops = Operations(listings, store, cache, metadata_ttl=ttl, stateless=STATELESS)
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            with trio.fail_after(30):
                await test(Harness(ops, client, store))
                while any(state.loading for state in store.states.values()):
                    await trio.sleep(0.01)  # let downloads the test started finish
            nursery.cancel_scope.cancel()

    trio.run(main)


def fuse_errno(excinfo: pytest.ExceptionInfo[pyfuse3.FUSEError]) -> int:
    return excinfo.value.errno


SIMPLE = tar_gz({"README.md": b"# hi\n", "src/main.py": b"print(1)\n", "link": "src/main.py"})


def test_names_are_made_safe_and_unique() -> None:
    assert safe_name("a/b") == "a\uff0fb"
    assert safe_name("nul\0") == "nul\u2400"
    assert safe_name(".") == "\uff0e" and safe_name("..") == "\uff0e\uff0e"
    names = folder_names([artifact("id1", "same", []), artifact("id2", "same", []),
                          artifact("id3", "solo", []), artifact("id4", "", [])])
    assert sorted(names) == ["@id4", "same@id1", "same@id2", "solo"]


def test_listing_layout_without_downloads(tmp_path: Path) -> None:
    client = FakeClient()
    ids = client.add("a1", "run", [SIMPLE, SIMPLE + b""])
    client.add("a2", "empty", [])

    async def test(h: Harness) -> None:
        assert set(await h.listdir("artifacts")) == {"run", "empty"}
        entries = await h.listdir("artifacts/run")
        assert set(entries) == {*ids, "current", "history"}
        assert stat.S_ISLNK(entries["current"].st_mode)
        current = await h.lookup("artifacts/run/current")
        assert os.fsdecode(await h.ops.readlink(current.st_ino)) == ids[0]
        assert set(await h.listdir("artifacts/empty")) == {"history"}
        assert await h.listdir("artifacts/empty/history") == {}
        vdir = await h.lookup(f"artifacts/run/{ids[1]}")
        assert stat.S_ISDIR(vdir.st_mode)
        assert vdir.st_mtime_ns == int(1e9 * 1e9)
        assert (await h.lookup("artifacts/run")).st_mtime_ns == int(2e9 * 1e9)
        prefix = await h.lookup(f"artifacts/run/{ids[1][:8]}")
        assert os.fsdecode(await h.ops.readlink(prefix.st_ino)) == ids[1]
        with pytest.raises(FileNotFoundError):
            await h.lookup(f"artifacts/run/{ids[1][:7]}")
        run_dir = await h.lookup("artifacts/run")
        negative = await h.ops.lookup(run_dir.st_ino, b".hidden")
        assert negative.st_ino == 0 and negative.entry_timeout == TTL
        assert h.client.downloads == 0
        calls = h.client.list_calls
        await h.listdir("artifacts/run")
        assert h.client.list_calls == calls  # within the TTL: no request

    run(tmp_path, client, test)


def test_contents_and_kernel_timeouts(tmp_path: Path) -> None:
    client = FakeClient()
    client.add("a1", "run", [tar_gz([
        ("dup.txt", b"first"), ("a/b/", b""), ("a/b/c.txt", b"c" * 300_000),
        ("z/implied/f", b"f"), ("link", "a/b/c.txt"), ("dup.txt", b"second"),
    ])])

    async def test(h: Harness) -> None:
        root = "artifacts/run/current"
        assert set(await h.listdir(root)) == {"dup.txt", "a", "z", "link"}
        assert await h.read(f"{root}/dup.txt") == b"second"  # the later member wins
        assert await h.read(f"{root}/a/b/c.txt") == b"c" * 300_000
        assert await h.read(f"{root}/link") == b"c" * 300_000
        explicit = await h.resolve(f"{root}/a/b")
        assert stat.S_IMODE(explicit.st_mode) == 0o700
        implied = await h.resolve(f"{root}/z/implied")
        assert stat.S_IMODE(implied.st_mode) == 0o755
        assert implied.st_mtime_ns == int(1e9 * 1e9)  # the version's created_at
        f = await h.resolve(f"{root}/a/b/c.txt")
        assert f.entry_timeout == f.attr_timeout == CONTENT_TIMEOUT
        assert f.st_blocks == (300_000 + 511) // 512 and f.st_uid == os.getuid()
        missing = await h.ops.lookup(implied.st_ino, b"nothing")
        assert missing.st_ino == 0 and missing.entry_timeout == CONTENT_TIMEOUT
        assert h.client.downloads == 1

    run(tmp_path, client, test)


def test_reads_are_served_while_the_archive_streams(tmp_path: Path) -> None:
    client = FakeClient()
    client.chunk = 2 * BLOCK  # the first chunk holds the first checked block
    client.add("a1", "big", [tar_gz({"first.txt": b"early bird",
                                     "rest.bin": os.urandom(400_000)})])
    client.gate = trio.Event()

    async def test(h: Harness) -> None:
        root = "artifacts/big/current"
        assert await h.read(f"{root}/first.txt") == b"early bird"
        state = next(iter(h.store.states.values()))
        assert not state.tree_complete  # the download is still held at its gate
        attrs = await h.resolve(f"{root}/first.txt")
        assert attrs.entry_timeout == 0  # may still be replaced by a later member

        async def release() -> None:
            await trio.sleep(0.05)
            assert h.client.gate is not None
            h.client.gate.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(release)
            assert len(await h.read(f"{root}/rest.bin")) == 400_000
        await state.wait_tree()
        assert state.tree_complete

    run(tmp_path, client, test)


def test_a_version_another_process_published_first_keeps_our_copy_open_for_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another mount of the same cache published the version first: readers move to its copy,
    and ours is closed once no read in flight uses it (it was closed at once: EBADF)."""
    client = FakeClient()
    client.add("a1", "big", [tar_gz({"a.txt": b"alpha", "b.txt": b"beta"})])
    real_publish = Cache.publish
    staged: list[int] = []
    held: list[Any] = []

    def publish_theirs(self: Cache, staging: Any, *args: Any, **kwargs: Any) -> Any:
        entry = real_publish(self, staging, *args, **kwargs)
        staged.append(staging.fd)
        (state,) = held[0].states.values()
        state.reads_in_flight += 1  # a read of the staging copy, under way
        return type(entry)(os.dup(entry.fd), entry.index, entry.size, entry.sums)

    monkeypatch.setattr(Cache, "publish", publish_theirs)

    async def test(h: Harness) -> None:
        root = "artifacts/big/current"
        held.append(h.store)
        await h.listdir(root)  # until it is complete
        (state,) = h.store.states.values()
        while state.loading:
            await trio.sleep(0.01)
        (ours,) = staged
        assert state.fd != ours and ours in state.retired
        os.fstat(ours)  # still open for the read in flight
        assert await h.read(f"{root}/b.txt") == b"beta"  # from their copy
        state.reads_in_flight -= 1
        state.close_retired()
        with pytest.raises(OSError):
            os.fstat(ours)

    run(tmp_path, client, test)


def test_one_download_for_many_concurrent_readers(tmp_path: Path) -> None:
    client = FakeClient()
    files = {f"f{i:02}.txt": f"file {i}\n".encode() * 100 for i in range(32)}
    client.add("a1", "many", [tar_gz(files)])

    async def test(h: Harness) -> None:
        results: dict[str, bytes] = {}

        async def reader(name: str) -> None:
            results[name] = await h.read(f"artifacts/many/current/{name}")

        async with trio.open_nursery() as nursery:
            for name in files:
                nursery.start_soon(reader, name)
        assert results == files
        assert h.client.downloads == 1

    run(tmp_path, client, test)


def test_cached_versions_survive_a_restart(tmp_path: Path) -> None:
    client = FakeClient()
    client.add("a1", "run", [SIMPLE])

    async def first(h: Harness) -> None:
        assert await h.read("artifacts/run/current/src/main.py") == b"print(1)\n"

    run(tmp_path, client, first)
    run(tmp_path, client, first)
    assert client.downloads == 1


def test_broken_archive_is_eio_for_that_version_only(tmp_path: Path) -> None:
    client = FakeClient()
    client.add("a1", "bad", [b"\x1f\x8b garbage"])
    client.add("a2", "good", [SIMPLE])

    async def test(h: Harness) -> None:
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await h.listdir("artifacts/bad/current")
        assert fuse_errno(excinfo) == errno.EIO
        assert await h.read("artifacts/good/current/README.md") == b"# hi\n"
        await h.listdir("artifacts/good/current")  # until it is complete and published
        with pytest.raises(pyfuse3.FUSEError):  # a later access tries again
            await h.resolve("artifacts/bad/current/x")
        assert h.client.downloads == 3
        cache = h.store.cache
        assert list(cache.staging.iterdir()) == []
        assert [p.name for p in cache.versions.iterdir()] == [client.versions["a2"][0].id]

    run(tmp_path, client, test)


@pytest.mark.parametrize("error, code", [
    (NotFound("gone"), errno.ENOENT), (Unauthorized("revoked"), errno.EACCES),
    (Unavailable("down"), errno.EIO), (ArchiveError("bad"), errno.EIO),
])
def test_download_errors_map_to_errno(tmp_path: Path, error: Exception, code: int) -> None:
    client = FakeClient()
    client.add("a1", "run", [SIMPLE])
    client.download_error = error

    async def test(h: Harness) -> None:
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await h.listdir("artifacts/run/current")
        assert fuse_errno(excinfo) == code

    run(tmp_path, client, test)


def test_listing_errors_and_stale_listings(tmp_path: Path) -> None:
    client = FakeClient()
    client.add("a1", "run", [SIMPLE])

    async def test(h: Harness) -> None:
        assert set(await h.listdir("artifacts")) == {"run"}
        h.ops.listings.invalidate()
        h.client.list_error = Unavailable("down")
        assert set(await h.listdir("artifacts")) == {"run"}  # the last known listing
        assert h.ops.listings.stale
        h.ops.listings.invalidate()
        h.client.list_error = Unauthorized("revoked")
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await h.listdir("artifacts")
        assert fuse_errno(excinfo) == errno.EACCES

    run(tmp_path, client, test)


def test_last_known_listings_survive_a_restart_offline(tmp_path: Path) -> None:
    client = FakeClient()
    client.add("a1", "run", [SIMPLE])

    async def online(h: Harness) -> None:
        await h.read("artifacts/run/current/README.md")

    async def offline(h: Harness) -> None:
        assert await h.read("artifacts/run/current/README.md") == b"# hi\n"

    run(tmp_path, client, online)
    client.list_error = Unavailable("down")
    client.download_error = Unavailable("down")
    run(tmp_path, client, offline)


def test_read_only(tmp_path: Path) -> None:
    client = FakeClient()
    client.add("a1", "run", [SIMPLE])

    async def test(h: Harness) -> None:
        f = await h.resolve("artifacts/run/current/README.md")
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            with pytest.raises(pyfuse3.FUSEError) as excinfo:
                await h.ops.open(f.st_ino, flags)
            # Stateless: no opens at all; the kernel refuses writes on the read-only mount.
            assert fuse_errno(excinfo) == (errno.ENOSYS if h.ops.stateless else errno.EROFS)
        for call in (h.ops.mkdir(1, b"x", 0o755, None), h.ops.unlink(1, b"x", None),
                     h.ops.setattr(f.st_ino, None, None, None, None)):
            with pytest.raises(pyfuse3.FUSEError) as excinfo:
                await call
            assert fuse_errno(excinfo) == errno.EROFS

    run(tmp_path, client, test)


def test_empty_version_needs_no_download(tmp_path: Path) -> None:
    client = FakeClient()
    (vid,) = client.add("a1", "run", [b""])
    client.versions["a1"] = [version(vid, "a1", file_count=0)]
    client.artifacts = [artifact("a1", "run", client.versions["a1"])]

    async def test(h: Harness) -> None:
        assert await h.listdir(f"artifacts/run/{vid}") == {}
        assert h.client.downloads == 0

    run(tmp_path, client, test)


def test_evicted_version_is_fetched_again_with_the_same_inodes(tmp_path: Path) -> None:
    client = FakeClient()
    big = {f"f{i}": os.urandom(30_000) for i in range(3)}
    client.add("a1", "one", [tar_gz(big)])
    client.add("a2", "two", [tar_gz({"g": os.urandom(100_000)})])

    async def test(h: Harness) -> None:
        before = await h.resolve("artifacts/one/current/f0")
        assert await h.read("artifacts/one/current/f0") == big["f0"]
        await h.listdir("artifacts/one/current")  # complete and published before "two"
        await h.read("artifacts/two/current/g")  # over the cap: "one" is idle, so it goes
        await h.listdir("artifacts/two/current")  # until "two" is complete and published
        await h.store.enforce_cache_size()
        cache = h.store.cache
        assert cache.usage() <= 150_000
        assert await h.read("artifacts/one/current/f1") == big["f1"]
        assert (await h.resolve("artifacts/one/current/f0")).st_ino == before.st_ino
        assert h.client.downloads == 3

    run(tmp_path, client, test, cache_size=150_000)


def test_gnu_sparse_member_reads_back(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse.bin", "wb") as f:
        f.write(b"start")
        f.seek(300_000)
        f.write(b"middle")
        f.truncate(1 << 20)
    archive = tmp_path / "s.tar.gz"
    subprocess.run(["tar", "--sparse", "-czf", str(archive), "-C", str(src), "sparse.bin"],
                   check=True)
    client = FakeClient()
    client.add("a1", "sparse", [archive.read_bytes()])

    async def test(h: Harness) -> None:
        data = await h.read("artifacts/sparse/current/sparse.bin", chunk=65_536)
        assert data == (src / "sparse.bin").read_bytes()

    run(tmp_path, client, test)


def test_control_folder_status_and_info(tmp_path: Path) -> None:
    client = FakeClient()
    (vid,) = client.add("a1", "run", [SIMPLE])

    async def test(h: Harness) -> None:
        assert set(await h.listdir("")) == {"artifacts", ".vm0fs"}
        assert set(await h.listdir(".vm0fs")) == {"status", "status.json", "info"}
        await h.read("artifacts/run/current/README.md")
        await h.listdir("artifacts/run/current")
        status = json.loads(await h.read(".vm0fs/status.json"))
        assert status["cache"]["versions"] == 1 and status["downloads_total"] == 1
        assert status["downloads"] == [] and status["offline"] is False
        assert "cache use:" in (await h.read(".vm0fs/status")).decode()
        info = json.loads(await h.read(".vm0fs/info/run"))
        assert info["artifact"]["id"] == "a1" and info["artifact"]["folder"] == "run"
        assert [v["id"] for v in info["versions"]] == [vid]
        with pytest.raises(FileNotFoundError):
            await h.lookup(".vm0fs/info/nothing")
        assert await h.listdir(".vm0fs/info") == {}

    run(tmp_path, client, test)


def test_status_shows_downloads_in_progress_and_errors(tmp_path: Path) -> None:
    client = FakeClient()
    client.chunk = 2 * BLOCK  # the first chunk holds the first checked block
    client.add("a1", "big", [tar_gz({"first.txt": b"x", "rest.bin": os.urandom(200_000)})])
    client.gate = trio.Event()

    async def test(h: Harness) -> None:
        await h.read("artifacts/big/current/first.txt")
        (download,) = json.loads(await h.read(".vm0fs/status.json"))["downloads"]
        assert download["artifact"] == "big" and download["bytes_done"] > 0
        assert h.client.gate is not None
        h.client.gate.set()

    run(tmp_path, client, test)


@pytest.mark.parametrize("enabled", [False, True])
def test_extended_attributes_are_opt_in(tmp_path: Path, enabled: bool) -> None:
    client = FakeClient()
    (vid,) = client.add("a1", "run", [SIMPLE])

    async def test(h: Harness) -> None:
        h.ops.xattrs = enabled
        folder = await h.lookup(f"artifacts/run/{vid}")
        if not enabled:
            with pytest.raises(pyfuse3.FUSEError) as excinfo:
                await h.ops.getxattr(folder.st_ino, b"security.selinux")
            assert fuse_errno(excinfo) == errno.ENOSYS
            return
        assert await h.ops.getxattr(folder.st_ino, b"user.vm0.version_id") == vid.encode()
        assert await h.ops.getxattr(folder.st_ino, b"user.vm0.artifact_name") == b"run"
        assert b"user.vm0.message" in await h.ops.listxattr(folder.st_ino)
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await h.ops.getxattr(folder.st_ino, b"security.selinux")
        assert fuse_errno(excinfo) == pyfuse3.ENOATTR
        assert h.client.downloads == 0

    run(tmp_path, client, test)


@pytest.mark.timeout(30)
def test_unmount_during_a_download_ends_promptly(tmp_path: Path) -> None:
    client = FakeClient()
    client.chunk = 2 * BLOCK  # the first chunk holds the first checked block
    client.add("a1", "big", [tar_gz({"first.txt": b"x", "rest.bin": os.urandom(200_000)})])
    client.gate = trio.Event()  # never set: the download hangs after its first chunk

    async def main() -> None:
        cache = Cache(tmp_path / "cache")
        store = VersionStore(cache, client, InodeTable(pyfuse3.ROOT_INODE + 1))
        ops = Operations(Listings(client, TTL), store, cache, metadata_ttl=TTL,
                         stateless=STATELESS)
        with trio.fail_after(10):  # the parser thread must not keep the nursery open
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                assert await Harness(ops, client, store).read(
                    "artifacts/big/current/first.txt") == b"x"
                nursery.cancel_scope.cancel()
        assert list(cache.staging.iterdir()) == []

    trio.run(main)


def test_uncached_versions_fail_at_once_while_the_api_is_down(tmp_path: Path) -> None:
    client = FakeClient()
    client.add("a1", "run", [SIMPLE])

    async def test(h: Harness) -> None:
        h.store.offline = lambda: True
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await h.listdir("artifacts/run/current")
        assert fuse_errno(excinfo) == errno.EIO
        assert h.client.downloads == 0

    run(tmp_path, client, test)


def test_names_longer_than_name_max_are_left_out(tmp_path: Path) -> None:
    client = FakeClient()
    long_name = "é" * 128  # 256 bytes in UTF-8, only 128 characters
    client.add("a1", "run", [tar_gz({f"d/{long_name}": b"x", "d/ok": b"y"})])

    async def test(h: Harness) -> None:
        assert set(await h.listdir("artifacts/run/current/d")) == {"ok"}

    run(tmp_path, client, test)


def test_readdir_in_several_calls_lists_each_entry_once_with_dot_entries(tmp_path: Path) -> None:
    client = FakeClient()
    files: dict[str, bytes | str] = {f"d/f{i:03}": b"x" for i in range(50)}
    client.add("a1", "many", [tar_gz(files)])

    async def test(h: Harness) -> None:
        whole = await h.listdir("artifacts/many/current/d", with_dots=True)
        assert list(whole)[:2] == [".", ".."]
        assert whole["."].st_ino == (await h.resolve("artifacts/many/current/d")).st_ino
        assert whole[".."].st_ino == (await h.resolve("artifacts/many/current")).st_ino
        batched = await h.listdir("artifacts/many/current/d", batch=7, with_dots=True)
        assert list(batched) == list(whole)
        root = await h.listdir("", with_dots=True)
        assert {".", "..", "artifacts", ".vm0fs"} <= set(root)

    run(tmp_path, client, test)


def test_control_files_change_size_and_mtime_with_their_content(tmp_path: Path) -> None:
    """Stateless opens: the kernel keeps a file's pages until its size or mtime changes."""
    client = FakeClient()
    client.add("a1", "run", [SIMPLE])

    async def test(h: Harness) -> None:
        before = await h.resolve(".vm0fs/status.json")
        assert before.st_mtime_ns > 10**18  # not 1970
        again = await h.ops.getattr(before.st_ino)
        assert (again.st_size, again.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        await h.read("artifacts/run/current/README.md")  # a download: the status changes
        while any(state.loading for state in h.store.states.values()):
            await trio.sleep(0.01)
        after = await h.ops.getattr(before.st_ino)
        assert after.st_mtime_ns > before.st_mtime_ns
        if h.ops.stateless:  # a read answers with the content its size was told with
            data = bytes(await h.ops.read(before.st_ino, 0, 1 << 20))
            assert len(data) == after.st_size
        data = await h.read(".vm0fs/status.json")
        assert json.loads(data)["downloads_total"] == 1
        assert json.loads(data)["open_mode"].startswith(
            "stateless" if h.ops.stateless else "classic")

    run(tmp_path, client, test)


def test_changed_listings_get_a_new_mtime_and_are_invalidated(tmp_path: Path) -> None:
    client = FakeClient()
    client.add("a1", "run", [SIMPLE])

    async def test(h: Harness) -> None:
        top = await h.resolve("artifacts")
        folder = await h.resolve("artifacts/run")
        history = await h.resolve("artifacts/run/history")
        await h.listdir("artifacts")
        await h.listdir("artifacts/run")
        same = await h.ops.getattr(top.st_ino)
        assert same.st_mtime_ns == (await h.ops.getattr(top.st_ino)).st_mtime_ns
        assert not h.ops._stale_listings  # nothing changed: the kernel keeps its copy
        before = (await h.ops.getattr(folder.st_ino)).st_mtime_ns
        client.add("a2", "new", [SIMPLE])  # a new artifact
        client.versions["a1"].append(version("f" * 64, "a1"))  # and a new version of "run"
        # The kernel asks for the attributes before it uses a listing it cached.
        assert (await h.ops.getattr(top.st_ino)).st_mtime_ns > same.st_mtime_ns
        assert (await h.ops.getattr(folder.st_ino)).st_mtime_ns > before
        assert "new" in await h.listdir("artifacts")
        assert "f" * 64 in await h.listdir("artifacts/run")
        expected = {top.st_ino, folder.st_ino, history.st_ino} if h.ops.stateless else set()
        assert h.ops._stale_listings == expected

    run(tmp_path, client, test, ttl=0)


def test_a_version_read_recently_is_not_evicted_and_a_read_brings_data_back(
        tmp_path: Path) -> None:
    client = FakeClient()
    one = {f"f{i}": os.urandom(60_000) for i in range(2)}
    client.add("a1", "one", [tar_gz(one)])
    client.add("a2", "two", [tar_gz({"g": os.urandom(100_000)})])

    async def test(h: Harness) -> None:
        assert await h.read("artifacts/one/current/f0") == one["f0"]
        await h.listdir("artifacts/one/current")  # complete and published
        await h.read("artifacts/two/current/g")
        await h.listdir("artifacts/two/current")
        await h.store.enforce_cache_size()
        cached = {e[0] for e in h.store.cache.entries()}
        assert len(cached) == 2, "both were read just now: kept over the cap"
        for state in h.store.states.values():
            state.last_read -= 3600  # an hour later
        await h.store.enforce_cache_size()
        assert h.store.cache.usage() <= 150_000
        assert await h.read("artifacts/one/current/f1") == one["f1"]  # fetched again if gone
        assert await h.read("artifacts/two/current/g")

    run(tmp_path, client, test, cache_size=150_000, recently_read=600)


class HeldList(FakeClient):
    """The artifact list waits for `hold` when it is set."""

    hold: trio.Event | None = None

    async def list_artifacts(self, on_more: Any = None) -> list[Artifact]:
        if self.hold is not None:
            await self.hold.wait()
        return await super().list_artifacts(on_more)


def test_a_refresh_behind_the_last_answer_shows_what_it_brought_when_it_ends(
        tmp_path: Path) -> None:
    client = HeldList()
    client.add("a1", "run", [SIMPLE])

    async def test(h: Harness) -> None:
        async with trio.open_nursery() as nursery:
            h.ops.listings.start(nursery)
            h.ops.listings.stale_after = 0  # the access answers at once, the refresh goes on
            assert set(await h.listdir("artifacts")) == {"run"}
            await trio.sleep(0.1)  # past the TTL
            client.add("a2", "new", [SIMPLE])
            client.hold = trio.Event()
            before = h.ops.artifacts_dir.mtime_ns
            assert set(await h.listdir("artifacts")) == {"run"}  # the last list
            client.hold.set()
            while h.ops.listings.artifacts_refreshing:
                await trio.sleep(0.01)
            # No access since: the tree and the kernel were told when the refresh ended.
            assert set(h.ops.artifacts_dir.children) == {"run", "new"}
            assert h.ops.artifacts_dir.mtime_ns > before
            if h.ops.stateless:
                assert h.ops.artifacts_dir.inode in h.ops._stale_listings
            nursery.cancel_scope.cancel()

    run(tmp_path, client, test, ttl=0.05)


# --- memory: indexes dropped and found again ---------------------------------------------------

NESTED = tar_gz([("top.txt", b"top\n"), ("d/", b""), ("d/e/f.txt", b"deep file\n"),
                 ("d/link", "e/f.txt"), ("d/g.bin", bytes(range(256)) * 50)])


async def read_inode(h: Harness, inode: int) -> bytes:
    try:
        fh: int | None = (await h.ops.open(inode, os.O_RDONLY)).fh
    except pyfuse3.FUSEError as exc:
        if exc.errno != errno.ENOSYS:
            raise
        fh = None  # stateless: reads get the inode
    try:
        return bytes(await h.ops.read(inode if fh is None else fh, 0, 1 << 20))
    finally:
        if fh is not None:
            await h.ops.release(fh)


async def list_inode(h: Harness, inode: int) -> dict[str, int]:
    return {name: attrs.st_ino for name, attrs in (await h.list_inode(inode)).items()}


def test_inodes_the_kernel_holds_answer_after_the_index_is_dropped(tmp_path: Path) -> None:
    """getattr, read, readlink, readdir, lookup and '..' of inodes looked up before the
    version's index was dropped: the same entries, the same numbers, no new download."""
    client = FakeClient()
    (vid,) = client.add("a1", "run", [NESTED])

    async def test(h: Harness) -> None:
        root = f"artifacts/run/{vid}"
        vdir = await h.resolve(root)
        d = await h.resolve(f"{root}/d")
        f = await h.resolve(f"{root}/d/e/f.txt")
        e = await h.resolve(f"{root}/d/e")
        link = await h.lookup(f"{root}/d/link")
        listed = await list_inode(h, d.st_ino)
        (state,) = h.store.states.values()
        assert state.index is not None and h.store.memory()["versions_in_memory"] == 1
        assert state.kernel_refs > 0

        h.store.drop(state)
        assert state.index is None and h.store.memory()["versions_in_memory"] == 0
        again = await h.ops.getattr(f.st_ino)
        assert (again.st_ino, again.st_size, again.st_mode) == (f.st_ino, 10, f.st_mode)
        assert state.index is not None  # mapped again from the cache

        h.store.drop(state)
        assert await read_inode(h, f.st_ino) == b"deep file\n"
        h.store.drop(state)
        assert os.fsdecode(await h.ops.readlink(link.st_ino)) == "e/f.txt"
        h.store.drop(state)
        assert await list_inode(h, d.st_ino) == listed
        h.store.drop(state)
        assert (await h.ops.lookup(e.st_ino, b"f.txt")).st_ino == f.st_ino
        h.store.drop(state)
        assert (await h.ops.lookup(e.st_ino, b"..")).st_ino == d.st_ino
        assert (await h.ops.lookup(d.st_ino, b"..")).st_ino == vdir.st_ino
        assert (await h.ops.lookup(e.st_ino, b"nothing")).st_ino == 0
        assert h.client.downloads == 1

        # Numbers past the version's entries, or in a range no version has: ENOENT.
        for bogus in (state.base + 10_000, state.base + (1 << 31) + (7 << 32)):
            with pytest.raises(pyfuse3.FUSEError) as excinfo:
                await h.ops.getattr(bogus)
            assert fuse_errno(excinfo) == errno.ENOENT

    run(tmp_path, client, test)


def test_forgotten_entries_are_found_again_from_a_new_download(tmp_path: Path) -> None:
    """Once the kernel forgets a version's entries its index goes; if its cache entry goes
    too, looking it up again downloads it and gives every entry the number it had."""
    client = FakeClient()
    (vid,) = client.add("a1", "run", [NESTED])

    async def test(h: Harness) -> None:
        root = f"artifacts/run/{vid}"
        paths = ["top.txt", "d", "d/e", "d/e/f.txt", "d/link", "d/g.bin"]
        before = {p: (await h.lookup(f"{root}/{p}")).st_ino for p in paths}
        (state,) = h.store.states.values()
        await state.wait_tree()
        refs = state.kernel_refs
        await h.ops.forget([(inode, 1) for inode in before.values()])
        assert state.kernel_refs == refs - len(paths)
        await h.ops.forget([(inode, 100) for inode in before.values()])
        assert state.kernel_refs == 0
        assert h.store.trim(state.last_used + 1) == 0  # used a moment ago: kept
        assert h.store.trim(state.last_used + 10) == 1  # nothing held by the kernel: dropped
        assert state.index is None

        # The cache entry goes as well (as eviction would do it).
        assert state.fd is not None
        os.close(state.fd)
        state.fd = None
        assert h.store.cache.evict(0) > 0
        # A forgotten inode is asked for again (an NFS-style handle): downloaded again.
        assert await read_inode(h, before["d/g.bin"]) == bytes(range(256)) * 50
        assert h.client.downloads == 2
        assert {p: (await h.lookup(f"{root}/{p}")).st_ino for p in paths} == before

    run(tmp_path, client, test)


def test_unused_indexes_leave_memory(tmp_path: Path) -> None:
    """Indexes nobody used for tree_idle seconds go, held by the kernel or not; the least
    recently used go first while all together pass the budget."""
    client = FakeClient()
    ids = client.add("a1", "run", [tar_gz({f"f{i}.txt": b"%d" % i for i in range(n)})
                                   for n in (10, 20, 30)])

    async def test(h: Harness) -> None:
        for vid in ids:
            await h.lookup(f"artifacts/run/{vid}/f1.txt")
        states = [h.store.states[("a1", vid)] for vid in ids]
        for state in states:
            await state.wait_tree()
        for i, state in enumerate(states):
            state.last_used = 1000.0 + i
        assert all(s.kernel_refs > 0 for s in states)
        assert h.store.trim(1000.0 + h.store.tree_idle + 0.5) == 1  # the oldest only
        assert [s.index is None for s in states] == [True, False, False]
        assert h.store.memory() == {"versions_known": 3, "versions_in_memory": 2,
                                    "index_bytes": sum(s.index.nbytes for s in states[1:])}
        h.store.tree_budget = states[2].index.nbytes  # room for one
        assert h.store.trim(1000.0) == 1
        assert [s.index is None for s in states] == [True, True, False]
        # Used again: back, with the same entries.
        assert (await h.read(f"artifacts/run/{ids[0]}/f9.txt")) == b"9"

    run(tmp_path, client, test)


def test_status_shows_memory(tmp_path: Path) -> None:
    client = FakeClient()
    client.add("a1", "run", [SIMPLE])

    async def test(h: Harness) -> None:
        await h.read("artifacts/run/current/README.md")
        memory = json.loads(await h.read(".vm0fs/status.json"))["memory"]
        assert memory["versions_in_memory"] == memory["versions_known"] == 1
        assert memory["rss"] > 1 << 20 and memory["peak_rss"] >= memory["rss"]
        text = (await h.read(".vm0fs/status")).decode()
        assert "1 of 1 version(s) held in memory" in text

    run(tmp_path, client, test)


def test_a_listing_goes_on_after_the_index_is_dropped(tmp_path: Path) -> None:
    """readdir in several calls (a big folder), the index dropped between them."""
    client = FakeClient()
    (vid,) = client.add("a1", "run", [tar_gz({f"f{i:03}": b"x" for i in range(50)})])

    async def test(h: Harness) -> None:
        folder = await h.lookup(f"artifacts/run/{vid}")
        await h.lookup(f"artifacts/run/{vid}/f000")
        (state,) = h.store.states.values()
        await state.wait_tree()
        fh = await h.opendir(folder.st_ino)
        got: list[tuple[str, int]] = []
        original = pyfuse3.readdir_reply
        room, start = 0, 0

        def reply(token: Any, name: bytes, attrs: Any, next_id: int) -> bool:
            nonlocal room, start
            if room == 0:  # the kernel's buffer is full
                return False
            room -= 1
            got.append((os.fsdecode(name), attrs.st_ino))
            start = next_id
            return True

        pyfuse3.readdir_reply = reply  # type: ignore[assignment]
        try:
            while room == 0:
                room = 7
                h.store.drop(state)  # between the calls of one listing
                await h.ops.readdir(folder.st_ino if fh is None else fh, start, None)
        finally:
            pyfuse3.readdir_reply = original  # type: ignore[assignment]
            if fh is not None:
                await h.ops.releasedir(fh)
        assert [name for name, _ in got[:2]] == [".", ".."]
        got = got[2:]
        names = [name for name, _ in got]
        assert names == [f"f{i:03}" for i in range(50)]  # each once, in name order
        inodes = dict(got)
        for name, inode in inodes.items():
            assert (await h.lookup(f"artifacts/run/{vid}/{name}")).st_ino == inode

    run(tmp_path, client, test)


def test_a_damaged_index_file_is_rebuilt_with_the_same_numbers(tmp_path: Path) -> None:
    client = FakeClient()
    (vid,) = client.add("a1", "run", [NESTED])

    async def test(h: Harness) -> None:
        f = await h.lookup(f"artifacts/run/{vid}/d/e/f.txt")
        (state,) = h.store.states.values()
        await state.wait_tree()
        h.store.drop(state)
        (h.store.cache.versions / vid / "index.bin").write_bytes(b"garbage")
        assert (await h.ops.getattr(f.st_ino)).st_size == 10
        assert await read_inode(h, f.st_ino) == b"deep file\n"
        assert h.client.downloads == 2  # the entry was removed and fetched again
        assert (await h.lookup(f"artifacts/run/{vid}/d/e/f.txt")).st_ino == f.st_ino

    run(tmp_path, client, test)


def test_listed_attributes_are_those_getattr_gives(tmp_path: Path) -> None:
    """readdirplus builds attributes straight from the index: the same as getattr's."""
    client = FakeClient()
    (vid,) = client.add("a1", "run", [NESTED])
    fields = ("st_ino", "st_mode", "st_size", "st_blocks", "st_mtime_ns", "st_ctime_ns",
              "st_nlink", "st_uid", "st_gid", "st_blksize", "entry_timeout", "attr_timeout")

    async def test(h: Harness) -> None:
        pending = [f"artifacts/run/{vid}"]
        seen = 0
        while pending:
            path = pending.pop()
            for name, listed in (await h.listdir(path)).items():
                seen += 1
                got = await h.ops.getattr(listed.st_ino)
                assert [getattr(listed, f) for f in fields] == [getattr(got, f) for f in fields]
                if stat.S_ISDIR(listed.st_mode):
                    pending.append(f"{path}/{name}")
        assert seen == 6

    run(tmp_path, client, test)


# --- history/ and current~N ----------------------------------------------------------------------

T0 = 1_704_207_845.0  # 2024-01-02T15:04:05Z


def timed(client: FakeClient, aid: str, name: str, times: list[float],
          current: int = -1) -> list[str]:
    """An artifact whose versions were created at `times` (oldest first); `current` indexes
    `times`. Returns the ids, oldest first."""
    ids = [f"{i:02x}{aid}".ljust(64, "e")[:64] for i in range(len(times))]
    versions = [version(vid, aid, created=t) for vid, t in zip(ids, times, strict=True)]
    client.versions[aid] = versions[::-1]  # the API lists newest first
    current_version = versions[current] if versions else None
    client.artifacts.append(Artifact(aid, name, current_version and current_version.id, 0, 1,
                                     T0, T0 + 100, current_version))
    return ids


def test_history_names_are_times_without_colons_and_same_second_versions_get_an_id() -> None:
    a, b, c = (version(vid * 64, "x", created=t)
               for vid, t in (("a", T0), ("b", T0 + 0.4), ("c", T0 + 61)))
    assert time_name(T0) == "2024-01-02T15-04-05Z"
    assert list(history_names([c, a])) == ["2024-01-02T15-04-05Z", "2024-01-02T15-05-06Z"]
    names = history_names([c, b, a])  # a and b share a second: both get their id's start
    assert names == {"2024-01-02T15-04-05Z-aaaaaaaa": a, "2024-01-02T15-04-05Z-bbbbbbbb": b,
                     "2024-01-02T15-05-06Z": c}
    twin = version("a" * 8 + "f" * 56, "x", created=T0)  # the same first 8 hex: the whole id
    assert set(history_names([a, twin])) == {f"2024-01-02T15-04-05Z-{a.id}",
                                             f"2024-01-02T15-04-05Z-{twin.id}"}
    assert history_names([]) == {}


def test_history_lists_links_to_the_versions_without_a_download_or_request(
        tmp_path: Path) -> None:
    client = FakeClient()
    ids = timed(client, "a1", "run", [T0, T0 + 3600, T0 + 3600.5])
    client.archives.update({vid: SIMPLE for vid in ids})

    async def test(h: Harness) -> None:
        await h.listdir("artifacts/run")
        calls = h.client.list_calls
        history = await h.listdir("artifacts/run/history")
        assert list(history) == ["2024-01-02T15-04-05Z", f"2024-01-02T16-04-05Z-{ids[1][:8]}",
                                 f"2024-01-02T16-04-05Z-{ids[2][:8]}"]
        for (name, attrs), vid in zip(history.items(), ids, strict=True):
            assert stat.S_ISLNK(attrs.st_mode) and attrs.entry_timeout == TTL
            assert os.fsdecode(await h.ops.readlink(attrs.st_ino)) == f"../{vid}"
            folder = await h.resolve(f"artifacts/run/history/{name}")  # cd history/<time>
            assert folder.st_ino == (await h.lookup(f"artifacts/run/{vid}")).st_ino
            assert stat.S_ISDIR(folder.st_mode)
        assert (await h.lookup("artifacts/run/history")).st_ino == (
            await h.ops.getattr((await h.lookup("artifacts/run/history")).st_ino)).st_ino
        assert h.client.list_calls == calls and h.client.downloads == 0
        assert (await h.ops.lookup((await h.lookup("artifacts/run/history")).st_ino,
                                   b"2024-01-02T16-04-05Z")).st_ino == 0
        assert await h.read(f"artifacts/run/history/{list(history)[0]}/README.md") == b"# hi\n"

    run(tmp_path, client, test)


def test_current_counted_back(tmp_path: Path) -> None:
    client = FakeClient()
    ids = timed(client, "a1", "run", [T0, T0 + 10, T0 + 20, T0 + 30], current=2)
    timed(client, "a2", "empty", [])

    async def target(h: Harness, path: str) -> str:
        return os.fsdecode(await h.ops.readlink((await h.lookup(path)).st_ino))

    async def test(h: Harness) -> None:
        assert await target(h, "artifacts/run/current") == ids[2]
        assert await target(h, "artifacts/run/current~0") == ids[2]
        assert await target(h, "artifacts/run/current~1") == ids[1]
        assert await target(h, "artifacts/run/current~2") == ids[0]
        for missing in ("current~3", "current~99", "current~01", "current~", "current~-1"):
            with pytest.raises(FileNotFoundError):
                await h.lookup(f"artifacts/run/{missing}")
        with pytest.raises(FileNotFoundError):
            await h.lookup("artifacts/empty/current~0")
        listed = await h.listdir("artifacts/run")
        assert not any(name.startswith("current~") for name in listed)  # looked up only
        assert (await h.resolve("artifacts/run/current~1")).st_ino == (
            await h.lookup(f"artifacts/run/{ids[1]}")).st_ino
        assert h.client.downloads == 0

    run(tmp_path, client, test)


def test_a_moved_current_and_a_new_version_show_after_the_ttl(tmp_path: Path) -> None:
    client = FakeClient()
    ids = timed(client, "a1", "run", [T0, T0 + 10])

    async def target(h: Harness, path: str) -> str:
        return os.fsdecode(await h.ops.readlink((await h.lookup(path)).st_ino))

    async def test(h: Harness) -> None:
        history = await h.lookup("artifacts/run/history")
        before = await h.listdir("artifacts/run/history")
        assert len(before) == 2
        one_back = await h.lookup("artifacts/run/current~1")
        assert await target(h, "artifacts/run/current~1") == ids[0]
        # A new version, made current.
        new = version("f" * 64, "a1", created=T0 + 20)
        client.versions["a1"].insert(0, new)
        client.artifacts[0] = Artifact("a1", "run", new.id, 0, 1, T0, T0 + 200, new)
        mtime = history.st_mtime_ns
        assert (await h.ops.getattr(history.st_ino)).st_mtime_ns > mtime  # the kernel's copy goes
        after = await h.listdir("artifacts/run/history")
        assert set(after) == {*before, "2024-01-02T15-04-25Z"}
        assert all(after[name].st_ino == before[name].st_ino for name in before)  # same links
        assert await target(h, "artifacts/run/current") == new.id
        assert await target(h, "artifacts/run/current~1") == ids[1]
        assert await target(h, "artifacts/run/current~2") == ids[0]
        assert (await h.lookup("artifacts/run/current~1")).st_ino == one_back.st_ino
        if h.ops.stateless:
            assert history.st_ino in h.ops._stale_listings
        # current moves back to the oldest: nothing before it.
        client.artifacts[0] = Artifact("a1", "run", ids[0], 0, 1, T0, T0 + 300,
                                       client.versions["a1"][-1])
        assert await target(h, "artifacts/run/current~0") == ids[0]
        with pytest.raises(FileNotFoundError):
            await h.lookup("artifacts/run/current~1")
        assert h.client.downloads == 0

    run(tmp_path, client, test, ttl=0)


def test_counted_back_is_in_creation_order_whatever_the_listing_order() -> None:
    vs = [version(c * 64, "x", created=t) for c, t in (("c", 3.0), ("a", 1.0), ("b", 1.0))]
    assert counted_back(vs, "c" * 64, 1).id == "b" * 64  # same time: in the order of ids
    assert counted_back(vs, "c" * 64, 2).id == "a" * 64
    assert counted_back(vs, "c" * 64, 3) is None
    assert counted_back(vs, None, 0) is None
