"""The nodes the filesystem hands out, and the compact index of a version's contents.

Folders above the versions (the root, artifact and version folders, links, the control folder)
are `Node` objects kept in the `InodeTable`: a handful per artifact and version (their kinds
are `namespace`'s and `control`'s).

The contents of a version are not objects: they live in a `TreeIndex`, flat arrays in the
version's index file in the cache (read whole and checked against its checksum, never
memory-mapped: a truncated mapping is a SIGBUS; dropped when unused, see versions.py), or,
while the archive downloads, in the growing arrays of a `TreeBuilder`. Every entry has a
number: its position in the index, the order in which the archive created it. A version gets
a fixed range of inode numbers, `base + entry`, so an inode the kernel holds means the same
entry however often the index is dropped and loaded again (from the same file, or rebuilt from
the same archive, whose id is a hash of its content).
Node objects for entries (`ContentDir`, `File`, `Link` with `entry` set) are made on demand and
never stored.

The builder follows the archive: a path that appears twice ends up as the later member (a new
entry: numbers are never reused), parents the archive never names are implied.
"""

from __future__ import annotations

import bisect
import os
import stat
import struct
import sys
from array import array
from collections.abc import Iterator
from typing import Any

from vm0fs.archive import DIR, FILE, LINK, Member
from vm0fs.integrity import BLOCK, BlockSums, Hasher, blocks_in

IMPLIED_DIR_MODE = 0o755
NAME_MAX = 255  # bytes in one path component
VERSION_SHIFT = 32  # a version's inodes: (ordinal + 1) << 32 plus the entry number
VERSION_INODES = 1 << VERSION_SHIFT  # the first inode of the first version's range
ROOT_ENTRY = 0  # the version folder itself
I64_MAX = (1 << 63) - 1
SMALL_FOLDER = 8  # entries a lookup searches by bisection...
FOLDER_CACHE = 16384  # ...above that, names of folders looked in lately, in dicts, at most


def _has_long_part(path: str) -> bool:
    return any(len(part.encode(errors="surrogateescape")) > NAME_MAX for part in path.split("/"))


def _i64(value: int) -> int:
    return min(max(value, -I64_MAX), I64_MAX)  # a hostile header must not break the arrays


class Node:
    __slots__ = ("inode", "mode", "size", "mtime_ns", "lookups", "attrs")

    def __init__(self, inode: int, mode: int, size: int = 0, mtime_ns: int = 0) -> None:
        self.inode = inode
        self.mode = mode  # full st_mode, type bits included
        self.size = size
        self.mtime_ns = mtime_ns
        self.lookups = 0  # how many references the kernel holds (lookup count)
        self.attrs: Any = None  # cached pyfuse3.EntryAttributes, built by the fs layer


class Dir(Node):
    __slots__ = ("children", "parent", "owner")

    def __init__(self, inode: int, perm: int = IMPLIED_DIR_MODE, mtime_ns: int = 0,
                 parent: Dir | None = None, owner: Any = None) -> None:
        super().__init__(inode, stat.S_IFDIR | perm, 0, mtime_ns)
        self.children: dict[str, Node] = {}
        self.parent = parent  # for '..'; None at the root
        self.owner = owner  # the VersionState a content folder belongs to, if any


class ContentDir(Dir):
    """A folder inside a version (made on demand: its entries are in the owner's index)."""

    __slots__ = ("entry",)

    def __init__(self, inode: int, mode: int, mtime_ns: int, owner: Any, entry: int) -> None:
        super().__init__(inode, 0, mtime_ns, None, owner)
        self.mode = mode
        self.entry = entry


class File(Node):
    """A regular file in a version: `size` bytes at `offset` of the version's tar file."""

    __slots__ = ("owner", "offset", "sparse", "entry")

    def __init__(self, inode: int, mode: int, size: int, mtime_ns: int, owner: Any,
                 offset: int, sparse: list[tuple[int, int]] | None = None,
                 entry: int = -1) -> None:
        super().__init__(inode, mode, size, mtime_ns)
        self.owner = owner  # the VersionState whose data file holds the bytes
        self.offset = offset
        self.sparse = sparse
        self.entry = entry


class Link(Node):
    __slots__ = ("target", "owner", "entry")

    def __init__(self, inode: int, target: str, mtime_ns: int = 0, owner: Any = None,
                 entry: int = -1) -> None:
        super().__init__(inode, stat.S_IFLNK | 0o777, len(target.encode(errors="surrogateescape")),
                         mtime_ns)
        self.target = target
        self.owner = owner  # the VersionState of a link inside a version; None for `current`
        self.entry = entry


class InodeTable:
    """Hands out inode numbers below the version ranges and finds nodes by them. Numbers are
    never reused."""

    def __init__(self, first: int) -> None:
        self._next = first
        self._nodes: dict[int, Node] = {}

    def new_inode(self) -> int:
        inode = self._next
        if inode >= 1 << VERSION_SHIFT:
            raise OverflowError("out of inode numbers for folders")
        self._next += 1
        return inode

    def register(self, node: Node) -> Node:
        self._nodes[node.inode] = node
        return node

    def get(self, inode: int) -> Node | None:
        return self._nodes.get(inode)

    def forget(self, inode: int, count: int) -> None:
        node = self._nodes.get(inode)
        if node is not None:
            node.lookups = max(node.lookups - count, 0)

    def __len__(self) -> int:
        return len(self._nodes)


def in_version_range(inode: int) -> bool:
    return inode >= VERSION_INODES


def split_inode(inode: int) -> tuple[int, int]:
    """(version ordinal, entry) of an inode inside a version."""
    return (inode >> VERSION_SHIFT) - 1, inode & ((1 << VERSION_SHIFT) - 1)


def version_base(ordinal: int) -> int:
    return (ordinal + 1) << VERSION_SHIFT


# --- the index ----------------------------------------------------------------------------------

# The index file: a header, then the arrays in this order, each padded to 8 bytes, in native
# byte order (the magic says which: a file from another kind of machine is not read).
# Version 3 added the data's block checksums and the index's own checksum (integrity.py).
MAGIC = b"vm0i\x03" + (b"L" if sys.byteorder == "little" else b"B") + b"\0\0"
# magic, tar size, entries, children, name bytes, extra bytes, data blocks, block size, and an
# xxh3-64 of every byte of the file but these last 8
HEADER = struct.Struct("=8sQQQQQQQQ")
CHECKED = HEADER.size - 8
# name, typecode, length (in items) as a function of (entries, children, names, extra, blocks)
LAYOUT = (
    ("mode", "I", lambda n, c, b, x, k: n),
    ("parent", "I", lambda n, c, b, x, k: n),
    ("size", "q", lambda n, c, b, x, k: n),
    ("mtime", "q", lambda n, c, b, x, k: n),
    ("offset", "q", lambda n, c, b, x, k: n),
    ("name_off", "Q", lambda n, c, b, x, k: n + 1),
    ("extra_off", "Q", lambda n, c, b, x, k: n + 1),
    ("child_off", "I", lambda n, c, b, x, k: n + 1),
    ("children", "I", lambda n, c, b, x, k: c),
    ("names", "B", lambda n, c, b, x, k: b),
    ("extra", "B", lambda n, c, b, x, k: x),
    ("blocks", "Q", lambda n, c, b, x, k: k),
)


class BadIndex(ValueError):
    """An index file that cannot be used."""


class EntryArrays:
    """Reading one entry of a version from the flat arrays that TreeIndex (an index file) and
    TreeBuilder (a download under way) both hold under the same names."""

    _mode: Any
    _parent: Any
    _size: Any
    _mtime: Any
    _offset: Any
    _name_off: Any
    _extra_off: Any
    _names: Any
    _extra: Any

    def mode(self, entry: int) -> int:
        return self._mode[entry]

    def size(self, entry: int) -> int:
        return self._size[entry]

    def mtime(self, entry: int) -> int:
        return self._mtime[entry]

    def offset(self, entry: int) -> int:
        return self._offset[entry]

    def parent(self, entry: int) -> int:
        return self._parent[entry]

    def name(self, entry: int) -> bytes:
        return bytes(self._names[self._name_off[entry]:self._name_off[entry + 1]])

    def extra(self, entry: int) -> bytes:
        return bytes(self._extra[self._extra_off[entry]:self._extra_off[entry + 1]])


class TreeIndex(EntryArrays):
    """The entries of a version, read from a buffer in the index-file layout (a read-only
    mapping of the file, or bytes). Folder entries are listed sorted by name."""

    complete = True

    def __init__(self, buf: Any) -> None:
        view = memoryview(buf)
        if len(view) < HEADER.size:
            raise BadIndex("index file too short")
        magic, self.tar_size, n, c, b, x, k, block, checksum = HEADER.unpack_from(view)
        if magic != MAGIC:
            raise BadIndex("not an index of this vm0fs version")
        hasher = Hasher(view[:CHECKED])
        hasher.update(view[HEADER.size:])
        if hasher.intdigest() != checksum:
            raise BadIndex("index file damaged (checksum mismatch)")
        if block != BLOCK or k != blocks_in(self.tar_size):
            raise BadIndex("index file of another block size")
        pos = HEADER.size
        for name, code, length in LAYOUT:
            items = length(n, c, b, x, k)
            size = items * array(code).itemsize
            if pos + size > len(view):
                raise BadIndex("index file truncated")
            setattr(self, "_" + name, view[pos:pos + size].cast(code))
            pos += (size + 7) // 8 * 8
        if (self._name_off[n] != b or self._extra_off[n] != x or self._child_off[n] != c
                or self._name_off[0] or self._extra_off[0] or self._child_off[0]):
            raise BadIndex("index file inconsistent")
        self.count = n
        self.nbytes = len(view)
        self._buf = buf
        self._folders: dict[int, dict[bytes, int]] = {}  # see find
        self._cached = 0  # names in _folders

    # Views of the arrays, created in __init__ (the rest are declared in EntryArrays).
    _child_off: Any
    _children: Any
    _blocks: Any

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TreeIndex:
        """Read and check an index file (blocking). It is read, not memory-mapped: a mapped file
        that another process truncates kills this one with SIGBUS at the next touch."""
        with open(path, "rb", buffering=0) as f:
            return cls(f.read())

    def block_sums(self) -> BlockSums:
        """The checksums of the version's tar data (a copy: the index may be dropped)."""
        return BlockSums(self._blocks, self.tar_size)

    def stat(self, entry: int) -> tuple[int, int, int]:
        """(st_mode, st_size, mtime in ns) of an entry, as its node would have them."""
        mode = self._mode[entry]
        if stat.S_ISLNK(mode):  # the target's length
            return mode, self._extra_off[entry + 1] - self._extra_off[entry], self._mtime[entry]
        return mode, self._size[entry], self._mtime[entry]

    def find(self, folder: int, name: str) -> int | None:
        """The entry called `name` in the folder entry `folder`, or None."""
        key = os.fsencode(name)
        names = self._folders.get(folder)
        if names is not None:
            return names.get(key)
        lo, hi = self._child_off[folder], self._child_off[folder + 1]
        if SMALL_FOLDER < hi - lo <= FOLDER_CACHE:
            # Lookups come in runs over one folder (find, grep -r): a dict of its names.
            if self._cached + hi - lo > FOLDER_CACHE:
                self._folders.clear()
                self._cached = 0
            names = {self.name(entry): entry for entry in self._children[lo:hi]}
            self._folders[folder] = names
            self._cached += hi - lo
            return names.get(key)
        i = bisect.bisect_left(self._children, key, lo, hi, key=self.name)
        if i < hi and self.name(self._children[i]) == key:
            return self._children[i]
        return None

    def child_count(self, folder: int) -> int:
        return self._child_off[folder + 1] - self._child_off[folder]

    def listing(self, folder: int, start: int = 0
                ) -> Iterator[tuple[bytes, int, int, int, int]]:
        """(name, entry, st_mode, st_size, mtime) of a folder's entries from the `start`th on,
        sorted by name (`children` and `stat` in one: the hot path of readdir)."""
        names, name_off, extra_off = self._names, self._name_off, self._extra_off
        modes, sizes, mtimes, children = self._mode, self._size, self._mtime, self._children
        for i in range(self._child_off[folder] + start, self._child_off[folder + 1]):
            entry = children[i]
            mode = modes[entry]
            size = (extra_off[entry + 1] - extra_off[entry] if stat.S_ISLNK(mode)
                    else sizes[entry])
            yield (bytes(names[name_off[entry]:name_off[entry + 1]]), entry, mode, size,
                   mtimes[entry])

    def position(self, folder: int, entry: int) -> int | None:
        """Where `entry` comes in the listing of the folder entry `folder` (0: first), or None
        when it is not listed there."""
        lo, hi = self._child_off[folder], self._child_off[folder + 1]
        i = bisect.bisect_left(self._children, self.name(entry), lo, hi, key=self.name)
        return i - lo if i < hi and self._children[i] == entry else None

    def child(self, folder: int, position: int) -> int:
        """The entry at `position` of a folder's listing (0 <= position < child_count)."""
        return self._children[self._child_off[folder] + position]

    def children(self, folder: int, start: int = 0) -> Iterator[tuple[bytes, int]]:
        """(name, entry) of a folder's entries from the `start`th on, sorted by name."""
        lo, hi = self._child_off[folder], self._child_off[folder + 1]
        for i in range(lo + start, hi):
            entry = self._children[i]
            yield self.name(entry), entry


class TreeBuilder(EntryArrays):
    """A version's index grown member by member (`add`) in the download's parser thread, read
    meanwhile from the event loop: entries below `count` are complete, and an entry is linked
    into its folder only after that. `write` saves it in the index-file layout."""

    complete = False

    def __init__(self, implied_mtime_ns: int) -> None:
        self.implied_mtime_ns = implied_mtime_ns
        self._mode = array("I")
        self._parent = array("I")
        self._size = array("q")
        self._mtime = array("q")
        self._offset = array("q")
        self._name_off = array("Q", [0])
        self._extra_off = array("Q", [0])
        self._names = bytearray()
        self._extra = bytearray()
        # "<folder entry>/<name>" -> entry: the only per-entry objects, gone once written.
        self._slots: dict[str, int] = {}
        self._last_dir: tuple[str, int] = ("", ROOT_ENTRY)
        self.count = 0
        self._new(ROOT_ENTRY, "", stat.S_IFDIR | IMPLIED_DIR_MODE, 0, implied_mtime_ns, 0)

    # -- reading: EntryArrays, for the entries so far --

    def find(self, folder: int, name: str) -> int | None:
        return self._slots.get(f"{folder}/{name}")

    @property
    def nbytes(self) -> int:
        """About what it uses (the arrays, and ~100 bytes a name in the lookup table)."""
        arrays = (self._mode, self._parent, self._size, self._mtime, self._offset,
                  self._name_off, self._extra_off)
        return (sum(len(a) * a.itemsize for a in arrays) + len(self._names) + len(self._extra)
                + 100 * len(self._slots))

    # -- growing --

    def _new(self, parent: int, name: str, mode: int, size: int, mtime_ns: int, offset: int,
             extra: bytes = b"") -> int:
        entry = self.count
        self._mode.append(mode)
        self._parent.append(parent)
        self._size.append(_i64(size))
        self._mtime.append(_i64(mtime_ns))
        self._offset.append(_i64(offset))
        self._names += os.fsencode(name)
        self._name_off.append(len(self._names))
        self._extra += extra
        self._extra_off.append(len(self._extra))
        self.count = entry + 1  # complete: readers may look at it from now on
        return entry

    def _is_dir(self, entry: int | None) -> bool:
        return entry is not None and stat.S_ISDIR(self._mode[entry])

    def _dir(self, path: str) -> int:
        """The folder entry at `path`, made (implied) where missing or not a folder."""
        if not path:
            return ROOT_ENTRY
        if self._last_dir[0] == path:
            return self._last_dir[1]
        folder = ROOT_ENTRY
        for part in path.split("/"):
            key = f"{folder}/{part}"
            entry = self._slots.get(key)
            if not self._is_dir(entry):
                # Missing, or a file/link a later member needs as a folder: the later one wins.
                entry = self._new(folder, part, stat.S_IFDIR | IMPLIED_DIR_MODE, 0,
                                  self.implied_mtime_ns, 0)
                self._slots[key] = entry
            folder = entry  # type: ignore[assignment]
        self._last_dir = (path, folder)
        return folder

    def add(self, member: Member) -> None:
        if len(member.path) > NAME_MAX // 4 and _has_long_part(member.path):
            return  # no Linux program could open it, and tar -x leaves it out too
        dirname, _, name = member.path.rpartition("/")
        folder = self._dir(dirname)
        key = f"{folder}/{name}"
        existing = self._slots.get(key)
        if member.kind == DIR:
            if self._is_dir(existing):  # explicit entry for a folder already implied or seen
                assert existing is not None
                self._mode[existing] = stat.S_IFDIR | member.mode
                self._mtime[existing] = _i64(member.mtime_ns)
            else:
                self._slots[key] = self._new(folder, name, stat.S_IFDIR | member.mode, 0,
                                             member.mtime_ns, 0)
            return
        if member.kind == FILE:
            extra = b""
            if member.sparse is not None:
                extra = array("q", [_i64(v) for run in member.sparse for v in run]).tobytes()
            entry = self._new(folder, name, stat.S_IFREG | member.mode, member.size,
                              member.mtime_ns, member.offset, extra)
        elif member.kind == LINK:
            entry = self._new(folder, name, stat.S_IFLNK | 0o777, 0, member.mtime_ns, 0,
                              os.fsencode(member.target))
        else:
            return
        if self._is_dir(existing):
            self._last_dir = ("", ROOT_ENTRY)  # a folder was replaced: its path means another
        self._slots[key] = entry

    def resolve(self, path: str) -> Member | None:
        """The member now at `path` (for hard links, which copy an earlier member)."""
        dirname, _, name = path.rpartition("/")
        folder = ROOT_ENTRY
        for part in dirname.split("/") if dirname else ():
            folder = self._slots.get(f"{folder}/{part}", -1)
            if folder < 0 or not self._is_dir(folder):
                return None
        entry = self._slots.get(f"{folder}/{name}")
        if entry is None:
            return None
        return member_of(self, entry, path)

    # -- saving --

    def write(self, fd: int, sums: BlockSums) -> int:
        """Write the index-file form to `fd` (blocking: a worker thread); return its size."""
        written = 0
        for part in self._parts(sums):
            view = memoryview(part)
            while view:
                done = os.write(fd, view)
                view = view[done:]
                written += done
        return written

    def to_bytes(self, sums: BlockSums) -> bytes:
        return b"".join(bytes(part) for part in self._parts(sums))

    def _parts(self, sums: BlockSums) -> list[Any]:
        """The index file's bytes, in pieces (the arrays themselves, not copies)."""
        n = self.count
        linked = array("I", sorted(self._slots.values()))
        counts = array("I", bytes(4 * (n + 1)))
        for entry in linked:
            counts[self._parent[entry] + 1] += 1
        child_off = array("I", [0]) * (n + 1)
        total = 0
        for i in range(n + 1):
            total += counts[i]
            child_off[i] = total
        children = array("I", bytes(4 * len(linked)))
        fill = array("I", child_off)
        for entry in linked:  # grouped by folder; sorted by name below
            p = self._parent[entry]
            children[fill[p]] = entry
            fill[p] += 1
        del fill, counts, linked
        for folder in range(n):
            lo, hi = child_off[folder], child_off[folder + 1]
            if hi - lo > 1:
                children[lo:hi] = array("I", sorted(children[lo:hi], key=self.name))
        assert sums.size is not None and len(sums.sums) == blocks_in(sums.size)
        parts: list[Any] = []
        for name, _, _ in LAYOUT:
            data = {"child_off": child_off, "children": children, "blocks": sums.sums}.get(name)
            if data is None:
                data = getattr(self, "_" + name)
            raw = memoryview(data).cast("B")
            parts.append(raw)
            if len(raw) % 8:
                parts.append(bytes(8 - len(raw) % 8))
        header = HEADER.pack(MAGIC, sums.size, n, len(children), len(self._names),
                             len(self._extra), len(sums.sums), BLOCK, 0)[:CHECKED]
        hasher = Hasher(header)
        for part in parts:
            hasher.update(part)
        return [header + struct.pack("=Q", hasher.intdigest()), *parts]


def member_of(index: TreeIndex | TreeBuilder, entry: int, path: str) -> Member:
    """An entry as the member that would make it (a hard link's copy)."""
    mode = index.mode(entry)
    perm = stat.S_IMODE(mode)
    if stat.S_ISDIR(mode):
        return Member(path, DIR, perm, index.mtime(entry))
    if stat.S_ISLNK(mode):
        return Member(path, LINK, perm, index.mtime(entry),
                      target=os.fsdecode(index.extra(entry)))
    return Member(path, FILE, perm, index.mtime(entry), index.size(entry), index.offset(entry),
                  sparse=sparse_runs(index.extra(entry)))


def sparse_runs(extra: bytes) -> list[tuple[int, int]] | None:
    if not extra:
        return None
    values = array("q")
    values.frombytes(extra)
    return [(values[i], values[i + 1]) for i in range(0, len(values), 2)]


def build_index(members: list[Member], implied_mtime_ns: int, tar: bytes = b"") -> TreeIndex:
    """An in-memory index of `members` of the tar file `tar` (tests, and versions with nothing
    to download)."""
    builder = TreeBuilder(implied_mtime_ns)
    for member in members:
        builder.add(member)
    sums = BlockSums()
    sums.add(tar)
    sums.finish(len(tar))
    return TreeIndex(builder.to_bytes(sums))


def node_for(index: TreeIndex | TreeBuilder, entry: int, inode: int, owner: Any) -> Node:
    """The node of an entry (made now; nobody keeps it for long)."""
    mode = index._mode[entry]
    mtime = index._mtime[entry]
    if stat.S_ISDIR(mode):
        return ContentDir(inode, mode, mtime, owner, entry)
    has_extra = index._extra_off[entry] != index._extra_off[entry + 1]
    if stat.S_ISLNK(mode):
        return Link(inode, os.fsdecode(index.extra(entry)), mtime, owner, entry)
    return File(inode, mode, index._size[entry], mtime, owner, index._offset[entry],
                sparse_runs(index.extra(entry)) if has_extra else None, entry)
