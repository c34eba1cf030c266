"""The commands besides `mount`: status, info, prefetch and cache upkeep. Each returns an exit
status and prints for people (or JSON for scripts); `cli` only parses arguments."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

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

from vm0fs.api import DEFAULT_BASE_URL as DEFAULT_API_URL
from vm0fs.api import ApiClient, Artifact, Version
from vm0fs.cache import Cache
from vm0fs.control import CONTROL_DIR, status_text
from vm0fs.errors import Unavailable, Vm0fsError
from vm0fs.fetch import Fetch
from vm0fs.meta import Listings, listing_namespace
from vm0fs.mounttable import MountEntry, mounts, user_name, vm0fs_mount_of
from vm0fs.namespace import COUNTED_BACK, HEX_PREFIX, HISTORY, counted_back, folder_names
from vm0fs.units import human

err = Console(stderr=True, highlight=False)
_T = TypeVar("_T")


class CommandError(Vm0fsError):
    """A user mistake or a failure, said in one line."""


# -- paths inside a mount ------------------------------------------------------------------


@dataclass
class MountPath:
    mountpoint: Path
    artifact: str | None = None  # the artifact's folder name
    version: str | None = None  # the full version id (links resolved), or the name as given
    rest: str = ""  # the path inside the version


def locate(path: Path) -> MountPath:
    """Which mount, artifact and version `path` is in. The mount is found in the kernel's
    mount table, so nothing inside it is looked at before we know it answers."""
    found = vm0fs_mount_of(str(path.expanduser()))
    if found is None:
        if not os.path.lexists(path.expanduser()):
            raise CommandError(f"{path}: no such file or folder")
        raise CommandError(f"{path} is not inside a vm0fs mount: give a path in one "
                           f"({which_mounts()})")
    entry, absolute = found
    mountpoint = Path(entry.path)
    check_alive(entry)
    parts = Path(absolute).relative_to(mountpoint).parts
    where = MountPath(mountpoint)
    if len(parts) >= 2 and parts[0] == "artifacts":
        where.artifact = parts[1]
    if len(parts) >= 3 and where.artifact and parts[2:] != (HISTORY,):
        link_at = 3 if parts[2] == HISTORY else 2  # in history/, the link is one level down
        # `current`, `current~N`, id prefixes and history/ entries are symlinks: the real
        # folder is named by the full id.
        link = mountpoint.joinpath("artifacts", *parts[1:link_at + 1])
        where.version = os.path.basename(os.path.realpath(link))
        where.rest = "/".join(parts[link_at + 1:])
    return where


def my_mounts() -> list[str]:
    """This user's vm0fs mount points, from the mount table (one that does not say whose it
    is counts as this user's)."""
    return [m.path for m in mounts() if m.is_vm0fs and m.user_id in (None, os.getuid())]


def which_mounts() -> str:
    mine = my_mounts()
    if not mine:
        return "you have none running: vm0fs mount DIR starts one"
    return "yours: " + ", ".join(mine)


def default_mount() -> Path:
    """The mount to show when none is given: the one the current folder is in, else this
    user's only one."""
    here = vm0fs_mount_of(os.getcwd())
    if here is not None:
        return Path(here[0].path)
    mine = my_mounts()
    if len(mine) == 1:
        return Path(mine[0])
    raise CommandError(f"the current folder is not inside a vm0fs mount: give a MOUNTPOINT "
                       f"({which_mounts()})")


def check_alive(entry: MountEntry) -> None:
    """One line for a mount that cannot answer: dead, or private to another user."""
    try:
        os.statvfs(entry.path)  # reaches the mount's process (stat may come from a cache)
        os.lstat(os.path.join(entry.path, CONTROL_DIR))  # statfs is allowed to other users
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise CommandError(f"the vm0fs mount at {entry.path} is dead (its process ended): "
                               f"vm0fs unmount {entry.path} clears it") from None
        owner = entry.user_id
        if exc.errno == errno.EACCES and owner is not None and owner != os.getuid():
            raise CommandError(f"the vm0fs mount at {entry.path} belongs to {user_name(owner)} "
                               "and is private to them (unless mounted with --allow-other)"
                               ) from None
        raise CommandError(f"cannot reach the vm0fs mount at {entry.path}: "
                           f"{exc.strerror}") from None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CommandError(f"{path} does not exist") from None
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise CommandError(f"{path} is not what vm0fs writes there (not JSON)") from None


def say(text: str) -> None:
    """One line on stderr, never wrapped (rich would wrap it at 80 columns in a pipe)."""
    err.print(text, soft_wrap=True, markup=False, highlight=False)


# -- status and info -----------------------------------------------------------------------


def status(mountpoint: Path | None, as_json: bool) -> int:
    """The status of the mount `mountpoint` is in (default: see `default_mount`)."""
    where = locate(mountpoint if mountpoint is not None else default_mount())
    data = read_json(where.mountpoint / CONTROL_DIR / "status.json")
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        sys.stdout.write(status_text(data))
    return 0


def artifact_data(where: MountPath) -> Any:
    """The mount's `.vm0fs/info` of the artifact `where` is in; one line if there is none."""
    assert where.artifact is not None
    try:
        return json.loads((where.mountpoint / CONTROL_DIR / "info" / where.artifact).read_bytes())
    except FileNotFoundError:
        raise CommandError(f"no artifact named {where.artifact!r} in the mount at "
                           f"{where.mountpoint}") from None
    except OSError as exc:
        raise CommandError(f"cannot read what the mount knows about {where.artifact!r}: "
                           f"{exc.strerror}") from None
    except ValueError:
        raise CommandError(f"the mount at {where.mountpoint} answered nonsense about "
                           f"{where.artifact!r}") from None


def no_version(wanted: str, artifact: str) -> CommandError:
    if wanted == "current":
        return CommandError(f"{artifact!r} has no versions")
    if COUNTED_BACK.fullmatch(wanted):
        return CommandError(f"no version {wanted!r} of {artifact!r}: fewer versions than that "
                            "came before its current one")
    hint = "" if HEX_PREFIX.fullmatch(wanted) else (
        " (a version is `current`, `current~N`, a full id, or a prefix of 8 or more hex "
        "characters)")
    return CommandError(f"no version {wanted!r} of {artifact!r}{hint}")


def info(path: Path, as_json: bool) -> int:
    where = locate(path)
    if where.artifact is None:
        return status(where.mountpoint, as_json)
    data = artifact_data(where)
    result: dict[str, Any] = {"artifact": data["artifact"]}
    if where.version is not None:
        matches = [v for v in data["versions"] if v["id"] == where.version]
        if not matches:
            raise no_version(where.version, where.artifact)
        result["version"] = matches[0]
        result["path"] = where.rest
        if where.rest:
            try:
                os.lstat(path.expanduser())
            except FileNotFoundError:
                raise CommandError(f"no {where.rest!r} in {where.artifact}/"
                                   f"{where.version[:12]}") from None
            except OSError as exc:
                raise CommandError(f"cannot look at {path}: {exc.strerror} "
                                   f"(vm0fs status {where.mountpoint} says why)") from None
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
                 ("created at", version["created_at"]),
                 ("size of files", human(version["size"])),
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
        print(f"  {mark} {v['id'][:12]}  {v['created_at']}  {human(v['size']):>10} in "
              f"{v['file_count']:>6} files  {v['message'] or ''}")
    return 0


# -- prefetch ------------------------------------------------------------------------------


def progress_bar() -> Progress:
    """Bytes unpacked so far, against the size of the files (the tar adds its headers, so the
    total is an estimate: past it, the bar just goes on)."""
    # Transient: a bar goes when its work ends; a line then says how it ended.
    return Progress(TextColumn("{task.description}"), BarColumn(),
                    DownloadColumn(binary_units=True),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True,
                    disable=not err.is_terminal)  # no bar for a log file or a pipe


def looks_like_path(target: str) -> bool:
    """A path, not NAME[/VERSION]: it exists, is spelled like a path, has more parts than a
    name and a version, or starts with a folder that exists here."""
    if os.path.lexists(target) or target.startswith(("/", "./", "../", "~")) or target in (
            ".", ".."):
        return True
    parts = target.strip("/").split("/")
    return len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


def prefetch(targets: list[str], api_url: str | None, api_key: str | None, cache_dir: Path,
             explicit_cache_dir: bool) -> int:
    """Paths go to the mount they are in; names to the API named by --api-url or
    VM0_API_URL, else through this user's mount, else to the default API."""
    failures = 0
    by_name = []
    for target in targets:
        if not looks_like_path(target):
            by_name.append(target)
            continue
        try:
            failures += prefetch_in_mount(target, Path(target))
        except CommandError as exc:
            first = target.split("/", 1)[0]
            why = "" if os.path.isabs(target) or not os.path.isdir(first) or (
                vm0fs_mount_of(first)) else (
                f" (read as a path because ./{first} exists: to fetch an artifact by name, "
                "run this elsewhere or give --api-url)")
            say(f"vm0fs: {about(target, exc)}{why}")
            failures += 1
    if not by_name:
        return 1 if failures else 0
    mount = None if api_url else chosen_mount()
    if mount is not None and not explicit_cache_dir:
        for target in by_name:
            name, _, version = target.strip("/").partition("/")
            path = Path(mount.path) / "artifacts" / name / (version or "current")
            try:
                failures += prefetch_in_mount(target, path)
            except CommandError as exc:
                say(f"vm0fs: {about(target, exc)}")
                failures += 1
        return 1 if failures else 0
    if api_url is None and mount is not None:
        api_url = read_json(Path(mount.path) / CONTROL_DIR / "status.json").get("api_url")
    if not api_key:
        raise CommandError("no API key: set VM0_API_KEY")
    failures += trio.run(_prefetch_by_name, by_name, api_url or DEFAULT_API_URL, api_key,
                         cache_dir)
    return 1 if failures else 0


def about(target: str, exc: Exception) -> str:
    """`target: reason`, without saying the target twice."""
    text = str(exc)
    return text if text.startswith(target) else f"{target}: {text}"


def chosen_mount() -> MountEntry | None:
    """The mount that names go through when no API is given: the one the current folder is
    in, else this user's only live one."""
    here = vm0fs_mount_of(os.getcwd())
    if here is not None:
        return here[0]
    mine = [m for m in mounts() if m.is_vm0fs and m.user_id in (None, os.getuid())]
    live = []
    for entry in mine:
        try:
            os.statvfs(entry.path)
            live.append(entry)
        except OSError:
            continue
    if len(live) > 1:
        raise CommandError("several vm0fs mounts are running: give a path inside one "
                           f"(e.g. {live[0].path}/artifacts/NAME) or --api-url")
    return live[0] if live else None


def prefetch_in_mount(target: str, path: Path) -> int:
    """Ask the mount itself to fetch the version `path` is in, showing its progress."""
    where = locate(path)
    if where.artifact is None:
        raise CommandError("not inside an artifact's folder (try MOUNT/artifacts/NAME)")
    data = artifact_data(where)  # the artifact exists: the rest of the path is next
    folder = where.mountpoint / "artifacts" / where.artifact
    # `locate` resolved `current` and prefixes; a name that is not there stays as it was.
    version = where.version or os.path.basename(os.path.realpath(folder / "current"))
    matches = [v for v in data["versions"] if v["id"] == version]
    if not matches:
        raise no_version(version, where.artifact)
    label = f"{where.artifact}/{version[:12]}"
    cache_dir = read_json(where.mountpoint / CONTROL_DIR / "status.json")["cache"]["dir"]
    if matches[0]["file_count"] == 0:
        print(f"{label}: empty version, nothing to fetch")
        return 0
    with contextlib.suppress(Vm0fsError):  # a cache we may not read: then we just ask
        if Cache(Path(cache_dir), create=False).has(version):
            print(f"{label}: already cached")
            return 0
    folder = folder / version
    status_file = where.mountpoint / CONTROL_DIR / "status.json"
    outcome: dict[str, OSError | None] = {}

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
        task = bar.add_task(label, total=matches[0]["size"] or None)
        while worker.is_alive():
            with contextlib.suppress(CommandError, ValueError, KeyError):
                for d in read_json(status_file)["downloads"]:
                    if d["version_id"] == version:
                        show_progress(bar, task, d["bytes_done"], d["bytes_total"])
            worker.join(0.25)
    error = outcome.get("error")
    if error is not None:
        reason = _mount_error_about(status_file, version) or error.strerror
        say(f"vm0fs: {target}: the mount could not fetch {label}: {reason}")
        return 1
    on_disk = cached_bytes(Cache(Path(cache_dir), create=False), version)
    print(f"{label}: fetched ({sizes(None, matches[0]['size'], on_disk)})")
    return 0


def _mount_error_about(status_file: Path, version_id: str) -> str | None:
    """The mount's last logged error about this version (its reason), if any."""
    with contextlib.suppress(CommandError, KeyError, TypeError):
        for error in reversed(read_json(status_file)["last_errors"]):
            message = " ".join(error["message"].split())
            if version_id[:12] in message:  # "artifact ..., version <id>: <reason>"
                return message.partition(f"version {version_id[:12]}: ")[2] or message
    return None


async def _prefetch_by_name(targets: list[str], api_url: str, api_key: str,
                            cache_dir: Path) -> int:
    cache = await trio.to_thread.run_sync(Cache, cache_dir)
    for quiet in ("vm0fs.api", "vm0fs.meta"):  # the outcome is what counts here
        logging.getLogger(quiet).setLevel(logging.ERROR)
    failures = 0
    async with ApiClient(api_url, api_key, retry_time=10.0) as client:
        # The listings are kept in the cache as a mount keeps them: `cache info` can name the
        # versions, and a mount that cannot reach the API shows these artifacts.
        listings = Listings(client, 0.0, cache.listings / listing_namespace(api_url, api_key))
        try:
            names = folder_names(await fresh(listings, listings.artifacts()))
        except Vm0fsError as exc:
            raise CommandError(f"cannot list the artifacts at {api_url}: {exc}") from None
        with progress_bar() as bar:
            for target in targets:
                try:
                    artifact, version = await _resolve(listings, names, target)
                    await _fetch_one(client, cache, artifact, version, bar)
                except (Vm0fsError, OSError) as exc:
                    reason = exc if isinstance(exc, Vm0fsError) else exc.strerror
                    say(f"vm0fs: {target}: {reason}")
                    failures += 1
    return failures


async def fresh(listings: Listings, listing: Awaitable[_T]) -> _T:
    """A listing from the API itself: the last known one (which a mount would answer with
    when the API is down) is no use for a download."""
    value = await listing
    if listings.stale:
        raise Unavailable(str(listings.last_error or "the API did not answer"))
    return value


async def _resolve(listings: Listings, names: dict[str, Artifact], target: str
                   ) -> tuple[Artifact, Version]:
    name, _, wanted = target.strip("/").partition("/")
    artifact = names.get(name) or next((a for a in names.values() if a.id == name), None)
    if artifact is None:
        raise CommandError(f"no artifact named {name!r}")
    versions = await fresh(listings, listings.versions(artifact.id))
    wanted = wanted.strip("/") or "current"
    asked = wanted
    if wanted == "current":
        wanted = artifact.current_version_id or ""
        if not wanted:
            raise no_version("current", name)
    counted = COUNTED_BACK.fullmatch(wanted)
    if counted:  # current~N: the Nth before the current one, in creation order
        known = [*versions, *([artifact.current_version] if artifact.current_version else [])]
        found = counted_back({v.id: v for v in known}.values(), artifact.current_version_id,
                             int(counted[1]))
        if found is None:
            raise no_version(asked, name)
        return artifact, found
    matches = [v for v in versions if v.id == wanted] or (
        [v for v in versions if v.id.startswith(wanted)] if HEX_PREFIX.fullmatch(wanted) else [])
    if len(matches) != 1 and artifact.current_version and artifact.current_version.id == wanted:
        matches = [artifact.current_version]
    if len(matches) > 1:
        raise CommandError(f"{asked!r} matches {len(matches)} versions of {name!r}: "
                           "give more characters")
    if not matches:
        raise no_version(asked, name)
    return artifact, matches[0]


async def _fetch_one(client: ApiClient, cache: Cache, artifact: Artifact, version: Version,
                     bar: Progress) -> None:
    label = f"{artifact.name}/{version.id[:12]}"
    entry = await trio.to_thread.run_sync(cache.open_entry, version.id)
    if entry is not None:
        os.close(entry.fd)
        print(f"{label}: already cached")
        return
    if version.file_count == 0:
        print(f"{label}: empty version, nothing to fetch")
        return
    task = bar.add_task(label, total=version.size or None)
    fetch = Fetch(client, cache, artifact.id, version.id, expected_size=version.size,
                  implied_mtime_ns=int(version.created_at * 1e9), file_count=version.file_count)
    try:
        entry = await fetch.run(on_step=lambda: show_progress(bar, task, fetch.progress.durable,
                                                               version.size))
    finally:
        bar.remove_task(task)
    os.close(entry.fd)
    on_disk = await trio.to_thread.run_sync(cached_bytes, cache, version.id)
    print(f"{label}: fetched ({sizes(fetch.received, version.size, on_disk)})")


def show_progress(bar: Progress, task: Any, unpacked: int, files: int | None) -> None:
    bar.update(task, completed=unpacked, total=files if files and unpacked <= files else None)


def cached_bytes(cache: Cache, version_id: str) -> int | None:
    return next((size for vid, size, _ in cache.entries() if vid == version_id), None)


def sizes(download: int | None, files: int | None, on_disk: int | None) -> str:
    """The three sizes of a version, each named: 'download 4.6 KiB, files 15.9 KiB, ...'."""
    named = (("download", download), ("files", files), ("on disk", on_disk))
    return ", ".join(f"{name} {human(size)}" for name, size in named if size is not None)


# -- cache upkeep --------------------------------------------------------------------------


def version_names(cache: Cache) -> dict[str, str]:
    """version id -> artifact name, from the listings mounts keep in the cache (see meta.py);
    best effort: a version no kept listing mentions has no name here."""
    names: dict[str, str] = {}
    for namespace in sorted(cache.listings.glob("*/")):
        artifacts: dict[str, str] = {}
        with contextlib.suppress(Exception):
            for raw in json.loads((namespace / "artifacts.json").read_text()):
                artifacts[raw["id"]] = raw["name"]
                current = raw.get("current_version") or {}
                if current.get("id"):
                    names[current["id"]] = raw["name"]
        for record in namespace.glob("artifact-*.json"):  # one artifact's own newer record
            with contextlib.suppress(Exception):
                raw = json.loads(record.read_text())["record"]
                artifacts[raw["id"]] = raw["name"]
        for listing in namespace.glob("versions-*.json"):
            with contextlib.suppress(Exception):
                for raw in json.loads(listing.read_text()):
                    if raw.get("artifact_id") in artifacts:
                        names[raw["id"]] = artifacts[raw["artifact_id"]]
    return names


def _caps(cache: Cache, mounts: list[dict[str, Any]], usage: int) -> list[dict[str, Any]]:
    """The caps in force: each mount's --cache-size, else what keeps the disk's share free."""
    caps = []
    for m in mounts:
        size = m.get("cache_size")
        if isinstance(size, int) and not isinstance(size, bool):
            caps.append({"bytes": size, "reason": f"--cache-size of the mount at "
                                                  f"{m.get('mountpoint')}"})
    if cache.exists and (len(caps) < len(mounts) or not mounts):
        default = cache.cap(usage)
        caps.append({"bytes": default.bytes, "reason": default.reason})
    return caps


def cache_info(cache_dir: Path, as_json: bool) -> int:
    cache = Cache(cache_dir, create=False)  # looking creates nothing
    entries = cache.entries()
    names = version_names(cache)
    mounts_now = cache.mounts()
    data = {"dir": str(cache.root), "exists": cache.exists,
            "bytes": sum(e[1] for e in entries), "versions": len(entries),
            "in_use": cache.in_use(), "mounts": mounts_now,
            "caps": _caps(cache, mounts_now, sum(e[1] for e in entries)),
            "entries": [{"version_id": vid, "artifact": names.get(vid), "bytes": size,
                         "last_used": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(used))}
                        for vid, size, used in sorted(entries, key=lambda e: -e[2])]}
    if as_json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return 0
    if not cache.exists:
        print(f"cache:     {data['dir']} (does not exist yet: nothing is cached)")
        return 0
    print(f"cache:     {data['dir']}")
    print(f"on disk:   {human(data['bytes'])} in {data['versions']} version(s)")
    if mounts_now:
        for i, m in enumerate(mounts_now):
            print(f"{'in use:' if i == 0 else '':<11}by the mount at {m.get('mountpoint')} "
                  f"({m.get('api_url')}, pid {m.get('pid')})")
    else:
        print(f"in use:    {'yes, by a mount of an earlier vm0fs' if data['in_use'] else 'no'}")
    for cap in data["caps"]:
        print(f"cap:       {human(cap['bytes'])} ({cap['reason']})")
    for e in data["entries"]:
        print(f"  {e['version_id'][:12]}  {e['artifact'] or '(artifact unknown)':<24} "
              f"{human(e['bytes']):>10} on disk, last used {e['last_used']}")
    return 0


def cache_clear(cache_dir: Path, force: bool) -> int:
    if not Cache(cache_dir, create=False).exists:
        print(f"nothing to clear: there is no cache at {cache_dir}")
        return 0
    cache = Cache(cache_dir)
    if cache.in_use() and not force:
        raise CommandError(f"a mount is using {cache.root}: unmount it first, or use --force "
                           "(versions it has open are kept)")
    removed, kept = cache.clear()
    print(f"removed {removed} version(s)" + (f"; kept {kept} in use" if kept else ""))
    return 0


def cache_prune(cache_dir: Path, max_size: int) -> int:
    if not Cache(cache_dir, create=False).exists:
        print(f"nothing to prune: there is no cache at {cache_dir}")
        return 0
    cache = Cache(cache_dir)
    before = cache.usage()
    if before <= max_size:
        print(f"nothing to free: the cache holds {human(before)} on disk, within "
              f"{human(max_size)}")
        return 0
    freed = cache.evict(max_bytes=max_size)
    line = f"freed {human(freed)}; the cache holds {human(cache.usage())} on disk"
    if cache.kept:
        kept_bytes = sum(size for _, size in cache.kept)
        line += (f"; kept {len(cache.kept)} version(s) ({human(kept_bytes)}) that a running "
                 "mount holds open: unmount it first, or give the mount a --cache-size")
    print(line)
    return 0


def run(command: Any, *args: Any) -> int:
    try:
        return command(*args)
    except Vm0fsError as exc:
        print(f"vm0fs: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader of our output went away: `cli.main` ends quietly
        raise
    except OSError as exc:  # a folder we cannot read, a full disk: said in one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"vm0fs: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
