"""The commands that need no mount: cache upkeep and argument handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vm0fs.archive import FILE, Member
from vm0fs.cache import Cache
from vm0fs.cli import parse_size
from vm0fs.tree import TreeBuilder


def vm0fs(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vm0fs.cli", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def fill(cache_dir: Path, sizes: dict[str, int]) -> Cache:
    cache = Cache(cache_dir)
    for vid, size in sizes.items():
        staging = cache.stage(vid)
        os.write(staging.fd, bytes(size))
        index = TreeBuilder(0)
        index.add(Member("f", FILE, 0o644, 0, size, 0))
        os.close(cache.publish(staging, index).fd)
    return cache


def test_parse_size() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("10G") == 10 << 30
    assert parse_size("1.5k") == 1536
    assert parse_size("512MiB") == 512 << 20


def test_cache_info_clear_and_prune(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    fill(cache_dir, {"a" * 64: 1000, "b" * 64: 2000, "c" * 64: 4000})
    info = json.loads(vm0fs("cache", "info", "--json", "--cache-dir", str(cache_dir)).stdout)
    assert info["versions"] == 3 and info["in_use"] is False
    result = vm0fs("cache", "prune", "--max-size", "3K", "--cache-dir", str(cache_dir))
    assert result.returncode == 0, result.stderr
    assert Cache(cache_dir).usage() <= 3 * 1024
    result = vm0fs("cache", "clear", "--cache-dir", str(cache_dir))
    assert result.returncode == 0 and "removed" in result.stdout
    assert Cache(cache_dir).entries() == []


def test_cache_clear_refuses_while_a_mount_uses_it(tmp_path: Path) -> None:
    cache = fill(tmp_path / "cache", {"a" * 64: 100})
    held = cache.hold_in_use()  # what a running mount holds
    try:
        result = vm0fs("cache", "clear", "--cache-dir", str(cache.root))
        assert result.returncode == 1
        assert "a mount is using" in result.stderr and "Traceback" not in result.stderr
        assert len(cache.entries()) == 1
        assert vm0fs("cache", "clear", "--force", "--cache-dir", str(cache.root)).returncode == 0
        assert cache.entries() == []
    finally:
        held.close()


@pytest.mark.parametrize("args, message", [
    (["status", "/"], "not inside a vm0fs mount"),
    (["info", "/tmp"], "not inside a vm0fs mount"),
])
def test_commands_outside_a_mount_fail_in_one_line(args: list[str], message: str) -> None:
    result = vm0fs(*args)
    assert result.returncode == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_help_and_version() -> None:
    assert "vm0fs" in vm0fs("--version").stdout
    for command in ("mount", "unmount", "prefetch", "info", "status", "cache", "cache info",
                    "cache clear", "cache prune", "dev-server"):
        result = vm0fs(*command.split(), "--help")
        assert result.returncode == 0 and "usage:" in result.stdout, command
        assert "example" in result.stdout, command  # as the README says: every command
    words = " ".join(vm0fs("mount", "--help").stdout.split())
    assert "two more kernel round trips a file" in words  # what --xattrs costs
    words = " ".join(vm0fs("dev-server", "--help").stdout.split())
    assert "--token, else $VM0_API_KEY, else 'dev-token'" in words


def test_mount_without_a_key_is_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "VM0_API_KEY"}
    result = vm0fs("mount", str(tmp_path), env=env)
    assert result.returncode != 0
    assert result.stderr.strip() == "vm0fs: no API key: set VM0_API_KEY"
