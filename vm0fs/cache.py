"""The on-disk cache: one entry per version id, each the version's tar file inflated once plus its
member index. Version ids are content hashes, so an entry never goes stale.

Layout under the cache directory (owner-only permissions):
    versions/<id>/data.tar      the tar bytes
    versions/<id>/index.bin     the version's entries and the tar size (tree.TreeIndex)
    staging/<id>.<pid>.<rand>/  an entry being written; published by renaming it into versions/
    listings/<ns>/...           last known API listings, for offline use (see meta.py)

Concurrency across processes uses flock on data.tar: a writer holds it exclusively while it
stages, every reader holds it shared while it uses the entry, and eviction and the clean-up of
staging leftovers only remove what they can lock exclusively. All methods block: call them from
a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from vm0fs.errors import CacheError
from vm0fs.tree import TreeBuilder, TreeIndex

log = logging.getLogger("vm0fs.cache")

DATA, INDEX, IN_USE = "data.tar", "index.bin", "in-use.lock"
OLD_INDEX = "index.json"  # what vm0fs wrote before the binary index
TOUCH_INTERVAL = 1.0  # seconds between on-disk last-used updates of one entry


@dataclass
class Entry:
    """An open cache entry: the tar file's descriptor (shared-locked) and its index."""

    fd: int
    index: TreeIndex
    size: int


@dataclass
class Staging:
    version_id: str
    path: Path
    fd: int  # data.tar, exclusively locked while it is being written


def _lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class Cache:
    def __init__(self, root: Path, max_bytes: int | None = None) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.versions = root / "versions"
        self.staging = root / "staging"
        self.listings = root / "listings"
        self._touched: dict[str, float] = {}  # when each folder's mtime was last set
        self._used: dict[str, float] = {}  # when this process last used each entry
        try:
            for path in (root, self.versions, self.staging, self.listings):
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(root, 0o700)
        except OSError as exc:
            raise CacheError(f"cannot use cache directory {root}: {exc.strerror}") from None

    # -- who uses it ---------------------------------------------------------------------

    def hold_in_use(self) -> int:
        """Mark the cache as used by a mount until the returned descriptor is closed."""
        fd = os.open(self.root / IN_USE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        return fd

    def in_use(self) -> bool:
        """Whether some mount is using this cache right now."""
        try:
            fd = os.open(self.root / IN_USE, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            return not _lock(fd, fcntl.LOCK_EX)
        finally:
            os.close(fd)

    def clear(self) -> tuple[int, int]:
        """Remove every entry nobody holds open, and the saved listings; (removed, kept)."""
        removed = kept = 0
        for version_id, _, _ in self.entries():
            if self._remove_entry(version_id, only_if_unused=True):
                removed += 1
            else:
                kept += 1
        shutil.rmtree(self.listings, ignore_errors=True)
        self.listings.mkdir(mode=0o700, exist_ok=True)
        self.clean_staging()
        return removed, kept

    # -- reading ---------------------------------------------------------------------------

    def open_entry(self, version_id: str) -> Entry | None:
        """The published entry for `version_id`, shared-locked, or None if there is none."""
        folder = self.versions / version_id
        try:
            fd = os.open(folder / DATA, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            if not _lock(fd, fcntl.LOCK_SH):  # being evicted right now
                os.close(fd)
                return None
            size = os.fstat(fd).st_size
            if not (folder / INDEX).exists() and (folder / OLD_INDEX).exists():
                log.info("cache entry %s has the index of an older vm0fs: downloading it again",
                         version_id[:12])
                os.close(fd)
                self._remove_entry(version_id, only_if_unused=True)
                return None
            index = TreeIndex.open(folder / INDEX)
            if index.tar_size != size:
                raise ValueError("index does not match the data")
        except (OSError, ValueError) as exc:
            log.warning("cache entry %s is damaged (%s): removing it", version_id[:12], exc)
            os.close(fd)
            self._remove_entry(version_id)
            return None
        self.touch(version_id)
        return Entry(fd, index, size)

    def load_index(self, version_id: str) -> TreeIndex | None:
        """Map the index of an entry this process holds open (quick: no thread needed)."""
        try:
            return TreeIndex.open(self.versions / version_id / INDEX)
        except FileNotFoundError:
            return None

    def touch(self, version_id: str, when: float | None = None) -> None:
        """Record that the entry was used (at `when`, default now): its folder's mtime orders
        eviction across processes; this process also remembers the exact time."""
        used = time.time() if when is None else when
        self._used[version_id] = max(used, self._used.get(version_id, 0.0))
        if abs(used - self._touched.get(version_id, 0.0)) < TOUCH_INTERVAL:
            return
        try:
            os.utime(self.versions / version_id, (used, used))
        except OSError:
            return  # not published yet: publish sets it
        self._touched[version_id] = used

    # -- writing ---------------------------------------------------------------------------

    def stage(self, version_id: str) -> Staging:
        path = self.staging / f"{version_id}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            path.mkdir(mode=0o700)
            fd = os.open(path / DATA, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise CacheError(f"cannot write to cache {self.root}: {exc.strerror}") from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        return Staging(version_id, path, fd)

    def publish(self, staging: Staging, builder: TreeBuilder) -> Entry:
        """Make a staged entry visible to everyone; returns it open and shared-locked.

        When another process published the same version first, the returned entry is theirs
        and `staging.fd` is left open for the caller to close."""
        size = os.fstat(staging.fd).st_size
        try:
            fd = os.open(staging.path / INDEX, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         0o600)
            try:
                builder.write(fd, size)
            finally:
                os.close(fd)
            fcntl.flock(staging.fd, fcntl.LOCK_SH)  # readers welcome from now on
            os.rename(staging.path, self.versions / staging.version_id)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                self.discard(staging)
                raise CacheError(f"cannot publish cache entry: {exc.strerror}") from None
            # Another process published the same version first: its bytes are identical. The
            # staging descriptor stays open: readers may still use it until the caller has
            # moved them to the returned entry, and closes it.
            log.debug("version %s was published by another process", staging.version_id[:12])
            entry = self.open_entry(staging.version_id)
            shutil.rmtree(staging.path, ignore_errors=True)
            if entry is None:
                raise CacheError("the cache entry vanished while publishing") from None
            return entry
        # Last used when it was asked for, not when its download ended.
        self.touch(staging.version_id, self._used.get(staging.version_id))
        try:
            index = TreeIndex.open(self.versions / staging.version_id / INDEX)
        except (OSError, ValueError) as exc:
            raise CacheError(f"cannot read the index just written: {exc}") from None
        return Entry(staging.fd, index, size)

    def discard(self, staging: Staging) -> None:
        with contextlib.suppress(OSError):
            os.close(staging.fd)
        shutil.rmtree(staging.path, ignore_errors=True)

    # -- housekeeping ----------------------------------------------------------------------

    def clean_staging(self) -> int:
        """Remove entries left half-written by a process that died; return how many."""
        removed = 0
        for path in self.staging.iterdir():
            try:
                fd = os.open(path / DATA, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                if time.time() - path.stat().st_mtime > 60:  # died between mkdir and open
                    shutil.rmtree(path, ignore_errors=True)
                    removed += 1
                continue
            except OSError:
                continue
            try:
                if _lock(fd, fcntl.LOCK_EX):  # nobody is writing it: its writer is gone
                    shutil.rmtree(path, ignore_errors=True)
                    removed += 1
            finally:
                os.close(fd)
        if removed:
            log.info("removed %d unfinished download(s) left in the cache", removed)
        return removed

    def entries(self) -> list[tuple[str, int, float]]:
        """(version id, bytes, last used) of every published entry."""
        found = []
        for folder in self.versions.iterdir():
            try:
                size = sum(p.stat().st_size for p in folder.iterdir())
                used = max(folder.stat().st_mtime, self._used.get(folder.name, 0.0))
                found.append((folder.name, size, used))
            except OSError:
                continue
        return found

    def usage(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def evict(self, max_bytes: int | None = None, keep: frozenset[str] = frozenset()) -> int:
        """Remove least recently used entries until the cache fits; return the bytes freed.

        An entry someone holds open (a shared lock) is never removed, nor one named in `keep`.
        """
        cap = self.max_bytes if max_bytes is None else max_bytes
        if cap is None:
            return 0
        entries = sorted(self.entries(), key=lambda e: e[2])
        total = sum(size for _, size, _ in entries)
        freed = 0
        for version_id, size, _ in entries:
            if total <= cap:
                break
            if version_id in keep or not self._remove_entry(version_id, only_if_unused=True):
                continue
            total -= size
            freed += size
            log.info("evicted version %s (%d bytes) from the cache", version_id[:12], size)
        return freed

    def _remove_entry(self, version_id: str, only_if_unused: bool = False) -> bool:
        folder = self.versions / version_id
        try:
            fd = os.open(folder / DATA, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            shutil.rmtree(folder, ignore_errors=True)
            return True
        try:
            if only_if_unused and not _lock(fd, fcntl.LOCK_EX):
                return False
            # Rename first so nobody opens it half-deleted.
            doomed = self.staging / f"evicted.{version_id}.{secrets.token_hex(4)}"
            try:
                os.rename(folder, doomed)
            except OSError:
                return False
            shutil.rmtree(doomed, ignore_errors=True)
            self._touched.pop(version_id, None)
            self._used.pop(version_id, None)
            return True
        finally:
            os.close(fd)
