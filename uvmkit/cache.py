"""A content-addressed build cache under $XDG_CACHE_HOME/uvmkit.

Each entry is a directory named by a key that hashes everything that decides its
contents, holding its files and an `entry.json` with their sha256 sums. An entry is
written under a temporary name and renamed into place whole; before use its files are
hashed again, and an entry that does not match (a disk error, a hand edit, a killed
writer's leftovers) is removed and rebuilt, never used.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import BadInputError
from .log import log

ENTRY_FILE = "entry.json"
HASH_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(*parts: object) -> str:
    """A stable key for anything JSON can represent."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class Cache:
    """One cache root; `enabled=False` (--no-cache) makes every lookup miss and stores nothing."""

    def __init__(self, root: Path, *, enabled: bool = True) -> None:
        self.root = root
        self.enabled = enabled
        # False for a cache that can be read but not written: its entries serve, and
        # nothing new is kept.
        self.writable = enabled
        # sha256 sums taken while files were written, to spare reading them again.
        self._known: dict[Path, str] = {}

    def check(self) -> None:
        """Make sure the cache can be written before a build counts on it.

        The cache only saves time, so one that cannot be written (read-only, not ours, a
        file in its place) is a warning: a directory is still read, anything else ignored.
        """
        if not self.enabled:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError as exc:
            self.writable = False
            self.enabled = self.root.is_dir() and os.access(self.root, os.R_OK | os.X_OK)
            log.warning(
                "cannot write the cache at %s (%s); building without %s",
                self.root,
                exc.strerror,
                "keeping anything in it" if self.enabled else "it",
            )

    @contextlib.contextmanager
    def best_effort(self, what: str) -> Iterator[None]:
        """A block that keeps `what` in the cache, which only saves time: a failure to write
        (a full disk, say) costs a warning, and the build goes on."""
        try:
            yield
        except OSError as exc:
            log.warning(
                "could not keep %s in the cache at %s (%s); the artifacts are not affected",
                what,
                self.root,
                exc.strerror or exc,
            )

    def note_hash(self, path: Path, digest: str) -> None:
        """Record the sha256 of a file just written into an entry, as its writer saw it."""
        self._known[path] = digest

    def lookup(self, kind: str, key: str, what: str) -> Path | None:
        """The verified entry directory for (kind, key), or None; says why at DEBUG."""
        if not self.enabled:
            log.debug("%s: rebuilt (--no-cache)", what)
            return None
        entry = self.root / kind / key
        try:
            recorded = json.loads((entry / ENTRY_FILE).read_text())
            files: dict[str, str] = recorded["files"]
        except FileNotFoundError:
            log.debug("%s: rebuilt (not in the cache)", what)
            return None
        except (OSError, ValueError, KeyError, TypeError):
            self._discard(entry, what, "its record is unreadable")
            return None
        for name, digest in files.items():
            path = entry / name
            try:
                actual = sha256_file(path)
            except OSError:
                actual = "missing"
            if actual != digest:
                self._discard(entry, what, f"{name} is missing or does not match its hash")
                return None
        log.debug("%s: reused from the cache (%s)", what, entry)
        return entry

    def _discard(self, entry: Path, what: str, why: str) -> None:
        log.warning("cache entry for %s is damaged (%s); rebuilding it", what, why)
        shutil.rmtree(entry, ignore_errors=True)

    @contextlib.contextmanager
    def store(self, kind: str, key: str) -> Iterator[Path | None]:
        """A directory to write a new entry's files into, kept only if the block succeeds.

        Yields None when the cache is disabled or cannot be written; the caller then writes
        elsewhere.
        """
        if not self.enabled or not self.writable:
            yield None
            return
        parent = self.root / kind
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.", dir=parent))
        try:
            yield tmp
            files = {
                p.name: self._known.pop(p, "") or sha256_file(p)
                for p in sorted(tmp.iterdir())
                if p.name != ENTRY_FILE
            }
            (tmp / ENTRY_FILE).write_text(json.dumps({"files": files}, indent=1) + "\n")
            final = parent / key
            shutil.rmtree(final, ignore_errors=True)
            try:
                os.replace(tmp, final)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                # Another build stored the same entry meanwhile: the same key means the
                # same content, so theirs serves as well as ours.
                log.debug("cache entry %s/%s was stored by another build", kind, key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def get_or_make(
        self,
        kind: str,
        key: str,
        what: str,
        make: Callable[[Path], None],
        *,
        scratch: Path,
        repeatable: bool = True,
    ) -> Path:
        """The entry's directory: reused when it verifies, else filled by `make(directory)`.

        With the cache disabled, `make` fills `scratch` instead, which is returned. So it
        does when the cache's disk fills up while `make` runs, if `make` may run twice
        (`repeatable`); otherwise that is an error.
        """
        entry = self.lookup(kind, key, what)
        if entry is not None:
            return entry
        try:
            with self.store(kind, key) as tmp:
                if tmp is not None:
                    make(tmp)
                    return self.root / kind / key
        except OSError as exc:
            if not repeatable or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            log.warning("the cache at %s is full; keeping %s with this build only", self.root, what)
            self.writable = False
        scratch.mkdir(parents=True, exist_ok=True)
        make(scratch)
        return scratch

    def clear(self) -> int:
        """Remove everything; returns the bytes freed."""
        freed = 0
        if self.root.is_dir():
            for path in self.root.rglob("*"):
                with contextlib.suppress(OSError):
                    if path.is_file() and not path.is_symlink():
                        freed += path.stat().st_size
            try:
                shutil.rmtree(self.root)
            except OSError as exc:
                raise BadInputError(
                    f"cannot empty the cache at {self.root}: {exc.strerror}",
                    hint="check that its file system is writable and the files are yours, or "
                    "remove it by hand",
                ) from None
        return freed
