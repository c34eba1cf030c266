"""Listings at scale: vm0fs over thousands of artifacts behind an API that takes 100 ms a request.

    scripts/scale [--artifacts N] [--latency-ms MS] [--ls-l-latency-ms MS] [--ttl S] [--reps N]
                  [--only NAME,...] [--work-dir DIR] [--json PATH] [--vm0fs PATH]

It builds its own data (N artifacts of one tiny version each, kept in WORK/data-N and reused),
serves it with `vm0fs dev-server` with the fault `latency_ms` added to every request (and
`--rescan-after 3600`: the data does not change during a run, and a request then costs that
latency and not the server's scan of thousands of folders, 0.1-0.3 s here, which is the test
server's cost, not the service's), counts the API's requests with `/_dev/stats`, and measures:

  mount    `vm0fs mount` (in the background: it returns once the mount answers) with a fresh
           cache, and the requests made until it returned; then the first `ls artifacts/`,
           which waits for the first walk of the list (nothing is known before it)
  ls       `ls artifacts/` once the metadata TTL has passed: the last list answers while a
           walk runs behind it; and the requests that walk made
  lsl      `ls -l artifacts/*/` once the TTL has passed (the glob's `ls artifacts/` included),
           at --ls-l-latency-ms (default 0: every folder is opened one after another, 5,000 of
           them at 100 ms would take many minutes; the requests are counted, not timed). Target:
           at most 2 requests per artifact (its record and its versions) plus one walk of the
           list (the glob's)

Every mount uses `--metadata-ttl` --ttl (default 5). Timed rows are repeated --reps times
(median and min-max). --vm0fs runs another build's `vm0fs` for the mounts (the dev-server is
always this one's), to compare. Everything this script mounts or starts is unmounted and
stopped on the way out, also on errors and Ctrl-C. Exit status: 0 when every phase ran (FAIL
rows included: they are findings), 1 when one failed, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gzip
import io
import json
import math
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VM0FS = str(REPO / ".venv" / "bin" / "vm0fs")
TOKEN = "scale-token"
EPOCH = 1735689600  # 2025-01-01T00:00:00Z
DATA_FORMAT = 1  # bump whenever the generator changes: the data is rebuilt
PHASES = ("mount", "ls", "lsl")
PAGE = 100  # the API's page size
CMD_TIMEOUT = 1800.0
MOUNT_TIMEOUT = 120.0
STOP_TIMEOUT = 15.0
SERVER_TIMEOUT = 60.0
IDLE = 1.5  # seconds without a request: background refreshes have ended


class ScaleError(Exception):
    """A step failed; the message says which and why."""


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- data ------------------------------------------------------------------------------------


def tiny_archive(index: int) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        body = f"artifact {index}\n".encode()
        info = tarfile.TarInfo("notes.txt")
        info.size, info.mtime, info.mode = len(body), EPOCH + index, 0o644
        tar.addfile(info, io.BytesIO(body))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def prepare_data(root: Path, n: int) -> Path:
    """WORK/data-N: one folder per artifact, one archive each; built once, then reused."""
    data = root / f"data-{n}"
    stamp = data / ".scale-data"
    if stamp.exists() and stamp.read_text() == f"{DATA_FORMAT} {n}\n":
        return data
    say(f"scale: writing {n} artifacts to {data}")
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    for i in range(n):
        folder = data / f"artifact-{i:05d}"
        folder.mkdir()
        archive = folder / "v1.tar.gz"
        archive.write_bytes(tiny_archive(i))
        os.utime(archive, (EPOCH + i, EPOCH + i))
    stamp.write_text(f"{DATA_FORMAT} {n}\n")
    return data


# --- processes -------------------------------------------------------------------------------


def fuse_mounts() -> set[Path]:
    found: set[Path] = set()
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2].startswith("fuse"):
                found.add(Path(fields[1].encode().decode("unicode_escape")))
    return found


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not process_alive(pid)


def find_mount_pid(mountpoint: Path) -> int | None:
    """The pid of the `vm0fs mount --foreground` process serving mountpoint."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"mount" in argv and b"--foreground" in argv and str(mountpoint).encode() in argv:
            return int(entry.name)
    return None


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str = ""

    def call(self, path: str, method: str = "GET", body: dict[str, Any] | None = None,
             auth: bool = False) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if auth:
            request.add_header("Authorization", f"Bearer {TOKEN}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    def requests(self) -> dict[str, int]:
        counts = self.call("/_dev/stats")["requests"]
        return {route: n for route, n in counts.items() if route not in ("download", "blob")}

    def reset(self) -> None:
        self.call("/_dev/reset", "POST")

    def latency(self, ms: float) -> None:
        self.call("/_dev/faults", "POST", {"latency_ms": ms})

    def wait_idle(self, timeout: float = 600.0) -> None:
        """Until no request came for IDLE seconds: the mount's background refreshes ended."""
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            total = sum(self.requests().values())
            if total != last:
                last, since = total, time.monotonic()
            elif time.monotonic() - since >= IDLE:
                return
            time.sleep(0.2)
        raise ScaleError(f"the API still got requests after {timeout:.0f} s")


@dataclass
class Processes:
    """Everything this run started or mounted, so that it can all be undone (idempotently)."""

    vm0fs: str
    rescan_after: float
    servers: list[Server] = field(default_factory=list)
    mounts: dict[Path, int | None] = field(default_factory=dict)

    def start_server(self, data: Path, log: Path) -> Server:
        with log.open("ab") as err:
            proc = subprocess.Popen(
                [VM0FS, "dev-server", "--data-dir", str(data), "--token", TOKEN,
                 "--rescan-after", f"{self.rescan_after:g}"],
                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                start_new_session=True)
        server = Server(proc)
        self.servers.append(server)
        assert proc.stdout is not None
        line = b""
        deadline = time.monotonic() + SERVER_TIMEOUT
        while b"\n" not in line and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                line += chunk
        text = line.decode(errors="replace")
        if "listening on " not in text:
            raise ScaleError(f"the dev-server did not start (see {log}): {text.strip()!r}")
        server.url = text.split("listening on ", 1)[1].split()[0]
        return server

    def mount(self, mountpoint: Path, cache: Path, server: Server, ttl: float,
              log: Path) -> float:
        """`vm0fs mount` in the background; the seconds until it returned (mounted)."""
        mountpoint.mkdir(parents=True, exist_ok=True)
        cmd = [self.vm0fs, "mount", str(mountpoint), "--api-url", server.url, "--cache-dir",
               str(cache), "--metadata-ttl", f"{ttl:g}", "--log-file", str(log)]
        self.mounts[mountpoint] = None
        started = time.perf_counter()
        try:
            # Not from a checkout: the mount process runs `python -m vm0fs.cli`, which would
            # import the vm0fs of the current folder rather than the one of --vm0fs.
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=MOUNT_TIMEOUT,
                                    env=dict(os.environ, VM0_API_KEY=TOKEN),
                                    cwd=mountpoint.parent)
        finally:
            self.mounts[mountpoint] = find_mount_pid(mountpoint)
        took = time.perf_counter() - started
        if result.returncode != 0:
            raise ScaleError(f"vm0fs mount exited {result.returncode}: {result.stderr.strip()}")
        if mountpoint not in fuse_mounts():
            raise ScaleError(f"`vm0fs mount` returned but {mountpoint} is not mounted")
        return took

    def unmount(self, mountpoint: Path) -> None:
        pid = self.mounts.pop(mountpoint, None)
        if mountpoint in fuse_mounts():
            result = subprocess.run([self.vm0fs, "unmount", str(mountpoint)],
                                    capture_output=True, timeout=STOP_TIMEOUT + 5)
            if result.returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)],
                               capture_output=True, timeout=STOP_TIMEOUT)
        if pid is not None and not wait_gone(pid, STOP_TIMEOUT):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not wait_gone(pid, STOP_TIMEOUT):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def stop_server(self, server: Server) -> None:
        if server in self.servers:
            self.servers.remove(server)
        if server.proc.poll() is None:
            server.proc.terminate()
            try:
                server.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait(STOP_TIMEOUT)
        if server.proc.stdout is not None:
            server.proc.stdout.close()

    def cleanup(self) -> None:
        for mountpoint in list(self.mounts):
            with contextlib.suppress(Exception):
                self.unmount(mountpoint)
        for server in list(self.servers):
            with contextlib.suppress(Exception):
                self.stop_server(server)


# --- measurements ----------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    unit: str  # "s" or "req"
    samples: list[float]
    target: str = ""
    check: Callable[[float], bool] | None = None  # on the median
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def passed(self) -> bool | None:
        return None if self.check is None or not self.samples else self.check(self.median)


def timed(cmd: Sequence[str], cwd: Path | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=CMD_TIMEOUT,
                            cwd=cwd)
    took = time.perf_counter() - started
    if result.returncode != 0:
        raise ScaleError(f"`{' '.join(cmd)}` exited {result.returncode}: "
                         f"{result.stderr.strip()[-300:]}")
    return took, result.stdout


class Scale:
    def __init__(self, args: argparse.Namespace, data: Path, procs: Processes,
                 run_dir: Path) -> None:
        self.args = args
        self.n = args.artifacts
        self.pages = max(1, math.ceil(self.n / PAGE))
        self.data = data
        self.procs = procs
        self.run_dir = run_dir
        self.rows: list[Row] = []
        self.errors: dict[str, str] = {}
        self.extra: dict[str, Any] = {}
        self.server: Server | None = None
        self.mountpoint: Path | None = None  # a mount that answers, for the later phases

    def run(self, phases: Sequence[str]) -> None:
        self.server = self.procs.start_server(self.data, self.run_dir / "server.log")
        say("scale: the dev-server reads the archives once")
        self.server.call("/v1/artifacts?limit=1", auth=True)
        for name in phases:
            say(f"scale: {name}")
            try:
                getattr(self, name)()
            except ScaleError as exc:
                self.errors[name] = str(exc)
                say(f"scale: {name} failed: {exc}")

    def mounted(self) -> Path:
        """A mount whose first walk has ended (made by `mount`, or now)."""
        assert self.server is not None
        if self.mountpoint is None:
            self.server.latency(self.args.latency_ms)
            mp = self.run_dir / "mnt-shared"
            self.procs.mount(mp, self.run_dir / "cache-shared", self.server, self.args.ttl,
                             self.run_dir / "mount-shared.log")
            timed(["ls", str(mp / "artifacts")])
            self.mountpoint = mp
        return self.mountpoint

    def mount(self) -> None:
        assert self.server is not None
        server = self.server
        server.latency(self.args.latency_ms)
        # Each mount is followed by one over a single artifact: what starting the process
        # costs, measured under the same load.
        one = self.procs.start_server(prepare_data(self.run_dir.parent, 1),
                                      self.run_dir / "server-one.log")
        one.latency(self.args.latency_ms)
        took: list[float] = []
        alone: list[float] = []
        at_return: list[float] = []
        first_ls: list[float] = []
        walk: list[float] = []
        try:
            for rep in range(self.args.reps):
                mp = self.run_dir / f"mnt-{rep}"
                server.wait_idle()
                server.reset()
                took.append(self.procs.mount(mp, self.run_dir / f"cache-{rep}", server,
                                             self.args.ttl, self.run_dir / f"mount-{rep}.log"))
                at_return.append(server.requests()["list_artifacts"])
                seconds, out = timed(["ls", str(mp / "artifacts")])
                if len(out.splitlines()) != self.n:
                    raise ScaleError(f"ls artifacts/ showed {len(out.splitlines())} entries, "
                                     f"not {self.n}")
                first_ls.append(seconds)
                server.wait_idle()
                walk.append(server.requests()["list_artifacts"])
                if self.mountpoint is None:
                    self.mountpoint = mp  # kept for the next phases
                else:
                    self.procs.unmount(mp)
                small = self.run_dir / f"mnt-one-{rep}"
                alone.append(self.procs.mount(small, self.run_dir / f"cache-one-{rep}", one,
                                              self.args.ttl, self.run_dir / "mount-one.log"))
                self.procs.unmount(small)
        finally:
            self.procs.stop_server(one)
        ms = self.args.latency_ms
        self.rows.append(Row(f"`vm0fs mount`, {self.n} artifacts, {ms:g} ms a request", "s",
                             took, "< 1 s", lambda v: v < 1.0))
        self.rows.append(Row("  the same with 1 artifact (starting the process)", "s", alone))
        self.rows.append(Row("  list requests made when it returned", "req", at_return,
                             "O(1)", lambda v: v <= 2))
        self.rows.append(Row("first `ls artifacts/` (waits for the first walk)", "s", first_ls,
                             note="nothing is known before it"))
        self.rows.append(Row("  list requests from mount to the walk's end", "req", walk,
                             f"= {self.pages} pages", lambda v: v == self.pages))

    def ls(self) -> None:
        assert self.server is not None
        server = self.server
        mp = self.mounted()
        server.latency(self.args.latency_ms)
        took: list[float] = []
        walk: list[float] = []
        for _ in range(self.args.reps):
            server.wait_idle()
            time.sleep(self.args.ttl + 0.5)
            server.reset()
            seconds, out = timed(["ls", str(mp / "artifacts")])
            if len(out.splitlines()) != self.n:
                raise ScaleError(f"ls artifacts/ showed {len(out.splitlines())} entries")
            took.append(seconds)
            server.wait_idle()
            walk.append(server.requests()["list_artifacts"])
        self.rows.append(Row(f"`ls artifacts/` after the TTL, {self.args.latency_ms:g} ms a "
                             f"request", "s", took, "< 0.5 s", lambda v: v < 0.5))
        self.rows.append(Row("  list requests of the walk behind it", "req", walk,
                             f"= {self.pages} pages", lambda v: v == self.pages))

    def lsl(self) -> None:
        assert self.server is not None
        server = self.server
        mp = self.mounted()
        server.latency(self.args.ls_l_latency_ms)
        server.wait_idle()
        time.sleep(self.args.ttl + 0.5)
        server.reset()
        seconds, _ = timed(["sh", "-c", "ls -l artifacts/*/ > /dev/null"], cwd=mp)
        server.wait_idle()
        counts = server.requests()
        total = sum(counts.values())
        budget = 2 * self.n + self.pages
        self.extra["ls_l_requests"] = counts
        self.rows.append(Row(f"`ls -l artifacts/*/`, TTL {self.args.ttl:g} s: API requests",
                             "req", [total], f"<= {budget} (2 x {self.n} + {self.pages})",
                             lambda v: v <= budget,
                             note=", ".join(f"{k} {v}" for k, v in counts.items())))
        self.rows.append(Row(f"  its time, {self.args.ls_l_latency_ms:g} ms a request", "s",
                             [seconds]))


# --- report ----------------------------------------------------------------------------------


def fmt(samples: list[float], unit: str) -> str:
    if not samples:
        return "-"
    med, lo, hi = statistics.median(samples), min(samples), max(samples)

    def num(x: float) -> str:
        if unit == "req":
            return f"{x:g}"
        if x < 1:
            return f"{x * 1000:.0f} ms"
        return f"{x:.2f} s"

    text = num(med)
    if len(samples) > 1 and lo != hi:
        text += f" ({num(lo)}-{num(hi)})"
    return text


def table(rows: list[Row], errors: dict[str, str]) -> str:
    head = ["measurement", "median (min-max)", "target", "result", "note"]
    lines = [head]
    for row in rows:
        result = {True: "PASS", False: "FAIL", None: "-"}[row.passed]
        lines.append([row.name, fmt(row.samples, row.unit), row.target or "-", result,
                      row.note])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    for phase, message in errors.items():
        out.append(f"{phase}: ERROR {message}")
    return "\n".join(out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/scale", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="phases: " + ", ".join(PHASES))
    p.add_argument("--artifacts", type=int, default=5000)
    p.add_argument("--latency-ms", type=float, default=100.0,
                   help="added to every API request (default 100)")
    p.add_argument("--ls-l-latency-ms", type=float, default=0.0,
                   help="the same, while `ls -l artifacts/*/` runs (default 0)")
    p.add_argument("--ttl", type=float, default=5.0, help="--metadata-ttl of the mounts")
    p.add_argument("--server-rescan-after", type=float, default=3600.0, metavar="S",
                   help="the dev-server's --rescan-after (default 3600: the data does not change "
                        "during a run, and a list request then costs its latency, not a scan "
                        "of every folder; 0: rescan at every request)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only", default="", metavar="NAME,...", help="run only these phases")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/vm0fs-scale"))
    p.add_argument("--json", type=Path, default=REPO / "bench-results" / "scale.json")
    p.add_argument("--vm0fs", default=VM0FS, help="the vm0fs to mount with (default: this one)")
    args = p.parse_args(argv)
    if args.artifacts < 1 or args.reps < 1 or args.ttl <= 0:
        p.error("--artifacts, --reps and --ttl must be positive")
    unknown = {n for n in args.only.split(",") if n} - set(PHASES)
    if unknown:
        p.error(f"unknown phase(s) {', '.join(sorted(unknown))}; known: {', '.join(PHASES)}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    phases = [n for n in PHASES if n in args.only.split(",")] if args.only else list(PHASES)
    root = args.work_dir.expanduser().absolute()
    run_dir = root / "run"
    procs = Processes(args.vm0fs, args.server_rescan_after)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    atexit.register(procs.cleanup)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        for mountpoint in fuse_mounts():  # left by a run that was killed hard
            if root in mountpoint.parents:
                subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], timeout=30)
        if any(root in m.parents for m in fuse_mounts()):
            raise ScaleError(f"something is still mounted under {root}")
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        data = prepare_data(root, args.artifacts)
        scale = Scale(args, data, procs, run_dir)
        scale.run(phases)
    except KeyboardInterrupt:
        say("scale: interrupted: unmounted and stopped everything")
        return 130
    except ScaleError as exc:
        say(f"scale: {exc}")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop clean-up
        procs.cleanup()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    date = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"vm0fs scale: {date}, {len(os.sched_getaffinity(0))} CPUs, load "
          f"{os.getloadavg()[0]:.1f}, {args.artifacts} artifacts, --metadata-ttl {args.ttl:g}, "
          f"{args.reps} repetitions, dev-server --rescan-after {args.server_rescan_after:g}, "
          f"{args.vm0fs}")
    print(table(scale.rows, scale.errors))
    result = {
        "date": date,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": [{"name": r.name, "unit": r.unit, "samples": r.samples, "target": r.target,
                  "passed": r.passed, "note": r.note} for r in scale.rows],
        "errors": scale.errors,
        "extra": scale.extra,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {args.json}")
    return 1 if scale.errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
