"""Daily use over a real mount: status, info, prefetch, mount options, df and du, progress logs."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from conftest import DevServer
from mounting import MountFactory, run_cli

pytest_plugins = ["mounting"]
pytestmark = [pytest.mark.timeout(120), pytest.mark.fallback]


def current_id(mnt: Path, name: str) -> str:
    return os.path.basename(os.readlink(mnt / "artifacts" / name / "current"))


def test_status_and_info_commands(dev_server: DevServer, mount_vm0fs: MountFactory,
                                  tmp_path: Path) -> None:
    srv = dev_server(tmp_path / "data", "--demo")
    m = mount_vm0fs(srv)
    m.run(os.listdir, m.path / "artifacts" / "training-run" / "current")
    status = run_cli("status", str(m.path))
    assert status.returncode == 0, status.stderr
    assert srv.url in status.stdout and "1 version(s) cached" in status.stdout
    assert "resident (peak" in status.stdout and "held in memory" in status.stdout
    data = json.loads(run_cli("status", "--json", str(m.path / "artifacts")).stdout)
    assert data["cache"]["versions"] == 1 and data["downloads"] == []
    assert not (set(os.listdir(m.path)) - {"artifacts", ".vm0fs"})

    vid = current_id(m.path, "training-run")
    inside = m.path / "artifacts" / "training-run" / "current" / "README.md"
    info = json.loads(run_cli("info", "--json", str(inside)).stdout)
    assert info["artifact"]["name"] == "training-run"
    assert info["version"]["id"] == vid and info["path"] == "README.md"
    assert info["version"]["message"] == "Epoch 3 complete, final metrics"
    text = run_cli("info", str(m.path / "artifacts" / "training-run")).stdout
    assert "versions:" in text and vid[:12] in text
    assert re.search(r"KiB in +\d+ files", text)
    assert re.search(r"size of files: +[\d.]+ KiB", run_cli("info", str(inside)).stdout)
    assert "KiB on disk" in status.stdout
    before = srv.stats()["requests"]
    run_cli("info", str(inside))
    assert srv.stats()["requests"] == before  # answered from the cached listing


def test_prefetch_by_name_then_mount_downloads_nothing(dev_server: DevServer,
                                                       mount_vm0fs: MountFactory,
                                                       tmp_path: Path) -> None:
    srv = dev_server(tmp_path / "data", "--demo")
    cache = tmp_path / "cache"
    result = run_cli("prefetch", "training-run", "eval-results/current", "no-such-artifact",
                     "--api-url", srv.url, "--cache-dir", str(cache), token=srv.token)
    assert result.returncode == 1  # one target failed, the others were fetched
    assert "no-such-artifact" in result.stderr and "Traceback" not in result.stderr
    fetched = [line for line in result.stdout.splitlines() if "fetched" in line]
    assert len(fetched) == 2, result.stdout
    for line in fetched:  # each size says which one it is, in one unit style
        assert re.search(r"\(download [\d.]+ (B|KiB), files [\d.]+ (B|KiB), "
                         r"on disk [\d.]+ KiB\)$", line), line
    info = json.loads(run_cli("cache", "info", "--json", "--cache-dir", str(cache)).stdout)
    assert info["versions"] == 2
    # The listings prefetch read are kept as a mount keeps them: the versions have names.
    assert sorted(e["artifact"] for e in info["entries"]) == ["eval-results", "training-run"]
    text = run_cli("cache", "info", "--cache-dir", str(cache)).stdout
    assert "artifact unknown" not in text and "on disk:" in text
    srv.reset()
    m = mount_vm0fs(srv, cache_dir=cache)
    for name in ("training-run", "eval-results"):
        m.run(os.listdir, m.path / "artifacts" / name / "current")
    assert srv.stats()["requests"]["download"] == 0


def test_prefetch_by_name_is_enough_to_mount_offline(dev_server: DevServer,
                                                     mount_vm0fs: MountFactory,
                                                     tmp_path: Path) -> None:
    """Prefetch keeps the listings it read, as a mount does: with the API gone, a mount of that
    cache shows the artifacts and reads the versions fetched."""
    srv = dev_server(tmp_path / "data", "--demo")
    cache = tmp_path / "cache"
    result = run_cli("prefetch", "training-run", "--api-url", srv.url, "--cache-dir",
                     str(cache), token=srv.token)
    assert result.returncode == 0, result.stderr
    srv.stop()  # the same URL, nothing listening any more
    m = mount_vm0fs(srv, cache_dir=cache)
    assert "training-run" in m.run(os.listdir, m.artifacts)
    readme = m.artifacts / "training-run" / "current" / "README.md"
    assert m.run(readme.read_text).startswith("#")


def test_prefetch_through_a_mount(dev_server: DevServer, mount_vm0fs: MountFactory,
                                  tmp_path: Path) -> None:
    srv = dev_server(tmp_path / "data", "--demo")
    m = mount_vm0fs(srv)
    target = m.path / "artifacts" / "website-build" / "current"
    result = run_cli("prefetch", str(target))
    assert result.returncode == 0, result.stderr
    assert srv.stats()["requests"]["download"] == 1
    status = json.loads((m.path / ".vm0fs" / "status.json").read_text())
    assert status["cache"]["versions"] == 1


def test_mount_options_df_du_and_progress_log(dev_server: DevServer, mount_vm0fs: MountFactory,
                                              tmp_path: Path) -> None:
    srv = dev_server(tmp_path / "data", "--demo")
    m = mount_vm0fs(srv, "-o", "dirsync", "--debug")
    with open("/proc/self/mounts") as f:
        line = next(line for line in f if line.split()[1] == str(m.path))
    source, _, fstype, options = line.split()[:4]
    host = srv.url.split("://")[1]
    assert source == f"vm0fs:{host}" and fstype == "fuse.vm0fs"
    assert "dirsync" in options.split(",")  # passed through with -o
    readme = m.path / "artifacts" / "training-run" / "current" / "README.md"
    size = m.run(os.path.getsize, readme)
    st = m.run(os.stat, readme)
    assert st.st_blocks * 512 >= size
    m.run(os.listdir, readme.parent)  # the whole version is in, and in the cache
    vfs = m.run(os.statvfs, m.path)
    assert vfs.f_namemax == 255 and vfs.f_blocks > 0  # the cache's use
    log = m.log()
    assert "downloading version" in log and "members" in log  # what a waiting `ls` waits for
    assert " MB" not in log and "kB" not in log  # sizes in one style, named: files, download
    assert re.search(r"\(files [\d.]+ KiB\)", log) and re.search(r"download [\d.]+ KiB", log)
    assert "DEBUG" in log and srv.token not in log
