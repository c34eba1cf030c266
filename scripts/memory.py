"""Measure the memory of a vm0fs mount as it sees more and more versions.

    scripts/memory [--work-dir DIR] [--versions N] [--entries N] [--huge N] [--big-mib N]
                   [--only PHASE,...] [--json PATH]

It builds its own data (seeded, reused while the generator stays the same), serves it with
`vm0fs dev-server`, mounts with a fresh cache and reads the mount process's /proc status:

  versions  `find` over N versions (default 12) of about --entries entries (30,000) each, one
            after the other (each is downloaded and indexed on the way): RSS after mounting and
            after the Nth; then N more versions: what they add. Then the kernel's caches are
            dropped (`echo 2 > /proc/sys/vm/drop_caches`, needs root): RSS once the mount has
            let go of what the kernel forgot, and a `find` again (all files still there).
  huge      peak RSS (VmHWM) of a fresh mount while it downloads, indexes and `find -ls` walks
            one version of --huge entries (300,000), and of a second mount that loads the same
            version from the cache.
  ranged    peak RSS of a fresh mount while it downloads a version of --big-mib MiB (1,024:
            16 files of random bytes, which do not compress) in ranged parts, on loopback and
            with each blob connection capped as the bench caps it (25 MB/s, 30 ms to the first
            byte); two of its files are then read back and checked against their sha256.

RSS counts the index pages that are mapped (file-backed, `RssFile`) as well as the heap.
Targets (issue 11): under 100 MB after 12 versions, under 10 MB more for 12 more, a peak under
150 MB for the 300,000-entry version; (issue 16) a peak under 150 MB for the ranged download.
Exit status 0 when every phase ran, 1 when one failed.
Everything this script mounts or starts is unmounted and stopped on the way out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402 - the benchmark's data writer, processes and clean-up
from bench import BenchError, Processes, TarGzWriter, say  # noqa: E402

SEED = 20261130
DATA_FORMAT = 2  # bump when the generator changes: the data is rebuilt
BIG_FILES = 16  # files of the ranged-download version (random bytes: nothing to compress)
SETTLE = 15.0  # seconds for the mount to let go of what the kernel forgot (TRIM_INTERVAL + GRACE)
FIND_TIMEOUT = 900.0


def write_version(path: Path, entries: int, rng: random.Random) -> int:
    """A version of about `entries` entries: runs / steps / small files, like an agent's logs."""
    out = TarGzWriter(path)
    per_dir = 100
    files = entries * per_dir // (per_dir + 1)  # one folder entry per 100 files
    tag = rng.getrandbits(32)
    folders = set()
    for i in range(files):
        folder = f"run-{i // (per_dir * 20):03d}/step-{i // per_dir % 20:02d}"
        folders.update((folder, folder.split("/")[0]))
        out.add(f"{folder}/out-{i:06d}.log", f"{tag:08x} {i} {rng.random():.6f}\n".encode())
    out.close()
    return out.files + len(folders)


def write_big(path: Path, mib: int, rng: random.Random) -> dict[str, str]:
    """A version of BIG_FILES files of random bytes, `mib` MiB in all; their sha256 by path."""
    out = TarGzWriter(path, compresslevel=1)  # random bytes: level 1 stores them as fast
    sums = {}
    for i in range(BIG_FILES):
        data = rng.randbytes((mib << 20) // BIG_FILES)
        name = f"blobs/part-{i:02d}.bin"
        out.add(name, data)
        sums[name] = hashlib.sha256(data).hexdigest()
    out.close()
    return sums


def prepare(root: Path, versions: int, entries: int, huge: int, big_mib: int
            ) -> dict[str, Any]:
    key = {"format": DATA_FORMAT, "seed": SEED, "versions": versions, "entries": entries,
           "huge": huge, "big_mib": big_mib}
    manifest_path = root / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = {}
    if manifest.get("key") == key:
        return manifest
    say(f"generating data in {root} (once; reused by later runs)")
    bench.remove_tree(root / "data")
    sizes: dict[str, int] = {}
    for i in range(2 * versions):
        folder = root / "data" / "many"
        folder.mkdir(parents=True, exist_ok=True)
        sizes[f"many/{i}"] = write_version(folder / f"v{i:03d}.tar.gz", entries,
                                           random.Random(SEED + i))
        # Distinct creation times, oldest first, so that the listing has a fixed order.
        os.utime(folder / f"v{i:03d}.tar.gz", (bench.EPOCH + i, bench.EPOCH + i))
    folder = root / "data" / "huge"
    folder.mkdir(parents=True, exist_ok=True)
    sizes["huge"] = write_version(folder / "v1.tar.gz", huge, random.Random(SEED - 1))
    folder = root / "data" / "big"
    folder.mkdir(parents=True, exist_ok=True)
    big = write_big(folder / "v1.tar.gz", big_mib, random.Random(SEED - 2))
    manifest = {"key": key, "entries": sizes, "big": big}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon and RssFile of a process, in MB."""
    found: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                found[name] = int(value.split()[0]) / 1024
    return found


def find(path: Path) -> int:
    """Run `find -ls` over `path`; the number of entries it printed."""
    result = subprocess.run(["find", str(path), "-ls"], capture_output=True,
                            timeout=FIND_TIMEOUT)
    if result.returncode != 0:
        raise BenchError(f"find {path} exited {result.returncode}: {result.stderr[-300:]!r}")
    return result.stdout.count(b"\n")


def drop_kernel_caches() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")
    except OSError:
        return False
    return True


def warm_up(server: bench.Server) -> None:
    """Let the dev-server read its archives (once, minutes for a million members) before a
    mount asks it anything with its own short timeout."""
    say("waiting for the dev-server to read its archives")
    deadline = time.monotonic() + FIND_TIMEOUT
    while True:
        try:
            bench.list_artifacts(server)
            return
        except OSError:  # a timeout: it is still reading
            if time.monotonic() > deadline:
                raise


def held(mountpoint: Path) -> str:
    """What the mount says it holds (an older vm0fs does not say)."""
    memory = json.loads((mountpoint / ".vm0fs" / "status.json").read_text()).get("memory")
    if memory is None:
        return "(not reported)"
    return f"{memory['versions_in_memory']} of {memory['versions_known']}"


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.work_dir)
        self.scratch = self.work / "run"
        self.procs = Processes()
        self.rows: list[tuple[str, float, str, bool | None]] = []
        self.manifest: dict[str, Any] = {}

    def row(self, what: str, mb: float, target: float | None = None) -> None:
        ok = None if target is None else mb < target
        self.rows.append((what, mb, f"< {target:.0f} MB" if target else "", ok))
        say(f"  {what}: {mb:.1f} MB")

    def mount(self, name: str, server: bench.Server) -> tuple[Path, int]:
        mountpoint = self.scratch / name / "mnt"
        cache = self.scratch / name / "cache"
        self.procs.mount_vm0fs(mountpoint, cache, server, self.scratch / name / "mount.log")
        return mountpoint, self.procs.mount_pid(mountpoint)

    def versions(self, server: bench.Server) -> None:
        n = self.args.versions
        mountpoint, pid = self.mount("versions", server)
        folder = mountpoint / "artifacts" / "many"
        ids = sorted((v for v in os.listdir(folder) if v != "current"),
                     key=lambda v: os.stat(folder / v).st_mtime)
        if len(ids) < 2 * n:
            raise BenchError(f"the artifact has {len(ids)} versions, not {2 * n}")
        self.row("RSS after mounting", proc_status(pid)["VmRSS"])
        counts = []
        for i, vid in enumerate(ids[:2 * n]):
            counts.append(find(folder / vid))
            if i + 1 == n:
                first = proc_status(pid)
                self.row(f"RSS after find over {n} versions", first["VmRSS"], 100)
                say(f"    (anon {first['RssAnon']:.1f} MB, index pages {first['RssFile']:.1f} MB;"
                    f" {counts[0]} entries a version)")
        second = proc_status(pid)
        self.row(f"RSS after {n} more versions", second["VmRSS"])
        self.row(f"... added by those {n} versions", second["VmRSS"] - first["VmRSS"], 10)
        say(f"    versions held in memory: {held(mountpoint)}")
        if drop_kernel_caches():
            time.sleep(SETTLE)
            self.row("RSS after drop_caches (echo 2)", proc_status(pid)["VmRSS"])
            say(f"    versions held in memory: {held(mountpoint)}")
            again = find(folder / ids[0])
            if again != counts[0]:
                raise BenchError(f"find saw {again} entries after drop_caches, {counts[0]} before")
        else:
            say("  (not root: drop_caches skipped)")
        self.row("peak RSS (VmHWM) of that mount", proc_status(pid)["VmHWM"])
        self.procs.unmount_vm0fs(mountpoint)

    def huge(self, server: bench.Server) -> None:
        entries = 0
        for label in ("download", "cache"):
            name = "huge"
            if label == "download":
                bench.remove_tree(self.scratch / name)
            mountpoint, pid = self.mount(name, server)
            folder = mountpoint / "artifacts" / "huge"
            vid = os.readlink(folder / "current")
            entries = find(folder / vid)
            self.row(f"peak RSS, {entries} entries ({label} + find -ls)",
                     proc_status(pid)["VmHWM"], 150)
            self.procs.unmount_vm0fs(mountpoint)

    def ranged(self, server: bench.Server) -> None:
        """Peak RSS while a big version comes down in ranged parts; its bytes checked after."""
        sums: dict[str, str] = self.manifest["big"]
        for network, faults in (("loopback", {}), ("capped", bench.NETWORK)):
            bench.http_json(f"{server.url}/_dev/faults", "POST",
                            {"bandwidth": 0, "blob_ttfb_ms": 0} | faults)
            name = f"ranged-{network}"
            bench.remove_tree(self.scratch / name)
            mountpoint, pid = self.mount(name, server)
            try:
                artifact = mountpoint / "artifacts" / "big"
                folder = artifact / os.readlink(artifact / "current")  # find does not follow
                before = bench.http_json(f"{server.url}/_dev/stats")
                started = time.monotonic()
                entries = find(folder)  # the listing needs the whole archive
                took = time.monotonic() - started
                after = bench.http_json(f"{server.url}/_dev/stats")
                for path in sorted(sums)[:: len(sums) - 1]:  # the first and the last file
                    digest = hashlib.sha256((folder / path).read_bytes()).hexdigest()
                    if digest != sums[path]:
                        raise BenchError(f"{path} read back with sha256 {digest}, "
                                         f"not {sums[path]}")
                peak = proc_status(pid)["VmHWM"]
            finally:
                bench.http_json(f"{server.url}/_dev/faults", "POST",
                                {"bandwidth": 0, "blob_ttfb_ms": 0})
                self.procs.unmount_vm0fs(mountpoint)
            self.row(f"peak RSS, ranged download of {self.args.big_mib} MiB, {network}",
                     peak, 150)
            blobs = after["requests"]["blob"] - before["requests"]["blob"]
            say(f"    ({entries} entries listed after {took:.1f} s, {blobs} blob requests, "
                f"{after['blob_peak']} at once at most so far; two files checked)")

    def run(self) -> int:
        self.manifest = prepare(self.work, self.args.versions, self.args.entries,
                                self.args.huge, self.args.big_mib)
        bench.remove_tree(self.scratch)
        self.scratch.mkdir(parents=True)
        failed = False
        try:
            server = self.procs.start_server(self.work / "data", self.scratch / "server.log")
            warm_up(server)
            phases = [self.versions, self.huge, self.ranged]
            if self.args.only:
                phases = [p for p in phases if p.__name__ in self.args.only.split(",")]
            for phase in phases:
                say(f"{phase.__name__}:")
                try:
                    phase(server)
                except (BenchError, OSError, subprocess.SubprocessError) as exc:
                    say(f"  {phase.__name__} failed: {exc}")
                    failed = True
        finally:
            self.procs.cleanup()
        print(f"{'measurement':<48} {'MB':>8}  {'target':<10} result")
        for what, mb, target, ok in self.rows:
            verdict = "" if ok is None else "PASS" if ok else "FAIL"
            print(f"{what:<48} {mb:>8.1f}  {target:<10} {verdict}")
        if self.args.json:
            Path(self.args.json).write_text(json.dumps(
                [{"what": w, "mb": round(mb, 1), "target": t, "pass": ok}
                 for w, mb, t, ok in self.rows], indent=1))
        return 1 if failed else 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--work-dir", default="/tmp/vm0fs-memory")
    p.add_argument("--versions", type=int, default=12)
    p.add_argument("--entries", type=int, default=30_000)
    p.add_argument("--huge", type=int, default=300_000)
    p.add_argument("--big-mib", type=int, default=1024)
    p.add_argument("--only", help="phases to run, comma-separated: versions,huge,ranged")
    p.add_argument("--json")
    args = p.parse_args(argv)
    try:
        return Run(args).run()
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
