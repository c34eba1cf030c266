"""What the hidden `.vm0fs/` folder at the mount root says: the mount's status, and the metadata
of an artifact and its versions, for `vm0fs status` and `vm0fs info` (and anyone with `cat`).

    .vm0fs/status          plain text
    .vm0fs/status.json     the same as JSON
    .vm0fs/info/<name>     JSON: the artifact whose folder is artifacts/<name>, and its versions
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import textwrap
from datetime import UTC, datetime
from typing import Any

from vm0fs.api import Artifact, Version
from vm0fs.units import human

CONTROL_DIR = ".vm0fs"
MAX_ERRORS = 20


class RecentErrors(logging.Handler):
    """Keeps the last warnings and errors vm0fs logged, for the status file."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: collections.deque[dict[str, str]] = collections.deque(maxlen=MAX_ERRORS)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append({"time": iso(record.created), "level": record.levelname,
                             "message": record.getMessage()})


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def version_info(version: Version) -> dict[str, Any]:
    info = dataclasses.asdict(version)
    info["created_at"] = iso(version.created_at)
    return info


def artifact_info(folder: str, artifact: Artifact, versions: list[Version]) -> dict[str, Any]:
    info = {k: v for k, v in dataclasses.asdict(artifact).items() if k != "current_version"}
    info["folder"] = folder
    info["created_at"] = iso(artifact.created_at)
    info["updated_at"] = iso(artifact.updated_at)
    return {"artifact": info, "versions": [version_info(v) for v in versions]}


def to_json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()


def status_text(status: dict[str, Any]) -> str:
    cache = status["cache"]
    lines = [
        f"API:            {status['api_url']}"
        + ("  (unreachable: serving the last known listings)" if status["offline"] else ""),
        f"mounted at:     {status['mountpoint']}",
        f"mounted since:  {status['mounted_since']}",
        f"opens:          {status['open_mode']}",
        f"cache:          {cache['dir']}",
        f"cache use:      {human(cache['bytes'])} on disk of a {human(cache['cap'])} cap "
        f"({cache['cap_reason']}), {cache['versions']} version(s) cached",
    ]
    if cache.get("damaged_copies"):
        lines.append(f"damaged:        {cache['damaged_copies']} cached cop(ies) failed a check "
                     "and were dropped (see last errors)")
    memory = status.get("memory")
    if memory:
        lines.append(f"memory:         {human(memory['rss'])} resident (peak "
                     f"{human(memory['peak_rss'])}), {memory['versions_in_memory']} of "
                     f"{memory['versions_known']} version(s) held in memory")
    downloads = status["downloads"]
    lines.append(f"downloads:      {len(downloads) or 'none'}")
    for d in downloads:
        files = f", files {human(d['bytes_total'])}" if d["bytes_total"] else ""
        lines.append(f"  {d['artifact']}/{d['version_id'][:12]}: download "
                     f"{human(d['bytes_received'])} so far, unpacked {human(d['bytes_done'])}"
                     f"{files}")
    listing = status["listing_only_downloads"]
    if listing["total"]:
        lines.append(f"listing-only:   {listing['total']} download(s) asked for by folder "
                     f"listings alone ({listing['at_once']} at a time, {listing['queued']} "
                     "queued)")
    notice = status["notice"]
    if notice:
        lines += textwrap.wrap(f"{iso(notice['time'])} {notice['summary']}", width=100,
                               initial_indent="notice:         ", subsequent_indent=" " * 16)
        lines += [" " * 16 + "To stop it in GNOME:", " " * 18 + notice["fix"]]
    errors = status["last_errors"]
    lines.append(f"last errors:    {len(errors) or 'none'}")
    lines += [f"  {e['time']} {e['level']}: {e['message']}" for e in errors[-10:]]
    return "\n".join(lines) + "\n"
