"""Sizes for people, in one style everywhere (binary units: 15.9 KiB, 1.2 GiB)."""

from __future__ import annotations


def human(size: float | None) -> str:
    if size is None:
        return "no cap"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
