"""The hard base inputs of cases/CASES.md, each built into a real file and run through
`invoke build-all` as a user would, with initrd.img and rootfs.tar.gz read back by
libarchive (and Python's tarfile where it helps).

Layer cases (9 and 10) are covered at the tree level in test_tree.py and, as docker save
and OCI archives, in test_image_archive.py.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    SOURCE_DATE_EPOCH,
    Item,
    Member,
    applied,
    assert_refused,
    block_device,
    build_all,
    by_path,
    char_device,
    contents,
    directory,
    fifo,
    file,
    gnu_long,
    hardlink,
    invoke,
    link_groups,
    read_archive,
    read_outputs,
    run_build,
    sparse_tar,
    symlink,
    write_tar,
)

from uvmkit.inits import runnable_problem, shebang_interpreter

# What every build adds on top of the base.
GUEST_PATHS = {b"init", b"bin/uvmkit-agent", b"dev/console", b"info"}


def build(
    tmp_path: Path, members: list[Member | bytes], **kw: bool
) -> tuple[dict[bytes, Item], dict[bytes, Item], list[Item], list[Item]]:
    """Build-all of a tar of `members`; both outputs keyed by path (each path once) and raw."""
    base = write_tar(tmp_path / "base.tar", members)
    out = build_all(base, tmp_path, **kw)
    initrd, rootfs = read_outputs(out)
    assert_same_tree(initrd, rootfs)
    return by_path(initrd), by_path(rootfs), initrd, rootfs


def assert_same_tree(initrd: list[Item], rootfs: list[Item]) -> None:
    """Both outputs hold the same names with the same types, metadata, targets, contents
    and hard-link groups (the formats store links differently; the tree is the same)."""

    def summary(items: list[Item]) -> dict[bytes, tuple[object, ...]]:
        data, groups = contents(items), link_groups(items)
        return {
            i.path: (
                "file" if i.kind == "hardlink" else i.kind,
                i.mode,
                i.uid,
                i.gid,
                i.target if i.kind == "symlink" else b"",
                i.rdev if i.kind in ("char", "block") else (0, 0),
                data.get(i.path),
                groups.get(i.path),
            )
            for i in items
        }

    assert summary(initrd) == summary(rootfs)


# --- 1. hard link to a symlink -------------------------------------------------------


def test_hard_link_to_a_symlink_is_the_same_symlink_everywhere(tmp_path: Path) -> None:
    initrd, rootfs, _, _ = build(
        tmp_path,
        [
            directory(b"etc/"),
            file(b"etc/hosts", b"127.0.0.1 localhost\n"),
            file(b"target", b"T\n"),
            symlink(b"s", b"target"),
            hardlink(b"h", b"s"),
            symlink(b"dirlink", b"etc"),
            hardlink(b"hd", b"dirlink"),
            symlink(b"abs", b"/etc/hosts"),
            hardlink(b"etc/ha", b"abs"),
        ],
    )

    for items in (initrd, rootfs):
        for name, target in (
            (b"s", b"target"),
            (b"h", b"target"),
            (b"dirlink", b"etc"),
            (b"hd", b"etc"),
            (b"abs", b"/etc/hosts"),
            (b"etc/ha", b"/etc/hosts"),
        ):
            assert items[name].kind == "symlink", name
            assert items[name].target == target, name
        assert items[b"target"].kind == "file"


# --- 2. entries before their parents ---------------------------------------------------


def test_entries_before_their_parents(tmp_path: Path) -> None:
    initrd, rootfs, initrd_items, rootfs_items = build(
        tmp_path,
        [
            file(b"a/b/f", b"F\n", uid=7, gid=8),
            directory(b"a/b/", 0o700, uid=1000, gid=1001),
            hardlink(b"x/y/h", b"a/b/f"),
        ],
    )

    for items, raw in ((initrd, initrd_items), (rootfs, rootfs_items)):
        for implicit in (b"a", b"x", b"x/y"):
            item = items[implicit]
            assert (item.kind, item.mode, item.uid, item.gid) == ("dir", 0o755, 0, 0), implicit
            assert item.mtime == SOURCE_DATE_EPOCH
        a_b = items[b"a/b"]
        assert (a_b.kind, a_b.mode, a_b.uid, a_b.gid) == ("dir", 0o700, 1000, 1001)
        assert (items[b"a/b/f"].uid, items[b"a/b/f"].gid) == (7, 8)
        assert link_groups(raw)[b"x/y/h"] == {b"a/b/f", b"x/y/h"}
        assert contents(raw)[b"x/y/h"] == contents(raw)[b"a/b/f"] == b"F\n"
        # Parents come before their children in the archive, as unpackers need.
        order = [i.path for i in raw]
        assert order.index(b"a") < order.index(b"a/b") < order.index(b"a/b/f")

    # tar: one copy of the data, then a link entry; newc: one inode number, nlink 2.
    assert rootfs[b"x/y/h"].kind == "hardlink" and rootfs[b"x/y/h"].target == b"a/b/f"
    assert initrd[b"a/b/f"].ino == initrd[b"x/y/h"].ino
    assert initrd[b"a/b/f"].nlink == initrd[b"x/y/h"].nlink == 2


# --- 3. duplicate entries --------------------------------------------------------------


def test_duplicate_entries_the_later_one_wins(tmp_path: Path) -> None:
    initrd, rootfs, initrd_items, rootfs_items = build(
        tmp_path,
        [
            directory(b"d/", 0o755),
            file(b"d/x", b"x"),
            directory(b"d/", 0o700, uid=3),
            file(b"f", b"A"),
            file(b"f", b"B", mode=0o600),
            # A file, then a directory of the same name, and the other way round.
            file(b"g", b"plain"),
            directory(b"g/"),
            file(b"g/y", b"y"),
            directory(b"k/"),
            file(b"k/z", b"z"),
            file(b"k", b"now a file"),
            # A hard link keeps what its target was when it was made.
            file(b"old", b"first"),
            hardlink(b"keeps-first", b"old"),
            file(b"old", b"second"),
        ],
    )

    for items, raw in ((initrd, initrd_items), (rootfs, rootfs_items)):
        data = contents(raw)
        assert (items[b"d"].kind, items[b"d"].mode, items[b"d"].uid) == ("dir", 0o700, 3)
        assert data[b"d/x"] == b"x"
        assert (data[b"f"], items[b"f"].mode) == (b"B", 0o600)
        assert items[b"g"].kind == "dir" and data[b"g/y"] == b"y"
        assert items[b"k"].kind == "file" and data[b"k"] == b"now a file"
        assert b"k/z" not in items
        assert (data[b"old"], data[b"keeps-first"]) == (b"second", b"first")
        assert link_groups(raw)[b"old"] == {b"old"}


# --- 4. names that are not UTF-8 -------------------------------------------------------

LONG_LATIN1 = b"deep/" + b"\xe9" * 120 + b"/caf\xe9"


def test_names_that_are_not_utf8_come_out_byte_for_byte(tmp_path: Path) -> None:
    cap = {b"SCHILY.xattr.user.note": b"\xff"}
    initrd, rootfs, initrd_items, rootfs_items = build(
        tmp_path,
        [
            file(b"etc/caf\xe9", b"latin-1 name\n", pax=cap),
            file(b"d/\xff", b"ff"),
            symlink(b"l\xfe", b"etc/caf\xe9"),
            hardlink(b"d/\xfe\xff", b"d/\xff"),
            # Longer than ustar's fields: the name travels in a GNU long-name record.
            gnu_long(file(LONG_LATIN1, b"long")),
        ],
    )

    for items, raw in ((initrd, initrd_items), (rootfs, rootfs_items)):
        data = contents(raw)
        assert data[b"etc/caf\xe9"] == b"latin-1 name\n"
        assert data[b"d/\xff"] == data[b"d/\xfe\xff"] == b"ff"
        assert items[b"l\xfe"].target == b"etc/caf\xe9"
        assert data[LONG_LATIN1] == b"long"
        assert items[b"deep/" + b"\xe9" * 120].kind == "dir"

    # Python's tarfile agrees on the bytes (it hands them over as surrogate escapes).
    with tarfile.open(tmp_path / "out" / "rootfs.tar.gz") as tar:
        names = {n.encode("utf-8", "surrogateescape") for n in tar.getnames()}
    assert {b"etc/caf\xe9", b"d/\xff", b"l\xfe", LONG_LATIN1} <= names


def test_messages_about_non_utf8_names_do_not_crash(tmp_path: Path) -> None:
    base = write_tar(
        tmp_path / "base.tar",
        [file(b"caf\xe9", b"x", pax={b"SCHILY.xattr.user.x": b"1"}), file(b"\xff/../../evil")],
    )

    result, out = run_build(base, tmp_path)

    assert_refused(result, out, "\\xff/../../evil", "climbs out")

    # The xattr warning names a non-UTF-8 file too.
    ok = write_tar(
        tmp_path / "ok.tar", [file(b"caf\xe9", b"x", pax={b"SCHILY.xattr.user.x": b"1"})]
    )
    result, out = run_build(ok, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "caf\\xe9 (user.x)" in result.stderr


# --- 5. mode bits beyond 0777 -----------------------------------------------------------


def test_setuid_setgid_and_sticky_bits_survive_a_build_without_privileges(
    tmp_path: Path,
) -> None:
    initrd, rootfs, _, _ = build(
        tmp_path,
        [
            file(b"usr/bin/sudo", b"sudo", mode=0o4755),
            file(b"usr/bin/wall", b"wall", mode=0o2755, gid=5),
            file(b"usr/bin/odd", b"odd", mode=0o7777, uid=12, gid=5),
            directory(b"tmp/", 0o1777),
            directory(b"srv/shared/", 0o2775, gid=5),
        ],
        as_user=True,
    )

    for items in (initrd, rootfs):
        assert (items[b"usr/bin/sudo"].mode, items[b"usr/bin/sudo"].uid) == (0o4755, 0)
        assert (items[b"usr/bin/wall"].mode, items[b"usr/bin/wall"].gid) == (0o2755, 5)
        assert (items[b"usr/bin/odd"].mode, items[b"usr/bin/odd"].uid) == (0o7777, 12)
        assert (items[b"tmp"].kind, items[b"tmp"].mode) == ("dir", 0o1777)
        assert (items[b"srv/shared"].mode, items[b"srv/shared"].gid) == (0o2775, 5)


# --- 6. names that climb out -------------------------------------------------------------


@pytest.mark.parametrize(
    ("member", "named"),
    [
        (file(b"../evil", b"x"), "../evil"),
        (file(b"a/../../evil", b"x"), "a/../../evil"),
        (file(b"/../evil", b"x"), "/../evil"),
        (directory(b"./../evil/"), "./../evil/"),
        (symlink(b"../evil", b"etc"), "../evil"),
        (hardlink(b"h", b"../etc/hosts"), "h points at ../etc/hosts"),
        (hardlink(b"../evil", b"etc/hosts"), "../evil"),
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "absolute-dotdot",
        "dir",
        "symlink",
        "link-target",
        "hardlink-name",
    ],
)
def test_names_that_climb_out_are_refused(tmp_path: Path, member: Member, named: str) -> None:
    base = write_tar(tmp_path / "base.tar", [directory(b"etc/"), file(b"etc/hosts"), member])

    result, out = run_build(base, tmp_path)

    assert_refused(result, out, str(base), named, "climbs out")


def test_dot_names_and_leading_slashes_are_ordinary(tmp_path: Path) -> None:
    initrd, rootfs, _, _ = build(
        tmp_path,
        [
            directory(b"./"),
            directory(b"."),
            file(b"./etc/hosts", b"hosts"),
            file(b"/etc/motd", b"motd"),
            file(b"etc//./passwd", b"passwd"),
            file(b"a/./b/../c", b"c"),
        ],
    )

    for items in (initrd, rootfs):
        assert {b"etc", b"etc/hosts", b"etc/motd", b"etc/passwd", b"a", b"a/c"} <= set(items)
        assert not {b"", b".", b"/", b"./etc/hosts", b"a/b"} & set(items)
        assert all(not name.startswith((b"/", b"./")) for name in items)


# --- 7. symlinks are stored, not followed ---------------------------------------------


def test_symlinks_are_kept_verbatim_and_never_followed_out_of_the_image(
    tmp_path: Path,
) -> None:
    host = tmp_path / "host-dir"
    host.mkdir()
    initrd, rootfs, _, _ = build(
        tmp_path,
        [
            symlink(b"usr/bin/vi", b"/etc/alternatives/vi"),
            symlink(b"x", b"../../../../etc/passwd"),
            symlink(b"l", b"/etc"),
            file(b"l/evil", b"E"),
            symlink(b"up", b"../../.."),
            file(b"up/escaped", b"U"),
            symlink(b"host", str(host).encode()),
            file(b"host/planted", b"P"),
        ],
    )

    for items in (initrd, rootfs):
        assert items[b"usr/bin/vi"].target == b"/etc/alternatives/vi"
        assert items[b"x"].target == b"../../../../etc/passwd"
        assert (items[b"l"].kind, items[b"l"].target) == ("symlink", b"/etc")
        assert items[b"etc/evil"].kind == "file"
        assert items[b"escaped"].kind == "file"
        assert items[str(host).lstrip("/").encode() + b"/planted"].kind == "file"
        assert not {b"l/evil", b"up/escaped", b"host/planted"} & set(items)
    assert list(host.iterdir()) == []
    assert not Path("/etc/evil").exists() and not Path("/escaped").exists()


# --- 8. binary xattrs -----------------------------------------------------------------

# A version 2 file capability granting cap_net_raw, as `setcap cap_net_raw+ep` writes.
NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")
ODD = b"\x00\xff\x80=\n\x00 value with = and a newline"


def test_binary_xattrs_are_carried_exactly_and_their_loss_in_newc_is_reported(
    tmp_path: Path,
) -> None:
    base = write_tar(
        tmp_path / "base.tar",
        [
            file(
                b"bin/ping", b"ping", mode=0o755, pax={b"SCHILY.xattr.security.capability": NET_RAW}
            ),
            file(
                b"usr/bin/odd",
                b"odd",
                pax={b"SCHILY.xattr.user.odd": ODD, b"SCHILY.xattr.trusted.t": b"\x80"},
            ),
            file(b"plain", b"no xattrs"),
        ],
    )

    result, out = run_build(base, tmp_path)

    assert result.returncode == 0, result.stderr
    initrd, rootfs = (by_path(items) for items in read_outputs(out))
    assert rootfs[b"bin/ping"].xattrs == {b"security.capability": NET_RAW}
    assert rootfs[b"usr/bin/odd"].xattrs == {b"user.odd": ODD, b"trusted.t": b"\x80"}
    assert rootfs[b"plain"].xattrs == {}
    assert all(not item.xattrs for item in initrd.values())

    # Python's tarfile reads the same bytes from the PAX records.
    with tarfile.open(out / "rootfs.tar.gz") as tar:
        ping = tar.getmember("bin/ping").pax_headers["SCHILY.xattr.security.capability"]
    assert ping.encode("utf-8", "surrogateescape") == NET_RAW

    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    assert "initrd.img" in warnings[0]
    assert "bin/ping (security.capability)" in warnings[0]
    assert "usr/bin/odd (trusted.t, user.odd)" in warnings[0]
    assert "plain" not in warnings[0]

    # Said again when the same artifacts come from the cache, or are found up to date.
    from_cache = invoke("build-all", "--base", str(base), "--out", str(tmp_path / "b"),
                        tmp_path=tmp_path)  # fmt: skip
    up_to_date = invoke("build-all", "--base", str(base), "--out", str(tmp_path / "b"),
                        tmp_path=tmp_path)  # fmt: skip
    for again in (from_cache, up_to_date):
        assert again.returncode == 0, again.stderr
        assert [ln for ln in again.stderr.splitlines() if ln.startswith("warning:")] == warnings
    assert "reused the cached build" in from_cache.stderr
    assert "is up to date" in up_to_date.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["warnings"] == [warnings[0].removeprefix("warning: ")]


# --- 11. usr-merged bases ---------------------------------------------------------------


@pytest.mark.parametrize("prefix", [b"", b"/"], ids=["relative", "absolute"])
def test_usr_merged_base_gets_the_agent_through_its_links(tmp_path: Path, prefix: bytes) -> None:
    initrd, rootfs, _, _ = build(
        tmp_path,
        [
            directory(b"usr/"),
            directory(b"usr/bin/"),
            directory(b"usr/lib/"),
            symlink(b"bin", prefix + b"usr/bin"),
            symlink(b"lib", prefix + b"usr/lib"),
            symlink(b"sbin", prefix + b"usr/sbin"),
            file(b"usr/bin/true", b"true", mode=0o755),
        ],
    )

    for items in (initrd, rootfs):
        assert (items[b"bin"].kind, items[b"bin"].target) == ("symlink", prefix + b"usr/bin")
        assert (items[b"lib"].kind, items[b"lib"].target) == ("symlink", prefix + b"usr/lib")
        agent = items[b"usr/bin/uvmkit-agent"]
        assert (agent.kind, agent.mode) == ("file", 0o755)
        assert not any(name.startswith((b"bin/", b"lib/")) for name in items)
    delta = by_path(read_archive(tmp_path / "out" / "delta.tar.gz"))
    assert b"usr/bin/uvmkit-agent" in delta
    assert not {b"bin", b"bin/uvmkit-agent"} & set(delta)
    assert b"init" in delta


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    """Where a test writes its own recipe file (passed as --image PATH.toml)."""
    return tmp_path / "recipe" / "test.toml"


def write_recipe(path: Path, base: Path, **keys: str) -> str:
    lines = [f'base = "{base}"', *(f'{key} = "{value}"' for key, value in keys.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_usr_merged_base_keeps_its_links_under_an_overlay(tmp_path: Path, recipe: Path) -> None:
    overlay = tmp_path / "overlay"
    (overlay / "lib" / "modules" / "6.1").mkdir(parents=True)
    (overlay / "lib" / "modules" / "6.1" / "virtio.ko").write_bytes(b"module")
    base = write_tar(
        tmp_path / "base.tar",
        [
            directory(b"usr/lib/"),
            directory(b"usr/bin/"),
            symlink(b"lib", b"usr/lib"),
            symlink(b"bin", b"usr/bin"),
        ],
    )
    image = write_recipe(recipe, base, overlay=str(overlay))

    result, out = run_build(base, tmp_path, "--image", image)

    assert result.returncode == 0, result.stderr
    for items in (by_path(i) for i in read_outputs(out)):
        assert (items[b"lib"].kind, items[b"lib"].target) == ("symlink", b"usr/lib")
        assert items[b"usr/lib/modules/6.1/virtio.ko"].kind == "file"


# --- 12. a base that already has /init ----------------------------------------------------

BUSYBOX = Path("/bin/busybox")


def is_static_elf(data: bytes) -> bool:
    return data.startswith(b"\x7fELF") and b"ld-linux" not in data and b"ld-musl" not in data


@pytest.mark.parametrize(
    "init",
    [
        file(b"init", b"#!/bin/sh\nexec /bin/sh\n", mode=0o644),
        symlink(b"init", b"/sbin/init"),
        directory(b"init/"),
    ],
    ids=["text-0644", "symlink", "directory"],
)
def test_uvmkit_init_replaces_whatever_the_base_has(tmp_path: Path, init: Member) -> None:
    initrd, rootfs, initrd_items, rootfs_items = build(tmp_path, [init, file(b"etc/hosts")])

    for items, raw in ((initrd, initrd_items), (rootfs, rootfs_items)):
        assert (items[b"init"].kind, items[b"init"].mode) == ("file", 0o755)
        assert is_static_elf(contents(raw)[b"init"])


@pytest.mark.parametrize(
    ("members", "words"),
    [
        ([file(b"init", b"#!/bin/sh\n", mode=0o644)], ["/init", "0644", "execute"]),
        ([file(b"init", b"#!/bin/sh\n", mode=0o755)], ["/init", "/bin/sh", "not in the image"]),
        (
            [
                file(b"init", b"#!/bin/sh\r\necho hi\r\n", mode=0o755),
                symlink(b"bin/sh", b"busybox"),
                file(b"bin/busybox", b"\x7fELF", mode=0o755),
            ],
            ["CRLF", "/bin/sh"],
        ),
        ([file(b"init", b"echo no interpreter line\n", mode=0o755)], ["neither an ELF", "#!"]),
        ([symlink(b"init", b"/sbin/missing")], ["/init", "dangling"]),
        (
            [file(b"init", b"#!/bin/sh\n", mode=0o755), file(b"bin/sh", b"not elf", mode=0o755)],
            ["/bin/sh", "neither an ELF"],
        ),
        ([], ["/init", "not in the image"]),
    ],
    ids=[
        "not-executable",
        "no-interpreter",
        "crlf",
        "not-a-program",
        "dangling",
        "bad-interp",
        "missing",
    ],
)
def test_base_init_that_cannot_run_is_refused_before_writing(
    tmp_path: Path, recipe: Path, members: list[Member], words: list[str]
) -> None:
    base = write_tar(tmp_path / "base.tar", [file(b"etc/hosts"), *members])
    image = write_recipe(recipe, base, init="base")

    result, out = run_build(base, tmp_path, "--image", image)

    assert_refused(result, out, "/init cannot run", *words)
    assert 'init = "uvmkit"' in result.stderr  # the hint names the way out


def test_base_init_that_can_run_is_kept(tmp_path: Path, recipe: Path) -> None:
    script = b"#!/bin/sh -e\nexec /bin/sh\n"
    base = write_tar(
        tmp_path / "base.tar",
        [
            # Through a link with more `..` than it has parents, as the kernel allows.
            symlink(b"init", b"../../sbin/init"),
            file(b"sbin/init", script, mode=0o750),
            symlink(b"bin/sh", b"busybox"),
            file(b"bin/busybox", BUSYBOX.read_bytes(), mode=0o755),
        ],
    )
    image = write_recipe(recipe, base, init="base")

    result, out = run_build(base, tmp_path, "--image", image)

    assert result.returncode == 0, result.stderr
    for raw in read_outputs(out):
        items = by_path(raw)
        assert (items[b"init"].kind, items[b"init"].target) == ("symlink", b"../../sbin/init")
        assert contents(raw)[b"sbin/init"] == script


def test_base_init_needing_a_missing_loader_is_refused(tmp_path: Path, recipe: Path) -> None:
    dynamic = Path(shutil.which("true") or "/bin/true").read_bytes()
    assert b"ld-linux" in dynamic, "the host's true should be dynamically linked"
    base = write_tar(tmp_path / "base.tar", [file(b"init", dynamic, mode=0o755)])
    image = write_recipe(recipe, base, init="base")

    result, out = run_build(base, tmp_path, "--image", image)

    assert_refused(result, out, "/init", "dynamic loader", "ld-linux")


@pytest.mark.parametrize(
    ("head", "interpreter"),
    [
        (b"#!/bin/sh\n", b"/bin/sh"),
        (b"#! \t/bin/sh -e\n", b"/bin/sh"),
        (b"#!/bin/sh\r\n", b"/bin/sh\r"),
        (b"#!/bin/sh", b"/bin/sh"),
        (b"#!\n/bin/sh\n", b""),
        (b"#!/" + b"a" * 252 + b"\n", b"/" + b"a" * 252),
        (b"#!/" + b"a" * 253 + b"\n", None),
    ],
    ids=["plain", "spaces", "crlf", "no-newline", "empty", "longest", "too-long"],
)
def test_shebang_lines_are_read_as_linux_reads_them(head: bytes, interpreter: bytes) -> None:
    assert shebang_interpreter(head) == interpreter


def test_the_dynamic_loader_must_be_an_executable_elf() -> None:
    dynamic = Path(shutil.which("true") or "/bin/true").read_bytes()
    loader = b"lib64/ld-linux-x86-64.so.2"
    for mode, data, problem in (
        (0o644, b"\x7fELF", True),
        (0o755, b"#!/bin/sh\n", True),
        (0o755, b"\x7fELF", False),
    ):
        with applied([file(b"init", dynamic, mode=0o755), file(loader, data, mode=mode)]) as tree:
            found = runnable_problem(tree, b"/init")
        assert (found is not None) == problem, (mode, data, found)


# --- 13. files of 4 GiB and more -------------------------------------------------------------

FOUR_GIB = 1 << 32
# Sorted before the guest layer's names, so that they come after it in the archive.
HUGE = b"big/huge"


@pytest.fixture(scope="module")
def huge_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tar holding big/huge, 4 GiB of zeros that cost no disk: the data is a hole.

    On tmpfs when there is one: reading a hole there costs no page cache, where a disk
    file system fills 4 GiB of it (seconds of system time) on the first read.
    """
    shm = Path("/dev/shm")
    where = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() else tmp_path_factory.mktemp("big")
    try:
        yield sparse_tar(where / "big.tar", HUGE, FOUR_GIB)
    finally:
        shutil.rmtree(where)


def test_a_file_of_4_gib_fails_the_initrd_and_nothing_is_written(
    tmp_path: Path, huge_base: Path
) -> None:
    result, out = run_build(huge_base, tmp_path)

    assert_refused(result, out, "initrd.img", HUGE.decode(), str(FOUR_GIB), "4 GiB")


def test_a_file_of_4_gib_is_carried_whole_by_rootfs(tmp_path: Path, huge_base: Path) -> None:
    result, out = run_build(huge_base, tmp_path, task="rootfs")

    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [".uvmkit-files", "rootfs.tar.gz"]
    items = read_archive(out / "rootfs.tar.gz", with_data=False)
    names = [i.path for i in items]
    huge = by_path(items)[HUGE]
    assert (huge.kind, huge.size) == ("file", FOUR_GIB)
    # The members after it are found only where the whole size says: none was cut short.
    assert {b"bin/uvmkit-agent", b"info/version", b"init"} <= set(names[names.index(HUGE) :])


# --- 14. no dev/console in the base -----------------------------------------------------------


def test_base_without_dev_gets_a_console_without_mknod(tmp_path: Path) -> None:
    initrd, rootfs, _, _ = build(tmp_path, [file(b"etc/hostname", b"vm\n")], as_user=True)

    for items in (initrd, rootfs):
        assert (items[b"dev"].kind, items[b"dev"].mode, items[b"dev"].uid) == ("dir", 0o755, 0)
        console = items[b"dev/console"]
        assert (console.kind, console.rdev, console.mode) == ("char", (5, 1), 0o600)
        assert (console.uid, console.gid) == (0, 0)


def test_device_nodes_in_the_base_are_carried_as_headers(tmp_path: Path) -> None:
    initrd, rootfs, _, _ = build(
        tmp_path,
        [
            directory(b"dev/"),
            char_device(b"dev/console", 5, 1, mode=0o620),
            char_device(b"dev/null", 1, 3, mode=0o666),
            block_device(b"dev/nvme0n1p9", 259, 1048575),
            fifo(b"dev/initctl", mode=0o600),
        ],
        as_user=True,
    )

    for items in (initrd, rootfs):
        assert (items[b"dev/console"].rdev, items[b"dev/console"].mode) == ((5, 1), 0o620)
        assert (items[b"dev/null"].kind, items[b"dev/null"].rdev) == ("char", (1, 3))
        assert items[b"dev/null"].mode == 0o666
        disk = items[b"dev/nvme0n1p9"]
        assert (disk.kind, disk.rdev, disk.mode) == ("block", (259, 1048575), 0o660)
        assert (items[b"dev/initctl"].kind, items[b"dev/initctl"].mode) == ("fifo", 0o600)
    assert not (tmp_path / "out" / "dev").exists()
    assert {i.path for i in read_archive(tmp_path / "out" / "delta.tar.gz")} >= {b"init"}
    assert set(initrd) >= GUEST_PATHS


# --- more of the same kinds ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("member", "named"),
    [
        (Member(b"good", pax={b"path": b"good\0bad"}), "good\\0bad"),
        (symlink(b"link", b"x", pax={b"linkpath": b"/etc\0/evil"}), "symlink link"),
    ],
    ids=["name", "link-target"],
)
def test_a_nul_byte_in_a_name_or_target_is_refused(
    tmp_path: Path, member: Member, named: str
) -> None:
    base = write_tar(tmp_path / "base.tar", [directory(b"etc/"), member])

    result, out = run_build(base, tmp_path)

    assert_refused(result, out, str(base), named, "NUL byte")


def test_an_entry_named_like_the_newc_trailer_is_refused(tmp_path: Path) -> None:
    base = write_tar(tmp_path / "base.tar", [file(b"TRAILER!!!", b"x"), file(b"zzz", b"y")])

    result, out = run_build(base, tmp_path)

    assert_refused(result, out, "initrd.img", "TRAILER!!!", "ends a newc archive")


def test_a_hard_linked_file_of_4_gib_is_named_by_all_its_names(tmp_path: Path) -> None:
    shm = Path("/dev/shm")  # a hole read on tmpfs costs no page cache
    path = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() else tmp_path)) / "base.tar"
    sparse_tar(path, HUGE, FOUR_GIB, after=[hardlink(b"big/also", HUGE)])

    result, out = run_build(path, tmp_path)

    shutil.rmtree(path.parent)
    assert_refused(result, out, "initrd.img", "big/also (also named big/huge)", "4 GiB")


def test_the_base_info_link_is_replaced_not_written_through(tmp_path: Path) -> None:
    base = write_tar(
        tmp_path / "base.tar",
        [directory(b"etc/"), file(b"etc/version", b"BASE-VERSION"), symlink(b"info", b"etc")],
    )

    result, out = run_build(base, tmp_path)

    assert result.returncode == 0, result.stderr
    assert "the base's /info is a symlink (to etc)" in result.stderr
    for items in read_outputs(out):
        tree = by_path(items)
        assert tree[b"etc/version"].data == b"BASE-VERSION"
        assert tree[b"info"].kind == "dir"
        assert tree[b"info/version"].data != b"BASE-VERSION"


def test_an_overlay_file_with_a_whiteout_name_is_refused(tmp_path: Path, recipe: Path) -> None:
    overlay = tmp_path / "overlay"
    (overlay / "etc").mkdir(parents=True)
    (overlay / "etc" / ".wh.passwd").write_bytes(b"")
    base = write_tar(tmp_path / "base.tar", [directory(b"etc/"), file(b"etc/passwd", b"root")])
    image = write_recipe(recipe, base, overlay=str(overlay))

    result, out = run_build(base, tmp_path, "--image", image)

    assert_refused(result, out, "etc/.wh.passwd", "whiteout name")


def test_a_very_deep_name_is_carried_by_rootfs(tmp_path: Path) -> None:
    # 4000 directories deep in one entry: merging costs its depth, not its depth cubed.
    deep = b"/".join([b"d"] * 4000) + b"/f"
    base = write_tar(tmp_path / "base.tar", [Member(deep, data=b"deep", pax={b"path": deep})])

    initrd, out = run_build(base, tmp_path)
    assert_refused(initrd, out, "initrd.img", "the kernel unpacks names")
    rootfs, out = run_build(base, tmp_path, task="rootfs")

    assert rootfs.returncode == 0, rootfs.stderr
    assert by_path(read_archive(out / "rootfs.tar.gz"))[deep].data == b"deep"
