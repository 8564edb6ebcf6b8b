"""The merged root filesystem: archive entries and image layers applied in order, in memory.

Only metadata lives here; a regular file's bytes stay in the archive it came from (a
`Blob`) or, for the small files uvmkit adds, in memory. Applying an entry follows the
rules of extracting a tar into an empty root, confined to that root:

- names are normalised (`./a//b` is `a/b`, a leading `/` is dropped) and a name that
  climbs out of the root with `..` is refused;
- missing parents are created as 0755 root-owned directories, and take the metadata of
  their own entry if it comes later;
- a later entry replaces an earlier one at the same name, except that a directory over a
  directory only updates its metadata and keeps its contents;
- symlinks in the *parents* of a name are followed, but always inside the image (an
  absolute target, or `..` at the root, stays in the root); the last component is never
  followed, so a new entry replaces a symlink rather than writing through it (the guest
  layer asks for one exception: a directory over a symlink to a directory keeps the link);
- a hard link shares the inode of what its target names at that moment.

Layers add the overlay rules: `.wh.NAME` deletes NAME from the layers below and
`.wh..wh..opq` empties its directory of them; what the layer itself adds stays, wherever
its whiteouts come. Whiteouts never follow symlinks, and no `.wh.` name reaches the tree;
a hard link into aufs's link store (`.wh..wh.plnk/`) gets the stored file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .archive import Entry, Kind
from .errors import BadInputError, show_name

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
# aufs kept its own records under this prefix; Docker skips them, and so does the tree.
AUFS_META_PREFIX = b".wh..wh."
# Linux's own limit on symlinks followed while resolving one name.
MAX_SYMLINK_HOPS = 40


@dataclass(frozen=True, slots=True)
class Blob:
    """Bytes of a regular file inside an archive on disk."""

    fd: int
    offset: int
    archive: str


@dataclass(slots=True, eq=False)
class Inode:
    """A file, directory, symlink or device. Hard links are one Inode under several names."""

    kind: Kind
    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    size: int = 0
    data: Blob | bytes | None = None
    target: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    children: dict[bytes, Inode] | None = None

    @property
    def is_dir(self) -> bool:
        return self.kind is Kind.DIR


def split_name(name: bytes, *, archive: str, what: bytes | None = None) -> list[bytes]:
    """Normalise an archive name into components; refuse names that climb out of the root.

    `what` is the entry to blame when `name` is not its own name but its link target.
    """
    if b"\0" in name:
        shown = show_name(name.replace(b"\0", b"\\0"))
        if what is not None:
            shown = f"{show_name(what)} points at {shown}, which"
        raise BadInputError(
            f"{archive}: entry {shown} has a NUL byte in its name",
            hint="no file system can hold such a name; fix the archive",
        )
    parts: list[bytes] = []
    for part in name.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if not parts:
                shown = show_name(name)
                if what is not None:  # the name is what the entry points at
                    shown = f"{show_name(what)} points at {shown}, which"
                raise BadInputError(
                    f"{archive}: entry {shown} climbs out of the root with '..'",
                    hint="remove that entry from the archive; nothing was written",
                )
            parts.pop()
            continue
        parts.append(part)
    return parts


class Tree:
    """A root directory and the operations that apply archive entries to it."""

    def __init__(self, *, mtime: int = 0) -> None:
        # The metadata parents get when an entry arrives before them.
        self.implicit_mtime = mtime
        self.root = Inode(Kind.DIR, 0o755, mtime=mtime, children={})
        # Names (resolved) added by the layer being applied, and their parents: an opaque
        # directory keeps these and empties itself of the rest.
        self._touched: set[bytes] | None = None

    # --- walking ----------------------------------------------------------------------

    def _resolve_dir(
        self, parts: list[bytes], *, archive: str, entry: bytes, create: bool
    ) -> tuple[list[bytes], Inode] | None:
        """Walk to the directory `parts` names, following symlinks inside the image.

        Returns the resolved path and the directory, or None when something is missing
        and `create` is off. Missing directories are made when `create` is on. A loop, an
        empty link target or a file used as a directory is an error naming `entry`.
        """
        return self._walk(parts, create=create, dirs_only=True, blame=(archive, entry))

    def _walk(
        self,
        parts: list[bytes],
        *,
        create: bool,
        dirs_only: bool,
        blame: tuple[str, bytes] | None,
    ) -> tuple[list[bytes], Inode] | None:
        """The one walk behind `_resolve_dir` and `follow`.

        Symlinks are followed wherever they are met, an absolute target or `..` at the
        root staying inside the image. With `dirs_only`, the end must be a directory too.
        `blame` names the archive and entry for errors; without it, any problem is None.
        """

        def problem(message: str, hint: str) -> None:
            if blame is not None:
                raise BadInputError(f"{blame[0]}: entry {show_name(blame[1])}{message}", hint=hint)

        stack: list[tuple[bytes, Inode]] = []  # resolved components and their inodes
        todo = list(reversed(parts))
        hops = 0
        while todo:
            part = todo.pop()
            if part in (b"", b"."):
                continue
            if part == b"..":
                if stack:
                    stack.pop()
                continue
            here = stack[-1][1] if stack else self.root
            if here.children is None:
                return None  # a file in the middle of a name that `follow` was given
            child = here.children.get(part)
            if child is None:
                if not create:
                    return None
                if part.startswith(WHITEOUT_PREFIX):
                    problem(
                        f" would need a directory named {show_name(part)}, which is a "
                        "whiteout name",
                        "fix the symlink that leads there",
                    )
                child = Inode(Kind.DIR, 0o755, mtime=self.implicit_mtime, children={})
                here.children[part] = child
                self._touch([*(p for p, _ in stack), part])
            if child.kind is Kind.SYMLINK:
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    problem(": too many levels of symlinks", "the archive has a symlink loop")
                    return None
                if not child.target:
                    path = b"/".join([*(p for p, _ in stack), part])
                    problem(
                        f" goes through {show_name(path)}, a symlink with an empty target",
                        "Linux cannot follow such a link; fix it in the archive",
                    )
                    return None
                if child.target.startswith(b"/"):
                    stack = []
                todo.extend(reversed(child.target.split(b"/")))
                continue
            if not child.is_dir and dirs_only:
                path = b"/".join([*(p for p, _ in stack), part])
                problem(
                    f" needs {show_name(path)} to be a directory, but it is a {child.kind.value}",
                    "fix the archive so that no file is used as a directory",
                )
                return None
            stack.append((part, child))
        return [p for p, _ in stack], (stack[-1][1] if stack else self.root)

    def _touch(self, parts: list[bytes]) -> None:
        """Mark a path and its parents as written by the layer being applied."""
        if self._touched is None:
            return
        # Longest first: a marked path has its parents marked already, so the walk stops
        # there, and a deep name costs its depth, not its depth squared.
        for i in range(len(parts), 0, -1):
            path = b"/".join(parts[:i])
            if path in self._touched:
                return
            self._touched.add(path)

    def lookup(
        self, name: bytes, *, archive: str = "image", entry: bytes | None = None
    ) -> Inode | None:
        """The inode a name refers to (parents followed, the last component not), or None.

        `entry` is the archive entry to name in errors, when it is not `name` itself.
        """
        parts = split_name(name, archive=archive, what=entry)
        if not parts:
            return self.root
        found = self._resolve_dir(
            parts[:-1], archive=archive, entry=name if entry is None else entry, create=False
        )
        if found is None:
            return None
        children = found[1].children
        assert children is not None
        return children.get(parts[-1])

    def follow(self, name: bytes) -> tuple[bytes, Inode] | None:
        """Where a path ends as the kernel resolves it in the image: every symlink followed,
        the last one too, and `..` at the root staying there. Returns the resolved path and
        its inode, or None when something on the way is missing, is not a directory, or
        loops."""
        found = self._walk(name.split(b"/"), create=False, dirs_only=False, blame=None)
        if found is None:
            return None
        return b"/".join(found[0]), found[1]

    # --- applying entries -------------------------------------------------------------

    def add(
        self, entry: Entry, inode: Inode | None, *, archive: str, keep_dir_symlinks: bool = False
    ) -> bytes:
        """Apply one entry; `inode` is its new inode (None for hard links). Returns the path.

        With `keep_dir_symlinks`, a directory entry whose name is a symlink goes where the
        link leads, as if the link were that directory, instead of replacing the link (GNU
        tar's --keep-directory-symlink): what the guest layer needs on a usr-merged base.
        """
        parts = split_name(entry.name, archive=archive)
        if not parts:
            if entry.kind is Kind.DIR:
                self._set_meta(self.root, entry)
                return b""
            raise BadInputError(
                f"{archive}: entry {show_name(entry.name)} names the root but is a "
                f"{entry.kind.value}",
                hint="the root of an image must be a directory",
            )
        if entry.kind is Kind.HARDLINK:
            inode = self._link_target(entry, archive)
        assert inode is not None
        resolved, parent = self._resolve_dir(  # type: ignore[misc]
            parts[:-1], archive=archive, entry=entry.name, create=True
        )
        children = parent.children
        assert children is not None
        leaf = parts[-1]
        existing = children.get(leaf)
        over_link = existing is not None and existing.kind is Kind.SYMLINK
        if keep_dir_symlinks and inode.is_dir and over_link:
            resolved, existing = self._resolve_dir(  # type: ignore[misc]
                parts, archive=archive, entry=entry.name, create=True
            )
            self._touch(resolved)
            self._copy_meta(existing, inode)
            return b"/".join(resolved)
        path = [*resolved, leaf]
        self._touch(path)
        if existing is not None and existing.is_dir and inode.is_dir and inode is not existing:
            # A directory over a directory: new metadata, same contents.
            self._copy_meta(existing, inode)
        else:
            children[leaf] = inode
        return b"/".join(path)

    def _link_target(self, entry: Entry, archive: str) -> Inode:
        target = None
        if entry.linkname:
            target = self.lookup(entry.linkname, archive=archive, entry=entry.name)
        if target is None:
            raise BadInputError(
                f"{archive}: hard link {show_name(entry.name)} points at "
                f"{show_name(entry.linkname)}, which is not in the image before it",
                hint="hard link targets must come earlier in the archive or a lower layer",
            )
        if target.is_dir:
            raise BadInputError(
                f"{archive}: hard link {show_name(entry.name)} points at the directory "
                f"{show_name(entry.linkname)}",
                hint="directories cannot be hard linked",
            )
        return target

    @staticmethod
    def _set_meta(inode: Inode, entry: Entry) -> None:
        inode.mode, inode.uid, inode.gid, inode.mtime = (
            entry.mode,
            entry.uid,
            entry.gid,
            entry.mtime,
        )
        inode.xattrs = dict(entry.xattrs)

    @staticmethod
    def _copy_meta(existing: Inode, new: Inode) -> None:
        existing.mode, existing.uid, existing.gid = new.mode, new.uid, new.gid
        existing.mtime, existing.xattrs = new.mtime, new.xattrs

    # --- layers -----------------------------------------------------------------------

    def apply_layer(self, entries: Iterable[Entry], *, fd: int, archive: str) -> None:
        """Apply one image layer (or a plain root filesystem tar, which is one layer)."""
        self._touched = set()
        # aufs kept hard-linked files under .wh..wh.plnk/ and linked to them from the tree;
        # the files are not the tree's, but the links get their inodes (as Docker does).
        aufs_files: dict[bytes, Inode] = {}
        try:
            for entry in entries:
                parts = split_name(entry.name, archive=archive)
                if parts and parts[0].startswith(AUFS_META_PREFIX) and parts[0] != OPAQUE_MARKER:
                    if entry.kind is Kind.FILE:
                        held = inode_for(entry, fd=fd, archive=archive)
                        assert held is not None
                        aufs_files[b"/".join(parts)] = held
                    continue  # aufs bookkeeping at the top: not the tree
                if entry.kind is Kind.HARDLINK and aufs_files:
                    target = split_name(entry.linkname, archive=archive, what=entry.name)
                    held = aufs_files.get(b"/".join(target))
                    if held is not None:
                        self.add(dataclasses.replace(entry, kind=Kind.FILE), held, archive=archive)
                        continue
                if any(part.startswith(WHITEOUT_PREFIX) for part in parts[:-1]):
                    raise BadInputError(
                        f"{archive}: entry {show_name(entry.name)} lies inside a whiteout",
                        hint="a .wh. name marks a deletion and cannot hold entries; fix the layer",
                    )
                if parts and parts[-1].startswith(WHITEOUT_PREFIX):
                    self._whiteout(parts)
                    continue
                self.add(entry, inode_for(entry, fd=fd, archive=archive), archive=archive)
        finally:
            self._touched = None

    def _whiteout(self, parts: list[bytes]) -> None:
        """Delete from the lower layers what a whiteout names, without following symlinks."""
        base = parts[-1]
        directory = self._lexical(parts[:-1])
        if directory is None or directory.children is None:
            return
        path = b"/".join(parts[:-1])
        if base == OPAQUE_MARKER:
            self._empty_lower(directory, path)
        elif base.startswith(AUFS_META_PREFIX):
            return  # other aufs bookkeeping (.wh..wh.plnk and the like): not part of the tree
        else:
            name = base[len(WHITEOUT_PREFIX) :]
            victim = directory.children.get(name)
            child_path = path + b"/" + name if path else name
            assert self._touched is not None
            if victim is None:
                return
            if child_path not in self._touched:
                del directory.children[name]
            elif victim.is_dir:
                # This layer put things in it too: those stay, the lower ones go.
                self._empty_lower(victim, child_path)

    def _lexical(self, parts: list[bytes]) -> Inode | None:
        node = self.root
        for part in parts:
            if node.children is None:
                return None
            child = node.children.get(part)
            if child is None or not child.is_dir:
                return None
            node = child
        return node

    def _empty_lower(self, directory: Inode, path: bytes) -> None:
        assert directory.children is not None and self._touched is not None
        for name in list(directory.children):
            child_path = path + b"/" + name if path else name
            if child_path not in self._touched:
                del directory.children[name]
            elif directory.children[name].is_dir:
                self._empty_lower(directory.children[name], child_path)

    # --- reading it back --------------------------------------------------------------

    def walk(self) -> Iterator[tuple[bytes, Inode]]:
        """Every (path, inode) below the root, parents before children, in no set order."""
        stack: list[tuple[bytes, Inode]] = [(b"", self.root)]
        while stack:
            path, node = stack.pop()
            assert node.children is not None
            for name, child in node.children.items():
                child_path = path + b"/" + name if path else name
                yield child_path, child
                if child.is_dir:
                    stack.append((child_path, child))

    def sorted_entries(self) -> list[tuple[bytes, Inode]]:
        """Every (path, inode), sorted by path bytes: deterministic, and parents come first
        because a parent's path is a prefix of its children's."""
        return sorted(self.walk(), key=lambda item: item[0])


def inode_for(entry: Entry, *, fd: int, archive: str) -> Inode | None:
    """A new inode for an archive entry (None for a hard link, which reuses one)."""
    if entry.kind is Kind.HARDLINK:
        return None
    inode = Inode(
        entry.kind,
        entry.mode,
        entry.uid,
        entry.gid,
        entry.mtime,
        xattrs=dict(entry.xattrs),
    )
    if entry.kind is Kind.FILE:
        inode.size = entry.size
        inode.data = Blob(fd, entry.offset, archive) if entry.size else b""
    elif entry.kind is Kind.DIR:
        inode.children = {}
    elif entry.kind is Kind.SYMLINK:
        if b"\0" in entry.linkname:
            raise BadInputError(
                f"{archive}: symlink {show_name(entry.name)} has a NUL byte in its target",
                hint="no file system can hold such a link; fix the archive",
            )
        inode.target = entry.linkname
    elif entry.kind in (Kind.CHAR, Kind.BLOCK):
        inode.rdev = (entry.devmajor, entry.devminor)
    return inode
