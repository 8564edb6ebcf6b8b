"""A build's settings: image recipes under images/, and the frozen BuildConfig passed down."""

from __future__ import annotations

import enum
import os
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInputError

ROOT = Path(__file__).resolve().parent.parent
IMAGES_DIR = ROOT / "images"
GUEST_DIR = ROOT / "guest"
TEMPLATES_DIR = ROOT / "templates"
DEFAULT_IMAGE = "default"


class Compression(enum.StrEnum):
    GZIP = "gzip"
    ZSTD = "zstd"
    NONE = "none"


class InitChoice(enum.StrEnum):
    """Whose /init the image boots: ours, or the one the base ships (checked to be runnable)."""

    UVMKIT = "uvmkit"
    BASE = "base"


# Default levels: isal's level 3 is the densest it has; zstd 3 is zstd's own default.
DEFAULT_LEVEL = {Compression.GZIP: 3, Compression.ZSTD: 3, Compression.NONE: 0}
LEVEL_RANGE = {Compression.GZIP: (0, 3), Compression.ZSTD: (1, 19), Compression.NONE: (0, 0)}


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """An image recipe: images/NAME.toml."""

    name: str
    path: Path
    base: str
    kernel: str | None = None
    overlay: Path | None = None
    init: InitChoice = InitChoice.UVMKIT
    platform: str = "linux/amd64"
    description: str = ""


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """Everything that decides what a build writes. Part of every cache key."""

    recipe: Recipe
    base: str
    out_dir: Path
    source_date_epoch: int
    initrd_compression: Compression = Compression.GZIP
    rootfs_compression: Compression = Compression.GZIP
    level: int | None = None
    platform: str = "linux/amd64"
    use_cache: bool = True
    cache_dir: Path = field(default_factory=lambda: default_cache_dir())

    def level_for(self, compression: Compression) -> int:
        """The compression level for an artifact compressed with `compression`."""
        if self.level is None:
            return DEFAULT_LEVEL[compression]
        low, high = LEVEL_RANGE[compression]
        return max(low, min(high, self.level))

    def options(self) -> dict[str, object]:
        """The options that change the output, as recorded in the manifest and cache keys."""
        return {
            "image": self.recipe.name,
            "initrd_compression": str(self.initrd_compression),
            "initrd_level": self.level_for(self.initrd_compression),
            "rootfs_compression": str(self.rootfs_compression),
            "rootfs_level": self.level_for(self.rootfs_compression),
            "platform": self.platform,
            "init": str(self.recipe.init),
        }


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/uvmkit, or ~/.cache/uvmkit."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "uvmkit"


def available_images() -> list[str]:
    """The recipe names under images/."""
    return sorted(p.stem for p in IMAGES_DIR.glob("*.toml"))


def load_recipe(name: str) -> Recipe:
    """Read images/NAME.toml; unknown keys and bad values are errors naming the file."""
    path = IMAGES_DIR / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(available_images()) or "none"
        raise BadInputError(f"no image recipe {name!r} under {IMAGES_DIR}", hint=f"known: {known}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path}: not valid TOML: {exc}") from None

    allowed = {"base", "kernel", "overlay", "init", "platform", "description"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise BadInputError(
            f"{path}: unknown key {unknown[0]!r}", hint=f"allowed: {', '.join(sorted(allowed))}"
        )
    if not isinstance(data.get("base"), str) or not data["base"]:
        raise BadInputError(f"{path}: 'base' must name a Docker image or a file")
    try:
        init = InitChoice(data.get("init", "uvmkit"))
    except ValueError:
        raise BadInputError(f"{path}: 'init' must be 'uvmkit' or 'base'") from None
    overlay = path.parent / data["overlay"] if data.get("overlay") else None
    if overlay is not None and not overlay.is_dir():
        raise BadInputError(f"{path}: overlay directory {overlay} does not exist")
    return Recipe(
        name=name,
        path=path,
        base=data["base"],
        kernel=data.get("kernel") or None,
        overlay=overlay,
        init=init,
        platform=data.get("platform", "linux/amd64"),
        description=data.get("description", ""),
    )


def default_source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH from the environment, else the last commit's time, else 0."""
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env:
        try:
            return int(env)
        except ValueError:
            raise BadInputError(f"SOURCE_DATE_EPOCH={env!r} is not an integer") from None
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "log", "-1", "--format=%ct"],
            capture_output=True,
            text=True,
            check=True,
            stdin=subprocess.DEVNULL,
        ).stdout.strip()
        return int(out)
    except (OSError, subprocess.CalledProcessError, ValueError):
        return 0
