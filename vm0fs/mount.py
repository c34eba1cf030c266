"""Running a mount: pyfuse3 init/main/close under trio, mount options, signals, readiness and a
clean unmount. `serve` is the whole life of one mount in the foreground.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from vm0fs.api import ApiClient
from vm0fs.cache import Cache
from vm0fs.control import RecentErrors
from vm0fs.errors import Unavailable, Vm0fsError
from vm0fs.fs import Operations
from vm0fs.meta import Listings, listing_namespace
from vm0fs.tree import InodeTable
from vm0fs.versions import RECENTLY_READ, VersionStore

log = logging.getLogger("vm0fs.mount")

DEFAULT_MAX_TASKS = 8  # concurrent FUSE requests; only the ones waiting on the network need many


@dataclass
class MountConfig:
    mountpoint: Path
    api_url: str
    api_key: str
    cache_dir: Path
    metadata_ttl: float = 60.0
    cache_size: int | None = None
    cache_grace: float = RECENTLY_READ
    max_version_size: int | None = None
    allow_other: bool = False
    fuse_options: list[str] = field(default_factory=list)
    max_tasks: int = DEFAULT_MAX_TASKS
    api_retry_time: float = 10.0
    xattrs: bool = False


class MountError(Vm0fsError):
    """The mount could not be started; the message is for the user as it is."""


def mount_options(config: MountConfig) -> set[str]:
    host = config.api_url.split("://", 1)[-1].split("/", 1)[0] or socket.gethostname()
    options = {"ro", "nosuid", "nodev", "noatime", f"fsname=vm0fs:{host}", "subtype=vm0fs"}
    if config.allow_other:
        # Other users see the files: let the kernel check permission bits for them.
        options |= {"allow_other", "default_permissions"}
    options |= set(config.fuse_options)
    return options


def check_mountpoint(path: Path) -> None:
    if _is_dead_mount(path):
        # "Transport endpoint is not connected": a vm0fs process died and left its mount.
        if not _is_vm0fs_mount(path):
            raise MountError(f"{path} is a dead mount of another filesystem: "
                             f"fusermount3 -u -z {path}")
        log.warning("%s is a dead vm0fs mount (its process ended): unmounting it", path)
        unmount(path, lazy=True)
    try:
        _check_mountpoint(path)
    except OSError as exc:
        raise MountError(f"cannot use mount point {path}: {exc.strerror}") from None


def _is_dead_mount(path: Path) -> bool:
    """statfs always reaches the filesystem's process, where stat may be answered from the
    kernel's cache of a dead mount's root."""
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def _check_mountpoint(path: Path) -> None:
    if not path.exists():
        raise MountError(f"mount point {path} does not exist")
    if not path.is_dir():
        raise MountError(f"mount point {path} is not a directory")
    if os.path.ismount(path):
        raise MountError(f"{path} is already a mount point (vm0fs unmount {path} first?)")
    try:
        if any(os.scandir(path)):
            raise MountError(f"mount point {path} is not empty")
    except PermissionError:
        raise MountError(f"cannot read mount point {path}: permission denied") from None


def _is_vm0fs_mount(path: Path) -> bool:
    try:
        with open("/proc/self/mounts") as mounts:
            return any(fields[1] == str(path) and fields[2] == "fuse.vm0fs"
                       for fields in (line.split() for line in mounts))
    except OSError:
        return False


async def serve(config: MountConfig, ready: Callable[[], None] = lambda: None,
                client: ApiClient | None = None) -> None:
    """Mount, serve until unmounted or signalled, then unmount. Raises MountError early on."""
    check_mountpoint(config.mountpoint)
    client = client or ApiClient(config.api_url, config.api_key, retry_time=config.api_retry_time)
    async with client:
        cache = await trio.to_thread.run_sync(Cache, config.cache_dir, config.cache_size)
        await trio.to_thread.run_sync(cache.clean_staging)
        in_use = cache.hold_in_use()  # `vm0fs cache clear` refuses while this is held
        listings = Listings(client, config.metadata_ttl,
                            cache.listings / listing_namespace(config.api_url, config.api_key))
        await _check_access(listings, config.api_url)
        table = InodeTable(pyfuse3.ROOT_INODE + 1)
        store = VersionStore(cache, client, table, max_version_bytes=config.max_version_size,
                             recently_read=config.cache_grace)
        recent_errors = RecentErrors()
        logging.getLogger("vm0fs").addHandler(recent_errors)
        ops = Operations(listings, store, cache, metadata_ttl=config.metadata_ttl,
                         api_url=config.api_url, mountpoint=str(config.mountpoint),
                         xattrs=config.xattrs, recent_errors=recent_errors)
        try:
            pyfuse3.init(ops, str(config.mountpoint), mount_options(config))
        except RuntimeError as exc:
            raise MountError(f"cannot mount {config.mountpoint}: {exc}") from None
        log.info("mounted %s at %s (cache %s)", config.api_url, config.mountpoint, cache.root)
        try:
            async with trio.open_nursery() as nursery:
                listings.nursery = nursery
                store.offline = lambda: listings.offline
                await nursery.start(store.run)
                nursery.start_soon(_stop_on_signal)
                if ops.stateless:
                    nursery.start_soon(ops.invalidate_listings)
                if cache.max_bytes is not None:
                    nursery.start_soon(store.keep_cache_size)
                ready()
                await pyfuse3.main(min_tasks=1, max_tasks=config.max_tasks)
                nursery.cancel_scope.cancel()
        except BaseException:
            log.exception("the mount stopped on an error")
            raise
        finally:
            store.close()
            os.close(in_use)
            pyfuse3.close(unmount=True)
            logging.getLogger("vm0fs").removeHandler(recent_errors)
            log.info("unmounted %s", config.mountpoint)


async def _check_access(listings: Listings, api_url: str) -> None:
    """One walk of the artifacts listing: the key works and the server answers (or, offline,
    the last known listing exists). It also warms the listing for the first `ls`."""
    # Retries are worth a line each once mounted; before, only the outcome is.
    api_log = logging.getLogger("vm0fs.api")
    level = api_log.level
    if not api_log.isEnabledFor(logging.DEBUG):
        api_log.setLevel(logging.ERROR)
    try:
        await listings.artifacts()
    except Unavailable as exc:
        raise MountError(f"cannot reach the vm0 API at {api_url}: {exc}") from None
    finally:
        api_log.setLevel(level)
    if listings.stale:
        log.warning("the API at %s is unreachable: mounting with the last known listings",
                    api_url)


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def unmount(mountpoint: Path, lazy: bool = False) -> None:
    """Unmount a vm0fs mount (fusermount3 works for root and for the user who mounted)."""
    command = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [str(mountpoint)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise MountError("fusermount3 is not installed (Debian package fuse3)") from None
    except subprocess.TimeoutExpired:
        raise MountError(f"unmounting {mountpoint} timed out") from None
    if result.returncode != 0:
        message = result.stderr.strip().removeprefix("fusermount3: ") or "failed"
        hint = " (a process still uses it: close it, or use --lazy)" if "busy" in message else ""
        raise MountError(f"cannot unmount {mountpoint}: {message}{hint}")
