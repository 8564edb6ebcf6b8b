"""Write a merged tree as a newc cpio archive (the initrd) and a PAX tar (the rootfs).

Both archives come from one pass over the sorted tree: each file's bytes are read once
from the archive they live in and go to both writers (a large file's are compressed once
for both, see `compress.write_file`). Output is reproducible by construction: entries
sorted by path, mtimes clamped to SOURCE_DATE_EPOCH, inode numbers assigned in output
order (never taken from the build host), numeric owners only.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from .archive import BLOCK, Kind
from .compress import GZIP_BLOCK, Sink, write_file
from .errors import FormatLimitError, show_name
from .log import log
from .tree import Blob, Inode

NEWC_MAX = 0xFFFFFFFF
NEWC_TRAILER = b"TRAILER!!!"
# The kernel's initramfs unpacker skips, without a word, names and symlink targets that
# do not fit PATH_MAX (4096, its NUL included), and cannot create a component longer than
# NAME_MAX: such an entry would be in initrd.img but never in the booted guest.
KERNEL_PATH_MAX = 4095
KERNEL_NAME_MAX = 255
_MODE_BITS = {
    Kind.FILE: stat.S_IFREG,
    Kind.DIR: stat.S_IFDIR,
    Kind.SYMLINK: stat.S_IFLNK,
    Kind.CHAR: stat.S_IFCHR,
    Kind.BLOCK: stat.S_IFBLK,
    Kind.FIFO: stat.S_IFIFO,
}
_TAR_FLAGS = {
    Kind.FILE: b"0",
    Kind.DIR: b"5",
    Kind.SYMLINK: b"2",
    Kind.CHAR: b"3",
    Kind.BLOCK: b"4",
    Kind.FIFO: b"6",
}
TAR_RECORD = 10240


@dataclass(frozen=True, slots=True)
class Planned:
    """One entry of the output, with what both formats need decided up front."""

    path: bytes
    inode: Inode
    mtime: int
    ino: int
    # Regular files only: how many names share the inode, and whether this name is the
    # first (tar stores the data there) or the last (newc stores it there) of them.
    nlink: int
    first_link: bytes | None
    carries_newc_data: bool


def plan(entries: Sequence[tuple[bytes, Inode]], *, source_date_epoch: int) -> list[Planned]:
    """Number inodes and group hard links in output order; clamp mtimes.

    Only regular files keep hard links: a hard link to a symlink, a device or a FIFO is
    written as a second, identical entry, because newc stores a symlink's target as its
    data and the kernel would give all but one name an empty target.
    """
    names: dict[int, list[bytes]] = {}
    for path, inode in entries:
        if inode.kind is Kind.FILE:
            names.setdefault(id(inode), []).append(path)
    numbers: dict[object, int] = {}
    planned = []
    for path, inode in entries:
        shared = names.get(id(inode), [path]) if inode.kind is Kind.FILE else [path]
        # Names of one hard-link group share a number; every other name gets its own.
        key: object = id(inode) if len(shared) > 1 else path
        ino = numbers.setdefault(key, len(numbers) + 1)
        planned.append(
            Planned(
                path=path,
                inode=inode,
                mtime=max(0, min(inode.mtime, source_date_epoch)),
                ino=ino,
                nlink=len(shared) if inode.kind is Kind.FILE else (2 if inode.is_dir else 1),
                first_link=shared[0] if shared[0] != path else None,
                carries_newc_data=shared[-1] == path,
            )
        )
    return planned


def check_newc_limits(planned: Sequence[Planned], *, artifact: str = "initrd.img") -> None:
    """Refuse, before anything is written, what a newc archive cannot hold or the kernel
    would not unpack from it."""
    if len(planned) >= NEWC_MAX:
        raise FormatLimitError(
            f"{artifact}: {len(planned)} entries exceed what newc cpio can number",
            hint="make the base smaller",
        )
    for p in planned:
        inode = p.inode
        if inode.size > NEWC_MAX:
            names = [show_name(q.path) for q in planned if q.inode is inode]
            also = f" (also named {', '.join(names[1:])})" if len(names) > 1 else ""
            raise FormatLimitError(
                f"{artifact}: {names[0]}{also} is {inode.size} bytes; newc cpio holds files "
                "under 4 GiB",
                hint="remove or split that file in the base (rootfs.tar.gz can carry it)",
            )
        numbers = (("uid", inode.uid), ("gid", inode.gid), ("device major", inode.rdev[0]),
                   ("device minor", inode.rdev[1]))  # fmt: skip
        for what, value in numbers:
            if not 0 <= value <= NEWC_MAX:
                raise FormatLimitError(
                    f"{artifact}: {show_name(p.path)} has {what} {value}, more than newc cpio "
                    "holds",
                    hint="fix the owner or device number in the base",
                )
        if p.mtime > NEWC_MAX:
            raise FormatLimitError(
                f"{artifact}: {show_name(p.path)} has mtime {p.mtime}, past what newc cpio "
                f"holds ({NEWC_MAX}, in the year 2106)",
                hint=f"set SOURCE_DATE_EPOCH to {NEWC_MAX} or less (mtimes are clamped to it)",
            )
        _check_kernel_names(p, artifact)


def _check_kernel_names(p: Planned, artifact: str) -> None:
    if p.path == NEWC_TRAILER:
        raise FormatLimitError(
            f"{artifact}: the base has an entry named {NEWC_TRAILER.decode()} at its root, "
            "the name that ends a newc archive: readers would stop there",
            hint="rename or remove that entry in the base (rootfs.tar.gz can carry it)",
        )
    longest = max(len(part) for part in p.path.split(b"/"))
    if len(p.path) > KERNEL_PATH_MAX or longest > KERNEL_NAME_MAX:
        shown = show_name(p.path) if len(p.path) <= 120 else show_name(p.path[:80]) + "..."
        raise FormatLimitError(
            f"{artifact}: the name {shown} is {len(p.path)} bytes long, with a component of "
            f"{longest}; the kernel unpacks names of at most {KERNEL_PATH_MAX} bytes, "
            f"components of at most {KERNEL_NAME_MAX}",
            hint="shorten that name in the base (rootfs.tar.gz can carry it)",
        )
    if p.inode.kind is Kind.SYMLINK and len(p.inode.target) > KERNEL_PATH_MAX:
        raise FormatLimitError(
            f"{artifact}: symlink {show_name(p.path)} has a target of {len(p.inode.target)} "
            f"bytes; the kernel unpacks targets of at most {KERNEL_PATH_MAX}",
            hint="shorten that link in the base (rootfs.tar.gz can carry it)",
        )


def xattr_losses(planned: Sequence[Planned]) -> list[str]:
    """The entries whose xattrs a newc archive drops, for the warning."""
    return [
        f"{show_name(p.path)} ({', '.join(sorted(show_name(k) for k in p.inode.xattrs))})"
        for p in planned
        if p.inode.xattrs
    ]


# --- newc ----------------------------------------------------------------------------


def newc_header(
    name: bytes, *, ino: int, mode: int, uid: int, gid: int, nlink: int, mtime: int,
    size: int, rdev: tuple[int, int] = (0, 0),
) -> bytes:  # fmt: skip
    """A newc header with its name and padding; the caller writes the data after it."""
    fields = (ino, mode, uid, gid, nlink, mtime, size, 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    header = b"070701" + b"".join(b"%08X" % value for value in fields) + name + b"\0"
    return header + b"\0" * (-len(header) % 4)


class _ArchiveWriter:
    """What both formats share: a sink, the offset written so far (which `write_in_runs`
    advances past spliced segments), and file data padded to the format's alignment."""

    ALIGN = 1

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.offset = 0

    def _write(self, data: bytes | memoryview) -> None:
        self.sink.write(data)
        self.offset += len(data)

    def data(self, chunk: bytes | memoryview) -> None:
        self._write(chunk)

    def end_data(self) -> None:
        self._write(b"\0" * (-self.offset % self.ALIGN))


class NewcWriter(_ArchiveWriter):
    """Writes newc entries to a sink; `finish` adds the trailer."""

    ALIGN = 4

    def header(self, p: Planned) -> int:
        """Write the header of a planned entry; returns how many data bytes must follow."""
        inode = p.inode
        size = 0
        if inode.kind is Kind.FILE and p.carries_newc_data:
            size = inode.size
        elif inode.kind is Kind.SYMLINK:
            size = len(inode.target)
        self._write(
            newc_header(
                p.path,
                ino=p.ino,
                mode=_MODE_BITS[inode.kind] | inode.mode,
                uid=inode.uid,
                gid=inode.gid,
                nlink=p.nlink,
                mtime=p.mtime,
                size=size,
                rdev=inode.rdev,
            )
        )
        if inode.kind is Kind.SYMLINK:
            self.data(inode.target)
            self.end_data()
            return 0
        return size

    def finish(self) -> None:
        self._write(newc_header(NEWC_TRAILER, ino=0, mode=0, uid=0, gid=0, nlink=1, mtime=0,
                                size=0))  # fmt: skip
        # GNU cpio pads to 512-byte blocks; some readers expect it.
        self._write(b"\0" * (-self.offset % 512))


# --- tar -----------------------------------------------------------------------------


def _octal(value: int, width: int) -> bytes | None:
    """A NUL-terminated octal field, or None when the value does not fit."""
    text = b"%o" % value
    if value < 0 or len(text) > width - 1:
        return None
    return text.rjust(width - 1, b"0") + b"\0"


def _base256(value: int, width: int) -> bytes:
    """GNU's binary number field: a marker bit, then the value big-endian."""
    return (value | 1 << (8 * width - 1)).to_bytes(width, "big")


def _pax_record(key: bytes, value: bytes) -> bytes:
    # The length counts its own digits, so it is found by trying.
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(b"%d" % length) + len(body) != length:
        length = len(b"%d" % length) + len(body)
    return b"%d" % length + body


def _split_ustar(name: bytes) -> tuple[bytes, bytes] | None:
    """(prefix, name) fitting ustar's 155 + 100 bytes, or None.

    The name part is never empty: a directory's trailing slash stays with it, as GNU tar
    keeps it, so that a reader looking at the name field alone still sees a name.
    """
    if len(name) <= 100:
        return b"", name
    cut = name.rfind(b"/", 0, min(156, len(name) - 1))
    while cut > 0:
        if len(name) - cut - 1 <= 100:
            return name[:cut], name[cut + 1 :]
        cut = name.rfind(b"/", 0, cut)
    return None


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def tar_header(
    name: bytes, flag: bytes, *, mode: int, uid: int, gid: int, size: int, mtime: int,
    linkname: bytes = b"", rdev: tuple[int, int] = (0, 0),
    xattrs: dict[bytes, bytes] | None = None,
) -> bytes:  # fmt: skip
    """A ustar header, preceded by a PAX header for whatever ustar cannot hold."""
    pax: list[bytes] = []
    split = _split_ustar(name)
    if split is None:
        pax.append(_pax_record(b"path", name))
        split = b"", name[:100]
    if len(linkname) > 100:
        pax.append(_pax_record(b"linkpath", linkname))
    fields: dict[str, bytes] = {}
    for field_name, number, width in (
        ("size", size, 12),
        ("uid", uid, 8),
        ("gid", gid, 8),
        ("mtime", mtime, 12),
    ):
        encoded = _octal(number, width)
        if encoded is None:
            pax.append(_pax_record(field_name.encode(), b"%d" % number))
            encoded = b"0" * (width - 1) + b"\0"
        fields[field_name] = encoded
    for key, value in sorted((xattrs or {}).items()):
        pax.append(_pax_record(b"SCHILY.xattr." + key, value))
    if pax and not all(_is_utf8(v) for v in (name, linkname)):
        # POSIX: path and linkpath records are UTF-8 unless the header says otherwise.
        pax.insert(0, _pax_record(b"hdrcharset", b"BINARY"))

    header = _ustar_block(
        prefix=split[0],
        name=split[1],
        mode=_octal(mode, 8) or b"",
        fields=fields,
        flag=flag,
        linkname=linkname[:100],
        rdev=rdev,
    )
    if not pax:
        return header
    body = b"".join(pax)
    pax_header = _ustar_block(
        prefix=b"",
        name=b"PaxHeaders/" + (split[1][-80:] if _is_utf8(split[1][-80:]) else b"entry"),
        mode=_octal(0o644, 8) or b"",
        fields={
            "size": _octal(len(body), 12) or b"",
            "uid": _octal(0, 8) or b"",
            "gid": _octal(0, 8) or b"",
            "mtime": fields["mtime"],
        },
        flag=b"x",
        linkname=b"",
        rdev=(0, 0),
    )
    return pax_header + body + b"\0" * (-len(body) % 512) + header


def _ustar_block(
    *, prefix: bytes, name: bytes, mode: bytes, fields: dict[str, bytes], flag: bytes,
    linkname: bytes, rdev: tuple[int, int],
) -> bytes:  # fmt: skip
    block = bytearray(512)
    block[0 : len(name)] = name
    block[100:108] = mode
    block[108:116] = fields["uid"]
    block[116:124] = fields["gid"]
    block[124:136] = fields["size"]
    block[136:148] = fields["mtime"]
    block[148:156] = b" " * 8
    block[156:157] = flag
    block[157 : 157 + len(linkname)] = linkname
    block[257:265] = b"ustar\x0000"
    # Device numbers past 7 octal digits go in GNU's base-256 form, which GNU tar, libarchive
    # and Python read in any numeric field; PAX has no standard record for them.
    block[329:337] = _octal(rdev[0], 8) or _base256(rdev[0], 8)
    block[337:345] = _octal(rdev[1], 8) or _base256(rdev[1], 8)
    block[345 : 345 + len(prefix)] = prefix
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


class TarWriter(_ArchiveWriter):
    """Writes PAX tar entries to a sink; `finish` adds the end-of-archive blocks."""

    ALIGN = BLOCK

    def header(self, p: Planned) -> int:
        """Write the header of a planned entry; returns how many data bytes must follow."""
        inode = p.inode
        name = p.path + b"/" if inode.is_dir else p.path
        if inode.kind is Kind.FILE and p.first_link is not None:
            flag, size, linkname = b"1", 0, p.first_link
        else:
            flag, size = _TAR_FLAGS[inode.kind], inode.size if inode.kind is Kind.FILE else 0
            linkname = inode.target
        self._write(
            tar_header(
                name,
                flag,
                mode=inode.mode,
                uid=inode.uid,
                gid=inode.gid,
                mtime=p.mtime,
                size=size,
                linkname=linkname,
                rdev=inode.rdev,
                xattrs=inode.xattrs,
            )
        )
        return size

    def finish(self) -> None:
        self._write(b"\0" * 1024)
        self._write(b"\0" * (-self.offset % TAR_RECORD))


# --- one pass, both archives ---------------------------------------------------------


def copy_data(inode: Inode, outputs: Sequence[NewcWriter | TarWriter]) -> None:
    """Send a regular file's bytes to each writer; a short read is an error naming it.

    The data goes to the writers' sinks in whole blocks, so a large file is compressed
    once for all of them (see `compress.write_file`).
    """
    if not outputs:
        return
    data = inode.data
    if isinstance(data, Blob):
        blocks: Iterable[bytes] = _read_blocks(data, inode.size)
    else:
        data = data or b""
        blocks = (data[i : i + GZIP_BLOCK] for i in range(0, len(data), GZIP_BLOCK))
    write_file([out.sink for out in outputs], blocks, inode.size)
    for out in outputs:
        out.offset += inode.size


def _read_blocks(blob: Blob, size: int) -> Iterator[bytes]:
    """A blob's bytes in GZIP_BLOCK pieces (the last one shorter), whatever pread returns."""
    offset, left = blob.offset, size
    while left:
        block = os.pread(blob.fd, min(left, GZIP_BLOCK), offset)
        while len(block) < min(left, GZIP_BLOCK):
            more = os.pread(blob.fd, min(left, GZIP_BLOCK) - len(block), offset + len(block))
            if not more:
                raise FormatLimitError(f"{blob.archive}: ended while reading a file's data")
            block += more
        yield block
        offset += len(block)
        left -= len(block)


def write_archives(
    planned: Sequence[Planned],
    *,
    newc: NewcWriter | None,
    tar: TarWriter | None,
    progress: Callable[[int], object] | None = None,
) -> None:
    """Write every planned entry to the newc and tar writers given, reading data once,
    and end both archives."""
    write_entries(planned, newc=newc, tar=tar, progress=progress)
    for writer in (newc, tar):
        if writer is not None:
            writer.finish()
    log.debug("wrote %d entries", len(planned))


def write_entries(
    planned: Sequence[Planned],
    *,
    newc: NewcWriter | None,
    tar: TarWriter | None,
    progress: Callable[[int], object] | None = None,
) -> None:
    """Write planned entries to the writers given, each file's data read once.

    `progress` is called with the size of each regular file as it is done.
    """
    for p in planned:
        wanting: list[NewcWriter | TarWriter] = []
        if newc is not None and newc.header(p):
            wanting.append(newc)
        if tar is not None and tar.header(p):
            wanting.append(tar)
        if wanting:
            copy_data(p.inode, wanting)
            for out in wanting:
                out.end_data()
            if progress is not None:
                progress(p.inode.size)
