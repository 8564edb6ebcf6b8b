"""Read root filesystem archives: tar (ustar, GNU, PAX) and cpio (newc, odc), entry by entry.

The readers work on a seekable file and never load file contents: each entry records
where its data starts, and the writers copy it from there with `os.pread`. Names, link
targets and xattr values stay bytes from input to output.
"""

from __future__ import annotations

import base64
import enum
import os
import stat
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from .errors import BadInputError, show_name

BLOCK = 512
# Linux device numbers: 32 bits of major, 32 of minor.
MAX_DEVICE_NUMBER = 0xFFFFFFFF


class Kind(enum.Enum):
    """What an archive entry is."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"


@dataclass(slots=True)
class Entry:
    """One archive member, with its data located in the archive rather than loaded."""

    name: bytes
    kind: Kind
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    size: int = 0
    # Where the data starts in the archive file (regular files only).
    offset: int = 0
    # Symlink target, or the name a hard link points at.
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)


_TAR_KINDS = {
    b"0": Kind.FILE,
    b"\0": Kind.FILE,
    b"7": Kind.FILE,  # contiguous file: an ordinary file everywhere but on old Masscomp
    b"1": Kind.HARDLINK,
    b"2": Kind.SYMLINK,
    b"3": Kind.CHAR,
    b"4": Kind.BLOCK,
    b"5": Kind.DIR,
    b"6": Kind.FIFO,
}

# Type flags that cannot be turned into a tree faithfully; refused with their meaning.
_TAR_UNSUPPORTED = {
    b"S": "a GNU sparse file",
    b"M": "a GNU multi-volume continuation",
    b"N": "an old GNU long-name record",
}


_OCTAL_DIGITS = frozenset(b"01234567")


def _number(
    field_bytes: bytes, what: str, archive: str, name: bytes, *, signed: bool = False
) -> int:
    """A numeric header field: octal text, or GNU base-256 when the top bit is set.

    Only an mtime may be negative (`signed`); a negative size, owner or device number
    is refused, since a size below zero would send the reader backwards.
    """
    if field_bytes and field_bytes[0] & 0x80:
        # Base-256: the field is one big-endian two's complement number, less the marker
        # bit; 0xff-led fields are negative.
        if field_bytes[0] & 0x40:
            value = int.from_bytes(field_bytes, "big", signed=True)
        else:
            value = int.from_bytes(bytes([field_bytes[0] & 0x7F]) + field_bytes[1:], "big")
    else:
        text = field_bytes.split(b"\0", 1)[0].strip(b" ")
        if not text:
            return 0
        if not set(text) <= _OCTAL_DIGITS:
            raise BadInputError(
                f"{archive}: entry {show_name(name) or '?'} has a bad {what} field {text!r}",
                hint="the archive is damaged or not a tar",
            )
        value = int(text, 8)
    if value < 0 and not signed:
        raise BadInputError(
            f"{archive}: entry {show_name(name) or '?'} has a negative {what} ({value})",
            hint="the archive is damaged",
        )
    return value


def _cstring(field_bytes: bytes) -> bytes:
    return field_bytes.split(b"\0", 1)[0]


def header_checksum_ok(block: bytes) -> bool:
    """True when a 512-byte block is a tar header whose checksum matches."""
    try:
        stored = int(_cstring(block[148:156]).strip(b" ") or b"-1", 8)
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    if stored == unsigned:
        return True
    # Some old writers summed signed chars; accept either, as GNU tar does.
    high = sum(1 for b in block[:148] + block[156:] if b >= 128)
    return stored == unsigned - 256 * high


def _parse_pax(data: bytes, archive: str, near: bytes) -> dict[bytes, bytes]:
    """PAX records: "LEN KEY=VALUE\\n", where LEN counts the whole record in bytes."""
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # padding some writers leave at the end
            break
        space = data.find(b" ", pos)
        digits = data[pos:space] if space > pos else b""
        length = int(digits) if digits.isdigit() else 0
        end = pos + length
        if space < 0 or length <= 0 or end > len(data) or data[end - 1 : end] != b"\n":
            raise BadInputError(
                f"{archive}: bad PAX header near entry {show_name(near) or '(start)'}",
                hint="the archive is damaged",
            )
        key, sep, value = data[space + 1 : end - 1].partition(b"=")
        if not sep:
            raise BadInputError(f"{archive}: PAX record without '=' near {show_name(near)}")
        records[key] = value
        pos = end
    return records


# PAX records that replace a numeric header field, and the Entry attribute each sets.
_PAX_NUMBERS = {
    b"size": "size",
    b"uid": "uid",
    b"gid": "gid",
    b"SCHILY.devmajor": "devmajor",
    b"SCHILY.devminor": "devminor",
}


def _apply_pax(entry: Entry, records: dict[bytes, bytes], archive: str) -> None:
    for key, value in records.items():
        if key == b"path":
            entry.name = value
        elif key == b"linkpath":
            entry.linkname = value
        elif key in _PAX_NUMBERS:
            # Digits only: int() would also take signs, spaces and underscores.
            if not value.isdigit():
                raise BadInputError(
                    f"{archive}: entry {show_name(entry.name)} has a bad PAX {key.decode()} "
                    f"record {value!r}",
                    hint="the archive is damaged",
                )
            setattr(entry, _PAX_NUMBERS[key], int(value))
        elif key == b"mtime":
            try:
                entry.mtime = int(float(value))
            except (ValueError, OverflowError):
                raise BadInputError(
                    f"{archive}: entry {show_name(entry.name)} has a bad PAX mtime"
                ) from None
        elif key.startswith(b"SCHILY.xattr."):
            entry.xattrs[key[len(b"SCHILY.xattr.") :]] = value
        elif key.startswith(b"LIBARCHIVE.xattr."):
            # libarchive's own spelling: URL-encoded name, base64 value.
            name = urllib.parse.unquote_to_bytes(key[len(b"LIBARCHIVE.xattr.") :])
            try:
                decoded = base64.b64decode(value + b"=" * (-len(value) % 4), validate=True)
            except ValueError:
                raise BadInputError(
                    f"{archive}: entry {show_name(entry.name)} has a bad LIBARCHIVE.xattr "
                    f"record for {show_name(name)}",
                    hint="the archive is damaged",
                ) from None
            entry.xattrs.setdefault(name, decoded)
        elif key.startswith(b"GNU.sparse."):
            raise BadInputError(
                f"{archive}: entry {show_name(entry.name)} is a sparse file, which uvmkit does "
                "not read",
                hint="repack the archive without --sparse",
            )


class TarSource(Protocol):
    """What `read_tar` reads from: a file, or a stream it only skips forward through."""

    def read(self, size: int = -1, /) -> bytes: ...
    def seek(self, offset: int, whence: int = os.SEEK_SET, /) -> int: ...
    def tell(self) -> int: ...
    def seekable(self) -> bool: ...


def read_tar(
    f: TarSource, archive: str, *, start: int = 0, end: int | None = None
) -> Iterator[Entry]:
    """Yield the entries of a tar file; `archive` names it in errors.

    Data is skipped, not read, and each entry's `offset` (from the start of `f`) says where
    its bytes are. `start` and `end` select a tar stored inside a larger file, such as a
    layer in an uncompressed `docker save` archive. `f` may be a stream that cannot seek
    (see `base.ForwardReader`): it is read to its end, skipping forward only.
    """
    if end is None:
        end = f.seek(0, os.SEEK_END) if f.seekable() else 1 << 62
    f.seek(start)
    pending_pax: dict[bytes, bytes] = {}
    global_pax: dict[bytes, bytes] = {}
    long_name: bytes | None = None
    long_link: bytes | None = None
    last_name = b""
    while True:
        here = f.tell()
        block = f.read(min(BLOCK, max(0, end - here)))
        if not block and last_name:
            return  # no end-of-archive marker, which some writers leave out
        # Positions in messages count from the start of this tar.
        where = f"at byte {here - start} (after entry {show_name(last_name) or '(none)'})"
        if len(block) < BLOCK:
            if not block:
                raise BadInputError(f"{archive}: empty archive", hint="is it the right file?")
            raise BadInputError(
                f"{archive}: ends in the middle of a tar header {where}",
                hint="the file is truncated; make or download it again",
            )
        if block == bytes(BLOCK):
            return  # end-of-archive marker; whatever follows is padding
        if not header_checksum_ok(block):
            raise BadInputError(
                f"{archive}: bad tar header checksum {where}",
                hint="the archive is damaged or not a tar",
            )
        flag = block[156:157]
        name = _cstring(block[0:100])
        if block[257:262] == b"ustar":
            prefix = _cstring(block[345:500])
            if prefix and block[257:263] == b"ustar\0":  # POSIX; GNU puts times there
                name = prefix + b"/" + name
        size = _number(block[124:136], "size", archive, name)
        data_offset = f.tell()

        if flag in (b"x", b"g", b"L", b"K"):
            if data_offset + size > end:
                raise BadInputError(
                    f"{archive}: ends inside the extended header {where}",
                    hint="the file is truncated; make or download it again",
                )
            data = f.read(size)
            f.seek(-size % BLOCK, os.SEEK_CUR)
            if flag == b"x":
                pending_pax.update(_parse_pax(data, archive, last_name))
            elif flag == b"g":
                global_pax.update(_parse_pax(data, archive, last_name))
            elif flag == b"L":
                long_name = data.rstrip(b"\0")
            else:
                long_link = data.rstrip(b"\0")
            continue
        if flag in _TAR_UNSUPPORTED:
            raise BadInputError(
                f"{archive}: entry {show_name(name)} is {_TAR_UNSUPPORTED[flag]}, which uvmkit "
                "does not read",
                hint="repack the archive with plain GNU or POSIX tar",
            )
        if flag == b"V":  # a volume label is not part of the tree
            f.seek(size + (-size % BLOCK), os.SEEK_CUR)
            continue

        kind = _TAR_KINDS.get(flag)
        if kind is None:
            raise BadInputError(
                f"{archive}: entry {show_name(name)} has unknown tar type {flag!r}",
                hint="repack the archive with plain GNU or POSIX tar",
            )
        entry = Entry(
            name=name,
            kind=kind,
            mode=_number(block[100:108], "mode", archive, name) & 0o7777,
            uid=_number(block[108:116], "uid", archive, name),
            gid=_number(block[116:124], "gid", archive, name),
            mtime=_number(block[136:148], "mtime", archive, name, signed=True),
            size=size,
            offset=data_offset,
            linkname=_cstring(block[157:257]),
            devmajor=_number(block[329:337], "devmajor", archive, name),
            devminor=_number(block[337:345], "devminor", archive, name),
        )
        if long_name is not None:
            entry.name, long_name = long_name, None
        if long_link is not None:
            entry.linkname, long_link = long_link, None
        if global_pax:
            _apply_pax(entry, global_pax, archive)
        if pending_pax:
            _apply_pax(entry, pending_pax, archive)
            pending_pax = {}
        if max(entry.devmajor, entry.devminor) > MAX_DEVICE_NUMBER:
            raise BadInputError(
                f"{archive}: entry {show_name(entry.name)} has device number "
                f"{entry.devmajor}:{entry.devminor}, past what Linux can hold",
                hint="the archive is damaged",
            )
        # Old (V7) archives mark directories only by the trailing slash.
        if kind is Kind.FILE and flag == b"\0" and entry.name.endswith(b"/"):
            entry.kind = Kind.DIR
        # The size field says what follows the header, whatever the type; only a regular
        # file's bytes are part of the tree.
        padded = entry.size + (-entry.size % BLOCK)
        if entry.kind is not Kind.FILE:
            entry.size = 0
        if data_offset + entry.size > end:
            raise BadInputError(
                f"{archive}: entry {show_name(entry.name)} is cut short: the archive ends "
                "inside its data",
                hint="the file is truncated; make or download it again",
            )
        last_name = entry.name
        yield entry
        f.seek(data_offset + padded)


# --- cpio -------------------------------------------------------------------------------

_NEWC_FIELDS = 13
_CPIO_TRAILER = b"TRAILER!!!"


@dataclass(slots=True)
class _CpioHeader:
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    size: int
    dev: tuple[int, int]
    rdev: tuple[int, int]
    name: bytes
    offset: int
    # Which of several concatenated archives the entry is in: inode numbers, and with
    # them hard links, are only shared within one (the kernel forgets them at a trailer).
    segment: int


_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


def _cpio_fields(raw: bytes, slices: list[tuple[int, int]], base: int) -> list[int] | None:
    """The numbers of a cpio header; None unless every field is all digits of `base`."""
    digits = _HEX_DIGITS if base == 16 else _OCTAL_DIGITS
    fields = [raw[a:b] for a, b in slices]
    if len(raw) < slices[-1][1] or not all(f and set(f) <= digits for f in fields):
        return None
    return [int(f, base) for f in fields]


_NEWC_SLICES = [(i, i + 8) for i in range(0, 8 * _NEWC_FIELDS, 8)]
_ODC_SLICES = [(0, 6), (6, 12), (12, 18), (18, 24), (24, 30), (30, 36), (36, 42), (42, 53),
               (53, 59), (59, 70)]  # fmt: skip


def _read_cpio_headers(f: BinaryIO, archive: str) -> Iterator[_CpioHeader]:
    end = f.seek(0, os.SEEK_END)
    f.seek(0)
    last = b""
    segment = 0
    while True:
        start = f.tell()
        where = f"at byte {start} (after entry {show_name(last) or '(none)'})"
        magic = f.read(6)
        if magic in (b"070701", b"070702"):
            values = _cpio_fields(f.read(8 * _NEWC_FIELDS), _NEWC_SLICES, 16)
            if values is None:
                raise BadInputError(f"{archive}: bad cpio header {where}")
            ino, mode, uid, gid, nlink, mtime, size, dmaj, dmin, rmaj, rmin, namesize, _ = values
            name = f.read(namesize)
            f.seek((-(110 + namesize)) % 4, os.SEEK_CUR)
            skip = size + (-size % 4)
            dev, rdev = (dmaj, dmin), (rmaj, rmin)
        elif magic == b"070707":
            fields = _cpio_fields(f.read(70), _ODC_SLICES, 8)
            if fields is None:
                raise BadInputError(f"{archive}: bad cpio header {where}")
            devnum, ino, mode, uid, gid, nlink, rdevnum, mtime, namesize, size = fields
            name = f.read(namesize)
            skip = size
            dev = (os.major(devnum), os.minor(devnum))
            rdev = (os.major(rdevnum), os.minor(rdevnum))
        elif not magic:
            raise BadInputError(
                f"{archive}: cpio archive ends without a trailer",
                hint="the file is truncated; make or download it again",
            )
        else:
            raise BadInputError(
                f"{archive}: not a newc or odc cpio record {where}",
                hint="the archive is damaged, or is another cpio variant",
            )
        offset = f.tell()
        if len(name) != namesize:
            raise BadInputError(
                f"{archive}: ends in the middle of a cpio header {where}",
                hint="the file is truncated; make or download it again",
            )
        name = name.rstrip(b"\0")
        if not name:
            raise BadInputError(f"{archive}: cpio entry without a name {where}")
        if offset + size > end:
            raise BadInputError(
                f"{archive}: entry {show_name(name)} is cut short: the archive ends inside "
                "its data",
                hint="the file is truncated; make or download it again",
            )
        if name == _CPIO_TRAILER:
            # Another archive may follow (initramfs images are often several concatenated),
            # after NUL padding.
            if not _skip_nul_padding(f):
                return
            segment += 1
            continue
        yield _CpioHeader(ino, mode, uid, gid, nlink, mtime, size, dev, rdev, name, offset, segment)
        last = name
        f.seek(offset + skip)


def _skip_nul_padding(f: BinaryIO) -> bool:
    """Move past NUL bytes; False at end of file, True at the first other byte."""
    while True:
        here = f.tell()
        chunk = f.read(BLOCK)
        if not chunk:
            return False
        stripped = chunk.lstrip(b"\0")
        if stripped:
            f.seek(here + len(chunk) - len(stripped))
            return True


def read_cpio(f: BinaryIO, archive: str) -> Iterator[Entry]:
    """Yield the entries of a newc or odc cpio file as tar-like entries.

    cpio marks hard links by a shared inode number and keeps the data on one of them
    (usually the last); they come out as a file followed by hard links to it, as tar has.
    """
    headers = list(_read_cpio_headers(f, archive))
    data_of: dict[tuple[int, tuple[int, int], int], _CpioHeader] = {}
    for h in headers:
        if stat.S_ISREG(h.mode) and h.nlink > 1 and h.size > 0:
            data_of[(h.segment, h.dev, h.ino)] = h
    first_name: dict[tuple[int, tuple[int, int], int], bytes] = {}
    for h in headers:
        kind = _cpio_kind(h.mode, h.name, archive)
        entry = Entry(
            name=h.name,
            kind=kind,
            mode=h.mode & 0o7777,
            uid=h.uid,
            gid=h.gid,
            mtime=h.mtime,
            devmajor=h.rdev[0],
            devminor=h.rdev[1],
        )
        if kind is Kind.SYMLINK:
            f.seek(h.offset)
            entry.linkname = f.read(h.size)
        elif kind is Kind.FILE:
            entry.size, entry.offset = h.size, h.offset
            if h.nlink > 1:
                key = (h.segment, h.dev, h.ino)
                if key in first_name:
                    entry.kind, entry.linkname, entry.size = Kind.HARDLINK, first_name[key], 0
                else:
                    first_name[key] = h.name
                    holder = data_of.get(key, h)
                    entry.size, entry.offset = holder.size, holder.offset
        yield entry


def _cpio_kind(mode: int, name: bytes, archive: str) -> Kind:
    fmt = stat.S_IFMT(mode)
    kinds = {
        stat.S_IFREG: Kind.FILE,
        stat.S_IFDIR: Kind.DIR,
        stat.S_IFLNK: Kind.SYMLINK,
        stat.S_IFCHR: Kind.CHAR,
        stat.S_IFBLK: Kind.BLOCK,
        stat.S_IFIFO: Kind.FIFO,
    }
    if fmt in kinds:
        return kinds[fmt]
    raise BadInputError(
        f"{archive}: entry {show_name(name)} has file type 0o{fmt:o}, which an image cannot hold",
        hint="remove sockets and other special files from the archive",
    )
