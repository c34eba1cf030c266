"""Serving a mount: the pieces of one mount put together (API client, cache, listings, version
store, `fs.Operations`), pyfuse3 init/main/close under trio, mount options, signals, readiness
and a clean unmount. `serve` is the whole life of one mount in its process; how that process
starts and reports back is `launch`'s.
"""

from __future__ import annotations

import grp
import logging
import os
import signal
import socket
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from vm0fs.api import ApiClient
from vm0fs.cache import Cache
from vm0fs.control import RecentErrors
from vm0fs.errors import ApiError, Unauthorized, Unavailable
from vm0fs.fs import Operations
from vm0fs.meta import Listings, listing_namespace
from vm0fs.mountpoint import MountConfig, MountError, MountLock, check_mountpoint
from vm0fs.mounttable import user_name
from vm0fs.tree import InodeTable
from vm0fs.versions import RECENTLY_READ, VersionStore

log = logging.getLogger(__name__)
FUSE_DEVICE = "/dev/fuse"

def mount_options(config: MountConfig) -> set[str]:
    host = config.api_url.split("://", 1)[-1].split("/", 1)[0] or socket.gethostname()
    options = {"ro", "nosuid", "nodev", "noatime", f"fsname=vm0fs:{host}", "subtype=vm0fs"}
    if config.allow_other:
        # Other users see the files: let the kernel check permission bits for them.
        options |= {"allow_other", "default_permissions"}
    options |= set(config.fuse_options)
    return options


async def serve(config: MountConfig, ready: Callable[[], None] = lambda: None,
                client: ApiClient | None = None) -> None:
    """Mount, serve until unmounted or signalled, then unmount. Raises MountError early on."""
    lock = await _lock(config.mountpoint)
    try:
        check_mountpoint(config.mountpoint)
        await _serve(config, ready, client, lock)
    finally:
        lock.close()


async def _lock(mountpoint: Path) -> MountLock:
    """Wait while another vm0fs is between its checks and its mount on the same folder."""
    lock = MountLock(mountpoint)
    while not lock.acquire():
        await trio.sleep(0.05)
    return lock


async def _serve(config: MountConfig, ready: Callable[[], None], client: ApiClient | None,
                 lock: MountLock) -> None:
    client = client or ApiClient(config.api_url, config.api_key, retry_time=config.api_retry_time)
    async with client:
        cache = await trio.to_thread.run_sync(Cache, config.cache_dir, config.cache_size)
        await trio.to_thread.run_sync(cache.clean_staging)
        # `vm0fs cache clear` refuses while this is held; `cache info` names the mount.
        in_use = cache.hold_in_use(str(config.mountpoint), config.api_url, config.cache_size)
        try:
            listings = Listings(client, config.metadata_ttl,
                                cache.listings / listing_namespace(config.api_url,
                                                                   config.api_key))
            await _check_access(listings, config.api_url)
            table = InodeTable(pyfuse3.ROOT_INODE + 1)
            store = VersionStore(cache, client, table, max_version_bytes=config.max_version_size,
                                 recently_read=RECENTLY_READ if config.cache_grace is None
                                 else config.cache_grace)
            store.describe = lambda artifact_id: _describe_artifact(listings, artifact_id)
            recent_errors = RecentErrors()
            ops = Operations(listings, store, cache, metadata_ttl=config.metadata_ttl,
                             api_url=config.api_url, mountpoint=str(config.mountpoint),
                             xattrs=config.xattrs, recent_errors=recent_errors)
            _init_fuse(ops, config)
        except BaseException:
            in_use.close()  # no mount: the cache is not in use after all
            raise
        finally:
            lock.close()  # mounted (or not): another mount here now finds out which
        logging.getLogger("vm0fs").addHandler(recent_errors)
        log.info("mounted %s at %s (cache %s)", config.api_url, config.mountpoint, cache.root)
        try:
            async with trio.open_nursery() as nursery:
                listings.start(nursery)  # the walk `_check_access` began goes on
                store.offline = lambda: listings.offline
                await nursery.start(store.run)
                nursery.start_soon(_stop_on_signal)
                nursery.start_soon(ops.invalidate_listings)  # listings, and links moved
                nursery.start_soon(store.keep_cache_size)  # a cap is always in force
                nursery.start_soon(ops.fill.run)
                ready()
                await pyfuse3.main(min_tasks=1, max_tasks=config.max_tasks)
                nursery.cancel_scope.cancel()
        except BaseException:
            log.exception("the mount stopped on an error")
            raise
        finally:
            store.close()
            in_use.close()
            pyfuse3.close(unmount=True)
            logging.getLogger("vm0fs").removeHandler(recent_errors)
            log.info("unmounted %s", config.mountpoint)


def _describe_artifact(listings: Listings, artifact_id: str) -> str:
    """`name (id)` for log lines, from the last known listing; the id alone if unknown."""
    try:
        artifact = listings.known_artifact(artifact_id)
    except Exception:  # noqa: BLE001 - naming an error must never become one
        log.debug("cannot name artifact %s", artifact_id, exc_info=True)
        return artifact_id
    return f"{artifact.name!r} ({artifact_id})" if artifact is not None else artifact_id


def _init_fuse(ops: Operations, config: MountConfig) -> None:
    """pyfuse3.init, with what libfuse and fusermount3 print on stderr caught: their reason for
    a failure belongs in the one-line error, not only in the log."""
    with tempfile.TemporaryFile() as capture:
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        failure: RuntimeError | None = None
        try:
            pyfuse3.init(ops, str(config.mountpoint), mount_options(config))
        except RuntimeError as exc:
            failure = exc
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        said = capture.read().decode(errors="replace")
    for line in said.splitlines():  # still in the log, as log lines
        if line.strip():
            log.warning("%s", line.strip())
    if failure is not None:
        raise MountError(mount_failure(config, said, str(failure)))


def mount_failure(config: MountConfig, said: str, fallback: str) -> str:
    """One line: why the kernel mount failed, and what to do about it."""
    lines = [line.strip() for line in said.splitlines() if line.strip()]
    reason = lines[-1] if lines else fallback
    for prefix in ("fusermount3: ", "fusermount: ", "fuse: "):
        reason = reason.removeprefix(prefix)
    hint = ""
    if "user_allow_other" in reason:
        hint = ("; add the line user_allow_other to /etc/fuse.conf (as root), "
                "or mount without --allow-other")
    elif "no write access to mountpoint" in reason:
        hint = "; mount on a folder you own, e.g. mkdir -p ~/vm0"
    elif "/dev/fuse" in reason or "device not found" in reason:
        hint = "; " + (fuse_device_hint() or "in a container, start it with --device /dev/fuse "
                       "--cap-add SYS_ADMIN")
    elif "fusermount3" in reason:
        hint = "; install the fuse3 package (as root: apt-get install fuse3)"
    return f"cannot mount {config.mountpoint}: {reason}{hint}"


def fuse_device_hint(device: str = FUSE_DEVICE, uid: int | None = None,
                     groups: set[int] | None = None) -> str:
    """What would make the FUSE device usable by this user (or `uid` in `groups`), or "" when
    its mode lets them read and write it."""
    try:
        st = os.stat(device)
    except FileNotFoundError:
        return (f"there is no {device}: load the fuse module (as root: modprobe fuse), or in a "
                f"container start it with --device {device}")
    except OSError as exc:
        return f"cannot look at {device}: {exc.strerror}"
    uid = os.getuid() if uid is None else uid
    groups = {os.getgid(), *os.getgroups()} if groups is None else groups
    shift = 6 if st.st_uid == uid else 3 if st.st_gid in groups else 0
    if uid == 0 or (st.st_mode >> shift) & 0o6 == 0o6:
        return ""
    group = _group_name(st.st_gid)
    join = "" if st.st_gid == 0 else (f", or add yourself to its group {group} (as root: "
                                      f"usermod -aG {group} USER, then log in again)")
    return (f"{device} is {stat.filemode(st.st_mode)} {user_name(st.st_uid)}:{group}, not "
            f"usable by you: as root, run chmod 666 {device}{join}")


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


async def _check_access(listings: Listings, api_url: str) -> None:
    """One request, the first page of the artifact list: the key works and the server answers
    (or, offline, the last known listing exists). The rest of the list is fetched once mounted,
    in the background, so that mounting does not wait for a walk of every page."""
    # Retries are worth a line each once mounted; before, only the outcome is.
    api_log = logging.getLogger("vm0fs.api")
    level = api_log.level
    if not api_log.isEnabledFor(logging.DEBUG):
        api_log.setLevel(logging.ERROR)
    try:
        await listings.probe()
    except Unavailable as exc:
        raise MountError(f"cannot reach the vm0 API at {api_url}: {exc}") from None
    except Unauthorized:
        raise
    except ApiError as exc:
        text = str(exc)
        if exc.status == 404 and api_url.rstrip("/").endswith("/v1"):
            text += " (give the base URL, without /v1)"
        raise MountError(text if api_url in text else f"cannot use the API at {api_url}: {text}"
                         ) from None
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
