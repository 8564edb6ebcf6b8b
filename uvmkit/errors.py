"""The one exception type users see, and how it is shown to them."""

from __future__ import annotations


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


def show_name(name: bytes | str) -> str:
    """Render an archive name for a message; bytes that are not UTF-8 become escapes."""
    if isinstance(name, str):
        return name
    return name.decode("utf-8", "backslashreplace")
