"""Browsing `artifacts/` and an artifact's folder in a file manager must never download an
archive. (Counting the items of each version folder, as Nautilus does, lists them: that is
tests/test_file_manager_apps.py, with the real programs.)

A file manager that opens `artifacts/` or an artifact's folder stats every entry (following
`current`), checks access, reads the link target, asks for extended attributes, looks for
`.hidden`, `.directory`, `autorun.inf`, `desktop.ini`, `.DS_Store`, `Thumbs.db` and the trash
folders (`.Trash`, `.Trash-UID`), and calls statfs. It reads file headers (content types,
thumbnails) only inside the folder it opens, so listing a folder of versions must stay on the
list endpoints. These tests do what GIO does, twice:

- with `gio list -a '*'` itself (skipped when `gio`, Debian's libglib2.0-bin, is missing);
- in pure Python (os.scandir, os.stat/lstat, os.access, os.readlink, the probes, os.statvfs,
  os.listxattr/os.getxattr), so the check also runs where only scripts/setup's packages are.

and then read the dev-server's /_dev/stats: no `download` and no `blob` request, the probes
answered ENOENT, and probing again within the metadata TTL asks the API nothing more. With
`--xattrs`, the `user.vm0.*` attributes of artifact and version folders come from the
listings, again without a download. Every call into a mount is bounded (`Mount.run`).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import DevServer
from mounting import Mount, MountFactory

pytest_plugins = ["mounting"]
pytestmark = pytest.mark.timeout(120)

ARTIFACT = "training-run"  # of the demo set: three versions and `current`
DEMO_ARTIFACTS = {"eval-results", "scratchpad", "training-run", "website-build"}
TTL = "600"  # --metadata-ttl: far longer than a test, so the second round is within it
CALL_TIMEOUT = 30.0  # one round of probes, or one gio run
XATTR_PREFIX = "user.vm0."

# What file managers look up in every folder they open (GIO: .hidden; KDE: .directory;
# autorun checks: autorun.inf; Windows and macOS leftovers; trash folders).
PROBES = (".hidden", ".directory", "autorun.inf", ".Trash", f".Trash-{os.getuid()}",
          "desktop.ini", ".DS_Store", "Thumbs.db")
# Attribute names that GIO, ls, Nautilus and SELinux-aware tools ask for.
XATTR_NAMES = ("user.xdg.origin.url", "user.mime_type", "user.xdg.comment",
               "security.selinux", "security.capability", "trusted.md5sum",
               "system.posix_acl_access", "system.posix_acl_default")
NOT_SUPPORTED = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
NO_ATTR = {errno.ENODATA}

GIO = shutil.which("gio")
needs_gio = pytest.mark.skipif(
    GIO is None, reason="gio is not installed (Debian: libglib2.0-bin); "
    "test_python_probes_download_nothing makes the same calls")


# --- fixtures -------------------------------------------------------------------------------


@dataclass
class Demo:
    server: DevServer
    mount: Mount

    @property
    def artifacts(self) -> Path:
        return self.mount.artifacts

    @property
    def folders(self) -> list[Path]:
        """What a user opens on the way to a version: the mount, artifacts/, one artifact, and
        its history/."""
        return [self.mount.path, self.artifacts, self.artifacts / ARTIFACT,
                self.artifacts / ARTIFACT / "history"]

    def requests(self) -> dict[str, int]:
        return dict(self.server.stats()["requests"])

    def assert_no_download(self, when: str) -> dict[str, int]:
        stats = self.server.stats()
        requests = stats["requests"]
        assert requests["download"] == 0 and requests["blob"] == 0 and \
            stats["blob_bytes"] == 0, f"{when} downloaded an archive: {stats}\n" \
            f"mount log:\n{self.mount.log()}"
        return dict(requests)


def start_demo(dev_server: Any, mount_vm0fs: MountFactory, data_dir: Path,
               *mount_args: str) -> Demo:
    server = dev_server(data_dir, "--demo")
    return Demo(server, mount_vm0fs(server, "--metadata-ttl", TTL, *mount_args))


@pytest.fixture
def demo(dev_server: Any, mount_vm0fs: MountFactory, tmp_path: Path) -> Iterator[Demo]:
    """The demo artifacts, served by a fresh dev-server, mounted without --xattrs."""
    yield start_demo(dev_server, mount_vm0fs, tmp_path / "data")


@pytest.fixture
def xattr_demo(dev_server: Any, mount_vm0fs: MountFactory, tmp_path: Path) -> Iterator[Demo]:
    """The same, mounted with --xattrs."""
    yield start_demo(dev_server, mount_vm0fs, tmp_path / "data", "--xattrs")


# --- what a file manager does ---------------------------------------------------------------


def errno_of(fn: Any, *args: Any, **kwargs: Any) -> int | None:
    """The errno `fn` fails with, or None when it succeeds."""
    try:
        fn(*args, **kwargs)
    except OSError as exc:
        return exc.errno
    return None


def open_close(path: str) -> None:
    os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))  # how GIO reads .hidden


def read_xattrs(path: Path | str, follow_symlinks: bool = True) -> dict[str, bytes]:
    """`getfattr -d -m -`: list the names, then read each one."""
    return {name: os.getxattr(path, name, follow_symlinks=follow_symlinks)
            for name in os.listxattr(path, follow_symlinks=follow_symlinks)}


def check_xattrs(path: str, xattrs: bool, follow_symlinks: bool = True) -> None:
    """Without --xattrs every attribute call fails at once as unsupported; with it, vm0fs
    lists only user.vm0.* names and has none of the others."""
    if not xattrs:
        err = errno_of(os.listxattr, path, follow_symlinks=follow_symlinks)
        assert err in NOT_SUPPORTED, f"listxattr({path}): {err and errno.errorcode[err]}"
    else:
        names = os.listxattr(path, follow_symlinks=follow_symlinks)
        assert all(name.startswith(XATTR_PREFIX) for name in names), (path, names)
    for name in XATTR_NAMES:
        err = errno_of(os.getxattr, path, name, follow_symlinks=follow_symlinks)
        assert err in NOT_SUPPORTED | NO_ATTR, \
            f"getxattr({path}, {name}): {err and errno.errorcode[err]}"


def browse(folder: Path, xattrs: bool = False) -> dict[str, Any]:
    """Open `folder` the way GIO does (see the module doc); everything but the folder's own
    subfolders' contents. Returns the names seen and how each probe failed."""
    path = str(folder)
    os.stat(path)
    assert os.access(path, os.R_OK | os.X_OK)
    assert not os.access(path, os.W_OK)  # read-only: EROFS
    vfs = os.statvfs(path)
    assert vfs.f_namemax >= 255
    check_xattrs(path, xattrs)
    names = []
    with os.scandir(path) as entries:
        for entry in entries:
            names.append(entry.name)
            lst = entry.stat(follow_symlinks=False)
            assert os.lstat(entry.path).st_ino == lst.st_ino
            if entry.is_symlink():
                os.readlink(entry.path)
            # Everything in these folders is a folder, or a link to one (`current`, history/).
            assert stat.S_ISDIR(os.stat(entry.path).st_mode), entry.path
            assert os.access(entry.path, os.R_OK | os.X_OK)
            assert not os.access(entry.path, os.W_OK)
            check_xattrs(entry.path, xattrs)
            if entry.is_symlink():
                check_xattrs(entry.path, xattrs, follow_symlinks=False)
    probes = {}
    for name in PROBES:
        probe = os.path.join(path, name)
        probes[name] = {how.__name__: errno_of(how, probe)
                        for how in (os.stat, os.lstat, open_close)}
    return {"names": sorted(names), "probes": probes}


def visit(paths: list[Path], xattrs: bool = False) -> None:
    """Open locations directly (a bookmark, a typed path, a restored session): lookups of
    names the kernel has not seen in a listing, then what a file manager asks of each."""
    for path in map(str, paths):
        os.lstat(path)
        assert os.path.isdir(path), path  # follows `current` and prefixes
        assert os.access(path, os.R_OK | os.X_OK)
        check_xattrs(path, xattrs)


def direct_paths(demo: Demo) -> list[Path]:
    """`current`, every version folder and every 8-character prefix, by name (from the API)."""
    _, versions = api_listing(demo.server, ARTIFACT)
    artifact = demo.artifacts / ARTIFACT
    ids = [v["id"] for v in versions]
    assert len(ids) == 3
    return [artifact / "current", *(artifact / i for i in ids), *(artifact / i[:8] for i in ids)]


def browse_all(demo: Demo, xattrs: bool = False) -> dict[Path, dict[str, Any]]:
    return {folder: demo.mount.run(browse, folder, xattrs, timeout=CALL_TIMEOUT)
            for folder in demo.folders}


def check_round(demo: Demo, seen: dict[Path, dict[str, Any]]) -> None:
    """The listings are complete and every probe was ENOENT."""
    assert "artifacts" in seen[demo.mount.path]["names"]
    assert set(seen[demo.artifacts]["names"]) == DEMO_ARTIFACTS
    versions = seen[demo.artifacts / ARTIFACT]["names"]
    assert {"current", "history"} <= set(versions) and len(versions) == 5, versions
    assert len(seen[demo.artifacts / ARTIFACT / "history"]["names"]) == 3
    for folder, result in seen.items():
        for name, errs in result["probes"].items():
            assert set(errs.values()) == {errno.ENOENT}, \
                f"{folder}/{name}: " + ", ".join(
                    f"{how}={errno.errorcode.get(e, e) if e else 'ok'}"
                    for how, e in errs.items())


def _gio_run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=CALL_TIMEOUT)


def gio(demo: Demo, *args: str) -> str:
    """`gio ARGS` on the local backend (no gvfs daemons), bounded twice: by subprocess's own
    timeout and by Mount.run, which tears the mount down if even killing gio hangs."""
    env = {**os.environ, "GIO_USE_VFS": "local", "GIO_USE_VOLUME_MONITOR": "unix",
           "GVFS_DISABLE_FUSE": "1"}
    assert GIO is not None
    result = demo.mount.run(_gio_run, [GIO, *args], env, timeout=CALL_TIMEOUT + 10)
    assert result.returncode == 0, f"gio {' '.join(args)}: {result.stderr}"
    return result.stdout


def gio_names(listing: str) -> set[str]:
    return {line.split("\t", 1)[0] for line in listing.splitlines() if line.strip()}


def api_listing(server: DevServer, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The artifact called `name` and its versions, straight from the API."""
    with server.client() as client:
        artifacts = client.get("/v1/artifacts", params={"limit": 100}).json()["data"]
        (art,) = [a for a in artifacts if a["name"] == name]
        versions = client.get(f"/v1/artifacts/{art['id']}/versions",
                              params={"limit": 100}).json()["data"]
    return art, versions


def expected_xattrs(server: DevServer, name: str) -> tuple[dict[str, str], dict[str, dict]]:
    """user.vm0.* of the artifact folder, and of each version folder, from the API."""
    art, versions = api_listing(server, name)
    folder = {"artifact_id": art["id"], "artifact_name": art["name"],
              "current_version_id": art["current_version_id"] or ""}
    per_version = {}
    for v in versions:
        per_version[v["id"]] = {**folder, "version_id": v["id"], "message": v["message"] or "",
                                "created_by": v["created_by"] or "",
                                "created_at": v["created_at"], "size": str(v["size"]),
                                "file_count": str(v["file_count"])}
    return folder, per_version


def decoded(raw: dict[str, bytes]) -> dict[str, str]:
    out = {}
    for key, value in raw.items():
        assert key.startswith(XATTR_PREFIX), key
        out[key.removeprefix(XATTR_PREFIX)] = value.decode()
    return out


def same_time(a: str, b: str) -> bool:
    parse = datetime.fromisoformat
    return parse(a.replace("Z", "+00:00")) == parse(b.replace("Z", "+00:00"))


def assert_xattrs(got: dict[str, str], want: dict[str, str], where: str) -> None:
    assert set(got) == set(want), f"{where}: {sorted(got)} != {sorted(want)}"
    for key, value in want.items():
        ok = same_time(got[key], value) if key == "created_at" else got[key] == value
        assert ok, f"{where}: user.vm0.{key} is {got[key]!r}, the API says {value!r}"


# --- the tests ------------------------------------------------------------------------------


def test_python_probes_download_nothing(demo: Demo) -> None:
    paths = direct_paths(demo)
    demo.mount.run(visit, paths, timeout=CALL_TIMEOUT)  # lookups on a cold mount first
    first = browse_all(demo)
    check_round(demo, first)
    after_first = demo.assert_no_download("browsing artifacts/ and an artifact's folder")
    assert after_first["list_artifacts"] >= 1 and after_first["list_versions"] >= 1, after_first

    # Within the metadata TTL, the same browsing again asks the API nothing at all.
    demo.mount.run(visit, paths, timeout=CALL_TIMEOUT)
    second = browse_all(demo)
    assert second == first
    after_second = demo.assert_no_download("browsing again")
    assert after_second == after_first, \
        f"browsing again within the TTL made requests: {after_first} -> {after_second}"

    # The counters do see this mount's downloads: opening a version folder downloads it.
    version = demo.artifacts / ARTIFACT / "current"
    assert demo.mount.run(os.listdir, version, timeout=CALL_TIMEOUT)
    opened = demo.requests()
    assert opened["download"] >= 1 and opened["blob"] >= 1, opened


@needs_gio
def test_gio_list_downloads_nothing(demo: Demo) -> None:
    artifact = demo.artifacts / ARTIFACT
    for path in direct_paths(demo):  # the location bar, on a cold mount
        info = gio(demo, "info", "-a", "*", str(path))
        assert "standard::type: 2" in info, info  # G_FILE_TYPE_DIRECTORY (followed)
    listing = gio(demo, "list", "-a", "*", str(demo.artifacts))
    assert gio_names(listing) == DEMO_ARTIFACTS, listing
    versions = gio(demo, "list", "-a", "*", str(artifact))
    names = gio_names(versions)
    assert {"current", "history"} <= set(names) and len(names) == 5, versions
    assert "standard::symlink-target=" in versions
    gio(demo, "info", "-f", "-a", "*", str(demo.mount.path))  # filesystem::* (statfs)
    after_first = demo.assert_no_download("gio list")

    gio(demo, "list", "-a", "*", str(demo.artifacts))
    gio(demo, "list", "-a", "*", str(artifact))
    after_second = demo.assert_no_download("gio list again")
    assert after_second == after_first, \
        f"gio list again within the TTL made requests: {after_first} -> {after_second}"


def test_xattrs_come_from_listings(xattr_demo: Demo) -> None:
    demo = xattr_demo
    folder_want, versions_want = expected_xattrs(demo.server, ARTIFACT)
    assert len(versions_want) == 3
    artifact = demo.artifacts / ARTIFACT
    run = demo.mount.run

    # getfattr -d on the artifact folder, each version folder and `current`.
    assert_xattrs(decoded(run(read_xattrs, artifact, timeout=CALL_TIMEOUT)), folder_want,
                  str(artifact))
    for version_id, want in versions_want.items():
        got = decoded(run(read_xattrs, artifact / version_id, timeout=CALL_TIMEOUT))
        assert_xattrs(got, want, version_id)
        assert got["message"], "the demo versions all have a message"
    current = decoded(run(read_xattrs, artifact / "current", timeout=CALL_TIMEOUT))
    assert_xattrs(current, versions_want[folder_want["current_version_id"]], "current")
    # The link itself, artifacts/ and the mount root carry none.
    assert run(read_xattrs, artifact / "current", False, timeout=CALL_TIMEOUT) == {}
    assert run(read_xattrs, demo.artifacts, timeout=CALL_TIMEOUT) == {}
    assert run(read_xattrs, demo.mount.path, timeout=CALL_TIMEOUT) == {}
    # A name vm0fs does not have is ENODATA, not a hang and not ENOTSUP.
    assert run(errno_of, os.getxattr, artifact, "user.vm0.nope",
               timeout=CALL_TIMEOUT) == errno.ENODATA
    demo.assert_no_download("reading user.vm0.* attributes")

    # And the file manager's browsing, with attributes on, downloads nothing either.
    check_round(demo, browse_all(demo, xattrs=True))
    demo.assert_no_download("browsing with --xattrs")


@needs_gio
def test_gio_shows_xattrs_without_download(xattr_demo: Demo) -> None:
    demo = xattr_demo
    _, versions_want = expected_xattrs(demo.server, ARTIFACT)
    listing = gio(demo, "list", "-a", "standard::name,xattr::*", str(demo.artifacts / ARTIFACT))
    for version_id, want in versions_want.items():
        (line,) = [ln for ln in listing.splitlines() if ln.startswith(version_id + "\t")]
        assert f"xattr::vm0.version_id={version_id}" in line, line
        assert f"xattr::vm0.artifact_id={want['artifact_id']}" in line, line
    demo.assert_no_download("gio list -a xattr::*")
