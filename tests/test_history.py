"""`history/` and `current~N` through real mounts, in the way of serving opens that the running
pyfuse3 allows (`scripts/test` runs this file against both builds): `ls`, `ls -l`, `cd`, `stat`
and `readlink`, with no download and no request beyond the artifact's versions listing; a new
version in `history/` after the TTL; `vm0fs info` and `vm0fs prefetch` of `current~N`."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from archives import reg, tar_gz
from conftest import DevServer
from mounting import Mount, MountFactory, run_cli
from test_robustness import EPOCH, iso, poll, vid

pytest_plugins = ["mounting"]
pytestmark = [pytest.mark.timeout(180), pytest.mark.fallback]

HOUR = 3600.0


def write_versions(data_dir: Path, folder: str, times: list[float]) -> list[str]:
    """One artifact with a version created at each of `times` (seconds; the newest is
    current). Returns the ids in the order of `times`."""
    path = data_dir / folder
    path.mkdir(parents=True, exist_ok=True)
    side: dict[str, object] = {"created_at": iso(min(times, default=EPOCH)), "versions": {}}
    ids = []
    for i, t in enumerate(times):
        data = tar_gz([reg("which.txt", f"version {i}\n")])
        tmp = path / f".v{i:03d}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, path / f"v{i:03d}.tar.gz")
        side["versions"][f"v{i:03d}.tar.gz"] = {"created_at": iso(t)}  # type: ignore[index]
        ids.append(vid(data))
    tmp = path / ".artifact.json.tmp"
    tmp.write_text(json.dumps(side))
    os.replace(tmp, path / "artifact.json")
    return ids


def stamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H-%M-%SZ")


def sh(m: Mount, command: str, cwd: Path | None = None) -> str:
    done = m.run(subprocess.run, ["sh", "-c", command], cwd=cwd, capture_output=True,
                 text=True)
    assert done.returncode == 0, f"{command}: {done.stderr}"
    return done.stdout


def test_history_and_current_counted_back(dev_server: type[DevServer],
                                          mount_vm0fs: MountFactory, tmp_path: Path) -> None:
    # Two versions in the same second: both names carry the start of their id.
    times = [EPOCH, EPOCH + HOUR, EPOCH + HOUR, EPOCH + 2 * HOUR]
    ids = write_versions(tmp_path / "data", "run", times)
    write_versions(tmp_path / "data", "empty", [])
    srv = dev_server(tmp_path / "data")
    m = mount_vm0fs(srv, "--metadata-ttl", "600")
    run = m.artifacts / "run"
    assert "history" in m.run(os.listdir, run)
    assert m.run(os.listdir, m.artifacts / "empty") == ["history"]
    assert m.run(os.listdir, m.artifacts / "empty" / "history") == []
    srv.reset()

    same = sorted(ids[1:3])  # same time: creation order goes by id
    expected = {stamp(EPOCH): ids[0], f"{stamp(EPOCH + HOUR)}-{same[0][:8]}": same[0],
                f"{stamp(EPOCH + HOUR)}-{same[1][:8]}": same[1], stamp(EPOCH + 2 * HOUR): ids[3]}
    assert sh(m, "ls history", cwd=run).split() == sorted(expected)
    long = sh(m, "ls -l history", cwd=run)
    for name, version in expected.items():
        assert f"{name} -> ../{version}" in long, long
        link = run / "history" / name
        assert m.run(os.readlink, link) == f"../{version}"
        assert sh(m, f"stat -c %F history/{name}", cwd=run).strip() == "symbolic link"
        assert sh(m, f"stat -L -c %F history/{name}", cwd=run).strip() == "directory"
        assert sh(m, f"cd history/{name} && pwd -P", cwd=run).strip() == str(run / version)
    assert sh(m, "stat -c %F history", cwd=run).strip() == "directory"

    # current~N: the Nth version before current, in creation order; looked up, not listed.
    back = [ids[3], same[1], same[0], ids[0]]
    for n, version in enumerate(back):
        assert m.run(os.readlink, run / f"current~{n}") == version
        assert sh(m, f"cd current~{n} && pwd -P", cwd=run).strip() == str(run / version)
    assert f"current~1 -> {back[1]}" in sh(m, "ls -l current~1", cwd=run)
    assert sh(m, "stat -L -c %F current~2", cwd=run).strip() == "directory"
    for missing in ("current~4", "current~40"):
        assert not m.run(os.path.lexists, run / missing)
    assert not m.run(os.path.lexists, m.artifacts / "empty" / "current~0")
    assert not any("~" in name for name in m.run(os.listdir, run))

    counts = srv.stats()["requests"]
    assert counts["download"] == 0 and counts["list_versions"] == 0, counts  # within the TTL
    assert m.run((run / "history" / stamp(EPOCH) / "which.txt").read_text) == "version 0\n"
    assert m.run((run / "current~1" / "which.txt").read_text) == (
        f"version {ids.index(back[1])}\n")

    # vm0fs info and prefetch take them too, through the mount and by name.
    info = json.loads(run_cli("info", "--json", str(run / "history" / stamp(EPOCH))).stdout)
    assert info["version"]["id"] == ids[0]
    info = json.loads(run_cli("info", "--json", str(run / "current~2" / "which.txt")).stdout)
    assert info["version"]["id"] == back[2] and info["path"] == "which.txt"
    fetched = run_cli("prefetch", str(run / "current~3"))
    assert fetched.returncode == 0 and f"run/{ids[0][:12]}: " in fetched.stdout, fetched.stderr
    by_name = run_cli("prefetch", "run/current~2", "run/current~9", "--api-url", srv.url,
                      "--cache-dir", str(tmp_path / "other-cache"), token=srv.token)
    assert by_name.returncode == 1
    assert f"run/{back[2][:12]}: fetched" in by_name.stdout, by_name.stdout + by_name.stderr
    assert "current~9" in by_name.stderr and "Traceback" not in by_name.stderr


def test_a_new_version_shows_in_history_after_the_ttl(dev_server: type[DevServer],
                                                      mount_vm0fs: MountFactory,
                                                      tmp_path: Path) -> None:
    times = [EPOCH, EPOCH + HOUR]
    ids = write_versions(tmp_path / "data", "run", times)
    srv = dev_server(tmp_path / "data")
    ttl = 1.0
    m = mount_vm0fs(srv, "--metadata-ttl", str(ttl))
    history = m.artifacts / "run" / "history"
    assert sorted(m.run(os.listdir, history)) == [stamp(t) for t in times]
    assert m.run(os.readlink, m.artifacts / "run" / "current~1") == ids[0]

    new = write_versions(tmp_path / "data", "run", [*times, EPOCH + 2 * HOUR])[-1]
    poll(lambda: stamp(EPOCH + 2 * HOUR) in m.run(os.listdir, history), ttl + 15,
         "the new version in history/")
    assert m.run(os.readlink, history / stamp(EPOCH + 2 * HOUR)) == f"../{new}"
    poll(lambda: m.run(os.readlink, m.artifacts / "run" / "current") == new, ttl + 15,
         "current moved to the new version")
    assert m.run(os.readlink, m.artifacts / "run" / "current~1") == ids[1]
    assert srv.stats()["requests"]["download"] == 0
