"""The commands besides `mount`: status, info, prefetch and cache upkeep. Each returns an exit
status and prints for people (or JSON for scripts); `cli` only parses arguments."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from vm0fs.api import ApiClient, Artifact, Version
from vm0fs.cache import Cache
from vm0fs.control import CONTROL_DIR, human, status_text
from vm0fs.errors import Vm0fsError
from vm0fs.fetch import Fetch
from vm0fs.fs import HEX_PREFIX, folder_names

err = Console(stderr=True, highlight=False)


class CommandError(Vm0fsError):
    """A user mistake or a failure, said in one line."""


# -- paths inside a mount ------------------------------------------------------------------


@dataclass
class MountPath:
    mountpoint: Path
    artifact: str | None = None  # the artifact's folder name
    version: str | None = None  # the full version id (links resolved)
    rest: str = ""  # the path inside the version


def locate(path: Path) -> MountPath:
    """Which mount, artifact and version `path` is in."""
    path = path.expanduser().absolute()
    mountpoint = path
    while not (mountpoint / CONTROL_DIR).is_dir() or not os.path.ismount(mountpoint):
        if mountpoint.parent == mountpoint:
            raise CommandError(f"{path} is not inside a vm0fs mount")
        mountpoint = mountpoint.parent
    parts = path.relative_to(mountpoint).parts
    found = MountPath(mountpoint)
    if len(parts) >= 2 and parts[0] == "artifacts":
        found.artifact = parts[1]
    if len(parts) >= 3 and found.artifact:
        # `current` and id prefixes are symlinks: the real folder is named by the full id.
        found.version = os.path.realpath(mountpoint / "artifacts" / parts[1] / parts[2])
        found.version = os.path.basename(found.version)
        found.rest = "/".join(parts[3:])
    return found


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CommandError(f"{path} does not exist") from None
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None


# -- status and info -----------------------------------------------------------------------


def status(mountpoint: Path, as_json: bool) -> int:
    data = read_json(locate(mountpoint).mountpoint / CONTROL_DIR / "status.json")
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        sys.stdout.write(status_text(data))
    return 0


def info(path: Path, as_json: bool) -> int:
    where = locate(path)
    if where.artifact is None:
        return status(where.mountpoint, as_json)
    data = read_json(where.mountpoint / CONTROL_DIR / "info" / where.artifact)
    result: dict[str, Any] = {"artifact": data["artifact"]}
    if where.version is not None:
        matches = [v for v in data["versions"] if v["id"] == where.version]
        if not matches:
            raise CommandError(f"{where.version[:12]} is not a version of {where.artifact}")
        result["version"] = matches[0]
        result["path"] = where.rest
    else:
        result["versions"] = data["versions"]
    if as_json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    artifact = result["artifact"]
    rows = [("artifact", artifact["name"]), ("artifact id", artifact["id"]),
            ("current version", artifact["current_version_id"] or "(none)"),
            ("updated at", artifact["updated_at"])]
    version = result.get("version")
    if version:
        rows += [("version id", version["id"]), ("message", version["message"] or ""),
                 ("created by", version["created_by"] or ""),
                 ("created at", version["created_at"]), ("size", human(version["size"])),
                 ("file count", str(version["file_count"]))]
        if where.rest:
            rows.append(("path", where.rest))
    else:
        rows.append(("versions", str(len(result["versions"]))))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key + ':':<{width + 2}}{value}")
    for v in result.get("versions", []):
        mark = "*" if v["id"] == artifact["current_version_id"] else " "
        print(f"  {mark} {v['id'][:12]}  {v['created_at']}  {human(v['size']):>10}  "
              f"{v['file_count']:>6} files  {v['message'] or ''}")
    return 0


# -- prefetch ------------------------------------------------------------------------------


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=err)


def prefetch(targets: list[str], api_url: str, api_key: str | None, cache_dir: Path) -> int:
    in_mount = [t for t in targets if os.path.exists(t)]
    by_name = [t for t in targets if not os.path.exists(t)]
    failures = sum(prefetch_in_mount(Path(t)) for t in in_mount)
    if by_name:
        if not api_key:
            raise CommandError("no API key: set VM0_API_KEY")
        failures += trio.run(_prefetch_by_name, by_name, api_url, api_key, cache_dir)
    return 1 if failures else 0


def prefetch_in_mount(path: Path) -> int:
    """Ask the mount itself to fetch the version `path` is in, showing its progress."""
    where = locate(path)
    if where.artifact is None or where.version is None:
        raise CommandError(f"{path} is not inside a version folder")
    folder = where.mountpoint / "artifacts" / where.artifact / where.version
    status_file = where.mountpoint / CONTROL_DIR / "status.json"
    outcome: dict[str, BaseException | None] = {}

    def list_all() -> None:  # listing a version waits until it is all there
        try:
            # A lookup inside first: that asks for the version as a use, so its download does
            # not queue behind downloads that only listings asked for (versions.py).
            with contextlib.suppress(FileNotFoundError):
                os.lstat(folder / CONTROL_DIR)
            os.listdir(folder)
            outcome["error"] = None
        except OSError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=list_all, daemon=True)
    worker.start()
    with progress_bar() as bar:
        task = bar.add_task(f"{where.artifact}/{where.version[:12]}", total=None)
        while worker.is_alive():
            with contextlib.suppress(CommandError, ValueError, KeyError):
                for d in read_json(status_file)["downloads"]:
                    if d["version_id"] == where.version:
                        bar.update(task, completed=d["bytes_done"],
                                   total=d["bytes_total"] or None)
            worker.join(0.25)
        bar.update(task, completed=bar.tasks[0].total or 1, total=bar.tasks[0].total or 1)
    if outcome.get("error") is not None:
        err.print(f"vm0fs: {where.artifact}/{where.version[:12]}: {outcome['error']}")
        return 1
    return 0


async def _prefetch_by_name(targets: list[str], api_url: str, api_key: str,
                            cache_dir: Path) -> int:
    cache = Cache(cache_dir)
    failures = 0
    async with ApiClient(api_url, api_key) as client:
        names = folder_names(await client.list_artifacts())
        with progress_bar() as bar:
            for target in targets:
                try:
                    artifact, version = await _resolve(client, names, target)
                    await _fetch_one(client, cache, artifact, version, bar)
                except Vm0fsError as exc:
                    err.print(f"vm0fs: {target}: {exc}")
                    failures += 1
    return failures


async def _resolve(client: ApiClient, names: dict[str, Artifact], target: str
                   ) -> tuple[Artifact, Version]:
    name, _, wanted = target.partition("/")
    artifact = names.get(name) or next((a for a in names.values() if a.id == name), None)
    if artifact is None:
        raise CommandError(f"no artifact named {name!r}")
    versions = await client.list_versions(artifact.id)
    wanted = wanted.strip("/") or "current"
    if wanted == "current":
        wanted = artifact.current_version_id or ""
        if not wanted:
            raise CommandError("the artifact has no versions")
    matches = [v for v in versions if v.id == wanted] or (
        [v for v in versions if v.id.startswith(wanted)] if HEX_PREFIX.fullmatch(wanted) else [])
    if len(matches) != 1 and artifact.current_version and artifact.current_version.id == wanted:
        matches = [artifact.current_version]
    if len(matches) != 1:
        raise CommandError(f"no single version {wanted!r} in {name}")
    return artifact, matches[0]


async def _fetch_one(client: ApiClient, cache: Cache, artifact: Artifact, version: Version,
                     bar: Progress) -> None:
    label = f"{artifact.name}/{version.id[:12]}"
    entry = await trio.to_thread.run_sync(cache.open_entry, version.id)
    if entry is not None:
        os.close(entry.fd)
        bar.console.print(f"{label}: already cached")
        return
    if version.file_count == 0:
        bar.console.print(f"{label}: empty version, nothing to fetch")
        return
    task = bar.add_task(label, total=version.size or None)
    fetch = Fetch(client, cache, artifact.id, version.id, expected_size=version.size,
                  implied_mtime_ns=int(version.created_at * 1e9))
    entry = await fetch.run(on_step=lambda: bar.update(task, completed=fetch.progress.durable))
    os.close(entry.fd)
    bar.update(task, total=entry.size, completed=entry.size)


# -- cache upkeep --------------------------------------------------------------------------


def cache_info(cache_dir: Path, as_json: bool) -> int:
    cache = Cache(cache_dir)
    entries = cache.entries()
    data = {"dir": str(cache.root), "bytes": sum(e[1] for e in entries),
            "versions": len(entries), "in_use": cache.in_use(),
            "entries": [{"version_id": vid, "bytes": size,
                         "last_used": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(used))}
                        for vid, size, used in sorted(entries, key=lambda e: -e[2])]}
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"cache:     {data['dir']}")
    print(f"size:      {human(data['bytes'])} in {data['versions']} version(s)")
    print(f"in use:    {'yes, by a mount' if data['in_use'] else 'no'}")
    print("cap:       set per mount with --cache-size")
    for e in data["entries"]:
        print(f"  {e['version_id'][:12]}  {human(e['bytes']):>10}  last used {e['last_used']}")
    return 0


def cache_clear(cache_dir: Path, force: bool) -> int:
    cache = Cache(cache_dir)
    if cache.in_use() and not force:
        raise CommandError(f"a mount is using {cache.root}: unmount it first, or use --force "
                           "(versions it has open are kept)")
    removed, kept = cache.clear()
    print(f"removed {removed} version(s)" + (f"; kept {kept} in use" if kept else ""))
    return 0


def cache_prune(cache_dir: Path, max_size: int) -> int:
    cache = Cache(cache_dir)
    freed = cache.evict(max_bytes=max_size)
    print(f"freed {human(freed)}; the cache holds {human(cache.usage())}")
    return 0


def run(command: Any, *args: Any) -> int:
    try:
        return command(*args)
    except Vm0fsError as exc:
        print(f"vm0fs: {exc}", file=sys.stderr)
        return 1
