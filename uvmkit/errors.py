"""The one exception type users see, and how it is shown to them."""

from __future__ import annotations

import errno


class UvmkitError(Exception):
    """A failure the user can act on: a message naming the input, and a hint.

    The message is one line that names the offending thing (a file, an image, a tar
    entry); the hint says what to do about it. Everything raised for bad input or a
    missing tool is one of these, so the command line can print it without a traceback.
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} (hint: {self.hint})"
        return self.message


class BadInputError(UvmkitError):
    """The base root filesystem or a recipe cannot be turned into an image."""


class FormatLimitError(UvmkitError):
    """The tree holds something an output format cannot represent."""


class ToolError(UvmkitError):
    """A program we run is missing or failed."""


class EngineError(UvmkitError):
    """The Docker engine is unreachable or refused a request."""


class BootError(UvmkitError):
    """The guest did not boot, or its agent did not answer."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, with what it left behind said for the user."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def from_os_error(exc: OSError, *, where: str = "") -> UvmkitError | None:
    """A failure of the machine rather than of uvmkit (a full disk, a read-only or
    forbidden path, something in the way) as one line; None for any other OSError.

    `where` names the places written to, for an error that does not name its file (a
    write() on a full disk).
    """
    place = exc.filename or where
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        # A copy's error names its source first and the file written to second.
        place = exc.filename2 or place
        return ToolError(
            f"no space left on the device while writing {place}",
            hint="free some space, or point --out or XDG_CACHE_HOME at another disk (or build "
            "with --no-cache); earlier artifacts are untouched",
        )
    if not exc.filename:
        return None
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return BadInputError(
            f"cannot write {place}: {exc.strerror}",
            hint="check the permissions of that path and that its file system is writable, or "
            "use another path (--out, XDG_CACHE_HOME)",
        )
    # A path in the way: a file where a directory should be, and the like.
    return BadInputError(
        f"cannot use {place}: {exc.strerror}",
        hint="move what is at that path out of the way (UVMKIT_DEBUG=1 shows where)",
    )


def show_name(name: bytes | str) -> str:
    """Render an archive name for a message; bytes that are not UTF-8 become escapes."""
    if isinstance(name, str):
        return name
    return name.decode("utf-8", "backslashreplace")
