"""Files pushed into the kernel's page cache ahead of a reader (pagefill.py), on real mounts:
`grep -r` and `rg` over a version of many small files print what they print over `tar -x` of
its archive, files were pushed, and everything read back afterwards (from the pages pushed)
equals `tar -x` byte for byte; `current` moved is followed at once though links are cached."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from archives import T0, reg, tar_gz
from conftest import DevServer
from mounting import Mount, MountFactory
from test_robustness import assert_like_tar, write_artifact

pytest_plugins = ["mounting"]
pytestmark = [pytest.mark.timeout(180), pytest.mark.fallback]


def small_files() -> bytes:
    rng = random.Random(16)
    members = []
    for folder in range(3):
        for i in range(150):
            size = rng.choice([0, 1, 100, 4095, 4096, 4097, 20_000, 65_536, 70_000, 150_000])
            lines = (f"{folder}/{i} line {n} {'needle' if n % 97 == 3 else 'hay'}\n"
                     for n in range(size // 20 + 1))
            members.append(reg(f"logs/w{folder}/run-{i:03d}.log",
                               "".join(lines).encode()[:size], 0o644, T0))
    members.append(reg("logs/w1/big.bin", bytes(rng.randbytes(3 << 20)), 0o644, T0))
    return tar_gz(members)


def tool_output(m: Mount | None, command: list[str], cwd: Path) -> list[str]:
    run = subprocess.run if m is None else lambda *a, **k: m.run(subprocess.run, *a, **k)
    done = run(command, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode in (0, 1), done.stderr
    return sorted(done.stdout.splitlines())


def test_readers_of_small_files_get_them_pushed_ahead_and_exact(
        dev_server: type[DevServer], mount_vm0fs: MountFactory, tmp_path: Path) -> None:
    data = small_files()
    [version_id] = write_artifact(tmp_path / "data", "run", [data])
    srv = dev_server(tmp_path / "data")
    tree = tmp_path / "tree"
    tree.mkdir()
    subprocess.run(["tar", "-xzf", "-", "-C", str(tree)], input=data, check=True)

    tools = [["grep", "-rc", "needle", "."]]
    if shutil.which("rg"):
        tools.append(["rg", "-c", "--no-ignore", "--hidden", "needle", "."])
    for command in tools:
        m = mount_vm0fs(srv)  # fresh: nothing in the kernel's page cache
        root = m.artifacts / "run" / version_id
        assert tool_output(m, command, root) == tool_output(None, command, tree), command
        status = json.loads(m.run((m.path / ".vm0fs" / "status.json").read_text))
        assert status["pushed_ahead"]["files"] > 100, (command, status["pushed_ahead"])
        if command[0] == "rg":  # it reads 3 bytes of each file first
            assert status["pushed_ahead"]["rests_of_files"] > 0, status["pushed_ahead"]
        text = m.run((m.path / ".vm0fs" / "status").read_text)
        assert f"pushed ahead:   {status['pushed_ahead']['files']} small file(s)" in text
        # Read again: the pages pushed are what is read now.
        assert_like_tar(m, root, data, tmp_path / f"tar-{command[0]}")
        assert m.unmount() == 0
