"""The newc and PAX writers, read back by libarchive, GNU cpio, Python's tarfile and bsdtar."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from helpers import (
    SDE,
    Member,
    applied,
    block_device,
    by_path,
    char_device,
    contents,
    directory,
    fifo,
    file,
    gnu_long,
    hardlink,
    link_groups,
    read_archive,
    symlink,
    write_both,
)

from uvmkit.archive import Kind
from uvmkit.errors import FormatLimitError
from uvmkit.tree import Blob, Inode
from uvmkit.writers import (
    NEWC_MAX,
    NewcWriter,
    Planned,
    TarWriter,
    check_newc_limits,
    plan,
    tar_header,
    write_archives,
    xattr_losses,
)

SPLITTABLE = b"s" * 60 + b"/" + b"t" * 59  # 120 bytes: fits ustar's prefix and name fields
LONG_PATH = b"long/" + b"/".join([b"p" * 90] * 3) + b"/end"  # over 255 bytes
LONG_PART = b"part/" + b"c" * 150  # one component longer than ustar's name field
LATIN1 = b"caf\xe9"
LONG_LATIN1 = b"latin/" + b"\xe9" * 200
LONG_TARGET = b"/" + b"/".join([b"x" * 50] * 6)
DIR_150 = b"d" * 150

SAMPLE = [
    directory(b"etc/", 0o755),
    file(b"etc/hosts", b"127.0.0.1 localhost\n"),
    file(b"usr/bin/sudo", b"sudo", mode=0o4755),
    file(b"usr/bin/wall", b"wall", mode=0o2755, gid=5),
    directory(b"tmp/", 0o1777),
    file(b"shared", b"one copy\n" * 100, uid=1000, gid=1000),
    hardlink(b"etc/second", b"shared"),
    hardlink(b"zz/third", b"shared"),
    symlink(b"etc/link", b"hosts"),
    symlink(b"abs", b"/etc/hosts"),
    char_device(b"dev/console", 5, 1),
    block_device(b"dev/sda", 8, 0),
    fifo(b"run/fifo"),
    file(LATIN1, b"latin"),
    gnu_long(file(SPLITTABLE, b"splittable")),
    gnu_long(file(LONG_PATH, b"long path")),
    gnu_long(file(LONG_PART, b"long part")),
    gnu_long(file(LONG_LATIN1, b"long latin")),
    gnu_long(symlink(b"far", LONG_TARGET)),
    gnu_long(hardlink(b"to-long", LONG_PATH)),
    gnu_long(directory(DIR_150 + b"/")),
    file(b"big-uid", b"u", uid=3_000_000, gid=4_000_000),
    file(b"empty"),
    file(b"exact-block", b"b" * 512),
]


@pytest.fixture(scope="module")
def sample() -> tuple[bytes, bytes]:
    with applied(SAMPLE) as tree:
        return write_both(tree)


def test_newc_read_back_by_libarchive(sample: tuple[bytes, bytes]) -> None:
    raw = read_archive(sample[0])
    items = by_path(raw)
    data, groups = contents(raw), link_groups(raw)

    assert data[b"etc/hosts"] == b"127.0.0.1 localhost\n"
    assert (items[b"usr/bin/sudo"].mode, items[b"usr/bin/wall"].mode) == (0o4755, 0o2755)
    assert items[b"usr/bin/wall"].gid == 5
    assert (items[b"tmp"].kind, items[b"tmp"].mode) == ("dir", 0o1777)
    assert groups[b"shared"] == {b"shared", b"etc/second", b"zz/third"}
    assert data[b"zz/third"] == b"one copy\n" * 100
    # newc keeps the data once, on the last name of the group, as GNU cpio does.
    assert [len(items[n].data) for n in (b"etc/second", b"shared", b"zz/third")] == [0, 0, 900]
    assert {items[n].ino for n in (b"shared", b"etc/second", b"zz/third")} == {items[b"shared"].ino}
    assert items[b"shared"].nlink == 3
    assert (items[b"etc/link"].kind, items[b"etc/link"].target) == ("symlink", b"hosts")
    assert (items[b"dev/console"].kind, items[b"dev/console"].rdev) == ("char", (5, 1))
    assert (items[b"dev/sda"].kind, items[b"dev/sda"].rdev) == ("block", (8, 0))
    assert items[b"run/fifo"].kind == "fifo"
    for name in (LATIN1, SPLITTABLE, LONG_PATH, LONG_PART, LONG_LATIN1):
        assert name in data
    assert items[b"far"].target == LONG_TARGET
    assert groups[b"to-long"] == {LONG_PATH, b"to-long"}
    assert (items[b"big-uid"].uid, items[b"big-uid"].gid) == (3_000_000, 4_000_000)
    assert data[b"exact-block"] == b"b" * 512
    assert len(sample[0]) % 512 == 0


def test_tar_read_back_by_libarchive(sample: tuple[bytes, bytes]) -> None:
    raw = read_archive(sample[1])
    items = by_path(raw)
    data, groups = contents(raw), link_groups(raw)

    assert (items[b"usr/bin/sudo"].mode, items[b"usr/bin/wall"].gid) == (0o4755, 5)
    # tar keeps the data on the first name in the archive and links the others to it.
    assert items[b"etc/second"].kind == "file"
    assert (items[b"shared"].kind, items[b"shared"].target) == ("hardlink", b"etc/second")
    assert (items[b"zz/third"].kind, items[b"zz/third"].target) == ("hardlink", b"etc/second")
    assert groups[b"to-long"] == {LONG_PATH, b"to-long"}
    for name in (LATIN1, SPLITTABLE, LONG_PATH, LONG_PART, LONG_LATIN1):
        assert name in data
    assert items[b"far"].target == LONG_TARGET
    assert items[DIR_150].kind == "dir"
    assert (items[b"big-uid"].uid, items[b"big-uid"].gid) == (3_000_000, 4_000_000)
    assert (items[b"dev/sda"].kind, items[b"dev/sda"].rdev) == ("block", (8, 0))
    assert len(sample[1]) % 10240 == 0


def test_tar_read_back_by_python_tarfile(sample: tuple[bytes, bytes]) -> None:
    with tarfile.open(fileobj=io.BytesIO(sample[1])) as tar:
        members = {m.name.encode("utf-8", "surrogateescape"): m for m in tar}
        shared = tar.extractfile(members[b"shared"])
        assert shared is not None and shared.read() == b"one copy\n" * 100

    assert members[b"shared"].islnk() and members[b"shared"].linkname == "etc/second"
    assert members[b"usr/bin/sudo"].mode == 0o4755
    assert members[b"far"].issym()
    assert members[b"far"].linkname.encode() == LONG_TARGET
    assert members[b"dev/console"].ischr()
    assert (members[b"dev/console"].devmajor, members[b"dev/console"].devminor) == (5, 1)
    assert members[DIR_150].isdir()
    assert members[b"big-uid"].uid == 3_000_000
    for name in (LATIN1, SPLITTABLE, LONG_PATH, LONG_PART, LONG_LATIN1):
        assert members[name].isreg()
    # The 120-byte name fits ustar's two fields; the others need PAX records.
    assert "path" not in members[SPLITTABLE].pax_headers
    assert members[LONG_PATH].pax_headers["path"].encode() == LONG_PATH


def test_tar_unpacked_by_bsdtar(sample: tuple[bytes, bytes], tmp_path: Path) -> None:
    path, root = tmp_path / "rootfs.tar", tmp_path / "unpacked"
    path.write_bytes(sample[1])
    root.mkdir()

    unpack = subprocess.run(["bsdtar", "-xpf", str(path), "-C", str(root)], capture_output=True)

    assert unpack.returncode == 0 and unpack.stderr == b"", unpack.stderr
    top = os.fsencode(root)
    for name in (LATIN1, SPLITTABLE, LONG_PATH, LONG_PART, LONG_LATIN1):
        assert os.path.isfile(os.path.join(top, name)), name
    shared = os.stat(os.path.join(top, b"shared"))
    assert shared.st_ino == os.stat(os.path.join(top, b"zz/third")).st_ino
    assert shared.st_nlink == 3
    assert os.stat(os.path.join(top, b"usr/bin/sudo")).st_mode & 0o7777 == 0o4755
    assert os.readlink(os.path.join(top, b"far")) == LONG_TARGET


def test_newc_listed_and_unpacked_by_gnu_cpio(sample: tuple[bytes, bytes], tmp_path: Path) -> None:
    listing = subprocess.run(
        ["cpio", "-it", "--quiet"], input=sample[0], capture_output=True, check=True
    )
    names = set(listing.stdout.splitlines())
    assert {b"etc/hosts", b"shared", b"zz/third", LATIN1, LONG_PATH, LONG_LATIN1} <= names

    # Unpacking shows the kernel's view of hard links: one inode, the data on it.
    root = tmp_path / "unpacked"
    root.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], input=sample[0], cwd=root, check=True)
    shared, second, third = (root / n for n in ("shared", "etc/second", "zz/third"))
    assert shared.read_bytes() == b"one copy\n" * 100
    assert os.stat(shared).st_ino == os.stat(second).st_ino == os.stat(third).st_ino
    assert os.readlink(root / "far") == LONG_TARGET.decode()
    assert (root / os.fsdecode(LONG_LATIN1)).read_bytes() == b"long latin"


def test_output_is_the_same_bytes_whatever_the_input_order() -> None:
    distinct = [m for m in SAMPLE if not isinstance(m, bytes) and m.flag != b"1"]
    with applied(distinct) as tree:
        first = write_both(tree)
        again = write_both(tree)
    with applied(list(reversed(distinct))) as tree:
        reversed_order = write_both(tree)

    assert first == again == reversed_order


# --- headers and limits -----------------------------------------------------------------


def read_header(header: bytes) -> tarfile.TarInfo:
    """The first member of a tar that is only headers (its data left out)."""
    with tarfile.open(fileobj=io.BytesIO(header + bytes(1024)), mode="r:") as tar:
        info = tar.next()
    assert info is not None
    return info


def test_sizes_past_ustar_go_in_a_pax_record() -> None:
    four = tar_header(b"four", b"0", mode=0o644, uid=0, gid=0, size=1 << 32, mtime=0)
    eight = tar_header(b"eight", b"0", mode=0o644, uid=0, gid=0, size=1 << 33, mtime=0)

    # Up to 8 GiB - 1 the 11 octal digits hold it, as GNU tar and Python write.
    assert len(four) == 512 and read_header(four).size == 1 << 32
    info = read_header(eight)
    assert (info.name, info.size, info.pax_headers["size"]) == ("eight", 1 << 33, str(1 << 33))
    assert eight[512 + 512 + 124 : 512 + 512 + 136] == b"00000000000\0"


def test_device_numbers_past_ustar_go_in_base256_fields() -> None:
    header = tar_header(
        b"dev/big", b"3", mode=0o600, uid=0, gid=0, size=0, mtime=0, rdev=(4095, 1 << 22)
    )

    (item,) = read_archive(header + bytes(1024))
    info = read_header(header)

    assert (item.kind, item.rdev) == ("char", (4095, 1 << 22))
    assert (info.devmajor, info.devminor) == (4095, 1 << 22)
    assert header[337] & 0x80


def test_a_directory_name_never_leaves_the_ustar_name_field_empty() -> None:
    header = tar_header(DIR_150 + b"/", b"5", mode=0o755, uid=0, gid=0, size=0, mtime=0)

    assert header[-512:][0:1] != b"\0"
    assert read_header(header).name == DIR_150.decode()


def test_non_utf8_names_in_pax_records_are_marked_binary() -> None:
    header = tar_header(LONG_LATIN1, b"0", mode=0o644, uid=0, gid=0, size=0, mtime=0)

    assert b"hdrcharset=BINARY" in header
    assert read_header(header).name.encode("utf-8", "surrogateescape") == LONG_LATIN1


def test_mtimes_are_clamped_to_source_date_epoch() -> None:
    with applied(
        [file(b"new", mtime=SDE + 10), file(b"old", mtime=5), file(b"neg", mtime=-9)]
    ) as t:
        planned = {p.path: p.mtime for p in plan(t.sorted_entries(), source_date_epoch=SDE)}

    assert planned == {b"new": SDE, b"old": 5, b"neg": 0}


def planned_file(path: bytes, **inode: object) -> Planned:
    node = Inode(Kind.FILE, 0o644, **inode)  # type: ignore[arg-type]
    return Planned(path, node, 0, 1, 1, None, carries_newc_data=True)


@pytest.mark.parametrize(
    ("planned", "message"),
    [
        (planned_file(b"big", size=NEWC_MAX + 1), "big is 4294967296 bytes"),
        (planned_file(b"owner", uid=NEWC_MAX + 1), "uid 4294967296"),
        (planned_file(b"group", gid=1 << 40), "gid 1099511627776"),
        (planned_file(b"dev", rdev=(NEWC_MAX + 1, 0)), "device major 4294967296"),
        (planned_file(b"a/" * 2048 + b"f"), "the kernel unpacks names of at most 4095"),
        (planned_file(b"dir/" + b"c" * 256), "components of at most 255"),
        (
            Planned(b"link", Inode(Kind.SYMLINK, 0o777, target=b"t" * 4096), 0, 1, 1, None, False),
            "symlink link has a target of 4096 bytes",
        ),
    ],
    ids=["size", "uid", "gid", "rdev", "path-max", "name-max", "symlink-target"],
)
def test_newc_limits_are_refused_naming_the_entry(planned: Planned, message: str) -> None:
    with pytest.raises(FormatLimitError, match=message):
        check_newc_limits([planned])


def test_newc_limits_accept_the_largest_values_that_fit() -> None:
    check_newc_limits(
        [
            planned_file(b"just-under-4-gib", size=NEWC_MAX, uid=NEWC_MAX, gid=NEWC_MAX),
            planned_file(b"p/" * 2046 + b"fff", rdev=(NEWC_MAX, NEWC_MAX)),
            planned_file(b"c" * 255),
        ]
    )


def test_xattr_losses_name_each_file_and_attribute() -> None:
    lost = xattr_losses(
        [
            planned_file(b"bin/ping", xattrs={b"security.capability": b"\0\xff"}),
            planned_file(b"plain"),
            planned_file(LATIN1, xattrs={b"user.b": b"", b"user.a": b""}),
        ]
    )

    assert lost == ["bin/ping (security.capability)", "caf\\xe9 (user.a, user.b)"]


def test_a_short_read_of_file_data_is_an_error_naming_the_archive(tmp_path: Path) -> None:
    source = tmp_path / "source.tar"
    source.write_bytes(b"only ten b")
    fd = os.open(source, os.O_RDONLY)
    try:
        inode = Inode(Kind.FILE, 0o644, size=100, data=Blob(fd, 0, str(source)))
        with pytest.raises(FormatLimitError, match=r"source\.tar: ended while reading"):
            write_archives(
                plan([(b"f", inode)], source_date_epoch=SDE),
                newc=NewcWriter(io.BytesIO()),
                tar=TarWriter(io.BytesIO()),
            )
    finally:
        os.close(fd)


def test_symlinks_and_devices_hard_linked_become_separate_entries() -> None:
    members: list[Member | bytes] = [
        symlink(b"s", b"target"),
        hardlink(b"h", b"s"),
        char_device(b"c", 1, 3),
        hardlink(b"c2", b"c"),
    ]
    with applied(members) as tree:
        newc, tar = write_both(tree)

    for raw in (read_archive(newc), read_archive(tar)):
        items = by_path(raw)
        assert (items[b"h"].kind, items[b"h"].target) == ("symlink", b"target")
        assert (items[b"c2"].kind, items[b"c2"].rdev) == ("char", (1, 3))
