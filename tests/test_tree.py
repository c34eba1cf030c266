"""The compact index of a version: the builder against a plain model of `tar -x` (dicts of
dicts, as the tree used to be), the saved form against the builder, numbers that do not move."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

import pytest

from vm0fs.archive import DIR, FILE, LINK, Member
from vm0fs.integrity import BlockSums, digest
from vm0fs.tree import (
    ROOT_ENTRY,
    BadIndex,
    TreeBuilder,
    TreeIndex,
    build_index,
    sparse_runs,
    split_inode,
    version_base,
)

T = 1_700_000_000 * 10**9


def model(members: list[Member]) -> dict:
    """What the folder holds after `tar -x`-like application, as nested dicts; a leaf is
    (kind, mode, size, offset, target, sparse)."""
    root: dict = {}
    for m in members:
        if any(len(os.fsencode(p)) > 255 for p in m.path.split("/")):
            continue
        *parents, name = m.path.split("/")
        folder = root
        for part in parents:
            if not isinstance(folder.get(part), dict):
                folder[part] = {}
            folder = folder[part]
        if m.kind == DIR:
            if not isinstance(folder.get(name), dict):
                folder[name] = {}
            folder[name]["\0mode"] = m.mode
        else:
            folder[name] = (m.kind, m.mode, m.size, m.offset, m.target, m.sparse)
    return root


def walk(index: TreeIndex, entry: int) -> dict:
    """The index seen from `entry` down, in the model's shape (listed, then found by name)."""
    out: dict = {}
    listed = list(index.children(entry))
    assert [n for n, _ in listed] == sorted(n for n, _ in listed)
    for raw, listed_entry in listed:
        name = os.fsdecode(raw)
        child = index.find(entry, name)
        assert child == listed_entry, name
        mode = index.mode(child)
        if stat.S_ISDIR(mode):
            sub = walk(index, child)
            if stat.S_IMODE(mode) != 0o755:
                sub["\0mode"] = stat.S_IMODE(mode)
            out[name] = sub
        else:
            kind = LINK if stat.S_ISLNK(mode) else FILE
            extra = index.extra(child)
            target = os.fsdecode(extra) if kind == LINK else ""
            runs = sparse_runs(extra) if kind == FILE else None
            out[name] = (kind, stat.S_IMODE(mode), index.size(child), index.offset(child),
                         target, runs)
    return out


def normalized(tree: dict) -> dict:
    """The model with the explicit modes that equal the implied ones dropped (as walk does)."""
    out: dict = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            sub = normalized(value)
            if sub.get("\0mode") == 0o755:
                del sub["\0mode"]
            out[name] = sub
        else:
            out[name] = value
    return out


def random_members(rng: random.Random) -> list[Member]:
    names = ["a", "b", "c", "caf\udce9", "long" * 70, "x y"]
    members = []
    for i in range(rng.randint(1, 60)):
        depth = rng.randint(1, 4)
        path = "/".join(rng.choice(names[:4] if d < depth - 1 else names)
                        for d in range(depth))
        kind = rng.choice([FILE, FILE, FILE, DIR, LINK])
        mode = rng.choice([0o644, 0o600, 0o755, 0o700])
        if kind == FILE:
            sparse = [(0, 3), (100, 5)] if rng.random() < 0.1 else None
            members.append(Member(path, FILE, mode, T + i, rng.randint(0, 1 << 40),
                                  512 * (i + 1), sparse=sparse))
        elif kind == DIR:
            members.append(Member(path, DIR, mode, T + i))
        else:
            members.append(Member(path, LINK, 0o777, T + i, target=rng.choice(names)))
    return members


def sums_of(size: int) -> BlockSums:
    """The block checksums of a tar file of `size` zero bytes."""
    sums = BlockSums()
    sums.add(bytes(size))
    sums.finish(size)
    return sums


def test_builder_and_saved_index_match_the_model() -> None:
    for seed in range(300):
        members = random_members(random.Random(seed))
        builder = TreeBuilder(T - 1)
        for m in members:
            builder.add(m)
        saved = TreeIndex(builder.to_bytes(sums_of(12345)))
        expected = normalized(model(members))
        assert walk(saved, ROOT_ENTRY) == expected, seed
        # The saved form keeps every entry's number and data, replaced ones included.
        assert saved.count == builder.count
        for entry in range(builder.count):
            assert (saved.mode(entry), saved.parent(entry), saved.name(entry),
                    saved.size(entry), saved.extra(entry)) == (
                builder.mode(entry), builder.parent(entry), builder.name(entry),
                builder.size(entry), builder.extra(entry))
        # The same members give the same numbers: a reload means the same entries.
        again = TreeBuilder(T - 1)
        for m in members:
            again.add(m)
        assert again.to_bytes(sums_of(12345)) == builder.to_bytes(sums_of(12345))


def test_folder_replaced_by_a_file_then_needed_again() -> None:
    """A file replaces folder `a`; a later `a/b/y` implies new folders (new numbers), and the
    replaced entries keep theirs (the kernel may hold them)."""
    builder = TreeBuilder(T)
    for m in [Member("a/b/x", FILE, 0o644, T, 1, 512), Member("a", FILE, 0o600, T, 2, 1024),
              Member("a/b/y", FILE, 0o644, T, 3, 1536)]:
        builder.add(m)
    index = TreeIndex(builder.to_bytes(sums_of(0)))
    assert index.count == 8  # root, a, b, x, file a, a again, b again, y
    assert index.find(ROOT_ENTRY, "a") == 5 and index.find(5, "b") == 6
    assert [n for n, _ in index.children(6)] == [b"y"]
    assert (index.name(3), index.parent(3), index.parent(2)) == (b"x", 2, 1)
    assert [n for n, _ in index.children(2)] == [b"x"]  # a held folder still lists


def test_hard_link_targets_resolve_to_the_member_now_at_a_path() -> None:
    builder = TreeBuilder(T)
    builder.add(Member("d/f", FILE, 0o640, T + 5, 7, 4096, sparse=[(0, 7)]))
    builder.add(Member("d/l", LINK, 0o777, T + 6, target="f"))
    assert builder.resolve("d/f") == Member("d/f", FILE, 0o640, T + 5, 7, 4096,
                                            sparse=[(0, 7)])
    assert builder.resolve("d/l") == Member("d/l", LINK, 0o777, T + 6, target="f")
    assert builder.resolve("d") == Member("d", DIR, 0o755, T)  # a folder: links refuse it
    assert builder.resolve("nothing/f") is None and builder.resolve("d/f/x") is None


def test_hostile_numbers_are_clamped() -> None:
    index = build_index([Member("f", FILE, 0o644, 10**40, 1 << 70, 512)], T)
    f = index.find(ROOT_ENTRY, "f")
    assert index.size(f) == (1 << 63) - 1 and index.mtime(f) == (1 << 63) - 1


def test_damaged_index_files_are_refused(tmp_path: Path) -> None:
    good = build_index([Member("f", FILE, 0o644, T, 5, 512)], T, bytes(1024))
    data = bytes(good._buf)
    names = int.from_bytes(data[32:40], "little")
    wrong_names = data[:32] + (names + 1).to_bytes(8, "little") + data[40:]
    for bad in (b"", data[:40], b"X" + data[1:], data[:-8], data + bytes(8), wrong_names):
        with pytest.raises(BadIndex):
            TreeIndex(bad)
    # Any one bit flipped anywhere: the checksum says so (a bit in an offset or a size would
    # otherwise serve another file's bytes).
    for i in range(len(data)):
        for bit in (0, 7):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            with pytest.raises(BadIndex):
                TreeIndex(bytes(flipped))
    path = tmp_path / "index.bin"
    path.write_bytes(data)
    index = TreeIndex.load(path)
    assert index.tar_size == 1024
    assert index.block_sums().sums[0] == digest(bytes(1024))
    path.write_bytes(data[:len(data) // 2])  # truncated on disk: refused, not a crash
    with pytest.raises(BadIndex):
        TreeIndex.load(path)


def test_inode_ranges() -> None:
    base = version_base(3)
    assert split_inode(base + 17) == (3, 17)
    assert split_inode(version_base(0)) == (0, 0)
