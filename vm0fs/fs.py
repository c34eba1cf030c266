"""The FUSE boundary: the `pyfuse3.Operations` of vm0fs, the only place that raises `FUSEError`.

It owns the errno of every failure (an exception that escaped would kill the mount), the
attributes and timeouts the kernel is given, the read path (lookups, listings and reads inside
a version, served from `versions`), open handles, and telling the kernel to drop the listings
that changed. What the folders above the versions hold is `namespace`'s; `.vm0fs/` is
`control`'s.

Two ways to serve opens:
- stateless (the default when the running pyfuse3 has `NO_OPEN_SUPPORT`, see patches/): `open`
  and `opendir` answer ENOSYS, so the kernel sends no more OPEN/RELEASE (OPENDIR/RELEASEDIR),
  keeps file pages across opens and caches directory listings itself; `read` and `readdir` are
  then handed the inode in place of a file handle. What changes is told to the kernel: a new
  mtime and size for control files, `invalidate_inode` for a listing folder whose entries changed.
- classic (stock pyfuse3): a handle per open file and folder, as any pyfuse3 filesystem.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

import cachetools
import pyfuse3
import trio

from vm0fs.cache import Cache
from vm0fs.control import Control, Generated, RecentErrors, iso
from vm0fs.errors import ApiError, Unauthorized, Vm0fsError, errno_for
from vm0fs.meta import Listings
from vm0fs.namespace import (
    LISTING_FOLDERS,
    ArtifactDir,
    Namespace,
    VersionDir,
    ns,
)
from vm0fs.pagefill import FILL_FILE_MAX, REST_FILE_MAX, PageFill
from vm0fs.tree import (
    ROOT_ENTRY,
    VERSION_INODES,
    ContentDir,
    Dir,
    File,
    Link,
    Node,
    TreeIndex,
    in_version_range,
)
from vm0fs.versions import VersionState, VersionStore

log = logging.getLogger(__name__)

CONTENT_TIMEOUT = 24 * 3600.0  # version contents never change
BLOCK_SIZE = 128 * 1024
READAHEAD_MIN, READAHEAD_MAX = 1 << 20, 64 << 20  # files this big: read ahead from their first read
NO_OPENDIR_KERNEL = (5, 1)  # first Linux release that honours ENOSYS from OPENDIR (OPEN: 4.19)
LISTING_SNAPSHOTS = 16  # folders whose readdir entries are kept between calls (stateless mode)


def stateless_supported() -> bool:
    """Whether this pyfuse3 and this kernel can serve opens without OPEN requests."""
    if not getattr(pyfuse3, "NO_OPEN_SUPPORT", False):
        return False
    release = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return release is not None and (int(release[1]), int(release[2])) >= NO_OPENDIR_KERNEL

P = ParamSpec("P")
R = TypeVar("R")


_last_logged: dict[str, float] = {}
REPEAT_LOG_INTERVAL = 60.0  # the same failure is logged at most once a minute


def log_once(level: int, key: str, message: str, *, exc_info: bool = False) -> None:
    """Log `message` unless one with the same key was logged in the last minute: `ls` in a
    loop must not flood the log."""
    now = time.monotonic()
    if now - _last_logged.get(key, -REPEAT_LOG_INTERVAL) >= REPEAT_LOG_INTERVAL:
        _last_logged[key] = now
        log.log(level, "%s", message, exc_info=exc_info)


def fuse_errors(handler: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Turn every failure of a handler into a FUSEError with the right errno."""

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Unauthorized as exc:
            log_once(logging.ERROR, "unauthorized",
                     f"the API rejected the key ({exc}): check VM0_API_KEY")
            raise pyfuse3.FUSEError(errno.EACCES) from None
        except Exception as exc:  # noqa: BLE001 - the mount must never die
            code = errno_for(exc)
            if code == errno.EIO:
                # Every EIO says why, in the log and so in `vm0fs status`. Our own errors
                # explain themselves; anything else is a bug: keep its traceback. (The key
                # leaves out the request id, which differs every time.)
                reason = exc.message if isinstance(exc, ApiError) else str(exc)
                log_once(logging.WARNING, f"{type(exc).__name__}: {reason}",
                         f"{handler.__name__} failed: {exc}",
                         exc_info=not isinstance(exc, Vm0fsError | OSError))
            raise pyfuse3.FUSEError(code) from None

    return wrapper


XATTR_PREFIX = "user.vm0."


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    # `rg` and anything else that opens files by path walk `current` every time: without the
    # kernel's cache, a readlink request each (a patched pyfuse3 only; see patches/).
    enable_symlink_caching = True

    def __init__(self, listings: Listings, store: VersionStore, cache: Cache, *,
                 metadata_ttl: float, uid: int | None = None, gid: int | None = None,
                 api_url: str = "", mountpoint: str = "", xattrs: bool = False,
                 recent_errors: RecentErrors | None = None, stateless: bool | None = None
                 ) -> None:
        super().__init__()
        self.stateless = stateless_supported() if stateless is None else stateless
        self.xattrs = xattrs
        self.listings = listings
        self.store = store
        self.cache = cache
        self.ttl = metadata_ttl
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.table = store.table
        self.mounted_at = time.time()
        self.fill = PageFill(pyfuse3.notify_store)  # its `run` is a task of the mount
        self.names = Namespace(listings, self.table, pyfuse3.ROOT_INODE, ns(self.mounted_at),
                               self._listing_changed, self._followed, self._retargeted)
        self.root = self.names.root
        self.artifacts_dir = self.names.artifacts_dir
        self.control = Control(self.table, self.names, store, cache, api_url=api_url,
                               mountpoint=mountpoint, open_mode=self.open_mode,
                               mounted_at=self.mounted_at,
                               recent_errors=recent_errors or RecentErrors(),
                               pushed=lambda: {"files": self.fill.files,
                                               "bytes": self.fill.bytes,
                                               "rests_of_files": self.fill.rests})
        self._handles: dict[int, Any] = {}  # classic mode only
        self._next_handle = 1
        # Stateless mode: readdir entries of recently listed folders, so that the calls of
        # one listing see one snapshot; and listing folders whose cached listing must go.
        self._snapshots: cachetools.LRUCache[int, list[tuple[bytes, Node]]] = (
            cachetools.LRUCache(LISTING_SNAPSHOTS))
        self._stale_listings: set[int] = set()
        self._listings_changed = trio.Event()
        store.bursts.name_of = self.names.folder_name

    @property
    def open_mode(self) -> str:
        return "stateless (no open requests)" if self.stateless else "classic (open handles)"

    def init(self) -> None:
        log.info("serving opens in %s mode", self.open_mode)

    async def invalidate_listings(self) -> None:
        """Tell the kernel to drop its cached listing of folders whose entries changed, and its
        cached target of links that point elsewhere now.

        Runs as its own task: `invalidate_inode` must not be called from a request handler."""
        while True:
            await self._listings_changed.wait()
            self._listings_changed = trio.Event()
            inodes, self._stale_listings = self._stale_listings, set()
            for inode in inodes:
                log.debug("listing of inode %d changed: dropping the kernel's copy", inode)
                with contextlib.suppress(OSError):  # ENOENT: the kernel did not know it
                    await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, False)

    def _retargeted(self, link: Link) -> None:
        """`link` points elsewhere now: the kernel's cached target goes (links are cached,
        `enable_symlink_caching`, with a pyfuse3 that has patches/pyfuse3-cache-symlinks)."""
        self._stale_listings.add(link.inode)
        self._listings_changed.set()

    def _listing_changed(self, folder: Dir) -> None:
        """`folder` has other entries now (and a new mtime): the kernel's copy goes."""
        if self.stateless:
            self._stale_listings.add(folder.inode)
            self._listings_changed.set()

    # -- attributes --------------------------------------------------------------------

    def _timeout(self, node: Node) -> float:
        """How long the kernel may keep what we say about `node`."""
        if isinstance(node, Generated):
            return 0.0
        owner = getattr(node, "owner", None)
        if owner is None:  # listing folders, `current` and id prefixes follow the listings
            return self.ttl
        # While a version streams in, a later member may still replace an entry.
        return CONTENT_TIMEOUT if owner.tree_complete else 0.0

    def attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        if node.attrs is not None:
            return node.attrs
        timeout = self._timeout(node)
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.inode
        attrs.generation = 0
        attrs.entry_timeout = timeout
        attrs.attr_timeout = timeout
        attrs.st_mode = node.mode
        attrs.st_nlink = 1  # unknown link count: keeps find from guessing subfolder counts
        attrs.st_uid = self.uid
        attrs.st_gid = self.gid
        attrs.st_rdev = 0
        attrs.st_size = node.size
        attrs.st_blksize = BLOCK_SIZE
        attrs.st_blocks = (node.size + 511) // 512
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = node.mtime_ns
        if timeout == CONTENT_TIMEOUT:
            node.attrs = attrs  # version contents never change
        return attrs

    def _negative(self, timeout: float) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = 0  # "no such entry", cached by the kernel for entry_timeout
        attrs.entry_timeout = timeout
        return attrs

    # -- versions ----------------------------------------------------------------------

    def _state(self, folder: VersionDir, use: bool = False) -> VersionState:
        """`use`: a name inside was looked up (not just the folder listed): see versions.py."""
        state = self.store.get(folder.artifact_id, folder.version.id, folder,
                               ns(folder.version.created_at), folder.version.file_count,
                               folder.version.size, use=use)
        if state is not folder.state:
            folder.state = state
            folder.attrs = None
        return state

    def _followed(self, folder: VersionDir) -> None:
        """A current version folder reached through `current`: its tree is fetched ahead, as
        a listing would (the last of the listing-only downloads to go)."""
        self.store.prefetch(self._state(folder))

    async def _content_listing(self, node: VersionDir | ContentDir) -> ContentListing:
        """A folder inside a version, to list: waits for the version's whole tree."""
        state = self._state(node) if isinstance(node, VersionDir) else self._live(node.owner)
        await state.wait_tree()
        assert isinstance(state.index, TreeIndex)
        entry = node.entry if isinstance(node, ContentDir) else ROOT_ENTRY
        return ContentListing(state, state.index, entry, node)

    def _live(self, state: VersionState) -> VersionState:
        """The current state of a version (a failed one is replaced), its index loading."""
        if state.error is None and state.index is not None:
            state.last_used = time.monotonic()  # the usual case, on every request: quick
            return state
        return self._state(state.root)  # type: ignore[arg-type]

    # -- handlers ----------------------------------------------------------------------

    def _node_now(self, inode: int) -> Node | None:
        """The node of an inode when no waiting is needed (the usual case); else None."""
        if inode < VERSION_INODES:
            return self.table.get(inode)
        found = self.store.state_of(inode)
        if found is None:
            return None
        state, entry = found
        index = state.index
        if index is None or entry >= index.count or state.error is not None:
            return None
        state.last_used = time.monotonic()
        return state.node(entry)

    async def _node(self, inode: int) -> Node:
        """The node of an inode the kernel sent. An entry of a version whose index was dropped
        is found again: its number says which version and which entry."""
        node = self._node_now(inode)
        if node is not None:
            return node
        found = self.store.state_of(inode) if in_version_range(inode) else None
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        state, entry = found
        state = self._live(state)
        index = state.index
        if (index is None or entry >= index.count) and not await state.wait_entry(entry):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return state.node(entry)

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None
                     ) -> pyfuse3.EntryAttributes:
        parent = self._node_now(parent_inode) or await self._node(parent_inode)
        if not isinstance(parent, Dir):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        text = os.fsdecode(name)
        if text == ".":
            return self._entry(parent)
        if text == "..":
            return self._entry(self._parent(parent))
        node = await self._find(parent, text)
        if node is None:
            return self._negative(self._negative_timeout(parent))
        if node is self.artifacts_dir:
            # A path through `artifacts/` must not cost a walk of the list. Its attributes are
            # told as not valid, so the kernel asks for them (getattr, which refreshes the
            # list) before it reuses a listing of it that it cached.
            attrs = self._entry(node)
            if attrs is not node.attrs:
                attrs.attr_timeout = 0
            return attrs
        if isinstance(node, LISTING_FOLDERS):
            await self.names.refresh(node)
        elif isinstance(node, Link) and node.inode in self._stale_listings:
            # It points elsewhere since the kernel cached its target: that goes before the
            # kernel walks through it again. From a thread, as the task does: a readlink in
            # flight holds the page the kernel drops, and its answer comes from this loop.
            self._stale_listings.discard(node.inode)
            with contextlib.suppress(OSError):
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, node.inode, False)
        return self._entry(node)

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        self._counted(node)
        return self.attributes(node)

    @staticmethod
    def _counted(node: Node) -> None:
        """The kernel got a reference to `node` (a lookup, or an entry of readdirplus)."""
        if isinstance(node, (ContentDir, File)) or (isinstance(node, Link)
                                                    and node.owner is not None):
            node.owner.kernel_refs += 1  # entries of versions: counted per version
        else:
            node.lookups += 1

    def _parent(self, node: Dir) -> Dir:
        if isinstance(node, ContentDir):
            parent = node.owner.parent_entry(node.entry)
            node = node.owner.node(parent) if parent != ROOT_ENTRY else node.owner.root
            return node  # type: ignore[return-value]
        return node.parent or self.root

    def _negative_timeout(self, parent: Dir) -> float:
        if isinstance(parent, VersionDir):
            state = parent.state
            return CONTENT_TIMEOUT if state is not None and state.tree_complete else 0.0
        if self.names.answered_from_last_list(parent):
            return 0.0  # answered from the last list while a walk runs: ask again soon
        return self._timeout(parent)

    async def _find(self, parent: Dir, name: str) -> Node | None:
        if isinstance(parent, (VersionDir, ContentDir)):  # inside a version: the usual case
            state = (self._state(parent, use=True) if isinstance(parent, VersionDir)
                     else self._live(parent.owner))
            folder = parent.entry if isinstance(parent, ContentDir) else ROOT_ENTRY
            index = state.index
            if index is not None and index.complete:
                entry = index.find(folder, name)  # the usual case: no need to wait
            else:
                entry = await state.wait_name(folder, name)
            return state.node(entry) if entry is not None else None
        if self.control.owns(parent):
            return await self.control.find(parent, name)
        return await self.names.find(parent, name)

    @fuse_errors
    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            if in_version_range(inode):
                found = self.store.state_of(inode)
                if found is not None:
                    found[0].kernel_refs = max(found[0].kernel_refs - count, 0)
            else:
                self.table.forget(inode, count)

    @fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        node = self._node_now(inode) or await self._node(inode)
        if isinstance(node, Generated):
            await node.refresh()
        elif isinstance(node, LISTING_FOLDERS):
            await self.names.refresh(node)
        return self.attributes(node)

    @fuse_errors
    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        node = self._node_now(inode) or await self._node(inode)
        if not isinstance(node, Link):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(node.target)

    @fuse_errors
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        if self.stateless:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # no more OPENDIR: readdir gets the inode
        node = self._node_now(inode) or await self._node(inode)
        if not isinstance(node, Dir):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return self._new_handle(node)

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        if self.stateless:
            folder = self._node_now(fh) or await self._node(fh)
            if isinstance(folder, (VersionDir, ContentDir)):
                # A version's index never changes: offsets mean the same entry without a
                # snapshot, even after the index was dropped and loaded again.
                self._send_content(await self._content_listing(folder), start_id, token)
                return
            entries = await self._entries(folder, cached=start_id > 0)
        else:
            handle = self._handles.get(fh)
            if handle is None:
                raise pyfuse3.FUSEError(errno.EBADF)
            if isinstance(handle, (VersionDir, ContentDir)):  # first call
                handle = self._handles[fh] = await self._content_listing(handle)
            if isinstance(handle, ContentListing):
                self._send_content(handle, start_id, token)
                return
            if not isinstance(handle, list):  # first call: snapshot the entries
                handle = self._handles[fh] = await self._entries(handle, cached=False)
            entries = handle
        for index in range(start_id, len(entries)):
            name, node = entries[index]
            if not pyfuse3.readdir_reply(token, name, self.attributes(node), index + 1):
                return
            if index >= 2:  # the kernel takes no reference for '.' and '..'
                node.lookups += 1

    def _send_content(self, listing: ContentListing, start: int, token: Any) -> None:
        """readdirplus of a folder in a version, straight from its index (no nodes: this is
        the hot path of find, ls -lR and du). The attributes are those `attributes` gives."""
        state, index, folder = listing.state, listing.index, listing.folder
        if start == 0 and not pyfuse3.readdir_reply(token, b".", self.attributes(folder), 1):
            return
        if start <= 1:
            if isinstance(folder, ContentDir):  # from the listing's own index
                parent = index.parent(listing.entry)
                up: Node = state.node(parent, index) if parent != ROOT_ENTRY else state.root
            else:
                up = self._parent(folder)
            if not pyfuse3.readdir_reply(token, b"..", self.attributes(up), 2):
                return
        state.last_used = time.monotonic()  # in use (the listing keeps its own index)
        # One object for all: readdir_reply copies the attributes into the reply at once.
        attrs = pyfuse3.EntryAttributes()
        attrs.entry_timeout = attrs.attr_timeout = CONTENT_TIMEOUT  # listed when complete
        attrs.st_nlink = 1
        attrs.st_uid = self.uid
        attrs.st_gid = self.gid
        attrs.st_blksize = BLOCK_SIZE
        for i, (name, entry, mode, size, mtime_ns) in enumerate(
                index.listing(listing.entry, max(start - 2, 0)), max(start, 2)):
            attrs.st_ino = state.base + entry
            attrs.st_mode = mode
            attrs.st_size = size
            attrs.st_blocks = (size + 511) // 512
            attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = mtime_ns
            if not pyfuse3.readdir_reply(token, name, attrs, i + 1):
                return
            state.kernel_refs += 1

    async def _entries(self, folder: Node, cached: bool) -> list[tuple[bytes, Node]]:
        """The entries of a folder as readdir hands them out: '.', '..', then the children.

        A listing answered in several calls keeps the snapshot its first call took (offsets
        must keep meaning the same entry); a call from offset 0 starts a new one."""
        if cached:
            snapshot = self._snapshots.get(folder.inode)
            if snapshot is not None:
                return snapshot
        children = await self.names.children(folder)
        entries: list[tuple[bytes, Node]] = [(b".", folder),
                                             (b"..", self._parent(folder))]  # type: ignore[arg-type]
        entries += [(os.fsencode(name), node) for name, node in children.items()]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("readdir inode %d: %d entries", folder.inode, len(children))
        if self.stateless:
            self._snapshots[folder.inode] = entries
        return entries

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        if self.stateless:
            # No more OPEN/RELEASE: the kernel keeps pages across opens and `read` gets the
            # inode. The mount is read-only, so the kernel refuses writes itself.
            raise pyfuse3.FUSEError(errno.ENOSYS)
        node = self._node_now(inode) or await self._node(inode)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if isinstance(node, Dir):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if isinstance(node, Generated):  # a snapshot per open; its size is not known ahead
            return pyfuse3.FileInfo(fh=self._new_handle(await node.refresh()), direct_io=True)
        if not isinstance(node, File):
            raise pyfuse3.FUSEError(errno.EINVAL)
        state: VersionState = node.owner
        if state.error is not None:
            raise pyfuse3.FUSEError(errno_for(state.error))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("open inode %d of version %s", inode, state.version_id[:12])
        self.store.reading(state)
        return pyfuse3.FileInfo(fh=self._new_handle(node), keep_cache=True)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        node = (self._node_now(fh) or await self._node(fh)) if self.stateless else (
            self._handles.get(fh))
        if isinstance(node, bytes):  # classic mode: the snapshot a control file's open took
            return node[off:off + size]
        if isinstance(node, Generated):  # stateless: the content its size was last told with
            return node.content[off:off + size]
        if not isinstance(node, File):
            raise pyfuse3.FUSEError(errno.EISDIR if isinstance(node, Dir) else errno.EBADF)
        end = min(off + size, node.size)
        if off >= end:
            return b""
        state: VersionState = node.owner
        if self.stateless and state.error is not None:  # what `open` checks in classic mode
            raise pyfuse3.FUSEError(errno_for(state.error))
        self.store.reading(state)  # kept from eviction, and brought back if it was evicted
        if node.sparse is not None:
            return await self._read_sparse(node, off, end)
        if off == 0 and node.size <= FILL_FILE_MAX:
            self.fill.read_from_start(state, node.entry)  # the next files may be pushed ahead
        # Big files are mostly read through: the first read asks the disk for the rest too.
        ahead = min(node.size, READAHEAD_MAX) if off == 0 and node.size >= READAHEAD_MIN else 0
        data = await self._read_range(node, node.offset + off, end - off, ahead)
        if off == 0 and end < node.size <= REST_FILE_MAX:
            # A first read that asked for less than the small file (rg reads 3 bytes first,
            # and the kernel asks 16 KiB): the rest goes into the page cache before this read
            # is answered, so that the next one finds it there instead of asking again.
            await self.fill.rest_of_file(state, node.entry, end)
        return data

    async def _read_range(self, node: File, start: int, length: int, ahead: int = 0
                          ) -> bytes | memoryview:
        return await self.store.read(node.owner, start, length, ahead)

    async def _read_sparse(self, node: File, off: int, end: int) -> bytes:
        """A sparse member's data is its runs stored back to back; the holes read as zeroes."""
        out = bytearray(end - off)
        stored = node.offset
        assert node.sparse is not None
        for run_offset, run_length in node.sparse:
            lo, hi = max(off, run_offset), min(end, run_offset + run_length)
            if lo < hi:
                data = await self._read_range(node, stored + lo - run_offset, hi - lo)
                out[lo - off:hi - off] = data
            stored += run_length
        return bytes(out)

    @fuse_errors
    async def release(self, fh: int) -> None:
        self._handles.pop(fh, None)

    @fuse_errors
    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        used = await trio.to_thread.run_sync(self.cache.usage)
        data = pyfuse3.StatvfsData()
        data.f_bsize = BLOCK_SIZE
        data.f_frsize = 4096
        data.f_blocks = (used + 4095) // 4096
        data.f_bfree = data.f_bavail = 0
        data.f_files = len(self.table)
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    # -- extended attributes (opt-in: answering at all costs `ls -l` two requests a file) --

    def _xattrs(self, node: Node) -> dict[str, str]:
        if isinstance(node, ArtifactDir):
            artifact, version = node.artifact, None
        elif isinstance(node, VersionDir):
            folder = node.parent
            artifact = folder.artifact if isinstance(folder, ArtifactDir) else None
            version = node.version
        else:
            return {}
        fields: dict[str, Any] = {}
        if artifact is not None:
            fields.update(artifact_id=artifact.id, artifact_name=artifact.name,
                          current_version_id=artifact.current_version_id or "")
        if version is not None:
            fields.update(version_id=version.id, message=version.message or "",
                          created_by=version.created_by or "", created_at=iso(version.created_at),
                          size=version.size, file_count=version.file_count)
        return {XATTR_PREFIX + key: str(value) for key, value in fields.items()}

    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # the kernel stops asking for good
        value = self._xattrs(await self._node(inode)).get(os.fsdecode(name))
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value.encode()

    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return [name.encode() for name in self._xattrs(await self._node(inode))]

    def _new_handle(self, target: Any) -> int:
        fh = self._next_handle
        self._next_handle += 1
        self._handles[fh] = target
        return fh

    # -- everything that would write: read-only ------------------------------------------

    async def setattr(self, *args: Any, **kwargs: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    mknod = mkdir = unlink = rmdir = symlink = rename = link = write = create = _read_only
    setxattr = removexattr = _read_only


class ContentListing:
    """A folder of a version being listed: its entries come from the index as they are sent
    (the index is kept even if the version drops it meanwhile: the numbers stay the same)."""

    __slots__ = ("state", "index", "entry", "folder")

    def __init__(self, state: VersionState, index: TreeIndex, entry: int, folder: Dir) -> None:
        self.state = state
        self.index = index
        self.entry = entry
        self.folder = folder  # its node, for '.' and '..'

    def __len__(self) -> int:
        return self.index.child_count(self.entry)
