"""The hidden `.vm0fs/` folder at the mount root, all of it: its nodes, what its files say (the
mount's status, and the metadata of an artifact and its versions, for `vm0fs status` and `vm0fs
info`, and anyone with `cat`), and the log records it shows. Knows nothing of FUSE.

    .vm0fs/status          plain text
    .vm0fs/status.json     the same as JSON
    .vm0fs/info/<name>     JSON: the artifact whose folder is artifacts/<name>, and its versions
                           (looked up, not listed)

Its files are made when they are looked at, and get a new mtime and size whenever their
content changes (which makes the kernel drop the pages it kept of them).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import stat
import textwrap
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import trio

from vm0fs.api import Artifact, Version
from vm0fs.namespace import ArtifactDir, Namespace, folder_names
from vm0fs.tree import Dir, InodeTable, Node
from vm0fs.units import human

if TYPE_CHECKING:
    from vm0fs.cache import Cache
    from vm0fs.versions import VersionStore

CONTROL_DIR = ".vm0fs"
MAX_ERRORS = 20


class Generated(Node):
    """A small file of the control folder whose content is made when it is looked at."""

    __slots__ = ("render", "content")

    def __init__(self, inode: int, render: Callable[[], Awaitable[bytes]]) -> None:
        super().__init__(inode, stat.S_IFREG | 0o444)
        self.render = render
        self.content = b""

    async def refresh(self) -> bytes:
        content = await self.render()
        if content != self.content or not self.mtime_ns:
            self.content = content
            self.size = len(content)
            # A new mtime makes the kernel drop the pages it cached of the old content.
            self.mtime_ns = max(time.time_ns(), self.mtime_ns + 1)
        return self.content


class ControlDir(Dir):
    """`.vm0fs/` itself."""

    __slots__ = ()


class InfoDir(Dir):
    """`.vm0fs/info/`: looking up an artifact's folder name gives its metadata (not listed)."""

    __slots__ = ("files",)

    def __init__(self, inode: int, parent: Dir) -> None:
        super().__init__(inode, 0o555, parent.mtime_ns, parent)
        self.files: dict[str, Generated] = {}


class Control:
    """`.vm0fs/` of one mount: put in the root of `names` as it is made."""

    def __init__(self, table: InodeTable, names: Namespace, store: VersionStore, cache: Cache,
                 *, api_url: str, mountpoint: str, open_mode: str, mounted_at: float,
                 recent_errors: RecentErrors, pushed: Callable[[], dict[str, int]] = dict
                 ) -> None:
        self.pushed = pushed  # files put in the kernel's page cache ahead of reads
        self.table = table
        self.names = names
        self.store = store
        self.cache = cache
        self.api_url = api_url
        self.mountpoint = mountpoint
        self.open_mode = open_mode
        self.mounted_at = mounted_at
        self.recent_errors = recent_errors
        root = names.root
        self.dir = ControlDir(table.new_inode(), 0o555, root.mtime_ns, root)
        root.children[CONTROL_DIR] = table.register(self.dir)

        async def status_json() -> bytes:
            return to_json(await self.status())

        async def status() -> bytes:
            return status_text(await self.status()).encode()

        for name, render in (("status", status), ("status.json", status_json)):
            self.dir.children[name] = table.register(Generated(table.new_inode(), render))
        self.info_dir = InfoDir(table.new_inode(), self.dir)
        self.dir.children["info"] = table.register(self.info_dir)

    @staticmethod
    def owns(folder: Dir) -> bool:
        return isinstance(folder, ControlDir | InfoDir)

    async def find(self, parent: Dir, name: str) -> Node | None:
        """The entry `name` of `.vm0fs/` or `.vm0fs/info/`; a file's content made anew."""
        if isinstance(parent, InfoDir):
            return await self._info_file(name)
        node = parent.children.get(name)
        if isinstance(node, Generated):
            await node.refresh()
        return node

    async def status(self) -> dict[str, Any]:
        """What `.vm0fs/status` says: where the mount gets its data and what it is doing."""
        store, listings = self.store, self.names.listings
        entries = await trio.to_thread.run_sync(self.cache.entries)
        cap = await trio.to_thread.run_sync(self.cache.cap, sum(e[1] for e in entries))
        names = {a.id: name
                 for name, a in folder_names(self.names.artifacts_dir.listing or []).items()}
        downloads = [
            {"artifact": names.get(state.artifact_id, state.artifact_id),
             "artifact_id": state.artifact_id, "version_id": state.version_id,
             "bytes_done": state.progress.durable, "bytes_total": state.expected_size,
             "bytes_received": state.fetch.received}
            for state in store.states.values() if state.fetch is not None
        ]
        return {
            "api_url": self.api_url,
            "mountpoint": self.mountpoint,
            "mounted_since": iso(self.mounted_at),
            "offline": listings.stale,
            "open_mode": self.open_mode,
            "cache": {"dir": str(self.cache.root), "bytes": sum(e[1] for e in entries),
                      "cap": cap.bytes, "cap_reason": cap.reason, "versions": len(entries),
                      "damaged_copies": store.repairs},
            "downloads": downloads,
            "downloads_total": store.downloads,
            "memory": {**process_memory(), **store.memory()},
            "listing_only_downloads": {"total": store.listing_only,
                                       "queued": store.listing_queue,
                                       "at_once": store.listing_slots},
            "pushed_ahead": self.pushed(),
            "notice": store.bursts.notice,
            "last_errors": list(self.recent_errors.records),
        }

    async def _info_file(self, name: str) -> Generated | None:
        await self.names.refresh_artifacts()
        folder = self.names.artifacts_dir.children.get(name)
        if not isinstance(folder, ArtifactDir):
            return None
        node = self.info_dir.files.get(name)
        if node is None:
            async def render() -> bytes:
                await self.names.refresh_versions(folder)
                return to_json(artifact_info(name, folder.artifact, folder.listing or []))

            node = Generated(self.table.new_inode(), render)
            self.table.register(node)
            self.info_dir.files[name] = node
        await node.refresh()
        return node


def process_memory() -> dict[str, int]:
    """This process's resident memory now and at its peak, in bytes (from /proc)."""
    found = {"rss": 0, "peak_rss": 0}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                name, _, value = line.partition(":")
                key = {"VmRSS": "rss", "VmHWM": "peak_rss"}.get(name)
                if key is not None:
                    found[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return found


class RecentErrors(logging.Handler):
    """Keeps the last warnings and errors vm0fs logged, for the status file."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: collections.deque[dict[str, str]] = collections.deque(maxlen=MAX_ERRORS)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append({"time": iso(record.created), "level": record.levelname,
                             "message": record.getMessage()})


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def version_info(version: Version) -> dict[str, Any]:
    info = dataclasses.asdict(version)
    info["created_at"] = iso(version.created_at)
    return info


def artifact_info(folder: str, artifact: Artifact, versions: list[Version]) -> dict[str, Any]:
    info = {k: v for k, v in dataclasses.asdict(artifact).items() if k != "current_version"}
    info["folder"] = folder
    info["created_at"] = iso(artifact.created_at)
    info["updated_at"] = iso(artifact.updated_at)
    return {"artifact": info, "versions": [version_info(v) for v in versions]}


def to_json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()


def status_text(status: dict[str, Any]) -> str:
    cache = status["cache"]
    lines = [
        f"API:            {status['api_url']}"
        + ("  (unreachable: serving the last known listings)" if status["offline"] else ""),
        f"mounted at:     {status['mountpoint']}",
        f"mounted since:  {status['mounted_since']}",
        f"opens:          {status['open_mode']}",
        f"cache:          {cache['dir']}",
        f"cache use:      {human(cache['bytes'])} on disk of a {human(cache['cap'])} cap "
        f"({cache['cap_reason']}), {cache['versions']} version(s) cached",
    ]
    if cache.get("damaged_copies"):
        lines.append(f"damaged:        {cache['damaged_copies']} cached cop(ies) failed a check "
                     "and were dropped (see last errors)")
    memory = status.get("memory")
    if memory:
        lines.append(f"memory:         {human(memory['rss'])} resident (peak "
                     f"{human(memory['peak_rss'])}), {memory['versions_in_memory']} of "
                     f"{memory['versions_known']} version(s) held in memory")
    downloads = status["downloads"]
    lines.append(f"downloads:      {len(downloads) or 'none'}")
    for d in downloads:
        files = f", files {human(d['bytes_total'])}" if d["bytes_total"] else ""
        lines.append(f"  {d['artifact']}/{d['version_id'][:12]}: download "
                     f"{human(d['bytes_received'])} so far, unpacked {human(d['bytes_done'])}"
                     f"{files}")
    listing = status["listing_only_downloads"]
    if listing["total"]:
        lines.append(f"listing-only:   {listing['total']} download(s) asked for by folder "
                     f"listings alone ({listing['at_once']} at a time, {listing['queued']} "
                     "queued)")
    pushed = status.get("pushed_ahead") or {}
    if pushed.get("files"):
        lines.append(f"pushed ahead:   {pushed['files']} small file(s), {human(pushed['bytes'])}, "
                     "put in the page cache before they were read")
    notice = status["notice"]
    if notice:
        lines += textwrap.wrap(f"{iso(notice['time'])} {notice['summary']}", width=100,
                               initial_indent="notice:         ", subsequent_indent=" " * 16)
        lines += [" " * 16 + "To stop it in GNOME:", " " * 18 + notice["fix"]]
    errors = status["last_errors"]
    lines.append(f"last errors:    {len(errors) or 'none'}")
    lines += [f"  {e['time']} {e['level']}: {e['message']}" for e in errors[-10:]]
    return "\n".join(lines) + "\n"
