"""Real inputs written by hand, an independent reader of the outputs, and a build runner.

The tar and cpio builders here write the bytes themselves, so a test can make the odd
shapes that tarfile refuses or tidies (`../evil`, duplicates, hard links to symlinks,
non-UTF-8 names, binary PAX values). The reader is libarchive, never uvmkit's own, and
keeps names, link targets and xattr values as bytes.
"""

from __future__ import annotations

import ctypes
import io
import os
import stat
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import libarchive
import pytest
from libarchive import ffi

from uvmkit.archive import read_tar
from uvmkit.tree import Tree
from uvmkit.writers import NewcWriter, TarWriter, check_newc_limits, plan, write_archives

# The checkout the tests run in: its tasks.py is what `python -m invoke` finds.
ROOT = Path(__file__).parent.parent
SOURCE_DATE_EPOCH = 1_700_000_000
ARTIFACTS = ("initrd.img", "rootfs.tar.gz", "delta.tar.gz")

# --- tar, byte by byte -------------------------------------------------------------

BLOCK = 512


def pax_record(key: bytes, value: bytes) -> bytes:
    """One "LEN KEY=VALUE\\n" record; LEN counts its own digits."""
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def octal(value: int, width: int) -> bytes:
    """A NUL-terminated octal field; base-256 when the value does not fit, as GNU tar does."""
    if 0 <= value < 8 ** (width - 1):
        return b"%0*o\0" % (width - 1, value)
    return base256(value, width)


def base256(value: int, width: int) -> bytes:
    """GNU's binary number form, for values octal cannot hold (negative ones too)."""
    raw = (value % (1 << (8 * width))).to_bytes(width, "big")
    return bytes([raw[0] | 0x80]) + raw[1:] if value >= 0 else raw


@dataclass
class Member:
    """One tar member as a test wants it, whatever a tar tool would allow."""

    name: bytes
    flag: bytes = b"0"
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 1_600_000_000
    linkname: bytes = b""
    dev: tuple[int, int] = (0, 0)
    pax: dict[bytes, bytes] = field(default_factory=dict)
    # Raw header fields, for numbers and sizes that do not match the data on purpose.
    size_field: bytes | None = None
    uid_field: bytes | None = None
    magic: bytes = b"ustar\x0000"
    prefix: bytes = b""


def header_block(
    m: Member, *, flag: bytes | None = None, name: bytes | None = None, size: int | None = None
) -> bytes:
    block = bytearray(BLOCK)
    name = m.name if name is None else name
    block[0 : len(name[:100])] = name[:100]
    block[100:108] = octal(m.mode, 8)
    # A header of its own (`size` given, as for PAX records) takes none of the raw fields.
    raw = size is None
    block[108:116] = (raw and m.uid_field) or octal(m.uid, 8)
    block[116:124] = octal(m.gid, 8)
    block[124:136] = (raw and m.size_field) or octal(len(m.data) if size is None else size, 12)
    block[136:148] = octal(m.mtime, 12)
    block[156:157] = m.flag if flag is None else flag
    block[157 : 157 + len(m.linkname[:100])] = m.linkname[:100]
    block[257:265] = m.magic
    block[265:269] = b"root"
    block[297:301] = b"root"
    block[329:337] = octal(m.dev[0], 8)
    block[337:345] = octal(m.dev[1], 8)
    block[345 : 345 + len(m.prefix)] = m.prefix
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def member_bytes(m: Member, *, long_records: bool = False) -> bytes:
    """The member's headers and data; a name or link too long for ustar needs PAX records
    or (`long_records`) GNU ones in front, or the test would quietly write a cut name."""
    too_long = (len(m.name) > 100 and b"path" not in m.pax) or (
        len(m.linkname) > 100 and b"linkpath" not in m.pax
    )
    if too_long and not long_records:
        raise ValueError(f"{m.name!r}: too long for a ustar header; use gnu_long or PAX")
    out = b""
    if m.pax:
        body = b"".join(pax_record(k, v) for k, v in m.pax.items())
        out += header_block(m, flag=b"x", name=b"PaxHeader", size=len(body)) + padded(body)
    return out + header_block(m) + padded(m.data)


def gnu_long(m: Member) -> bytes:
    """A member preceded by GNU 'L' (and 'K') records carrying its full name and link."""
    out = b""
    for flag, value in ((b"L", m.name), (b"K", m.linkname)):
        if len(value) > 100:
            rec = Member(b"././@LongLink", flag=flag, data=value + b"\0", magic=b"ustar  \0")
            out += header_block(rec, size=len(rec.data)) + padded(rec.data)
    return out + member_bytes(m, long_records=True)


def tar_bytes(members: Iterable[Member | bytes], *, end: bool = True) -> bytes:
    """A tar of the members (raw bytes pass through), with the end-of-archive blocks."""
    out = b"".join(m if isinstance(m, bytes) else member_bytes(m) for m in members)
    return out + bytes(2 * BLOCK) if end else out


def write_tar(path: Path, members: Iterable[Member | bytes]) -> Path:
    path.write_bytes(tar_bytes(members))
    return path


def file(name: bytes, data: bytes = b"", mode: int = 0o644, **kw: object) -> Member:
    return Member(name, b"0", data, mode, **kw)  # type: ignore[arg-type]


def directory(name: bytes, mode: int = 0o755, **kw: object) -> Member:
    return Member(name, b"5", b"", mode, **kw)  # type: ignore[arg-type]


def symlink(name: bytes, target: bytes, **kw: object) -> Member:
    return Member(name, b"2", b"", 0o777, linkname=target, **kw)  # type: ignore[arg-type]


def hardlink(name: bytes, target: bytes, **kw: object) -> Member:
    return Member(name, b"1", b"", 0o644, linkname=target, **kw)  # type: ignore[arg-type]


def char_device(name: bytes, major: int, minor: int, mode: int = 0o600) -> Member:
    return Member(name, b"3", mode=mode, dev=(major, minor))


def block_device(name: bytes, major: int, minor: int, mode: int = 0o660) -> Member:
    return Member(name, b"4", mode=mode, dev=(major, minor))


def fifo(name: bytes, mode: int = 0o644) -> Member:
    return Member(name, b"6", mode=mode)


def sparse_tar(path: Path, name: bytes, size: int, *, after: Iterable[Member] = ()) -> Path:
    """A tar holding one file of `size` zero bytes that costs no disk: the data is a hole;
    `after` are members that follow it."""
    head = header_block(Member(name, size_field=octal(size, 12)))
    with path.open("wb") as f:
        f.write(head)
        f.seek(BLOCK + size + (-size % BLOCK))
        f.write(tar_bytes(after))
    return path


# --- cpio, byte by byte ------------------------------------------------------------


def newc_member(
    name: bytes,
    mode: int,
    data: bytes = b"",
    *,
    ino: int = 0,
    nlink: int = 1,
    uid: int = 0,
    gid: int = 0,
    mtime: int = 0,
    rdev: tuple[int, int] = (0, 0),
) -> bytes:
    fields = (ino, mode, uid, gid, nlink, mtime, len(data), 0, 0, *rdev, len(name) + 1, 0)
    out = b"070701" + b"".join(b"%08X" % f for f in fields) + name + b"\0"
    out += bytes(-len(out) % 4) + data
    return out + bytes(-len(out) % 4)


def odc_member(
    name: bytes,
    mode: int,
    data: bytes = b"",
    *,
    ino: int = 0,
    nlink: int = 1,
    uid: int = 0,
    gid: int = 0,
    mtime: int = 0,
    rdev: int = 0,
) -> bytes:
    fields = [
        (0, 6),
        (ino, 6),
        (mode, 6),
        (uid, 6),
        (gid, 6),
        (nlink, 6),
        (rdev, 6),
        (mtime, 11),
        (len(name) + 1, 6),
        (len(data), 11),
    ]
    return b"070707" + b"".join(b"%0*o" % (w, v) for v, w in fields) + name + b"\0" + data


def newc_trailer() -> bytes:
    return newc_member(b"TRAILER!!!", 0)


def odc_trailer() -> bytes:
    return odc_member(b"TRAILER!!!", 0)


# --- running a build as a user does -------------------------------------------------

# Capabilities a normal user lacks: with these gone, a build that tried to mknod a console,
# chown a file or set a setuid bit on disk would fail.
USER_CAPS_DROPPED = "-mknod,-chown,-fowner,-fsetid,-dac_override,-dac_read_search"


def invoke(
    task: str, *args: str, tmp_path: Path, as_user: bool = False, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`python -m invoke TASK ARGS` from the checkout, with a cache private to the test.

    `as_user` runs it without the capabilities that set root apart, and with umask 077.
    """
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg-cache"), LC_ALL="C.UTF-8")
    env["SOURCE_DATE_EPOCH"] = str(SOURCE_DATE_EPOCH)
    env.pop("UVMKIT_DEBUG", None)
    command = [sys.executable, "-m", "invoke", task, *args]
    if as_user:
        command = ["setpriv", f"--bounding-set={USER_CAPS_DROPPED}", "--inh-caps=-all", *command]
    return subprocess.run(
        command,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        errors="backslashreplace",
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        umask=0o077 if as_user else -1,
    )


def run_build(
    base: Path, tmp_path: Path, *options: str, task: str = "build-all", as_user: bool = False
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run a build task on `base` into tmp_path/out; returns its result and out/."""
    out = tmp_path / "out"
    args = ("--base", str(base), "--out", str(out), *options)
    return invoke(task, *args, tmp_path=tmp_path, as_user=as_user), out


def build_all(base: Path, tmp_path: Path, *options: str, as_user: bool = False) -> Path:
    """Run build-all on `base`; returns out/ after checking that it succeeded."""
    result, out = run_build(base, tmp_path, *options, as_user=as_user)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return out


def assert_refused(result: subprocess.CompletedProcess[str], out: Path, *words: str) -> None:
    """The build failed as a user should see it: one error naming the thing, exit 1, no
    traceback, and nothing written."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "internal error" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr
    for word in words:
        assert word in error_lines[0], (word, result.stderr)
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert left == [], f"a failed build left {left} in {out}"


# --- reading archives back with libarchive ------------------------------------------

_lib = ffi.libarchive
_lib.archive_entry_xattr_reset.argtypes = [ctypes.c_void_p]
_lib.archive_entry_xattr_reset.restype = ctypes.c_int
_lib.archive_entry_xattr_next.argtypes = [
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_char_p),
    ctypes.POINTER(ctypes.c_void_p),
    ctypes.POINTER(ctypes.c_size_t),
]
_lib.archive_entry_xattr_next.restype = ctypes.c_int
_lib.archive_entry_ino64.argtypes = [ctypes.c_void_p]
_lib.archive_entry_ino64.restype = ctypes.c_int64
_lib.archive_entry_nlink.argtypes = [ctypes.c_void_p]
_lib.archive_entry_nlink.restype = ctypes.c_uint

_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
}


@dataclass(frozen=True)
class Item:
    """One archive entry as libarchive reports it, bytes kept as bytes."""

    path: bytes
    kind: str  # file, dir, symlink, char, block, fifo; "hardlink" for a link entry
    mode: int  # permission bits, setuid/setgid/sticky included
    uid: int
    gid: int
    mtime: int
    size: int
    data: bytes
    target: bytes  # a symlink's target, or the name a hard link entry points at
    rdev: tuple[int, int]
    ino: int
    nlink: int
    xattrs: dict[bytes, bytes]


def _xattrs(entry_p: int) -> dict[bytes, bytes]:
    found = {}
    _lib.archive_entry_xattr_reset(entry_p)
    name, value, size = ctypes.c_char_p(), ctypes.c_void_p(), ctypes.c_size_t()
    while _lib.archive_entry_xattr_next(entry_p, name, value, size) == 0:
        assert name.value is not None
        found[name.value] = ctypes.string_at(value, size.value) if value.value else b""
    return found


def read_archive(source: Path | bytes, *, with_data: bool = True) -> list[Item]:
    """Every entry of a (compressed) tar or cpio, in archive order; `with_data=False`
    leaves file contents unread (libarchive skips them), for archives too big to hold."""
    items = []
    reader = (
        libarchive.memory_reader(source)
        if isinstance(source, bytes)
        else libarchive.file_reader(str(source))
    )
    with reader as archive:
        for entry in archive:
            p = entry._entry_p
            hard = ffi.entry_hardlink(p)
            kind = "hardlink" if hard else _KINDS.get(stat.S_IFMT(entry.mode), "other")
            path = ffi.entry_pathname(p)
            items.append(
                Item(
                    path=path.rstrip(b"/") if path != b"/" else path,
                    kind=kind,
                    mode=stat.S_IMODE(entry.mode),
                    uid=entry.uid,
                    gid=entry.gid,
                    mtime=int(entry.mtime or 0),
                    size=entry.size or 0,
                    data=b"".join(entry.get_blocks()) if with_data and entry.isreg else b"",
                    target=hard or (ffi.entry_symlink(p) or b""),
                    rdev=(entry.rdevmajor, entry.rdevminor),
                    ino=_lib.archive_entry_ino64(p),
                    nlink=_lib.archive_entry_nlink(p),
                    xattrs=_xattrs(p),
                )
            )
    return items


def by_path(items: list[Item]) -> dict[bytes, Item]:
    """Items keyed by path; a path written twice fails the test."""
    seen: dict[bytes, Item] = {}
    for item in items:
        assert item.path not in seen, f"{item.path!r} appears twice"
        seen[item.path] = item
    return seen


def link_groups(items: list[Item]) -> dict[bytes, frozenset[bytes]]:
    """For every regular file, the names that share its inode (itself included)."""
    parent: dict[bytes, bytes] = {}

    def root(name: bytes) -> bytes:
        while parent.get(name, name) != name:
            name = parent[name]
        return name

    for item in items:
        if item.kind == "file":
            parent.setdefault(item.path, item.path)
        elif item.kind == "hardlink":
            parent[item.path] = root(item.target)
    groups: dict[bytes, set[bytes]] = {}
    for name in parent:
        groups.setdefault(root(name), set()).add(name)
    return {name: frozenset(groups[root(name)]) for name in parent}


def contents(items: list[Item]) -> dict[bytes, bytes]:
    """Each regular file's bytes, hard links resolved: newc keeps one copy on the last name
    of a group, tar on the first; either way every name gets the group's data."""
    groups = link_groups(items)
    data: dict[frozenset[bytes], bytes] = {}
    for item in items:
        if item.kind in ("file", "hardlink") and item.data:
            data[groups[item.path]] = item.data
    return {name: data.get(group, b"") for name, group in groups.items()}


def read_outputs(out: Path) -> tuple[list[Item], list[Item]]:
    """initrd.img and rootfs.tar.gz of a build, read back."""
    return read_archive(out / "initrd.img"), read_archive(out / "rootfs.tar.gz")


# --- uvmkit's tree and writers on in-memory inputs ------------------------------------

SDE = 1000


@contextmanager
def applied(*layers: Sequence[Member | bytes]) -> Iterator[Tree]:
    """A tree with the layers applied, lowest first, each a tar in a memory file."""
    tree = Tree(mtime=SDE)
    fds = []
    try:
        for number, layer in enumerate(layers):
            fd = os.memfd_create(f"layer{number}")
            fds.append(fd)
            os.write(fd, tar_bytes(layer))
            with os.fdopen(os.dup(fd), "rb") as f:
                tree.apply_layer(read_tar(f, f"L{number + 1}"), fd=fd, archive=f"L{number + 1}")
        yield tree
    finally:
        for fd in fds:
            os.close(fd)


def write_both(tree: Tree, *, source_date_epoch: int = SDE) -> tuple[bytes, bytes]:
    """The tree as newc and as tar bytes, checked against newc's limits first as a build does."""
    newc, tar = io.BytesIO(), io.BytesIO()
    planned = plan(tree.sorted_entries(), source_date_epoch=source_date_epoch)
    check_newc_limits(planned)
    write_archives(planned, newc=NewcWriter(newc), tar=TarWriter(tar))
    return newc.getvalue(), tar.getvalue()


def written(tree: Tree) -> tuple[list[Item], list[Item]]:
    """The tree as newc and as tar, read back by libarchive."""
    newc, tar = write_both(tree)
    return read_archive(newc), read_archive(tar)


@contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` for the block: a disk that fills at once."""
    where.mkdir()
    if os.geteuid() != 0:
        pytest.fail("this test mounts a tmpfs, which needs root (CI runs as root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                   check=True)  # fmt: skip
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)
