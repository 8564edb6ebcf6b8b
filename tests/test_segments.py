"""Segmented gzip: cuts keep the stream standard, and a rebuild after a change to the
guest layer splices the compressed base from the cache and still writes exactly the bytes
a cold build writes."""

from __future__ import annotations

import hashlib
import io
import os
import random
import subprocess
import zlib
from pathlib import Path

import pytest
from helpers import by_path, directory, file, invoke, read_archive, write_tar

from uvmkit.compress import (
    GZIP_BLOCK,
    LARGE_FILE,
    CompressedWriter,
    Segment,
    _deflate_block,
    write_file,
)
from uvmkit.config import Compression

ARTIFACTS = ("initrd.img", "rootfs.tar.gz", "delta.tar.gz")


def _payload(size: int, seed: int) -> bytes:
    """Compressible but not trivial: words drawn at random."""
    rng = random.Random(seed)
    words = [b"init", b"agent", b"kernel", b"layer", b"uvmkit", b"\x00\x01", b"cpio\n"]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words)
    return bytes(out[:size])


class _Buffer(io.BytesIO):
    """A BytesIO that keeps its bytes when the writer closes it."""

    def close(self) -> None:
        pass


def _gzip(pieces: list[bytes], *, level: int = 3) -> tuple[bytes, list[Segment]]:
    """Compress `pieces`, cutting before each; returns the file and the segments."""
    buffer = _Buffer()
    writer = CompressedWriter(buffer, Compression.GZIP, level)
    segments = []
    for piece in pieces:
        writer.cut()
        writer.write(piece)
        segment = writer.cut()
        assert segment is not None
        segments.append(segment)
    writer.close()
    return buffer.getvalue(), segments


def test_cut_stream_is_one_standard_gzip_member() -> None:
    pieces = [_payload(3 * GZIP_BLOCK + 17, 1), b"", _payload(5000, 2), _payload(GZIP_BLOCK, 3)]
    data, segments = _gzip(pieces)

    gunzip = subprocess.run(["gzip", "-dc"], input=data, capture_output=True, check=True)
    assert gunzip.stdout == b"".join(pieces)
    # One member: a decoder started at the top ends exactly at the end of the file.
    decoder = zlib.decompressobj(31)
    assert decoder.decompress(data) == b"".join(pieces)
    assert decoder.eof and decoder.unused_data == b""
    assert [s.size for s in segments] == [len(p) for p in pieces]
    assert [s.crc for s in segments] == [zlib.crc32(p) for p in pieces]
    assert segments[1].length == 0


def test_a_segment_decompresses_alone_and_splices_byte_for_byte() -> None:
    first, middle, last = _payload(GZIP_BLOCK + 99, 4), _payload(2 * GZIP_BLOCK, 5), b"end"
    data, segments = _gzip([first, middle, last])
    seg = segments[1]

    # A cut drops the dictionary, so the segment needs nothing before it.
    alone = zlib.decompressobj(-15).decompress(data[seg.offset : seg.offset + seg.length])
    assert alone == middle

    other = _Buffer()
    writer = CompressedWriter(other, Compression.GZIP, 3)
    writer.write(first)
    writer.cut()
    writer.splice(io.BytesIO(data), seg)
    writer.cut()
    writer.write(last)
    writer.cut()
    writer.close()
    assert other.getvalue() == data


def test_segment_hash_is_of_its_compressed_bytes() -> None:
    data, segments = _gzip([_payload(70_000, 6), _payload(90_000, 7)])
    for seg in segments:
        assert seg.sha256 == hashlib.sha256(data[seg.offset : seg.offset + seg.length]).hexdigest()


def _blocks(data: bytes) -> list[bytes]:
    return [data[i : i + GZIP_BLOCK] for i in range(0, len(data), GZIP_BLOCK)]


def test_a_large_file_is_compressed_once_into_both_streams() -> None:
    big = _payload(2 * GZIP_BLOCK + 4321, 20)
    # The same file between different headers and trailers, as in the cpio and the tar.
    around = [(b"070701 a newc header " * 9, b"TRAILER!!!"), (b"a tar header\0" * 40, bytes(1024))]
    buffers = [_Buffer(), _Buffer()]
    writers = [CompressedWriter(b, Compression.GZIP, 3) for b in buffers]
    for writer, (header, _) in zip(writers, around, strict=True):
        writer.write(header)
    write_file(writers, _blocks(big), len(big))
    for writer, (_, trailer) in zip(writers, around, strict=True):
        writer.write(trailer)
        writer.close()

    # The file's compressed bytes: its blocks chained from no dictionary, whatever came
    # before them, are in both streams.
    chain, dictionary = b"", b""
    for block in _blocks(big):
        chain += _deflate_block(3, block, dictionary)[0]
        dictionary = block[-32 * 1024 :]
    for buffer, (header, trailer) in zip(buffers, around, strict=True):
        assert chain in buffer.getvalue()
        assert zlib.decompress(buffer.getvalue(), 31) == header + big + trailer


def test_sharing_a_file_changes_no_byte_of_either_stream() -> None:
    files = [_payload(LARGE_FILE, 21), _payload(LARGE_FILE - 1, 22), _payload(3 * GZIP_BLOCK, 23)]

    def write(shared: bool) -> list[bytes]:
        buffers = [_Buffer(), _Buffer()]
        writers = [CompressedWriter(b, Compression.GZIP, 3) for b in buffers]
        for n, data in enumerate(files):
            for w, writer in enumerate(writers):
                writer.write(b"header %d of stream %d;" % (n, w))
            if shared:
                write_file(writers, _blocks(data), len(data))
            else:
                for writer in writers:
                    write_file([writer], _blocks(data), len(data))
        for writer in writers:
            writer.close()
        return [b.getvalue() for b in buffers]

    shared, alone = write(shared=True), write(shared=False)
    assert shared == alone
    expected = b"".join(b"header %d of stream 1;" % n + data for n, data in enumerate(files))
    assert zlib.decompress(shared[1], 31) == expected


def test_only_files_from_the_chain_size_on_are_chained() -> None:
    for size, chained in ((LARGE_FILE, True), (LARGE_FILE - 1, False)):
        data = _payload(size, 24)
        # A smaller file is compressed with what precedes it (here, text it repeats).
        out, _ = _gzip_file(data[-30_000:], data)
        assert (_deflate_block(3, data, b"")[0] in out) is chained
        assert zlib.decompress(out, 31) == data[-30_000:] + data


def _gzip_file(header: bytes, data: bytes) -> tuple[bytes, CompressedWriter]:
    buffer = _Buffer()
    writer = CompressedWriter(buffer, Compression.GZIP, 3)
    writer.write(header)
    write_file([writer], _blocks(data), len(data))
    writer.close()
    return buffer.getvalue(), writer


def test_zstd_and_plain_streams_are_never_cut() -> None:
    for compression in (Compression.ZSTD, Compression.NONE):
        writer = CompressedWriter(_Buffer(), compression, 3)
        writer.write(b"x" * 100)
        assert writer.cut() is None
        assert not writer.splices
        writer.close()


# --- whole builds -------------------------------------------------------------------------


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """Base entries on both sides of every guest-layer name (bin/, info/, init), with files
    of several blocks, so that the guest layer splits the base into several runs."""
    return write_tar(
        tmp_path / "base.tar",
        [
            directory(b"a/"),
            file(b"a/big", _payload(2 * GZIP_BLOCK + 5, 8)),
            directory(b"bin/"),
            file(b"bin/sh", b"#!/bin/true\n", mode=0o755),
            directory(b"etc/"),
            file(b"etc/os-release", b"NAME=segments\n"),
            directory(b"lib/"),
            file(b"lib/libc.so", _payload(GZIP_BLOCK + 3, 9), mode=0o755),
            directory(b"usr/"),
            file(b"usr/words", _payload(3 * GZIP_BLOCK, 10)),
        ],
    )


def _recipe(tmp_path: Path, base: Path, overlay_text: bytes) -> str:
    overlay = tmp_path / "overlay"
    (overlay / "etc").mkdir(parents=True, exist_ok=True)
    (overlay / "etc" / "motd").write_bytes(overlay_text)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'base = "{base}"\noverlay = "{overlay}"\n')
    return str(recipe)


def _build(
    tmp_path: Path, recipe: str, out: str, *options: str
) -> subprocess.CompletedProcess[str]:
    result = invoke(
        "--debug", "build-all", "--image", recipe, "--out", str(tmp_path / out), *options,
        tmp_path=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result


def test_guest_change_reuses_the_base_and_matches_a_cold_build(tmp_path: Path, base: Path) -> None:
    _build(tmp_path, _recipe(tmp_path, base, b"first\n"), "a")
    recipe = _recipe(tmp_path, base, b"second\n")

    warm = _build(tmp_path, recipe, "b")
    cold = _build(tmp_path, recipe, "c", "--no-cache")

    reused = warm.stderr.count("a compressed segment of initrd.img: reused")
    assert reused >= 3, warm.stderr
    assert warm.stderr.count("a compressed segment of rootfs.tar.gz: reused") == reused
    assert "segment" not in cold.stderr
    for name in ARTIFACTS:
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes(), name
    initrd = by_path(read_archive(tmp_path / "b" / "initrd.img"))
    assert initrd[b"etc/motd"].data == b"second\n"
    assert initrd[b"usr/words"].data == _payload(3 * GZIP_BLOCK, 10)

    # A third change splices again, now from the second build's artifacts, where the
    # segments lie at other offsets (the guest layer before them changed size).
    third = _build(tmp_path, _recipe(tmp_path, base, b"third, and longer than both\n"), "d")
    assert third.stderr.count("a compressed segment of initrd.img: reused") == reused
    assert "compressing afresh" not in third.stderr


def test_damaged_cached_artifact_is_not_spliced(tmp_path: Path, base: Path) -> None:
    _build(tmp_path, _recipe(tmp_path, base, b"first\n"), "a")
    # Damage the cached initrd.img (a copy: out/a keeps its own file) in its last segment.
    [cached] = (tmp_path / "xdg-cache" / "uvmkit" / "builds").glob("*/initrd.img")
    damaged = bytearray(cached.read_bytes())
    damaged[-100] ^= 0xFF
    cached.unlink()
    cached.write_bytes(bytes(damaged))
    recipe = _recipe(tmp_path, base, b"second\n")

    warm = _build(tmp_path, recipe, "b")
    _build(tmp_path, recipe, "c", "--no-cache")

    assert "compressing afresh" in warm.stderr
    assert "a compressed segment of rootfs.tar.gz: reused" in warm.stderr
    for name in ARTIFACTS:
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes(), name
    assert subprocess.run(["gzip", "-t", tmp_path / "b" / "initrd.img"]).returncode == 0


def test_changed_base_file_is_never_taken_from_a_segment(tmp_path: Path, base: Path) -> None:
    recipe = _recipe(tmp_path, base, b"same\n")
    _build(tmp_path, recipe, "a")
    # Same names, sizes and layout; one file's bytes differ.
    os.truncate(base, 0)
    write_tar(
        base,
        [
            directory(b"a/"),
            file(b"a/big", _payload(2 * GZIP_BLOCK + 5, 11)),
            directory(b"usr/"),
            file(b"usr/words", _payload(3 * GZIP_BLOCK, 10)),
        ],
    )

    warm = _build(tmp_path, recipe, "b")

    initrd = by_path(read_archive(tmp_path / "b" / "initrd.img"))
    assert initrd[b"a/big"].data == _payload(2 * GZIP_BLOCK + 5, 11)
    assert "a compressed segment of initrd.img: reused" not in warm.stderr
