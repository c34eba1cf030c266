"""Shared fixtures. `dev_server` starts `vm0fs dev-server` as a real subprocess:

    def test_x(dev_server, tmp_path):
        srv = dev_server(tmp_path / "data", "--camel-case")    # extra CLI args
        with srv.client() as c:                                # httpx.Client, auth + timeout set
            c.get("/v1/artifacts")
        srv.set_faults(fail_every=3); srv.stats(); srv.reset(); srv.stop()

Every server a test starts is stopped when the test ends. Outside the fixture (for instance in a
module- or session-scoped fixture) use `start_dev_server(...)` and call `.stop()` yourself.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

# Shared test helpers get pytest's assert messages; this must run before any test imports them.
pytest.register_assert_rewrite("archives", "mounting")

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 20.0
HTTP_TIMEOUT = 10.0
_LINE = re.compile(r"vm0fs dev-server: listening on (http://\S+) \(blobs on (http://\S+)\)")


@dataclass
class DevServer:
    proc: subprocess.Popen[str]
    url: str
    blob_url: str
    token: str
    data_dir: Path
    log_path: Path
    own_log: bool = False  # a temporary log of ours: removed by `stop`

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, *, auth: bool = True, **kwargs: Any) -> httpx.Client:
        """A client on the API origin, with the bearer token (unless auth=False)."""
        kwargs.setdefault("timeout", HTTP_TIMEOUT)
        return httpx.Client(base_url=self.url, headers=self.auth if auth else {}, **kwargs)

    def _control(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        r = httpx.request(method, self.url + path, json=body, timeout=HTTP_TIMEOUT)
        r.raise_for_status()
        return r.json()

    def stats(self) -> dict[str, Any]:
        return self._control("GET", "/_dev/stats")

    def reset(self) -> None:
        self._control("POST", "/_dev/reset")

    def faults(self) -> dict[str, Any]:
        return self._control("GET", "/_dev/faults")

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        return self._control("POST", "/_dev/faults", faults)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, bounded wait, then SIGKILL. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self.proc.stdout:
            self.proc.stdout.close()
        if self.own_log:
            self.log_path.unlink(missing_ok=True)
        return self.proc.returncode


def start_dev_server(
    data_dir: Path,
    *args: str,
    token: str | None = "dev-token",
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    timeout: float = START_TIMEOUT,
) -> DevServer:
    """Start the server and wait (bounded) for its one stdout line. token=None leaves --token
    out, so the server falls back to $VM0_API_KEY (from `env`) or dev-token. Without `log_path`, its
stderr goes to a temporary file that `stop` removes."""
    cmd = [sys.executable, "-m", "vm0fs.cli", "dev-server", "--data-dir", str(data_dir), *args]
    if token is not None:
        cmd += ["--token", token]
    full_env = {**os.environ, **(env or {})}
    if env is None or "VM0_API_KEY" not in env:
        full_env.pop("VM0_API_KEY", None)  # the developer's real key must not leak in
    own_log = log_path is None
    if log_path is None:  # removed again by `stop`
        fd, name = tempfile.mkstemp(prefix="vm0fs-dev-server-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    with log_path.open("w") as log:  # stderr to a file: an unread pipe could block the server
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        line = ""
    m = _LINE.fullmatch(line.strip())
    if not m:
        proc.kill()
        proc.wait(10)
        said = log_path.read_text(errors="replace")
        if own_log:
            log_path.unlink(missing_ok=True)
        raise RuntimeError(f"dev-server did not start (line {line!r}, exit {proc.returncode}): "
                           + said)
    real_token = token or full_env.get("VM0_API_KEY") or "dev-token"
    return DevServer(proc, m[1], m[2], real_token, Path(data_dir), log_path, own_log)


@pytest.fixture
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., DevServer]]:
    """Factory: dev_server(data_dir, *extra_args, token=..., env=...) -> DevServer."""
    servers: list[DevServer] = []

    def start(data_dir: Path, *args: str, **kwargs: Any) -> DevServer:
        kwargs.setdefault("log_path", tmp_path_factory.mktemp("dev-server") / "stderr.log")
        server = start_dev_server(data_dir, *args, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
