"""Platforms (OS/ARCH[/VARIANT]) as images name them, normalised so that equal ones match."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import BadInputError

DEFAULT_PLATFORM = "linux/amd64"

_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "i386": "386"}
# The variant an architecture has when none is given (as containerd normalises them).
_DEFAULT_VARIANTS = {"arm64": "v8", "arm": "v7"}


@dataclass(frozen=True)
class Platform:
    """os/architecture/variant, normalised so that equal platforms compare equal."""

    os: str
    arch: str
    variant: str = ""
    # As the input spelled it, for messages.
    shown: str = field(default="", compare=False)

    def __str__(self) -> str:
        return self.shown


def make_platform(os_name: str, arch: str, variant: str = "") -> Platform:
    """A platform from its parts; aliases (x86_64, aarch64) and default variants folded."""
    shown = "/".join(p for p in (os_name, arch, variant) if p)
    arch = _ARCH_ALIASES.get(arch.lower(), arch.lower())
    variant = variant.lower()
    if variant == _DEFAULT_VARIANTS.get(arch):
        variant = ""
    return Platform(os_name.lower(), arch, variant, shown)


def parse_platform(text: str) -> Platform:
    """--platform's value (empty for the default); an error naming it when malformed."""
    parts = (text or DEFAULT_PLATFORM).split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise BadInputError(
            f"platform {text!r} is not OS/ARCH or OS/ARCH/VARIANT",
            hint="for example linux/amd64 or linux/arm64",
        )
    return make_platform(*parts)
