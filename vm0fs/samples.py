"""Deterministic sample artifacts for `vm0fs dev-server --demo` and for the tests.

Everything here is built in memory with tarfile and gzip with fixed timestamps and owners, so the
same call always produces byte-identical archives (and therefore the same version ids).

Reusable pieces:
    file(), directory(), symlink(), hardlink()   -> Member
    make_tar_gz(members)                         -> bytes of a .tar.gz
    write_artifact(data_dir, folder, versions)   -> one artifact folder in the dev-server layout
    write_demo_data(data_dir)                    -> the demo set
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

# 2024-01-01T00:00:00Z: a fixed member mtime keeps archives reproducible.
FIXED_MTIME = 1704067200

MemberKind = Literal["file", "dir", "symlink", "hardlink"]


@dataclass(frozen=True)
class Member:
    """One tar member. `target` is the link target for symlinks and hard links."""

    name: str
    data: bytes = b""
    mode: int = 0o644
    kind: MemberKind = "file"
    target: str = ""
    mtime: int = FIXED_MTIME


def file(name: str, data: bytes | str, mode: int = 0o644) -> Member:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return Member(name, raw, mode)


def directory(name: str, mode: int = 0o755) -> Member:
    return Member(name, b"", mode, "dir")


def symlink(name: str, target: str) -> Member:
    return Member(name, b"", 0o777, "symlink", target)


def hardlink(name: str, target: str) -> Member:
    return Member(name, b"", 0o644, "hardlink", target)


_TAR_TYPES: dict[MemberKind, bytes] = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
}


def make_tar_gz(members: Iterable[Member], *, fmt: int = tarfile.GNU_FORMAT) -> bytes:
    """Return a reproducible .tar.gz holding `members` in the given order.

    GNU format by default, like the archives agents write (long names as GNU long-name entries).
    """
    raw = io.BytesIO()
    # mtime=0 and an empty filename keep the gzip header free of anything time- or path-dependent.
    with (
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz,
        tarfile.TarFile(fileobj=gz, mode="w", format=fmt) as tar,
    ):
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = _TAR_TYPES[m.kind]
            info.mode = m.mode
            info.mtime = m.mtime
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if m.kind == "file":
                info.size = len(m.data)
                tar.addfile(info, io.BytesIO(m.data))
            else:
                info.linkname = m.target
                tar.addfile(info)
    return raw.getvalue()


@dataclass(frozen=True)
class SampleVersion:
    """One version to write: `content` is either members or ready-made archive bytes."""

    filename: str
    content: Sequence[Member] | bytes
    message: str | None = None
    created_at: str | None = None
    created_by: str | None = None


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def write_bytes_atomic(path: Path, data: bytes, mtime: float | None = None) -> None:
    """Write via a temporary name that does not end in .tar.gz, so a running dev-server
    never scans a half-written version."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    if mtime is not None:
        os.utime(tmp, (mtime, mtime))
    os.replace(tmp, path)


def write_artifact(
    data_dir: Path,
    folder: str,
    versions: Sequence[SampleVersion] = (),
    *,
    artifact_id: str | None = None,
    name: str | None = None,
    current: str | None = None,
    created_at: str | None = None,
) -> Path:
    """Create `data_dir/folder` with one .tar.gz per version and an artifact.json sidecar
    holding only the keys that were given. Returns the folder."""
    path = data_dir / folder
    path.mkdir(parents=True, exist_ok=True)
    sidecar: dict[str, Any] = {}
    if artifact_id is not None:
        sidecar["id"] = artifact_id
    if name is not None:
        sidecar["name"] = name
    if current is not None:
        sidecar["current"] = current
    if created_at is not None:
        sidecar["created_at"] = created_at
    meta: dict[str, dict[str, Any]] = {}
    for v in versions:
        data = v.content if isinstance(v.content, bytes) else make_tar_gz(v.content)
        # The file mtime matches created_at so the folder reads the same without the sidecar.
        write_bytes_atomic(path / v.filename, data, _epoch(v.created_at) if v.created_at else None)
        entry = {
            k: val
            for k, val in (
                ("message", v.message),
                ("created_at", v.created_at),
                ("created_by", v.created_by),
            )
            if val is not None
        }
        if entry:
            meta[v.filename] = entry
    if meta:
        sidecar["versions"] = meta
    if sidecar:
        (path / "artifact.json").write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return path


# --- the demo set ---------------------------------------------------------------------------


def _training_run(epochs: int) -> list[Member]:
    readme = (
        "# training-run\n\nFine-tuning run of a small text classifier.\n\n"
        "- `logs/`: one log per epoch (`latest.log` points at the newest)\n"
        "- `checkpoints/`: checkpoint metadata per epoch\n"
        "- `metrics/metrics.csv`: loss and accuracy per epoch\n"
        "- `data/samples/`: held-out samples with predictions\n"
    )
    config = (
        "model: distilbert-base-uncased\nlearning_rate: 3.0e-5\nbatch_size: 32\n"
        f"epochs: {epochs}\nseed: 1234\n"
    )
    members = [file("README.md", readme), file("config/train.yaml", config)]
    rows = ["epoch,train_loss,val_loss,val_accuracy"]
    for e in range(1, epochs + 1):
        loss = round(0.9 / e, 4)
        acc = round(0.70 + 0.07 * e, 4)
        rows.append(f"{e},{loss},{round(loss * 1.1, 4)},{acc}")
        log = "".join(
            f"[epoch {e}] step {s:04d} loss={round(loss + (100 - s) / 1000, 4)}\n"
            for s in range(0, 101, 10)
        )
        members.append(file(f"logs/epoch-{e:03d}.log", log))
        ckpt = {"epoch": e, "step": e * 1000, "val_accuracy": acc, "file": "model.safetensors"}
        members.append(
            file(f"checkpoints/epoch-{e:03d}/metadata.json", json.dumps(ckpt, indent=2) + "\n")
        )
    members.append(file("metrics/metrics.csv", "\n".join(rows) + "\n"))
    labels = ("positive", "negative", "neutral")
    for i in range(20 + 80 * epochs):
        text = f"id: {i}\ntext: sample sentence number {i}\nlabel: {labels[i % 3]}\n"
        members.append(file(f"data/samples/sample-{i:04d}.txt", text))
    if epochs >= 3:
        members.append(symlink("latest.log", f"logs/epoch-{epochs:03d}.log"))
        # A path past 100 bytes: stored as a GNU long-name entry.
        deep = "reports/" + "/".join(f"section-{n:02d}-of-the-final-report" for n in range(4))
        members.append(file(deep + "/summary.md", "# Final report\n\nAccuracy 0.91.\n"))
    return members


def _website(version: int) -> list[Member]:
    page = "<!doctype html>\n<html><head><title>{t}</title>{css}</head><body><h1>{t}</h1>" + (
        '<script src="/assets/js/app.js"></script></body></html>\n'
    )
    css = '<link rel="stylesheet" href="/assets/css/site.css">'
    members = [
        file("index.html", page.format(t="Home", css=css)),
        file("about/index.html", page.format(t="About", css=css)),
        file("blog/2024/03/hello-world/index.html", page.format(t="Hello, world", css=css)),
        file("assets/css/site.css", "body { font-family: sans-serif; margin: 2rem; }\n"),
        file(
            "assets/img/logo.svg",
            '<svg xmlns="http://www.w3.org/2000/svg" width="8" '
            'height="8"><rect width="8" height="8"/></svg>\n',
        ),
        file("robots.txt", "User-agent: *\nAllow: /\n"),
        file("scripts/deploy.sh", '#!/bin/sh\nset -eu\nrsync -a ./ "$DEPLOY_TARGET"\n', 0o755),
    ]
    if version == 1:
        members.append(file("assets/js/app.js", "console.log('site v1');\n"))
    else:
        members += [
            file("assets/js/app.js", "document.body.classList.toggle('dark', true);\n"),
            file("assets/css/dark.css", "body.dark { background: #111; color: #eee; }\n"),
            file("blog/2024/03/second-post/index.html", page.format(t="Second post", css=css)),
        ]
    return members


def _eval_results() -> list[Member]:
    # Shaped like an archive "from elsewhere": ./ prefixes, explicit directories, pax format.
    tasks = [f"task-{n:02d}" for n in range(1, 13)]
    results = {
        t: {"passed": n % 4 != 0, "score": round(0.5 + n / 30, 3)} for n, t in enumerate(tasks, 1)
    }
    members = [
        directory("./"),
        directory("./tasks"),
        file("./results.json", json.dumps(results, indent=2, sort_keys=True) + "\n"),
        file(
            "./summary.csv",
            "task,passed,score\n"
            + "".join(f"{t},{str(r['passed']).lower()},{r['score']}\n" for t, r in results.items()),
        ),
        directory("./notes"),
        file("./notes/résumé.md", "Résumé des résultats: 9/12 réussis.\n"),
    ]
    members += [
        file(f"./tasks/{t}.json", json.dumps({"task": t, **results[t]}) + "\n") for t in tasks
    ]
    return members


DEMO_ARTIFACTS = ("training-run", "website-build", "eval-results", "scratchpad")  # folders


def write_demo_data(data_dir: Path) -> None:
    """Fill `data_dir` with the demo artifacts (the same bytes on every call)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    write_artifact(
        data_dir,
        "training-run",
        [
            SampleVersion(
                "epoch-1.tar.gz",
                _training_run(1),
                "Epoch 1 complete",
                "2024-03-01T09:00:00Z",
                "agent",
            ),
            SampleVersion(
                "epoch-2.tar.gz",
                _training_run(2),
                "Epoch 2 complete",
                "2024-03-01T13:30:00Z",
                "agent",
            ),
            SampleVersion(
                "epoch-3.tar.gz",
                _training_run(3),
                "Epoch 3 complete, final metrics",
                "2024-03-01T18:05:00Z",
                "agent",
            ),
        ],
    )
    write_artifact(
        data_dir,
        "website-build",
        [
            SampleVersion(
                "build-1.tar.gz", _website(1), "Initial site build", "2024-03-04T10:00:00Z", "user"
            ),
            SampleVersion(
                "build-2.tar.gz",
                _website(2),
                "Add a blog post and dark mode",
                "2024-03-05T16:20:00Z",
                "agent",
            ),
        ],
    )
    write_artifact(
        data_dir,
        "eval-results",
        [
            SampleVersion(
                "nightly.tar.gz",
                _eval_results(),
                "Nightly eval: 12 tasks",
                "2024-03-06T08:45:00Z",
                "agent",
            )
        ],
    )
    # An artifact that exists but has no versions yet.
    write_artifact(data_dir, "scratchpad", created_at="2024-03-02T12:00:00Z")
