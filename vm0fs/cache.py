"""The on-disk cache: one entry per version id, each the version's tar file inflated once plus its
member index. Version ids are content hashes, so an entry never goes stale.

Layout under the cache directory (owner-only permissions):
    CACHEDIR.TAG                the marker that says vm0fs made this folder its cache
    versions/<id>/data.tar      the tar bytes
    versions/<id>/index.bin     the version's entries, the tar size and the checksums of its
                                blocks, under a checksum of its own (tree.TreeIndex)
    staging/<id>.<pid>.<rand>/  an entry being written; published by renaming it into versions/
    listings/<ns>/...           last known API listings, for offline use (see meta.py)
    mounts/<pid>.json           one per mount using the cache, locked while it runs
    in-use.lock                 shared-locked by every mount (also by earlier vm0fs versions)

vm0fs only ever creates, changes or deletes what it can prove is its own: a folder it creates
gets the marker; an existing folder is used only if it holds the marker, is empty, or has
exactly the layout earlier vm0fs versions made (no marker then); anything else is refused.
Inside, only names and layouts vm0fs writes are touched.

Everything read back is checked (integrity.py): an index that fails its checksum, data that
fails a block's, a file shorter than its index says or gone, all count as damage; the entry is
removed and the version fetched again. Without --cache-size the cache may grow while its
filesystem keeps FREE_SHARE of its size free (mountpoint-s3 keeps 5%).

Concurrency across processes uses flock on data.tar: a writer holds it exclusively while it
stages, every reader holds it shared while it uses the entry, and eviction and the clean-up of
staging leftovers only remove what they can lock exclusively. All methods block: call them from
a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vm0fs.errors import CacheError
from vm0fs.integrity import BlockSums
from vm0fs.tree import TreeBuilder, TreeIndex
from vm0fs.units import human

log = logging.getLogger(__name__)

DATA, INDEX, IN_USE = "data.tar", "index.bin", "in-use.lock"
OLD_INDEX = "index.json"  # what vm0fs wrote before the binary index
MARKER = "CACHEDIR.TAG"
MARKER_TEXT = ("Signature: 8a477f597d28d172789f06886806bc55\n"
               "# This file is a cache directory tag created by vm0fs.\n"
               "# vm0fs only creates, changes or deletes what is inside a folder holding it.\n"
               "# For information about cache directory tags see https://bford.info/cachedir/\n")
# What earlier vm0fs versions (before the marker) left at the top of a cache folder.
LEGACY_DIRS = frozenset({"versions", "staging", "listings"})
LEGACY_FILES = frozenset({IN_USE, "vm0fs.log"})
STAGING_NAME = re.compile(r".+\.[0-9a-f]{8}")  # <id>.<pid>.<hex8> or evicted.<id>.<hex8>
NAMESPACE_NAME = re.compile(r"[0-9a-f]{16}")
TOUCH_INTERVAL = 1.0  # seconds between on-disk last-used updates of one entry
FREE_SHARE = 0.05  # of the cache filesystem's size, kept free
# An entry's size is re-read when its folder changes (stat: inode, mtime, ctime), and at least
# this often: a file changed in place does not touch its folder.
SIZE_MEMO_AGE = 300.0


@dataclass(frozen=True)
class Cap:
    """A limit in bytes, and why it is what it is (for status and error lines)."""

    bytes: int
    reason: str


@dataclass
class Entry:
    """An open cache entry: the tar file's descriptor (shared-locked), its index and the
    checksums of its blocks."""

    fd: int
    index: TreeIndex
    size: int
    sums: BlockSums


@dataclass
class Staging:
    version_id: str
    path: Path
    fd: int  # data.tar, exclusively locked while it is being written


@dataclass
class InUse:
    """What a mount holds while it uses a cache: the shared lock every version of vm0fs
    checks, and this mount's record (for `vm0fs cache info`)."""

    fd: int
    record: int | None
    path: Path | None

    def close(self) -> None:
        if self.record is not None and self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self.record)
            self.record = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def ownership(root: Path) -> str:
    """Whether `root` is a vm0fs cache: "marked", "legacy" (made by a vm0fs before the
    marker), "empty" or "missing"; raises CacheError for anything else."""
    try:
        names = set(os.listdir(root))
    except FileNotFoundError:
        return "missing"
    except NotADirectoryError:
        raise CacheError(f"{root} is not a folder: choose another --cache-dir") from None
    except OSError as exc:
        raise CacheError(f"cannot use cache directory {root}: {exc.strerror}") from None
    if not names:
        return "empty"
    if MARKER in names and _is_marker(root / MARKER):
        return "marked"
    if _is_legacy(root, names):
        return "legacy"
    raise CacheError(f"{root} is not a vm0fs cache and not empty: vm0fs will not touch it "
                     "(choose a new or empty folder for --cache-dir)")


def _is_marker(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.startswith(MARKER_TEXT.split("\n", 1)[0]) and "created by vm0fs" in head


def _is_legacy(root: Path, names: set[str]) -> bool:
    """The exact layout earlier vm0fs versions wrote: its three folders, nothing foreign,
    and inside them only entries named and shaped the way vm0fs makes them."""
    if not names >= LEGACY_DIRS or not names <= LEGACY_DIRS | LEGACY_FILES:
        return False
    try:
        if not all((root / d).is_dir() and not (root / d).is_symlink() for d in LEGACY_DIRS):
            return False
        for entry in os.scandir(root / "versions"):
            if _entry_names(Path(entry.path)) is None:
                return False
        if not all(STAGING_NAME.fullmatch(n) for n in os.listdir(root / "staging")):
            return False
        return all(NAMESPACE_NAME.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
                   for e in os.scandir(root / "listings"))
    except OSError:
        return False


def _entry_names(folder: Path) -> set[str] | None:
    """The names in a version folder when it holds nothing but what vm0fs writes there (and is
    no link); else None."""
    try:
        if folder.is_symlink() or not folder.is_dir():
            return None
        names = set(os.listdir(folder))
    except OSError:
        return None
    return names if names <= {DATA, INDEX, OLD_INDEX} else None


def _is_entry_folder(folder: Path) -> bool:
    """A published version folder: data.tar and its index, nothing else, no links."""
    names = _entry_names(folder)
    return names is not None and DATA in names


def _is_remnant(folder: Path) -> bool:
    """What is left of a version folder whose data.tar was deleted: an index alone, or nothing."""
    names = _entry_names(folder)
    return names is not None and DATA not in names


def _write_marker(root: Path) -> None:
    tmp = root / f".{MARKER}.{os.getpid()}.{secrets.token_hex(4)}"
    tmp.write_text(MARKER_TEXT)
    os.chmod(tmp, 0o600)
    os.replace(tmp, root / MARKER)


class Cache:
    def __init__(self, root: Path, max_bytes: int | None = None, *, create: bool = True) -> None:
        """The cache at `root`, made ready for writing (`create`), or only looked at: then
        nothing is created and a missing folder reads as an empty cache."""
        self.root = root
        self.max_bytes = max_bytes
        self.versions = root / "versions"
        self.staging = root / "staging"
        self.listings = root / "listings"
        self.mounts_dir = root / "mounts"
        self._touched: dict[str, float] = {}  # when each folder's mtime was last set
        self._used: dict[str, float] = {}  # when this process last used each entry
        # Each entry's bytes, by its folder's stat (entries): the cap is checked after every
        # download and every few seconds, and a full walk of thousands of entries took 0.3 s.
        self._sizes: dict[str, tuple[tuple[int, int, int], float, int]] = {}
        self.kept: list[tuple[str, int]] = []  # what the last evict left because it was open
        self._writable = create
        state = ownership(root)
        self.exists = state != "missing"
        if create:
            self._make(state)

    def _make(self, state: str) -> None:
        root = self.root
        try:
            if state == "missing":
                root.mkdir(mode=0o700, parents=True, exist_ok=True)
                state = ownership(root)  # another process may have made it meanwhile
            if state != "marked":
                _write_marker(root)
            if root.stat().st_uid == os.geteuid():  # a cache is private to its owner
                os.chmod(root, 0o700)
            for path in (self.versions, self.staging, self.listings, self.mounts_dir):
                path.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot use cache directory {root}: {exc.strerror}") from None
        self.exists = True

    def _remake(self) -> bool:
        """The cache folder (or part of it) was removed under a running mount: make it again
        (True), so that what is fetched next has a place; False when nothing is missing or
        this Cache only looks."""
        layout = (self.versions, self.staging, self.listings, self.mounts_dir)
        if not self._writable or all(path.is_dir() for path in layout):
            return False
        log.warning("the cache folder %s was removed while in use: making it again", self.root)
        self._make(ownership(self.root))
        return True

    # -- who uses it ---------------------------------------------------------------------

    def hold_in_use(self, mountpoint: str = "", api_url: str = "",
                    cache_size: int | None = None) -> InUse:
        """Mark the cache as used by a mount until the returned handle is closed."""
        fd = os.open(self.root / IN_USE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        path = self.mounts_dir / f"{os.getpid()}.json"
        try:
            record = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError:
            return InUse(fd, None, None)  # `cache info` will not name this mount: no harm
        fcntl.flock(record, fcntl.LOCK_EX)
        os.write(record, json.dumps({"mountpoint": mountpoint, "api_url": api_url,
                                     "pid": os.getpid(), "cache_size": cache_size}).encode())
        return InUse(fd, record, path)

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

    def mounts(self) -> list[dict[str, Any]]:
        """The mounts using this cache now (those that say so: earlier versions did not)."""
        found = []
        try:
            names = sorted(os.listdir(self.mounts_dir))
        except OSError:
            return []
        for name in names:
            if not re.fullmatch(r"\d+\.json", name):
                continue
            try:
                fd = os.open(self.mounts_dir / name, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if _lock(fd, fcntl.LOCK_SH):
                    continue  # its mount has ended (the next mount's clean-up removes it)
                found.append(json.loads(os.pread(fd, 65536, 0)))
            except (OSError, ValueError, RecursionError):
                continue
            finally:
                os.close(fd)
        return found

    def clear(self) -> tuple[int, int]:
        """Remove every entry nobody holds open, and the saved listings; (removed, kept)."""
        removed = kept = 0
        for version_id, _, _ in self.entries():
            if self._remove_entry(version_id, only_if_unused=True):
                removed += 1
            else:
                kept += 1
        removed += self.clean_remnants()
        for namespace in os.listdir(self.listings) if self.listings.is_dir() else []:
            if NAMESPACE_NAME.fullmatch(namespace):  # only what meta.py writes
                shutil.rmtree(self.listings / namespace, ignore_errors=True)
        self.clean_staging()
        return removed, kept

    # -- reading ---------------------------------------------------------------------------

    def has(self, version_id: str) -> bool:
        """Whether the version is cached (published), without opening it."""
        return _is_entry_folder(self.versions / version_id)

    def open_entry(self, version_id: str) -> Entry | None:
        """The published entry for `version_id`, shared-locked, or None if there is none (a
        damaged one is removed: the caller fetches the version again)."""
        folder = self.versions / version_id
        try:
            fd = os.open(folder / DATA, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if _is_remnant(folder):
                log.warning("cache entry %s lost its data (deleted?): removing what is left",
                            version_id[:12])
                self._remove_entry(version_id)
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
            index = TreeIndex.load(folder / INDEX)
            if index.tar_size != size:
                raise ValueError(f"the data holds {size} bytes, its index says {index.tar_size}")
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log.warning("cache entry %s is damaged (%s): removing it, to fetch it again",
                        version_id[:12], reason)
            os.close(fd)
            self._remove_entry(version_id)
            return None
        self.touch(version_id)
        return Entry(fd, index, size, index.block_sums())

    def drop_damaged(self, version_id: str, fd: int) -> bool:
        """Remove the entry whose data file `fd` was found damaged, if it is still the one
        published (another process may have put a new copy there); whether it was removed."""
        folder = self.versions / version_id
        try:
            mine, published = os.fstat(fd), os.stat(folder / DATA)
        except OSError:
            return False
        if (mine.st_dev, mine.st_ino) != (published.st_dev, published.st_ino):
            return False
        return self._delete_folder(version_id)

    def cap(self, usage: int | None = None) -> Cap:
        """The cap in force (blocking): --cache-size, else what keeps the cache filesystem's
        FREE_SHARE free, with `usage` (default: now) counted in."""
        if self.max_bytes is not None:
            return Cap(self.max_bytes, "--cache-size")
        room = self.disk_room()
        used = self.usage() if usage is None else usage
        return Cap(max(used + room.bytes, 0), f"no --cache-size: {room.reason}")

    def disk_room(self) -> Cap:
        """How much more may be written to the cache's filesystem (blocking); less than 0
        when it holds less free space than it keeps free."""
        try:
            disk = shutil.disk_usage(self.root)
        except FileNotFoundError as exc:
            if not self._remake():
                raise CacheError(f"cannot use cache directory {self.root}: {exc.strerror}"
                                 ) from None
            disk = shutil.disk_usage(self.root)
        except OSError as exc:
            raise CacheError(f"cannot use cache directory {self.root}: {exc.strerror}") from None
        keep = int(disk.total * FREE_SHARE)
        return Cap(disk.free - keep,
                   f"keeps {FREE_SHARE:.0%} of the cache's filesystem, {human(keep)}, free")

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
        if not self.staging.exists():
            self._remake()
        try:
            path.mkdir(mode=0o700)
            fd = os.open(path / DATA, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise CacheError(f"cannot write to cache {self.root}: {exc.strerror}") from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        return Staging(version_id, path, fd)

    def publish(self, staging: Staging, builder: TreeBuilder,
                sums: BlockSums | None = None) -> Entry:
        """Make a staged entry visible to everyone; returns it open and shared-locked. `sums`:
        the checksums of the data's blocks, as it was written (made from the file if None).

        When another process published the same version first, the returned entry is theirs
        and `staging.fd` is left open for the caller to close."""
        size = os.fstat(staging.fd).st_size
        if sums is None:
            sums = BlockSums()
            sums.add(os.pread(staging.fd, size, 0))
            sums.finish(size)
        try:
            fd = os.open(staging.path / INDEX, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         0o600)
            try:
                builder.write(fd, sums)
            finally:
                os.close(fd)
            fcntl.flock(staging.fd, fcntl.LOCK_SH)  # readers welcome from now on
            self._rename_into_place(staging)
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
            index = TreeIndex.load(self.versions / staging.version_id / INDEX)
        except (OSError, ValueError) as exc:
            raise CacheError(f"cannot read the index just written: {exc}") from None
        return Entry(staging.fd, index, size, sums)

    def _rename_into_place(self, staging: Staging) -> None:
        """Rename a staged entry into versions/. A folder already there that is damaged or
        only a remnant (its data deleted) is removed first, so that it heals."""
        target = self.versions / staging.version_id
        try:
            os.rename(staging.path, target)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            existing = self.open_entry(staging.version_id)  # removes a damaged one
            if existing is not None:
                os.close(existing.fd)
                raise
        os.rename(staging.path, target)

    def discard(self, staging: Staging) -> None:
        with contextlib.suppress(OSError):
            os.close(staging.fd)
        shutil.rmtree(staging.path, ignore_errors=True)

    # -- housekeeping ----------------------------------------------------------------------

    def clean_staging(self) -> int:
        """Remove entries left half-written by a process that died; return how many."""
        removed = 0
        self._clean_mount_records()
        for path in self.staging.iterdir():
            if not STAGING_NAME.fullmatch(path.name):
                continue  # not a name vm0fs makes: not ours to remove
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
        self.clean_remnants()
        return removed

    def clean_remnants(self) -> int:
        """Remove version folders whose data was deleted (an index alone, or nothing)."""
        removed = 0
        try:
            folders = list(self.versions.iterdir())
        except OSError:
            return 0
        for folder in folders:
            if _is_remnant(folder):
                self._remove_entry(folder.name)
                removed += not folder.exists()
        if removed:
            log.info("removed %d cache entr%s whose data was gone", removed,
                     "y" if removed == 1 else "ies")
        return removed

    def _clean_mount_records(self) -> None:
        """Remove the records of mounts that have ended."""
        try:
            names = os.listdir(self.mounts_dir)
        except OSError:
            return
        for name in names:
            if not re.fullmatch(r"\d+\.json", name):
                continue
            try:
                fd = os.open(self.mounts_dir / name, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if _lock(fd, fcntl.LOCK_EX):
                    os.unlink(self.mounts_dir / name)
            except OSError:
                pass
            finally:
                os.close(fd)

    def entries(self) -> list[tuple[str, int, float]]:
        """(version id, bytes, last used) of every published entry."""
        found = []
        try:
            folders = list(os.scandir(self.versions))
        except FileNotFoundError:
            return []
        known, sizes = self._sizes, {}
        now = time.monotonic()
        for dirent in folders:
            try:
                st = dirent.stat(follow_symlinks=False)
            except OSError:
                continue
            key = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
            memo = known.get(dirent.name)
            if memo is not None and memo[0] == key and now - memo[1] < SIZE_MEMO_AGE:
                size = memo[2]
                sizes[dirent.name] = memo
            else:
                folder = Path(dirent.path)
                if not _is_entry_folder(folder):
                    continue  # not laid out the way vm0fs publishes: not ours to count or remove
                try:
                    size = sum(p.stat().st_size for p in folder.iterdir())
                except OSError:
                    continue
                sizes[dirent.name] = (key, now, size)
            found.append((dirent.name, size, max(st.st_mtime, self._used.get(dirent.name, 0.0))))
        self._sizes = sizes
        return found

    def usage(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def evict(self, max_bytes: int | None = None, keep: frozenset[str] = frozenset()) -> int:
        """Remove least recently used entries until the cache fits `max_bytes` (default: the
        cap in force); return the bytes freed.

        An entry someone holds open (a shared lock) is never removed, nor one named in `keep`.
        """
        entries = sorted(self.entries(), key=lambda e: e[2])
        total = sum(size for _, size, _ in entries)
        cap = self.cap(total).bytes if max_bytes is None else max_bytes
        freed = 0
        self.kept = []
        for version_id, size, _ in entries:
            if total <= cap:
                break
            if version_id in keep or not self._remove_entry(version_id, only_if_unused=True):
                self.kept.append((version_id, size))
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
            # A folder without its data: remove it only if it holds nothing but our index.
            with contextlib.suppress(OSError):
                if set(os.listdir(folder)) <= {INDEX, OLD_INDEX}:
                    shutil.rmtree(folder, ignore_errors=True)
            return not folder.exists()
        try:
            if only_if_unused and not _lock(fd, fcntl.LOCK_EX):
                return False
            return self._delete_folder(version_id)
        finally:
            os.close(fd)

    def _delete_folder(self, version_id: str) -> bool:
        """Remove a version's folder: renamed away first, so nobody opens it half-deleted."""
        doomed = self.staging / f"evicted.{version_id}.{secrets.token_hex(4)}"
        try:
            os.rename(self.versions / version_id, doomed)
        except OSError:
            return False
        shutil.rmtree(doomed, ignore_errors=True)
        self._touched.pop(version_id, None)
        self._used.pop(version_id, None)
        return True
