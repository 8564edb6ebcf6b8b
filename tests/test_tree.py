"""The merged tree: tar semantics, layers and whiteouts, read back through the writers.

Layers are real tar bytes (written by hand) in memory files, applied with Tree.apply_layer
as a build does; the result is written with both writers and read back by libarchive.
The property tests compare that with a small model: a flat dict of paths, the rules
written out one by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from helpers import (
    SDE,
    Item,
    Member,
    applied,
    by_path,
    char_device,
    contents,
    directory,
    fifo,
    file,
    hardlink,
    link_groups,
    symlink,
    tar_bytes,
    written,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from uvmkit.archive import Entry, Kind
from uvmkit.errors import BadInputError, UvmkitError
from uvmkit.tree import Inode


def outputs(*layers: Sequence[Member | bytes]) -> list[tuple[dict[bytes, Item], list[Item]]]:
    with applied(*layers) as tree:
        return [(by_path(items), items) for items in written(tree)]


# --- 9. opaque directories --------------------------------------------------------------


@pytest.mark.parametrize("marker_first", [True, False], ids=["marker-first", "marker-last"])
def test_opaque_directory_hides_the_lower_layers_only(marker_first: bool) -> None:
    lower = [directory(b"a/"), directory(b"a/b/"), file(b"a/b/foo", b"foo"), file(b"a/x")]
    upper = [file(b"a/.wh..wh..opq"), file(b"a/new", b"new")]
    if not marker_first:
        upper.reverse()

    for items, _ in outputs(lower, upper):
        assert sorted(name for name in items if name.startswith(b"a/")) == [b"a/new"]
        assert items[b"a"].kind == "dir"
        assert not any(b".wh." in name for name in items)


def test_opaque_whiteout_never_follows_a_lower_symlink() -> None:
    lower = [directory(b"t/"), file(b"t/keep", b"keep"), symlink(b"link", b"t")]
    upper = [file(b"link/.wh..wh..opq")]

    for items, raw in outputs(lower, upper):
        assert contents(raw)[b"t/keep"] == b"keep"
        assert (items[b"link"].kind, items[b"link"].target) == ("symlink", b"t")


def test_opaque_marker_is_matched_exactly_before_the_generic_rule() -> None:
    lower = [file(b"a/x"), file(b"a/.wh..opq-lookalike"), file(b"b/y")]
    upper = [
        file(b"a/.wh..wh..opq"),  # opaque: empties a
        file(b"b/.wh..wh..opqX"),  # aufs bookkeeping, not a whiteout of anything
        file(b".wh..wh.plnk/12345"),  # aufs hard-link store: skipped, as Docker does
    ]

    for items, _ in outputs(lower, upper):
        assert b"a/x" not in items and b"a" in items
        assert b"b/y" in items
        assert not any(b".wh." in name for name in items)


def test_hard_links_into_the_aufs_link_store_get_its_files() -> None:
    # aufs layers keep hard-linked files under .wh..wh.plnk/ and link to them from the tree.
    layer = [
        directory(b".wh..wh.plnk/", mode=0o700),
        file(b".wh..wh.plnk/234.567", b"shared", mode=0o4755, uid=7),
        directory(b"usr/bin/"),
        hardlink(b"usr/bin/a", b".wh..wh.plnk/234.567"),
        hardlink(b"usr/bin/b", b"/.wh..wh.plnk/234.567"),
    ]

    for items, raw in outputs(layer):
        assert not any(b".wh." in name for name in items)
        assert contents(raw)[b"usr/bin/a"] == b"shared"
        assert contents(raw)[b"usr/bin/b"] == b"shared"
        assert (items[b"usr/bin/a"].mode, items[b"usr/bin/a"].uid) == (0o4755, 7)
        assert link_groups(raw)[b"usr/bin/a"] == {b"usr/bin/a", b"usr/bin/b"}


def test_opaque_directory_keeps_what_its_own_layer_put_deeper() -> None:
    lower = [file(b"a/sub/old"), file(b"a/gone")]
    upper = [directory(b"a/sub/"), file(b"a/sub/new"), file(b"a/.wh..wh..opq")]

    for items, _ in outputs(lower, upper):
        assert sorted(n for n in items if n.startswith(b"a/")) == [b"a/sub", b"a/sub/new"]


# --- 10. whiteouts of any type ----------------------------------------------------------


def test_whiteouts_of_any_type_and_links_into_lower_layers() -> None:
    lower = [directory(b"w/"), file(b"w/a", b"A"), file(b"w/b", b"B"), file(b"w/d", b"D")]
    upper = [
        hardlink(b"w/.wh.b", b"w/a"),  # a whiteout stored as a hard link: still a whiteout
        hardlink(b"w/c", b"w/a"),  # a hard link to a file only the lower layer holds
        directory(b"w/.wh.d/"),  # a whiteout stored as a directory
        symlink(b"w/.wh.nothing", b"x"),  # a whiteout of a name that is not there
    ]

    for items, raw in outputs(lower, upper):
        assert sorted(n for n in items if n.startswith(b"w/")) == [b"w/a", b"w/c"]
        assert link_groups(raw)[b"w/c"] == {b"w/a", b"w/c"}
        assert contents(raw)[b"w/c"] == b"A"
        assert not any(b".wh." in name for name in items)


def test_a_whiteout_leaves_what_its_own_layer_added() -> None:
    lower = [file(b"f", b"lower"), directory(b"d/"), file(b"d/old"), file(b"gone")]
    upper = [
        file(b"f", b"upper"),
        file(b".wh.f"),
        file(b"d/new"),
        file(b".wh.d"),
        file(b".wh.gone"),
    ]

    for items, raw in outputs(lower, upper):
        assert contents(raw)[b"f"] == b"upper"
        assert sorted(n for n in items if n.startswith(b"d")) == [b"d", b"d/new"]
        assert b"gone" not in items


def test_whiteouts_never_follow_symlinks() -> None:
    lower = [file(b"t/victim"), symlink(b"link", b"t"), symlink(b"abs", b"/t")]
    upper = [file(b"link/.wh.victim"), file(b"abs/.wh.victim")]

    for items, _ in outputs(lower, upper):
        assert b"t/victim" in items


def test_an_entry_inside_a_whiteout_is_refused() -> None:
    with pytest.raises(BadInputError, match=r"L2: entry a/\.wh\.b/c lies inside a whiteout"):
        outputs([file(b"a/x")], [file(b"a/.wh.b/c")])


# --- plain tar semantics ----------------------------------------------------------------


def test_symlinked_parents_resolve_inside_the_image() -> None:
    layer = [
        symlink(b"etc", b"/private/etc"),
        file(b"etc/hosts", b"h"),  # lands at private/etc/hosts, made on the way
        symlink(b"private/up", b"../../../.."),
        file(b"private/up/top", b"t"),  # .. at the root stays at the root
        symlink(b"rel", b"private/./etc/../etc"),
        file(b"rel/motd", b"m"),
    ]

    for items, raw in outputs(layer):
        data = contents(raw)
        assert data[b"private/etc/hosts"] == b"h"
        assert data[b"top"] == b"t"
        assert data[b"private/etc/motd"] == b"m"
        assert (items[b"etc"].kind, items[b"rel"].kind) == ("symlink", "symlink")


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ([symlink(b"a", b"b"), symlink(b"b", b"a"), file(b"a/x")], "too many levels"),
        ([file(b"f"), file(b"f/x")], "needs f to be a directory, but it is a file"),
        ([symlink(b"l", b""), file(b"l/x")], "empty target"),
        ([symlink(b"l", b".wh.x"), file(b"l/y")], "whiteout name"),
        ([hardlink(b"h", b"missing")], "not in the image before it"),
        ([directory(b"d/"), hardlink(b"h", b"d")], "points at the directory d"),
        ([file(b"./", b"x")], "names the root but is a file"),
        ([file(b"../x")], "climbs out"),
    ],
    ids=[
        "loop",
        "file-as-dir",
        "empty-link",
        "whiteout-dir",
        "dangling-hardlink",
        "hardlink-dir",
        "root-file",
        "climb",
    ],
)
def test_bad_trees_are_refused_with_the_entry_named(layer: list[Member], message: str) -> None:
    with pytest.raises(BadInputError, match=message) as caught:
        outputs(layer)
    assert str(caught.value).startswith("L1: ")


def test_follow_resolves_like_the_kernel() -> None:
    layer = [
        file(b"usr/bin/busybox", b"bb", mode=0o755),
        symlink(b"bin", b"usr/bin"),
        symlink(b"usr/bin/sh", b"busybox"),
        symlink(b"sbin/init", b"../../../bin/sh"),  # more .. than parents
        symlink(b"loop", b"loop"),
        symlink(b"empty", b""),
    ]
    with applied(layer) as tree:
        found = tree.follow(b"/sbin/init")
        assert found is not None and found[0] == b"usr/bin/busybox"
        assert tree.follow(b"/bin/../bin/sh") is not None
        assert tree.follow(b"bin/busybox/x") is None  # a file used as a directory
        assert tree.follow(b"loop") is None
        assert tree.follow(b"empty") is None
        assert tree.follow(b"/") == (b"", tree.root)


def test_keep_dir_symlinks_writes_a_directory_through_the_link() -> None:
    with applied([directory(b"usr/lib/", 0o755), symlink(b"lib", b"usr/lib")]) as tree:
        path = tree.add(
            Entry(b"lib", Kind.DIR, mode=0o750),
            Inode(Kind.DIR, 0o750, children={}),
            archive="guest",
            keep_dir_symlinks=True,
        )
        tree.add(
            Entry(b"lib/modules", Kind.FILE), Inode(Kind.FILE, 0o644, data=b""), archive="guest"
        )
        items = by_path(written(tree)[1])
    assert path == b"usr/lib"
    assert (items[b"lib"].kind, items[b"lib"].target) == ("symlink", b"usr/lib")
    assert items[b"usr/lib"].mode == 0o750
    assert b"usr/lib/modules" in items


def test_without_keep_dir_symlinks_a_directory_replaces_the_link() -> None:
    # As `docker build` and containerd apply a layer: the later entry wins.
    for items, _ in outputs(
        [directory(b"usr/lib/"), symlink(b"lib", b"usr/lib")], [directory(b"lib/"), file(b"lib/x")]
    ):
        assert items[b"lib"].kind == "dir" and b"lib/x" in items


# --- property: the tree and its outputs match a model ----------------------------------


class ModelError(Exception):
    """The model's verdict that the input is not a tree."""


@dataclass(eq=False)
class Node:
    kind: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime: int = SDE
    data: bytes = b""
    target: bytes = b""
    rdev: tuple[int, int] = (0, 0)


Path_ = tuple[bytes, ...]
KINDS = {b"0": "file", b"5": "dir", b"2": "symlink", b"3": "char", b"6": "fifo"}


class Model:
    """A flat dict of paths; every rule of the tree written out as plainly as possible."""

    def __init__(self) -> None:
        self.nodes: dict[Path_, Node] = {(): Node("dir")}
        self.touched: set[Path_] = set()

    def touch(self, path: Path_) -> None:
        self.touched.update(path[:i] for i in range(1, len(path) + 1))

    @staticmethod
    def normalise(name: bytes) -> Path_:
        parts: list[bytes] = []
        for part in name.split(b"/"):
            if part == b"..":
                if not parts:
                    raise ModelError("climbs out")
                parts.pop()
            elif part not in (b"", b"."):
                parts.append(part)
        return tuple(parts)

    def resolve(self, parts: Path_, *, create: bool) -> Path_ | None:
        """The directory `parts` leads to, every symlink on the way followed, in the image."""
        done: Path_ = ()
        todo = list(parts)
        hops = 0
        while todo:
            part = todo.pop(0)
            if part in (b"", b"."):
                continue
            if part == b"..":
                done = done[:-1]
                continue
            here = (*done, part)
            if here not in self.nodes:
                if not create:
                    return None
                if part.startswith(b".wh."):
                    raise ModelError("whiteout name")
                self.nodes[here] = Node("dir")
                self.touch(here)
            node = self.nodes[here]
            if node.kind == "symlink":
                hops += 1
                if hops > 40 or not node.target:
                    raise ModelError("loop or empty link")
                if node.target.startswith(b"/"):
                    done = ()
                todo = node.target.split(b"/") + todo
            elif node.kind == "dir":
                done = here
            else:
                raise ModelError("not a directory")
        return done

    def under(self, path: Path_) -> list[Path_]:
        return [p for p in self.nodes if p[: len(path)] == path and len(p) > len(path)]

    def remove_lower(self, paths: list[Path_]) -> None:
        for p in paths:
            if p not in self.touched:
                del self.nodes[p]

    def apply(self, m: Member) -> None:
        parts = self.normalise(m.name)
        if parts and parts[0].startswith(b".wh..wh.") and parts[0] != b".wh..wh..opq":
            return
        if any(p.startswith(b".wh.") for p in parts[:-1]):
            raise ModelError("inside a whiteout")
        if parts and parts[-1].startswith(b".wh."):
            self.whiteout(parts)
            return
        if not parts:
            if m.flag != b"5":
                raise ModelError("root")
            return
        if m.flag == b"1":
            node = self.lookup(m.linkname)
        else:
            node = Node(KINDS[m.flag], m.mode, m.uid, m.gid, m.mtime, m.data, m.linkname, m.dev)
        parent = self.resolve(parts[:-1], create=True)
        assert parent is not None
        path = (*parent, parts[-1])
        self.touch(path)
        existing = self.nodes.get(path)
        if existing is not None and existing.kind == "dir" and node.kind == "dir":
            existing.mode, existing.uid, existing.gid = node.mode, node.uid, node.gid
            existing.mtime = node.mtime
            return
        for p in [path, *self.under(path)]:
            self.nodes.pop(p, None)
        self.nodes[path] = node

    def lookup(self, name: bytes) -> Node:
        parts = self.normalise(name)
        if not parts:
            raise ModelError("link to the root")
        parent = self.resolve(parts[:-1], create=False)
        node = None if parent is None else self.nodes.get((*parent, parts[-1]))
        if node is None or node.kind == "dir":
            raise ModelError("bad hard link")
        return node

    def whiteout(self, parts: Path_) -> None:
        directory, base = parts[:-1], parts[-1]
        chain = [self.nodes.get(directory[:i]) for i in range(len(directory) + 1)]
        if any(node is None or node.kind != "dir" for node in chain):
            return
        if base == b".wh..wh..opq":
            self.remove_lower(self.under(directory))
        elif not base.startswith(b".wh..wh."):
            victim = (*directory, base[4:])
            if victim in self.nodes:
                self.remove_lower([victim, *self.under(victim)])

    def layer(self, members: list[Member]) -> None:
        self.touched = set()
        for m in members:
            self.apply(m)


# Directories are named from a few letters, and now and then a dot, two dots or an empty
# component; other entries mostly take leaf names of their own, so that most stacks are
# trees and a fair share of them still collide.
DIR_PARTS = [b"a", b"b", b"c"] * 6 + [b".", b"..", b"", b"a/.."]
LEAVES = [b"x", b"y", b"a", b"b"]
TARGETS = [
    b"a",
    b"b",
    b"a/b",
    b"../a",
    b"/a",
    b"/",
    b".",
    b"..",
    b"../../c",
    b"",
    b"b/..",
    b"/c/b",
    b".wh.a",
    b"c",
    b"x",
    b"a/x",
]


# A name that starts by climbing out is refused whatever follows; keep those rare.
FIRST_PARTS = [b"a", b"b", b"c"] * 10 + [b"..", b".", b"a/."]


@st.composite
def names(draw: st.DrawFn, leaves: list[bytes] = DIR_PARTS) -> bytes:
    parts = draw(st.lists(st.sampled_from(DIR_PARTS), max_size=2))
    if parts:
        parts[0] = draw(st.sampled_from(FIRST_PARTS))
    parts.append(draw(st.sampled_from(leaves)))
    lead = draw(st.sampled_from([b"", b"", b"/", b"./"]))
    trail = draw(st.sampled_from([b"", b"", b"/"]))
    return lead + b"/".join(parts) + trail


@st.composite
def members(draw: st.DrawFn, index: int, layers: bool, earlier: list[bytes]) -> Member:
    kinds = ["dir", "dir", "dir", "file", "file", "symlink", "hardlink", "char", "fifo"]
    if layers:
        kinds += ["whiteout", "whiteout", "opaque"]
    kind = draw(st.sampled_from(kinds))
    name = draw(names() if kind in ("dir", "whiteout", "opaque") else names(LEAVES))
    meta = {
        "mode": draw(st.sampled_from([0o644, 0o755, 0o4755, 0o700, 0o1777])),
        "uid": draw(st.sampled_from([0, 1, 3_000_000])),
        "gid": draw(st.sampled_from([0, 5])),
        "mtime": draw(st.sampled_from([0, 500, 2000])),
    }
    if kind in ("whiteout", "opaque"):
        leaf = b".wh." + draw(st.sampled_from([*DIR_PARTS[:3], *LEAVES]))
        if kind == "opaque":
            leaf = b".wh..wh..opq"
        name = name.rstrip(b"/") + b"/" + leaf
        # A whiteout is one whatever type its entry has.
        flag = draw(st.sampled_from([b"0", b"1", b"5"]))
        return Member(name, flag, linkname=b"a" if flag == b"1" else b"")
    if kind == "dir":
        return directory(name, **meta)
    if kind == "file":
        # Every file's bytes are its own, so a mix-up of contents shows.
        return file(name, b"content %d" % index, **meta)
    if kind == "symlink":
        return symlink(name, draw(st.sampled_from(TARGETS)), uid=meta["uid"])
    if kind == "hardlink":
        # Mostly a name given before, so that most links have something to point at.
        target = draw(st.sampled_from(earlier) if earlier else names(LEAVES))
        return hardlink(name, draw(st.sampled_from([target] * 5 + [draw(names(LEAVES))])))
    if kind == "char":
        return char_device(name, 1, draw(st.sampled_from([3, 5])), mode=0o666)
    return fifo(name, mode=0o600)


@st.composite
def stacks(draw: st.DrawFn) -> list[list[Member]]:
    count = draw(st.integers(1, 3))
    result: list[list[Member]] = []
    earlier: list[bytes] = []
    for layer in range(count):
        size = draw(st.integers(0, 8))
        result.append([])
        for i in range(size):
            member = draw(members(layer * 100 + i, count > 1, earlier))
            if member.flag in (b"0", b"2") and b".wh." not in member.name:
                earlier.append(member.name)
            result[-1].append(member)
    return result


def expected(model: Model) -> dict[bytes, tuple[object, ...]]:
    groups: dict[int, set[bytes]] = {}
    for path, node in model.nodes.items():
        if path and node.kind == "file":
            groups.setdefault(id(node), set()).add(b"/".join(path))
    return {
        b"/".join(path): (
            node.kind,
            node.mode,
            node.uid,
            node.gid,
            max(0, min(node.mtime, SDE)),
            node.data if node.kind == "file" else None,
            node.target if node.kind == "symlink" else b"",
            node.rdev if node.kind == "char" else (0, 0),
            frozenset(groups[id(node)]) if node.kind == "file" else None,
        )
        for path, node in model.nodes.items()
        if path
    }


def actual(items: list[Item]) -> dict[bytes, tuple[object, ...]]:
    data, groups = contents(items), link_groups(items)
    return {
        i.path: (
            "file" if i.kind == "hardlink" else i.kind,
            i.mode,
            i.uid,
            i.gid,
            i.mtime,
            data.get(i.path),
            i.target if i.kind == "symlink" else b"",
            i.rdev if i.kind == "char" else (0, 0),
            groups.get(i.path),
        )
        for i in by_path(items).values()
    }


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stacks())
def test_tree_and_outputs_match_the_model(layers: list[list[Member]]) -> None:
    model = Model()
    try:
        for layer in layers:
            model.layer(layer)
    except ModelError:
        model_ok = False
    else:
        model_ok = True

    try:
        with applied(*layers) as tree:
            newc, tar = written(tree)
    except UvmkitError:
        assert not model_ok, "uvmkit refused what the model accepts"
        event("refused")
        return
    event(f"accepted, {len(layers)} layer(s)")
    assert model_ok, "uvmkit accepted what the model refuses"
    want = expected(model)
    assert actual(tar) == want
    assert actual(newc) == want
    assert not any(part.startswith(b".wh.") for name in want for part in name.split(b"/"))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3 * 512), st.integers(0, 3 * 512), st.binary(min_size=1, max_size=8))
def test_damaged_tars_are_refused_cleanly(prefix: bytes, at: int, junk: bytes) -> None:
    """Whatever a tar turns into, reading and applying it ends in a tree or a UvmkitError."""
    good = tar_bytes(
        [directory(b"d/"), file(b"d/f", b"x" * 700), symlink(b"l", b"d"), hardlink(b"h", b"d/f")]
    )
    damaged = (prefix + good)[:at] + junk + (prefix + good)[at + len(junk) :]
    try:
        with applied([damaged]) as tree:
            written(tree)
    except UvmkitError:
        pass
