"""The tar and cpio readers, on archives written by hand and by real tools (GNU tar, GNU
cpio, Python's tarfile)."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from helpers import (
    BLOCK,
    SDE,
    Member,
    base256,
    directory,
    file,
    gnu_long,
    hardlink,
    header_block,
    member_bytes,
    newc_member,
    newc_trailer,
    odc_member,
    odc_trailer,
    padded,
    pax_record,
    symlink,
    tar_bytes,
    write_both,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from uvmkit.archive import Entry, Kind, read_cpio, read_tar
from uvmkit.base import ForwardReader
from uvmkit.errors import BadInputError, UvmkitError
from uvmkit.tree import Tree

S_IFREG, S_IFDIR, S_IFLNK, S_IFCHR, S_IFSOCK = 0o100000, 0o040000, 0o120000, 0o020000, 0o140000


def entries(data: bytes, **kw: int) -> list[Entry]:
    return list(read_tar(io.BytesIO(data), "t.tar", **kw))


def data_of(data: bytes, entry: Entry) -> bytes:
    return data[entry.offset : entry.offset + entry.size]


def refused(data: bytes, reader: str = "tar") -> str:
    with pytest.raises(BadInputError) as caught:
        if reader == "tar":
            entries(data)
        else:
            list(read_cpio(io.BytesIO(data), "t.cpio"))
    return str(caught.value)


# --- tar: names and links --------------------------------------------------------------


def test_ustar_fields_and_data_location() -> None:
    tar = tar_bytes(
        [
            directory(b"etc/", 0o755, uid=1, gid=2, mtime=1234),
            file(b"etc/hosts", b"127.0.0.1 localhost\n", mode=0o4755, uid=3, gid=4),
            symlink(b"etc/link", b"hosts"),
            hardlink(b"etc/hard", b"etc/hosts"),
            Member(b"dev/sda", b"4", mode=0o660, dev=(8, 0)),
            Member(b"old-dir/", b"\0"),  # a V7 directory: only the slash says so
            Member(b"contiguous", b"7", b"c"),
        ]
    )

    found = entries(tar)

    assert [(e.name, e.kind) for e in found] == [
        (b"etc/", Kind.DIR),
        (b"etc/hosts", Kind.FILE),
        (b"etc/link", Kind.SYMLINK),
        (b"etc/hard", Kind.HARDLINK),
        (b"dev/sda", Kind.BLOCK),
        (b"old-dir/", Kind.DIR),
        (b"contiguous", Kind.FILE),
    ]
    assert (found[0].mode, found[0].uid, found[0].gid, found[0].mtime) == (0o755, 1, 2, 1234)
    assert (found[1].mode, found[1].uid, found[1].gid) == (0o4755, 3, 4)
    assert data_of(tar, found[1]) == b"127.0.0.1 localhost\n"
    assert found[2].linkname == b"hosts" and found[3].linkname == b"etc/hosts"
    assert (found[4].devmajor, found[4].devminor) == (8, 0)
    assert data_of(tar, found[6]) == b"c"


def test_gnu_long_names_and_link_targets() -> None:
    name = b"a/" + b"n" * 150 + b"/\xe9" * 60
    target = b"/" + b"t" * 300
    tar = tar_bytes([gnu_long(symlink(name, target)), gnu_long(file(name + b"x", b"data"))])

    found = entries(tar)

    assert [(e.name, e.linkname) for e in found] == [(name, target), (name + b"x", b"")]
    assert data_of(tar, found[1]) == b"data"


def test_ustar_prefix_field_only_for_posix_magic() -> None:
    posix = Member(b"name", prefix=b"some/long/prefix")
    gnu = Member(b"name", prefix=b"\x31\x32", magic=b"ustar  \0")  # GNU keeps times there

    assert [e.name for e in entries(tar_bytes([posix, gnu]))] == [b"some/long/prefix/name", b"name"]


def test_pax_records_replace_header_fields() -> None:
    long = b"p/" + b"\xff" * 200
    tar = tar_bytes(
        [
            Member(b"ignored", b"2", pax={b"path": long, b"linkpath": b"l" * 150}),
            Member(
                b"f",
                data=b"x" * 700,
                size_field=b"00000000000\0",  # the PAX size is the one that counts
                pax={
                    b"size": b"700",
                    b"uid": b"3000000",
                    b"gid": b"70000",
                    b"mtime": b"1700000000.123456789",
                },
            ),
            Member(b"c", b"3", pax={b"SCHILY.devmajor": b"4095", b"SCHILY.devminor": b"1048576"}),
            file(b"after", b"after"),
        ]
    )

    link, big, char, after = entries(tar)

    assert (link.name, link.linkname) == (long, b"l" * 150)
    assert (big.size, big.uid, big.gid, big.mtime) == (700, 3_000_000, 70_000, 1_700_000_000)
    assert data_of(tar, big) == b"x" * 700
    assert (char.devmajor, char.devminor) == (4095, 1048576)
    assert data_of(tar, after) == b"after"  # the PAX size was skipped, not the header's


def test_pax_global_records_apply_to_every_later_entry() -> None:
    body = pax_record(b"uid", b"42")
    glob = header_block(Member(b"pax_global_header"), flag=b"g", size=len(body)) + padded(body)

    found = entries(tar_bytes([file(b"before"), glob, file(b"a"), file(b"b", uid=7)]))

    assert [(e.name, e.uid) for e in found] == [(b"before", 0), (b"a", 42), (b"b", 42)]


def test_pax_xattrs_in_both_spellings() -> None:
    value = b"\x01\x00\x00\x02\xff\x80\n="
    tar = tar_bytes(
        [
            file(b"schily", pax={b"SCHILY.xattr.security.capability": value}),
            # libarchive's own: URL-encoded name, base64 value without padding.
            file(b"libarchive", pax={b"LIBARCHIVE.xattr.user.a%3Db": b"AQAAAv+ACj0"}),
        ]
    )

    schily, libarchive = entries(tar)

    assert schily.xattrs == {b"security.capability": value}
    assert libarchive.xattrs == {b"user.a=b": value}


# --- tar: numbers -------------------------------------------------------------------------


def test_base256_numbers() -> None:
    tar = tar_bytes(
        [
            Member(b"big-uid", uid_field=base256(1 << 40, 8)),
            Member(b"sized", data=b"x" * 600, size_field=base256(600, 12)),
            Member(b"before-1970", mtime=-86400),
        ]
    )

    uid, sized, old = entries(tar)

    assert uid.uid == 1 << 40
    assert (sized.size, data_of(tar, sized)) == (600, b"x" * 600)
    assert old.mtime == -86400


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (Member(b"neg", data=b"x" * 512, size_field=base256(-512, 12)), "negative size"),
        (Member(b"neg-uid", uid_field=base256(-1, 8)), "negative uid"),
        (Member(b"f", size_field=b"0000000x12\0\0"), "bad size field"),
        (Member(b"f", pax={b"size": b"+5"}), "bad PAX size record"),
        (Member(b"f", pax={b"uid": b" 5"}), "bad PAX uid record"),
        (Member(b"f", pax={b"mtime": b"nan"}), "bad PAX mtime"),
        (Member(b"f", pax={b"GNU.sparse.major": b"1"}), "sparse"),
        (Member(b"f", b"S"), "GNU sparse"),
        (Member(b"c", b"3", pax={b"SCHILY.devmajor": b"%d" % (1 << 70)}), "device number"),
        (Member(b"f", b"Z"), "unknown tar type"),
    ],
    ids=[
        "negative-size",
        "negative-uid",
        "bad-octal",
        "pax-sign",
        "pax-space",
        "pax-nan",
        "pax-sparse",
        "gnu-sparse",
        "huge-device",
        "unknown-type",
    ],
)
def test_bad_headers_are_refused_naming_the_entry(member: Member, message: str) -> None:
    text = refused(tar_bytes([file(b"first"), member]))

    assert text.startswith("t.tar: ")
    assert message in text


def test_bad_pax_record_length() -> None:
    body = b"99 path=x\n"
    bad = header_block(Member(b"PaxHeader"), flag=b"x", size=len(body)) + padded(body)

    assert "bad PAX header near entry first" in refused(
        tar_bytes([file(b"first"), bad, file(b"f")])
    )


def test_old_signed_checksums_are_accepted() -> None:
    block = bytearray(header_block(file(b"caf\xe9")))
    signed = sum(block[:148]) + 8 * 32 + sum(block[156:]) - 256
    block[148:156] = b"%06o\0 " % signed

    assert [e.name for e in entries(bytes(block) + bytes(1024))] == [b"caf\xe9"]


# --- tar: damage ----------------------------------------------------------------------------


def test_checksum_errors_name_the_position() -> None:
    tar = bytearray(tar_bytes([file(b"first", b"x" * 600), file(b"second")]))
    tar[3 * BLOCK + 10] ^= 0xFF  # inside the second header: after one header, two data blocks

    assert "bad tar header checksum at byte 1536 (after entry first)" in refused(bytes(tar))


@pytest.mark.parametrize(
    ("cut", "message"),
    [
        (BLOCK + 100, "is cut short: the archive ends inside its data"),
        (3 * BLOCK + 200, "ends in the middle of a tar header at byte 1536 (after entry a)"),
        (0, "empty archive"),
    ],
    ids=["in-data", "in-header", "empty"],
)
def test_truncated_tars(cut: int, message: str) -> None:
    tar = tar_bytes([file(b"a", b"x" * 600), file(b"b", b"y")])

    assert message in refused(tar[:cut])


def test_truncated_inside_a_pax_header() -> None:
    tar = member_bytes(Member(b"f", pax={b"path": b"p" * 1000}))

    assert "ends inside the extended header at byte 0" in refused(tar[: BLOCK + 100])


def test_a_missing_end_marker_is_tolerated() -> None:
    tar = tar_bytes([file(b"a", b"x"), file(b"b")], end=False)

    assert [e.name for e in entries(tar)] == [b"a", b"b"]


def test_a_tar_inside_a_larger_file() -> None:
    inner = tar_bytes([file(b"inner", b"data")])
    outer = b"J" * 1024 + inner + b"K" * 512

    (found,) = entries(outer, start=1024, end=1024 + len(inner))

    assert data_of(outer, found) == b"data"


# --- tar: written by real tools ---------------------------------------------------------------


def test_archives_from_python_tarfile_in_every_format(tmp_path: Path) -> None:
    long = "d/" + "é" * 120 + "/file"
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            info = tarfile.TarInfo("etc/x")
            info.size, info.uid, info.mode = 3, 5, 0o2755
            tar.addfile(info, io.BytesIO(b"abc"))
            if fmt != tarfile.USTAR_FORMAT:
                info = tarfile.TarInfo(long)
                info.size = 1
                tar.addfile(info, io.BytesIO(b"L"))

        found = entries(buf.getvalue())

        assert (found[0].name, found[0].uid, found[0].mode) == (b"etc/x", 5, 0o2755)
        assert data_of(buf.getvalue(), found[0]) == b"abc"
        if fmt != tarfile.USTAR_FORMAT:
            assert found[1].name == long.encode()


def test_archive_from_gnu_tar(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / ("n" * 120)).mkdir(parents=True)
    (src / ("n" * 120) / "f").write_bytes(b"gnu")
    os.link(src / ("n" * 120) / "f", src / "hard")
    os.symlink("n" * 120 + "/f", src / "sym")
    for fmt in ("gnu", "posix"):
        out = tmp_path / f"{fmt}.tar"
        subprocess.run(
            ["tar", f"--format={fmt}", "--sort=name", "-cf", str(out), "-C", str(src), "."],
            check=True,
        )
        data = out.read_bytes()

        found = {e.name: e for e in entries(data)}

        # --sort=name puts ./hard first: it carries the data, the other name links to it.
        assert data_of(data, found[b"./hard"]) == b"gnu"
        link = found[b"./" + b"n" * 120 + b"/f"]
        assert (link.kind, link.linkname) == (Kind.HARDLINK, b"./hard")
        assert found[b"./sym"].linkname == b"n" * 120 + b"/f"
        assert found[b"./" + b"n" * 120 + b"/"].kind is Kind.DIR


# --- cpio -------------------------------------------------------------------------------------


def cpio_entries(data: bytes) -> list[Entry]:
    return list(read_cpio(io.BytesIO(data), "t.cpio"))


def test_newc_entries_and_hard_links_with_data_on_the_last() -> None:
    cpio = b"".join(
        [
            newc_member(b".", S_IFDIR | 0o755, ino=1, nlink=2),
            newc_member(b"etc", S_IFDIR | 0o700, ino=2, nlink=2, uid=5, gid=6, mtime=99),
            newc_member(b"etc/a", S_IFREG | 0o644, ino=3, nlink=2),  # GNU cpio style: empty
            newc_member(b"etc/b", S_IFREG | 0o644, b"shared", ino=3, nlink=2),  # data here
            newc_member(b"link", S_IFLNK | 0o777, b"etc/a", ino=4),
            newc_member(b"dev/console", S_IFCHR | 0o600, ino=5, rdev=(5, 1)),
            newc_trailer(),
        ]
    )

    found = cpio_entries(cpio)

    names = [(e.name, e.kind) for e in found]
    assert names == [
        (b".", Kind.DIR),
        (b"etc", Kind.DIR),
        (b"etc/a", Kind.FILE),
        (b"etc/b", Kind.HARDLINK),
        (b"link", Kind.SYMLINK),
        (b"dev/console", Kind.CHAR),
    ]
    etc, a, b = found[1], found[2], found[3]
    assert (etc.mode, etc.uid, etc.gid, etc.mtime) == (0o700, 5, 6, 99)
    assert data_of(cpio, a) == b"shared"
    assert b.linkname == b"etc/a"
    assert found[4].linkname == b"etc/a"
    assert (found[5].devmajor, found[5].devminor) == (5, 1)


def test_concatenated_cpio_archives_do_not_share_inode_numbers() -> None:
    first = newc_member(b"a", S_IFREG | 0o644, b"first", ino=7, nlink=2) + newc_trailer()
    second = newc_member(b"b", S_IFREG | 0o644, b"second", ino=7, nlink=2) + newc_trailer()

    a, b = cpio_entries(first + bytes(512) + second)

    assert (a.kind, b.kind) == (Kind.FILE, Kind.FILE)
    assert data_of(first + bytes(512) + second, b) == b"second"


def test_odc_entries_and_hard_links() -> None:
    cpio = b"".join(
        [
            odc_member(b"d", S_IFDIR | 0o755, ino=1, nlink=2),
            odc_member(b"d/f", S_IFREG | 0o640, b"odc", ino=2, nlink=2, uid=9),
            odc_member(b"d/g", S_IFREG | 0o640, b"odc", ino=2, nlink=2, uid=9),
            odc_member(b"tty", S_IFCHR | 0o620, ino=3, rdev=os.makedev(4, 1)),
            odc_trailer(),
        ]
    )

    _, f, g, tty = cpio_entries(cpio)

    assert (f.kind, f.uid, f.mode, data_of(cpio, f)) == (Kind.FILE, 9, 0o640, b"odc")
    assert (g.kind, g.linkname) == (Kind.HARDLINK, b"d/f")
    assert (tty.devmajor, tty.devminor) == (4, 1)


@pytest.mark.parametrize("fmt", ["newc", "odc"])
def test_archives_from_gnu_cpio(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"hello\n")
    os.link(src / "d" / "f", src / "d" / "g")
    os.link(src / "d" / "f", src / "h")
    os.symlink("d/f", src / "s")
    listing = subprocess.run(["find", "."], cwd=src, capture_output=True, check=True).stdout
    cpio = subprocess.run(
        ["cpio", "-o", "-H", fmt, "--quiet"],
        cwd=src,
        input=listing,
        capture_output=True,
        check=True,
    ).stdout

    found = {e.name: e for e in cpio_entries(cpio)}

    files = [e for e in found.values() if e.kind is Kind.FILE]
    links = [e for e in found.values() if e.kind is Kind.HARDLINK]
    assert len(files) == 1 and data_of(cpio, files[0]) == b"hello\n"
    assert sorted(e.name for e in links) == sorted({b"d/f", b"d/g", b"h"} - {files[0].name})
    assert all(e.linkname == files[0].name for e in links)
    assert found[b"s"].linkname == b"d/f"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (newc_member(b"a", S_IFREG, b"data")[:50], "bad cpio header at byte 0"),
        (newc_member(b"a-long-name", S_IFREG, b"data")[:115], "ends in the middle of a cpio"),
        (newc_member(b"a", S_IFREG, b"x" * 100)[:150], "a is cut short"),
        (newc_member(b"a", S_IFREG, b"data"), "ends without a trailer"),
        (newc_member(b"a", S_IFREG) + b"junk" * 10, "not a newc or odc cpio record at byte 112"),
        (newc_member(b"s", S_IFSOCK | 0o755) + newc_trailer(), "file type 0o140000"),
        (b"070701" + b"-0000001" * 13, "bad cpio header"),
        (b"070701" + b"0x000001" * 13, "bad cpio header"),
        (b"070707" + b"-" * 70, "bad cpio header"),
    ],
    ids=[
        "short-header",
        "short-name",
        "short-data",
        "no-trailer",
        "junk",
        "socket",
        "negative",
        "hex-prefix",
        "odc-junk",
    ],
)
def test_damaged_cpio_is_refused_with_the_position(data: bytes, message: str) -> None:
    assert message in refused(data, "cpio")


SAMPLE_CPIO = b"".join(
    [
        newc_member(b"d", S_IFDIR | 0o755, ino=1, nlink=2),
        newc_member(b"d/f", S_IFREG | 0o644, ino=2, nlink=2),
        newc_member(b"d/g", S_IFREG | 0o644, b"data" * 50, ino=2, nlink=2),
        newc_member(b"l", S_IFLNK | 0o777, b"d"),
        newc_trailer(),
        odc_member(b"o", S_IFREG | 0o644, b"odc"),
        odc_trailer(),
    ]
)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(SAMPLE_CPIO)), st.binary(min_size=1, max_size=12), st.booleans())
def test_damaged_cpio_ends_in_a_tree_or_a_clean_error(at: int, junk: bytes, cut: bool) -> None:
    """Whatever a cpio turns into, reading and writing it ends well or in a UvmkitError."""
    data = SAMPLE_CPIO[:at] if cut else SAMPLE_CPIO[:at] + junk + SAMPLE_CPIO[at + len(junk) :]
    fd = os.memfd_create("damaged")
    try:
        os.write(fd, data)
        with os.fdopen(os.dup(fd), "rb") as f:
            tree = Tree(mtime=SDE)
            tree.apply_layer(read_cpio(f, "t.cpio"), fd=fd, archive="t.cpio")
            write_both(tree)
    except UvmkitError:
        pass
    finally:
        os.close(fd)


# --- tar from a stream (an engine export as it arrives) ---------------------------------


def test_stream_reader_reads_skips_forward_and_refuses_to_go_back() -> None:
    kept: list[bytes] = []
    stream = ForwardReader(iter([b"abc", b"", b"defgh", b"ij"]), kept.append)

    assert stream.read(2) == b"ab"
    assert stream.seek(2, os.SEEK_CUR) == 4
    assert stream.read(3) == b"efg" and stream.tell() == 7
    with pytest.raises(io.UnsupportedOperation):
        stream.seek(6)
    with pytest.raises(io.UnsupportedOperation):
        stream.seek(0, os.SEEK_END)
    assert stream.read() == b"hij"
    # Past the end, as in a file: the position moves and reads give nothing.
    assert stream.seek(20) == 20 and stream.read(5) == b""
    assert kept == [b"abc", b"", b"defgh", b"ij"]


_STREAMED_TAR = tar_bytes(
    [
        directory(b"etc"),
        file(b"etc/hostname", b"uvm\n"),
        gnu_long(symlink(b"l/" + b"n" * 140, b"/" + b"t" * 200)),
        file(b"etc/big", os.urandom(5000), pax={b"path": b"etc/" + b"p" * 120}),
        hardlink(b"etc/again", b"etc/hostname"),
    ]
) + bytes(3000)  # padding after the end-of-archive marker, as a tar record leaves


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=2000), min_size=1, max_size=40))
def test_tar_read_as_it_streams_matches_the_file(sizes: list[int]) -> None:
    data = _STREAMED_TAR
    chunks, at = [], 0
    while at < len(data):
        size = sizes[len(chunks) % len(sizes)]
        chunks.append(data[at : at + size])
        at += size
    kept: list[bytes] = []
    stream = ForwardReader(iter(chunks), kept.append)

    streamed = list(read_tar(stream, "stream"))
    stream.drain()

    assert streamed == entries(data)
    assert [e.name for e in streamed][:2] == [b"etc", b"etc/hostname"]
    # Every byte reached `keep`, the padding the reader never looked at included.
    assert b"".join(kept) == data
