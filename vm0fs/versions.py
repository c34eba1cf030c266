"""Version contents in this process: one download per version however many readers wait, the
tree grown member by member while the archive arrives, and reads that wait only for their bytes.

A `VersionState` belongs to one version folder. Its `load` task fills the folder from the cache
if the version is there, or else downloads it: the HTTP stream is inflated into a staging file
by one worker thread while another reads tar headers from the same file and publishes members
(see archive.py). Waiters sleep on a trio Event that is replaced at every step.

Downloads are scheduled by who asked. A version only *listed* so far (its folder read with
readdir, as a file manager does to count the items of every folder it shows) downloads through
a queue, newest request first: one at a time for each artifact, LISTING_DOWNLOADS at a time in
all. A file manager counting the items of every folder it shows lists the versions of one
artifact (they queue behind each other); a sweep over `artifacts/*/current/` lists one version
of each of many artifacts (they run side by side). Naming a path inside a version
(lookup) or reading a file of it is use: that download starts at once, and a queued one jumps
the queue. A run of listing-only downloads of one artifact's versions is reported once (see
ListingBurst): it is the signature of GNOME Files counting items on a "local" filesystem.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from vm0fs.archive import Progress
from vm0fs.cache import Cache
from vm0fs.errors import CacheError, Unavailable, Vm0fsError
from vm0fs.fetch import Downloader, Fetch
from vm0fs.integrity import BlockReader, BlockSums, Damaged
from vm0fs.tree import (
    ROOT_ENTRY,
    Dir,
    InodeTable,
    Node,
    TreeBuilder,
    TreeIndex,
    build_index,
    node_for,
    split_inode,
    version_base,
)

log = logging.getLogger(__name__)

# An index nobody used for TREE_IDLE seconds leaves memory; so does one the kernel holds nothing
# of after TREE_GRACE; and the least recently used go while all use more than TREE_BUDGET.
# Mapping an index again costs a few system calls: a small budget is cheap.
TREE_IDLE = 60.0
TREE_GRACE = 5.0
TREE_BUDGET = 16 << 20
TRIM_INTERVAL = 5.0
NODE_CACHE = 2048  # nodes of entries kept per version in memory
# A version read this recently is never evicted by the cache cap. Eviction cannot count open
# files (in the stateless mode there are no opens to count); a reader idle for longer finds
# the data gone and its next read brings it back.
RECENTLY_READ = 300.0
TOUCH_INTERVAL = 60.0  # how often reads of one version update its last use in the cache
CAP_CHECK_INTERVAL = 10.0  # seconds between two checks of the cache cap
LISTING_DOWNLOADS = 4  # downloads that only listings asked for, at once (one per artifact)
BURST_VERSIONS = 3  # listing-only downloads of one artifact's versions in a row that we report
BURST_GAP = 10.0  # seconds between one and the next (asked, or the last ended) to be "in a row"
GNOME_SETTING = "gsettings set org.gnome.nautilus.preferences show-directory-item-counts 'never'"


class VersionState:
    """The contents of one version folder and where its bytes are.

    `index` holds the version's entries: a `TreeBuilder` while the archive downloads, then the
    `TreeIndex` read from the cache, or None when it was dropped to save memory (it is loaded
    again from the cache when it is needed). Its inodes are `base + entry` whatever happens."""

    def __init__(self, artifact_id: str, version_id: str, root: Dir, base: int) -> None:
        self.artifact_id = artifact_id
        self.version_id = version_id
        self.root = root  # the VersionDir: entry 0
        self.base = base  # inode of entry 0's range
        self.index: TreeIndex | TreeBuilder | None = None
        self.fd: int | None = None  # the tar file: staging while downloading, then the cache
        self.sums: BlockSums | None = None  # the checksums of its blocks (set with `fd`)
        self.retired: list[int] = []  # descriptors of a damaged copy, closed once unread
        self.progress = Progress()
        self.tree_complete = False  # every member is known (contents are final)
        self.error: BaseException | None = None
        self.failed_at = 0.0
        self.loading = False
        self.last_read = -float("inf")  # monotonic time of the last read of its data
        self.last_touch = -TOUCH_INTERVAL
        self.reads_in_flight = 0
        self.kernel_refs = 0  # lookups of this version's entries the kernel has not forgotten
        self.last_used = time.monotonic()  # when a request last needed the index
        self.expected_size = 0  # the API's uncompressed size of its files
        self.file_count = 0  # and their number (both bound its download)
        self.implied_mtime_ns = 0  # of folders the archive does not list: the version's date
        self.fetch: Fetch | None = None  # the download under way, if any
        self.used = False  # a path inside was looked up or a file read: its loads go first
        self.slot = False  # holds one of the listing-only download slots
        self.turn: trio.Event | None = None  # set when a queued listing-only load may go
        self.prefetch = False  # asked for ahead of a look inside (see VersionStore.prefetch)
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
        """Before waiting for the index. Whoever waits has had VersionStore.ensure start its
        load; a load cancelled by an unmount leaves the waiters to be cancelled too."""
        self._raise_if_failed()

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

    async def wait_bytes(self, end: int) -> tuple[int, BlockSums]:
        """Until the tar file holds `end` checked bytes; returns its descriptor and sums."""
        while self.fd is None or (self.progress.durable < end and not self.progress.ended):
            self._raise_if_failed()
            if not self.loading and self.fd is None:
                raise Vm0fsError("version data is not loaded")
            await self._changed.wait()
        self._raise_if_failed()
        error = self.progress.error  # the download failed: say why (before _fail says it)
        if error is not None:
            raise error if isinstance(error, Vm0fsError) else Vm0fsError(str(error))
        if self.progress.durable < end or self.sums is None:
            raise Vm0fsError("read past the end of the version data")
        return self.fd, self.sums

    def close_retired(self) -> None:
        """Close the descriptors of a damaged copy once no read uses them."""
        if self.reads_in_flight == 0:
            while self.retired:
                os.close(self.retired.pop())


class ListingBurst:
    """Notices listing-only downloads of one artifact's versions in a row, none of them used,
    and says once (in the log) what is going on and how to stop it; `notice` keeps the latest
    such run for `vm0fs status`. Holds version ids only, never a version's state."""

    def __init__(self) -> None:
        self.notice: dict[str, Any] | None = None
        self.name_of: Callable[[str], str] = lambda artifact_id: artifact_id
        # artifact id -> (when the run last moved, the versions in it)
        self._runs: dict[str, tuple[float, list[str]]] = {}

    def listed(self, artifact_id: str, version_id: str, now: float | None = None) -> None:
        """A download that only a listing asked for is about to start (or queue)."""
        now = time.monotonic() if now is None else now
        last, run = self._runs.get(artifact_id, (0.0, []))
        if now - last > BURST_GAP:
            run = []
        run.append(version_id)
        self._runs[artifact_id] = (now, run)
        if len(run) >= BURST_VERSIONS:
            self._report(artifact_id, len(run))
        if len(self._runs) > 64:  # forget runs that ended long ago
            self._runs = {a: r for a, r in self._runs.items() if now - r[0] <= BURST_GAP}

    def ended(self, artifact_id: str, version_id: str, now: float | None = None) -> None:
        """A listing-only download ended: the next one in a row counts from here."""
        entry = self._runs.get(artifact_id)
        if entry is not None and version_id in entry[1]:
            self._runs[artifact_id] = (time.monotonic() if now is None else now, entry[1])

    def used(self, artifact_id: str, version_id: str) -> None:
        """A version was looked into or read: its run is a person at work, not a count."""
        entry = self._runs.get(artifact_id)
        if entry is not None and version_id in entry[1]:
            del self._runs[artifact_id]

    def _report(self, artifact_id: str, count: int) -> None:
        name = self.name_of(artifact_id)
        summary = (
            f"artifacts/{name}: {count} versions in a row were downloaded only to list their "
            "folders, none read: what a file manager does when it counts the items of every "
            "folder it shows (GNOME Files/Nautilus does on local disks, and FUSE mounts count "
            "as local). Such downloads run one at a time for each artifact; reads go first.")
        message = f"{summary} To stop it in GNOME: {GNOME_SETTING}"
        first = self.notice is None
        self.notice = {"time": time.time(), "artifact": name, "artifact_id": artifact_id,
                       "versions": count, "summary": summary, "fix": GNOME_SETTING,
                       "message": message}
        if first:
            log.warning("%s", message)


class VersionStore:
    """Starts and tracks the loads of versions; owns the worker tasks; lets go of the indexes
    of versions nobody uses (`trim`)."""

    def __init__(self, cache: Cache, client: Downloader, table: InodeTable, *,
                 max_version_bytes: int | None = None, retry_failed_after: float = 5.0,
                 recently_read: float = RECENTLY_READ,
                 listing_downloads: int = LISTING_DOWNLOADS, tree_budget: int = TREE_BUDGET,
                 tree_idle: float = TREE_IDLE) -> None:
        self.cache = cache
        self.client = client
        self.table = table
        self.max_version_bytes = max_version_bytes
        self.retry_failed_after = retry_failed_after
        self.recently_read = recently_read
        self.tree_budget = tree_budget
        self.tree_idle = tree_idle
        self.states: dict[tuple[str, str], VersionState] = {}
        self._ordinals: dict[tuple[str, str], int] = {}  # each version's inode range, for good
        self._keys: list[tuple[str, str]] = []
        self.downloads = 0  # archives fetched over the network by this process
        self._last_used: VersionState | None = None
        self.listing_slots = listing_downloads
        self.listing_only = 0  # of them, asked for by listings alone
        self._listing_running = 0
        self._listing_artifacts: set[str] = set()  # artifacts with one of them running
        self._queue: deque[VersionState] = deque()  # listing-only downloads waiting for a slot
        self.bursts = ListingBurst()
        self.blocks = BlockReader()
        self.repairs = 0  # damaged cached copies found (and fetched again, when online)
        self._nursery: trio.Nursery | None = None
        self.offline: Callable[[], bool] = lambda: False  # skip downloads while the API is down
        self.describe: Callable[[str], str] = str  # artifact id -> how log lines name it

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Host the load tasks until cancelled; drop unused indexes now and then."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                await trio.sleep(TRIM_INTERVAL)
                self.trim()

    def get(self, artifact_id: str, version_id: str, root: Dir, created_ns: int,
            file_count: int, size: int = 0, *, use: bool = False) -> VersionState:
        """The state of a version folder, starting its load if its tree is not there.

        `use`: a path inside was named (lookup), not just the folder listed; the load goes
        first. A lookup the tree already answers (`ls -l` after a listing) is no use. The data
        of a version whose tree is complete is fetched again only for a read (`reading`): a
        listing or a lookup needs the tree alone."""
        key = (artifact_id, version_id)
        state = self.states.get(key)
        if state is not None:
            if state.error is None:
                state.prefetch = False  # asked for now, not ahead
                if use and not state.tree_complete:  # a lookup that has to wait for it
                    self._use(state)
                elif state.turn is not None:
                    self._ask_again(state)
                self.ensure(state)  # its index, if it was dropped (not its data)
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
        new.file_count = file_count
        new.used = use
        if state is not None:
            new.kernel_refs = state.kernel_refs  # the kernel's references outlive a failure
        self.states[key] = new
        log.debug("version %s: asked for by a %s", version_id[:12], "lookup" if use else "listing")
        if file_count == 0:  # nothing to download: the service has no archive for it
            new.fd = -1
            new.index = build_index([], created_ns)
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
        if state.index is None or (data and state.fd is None):
            self._start(state)  # the index is read and checked again in a worker thread

    def _start(self, state: VersionState) -> None:
        assert self._nursery is not None, "VersionStore.run() is not running"
        state.loading = True
        state.error = None
        state.progress = Progress()
        self.cache.touch(state.version_id)  # asked for now: that is when it was last used
        state.last_touch = time.monotonic()
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
                state.fd, state.sums = entry.fd, entry.sums
                state.set_index(entry.index)
                state.progress.advance(entry.size)
                state.progress.end()
            elif self.offline():
                raise Unavailable("the API is unreachable and this version is not cached")
            else:
                if not state.used:
                    self.bursts.listed(state.artifact_id, state.version_id)
                    await self._listing_turn(state)
                await self._download(state)
            state.tree_complete = True
        except Exception as exc:  # noqa: BLE001 - every failure becomes EIO for this version
            self._fail(state, exc)
        finally:
            self._release_slot(state)
            if not state.used:
                self.bursts.ended(state.artifact_id, state.version_id)
            state.loading = False
            state.notify()
            if old_fd is not None and old_fd != state.fd:
                state.retired.append(old_fd)  # closed once no read in flight uses it
                state.close_retired()
        if state.error is None:
            self._over_budget(state)
            await self.enforce_cache_size()

    def _fail(self, state: VersionState, exc: Exception) -> None:
        log.error("artifact %s, version %s: %s", self.describe(state.artifact_id),
                  state.version_id[:12], exc)
        state.error = exc if isinstance(exc, Vm0fsError) else Vm0fsError(str(exc))
        state.failed_at = time.monotonic()
        state.progress.end(exc)
        state.fd = state.sums = None
        if state.index is not None and not state.index.complete:
            state.set_index(None)  # a partial tree: the next try builds it again

    # -- who goes first ----------------------------------------------------------------------

    async def _listing_turn(self, state: VersionState) -> None:
        """Wait until this listing-only download may run: a slot is free, or a lookup or a read
        of the version made it a use (then it runs at once, without a slot)."""
        if state.used:
            return
        self.listing_only += 1
        if self._may_run(state):
            self._take_slot(state)
            return
        turn = state.turn = trio.Event()
        if state.prefetch:  # behind the rest; the first asked goes first (see _release_slot)
            self._queue.appendleft(state)
        else:
            self._queue.append(state)
        log.debug("version %s: listing-only download queued (%d waiting)",
                  state.version_id[:12], len(self._queue))
        try:
            await turn.wait()
        finally:
            state.turn = None
            if state in self._queue:  # cancelled while waiting
                self._queue.remove(state)

    def prefetch(self, state: VersionState) -> None:
        """A version about to be looked into (its folder was reached through `current`): its
        download, if one starts, waits behind every other listing-only download, in the order
        asked, until the version is listed or used."""
        if state.loading and not state.used and state.turn is None:
            state.prefetch = True

    def _may_run(self, state: VersionState) -> bool:
        return (self._listing_running < self.listing_slots
                and state.artifact_id not in self._listing_artifacts)

    def _take_slot(self, state: VersionState) -> None:
        state.slot = True
        self._listing_running += 1
        self._listing_artifacts.add(state.artifact_id)

    def _release_slot(self, state: VersionState) -> None:
        if state.slot:
            state.slot = False
            self._listing_running -= 1
            self._listing_artifacts.discard(state.artifact_id)
        # The newest requests first (the likeliest to be a person), each when its artifact
        # has none running.
        for following in reversed(list(self._queue)):
            if self._listing_running >= self.listing_slots:
                break
            if self._may_run(following):
                self._queue.remove(following)
                self._take_slot(following)
                assert following.turn is not None
                following.turn.set()

    def _ask_again(self, state: VersionState) -> None:
        """A queued version was listed again: it becomes the newest request."""
        state.prefetch = False
        if state in self._queue and self._queue[-1] is not state:
            self._queue.remove(state)
            self._queue.append(state)

    def _use(self, state: VersionState) -> None:
        """A path inside the version was named or a file read: no more waiting for a slot."""
        if state.used:
            return
        state.used = True
        self.bursts.used(state.artifact_id, state.version_id)
        if state.turn is not None and state in self._queue:
            self._queue.remove(state)
            state.turn.set()
            log.debug("version %s: used; its download leaves the queue", state.version_id[:12])

    def reading(self, state: VersionState) -> None:
        """A file of this version is opened or read: its download goes first, it is kept from
        eviction for a while, and data released to keep the cache under its cap comes back."""
        self._use(state)
        now = time.monotonic()
        state.last_read = now
        # Least recently *used* goes first: record a use when another version was used in
        # between, and now and then (not at every read of a `grep -r`).
        if state is not self._last_used or now - state.last_touch >= TOUCH_INTERVAL:
            self._last_used = state
            state.last_touch = now
            self.cache.touch(state.version_id)
        if state.fd is None:
            self.ensure(state, data=True)  # its data was evicted: fetch it again

    @property
    def listing_queue(self) -> int:
        return len(self._queue)

    async def _download(self, state: VersionState) -> None:
        await self.enforce_cache_size(incoming=state.expected_size)  # make room first
        self.downloads += 1
        fetch = Fetch(self.client, self.cache, state.artifact_id, state.version_id,
                      state.progress, state.expected_size, state.implied_mtime_ns,
                      state.file_count)
        state.fetch = fetch
        if state.index is None:
            state.set_index(fetch.index)  # served while it grows

        def step() -> None:
            state.fd, state.sums = fetch.fd, fetch.sums
            state.notify()

        def retire(fd: int) -> None:  # reads in flight may hold it: closed after them
            state.retired.append(fd)
            state.close_retired()

        try:
            entry = await fetch.run(self.max_version_bytes, state.notify, step, retire)
        finally:
            state.fetch = None
        state.fd, state.sums = entry.fd, entry.sums
        state.set_index(entry.index)

    # -- reading ------------------------------------------------------------------------

    async def read(self, state: VersionState, start: int, length: int, ahead: int = 0
                   ) -> bytes | memoryview:
        """`length` bytes of the version's tar data at `start`, every block checked against
        its checksum; waits for the bytes of a download under way. A damaged copy is never
        served: it is dropped and fetched again while the reader waits (EIO when offline)."""
        for attempt in range(2):
            state.reads_in_flight += 1  # eviction must not close the descriptor under this read
            fd = state.fd
            try:
                sums = state.sums
                if fd is None or sums is None or not state.data_ready:
                    fd, sums = await state.wait_bytes(start + length)
                if start + length > sums.sealed:
                    raise Damaged("a file of the index lies past the end of the checked data")
                if ahead and state.data_ready:  # a big file's first read: ask for the rest
                    with contextlib.suppress(OSError):
                        os.posix_fadvise(fd, start, ahead, os.POSIX_FADV_WILLNEED)
                return await self.blocks.read(state.version_id, fd, sums, start, length, ahead)
            except Damaged as exc:
                if attempt:
                    raise CacheError(f"the cached copy is damaged again after fetching it: {exc}"
                                     ) from None
                await self.damaged(state, fd, exc)
            finally:
                state.reads_in_flight -= 1
                state.close_retired()
        raise AssertionError("unreachable")

    async def damaged(self, state: VersionState, fd: int | None, exc: Exception) -> None:
        """The copy of a version in `fd` failed a check: never serve it again; remove it from
        the cache and fetch the version again (readers wait for it), or fail when offline."""
        if fd is None or fd < 0 or state.fd != fd:
            return  # another reader found it first: the new copy is on its way
        if state.loading:
            return  # a download's own file: its reader fails (EIO) and the download decides
        self.repairs += 1
        offline = self.offline()
        log.error("artifact %s, version %s: the cached copy is damaged (%s): %s",
                  self.describe(state.artifact_id), state.version_id[:12], exc,
                  "the API is unreachable, so it cannot be fetched again until it answers"
                  if offline else "fetching it again")
        state.fd = state.sums = None
        state.retired.append(fd)
        state.progress = Progress()
        await trio.to_thread.run_sync(self.cache.drop_damaged, state.version_id, fd)
        if state.fd is None:
            self.ensure(state, data=True)

    # -- memory ---------------------------------------------------------------------------

    def _droppable(self, state: VersionState) -> bool:
        return (isinstance(state.index, TreeIndex) and not state.loading
                and state.fd != -1 and state.error is None)

    def drop(self, state: VersionState) -> None:
        """Let go of a version's index (it is read again from the cache when needed)."""
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

    # -- reads and eviction -------------------------------------------------------------


    async def keep_cache_size(self) -> None:
        """Check the cap now and then: versions kept over it because they were read recently
        go once they have been idle long enough (and another process may share the cache)."""
        while True:
            await self.enforce_cache_size()
            await trio.sleep(CAP_CHECK_INTERVAL)

    async def enforce_cache_size(self, incoming: int = 0) -> None:
        """Bring the cache under its cap, with room for `incoming` more bytes: idle versions
        let go of their data first."""
        usage = await trio.to_thread.run_sync(self.cache.usage)
        cap = await trio.to_thread.run_sync(self.cache.cap, usage)
        room = max(cap.bytes - incoming, 0)
        if usage <= room:
            return
        busy = set()
        recent = time.monotonic() - self.recently_read
        for state in self.states.values():
            if state.loading or state.reads_in_flight or state.last_read > recent:
                busy.add(state.version_id)
            elif state.fd is not None and state.fd >= 0:
                os.close(state.fd)  # drops our shared lock; the next open fetches it again
                state.fd = state.sums = None
        await trio.to_thread.run_sync(self.cache.evict, room, frozenset(busy))

    def close(self) -> None:
        for state in self.states.values():
            state.set_index(None)
            state.reads_in_flight = 0
            state.close_retired()
            if state.fd is not None and state.fd >= 0:
                try:
                    os.close(state.fd)
                except OSError as exc:
                    if exc.errno != errno.EBADF:
                        raise
                state.fd = None
