"""Version contents in this process: one download per version however many readers wait, the
tree grown member by member while the archive arrives, and reads that wait only for their bytes.

A `VersionState` belongs to one version folder. Its `load` task fills the folder from the cache
if the version is there, or else downloads it: the HTTP stream is inflated into a staging file
by one worker thread while another reads tar headers from the same file and publishes members
(see archive.py). Waiters sleep on a trio Event that is replaced at every step.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import trio

from vm0fs.archive import Progress
from vm0fs.cache import Cache
from vm0fs.errors import Unavailable, Vm0fsError
from vm0fs.fetch import Downloader, Fetch
from vm0fs.tree import (
    ROOT_ENTRY,
    Dir,
    File,
    InodeTable,
    Node,
    TreeBuilder,
    TreeIndex,
    build_index,
    node_for,
    split_inode,
    version_base,
)

log = logging.getLogger("vm0fs.versions")

# An index nobody used for TREE_IDLE seconds leaves memory; so does one the kernel holds nothing
# of after TREE_GRACE; and the least recently used go while all use more than TREE_BUDGET.
# Mapping an index again costs a few system calls: a small budget is cheap.
TREE_IDLE = 60.0
TREE_GRACE = 5.0
TREE_BUDGET = 16 << 20
TRIM_INTERVAL = 5.0
NODE_CACHE = 2048  # nodes of entries kept per version in memory


class VersionState:
    """The contents of one version folder and where its bytes are.

    `index` holds the version's entries: a `TreeBuilder` while the archive downloads, then the
    `TreeIndex` mapped from the cache, or None when it was dropped to save memory (it is loaded
    again from the cache when it is needed). Its inodes are `base + entry` whatever happens."""

    def __init__(self, artifact_id: str, version_id: str, root: Dir, base: int) -> None:
        self.artifact_id = artifact_id
        self.version_id = version_id
        self.root = root  # the VersionDir: entry 0
        self.base = base  # inode of entry 0's range
        self.index: TreeIndex | TreeBuilder | None = None
        self.fd: int | None = None  # the tar file: staging while downloading, then the cache
        self.progress = Progress()
        self.tree_complete = False  # every member is known (contents are final)
        self.error: BaseException | None = None
        self.failed_at = 0.0
        self.loading = False
        self.open_handles = 0
        self.kernel_refs = 0  # lookups of this version's entries the kernel has not forgotten
        self.last_used = time.monotonic()  # when a request last needed the index
        self.expected_size = 0  # the API's uncompressed size, for progress reports
        self.implied_mtime_ns = 0  # of folders the archive does not list: the version's date
        self.fetch: Fetch | None = None  # the download under way, if any
        self._changed = trio.Event()
        self._nodes: dict[int, Node] = {}

    @property
    def data_ready(self) -> bool:
        return self.fd is not None and self.progress.ended and self.progress.error is None

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def _check_loading(self) -> None:
        """Before waiting for the index: fail if it cannot come (see VersionStore.ensure)."""
        self._raise_if_failed()
        if self.index is None and not self.loading:
            raise Vm0fsError("version contents are not loaded")

    def node(self, entry: int, index: TreeIndex | TreeBuilder | None = None) -> Node:
        """The node of an entry of the loaded index, or of `index` (a listing keeps the one it
        started with). The last few made are kept, with the attributes the fs layer caches on
        them: a lookup follows a listing."""
        if entry == ROOT_ENTRY:
            return self.root
        node = self._nodes.get(entry)
        if node is not None:
            return node
        index = index or self.index
        assert index is not None
        node = node_for(index, entry, self.base + entry, self)
        if index.complete:  # while it grows, a folder's mode may still change
            if len(self._nodes) >= NODE_CACHE:
                self._nodes.clear()
            self._nodes[entry] = node
        return node

    def set_index(self, index: TreeIndex | TreeBuilder | None) -> None:
        self.index = index
        self._nodes.clear()

    def parent_entry(self, entry: int) -> int:
        assert self.index is not None
        return self.index.parent(entry)

    async def wait_entry(self, entry: int) -> bool:
        """Until the index holds `entry` or is complete; whether it holds it."""
        while True:
            index = self.index
            if index is not None and entry < index.count:
                return True
            if index is not None and index.complete:
                return False
            self._check_loading()
            await self._changed.wait()

    async def wait_tree(self) -> None:
        """Until every member is known (for listings)."""
        while self.index is None or not self.index.complete:
            self._check_loading()
            await self._changed.wait()

    async def wait_name(self, folder: int, name: str) -> int | None:
        """Until `name` exists in the folder entry `folder` or the tree is complete."""
        while True:
            index = self.index
            if index is not None:
                entry = index.find(folder, name)
                if entry is not None or index.complete:
                    return entry
            self._check_loading()
            await self._changed.wait()

    async def wait_bytes(self, end: int) -> int:
        """Until the tar file holds `end` bytes; returns the file descriptor to read."""
        while self.fd is None or (self.progress.durable < end and not self.progress.ended):
            self._raise_if_failed()
            if not self.loading and self.fd is None:
                raise Vm0fsError("version data is not loaded")
            await self._changed.wait()
        self._raise_if_failed()
        if self.progress.durable < end:
            raise Vm0fsError("read past the end of the version data")
        return self.fd


class VersionStore:
    """Starts and tracks the loads of versions; owns the worker tasks; lets go of the indexes
    of versions nobody uses (`trim`)."""

    def __init__(self, cache: Cache, client: Downloader, table: InodeTable, *,
                 max_version_bytes: int | None = None, retry_failed_after: float = 5.0,
                 tree_budget: int = TREE_BUDGET, tree_idle: float = TREE_IDLE) -> None:
        self.cache = cache
        self.client = client
        self.table = table
        self.max_version_bytes = max_version_bytes
        self.retry_failed_after = retry_failed_after
        self.tree_budget = tree_budget
        self.tree_idle = tree_idle
        self.states: dict[tuple[str, str], VersionState] = {}
        self._ordinals: dict[tuple[str, str], int] = {}  # each version's inode range, for good
        self._keys: list[tuple[str, str]] = []
        self.downloads = 0  # archives fetched over the network by this process
        self._nursery: trio.Nursery | None = None
        self.offline: Callable[[], bool] = lambda: False  # skip downloads while the API is down

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Host the load tasks until cancelled; drop unused indexes now and then."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                await trio.sleep(TRIM_INTERVAL)
                self.trim()

    def get(self, artifact_id: str, version_id: str, root: Dir, created_ns: int,
            file_count: int, size: int = 0) -> VersionState:
        """The state of a version folder, starting its load if nothing usable is under way."""
        key = (artifact_id, version_id)
        state = self.states.get(key)
        if state is not None:
            if state.error is None:
                self.ensure(state)
                return state
            if time.monotonic() - state.failed_at < self.retry_failed_after:
                return state  # failed moments ago: answer EIO again rather than hammer the API
        ordinal = self._ordinals.get(key)
        if ordinal is None:
            ordinal = self._ordinals[key] = len(self._keys)
            self._keys.append(key)
        new = VersionState(artifact_id, version_id, root, version_base(ordinal))
        new.implied_mtime_ns = created_ns
        new.expected_size = size
        if state is not None:
            new.kernel_refs = state.kernel_refs  # the kernel's references outlive a failure
        self.states[key] = new
        if file_count == 0:  # nothing to download: the service has no archive for it
            new.fd = -1
            new.index = build_index([], created_ns, 0)
            new.progress.end()
            new.tree_complete = True
        else:
            self._start(new)
        return new

    def state_of(self, inode: int) -> tuple[VersionState, int] | None:
        """The version an inode of a version's range belongs to, and its entry number."""
        ordinal, entry = split_inode(inode)
        if not 0 <= ordinal < len(self._keys):
            return None
        state = self.states.get(self._keys[ordinal])
        return (state, entry) if state is not None else None

    def ensure(self, state: VersionState, data: bool = False) -> None:
        """Note that the version is used now, and load what it lacks (its index, and its data
        if `data`) unless that is under way."""
        state.last_used = time.monotonic()
        if state.error is not None or state.loading:
            return
        if state.index is None and state.fd is not None and state.fd >= 0:
            # The data is open (so its cache entry cannot go): map its index again.
            try:
                state.set_index(self.cache.load_index(state.version_id))
            except (OSError, ValueError) as exc:  # gone or damaged: _load sorts it out
                log.debug("version %s: index not loaded again: %s", state.version_id[:12], exc)
            if state.index is not None:
                self._over_budget(state)
                return
        if state.index is None or (data and state.fd is None):
            self._start(state)

    def _start(self, state: VersionState) -> None:
        assert self._nursery is not None, "VersionStore.run() is not running"
        state.loading = True
        state.error = None
        state.progress = Progress()
        self.cache.touch(state.version_id)  # asked for now: that is when it was last used
        self._nursery.start_soon(self._load, state, name=f"load {state.version_id[:12]}")

    async def _load(self, state: VersionState) -> None:
        # Loaded again while its data is open (its index file was unreadable): the old
        # descriptor is closed once the new one is in place.
        old_fd = state.fd if state.fd is not None and state.fd >= 0 else None
        try:
            entry = await trio.to_thread.run_sync(self.cache.open_entry, state.version_id)
            if entry is not None:
                log.debug("version %s: %d entries from the cache", state.version_id[:12],
                          entry.index.count)
                state.fd = entry.fd
                state.set_index(entry.index)
                state.progress.advance(entry.size)
                state.progress.end()
            elif self.offline():
                raise Unavailable("the API is unreachable and this version is not cached")
            else:
                await self._download(state)
            state.tree_complete = True
        except Exception as exc:  # noqa: BLE001 - every failure becomes EIO for this version
            self._fail(state, exc)
        finally:
            state.loading = False
            state.notify()
            if old_fd is not None and old_fd != state.fd:
                os.close(old_fd)
        if state.error is None:
            self._over_budget(state)
            if self.cache.max_bytes is not None:
                await self.enforce_cache_size()

    def _fail(self, state: VersionState, exc: Exception) -> None:
        log.error("version %s of artifact %s: %s", state.version_id[:12], state.artifact_id, exc)
        state.error = exc if isinstance(exc, Vm0fsError) else Vm0fsError(str(exc))
        state.failed_at = time.monotonic()
        state.progress.end(exc)
        state.fd = None
        if state.index is not None and not state.index.complete:
            state.set_index(None)  # a partial tree: the next try builds it again

    async def _download(self, state: VersionState) -> None:
        self.downloads += 1
        fetch = Fetch(self.client, self.cache, state.artifact_id, state.version_id,
                      state.progress, state.expected_size, state.implied_mtime_ns)
        state.fetch = fetch
        if state.index is None:
            state.set_index(fetch.index)  # served while it grows

        def step() -> None:
            state.fd = fetch.fd
            state.notify()

        try:
            entry = await fetch.run(self.max_version_bytes, state.notify, step)
        finally:
            state.fetch = None
        state.fd = entry.fd
        state.set_index(entry.index)

    # -- memory ---------------------------------------------------------------------------

    def _droppable(self, state: VersionState) -> bool:
        return (isinstance(state.index, TreeIndex) and not state.loading
                and state.fd != -1 and state.error is None)

    def drop(self, state: VersionState) -> None:
        """Let go of a version's index (it is mapped again from the cache when needed)."""
        log.debug("version %s: index dropped from memory", state.version_id[:12])
        state.set_index(None)

    def trim(self, now: float | None = None) -> int:
        """Drop the indexes of versions nobody used for `tree_idle` seconds, or whose entries
        the kernel has all forgotten; return how many were dropped."""
        now = time.monotonic() if now is None else now
        dropped = 0
        for state in list(self.states.values()):
            if not self._droppable(state):
                continue
            unused = now - state.last_used
            if unused >= self.tree_idle or (state.kernel_refs <= 0 and unused >= TREE_GRACE):
                self.drop(state)
                dropped += 1
        return dropped + self._over_budget()

    def _over_budget(self, keep: VersionState | None = None) -> int:
        """Drop the least recently used indexes while they use more than the budget (never
        the one just used, nor `keep`)."""
        held = sorted((s for s in self.states.values() if self._droppable(s)),
                      key=lambda s: s.last_used)
        total = sum(s.index.nbytes for s in held)  # type: ignore[union-attr]
        dropped = 0
        for state in held[:-1]:
            if total <= self.tree_budget:
                break
            if state is keep:
                continue
            total -= state.index.nbytes  # type: ignore[union-attr]
            self.drop(state)
            dropped += 1
        return dropped

    def memory(self) -> dict[str, int]:
        """How many versions hold their index in memory, and its bytes."""
        held = [s.index for s in self.states.values() if s.index is not None]
        return {"versions_known": len(self.states), "versions_in_memory": len(held),
                "index_bytes": sum(i.nbytes for i in held)}

    # -- open files and eviction -------------------------------------------------------

    def opened(self, node: File) -> None:
        state: VersionState = node.owner
        state.open_handles += 1
        self.cache.touch(state.version_id)  # least recently *used* goes first
        if state.fd is None:
            self.ensure(state, data=True)  # its data was evicted: fetch it again

    def released(self, node: File) -> None:
        node.owner.open_handles -= 1

    async def enforce_cache_size(self, incoming: int = 0) -> None:
        """Bring the cache under its cap, with room for `incoming` more bytes: idle versions
        let go of their data first."""
        if self.cache.max_bytes is None:
            return
        room = max(self.cache.max_bytes - incoming, 0)
        usage = await trio.to_thread.run_sync(self.cache.usage)
        if usage <= room:
            return
        busy = set()
        for state in self.states.values():
            if state.loading or state.open_handles > 0:
                busy.add(state.version_id)
            elif state.fd is not None and state.fd >= 0:
                os.close(state.fd)  # drops our shared lock; the next open fetches it again
                state.fd = None
        await trio.to_thread.run_sync(self.cache.evict, room, frozenset(busy))

    def close(self) -> None:
        for state in self.states.values():
            state.set_index(None)
            if state.fd is not None and state.fd >= 0:
                try:
                    os.close(state.fd)
                except OSError as exc:
                    if exc.errno != errno.EBADF:
                        raise
                state.fd = None
