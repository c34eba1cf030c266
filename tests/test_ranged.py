"""Tests for ranged parallel downloads (`ApiClient.download_to`) through httpx.MockTransport:
a model object store that follows RFC 9110 ranges, and every way a server can get them wrong.
Every case compares the bytes handed over with the object, byte for byte."""

from __future__ import annotations

import math
import random
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
from test_api import BASE, KEY, make, run

import vm0fs.api
from vm0fs.api import ApiClient
from vm0fs.errors import ApiError

PART = 64 << 10
OBJECT = random.Random(7).randbytes(20 * PART + 1234)  # 21 parts, the last one short
LINK = "https://blob.test/bucket/archive.tar.gz?X-Amz-Signature=SIG{n}&X-Amz-Expires=3600"


@pytest.fixture(autouse=True)
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vm0fs.api, "PART_SIZE", PART)
    monkeypatch.setattr(vm0fs.api, "FAST_STREAM", math.inf)  # every stream is slow: parts


class Store:
    """A presigned object store behind the API's 302. Switches model broken servers."""

    def __init__(self, data: bytes = OBJECT) -> None:
        self.data = data
        self.etag = '"e1"'
        self.links = 0  # links the API handed out
        self.api_requests = 0
        self.clock: Any = None  # the client's FakeClock (client_for): its sleeps are backoffs
        self.blob: list[httpx.Request] = []
        self.active = self.peak = 0  # bodies being sent at once
        self.ignore_range = False
        self.shift_range_from: int | None = None  # ranges asked from here start a byte later
        self.no_length = False
        self.etag_after: int | None = None  # blob requests after which the ETag changes
        self.data_after: bytes | None = None  # and the bytes too
        self.fail: set[int] = set()  # blob request numbers answered 500
        self.cut: set[int] = set()  # blob request numbers whose body breaks halfway
        self.expire_after: int | None = None  # a link's uses after which it answers 403
        self.uses: dict[str, int] = {}

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.host != "blob.test":
            assert request.headers["authorization"] == f"Bearer {KEY}"
            self.api_requests += 1
            self.links += 1
            return httpx.Response(302, headers={"Location": LINK.format(n=self.links)})
        assert "authorization" not in request.headers  # the key never reaches the blob host
        self.blob.append(request)
        n = len(self.blob)
        sig = request.url.params["X-Amz-Signature"]
        self.uses[sig] = self.uses.get(sig, 0) + 1
        if self.expire_after is not None and self.uses[sig] > self.expire_after:
            return httpx.Response(403, text="<Error><Code>AccessDenied</Code></Error>")
        if n in self.fail:
            return httpx.Response(500)
        changed = self.etag_after is not None and n > self.etag_after
        etag = '"e2"' if changed else self.etag
        data = self.data_after if changed and self.data_after is not None else self.data
        headers = {"ETag": etag, "Accept-Ranges": "bytes"}
        rng = request.headers.get("range")
        if_range = request.headers.get("if-range")
        if rng and not self.ignore_range and (if_range is None or if_range == etag):
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
            assert m, rng
            start = int(m[1])
            end = min(int(m[2]) if m[2] else len(data) - 1, len(data) - 1)
            if start >= len(data):
                return httpx.Response(416, headers={"Content-Range": f"bytes */{len(data)}"})
            if self.shift_range_from is not None and start >= self.shift_range_from:
                start, end = start + 1, min(end + 1, len(data) - 1)
            body, status = data[start:end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        else:
            body, status = data, 200
        if not self.no_length:
            headers["Content-Length"] = str(len(body))
        return httpx.Response(status, headers=headers, stream=self.Body(self, body, n in self.cut))

    class Body(httpx.AsyncByteStream):
        def __init__(self, store: Store, body: bytes, cut: bool) -> None:
            self.store, self.body, self.cut = store, body, cut

        async def __aiter__(self) -> AsyncIterator[bytes]:
            store = self.store
            store.active += 1
            store.peak = max(store.peak, store.active)
            try:
                end = len(self.body) // 2 if self.cut else len(self.body)
                for i in range(0, end, 8192):
                    await trio.sleep(0)  # other bodies go on meanwhile
                    yield self.body[i:min(i + 8192, end)]
                if self.cut:
                    raise httpx.RemoteProtocolError("peer closed connection")
            finally:
                store.active -= 1


def client_for(store: Store) -> ApiClient:
    client, store.clock, _ = make(store.handler, chunk_size=16 << 10)
    return client


async def fetch_all(client: ApiClient, **kw: Any) -> bytes:
    out = bytearray()

    async def deliver(chunk: bytes) -> bool:
        out.extend(chunk)
        return True

    await client.download_to("a1", "v1", deliver, **kw)
    return bytes(out)


def ranges(store: Store) -> list[str | None]:
    return [r.headers.get("range") for r in store.blob]


def test_parts_in_parallel_in_order() -> None:
    store = Store()
    assert run(lambda: fetch_all(client_for(store))) == OBJECT
    assert store.api_requests == 1
    assert ranges(store)[0] == f"bytes=0-{PART - 1}"
    assert sorted(ranges(store)) == sorted(
        f"bytes={s}-{min(s + PART, len(OBJECT)) - 1}" for s in range(0, len(OBJECT), PART))
    assert all(r.headers.get("if-range") == '"e1"' for r in store.blob[1:])
    assert 2 < store.peak <= vm0fs.api.PARTS_IN_FLIGHT


def test_a_fast_first_stream_goes_on_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A first answer faster than FAST_STREAM: no parts; once its range is in, the rest
    comes as one request, at once."""
    monkeypatch.setattr(vm0fs.api, "FAST_STREAM", 0)
    monkeypatch.setattr(vm0fs.api, "RATE_PROBE", PART // 4)
    store = Store()
    assert run(lambda: fetch_all(client_for(store))) == OBJECT
    assert ranges(store) == [f"bytes=0-{PART - 1}", f"bytes={PART}-"]


def test_small_archive_is_one_request() -> None:
    store = Store(OBJECT[:1000])
    assert run(lambda: fetch_all(client_for(store))) == OBJECT[:1000]
    assert ranges(store) == [f"bytes=0-{PART - 1}"]


def test_empty_archive() -> None:
    store = Store(b"")
    assert run(lambda: fetch_all(client_for(store))) == b""


def test_memory_is_bounded_by_the_parts_in_flight() -> None:
    """A slow consumer: parts wait in memory, but never more than the parts in flight."""
    store = Store()
    client = client_for(store)
    most = 0

    async def go() -> bytes:
        nonlocal most
        out = bytearray()

        async def deliver(chunk: bytes) -> bool:
            nonlocal most
            out.extend(chunk)
            await trio.sleep(0.002)
            requested = sum(int(m[2]) - int(m[1]) + 1 for r in store.blob
                            if (m := re.fullmatch(r"bytes=(\d+)-(\d+)", r.headers["range"])))
            most = max(most, requested - len(out))
            return True

        await client.download_to("a1", "v1", deliver)
        return bytes(out)

    assert run(go) == OBJECT
    assert most <= vm0fs.api.PARTS_IN_FLIGHT * PART


def test_stop_early() -> None:
    store = Store()
    client = client_for(store)

    async def go() -> int:
        got = 0

        async def deliver(chunk: bytes) -> bool:
            nonlocal got
            got += len(chunk)
            return got < 3 * PART

        await client.download_to("a1", "v1", deliver)
        return got

    assert 3 * PART <= run(go) < 4 * PART
    assert store.active == 0


def test_server_that_ignores_range_is_one_stream() -> None:
    store = Store()
    store.ignore_range = True
    assert run(lambda: fetch_all(client_for(store))) == OBJECT
    assert len(store.blob) == 1  # the 200 to the first Range is the whole download


def test_wrong_content_range_at_the_first_answer() -> None:
    store = Store()
    store.shift_range_from = 0
    assert run(lambda: fetch_all(client_for(store))) == OBJECT
    assert ranges(store) == [f"bytes=0-{PART - 1}", None]  # then one plain GET


def test_wrong_content_range_on_a_later_part() -> None:
    store = Store()
    store.shift_range_from = 5 * PART
    assert run(lambda: fetch_all(client_for(store))) == OBJECT
    # The rest came as one stream from where the parts in order had got to; that stream's
    # own Range is mangled too, so it ends as a plain GET whose first bytes are skipped.
    assert ranges(store)[-1] is None


def test_no_content_length() -> None:
    store = Store()
    store.no_length = True
    assert run(lambda: fetch_all(client_for(store))) == OBJECT
    assert ranges(store) == [f"bytes=0-{PART - 1}", None]


def test_etag_change_between_parts_same_bytes() -> None:
    store = Store()
    store.etag_after = 4
    assert run(lambda: fetch_all(client_for(store))) == OBJECT


def test_etag_change_between_parts_other_bytes_fails() -> None:
    """The object really changed: the bytes handed over are of the old one, so the download
    fails rather than hand over a mix (the next attempt starts afresh)."""
    store = Store()
    store.etag_after = 4
    store.data_after = bytes(len(OBJECT))
    with pytest.raises(ApiError, match="changed"):
        run(lambda: fetch_all(client_for(store)))


@pytest.mark.parametrize("how", ["fail", "cut"])
def test_a_failed_part_is_retried_alone(how: str) -> None:
    store = Store()
    getattr(store, how).add(6)
    assert run(lambda: fetch_all(client_for(store))) == OBJECT
    parts = -(-len(OBJECT) // PART)
    assert len(store.blob) == parts + 1
    again = ranges(store)[5]  # the sixth request (numbered from 1)
    # A failed part asks its range again; a cut one, what it still lacks.
    assert again is not None and ranges(store).count(again) == (2 if how == "fail" else 1)


def test_expired_link_is_replaced_once() -> None:
    """The link expires under parts in flight: one of them asks the API for a new link, the
    others take it; the download goes on where it was."""
    store = Store()
    store.expire_after = 5
    assert run(lambda: fetch_all(client_for(store))) == OBJECT
    parts = -(-len(OBJECT) // PART)
    assert store.api_requests == parts // 5 + 1
    assert all(store.uses[sig] <= 5 + vm0fs.api.PARTS_IN_FLIGHT for sig in store.uses)
    assert store.clock.sleeps == []  # an expired link is replaced at once, with no backoff


def test_single_stream_download_is_unchanged() -> None:
    """`download` (one stream) sends no Range at first, as before."""
    store = Store()
    client = client_for(store)

    async def go() -> bytes:
        out = bytearray()
        async for chunk in client.download("a1", "v1"):
            out += chunk
        return bytes(out)

    assert run(go) == OBJECT
    assert ranges(store) == [None]


def test_uses_the_base_url() -> None:
    assert BASE.startswith("https://")
