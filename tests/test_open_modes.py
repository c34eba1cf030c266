"""Real mounts in the way of serving opens that the running pyfuse3 allows: stateless (patched
pyfuse3: no OPEN/OPENDIR requests, the kernel keeps pages and listings) or classic (stock).
`scripts/test` runs this file against both builds; `VM0FS_EXPECT_PYFUSE3` says which one the
run must have, so a run that silently got the other build fails."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import archives
import pyfuse3
import pytest
from archives import reg, tar_gz
from conftest import DevServer
from mounting import MountFactory
from test_robustness import blob_of, drop_page_cache, one_mib_archive, poll, write_artifact

from vm0fs.fs import stateless_supported

pytest_plugins = ["mounting"]
pytestmark = [pytest.mark.timeout(180), pytest.mark.fallback]

EXPECTED_BUILD = os.environ.get("VM0FS_EXPECT_PYFUSE3")


def expected_mode() -> str:
    return "stateless" if stateless_supported() else "classic"


def test_the_pyfuse3_build_is_the_expected_one() -> None:
    patched = getattr(pyfuse3, "NO_OPEN_SUPPORT", False)
    if EXPECTED_BUILD is None:
        pytest.skip("VM0FS_EXPECT_PYFUSE3 is not set (scripts/test sets it)")
    assert patched == (EXPECTED_BUILD == "patched"), pyfuse3.__file__


def test_status_and_log_say_the_mode(dev_server: type[DevServer], mount_vm0fs: MountFactory,
                                     tmp_path: Path) -> None:
    write_artifact(tmp_path / "data", "run", [tar_gz([reg("a.txt", "a\n")])])
    m = mount_vm0fs(dev_server(tmp_path / "data"), "--debug")
    status = json.loads(m.run((m.path / ".vm0fs" / "status.json").read_bytes))
    assert status["open_mode"].startswith(expected_mode())
    assert f"opens:          {expected_mode()}" in m.run((m.path / ".vm0fs" / "status").read_text)
    assert f"serving opens in {expected_mode()}" in m.log()


def test_control_files_are_fresh_at_every_read(dev_server: type[DevServer],
                                              mount_vm0fs: MountFactory, tmp_path: Path) -> None:
    """The kernel keeps file pages across opens in the stateless mode: a control file must
    still show what is true now, read by read (through one open file as through new opens)."""
    write_artifact(tmp_path / "data", "run", [tar_gz([reg("a.txt", "a\n")])])
    m = mount_vm0fs(dev_server(tmp_path / "data"))
    status = m.path / ".vm0fs" / "status.json"
    assert json.loads(m.run(status.read_bytes))["downloads_total"] == 0
    held = m.run(open, status, "rb")
    try:
        assert m.run((m.artifacts / "run" / "current" / "a.txt").read_text) == "a\n"
        assert json.loads(m.run(status.read_bytes))["downloads_total"] == 1
        assert os.stat(status).st_size == len(m.run(status.read_bytes))
        # Classic opens read a snapshot taken at open; the stateless mode has no opens.
        through_held = json.loads(m.run(os.pread, held.fileno(), 1 << 20, 0))
        assert through_held["downloads_total"] == (1 if expected_mode() == "stateless" else 0)
    finally:
        held.close()


def test_eviction_spares_what_was_read_recently_and_reads_bring_data_back(
        dev_server: type[DevServer], mount_vm0fs: MountFactory, tmp_path: Path) -> None:
    """Cap of about two versions. With no grace, reading a third evicts the first; a reader
    that holds the first open (or opens it again) still reads the right bytes: the read
    fetches it again. With a grace, a version read moments ago is never evicted."""
    data = {tag: one_mib_archive(tag) for tag in ("a", "b", "c")}
    ids = {tag: write_artifact(tmp_path / "data", tag, [archive])[0]
           for tag, archive in data.items()}
    srv = dev_server(tmp_path / "data")

    def path(m: object, tag: str) -> Path:
        return m.artifacts / tag / ids[tag] / "blob.bin"  # type: ignore[attr-defined]

    m = mount_vm0fs(srv, "--cache-size", "2.5M", "--cache-grace", "0")
    held = m.run(open, path(m, "a"), "rb", buffering=0)
    try:
        assert m.run(held.read, 4096) == blob_of(data["a"])[:4096]
        for tag in ("b", "c"):
            assert m.run(path(m, tag).read_bytes) == blob_of(data[tag])
            m.run(os.listdir, path(m, tag).parent)  # whole and published: eviction has run
        poll(lambda: ids["a"] not in os.listdir(m.cache_dir / "versions"), 20,
             "a evicted", interval=0.05)
        # Read what the kernel has not cached yet: the read brings the version back.
        drop_page_cache()
        assert m.run(os.pread, held.fileno(), 1 << 21, 0) == blob_of(data["a"])
    finally:
        held.close()
    assert m.run(path(m, "a").read_bytes) == blob_of(data["a"])
    m.unmount()

    srv.reset()
    graced = mount_vm0fs(srv, "--cache-size", "2.5M", "--cache-grace", "3600")
    for tag in ("a", "b", "c"):
        assert graced.run(path(graced, tag).read_bytes) == blob_of(data[tag])
        graced.run(os.listdir, path(graced, tag).parent)
    time.sleep(1)  # eviction runs right after a publish: give a wrong one time to happen
    cached = set(os.listdir(graced.cache_dir / "versions"))
    assert set(ids.values()) <= cached, "a version read moments ago was evicted"


def test_readers_of_a_version_that_is_still_downloading(dev_server: type[DevServer],
                                                        mount_vm0fs: MountFactory,
                                                        tmp_path: Path) -> None:
    """Slow download: the first file reads before the archive has ended; a listing waits for
    the whole tree; many concurrent readers get the right bytes from one download."""
    files = {f"f{i:02}.bin": archives.large_bytes(i, 96_000) for i in range(12)}
    archive = tar_gz([reg(name, body) for name, body in files.items()])
    [vid] = write_artifact(tmp_path / "data", "slow", [archive])
    srv = dev_server(tmp_path / "data", "--bandwidth", "400000")
    m = mount_vm0fs(srv)
    root = m.artifacts / "slow" / vid
    assert m.run((root / "f00.bin").read_bytes) == files["f00.bin"]
    results: dict[str, bytes] = {}

    def read(name: str) -> None:
        results[name] = (root / name).read_bytes()

    threads = [threading.Thread(target=read, args=(name,)) for name in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == files
    assert sorted(m.run(os.listdir, root)) == sorted(files)
    assert srv.stats()["requests"]["download"] == 1


def test_ls_a_shows_dot_entries_and_control_files_have_a_real_mtime(
        dev_server: type[DevServer], mount_vm0fs: MountFactory, tmp_path: Path) -> None:
    write_artifact(tmp_path / "data", "run", [tar_gz([reg("d/a.txt", "a\n")])])
    m = mount_vm0fs(dev_server(tmp_path / "data"))
    for folder in (m.path, m.artifacts, m.artifacts / "run" / "current" / "d"):
        listed = m.run(subprocess.run, ["ls", "-a", str(folder)], capture_output=True,
                       text=True, check=True).stdout.split()
        assert listed[:2] == [".", ".."], (folder, listed)
    assert m.run(os.stat, m.path / ".vm0fs" / "status").st_mtime > time.time() - 3600
