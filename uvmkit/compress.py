"""Compressed output streams: gzip through ISA-L on worker threads, zstd, or none.

Every stream is deterministic: the same bytes in give the same bytes out, however they
were split into writes. gzip output is a plain single-member gzip file with no name and a
zero time in its header (gunzip and the kernel read it); it is cut into fixed blocks that
worker threads compress while the caller goes on producing.
"""

from __future__ import annotations

from typing import BinaryIO

from .config import Compression

# Both cores: the writer thread and the compressors outrun a single core by far.
THREADS = 2
# Blocks are compressed independently but with the previous block as a dictionary, so
# the ratio stays within a fraction of a percent of a single deflate stream.
GZIP_BLOCK = 1 << 20


class CompressedWriter:
    """A write-only stream that compresses into a file; `written` counts bytes before
    compression. Closing it finishes the compressed stream and closes the file."""

    def __init__(self, raw: BinaryIO, compression: Compression, level: int) -> None:
        self.raw = raw
        self.written = 0
        self._buffer = bytearray()
        self._stream: BinaryIO | None
        # Imported here: a build that finds its artifacts up to date never compresses.
        if compression is Compression.GZIP:
            from isal import igzip_threaded

            self._block = GZIP_BLOCK
            self._stream = igzip_threaded.open(  # type: ignore[no-untyped-call]
                raw, "wb", compresslevel=level, threads=THREADS, block_size=GZIP_BLOCK
            )
        elif compression is Compression.ZSTD:
            import zstandard

            self._block = 0
            # Multi-threaded zstd output is deterministic for a level and thread count;
            # the checksum lets `zstd -t` verify the file.
            params = zstandard.ZstdCompressionParameters.from_level(
                level, threads=THREADS, write_checksum=True
            )
            compressor = zstandard.ZstdCompressor(compression_params=params)
            self._stream = compressor.stream_writer(raw, closefd=False)
        else:
            self._block = 0
            self._stream = None

    def write(self, data: bytes | memoryview, /) -> int:
        self.written += len(data)
        if self._stream is None:
            return self.raw.write(data)
        if not self._block:
            return self._stream.write(data)
        # Regroup into fixed blocks, so the block boundaries (and with them the
        # compressed bytes) depend only on the data, never on how it was written.
        self._buffer += data
        if len(self._buffer) >= self._block:
            full = len(self._buffer) - len(self._buffer) % self._block
            with memoryview(self._buffer) as view:
                for start in range(0, full, self._block):
                    self._stream.write(view[start : start + self._block])
            del self._buffer[:full]
        return len(data)

    def abort(self) -> None:
        """Stop after a failure: end the worker threads and close the file, quietly."""
        self._buffer.clear()
        try:
            if self._stream is not None:
                self._stream.close()
        except Exception:
            pass  # the failure that brought us here is the one the user must see
        finally:
            self.raw.close()

    def close(self) -> None:
        """Finish the stream and close the file."""
        try:
            if self._stream is not None:
                if self._buffer:
                    self._stream.write(bytes(self._buffer))
                    self._buffer.clear()
                self._stream.close()
        finally:
            self.raw.close()
