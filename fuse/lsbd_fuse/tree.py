"""The shape of the mounted file system: directories and image files, by inode.

No FUSE here: a plain index from paths ("VOLUME.img", later
"snapshots/NAME.img") to inodes, so the operations class only translates.
Directories are implied by the paths of the images they contain.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import attrs

from lsbd.engine.api import BlockDevice

ROOT_INODE = 1  # FUSE's fixed root inode


@attrs.frozen(kw_only=True)
class Image:
    """One image file: the device behind it and whether it may be written."""

    device: BlockDevice
    read_only: bool = False


@attrs.define(kw_only=True, eq=False)
class Dir:
    inode: int
    parent: int
    children: dict[bytes, int] = attrs.field(factory=dict)
    mtime_ns: int = attrs.field(factory=time.time_ns)


@attrs.define(kw_only=True, eq=False)
class File:
    inode: int
    parent: int
    name: str
    image: Image
    size: int  # cached: only a resize through this mount changes it
    mtime_ns: int = attrs.field(factory=time.time_ns)
    #: The device takes nowait=True (BlockDevice.supports_nowait).
    nowait: bool = False
    #: The device's write_many, if it has one and takes nowait (else None).
    write_many: Callable[..., None] | None = None
    block_size: int = 4096

    @property
    def read_only(self) -> bool:
        return self.image.read_only or bool(getattr(self.image.device, "read_only", False))


Node = Dir | File


class Tree:
    """Inodes for a set of image files; directories appear as paths need them."""

    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {ROOT_INODE: Dir(inode=ROOT_INODE, parent=ROOT_INODE)}
        self._next_inode = ROOT_INODE + 1

    def _new_inode(self) -> int:
        inode = self._next_inode
        self._next_inode += 1
        return inode

    @staticmethod
    def _split(path: str) -> list[str]:
        parts = [p for p in path.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise ValueError(f"bad image path: {path!r}")
        return parts

    def add(self, path: str, image: Image) -> File:
        """Add an image at `path`, creating the directories above it."""
        parts = self._split(path)
        parent = self.nodes[ROOT_INODE]
        assert isinstance(parent, Dir)
        for part in parts[:-1]:
            key = part.encode()
            inode = parent.children.get(key)
            if inode is None:
                child = Dir(inode=self._new_inode(), parent=parent.inode)
                self.nodes[child.inode] = child
                parent.children[key] = child.inode
                parent.mtime_ns = time.time_ns()
                parent = child
            else:
                node = self.nodes[inode]
                if not isinstance(node, Dir):
                    raise ValueError(f"{path!r}: {part!r} is an image, not a directory")
                parent = node
        key = parts[-1].encode()
        if key in parent.children:
            raise ValueError(f"{path!r} already exists")
        nowait = getattr(image.device, "supports_nowait", False) is True
        node = File(inode=self._new_inode(), parent=parent.inode, name=path, image=image,
                    size=image.device.size, nowait=nowait,
                    write_many=getattr(image.device, "write_many", None) if nowait else None,
                    block_size=getattr(image.device, "block_size", 0) or 4096)
        self.nodes[node.inode] = node
        parent.children[key] = node.inode
        parent.mtime_ns = time.time_ns()
        return node

    def remove(self, path: str) -> File:
        """Take the image at `path` out of the tree (empty directories stay)."""
        parts = self._split(path)
        parent = self.lookup_path(parts[:-1])
        key = parts[-1].encode()
        inode = parent.children.get(key)
        node = self.nodes.get(inode) if inode is not None else None
        if inode is None or not isinstance(node, File):
            raise KeyError(path)
        del parent.children[key]
        del self.nodes[inode]
        parent.mtime_ns = time.time_ns()
        return node

    def lookup_path(self, parts: list[str]) -> Dir:
        node = self.nodes[ROOT_INODE]
        for part in parts:
            assert isinstance(node, Dir)
            node = self.nodes[node.children[part.encode()]]
        if not isinstance(node, Dir):
            raise KeyError("/".join(parts))
        return node

    def files(self) -> list[File]:
        return [n for n in self.nodes.values() if isinstance(n, File)]
