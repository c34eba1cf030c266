"""Putting the next small files of a folder into the kernel's page cache ahead of a reader
(pagefill.py): driven through the filesystem operations with the real cache and store, the
kernel's NOTIFY_STORE replaced by a recorder. Every byte pushed is compared with the file."""

from __future__ import annotations

import errno
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.test_fs import FakeClient, Harness, artifact, run, tar_gz, version
from vm0fs import pagefill
from vm0fs.integrity import BLOCK, BlockSums, Damaged, digest
from vm0fs.pagefill import _Run, push_files

FILES = 40
ROOT = "artifacts/run/current"


def body(i: int) -> bytes:
    # Sizes that straddle blocks and windows; distinct bytes in every file.
    return (f"file {i:03d} ".encode() * (700 + 977 * i))[: 5_000 + 9_973 * i]


def small(numbers: range | list[int]) -> list[int]:
    return [i for i in numbers if len(body(i)) <= pagefill.FILL_FILE_MAX]


def logs_client(extra: dict[str, bytes | str] | None = None) -> FakeClient:
    client = FakeClient()
    files: dict[str, bytes | str] = {f"logs/f{i:03d}.log": body(i) for i in range(FILES)}
    files.update(extra or {})
    client.archives["v1"] = tar_gz(files)
    client.versions["a1"] = [version("v1", "a1", len(files))]
    client.artifacts = [artifact("a1", "run", client.versions["a1"])]
    return client


class Recorder:
    def __init__(self) -> None:
        self.pushed: dict[int, bytes] = {}
        self.order: list[int] = []
        self.unknown: set[int] = set()  # inodes the "kernel" does not know

        self.rests: dict[int, tuple[int, bytes]] = {}  # the rest of a file its read began

    def __call__(self, inode: int, offset: int, data: Any) -> None:
        if inode in self.unknown:
            raise OSError(errno.ENOENT, "no such inode")
        if offset:
            self.rests[inode] = (offset, bytes(data))
            return
        self.pushed[inode] = bytes(data)
        self.order.append(inode)


async def inodes(h: Harness) -> dict[int, int]:
    """inode -> file number, after listing the folder (as the kernel would have)."""
    listed = await h.listdir(f"{ROOT}/logs")
    return {attrs.st_ino: int(name[1:4]) for name, attrs in listed.items()}


async def settle(h: Harness) -> None:
    for _ in range(200):  # the fill runs in a worker thread
        await trio.sleep(0.01)
        if not h.ops.fill._jobs:
            await trio.sleep(0.05)
            return


def with_fill(tmp_path: Path, client: FakeClient, test: Any) -> Recorder:
    recorder = Recorder()

    async def body_(h: Harness) -> None:
        h.ops.fill._push = recorder
        async with trio.open_nursery() as nursery:
            nursery.start_soon(h.ops.fill.run)
            await test(h, recorder)
            nursery.cancel_scope.cancel()

    run(tmp_path, client, body_)
    return recorder


def test_reading_in_order_pushes_the_next_files_with_their_exact_bytes(tmp_path: Path) -> None:
    async def test(h: Harness, rec: Recorder) -> None:
        numbers = await inodes(h)
        assert await h.read(f"{ROOT}/logs/f000.log") == body(0)
        await settle(h)
        assert rec.pushed == {}  # one read is no order yet
        assert await h.read(f"{ROOT}/logs/f001.log") == body(1)
        await settle(h)
        got = sorted(numbers[i] for i in rec.pushed)
        assert got == small(range(3, FILES))  # f002 is the reader's next read: left to it
        assert len(got) > 20
        for inode, data in rec.pushed.items():
            assert data == body(numbers[inode])
        # Two threads, each a run in the reader's order.
        assert sorted(numbers[i] for i in rec.order) == got
        assert h.ops.fill.files == len(got)
        assert h.ops.fill.bytes == sum(len(body(i)) for i in got)

    with_fill(tmp_path, logs_client(), test)


def test_reading_backward_pushes_the_files_before(tmp_path: Path) -> None:
    async def test(h: Harness, rec: Recorder) -> None:  # rg takes a folder's files off a stack
        numbers = await inodes(h)
        await h.read(f"{ROOT}/logs/f025.log")
        await h.read(f"{ROOT}/logs/f024.log")
        await settle(h)
        assert sorted(numbers[i] for i in rec.order) == list(range(23))
        for inode, data in rec.pushed.items():
            assert data == body(numbers[inode])

    with_fill(tmp_path, logs_client(), test)


def test_reads_out_of_order_push_nothing(tmp_path: Path) -> None:
    async def test(h: Harness, rec: Recorder) -> None:
        await inodes(h)
        for i in (3, 20, 10, 25):
            assert await h.read(f"{ROOT}/logs/f{i:03d}.log") == body(i)
        await settle(h)
        assert rec.pushed == {}

    with_fill(tmp_path, logs_client(), test)


def test_big_files_links_and_unknown_inodes_are_skipped(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pagefill, "FILL_FILE_MAX", 200_000)
    extra: dict[str, bytes | str] = {"logs/f010a.bin": b"x" * 300_000, "logs/f010b": "f000.log"}

    async def test(h: Harness, rec: Recorder) -> None:
        listed = await h.listdir(f"{ROOT}/logs")
        numbers = {a.st_ino: int(n[1:4]) for n, a in listed.items() if n.endswith(".log")}
        rec.unknown.add(listed["f020.log"].st_ino)
        await h.read(f"{ROOT}/logs/f000.log")
        await h.read(f"{ROOT}/logs/f001.log")
        await settle(h)
        assert listed["f010a.bin"].st_ino not in rec.pushed
        assert listed["f010b"].st_ino not in rec.pushed
        assert sorted(numbers[i] for i in rec.pushed) == [
            i for i in small(range(3, FILES)) if i != 20 and len(body(i)) <= 200_000]
        for inode, data in rec.pushed.items():
            assert data == body(numbers[inode])

    with_fill(tmp_path, logs_client(extra), test)


def test_a_damaged_cache_file_is_never_pushed(tmp_path: Path) -> None:
    async def test(h: Harness, rec: Recorder) -> None:
        numbers = await inodes(h)
        await h.read(f"{ROOT}/logs/f000.log")
        data = next((tmp_path / "cache").rglob("data.tar"))
        raw = bytearray(data.read_bytes())
        at = raw.find(body(25)[:50])
        raw[at + 10] ^= 0xFF  # a byte of f025
        data.write_bytes(raw)
        await h.read(f"{ROOT}/logs/f001.log")
        await settle(h)
        assert rec.pushed  # the files before the damaged block went
        for inode, data_ in rec.pushed.items():
            assert data_ == body(numbers[inode])  # and nothing else: never a wrong byte
        assert all(numbers[i] < 25 for i in rec.pushed)

    with_fill(tmp_path, logs_client(), test)


def test_push_files_checks_every_block_and_follows_the_reader(tmp_path: Path) -> None:
    content = bytes(range(256)) * (5 * BLOCK // 256)
    path = tmp_path / "tar"
    path.write_bytes(content)
    sums = BlockSums([digest(content[b:b + BLOCK]) for b in range(0, len(content), BLOCK)],
                     len(content))
    files = [(p, 100 + p, p * 30_000, 25_000) for p in range(10)]
    got: dict[int, bytes] = {}
    with path.open("rb") as f:
        run_ = _Run(last=3, low=3, high=10)  # the reader is at position 3 already
        pushed, nbytes = push_files(f.fileno(), sums, files, lambda i, o, d: got.update(
            {i: bytes(d)}), run_)
        assert pushed == 5 and nbytes == 5 * 25_000  # positions 5..9
        for p in range(5, 10):
            assert got[100 + p] == content[p * 30_000:p * 30_000 + 25_000]
        backward = list(reversed(files))
        got.clear()
        push_files(f.fileno(), sums, backward, lambda i, o, d: got.update({i: bytes(d)}),
                   _Run(last=10, low=0, high=10), step=-1)
        assert sorted(got) == [100 + p for p in range(9)]
        for p in range(9):
            assert got[100 + p] == content[p * 30_000:p * 30_000 + 25_000]
        # A file past the checked data, a short file, a changed byte: Damaged, nothing pushed.
        with pytest.raises(Damaged):
            push_files(f.fileno(), BlockSums(sums.sums[:2], 2 * BLOCK), files[5:],
                       lambda *a: pytest.fail("pushed"), _Run(-5, 0, 0))
    path.write_bytes(content[:3 * BLOCK])
    with path.open("rb") as f, pytest.raises(Damaged):
        push_files(f.fileno(), sums, files[7:], lambda *a: pytest.fail("pushed"), _Run(-5, 0, 0))
    path.write_bytes(content[:100] + b"!" + content[101:])
    with path.open("rb") as f, pytest.raises(Damaged):
        push_files(f.fileno(), sums, files[:1], lambda *a: pytest.fail("pushed"), _Run(-5, 0, 0))


def test_a_kernel_without_notify_store_turns_it_off(tmp_path: Path) -> None:
    def refuse(inode: int, offset: int, data: Any) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    async def test(h: Harness, rec: Recorder) -> None:
        h.ops.fill._push = refuse
        await inodes(h)
        for i in range(4):
            assert await h.read(f"{ROOT}/logs/f{i:03d}.log") == body(i)
        await settle(h)
        assert not h.ops.fill.enabled
        for i in range(4, 8):  # reads go on as before
            assert await h.read(f"{ROOT}/logs/f{i:03d}.log") == body(i)

    with_fill(tmp_path, logs_client(), test)


def test_a_job_is_pushed_in_two_runs_of_about_the_same_bytes() -> None:
    files = [(p, 100 + p, p * 1000, 1000 + 10 * p) for p in range(9)]
    first, second = pagefill.halves(files, sum(f[3] for f in files))
    assert first + second == files  # each in the reader's order
    assert abs(sum(f[3] for f in first) - sum(f[3] for f in second)) < 2 * files[-1][3]
    assert pagefill.halves(files[:1], 1000) == [files[:1]]


def test_a_first_read_shorter_than_a_small_file_pushes_the_rest_before_it_is_answered(
        tmp_path: Path) -> None:
    """rg reads 3 bytes first, and the kernel asks 16 KiB: the rest of the file is pushed
    before that READ is answered, so that the next read does not ask again. Only from a page
    boundary, and only for small files."""
    async def test(h: Harness, rec: Recorder) -> None:
        numbers = await inodes(h)
        by_number = {n: inode for inode, n in numbers.items()}
        chunk = 16 << 10
        for n in (1, 2, 5):  # 15 KB (whole in one read), 25 KB, 55 KB
            data = await h.ops.read(by_number[n], 0, chunk)
            assert bytes(data) == body(n)[:chunk]
        assert set(rec.rests) == {by_number[2], by_number[5]}
        for n in (2, 5):
            assert rec.rests[by_number[n]] == (chunk, body(n)[chunk:])
        assert h.ops.fill.rests == 2
        # Not from inside a page, nor for a file past REST_FILE_MAX (125 KB).
        assert len(body(12)) > pagefill.REST_FILE_MAX
        await h.ops.read(by_number[4], 0, 1000)
        await h.ops.read(by_number[12], 0, chunk)
        assert set(rec.rests) == {by_number[2], by_number[5]}

    with_fill(tmp_path, logs_client(), test)


def test_a_first_read_waits_for_the_rest_of_its_file_a_little_never_for_good(
        tmp_path: Path) -> None:
    """The push of a rest blocks while a page of it is locked by a READ in flight, and that
    READ may wait for a free request task: the first read is answered after REST_WAIT anyway,
    and the push ends later, its bytes whole."""
    release = threading.Event()

    async def test(h: Harness, rec: Recorder) -> None:
        numbers = await inodes(h)
        by_number = {n: inode for inode, n in numbers.items()}
        inner = h.ops.fill._push

        def blocked(inode: int, offset: int, data: Any) -> None:
            assert release.wait(30)  # the kernel, waiting for a page lock
            inner(inode, offset, data)

        h.ops.fill._push = blocked
        chunk = 16 << 10
        data = await h.ops.read(by_number[5], 0, chunk)
        assert bytes(data) == body(5)[:chunk]
        assert rec.rests == {} and h.ops.fill.rests == 0  # answered while the push waits
        release.set()
        for _ in range(300):
            await trio.sleep(0.01)
            if h.ops.fill.rests:
                break
        assert rec.rests == {by_number[5]: (chunk, body(5)[chunk:])}
        assert h.ops.fill.rests == 1

    try:
        with_fill(tmp_path, logs_client(), test)
    finally:
        release.set()


def test_an_unexpected_failure_of_a_rest_push_turns_pushing_off_not_the_mount(
        tmp_path: Path) -> None:
    async def test(h: Harness, rec: Recorder) -> None:
        numbers = await inodes(h)
        by_number = {n: inode for inode, n in numbers.items()}

        def broken(inode: int, offset: int, data: Any) -> None:
            raise RuntimeError("a bug")

        h.ops.fill._push = broken
        data = await h.ops.read(by_number[5], 0, 16 << 10)
        assert bytes(data) == body(5)[: 16 << 10]  # the read is answered all the same
        for _ in range(300):
            await trio.sleep(0.01)
            if not h.ops.fill.enabled:
                break
        assert not h.ops.fill.enabled and h.ops.fill.rests == 0
        assert await h.read(f"{ROOT}/logs/f002.log") == body(2)  # the mount goes on

    with_fill(tmp_path, logs_client(), test)
