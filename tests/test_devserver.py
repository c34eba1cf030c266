"""`vm0fs dev-server`, driven over real HTTP as a subprocess (see the dev_server fixture)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import pytest
from conftest import HTTP_TIMEOUT, DevServer

from vm0fs import devserver, samples
from vm0fs.samples import SampleVersion, directory, file, make_tar_gz, symlink

Start = Callable[..., DevServer]

# Two text files (17 bytes), a directory entry (not counted) and a symlink (counted).
SMALL = [
    directory("docs"),
    file("docs/a.txt", "hello\n"),
    file("b.txt", "world, again\n", 0o755),
    symlink("link", "b.txt"),
]


def big_archive(n: int = 200_000, seed: int = 7) -> bytes:
    """Incompressible, so the archive itself is about n bytes."""
    return make_tar_gz([file("blob.bin", random.Random(seed).randbytes(n))])


def ts(i: int) -> str:
    return datetime.fromtimestamp(1_700_000_000 + i * 3600, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def one_artifact(data: Path, folder: str = "art", content: bytes | None = None) -> Path:
    return samples.write_artifact(
        data, folder, [SampleVersion("v1.tar.gz", content or make_tar_gz(SMALL), "first", ts(1))]
    )


def art_id(folder: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"vm0fs-dev:{folder}"))


def download_location(c: httpx.Client, aid: str, **params: str) -> str:
    r = c.get(f"/v1/artifacts/{aid}/download", params=params)
    assert r.status_code == 302, r.text
    return r.headers["location"]


def fetch(url: str, **kwargs: object) -> httpx.Response:
    return httpx.get(url, timeout=HTTP_TIMEOUT, **kwargs)  # type: ignore[arg-type]


def poll(fn: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.05)


def assert_error(r: httpx.Response, status: int, type_: str, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert err["type"] == type_
    assert isinstance(err["message"], str) and err["message"]
    if code:
        assert err["code"] == code
    return err


# --- auth, routing --------------------------------------------------------------------------


def test_auth_required_with_error_body(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path)
    srv = dev_server(tmp_path)
    with srv.client(auth=False) as c:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "dev-token"}):
            r = c.get("/v1/artifacts", headers=headers)
            assert_error(r, 401, "authentication_error", "invalid_api_key")
            uuid.UUID(r.headers["x-request-id"])
        assert_error(c.get(f"/v1/artifacts/{art_id('art')}"), 401, "authentication_error")
    with srv.client() as c:
        r = c.get("/v1/artifacts")
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json"
        assert int(r.headers["content-length"]) == len(r.content)
        uuid.UUID(r.headers["x-request-id"])


def test_token_from_env_and_default(dev_server: Start, tmp_path: Path) -> None:
    srv = dev_server(tmp_path, token=None, env={"VM0_API_KEY": "from-env"})
    assert srv.token == "from-env"
    with srv.client() as c:
        assert c.get("/v1/artifacts").status_code == 200
    with srv.client(auth=False) as c:
        r = c.get("/v1/artifacts", headers={"Authorization": "Bearer dev-token"})
        assert r.status_code == 401
    assert "the token is the value of $VM0_API_KEY" in srv.log()  # said, as it may be real
    srv2 = dev_server(tmp_path, token=None)
    assert srv2.token == "dev-token"
    with srv2.client() as c:
        assert c.get("/v1/artifacts").status_code == 200
    assert "VM0_API_KEY" not in srv2.log()


def test_unknown_routes_404(dev_server: Start, tmp_path: Path) -> None:
    srv = dev_server(tmp_path)
    with srv.client() as c:
        for path in ("/v1/nope", "/v2/artifacts", "/", "/v1/artifacts/x/y/z", "/_dev/nope"):
            assert_error(c.get(path), 404, "not_found_error")


def test_sigint_and_sigterm_exit_zero(dev_server: Start, tmp_path: Path) -> None:
    srv = dev_server(tmp_path)
    srv.proc.send_signal(signal.SIGINT)
    assert srv.proc.wait(10) == 0
    assert dev_server(tmp_path).stop() == 0


def test_missing_data_dir_fails(tmp_path: Path) -> None:
    from conftest import start_dev_server

    with pytest.raises(RuntimeError, match="data dir not found.*add --demo"):
        start_dev_server(tmp_path / "missing", log_path=tmp_path / "log")


@pytest.mark.parametrize("args", [["--port", "0"], ["--data-dir", ".", "--port", "x"],
                                  ["--data-dir", ".", "--frobnicate"]], ids=" ".join)
def test_usage_mistakes_are_one_line(args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "vm0fs.cli", "dev-server", *args],
                            capture_output=True, text=True, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("vm0fs dev-server: ") and "--help" in lines[0]


def test_a_temporary_log_is_removed_with_its_server(tmp_path: Path) -> None:
    from conftest import start_dev_server

    srv = start_dev_server(tmp_path)  # no log_path: a temporary file
    assert srv.log_path.exists()
    srv.stop()
    assert not srv.log_path.exists()


# --- listing and pagination -----------------------------------------------------------------


def test_list_pagination_newest_first(dev_server: Start, tmp_path: Path) -> None:
    for i in range(25):
        samples.write_artifact(
            tmp_path, f"a{i:02d}", [SampleVersion("v.tar.gz", [file("n.txt", str(i))], None, ts(i))]
        )
    srv = dev_server(tmp_path)
    seen: list[str] = []
    pages = []
    cursor = None
    with srv.client() as c:
        for _ in range(10):  # bounded: 3 pages expected
            params = {"limit": "10", **({"cursor": cursor} if cursor else {})}
            body = c.get("/v1/artifacts", params=params).json()
            pages.append(len(body["data"]))
            seen += [a["id"] for a in body["data"]]
            if not body["pagination"]["has_more"]:
                assert body["pagination"]["next_cursor"] is None
                break
            cursor = body["pagination"]["next_cursor"]
            assert cursor == body["data"][-1]["id"]
        assert pages == [10, 10, 5]
        assert seen == [art_id(f"a{i:02d}") for i in reversed(range(25))]
        default = c.get("/v1/artifacts").json()
        assert len(default["data"]) == 20 and default["pagination"]["has_more"]
        assert len(c.get("/v1/artifacts", params={"limit": "100"}).json()["data"]) == 25


@pytest.mark.parametrize("limit", ["0", "101", "abc", "-1", "1.5", "1e2"])
def test_limit_validation(dev_server: Start, tmp_path: Path, limit: str) -> None:
    one_artifact(tmp_path)
    srv = dev_server(tmp_path)
    with srv.client() as c:
        err = assert_error(
            c.get("/v1/artifacts", params={"limit": limit}), 400, "invalid_request_error"
        )
        assert err["param"] == "limit"
        r = c.get(f"/v1/artifacts/{art_id('art')}/versions", params={"limit": limit})
        assert_error(r, 400, "invalid_request_error")


def test_unknown_cursor_400(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path)
    srv = dev_server(tmp_path)
    with srv.client() as c:
        r = c.get("/v1/artifacts", params={"cursor": str(uuid.uuid4())})
        assert_error(r, 400, "invalid_request_error")


def test_empty_data_dir(dev_server: Start, tmp_path: Path) -> None:
    srv = dev_server(tmp_path)
    with srv.client() as c:
        body = c.get("/v1/artifacts").json()
    assert body == {"data": [], "pagination": {"has_more": False, "next_cursor": None}}


# --- artifacts and versions -----------------------------------------------------------------


def test_get_artifact_fields(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path)
    srv = dev_server(tmp_path)
    archive = (tmp_path / "art" / "v1.tar.gz").read_bytes()
    vid = hashlib.sha256(archive).hexdigest()
    with srv.client() as c:
        a = c.get(f"/v1/artifacts/{art_id('art')}").json()
    version = {
        "id": vid,
        "artifact_id": art_id("art"),
        "size": len("hello\n") + len("world, again\n"),
        "file_count": 3,  # two files and a symlink, not the directory
        "message": "first",
        "created_by": "agent",
        "created_at": ts(1),
    }
    assert a == {
        "id": art_id("art"),
        "name": "art",
        "current_version_id": vid,
        "size": version["size"],
        "file_count": 3,
        "current_version": version,
        "created_at": ts(1),
        "updated_at": ts(1),
    }


def test_get_unknown_artifact_404(dev_server: Start, tmp_path: Path) -> None:
    srv = dev_server(tmp_path)
    missing = str(uuid.uuid4())
    with srv.client() as c:
        for path in (
            f"/v1/artifacts/{missing}",
            f"/v1/artifacts/{missing}/versions",
            f"/v1/artifacts/{missing}/download",
        ):
            err = assert_error(c.get(path), 404, "not_found_error", "resource_not_found")
            assert err["message"] == f"No such artifact: '{missing}'"


def test_sidecar_overrides_and_shared_names(dev_server: Start, tmp_path: Path) -> None:
    fixed = "3f2b8c1e-0000-4000-8000-000000000001"
    samples.write_artifact(
        tmp_path,
        "one",
        [SampleVersion("x.tar.gz", SMALL, None, ts(1))],
        artifact_id=fixed,
        name="shared",
    )
    samples.write_artifact(
        tmp_path, "two", [SampleVersion("x.tar.gz", SMALL[:2], None, ts(2), "user")], name="shared"
    )
    samples.write_artifact(tmp_path, "empty", created_at=ts(0))
    sidecar = tmp_path / "one" / "artifact.json"
    side = json.loads(sidecar.read_text())
    side["versions"]["x.tar.gz"]["message"] = None
    sidecar.write_text(json.dumps(side))
    srv = dev_server(tmp_path)
    with srv.client() as c:
        data = c.get("/v1/artifacts").json()["data"]
        assert [(a["id"], a["name"]) for a in data] == [
            (art_id("two"), "shared"),
            (fixed, "shared"),
            (art_id("empty"), "empty"),
        ]
        assert data[0]["current_version"]["created_by"] == "user"
        assert data[0]["current_version"]["message"] == "Version 1"  # the default
        assert data[1]["current_version"]["message"] is None  # explicit null in the sidecar
        empty = c.get(f"/v1/artifacts/{art_id('empty')}").json()
        assert empty["current_version_id"] is None and empty["current_version"] is None
        assert (empty["size"], empty["file_count"]) == (0, 0)
        assert empty["created_at"] == empty["updated_at"] == ts(0)
        assert c.get(f"/v1/artifacts/{art_id('empty')}/versions").json()["data"] == []
        assert_error(c.get(f"/v1/artifacts/{art_id('empty')}/download"), 404, "not_found_error")


def test_versions_listing_and_current(dev_server: Start, tmp_path: Path) -> None:
    samples.write_artifact(
        tmp_path,
        "art",
        [
            SampleVersion("a.tar.gz", [file("f", "1")], "one", ts(1)),
            SampleVersion("b.tar.gz", [file("f", "22")], "two", ts(2), "user"),
            SampleVersion("c.tar.gz", [file("f", "333")], None, ts(3)),
        ],
        current="b.tar.gz",  # not the newest: current is not necessarily the first item
    )
    srv = dev_server(tmp_path)
    with srv.client() as c:
        body = c.get(f"/v1/artifacts/{art_id('art')}/versions").json()
        data = body["data"]
        assert body["pagination"] == {"has_more": False, "next_cursor": None}
        assert [v["size"] for v in data] == [3, 2, 1]
        assert [v["message"] for v in data] == ["Version 3", "two", "one"]
        assert [v["created_at"] for v in data] == [ts(3), ts(2), ts(1)]
        assert all(v["artifact_id"] == art_id("art") and len(v["id"]) == 64 for v in data)
        a = c.get(f"/v1/artifacts/{art_id('art')}").json()
        assert a["current_version_id"] == data[1]["id"] == a["current_version"]["id"]
        assert a["current_version"] == data[1]
        assert (a["created_at"], a["updated_at"]) == (ts(1), ts(3))
        page1 = c.get(f"/v1/artifacts/{art_id('art')}/versions", params={"limit": 2}).json()
        assert page1["pagination"] == {"has_more": True, "next_cursor": data[1]["id"]}
        page2 = c.get(
            f"/v1/artifacts/{art_id('art')}/versions", params={"limit": 2, "cursor": data[1]["id"]}
        ).json()
        assert page2["data"] == data[2:] and not page2["pagination"]["has_more"]
        # Downloading without a version gives the current one.
        loc = download_location(c, art_id("art"))
        assert f"/blobs/{data[1]['id']}/" in loc


def test_mtime_defaults_without_sidecar(dev_server: Start, tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    for i, name in enumerate(["old.tar.gz", "new.tar.gz"]):
        samples.write_bytes_atomic(
            folder / name, make_tar_gz([file("f", name)]), 1_600_000_000 + i * 60
        )
    (folder / "notes.txt").write_text("not a version")
    srv = dev_server(tmp_path)
    with srv.client() as c:
        a = c.get(f"/v1/artifacts/{art_id('plain')}").json()
        versions = c.get(f"/v1/artifacts/{art_id('plain')}/versions").json()["data"]
    assert a["name"] == "plain"
    assert a["created_at"] == "2020-09-13T12:26:40Z"
    assert a["updated_at"] == "2020-09-13T12:27:40Z" == a["current_version"]["created_at"]
    assert [v["message"] for v in versions] == ["Version 2", "Version 1"]
    assert a["current_version_id"] == versions[0]["id"]


def test_version_added_while_running(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path)
    srv = dev_server(tmp_path)
    with srv.client() as c:
        before = c.get(f"/v1/artifacts/{art_id('art')}").json()
        samples.write_artifact(
            tmp_path, "art", [SampleVersion("v2.tar.gz", [file("new", "x")], "second", ts(5))]
        )
        samples.write_artifact(tmp_path, "late", [SampleVersion("v.tar.gz", SMALL, None, ts(9))])
        after = c.get(f"/v1/artifacts/{art_id('art')}").json()
        assert after["current_version_id"] != before["current_version_id"]
        assert after["current_version"]["message"] == "second"
        assert len(c.get(f"/v1/artifacts/{art_id('art')}/versions").json()["data"]) == 2
        ids = [a["id"] for a in c.get("/v1/artifacts").json()["data"]]
        assert ids == [art_id("late"), art_id("art")]
        content = fetch(download_location(c, art_id("art"))).content
        assert content == (tmp_path / "art" / "v2.tar.gz").read_bytes()


def test_garbage_and_empty_archives(dev_server: Start, tmp_path: Path) -> None:
    garbage = b"this is not gzip at all" * 10
    truncated = big_archive(50_000)[:20_000]
    empty = make_tar_gz([])
    dirs_only = make_tar_gz([directory("d")])
    for folder, data in (
        ("garbage", garbage),
        ("truncated", truncated),
        ("empty", empty),
        ("dirs", dirs_only),
    ):
        one_artifact(tmp_path, folder, data)
    srv = dev_server(tmp_path)
    with srv.client() as c:
        for folder, data in (("garbage", garbage), ("truncated", truncated)):
            a = c.get(f"/v1/artifacts/{art_id(folder)}").json()
            assert (a["file_count"], a["size"]) == (1, len(data))
            assert fetch(download_location(c, art_id(folder))).content == data
        for folder in ("empty", "dirs"):
            a = c.get(f"/v1/artifacts/{art_id(folder)}").json()
            assert (a["file_count"], a["size"]) == (0, 0)
            r = c.get(f"/v1/artifacts/{art_id(folder)}/download")
            assert_error(r, 404, "not_found_error", "resource_not_found")
            r = c.get(
                f"/v1/artifacts/{art_id(folder)}/download",
                params={"version_id": a["current_version_id"]},
            )
            assert_error(r, 404, "not_found_error")


# --- downloads and the blob origin ----------------------------------------------------------


def test_download_redirects_to_blob_origin(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path, content=big_archive())
    archive = (tmp_path / "art" / "v1.tar.gz").read_bytes()
    srv = dev_server(tmp_path)
    with srv.client() as c:
        r = c.get(f"/v1/artifacts/{art_id('art')}/download")
        assert r.status_code == 302
        assert r.headers["content-length"] == "0"
        loc = r.headers["location"]
        assert loc.startswith(srv.blob_url + "/blobs/") and srv.blob_url != srv.url
        assert urlsplit(loc).port != urlsplit(srv.url).port
        q = parse_qs(urlsplit(loc).query)
        assert q["artifact"] == [art_id("art")]
        assert 3500 < int(q["expires"][0]) - time.time() <= 3600
        vid = c.get(f"/v1/artifacts/{art_id('art')}").json()["current_version_id"]
        assert urlsplit(loc).path == f"/blobs/{vid}/archive.tar.gz"
        # httpx drops Authorization on a cross-origin redirect, as a client must.
        followed = c.get(f"/v1/artifacts/{art_id('art')}/download", follow_redirects=True)
    assert followed.status_code == 200 and followed.content == archive
    blob = fetch(loc)
    assert blob.status_code == 200
    assert blob.content == archive
    assert blob.headers["content-type"] == "application/gzip"
    assert blob.headers["content-length"] == str(len(archive))
    assert blob.headers["etag"] == f'"{vid}"'
    assert blob.headers["accept-ranges"] == "bytes"
    head = httpx.head(loc, timeout=HTTP_TIMEOUT)
    assert head.status_code == 200 and head.headers["content-length"] == str(len(archive))


def test_blob_ranges(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path, content=big_archive())
    archive = (tmp_path / "art" / "v1.tar.gz").read_bytes()
    size = len(archive)
    srv = dev_server(tmp_path)
    with srv.client() as c:
        loc = download_location(c, art_id("art"))
    cases = {
        "bytes=10-19": (10, 19),
        f"bytes={size - 100}-": (size - 100, size - 1),
        "bytes=-50": (size - 50, size - 1),
        f"bytes=100-{size + 1000}": (100, size - 1),
        "bytes=0-0": (0, 0),
    }
    with httpx.Client(timeout=HTTP_TIMEOUT) as blob:  # one keep-alive connection for all
        for header, (start, end) in cases.items():
            r = blob.get(loc, headers={"Range": header})
            assert r.status_code == 206, header
            assert r.content == archive[start : end + 1]
            assert r.headers["content-range"] == f"bytes {start}-{end}/{size}"
            assert r.headers["content-length"] == str(end - start + 1)
        for header in (f"bytes={size}-", f"bytes={size + 5}-{size + 10}", "bytes=-0"):
            r = blob.get(loc, headers={"Range": header})
            assert r.status_code == 416, header
            assert r.headers["content-range"] == f"bytes */{size}"
            assert b"<Code>InvalidRange</Code>" in r.content
            assert r.headers["content-length"] == str(len(r.content))
            assert r.headers["etag"] and r.headers["accept-ranges"] == "bytes"
        # A malformed or multi-range header is ignored: the whole object.
        for header in ("bytes=5-2", "items=0-1", "bytes=0-1,5-6", "bytes=-", "bytes=a-b"):
            r = blob.get(loc, headers={"Range": header})
            assert r.status_code == 200 and r.content == archive
            assert "content-range" not in r.headers
        r = blob.get(loc, headers={"Range": "Bytes=3-4"})  # the unit is case-insensitive
        assert (r.status_code, r.content) == (206, archive[3:5])


def test_blob_if_range(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path, content=big_archive(20_000))
    archive = (tmp_path / "art" / "v1.tar.gz").read_bytes()
    srv = dev_server(tmp_path)
    with srv.client() as c:
        loc = download_location(c, art_id("art"))
    with httpx.Client(timeout=HTTP_TIMEOUT) as blob:
        etag = blob.head(loc).headers["etag"]
        r = blob.get(loc, headers={"Range": "bytes=100-199", "If-Range": etag})
        assert (r.status_code, r.content) == (206, archive[100:200])
        assert r.headers["etag"] == etag
        others = ('"0000"', f"W/{etag}", "Wed, 21 Oct 2015 07:28:00 GMT", etag.strip('"'))
        for validator in others:
            for rng in ("bytes=100-199", f"bytes={len(archive)}-"):  # even an unsatisfiable one
                r = blob.get(loc, headers={"Range": rng, "If-Range": validator})
                assert r.status_code == 200, (validator, rng)
                assert r.content == archive
                assert r.headers["content-length"] == str(len(archive))
                assert "content-range" not in r.headers


def test_blob_ranges_of_an_empty_object(dev_server: Start, tmp_path: Path) -> None:
    # Not an archive at all: still served, as 0 bytes.
    samples.write_artifact(tmp_path, "art", [SampleVersion("v1.tar.gz", b"", None, ts(1))])
    srv = dev_server(tmp_path)
    with srv.client() as c:
        loc = download_location(c, art_id("art"))
    with httpx.Client(timeout=HTTP_TIMEOUT) as blob:
        r = blob.get(loc)
        assert (r.status_code, r.content, r.headers["content-length"]) == (200, b"", "0")
        for header in ("bytes=0-", "bytes=0-0", "bytes=-5"):
            r = blob.get(loc, headers={"Range": header})
            assert r.status_code == 416, header
            assert r.headers["content-range"] == "bytes */0"


def test_blob_rejects_authorization_forgery_and_expiry(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path)
    srv = dev_server(tmp_path)
    with srv.client() as c:
        loc = download_location(c, art_id("art"))
    r = fetch(loc, headers=srv.auth)
    assert r.status_code == 400
    assert int(r.headers["content-length"]) == len(r.content)
    parts = urlsplit(loc)
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}

    def with_query(**changes: str) -> str:
        return urlunsplit(parts._replace(query=urlencode({**q, **changes})))

    assert fetch(with_query(sig="0" * 64)).status_code == 403
    assert fetch(with_query(expires=str(int(q["expires"]) + 10))).status_code == 403
    assert fetch(with_query(artifact=str(uuid.uuid4()))).status_code == 403
    assert fetch(with_query(nonce="0" * 16)).status_code == 403
    no_sig = urlunsplit(parts._replace(query=""))
    assert fetch(no_sig).status_code == 403
    assert fetch(loc).status_code == 200  # the genuine link still works
    srv.set_faults(link_ttl=0)
    with srv.client() as c:
        expired = download_location(c, art_id("art"))
    assert fetch(expired).status_code == 403


def test_link_ttl_flag(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path)
    srv = dev_server(tmp_path, "--link-ttl", "0")
    with srv.client() as c:
        assert fetch(download_location(c, art_id("art"))).status_code == 403


def test_version_prefixes(dev_server: Start, tmp_path: Path) -> None:
    samples.write_artifact(
        tmp_path,
        "art",
        [
            SampleVersion("a.tar.gz", [file("f", "1")], None, ts(1)),
            SampleVersion("b.tar.gz", [file("f", "2")], None, ts(2)),
        ],
    )
    srv = dev_server(tmp_path)
    with srv.client() as c:
        old = c.get(f"/v1/artifacts/{art_id('art')}/versions").json()["data"][1]["id"]
        path = f"/blobs/{old}/archive.tar.gz"
        assert urlsplit(download_location(c, art_id("art"), version_id=old)).path == path
        assert urlsplit(download_location(c, art_id("art"), version_id=old[:8])).path == path
        assert urlsplit(download_location(c, art_id("art"), versionId=old[:12])).path == path
        both = download_location(c, art_id("art"), version_id=old[:10], versionId=old[:10])
        assert urlsplit(both).path == path
        for ref in (old[:7], "0" * 64, "zzzzzzzzzz", old + "0"):
            r = c.get(f"/v1/artifacts/{art_id('art')}/download", params={"version_id": ref})
            assert_error(r, 404, "not_found_error", "resource_not_found")


def _version(vid: str) -> devserver.Version:
    return devserver.Version(vid, "a", Path("x"), 1, 1, None, "agent", datetime.now(UTC))


def test_resolve_version_ambiguous_prefix() -> None:
    # Two real archives sharing 8 hex digits of SHA-256 cannot be built cheaply: unit-test it.
    a, b = _version("abcdef01" + "0" * 56), _version("abcdef01" + "1" * 56)
    versions = [a, b]
    assert devserver.resolve_version(versions, a.id) is a
    assert devserver.resolve_version(versions, "abcdef010") is a
    assert devserver.resolve_version(versions, "ABCDEF011") is b
    for ref in ("abcdef01", "abcdef0", ""):
        with pytest.raises(devserver.HttpError) as e:
            devserver.resolve_version(versions, ref)
        assert e.value.status == 404


# --- camelCase ------------------------------------------------------------------------------


CAMEL = {"currentVersionId", "fileCount", "createdAt", "updatedAt", "currentVersion"}


def test_camel_case_flag(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path)
    srv = dev_server(tmp_path, "--camel-case")
    with srv.client() as c:
        body = c.get("/v1/artifacts").json()
        assert set(body["pagination"]) == {"hasMore", "nextCursor"}
        a = body["data"][0]
        assert set(a) >= CAMEL and "current_version_id" not in a
        assert {"artifactId", "createdBy", "fileCount"} <= set(a["currentVersion"])
        v = c.get(f"/v1/artifacts/{art_id('art')}/versions").json()["data"][0]
        assert {"artifactId", "createdBy", "createdAt", "fileCount"} <= set(v)
        err = assert_error(c.get(f"/v1/artifacts/{uuid.uuid4()}"), 404, "not_found_error")
        assert "code" in err


def test_camel_case_runtime_fault(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path)
    srv = dev_server(tmp_path)
    with srv.client() as c:
        assert "current_version_id" in c.get(f"/v1/artifacts/{art_id('art')}").json()
        srv.set_faults(camel_case=True)
        assert set(c.get(f"/v1/artifacts/{art_id('art')}").json()) >= CAMEL
        srv.set_faults(camel_case=False)
        assert "current_version_id" in c.get(f"/v1/artifacts/{art_id('art')}").json()


# --- faults ---------------------------------------------------------------------------------


def test_faults_endpoint(dev_server: Start, tmp_path: Path) -> None:
    srv = dev_server(tmp_path, "--latency-ms", "5", "--blob-fail", "-1", "--reject-all")
    faults = srv.faults()
    assert set(faults) == set(devserver.FAULT_DEFAULTS)
    assert (faults["latency_ms"], faults["blob_fail"], faults["reject_all"]) == (5, -1, True)
    assert faults["link_ttl"] == 3600 and faults["camel_case"] is False
    merged = srv.set_faults(bandwidth=1000)
    assert merged["bandwidth"] == 1000 and merged["reject_all"] is True
    merged = srv.set_faults(api_stall=-1, blob_stall_after=0, blob_trickle_ms=0.5)
    assert (merged["api_stall"], merged["blob_stall_after"], merged["blob_trickle_ms"]) == (
        -1, 0, 0.5
    )
    merged = srv.set_faults(api_stall=0, blob_stall_after=-1)
    bad_faults = (
        {"nope": 1},
        {"fail_every": "x"},
        {"reject_all": 1},
        {"fail_every": -1},
        {"blob_stall_after": -2},
        {"api_stall": -2},
        {"etag_change_after": -1},
        {"range_wrong": 1},
        {"blob_ttfb_ms": True},
    )
    for bad in bad_faults:
        r = httpx.post(srv.url + "/_dev/faults", json=bad, timeout=HTTP_TIMEOUT)
        assert_error(r, 400, "invalid_request_error")
    r = httpx.post(srv.url + "/_dev/faults", content=b"[1]", timeout=HTTP_TIMEOUT)
    assert r.status_code == 400
    assert srv.faults() == merged


def test_object_store_fault_switches(dev_server: Start, tmp_path: Path) -> None:
    defaults = devserver.FAULT_DEFAULTS
    assert defaults["blob_stall_after"] == -1  # 0 is a stall right after the headers
    assert [defaults[k] for k in ("blob_ttfb_ms", "blob_trickle_ms", "api_stall")] == [0, 0, 0]
    srv = dev_server(
        tmp_path,
        *("--blob-ttfb-ms", "30", "--blob-stall-after", "0", "--blob-trickle-ms", "2.5"),
        *("--api-stall", "2", "--etag-change-after", "3", "--link-expire-after", "4"),
        *("--range-ignored", "--range-wrong", "--no-content-length"),
    )
    assert srv.faults() == {
        **defaults,
        "blob_ttfb_ms": 30,
        "blob_stall_after": 0,
        "blob_trickle_ms": 2.5,
        "api_stall": 2,
        "etag_change_after": 3,
        "link_expire_after": 4,
        "range_ignored": True,
        "range_wrong": True,
        "no_content_length": True,
    }


def test_fail_every(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path)
    srv = dev_server(tmp_path, "--fail-every", "3")
    with srv.client() as c:
        codes = [c.get("/v1/artifacts").status_code for _ in range(6)]
        assert codes == [200, 200, 500, 200, 200, 500]
        srv.set_faults(fail_every=2)  # posting faults restarts the count
        r1, r2 = c.get(f"/v1/artifacts/{art_id('art')}"), c.get("/v1/artifacts")
        assert r1.status_code == 200
        assert_error(r2, 500, "api_error")
        srv.set_faults(fail_every=0)
        assert all(c.get("/v1/artifacts").status_code == 200 for _ in range(4))


def test_throttle_every(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path)
    srv = dev_server(tmp_path)
    srv.set_faults(throttle_every=2)
    with srv.client() as c:
        assert c.get("/v1/artifacts").status_code == 200
        r = c.get(f"/v1/artifacts/{art_id('art')}/versions")
        assert_error(r, 429, "rate_limit_error")
        assert r.headers["retry-after"] == "1"
        assert c.get("/v1/artifacts").status_code == 200
        assert c.get("/v1/artifacts").status_code == 429


def test_reject_all(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path)
    srv = dev_server(tmp_path)
    with srv.client() as c:
        assert c.get("/v1/artifacts").status_code == 200
        srv.set_faults(reject_all=True)
        for path in ("/v1/artifacts", f"/v1/artifacts/{art_id('art')}/download"):
            assert_error(c.get(path), 401, "authentication_error", "invalid_api_key")
        srv.set_faults(reject_all=False)
        assert c.get("/v1/artifacts").status_code == 200


def test_truncate_blob(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path, content=big_archive())
    archive = (tmp_path / "art" / "v1.tar.gz").read_bytes()
    srv = dev_server(tmp_path, "--truncate-blob", "1")
    with srv.client() as c:
        loc = download_location(c, art_id("art"))
    got = bytearray()
    with httpx.Client(timeout=HTTP_TIMEOUT) as blob:
        with blob.stream("GET", loc) as r:
            assert r.status_code == 200
            expected = int(r.headers["content-length"])
            try:
                for chunk in r.iter_raw():
                    got += chunk
            except httpx.RemoteProtocolError:
                pass  # the usual outcome: the peer closed before Content-Length
        assert expected == len(archive)
        assert 0 < len(got) < expected
        assert bytes(got) == archive[: len(got)]
        assert blob.get(loc).content == archive  # the budget of 1 is spent
    srv.set_faults(truncate_blob=-1)
    for _ in range(2):
        with (
            httpx.Client(timeout=HTTP_TIMEOUT) as blob,
            blob.stream("GET", loc, headers={"Range": "bytes=1000-"}) as r,
        ):
            assert r.status_code == 206
            part = bytearray()
            with pytest.raises(httpx.RemoteProtocolError):
                for chunk in r.iter_raw():
                    part += chunk
            assert len(part) < len(archive) - 1000
    assert srv.faults()["truncate_blob"] == -1


def test_blob_fail(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path)
    srv = dev_server(tmp_path)
    srv.set_faults(blob_fail=2)
    with srv.client() as c:
        loc = download_location(c, art_id("art"))
    assert [fetch(loc).status_code for _ in range(3)] == [500, 500, 200]
    assert srv.faults()["blob_fail"] == 0


def test_bandwidth_and_latency_still_complete(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path, content=big_archive(100_000))
    archive = (tmp_path / "art" / "v1.tar.gz").read_bytes()
    srv = dev_server(tmp_path, "--bandwidth", "400000", "--latency-ms", "20")
    with srv.client() as c:
        assert c.get("/v1/artifacts").status_code == 200
        loc = download_location(c, art_id("art"))
    assert fetch(loc).content == archive
    assert fetch(loc, headers={"Range": "bytes=0-999"}).content == archive[:1000]


def test_bandwidth_caps_each_connection(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path, content=big_archive(450_000))
    archive = (tmp_path / "art" / "v1.tar.gz").read_bytes()
    srv = dev_server(tmp_path, "--bandwidth", "100000")
    with srv.client() as c:
        loc = download_location(c, art_id("art"))
    part = 100_000  # a second each at the cap; four at once under one shared cap: four seconds

    def ranged(i: int) -> tuple[bytes, float]:
        began = time.monotonic()
        r = fetch(loc, headers={"Range": f"bytes={i * part}-{(i + 1) * part - 1}"})
        assert r.status_code == 206
        return r.content, time.monotonic() - began

    began = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(ranged, range(4)))
    elapsed = time.monotonic() - began
    for i, (content, took) in enumerate(results):
        assert content == archive[i * part : (i + 1) * part]
        assert took >= 0.5  # each one is capped
    assert elapsed < 2.8  # but not all of them together
    assert srv.stats()["blob_peak"] >= 2


def test_blob_ttfb(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path, content=big_archive(20_000))
    archive = (tmp_path / "art" / "v1.tar.gz").read_bytes()
    srv = dev_server(tmp_path, "--blob-ttfb-ms", "1000")
    assert srv.faults()["blob_ttfb_ms"] == 1000
    with srv.client() as c:
        began = time.monotonic()
        loc = download_location(c, art_id("art"))
        assert time.monotonic() - began < 0.8  # the API is not delayed
    with httpx.Client(timeout=HTTP_TIMEOUT) as blob:
        for headers in ({}, {"Range": "bytes=0-9"}):
            began = time.monotonic()
            with blob.stream("GET", loc, headers=headers) as r:
                ttfb = time.monotonic() - began
                body = r.read()
            assert ttfb >= 0.9
            assert body == (archive[:10] if headers else archive)
        began = time.monotonic()
        forged = blob.get(loc.replace("sig=", "sig=0"))
        assert forged.status_code == 403 and time.monotonic() - began >= 0.9
    srv.set_faults(blob_ttfb_ms=0.5)
    assert srv.faults()["blob_ttfb_ms"] == 0.5
    assert fetch(loc).content == archive


def test_range_ignored(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path, content=big_archive(20_000))
    archive = (tmp_path / "art" / "v1.tar.gz").read_bytes()
    srv = dev_server(tmp_path, "--range-ignored")
    with srv.client() as c:
        loc = download_location(c, art_id("art"))
    with httpx.Client(timeout=HTTP_TIMEOUT) as blob:
        for header in ("bytes=10-19", "bytes=-5", f"bytes={len(archive)}-"):
            r = blob.get(loc, headers={"Range": header})
            assert (r.status_code, r.content) == (200, archive), header
            assert r.headers["content-length"] == str(len(archive))
            assert "content-range" not in r.headers
        srv.set_faults(range_ignored=False)
        assert blob.get(loc, headers={"Range": "bytes=10-19"}).status_code == 206


def test_range_wrong(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path, content=big_archive(20_000))
    archive = (tmp_path / "art" / "v1.tar.gz").read_bytes()
    size = len(archive)
    srv = dev_server(tmp_path)
    srv.set_faults(range_wrong=True)
    with srv.client() as c:
        loc = download_location(c, art_id("art"))
    cases = {
        "bytes=10-19": (11, 19),
        "bytes=100-": (101, size - 1),
        "bytes=-50": (size - 49, size - 1),
        "bytes=7-7": (6, 7),
        "bytes=0-0": (1, 1),
    }
    with httpx.Client(timeout=HTTP_TIMEOUT) as blob:
        for header, (start, end) in cases.items():
            r = blob.get(loc, headers={"Range": header})
            assert r.status_code == 206, header
            # The answer is consistent with itself, just not with what was asked.
            assert r.headers["content-range"] == f"bytes {start}-{end}/{size}", header
            assert r.headers["content-length"] == str(end - start + 1)
            assert r.content == archive[start : end + 1]
        assert blob.get(loc, headers={"Range": f"bytes={size}-"}).status_code == 416
        assert blob.get(loc).content == archive  # no Range: unchanged


def test_no_content_length(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path, content=big_archive(200_000))
    archive = (tmp_path / "art" / "v1.tar.gz").read_bytes()
    srv = dev_server(tmp_path, "--no-content-length")
    with srv.client() as c:
        loc = download_location(c, art_id("art"))
    with httpx.Client(timeout=HTTP_TIMEOUT) as blob:  # keep-alive: each chunked body ends cleanly
        for headers, want, status in (
            ({}, archive, 200),
            ({"Range": "bytes=5-"}, archive[5:], 206),
        ):
            r = blob.get(loc, headers=headers)
            assert (r.status_code, r.content) == (status, want)
            assert "content-length" not in r.headers
            assert r.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in blob.head(loc).headers
        r = blob.get(loc, headers={"Range": "bytes=-1"})
        assert (r.status_code, r.content) == (206, archive[-1:])
        srv.set_faults(truncate_blob=1)  # cut short: the last chunk never comes
        with blob.stream("GET", loc) as r, pytest.raises(httpx.RemoteProtocolError):
            r.read()
        srv.set_faults(no_content_length=False)
        assert blob.get(loc).headers["content-length"] == str(len(archive))


def test_etag_change_after(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path, content=big_archive(20_000))
    archive = (tmp_path / "art" / "v1.tar.gz").read_bytes()
    srv = dev_server(tmp_path, "--etag-change-after", "2")
    with srv.client() as c:
        loc = download_location(c, art_id("art"))
        vid = c.get(f"/v1/artifacts/{art_id('art')}").json()["current_version_id"]
    old = f'"{vid}"'
    with httpx.Client(timeout=HTTP_TIMEOUT) as blob:
        first = [blob.get(loc, headers={"Range": "bytes=0-99", "If-Range": old}) for _ in range(2)]
        assert [(r.status_code, r.headers["etag"]) for r in first] == [(206, old)] * 2
        r = blob.get(loc, headers={"Range": "bytes=0-99", "If-Range": old})
        new = r.headers["etag"]
        assert new != old and new.startswith('"') and new.endswith('"')
        assert (r.status_code, r.content) == (200, archive)  # the old validator fails
        for _ in range(2):  # replaced once: the new tag stays
            r = blob.get(loc, headers={"Range": "bytes=0-99", "If-Range": new})
            assert (r.status_code, r.headers["etag"], r.content) == (206, new, archive[:100])
        assert blob.head(loc).headers["etag"] == new
        srv.set_faults(etag_change_after=0)
        assert blob.get(loc).headers["etag"] == old


def test_link_expire_after(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path, content=big_archive(20_000))
    archive = (tmp_path / "art" / "v1.tar.gz").read_bytes()
    srv = dev_server(tmp_path)
    with srv.client() as c:
        old = download_location(c, art_id("art"))
        assert fetch(old).status_code == 200
        srv.set_faults(link_expire_after=3)  # counting starts now, old links too
        first = download_location(c, art_id("art"))
        codes = [fetch(first, headers={"Range": f"bytes={i}-"}).status_code for i in range(4)]
        assert codes == [206, 206, 403, 403]
        r = fetch(first)
        assert r.status_code == 403
        assert b"<Code>AccessDenied</Code>" in r.content
        assert b"Request has expired." in r.content
        assert [fetch(old).status_code for _ in range(3)] == [200, 200, 403]
        second = download_location(c, art_id("art"))  # a new link, even within the second
        assert second != first
        assert fetch(second, headers={"Range": "bytes=4-"}).content == archive[4:]
        srv.set_faults(link_expire_after=0)
        assert fetch(first).status_code == 200


# --- hostile servers: stalls and trickles -------------------------------------------------------

# Reads give up after 2 s: "the stall did not end within 2 s".
PATIENT = httpx.Timeout(HTTP_TIMEOUT, read=2.0)


def read_until_stuck(r: httpx.Response, got: bytearray) -> None:
    """Read r into got until the server has sent nothing for PATIENT's read timeout."""
    with pytest.raises(httpx.ReadTimeout):
        for chunk in r.iter_raw():
            got += chunk


def test_blob_stall_after(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path, content=big_archive(200_000))
    archive = (tmp_path / "art" / "v1.tar.gz").read_bytes()
    srv = dev_server(tmp_path, "--blob-stall-after", "1000")
    with srv.client() as c:
        loc = download_location(c, art_id("art"))
    got = bytearray()
    with (
        httpx.Client(timeout=PATIENT) as blob,
        blob.stream("GET", loc, headers={"Range": "bytes=100-"}) as r,
    ):
        assert r.status_code == 206
        assert r.headers["content-length"] == str(len(archive) - 100)  # all of it promised
        poll(lambda: srv.stats()["held"] == 1, 10, "a held answer")
        read_until_stuck(r, got)
    assert bytes(got) == archive[100:1100]
    poll(lambda: srv.stats()["held"] == 0, 10, "end of the hold once the client left")
    # A body of N bytes or less goes out whole; HEAD has no body to stall.
    assert fetch(loc, headers={"Range": "bytes=0-999"}).content == archive[:1000]
    assert fetch(loc, headers={"Range": "bytes=-10"}).content == archive[-10:]
    assert httpx.head(loc, timeout=PATIENT).status_code == 200
    srv.set_faults(blob_stall_after=0)  # headers only
    got = bytearray()
    with httpx.Client(timeout=PATIENT) as blob, blob.stream("GET", loc) as r:
        assert r.status_code == 200
        read_until_stuck(r, got)
    assert got == b""
    srv.set_faults(blob_stall_after=-1)
    assert fetch(loc).content == archive


def test_stopping_does_not_wait_for_held_answers(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path, content=big_archive(50_000))
    srv = dev_server(tmp_path, "--blob-stall-after", "0")
    with srv.client() as c:
        loc = download_location(c, art_id("art"))
    srv.set_faults(api_stall=-1)
    outcome: list[BaseException] = []

    def stalled_api_call() -> None:
        try:
            with srv.client() as c:
                c.get("/v1/artifacts")
        except httpx.HTTPError as exc:
            outcome.append(exc)

    caller = threading.Thread(target=stalled_api_call, daemon=True)
    caller.start()
    try:
        with httpx.Client(timeout=HTTP_TIMEOUT) as blob, blob.stream("GET", loc) as r:
            assert r.status_code == 200
            poll(lambda: srv.stats()["held"] == 2, 10, "two held answers")
            began = time.monotonic()
            assert srv.stop() == 0  # SIGTERM was enough: no SIGKILL after 10 s
            assert time.monotonic() - began < 5
            with pytest.raises(httpx.RemoteProtocolError):  # closed, not left hanging
                r.read()
    finally:
        caller.join(HTTP_TIMEOUT + 5)
    assert not caller.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], httpx.RemoteProtocolError)


def test_blob_trickle_ms(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path, content=big_archive(50_000))
    archive = (tmp_path / "art" / "v1.tar.gz").read_bytes()
    srv = dev_server(tmp_path, "--blob-trickle-ms", "20", "--bandwidth", "100000000")
    with srv.client() as c:
        loc = download_location(c, art_id("art"))
    began = time.monotonic()
    r = fetch(loc, headers={"Range": "bytes=10-19"})
    assert (r.status_code, r.content) == (206, archive[10:20])
    assert time.monotonic() - began >= 0.15  # 9 gaps of 20 ms
    # The whole body: bytes keep coming (no read timeout), but slowly.
    got = bytearray()
    srv.reset()
    timeout = httpx.Timeout(HTTP_TIMEOUT, read=1.0)
    with httpx.Client(timeout=timeout) as blob, blob.stream("GET", loc) as r:
        assert r.headers["content-length"] == str(len(archive))
        began = time.monotonic()
        for chunk in r.iter_raw():
            got += chunk
            if time.monotonic() - began > 1.5:
                break
        assert srv.stats()["blob_peak"] == 1
    assert 10 <= len(got) < 1000  # about 75
    assert bytes(got) == archive[: len(got)]

    def sending() -> int:
        srv.reset()  # blob_peak restarts from the bodies being sent right now
        return srv.stats()["blob_peak"]

    poll(lambda: sending() == 0, 10, "end of the trickle once the client left")
    srv.set_faults(blob_trickle_ms=0)
    assert fetch(loc).content == archive


def test_api_stall(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path)
    srv = dev_server(tmp_path, "--api-stall", "1")
    with srv.client(timeout=PATIENT) as c, pytest.raises(httpx.ReadTimeout):
        c.get("/v1/artifacts")  # the stall did not end within 2 s
    poll(lambda: srv.stats()["held"] == 0, 10, "end of the hold once the client left")
    assert srv.stats()["requests"]["list_artifacts"] == 1  # it did arrive
    assert srv.faults()["api_stall"] == 0  # the budget of one is spent
    with srv.client() as c:
        assert c.get("/v1/artifacts").status_code == 200
    srv.set_faults(api_stall=-1)
    outcome: list[BaseException] = []

    def stalled(path: str, auth: bool) -> None:
        try:
            with srv.client(auth=auth, timeout=httpx.Timeout(HTTP_TIMEOUT, read=3.0)) as c:
                c.get(path)
        except httpx.HTTPError as exc:
            outcome.append(exc)

    callers = [
        threading.Thread(target=stalled, args=args, daemon=True)
        for args in ((f"/v1/artifacts/{art_id('art')}/download", True), ("/v1/artifacts", False),
                     ("/v1/nope", True))
    ]
    for t in callers:
        t.start()
    try:
        # The control routes keep working meanwhile.
        poll(lambda: srv.stats()["held"] == 3, 10, "three held answers")
        assert srv.faults()["api_stall"] == -1
    finally:
        for t in callers:
            t.join(HTTP_TIMEOUT)
    assert not any(t.is_alive() for t in callers)
    assert len(outcome) == 3 and all(isinstance(e, httpx.ReadTimeout) for e in outcome)
    srv.set_faults(api_stall=0)
    with srv.client() as c:
        assert c.get("/v1/artifacts").status_code == 200


# --- the hold limit, in process -------------------------------------------------------------


@contextmanager
def in_process(data: Path) -> Iterator[tuple[str, devserver.State]]:
    """The two servers in threads of this process; yields (API URL, state)."""
    state = devserver.State({})
    app = devserver.App(devserver.Store(data), state, "dev-token")
    api = devserver._make_server("127.0.0.1", 0, devserver.ApiHandler, app)
    blobs = devserver._make_server("127.0.0.1", 0, devserver.BlobHandler, app)
    app.blob_origin = f"http://127.0.0.1:{blobs.server_address[1]}"
    threads = [
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        for s in (api, blobs)
    ]
    for t in threads:
        t.start()
    try:
        yield f"http://127.0.0.1:{api.server_address[1]}", state
    finally:
        state.stopping.set()
        for s in (api, blobs):
            s.shutdown()
            s.server_close()
        for t in threads:
            t.join(10)


def test_hold_limit_ends_stalls_and_trickles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(devserver, "HOLD_LIMIT", 1.0)
    one_artifact(tmp_path, content=big_archive(50_000))
    archive = (tmp_path / "art" / "v1.tar.gz").read_bytes()
    with in_process(tmp_path) as (url, state), httpx.Client(
        base_url=url, headers={"Authorization": "Bearer dev-token"}, timeout=HTTP_TIMEOUT
    ) as c:
        loc = download_location(c, art_id("art"))
        state.update_faults({"api_stall": -1})
        began = time.monotonic()
        with pytest.raises(httpx.RemoteProtocolError):  # closed unanswered after the limit
            c.get("/v1/artifacts")
        assert 0.9 <= time.monotonic() - began < HTTP_TIMEOUT
        for faults in ({"blob_stall_after": 10}, {"blob_trickle_ms": 50}):
            state.update_faults({"api_stall": 0, "blob_stall_after": -1, "blob_trickle_ms": 0})
            state.update_faults(faults)
            got = bytearray()
            began = time.monotonic()
            with (
                httpx.Client(timeout=HTTP_TIMEOUT) as blob,
                blob.stream("GET", loc) as r,
                pytest.raises(httpx.RemoteProtocolError),  # cut short after the limit
            ):
                for chunk in r.iter_raw():
                    got += chunk
            assert 0.9 <= time.monotonic() - began < HTTP_TIMEOUT, faults
            assert 0 < len(got) < 1000 and bytes(got) == archive[: len(got)], faults
        poll(lambda: state.stats()["held"] == 0, 10, "no held answer")


def test_stopping_ends_held_answers_in_process(tmp_path: Path) -> None:
    one_artifact(tmp_path, content=big_archive(50_000))
    outcome: list[BaseException] = []
    with in_process(tmp_path) as (url, state):
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer dev-token"}) as c:
            loc = download_location(c, art_id("art"))
        state.update_faults({"api_stall": -1, "blob_trickle_ms": 100})

        def call(fn: Callable[[], object]) -> threading.Thread:
            def run() -> None:
                try:
                    fn()
                except httpx.HTTPError as exc:
                    outcome.append(exc)

            t = threading.Thread(target=run, daemon=True)
            t.start()
            return t

        callers = [
            call(lambda: httpx.get(url + "/v1/artifacts", timeout=HTTP_TIMEOUT)),
            call(lambda: httpx.get(loc, timeout=HTTP_TIMEOUT)),
        ]
        poll(lambda: state.stats()["held"] == 1 and state.stats()["blob_bytes"] > 0, 10,
             "a held API answer and a trickle")
        state.stopping.set()  # what main() does first when it stops
        for t in callers:
            t.join(5)
        assert not any(t.is_alive() for t in callers)
        assert len(outcome) == 2
        assert all(isinstance(e, httpx.RemoteProtocolError) for e in outcome)
        assert state.stats()["held"] == 0


# --- stats ----------------------------------------------------------------------------------


def test_stats_counting_and_reset(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path)
    archive = (tmp_path / "art" / "v1.tar.gz").read_bytes()
    srv = dev_server(tmp_path)
    zero = {
        "requests": dict.fromkeys(
            ["list_artifacts", "get_artifact", "list_versions", "download", "blob"], 0
        ),
        "blob_bytes": 0,
        "blob_peak": 0,
        "held": 0,
    }
    assert srv.stats() == zero
    with srv.client() as c:
        c.get("/v1/artifacts")
        c.get("/v1/artifacts", headers={"Authorization": "Bearer wrong"})  # failed, still counted
        c.get(f"/v1/artifacts/{art_id('art')}")
        c.get(f"/v1/artifacts/{uuid.uuid4()}")
        c.get(f"/v1/artifacts/{art_id('art')}/versions")
        loc = download_location(c, art_id("art"))
        c.get("/v1/nope")  # no route: not counted
    fetch(loc)
    fetch(loc, headers={"Range": "bytes=0-9"})
    fetch(loc, headers=srv.auth)  # 400, counted, no bytes
    stats = srv.stats()
    assert stats["requests"] == {
        "list_artifacts": 2,
        "get_artifact": 2,
        "list_versions": 1,
        "download": 1,
        "blob": 3,
    }
    assert stats["blob_bytes"] == len(archive) + 10
    assert stats["blob_peak"] == 1  # one after the other
    srv.reset()
    assert srv.stats() == zero


# --- demo data and samples ------------------------------------------------------------------


def test_demo_fills_empty_dir(dev_server: Start, tmp_path: Path) -> None:
    data = tmp_path / "demo"  # missing: --demo creates and fills it
    srv = dev_server(data, "--demo")
    with srv.client() as c:
        arts = {a["name"]: a for a in c.get("/v1/artifacts").json()["data"]}
        assert {"training-run", "website-build", "eval-results"} <= set(arts)
        empty = [a for a in arts.values() if a["current_version"] is None]
        assert len(empty) == 1
        run = arts["training-run"]
        versions = c.get(f"/v1/artifacts/{run['id']}/versions").json()["data"]
        assert len(versions) == 3 and all(v["message"] for v in versions)
        assert sum(v["file_count"] for v in versions) >= 300
        archive = fetch(download_location(c, run["id"])).content
        assert (
            len(c.get(f"/v1/artifacts/{arts['website-build']['id']}/versions").json()["data"]) == 2
        )
        site = fetch(download_location(c, arts["website-build"]["id"])).content
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        link = tar.getmember("latest.log")
        assert link.issym() and link.linkname == "logs/epoch-003.log"
        assert "logs/epoch-003.log" in tar.getnames()
    with tarfile.open(fileobj=io.BytesIO(site), mode="r:gz") as tar:
        assert tar.getmember("scripts/deploy.sh").mode == 0o755
    # A second start on the now non-empty dir serves the same data without rewriting it.
    mtimes = {p: p.stat().st_mtime_ns for p in data.rglob("*")}
    srv.stop()
    srv2 = dev_server(data, "--demo")
    with srv2.client() as c:
        assert {a["name"] for a in c.get("/v1/artifacts").json()["data"]} == set(arts)
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == mtimes
    assert "not empty" not in srv2.log()  # the samples are there: nothing to say


def test_demo_leaves_non_empty_dir_alone(dev_server: Start, tmp_path: Path) -> None:
    one_artifact(tmp_path)
    srv = dev_server(tmp_path, "--demo")
    with srv.client() as c:
        assert [a["name"] for a in c.get("/v1/artifacts").json()["data"]] == ["art"]
    assert "is not empty, so --demo serves it as it is" in srv.log()  # and says so


def test_samples_are_deterministic(tmp_path: Path) -> None:
    assert make_tar_gz(SMALL) == make_tar_gz(SMALL)
    samples.write_demo_data(tmp_path / "a")
    samples.write_demo_data(tmp_path / "b")
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.tar.gz"))
    assert files_a and all(
        (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a
    )
    sidecar = json.loads((tmp_path / "a" / "training-run" / "artifact.json").read_text())
    assert set(sidecar["versions"]) == {"epoch-1.tar.gz", "epoch-2.tar.gz", "epoch-3.tar.gz"}


# --- the scan cache (in process) ------------------------------------------------------------


def test_scan_cache_avoids_rehashing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(5):
        one_artifact(tmp_path, f"a{i}")
    calls: list[Path] = []
    real = devserver.inspect_archive

    def counting(path: Path) -> devserver.ArchiveInfo:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(devserver, "inspect_archive", counting)
    store = devserver.Store(tmp_path)
    assert len(store.scan()) == 5 and len(calls) == 5
    store.scan()
    assert len(calls) == 5
    target = tmp_path / "a0" / "v1.tar.gz"
    samples.write_bytes_atomic(target, make_tar_gz([file("changed", "!")]))
    os.utime(target, ns=(1, 1))
    store.scan()
    assert calls[5:] == [target]


def test_one_artifact_rescans_its_folder_and_a_scan_may_answer_for_a_while(
        tmp_path: Path) -> None:
    for i in range(3):
        one_artifact(tmp_path, f"a{i}")
    store = devserver.Store(tmp_path)
    first = store.scan()
    one_artifact(tmp_path, "late")
    target = tmp_path / "a1" / "v2.tar.gz"
    samples.write_bytes_atomic(target, make_tar_gz([file("new", "!")]))
    assert len(store.get(first[1].id).versions) == 2  # its own folder, rescanned
    assert len(store.scan()) == 4  # by default every scan is a new one
    patient = devserver.Store(tmp_path, rescan_after=3600)
    assert len(patient.scan()) == 4
    one_artifact(tmp_path, "later")
    assert len(patient.scan()) == 4  # the last scan answers for an hour
    assert len(devserver.Store(tmp_path).scan()) == 5


def test_sidecar_timestamp_formats(dev_server: Start, tmp_path: Path) -> None:
    samples.write_artifact(
        tmp_path,
        "art",
        [
            SampleVersion("a.tar.gz", [file("f", "1")], None, "2024-01-02T03:04:05.678+00:00"),
            SampleVersion("b.tar.gz", [file("f", "2")], None, "2024-01-02T05:04:05+02:00"),
            SampleVersion("c.tar.gz", [file("f", "3")], None, "2024-01-02T03:04:06"),
        ],
    )
    srv = dev_server(tmp_path)
    with srv.client() as c:
        data = c.get(f"/v1/artifacts/{art_id('art')}/versions").json()["data"]
    assert [(v["size"], v["created_at"]) for v in data] == [
        (1, "2024-01-02T03:04:06Z"),  # naive: taken as UTC
        (1, "2024-01-02T03:04:05Z"),
        (1, "2024-01-02T03:04:05Z"),
    ]
    assert [v["message"] for v in data] == ["Version 3", "Version 2", "Version 1"]
