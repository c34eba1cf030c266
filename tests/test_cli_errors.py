"""Every mistake a user can make gets one line on stderr, a non-zero status and changes nothing
on disk; vm0fs touches only what it can prove is its own (caches with its marker, or laid out
exactly as earlier vm0fs versions left them; vm0fs mounts); commands say what they did and why.
These run the real commands, as a user would, against real mounts of `vm0fs dev-server`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import archives
import pytest
from conftest import DevServer
from mounting import (
    CLI,
    REPO,
    Mount,
    MountFactory,
    _die_with_parent,
    bounded,
    is_mounted,
    mount_env,
    pid_alive,
    pids_using,
    stop_pid,
    watchdog,
)

from vm0fs.cache import MARKER, Cache
from vm0fs.mount import fuse_device_hint, mount_failure
from vm0fs.mountpoint import MountConfig
from vm0fs.tree import TreeBuilder

pytest_plugins = ["mounting"]
pytestmark = pytest.mark.timeout(180)

VID = "ab" * 32  # a version id as the service makes them


def vm0fs(*args: str, token: str | None = None, cwd: Path | None = None,
          env: dict[str, str] | None = None, timeout: float = 90.0
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd or REPO, env={**mount_env(token), **(env or {})},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=_die_with_parent)


def one_line(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """The command failed with exactly one line on stderr that says all of `fragments`."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, (result.stdout, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("vm0fs: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything about a tree that a command could change: names, kinds, modes, owners,
    mtimes, contents, link targets."""
    found: dict[str, tuple[Any, ...]] = {}
    paths = [root] + sorted(root.rglob("*")) if root.exists() else []
    for path in paths:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            what: Any = os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            what = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            what = None
        found[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_mtime_ns, what)
    return found


def foreign_folder(path: Path) -> Path:
    """A folder of someone's own things, one of them named like a cache's folder."""
    (path / "versions" / "mydata").mkdir(parents=True)
    (path / "versions" / "mydata" / "thesis.tex").write_text("chapter 1\n")
    (path / "notes.txt").write_text("keep me\n")
    os.chmod(path, 0o755)
    return path


def legacy_cache(path: Path) -> Path:
    """A cache as vm0fs left it before caches carried a marker."""
    for sub in ("versions", "staging", "listings"):
        (path / sub).mkdir(parents=True, mode=0o700)
    entry = path / "versions" / VID
    entry.mkdir(mode=0o700)
    (entry / "data.tar").write_bytes(bytes(1024))
    (entry / "index.json").write_text(json.dumps(
        {"format": 1, "version_id": VID, "tar_size": 1024, "members": []}))
    namespace = path / "listings" / "0123456789abcdef"
    namespace.mkdir(mode=0o700)
    (namespace / "artifacts.json").write_text(json.dumps([{
        "id": "art-1", "name": "old-run", "current_version_id": VID, "size": 1, "file_count": 1,
        "created_at": 0.0, "updated_at": 0.0, "current_version": None}]))
    (namespace / "versions-art-1.json").write_text(json.dumps([{
        "id": VID, "artifact_id": "art-1", "size": 1, "file_count": 1, "message": None,
        "created_by": None, "created_at": 0.0}]))
    (path / "in-use.lock").touch()
    (path / "vm0fs.log").write_text("old log\n")
    return path


def closed_port() -> tuple[socket.socket, int]:
    """A port nothing listens on (kept bound, so nothing else takes it meanwhile)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


# -- caches: only what is provably ours ---------------------------------------------------


@pytest.mark.parametrize("command", [
    ["cache", "clear"], ["cache", "clear", "--force"], ["cache", "prune", "--max-size", "0"],
    ["cache", "info"], ["cache", "info", "--json"],
], ids=lambda c: " ".join(c))
def test_cache_commands_refuse_a_folder_that_is_not_a_cache(tmp_path: Path,
                                                            command: list[str]) -> None:
    folder = foreign_folder(tmp_path / "mine")
    before = snapshot(folder)
    one_line(vm0fs(*command, "--cache-dir", str(folder)), "is not a vm0fs cache")
    assert snapshot(folder) == before


def test_prefetch_refuses_a_folder_that_is_not_a_cache(tmp_path: Path) -> None:
    folder = foreign_folder(tmp_path / "mine")
    before = snapshot(folder)
    sock, port = closed_port()
    with sock:
        result = vm0fs("prefetch", "some-name", "--cache-dir", str(folder), "--api-url",
                       f"http://127.0.0.1:{port}", token="k")
    one_line(result, "is not a vm0fs cache")
    assert snapshot(folder) == before


@pytest.mark.parametrize("args", [
    ["cache", "prune"], ["cache", "prune", "--max-size", "lots"], ["mount"], ["frobnicate"],
    ["prefetch"], ["mount", "/x", "--metadata-ttl", "soon"],
], ids=lambda a: " ".join(a))
def test_usage_mistakes_are_one_line(args: list[str]) -> None:
    one_line(vm0fs(*args), "--help")


@pytest.mark.parametrize("args, fragment", [
    (["--metadata-ttl", "-1"], "not a number of seconds"),
    (["--metadata-ttl", "nan"], "not a number of seconds"),
    (["--metadata-ttl", "inf"], "not a number of seconds"),
    (["--cache-grace", "-3"], "not a number of seconds"),
    (["--cache-size", "-5G"], "a size cannot be negative"),
    (["--cache-size=-5G"], "a size cannot be negative"),
    (["--max-version-size", "-1"], "a size cannot be negative"),
], ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_numbers_out_of_range_are_refused(tmp_path: Path, args: list[str],
                                          fragment: str) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    one_line(vm0fs("mount", str(mnt), *args, token="k"), fragment, "vm0fs mount --help")
    assert not is_mounted(mnt) and list(tmp_path.iterdir()) == [mnt]
    if "size" in fragment:
        one_line(vm0fs("cache", "prune", "--max-size", "-1", "--cache-dir", str(tmp_path / "c")),
                 fragment)


@pytest.mark.parametrize("url, fragment", [
    ("notaurl", "not an http:// or https:// URL"), ("ftp://host", "not an http:// or https://"),
    ("http://[::1", "is not a URL"),
])
def test_a_url_that_cannot_be_the_api(tmp_path: Path, url: str, fragment: str) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = snapshot(tmp_path)
    for args in (["mount", str(mnt)], ["mount", str(mnt), "--foreground"], ["prefetch", "x"]):
        one_line(vm0fs(*args, "--api-url", url, "--cache-dir", str(tmp_path / "c"), token="k"),
                 fragment)
    assert snapshot(tmp_path) == before and not is_mounted(mnt)


@pytest.mark.parametrize("mode", ["background", "foreground"])
def test_mount_refuses_a_folder_that_is_not_a_cache(tmp_path: Path, mode: str) -> None:
    folder = foreign_folder(tmp_path / "mine")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock, port = closed_port()
    before = snapshot(tmp_path)
    with sock:
        result = vm0fs("mount", str(mnt), "--cache-dir", str(folder), "--api-url",
                       f"http://127.0.0.1:{port}",
                       *(["--foreground"] if mode == "foreground" else []), token="k")
    one_line(result, "is not a vm0fs cache")
    assert snapshot(tmp_path) == before and not is_mounted(mnt)


@pytest.mark.parametrize("target", ["/etc", "/tmp", "/"])
def test_system_folders_are_never_a_cache(target: str) -> None:
    before = os.stat(target)
    for command in (["cache", "clear"], ["cache", "prune", "--max-size", "0"]):
        one_line(vm0fs(*command, "--cache-dir", target), "is not a vm0fs cache")
    after = os.stat(target)  # (their mtimes move with everyone else's work: not compared)
    assert (after.st_mode, after.st_uid) == (before.st_mode, before.st_uid)
    assert not os.path.exists(os.path.join(target, MARKER))


def test_a_file_is_not_a_cache(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    before = snapshot(tmp_path)
    one_line(vm0fs("cache", "clear", "--cache-dir", str(path)), "is not a folder")
    assert snapshot(tmp_path) == before


def test_read_only_commands_create_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "cache"
    info = vm0fs("cache", "info", "--cache-dir", str(missing))
    assert info.returncode == 0 and "does not exist yet" in info.stdout, info.stderr
    assert json.loads(vm0fs("cache", "info", "--json", "--cache-dir", str(missing)).stdout)[
        "exists"] is False
    for command in (["cache", "clear"], ["cache", "prune", "--max-size", "1"]):
        result = vm0fs(*command, "--cache-dir", str(missing))
        assert result.returncode == 0 and "no cache" in result.stdout, result.stderr
    one_line(vm0fs("status", str(missing)), "no such file or folder")
    assert list(tmp_path.iterdir()) == []


def test_a_cache_of_an_earlier_vm0fs_is_still_recognised(tmp_path: Path) -> None:
    cache = legacy_cache(tmp_path / "cache")
    before = snapshot(cache)
    info = vm0fs("cache", "info", "--cache-dir", str(cache))
    assert info.returncode == 0, info.stderr
    assert VID[:12] in info.stdout and "old-run" in info.stdout
    assert snapshot(cache) == before  # looking changed nothing, not even the marker
    cleared = vm0fs("cache", "clear", "--cache-dir", str(cache))
    assert cleared.returncode == 0 and "removed 1 version(s)" in cleared.stdout, cleared.stderr
    assert (cache / MARKER).is_file() and os.listdir(cache / "versions") == []


def test_a_look_alike_with_anything_foreign_is_not_a_cache(tmp_path: Path) -> None:
    """The layout of an earlier cache, plus one thing vm0fs never writes: not ours."""
    for extra in ("notes.txt", "versions/mydata/file", "staging/draft"):
        cache = legacy_cache(tmp_path / extra.replace("/", "-"))
        (cache / extra).parent.mkdir(parents=True, exist_ok=True)
        (cache / extra).write_text("mine\n")
        before = snapshot(cache)
        one_line(vm0fs("cache", "clear", "--cache-dir", str(cache)), "is not a vm0fs cache")
        assert snapshot(cache) == before


def test_inside_a_cache_only_what_vm0fs_writes_is_touched(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    staging = cache.stage(VID)
    os.write(staging.fd, bytes(100))
    os.close(cache.publish(staging, TreeBuilder(0)).fd)
    odd = [cache.versions / "not-an-entry", cache.staging / "draft", cache.listings / "mine"]
    for path in odd:
        path.mkdir()
        (path / "file").write_text("x")
    result = vm0fs("cache", "clear", "--cache-dir", str(cache.root))
    assert result.returncode == 0 and "removed 1 version(s)" in result.stdout, result.stderr
    assert all((path / "file").exists() for path in odd)
    assert not (cache.versions / VID).exists()


def test_a_new_cache_is_marked_and_private(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "new" / "cache")
    assert (cache.root / MARKER).read_text().startswith("Signature: 8a477f597d28d172")
    assert stat.S_IMODE(cache.root.stat().st_mode) == 0o700
    empty = tmp_path / "empty"
    empty.mkdir()
    Cache(empty)  # an empty folder may become a cache
    assert (empty / MARKER).is_file()


# -- unmount: only vm0fs mounts ------------------------------------------------------------


def test_unmount_of_what_is_not_a_vm0fs_mount(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    before = snapshot(tmp_path)
    one_line(vm0fs("unmount", str(plain)), f"{plain} is not a mount point")
    one_line(vm0fs("unmount", str(tmp_path / "nothing")), "does not exist")
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_unmount_leaves_other_filesystems_alone(tmp_path: Path) -> None:
    target = tmp_path / "tmpfs"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(target)], check=True)
    try:
        (target / "work").write_text("unsaved\n")
        one_line(vm0fs("unmount", str(target)), "is not a vm0fs mount", "tmpfs")
        one_line(vm0fs("unmount", "--lazy", str(target)), "is not a vm0fs mount")
        assert is_mounted(target) and (target / "work").read_text() == "unsaved\n"
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


# -- a mount: mistakes around it -----------------------------------------------------------


@pytest.fixture
def broken_server(dev_server: Any, tmp_path: Path) -> DevServer:
    """The demo artifacts plus `truncated`, whose only version is a cut-off archive."""
    srv = dev_server(tmp_path / "data", "--demo")
    folder = tmp_path / "data" / "truncated"
    folder.mkdir()
    (folder / "v1.tar.gz").write_bytes(archives.corrupt_truncated_gzip())
    return srv


class ProxyTrap:
    """A proxy that nothing should reach: HTTP clients in the commands are pointed at it
    for every host that is not local, so any request to the default (production) API shows."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    @property
    def env(self) -> dict[str, str]:
        url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        return {"HTTPS_PROXY": url, "HTTP_PROXY": url, "ALL_PROXY": url,
                "NO_PROXY": "127.0.0.1,localhost"}

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def trap() -> Iterator[ProxyTrap]:
    proxy = ProxyTrap()
    try:
        yield proxy
    finally:
        proxy.close()


def test_prefetch_mistakes_in_a_mount(broken_server: DevServer, mount_vm0fs: MountFactory,
                                      trap: ProxyTrap) -> None:
    m = mount_vm0fs(broken_server, "--metadata-ttl", "1")
    art = m.artifacts
    before = snapshot(m.cache_dir / "versions")
    cases = [
        ([str(art / "nonexist")], ["no artifact named 'nonexist'", str(m.path)]),
        ([str(art / "nonexist" / "current")], ["no artifact named 'nonexist'"]),
        ([str(art / "training-run" / "zz")], ["no version 'zz'", "8 or more hex characters"]),
        ([str(art / "truncated" / "current")], ["truncated", "could not fetch"]),
        ([str(m.path / "nothing-here")], ["not inside an artifact"]),
        (["/no/such/path/x"], ["no such file or folder"]),
    ]
    for args, fragments in cases:
        result = vm0fs("prefetch", *args, token="vm0_live_secret", env=trap.env)
        one_line(result, *fragments)
    # Names, from inside the mount, go through it; never to the default API.
    for args, fragments in ((["garbage"], ["no artifact named 'garbage'"]),
                            (["training-run/zz"], ["8 or more hex characters"])):
        result = vm0fs("prefetch", *args, token="vm0_live_secret", env=trap.env, cwd=art)
        one_line(result, *fragments)
    assert trap.connections == 0
    assert snapshot(m.cache_dir / "versions") == before  # nothing of the broken version
    status = vm0fs("status", str(m.path))
    assert "artifact 'truncated'" in status.stdout
    assert "(no --cache-size: keeps 5% of the cache's filesystem" in status.stdout


def test_prefetch_says_what_it_did_without_stale_bars(broken_server: DevServer,
                                                      mount_vm0fs: MountFactory) -> None:
    m = mount_vm0fs(broken_server)
    current = m.artifacts / "training-run" / "current"
    first = vm0fs("prefetch", str(current))
    assert first.returncode == 0 and "fetched" in first.stdout, first.stderr
    again = vm0fs("prefetch", str(current))
    assert again.returncode == 0 and "already cached" in again.stdout
    assert first.stderr == again.stderr == ""  # no bar left over, no "1/1 bytes"


def test_info_and_status_name_what_is_wrong(broken_server: DevServer,
                                            mount_vm0fs: MountFactory) -> None:
    m = mount_vm0fs(broken_server)
    line = one_line(vm0fs("info", str(m.artifacts / "nonexist")), "no artifact named 'nonexist'")
    assert ".vm0fs" not in line
    one_line(vm0fs("info", str(m.artifacts / "training-run" / "0123456789ab")), "no version")
    one_line(vm0fs("info", str(m.artifacts / "training-run" / "current" / "nope")), "no 'nope'")


def test_status_without_a_mountpoint(broken_server: DevServer, mount_vm0fs: MountFactory,
                                     tmp_path: Path) -> None:
    """Outside a mount, `vm0fs status` says to give a MOUNTPOINT and which mounts there are;
    with one mount of yours it shows that one, inside a mount the one you are in."""
    outside = vm0fs("status", cwd=tmp_path)
    if outside.returncode:  # mounts of other tests on this machine may be running
        one_line(outside, "current folder is not inside a vm0fs mount", "give a MOUNTPOINT")
    m = mount_vm0fs(broken_server)
    inside = vm0fs("status", cwd=m.artifacts)
    assert inside.returncode == 0 and f"mounted at:     {m.path}\n" in inside.stdout
    outside = vm0fs("status", cwd=tmp_path)
    if outside.returncode:  # not our only mount: then it is named
        one_line(outside, "give a MOUNTPOINT", "yours: ", str(m.path))
    else:
        assert f"mounted at:     {m.path}\n" in outside.stdout
    one_line(vm0fs("status", str(tmp_path)), "is not inside a vm0fs mount", "give a path in one",
             str(m.path))


def test_commands_on_a_dead_mount(broken_server: DevServer, mount_vm0fs: MountFactory) -> None:
    m = mount_vm0fs(broken_server)
    m.proc.kill()  # kill -9: the mount stays behind, dead
    m.proc.wait(10)
    for args in (["status", str(m.path)], ["info", str(m.artifacts)],
                 ["prefetch", str(m.artifacts / "training-run" / "current")]):
        one_line(vm0fs(*args), "is dead", f"vm0fs unmount {m.path}")
    done = vm0fs("unmount", str(m.path))
    assert done.returncode == 0 and not is_mounted(m.path), done.stderr


def test_cache_info_and_prune_explain_themselves(broken_server: DevServer,
                                                 mount_vm0fs: MountFactory) -> None:
    m = mount_vm0fs(broken_server)
    readme = m.artifacts / "training-run" / "current" / "README.md"
    held = m.run(os.open, readme, os.O_RDONLY)  # the mount now holds this version open
    try:
        info = vm0fs("cache", "info", "--cache-dir", str(m.cache_dir))
        assert info.returncode == 0, info.stderr
        assert "training-run" in info.stdout and f"by the mount at {m.path}" in info.stdout
        pruned = vm0fs("cache", "prune", "--max-size", "0", "--cache-dir", str(m.cache_dir))
        assert pruned.returncode == 0, pruned.stderr
        assert "kept 1 version(s)" in pruned.stdout and "open" in pruned.stdout
    finally:
        os.close(held)


# -- the API: fail fast where waiting cannot help, and say what answered -------------------


def test_a_refused_connection_fails_at_once(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock, port = closed_port()
    with sock:
        result = vm0fs("mount", str(mnt), "--api-url", f"http://127.0.0.1:{port}",
                       "--cache-dir", str(tmp_path / "cache"), "--debug", "--foreground",
                       token="k")
    assert "retrying" not in result.stderr  # no attempt beyond the first
    assert "connection refused" in result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and not is_mounted(mnt)


def test_https_to_a_plain_http_server_fails_at_once(dev_server: Any, tmp_path: Path) -> None:
    srv = dev_server(tmp_path / "data", "--demo")
    url = srv.url.replace("http://", "https://")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for mode in ([], ["--foreground", "--debug"]):
        result = vm0fs("mount", str(mnt), "--api-url", url, "--cache-dir", str(tmp_path / "c"),
                       *mode, token=srv.token)
        assert "retrying" not in result.stderr and not is_mounted(mnt)  # one attempt only
        assert "does not speak TLS" in result.stderr.strip().splitlines()[-1], result.stderr
        if not mode:
            one_line(result, "does not speak TLS", "http://")
    one_line(vm0fs("prefetch", "training-run", "--api-url", url, "--cache-dir",
                   str(tmp_path / "c"), token=srv.token), "does not speak TLS", "http://")


def test_failed_background_mounts_log_with_timestamps(broken_server: DevServer,
                                                      tmp_path: Path) -> None:
    """The log of background mounts gets each failure as a log line, not a bare `vm0fs: `."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = tmp_path / "cache"
    sock, port = closed_port()
    with sock, background_mounts(mnt):
        one_line(vm0fs("mount", str(mnt), "--api-url", f"http://127.0.0.1:{port}",
                       "--cache-dir", str(cache), token="k"), "connection refused")
        one_line(vm0fs("mount", str(mnt), "--api-url", broken_server.url, "--cache-dir",
                       str(cache), "-o", "no_such_option", token=broken_server.token),
                 "unknown option", "no_such_option")
    lines = (cache / "vm0fs.log").read_text().splitlines()
    stamped = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \d+ [A-Z]+ vm0fs")
    assert lines and all(stamped.match(line) for line in lines), lines
    assert sum("ERROR" in line for line in lines) == 2 and not is_mounted(mnt)


@pytest.fixture
def web_server(tmp_path: Path) -> Iterator[str]:
    """Some other HTTP server (a static web server) where the API should be."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text("<html><body><h1>My homepage</h1></body></html>")
    sock, port = closed_port()
    sock.close()
    proc = subprocess.Popen([*CLI[:1], "-m", "http.server", "--bind", "127.0.0.1", str(port)],
                            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        bounded(_wait_listening, port, timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def _wait_listening(port: int) -> None:
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            threading.Event().wait(0.05)


def test_a_server_that_is_not_the_api(tmp_path: Path, web_server: str) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for url in (web_server, web_server + "/index.html"):
        line = one_line(vm0fs("mount", str(mnt), "--api-url", url, "--cache-dir",
                              str(tmp_path / "cache"), token="k"),
                        "does not answer like the vm0 Artifacts API")
        assert "<" not in line and not is_mounted(mnt)
    line = one_line(vm0fs("prefetch", "some-name", "--api-url", web_server, "--cache-dir",
                          str(tmp_path / "c2"), token="k"),
                    "does not answer like the vm0 Artifacts API")
    assert "<" not in line


# -- mounting as an ordinary user ----------------------------------------------------------


@pytest.mark.parametrize("said, fragments", [
    ("fusermount3: option allow_other only allowed if 'user_allow_other' is set in "
     "/etc/fuse.conf\n", ["user_allow_other", "add the line user_allow_other to /etc/fuse.conf"]),
    ("fusermount3: user has no write access to mountpoint /mnt\n",
     ["no write access to mountpoint /mnt", "a folder you own"]),
    ("", ["fuse_session_mount failed"]),
])
def test_mount_failures_carry_the_reason(said: str, fragments: list[str]) -> None:
    config = MountConfig(Path("/mnt"), "http://x", "k", Path("/c"))
    message = mount_failure(config, said, "fuse_session_mount failed")
    assert "\n" not in message and message.startswith("cannot mount /mnt: ")
    for fragment in fragments:
        assert fragment in message


def test_a_fuse_device_that_is_not_usable_says_what_fixes_it(tmp_path: Path) -> None:
    device = tmp_path / "fuse"
    device.touch()
    nobody = {"uid": 65534, "groups": {65534}}
    os.chown(device, 0, 0)
    os.chmod(device, 0o600)  # what this hint is for: root's only
    hint = fuse_device_hint(str(device), **nobody)
    assert f"chmod 666 {device}" in hint and "-rw------- root:root" in hint
    assert "usermod" not in hint  # joining the group root is no fix
    os.chown(device, 0, 65534)
    os.chmod(device, 0o660)
    assert fuse_device_hint(str(device), uid=65534, groups={65534}) == ""  # in its group
    assert "usermod -aG " in fuse_device_hint(str(device), uid=65534, groups=set())
    os.chmod(device, 0o666)
    assert fuse_device_hint(str(device), uid=65534, groups=set()) == ""
    assert "modprobe fuse" in fuse_device_hint(str(tmp_path / "none"))
    config = MountConfig(Path("/mnt"), "http://x", "k", Path("/c"))
    message = mount_failure(config, "fusermount3: failed to exec fusermount3: No such file\n",
                            "failed")
    assert "apt-get install fuse3" in message


def _as_user_possible() -> bool:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return False
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            CLI[0], "-c", "import subprocess, sys, vm0fs, pyfuse3; "
                            "subprocess.run([sys.executable, '-c', ''], check=True)"],
                           capture_output=True,
                           timeout=60, cwd="/")
    return probe.returncode == 0


def _fuse_conf_allows_other() -> bool:
    try:
        lines = Path("/etc/fuse.conf").read_text().splitlines()
    except OSError:
        return False
    return any(line.strip() == "user_allow_other" for line in lines)


@pytest.mark.skipif(not _as_user_possible(),
                    reason="needs root, setpriv and a Python an ordinary user can run")
def test_an_ordinary_user_gets_the_reason_in_one_line(dev_server: Any, tmp_path: Path) -> None:
    srv = dev_server(tmp_path / "data", "--demo")
    home = Path(tempfile.mkdtemp(prefix="vm0fs-user-", dir="/tmp"))
    try:
        os.chown(home, 65534, 65534)
        own, roots = home / "vm0", home / "roots"
        for path in (own, roots):
            path.mkdir()
        os.chown(own, 65534, 65534)  # `roots` stays root's: not the user's to mount on
        env = {**mount_env(srv.token), "HOME": str(home)}
        cases = [(own, ["--allow-other"], ["user_allow_other", "/etc/fuse.conf"])] if (
            not _fuse_conf_allows_other()) else []
        cases.append((roots, [], ["no write access", "a folder you own"]))
        for mountpoint, extra, fragments in cases:
            result = subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *CLI, "mount",
                 str(mountpoint), "--api-url", srv.url, *extra], cwd="/", env=env,
                capture_output=True, text=True, timeout=90)
            one_line(result, *fragments)
            assert not is_mounted(mountpoint)
        assert (home / ".cache" / "vm0fs" / MARKER).is_file()  # its cache went to ~/.cache
    finally:
        for path in (home / "vm0", home / "roots"):
            if is_mounted(path):
                subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.skipif(not _as_user_possible(),
                    reason="needs root, setpriv and a Python an ordinary user can run")
def test_another_users_mount_is_left_alone(dev_server: Any, mount_vm0fs: MountFactory,
                                           tmp_path: Path) -> None:
    srv = dev_server(tmp_path / "data", "--demo")
    m = mount_vm0fs(srv)  # root's
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *CLI]
    for args, fragments in ((["unmount", str(m.path)], ["mounted by root"]),
                            (["unmount", "--lazy", str(m.path)], ["mounted by root"]),
                            (["status", str(m.path)], ["belongs to root"])):
        result = subprocess.run([*as_nobody, *args], cwd="/", env=mount_env(None),
                                capture_output=True, text=True, timeout=60)
        one_line(result, *fragments)
    assert is_mounted(m.path)


# -- starting a mount: from any folder, and once per mount point ---------------------------

COMMAND = Path(sys.executable).with_name("vm0fs")  # the installed `vm0fs`, as a user runs it


@contextlib.contextmanager
def background_mounts(mountpoint: Path) -> Iterator[None]:
    """Whatever background mounts a test starts on `mountpoint` end with it."""
    try:
        yield
    finally:
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False,
                           capture_output=True, timeout=30)
        for pid in pids_using(mountpoint):
            stop_pid(pid)


def wait_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 20
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(p) for p in pids), "a mount process outlived its unmount"


@pytest.mark.skipif(not COMMAND.exists(), reason="needs the installed vm0fs command")
@pytest.mark.parametrize("mode", ["background", "foreground"])
@pytest.mark.parametrize("folder", ["mount point named vm0fs", "vm0fs package here"])
def test_mount_from_a_folder_holding_a_vm0fs_folder(dev_server: Any, tmp_path: Path, mode: str,
                                                    folder: str) -> None:
    """`mkdir vm0fs && vm0fs mount vm0fs`, or a home folder holding something named vm0fs:
    the process that serves the mount must still import vm0fs itself, not that folder."""
    srv = dev_server(tmp_path / "data", "--demo")
    here = tmp_path / "home"
    (here / "vm0fs").mkdir(parents=True)
    if folder == "mount point named vm0fs":
        name = "vm0fs"
    else:
        (here / "vm0fs" / "__init__.py").write_text("raise ImportError('not vm0fs')\n")
        name = "vm0"
        (here / name).mkdir()
    mountpoint = here / name
    args = [str(COMMAND), "mount", name, "--api-url", srv.url, "--cache-dir",
            str(tmp_path / "cache")]
    env = mount_env(srv.token)
    if mode == "foreground":
        log_path = tmp_path / "mount.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([*args, "--foreground"], cwd=here, env=env,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    preexec_fn=_die_with_parent)
        watchdog.add(proc.pid, mountpoint)
        mount = Mount(mountpoint, proc, tmp_path / "cache", log_path)
        try:
            deadline = time.monotonic() + 30
            while not is_mounted(mountpoint) and proc.poll() is None:
                assert time.monotonic() < deadline, mount.log()
                time.sleep(0.05)
            assert is_mounted(mountpoint), mount.log()
            assert "training-run" in bounded(os.listdir, mountpoint / "artifacts")
            assert mount.unmount() == 0, mount.log()
        finally:
            mount.cleanup()
        assert "Traceback" not in mount.log()
        return
    with background_mounts(mountpoint):
        result = subprocess.run(args, cwd=here, env=env, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=90,
                                preexec_fn=_die_with_parent)
        children = pids_using(mountpoint)
        for pid in children:
            watchdog.add(pid, mountpoint)
        assert result.returncode == 0, result.stderr
        assert "training-run" in bounded(os.listdir, mountpoint / "artifacts")
        done = vm0fs("unmount", str(mountpoint))
        assert done.returncode == 0 and not is_mounted(mountpoint), done.stderr
        wait_gone(children)


def mounts_at(path: Path) -> int:
    with open("/proc/self/mounts") as table:
        return sum(1 for line in table if line.split()[1:2] == [str(path)])


def test_two_mounts_started_at_once_on_one_folder(dev_server: Any, tmp_path: Path) -> None:
    """One mounts; the other says, in one line, that the folder is a mount point already."""
    srv = dev_server(tmp_path / "data", "--demo", "--latency-ms", "200")  # a wider window
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with background_mounts(mountpoint):
        procs = [subprocess.Popen(
            [*CLI, "mount", str(mountpoint), "--api-url", srv.url, "--cache-dir",
             str(tmp_path / f"cache-{i}")], cwd=REPO, env=mount_env(srv.token),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=_die_with_parent) for i in range(2)]
        results = [proc.communicate(timeout=90) for proc in procs]
        for pid in pids_using(mountpoint):
            watchdog.add(pid, mountpoint)
        codes = sorted(proc.returncode for proc in procs)
        assert codes[0] == 0 and codes[1] != 0, results
        lost = next(err for proc, (_, err) in zip(procs, results, strict=True) if proc.returncode)
        lines = lost.strip().splitlines()
        assert len(lines) == 1 and f"{mountpoint} is already a mount point" in lines[0], lost
        assert mounts_at(mountpoint) == 1
        deadline = time.monotonic() + 20
        while len(pids_using(mountpoint)) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(pids_using(mountpoint)) == 1  # the loser's mount process ended
        assert "training-run" in bounded(os.listdir, mountpoint / "artifacts")


@pytest.mark.parametrize("mode", ["background", "foreground"])
def test_a_mount_inside_a_vm0fs_mount_is_refused(broken_server: DevServer,
                                                 mount_vm0fs: MountFactory, tmp_path: Path,
                                                 mode: str) -> None:
    m = mount_vm0fs(broken_server)
    inside = m.artifacts / "scratchpad"  # an artifact with no versions: an empty history/
    assert m.run(os.listdir, inside) == ["history"]
    with background_mounts(inside):
        result = vm0fs("mount", str(inside), "--api-url", broken_server.url, "--cache-dir",
                       str(tmp_path / "cache"), *(["--foreground"] if mode == "foreground" else []),
                       token=broken_server.token)
    one_line(result, f"is inside the vm0fs mount at {m.path}", "outside it")
    assert mounts_at(inside) == 0


@pytest.mark.parametrize("args", [["cache", "info", "--json"], ["cache", "info"], ["--help"],
                                  ["mount", "--help"], ["--version"]], ids=" ".join)
def test_a_reader_that_goes_away_is_a_normal_end(tmp_path: Path, args: list[str]) -> None:
    """`vm0fs cache info --json | head -1`: no "Broken pipe", no failure status."""
    cache = Cache(tmp_path / "cache")
    staging = cache.stage(VID)
    os.write(staging.fd, bytes(100))
    os.close(cache.publish(staging, TreeBuilder(0)).fd)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte
    try:
        result = subprocess.run([*CLI, *args, *(["--cache-dir", str(cache.root)] if (
            args[0] == "cache") else [])], cwd=REPO, env=mount_env(None),
            stdin=subprocess.DEVNULL, stdout=write_end, stderr=subprocess.PIPE, text=True,
            timeout=60, preexec_fn=_die_with_parent)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (0, "")
