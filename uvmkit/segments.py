"""Reusing the compressed base between builds that differ only in the guest layer.

Compressing the base is most of a build. When only the guest layer changed (a new agent,
say), the base's entries come out the same, in the same order, with the same inode
numbers, so their compressed bytes can be copied from the previous build instead of made
again.

The sorted entries are cut into *runs*: stretches of base entries between the guest
layer's entries. Each gzip artifact is cut into segments at the same places (see
`compress.py`), so a run always compresses to the same bytes, whatever came before it.
A run's key hashes everything its bytes depend on: every field that goes into its
headers, and where each file's data comes from (the layer file, by identity, and the
offset). After a build is cached, each segment is recorded under its key as a range of
that cached artifact; a later build splices the range in after checking its sha256. The
guest layer's own runs are small and always compressed afresh.

A build that reuses segments writes exactly the bytes a cold build would.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from .cache import HASH_CHUNK, Cache
from .compress import CompressedWriter, Segment
from .log import log
from .tree import Blob
from .writers import NewcWriter, Planned, TarWriter, write_entries

SEGMENT_FILE = "segment.json"


@dataclass(frozen=True)
class Run:
    """Consecutive planned entries; `key` is None for the guest layer's, which are not
    worth keeping."""

    entries: Sequence[Planned]
    key: str | None


def layer_identity(path: Path) -> str:
    """Which file a layer is, as far as segment keys care: the same name, inode, size and
    change time mean the same bytes (cached layers are never rewritten in place)."""
    st = os.stat(path)
    return f"{path}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def split_runs(
    planned: Sequence[Planned],
    guest: frozenset[bytes],
    *,
    layers: Mapping[int, str],
    salt: str,
) -> list[Run]:
    """Cut `planned` where it passes from base entries to guest-layer entries and back.

    `layers` maps each file descriptor that file data is read through to its layer's
    identity; `salt` stands for everything else that decides the bytes (uvmkit's code,
    the options).
    """
    runs: list[Run] = []
    start = 0
    for i in range(1, len(planned) + 1):
        if i == len(planned) or (planned[i].path in guest) != (planned[start].path in guest):
            entries = planned[start:i]
            key = None if entries[0].path in guest else _run_key(entries, layers, salt)
            runs.append(Run(entries, key))
            start = i
    return runs


def _run_key(entries: Sequence[Planned], layers: Mapping[int, str], salt: str) -> str:
    digest = hashlib.sha256(salt.encode())
    for p in entries:
        inode = p.inode
        if isinstance(inode.data, Blob):
            source = f"{layers[inode.data.fd]}@{inode.data.offset}".encode(
                "utf-8", "surrogateescape"
            )
        elif inode.data:
            source = hashlib.sha256(inode.data).hexdigest().encode()
        else:
            source = b""
        fields = [
            p.path,
            inode.kind.value.encode(),
            b"%o %d %d %d %d %d %d %d:%d"
            % (inode.mode, inode.uid, inode.gid, p.mtime, p.ino, p.nlink, inode.size, *inode.rdev),
            p.first_link or b"",
            b"newc-data" if p.carries_newc_data else b"",
            inode.target,
            *(k + b"=" + v for k, v in sorted(inode.xattrs.items())),
            source,
        ]
        for value in fields:
            digest.update(b"%d:" % len(value) + value)
    return digest.hexdigest()


class SegmentStore:
    """Segments of earlier builds, found by key, and those of this build, to record."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self._made: list[tuple[str, str, Segment]] = []

    @staticmethod
    def key(run_key: str, artifact: str, level: int) -> str:
        return hashlib.sha256(f"{run_key}:{artifact}:{level}".encode()).hexdigest()

    def splice(self, key: str, writer: CompressedWriter, artifact: str) -> Segment | None:
        """Append the segment recorded under `key` to `writer`; None when there is none
        or it no longer checks out (then the caller compresses the run itself)."""
        entry = self.cache.lookup("segments", key, f"a compressed segment of {artifact}")
        if entry is None:
            return None
        try:
            record = json.loads((entry / SEGMENT_FILE).read_text())
            segment = Segment(**record["segment"])
            source = (self.cache.root / "builds" / record["build"] / record["artifact"]).open("rb")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # The record checked out, but what it points into may have gone since.
            log.debug(
                "a compressed segment of %s: not reused after all, its source is unusable "
                "(%s); compressing afresh",
                artifact,
                exc,
            )
            return None
        try:
            intact = _range_sha256(source, segment.offset, segment.length) == segment.sha256
        except BaseException:
            source.close()
            raise
        if not intact:
            source.close()
            log.debug(
                "a compressed segment of %s: not reused after all, its source %s changed; "
                "compressing afresh",
                artifact,
                source.name,
            )
            return None
        # Checked, so a failure from here on is the disk's, and fails the build: half a
        # segment must never stay in an artifact. The writer copies it, and closes source.
        placed = writer.splice(source, segment)
        # Recorded where it lies in this build's artifact, which replaces the record.
        self._made.append((key, artifact, placed))
        return placed

    def made(self, key: str, artifact: str, segment: Segment) -> None:
        """Note a segment this build wrote, to record once its artifact is cached."""
        self._made.append((key, artifact, segment))

    def record(self, build_key: str) -> None:
        """Record every segment of this build as a range of its cached artifacts."""
        for key, artifact, segment in self._made:
            with self.cache.store("segments", key) as tmp:
                if tmp is None:
                    return
                record = {"build": build_key, "artifact": artifact, "segment": asdict(segment)}
                (tmp / SEGMENT_FILE).write_text(json.dumps(record, indent=1) + "\n")


def _range_sha256(source: BinaryIO, offset: int, length: int) -> str:
    digest = hashlib.sha256()
    source.seek(offset)
    left = length
    while left:
        chunk = source.read(min(left, HASH_CHUNK))
        if not chunk:
            break
        digest.update(chunk)
        left -= len(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Output:
    """One archive being written: its format writer, the compressed stream under it, and
    what names its segments (the artifact and the compression level)."""

    writer: NewcWriter | TarWriter
    sink: CompressedWriter
    artifact: str
    level: int


def write_in_runs(
    runs: Sequence[Run],
    outputs: Sequence[Output],
    *,
    store: SegmentStore | None,
    progress: Callable[[int], object] | None = None,
) -> None:
    """Write the runs to every output, each run a segment of its own.

    Every output is cut before every run, whether or not a segment is reused, so a build
    with the store writes the same bytes as one without. A run is read from the base
    only for the outputs that found no segment to splice.
    """
    for run in runs:
        todo: list[Output] = []
        for out in outputs:
            out.sink.cut()
            key = SegmentStore.key(run.key, out.artifact, out.level) if run.key else ""
            reused = None
            if key and store is not None and out.sink.splices:
                reused = store.splice(key, out.sink, out.artifact)
            if reused is None:
                todo.append(out)
            else:
                # The format writer pads by its own offset, so it must count what went by.
                out.writer.offset += reused.size
        if todo:
            newc = next((o.writer for o in todo if isinstance(o.writer, NewcWriter)), None)
            tar = next((o.writer for o in todo if isinstance(o.writer, TarWriter)), None)
            write_entries(run.entries, newc=newc, tar=tar, progress=progress)
        elif progress is not None:
            progress(sum(p.inode.size for p in run.entries if p.carries_newc_data))
        for out in todo:
            segment = out.sink.cut()
            if segment is not None and run.key and store is not None:
                key = SegmentStore.key(run.key, out.artifact, out.level)
                store.made(key, out.artifact, segment)
    for out in outputs:
        out.writer.finish()
