"""Where a build's base root filesystem comes from: a Docker image, or a file, as layers.

`--base` is either a path on disk or a Docker image reference. A path is recognised from
its content, never its name: a tar or cpio root filesystem, gzip- or zstd-compressed or
not, or an image archive (`docker save` output, an OCI image layout). Whatever the
input, the result is a list of uncompressed layer archives on disk, lowest first, that
the tree applies in order; compressed inputs and engine exports are spooled into the
cache once and reused.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import io
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import engine_images
from .archive import header_checksum_ok
from .cache import Cache, sha256_file
from .config import GUEST_PLATFORM, user_path
from .errors import BadInputError, UvmkitError
from .interrupts import Handoff
from .log import progress, step
from .platforms import DEFAULT_PLATFORM, make_platform, parse_platform

SPOOL_CHUNK = 1 << 20


class LayerFormat(enum.StrEnum):
    TAR = "tar"
    CPIO = "cpio"


@dataclass(frozen=True)
class Layer:
    """An uncompressed archive on disk (or a byte range of one) holding one layer."""

    path: Path
    format: LayerFormat
    # Messages name the layer by this: the file, or the file and the layer's digest.
    name: str
    start: int = 0
    end: int | None = None
    # A `docker export`: the image's creation time (seconds), to undo what the engine adds
    # to every container (see engine_images.export_entries). None for any other layer.
    export_of_image_created: int | None = None


# Called with a layer being made now (an engine export) and a stream of its bytes as they
# arrive, to read it on the way; `layer.path` is where those bytes are landing, which
# may be renamed once the layer is complete. It must not read file data from the path
# before then: only note where it is.
Follow = Callable[[Layer, "ForwardReader"], None]


@dataclass(frozen=True)
class BaseSource:
    """A resolved base: what it is, what identifies its content, and its layers."""

    ref: str
    kind: str
    # Content identity: an engine image ID, or sha256 of the input file or image config.
    id: str
    layers: tuple[Layer, ...]
    digests: tuple[str, ...] = ()
    # Where the base really came from, when it says (the seeding label, an image comment).
    origin: str = ""
    details: dict[str, str] = field(default_factory=dict)


class Sniffed(enum.StrEnum):
    GZIP = "gzip"
    ZSTD = "zstd"
    TAR = "tar"
    CPIO = "cpio"
    BZIP2 = "bzip2"
    XZ = "xz"
    UNKNOWN = "unknown"


def sniff(head: bytes) -> Sniffed:
    """What the first bytes of a file say it is."""
    if head.startswith(b"\x1f\x8b"):
        return Sniffed.GZIP
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return Sniffed.ZSTD
    if head.startswith((b"070701", b"070702", b"070707")):
        return Sniffed.CPIO
    if head.startswith(b"BZh"):
        return Sniffed.BZIP2
    if head.startswith(b"\xfd7zXZ\x00"):
        return Sniffed.XZ
    if len(head) >= 512 and (head[257:262] == b"ustar" or header_checksum_ok(head[:512])):
        return Sniffed.TAR
    return Sniffed.UNKNOWN


# Endings of the archives a file base comes as; an image reference ending so is most likely
# a path that does not exist.
ARCHIVE_SUFFIXES = (".tar", ".tgz", ".gz", ".zst", ".xz", ".bz2", ".cpio", ".img")


# How a reference that is a path, wherever it points, begins.
PATH_PREFIXES = ("/", "./", "../", "~")


def looks_like_path(ref: str) -> bool:
    """True when --base names something on disk rather than an image reference."""
    return os.path.exists(ref) or ref.startswith(PATH_PREFIXES)


@dataclass(frozen=True)
class BaseId:
    """A base named and identified, before any of it is read: enough for a cache key."""

    ref: str
    # sha256 of the content for files (of every file's name and content for an OCI
    # directory), else the engine's image ID.
    id: str
    path: Path | None = None
    image: engine_images.ImageInfo | None = None


def identify(ref: str, *, relative_to: Path | None = None) -> BaseId:
    """Find the base `ref` names (a path, else an engine image, pulled when missing).

    A relative path is taken from `relative_to` (a recipe's directory), or from the
    current directory when it is None (--base).
    """
    check = "check 'base' in the recipe" if relative_to else "check the --base path"
    path = _base_path(ref, relative_to)
    if path is not None:
        if not path.exists():
            looked = "" if relative_to is None else f" (looked for at {path})"
            raise BadInputError(f"base {ref} does not exist{looked}", hint=check)
        if not (path.is_file() or path.is_dir()):
            # A pipe (`<(...)` included) or a device: the base is read more than once (hashed
            # for the cache, then unpacked), and /dev/zero would be hashed forever.
            raise BadInputError(
                f"base {ref} is not a regular file or a directory",
                hint="save the stream to a file first, then pass that file",
            )
        if path.is_dir() and not (path / "index.json").exists():
            raise BadInputError(
                f"base {ref} is a directory but not an OCI image layout (it has no index.json)",
                hint=f"pass an archive of it instead: tar -C {ref} -cf base.tar .",
            )
        try:
            digest = _directory_digest(path) if path.is_dir() else sha256_file(path)
        except OSError as exc:
            raise BadInputError(
                f"cannot read base {path}: {exc.strerror}",
                hint="pass a readable tar, cpio, docker save archive or OCI layout",
            ) from None
        return BaseId(ref=ref, id=f"sha256:{digest}", path=path)
    info = engine_images.lookup(ref)
    if info is None:
        # Imported only here and for an export: the Docker SDK's import alone is a quarter
        # of an up-to-date build, which the lookup above answers without it.
        from . import engine

        try:
            info = engine.resolve_image(ref)
        except UvmkitError as exc:
            if ref.endswith(ARCHIVE_SUFFIXES):
                # More likely a file name mistyped than an image named like a file.
                missing = os.path.abspath((relative_to or Path()) / ref)
                exc.hint = f"no file {missing} exists either; {check}"
            raise
    return BaseId(ref=ref, id=info.id, image=info)


def _base_path(ref: str, relative_to: Path | None) -> Path | None:
    """Where the file base `ref` names lies; None when it names an image instead."""
    if relative_to is None:
        return user_path(ref, "base") if looks_like_path(ref) else None
    path = relative_to / user_path(ref, "base")  # an absolute or ~ path stays itself
    if ref.startswith(PATH_PREFIXES) or path.exists():
        return path
    return None


def _directory_digest(root: Path) -> str:
    """One sha256 over every file of a directory, names and contents, in name order.

    All of it, not index.json alone: a blob damaged after an earlier build must change the
    identity, or that build would be served from the cache without a word.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = str(path.relative_to(root)).encode()
        digest.update(b"%d:%s:%s\n" % (len(name), name, sha256_file(path).encode()))
    return digest.hexdigest()


def materialize(
    base: BaseId,
    *,
    cache: Cache,
    work_dir: Path,
    platform: str = "linux/amd64",
    follow: Follow | None = None,
) -> BaseSource:
    """The base's layers on disk: exported, decompressed or located once, then reused.

    `follow`, if given, is called with each layer that is exported now, while its bytes
    stream in (see `Follow`).
    """
    if base.image is not None:
        return from_engine(
            base.image, cache=cache, work_dir=work_dir, platform=platform, follow=follow
        )
    assert base.path is not None
    source = from_file(base.path, base.id, cache=cache, work_dir=work_dir, platform=platform)
    # Recorded as given, not as found: a recipe's relative base then reads the same in
    # every clone, and so do /info/base and the manifest.
    return dataclasses.replace(source, ref=base.ref)


# --- engine images ------------------------------------------------------------------


def from_engine(
    info: engine_images.ImageInfo,
    *,
    cache: Cache,
    work_dir: Path,
    platform: str = DEFAULT_PLATFORM,
    follow: Follow | None = None,
) -> BaseSource:
    """Export an engine image's tree once per image ID; later builds reuse the export.

    The image must be for `platform`: an engine holds one platform of an image, and a
    guest of another architecture would not boot.
    """
    ref = info.ref
    wanted = parse_platform(platform)
    if info.os and info.architecture:
        have = make_platform(info.os, info.architecture, info.variant)
        if have != wanted:
            raise BadInputError(
                f"image {ref} is for {have}, not {wanted}",
                hint=f"use a {GUEST_PLATFORM} image, the only kind uvmkit's guest runs on",
            )
    origin = info.labels.get("org.uvmkit.origin", "") or info.comment
    key = info.id.removeprefix("sha256:")

    layer = Layer(
        Path("rootfs.tar"),
        LayerFormat.TAR,
        name=f"export of image {ref}",
        export_of_image_created=engine_images.created_epoch(info),
    )

    def make(directory: Path) -> None:
        target = directory / layer.path
        landing = dataclasses.replace(layer, path=target)
        reader = functools.partial(follow, landing) if follow is not None else None
        with step(f"Exporting {ref}"):
            cache.note_hash(target, _export(info, target, reader))

    # Not repeated when the cache fills up: the export feeds the tree as it streams.
    entry = cache.get_or_make("exports", key, f"export of {ref}", make,
                              scratch=work_dir / "export", repeatable=False)  # fmt: skip
    layer = dataclasses.replace(layer, path=entry / layer.path)
    return BaseSource(
        ref=ref,
        kind="docker-image",
        id=info.id,
        layers=(layer,),
        digests=info.repo_digests,
        origin=origin,
    )


def _export(
    info: engine_images.ImageInfo,
    target: Path,
    reader: Callable[[ForwardReader], None] | None = None,
) -> str:
    """Stream the image's export into `target`; returns its sha256.

    With `reader`, the stream is also handed to it as it arrives (it reads forward only,
    and whatever it leaves unread is still written).
    """
    # Writing to disk costs about as much as receiving; a writer thread overlaps the two,
    # and hashes on the way, for the cache entry.
    chunks_to_write: Handoff[bytes | None] = Handoff(16)
    failure: list[BaseException] = []
    digest = hashlib.sha256()
    # Created here, so the file is there for `reader` to note before a byte arrives.
    out = target.open("wb")

    def write_all() -> None:
        with out:
            while (chunk := chunks_to_write.get()) is not None:
                if not failure:
                    try:
                        out.write(chunk)
                        digest.update(chunk)
                    except BaseException as exc:
                        failure.append(exc)

    from . import engine

    writer = threading.Thread(target=write_all, name="export-writer", daemon=True)
    writer.start()
    try:
        with (
            engine.export_image(info) as chunks,
            progress(total=info.size or None, desc=f"export {info.ref}") as bar,
        ):

            def keep(chunk: bytes) -> None:
                if failure:
                    raise failure[0]
                chunks_to_write.put(chunk)
                bar.update(len(chunk))

            stream = ForwardReader(chunks, keep)
            if reader is not None:
                reader(stream)
            stream.drain()
    finally:
        # At once, even after a failure or Ctrl-C: the writer ends when it gets here.
        chunks_to_write.put_now(None)
        writer.join()
    if failure:
        raise failure[0]
    return digest.hexdigest()


class ForwardReader:
    """A file-like view of a stream of chunks that reads and skips forward only.

    Every chunk is handed to `keep` as it is pulled, so a reader can parse an archive as
    it arrives while `keep` spools all of it to disk. A tar reader only skips forward, so
    it reads this as it would the spooled file, with the same offsets.
    """

    def __init__(self, chunks: Iterator[bytes], keep: Callable[[bytes], None]) -> None:
        self._chunks = chunks
        self._keep = keep
        self._chunk = b""
        self._at = 0  # how much of the current chunk is consumed
        self._pos = 0  # the stream offset of self._chunk[self._at]
        self._ended = False

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._pos

    def read(self, size: int = -1, /) -> bytes:
        """Up to `size` bytes (all the rest when negative); fewer only at the end."""
        parts = []
        while size != 0 and self._fill():
            take = len(self._chunk) - self._at
            if size > 0:
                take = min(take, size)
                size -= take
            parts.append(self._chunk[self._at : self._at + take])
            self._at += take
            self._pos += take
        return b"".join(parts)

    def seek(self, offset: int, whence: int = os.SEEK_SET, /) -> int:
        """Skip forward to `offset` (or by it, from SEEK_CUR); past the end is allowed, as
        in a file, and reads there return nothing."""
        if whence == os.SEEK_CUR:
            offset += self._pos
        elif whence != os.SEEK_SET:
            raise io.UnsupportedOperation("a stream has no end to seek from")
        if offset < self._pos:
            raise io.UnsupportedOperation("a stream is read forward only")
        while self._pos < offset and self._fill():
            take = min(offset - self._pos, len(self._chunk) - self._at)
            self._at += take
            self._pos += take
        self._pos = offset
        return offset

    def drain(self) -> None:
        """Pull the rest of the stream, unread, so that `keep` gets all of it."""
        while self._fill():
            self._pos += len(self._chunk) - self._at
            self._at = len(self._chunk)

    def _fill(self) -> bool:
        """Make sure unread bytes are at hand; False at the end of the stream."""
        while self._at == len(self._chunk):
            if self._ended:
                return False
            chunk = next(self._chunks, None)
            if chunk is None:
                self._ended = True
                return False
            self._keep(chunk)
            self._chunk, self._at = chunk, 0
        return True


# --- files --------------------------------------------------------------------------


def from_file(
    path: Path, file_id: str, *, cache: Cache, work_dir: Path, platform: str
) -> BaseSource:
    """A root filesystem archive or an image archive on disk."""
    from . import image_archive  # docker save and OCI layouts

    if path.is_dir():
        if (path / "oci-layout").is_file():
            return image_archive.from_oci_dir(
                path, cache=cache, work_dir=work_dir, platform=platform
            )
        raise BadInputError(
            f"base {path} is a directory without an oci-layout file",
            hint="pass a tar or cpio of the root filesystem, a docker save archive, or an OCI "
            "image layout",
        )
    try:
        with path.open("rb") as f:
            head = f.read(512)
    except OSError as exc:
        raise BadInputError(f"cannot read base {path}: {exc.strerror}") from None
    kind = sniff(head)
    if kind is Sniffed.UNKNOWN and head and not head.strip(b"\0"):
        # An empty tar is nothing but zero blocks; so is a file zeroed by a disk fault.
        raise BadInputError(
            f"base {path} holds no entries: it is an empty tar, or zeros",
            hint="give an archive of a root filesystem (an empty base cannot boot)",
        )
    if kind in (Sniffed.BZIP2, Sniffed.XZ, Sniffed.UNKNOWN):
        raise BadInputError(
            f"base {path} is not a tar, cpio, gzip or zstd archive"
            + (f" (it is {kind.value}-compressed)" if kind is not Sniffed.UNKNOWN else ""),
            hint="give a tar, tar.gz, tar.zst, cpio or cpio.gz, a docker save archive or an "
            "OCI layout",
        )
    digest = file_id.removeprefix("sha256:")
    if kind in (Sniffed.GZIP, Sniffed.ZSTD):
        plain, inner = _decompressed(path, kind, digest, cache=cache, work_dir=work_dir)
    else:
        plain, inner = path, kind

    if inner is Sniffed.TAR:
        layout = image_archive.detect(plain, name=str(path))
        if layout is not None:
            return image_archive.from_tar(
                plain, layout, source=path, cache=cache, work_dir=work_dir, platform=platform
            )
        fmt = LayerFormat.TAR
    elif inner is Sniffed.CPIO:
        fmt = LayerFormat.CPIO
    else:
        raise BadInputError(
            f"base {path}: its {kind.value} stream holds neither a tar nor a cpio archive",
            hint="compress a tar or cpio of the root filesystem",
        )
    return BaseSource(
        ref=str(path),
        kind=f"{fmt.value}-archive",
        id=file_id,
        layers=(Layer(plain, fmt, name=str(path)),),
        details={"compression": kind.value if kind in (Sniffed.GZIP, Sniffed.ZSTD) else "none"},
    )


def _decompressed(
    path: Path, kind: Sniffed, digest: str, *, cache: Cache, work_dir: Path
) -> tuple[Path, Sniffed]:
    """Spool a compressed archive's content to disk once; returns it and what it holds."""

    def make(directory: Path) -> None:
        with step(f"Decompressing {path.name}"):
            decompress_to(path, kind, directory / "content")

    entry = cache.get_or_make(
        "decompressed", digest, f"decompressed {path.name}", make, scratch=work_dir / "plain"
    )
    content = entry / "content"
    with content.open("rb") as f:
        return content, sniff(f.read(512))


def decompress_to(path: Path, kind: Sniffed, target: Path) -> None:
    """Decompress a gzip or zstd file into target; a damaged stream is an error naming it."""
    import zstandard
    from isal import igzip

    try:
        with path.open("rb") as raw, target.open("wb") as out:
            if kind is Sniffed.GZIP:
                with igzip.open(raw, "rb") as stream:  # type: ignore[no-untyped-call]
                    shutil.copyfileobj(stream, out, SPOOL_CHUNK)
            else:
                reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
                shutil.copyfileobj(reader, out, SPOOL_CHUNK)
    except (OSError, EOFError, zstandard.ZstdError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        raise BadInputError(
            f"base {path}: its {kind.value} stream is damaged or cut short ({exc})",
            hint="make or download the file again",
        ) from None
