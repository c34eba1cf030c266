"""Async client for the vm0 Artifacts HTTP API (httpx under trio).

Facts this code is built around (how the real service behaves beyond its reference page):
- every field comes in snake_case (old service) or camelCase (new service);
- cursor pagination can repeat or skip items, so walks de-duplicate and are bounded;
- /download answers 302 to a presigned object-store URL that must never see the API key;
- object stores answer Range requests, which lets a broken download resume.
"""

from __future__ import annotations

import email.utils
import errno
import logging
import math
import os
import random
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
import trio
import xxhash

from vm0fs import __version__
from vm0fs.errors import ApiError, NotFound, Unauthorized, Unavailable

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.vm0.ai"
PAGE_LIMIT = 100  # the service's maximum page size
MAX_PAGES = 10_000
CHUNK_SIZE = 256 * 1024
HOLD_TIME = 0.2  # seconds a download holds bytes back to make a whole chunk
# Bounded waits (the README's "Failure behaviour" lists them):
CONNECT_TIMEOUT = 5.0  # to open a connection
REQUEST_TIMEOUT = 10.0  # for an answer's headers, and for a whole JSON answer
SPEED_LIMIT, SPEED_TIME = 16 << 10, 10.0  # a download brings 16 KiB every 10 s, or is retried
PROGRESS_RESET = 1 << 20  # an attempt that brought this much, or a quarter of what was left,
# gives the next a fresh retry budget
# Ranged downloads: an archive bigger than one part comes down as parts of PART_SIZE bytes,
# each its own GET on its own connection, PARTS_IN_FLIGHT at a time (those running and those
# waiting their turn to be handed over: what is held in memory is at most that many parts).
PART_SIZE = 4 << 20
PARTS_IN_FLIGHT = 12
# Parts start only when the first answer's body comes slower than FAST_STREAM bytes a second
# (measured over its first RATE_PROBE bytes or PROBE_TIME seconds): a stream faster than one
# core inflates gains nothing from more, and they cost the machine (a server on loopback).
FAST_STREAM = 200_000_000
RATE_PROBE = 1 << 20
PROBE_TIME = 0.1
MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_T = TypeVar("_T", "Artifact", "Version")


@dataclass(frozen=True, slots=True)
class Version:
    id: str
    artifact_id: str
    size: int
    file_count: int
    message: str | None
    created_by: str | None
    created_at: float  # unix seconds, 0.0 if absent or unparseable


@dataclass(frozen=True, slots=True)
class Artifact:
    id: str
    name: str
    current_version_id: str | None
    size: int
    file_count: int
    created_at: float
    updated_at: float
    current_version: Version | None


@dataclass(frozen=True, slots=True)
class Page(Generic[_T]):
    """One page of a listing, as parsed."""

    items: list[_T]
    cursor: str | None  # where the next page starts; None: the walk ends here


# --------------------------------------------------------------------------- parsing


def _field(obj: dict[str, Any], snake: str, camel: str | None = None) -> Any:
    """The value of a field under either spelling; a non-null spelling wins."""
    value = obj.get(snake)
    if value is None and camel is not None:
        value = obj.get(camel)
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, float) and math.isfinite(value):
        return max(int(value), 0)
    if isinstance(value, str):
        try:
            return max(int(value.strip()), 0)
        except ValueError:
            return 0
    return 0


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _id(value: Any) -> str | None:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


_LONG_FRACTION = re.compile(r"(\.\d{6})\d+")


def _parse_time(value: Any) -> float:
    """ISO-8601 (Z, offsets, any fraction) or epoch seconds -> unix seconds; 0.0 if unusable."""
    if isinstance(value, bool) or value is None:
        return 0.0
    if isinstance(value, int | float):
        secs = float(value)
        if not math.isfinite(secs):
            return 0.0
        return secs / 1000.0 if secs > 1e11 else secs  # epoch milliseconds
    if not isinstance(value, str):
        return 0.0
    text = value.strip()
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    text = _LONG_FRACTION.sub(r"\1", text)  # nanoseconds: datetime keeps microseconds only
    try:
        stamp = datetime.fromisoformat(text)
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)  # the service speaks UTC
        return stamp.timestamp()
    except (ValueError, OverflowError, OSError):
        return 0.0


def _parse_version(raw: Any, artifact_id: str, where: str) -> Version:
    if not isinstance(raw, dict):
        raise ApiError(f"{where}: expected a version object, got {type(raw).__name__}")
    vid = _id(raw.get("id"))
    if vid is None:
        raise ApiError(f"{where}: version object has no 'id'")
    return Version(
        id=vid,
        artifact_id=_id(_field(raw, "artifact_id", "artifactId")) or artifact_id,
        size=_int(raw.get("size")),
        file_count=_int(_field(raw, "file_count", "fileCount")),
        message=_opt_str(raw.get("message")),
        created_by=_opt_str(_field(raw, "created_by", "createdBy")),
        created_at=_parse_time(_field(raw, "created_at", "createdAt")),
    )


def _parse_artifact(raw: Any, where: str) -> Artifact:
    if not isinstance(raw, dict):
        raise ApiError(f"{where}: expected an artifact object, got {type(raw).__name__}")
    aid = _id(raw.get("id"))
    if aid is None:
        raise ApiError(f"{where}: artifact object has no 'id'")
    current_id = _id(_field(raw, "current_version_id", "currentVersionId"))
    size = _int(raw.get("size"))
    file_count = _int(_field(raw, "file_count", "fileCount"))
    current = None
    raw_current = _field(raw, "current_version", "currentVersion")
    if isinstance(raw_current, dict):
        current = _parse_version(raw_current, aid, where)
        if current_id is None:
            current_id = current.id
        if current.id == current_id:
            # The artifact's own totals can lag behind; the version's are authoritative.
            size, file_count = current.size, current.file_count
        else:
            current = None  # describes some other version: do not pair it with this id
    return Artifact(
        id=aid,
        name=raw.get("name") if isinstance(raw.get("name"), str) else "",
        current_version_id=current_id,
        size=size,
        file_count=file_count,
        created_at=_parse_time(_field(raw, "created_at", "createdAt")),
        updated_at=_parse_time(_field(raw, "updated_at", "updatedAt")),
        current_version=current,
    )


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1")
    return value is True or (isinstance(value, int) and value != 0)


def _segment(value: str) -> str:
    """A URL-quoted path segment; '.' and '..' are escaped so URL normalisation keeps them."""
    if not value:
        raise NotFound("empty artifact id")
    quoted = quote(value, safe="")
    return quoted.replace(".", "%2E") if quoted in (".", "..") else quoted


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now (delta-seconds or HTTP-date); None if absent or bad."""
    if not value:
        return None
    text = value.strip()
    try:
        secs = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        secs = when.timestamp() - time.time()  # an HTTP-date is wall-clock time
    return max(0.0, secs) if math.isfinite(secs) else None


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)


def _content_length(resp: httpx.Response) -> int | None:
    value = resp.headers.get("content-length", "").strip()
    return int(value) if value.isdigit() else None


class _Stalled(Exception):
    """The body brought fewer than the low-speed limit in the low-speed time."""


async def _raw_chunks(resp: httpx.Response, size: int, speed_limit: int = 1, speed_time: float = 0,
                      ) -> AsyncIterator[bytes]:
    """The body as sent (no Content-Encoding decoding, so Range offsets match), in chunks of
    about `size` bytes (or what came in the last moment, on a slow link). Bytes already
    received are handed over before a break is raised, so a resume never fetches them again
    (httpx's own chunker would drop them).

    Like curl's --speed-limit/--speed-time, a body that takes longer than `speed_time` seconds
    to bring each next `speed_limit` bytes raises _Stalled (a stall or a trickle)."""
    if resp.is_stream_consumed:  # already read (e.g. a mock built from bytes)
        for i in range(0, len(resp.content), size):
            yield resp.content[i : i + size]
        return
    pieces: list[bytes] = []
    held = total = marked = 0
    mark = held_since = trio.current_time()
    broke: BaseException | None = None
    try:
        async with aclosing(resp.aiter_raw()) as raw:
            while True:
                timeout = mark + speed_time - trio.current_time() if speed_time else math.inf
                with trio.move_on_after(max(timeout, 0)) as scope:
                    try:
                        piece = await anext(raw)
                    except StopAsyncIteration:
                        break
                if scope.cancelled_caught:
                    raise _Stalled(f"fewer than {speed_limit} bytes in {speed_time:g} s")
                now = trio.current_time()
                total += len(piece)
                if total - marked >= speed_limit:
                    mark, marked = now, total
                if not pieces:
                    held_since = now
                pieces.append(piece)
                held += len(piece)
                if held >= size or now - held_since >= HOLD_TIME:
                    yield b"".join(pieces)
                    pieces, held = [], 0
    except (httpx.TransportError, _Stalled) as exc:
        broke = exc
    if held:
        yield b"".join(pieces)
    if broke is not None:
        raise broke


def _where_blob(url: httpx.URL) -> str:
    # The query of a presigned URL is a credential: only host and path may be shown.
    return f"GET {url.host}{url.path}"


def _hopeless(exc: BaseException) -> str | None:
    """Why a connection failure cannot heal by retrying for a few seconds (nothing listens at
    that port, the host name does not exist), or None. Found in the errno behind it."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        error = todo.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, socket.gaierror) and error.errno in (socket.EAI_NONAME,):
            return "no such host"
        if isinstance(error, OSError) and error.errno == errno.ECONNREFUSED:
            return "connection refused (nothing listens there)"
        tls = _tls_failure(error)
        if tls:
            return tls
        if isinstance(error, BaseExceptionGroup):
            todo.extend(error.exceptions)
        todo.extend(e for e in (error.__cause__, error.__context__) if e is not None)
    return None


# What OpenSSL says when the other end answers a TLS hello with something else (plain HTTP).
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST",
                      "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL"})


def _tls_failure(error: BaseException) -> str | None:
    """Why a TLS handshake cannot succeed on another attempt, or None."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return (f"its TLS certificate is not accepted ({error.verify_message}): fix the "
                "server's certificate, or point SSL_CERT_FILE at the CA that signed it")
    if isinstance(error, ssl.SSLError) and error.reason in _NOT_TLS:
        return "the server does not speak TLS there: for a plain-HTTP server, use http://"
    return None


def _body_kind(resp: httpx.Response) -> str:
    kind = resp.headers.get("content-type", "").split(";", 1)[0].strip()
    return kind or "no content type"


def _a_body(resp: httpx.Response) -> str:
    """'an application/xml body', 'a text/html body', 'a body with no content type'."""
    kind = _body_kind(resp)
    if kind == "no content type":
        return "a body with no content type"
    return f"{'an' if kind[0].lower() in 'aeiou' else 'a'} {kind} body"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _RedactQueryFilter(logging.Filter):
    """httpx logs every request's full URL at INFO; drop the query (a presigned signature)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(
            isinstance(a, httpx.URL) and a.query for a in record.args
        ):
            record.args = tuple(
                f"{a.scheme}://{a.netloc.decode('ascii', 'replace')}{a.path}?<redacted>"
                if isinstance(a, httpx.URL) and a.query
                else a
                for a in record.args
            )
        return True


_httpx_log = logging.getLogger("httpx")
if not any(isinstance(f, _RedactQueryFilter) for f in _httpx_log.filters):
    _httpx_log.addFilter(_RedactQueryFilter())


# --------------------------------------------------------------------------- client


class _Retry(Exception):
    """A failure worth another attempt (5xx, 429, transport error, expired link, short body)."""

    def __init__(
        self, cause: str, *, retry_after: float | None = None, error: ApiError | None = None
    ) -> None:
        super().__init__(cause)
        self.cause = cause
        self.retry_after = retry_after
        self.error = error


class _Fallback(Exception):
    """The answer asks for another request at once, without a backoff (a mangled Range)."""


class _NoRanges(Exception):
    """A ranged part was not answered with exactly its range of the same object: the rest of
    the archive comes down as one stream."""


@dataclass(slots=True)
class _Links:
    """The presigned link the parts of one download share: one asks the API for a new one when
    the blob host refuses it, the others wait and take it."""

    link: httpx.URL | None = None
    worked: httpx.URL | None = None  # the last link the blob host answered with bytes
    lock: trio.Lock = field(default_factory=trio.Lock)


@dataclass(slots=True)
class _Download:
    """Where a download (or one ranged part of it) stands, across attempts."""

    received: int = 0  # bytes of this range already yielded to the caller
    start: int = 0  # where the range begins in the archive
    end: int | None = None  # its last byte; None: to the end of the archive
    total: int | None = None  # full archive size, when announced
    etag: str | None = None  # ETag of the first answer: pins the object across resumes
    validator: str | None = None  # what we send as If-Range (strong ETag or Last-Modified)
    link: httpx.URL | None = None  # presigned URL; None means "ask the API for one"
    refused: httpx.URL | None = None  # the link the blob host refused last
    replaced: httpx.URL | None = None  # the last link given up as expired (asked again at once)
    worked: httpx.URL | None = None  # the last link the blob host answered with bytes
    shared: _Links | None = None
    part: bool = False  # one of several parts: anything but its exact range raises _NoRanges
    plain: bool = False  # send no Range: the server mangles them (skip what we hold)
    hasher: Any = None  # xxh3 of every byte before start + received: a re-sent prefix is checked
    on_answer: Callable[[], None] | None = None  # called once, at the first usable answer

    @property
    def at(self) -> int:
        """The next byte wanted, as an archive offset."""
        return self.start + self.received


class _Part:
    """One ranged part: its bytes wait in memory for their turn to be handed over."""

    def __init__(self, st: _Download) -> None:
        self.st = st
        self.chunks: deque[bytes] = deque()
        self.done = False
        self.error: Exception | None = None
        self._event = trio.Event()

    def wake(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()


class ApiClient:
    """Client for the Artifacts API. Use as ``async with ApiClient(...) as api:``."""

    request_count: int  # HTTP requests sent, to every host

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        retry_time: float = 30.0,
        timeout: float = REQUEST_TIMEOUT,
        speed_limit: int = SPEED_LIMIT,
        speed_time: float = SPEED_TIME,
        transport: httpx.AsyncBaseTransport | None = None,
        user_agent: str = f"vm0fs/{__version__}",
        backoff_base: float = 0.25,
        backoff_cap: float = 5.0,
        max_pages: int = MAX_PAGES,
        chunk_size: int = CHUNK_SIZE,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = trio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        key = (api_key or "").strip()
        if key and not (key.isascii() and key.isprintable()):
            raise Unauthorized("the API key contains characters that cannot be sent in a header")
        # The key lives only in this per-request header, never in the client's defaults, so
        # requests to presigned URLs (other hosts) cannot carry it.
        self._auth = {"Authorization": f"Bearer {key}"} if key else {}
        self._key = key
        self._base_url = base_url.rstrip("/")
        self._retry_time = max(0.0, retry_time)
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._max_pages = max(1, max_pages)
        self._chunk_size = max(1, chunk_size)
        self._timeout = timeout
        self._speed_limit, self._speed_time = max(1, speed_limit), speed_time
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.request_count = 0
        self._answered = False  # the API has answered once: a refused connection may heal
        self._client = httpx.AsyncClient(
            base_url=self._base_url,
            headers={"User-Agent": user_agent},
            timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT)),
            transport=transport,
            follow_redirects=False,  # redirects are followed by hand, without the key
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),  # stateless
            event_hooks={"request": [self._count_request]},
        )

    @classmethod
    def from_env(cls, base_url: str | None = None, **kw: Any) -> ApiClient:
        """A client configured from VM0_API_URL and VM0_API_KEY."""
        key = os.environ.get("VM0_API_KEY", "").strip()
        if not key:
            raise Unauthorized("VM0_API_KEY is not set: export your vm0 API key to mount artifacts")
        url = base_url or os.environ.get("VM0_API_URL", "").strip() or DEFAULT_BASE_URL
        return cls(url, key, **kw)

    def __repr__(self) -> str:
        return f"ApiClient(base_url={self._base_url!r})"

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _count_request(self, request: httpx.Request) -> None:
        self.request_count += 1

    # ------------------------------------------------------------------ public calls

    async def list_artifacts(self, first: Page[Artifact] | None = None,
                             on_more: Callable[[], None] | None = None) -> list[Artifact]:
        """Every artifact. `first`: the first page, already fetched (see `artifacts_page`);
        `on_more` is called when the walk needs another page."""
        return await self._list("/v1/artifacts", _parse_artifact, first, on_more)

    async def artifacts_page(self, cursor: str | None = None) -> Page[Artifact]:
        """One page of the artifact listing: one request."""
        return await self._page("/v1/artifacts", _parse_artifact, cursor)

    async def list_versions(self, artifact_id: str,
                            on_more: Callable[[], None] | None = None) -> list[Version]:
        path = f"/v1/artifacts/{_segment(artifact_id)}/versions"
        return await self._list(path, lambda raw, where: _parse_version(raw, artifact_id, where),
                                None, on_more)

    async def get_artifact(self, artifact_id: str) -> Artifact:
        path = f"/v1/artifacts/{_segment(artifact_id)}"
        body = await self._get_json(path)
        if isinstance(body, dict) and "id" not in body and isinstance(body.get("data"), dict):
            body = body["data"]  # tolerate an enveloped answer
        return _parse_artifact(body, f"GET {path}")

    async def download(
        self, artifact_id: str, version_id: str | None = None
    ) -> AsyncIterator[bytes]:
        """The archive's bytes, in order, each exactly once, as one stream; resumes broken
        transfers. Close it (``contextlib.aclosing``) when stopping early, so the connection
        is freed. `download_to` fetches big archives in parallel parts."""
        path, params = self._download_target(artifact_id, version_id)
        st = _Download(hasher=xxhash.xxh3_64())
        async with aclosing(self._chunks(st, path, params)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def download_to(self, artifact_id: str, version_id: str | None,
                          deliver: Callable[[bytes], Awaitable[bool]]) -> None:
        """Hand the archive's bytes to `deliver` in order, each exactly once, until it returns
        False or the archive ends. The first GET asks for the first PART_SIZE bytes; when the
        answer is exactly that range of a bigger object, the rest comes as ranged GETs, up to
        PARTS_IN_FLIGHT at once, each retried alone, over the same presigned link (a new one
        from the API when it expires). Whatever a server does to ranges (ignores them, sends
        others, drops Content-Length, changes its ETag), the download goes on as one stream
        from the bytes handed over, which are never sent twice."""
        path, params = self._download_target(artifact_id, version_id)
        prefix = xxhash.xxh3_64()  # of every byte handed over: a re-sent prefix is checked
        links = _Links()
        head = _Download(end=PART_SIZE - 1, shared=links, hasher=prefix)
        parts: list[_Part] = []
        handed = 0
        stopped = False
        fallback: _NoRanges | None = None
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            # The head is one of those in flight; a slot comes back as a part is handed over.
            slots = trio.Semaphore(PARTS_IN_FLIGHT - 1)

            async def launch() -> None:
                for part in parts:
                    await slots.acquire()
                    nursery.start_soon(self._fill, part, path, params)

            answered = math.inf

            def plan() -> None:  # at the head's first answer, before any of its bytes
                nonlocal answered
                answered = trio.current_time()
                total, end = head.total, head.end
                if total is None or end is None or end + 1 >= total:
                    return  # one stream: a small archive, or a server that sent the whole
                head.part = True
                for start in range(end + 1, total, PART_SIZE):
                    parts.append(_Part(_Download(
                        start=start, end=min(start + PART_SIZE, total) - 1, total=total,
                        etag=head.etag, validator=head.validator, shared=links,
                        part=True)))  # the link: the shared one when the part starts

            head.on_answer = plan
            try:
                launched = False

                def decide(probed: bool) -> None:
                    """Start the parts, or go on as one stream if this one is fast."""
                    nonlocal launched
                    elapsed = trio.current_time() - answered
                    if launched or not parts or not (
                            probed or head.received >= RATE_PROBE or elapsed >= PROBE_TIME):
                        return
                    launched = True
                    if head.received >= FAST_STREAM * elapsed and not probed:
                        parts.clear()  # one stream will do: the head goes on to the end
                        head.part, head.end = False, None
                    else:
                        nursery.start_soon(launch)

                async with aclosing(self._chunks(head, path, params)) as chunks:
                    async for chunk in chunks:
                        handed += len(chunk)
                        decide(False)
                        if not await deliver(chunk):
                            stopped = True
                            break
                if not stopped:
                    decide(True)  # the head's range came whole before the probe ended: parts
                if not stopped:
                    for part in parts:
                        while True:
                            if part.chunks:
                                chunk = part.chunks.popleft()
                                handed += len(chunk)
                                prefix.update(chunk)
                                if not await deliver(chunk):
                                    stopped = True
                                    break
                            elif part.error is not None:
                                raise part.error
                            elif part.done:
                                break
                            else:
                                await part.wait()
                        if stopped:
                            break
                        slots.release()
            except _NoRanges as exc:
                fallback = exc
            except Exception as exc:  # noqa: BLE001 - raised as itself, not in a group
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if stopped or fallback is None:
            return
        log.info("%s: %s; the rest (from byte %d) comes as one stream", _where_blob(
            links.link) if links.link else f"GET {path}", fallback, handed)
        st = _Download(received=handed, total=head.total, etag=head.etag,
                       validator=head.validator, link=links.link, hasher=prefix)
        async with aclosing(self._chunks(st, path, params)) as chunks:
            async for chunk in chunks:
                if not await deliver(chunk):
                    return

    async def _fill(self, part: _Part, path: str, params: dict[str, str] | None) -> None:
        """Fetch one part into memory (it waits there for its turn to be handed over)."""
        try:
            async with aclosing(self._chunks(part.st, path, params)) as chunks:
                async for chunk in chunks:
                    part.chunks.append(chunk)
                    part.wake()
            part.done = True
        except Exception as exc:  # noqa: BLE001 - raised when the part's turn comes
            part.error = exc
        part.wake()

    def _download_target(self, artifact_id: str,
                         version_id: str | None) -> tuple[str, dict[str, str] | None]:
        path = f"/v1/artifacts/{_segment(artifact_id)}/download"
        params = {"version_id": version_id, "versionId": version_id} if version_id else None
        return path, params

    async def _chunks(self, st: _Download, path: str,
                      params: dict[str, str] | None) -> AsyncIterator[bytes]:
        """The bytes of `st`'s range (to the archive's end when it has none), each once."""
        what = f"GET {path}"
        deadline = self._clock() + self._retry_time
        failures = 0
        while True:
            before = st.received
            try:
                resp = await self._open_download(st, path, params)
                if resp is None:
                    return  # a 416 told us we already hold the whole archive
                try:
                    skip, check = self._check_resume(resp, st)
                    if st.on_answer is not None:
                        st.on_answer()
                        st.on_answer = None
                    # A range answered past its end is cut there.
                    asked = st.end
                    want = math.inf if st.end is None else st.end + 1 - st.at
                    async with aclosing(_raw_chunks(resp, self._chunk_size, self._speed_limit,
                                                    self._speed_time)) as chunks:
                        while want > 0:
                            try:
                                chunk = await anext(chunks)
                            except StopAsyncIteration:
                                break
                            except httpx.TransportError as exc:
                                raise _Retry(f"body broke: {_describe(exc)}") from exc
                            except _Stalled as exc:
                                raise _Retry(f"download stalled: {exc}") from exc
                            if skip:  # a 200 to a resume, or a 206 starting early
                                dropped = min(skip, len(chunk))
                                if check is not None:
                                    check.update(chunk[:dropped])
                                chunk, skip = chunk[dropped:], skip - dropped
                                if not skip and check is not None:
                                    self._check_prefix(check, st)
                            chunk = chunk[:want] if len(chunk) > want else chunk
                            if chunk:
                                st.received += len(chunk)
                                want -= len(chunk)
                                if st.hasher is not None:
                                    st.hasher.update(chunk)
                                yield chunk
                finally:
                    await resp.aclose()
                if skip:
                    raise _Retry("body ended before the resume point")
                if asked is not None and st.at == asked + 1 and (st.end is None
                                                                 or st.end > asked):
                    continue  # the range asked for came whole, and now more is wanted
                last = st.end if st.end is not None else (
                    st.total - 1 if st.total is not None else None)
                if last is not None and st.at <= last:
                    raise _Retry(f"body ended at byte {st.at} of {last + 1}")
                if st.total is not None and st.at > st.total:
                    raise ApiError(f"{what}: got {st.at} bytes, {st.total} announced")
                return
            except _Fallback:
                continue
            except _Retry as retry:
                left = st.end + 1 - st.start if st.end is not None else (
                    st.total - st.start if st.total is not None else PROGRESS_RESET)
                left -= before
                if st.received - before >= min(PROGRESS_RESET, max(left // 4, 1)):
                    # Real progress (1 MiB, or a quarter of what was left): a long download gets
                    # a fresh budget after each hiccup. A trickle does not: it fails in time.
                    deadline, failures = self._clock() + self._retry_time, 0
                failures += 1
                await self._backoff(what, retry, failures, deadline)

    # ------------------------------------------------------------------ plumbing

    async def _list(self, path: str, parse: Callable[[Any, str], _T], first: Page[_T] | None,
                    on_more: Callable[[], None] | None) -> list[_T]:
        """Every item of a paginated listing, de-duplicated by id, in first-seen order. The
        pages are fetched one after another: each needs the cursor of the one before."""
        items: dict[str, _T] = {}
        cursors: set[str] = set()
        page = first if first is not None else await self._page(path, parse, None)
        pages = 1
        while True:
            for item in page.items:
                items.setdefault(item.id, item)
            cursor = page.cursor
            if cursor is None:
                break
            if cursor in cursors:
                log.debug("GET %s: cursor repeated, stopping", path)
                break
            if pages >= self._max_pages:
                log.warning("GET %s: stopped after %d pages", path, self._max_pages)
                break
            cursors.add(cursor)
            if on_more is not None:
                on_more()
            page = await self._page(path, parse, cursor)
            pages += 1
        return list(items.values())

    async def _page(self, path: str, parse: Callable[[Any, str], _T],
                    cursor: str | None) -> Page[_T]:
        where = f"GET {path}"
        params = {"limit": str(PAGE_LIMIT)}
        if cursor is not None:
            params["cursor"] = cursor
        body = await self._get_json(path, params)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise ApiError(f"{self._base_url} does not answer like the vm0 Artifacts API "
                           f"({where}: the response has no 'data' list)")
        items = [parse(raw, where) for raw in data]
        if not data:
            return Page(items, None)  # an empty page ends the walk even if has_more says otherwise
        page = body.get("pagination")
        if not isinstance(page, dict):
            page = body
        if not _truthy(_field(page, "has_more", "hasMore")):
            return Page(items, None)
        cursor = _id(_field(page, "next_cursor", "nextCursor"))
        if cursor is None:
            log.debug("%s: has_more without a cursor, stopping", where)
        return Page(items, cursor)

    async def _get_json(self, path: str, params: dict[str, str] | None = None) -> Any:
        where = f"GET {path}"  # without the query
        deadline = self._clock() + self._retry_time
        failures = 0
        while True:
            try:
                # One attempt waits at most what the budget has left (and never less than a
                # second): an API that accepts connections and never answers fails in time.
                timeout = min(self._timeout, max(deadline - self._clock(), 1.0))
                with trio.move_on_after(timeout):
                    return await self._get_json_once(where, path, params)
                raise _Retry(f"no answer within {timeout:.0f} s")
            except _Retry as retry:
                failures += 1
                await self._backoff(where, retry, failures, deadline)

    async def _get_json_once(self, where: str, path: str, params: dict[str, str] | None) -> Any:
        try:
            resp = await self._client.get(
                path, params=params, headers={"Accept": "application/json", **self._auth}
            )
        except httpx.UnsupportedProtocol as exc:  # a bad base URL: retrying cannot help
            raise ApiError(f"{where}: {_describe(exc)}") from exc
        except httpx.TransportError as exc:
            self._fail_fast(where, exc)
            raise _Retry(_describe(exc)) from exc
        if not resp.is_success:
            raise self._api_failure(resp, where)
        try:
            body = resp.json()
        except ValueError:
            raise self._not_the_api(resp, where) from None
        self._answered = True
        return body

    def _not_the_api(self, resp: httpx.Response, where: str) -> ApiError:
        """An answer no Artifacts API gives: the URL points at some other server."""
        return ApiError(f"{self._base_url} does not answer like the vm0 Artifacts API ({where} "
                        f"gave {_a_body(resp)})", status=resp.status_code,
                        request_id=resp.headers.get("x-request-id"))

    def _fail_fast(self, where: str, exc: httpx.TransportError) -> None:
        """Give up at once on a connection that cannot heal, unless the API answered before
        (then it is restarting, and retries are worth it)."""
        reason = None if self._answered else _hopeless(exc)
        if reason:
            raise Unavailable(f"{where}: {reason}") from exc

    async def _open_download(
        self, st: _Download, path: str, params: dict[str, str] | None
    ) -> httpx.Response | None:
        """A streaming 200/206 answer for the archive, following redirects without the key.

        Returns None when the server says the range past our bytes is empty (we are done).
        Parts that share links ask the API for a new one one at a time: the first to find its
        link refused asks; the others take what it got."""
        if st.link is None and st.shared is not None:
            async with st.shared.lock:
                if st.shared.link is not None and st.shared.link != st.refused:
                    st.link = st.shared.link
                else:
                    resp = await self._open_answer(st, path, params)
                    st.shared.link = st.link
                    return resp
        return await self._open_answer(st, path, params)

    async def _open_answer(
        self, st: _Download, path: str, params: dict[str, str] | None
    ) -> httpx.Response | None:
        for _ in range(MAX_REDIRECTS + 1):
            headers = {"Accept-Encoding": "identity"}  # byte offsets must be the stored bytes
            if not st.plain and (st.at or st.end is not None):
                headers["Range"] = f"bytes={st.at}-{'' if st.end is None else st.end}"
                if st.validator:
                    headers["If-Range"] = st.validator
            if st.link is None:
                from_api, where = True, f"GET {path}"
                request = self._client.build_request(
                    "GET", path, params=params, headers={**headers, **self._auth}
                )
            else:
                from_api, where = False, _where_blob(st.link)
                request = self._client.build_request("GET", st.link, headers=headers)
            try:
                resp = await self._client.send(request, stream=True)
            except httpx.UnsupportedProtocol as exc:  # e.g. a Location that is not http(s)
                raise ApiError(f"{where}: {_describe(exc)}") from exc
            except httpx.TransportError as exc:
                if from_api:
                    self._fail_fast(where, exc)
                cause = _describe(exc)
                query = request.url.query.decode("ascii", "replace")
                if query:  # a presigned query is a credential, wherever it shows up
                    cause = cause.replace(query, "<redacted>")
                raise _Retry(f"{where}: {cause}") from exc
            self._answered = self._answered or from_api
            status = resp.status_code
            if status in (200, 206):
                if not from_api:
                    st.worked = st.link
                    if st.shared is not None:
                        st.shared.worked = st.link
                return resp
            try:
                if status in _REDIRECTS:
                    location = resp.headers.get("location")
                    if not location:
                        raise ApiError(f"{where}: redirect without Location", status=status)
                    try:
                        st.link = resp.url.join(location)
                    except httpx.InvalidURL:
                        raise ApiError(f"{where}: unusable redirect", status=status) from None
                    continue
                if from_api:
                    await resp.aread()
                    raise self._api_failure(resp, where)
                # The object store: never show its body (S3 errors echo the signature).
                if status in (400, 401, 403):
                    # An expired or rejected presigned link: ask for a new one. One that has
                    # brought bytes has expired: ask at once. A new one refused before it has
                    # brought any waits its backoff (a host that refuses every link).
                    # Once per link: one handed out again (an API that caches them) and
                    # refused again backs off, and the retry budget ends it.
                    expired = (st.link != st.replaced
                               and st.link in (st.worked, st.shared.worked if st.shared else None))
                    st.refused, st.link = st.link, None
                    if expired:
                        log.info("%s: HTTP %d, the presigned link has expired: asking for a "
                                 "new one", where, status)
                        st.replaced = st.refused
                        raise _Fallback()
                    raise _Retry(f"{where}: HTTP {status}, presigned link refused")
                if status == 404:
                    raise NotFound(f"{where}: archive not found", status=status)
                if status == 416:
                    if st.part:
                        raise _NoRanges(f"a part asked from byte {st.at} was answered 416")
                    match = _UNSATISFIED_RANGE.match(resp.headers.get("content-range", ""))
                    if match and int(match.group(1)) == st.at and not st.part:
                        return None
                if status == 429 or status >= 500:
                    raise _Retry(
                        f"{where}: HTTP {status}",
                        retry_after=_retry_after(resp.headers.get("retry-after")),
                    )
                raise ApiError(f"{where}: unexpected answer", status=status)
            finally:
                await resp.aclose()
        raise ApiError(f"GET {path}: more than {MAX_REDIRECTS} redirects")

    def _check_resume(self, resp: httpx.Response, st: _Download) -> tuple[int, Any]:
        """Validate a 200/206 against what we already hold: how many bytes to skip, and a
        hasher when those bytes must be checked against the ones already handed over (the
        object came again under another ETag). Raises _NoRanges for a part that is not
        answered with exactly its range, _Fallback to ask again without Range."""
        etag = resp.headers.get("etag")
        at = st.at
        if resp.status_code == 206:
            content_range = resp.headers.get("content-range", "")
            match = _CONTENT_RANGE.match(content_range)
            start = int(match.group(1)) if match else -1
            if st.part and (start != at or _content_length(resp) is None):
                raise _NoRanges(f"a part asked from byte {at} was answered with "
                                f"{content_range or 'no Content-Range'!r}")
            if start < 0 or start > at or (st.end is not None and _content_length(resp) is None):
                # Ranges this server mangles are not used again: a plain GET from here on.
                st.plain, st.end = True, None
                log.info("unusable Content-Range %r (asked from byte %d): one plain stream",
                         content_range, at)
                raise _Fallback()
            total = None if match.group(3) == "*" else int(match.group(3))
        else:
            if st.part:
                raise _NoRanges(f"a part asked from byte {at} was answered with the whole "
                                "object (HTTP 200)")
            start, total = 0, _content_length(resp)
            st.end = None  # the whole body comes: take it all
        check = None
        if (st.etag and etag and etag != st.etag) or (
                st.total is not None and total is not None and total != st.total):
            if st.part:
                raise _NoRanges(f"the ETag changed between parts ({st.etag} then {etag})")
            if at and (st.hasher is None or (
                    st.total is not None and total is not None and total != st.total)):
                # The bytes already yielded belong to another object: resuming would corrupt.
                raise ApiError("the archive changed on the server during the download")
            if at and start:
                st.plain, st.end = True, None  # the prefix must come again, to be checked
                raise _Fallback()
            if at:
                check = xxhash.xxh3_64()  # the new object's first bytes must be those we hold
            st.etag = st.validator = None
        if st.total is None:
            st.total = total
        if total is not None and st.end is not None:
            st.end = min(st.end, total - 1)
        if st.etag is None and etag:
            st.etag = etag
            if not etag.startswith("W/"):  # If-Range needs a strong validator
                st.validator = etag
        if st.validator is None and resp.headers.get("last-modified"):
            st.validator = resp.headers["last-modified"]
        return at - start, check

    def _check_prefix(self, check: Any, st: _Download) -> None:
        """The bytes re-sent before the resume point under a new ETag: the same as those
        handed over, or the archive changed and the download fails."""
        if check.intdigest() != st.hasher.intdigest():
            raise ApiError("the archive changed on the server during the download")
        log.info("the archive's ETag changed to %s; its first %d bytes are the same: going on",
                 st.etag, st.at)

    def _api_failure(self, resp: httpx.Response, where: str) -> Exception:
        """The exception for a non-2xx API answer: _Retry for 5xx/429, else an ApiError."""
        status = resp.status_code
        request_id = resp.headers.get("x-request-id")
        message, code = None, None
        try:
            body = resp.json()
        except ValueError:
            body = None
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            message = _opt_str(err.get("message"))
            code = _opt_str(err.get("code")) or _opt_str(err.get("type"))
        elif isinstance(err, str):
            message = err
        elif isinstance(body, dict):
            message = _opt_str(body.get("message"))
        if not message and body is None and resp.content:
            text = " ".join(resp.text.split())
            if _body_kind(resp) == "text/plain" and len(text) <= 200:
                message = text  # a short message meant for people (a gateway's, say)
            elif status < 500 and status != 429:  # a 404 here is no API, not "no such artifact"
                return self._not_the_api(resp, where)
            else:  # an HTML error page says nothing useful here
                message = f"{resp.reason_phrase or 'error'} ({_a_body(resp)})"
        message = self._redact(message or resp.reason_phrase or "request failed")
        if status in _REDIRECTS:  # not for JSON endpoints; a Location query may be a credential
            target = resp.url.join(resp.headers.get("location", ""))
            message = f"unexpected redirect to {target.host}{target.path}"
        text = f"{where}: {message}"
        if status == 401:
            return Unauthorized(
                f"{text} (check VM0_API_KEY)", status=status, code=code, request_id=request_id
            )
        if status == 404:
            return NotFound(text, status=status, code=code, request_id=request_id)
        if status == 429 or status >= 500:
            error = Unavailable(text, status=status, code=code, request_id=request_id)
            return _Retry(
                f"HTTP {status} {message}",
                retry_after=_retry_after(resp.headers.get("retry-after")),
                error=error,
            )
        return ApiError(text, status=status, code=code, request_id=request_id)

    async def _backoff(self, what: str, retry: _Retry, failures: int, deadline: float) -> None:
        """Sleep before the next attempt, or raise Unavailable once the budget is spent."""
        remaining = deadline - self._clock()
        cause = self._redact(retry.cause)
        if remaining <= 0:
            err = retry.error
            raise Unavailable(  # chained to the transport error or HTTP answer behind it
                f"{what}: gave up after {failures} attempt(s): {cause}",
                status=err.status if err else None,
                code=err.code if err else None,
                request_id=err.request_id if err else None,
            ) from (retry.__cause__ or err)
        if retry.retry_after is not None:
            delay = min(retry.retry_after, remaining)
        else:  # exponential backoff with full jitter
            ceiling = min(self._backoff_cap, self._backoff_base * 2.0 ** min(failures - 1, 32))
            delay = min(self._rng.uniform(0.0, ceiling), remaining)
        log.warning("%s failed (%s), attempt %d; retrying in %.2fs", what, cause, failures, delay)
        await self._sleep(delay)

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "<redacted>") if self._key else text
