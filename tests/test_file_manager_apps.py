"""Real file managers on a virtual display, over a real mount: what opening an artifact folder
downloads.

GNOME Files (Nautilus) shows how many items every folder holds when the filesystem is "local",
and GIO calls every FUSE mount local: opening `artifacts/<name>/` lists every version folder in
it, and a version's listing needs its archive. vm0fs cannot tell that listing from `ls`, so it
keeps the listing right and bounds the cost instead: those downloads run one at a time (the
dev-server's blob_peak), and the mount says once, in its log and in `.vm0fs/status`, what is
going on and the GNOME setting that stops it. With that setting ('never'), and in PCManFM and
Thunar, opening the folder, or its `history/` (links to the version folders), downloads nothing.

Each program runs under Xvfb with a fresh home, settings and D-Bus session (dbus-run-session),
in a process group of its own that is killed (SIGTERM, bounded wait, SIGKILL) when the test
ends, with everything D-Bus started for it (gvfsd, tracker-miner-fs, ...). Skipped when the
program, Xvfb or dbus-run-session is missing (Debian: `apt-get install --no-install-recommends
nautilus pcmanfm thunar xvfb dbus-x11`; scripts/test does not install them).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DevServer
from mounting import Mount, MountFactory, watchdog

from vm0fs.versions import GNOME_SETTING

pytest_plugins = ["mounting"]
pytestmark = pytest.mark.timeout(240)

ARTIFACTS = {"reports": 5, "logs": 4}  # name -> versions, none cached
VERSION_BYTES = 300_000  # each archive (incompressible)
BANDWIDTH = "1500000"  # bytes/s per blob: a download lasts long enough to overlap another
SHOWN_TIMEOUT = 90.0  # until the program has listed both folders (it starts slowly here)
COUNTED_TIMEOUT = 120.0  # until every version a counting file manager asks for is in
QUIET = 4.0  # seconds without a new request that say the program is done asking
STOP_TIMEOUT = 5.0

MISSING = [p for p in ("Xvfb", "dbus-run-session") if shutil.which(p) is None]


def needs(program: str) -> pytest.MarkDecorator:
    missing = [p for p in (program, *MISSING) if shutil.which(p) is None]
    return pytest.mark.skipif(
        bool(missing), reason=f"{', '.join(missing)} not installed (Debian: apt-get install "
        f"--no-install-recommends {program} xvfb dbus-x11)")


# --- data, mount, and waiting ---------------------------------------------------------------


def make_data(root: Path) -> None:
    """Artifacts of several distinct versions (ids are the archives' hashes)."""
    rng = random.Random(11)
    for name, count in ARTIFACTS.items():
        folder = root / name
        folder.mkdir(parents=True)
        for n in range(count):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w:gz") as tar:
                for i in range(3):
                    data = rng.randbytes(VERSION_BYTES // 3)
                    info = tarfile.TarInfo(f"part{i}/data{i}.bin")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            (folder / f"v{n}.tar.gz").write_bytes(buf.getvalue())
            os.utime(folder / f"v{n}.tar.gz", (1.7e9 + n, 1.7e9 + n))


def wait_for(condition: Callable[[], bool], timeout: float, what: str,
             alive: Callable[[], str | None]) -> None:
    """Poll until `condition()`; fail with `what` after `timeout` s or if the program died."""
    deadline = time.monotonic() + timeout
    while not condition():
        problem = alive()
        if problem:
            pytest.fail(f"{problem} while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:.0f} s")
        time.sleep(0.25)


def wait_quiet(server: DevServer, alive: Callable[[], str | None]) -> dict[str, Any]:
    """Until the server's counters have not moved for QUIET seconds (bounded)."""
    last, since = server.stats(), time.monotonic()
    deadline = since + COUNTED_TIMEOUT
    while time.monotonic() - since < QUIET:
        problem = alive()
        if problem:
            pytest.fail(problem)
        if time.monotonic() > deadline:
            pytest.fail(f"requests never stopped: {last}")
        time.sleep(0.5)
        now = server.stats()
        if now != last:
            last, since = now, time.monotonic()
    return last


def status(mount: Mount) -> dict[str, Any]:
    return json.loads(mount.run((mount.path / ".vm0fs" / "status.json").read_bytes,
                                timeout=30))


# --- the desktop ----------------------------------------------------------------------------


def kill_group(pgid: int) -> None:
    """SIGTERM to a process group we made, a bounded wait, then SIGKILL (tracker-miner-fs
    ignores SIGTERM)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            if not group_alive(pgid):
                return
            time.sleep(0.1)


def group_alive(pgid: int) -> bool:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


class Desktop:
    """An Xvfb display and programs run in it, each in a D-Bus session and a group of its own."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.groups: list[int] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.display = self._xvfb()

    def _spawn(self, cmd: list[str], env: dict[str, str] | None = None,
               **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                start_new_session=True, **kwargs)
        self.groups.append(proc.pid)
        self.procs.append(proc)
        # If pytest dies without cleaning up, the watchdog signals the whole group (-pgid).
        watchdog.add(-proc.pid)
        return proc

    def _xvfb(self) -> str:
        """Start Xvfb; it writes its display number and a newline to the fd we give it."""
        read, write = os.pipe()
        try:
            with open(self.home.parent / "xvfb.log", "wb") as log:
                proc = self._spawn(["Xvfb", "-displayfd", str(write), "-screen", "0",
                                    "1024x768x24", "-nolisten", "tcp", "-noreset"],
                                   pass_fds=(write,), stdout=log, stderr=log)
            os.close(write)
            write = -1
            line = b""
            deadline = time.monotonic() + 30
            while not line.endswith(b"\n") and time.monotonic() < deadline:
                ready, _, _ = select.select([read], [], [], 0.5)
                if ready:
                    chunk = os.read(read, 16)
                    if not chunk:
                        break  # Xvfb exited
                    line += chunk
            if not line.strip().isdigit():
                raise RuntimeError(f"Xvfb gave no display number ({line!r}, "
                                   f"exit {proc.poll()})")
            return ":" + line.decode().strip()
        finally:
            if write >= 0:
                os.close(write)
            os.close(read)

    def env(self, settings: dict[str, str]) -> dict[str, str]:
        """A fresh user: home, XDG folders, and GSettings in a key file we write."""
        home = self.home
        config = home / ".config"
        keyfile = config / "glib-2.0" / "settings" / "keyfile"
        keyfile.parent.mkdir(parents=True, exist_ok=True)
        keyfile.write_text("[org/gnome/nautilus/preferences]\n"
                           + "".join(f"{k}='{v}'\n" for k, v in settings.items()))
        runtime = home / "run"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DBUS_", "XDG_", "GIO_", "GVFS_", "GSK_", "GTK_"))}
        env.update(DISPLAY=self.display, HOME=str(home), XDG_CONFIG_HOME=str(config),
                   XDG_CACHE_HOME=str(home / ".cache"), XDG_DATA_HOME=str(home / ".local/share"),
                   XDG_RUNTIME_DIR=str(runtime), GSETTINGS_BACKEND="keyfile", NO_AT_BRIDGE="1",
                   LANG="C.UTF-8", LC_ALL="C.UTF-8",
                   # GTK 4 draws with software OpenGL under Xvfb: too slow on a busy 2-core
                   # machine for Nautilus to finish loading a folder. Cairo draws the same view.
                   GSK_RENDERER="cairo")
        return env

    def run(self, cmd: list[str], settings: dict[str, str],
            shell_first: str | None = None) -> subprocess.Popen[bytes]:
        """`cmd` in a D-Bus session of its own, after `shell_first` (a shell command line, run
        as the user would: same home and settings)."""
        env = self.env(settings)
        if shell_first:
            done = subprocess.run(["sh", "-c", shell_first], env=env, capture_output=True,
                                  text=True, timeout=30)
            assert done.returncode == 0, f"{shell_first}: {done.stderr}"
        log = open(self.home.parent / f"{Path(cmd[0]).name}.log", "wb")  # noqa: SIM115
        with log:
            return self._spawn(["dbus-run-session", "--", *cmd], env=env,
                               stdout=log, stderr=log)

    def close(self) -> None:
        for pgid in reversed(self.groups):
            kill_group(pgid)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT)
            watchdog.remove(-proc.pid)
        left = [pgid for pgid in self.groups if group_alive(pgid)]
        assert not left, f"process groups still running after clean-up: {left}"


@pytest.fixture
def desktop(tmp_path: Path) -> Iterator[Desktop]:
    home = tmp_path / "desktop" / "home"
    home.mkdir(parents=True)
    d = Desktop(home)
    try:
        yield d
    finally:
        d.close()


class Scene:
    def __init__(self, server: DevServer, mount: Mount, desktop: Desktop) -> None:
        self.server, self.mount, self.desktop = server, mount, desktop
        self.folders = [str(mount.artifacts / name) for name in ARTIFACTS]
        self.proc: subprocess.Popen[bytes] | None = None

    def open(self, cmd: list[str], settings: dict[str, str] | None = None,
             shell_first: str | None = None) -> None:
        self.server.reset()  # the mount's own start-up requests are not the file manager's
        self.proc = self.desktop.run(cmd, settings or {}, shell_first)

    def alive(self) -> str | None:
        if self.proc is not None and self.proc.poll() is not None:
            return f"the file manager exited ({self.proc.returncode})"
        return None

    def wait_shown(self) -> None:
        """Until the program has listed both artifact folders (their versions' listings)."""
        wait_for(lambda: self.server.stats()["requests"]["list_versions"] >= len(ARTIFACTS),
                 SHOWN_TIMEOUT, "listing of both artifact folders", self.alive)

    def why(self) -> str:
        return f"\nmount log:\n{self.mount.log()[-4000:]}"


@pytest.fixture
def scene(dev_server: Callable[..., DevServer], mount_vm0fs: MountFactory, tmp_path: Path,
          desktop: Desktop) -> Scene:
    make_data(tmp_path / "data")
    server = dev_server(tmp_path / "data", "--bandwidth", BANDWIDTH)
    mount = mount_vm0fs(server, "--metadata-ttl", "600")
    return Scene(server, mount, desktop)


# --- the tests ------------------------------------------------------------------------------


@needs("nautilus")
@pytest.mark.parametrize("view", ["list-view", "icon-view"])
def test_nautilus_counts_items_one_download_at_a_time_per_artifact(scene: Scene,
                                                                    view: str) -> None:
    # Two windows, one per artifact: each counts the items of its version folders.
    scene.open(["nautilus", "--new-window", *scene.folders], {"default-folder-viewer": view})
    scene.wait_shown()
    versions = sum(ARTIFACTS.values())
    wait_for(lambda: scene.server.stats()["requests"]["download"] >= versions,
             COUNTED_TIMEOUT, f"{versions} downloads (Nautilus counting items)", scene.alive)
    stats = wait_quiet(scene.server, scene.alive)
    # Every version once (the count is all Nautilus asked for), never two at a time for one
    # artifact (its versions are what one window counts), one at a time for each in all.
    assert stats["requests"]["download"] == versions, stats
    assert stats["blob_peak"] <= len(ARTIFACTS), f"{stats}{scene.why()}"
    assert max(downloads_at_once(scene.mount.log()).values()) == 1, scene.why()

    state = status(scene.mount)
    assert state["listing_only_downloads"]["total"] == versions, state
    assert state["listing_only_downloads"]["queued"] == 0
    notice = state["notice"]
    assert notice is not None and notice["fix"] == GNOME_SETTING, f"{state}{scene.why()}"
    assert notice["artifact"] in ARTIFACTS
    text = scene.mount.run((scene.mount.path / ".vm0fs" / "status").read_text, timeout=30)
    assert GNOME_SETTING in text
    assert scene.mount.log().count(GNOME_SETTING) == 1, scene.why()


def downloads_at_once(log: str) -> dict[str, int]:
    """The most downloads under way at one time for each artifact, from the mount's log."""
    running: dict[str, set[str]] = {}
    owner: dict[str, str] = {}
    peak: dict[str, int] = {}
    for line in log.splitlines():
        started = re.search(r"downloading version (\w+) of artifact (\S+)", line)
        ended = re.search(r"version (\w+): \d+ members", line)
        if started:
            version, artifact = started.groups()
            owner[version] = artifact
            running.setdefault(artifact, set()).add(version)
            peak[artifact] = max(peak.get(artifact, 0), len(running[artifact]))
        elif ended and ended[1] in owner:
            running[owner[ended[1]]].discard(ended[1])
    return peak


def assert_no_download(scene: Scene) -> None:
    scene.wait_shown()
    stats = wait_quiet(scene.server, scene.alive)
    assert stats["requests"]["download"] == 0 and stats["blob_bytes"] == 0, \
        f"{stats}{scene.why()}"
    state = status(scene.mount)
    assert state["notice"] is None and state["listing_only_downloads"]["total"] == 0


@needs("nautilus")
@pytest.mark.skipif(shutil.which("gsettings") is None,
                    reason="gsettings is not installed (Debian: libglib2.0-bin)")
def test_nautilus_without_item_counts_downloads_nothing(scene: Scene) -> None:
    # The command line the notice gives, run as given.
    scene.open(["nautilus", "--new-window", *scene.folders],
               {"default-folder-viewer": "list-view"}, shell_first=GNOME_SETTING)
    assert_no_download(scene)


def history_of(scene: Scene) -> list[str]:
    """The artifacts' history/ folders: links to the version folders, named by time."""
    return [os.path.join(folder, "history") for folder in scene.folders]


@needs("pcmanfm")
@pytest.mark.parametrize("where", ["artifact", "history"])
def test_pcmanfm_downloads_nothing(scene: Scene, where: str) -> None:
    folders = scene.folders if where == "artifact" else history_of(scene)
    scene.open(["pcmanfm", "--no-desktop", *folders])
    assert_no_download(scene)


@needs("thunar")
@pytest.mark.parametrize("where", ["artifact", "history"])
def test_thunar_downloads_nothing(scene: Scene, where: str) -> None:
    folders = scene.folders if where == "artifact" else history_of(scene)
    scene.open(["thunar", *folders])
    assert_no_download(scene)


@needs("nautilus")
@pytest.mark.skipif(shutil.which("gsettings") is None,
                    reason="gsettings is not installed (Debian: libglib2.0-bin)")
def test_nautilus_without_item_counts_shows_history_without_a_download(scene: Scene) -> None:
    # With item counts on, Nautilus counts what every link in history/ points at, as it
    # counts the version folders of an artifact's folder (the README says so).
    scene.open(["nautilus", "--new-window", *history_of(scene)],
               {"default-folder-viewer": "list-view"}, shell_first=GNOME_SETTING)
    assert_no_download(scene)
