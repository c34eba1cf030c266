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
import gzip
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The benchmark's processes (dev-servers, mounts) and their clean-up, and its table layout.
from bench import (  # noqa: E402
    EPOCH,
    REPO,
    TOKEN,
    VM0FS,
    BenchError,
    Processes,
    Server,
    check_only,
    cleaned_up,
    fuse_mounts,
    http_json,
    layout,
    only_phases,
    say,
)

DATA_FORMAT = 1  # bump whenever the generator changes: the data is rebuilt
PHASES = ("mount", "ls", "lsl")
PAGE = 100  # the API's page size
CMD_TIMEOUT = 1800.0
IDLE = 1.5  # seconds without a request: background refreshes have ended


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


# --- the dev-server's API ------------------------------------------------------------------


def call(server: Server, path: str, method: str = "GET", body: dict[str, Any] | None = None,
         auth: bool = False) -> Any:
    return http_json(server.url + path, method, body, TOKEN if auth else None, timeout=120)


def requests(server: Server) -> dict[str, int]:
    """Requests to the API by route since the last reset, downloads left out."""
    counts = call(server, "/_dev/stats")["requests"]
    return {route: n for route, n in counts.items() if route not in ("download", "blob")}


def reset(server: Server) -> None:
    call(server, "/_dev/reset", "POST")


def set_latency(server: Server, ms: float) -> None:
    call(server, "/_dev/faults", "POST", {"latency_ms": ms})


def wait_idle(server: Server, timeout: float = 600.0) -> None:
    """Until no request came for IDLE seconds: the mount's background refreshes ended."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        total = sum(requests(server).values())
        if total != last:
            last, since = total, time.monotonic()
        elif time.monotonic() - since >= IDLE:
            return
        time.sleep(0.2)
    raise BenchError(f"the API still got requests after {timeout:.0f} s")


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
        raise BenchError(f"`{' '.join(cmd)}` exited {result.returncode}: "
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
        self.server = self.start_server(self.data, self.run_dir / "server.log")
        say("scale: the dev-server reads the archives once")
        call(self.server, "/v1/artifacts?limit=1", auth=True)
        for name in phases:
            say(f"scale: {name}")
            try:
                getattr(self, name)()
            except BenchError as exc:
                self.errors[name] = str(exc)
                say(f"scale: {name} failed: {exc}")

    def start_server(self, data: Path, log: Path) -> Server:
        return self.procs.start_server(
            data, log, ["--rescan-after", f"{self.args.server_rescan_after:g}"])

    def mount_at(self, mountpoint: Path, cache: Path, server: Server, ttl: float,
                 log: Path) -> float:
        """`vm0fs mount` in the background; the seconds until it returned (mounted)."""
        return self.procs.mount_vm0fs(mountpoint, cache, server, log,
                                      ["--metadata-ttl", f"{ttl:g}"])

    def mounted(self) -> Path:
        """A mount whose first walk has ended (made by `mount`, or now)."""
        assert self.server is not None
        if self.mountpoint is None:
            set_latency(self.server, self.args.latency_ms)
            mp = self.run_dir / "mnt-shared"
            self.mount_at(mp, self.run_dir / "cache-shared", self.server, self.args.ttl,
                             self.run_dir / "mount-shared.log")
            timed(["ls", str(mp / "artifacts")])
            self.mountpoint = mp
        return self.mountpoint

    def mount(self) -> None:
        assert self.server is not None
        server = self.server
        set_latency(server, self.args.latency_ms)
        # Each mount is followed by one over a single artifact: what starting the process
        # costs, measured under the same load.
        one = self.start_server(prepare_data(self.run_dir.parent, 1),
                                self.run_dir / "server-one.log")
        set_latency(one, self.args.latency_ms)
        took: list[float] = []
        alone: list[float] = []
        at_return: list[float] = []
        first_ls: list[float] = []
        walk: list[float] = []
        try:
            for rep in range(self.args.reps):
                mp = self.run_dir / f"mnt-{rep}"
                wait_idle(server)
                reset(server)
                took.append(self.mount_at(mp, self.run_dir / f"cache-{rep}", server,
                                             self.args.ttl, self.run_dir / f"mount-{rep}.log"))
                at_return.append(requests(server)["list_artifacts"])
                seconds, out = timed(["ls", str(mp / "artifacts")])
                if len(out.splitlines()) != self.n:
                    raise BenchError(f"ls artifacts/ showed {len(out.splitlines())} entries, "
                                     f"not {self.n}")
                first_ls.append(seconds)
                wait_idle(server)
                walk.append(requests(server)["list_artifacts"])
                if self.mountpoint is None:
                    self.mountpoint = mp  # kept for the next phases
                else:
                    self.procs.unmount_vm0fs(mp)
                small = self.run_dir / f"mnt-one-{rep}"
                alone.append(self.mount_at(small, self.run_dir / f"cache-one-{rep}", one,
                                              self.args.ttl, self.run_dir / "mount-one.log"))
                self.procs.unmount_vm0fs(small)
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
        set_latency(server, self.args.latency_ms)
        took: list[float] = []
        walk: list[float] = []
        for _ in range(self.args.reps):
            wait_idle(server)
            time.sleep(self.args.ttl + 0.5)
            reset(server)
            seconds, out = timed(["ls", str(mp / "artifacts")])
            if len(out.splitlines()) != self.n:
                raise BenchError(f"ls artifacts/ showed {len(out.splitlines())} entries")
            took.append(seconds)
            wait_idle(server)
            walk.append(requests(server)["list_artifacts"])
        self.rows.append(Row(f"`ls artifacts/` after the TTL, {self.args.latency_ms:g} ms a "
                             f"request", "s", took, "< 0.5 s", lambda v: v < 0.5))
        self.rows.append(Row("  list requests of the walk behind it", "req", walk,
                             f"= {self.pages} pages", lambda v: v == self.pages))

    def lsl(self) -> None:
        assert self.server is not None
        server = self.server
        mp = self.mounted()
        set_latency(server, self.args.ls_l_latency_ms)
        wait_idle(server)
        time.sleep(self.args.ttl + 0.5)
        reset(server)
        seconds, _ = timed(["sh", "-c", "ls -l artifacts/*/ > /dev/null"], cwd=mp)
        wait_idle(server)
        counts = requests(server)
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
    return layout(lines, errors)


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
    check_only(p, args.only, PHASES)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    phases = only_phases(args.only, PHASES)
    root = args.work_dir.expanduser().absolute()
    run_dir = root / "run"
    procs = Processes(vm0fs=args.vm0fs)
    with cleaned_up(procs):
        try:
            for mountpoint in fuse_mounts():  # left by a run that was killed hard
                if root in mountpoint.parents:
                    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], timeout=30)
            if any(root in m.parents for m in fuse_mounts()):
                raise BenchError(f"something is still mounted under {root}")
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            data = prepare_data(root, args.artifacts)
            scale = Scale(args, data, procs, run_dir)
            scale.run(phases)
        except KeyboardInterrupt:
            say("scale: interrupted: unmounted and stopped everything")
            return 130
        except BenchError as exc:
            say(f"scale: {exc}")
            return 1
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
