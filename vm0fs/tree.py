"""The nodes the filesystem hands out: stable inode numbers, lookup counts, cached attributes.

Version contents are built from archive members (`ContentTree.add`), in archive order, so a path
that appears twice ends up as the later member, and parents that the archive never names are
implied. Nodes are never reused for something else: a replaced member gets a new inode.
"""

from __future__ import annotations

import stat
from typing import Any

from vm0fs.archive import DIR, FILE, LINK, Member

IMPLIED_DIR_MODE = 0o755
NAME_MAX = 255  # bytes in one path component


def _has_long_part(path: str) -> bool:
    return any(len(part.encode(errors="surrogateescape")) > NAME_MAX for part in path.split("/"))


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


class File(Node):
    """A regular file in a version: `size` bytes at `offset` of the version's tar file."""

    __slots__ = ("owner", "offset", "sparse")

    def __init__(self, inode: int, member: Member, owner: Any) -> None:
        super().__init__(inode, stat.S_IFREG | member.mode, member.size, member.mtime_ns)
        self.owner = owner  # the VersionState whose data file holds the bytes
        self.offset = member.offset
        self.sparse = member.sparse


class Link(Node):
    __slots__ = ("target", "owner")

    def __init__(self, inode: int, target: str, mtime_ns: int = 0, owner: Any = None) -> None:
        super().__init__(inode, stat.S_IFLNK | 0o777, len(target.encode(errors="surrogateescape")),
                         mtime_ns)
        self.target = target
        self.owner = owner  # the VersionState of a link inside a version; None for `current`


class InodeTable:
    """Hands out inode numbers and finds nodes by them. Numbers are never reused."""

    def __init__(self, first: int) -> None:
        self._next = first
        self._nodes: dict[int, Node] = {}

    def new_inode(self) -> int:
        inode = self._next
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


class ContentTree:
    """The files of one version, grown member by member."""

    def __init__(self, table: InodeTable, root: Dir, owner: Any, implied_mtime_ns: int) -> None:
        self.table = table
        self.root = root
        self.owner = owner
        self.implied_mtime_ns = implied_mtime_ns
        self.members = 0

    def add(self, member: Member) -> None:
        self.members += 1
        if len(member.path) > NAME_MAX // 4 and _has_long_part(member.path):
            return  # no Linux program could open it, and tar -x leaves it out too
        *parents, name = member.path.split("/")
        parent = self.root
        for part in parents:
            parent = self._ensure_dir(parent, part)
        existing = parent.children.get(name)
        if member.kind == DIR:
            if isinstance(existing, Dir):  # explicit entry for a dir already implied or seen
                existing.mode = stat.S_IFDIR | member.mode
                existing.mtime_ns = member.mtime_ns
                existing.attrs = None
            else:
                parent.children[name] = self._new_dir(parent, member.mode, member.mtime_ns)
            return
        if member.kind == FILE:
            parent.children[name] = self.table.register(
                File(self.table.new_inode(), member, self.owner)
            )
        elif member.kind == LINK:
            parent.children[name] = self.table.register(
                Link(self.table.new_inode(), member.target, member.mtime_ns, self.owner)
            )

    def _ensure_dir(self, parent: Dir, name: str) -> Dir:
        node = parent.children.get(name)
        if isinstance(node, Dir):
            return node
        # Missing, or a file/link that a later member needs as a directory: the later one wins.
        new = self._new_dir(parent, IMPLIED_DIR_MODE, self.implied_mtime_ns)
        parent.children[name] = new
        return new

    def _new_dir(self, parent: Dir, perm: int, mtime_ns: int) -> Dir:
        node = Dir(self.table.new_inode(), perm, mtime_ns, parent, self.owner)
        self.table.register(node)
        return node
