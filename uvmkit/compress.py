"""Compressed output streams: gzip through ISA-L on worker threads, zstd, or none.

Every stream is deterministic: the same bytes in give the same bytes out, however they
were split into writes. gzip output is a plain single-member gzip file with no name and a
zero time in its header (gunzip and the kernel read it). It is cut into fixed blocks that
worker threads compress while the caller goes on producing; each block is compressed with
the one before it as a dictionary, so the ratio stays within a fraction of a percent of
one deflate stream.

A large file's data (LARGE_FILE bytes or more) is compressed as a chain of blocks of its
own: the block before it ends where the file's data begins, and the chain starts with no
dictionary. Its compressed bytes then depend on the file alone, not on the archive format
around it, so when the same file goes into several gzip streams at one level (initrd.img
and rootfs.tar.gz) it is compressed once and the blocks are written to each. Every gzip
stream follows this rule whether or not another stream shares the work, so sharing never
changes a byte.

A gzip stream can also be cut into *segments*: at a cut the dictionary is dropped, so the
compressed bytes of what follows depend on nothing before it. A segment compressed once
can then be spliced, byte for byte, into another stream at a cut. This is how a rebuild
after a change to the guest layer reuses the compressed base (see `segments.py`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import hashlib
import queue
import struct
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from .config import Compression
from .interrupts import Handoff

# Both cores: the writer thread and the compressors outrun a single core by far.
THREADS = 2
GZIP_BLOCK = 1 << 20
# Deflate looks back at most 32 KiB, so that much of a block is all the next one needs.
DEFLATE_WINDOW = 32 * 1024
# Magic, deflate, no flags, no time, no extra flags, OS "unknown": nothing of the host.
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
# An empty fixed-Huffman block with the final bit set ends the deflate stream.
DEFLATE_END = b"\x03\x00"
SPLICE_CHUNK = 1 << 20
# From this size on, a file's data is a chain of blocks of its own (see above). Smaller
# files compress better with what precedes them as their dictionary.
LARGE_FILE = 64 * 1024
_Compressed = concurrent.futures.Future[tuple[bytes, int]]
# Queued behind the blocks; the writer answers it when it gets there.
_Marker = queue.SimpleQueue[None]


class Sink(Protocol):
    """Anything the archive writers write to."""

    def write(self, data: bytes | memoryview, /) -> int: ...


@dataclass(frozen=True)
class Segment:
    """A run of a gzip file's deflate data that starts and ends at a cut.

    `offset` and `length` are in the compressed file; `size` and `crc` describe what the
    run decompresses to; `sha256` is of the compressed bytes, to check a copy before use.
    """

    offset: int
    length: int
    size: int
    crc: int
    sha256: str


@dataclass(frozen=True)
class _Splice:
    """A segment to copy from `source`, queued behind the blocks; the writer closes it."""

    source: BinaryIO
    segment: Segment


class CompressedWriter:
    """A write-only stream that compresses into a file; `written` counts bytes before
    compression. Closing it finishes the compressed stream and closes the file."""

    def __init__(self, raw: BinaryIO, compression: Compression, level: int) -> None:
        self.raw = raw
        self.level = level
        self.written = 0
        self._buffer = bytearray()
        self._gzip: GzipStream | None = None
        self._stream: BinaryIO | None = None
        # Imported here: a build that finds its artifacts up to date never compresses.
        if compression is Compression.GZIP:
            self._gzip = GzipStream(raw, level)
        elif compression is Compression.ZSTD:
            import zstandard

            # Multi-threaded zstd output is deterministic for a level and thread count;
            # the checksum lets `zstd -t` verify the file.
            params = zstandard.ZstdCompressionParameters.from_level(
                level, threads=THREADS, write_checksum=True
            )
            compressor = zstandard.ZstdCompressor(compression_params=params)
            self._stream = compressor.stream_writer(raw, closefd=False)

    @property
    def splices(self) -> bool:
        """True when segments can be cut from and spliced into this stream (gzip)."""
        return self._gzip is not None

    def write(self, data: bytes | memoryview, /) -> int:
        self.written += len(data)
        if self._gzip is None:
            return (self._stream or self.raw).write(data)
        # Regroup into fixed blocks, so the block boundaries (and with them the
        # compressed bytes) depend only on the data, never on how it was written.
        self._buffer += data
        if len(self._buffer) >= GZIP_BLOCK:
            full = len(self._buffer) - len(self._buffer) % GZIP_BLOCK
            with memoryview(self._buffer) as view:
                for start in range(0, full, GZIP_BLOCK):
                    self._gzip.add_block(bytes(view[start : start + GZIP_BLOCK]))
            del self._buffer[:full]
        return len(data)

    def cut(self) -> Segment | None:
        """End the current segment here and return it; None for zstd and no compression,
        which are never cut (a cut there would change nothing worth keeping)."""
        if self._gzip is None:
            return None
        self._flush_buffer()
        return self._gzip.cut()

    def splice(self, source: BinaryIO, segment: Segment) -> Segment:
        """Append a segment that another gzip stream cut, read from `source` (which this
        stream closes once copied); returns it as it now lies in this stream.

        Call it right after a cut. The segment must have been compressed at this stream's
        level from the bytes that belong here; checking that is the caller's part.
        """
        assert self._gzip is not None and not self._buffer
        placed = self._gzip.splice(source, segment)
        self.written += segment.size
        return placed

    def begin_file(self, size: int) -> GzipStream | None:
        """Get ready for a file of `size` bytes. A large one in a gzip stream starts a chain:
        the block before it ends here, the dictionary is dropped, and the stream to queue
        the chain's blocks on is returned. Otherwise None: write the data as usual."""
        if self._gzip is None or size < LARGE_FILE:
            return None
        self._flush_buffer()
        self._gzip.restart()
        return self._gzip

    def _flush_buffer(self) -> None:
        if self._buffer:
            assert self._gzip is not None
            self._gzip.add_block(bytes(self._buffer))
            self._buffer.clear()

    def abort(self) -> None:
        """Stop after a failure: end the worker threads and close the file, quietly."""
        self._buffer.clear()
        try:
            if self._gzip is not None:
                self._gzip.abort()
            elif self._stream is not None:
                self._stream.close()
        except Exception:
            pass  # the failure that brought us here is the one the user must see
        finally:
            self.raw.close()

    def close(self) -> None:
        """Finish the stream and close the file."""
        try:
            if self._gzip is not None:
                self._flush_buffer()
                self._gzip.close()
            elif self._stream is not None:
                self._stream.close()
        finally:
            self.raw.close()


def write_file(sinks: Sequence[Sink], blocks: Iterable[bytes], size: int) -> None:
    """Write one file's data to every sink; `blocks` yields it in GZIP_BLOCK pieces (the
    last one shorter) and `size` is their total.

    A gzip stream takes a large file as a chain of its own (see the module's docstring);
    the chain's blocks are compressed once for all the streams at the same level.
    """
    chained: list[tuple[CompressedWriter, GzipStream]] = []
    plain: list[Sink] = []
    for sink in sinks:
        gzip = sink.begin_file(size) if isinstance(sink, CompressedWriter) else None
        if isinstance(sink, CompressedWriter) and gzip is not None:
            chained.append((sink, gzip))
        else:
            plain.append(sink)
    dictionary = b""
    for block in blocks:
        futures: dict[int, _Compressed] = {}
        for writer, gzip in chained:
            future = futures.get(writer.level)
            if future is None:
                future = futures[writer.level] = gzip.submit(block, dictionary)
            gzip.add_compressed(future, len(block), block)
            writer.written += len(block)
        for sink in plain:
            sink.write(block)
        dictionary = block[-DEFLATE_WINDOW:]


_compressors = threading.local()


def _deflate_block(level: int, block: bytes, dictionary: bytes) -> tuple[bytes, int]:
    """One block as raw deflate ending on a byte boundary (a sync flush), and its crc32.

    ISA-L's reusable block compressor (one per worker thread) does both without holding
    the GIL; it is what isal's own threaded gzip writer uses.
    """
    # Imported by GzipStream in the main thread already: an import here could wait on
    # an import lock that Ctrl-C broke in another thread.
    isal_zlib = sys.modules["isal.isal_zlib"]
    compressor = getattr(_compressors, "by_level", {}).get(level)
    if compressor is None:
        # Room for a block that does not compress at all, and the flush after it; level 0
        # can make random data a third larger.
        room = 2 * GZIP_BLOCK if level == 0 else GZIP_BLOCK * 11 // 10
        compressor = isal_zlib._ParallelCompress(buffersize=room + 500, level=level)
        _compressors.by_level = {**getattr(_compressors, "by_level", {}), level: compressor}
    data, crc = compressor.compress_and_crc(block, dictionary)
    return bytes(data), int(crc)


class GzipStream:
    """A single-member gzip file written from whole blocks, compressed on worker threads.

    Blocks are compressed in parallel; a writer thread takes them in order and writes
    them out (hashing is done there too), so the caller only produces. A bounded queue
    keeps memory to a few blocks whatever the input's size.
    """

    def __init__(self, raw: BinaryIO, level: int, *, threads: int = THREADS) -> None:
        # Imported here, in the caller's thread and before any worker starts: a worker
        # that imported it itself could wait forever on an import lock that a Ctrl-C
        # broke. (Not at the top: a build that finds its artifacts up to date never
        # compresses, and isal takes a while to load.)
        from isal import isal_zlib

        self._zlib = isal_zlib
        self._raw = raw
        self._level = level
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, "uvmkit-gzip")
        # Blocks in order, markers the caller waits on, and None to end.
        self._queue: Handoff[tuple[_Compressed, int] | _Splice | _Marker | None] = Handoff(
            2 * threads
        )
        self._error: BaseException | None = None
        self._dictionary = b""
        # The whole stream so far, and the segment since the last cut. The writer thread
        # updates them; the caller reads them only once the queue is drained.
        self._crc = 0
        self._size = 0
        self._offset = 0
        self._segment_start = 0
        self._segment_crc = 0
        self._segment_size = 0
        self._segment_hash = hashlib.sha256()
        self._emit(GZIP_HEADER)
        self._start_segment()
        self._writer = threading.Thread(
            target=self._write_loop, name="uvmkit-gzip-writer", daemon=True
        )
        self._writer.start()

    def add_block(self, block: bytes) -> None:
        """Queue one block, compressed with the end of the block before as its dictionary."""
        self.add_compressed(self.submit(block, self._dictionary), len(block), block)

    def submit(self, block: bytes, dictionary: bytes) -> _Compressed:
        """Start compressing a block on this stream's threads; nothing is written yet."""
        self._check()
        return self._pool.submit(_deflate_block, self._level, block, dictionary)

    def add_compressed(self, future: _Compressed, size: int, block: bytes) -> None:
        """Queue a block being compressed (perhaps by another stream at this level): it is
        written after the blocks queued before it, and the next block's dictionary is its
        end. `size` is its length before compression."""
        self._check()
        self._queue.put((future, size))
        self._dictionary = block[-DEFLATE_WINDOW:]

    def restart(self) -> None:
        """Drop the dictionary: the next block depends on nothing before it."""
        self._dictionary = b""

    def cut(self) -> Segment:
        """Write out everything queued, drop the dictionary, and return the segment."""
        self._drain()
        segment = Segment(
            offset=self._segment_start,
            length=self._offset - self._segment_start,
            size=self._segment_size,
            crc=self._segment_crc,
            sha256=self._segment_hash.hexdigest(),
        )
        self._dictionary = b""
        self._start_segment()
        return segment

    def splice(self, source: BinaryIO, segment: Segment) -> Segment:
        """Queue a segment's compressed bytes, read from `source` (at a cut), to be copied
        into this stream; returns the segment at its place here.

        The writer thread copies them, so splices into different streams run at once, and
        closes `source` when done: the stream owns it from this call on.
        """
        try:
            self._drain()
            assert not self._dictionary, "a segment is spliced only at a cut"
            placed = dataclasses.replace(segment, offset=self._offset)
            self._queue.put(_Splice(source, segment))
        except BaseException:
            source.close()
            raise
        return placed

    def close(self) -> None:
        """Finish the deflate stream and write the gzip trailer."""
        self._drain()
        self._stop()
        self._emit(DEFLATE_END)
        self._raw.write(struct.pack("<II", self._crc, self._size & 0xFFFFFFFF))

    def abort(self) -> None:
        """Drop queued work and stop the threads; the file is left incomplete."""
        # The writer cancels what is still queued instead of writing it.
        self._error = self._error or RuntimeError("aborted")
        self._stop()

    def _stop(self) -> None:
        self._queue.put_now(None)
        self._writer.join()
        self._pool.shutdown(cancel_futures=True)

    def _drain(self) -> None:
        """Wait until the writer has written everything queued so far."""
        done: _Marker = queue.SimpleQueue()
        self._queue.put(done)
        done.get()
        self._check()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _write_loop(self) -> None:
        isal_zlib = self._zlib
        while (item := self._queue.get()) is not None:
            if isinstance(item, queue.SimpleQueue):
                item.put(None)
                continue
            if isinstance(item, _Splice):
                with item.source:
                    if self._error is None:
                        try:
                            self._copy_segment(item.source, item.segment)
                        except BaseException as exc:
                            self._error = exc
                continue
            future, size = item
            if self._error is not None:
                future.cancel()  # after a failure, only keep the queue moving
                continue
            try:
                data, crc = future.result()
                self._emit(data)
            except BaseException as exc:
                self._error = exc
                continue
            self._segment_hash.update(data)
            self._crc = isal_zlib.crc32_combine(self._crc, crc, size)
            self._segment_crc = isal_zlib.crc32_combine(self._segment_crc, crc, size)
            self._size += size
            self._segment_size += size

    def _copy_segment(self, source: BinaryIO, segment: Segment) -> None:
        source.seek(segment.offset)
        left = segment.length
        while left:
            chunk = source.read(min(left, SPLICE_CHUNK))
            if not chunk:
                name = getattr(source, "name", None)
                raise OSError(errno.EIO, "a cached segment ended early", name)
            self._emit(chunk)
            left -= len(chunk)
        self._crc = self._zlib.crc32_combine(self._crc, segment.crc, segment.size)
        self._size += segment.size
        self._start_segment()

    def _emit(self, data: bytes) -> None:
        self._raw.write(data)
        self._offset += len(data)

    def _start_segment(self) -> None:
        self._segment_start = self._offset
        self._segment_crc = 0
        self._segment_size = 0
        self._segment_hash = hashlib.sha256()
