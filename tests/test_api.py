"""Tests for vm0fs.api: every HTTP exchange goes through httpx.MockTransport, under trio."""

from __future__ import annotations

import gzip
import logging
import math
import random
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import aclosing
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
import trio

from vm0fs.api import ApiClient, Artifact, Version, _parse_time
from vm0fs.errors import ApiError, NotFound, Unauthorized, Unavailable

KEY = "sk-test-S3CR3T-0123456789abcdef"
BASE = "https://api.test"
BLOB = "https://blob.test/bucket/archive.tar.gz?X-Amz-Signature=SIGSECRET&X-Amz-Expires=3600"
DATA = bytes(range(256)) * 40  # 10240 bytes, every offset distinguishable
VID = "ab" * 32

Handler = Callable[[httpx.Request], Any]


class FakeClock:
    """A monotonic clock that only moves when the client sleeps: no real waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        assert delay >= 0
        self.sleeps.append(delay)
        self.now += delay


def make(handler: Handler, **kw: Any) -> tuple[ApiClient, FakeClock, list[httpx.Request]]:
    clock = FakeClock()
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> Any:
        seen.append(request)
        return handler(request)

    kw.setdefault("retry_time", 10.0)
    kw.setdefault("rng", random.Random(1234))  # reproducible jitter
    client = ApiClient(
        BASE, KEY, transport=httpx.MockTransport(record), clock=clock, sleep=clock.sleep, **kw
    )
    return client, clock, seen


def run(fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return trio.run(_bounded, fn)


async def _bounded(fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    with trio.fail_after(5):  # a bug must fail the test, not hang it
        return await fn()


async def collect(client: ApiClient, artifact_id: str, version_id: str | None = None) -> bytes:
    out = bytearray()
    async for chunk in client.download(artifact_id, version_id):
        out += chunk
    return bytes(out)


def art(i: int | str, **extra: Any) -> dict[str, Any]:
    return {"id": f"a{i}", "name": f"name-{i}", **extra}


def page(items: list[dict[str, Any]], cursor: str | None, more: bool) -> dict[str, Any]:
    return {"data": items, "pagination": {"has_more": more, "next_cursor": cursor}}


def error_body(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(
        status,
        json={"error": {"type": "x_error", "code": code, "message": message}},
        headers={"X-Request-Id": f"req-{status}"},
    )


# --------------------------------------------------------------------------- listing


def test_pagination_walks_every_page_with_limit_100() -> None:
    pages = {
        None: page([art(1), art(2)], "a2", True),
        "a2": page([art(3)], "a3", True),
        "a3": page([art(4)], None, False),
    }

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/artifacts"
        assert request.url.params["limit"] == "100"
        return httpx.Response(200, json=pages[request.url.params.get("cursor")])

    client, _, seen = make(handler)
    result = run(client.list_artifacts)
    assert [a.id for a in result] == ["a1", "a2", "a3", "a4"]
    assert [r.url.params.get("cursor") for r in seen] == [None, "a2", "a3"]
    assert client.request_count == 3
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in seen)


def test_repeated_item_across_pages_is_deduplicated_first_wins() -> None:
    pages = {
        None: page([art(1), art(2, name="first")], "a2", True),
        "a2": page([art(2, name="second"), art(3)], None, False),
    }
    client, _, _ = make(lambda r: httpx.Response(200, json=pages[r.url.params.get("cursor")]))
    result = run(client.list_artifacts)
    assert [(a.id, a.name) for a in result] == [("a1", "name-1"), ("a2", "first"), ("a3", "name-3")]


def test_repeated_cursor_ends_the_walk() -> None:
    pages = {
        None: page([art(1)], "c1", True),
        "c1": page([art(2)], "c2", True),
        "c2": page([art(3)], "c1", True),  # back to a cursor already followed
    }
    client, _, seen = make(lambda r: httpx.Response(200, json=pages[r.url.params.get("cursor")]))
    assert [a.id for a in run(client.list_artifacts)] == ["a1", "a2", "a3"]
    assert len(seen) == 3


def test_empty_page_with_has_more_ends_the_walk() -> None:
    pages = {None: page([art(1)], "c1", True), "c1": page([], "c2", True)}
    client, _, seen = make(lambda r: httpx.Response(200, json=pages[r.url.params.get("cursor")]))
    assert [a.id for a in run(client.list_artifacts)] == ["a1"]
    assert len(seen) == 2


def test_has_more_without_cursor_ends_the_walk() -> None:
    client, _, seen = make(lambda r: httpx.Response(200, json=page([art(1)], None, True)))
    assert [a.id for a in run(client.list_artifacts)] == ["a1"]
    assert len(seen) == 1


def test_endless_pages_are_capped(caplog: pytest.LogCaptureFixture) -> None:
    counter = iter(range(1_000_000))

    def handler(request: httpx.Request) -> httpx.Response:
        n = next(counter)
        return httpx.Response(200, json=page([art(n)], f"c{n}", True))

    client, _, seen = make(handler, max_pages=7)
    with caplog.at_level(logging.WARNING, logger="vm0fs.api"):
        result = run(client.list_artifacts)
    assert len(seen) == 7 and len(result) == 7
    assert "stopped after 7 pages" in caplog.text


def test_camel_case_fields_everywhere() -> None:
    version = {
        "id": VID,
        "artifactId": "a1",
        "size": 50,
        "fileCount": 5,
        "message": "hi",
        "createdBy": "agent",
        "createdAt": "2024-01-02T00:00:00Z",
    }
    listing = {
        "data": [
            {
                "id": "a1",
                "name": "out",
                "currentVersionId": VID,
                "size": 10,  # lags behind: currentVersion is authoritative
                "fileCount": 1,
                "createdAt": "2024-01-01T00:00:00Z",
                "updatedAt": "2024-01-02T00:00:00.5+00:00",
                "currentVersion": version,
            }
        ],
        "pagination": {"hasMore": False, "nextCursor": None},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/versions"):
            return httpx.Response(200, json={"data": [version], "pagination": {"hasMore": False}})
        return httpx.Response(200, json=listing)

    client, _, _ = make(handler)
    [a] = run(client.list_artifacts)
    expected_version = Version(VID, "a1", 50, 5, "hi", "agent", 1704153600.0)
    assert a == Artifact("a1", "out", VID, 50, 5, 1704067200.0, 1704153600.5, expected_version)

    async def versions() -> list[Version]:
        return await client.list_versions("a1")

    assert run(versions) == [expected_version]


def test_camel_case_pagination_is_followed() -> None:
    pages = {
        None: {"data": [art(1)], "pagination": {"hasMore": True, "nextCursor": "a1"}},
        "a1": {"data": [art(2)], "pagination": {"hasMore": False, "nextCursor": None}},
    }
    client, _, _ = make(lambda r: httpx.Response(200, json=pages[r.url.params.get("cursor")]))
    assert [a.id for a in run(client.list_artifacts)] == ["a1", "a2"]


def test_snake_case_fields_and_versions() -> None:
    version = {
        "id": VID,
        "artifact_id": "a1",
        "size": 4096,
        "file_count": 2,
        "message": None,
        "created_by": "user",
        "created_at": "2024-01-01T00:00:00Z",
    }
    item = {
        "id": "a1",
        "name": "output-results",
        "current_version_id": VID,
        "size": 4096,
        "file_count": 2,
        "current_version": version,
        "created_at": "2024-01-01T00:00:00Z",
        "updated_at": "2024-01-01T00:00:00Z",
    }

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/artifacts/a1/versions":
            return httpx.Response(200, json=page([version, {"id": "v2"}], None, False))
        return httpx.Response(200, json=page([item], None, False))

    client, _, _ = make(handler)
    [a] = run(client.list_artifacts)
    assert (a.current_version_id, a.size, a.file_count) == (VID, 4096, 2)
    assert a.current_version is not None and a.current_version.message is None

    async def versions() -> list[Version]:
        return await client.list_versions("a1")

    v1, v2 = run(versions)
    assert v1.created_by == "user" and v1.created_at == 1704067200.0
    # Missing optional fields get defaults; artifact_id falls back to the one asked for.
    assert v2 == Version("v2", "a1", 0, 0, None, None, 0.0)


def test_null_current_version_id() -> None:
    item = {"id": "a1", "name": "empty", "current_version_id": None, "size": 0}
    client, _, _ = make(lambda r: httpx.Response(200, json=page([item], None, False)))
    [a] = run(client.list_artifacts)
    assert a.current_version_id is None and a.current_version is None
    assert (a.size, a.file_count, a.created_at) == (0, 0, 0.0)


def test_get_artifact_quotes_the_id() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == f"Bearer {KEY}"
        return httpx.Response(200, json={"id": "x/../y", "name": "n", "currentVersionId": "v"})

    client, _, seen = make(handler)

    async def go() -> Artifact:
        return await client.get_artifact("x/../y")

    a = run(go)
    assert a.id == "x/../y" and a.current_version_id == "v"
    assert seen[0].url.raw_path == b"/v1/artifacts/x%2F..%2Fy"


def test_dot_dot_id_is_not_normalised_away() -> None:
    client, _, seen = make(lambda r: httpx.Response(404, json={}))

    async def go() -> None:
        await client.get_artifact("..")

    with pytest.raises(NotFound):
        run(go)
    assert seen[0].url.raw_path == b"/v1/artifacts/%2E%2E"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"<html>oops</html>", "does not answer like the vm0 Artifacts API"),
        (b'{"items": []}', "'data'"),
        (b'{"data": [{"name": "no id"}]}', "no 'id'"),
        (b'{"data": ["str"]}', "expected an artifact object"),
    ],
)
def test_malformed_listing_raises_api_error(body: bytes, fragment: str) -> None:
    client, _, _ = make(lambda r: httpx.Response(200, content=body))
    with pytest.raises(ApiError) as info:
        run(client.list_artifacts)
    assert fragment in str(info.value)
    assert type(info.value) is ApiError


def test_get_artifact_without_id_raises_api_error() -> None:
    client, _, _ = make(lambda r: httpx.Response(200, json={"name": "x"}))

    async def go() -> None:
        await client.get_artifact("a1")

    with pytest.raises(ApiError, match="no 'id'"):
        run(go)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-01-01T00:00:00Z", 1704067200.0),
        ("2024-01-01T00:00:00.250Z", 1704067200.25),
        ("2024-01-01T00:00:00.123456789Z", 1704067200.123456),
        ("2024-01-01T02:00:00+02:00", 1704067200.0),
        ("2024-01-01T00:00:00", 1704067200.0),
        ("2024-01-01 00:00:00z", 1704067200.0),
        ("yesterday", 0.0),
        ("", 0.0),
        (None, 0.0),
        (1704067200, 1704067200.0),
    ],
)
def test_parse_time(text: Any, expected: float) -> None:
    assert math.isclose(_parse_time(text), expected, abs_tol=1e-6)


# --------------------------------------------------------------------------- errors, retries


@pytest.mark.parametrize(
    ("status", "exc_type", "attempts"),
    [
        (400, ApiError, 1),
        (401, Unauthorized, 1),
        (404, NotFound, 1),
        (409, ApiError, 1),
        (500, Unavailable, None),
        (429, Unavailable, None),
    ],
)
def test_error_status_mapping(status: int, exc_type: type[ApiError], attempts: int | None) -> None:
    client, clock, seen = make(
        lambda r: error_body(status, "some_code", "No such artifact: 'a1'"), retry_time=2.0
    )

    async def go() -> None:
        await client.get_artifact("a1")

    with pytest.raises(ApiError) as info:
        run(go)
    err = info.value
    assert type(err) is exc_type
    assert err.status == status and err.code == "some_code" and err.request_id == f"req-{status}"
    assert f"req-{status}" in str(err) and "GET /v1/artifacts/a1" in str(err)
    assert "No such artifact" in str(err)
    if attempts is not None:
        assert len(seen) == attempts and clock.sleeps == []
    else:
        assert len(seen) > 1 and sum(clock.sleeps) <= 2.0 + 1e-9


def test_error_without_json_body_uses_text() -> None:
    client, _, _ = make(lambda r: httpx.Response(418, text="I am a teapot"))

    async def go() -> None:
        await client.get_artifact("a1")

    with pytest.raises(ApiError, match="teapot") as info:
        run(go)
    assert info.value.status == 418


def test_5xx_then_success_is_retried() -> None:
    answers = iter([error_body(503, "api_error", "busy"), error_body(500, "api_error", "oops")])

    def handler(request: httpx.Request) -> httpx.Response:
        return next(answers, httpx.Response(200, json={"id": "a1", "name": "n"}))

    client, clock, seen = make(handler)

    async def go() -> Artifact:
        return await client.get_artifact("a1")

    assert run(go).id == "a1"
    assert len(seen) == 3 and len(clock.sleeps) == 2


def test_backoff_is_jittered_and_capped() -> None:
    client, clock, _ = make(
        lambda r: httpx.Response(502), backoff_base=0.5, backoff_cap=2.0, retry_time=40.0
    )
    with pytest.raises(Unavailable):
        run(client.list_artifacts)
    for n, delay in enumerate(clock.sleeps):
        assert 0 <= delay <= min(2.0, 0.5 * 2**n)


def test_retry_after_seconds_is_honoured() -> None:
    answers = iter([httpx.Response(429, headers={"Retry-After": "7"})])
    client, clock, _ = make(
        lambda r: next(answers, httpx.Response(200, json=page([], None, False))), retry_time=30.0
    )
    assert run(client.list_artifacts) == []
    assert clock.sleeps == [7.0]


def test_retry_after_http_date() -> None:
    past = format_datetime(datetime.now(UTC) - timedelta(hours=1), usegmt=True)
    future = format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)
    answers = iter(
        [
            httpx.Response(503, headers={"Retry-After": past}),
            httpx.Response(503, headers={"Retry-After": future}),
        ]
    )
    client, clock, _ = make(
        lambda r: next(answers, httpx.Response(200, json=page([], None, False))), retry_time=30.0
    )
    run(client.list_artifacts)
    # A date in the past means "now"; one an hour away is capped to the remaining budget.
    assert clock.sleeps == [0.0, 30.0]


def test_retry_after_beyond_budget_gives_up() -> None:
    client, clock, seen = make(
        lambda r: httpx.Response(429, headers={"Retry-After": "3600"}), retry_time=5.0
    )
    with pytest.raises(Unavailable, match="HTTP 429"):
        run(client.list_artifacts)
    assert clock.sleeps == [5.0] and len(seen) == 2


def test_retries_are_bounded_by_retry_time() -> None:
    client, clock, seen = make(
        lambda r: error_body(500, "api_error", "database on fire"), retry_time=3.0
    )
    with pytest.raises(Unavailable) as info:
        run(client.list_artifacts)
    assert sum(clock.sleeps) <= 3.0 + 1e-9
    assert len(seen) >= 2
    assert "database on fire" in str(info.value) and "gave up" in str(info.value)
    assert info.value.status == 500 and info.value.request_id == "req-500"


def test_zero_retry_time_means_one_attempt() -> None:
    client, clock, seen = make(lambda r: httpx.Response(500), retry_time=0.0)
    with pytest.raises(Unavailable):
        run(client.list_artifacts)
    assert len(seen) == 1 and clock.sleeps == []


@pytest.mark.parametrize(
    "exc",
    [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("x")],
)
def test_transport_errors_are_retried(exc: Exception) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise exc
        return httpx.Response(200, json=page([art(1)], None, False))

    client, clock, _ = make(handler)
    assert [a.id for a in run(client.list_artifacts)] == ["a1"]
    assert calls == 3 and len(clock.sleeps) == 2


def test_transport_errors_exhaust_budget_into_unavailable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    client, _, _ = make(handler, retry_time=1.0)
    with pytest.raises(Unavailable, match="ConnectError: connection refused"):
        run(client.list_artifacts)


def test_real_sleep_under_trio_stays_quick() -> None:
    # The default clock and sleep (time.monotonic, trio.sleep), with a tiny budget.
    client = ApiClient(
        BASE,
        KEY,
        transport=httpx.MockTransport(lambda r: httpx.Response(503)),
        retry_time=0.05,
        backoff_base=0.005,
        backoff_cap=0.01,
    )
    with pytest.raises(Unavailable):
        run(client.list_artifacts)
    assert client.request_count >= 2


# --------------------------------------------------------------------------- download


class BrokenStream(httpx.AsyncByteStream):
    """A streamed body that delivers `cut` bytes and then loses the connection (never, if
    `cut` is None)."""

    def __init__(self, data: bytes, cut: int | None) -> None:
        self.data, self.cut = data, cut

    async def __aiter__(self) -> AsyncIterator[bytes]:
        end = len(self.data) if self.cut is None else self.cut
        for i in range(0, end, 1000):
            yield self.data[i : min(i + 1000, end)]
        if self.cut is not None:
            raise httpx.RemoteProtocolError("peer closed connection without sending full body")


def blob_or_api(blob: Handler, api: Handler | None = None) -> Handler:
    """Route API requests (/download answers 302 by default) and presigned-host requests."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "blob.test":
            assert "authorization" not in request.headers
            return blob(request)
        assert request.headers["authorization"] == f"Bearer {KEY}"
        if api is not None:
            return api(request)
        return httpx.Response(302, headers={"Location": BLOB})

    return handler


def test_download_follows_302_without_the_key() -> None:
    def blob(request: httpx.Request) -> httpx.Response:
        assert request.url.params["X-Amz-Signature"] == "SIGSECRET"
        return httpx.Response(200, content=DATA, headers={"ETag": '"e1"'})

    client, _, seen = make(blob_or_api(blob), chunk_size=4096)

    async def go() -> bytes:
        return await collect(client, "a1", "abc12345")

    assert run(go) == DATA
    api_req, blob_req = seen
    assert api_req.url.path == "/v1/artifacts/a1/download"
    assert api_req.url.params["version_id"] == "abc12345"
    assert api_req.url.params["versionId"] == "abc12345"
    assert api_req.headers["authorization"] == f"Bearer {KEY}"
    assert "authorization" not in blob_req.headers
    assert client.request_count == 2


def test_download_current_version_sends_no_version_params() -> None:
    client, _, seen = make(blob_or_api(lambda r: httpx.Response(200, content=DATA)))

    async def go() -> bytes:
        return await collect(client, "a1")

    assert run(go) == DATA
    assert "version_id" not in seen[0].url.params and "versionId" not in seen[0].url.params


def test_download_relative_location_and_direct_200() -> None:
    def api(request: httpx.Request) -> httpx.Response:
        return httpx.Response(307, headers={"Location": "/raw/a1"})

    def direct(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/raw/a1":
            assert "authorization" not in request.headers  # same host, still no key
            return httpx.Response(200, content=b"relative")
        return api(request)

    client, _, seen = make(direct)

    async def go() -> bytes:
        return await collect(client, "a1")

    assert run(go) == b"relative"
    assert str(seen[1].url) == f"{BASE}/raw/a1"

    client2, _, _ = make(lambda r: httpx.Response(200, content=DATA))

    async def go2() -> bytes:
        return await collect(client2, "a1")

    assert run(go2) == DATA


def test_download_resumes_a_broken_body_with_range() -> None:
    ranges: list[str | None] = []

    def blob(request: httpx.Request) -> httpx.Response:
        ranges.append(request.headers.get("range"))
        if len(ranges) == 1:
            headers = {"ETag": '"v1"', "Content-Length": str(len(DATA))}
            return httpx.Response(200, headers=headers, stream=BrokenStream(DATA, 4000))
        assert request.headers["if-range"] == '"v1"'
        start = int(request.headers["range"].removeprefix("bytes=").rstrip("-"))
        return httpx.Response(
            206,
            content=DATA[start:],
            headers={"ETag": '"v1"', "Content-Range": f"bytes {start}-{len(DATA) - 1}/{len(DATA)}"},
        )

    client, clock, seen = make(blob_or_api(blob), chunk_size=1000)

    async def go() -> bytes:
        return await collect(client, "a1", VID)

    assert run(go) == DATA
    assert ranges == [None, "bytes=4000-"]
    assert len(seen) == 3  # one /download, two blob GETs on the same link
    assert len(clock.sleeps) == 1


def test_download_short_body_resumed_and_200_skips_what_we_have() -> None:
    calls = 0

    def blob(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        headers = {"Content-Length": str(len(DATA))}
        if calls == 1:  # announced everything, delivered a third
            return httpx.Response(200, headers=headers, content=DATA[:3333])
        assert request.headers["range"] == "bytes=3333-"
        return httpx.Response(200, headers=headers, content=DATA)  # Range ignored

    client, _, _ = make(blob_or_api(blob), chunk_size=512)

    async def go() -> list[bytes]:
        return [chunk async for chunk in client.download("a1")]

    chunks = run(go)
    assert b"".join(chunks) == DATA
    assert all(chunks)


def test_download_repeated_breaks_are_byte_exact() -> None:
    cuts = iter([1500, 1500, 2000, 9000])

    def blob(request: httpx.Request) -> httpx.Response:
        start = int(request.headers.get("range", "bytes=0-")[6:].rstrip("-"))
        rest = DATA[start:]
        cut = next(cuts, len(rest))
        headers = {
            "ETag": '"v1"',
            "Content-Length": str(len(rest)),
            "Content-Range": f"bytes {start}-{len(DATA) - 1}/{len(DATA)}",
        }
        return httpx.Response(
            206 if start else 200,
            headers=headers,
            stream=BrokenStream(rest, cut) if cut < len(rest) else httpx.ByteStream(rest),
        )

    client, _, _ = make(blob_or_api(blob), chunk_size=700)

    async def go() -> bytes:
        return await collect(client, "a1")

    assert run(go) == DATA


def test_download_403_from_blob_asks_for_a_fresh_link() -> None:
    links = 0

    def api(request: httpx.Request) -> httpx.Response:
        nonlocal links
        links += 1
        return httpx.Response(302, headers={"Location": f"{BLOB}&n={links}"})

    def blob(request: httpx.Request) -> httpx.Response:
        if request.url.params["n"] == "1":
            return httpx.Response(403, text="<Error><SignatureProvided>SIGSECRET</Error>")
        return httpx.Response(200, content=DATA)

    client, clock, _ = make(blob_or_api(blob, api))

    async def go() -> bytes:
        return await collect(client, "a1")

    assert run(go) == DATA
    assert links == 2
    assert len(clock.sleeps) == 1  # a link refused before it brought anything: a backoff


def test_download_link_expiring_midway_resumes_on_new_link() -> None:
    links = 0

    def api(request: httpx.Request) -> httpx.Response:
        nonlocal links
        links += 1
        return httpx.Response(302, headers={"Location": f"{BLOB}&n={links}"})

    def blob(request: httpx.Request) -> httpx.Response:
        n = request.url.params["n"]
        headers = {"ETag": '"v1"', "Content-Length": str(len(DATA))}
        if n == "1" and "range" not in request.headers:
            return httpx.Response(200, headers=headers, stream=BrokenStream(DATA, 5000))
        if n == "1":
            return httpx.Response(403)  # the link expired between the two requests
        assert request.headers["range"] == "bytes=5000-"
        return httpx.Response(
            206,
            content=DATA[5000:],
            headers={"ETag": '"v1"', "Content-Range": f"bytes 5000-{len(DATA) - 1}/{len(DATA)}"},
        )

    client, clock, _ = make(blob_or_api(blob, api), chunk_size=1000)

    async def go() -> bytes:
        return await collect(client, "a1")

    assert run(go) == DATA
    assert links == 2
    # One backoff, for the cut body; the link that had brought bytes and was then refused
    # has expired, and was replaced at once.
    assert len(clock.sleeps) == 1


def test_download_blob_5xx_retries_same_link() -> None:
    answers = iter([httpx.Response(503, headers={"Retry-After": "2"})])
    client, clock, seen = make(
        blob_or_api(lambda r: next(answers, httpx.Response(200, content=DATA)))
    )

    async def go() -> bytes:
        return await collect(client, "a1")

    assert run(go) == DATA
    assert [r.url.host for r in seen] == ["api.test", "blob.test", "blob.test"]
    assert clock.sleeps == [2.0]


def test_download_archive_changed_midway_is_an_error() -> None:
    """A new ETag and other bytes before the resume point: the bytes already handed over
    belong to another object, so the download fails rather than mix the two."""
    calls = 0

    def blob(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        body = DATA if calls == 1 else DATA[::-1]
        headers = {"ETag": f'"v{calls}"', "Content-Length": str(len(DATA))}
        return httpx.Response(200, headers=headers, stream=BrokenStream(body, 2000))

    client, _, _ = make(blob_or_api(blob), chunk_size=1000)

    async def go() -> bytes:
        return await collect(client, "a1")

    with pytest.raises(ApiError, match="changed"):
        run(go)


def test_download_new_etag_same_bytes_goes_on() -> None:
    """A new ETag (an object replaced by the same bytes, a replica's tag): the resend's first
    bytes are checked against those handed over, and the download goes on."""
    calls = 0

    def blob(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        headers = {"ETag": f'"v{calls}"', "Content-Length": str(len(DATA))}
        stream = BrokenStream(DATA, 2000) if calls == 1 else httpx.ByteStream(DATA)
        return httpx.Response(200, headers=headers, stream=stream)

    client, _, _ = make(blob_or_api(blob), chunk_size=1000)

    async def go() -> bytes:
        return await collect(client, "a1")

    assert run(go) == DATA
    assert calls == 2


def test_download_range_not_satisfiable_after_complete_body() -> None:
    # No Content-Length: the break after the last byte looks like any other break.
    def blob(request: httpx.Request) -> httpx.Response:
        if "range" in request.headers:
            return httpx.Response(416, headers={"Content-Range": f"bytes */{len(DATA)}"})
        return httpx.Response(200, stream=BrokenStream(DATA, len(DATA)))

    client, _, _ = make(blob_or_api(blob), chunk_size=1024)

    async def go() -> bytes:
        return await collect(client, "a1")

    assert run(go) == DATA


@pytest.mark.parametrize(("status", "exc_type"), [(404, NotFound), (401, Unauthorized)])
def test_download_api_errors(status: int, exc_type: type[ApiError]) -> None:
    client, _, seen = make(lambda r: error_body(status, "resource_not_found", "No such version"))

    async def go() -> bytes:
        return await collect(client, "a1", "deadbeef")

    with pytest.raises(exc_type):
        run(go)
    assert len(seen) == 1


def test_download_that_keeps_failing_is_unavailable() -> None:
    client, clock, seen = make(blob_or_api(lambda r: httpx.Response(403)), retry_time=2.0)

    async def go() -> bytes:
        return await collect(client, "a1")

    with pytest.raises(Unavailable, match="presigned link refused"):
        run(go)
    assert sum(clock.sleeps) <= 2.0 + 1e-9
    api_calls = [r for r in seen if r.url.host == "api.test"]
    assert len(api_calls) >= 2  # each 403 asked for a fresh link


def test_download_api_500_then_302() -> None:
    answers = iter([httpx.Response(500)])

    def api(request: httpx.Request) -> httpx.Response:
        return next(answers, httpx.Response(302, headers={"Location": BLOB}))

    client, _, _ = make(blob_or_api(lambda r: httpx.Response(200, content=DATA), api))

    async def go() -> bytes:
        return await collect(client, "a1")

    assert run(go) == DATA


def test_download_redirect_loop_is_bounded() -> None:
    client, _, seen = make(lambda r: httpx.Response(302, headers={"Location": BLOB}))

    async def go() -> bytes:
        return await collect(client, "a1")

    with pytest.raises(ApiError, match="redirects"):
        run(go)
    assert len(seen) <= 10


# --------------------------------------------------------------------------- secrets, setup


def test_key_never_leaks(caplog: pytest.LogCaptureFixture) -> None:
    def api(request: httpx.Request) -> httpx.Response:
        return error_body(500, "api_error", f"bad key {KEY}")

    client, _, _ = make(api, retry_time=1.0)
    assert KEY not in repr(client) and KEY not in str(client)

    with caplog.at_level(logging.DEBUG):
        with pytest.raises(Unavailable) as info:
            run(client.list_artifacts)
        assert KEY not in str(info.value) and KEY not in repr(info.value)

        # A download with a presigned link: neither the key nor the signature is logged.
        answers = iter([httpx.Response(503), httpx.Response(403)])
        client2, _, _ = make(
            blob_or_api(lambda r: next(answers, httpx.Response(200, content=DATA)))
        )

        async def go() -> bytes:
            return await collect(client2, "a1")

        assert run(go) == DATA

        for status in (401, 404, 400):
            client3, _, _ = make(lambda r, s=status: error_body(s, "c", f"echo {KEY}"))
            with pytest.raises(ApiError) as info:
                run(client3.list_artifacts)
            assert KEY not in str(info.value)

    assert caplog.records, "expected retry warnings to be logged"
    assert "blob.test/bucket/archive.tar.gz" in caplog.text
    assert KEY not in caplog.text
    assert "SIGSECRET" not in caplog.text
    for record in caplog.records:
        assert KEY not in record.getMessage() and "SIGSECRET" not in record.getMessage()


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VM0_API_KEY", raising=False)
    monkeypatch.delenv("VM0_API_URL", raising=False)
    with pytest.raises(Unauthorized, match="VM0_API_KEY"):
        ApiClient.from_env()
    monkeypatch.setenv("VM0_API_KEY", "  ")
    with pytest.raises(Unauthorized, match="VM0_API_KEY"):
        ApiClient.from_env()

    monkeypatch.setenv("VM0_API_KEY", KEY + "\n")
    client = ApiClient.from_env()
    assert repr(client) == "ApiClient(base_url='https://api.vm0.ai')"
    monkeypatch.setenv("VM0_API_URL", "http://localhost:8080/")
    assert "localhost:8080" in repr(ApiClient.from_env())
    assert "other" in repr(ApiClient.from_env("https://other"))


def test_async_context_manager_closes() -> None:
    async def go() -> ApiClient:
        async with ApiClient(
            BASE, KEY, transport=httpx.MockTransport(lambda r: httpx.Response(200))
        ) as client:
            pass
        return client

    client = run(go)
    assert client._client.is_closed


def test_download_break_keeps_bytes_buffered_before_it() -> None:
    # With the default 256 KiB chunks, bytes held back before a break must still be handed
    # over, so the resume asks only for the rest.
    data = DATA * 40  # 400 KiB
    ranges: list[str | None] = []

    def blob(request: httpx.Request) -> httpx.Response:
        ranges.append(request.headers.get("range"))
        headers = {"ETag": '"v1"', "Content-Length": str(len(data))}
        if len(ranges) == 1:
            return httpx.Response(200, headers=headers, stream=BrokenStream(data, 300_000))
        return httpx.Response(
            206,
            stream=httpx.ByteStream(data[300_000:]),
            headers={"Content-Range": f"bytes 300000-{len(data) - 1}/{len(data)}"},
        )

    client, _, _ = make(blob_or_api(blob))

    async def go() -> list[bytes]:
        return [chunk async for chunk in client.download("a1")]

    chunks = run(go)
    assert b"".join(chunks) == data
    assert ranges == [None, "bytes=300000-"]
    assert len(chunks[0]) >= 256 * 1024


def test_download_stopped_early_closes_cleanly() -> None:
    client, _, _ = make(blob_or_api(lambda r: httpx.Response(200, content=DATA)), chunk_size=100)

    async def go() -> bytes:
        async with aclosing(client.download("a1")) as chunks:
            async for chunk in chunks:
                return chunk
        raise AssertionError("no chunk")

    assert run(go) == DATA[:100]


def test_download_yields_stored_bytes_even_with_content_encoding() -> None:
    # An object stored with Content-Encoding: gzip must come out as the .tar.gz, not inflated.
    gz = gzip.compress(DATA)

    def blob(request: httpx.Request) -> httpx.Response:
        assert request.headers["accept-encoding"] == "identity"
        headers = {"Content-Encoding": "gzip", "Content-Length": str(len(gz))}
        return httpx.Response(200, headers=headers, stream=BrokenStream(gz, None))

    client, _, _ = make(blob_or_api(blob))

    async def go() -> bytes:
        return await collect(client, "a1")

    assert run(go) == gz


def test_unavailable_is_chained_to_the_transport_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("read timed out")

    client, _, _ = make(handler, retry_time=0.5)
    with pytest.raises(Unavailable) as info:
        run(client.list_artifacts)
    assert isinstance(info.value.__cause__, httpx.ReadTimeout)


def test_unsupported_scheme_is_not_retried() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.scheme not in ("http", "https"):  # as httpx's real transport does
            raise httpx.UnsupportedProtocol("Request URL has an unsupported protocol 'ftp://'.")
        return httpx.Response(302, headers={"Location": "ftp://files.test/a.tar.gz"})

    client, clock, seen = make(handler)

    async def go() -> bytes:
        return await collect(client, "a1")

    with pytest.raises(ApiError, match="unsupported protocol") as info:
        run(go)
    assert type(info.value) is ApiError and clock.sleeps == [] and len(seen) == 2


def _refused() -> httpx.ConnectError:
    """What httpx raises under trio when nothing listens: the errno sits deep in the chain."""
    group = ExceptionGroup("all attempts failed", [ConnectionRefusedError(111, "refused")])
    error = httpx.ConnectError("all attempts to connect to 127.0.0.1:1 failed")
    error.__cause__ = OSError("all attempts to connect to 127.0.0.1:1 failed")
    error.__cause__.__cause__ = group
    return error


@pytest.mark.parametrize("failure", [
    _refused, lambda: httpx.ConnectError("x"),
], ids=["refused", "plain"])
def test_a_refused_first_contact_fails_at_once(failure: Callable[[], Exception]) -> None:
    """Nothing listening, and the API never answered: retrying cannot help. A connect error
    whose cause is unknown is retried as before."""
    def handler(request: httpx.Request) -> httpx.Response:
        raise failure()

    client, clock, seen = make(handler)
    with pytest.raises(Unavailable) as info:
        run(client.list_artifacts)
    if failure is _refused:
        assert "connection refused" in str(info.value) and len(seen) == 1 and clock.sleeps == []
    else:
        assert len(seen) > 1 and clock.sleeps


def test_an_unknown_host_fails_at_once() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        error = httpx.ConnectError("[Errno -2] Name or service not known")
        error.__cause__ = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        raise error

    client, clock, seen = make(handler)
    with pytest.raises(Unavailable, match="no such host"):
        run(client.list_artifacts)
    assert len(seen) == 1 and clock.sleeps == []


def test_a_refused_connection_after_the_api_answered_is_retried() -> None:
    """The API answered before: it is restarting, and a retry may well find it back."""
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls in (2, 3):
            raise _refused()
        return httpx.Response(200, json=page([art(1)], None, False))

    client, clock, _ = make(handler)

    async def twice() -> list[Any]:
        await client.list_artifacts()
        return await client.list_artifacts()

    assert [a.id for a in run(twice)] == ["a1"]
    assert calls == 4 and len(clock.sleeps) == 2


@pytest.mark.parametrize("status", [200, 404, 403])
def test_another_web_server_is_named_as_such(status: int) -> None:
    html = "<html><head><title>Welcome</title></head><body>" + "x" * 500 + "</body></html>"
    client, _, _ = make(lambda r: httpx.Response(status, text=html,
                                                 headers={"content-type": "text/html"}))
    with pytest.raises(ApiError) as info:
        run(client.list_artifacts)
    text = str(info.value)
    assert "does not answer like the vm0 Artifacts API" in text and "<" not in text
    assert not isinstance(info.value, NotFound | Unavailable)


@pytest.mark.parametrize(("headers", "said"), [
    ({"content-type": "application/xml"}, "gave an application/xml body"),
    ({"content-type": "text/html; charset=utf-8"}, "gave a text/html body"),
    ({}, "gave a body with no content type"),
])
def test_the_kind_of_body_is_said_in_good_english(headers: dict[str, str], said: str) -> None:
    client, _, _ = make(lambda r: httpx.Response(200, content=b"<x/>", headers=headers))
    with pytest.raises(ApiError) as info:
        run(client.list_artifacts)
    assert said in str(info.value)


@pytest.mark.parametrize(("error", "said"), [
    (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
     "does not speak TLS"),
    (ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
                                     "failed"), "TLS certificate is not accepted"),
])
def test_a_tls_handshake_that_cannot_succeed_is_not_retried(error: ssl.SSLError,
                                                            said: str) -> None:
    if isinstance(error, ssl.SSLCertVerificationError):
        error.verify_message = "self-signed certificate"
    else:
        error.reason = "WRONG_VERSION_NUMBER"

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(str(error)) from error

    client, clock, seen = make(handler)
    with pytest.raises(Unavailable) as info:
        run(client.list_artifacts)
    assert said in str(info.value) and "attempt" not in str(info.value)
    assert len(seen) == 1 and clock.sleeps == []


class SlowStream(httpx.AsyncByteStream):
    """A body that sends `head` bytes, then one byte every `every` seconds (None: nothing more,
    ever: a stall)."""

    def __init__(self, data: bytes, head: int, every: float | None) -> None:
        self.data, self.head, self.every = data, head, every

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data[:self.head]
        for i in range(self.head, len(self.data)):
            if self.every is None:
                await trio.sleep_forever()
            await trio.sleep(self.every)
            yield self.data[i:i + 1]


@pytest.mark.parametrize("every", [None, 0.05])
def test_a_stalled_or_trickling_download_fails_within_its_bounds(every: float | None) -> None:
    """A blob that stalls after 100 bytes, or trickles a byte every 50 ms: each attempt ends
    when the next `speed_limit` bytes take longer than `speed_time`, resumes where it was, and
    the trickle's crumbs never renew the retry budget: Unavailable, in bounded time."""
    attempts: list[str | None] = []

    def blob(request: httpx.Request) -> httpx.Response:
        attempts.append(request.headers.get("range"))
        start = int(request.headers.get("range", "bytes=0-")[6:].rstrip("-"))
        headers = {"ETag": '"v1"', "Content-Length": str(len(DATA) - start)}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(DATA) - 1}/{len(DATA)}"
        return httpx.Response(206 if start else 200, headers=headers,
                              stream=SlowStream(DATA[start:], 100, every))

    client = ApiClient(BASE, KEY, transport=httpx.MockTransport(blob_or_api(blob)),
                       retry_time=1.0, backoff_base=0.01, backoff_cap=0.05,
                       speed_limit=1000, speed_time=0.3, chunk_size=64)
    got = bytearray()

    async def go() -> None:
        with trio.fail_after(4):  # the bound: the budget, plus one attempt's speed_time
            async for chunk in client.download("a1", VID):
                got.extend(chunk)

    with pytest.raises(Unavailable, match="download stalled: fewer than 1000 bytes in 0.3 s"):
        trio.run(go)
    assert bytes(got) == DATA[:len(got)]  # what came is right, and was resumed, not repeated
    assert attempts[0] is None and len(attempts) >= 2
    assert int(attempts[1][6:-1]) >= 100  # the second attempt resumed after the first's bytes


def test_a_slow_download_that_moves_is_not_a_stall() -> None:
    """2,000 bytes a chunk every 50 ms is above a limit of 1,000 bytes in 0.3 s: it completes."""

    class Steady(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for i in range(0, len(DATA), 2000):
                await trio.sleep(0.05)
                yield DATA[i:i + 2000]

    def blob(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Length": str(len(DATA))}, stream=Steady())

    client = ApiClient(BASE, KEY, transport=httpx.MockTransport(blob_or_api(blob)),
                       retry_time=1.0, speed_limit=1000, speed_time=0.3)

    async def go() -> bytes:
        return await collect(client, "a1", VID)

    assert trio.run(go) == DATA


def test_the_same_link_handed_out_again_after_it_expired_backs_off_and_gives_up() -> None:
    """An API that caches its presigned links hands the expired one out again: that link was
    replaced once, so its next refusal backs off and the budget ends the download (it asked
    the API for ever, with no pause, when a link that had brought bytes was always new)."""
    links = 0

    def api(request: httpx.Request) -> httpx.Response:
        nonlocal links
        links += 1
        return httpx.Response(302, headers={"Location": f"{BLOB}&n=1"})

    blob_requests = 0

    def blob(request: httpx.Request) -> httpx.Response:
        nonlocal blob_requests
        blob_requests += 1
        if blob_requests == 1:
            return httpx.Response(200, headers={"ETag": '"v1"', "Content-Length": str(len(DATA))},
                                  stream=BrokenStream(DATA, 5000))
        return httpx.Response(403)

    client, clock, _ = make(blob_or_api(blob, api), chunk_size=1000, retry_time=2.0)

    async def go() -> bytes:
        return await collect(client, "a1")

    with pytest.raises(Unavailable):
        run(go)
    assert links < 50 and sum(clock.sleeps) <= 2.0 + 1e-9
    assert len(clock.sleeps) >= 2  # the cut body, then the link refused again


def test_links_that_answer_then_refuse_still_back_off_and_give_up() -> None:
    """Every new link answers once with no bytes, then is refused: each refusal of a link that
    answered asks for a new one at once, but the empty answers keep their backoff, so the
    download gives up in its time budget instead of spinning."""
    links = 0

    def api(request: httpx.Request) -> httpx.Response:
        nonlocal links
        links += 1
        return httpx.Response(302, headers={"Location": f"{BLOB}&n={links}"})

    answered: set[str] = set()

    def blob(request: httpx.Request) -> httpx.Response:
        n = request.url.params["n"]
        if n in answered:
            return httpx.Response(403)
        answered.add(n)
        return httpx.Response(200, headers={"Content-Length": str(len(DATA))},
                              stream=BrokenStream(DATA, 0))

    client, clock, _ = make(blob_or_api(blob, api), retry_time=2.0)

    async def go() -> bytes:
        return await collect(client, "a1")

    with pytest.raises(Unavailable):
        run(go)
    assert sum(clock.sleeps) <= 2.0 + 1e-9 and links >= 2
