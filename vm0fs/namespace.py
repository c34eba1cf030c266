"""The folders above the versions, and what they show: `artifacts/`, each artifact's folder (its
version folders, `current`, `history/`, and the names looked up but not listed: id prefixes
and `current~N`), the listing refreshes behind them, and which folders got other entries (what
the kernel must be told). Knows nothing of FUSE: `fs` turns these nodes into attributes and
errnos, `versions` serves what is inside a version folder.

    artifacts/                           one folder per artifact, named by its name
    artifacts/<name>/<id>/               one folder per version, named by its full id
    artifacts/<name>/current             link to the current version's id
    artifacts/<name>/history/<time>      link to ../<id>, named by the version's creation time
    artifacts/<name>/<8+ hex>            link to the one id it is a prefix of (not listed)
    artifacts/<name>/current~N           link to the Nth version before `current` (not listed)

Every name here follows the listings (`meta`): the artifact list, an artifact's own record and
its versions. Nothing here downloads.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from vm0fs.api import Artifact, Version
from vm0fs.errors import NotFound, Unauthorized
from vm0fs.meta import ARTIFACTS, Listings
from vm0fs.tree import Dir, InodeTable, Link, Node

log = logging.getLogger(__name__)

CURRENT = "current"
FOLLOW_WINDOW = 2.0  # seconds from a lookup of `current` to one of its target that follow it,
# and between two such follows in a row
SWEEP_FOLLOWS = 3  # artifacts whose `current` is followed in a row: a sweep over them
HISTORY = "history"
HEX_PREFIX = re.compile(r"[0-9a-f]{8,64}")
COUNTED_BACK = re.compile(r"current~(0|[1-9][0-9]{0,8})")  # current~N, N without leading 0s
TIME_NAME = "%Y-%m-%dT%H-%M-%SZ"  # no colons: they break Samba, Windows shares, some copy tools


def ns(timestamp: float) -> int:
    return int(timestamp * 1e9)


def safe_name(name: str) -> str:
    """A file name for an artifact name: '/' and NUL cannot appear, '.' and '..' are taken.

    Replacements follow rclone: '/' -> '／' (U+FF0F), NUL -> '␀' (U+2400), a name of only
    dots -> the same number of '．' (U+FF0E).
    """
    name = name.replace("/", "\uff0f").replace("\0", "\u2400")
    if name in (".", ".."):
        name = "\uff0e" * len(name)
    return name


def folder_names(artifacts: list[Artifact]) -> dict[str, Artifact]:
    """Folder name -> artifact. Names shared by several artifacts all become `name@<id>`."""
    safe = [(safe_name(a.name), a) for a in artifacts]
    counts = Counter(name for name, _ in safe)
    names: dict[str, Artifact] = {}
    for name, artifact in safe:
        if counts[name] > 1 or not name or len(name.encode()) > 255:
            name = f"{name}@{artifact.id}"
        names[name] = artifact
    return names


def time_name(timestamp: float) -> str:
    """`2024-01-02T15-04-05Z`: a creation time in UTC, to the second, without colons."""
    try:
        return datetime.fromtimestamp(timestamp, UTC).strftime(TIME_NAME)
    except (OverflowError, OSError, ValueError):  # a time no calendar holds
        return datetime.fromtimestamp(0, UTC).strftime(TIME_NAME)


def history_names(versions: Iterable[Version]) -> dict[str, Version]:
    """The names of `history/`, in time order: each version's creation time; versions created
    in the same second all get `-` and the first 8 hex characters of their id (the whole id in
    the unlikely case that those are shared too)."""
    by_second: dict[str, list[Version]] = {}
    for version in versions:
        by_second.setdefault(time_name(version.created_at), []).append(version)
    names: dict[str, Version] = {}
    for when, group in by_second.items():
        if len(group) == 1:
            names[when] = group[0]
            continue
        short = Counter(v.id[:8] for v in group)
        for v in group:
            names[f"{when}-{v.id[:8] if short[v.id[:8]] == 1 else v.id}"] = v
    return dict(sorted(names.items()))


def in_creation_order(versions: Iterable[Version]) -> list[Version]:
    """Oldest first; versions created at the same time in the order of their ids."""
    return sorted(versions, key=lambda v: (v.created_at, v.id))


def counted_back(versions: Iterable[Version], current_id: str | None, n: int) -> Version | None:
    """`current~n`: the nth version before the current one in creation order (n = 0: the
    current one); None without a current version or past the oldest."""
    ordered = in_creation_order(versions)
    at = next((i for i, v in enumerate(ordered) if v.id == current_id), None)
    if at is None or n > at:
        return None
    return ordered[at - n]


class ArtifactsDir(Dir):
    __slots__ = ("listing",)

    def __init__(self, inode: int, parent: Dir) -> None:
        super().__init__(inode, 0o555, parent=parent)
        self.listing: list[Artifact] | None = None  # the listing `children` was built from


class ArtifactDir(Dir):
    __slots__ = ("artifact", "listing", "current", "aliases", "history", "counted",
                 "followed_at")

    def __init__(self, inode: int, artifact: Artifact, parent: Dir) -> None:
        super().__init__(inode, 0o555, ns(artifact.updated_at), parent)
        self.artifact = artifact
        self.listing: list[Version] | None = None
        self.current: Link | None = None
        self.aliases: dict[str, Link] = {}  # id prefixes looked up so far
        self.history: HistoryDir | None = None
        self.counted: dict[int, Link] = {}  # current~N looked up so far
        self.followed_at = -math.inf  # when `current` was last looked up


class HistoryDir(Dir):
    """`artifacts/<name>/history/`: a link per version, named by its creation time."""

    __slots__ = ("folder", "links")

    def __init__(self, inode: int, folder: ArtifactDir) -> None:
        super().__init__(inode, 0o555, folder.mtime_ns, folder)
        self.folder = folder
        self.links: dict[str, Link] = {}  # version id -> its link: one inode per version


class VersionDir(Dir):
    __slots__ = ("artifact_id", "version", "state")

    def __init__(self, inode: int, artifact_id: str, version: Version, parent: Dir) -> None:
        super().__init__(inode, 0o555, ns(version.created_at), parent)
        self.artifact_id = artifact_id
        self.version = version
        self.state: Any = None  # its versions.VersionState, once asked for


LISTING_FOLDERS = (ArtifactsDir, ArtifactDir, HistoryDir)  # what a listing refresh changes


class Namespace:
    """The root, `artifacts/` and everything in it down to the version folders.

    `changed(folder)` is told of every folder whose entries changed after it was shown (its
    mtime is new by then): the kernel may hold a listing of it that must go. `retargeted(link)`
    is told of a link that points elsewhere now (`current`, `current~N`): the kernel may hold
    its old target."""

    def __init__(self, listings: Listings, table: InodeTable, root_inode: int, mtime_ns: int,
                 changed: Callable[[Dir], None] = lambda folder: None,
                 followed: Callable[[VersionDir], None] = lambda folder: None,
                 retargeted: Callable[[Link], None] = lambda link: None) -> None:
        self.listings = listings
        self.retargeted = retargeted
        self.followed = followed  # told of a current version folder reached through `current`
        self.table = table
        self.changed = changed
        self.root = Dir(root_inode, 0o555, mtime_ns)
        table.register(self.root)
        self.artifacts_dir = ArtifactsDir(table.new_inode(), self.root)
        self.artifacts_dir.mtime_ns = mtime_ns
        self.root.children["artifacts"] = table.register(self.artifacts_dir)
        self._artifact_dirs: dict[str, ArtifactDir] = {}
        self._gone: set[str] = set()  # names of artifacts/ found deleted since the last list
        self._version_dirs: dict[tuple[str, str], VersionDir] = {}
        # Current versions followed in a row (see _follow), by artifact id, in order.
        self._follows: dict[str, VersionDir] = {}
        self._last_follow = -math.inf
        self._sweeping = False
        listings.on_change = self._listing_refreshed

    # -- what the fs layer asks --------------------------------------------------------

    async def children(self, node: Node) -> dict[str, Node]:
        """The entries of a folder above the versions, fetching what they depend on."""
        if not isinstance(node, Dir):
            raise NotADirectoryError(node.inode)
        if node is self.artifacts_dir:
            await self.refresh_artifacts()
        elif isinstance(node, ArtifactDir):
            await self.refresh_versions(node)
        elif isinstance(node, HistoryDir):
            await self.refresh_versions(node.folder)
        return node.children

    async def find(self, parent: Dir, name: str) -> Node | None:
        """The entry `name` of a folder above the versions (the root included), or None."""
        if parent is self.artifacts_dir:
            node = parent.children.get(name) if self.artifacts_dir.listing is not None else None
            if isinstance(node, ArtifactDir):  # a known name: its own record, not the list
                if node.listing is not None:  # listed before: likely to be listed again
                    self.listings.prefetch_versions(node.artifact.id)
                return node if await self._refresh_artifact(node) else None
            if name in self._gone:
                return None
            await self.refresh_artifacts()  # only a walk can find a new name
            return parent.children.get(name)
        if isinstance(parent, ArtifactDir):
            await self.refresh_versions(parent)
            node = (parent.children.get(name) or self._resolve_prefix(parent, name)
                    or self._count_back(parent, name))
            now = time.monotonic()
            if name == CURRENT:
                parent.followed_at = now
            elif (isinstance(node, VersionDir) and now - parent.followed_at < FOLLOW_WINDOW
                  and parent.current is not None and parent.current.target == name):
                parent.followed_at = -math.inf
                self._follow(node, now)
            return node
        if isinstance(parent, HistoryDir):
            await self.refresh_versions(parent.folder)
        return parent.children.get(name)

    async def refresh(self, node: Node) -> None:
        """Before the attributes of a listing folder go out (getattr, lookup): its listing as
        of now. The kernel reuses a listing it cached (stateless opens) for as long as the
        folder's attributes are valid and its mtime is the same."""
        try:
            if node is self.artifacts_dir:
                await self.refresh_artifacts()
            elif isinstance(node, ArtifactDir) and node.listing is None:
                await self._refresh_artifact(node)  # its record: the mtime is its updated_at
            elif isinstance(node, ArtifactDir):
                await self.refresh_versions(node)  # its record and its versions, not the list
            elif isinstance(node, HistoryDir):
                await self.refresh_versions(node.folder)
        except Unauthorized:
            raise  # EACCES, as a listing gets: the kernel must not show what it cached
        except Exception as exc:  # noqa: BLE001 - stale attributes beat an error here
            log.debug("listing refresh for the attributes of inode %d failed: %s",
                      node.inode, exc)

    def answered_from_last_list(self, parent: Dir) -> bool:
        """Whether a lookup in `parent` answered from the last list while a walk runs (a "no
        such name" then is not worth keeping long)."""
        return parent is self.artifacts_dir and self.listings.artifacts_refreshing

    def _follow(self, folder: VersionDir, now: float) -> None:
        """`current` looked up, then the folder it names: a path is followed through it. In
        SWEEP_FOLLOWS artifacts in a row (a shell expanding `artifacts/*/current/`, before the
        command looks inside them one by one), those versions and the next ones followed are
        fetched ahead. One artifact is not a sweep: a file manager showing an artifact's folder
        follows its `current` to draw it, and that must download nothing."""
        if now - self._last_follow > FOLLOW_WINDOW:
            self._follows.clear()
            self._sweeping = False
        self._last_follow = now
        if self._sweeping:
            self.followed(folder)
            return
        self._follows[folder.artifact_id] = folder
        if len(self._follows) >= SWEEP_FOLLOWS:
            self._sweeping = True
            for each in self._follows.values():
                self.followed(each)
            self._follows.clear()

    def folder_name(self, artifact_id: str) -> str:
        for name, node in self.artifacts_dir.children.items():
            if isinstance(node, ArtifactDir) and node.artifact.id == artifact_id:
                return name
        return artifact_id

    # -- listings ----------------------------------------------------------------------

    async def refresh_artifacts(self) -> None:
        """`artifacts/` from the artifact list (a walk of every page when it is stale)."""
        self._show_artifacts(await self.listings.artifacts())

    async def refresh_versions(self, folder: ArtifactDir) -> None:
        """An artifact's folder: its record and its versions (two requests when stale)."""
        self.listings.prefetch_versions(folder.artifact.id)  # side by side with the record
        if not await self._refresh_artifact(folder):
            raise NotFound(f"the artifact {folder.artifact.id} no longer exists")
        listing = await self.listings.versions(folder.artifact.id)
        if listing is not folder.listing:
            self._show_versions(folder, listing)

    def _listing_changed(self, folder: Dir, mtime_ns: int) -> None:
        """`folder` now has other entries: a later mtime, and the kernel's copy goes."""
        folder.mtime_ns = max(mtime_ns, folder.mtime_ns + 1)
        folder.attrs = None
        self.changed(folder)

    def _show_artifacts(self, listing: list[Artifact]) -> None:
        folder = self.artifacts_dir
        if listing is folder.listing:
            return
        shown = [a for a in map(self.listings.newest, listing) if a is not None]
        children: dict[str, Node] = {}
        for name, artifact in folder_names(shown).items():
            node = self._artifact_dirs.get(artifact.id)
            if node is None:
                node = ArtifactDir(self.table.new_inode(), artifact, folder)
                self._artifact_dirs[artifact.id] = node
                self.table.register(node)
            else:
                self._update_artifact(node, artifact)
            node.attrs = None
            children[name] = node
        if children != folder.children and folder.listing is not None:
            self._listing_changed(folder, time.time_ns())
        folder.children = children
        folder.listing = listing
        folder.attrs = None
        self._gone.clear()

    def _update_artifact(self, node: ArtifactDir, artifact: Artifact) -> None:
        if node.artifact == artifact:
            return
        node.artifact = artifact
        node.mtime_ns = max(ns(artifact.updated_at), node.mtime_ns)
        node.attrs = None
        if node.listing is not None:
            self._show_versions(node, node.listing)  # `current` may have moved

    def _drop_artifact(self, folder: ArtifactDir) -> None:
        """The API says the artifact no longer exists: its folder leaves `artifacts/`."""
        parent = self.artifacts_dir
        names = [name for name, child in parent.children.items() if child is folder]
        if names:
            parent.children = {n: c for n, c in parent.children.items() if c is not folder}
            self._listing_changed(parent, time.time_ns())
            self._gone.update(names)  # a lookup of it again needs no walk to say so

    async def _refresh_artifact(self, folder: ArtifactDir) -> bool:
        """The artifact's own record (one request when it is stale), never a walk of the list.
        False when the artifact no longer exists."""
        artifact = await self.listings.artifact(folder.artifact.id)
        if artifact is None:
            self._drop_artifact(folder)
            return False
        self._update_artifact(folder, artifact)
        return True

    def _show_versions(self, folder: ArtifactDir, listing: list[Version]) -> None:
        children: dict[str, Node] = {}
        for version in listing:
            children[version.id] = self._version_dir(folder, version)
        current_id = folder.artifact.current_version_id
        if current_id and current_id not in children and folder.artifact.current_version:
            # The listing can lag behind the artifact: the current version is still reachable.
            children[current_id] = self._version_dir(folder, folder.artifact.current_version)
        versions = [node for node in children.values() if isinstance(node, VersionDir)]
        if current_id and current_id in children:
            if folder.current is None:
                folder.current = self._link(current_id, ns(folder.artifact.updated_at))
            elif folder.current.target != current_id:
                self._retarget(folder.current, current_id)
            children[CURRENT] = folder.current
        if folder.history is None:
            folder.history = HistoryDir(self.table.new_inode(), folder)
            self.table.register(folder.history)
        self._show_history(folder.history, versions)
        children[HISTORY] = folder.history
        if children != folder.children and folder.listing is not None:
            self._listing_changed(folder, ns(folder.artifact.updated_at))
        folder.children = children
        folder.listing = listing
        folder.aliases = {p: a for p, a in folder.aliases.items() if a.target in children}

    def _show_history(self, history: HistoryDir, versions: list[VersionDir]) -> None:
        children: dict[str, Node] = {}
        links: dict[str, Link] = {}
        for name, version in history_names(v.version for v in versions).items():
            link = history.links.get(version.id) or self._link(f"../{version.id}",
                                                               ns(version.created_at))
            children[name] = links[version.id] = link
        if children != history.children and history.folder.listing is not None:
            self._listing_changed(history, history.folder.mtime_ns)
        history.children = children
        history.links = links

    def _listing_refreshed(self, key: str, value: Any) -> None:
        """A refresh that ran behind the last answer ended with something new: shown at once,
        and the kernel is told (so what is new does not wait for the next access after the
        TTL). Only what was shown before is updated: the rest is built when first asked."""
        if key == ARTIFACTS:
            if self.artifacts_dir.listing is not None:
                self._show_artifacts(value)
            return
        kind, _, artifact_id = key.partition("-")
        folder = self._artifact_dirs.get(artifact_id)
        if folder is None:
            return
        if kind == "artifact" and value is None:
            self._drop_artifact(folder)
        elif kind == "artifact":
            self._update_artifact(folder, value)
        elif kind == "versions" and folder.listing is not None:
            self._show_versions(folder, value)

    def _version_dir(self, folder: ArtifactDir, version: Version) -> VersionDir:
        key = (folder.artifact.id, version.id)
        node = self._version_dirs.get(key)
        if node is None:
            node = VersionDir(self.table.new_inode(), folder.artifact.id, version, folder)
            self._version_dirs[key] = node
            self.table.register(node)
        return node

    def _link(self, target: str, mtime_ns: int) -> Link:
        link = Link(self.table.new_inode(), target, mtime_ns)
        self.table.register(link)
        return link

    # -- names looked up, not listed ---------------------------------------------------

    def _resolve_prefix(self, folder: ArtifactDir, name: str) -> Link | None:
        if not HEX_PREFIX.fullmatch(name):
            return None
        alias = folder.aliases.get(name)
        if alias is not None:
            return alias
        matches = [vid for vid, node in folder.children.items()
                   if isinstance(node, VersionDir) and vid.startswith(name)]
        if len(matches) != 1:
            return None
        alias = self._link(matches[0], folder.mtime_ns)
        folder.aliases[name] = alias
        return alias

    def _count_back(self, folder: ArtifactDir, name: str) -> Link | None:
        """`current~N`, from the listing just refreshed. One link per N, pointed again when
        `current` moves or versions come and go (as `current` is)."""
        match = COUNTED_BACK.fullmatch(name)
        if match is None:
            return None
        n = int(match[1])
        versions = [node.version for node in folder.children.values()
                    if isinstance(node, VersionDir)]
        found = counted_back(versions, folder.artifact.current_version_id, n)
        if found is None:
            return None
        link = folder.counted.get(n)
        if link is None:
            link = folder.counted[n] = self._link(found.id, folder.mtime_ns)
        elif link.target != found.id:
            self._retarget(link, found.id)  # ids are all 64 characters: the size stays the same
        return link

    def _retarget(self, link: Link, target: str) -> None:
        link.target = target
        link.attrs = None
        self.retargeted(link)
