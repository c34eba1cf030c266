"""Real FUSE mounts of vm0fs for the tests, started as `python -m vm0fs.cli mount` subprocesses.

    def test_x(mount_vm0fs, dev_server, tmp_path):
        srv = dev_server(tmp_path / "data")
        m = mount_vm0fs(srv, "--metadata-ttl", "1")       # waits (bounded) until it answers
        names = m.run(os.listdir, m.path / "artifacts")   # a bounded call into the mount
        m.unmount()                                       # clean, checks the exit status

Fixtures: `mount_vm0fs` (mounts end with the test) and `module_mount_vm0fs` (end with the module).
Register them in a test module with `pytest_plugins = ["mounting"]`.

Nothing is ever left behind: every mount is cleaned up when its fixture ends (lazy unmount,
SIGTERM, bounded wait, SIGKILL), the mount process gets SIGTERM if the test process dies
(PR_SET_PDEATHSIG), and a watchdog process lazily unmounts and kills whatever is still
registered when the test process goes away without cleaning up (a crash, os._exit, SIGKILL).
Calls into a mount that could hang go through `bounded`/`Mount.run`: on timeout the mount is
torn down (which ends the stuck system call with ENOTCONN) and the test fails with its log.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parents[1]
MOUNT_TIMEOUT = 30.0  # until a new mount answers
STOP_TIMEOUT = 10.0  # each step of a clean-up
OP_TIMEOUT = 60.0  # default bound of one call into a mount
SERVER_TOKEN = object()  # default of `token`: the server's own
CLI = [sys.executable, "-m", "vm0fs.cli"]

R = TypeVar("R")


# --- the watchdog ---------------------------------------------------------------------------

_WATCHDOG_SCRIPT = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    live = {}
    for line in sys.stdin:
        op, pid, path = line.rstrip("\\n").split("\\t")
        if op == "add":
            live[(pid, path)] = True
        else:
            live.pop((pid, path), None)
    # stdin closed: the test process is gone. Clean up what it did not.
    for pid, path in live:
        if path:
            try:
                subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True, timeout=10)
            except Exception:
                pass
        if pid:
            try:
                os.kill(int(pid), signal.SIGTERM)
            except OSError:
                pass
    if live:
        time.sleep(3)
    for pid, path in live:
        if pid:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
""")


class _Watchdog:
    """A detached process that cleans up registered mounts/processes once our stdin pipe closes
    (the pipe closes however the test process ends)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()

    def _send(self, op: str, pid: int | None, path: Path | None) -> None:
        with self._lock:
            if self._proc is None:
                self._proc = subprocess.Popen(
                    [sys.executable, "-c", _WATCHDOG_SCRIPT], stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
                    start_new_session=True,  # survives a Ctrl-C to the test's process group
                )
            assert self._proc.stdin is not None
            self._proc.stdin.write(f"{op}\t{pid or ''}\t{path or ''}\n")
            self._proc.stdin.flush()

    def add(self, pid: int | None, path: Path | None = None) -> None:
        self._send("add", pid, path)

    def remove(self, pid: int | None, path: Path | None = None) -> None:
        self._send("del", pid, path)


watchdog = _Watchdog()


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM (a clean unmount) when the test process dies."""
    with contextlib.suppress(Exception):  # best effort; the watchdog still cleans up
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# --- mount table ----------------------------------------------------------------------------


def _unescape(field_: str) -> str:
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field_ = field_.replace(code, char)
    return field_


def mounted_paths() -> dict[str, str]:
    """Mount point -> fs type, from /proc/mounts (never blocks, unlike a stat of a dead mount)."""
    out = {}
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                out[_unescape(parts[1])] = parts[2]
    return out


def is_mounted(path: Path | str) -> bool:
    return os.path.abspath(path) in mounted_paths()


def lazy_unmount(path: Path | str) -> None:
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True,
                       timeout=STOP_TIMEOUT)


def stop_process(proc: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT) -> int | None:
    """SIGTERM, bounded wait, SIGKILL, bounded wait. Returns the exit status."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(OSError):
            os.kill(proc.pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
    return proc.returncode


def stop_pid(pid: int, timeout: float = STOP_TIMEOUT) -> None:
    """The same for a process we did not start directly (the background mount's child)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def pids_using(path: Path) -> list[int]:
    """Processes whose command line names `path` (our mount points are unique temp folders)."""
    needle = os.fsencode(str(path))
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if needle in args:
            found.append(int(entry))
    return found


# --- bounded calls --------------------------------------------------------------------------


class Hung(AssertionError):
    """A call into a mount did not return in time."""


def bounded(fn: Callable[..., R], *args: Any, timeout: float = OP_TIMEOUT,
            on_timeout: Callable[[], str] | None = None, **kwargs: Any) -> R:
    """fn(*args, **kwargs) in a worker thread, waited for at most `timeout` seconds. On timeout,
    `on_timeout` (which should tear the mount down, unblocking the thread) runs and Hung is
    raised with what it returns. Exceptions of fn are re-raised here."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    worker = threading.Thread(target=run, daemon=True, name=f"bounded {fn.__name__}")
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        detail = on_timeout() if on_timeout else ""
        worker.join(STOP_TIMEOUT)
        raise Hung(f"{getattr(fn, '__name__', fn)}{args!r} did not return within {timeout} s"
                   f"\n{detail}")
    if "error" in box:
        raise box["error"]
    return box["value"]


# --- mounts ---------------------------------------------------------------------------------


@dataclass
class Mount:
    path: Path
    proc: subprocess.Popen[bytes]
    cache_dir: Path
    log_path: Path
    args: list[str] = field(default_factory=list)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def artifacts(self) -> Path:
        return self.path / "artifacts"

    def run(self, fn: Callable[..., R], *args: Any, timeout: float = OP_TIMEOUT,
            **kwargs: Any) -> R:
        """A bounded call into this mount; a hang tears the mount down and fails the test."""
        return bounded(fn, *args, timeout=timeout, on_timeout=self._abort, **kwargs)

    def _abort(self) -> str:
        self.cleanup()
        return f"vm0fs mount log:\n{self.log()}"

    def unmount(self, timeout: float = 20.0) -> int | None:
        """Unmount cleanly (fusermount3 -u) and wait for the process: returns its exit status,
        which a clean unmount makes 0. Falls back to `cleanup` if anything goes wrong."""
        try:
            if is_mounted(self.path):
                result = subprocess.run(["fusermount3", "-u", str(self.path)],
                                        capture_output=True, text=True, timeout=timeout)
                assert result.returncode == 0, f"fusermount3 -u failed: {result.stderr}"
            self.proc.wait(timeout)
        finally:
            self.cleanup()
        return self.proc.returncode

    def cleanup(self) -> None:
        """Whatever state it is in: lazy unmount, stop the process, never raise."""
        with contextlib.suppress(Exception):  # clean-up goes on regardless
            lazy_unmount(self.path)
        stop_process(self.proc)
        with contextlib.suppress(Exception):  # a killed process leaves a dead mount behind
            lazy_unmount(self.path)
        if self.proc.returncode is not None:
            watchdog.remove(self.proc.pid, self.path)


def mount_env(token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VM0_API_KEY", "VM0_API_URL")}
    if token is not None:
        env["VM0_API_KEY"] = token
    return env


def start_mount(api_url: str, token: str | None, mountpoint: Path, cache_dir: Path,
                *extra_args: str, log_path: Path | None = None,
                timeout: float = MOUNT_TIMEOUT) -> Mount:
    """Start `vm0fs mount --foreground` and wait until the mount answers. On failure, nothing is
    left behind and the error carries the process's stderr."""
    args = [*CLI, "mount", str(mountpoint), "--foreground", "--api-url", api_url,
            "--cache-dir", str(cache_dir), *extra_args]
    log_path = log_path or cache_dir.parent / f"{mountpoint.name}.stderr.log"
    with open(log_path, "wb") as log:  # a file, not a pipe: an unread pipe could block it
        proc = subprocess.Popen(args, cwd=REPO, env=mount_env(token), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, preexec_fn=_die_with_parent)
    watchdog.add(proc.pid, mountpoint)
    mount = Mount(mountpoint, proc, cache_dir, log_path, args)
    try:
        deadline = time.monotonic() + timeout
        while not is_mounted(mountpoint):
            if proc.poll() is not None:
                raise AssertionError(
                    f"vm0fs mount exited with {proc.returncode} before mounting:\n{mount.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"vm0fs mount did not mount within {timeout} s:\n"
                                     f"{mount.log()}")
            time.sleep(0.05)
        # Mounted; now it must answer (a stat of the root goes through FUSE).
        answered = bounded(os.path.ismount, mountpoint, timeout=timeout)
        assert answered, f"{mountpoint} is in /proc/mounts but not a mount point"
    except BaseException:
        mount.cleanup()
        raise
    return mount


class MountFactory:
    """Makes mounts in fresh temp folders and cleans every one of them up in `close`."""

    def __init__(self, tmp: pytest.TempPathFactory) -> None:
        self.tmp = tmp
        self.mounts: list[Mount] = []

    def __call__(self, server: Any, *extra_args: str, cache_dir: Path | None = None,
                 token: str | None | object = SERVER_TOKEN, api_url: str | None = None) -> Mount:
        base = self.tmp.mktemp("vm0fs-mount")
        mountpoint = base / "mnt"
        mountpoint.mkdir()
        if cache_dir is None:
            cache_dir = base / "cache"
        mount = start_mount(api_url or server.url, server.token if token is SERVER_TOKEN else token,  # type: ignore[arg-type]
                            mountpoint, cache_dir, *extra_args, log_path=base / "stderr.log")
        self.mounts.append(mount)
        return mount

    def close(self) -> None:
        for mount in self.mounts:
            mount.cleanup()
        self.mounts.clear()


@pytest.fixture
def mount_vm0fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountFactory]:
    """mount_vm0fs(server, *extra_args, cache_dir=None, token=server.token) -> Mount."""
    factory = MountFactory(tmp_path_factory)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def module_mount_vm0fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountFactory]:
    """The same, for module-scoped fixtures: the mounts end with the module."""
    factory = MountFactory(tmp_path_factory)
    try:
        yield factory
    finally:
        factory.close()


# --- the CLI --------------------------------------------------------------------------------


def run_cli(*args: str, token: str | None = None, timeout: float = 90.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`vm0fs ARGS` to completion (bounded); VM0_API_KEY is `token` (unset when None)."""
    return subprocess.run([*CLI, *args], cwd=REPO, env={**mount_env(token), **(env or {})},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=_die_with_parent)
