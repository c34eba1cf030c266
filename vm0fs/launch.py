"""The mount process's life around `mount.serve`: how a mount process starts, where its key
and its log go, and how the command that started it learns that it answers.

- `vm0fs mount` (background) proves the cache folder ours, opens the log file, starts `vm0fs
  mount --foreground` detached with the key in a pipe (never argv or the environment: `ps e`
  would show those) and a ready pipe, and waits until the child writes `ready` or `error
  <message>`, or ends.
- `vm0fs mount --foreground` with the key in its environment becomes the same process again
  (exec, same pid) with the key in a pipe: /proc/PID/environ keeps a process's starting
  environment for good.
- The process that serves sets up logging, runs `mount.serve` under trio, and tells a waiting
  parent how its start went.

Standard library only at import time, so that `vm0fs mount` starts fast: only the process that
serves loads pyfuse3, trio and httpx. Messages come back as strings; `cli` prints them.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

from vm0fs.mountpoint import MountConfig

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0  # seconds the background mount may take to answer
# How vm0fs runs itself. -P: not with the current folder first on sys.path, where a folder
# named `vm0fs` (a clone, say) would be imported instead of vm0fs.
SELF = [sys.executable, "-P", "-m", "vm0fs.cli"]


def setup_logging(debug: bool, log_file: Path | None) -> None:
    if log_file is not None:  # owner-only: logs name artifacts and paths
        os.close(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    handler: logging.Handler = (logging.FileHandler(log_file) if log_file
                                else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # httpx logs whole URLs, and presigned URLs are credentials.
    for noisy in ("httpx", "httpcore", "trio", "pyfuse3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# -- the key -------------------------------------------------------------------------------


def key_pipe(key: str) -> int:
    """A pipe that holds the key, for a process we start: its read end."""
    read_end, write_end = os.pipe()
    os.write(write_end, key.encode() + b"\n")  # a key is far smaller than a pipe's buffer
    os.close(write_end)
    return read_end


def read_key(fd: int) -> str:
    with os.fdopen(fd, "rb") as pipe:
        return pipe.read().decode().strip()


def reexec_without_key(key: str, argv: list[str]) -> NoReturn:
    """Become the same mount (same pid) with the key in a pipe instead of the environment."""
    fd = key_pipe(key)
    os.set_inheritable(fd, True)
    env = {k: v for k, v in os.environ.items() if k != "VM0_API_KEY"}
    os.execve(sys.executable, [*SELF, *argv, "--key-fd", str(fd)], env)


# -- the ready handshake -------------------------------------------------------------------


class Handshake:
    """The serving side of the ready pipe: tells a waiting `vm0fs mount` how the start went,
    once. Without a pipe (started by hand, in the foreground) there is no one to tell."""

    def __init__(self, ready_fd: int | None) -> None:
        self.fd = ready_fd

    @property
    def waiting(self) -> bool:
        """Whether a background `vm0fs mount` waits to hear from this process."""
        return self.fd is not None

    def tell(self, error: str | None) -> bool:
        """`ready`, or the error; True when someone waited to hear it (the log gets the
        error with a timestamp: the parent tells the user)."""
        if self.fd is None:
            return False
        try:
            os.write(self.fd, b"ready\n" if error is None else f"error {error}\n".encode())
            os.close(self.fd)
        except OSError:
            pass
        self.fd = None
        if error is not None:
            log.error("%s", error)
        return True


def serve_in_foreground(config: MountConfig, handshake: Handshake) -> str | None:
    """Serve the mount until it is unmounted or interrupted: None, or why it failed (in one
    line). A waiting parent hears `ready` once the mount answers."""
    import trio

    from vm0fs.errors import Vm0fsError
    from vm0fs.mount import serve

    try:
        trio.run(serve, config, lambda: handshake.tell(None))
    except KeyboardInterrupt:
        return None
    except Vm0fsError as exc:
        log.debug("mount failed", exc_info=True)
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - the waiting parent must hear why, in one line
        log.exception("mount failed")
        return f"unexpected {type(exc).__name__}: {exc} (the log has the details)"
    return None


# -- the background launch -----------------------------------------------------------------


def start_in_background(config: MountConfig, log_file: Path, flags: list[str]) -> str | None:
    """Start `vm0fs mount --foreground` detached (with `flags`, the options it was given) and
    wait until it answers: None, or why it did not mount."""
    from vm0fs.cache import Cache
    from vm0fs.errors import CacheError

    try:
        Cache(config.cache_dir)  # made, or proved ours, before its log file goes in
    except CacheError as exc:
        return str(exc)
    try:
        out = os.fdopen(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
    except OSError as exc:
        return f"cannot write the log file {log_file}: {exc.strerror}"
    read_end, write_end = os.pipe()
    key_fd = key_pipe(config.api_key)
    argv = [*SELF, "mount", str(config.mountpoint), "--foreground", "--key-fd", str(key_fd),
            "--ready-fd", str(write_end), "--log-file", str(log_file), *flags]
    env = {k: v for k, v in os.environ.items() if k != "VM0_API_KEY"}
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                             pass_fds=(write_end, key_fd), start_new_session=True, cwd="/")
    os.close(write_end)
    os.close(key_fd)
    out.close()
    message = _wait_ready(read_end, child)
    if message == "ready":
        return None
    if message.startswith("error "):
        return message.removeprefix("error ")
    return f"the mount process ended without mounting ({message}); see {log_file}"


def _wait_ready(fd: int, child: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + READY_TIMEOUT
    data = b""
    try:
        while time.monotonic() < deadline:
            readable, _, _ = select.select([fd], [], [], 0.5)
            if readable:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                data += chunk
                if b"\n" in data:
                    return data.split(b"\n", 1)[0].decode(errors="replace")
            elif child.poll() is not None:
                break
        else:
            return "it did not answer within a minute"
    finally:
        os.close(fd)
    status = child.wait(timeout=5) if child.poll() is None else child.returncode
    return f"exit status {status}"
