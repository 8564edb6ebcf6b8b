"""Putting a build's files into out/ all together or not at all.

Each file is renamed over the one it replaces, so whoever reads out/ meanwhile finds the
old file or the new one, never half of either. Before that, the old file gets a second
name (a hard link) in the build's work directory, so that when a later rename fails (a
directory or an immutable file in the way) the renames already made can be taken back
and out/ is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from .errors import BadInputError
from .log import log

# The old files' second names in the work directory.
UNDO_PREFIX = ".undo."


class Swap:
    """The renames of one publication, and how to take them back."""

    def __init__(self, out: Path, work: Path) -> None:
        self.out = out
        self.work = work
        # Each name changed in out/, in order, with the old file's second name (None: there
        # was no old file).
        self._done: list[tuple[str, Path | None]] = []

    def put(self, name: str) -> None:
        """Rename work/NAME over out/NAME."""
        try:
            old = self._keep_old(name)
            self._done.append((name, old))
            os.replace(self.work / name, self.out / name)
        except OSError as exc:
            raise self._refusal(name, exc) from None

    def remove(self, name: str) -> None:
        """Take out/NAME away, if it is there."""
        try:
            old = self._keep_old(name)
            if old is None:
                return
            self._done.append((name, old))
            with contextlib.suppress(FileNotFoundError):
                (self.out / name).unlink()
        except OSError as exc:
            raise self._refusal(name, exc) from None

    def undo(self) -> None:
        """Put back every file this swap changed, last change first."""
        for name, old in reversed(self._done):
            target = self.out / name
            try:
                if old is None:
                    target.unlink(missing_ok=True)
                else:
                    os.replace(old, target)
            except OSError as exc:
                log.warning("could not put the earlier %s back: %s", target, exc.strerror)
        self._done.clear()

    def _keep_old(self, name: str) -> Path | None:
        target = self.out / name
        try:
            mode = target.lstat().st_mode
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(mode):
            # Renamed aside, a directory would go away with the work directory.
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(target))
        old = self.work / f"{UNDO_PREFIX}{name}"
        try:
            os.link(target, old, follow_symlinks=False)
        except OSError:
            # A file system without hard links: the old file steps aside for a moment.
            os.rename(target, old)
        return old

    def _refusal(self, name: str, exc: OSError) -> BadInputError:
        target = self.out / name
        return BadInputError(
            f"cannot replace {target}: {exc.strerror}",
            hint=f"move (or unlock) what is at that path; nothing in {self.out} was changed",
        )


@contextlib.contextmanager
def all_or_nothing(out: Path, work: Path) -> Iterator[Swap]:
    """A Swap whose renames are all taken back when the block fails."""
    swap = Swap(out, work)
    try:
        yield swap
    except BaseException:
        swap.undo()
        raise
