"""`vm0fs dev-server`: a local implementation of the vm0 Artifacts API, for the demo and the tests.

    vm0fs dev-server --data-dir DIR [--host 127.0.0.1] [--port 0] [--blob-port 0]
                     [--token T] [--demo] [--verbose] [--rescan-after S] [fault switches]

Standard library only. Two HTTP/1.1 servers run in one process: the API origin (`/v1/...` plus
the test-only `/_dev/...` control routes) and a blob origin standing in for the object store
that presigned download links point at. On start exactly one line goes to stdout:

    vm0fs dev-server: listening on http://HOST:PORT (blobs on http://HOST:BLOBPORT)

Port 0 (the default for both) picks a free port; the line shows the real ones. SIGINT and
SIGTERM stop the server with exit code 0.

Token: --token, else the VM0_API_KEY environment variable, else `dev-token`. Every /v1 route
wants `Authorization: Bearer <token>`.

Data dir layout (rescanned on every API request, so files can be added while it runs; a request
about one known artifact rescans that artifact's folder only; --rescan-after SECONDS lets a scan
answer listings for that long, which thousands of artifacts need to answer in milliseconds):

    DIR/<folder>/                one artifact per folder (names starting with "." are ignored)
    DIR/<folder>/*.tar.gz        one version per archive; version id = SHA-256 of its bytes
    DIR/<folder>/artifact.json   optional sidecar, every key optional:
        {"id": "<uuid>", "name": "<name>", "current": "<file>.tar.gz", "created_at": ISO,
         "versions": {"<file>.tar.gz": {"message": str|null, "created_by": "agent"|"user",
                                       "created_at": ISO}}}

Defaults: id = uuid5(NAMESPACE_URL, "vm0fs-dev:" + folder); name = folder; a version's
created_at = the archive's mtime; message = "Version N" (N counts versions oldest first);
created_by = "agent"; current = the newest version; the artifact's created_at = its oldest
version's (the folder's mtime when it has none); updated_at = its newest version's created_at.
size / file_count = uncompressed bytes / count of regular files and symlinks in the archive; an
archive tarfile cannot read is still served, as file_count 1 and size = its byte size. A
version with file_count 0 (an empty archive) cannot be downloaded (404), as on the service.
Write new archives under a name not ending in .tar.gz and rename them into place.

Faults: each has a --kebab-case switch and a key of the same name (snake_case) in
/_dev/faults, where it can be read and changed at runtime. ms = milliseconds, N = a count.
Budget faults (truncate_blob, blob_fail, api_stall) count down by one for each request they
hit; -1 = every request, 0 = off.

  The API origin (/v1; the /_dev routes are never delayed, failed or stalled):
    latency_ms         ms before every /v1 and every blob answer
    fail_every         N: every Nth authenticated /v1 request answers 500 api_error
    throttle_every     N: every Nth authenticated /v1 request answers 429, Retry-After: 1
    reject_all         every /v1 request answers 401, like a revoked key
    camel_case         serve camelCase field names, like the service's later release
    link_ttl           seconds download links live (default 3600; 0 = already expired)
    api_stall          budget: /v1 requests (any route, with a key or not) are read and
                       never answered, the connection held (see below), as by a hung API

  The blob origin (the object store):
    blob_ttfb_ms       ms to first byte of every blob answer, errors included: the delay before
                       its status line, on top of latency_ms (/v1 is not delayed by it)
    bandwidth          bytes per second, a cap per blob response (0 = unlimited). Each body is
                       paced on its own from its first byte, and HTTP/1.1 sends one response at
                       a time on a connection, so this caps each connection, as one stream to an
                       object store is capped: K ranged GETs in flight get K times the rate
    blob_trickle_ms    ms between bytes: every blob body goes out one byte at a time, this far
                       apart (0 = off; overrides bandwidth); one that would outlast the hold
                       limit is cut there and its connection closed
    blob_stall_after   bytes (-1 = off, the default): every blob GET sends its headers and the
                       first N bytes of its body (0 = headers only), then nothing more, the
                       connection held (see below); a body of N bytes or less goes out whole
    truncate_blob      budget: blob GETs send full headers, about half the body, then hang up
    blob_fail          budget: blob requests answer 500 InternalError
    range_ignored      blob GETs ignore Range (and If-Range): 200 and the whole body
    range_wrong        a satisfiable Range gets a 206 starting one byte later than asked (one
                       byte earlier when one byte was asked, byte 1 for byte 0), its
                       Content-Range, Content-Length and bytes those of what is sent
    no_content_length  200 and 206 blob answers carry no Content-Length: the body goes out
                       chunked (Transfer-Encoding: chunked); a cut one lacks its last chunk
    etag_change_after  N (0 = off): after the first N blob requests that reach an object, every
                       object has another ETag, as if replaced once (the bytes stay the same)
    link_expire_after  N (0 = off): the Nth and later blob requests on one download link (each
                       /download answer is a new link) answer 403 AccessDenied "Request has
                       expired.", as an expired link does, so a client must ask for a new link

The counters behind fail_every, throttle_every, etag_change_after and link_expire_after restart
whenever faults are posted or stats are reset.

Held connections (api_stall, blob_stall_after): the server sends nothing more and keeps the
connection open until the client closes it, the server stops, or HOLD_LIMIT (10 minutes) has
passed since the answer began; then it closes the connection. Stopping the server never waits
for a held or trickled answer. Posting faults does not release answers already held.

Blob answers (GET or HEAD of a download link) carry ETag (the version id, quoted),
Content-Length (unless no_content_length) and Accept-Ranges: bytes. Range follows RFC 9110: one
`bytes=a-b`, `bytes=a-` or suffix `bytes=-n` gets 206 with `Content-Range: bytes a-b/size` (an
end past the object is cut to it); a range starting at or past the end, or `bytes=-0`, gets
416 with `Content-Range: bytes */size`; an unparseable or multi-range header is ignored (200,
the whole body), as the RFC allows, and so is any Range whose If-Range is not the current ETag
(a date or a weak tag never matches: no Last-Modified is sent).

Control routes (API origin, no auth): GET /_dev/stats (request counts, blob bytes sent,
blob_peak: the most blob bodies sent at once, and held: answers held open right now),
POST /_dev/reset (zero the stats; blob_peak restarts from the bodies being sent), GET
/_dev/faults, POST /_dev/faults (JSON object merged into the current faults).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
import secrets
import signal
import socket
import sys
import tarfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO, NoReturn, TypeVar
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

DEFAULT_TOKEN = "dev-token"
DEFAULT_LINK_TTL = 3600
CHUNK = 64 * 1024
SIDECAR = "artifact.json"
MIN_PREFIX = 8
HOLD_LIMIT = 600.0  # seconds: the longest a stalled or trickled answer keeps its thread
MAX_LINKS = 10_000  # download links whose uses link_expire_after remembers

FAULT_DEFAULTS: dict[str, int | float | bool] = {
    "latency_ms": 0,
    "blob_ttfb_ms": 0,
    "blob_stall_after": -1,
    "blob_trickle_ms": 0,
    "api_stall": 0,
    "fail_every": 0,
    "throttle_every": 0,
    "truncate_blob": 0,
    "blob_fail": 0,
    "bandwidth": 0,
    "link_ttl": DEFAULT_LINK_TTL,
    "camel_case": False,
    "reject_all": False,
    "range_ignored": False,
    "range_wrong": False,
    "no_content_length": False,
    "etag_change_after": 0,
    "link_expire_after": 0,
}
# Budget faults count down per request they hit; -1 means "always".
_BUDGET_FAULTS = ("truncate_blob", "blob_fail", "api_stall")
_MINUS_ONE_OK = (*_BUDGET_FAULTS, "blob_stall_after")  # -1 = off for blob_stall_after
_MS_FAULTS = ("latency_ms", "blob_ttfb_ms", "blob_trickle_ms")  # may be fractional
_STAT_ROUTES = ("list_artifacts", "get_artifact", "list_versions", "download", "blob")

T = TypeVar("T")


# --- errors --------------------------------------------------------------------------------


class HttpError(Exception):
    """An error answer in the service's JSON shape."""

    def __init__(
        self,
        status: int,
        type_: str,
        code: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"type": self.type, "code": self.code, "message": self.message}
        if self.param is not None:
            err["param"] = self.param
        return {"error": err}


def not_found(message: str) -> HttpError:
    return HttpError(404, "not_found_error", "resource_not_found", message)


def bad_request(message: str, param: str | None = None) -> HttpError:
    return HttpError(400, "invalid_request_error", "invalid_parameter", message, param)


# --- time helpers ---------------------------------------------------------------------------


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(value: object) -> datetime | None:
    """Parse a sidecar timestamp; naive values are taken as UTC, junk as absent."""
    if not isinstance(value, str):
        return None
    try:
        dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def from_ns(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, UTC)


# --- the data dir ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveInfo:
    sha256: str
    size: int
    file_count: int


@dataclass(frozen=True)
class Version:
    id: str
    artifact_id: str
    path: Path
    size: int
    file_count: int
    message: str | None
    created_by: str
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "artifact_id": self.artifact_id,
            "size": self.size,
            "file_count": self.file_count,
            "message": self.message,
            "created_by": self.created_by,
            "created_at": iso(self.created_at),
        }


@dataclass(frozen=True)
class Artifact:
    id: str
    name: str
    folder: Path
    versions: tuple[Version, ...]  # newest first
    current: Version | None
    created_at: datetime
    updated_at: datetime

    def to_json(self) -> dict[str, Any]:
        cur = self.current
        return {
            "id": self.id,
            "name": self.name,
            "current_version_id": cur.id if cur else None,
            "size": cur.size if cur else 0,
            "file_count": cur.file_count if cur else 0,
            "current_version": cur.to_json() if cur else None,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }


def inspect_archive(path: Path) -> ArchiveInfo:
    """Hash and count an archive in one streaming pass over the file (never whole in memory)."""
    digest = hashlib.sha256()
    with path.open("rb") as raw:
        for chunk in iter(lambda: raw.read(CHUNK), b""):
            digest.update(chunk)
        byte_size = raw.tell()
        raw.seek(0)
        size = count = 0
        try:
            # Stream mode ("r|gz") never seeks backwards and skips member data as it goes.
            with tarfile.open(fileobj=raw, mode="r|gz") as tar:
                for member in tar:
                    if member.isreg():
                        size += member.size
                        count += 1
                    elif member.issym():
                        count += 1
        except (tarfile.TarError, EOFError, OSError, zlib.error):
            # Garbage or truncated: still served, so clients can meet a broken archive.
            return ArchiveInfo(digest.hexdigest(), byte_size, 1)
    return ArchiveInfo(digest.hexdigest(), size, count)


def _read_sidecar(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _str_or(value: object, default: str) -> str:
    return value if isinstance(value, str) and value else default


def _dict_at(mapping: dict[str, Any], key: str) -> dict[str, Any]:
    value = mapping.get(key)
    return value if isinstance(value, dict) else {}


# What a folder looked like: its mtime and (name, mtime_ns, size) of the sidecar and archives.
FolderKey = tuple[int, tuple[tuple[str, int, int], ...]]


class Store:
    """Scans the data dir on every call. Archive facts are cached by (path, mtime_ns, size) and
    whole artifacts by their folder's FolderKey, so a rescan is only a few stat calls each."""

    def __init__(self, root: Path, rescan_after: float = 0.0) -> None:
        self.root = root
        self.rescan_after = rescan_after  # seconds a scan answers listings; 0: every request
        self._last_scan: tuple[float, list[Artifact]] | None = None
        self._lock = threading.Lock()
        self._archives: dict[Path, tuple[tuple[int, int], ArchiveInfo]] = {}
        self._folders: dict[str, tuple[FolderKey, Artifact]] = {}
        self._rebuilt = False  # some folder changed since the caches were last pruned
        # (artifact id, version id) -> archive path, refreshed by every scan, for the blob origin.
        self._index: dict[tuple[str, str], Path] = {}
        self._homes: dict[str, str] = {}  # artifact id -> its folder, as of the last scan

    def _info(self, path: Path, key: tuple[int, int]) -> ArchiveInfo:
        with self._lock:
            hit = self._archives.get(path)
        if hit and hit[0] == key:
            return hit[1]
        info = inspect_archive(path)  # outside the lock: hashing a big file must not stall others
        with self._lock:
            self._archives[path] = (key, info)
        return info

    def scan(self) -> list[Artifact]:
        """All artifacts, in folder name order. Folders that vanish mid-scan are skipped."""
        if self.rescan_after > 0:
            with self._lock:
                last = self._last_scan
            if last is not None and time.monotonic() - last[0] < self.rescan_after:
                return last[1]
        started = time.monotonic()
        artifacts: list[Artifact] = []
        try:
            with os.scandir(self.root) as it:
                entries = sorted(
                    (e for e in it if not e.name.startswith(".") and e.is_dir()),
                    key=lambda e: e.name,
                )
        except OSError:
            entries = []
        for entry in entries:
            try:
                artifacts.append(self._folder(entry.path, entry.stat().st_mtime_ns))
            except OSError:
                continue
        with self._lock:
            if self._rebuilt or len(self._folders) != len(artifacts):
                # Forget what is gone, so a long-running server does not grow without bound.
                live = {str(a.folder) for a in artifacts}
                self._folders = {k: v for k, v in self._folders.items() if k in live}
                paths = {
                    Path(f, name) for f, (key, _) in self._folders.items() for name, _, _ in key[1]
                }
                self._archives = {k: v for k, v in self._archives.items() if k in paths}
                self._rebuilt = False
            self._index = {(v.artifact_id, v.id): v.path for a in artifacts for v in a.versions}
            self._homes = {}
            for a in artifacts:
                self._homes.setdefault(a.id, str(a.folder))
            self._last_scan = (started, artifacts)
        return artifacts

    def _folder(self, folder: str, folder_mtime_ns: int) -> Artifact:
        files: list[tuple[str, int, int]] = []
        with os.scandir(folder) as it:
            for e in it:
                if e.name != SIDECAR and not e.name.endswith(".tar.gz"):
                    continue
                try:
                    if e.is_file():
                        st = e.stat()
                        files.append((e.name, st.st_mtime_ns, st.st_size))
                except OSError:
                    continue
        key: FolderKey = (folder_mtime_ns, tuple(sorted(files)))
        with self._lock:
            hit = self._folders.get(folder)
        if hit and hit[0] == key:
            return hit[1]
        artifact = self._build(Path(folder), key)
        with self._lock:
            self._folders[folder] = (key, artifact)
            self._rebuilt = True
        return artifact

    def _build(self, folder: Path, key: FolderKey) -> Artifact:
        folder_mtime_ns, files = key
        side = _read_sidecar(folder / SIDECAR) if any(f[0] == SIDECAR for f in files) else {}
        default_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"vm0fs-dev:{folder.name}"))
        artifact_id = _str_or(side.get("id"), default_id)
        meta = _dict_at(side, "versions")
        found: list[tuple[datetime, int, str, ArchiveInfo]] = []
        for name, mtime_ns, size in files:
            if name == SIDECAR:
                continue
            try:
                info = self._info(folder / name, (mtime_ns, size))
            except OSError:
                continue
            created = parse_iso(_dict_at(meta, name).get("created_at")) or from_ns(mtime_ns)
            found.append((created, mtime_ns, name, info))
        found.sort(key=lambda f: (f[0], f[1], f[2]))  # oldest first, to number them
        by_file: dict[str, Version] = {}
        by_id: dict[str, Version] = {}
        for n, (created, _, name, info) in enumerate(found, 1):
            vmeta = _dict_at(meta, name)
            message = vmeta.get("message", f"Version {n}")  # an explicit null stays null
            version = Version(
                id=info.sha256,
                artifact_id=artifact_id,
                path=folder / name,
                size=info.size,
                file_count=info.file_count,
                message=message if isinstance(message, str) else None,
                created_by=_str_or(vmeta.get("created_by"), "agent"),
                created_at=created,
            )
            by_file[name] = version
            by_id[version.id] = version  # identical bytes are one version: the newest copy wins
        versions = tuple(sorted(by_id.values(), key=lambda v: (v.created_at, v.id), reverse=True))
        current = None
        wanted = side.get("current")
        if isinstance(wanted, str) and wanted in by_file:
            current = by_id[by_file[wanted].id]
        elif versions:
            current = versions[0]
        created_at = parse_iso(side.get("created_at"))
        if created_at is None:
            created_at = versions[-1].created_at if versions else from_ns(folder_mtime_ns)
        updated_at = versions[0].created_at if versions else created_at
        return Artifact(
            id=artifact_id,
            name=_str_or(side.get("name"), folder.name),
            folder=folder,
            versions=versions,
            current=current,
            created_at=created_at,
            updated_at=max(updated_at, created_at),
        )

    def get(self, artifact_id: str) -> Artifact:
        """One artifact: its own folder is rescanned when it is known, else every folder (a
        data dir of thousands of artifacts must not cost a full scan per request)."""
        with self._lock:
            home = self._homes.get(artifact_id)
        if home is not None:
            try:
                artifact = self._folder(home, os.stat(home).st_mtime_ns)
            except OSError:
                artifact = None
            if artifact is not None and artifact.id == artifact_id:
                return artifact
        for artifact in self.scan():
            if artifact.id == artifact_id:
                return artifact
        raise not_found(f"No such artifact: '{artifact_id}'")

    def locate(self, artifact_id: str, version_id: str) -> Path | None:
        """The archive holding a version, rescanning only when the index is stale."""
        for attempt in range(2):
            with self._lock:
                path = self._index.get((artifact_id, version_id))
                hit = self._archives.get(path) if path else None
            if path and hit and hit[1].sha256 == version_id:
                try:
                    st = path.stat()
                    if hit[0] == (st.st_mtime_ns, st.st_size):
                        return path
                except OSError:
                    pass
            if attempt == 0:
                self.scan()
        return None


def resolve_version(versions: Sequence[Version], ref: str) -> Version:
    """Exact id first, else a unique prefix of at least 8 hex characters; otherwise 404."""
    for v in versions:
        if v.id == ref:
            return v
    ref_l = ref.lower()
    if len(ref_l) >= MIN_PREFIX and re.fullmatch(r"[0-9a-f]+", ref_l):
        matches = [v for v in versions if v.id.startswith(ref_l)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise not_found(f"Ambiguous version prefix: '{ref}'")
    raise not_found(f"No such version: '{ref}'")


def paginate(
    items: Sequence[T], ident: Callable[[T], str], limit: int, cursor: str | None
) -> tuple[list[T], bool, str | None]:
    start = 0
    if cursor:
        ids = [ident(i) for i in items]
        if cursor not in ids:
            raise bad_request(f"Invalid cursor: '{cursor}'", "cursor")
        start = ids.index(cursor) + 1
    page = list(items[start : start + limit])
    has_more = start + limit < len(items)
    return page, has_more, ident(page[-1]) if has_more and page else None


def camelize(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            re.sub(r"_([a-z])", lambda m: m[1].upper(), k): camelize(v) for k, v in value.items()
        }
    if isinstance(value, list):
        return [camelize(v) for v in value]
    return value


# --- runtime state: faults and stats ---------------------------------------------------------


class State:
    """Faults, counters and stats shared by all request threads (all under one lock)."""

    def __init__(self, faults: dict[str, int | float | bool]) -> None:
        self._lock = threading.Lock()
        self.stopping = threading.Event()  # set when the server stops: every wait ends early
        self.faults: dict[str, int | float | bool] = dict(FAULT_DEFAULTS)
        self.update_faults(faults)
        self._api_seq = 0
        self._blob_seq = 0  # blob requests that reached an object, for etag_change_after
        self._link_uses: dict[str, int] = {}  # link signature -> requests, for link_expire_after
        self._requests = dict.fromkeys(_STAT_ROUTES, 0)
        self._blob_bytes = 0
        self._blob_sending = 0  # blob bodies being sent right now
        self._blob_peak = 0  # the most at once since the last reset
        self._held = 0  # answers held open right now (api_stall, blob_stall_after)

    def update_faults(self, patch: dict[str, Any]) -> dict[str, int | float | bool]:
        clean: dict[str, int | float | bool] = {}
        for key, value in patch.items():
            if key not in FAULT_DEFAULTS:
                raise bad_request(f"Unknown fault: '{key}'", key)
            if isinstance(FAULT_DEFAULTS[key], bool):
                if not isinstance(value, bool):
                    raise bad_request(f"Fault '{key}' must be true or false", key)
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise bad_request(f"Fault '{key}' must be a number", key)
            elif value < (-1 if key in _MINUS_ONE_OK else 0):
                raise bad_request(f"Fault '{key}' is out of range", key)
            elif key not in _MS_FAULTS or float(value).is_integer():
                value = int(value)
            clean[key] = value
        with self._lock:
            self.faults.update(clean)
            self._restart_counters()
            return dict(self.faults)

    def _restart_counters(self) -> None:
        self._api_seq = 0
        self._blob_seq = 0
        self._link_uses = {}

    def fault(self, key: str) -> Any:
        with self._lock:
            return self.faults[key]

    def get_faults(self) -> dict[str, int | float | bool]:
        with self._lock:
            return dict(self.faults)

    def next_api_request(self) -> tuple[bool, bool]:
        """Count one authenticated /v1 request; return (fail it, throttle it)."""
        with self._lock:
            self._api_seq += 1
            n = self._api_seq
            fail_every = int(self.faults["fail_every"])
            throttle_every = int(self.faults["throttle_every"])
        return (
            fail_every > 0 and n % fail_every == 0,
            throttle_every > 0 and n % throttle_every == 0,
        )

    def etag(self, version_id: str) -> str:
        """Count one blob request that reached an object; return the object's ETag."""
        with self._lock:
            self._blob_seq += 1
            after = int(self.faults["etag_change_after"])
            replaced = 0 < after < self._blob_seq
        return f'"{version_id}-2"' if replaced else f'"{version_id}"'

    def link_expired(self, sig: str) -> bool:
        """Count one request on the download link with this signature; True when it is the
        link_expire_after-th or later."""
        with self._lock:
            after = int(self.faults["link_expire_after"])
            if after <= 0:
                return False
            uses = self._link_uses.pop(sig, 0) + 1
            self._link_uses[sig] = uses  # the most recently used last
            if len(self._link_uses) > MAX_LINKS:
                del self._link_uses[next(iter(self._link_uses))]
        return uses >= after

    def take(self, key: str) -> bool:
        """Consume one unit of a budget fault (truncate_blob, blob_fail)."""
        with self._lock:
            left = int(self.faults[key])
            if left == -1:
                return True
            if left > 0:
                self.faults[key] = left - 1
                return True
            return False

    def count(self, route: str) -> None:
        with self._lock:
            self._requests[route] += 1

    def add_blob_bytes(self, n: int) -> None:
        with self._lock:
            self._blob_bytes += n

    def sending_blob(self, delta: int) -> None:
        with self._lock:
            self._blob_sending += delta
            self._blob_peak = max(self._blob_peak, self._blob_sending)

    def holding(self, delta: int) -> None:
        with self._lock:
            self._held += delta

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": dict(self._requests), "blob_bytes": self._blob_bytes,
                    "blob_peak": self._blob_peak, "held": self._held}

    def reset(self) -> None:
        with self._lock:
            self._requests = dict.fromkeys(_STAT_ROUTES, 0)
            self._blob_bytes = 0
            self._blob_peak = self._blob_sending
            self._restart_counters()

    def pause(self, seconds: float) -> bool:
        """Sleep, unless the server stops first; True when it does."""
        return self.stopping.wait(seconds) if seconds > 0 else self.stopping.is_set()

    def sleep_ms(self, key: str) -> None:
        self.pause(float(self.fault(key)) / 1000)


class App:
    def __init__(self, store: Store, state: State, token: str) -> None:
        self.store = store
        self.state = state
        self.token = token
        self.secret = secrets.token_bytes(32)  # per process: links die with the server
        self.blob_origin = ""

    def sign(self, artifact_id: str, version_id: str, expires: int, nonce: str) -> str:
        msg = f"{version_id}\n{artifact_id}\n{expires}\n{nonce}".encode()
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()

    def link(self, artifact_id: str, version_id: str) -> str:
        """A new link on every call (the nonce), even within one second: link_expire_after
        counts the requests on each one."""
        expires = int(time.time()) + int(self.state.fault("link_ttl"))
        nonce = secrets.token_hex(8)
        query = urlencode(
            {
                "artifact": artifact_id,
                "expires": expires,
                "nonce": nonce,
                "sig": self.sign(artifact_id, version_id, expires, nonce),
            }
        )
        return f"{self.blob_origin}/blobs/{version_id}/archive.tar.gz?{query}"


# --- HTTP plumbing --------------------------------------------------------------------------


class Server(ThreadingHTTPServer):
    daemon_threads = True
    app: App


class Server6(Server):
    address_family = socket.AF_INET6


class BaseHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without this, Nagle + delayed ACK add ~40 ms.
    disable_nagle_algorithm = True
    timeout = 120  # idle keep-alive connections give their thread back eventually
    verbose = False
    server: Server

    @property
    def app(self) -> App:
        return self.server.app

    def log_message(self, format: str, *args: Any) -> None:
        if self.verbose:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def read_body(self) -> bytes:
        # Always drain a request body so the next request on a keep-alive connection parses.
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def send_bytes(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Request-Id", str(uuid.uuid4()))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self.send_bytes(status, json.dumps(body).encode(), "application/json", headers)

    def send_error_json(self, err: HttpError) -> None:
        self.send_json(err.status, err.body(), err.headers)

    def hold(self, until: float) -> None:
        """Answer nothing more: keep the connection open until the client closes it, the server
        stops, or time.monotonic() reaches `until`; then close it."""
        self.close_connection = True
        state = self.app.state
        sock = self.connection
        state.holding(1)
        try:
            while not state.stopping.is_set():
                left = until - time.monotonic()
                if left <= 0:
                    return
                sock.settimeout(min(0.25, left))
                try:
                    if not sock.recv(CHUNK):
                        return  # the client went away (whatever it sends meanwhile is dropped)
                except TimeoutError:
                    continue
                except OSError:
                    return
        finally:
            state.holding(-1)

    def do_GET(self) -> None:
        self.dispatch()

    def do_HEAD(self) -> None:
        self.dispatch()

    def do_POST(self) -> None:
        self.dispatch()

    def do_PUT(self) -> None:
        self.dispatch()

    def do_DELETE(self) -> None:
        self.dispatch()

    def dispatch(self) -> None:
        try:
            self.read_body_and_route()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client went away, or stopped reading for `timeout`
        except Exception as exc:  # a bug here must not kill the thread silently
            sys.stderr.write(f"vm0fs dev-server: internal error: {exc!r}\n")
            try:
                self.send_error_json(HttpError(500, "api_error", "internal_error", str(exc)))
            except OSError:
                self.close_connection = True

    def read_body_and_route(self) -> None:
        raise NotImplementedError


_V1 = [
    ("list_artifacts", re.compile(r"/v1/artifacts")),
    ("get_artifact", re.compile(r"/v1/artifacts/([^/]+)")),
    ("list_versions", re.compile(r"/v1/artifacts/([^/]+)/versions")),
    ("download", re.compile(r"/v1/artifacts/([^/]+)/download")),
]


def _match_v1(path: str) -> tuple[str, re.Match[str]] | None:
    for route, pattern in _V1:
        m = pattern.fullmatch(path)
        if m:
            return route, m
    return None


def _query_limit(query: dict[str, list[str]]) -> tuple[int, str | None]:
    raw = query.get("limit", [""])[-1]
    limit = 20
    if raw != "":
        if not re.fullmatch(r"\d{1,6}", raw) or not 1 <= int(raw) <= 100:
            raise bad_request("limit must be an integer between 1 and 100", "limit")
        limit = int(raw)
    return limit, query.get("cursor", [""])[-1] or None


class ApiHandler(BaseHandler):
    def read_body_and_route(self) -> None:
        body = self.read_body()
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        query = parse_qs(url.query, keep_blank_values=True)
        if path.startswith("/_dev/"):
            self.control(path, body)
            return
        try:
            if not path.startswith("/v1/"):
                raise not_found(f"Unknown route: '{path}'")
            self.app.state.sleep_ms("latency_ms")
            self.v1(path, query)
        except HttpError as err:
            self.send_error_json(err)

    def v1(self, path: str, query: dict[str, list[str]]) -> None:
        state = self.app.state
        matched = _match_v1(path)
        if matched:
            state.count(matched[0])
        if state.take("api_stall"):
            self.hold(time.monotonic() + HOLD_LIMIT)
            return
        if not matched:
            raise not_found(f"Unknown route: '{path}'")
        route, m = matched
        if self.command not in ("GET", "HEAD"):
            raise HttpError(
                405,
                "invalid_request_error",
                "method_not_allowed",
                f"Method {self.command} is not allowed here",
            )
        auth = self.headers.get("Authorization", "")
        expected = f"Bearer {self.app.token}"
        if state.fault("reject_all") or not hmac.compare_digest(auth.encode(), expected.encode()):
            raise HttpError(
                401, "authentication_error", "invalid_api_key", "Invalid API key provided"
            )
        fail, throttle = state.next_api_request()
        if throttle:
            raise HttpError(
                429,
                "rate_limit_error",
                "rate_limit_exceeded",
                "Too many requests, retry later",
                headers={"Retry-After": "1"},
            )
        if fail:
            raise HttpError(500, "api_error", "internal_error", "Injected failure (fail_every)")
        store = self.app.store
        if route == "list_artifacts":
            limit, cursor = _query_limit(query)
            items = sorted(store.scan(), key=lambda a: (a.updated_at, a.id), reverse=True)
            page, more, nxt = paginate(items, lambda a: a.id, limit, cursor)
            self.send_data(
                {
                    "data": [a.to_json() for a in page],
                    "pagination": {"has_more": more, "next_cursor": nxt},
                }
            )
            return
        artifact = store.get(unquote(m[1]))
        if route == "get_artifact":
            self.send_data(artifact.to_json())
        elif route == "list_versions":
            limit, cursor = _query_limit(query)
            page_v, more, nxt = paginate(artifact.versions, lambda v: v.id, limit, cursor)
            self.send_data(
                {
                    "data": [v.to_json() for v in page_v],
                    "pagination": {"has_more": more, "next_cursor": nxt},
                }
            )
        else:
            ref = query.get("version_id", [""])[-1] or query.get("versionId", [""])[-1]
            if ref:
                version = resolve_version(artifact.versions, ref)
            elif artifact.current is None:
                raise not_found(f"Artifact '{artifact.id}' has no versions")
            else:
                version = artifact.current
            if version.file_count == 0:
                raise not_found(f"Version '{version.id}' has no files")
            location = self.app.link(artifact.id, version.id)
            self.send_bytes(302, b"", "application/json", {"Location": location})

    def send_data(self, body: dict[str, Any]) -> None:
        self.send_json(200, camelize(body) if self.app.state.fault("camel_case") else body)

    def control(self, path: str, body: bytes) -> None:
        state = self.app.state
        try:
            if path == "/_dev/stats" and self.command in ("GET", "HEAD"):
                self.send_json(200, state.stats())
            elif path == "/_dev/reset" and self.command == "POST":
                state.reset()
                self.send_json(200, state.stats())
            elif path == "/_dev/faults" and self.command in ("GET", "HEAD"):
                self.send_json(200, state.get_faults())
            elif path == "/_dev/faults" and self.command == "POST":
                try:
                    patch = json.loads(body or b"{}")
                except ValueError:
                    raise bad_request("Body must be a JSON object") from None
                if not isinstance(patch, dict):
                    raise bad_request("Body must be a JSON object")
                self.send_json(200, state.update_faults(patch))
            else:
                raise not_found(f"Unknown route: '{path}'")
        except HttpError as err:
            self.send_error_json(err)


class RangeNotSatisfiable(Exception):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One `bytes=` range as (start, end inclusive); None = serve everything (no header, or
    one we ignore, such as multiple ranges, as RFC 9110 allows)."""
    if not header:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header, re.IGNORECASE)
    if not m or (m[1] == "" and m[2] == ""):
        return None
    if m[1] == "":  # suffix: the last N bytes
        n = int(m[2])
        if n == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(0, size - n), size - 1
    start = int(m[1])
    if m[2] and int(m[2]) < start:
        return None  # syntactically invalid: ignored
    if start >= size:
        raise RangeNotSatisfiable
    end = int(m[2]) if m[2] else size - 1
    return start, min(end, size - 1)


def other_start(rng: tuple[int, int], size: int) -> tuple[int, int]:
    """For range_wrong: a range starting elsewhere than asked (one byte later; one byte
    earlier when a single byte was asked; byte 1 for byte 0), unless the object has one byte."""
    start, end = rng
    if start < end:
        return start + 1, end
    if start > 0:
        return start - 1, end
    return (1, 1) if size > 1 else rng


_BLOB_PATH = re.compile(r"/blobs/([0-9a-f]{64})/archive\.tar\.gz")


class BlobHandler(BaseHandler):
    """The object store: S3-like XML errors, presigned links, Range support."""

    def s3_error(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message></Error>\n"
        ).encode()
        self.send_bytes(status, body, "application/xml", headers)

    def read_body_and_route(self) -> None:
        self.read_body()
        state = self.app.state
        url = urlsplit(self.path)
        if not url.path.startswith("/blobs/"):
            self.s3_error(404, "NoSuchKey", "The specified key does not exist.")
            return
        state.sleep_ms("latency_ms")
        state.sleep_ms("blob_ttfb_ms")  # nothing at all is sent before it, errors included
        state.count("blob")
        m = _BLOB_PATH.fullmatch(url.path)
        if self.command not in ("GET", "HEAD"):
            self.s3_error(405, "MethodNotAllowed", "The method is not allowed.")
            return
        if "Authorization" in self.headers:
            self.s3_error(400, "InvalidArgument", "Only one auth mechanism allowed.")
            return
        query = parse_qs(url.query)
        artifact_id = query.get("artifact", [""])[-1]
        expires = query.get("expires", [""])[-1]
        sig = query.get("sig", [""])[-1]
        nonce = query.get("nonce", [""])[-1]
        if not m or not expires.isdigit():
            self.s3_error(403, "AccessDenied", "Request has invalid or missing signature.")
            return
        version_id = m[1]
        good = self.app.sign(artifact_id, version_id, int(expires), nonce)
        if not hmac.compare_digest(sig.encode(), good.encode()):
            self.s3_error(403, "SignatureDoesNotMatch", "The signature does not match.")
            return
        if time.time() >= int(expires) or state.link_expired(sig):
            self.s3_error(403, "AccessDenied", "Request has expired.")
            return
        path = self.app.store.locate(artifact_id, version_id)
        if path is None:
            self.s3_error(404, "NoSuchKey", "The specified key does not exist.")
            return
        if state.take("blob_fail"):
            self.s3_error(500, "InternalError", "Injected failure (blob_fail).")
            return
        try:
            f = path.open("rb")
        except OSError:
            self.s3_error(404, "NoSuchKey", "The specified key does not exist.")
            return
        with f:
            self.serve_file(f, version_id)

    def wanted_range(self, size: int, etag: str) -> tuple[int, int] | None:
        """The Range to answer, None for the whole body. An If-Range that is not the current
        ETag (strong comparison: a weak tag never matches, nor a date, as no Last-Modified is
        sent) means the whole body, whatever the Range (RFC 9110 13.1.5)."""
        header = self.headers.get("Range")
        if not header:
            return None
        if_range = self.headers.get("If-Range")
        if if_range is not None and if_range.strip() != etag:
            return None
        return parse_range(header, size)

    def serve_file(self, f: BinaryIO, version_id: str) -> None:
        state = self.app.state
        faults = state.get_faults()
        size = os.fstat(f.fileno()).st_size
        etag = state.etag(version_id)
        try:
            rng = None if faults["range_ignored"] else self.wanted_range(size, etag)
        except RangeNotSatisfiable:
            headers = {"Content-Range": f"bytes */{size}", "ETag": etag, "Accept-Ranges": "bytes"}
            self.s3_error(416, "InvalidRange", "The requested range is not satisfiable", headers)
            return
        if rng and faults["range_wrong"]:
            rng = other_start(rng, size)
        start, end = rng if rng else (0, size - 1)
        length = end - start + 1 if size else 0
        chunked = bool(faults["no_content_length"])
        self.send_response(206 if rng else 200)
        self.send_header("Content-Type", "application/gzip")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(length))
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("X-Request-Id", str(uuid.uuid4()))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        until = time.monotonic() + HOLD_LIMIT  # for a trickle or a stall
        budget = length
        if state.take("truncate_blob"):
            budget = length // 2
            self.close_connection = True  # the client sees EOF before Content-Length
        stall_after = int(faults["blob_stall_after"])
        stall = 0 <= stall_after < budget
        if stall:
            budget = stall_after
        f.seek(start)
        state.sending_blob(1)
        try:
            sent = self._send_body(f, budget, faults, chunked, until)
            if stall and sent == budget:
                self.hold(until)
            elif chunked and sent == length:
                self.wfile.write(b"0\r\n\r\n")  # a cut chunked body never gets its last chunk
        finally:
            state.sending_blob(-1)

    def _send_body(
        self, f: BinaryIO, budget: int, faults: dict[str, Any], chunked: bool, until: float
    ) -> int:
        """Send up to `budget` bytes from f, paced by bandwidth or blob_trickle_ms; return how
        many went out."""
        state = self.app.state
        bandwidth = int(faults["bandwidth"])
        trickle = float(faults["blob_trickle_ms"]) / 1000
        if trickle > 0:
            chunk = 1
        elif bandwidth > 0:
            # Small chunks under a bandwidth cap keep the pacing smooth (about 10 writes a second).
            chunk = min(CHUNK, max(1, bandwidth // 10))
        else:
            chunk = CHUNK
        sent = 0
        began = time.monotonic()
        while sent < budget:
            data = f.read(min(chunk, budget - sent))
            if not data:
                self.close_connection = True  # the file shrank under us: cannot honour the length
                break
            self.wfile.write(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)
            sent += len(data)
            state.add_blob_bytes(len(data))
            if trickle > 0:
                if sent < budget and (state.pause(trickle) or time.monotonic() >= until):
                    self.close_connection = True  # the server stops, or the trickle is too long
                    break
            elif bandwidth > 0 and state.pause(began + sent / bandwidth - time.monotonic()):
                self.close_connection = True  # the server stops
                break
        return sent


# --- entry point ----------------------------------------------------------------------------


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class Parser(argparse.ArgumentParser):
    """Usage mistakes in one line, like the other commands (argparse prints the usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"vm0fs dev-server: {message} (see vm0fs dev-server --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="vm0fs dev-server",
        description="Serve a local implementation of the vm0 Artifacts API from a folder.\n"
        f"Clients authenticate with --token, else $VM0_API_KEY, else {DEFAULT_TOKEN!r}.",
        epilog="examples:\n"
        "  vm0fs dev-server --data-dir /tmp/data --demo --port 8080 --token dev-token\n"
        "  VM0_API_KEY=dev-token vm0fs mount ~/vm0 --api-url http://127.0.0.1:8080",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data-dir", required=True, type=Path, help="one folder per artifact")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="API port (0 = pick a free one)")
    p.add_argument("--blob-port", type=int, default=0, help="blob port (0 = pick a free one)")
    p.add_argument("--token", help=f"API key (default: $VM0_API_KEY, else {DEFAULT_TOKEN!r})")
    p.add_argument("--demo", action="store_true", help="fill an empty or missing DIR with samples")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    p.add_argument("--rescan-after", type=float, default=0.0, metavar="SECONDS",
                   help="let one scan of DIR answer listings for this long (default 0: every "
                        "request rescans; for data dirs of thousands of artifacts)")
    f = p.add_argument_group("faults (also settable at runtime via POST /_dev/faults)")
    f.add_argument("--latency-ms", type=float, default=0, help="delay every request")
    f.add_argument(
        "--blob-ttfb-ms",
        type=float,
        default=0,
        metavar="MS",
        help="time to first byte of every blob answer",
    )
    f.add_argument("--fail-every", type=int, default=0, metavar="N", help="every Nth is a 500")
    f.add_argument("--throttle-every", type=int, default=0, metavar="N", help="every Nth is a 429")
    f.add_argument(
        "--truncate-blob",
        type=int,
        default=0,
        metavar="N",
        help="cut the next N blob bodies short (-1 = all)",
    )
    f.add_argument(
        "--blob-fail",
        type=int,
        default=0,
        metavar="N",
        help="answer the next N blob requests with 500 (-1 = all)",
    )
    f.add_argument(
        "--bandwidth",
        type=int,
        default=0,
        metavar="BYTES_PER_S",
        help="cap per blob response, so per connection (0 = unlimited)",
    )
    f.add_argument(
        "--link-ttl",
        type=int,
        default=DEFAULT_LINK_TTL,
        metavar="SECONDS",
        help="download link lifetime (0 = already expired)",
    )
    f.add_argument(
        "--etag-change-after",
        type=int,
        default=0,
        metavar="N",
        help="after N blob requests every ETag changes (0 = never)",
    )
    f.add_argument(
        "--link-expire-after",
        type=int,
        default=0,
        metavar="N",
        help="the Nth and later requests on a download link answer 403 (0 = never)",
    )
    f.add_argument(
        "--blob-stall-after",
        type=int,
        default=-1,
        metavar="BYTES",
        help="blob bodies stop after BYTES, the connection held open (-1 = off)",
    )
    f.add_argument(
        "--blob-trickle-ms",
        type=float,
        default=0,
        metavar="MS",
        help="blob bodies go out a byte at a time, MS apart (0 = off)",
    )
    f.add_argument(
        "--api-stall",
        type=int,
        default=0,
        metavar="N",
        help="the next N /v1 requests are never answered (-1 = all)",
    )
    f.add_argument("--camel-case", action="store_true", help="camelCase field names")
    f.add_argument(
        "--range-ignored", action="store_true", help="answer a Range with 200 and the whole body"
    )
    f.add_argument(
        "--range-wrong", action="store_true", help="answer a Range with a 206 starting elsewhere"
    )
    f.add_argument(
        "--no-content-length",
        action="store_true",
        help="send blob bodies chunked, without Content-Length",
    )
    f.add_argument("--reject-all", action="store_true", help="answer every /v1 request with 401")
    return p


def _make_server(host: str, port: int, handler: type[BaseHandler], app: App) -> Server:
    cls = Server6 if ":" in host else Server
    server = cls((host, port), handler)
    server.app = app
    return server


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    data_dir: Path = args.data_dir
    if args.demo:
        from vm0fs.samples import DEMO_ARTIFACTS, write_demo_data

        if not data_dir.exists() or (data_dir.is_dir() and not any(data_dir.iterdir())):
            write_demo_data(data_dir)
        elif data_dir.is_dir() and not all((data_dir / n).is_dir() for n in DEMO_ARTIFACTS):
            print(f"vm0fs dev-server: {data_dir} is not empty, so --demo serves it as it is, "
                  "without the samples (give an empty or new folder for them)", file=sys.stderr)
    if not data_dir.is_dir():
        print(f"vm0fs dev-server: data dir not found: {data_dir} (create it, or add --demo "
              "to fill a new one with samples)", file=sys.stderr)
        return 2
    token = args.token or os.environ.get("VM0_API_KEY") or DEFAULT_TOKEN
    if not args.token and os.environ.get("VM0_API_KEY"):
        print("vm0fs dev-server: the token is the value of $VM0_API_KEY (give --token to "
              "choose another)", file=sys.stderr)
    try:
        state = State({k: getattr(args, k) for k in FAULT_DEFAULTS})
    except HttpError as err:
        print(f"vm0fs dev-server: {err.message}", file=sys.stderr)
        return 2
    app = App(Store(data_dir, args.rescan_after), state, token)
    BaseHandler.verbose = args.verbose
    try:
        api = _make_server(args.host, args.port, ApiHandler, app)
        blobs = _make_server(args.host, args.blob_port, BlobHandler, app)
    except OSError as exc:
        print(f"vm0fs dev-server: cannot listen: {exc}", file=sys.stderr)
        return 1
    host = _url_host(args.host)
    app.blob_origin = f"http://{host}:{blobs.server_address[1]}"
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    threads = [
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        for s in (api, blobs)
    ]
    for t in threads:
        t.start()
    print(
        f"vm0fs dev-server: listening on http://{host}:{api.server_address[1]} "
        f"(blobs on {app.blob_origin})",
        flush=True,
    )
    # A timed wait keeps the main thread responsive to signals.
    while not stop.wait(0.5):
        pass
    state.stopping.set()  # ends the waits of request threads; none of them is waited for
    for s in (api, blobs):
        s.shutdown()
        s.server_close()
    return 0
