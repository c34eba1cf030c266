"""Benchmark vm0fs side by side with a local tree, `curl | tar -xz` and ratarmount.

    scripts/bench [--quick] [--reps N] [--only NAME,...] [--work-dir DIR] [--json PATH]
                  [--bandwidth BYTES_PER_S] [--no-ratarmount]

It builds its own data (deterministic, seeded), serves it with `vm0fs dev-server` and measures,
in one run, every measurement several times (median and min-max):

  cold     mount with a fresh cache, then the first `find` over a never-seen version (download,
           inflate, index), against `curl` of the same archive from the same server piped into
           `tar -xz` (the API's 302 Location is read first, then the blob is fetched without the
           key: the blob host refuses requests that carry it)
  first    the first look at versions nobody downloaded: `grep -r` of a 200 MB version, and
           `grep -r` and `rg` over `*/current/` of 30 artifacts, against `curl | tar -xz` of the
           same archives followed by the same command, with the blob side capped per
           connection (NETWORK: an object store) and on loopback
  warm     `find`, `ls -lR`, `du -s`, `grep -r` (a rare pattern) over the cached 50,000-file
           versions (agent logs, and 50,000 files of under 100 bytes in 300 folders, where the
           per-file cost is all there is), against the same commands on the extracted tree and
           over ratarmount; each command runs once untimed first; the page cache is not dropped
  reads    `cat` of the 64 MB file into /dev/null the first time (a fresh mount over the warm
           cache and `drop_caches`, so it comes from the disk) and the second time, against the
           local copy and ratarmount
  ttfb     `head -c 1` of the small file that comes first in the 64 MB archive, on a cold
           version with the server capped at --bandwidth, against `curl` of the whole archive
           at the same cap; then the rest of the big file (the whole download through vm0fs);
           and once more, unmounted while the download is under way: the mount process must
           exit (it is waited for 15 s, then ended with SIGTERM)
  memory   peak memory (VmHWM) of the mount process with the 50,000-file version loaded, after
           the warm commands (runs the warm commands)
  remount  `grep -r` over the cached 50,000-file versions, each time from a fresh mount (every
           read reaches vm0fs, and every block read is checked), against the local tree
  listing  API requests (from /_dev/stats) for a fresh mount plus `ls -l artifacts/` over 250
           artifacts, and for a re-listing within the metadata TTL

ratarmount is used when it is installed (`pip install -e '.[bench]'`); --no-ratarmount skips it.
--pyfuse3 stock mounts with the stock pyfuse3 that scripts/setup builds beside the patched one
(.venv/stock-pyfuse3): classic opens instead of stateless ones, for the README's comparison.

The table has one row per comparison: vm0fs median (min-max), the reference's, the ratio of the
medians and the target with PASS/FAIL; the JSON (--json) adds every sample, machine facts and
notes. The exit status is 0 when every phase ran (FAIL rows included: they are findings), 1 when
a phase failed (its error is printed), 130 on Ctrl-C.

Data: WORK/<full|quick>/data (one artifact per dataset: logs, big, src), WORK/<..>/data-many
(250 tiny artifacts) and WORK/<..>/local (the archives extracted with tar), kept and reused while
the generator and the scale stay the same. Scratch (mount points, caches, logs of the mounts and
servers) goes to WORK/<..>/run, wiped at every start. Everything this script mounts or starts is
unmounted and stopped on the way out, also on errors and Ctrl-C.

`grep -r` writes into a pipe, not /dev/null: GNU grep stops at its first match when its output
is /dev/null, which would make the time depend on where the first match is.
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
import platform
import random
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
VM0FS = str(VENV_BIN / "vm0fs")
TOKEN = "bench-token"
SEED = 20250105
DATA_FORMAT = 3  # bump whenever the generators change: the data is rebuilt
NEEDLE = "PANIC checkpoint shard mismatch"
EPOCH = 1735689600  # 2025-01-01T00:00:00Z: every member's and archive's mtime is near it
PHASES = ("listing", "cold", "first", "warm", "memory", "remount", "reads", "ttfb")
DEFAULT_BANDWIDTH = 12_000_000  # bytes/s for the time-to-first-byte measurement

CMD_TIMEOUT = 900.0  # one measured command
MOUNT_TIMEOUT = 120.0  # `vm0fs mount` in the background returns once the mount answers
RATAR_TIMEOUT = 600.0  # ratarmount builds its index before it mounts
STOP_TIMEOUT = 15.0  # each step of a clean-up
SERVER_TIMEOUT = 60.0  # until the dev-server prints its address


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


# --- scale and data ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    name: str
    log_dirs: int  # run folders of the logs dataset
    log_files: int  # files in each
    big_bytes: int  # the big file of the big dataset
    src_files: int
    tiny_artifacts: int
    reps: int
    tiny_files: int  # files of under 100 bytes in the tiny dataset
    tiny_dirs: int
    look_files: int  # log files of LOOK_FILE_BYTES in the first-look version
    sweep_artifacts: int  # artifacts of SWEEP_FILES log files of SWEEP_FILE_BYTES, for sweeps


FULL = Scale("full", 500, 100, 64 << 20, 3000, 250, 5, 50_000, 300, 2000, 30)
QUICK = Scale("quick", 40, 50, 16 << 20, 300, 250, 2, 5_000, 30, 400, 10)
LOOK_FILE_BYTES = 100_000
SWEEP_FILES, SWEEP_FILE_BYTES = 300, 20_000
# The first-look phase's real network: each blob connection capped, as one stream to an object
# store is, and a time to first byte for each blob answer.
NETWORK = {"bandwidth": 25_000_000, "blob_ttfb_ms": 30}

WORDS = (
    "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda", "sigma",
    "omega", "vector", "tensor", "batch", "shard", "epoch", "gradient", "buffer", "socket",
    "worker", "planner", "memory", "context", "token", "cache", "index", "render", "parse",
    "fetch", "retry", "commit", "branch", "deploy", "upload", "schema", "report", "metric",
)
COMPONENTS = ("planner", "executor", "tool.shell", "tool.browser", "memory", "llm", "sandbox")
TOOLS = ("shell", "browser", "python", "editor", "search", "http")
LEVELS = ("DEBUG", "INFO", "INFO", "INFO", "INFO", "WARN", "ERROR")


class TarGzWriter:
    """A deterministic .tar.gz: no gzip timestamp or name, fixed owners and mtimes."""

    def __init__(self, path: Path, dir_entries: bool = True, compresslevel: int = 6) -> None:
        self.path = path
        self.dir_entries = dir_entries
        self.partial = path.with_name(path.name + ".partial")
        self._raw = self.partial.open("wb")
        self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0,
                                 compresslevel=compresslevel)
        self._tar = tarfile.open(  # noqa: SIM115 - closed by close()
            fileobj=self._gz, mode="w", format=tarfile.PAX_FORMAT)
        self._dirs: set[str] = set()
        self.files = 0
        self.bytes = 0

    def _info(self, name: str, kind: bytes, mode: int, size: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.size = size
        info.mtime = EPOCH + len(name) * 7 + self.files % 3600
        info.uid = info.gid = 1000
        info.uname = info.gname = "agent"
        return info

    def dirs_for(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self._dirs:
                self._dirs.add(d)
                self._tar.addfile(self._info(d, tarfile.DIRTYPE, 0o755, 0))

    def add(self, path: str, data: bytes, mode: int = 0o644) -> None:
        if self.dir_entries:
            self.dirs_for(path)
        self._tar.addfile(self._info(path, tarfile.REGTYPE, mode, len(data)), io.BytesIO(data))
        self.files += 1
        self.bytes += len(data)

    def close(self) -> None:
        self._tar.close()
        self._gz.close()
        self._raw.close()
        os.utime(self.partial, (EPOCH, EPOCH))
        self.partial.rename(self.path)  # the dev-server never sees a half-written archive


def _log_line(rng: random.Random, day: int, second: int) -> str:
    k = rng.randrange(8)
    if k == 0:
        msg = f"step started: {rng.choice(WORDS)} {rng.choice(WORDS)}"
    elif k == 1:
        msg = f"calling tool {rng.choice(TOOLS)} with {rng.randint(1, 6)} arguments"
    elif k == 2:
        msg = f"tool returned {rng.randint(10, 90000)} bytes in {rng.randint(1, 4000)} ms"
    elif k == 3:
        msg = (f"tokens in={rng.randint(100, 90000)} out={rng.randint(10, 4000)} "
               f"cost={rng.random() / 10:.5f}")
    elif k == 4:
        msg = f"retrying request {rng.getrandbits(64):016x} (attempt {rng.randint(2, 5)})"
    elif k == 5:
        msg = (f"wrote /workspace/{rng.choice(WORDS)}/{rng.choice(WORDS)}_"
               f"{rng.randint(0, 999)}.json")
    elif k == 6:
        msg = f"cache hit {rng.getrandbits(32):08x} for {rng.choice(WORDS)}"
    else:
        msg = "plan: " + " -> ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
    h, m, s = second // 3600 % 24, second // 60 % 60, second % 60
    return (f"2025-03-{day + 1:02d}T{h:02d}:{m:02d}:{s:02d}.{rng.randrange(1000):03d}Z "
            f"{rng.choice(LEVELS):<5} [{rng.choice(COMPONENTS)}] {msg}\n")


def write_logs(path: Path, scale: Scale, rng: random.Random) -> TarGzWriter:
    """An agent's logs: days / runs / steps, small text files, a rare needle in a few."""
    out = TarGzWriter(path)
    for run in range(scale.log_dirs):
        day = run * 5 // scale.log_dirs
        for step in range(scale.log_files):
            second = rng.randrange(86400)
            lines = []
            for _ in range(rng.randint(3, 24)):
                second += rng.randint(0, 9)
                lines.append(_log_line(rng, day, second))
            if rng.random() < 2e-4:
                lines.insert(rng.randrange(len(lines)), f"{NEEDLE} at step {step}\n")
            out.add(f"agent-logs/day-{day:02d}/run-{run:03d}/step-{step:03d}.log",
                    "".join(lines).encode())
    out.close()
    return out


def write_log_files(path: Path, rng: random.Random, files: int, size: int,
                    needles: int) -> TarGzWriter:
    """`files` log files of about `size` bytes (lines drawn from a pool far bigger than gzip's
    window, so the archive compresses as real logs do, about 4x), the needle in `needles`."""
    pool = [_log_line(rng, rng.randrange(5), rng.randrange(86400)) for _ in range(60_000)]
    lines_per_file = max(1, size // (sum(map(len, pool[:1000])) // 1000))
    marked = set(rng.sample(range(files), min(needles, files)))
    out = TarGzWriter(path)
    for i in range(files):
        lines = rng.choices(pool, k=lines_per_file)
        if i in marked:
            lines.insert(rng.randrange(len(lines)), f"{NEEDLE} in file {i}\n")
        out.add(f"logs/worker-{i // 100:02d}/run-{i:04d}.log", "".join(lines).encode())
    out.close()
    return out


def write_big(path: Path, scale: Scale, rng: random.Random) -> TarGzWriter:
    """A few small files, then one big file of 1 MiB chunks, half random, half log text."""
    out = TarGzWriter(path)
    out.add("00-first.txt", b"the first member of the archive\n")
    out.add("README.md", b"# big\n\nOne large file of mixed random and text bytes.\n")
    out.add("config/settings.json", json.dumps({"seed": SEED, "bytes": scale.big_bytes}).encode())
    pool = [_log_line(rng, 0, i * 3).encode() for i in range(4000)]
    chunks: list[bytes] = []
    for i in range(scale.big_bytes >> 20):
        if i % 2 == 0:
            chunks.append(rng.randbytes(1 << 20))
        else:
            text = bytearray()
            while len(text) < 1 << 20:
                text += rng.choice(pool)
            chunks.append(bytes(text[: 1 << 20]))
    out.add("blob/data.bin", b"".join(chunks))
    out.close()
    return out


def _py_module(rng: random.Random, name: str) -> str:
    parts = [f'"""{name}: {" ".join(rng.choice(WORDS) for _ in range(8))}."""\n\n',
             "from __future__ import annotations\n\nimport os\nimport sys\n\n"]
    for f in range(rng.randint(2, 24)):
        fname = f"{rng.choice(WORDS)}_{rng.choice(WORDS)}_{f}"
        parts.append(
            f"\n\ndef {fname}(value: int, items: list[str]) -> int:\n"
            f'    """{rng.choice(WORDS).capitalize()} the {rng.choice(WORDS)} of each item."""\n'
            f"    total = value * {rng.randint(2, 97)}\n"
            "    for item in items:\n"
            f"        if item.startswith({rng.choice(WORDS)!r}):\n"
            f"            total += len(item) % {rng.randint(3, 31)}\n"
            f"    return total if total < {rng.randint(1000, 99999)} else -1\n")
    return "".join(parts)


def _c_file(rng: random.Random, name: str) -> str:
    parts = [f"/* {name}: {' '.join(rng.choice(WORDS) for _ in range(6))} */\n"
             "#include <stdio.h>\n#include <stdlib.h>\n"]
    for f in range(rng.randint(2, 16)):
        parts.append(
            f"\nstatic int {rng.choice(WORDS)}_{f}(const char *s, size_t n)\n{{\n"
            f"    int acc = {rng.randint(0, 999)};\n"
            f"    for (size_t i = 0; i < n; i++)\n        acc = acc * 31 + s[i];\n"
            f"    return acc % {rng.randint(7, 4093)};\n}}\n")
    return "".join(parts)


def write_src(path: Path, scale: Scale, rng: random.Random) -> TarGzWriter:
    """A source tree: packages / subpackages / modules, with some C, docs and data files."""
    out = TarGzWriter(path)
    packages = [f"{w}{i}" for i, w in enumerate(rng.sample(WORDS, 16))]
    for i in range(scale.src_files):
        pkg = packages[i % len(packages)]
        sub = f"sub{(i // len(packages)) % 12:02d}"
        kind = rng.random()
        stem = f"{rng.choice(WORDS)}_{i:04d}"
        if kind < 0.65:
            name, text = f"project/src/{pkg}/{sub}/{stem}.py", _py_module(rng, stem)
        elif kind < 0.85:
            ext = ".c" if rng.random() < 0.7 else ".h"
            name, text = f"project/native/{pkg}/{stem}{ext}", _c_file(rng, stem)
        elif kind < 0.95:
            name = f"project/docs/{pkg}/{stem}.md"
            text = "".join(f"{' '.join(rng.choice(WORDS) for _ in range(12))}.\n"
                           for _ in range(rng.randint(5, 80)))
        else:
            name = f"project/tests/{pkg}/test_{stem}.py"
            text = _py_module(rng, f"test_{stem}")
        out.add(name, text.encode())
    out.close()
    return out


def write_tiny_files(path: Path, scale: Scale, rng: random.Random) -> TarGzWriter:
    """The worst case: many files of under 100 bytes, where the per-file cost is all there is.
    Members come without directory entries, as agents write them; the needle is in a few."""
    out = TarGzWriter(path, dir_entries=False)
    for i in range(scale.tiny_files):
        folder = f"tiny/g{i % scale.tiny_dirs // 30:02d}/d{i % scale.tiny_dirs:03d}"
        text = f"{rng.choice(WORDS)} {rng.randrange(10**6)} {rng.choice(WORDS)}\n"
        if i % 9973 == 1:
            text = f"{NEEDLE} {i}\n"
        out.add(f"{folder}/f{i:05d}.txt", text.encode())
    out.close()
    return out


def write_tiny(path: Path, index: int) -> None:
    out = TarGzWriter(path)
    out.add("notes.txt", f"artifact {index}\n".encode())
    out.close()


@dataclass
class Dataset:
    name: str
    archive: Path
    local: Path  # the archive extracted with tar
    files: int
    bytes: int
    archive_bytes: int
    artifact_id: str = ""
    version_id: str = ""


class Data:
    """The generated data of one scale, rebuilt only when the generator or scale changed."""

    def __init__(self, root: Path, scale: Scale) -> None:
        self.root = root
        self.scale = scale
        self.data = root / "data"
        self.many = root / "data-many"
        self.first = root / "data-first"  # the first-look version, and the sweep's artifacts
        self.local = root / "local"
        self.manifest = root / "manifest.json"
        self.sets: dict[str, Dataset] = {}

    def prepare(self) -> None:
        key = {"format": DATA_FORMAT, "seed": SEED, "scale": asdict(self.scale) | {"reps": 0}}
        manifest: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            manifest = json.loads(self.manifest.read_text())
        if manifest.get("key") != key:
            say(f"generating data in {self.root} (once; reused by later runs)")
            started = time.perf_counter()
            manifest = {"key": key, "sets": self._generate()}
            self.manifest.write_text(json.dumps(manifest, indent=1))
            say(f"  generated in {time.perf_counter() - started:.1f} s")
        for name, info in manifest["sets"].items():
            self.sets[name] = Dataset(name, self.data / name / "v1.tar.gz", self.local / name,
                                      info["files"], info["bytes"], info["archive_bytes"])
        self._extract()

    def _generate(self) -> dict[str, dict[str, int]]:
        for path in (self.data, self.many, self.first, self.local):
            remove_tree(path)
        sets: dict[str, dict[str, int]] = {}
        writers: dict[str, Callable[[Path, Scale, random.Random], TarGzWriter]] = {
            "logs": write_logs, "big": write_big, "src": write_src, "tiny": write_tiny_files}
        for n, (name, write) in enumerate(writers.items()):
            folder = self.data / name
            folder.mkdir(parents=True)
            out = write(folder / "v1.tar.gz", self.scale, random.Random(SEED + n))
            sets[name] = {"files": out.files, "bytes": out.bytes,
                          "archive_bytes": out.path.stat().st_size}
            say(f"  {name}: {out.files} files, {out.bytes / 1e6:.1f} MB, "
                f"archive {sets[name]['archive_bytes'] / 1e6:.1f} MB")
        for i in range(self.scale.tiny_artifacts):
            folder = self.many / f"art-{i:03d}"
            folder.mkdir(parents=True)
            write_tiny(folder / "v1.tar.gz", i)
        firsts: list[tuple[str, int, int, int]] = [("look", self.scale.look_files,
                                                     LOOK_FILE_BYTES, 3)]
        firsts += [(f"sweep-{i:02d}", SWEEP_FILES, SWEEP_FILE_BYTES, 1)
                   for i in range(self.scale.sweep_artifacts)]
        for n, (name, files, size, needles) in enumerate(firsts):
            folder = self.first / name
            folder.mkdir(parents=True)
            out = write_log_files(folder / "v1.tar.gz", random.Random(SEED + 100 + n), files,
                                  size, needles)
            if n < 2:
                say(f"  {name}: {out.files} files, {out.bytes / 1e6:.1f} MB, "
                    f"archive {out.path.stat().st_size / 1e6:.1f} MB")
        return sets

    def _extract(self) -> None:
        for ds in self.sets.values():
            done = ds.local.with_name(ds.name + ".extracted")
            if done.exists():
                continue
            remove_tree(ds.local)
            ds.local.mkdir(parents=True)
            run_checked(["tar", "-xzf", str(ds.archive), "-C", str(ds.local)])
            done.touch()


# --- processes, mounts and their clean-up -----------------------------------------------------


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_checked(cmd: Sequence[str], timeout: float = CMD_TIMEOUT,
                env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env,
                            cwd=cwd)
    if result.returncode != 0:
        raise BenchError(f"`{shlex.join(cmd)}` exited {result.returncode}: "
                         f"{result.stderr.strip()[-500:]}")
    return result.stdout


def fuse_mounts() -> set[Path]:
    """Mount points of FUSE file systems, from /proc/mounts."""
    found: set[Path] = set()
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2].startswith("fuse"):
                point = fields[1].encode().decode("unicode_escape")  # \040 and friends
                found.add(Path(point))
    return found


def is_mounted(path: Path) -> bool:
    return path in fuse_mounts()


def remove_tree(path: Path) -> None:
    """rm -rf, but never through a mount point."""
    if any(m == path or path in m.parents for m in fuse_mounts()):
        raise BenchError(f"refusing to remove {path}: something is mounted inside it")
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        raise BenchError(f"cannot remove {path}")


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return True
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
        if (b"vm0fs.cli" in argv and b"mount" in argv and b"--foreground" in argv
                and str(mountpoint).encode() in argv):
            return int(entry.name)
    return None


def peak_memory_mb(pid: int) -> tuple[float, float]:
    """(VmHWM, VmRSS) of a process in MiB."""
    values: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0]) / 1024
    return values["VmHWM"], values["VmRSS"]


def drop_caches() -> bool:
    """Empty the page cache (needs root); False when not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    blob_url: str


class Processes:
    """Everything this run started or mounted, so that it can all be undone (idempotently)."""

    def __init__(self, mount_env: dict[str, str] | None = None, vm0fs: str = VM0FS) -> None:
        self.mount_env = mount_env or {}  # added to the environment of `vm0fs mount`
        self.vm0fs = vm0fs  # mounts and unmounts with it (scale's --vm0fs); servers use VM0FS
        self.servers: list[Server] = []
        self.vm0fs_mounts: dict[Path, int | None] = {}  # mount point -> mount process pid
        self.ratar_mounts: dict[Path, subprocess.Popen[bytes]] = {}
        self.problems: list[str] = []

    # -- dev-server --

    def start_server(self, data_dir: Path, log: Path, args: Sequence[str] = ()) -> Server:
        """A dev-server on a free port; args are added to its command line."""
        with log.open("ab") as err:
            proc = subprocess.Popen(
                [VM0FS, "dev-server", "--data-dir", str(data_dir), "--token", TOKEN, "--port",
                 "0", *args], stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                start_new_session=True)
        server = Server(proc, "", "")
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
            raise BenchError(f"the dev-server did not start (see {log}): {text.strip()!r}")
        server.url = text.split("listening on ", 1)[1].split()[0]
        server.blob_url = text.split("blobs on ", 1)[1].split(")")[0]
        return server

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

    # -- vm0fs --

    def mount_vm0fs(self, mountpoint: Path, cache: Path, server: Server, log: Path,
                    args: Sequence[str] = ()) -> float:
        """Mount in the background (returns once it answers); the seconds it took. args are
        added to the command line (e.g. --metadata-ttl)."""
        mountpoint.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, VM0_API_KEY=TOKEN, **self.mount_env)
        cmd = [self.vm0fs, "mount", str(mountpoint), "--api-url", server.url, "--cache-dir",
               str(cache), "--log-file", str(log), *args]
        # Another build's vm0fs is not run from a checkout: its mount process runs
        # `python -m vm0fs.cli`, which would import the vm0fs of the current folder.
        cwd = None if self.vm0fs == VM0FS else mountpoint.parent
        self.vm0fs_mounts[mountpoint] = None
        started = time.perf_counter()
        try:
            run_checked(cmd, MOUNT_TIMEOUT, env, cwd)
        finally:
            self.vm0fs_mounts[mountpoint] = find_mount_pid(mountpoint)
        elapsed = time.perf_counter() - started
        if not is_mounted(mountpoint):
            raise BenchError(f"`vm0fs mount` returned but {mountpoint} is not mounted")
        return elapsed

    def mount_pid(self, mountpoint: Path) -> int:
        pid = self.vm0fs_mounts.get(mountpoint)
        if pid is None:
            raise BenchError(f"no mount process found for {mountpoint}")
        return pid

    def unmount_vm0fs(self, mountpoint: Path) -> float:
        """Unmount; the seconds until the mount process was gone (inf: it had to be killed)."""
        pid = self.vm0fs_mounts.pop(mountpoint, None)
        started = time.perf_counter()
        if is_mounted(mountpoint):
            result = subprocess.run([self.vm0fs, "unmount", str(mountpoint)],
                                    capture_output=True, text=True, timeout=STOP_TIMEOUT + 5)
            if result.returncode != 0:
                self.problems.append(f"`vm0fs unmount {mountpoint}` failed: "
                                     f"{result.stderr.strip()}; used fusermount3 -u -z")
                subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)],
                               capture_output=True, timeout=STOP_TIMEOUT)
        if pid is not None and not wait_gone(pid, STOP_TIMEOUT):
            self.problems.append(f"the mount process {pid} of {mountpoint} was still running "
                                 f"{STOP_TIMEOUT:.0f} s after the unmount: sent SIGTERM")
            self._end(pid)
            return float("inf")
        return time.perf_counter() - started

    @staticmethod
    def _end(pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not wait_gone(pid, STOP_TIMEOUT):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_gone(pid, STOP_TIMEOUT)

    # -- ratarmount --

    def mount_ratar(self, ratarmount: str, archive: Path, index: Path, mountpoint: Path,
                    log: Path) -> float:
        """Mount in the foreground (a child we own); the seconds until the mount appeared."""
        mountpoint.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [ratarmount, "-f", "--index-file", str(index), str(archive), str(mountpoint)],
                stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
        self.ratar_mounts[mountpoint] = proc
        deadline = time.monotonic() + RATAR_TIMEOUT
        while not is_mounted(mountpoint):
            if proc.poll() is not None:
                raise BenchError(f"ratarmount exited {proc.returncode} (see {log})")
            if time.monotonic() > deadline:
                raise BenchError(f"ratarmount did not mount within {RATAR_TIMEOUT:.0f} s")
            time.sleep(0.01)
        return time.perf_counter() - started

    def unmount_ratar(self, mountpoint: Path) -> None:
        proc = self.ratar_mounts.pop(mountpoint, None)
        if is_mounted(mountpoint):
            result = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True,
                                    timeout=STOP_TIMEOUT)
            if result.returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)],
                               capture_output=True, timeout=STOP_TIMEOUT)
        if proc is not None and proc.poll() is None:
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._end(proc.pid)
                proc.wait(STOP_TIMEOUT)

    # -- everything --

    def cleanup(self) -> None:
        """Unmount everything and stop every process; safe to call more than once."""
        for mountpoint in list(self.vm0fs_mounts):
            with contextlib.suppress(Exception):
                self.unmount_vm0fs(mountpoint)
        for mountpoint in list(self.ratar_mounts):
            with contextlib.suppress(Exception):
                self.unmount_ratar(mountpoint)
        for server in list(self.servers):
            with contextlib.suppress(Exception):
                self.stop_server(server)


# --- the dev-server's API ------------------------------------------------------------------


def http_json(url: str, method: str = "GET", body: dict[str, Any] | None = None,
              token: str | None = None, timeout: float = 60.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def list_artifacts(server: Server) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = ""
    while True:
        query = "limit=100" + (f"&cursor={cursor}" if cursor else "")
        page = http_json(f"{server.url}/v1/artifacts?{query}", token=TOKEN)
        items += page["data"]
        if not page["pagination"]["has_more"]:
            return items
        cursor = page["pagination"]["next_cursor"]


def api_requests(stats: dict[str, Any]) -> int:
    """Requests to the API origin (everything but blob downloads)."""
    return sum(n for route, n in stats["requests"].items() if route != "blob")


# --- measurements ----------------------------------------------------------------------------


@dataclass
class Target:
    text: str  # as printed, e.g. "<= 2x"
    check: Callable[[float], bool]
    on: str = "ratio"  # "ratio" (of the medians) or "max" (the worst vm0fs sample)


@dataclass
class Row:
    name: str
    unit: str  # "s", "MB" or "req"
    vm0fs: list[float]
    ref_name: str = ""
    ref: list[float] = field(default_factory=list)
    target: Target | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if not self.vm0fs or not self.ref or statistics.median(self.ref) <= 0:
            return None
        return statistics.median(self.vm0fs) / statistics.median(self.ref)

    @property
    def passed(self) -> bool | None:
        if self.target is None or not self.vm0fs:
            return None
        value = self.ratio if self.target.on == "ratio" else max(self.vm0fs)
        return None if value is None else self.target.check(value)

    def to_json(self) -> dict[str, Any]:
        def finite(x: float | None) -> float | None:  # JSON has no infinity
            return x if x is not None and math.isfinite(x) else None

        def summary(samples: list[float]) -> dict[str, Any] | None:
            if not samples:
                return None
            return {"median": finite(statistics.median(samples)), "min": finite(min(samples)),
                    "max": finite(max(samples)), "samples": [finite(x) for x in samples]}

        return {"name": self.name, "unit": self.unit, "vm0fs": summary(self.vm0fs),
                "reference": self.ref_name or None, "reference_values": summary(self.ref),
                "ratio": finite(self.ratio), "target": self.target.text if self.target else None,
                "pass": self.passed, "note": self.note or None}


def at_most(limit: float, on: str = "ratio") -> Target:
    return Target(f"<= {limit:g}x" if on == "ratio" else f"<= {limit:g}",
                  lambda v: v <= limit, on)


def time_cmd(cmd: Sequence[str], ok: Sequence[int] = (0,), env: dict[str, str] | None = None,
             capture: bool = False) -> tuple[float, str]:
    """Run a command with its output to /dev/null (or a pipe); (seconds, captured output)."""
    started = time.perf_counter()
    result = subprocess.run(list(cmd), stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, timeout=CMD_TIMEOUT)
    elapsed = time.perf_counter() - started
    if result.returncode not in ok:
        raise BenchError(f"`{shlex.join(cmd)}` exited {result.returncode}: "
                         f"{result.stderr.decode(errors='replace').strip()[-500:]}")
    return elapsed, result.stdout.decode(errors="replace") if capture else ""


def location_cmd() -> str:
    """Shell: the presigned blob URL of $ID from the API at $API (no redirect followed)."""
    return ('loc=$(curl -sS -o /dev/null -w "%{redirect_url}" '
            '-H "Authorization: Bearer $TOKEN" "$API/v1/artifacts/$ID/download?version_id=$VID")'
            '; [ -n "$loc" ]; ')


class Bench:
    def __init__(self, args: argparse.Namespace, scale: Scale, data: Data,
                 procs: Processes) -> None:
        self.args = args
        self.scale = scale
        self.data = data
        self.procs = procs
        self.reps: int = args.reps or scale.reps
        self.run_dir = data.root / "run"
        self.logs = self.run_dir / "logs"
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.errors: dict[str, str] = {}
        self.extra: dict[str, Any] = {}
        self.server: Server | None = None
        self.ratarmount = None if args.no_ratarmount else find_ratarmount()
        self._warm_ready = False
        self._mounts = 0

    # -- helpers --

    def add(self, row: Row) -> None:
        self.rows.append(row)

    def vpath(self, mountpoint: Path, name: str) -> Path:
        ds = self.data.sets[name]
        return mountpoint / "artifacts" / name / ds.version_id

    def mount(self, cache: Path, server: Server | None = None) -> tuple[Path, float]:
        self._mounts += 1
        mountpoint = self.run_dir / f"mnt-{self._mounts:03d}"
        server = server or self.server
        assert server is not None
        took = self.procs.mount_vm0fs(mountpoint, cache, server, self.logs / "mount.log")
        return mountpoint, took

    @contextlib.contextmanager
    def mounted(self, cache: Path, server: Server | None = None) -> Iterator[Path]:
        mountpoint, _ = self.mount(cache, server)
        try:
            yield mountpoint
        finally:
            self.procs.unmount_vm0fs(mountpoint)

    @contextlib.contextmanager
    def ratar_mounted(self, name: str) -> Iterator[tuple[Path, float]]:
        assert self.ratarmount is not None
        self._mounts += 1
        mountpoint = self.run_dir / f"ratar-{self._mounts:03d}"
        took = self.procs.mount_ratar(self.ratarmount, self.data.sets[name].archive,
                                      self.run_dir / f"{name}.index.sqlite", mountpoint,
                                      self.logs / "ratarmount.log")
        try:
            yield mountpoint, took
        finally:
            self.procs.unmount_ratar(mountpoint)

    def fresh(self, path: Path) -> Path:
        remove_tree(path)
        return path

    def curl_env(self, name: str) -> dict[str, str]:
        assert self.server is not None
        ds = self.data.sets[name]
        return dict(os.environ, TOKEN=TOKEN, API=self.server.url, ID=ds.artifact_id,
                    VID=ds.version_id)

    # -- phases --

    def run(self, phases: Sequence[str]) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        if "listing" in phases:
            self.phase("listing", self.listing)
        if {"cold", "first", "warm", "memory", "remount", "reads", "ttfb"} & set(phases):
            self.server = self.procs.start_server(self.data.data, self.logs / "server.log")
            by_name = {a["name"]: a for a in list_artifacts(self.server)}  # hashes the archives
            for ds in self.data.sets.values():
                ds.artifact_id = by_name[ds.name]["id"]
                ds.version_id = by_name[ds.name]["current_version_id"]
            if "cold" in phases:
                self.phase("cold", self.cold)
            if "first" in phases:
                self.phase("first", self.first)
            if "warm" in phases or "memory" in phases:
                self.phase("warm", self.warm)
            if "remount" in phases:
                self.phase("remount", self.remount)
            if "reads" in phases:
                self.phase("reads", self.reads)
            if "ttfb" in phases:
                self.phase("ttfb", self.ttfb)
            self.procs.stop_server(self.server)
            self.server = None

    def phase(self, name: str, body: Callable[[], None]) -> None:
        say(f"== {name}")
        started = time.perf_counter()
        try:
            body()
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            self.errors[name] = str(exc)
            say(f"   {name} FAILED: {exc}")
        say(f"   {name}: {time.perf_counter() - started:.0f} s")

    def listing(self) -> None:
        """API requests of a fresh mount + `ls -l artifacts/`, and of a re-listing in the TTL."""
        server = self.procs.start_server(self.data.many, self.logs / "server-many.log")
        try:
            http_json(f"{server.url}/v1/artifacts?limit=1", token=TOKEN)  # hash the archives
            first: list[float] = []
            again: list[float] = []
            ls_time: list[float] = []
            breakdown: list[dict[str, Any]] = []
            for _ in range(self.reps):
                cache = self.fresh(self.run_dir / "cache-listing")
                http_json(f"{server.url}/_dev/reset", "POST")
                with self.mounted(cache, server) as mp:
                    after_mount = http_json(f"{server.url}/_dev/stats")
                    took, out = time_cmd(["ls", "-l", str(mp / "artifacts")], capture=True)
                    after_ls = http_json(f"{server.url}/_dev/stats")
                    listed = len(out.splitlines()) - 1
                    if listed != self.scale.tiny_artifacts:
                        raise BenchError(f"ls -l artifacts/ showed {listed} entries, "
                                         f"expected {self.scale.tiny_artifacts}")
                    http_json(f"{server.url}/_dev/reset", "POST")
                    time_cmd(["ls", "-l", str(mp / "artifacts")])
                    relist = http_json(f"{server.url}/_dev/stats")
                first.append(api_requests(after_ls))
                again.append(api_requests(relist))
                ls_time.append(took)
                breakdown.append({"mount": after_mount["requests"],
                                  "mount+ls": after_ls["requests"],
                                  "relist": relist["requests"]})
            self.extra["listing_requests"] = breakdown
            mount_only = api_requests({"requests": breakdown[-1]["mount"]})
            n = self.scale.tiny_artifacts
            self.add(Row(f"ls -l artifacts/ ({n} artifacts), fresh mount: API requests", "req",
                         first, target=Target("= 3", lambda v: v == 3, "max"),
                         note=f"counted from before the mount; the mount's own check made "
                              f"{mount_only} of them"))
            self.add(Row("ls -l artifacts/ again within the TTL: API requests", "req", again,
                         target=Target("= 0", lambda v: v == 0, "max")))
            self.add(Row(f"ls -l artifacts/ ({n} artifacts), fresh mount: time", "s", ls_time))
        finally:
            self.procs.stop_server(server)

    def cold(self) -> None:
        """First `find` over a never-seen version against `curl | tar -xz` of its archive.

        Every repetition writes into new folders and nothing is removed until the end: on a
        file system mounted with `discard` (as here), creating files right after removing many
        is ten times slower, which would make the reference depend on the previous repetition.
        Both sides start after a `sync`, so neither pays for the other's writeback.
        """
        scratch = self.fresh(self.run_dir / "cold")
        try:
            for name in ("logs", "src"):
                self._cold(name, scratch)
        finally:
            remove_tree(scratch)

    def _cold(self, name: str, scratch: Path) -> None:
        ds = self.data.sets[name]
        finds: list[float] = []
        mounts: list[float] = []
        hwm: list[float] = []
        refs: list[float] = []
        script = location_cmd() + 'curl -sSf "$loc" | tar -xz -C "$DEST"'
        for rep in range(self.reps):
            for side in ((0, 1) if rep % 2 == 0 else (1, 0)):
                os.sync()
                if side == 0:
                    mp, took = self.mount(scratch / f"cache-{name}-{rep}")
                    try:
                        mounts.append(took)
                        finds.append(time_cmd(["find", str(self.vpath(mp, name))])[0])
                        hwm.append(peak_memory_mb(self.procs.mount_pid(mp))[0])
                    finally:
                        self.procs.unmount_vm0fs(mp)
                else:
                    dest = scratch / f"extract-{name}-{rep}"
                    dest.mkdir()
                    env = self.curl_env(name) | {"DEST": str(dest)}
                    refs.append(time_cmd(["bash", "-o", "pipefail", "-c", script], env=env)[0])
        label = f"{ds.files:,}-file version" if name == "logs" else f"src, {ds.files:,} files"
        self.add(Row(f"cold: first find, {label}", "s", finds, "curl | tar -xz", refs,
                     at_most(0.5) if name == "logs" else None,
                     note=f"archive {ds.archive_bytes / 1e6:.1f} MB, "
                          f"{ds.bytes / 1e6:.1f} MB inflated"))
        if name == "logs":
            self.add(Row("cold: vm0fs mount (fresh cache), time", "s", mounts))
            self.add(Row(f"cold: peak memory after first find, {label}", "MB", hwm,
                         note="VmHWM: download + inflate + index"))

    def first(self) -> None:
        """The first look at versions nobody has downloaded: `grep -r` of one version, and
        `grep -r` and `rg` over `*/current/` of many artifacts, against `curl | tar -xz` of the
        same archives followed by the same command on the extracted trees; with each blob
        connection capped at NETWORK (an object store) and on loopback with no cap."""
        server = self.procs.start_server(self.data.first, self.logs / "server-first.log")
        scratch = self.fresh(self.run_dir / "first")
        try:
            found = {a["name"]: (a["id"], a["current_version_id"]) for a in list_artifacts(server)}
            sweep = sorted(n for n in found if n.startswith("sweep-"))
            pairs = "\n".join(" ".join(found[n]) for n in sweep)
            fetch = (location_cmd()
                     + 'mkdir -p "$DEST/$ID"; curl -sSf "$loc" | tar -xz -C "$DEST/$ID"')
            loop = f'while read -r ID VID; do {fetch} || exit 1; done <<< "$PAIRS"; '
            workloads = [
                ("grep -r of one version", "look/current/", "grep -r",
                 {"ID": found["look"][0], "VID": found["look"][1]}, fetch + "; "),
                (f"grep -r over */current/ of {len(sweep)} artifacts", "sweep-*/current/",
                 "grep -r", {"PAIRS": pairs}, loop),
                (f"rg over */current/ of {len(sweep)} artifacts", "sweep-*/current/", "rg",
                 {"PAIRS": pairs}, loop),
            ]
            targets = {"capped": (0.35, 0.6, 0.5), "loopback": (0.5, 0.7, 0.5)}
            if shutil.which("rg") is None:
                workloads.pop()
                self.notes.append("rg is not installed (apt-get install ripgrep): its first-look "
                                  "rows were skipped")
            for network, faults in (("capped", NETWORK), ("loopback", {})):
                http_json(f"{server.url}/_dev/faults", "POST",
                          {"bandwidth": 0, "blob_ttfb_ms": 0} | faults)
                for (label, glob, tool, env, download), limit in zip(
                        workloads, targets[network], strict=False):
                    self._first(server, scratch, f"{label}, {network}", glob, tool, env,
                                download, limit)
        finally:
            self.procs.stop_server(server)
            remove_tree(scratch)

    def _first(self, server: Server, scratch: Path, label: str, glob: str, tool: str,
               env: dict[str, str], download: str, limit: float) -> None:
        looks: list[float] = []
        refs: list[float] = []
        grep = f"{tool} {shlex.quote(NEEDLE)}"
        base = dict(os.environ, TOKEN=TOKEN, API=server.url, **env)
        archives = sorted(self.data.first.rglob("*.tar.gz"))
        for rep in range(self.reps):
            for side in ((0, 1) if rep % 2 == 0 else (1, 0)):
                # The same start for both: the page cache emptied, so that the memory of the
                # earlier runs is free again, then the archives the server sends read back in.
                if not drop_caches():
                    os.sync()
                for archive in archives:
                    archive.read_bytes()
                self._mounts += 1
                if side == 0:
                    cache = scratch / f"cache-{self._mounts}"
                    mp, _ = self.mount(cache, server)
                    try:
                        cmd = f"{grep} {shlex.quote(str(mp / 'artifacts'))}/{glob}"
                        looks.append(time_cmd(["bash", "-c", cmd], (0, 1), capture=True)[0])
                    finally:
                        self.procs.unmount_vm0fs(mp)
                else:
                    dest = scratch / f"extract-{self._mounts}"
                    dest.mkdir()
                    script = download + f'{grep} "$DEST"'
                    refs.append(time_cmd(["bash", "-o", "pipefail", "-c", script], (0, 1),
                                         env=base | {"DEST": str(dest)}, capture=True)[0])
        self.add(Row(f"first look: {label}", "s", looks, "curl | tar -xz, then the same", refs,
                     at_most(limit)))

    def fill_warm_cache(self) -> Path:
        cache = self.run_dir / "cache-warm"
        if not self._warm_ready:
            self.fresh(cache)
            with self.mounted(cache) as mp:
                for name in self.data.sets:
                    time_cmd(["find", str(self.vpath(mp, name))])
            self._warm_ready = True
        return cache

    def warm(self) -> None:
        """find, ls -lR, du -s and grep -r over the cached versions, the local trees and
        ratarmount: the agent logs, then the tiny files."""
        for name in ("logs", "tiny"):
            self._warm(name)

    def _warm(self, name: str) -> None:
        cache = self.fill_warm_cache()
        ds = self.data.sets[name]
        label = f"{ds.files:,} files" + (", tiny" if name == "tiny" else "")
        with contextlib.ExitStack() as stack:
            mp, _ = self.mount(cache)
            stack.callback(self.procs.unmount_vm0fs, mp)
            roots: dict[str, Path] = {"vm0fs": self.vpath(mp, name), "local": ds.local}
            if self.ratarmount:
                rmp, index_time = stack.enter_context(self.ratar_mounted(name))
                roots["ratarmount"] = rmp
                self.extra[f"ratarmount_{name}_index_build_s"] = index_time
                self.notes.append(f"ratarmount's first mount of the {ds.files:,}-file archive "
                                  f"(building its index from the local .tar.gz) took "
                                  f"{index_time:.2f} s")
            commands: dict[str, Callable[[Path], list[str]]] = {
                "find": lambda p: ["find", str(p)],
                "ls -lR": lambda p: ["ls", "-lR", str(p)],
                "du -s": lambda p: ["du", "-s", str(p)],
                "grep -r": lambda p: ["grep", "-r", NEEDLE, str(p)],
            }
            times: dict[tuple[str, str], list[float]] = {}
            for command, make in commands.items():
                capture = command == "grep -r"  # see the docstring: never grep into /dev/null
                counts: dict[str, int] = {}
                for who, root in roots.items():  # once untimed: warms every cache
                    _, out = time_cmd(make(root), ok=(0, 1), capture=True)
                    counts[who] = len(out.splitlines())
                self.extra[f"warm_output_lines_{name}_{command}"] = counts
                if command in ("find", "grep -r") and len(set(counts.values())) > 1:
                    self.notes.append(f"warm {command}: output lines differ: {counts}")
                order = list(roots)
                for rep in range(self.reps):
                    for who in order[rep % len(order):] + order[:rep % len(order)]:
                        elapsed, _ = time_cmd(make(roots[who]), ok=(0, 1), capture=capture)
                        times.setdefault((command, who), []).append(elapsed)
            hwm, rss = peak_memory_mb(self.procs.mount_pid(mp))
            ratar_hwm: list[float] = []
            if self.ratarmount:
                proc = self.procs.ratar_mounts[roots["ratarmount"]]
                ratar_hwm = [peak_memory_mb(proc.pid)[0]]
        for command in commands:
            self.add(Row(f"warm: {command}, {label}", "s", times[(command, "vm0fs")],
                         "local tree", times[(command, "local")], at_most(1.5)))
        if self.ratarmount:
            for command in commands:
                target = at_most(0.05) if command == "grep -r" else None
                self.add(Row(f"warm: {command}, {label}", "s",
                             times[(command, "vm0fs")], "ratarmount",
                             times[(command, "ratarmount")], target,
                             note="target: 20x faster" if target else ""))
        if name != "logs":
            return
        self.add(Row(f"peak memory, {ds.files:,}-file version loaded", "MB", [hwm],
                     "ratarmount" if ratar_hwm else "", ratar_hwm,
                     Target("< 100 MB", lambda v: v < 100, "max"),
                     note=f"VmHWM after the warm commands (VmRSS {rss:.0f} MB)"))

    def remount(self) -> None:
        """grep -r over the cached versions, each time from a fresh mount: the mount's kernel
        caches are empty while the cache files are in the page cache, so every read reaches
        vm0fs, and every block it reads is checked against its checksum (integrity.py). The
        reference is the same grep over the local tree, warm."""
        cache = self.fill_warm_cache()
        for name in ("logs", "tiny"):
            ds = self.data.sets[name]
            label = f"{ds.files:,} files" + (", tiny" if name == "tiny" else "")
            grep = ["grep", "-r", NEEDLE]
            time_cmd([*grep, str(ds.local)], ok=(0, 1), capture=True)  # warms the local tree
            mounted: list[float] = []
            local: list[float] = []
            for _ in range(self.reps):
                with self.mounted(cache) as mp:
                    root = self.vpath(mp, name)
                    time_cmd(["find", str(root)], capture=True)  # the tree, not the reads
                    mounted.append(time_cmd([*grep, str(root)], ok=(0, 1), capture=True)[0])
                local.append(time_cmd([*grep, str(ds.local)], ok=(0, 1), capture=True)[0])
            self.add(Row(f"remount: grep -r, {label}", "s", mounted, "local tree", local,
                         note="fresh mount over the cached version: every read reaches vm0fs"))

    def reads(self) -> None:
        """cat of the big file: first (from disk, fresh mount, no page cache) and second time."""
        cache = self.fill_warm_cache()
        ds = self.data.sets["big"]
        member = "blob/data.bin"
        size_mb = (ds.local / member).stat().st_size / 1e6
        if self.ratarmount:  # its first mount builds the index: not part of the reads
            with self.ratar_mounted("big") as (_, took):
                self.extra["ratarmount_big_index_build_s"] = took
        first: dict[str, list[float]] = {}
        second: dict[str, list[float]] = {}
        dropped = True
        for rep in range(self.reps):
            with contextlib.ExitStack() as stack:
                mp, _ = self.mount(cache)
                stack.callback(self.procs.unmount_vm0fs, mp)
                files = {"vm0fs": self.vpath(mp, "big") / member, "local": ds.local / member}
                if self.ratarmount:
                    rmp, _ = stack.enter_context(self.ratar_mounted("big"))
                    files["ratarmount"] = rmp / member
                dropped = drop_caches() and dropped
                order = list(files)
                order = order[rep % len(order):] + order[:rep % len(order)]
                for who in order:
                    first.setdefault(who, []).append(time_cmd(["cat", str(files[who])])[0])
                for who in order:
                    second.setdefault(who, []).append(time_cmd(["cat", str(files[who])])[0])
        if not dropped:
            self.notes.append("drop_caches was not permitted: the first reads may have come "
                              "from the page cache")
        label = f"{size_mb:.0f} MB file"
        self.add(Row(f"reads: cat {label}, first time", "s", first["vm0fs"], "local file",
                     first["local"], note="fresh mount, after drop_caches"))
        if self.ratarmount:
            self.add(Row(f"reads: cat {label}, first time", "s", first["vm0fs"], "ratarmount",
                         first["ratarmount"], at_most(1.0)))
        self.add(Row(f"reads: cat {label}, second time", "s", second["vm0fs"], "local file",
                     second["local"], at_most(2.0)))
        if self.ratarmount:
            self.add(Row(f"reads: cat {label}, second time", "s", second["vm0fs"],
                         "ratarmount", second["ratarmount"]))

    def ttfb(self) -> None:
        """head -c 1 of the first member of a cold version against the whole download, capped."""
        assert self.server is not None
        ds = self.data.sets["big"]
        bandwidth = self.args.bandwidth
        heads: list[float] = []
        fulls: list[float] = []
        wholes: list[float] = []
        script = location_cmd() + 'curl -sSf -o /dev/null "$loc"'
        http_json(f"{self.server.url}/_dev/faults", "POST", {"bandwidth": bandwidth})
        try:
            for rep in range(self.reps):
                for side in ((0, 1) if rep % 2 == 0 else (1, 0)):
                    if side == 0:
                        cache = self.fresh(self.run_dir / "cache-ttfb")
                        with self.mounted(cache) as mp:
                            version = self.vpath(mp, "big")
                            started = time.perf_counter()
                            heads.append(time_cmd(["head", "-c", "1",
                                                   str(version / "00-first.txt")])[0])
                            # Then the rest: the mount is not left with a download under way.
                            time_cmd(["cat", str(version / "blob" / "data.bin")])
                            fulls.append(time.perf_counter() - started)
                    else:
                        wholes.append(time_cmd(["bash", "-o", "pipefail", "-c", script],
                                               env=self.curl_env("big"))[0])
            # The same, but unmounted while the download is under way.
            cache = self.fresh(self.run_dir / "cache-ttfb")
            mp, _ = self.mount(cache)
            try:
                time_cmd(["head", "-c", "1", str(self.vpath(mp, "big") / "00-first.txt")])
            finally:
                exit_time = self.procs.unmount_vm0fs(mp)
        finally:
            http_json(f"{self.server.url}/_dev/faults", "POST", {"bandwidth": 0})
        self.add(Row("ttfb: head -c 1 of the first member, cold version", "s", heads,
                     "whole download (curl)", wholes, at_most(0.25),
                     note=f"archive {ds.archive_bytes / 1e6:.1f} MB at "
                          f"{bandwidth / 1e6:g} MB/s"))
        self.add(Row("ttfb: head -c 1, then cat of the big file, cold version", "s", fulls,
                     "whole download (curl)", wholes, note="the whole download through vm0fs"))
        self.add(Row("unmount during a download: until the mount process exits", "s",
                     [exit_time], target=Target(f"< {STOP_TIMEOUT:g} s",
                                                lambda v: v < STOP_TIMEOUT, "max"),
                     note="inf: still running after the wait, ended with SIGTERM"))


def find_ratarmount() -> str | None:
    for candidate in (VENV_BIN / "ratarmount", shutil.which("ratarmount")):
        if candidate and os.access(candidate, os.X_OK):
            result = subprocess.run([str(candidate), "--version"], capture_output=True,
                                    timeout=60)
            if result.returncode == 0:
                return str(candidate)
    return None


# --- report ----------------------------------------------------------------------------------


def fmt(samples: list[float], unit: str) -> str:
    """'1.52 s (1.40-1.80)', '45.1 ms (40.2-50.3)', '31.2 MB', '3 (3-3)'."""
    if not samples:
        return "-"
    med, lo, hi = statistics.median(samples), min(samples), max(samples)
    if math.isinf(med):
        return f"> {STOP_TIMEOUT:g} s (killed)" if unit == "s" else "inf"
    scale, suffix = 1.0, f" {unit}"
    if unit == "s" and med < 1:
        scale, suffix = 1000.0, " ms"
    elif unit == "req":
        suffix = ""

    def num(x: float) -> str:
        x *= scale
        if unit == "req":
            return f"{x:g}"
        return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"

    text = f"{num(med)}{suffix}"
    if len(samples) > 1:
        text += f" ({num(lo)}-{num(hi)})"
    return text


def table(rows: list[Row], errors: dict[str, str]) -> str:
    head = ["measurement", "vm0fs median (min-max)", "reference", "ref median (min-max)",
            "ratio", "target", "result"]
    lines = [head]
    for row in rows:
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
        result = {True: "PASS", False: "FAIL", None: "-"}[row.passed]
        lines.append([row.name, fmt(row.vm0fs, row.unit), row.ref_name or "-",
                      fmt(row.ref, row.unit), ratio, row.target.text if row.target else "-",
                      result])
    return layout(lines, errors)


def layout(lines: list[list[str]], errors: dict[str, str]) -> str:
    """Columns padded to their widest cell, a rule under the first line (the head), then a
    line for each phase that failed."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True))
                   .rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    for phase, message in errors.items():
        out.append(f"{phase}: ERROR {message}")
    return "\n".join(out)


def machine_info() -> dict[str, Any]:
    def first_line(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True,
                                  timeout=30).stdout.splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return ""

    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), "")
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f.readline().split(":", 1)[1].strip()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "vm0fs_commit": first_line(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
        "vm0fs_dirty": bool(first_line(["git", "-C", str(REPO), "status", "--porcelain",
                                        "vm0fs"])),
        "curl": first_line(["curl", "--version"]),
        "tar": first_line(["tar", "--version"]),
    }


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="phases: " + ", ".join(PHASES))
    p.add_argument("--quick", action="store_true",
                   help="small data and 2 repetitions: a smoke run")
    p.add_argument("--reps", type=int, default=0, help="repetitions (default 5, --quick 2)")
    p.add_argument("--only", default="", metavar="NAME,...", help="run only these phases")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/vm0fs-bench"))
    p.add_argument("--json", type=Path, default=REPO / "bench-results" / "latest.json",
                   help="write the results here (default: bench-results/latest.json)")
    p.add_argument("--bandwidth", type=int, default=DEFAULT_BANDWIDTH, metavar="BYTES_PER_S",
                   help=f"server cap for the ttfb phase (default {DEFAULT_BANDWIDTH})")
    p.add_argument("--no-ratarmount", action="store_true", help="skip the ratarmount peer")
    p.add_argument("--pyfuse3", choices=("patched", "stock"), default="patched",
                   help="mount with the patched pyfuse3 (stateless opens, the default) or the "
                        "stock one in .venv/stock-pyfuse3 (classic opens)")
    args = p.parse_args(argv)
    if args.reps < 0 or args.bandwidth <= 0:
        p.error("--reps and --bandwidth must be positive")
    check_only(p, args.only, PHASES)
    return args


def check_only(p: argparse.ArgumentParser, only: str, known: Sequence[str]) -> None:
    """A usage error when --only names a phase that is not known."""
    unknown = {n for n in only.split(",") if n} - set(known)
    if unknown:
        p.error(f"unknown phase(s) {', '.join(sorted(unknown))}; known: {', '.join(known)}")


def only_phases(only: str, known: Sequence[str]) -> list[str]:
    """The phases --only names, in the order of known; all of them when it names none."""
    return [n for n in known if n in only.split(",")] if only else list(known)


@contextlib.contextmanager
def cleaned_up(procs: Processes) -> Iterator[None]:
    """Undo everything procs started on the way out: at the end of the block, also on errors,
    Ctrl-C, SIGTERM and SIGHUP (both raise KeyboardInterrupt), and at exit."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    atexit.register(procs.cleanup)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the clean-up
        procs.cleanup()
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    phases = only_phases(args.only, PHASES)
    for tool in ("curl", "tar", "fusermount3", "find", "grep", "du"):
        if shutil.which(tool) is None:
            say(f"bench: {tool} is not installed")
            return 2
    scale = QUICK if args.quick else FULL
    root = args.work_dir.expanduser().absolute() / scale.name
    stock = REPO / ".venv" / "stock-pyfuse3"
    if args.pyfuse3 == "stock" and not stock.is_dir():
        say(f"bench: {stock} is missing: run scripts/setup")
        return 2
    procs = Processes({"PYTHONPATH": str(stock)} if args.pyfuse3 == "stock" else None)
    with cleaned_up(procs):
        try:
            for mountpoint in fuse_mounts():  # left by a run that was killed hard
                if root in mountpoint.parents:
                    say(f"bench: lazily unmounting {mountpoint}, left by an earlier run")
                    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], timeout=30)
            root.mkdir(parents=True, exist_ok=True)
            data = Data(root, scale)
            data.prepare()
            bench = Bench(args, scale, data, procs)
            remove_tree(bench.run_dir)
            if bench.ratarmount is None and not args.no_ratarmount:
                bench.notes.append("ratarmount is not installed (pip install -e '.[bench]'): "
                                   "its comparisons were skipped")
            started = time.perf_counter()
            bench.run(phases)
            bench.extra["elapsed_s"] = time.perf_counter() - started
        except KeyboardInterrupt:
            say("bench: interrupted: unmounted and stopped everything")
            return 130
        except BenchError as exc:
            say(f"bench: {exc}")
            return 1
    bench.notes += procs.problems
    info = machine_info()
    print(f"vm0fs bench ({scale.name}, {args.pyfuse3} pyfuse3): {info['date']}, "
          f"{info['nproc']} CPUs, kernel {info['kernel']}, Python {info['python']}, "
          f"{bench.reps} repetitions")
    print(table(bench.rows, bench.errors))
    for note in bench.notes:
        print(f"note: {note}")
    result = {
        "machine": info,
        "options": {"scale": asdict(scale), "reps": bench.reps, "phases": phases,
                    "bandwidth": args.bandwidth, "ratarmount": bench.ratarmount,
                    "pyfuse3": args.pyfuse3,
                    "work_dir": str(root)},
        "datasets": {n: {k: v for k, v in asdict(d).items() if k not in ("archive", "local")}
                     for n, d in data.sets.items()},
        "rows": [row.to_json() for row in bench.rows],
        "errors": bench.errors,
        "notes": bench.notes,
        "extra": bench.extra,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {args.json}")
    return 1 if bench.errors else 0  # a FAIL is a finding, not an error of the script


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
