"""A build's settings: image recipes under images/, and the frozen BuildConfig passed down."""

from __future__ import annotations

import enum
import os
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInputError
from .log import log
from .platforms import parse_platform

ROOT = Path(__file__).resolve().parent.parent
IMAGES_DIR = ROOT / "images"
GUEST_DIR = ROOT / "guest"
TEMPLATES_DIR = ROOT / "templates"
# Where builds write, and boot and clean look, unless told otherwise: out/ of this checkout,
# from whichever of its directories invoke runs.
DEFAULT_OUT = ROOT / "out"
DEFAULT_IMAGE = "default"
# What the guest programs are compiled for (uvmkit builds on and for x86-64 hosts), and so
# the one platform an image can be.
GUEST_PLATFORM = "linux/amd64"


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
    # The kernel `invoke boot` uses for this image, resolved like `overlay`.
    kernel: Path | None = None
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
    # Where a relative file base is found: the recipe's directory for the recipe's own base,
    # None (where invoke runs) for --base.
    base_dir: Path | None
    source_date_epoch: int
    # initrd.img's compression; rootfs.tar.gz and delta.tar.gz are always gzip.
    compression: Compression = Compression.GZIP
    # None: the default of each compressor. Otherwise the level of initrd.img, and of the
    # gzip artifacts too when initrd.img is gzip.
    level: int | None = None
    platform: str = "linux/amd64"
    use_cache: bool = True
    cache_dir: Path = field(default_factory=lambda: default_cache_dir())

    def __post_init__(self) -> None:
        if self.compression is Compression.NONE and self.level:
            raise BadInputError(
                f"--level {self.level} does not apply to --compression none",
                hint="leave --level out; rootfs.tar.gz and delta.tar.gz then take gzip's "
                "default (3)",
            )
        if self.level is not None:
            low, high = LEVEL_RANGE[self.compression]
            if not low <= self.level <= high:
                raise BadInputError(
                    f"--level {self.level} is out of range for {self.compression}",
                    hint=f"{self.compression} takes levels {low} to {high}",
                )

    @property
    def initrd_level(self) -> int:
        """The level initrd.img is compressed at."""
        return DEFAULT_LEVEL[self.compression] if self.level is None else self.level

    @property
    def gzip_level(self) -> int:
        """The level of rootfs.tar.gz and delta.tar.gz."""
        if self.compression is Compression.GZIP:
            return self.initrd_level
        return DEFAULT_LEVEL[Compression.GZIP]

    def options(self) -> dict[str, object]:
        """The options that change the output, as recorded in the manifest and cache keys."""
        return {
            "image": self.recipe.name,
            "initrd_compression": str(self.compression),
            "initrd_level": self.initrd_level,
            "gzip_level": self.gzip_level,
            "platform": self.platform,
            "init": str(self.recipe.init),
        }


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/uvmkit, or ~/.cache/uvmkit (also when XDG_CACHE_HOME is relative)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative value is to be ignored; taken as is, it would put the
    # cache (and `clean --cache`) wherever the command happens to run.
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "uvmkit"


def available_images() -> list[str]:
    """The recipe names under images/."""
    return sorted(p.stem for p in IMAGES_DIR.glob("*.toml"))


def load_recipe(name: str) -> Recipe:
    """Read images/NAME.toml, or the recipe file NAME names when it ends in .toml.

    Unknown keys and bad values are errors naming the file.
    """
    if name.endswith(".toml"):
        path = user_path(name, "recipe file")
        if not path.is_file():
            hint = "check --image"
            if (IMAGES_DIR / path.name).is_file():
                hint = f"for the recipe under images/, pass --image {path.stem}"
            raise BadInputError(f"recipe file {path} does not exist", hint=hint)
        name = path.stem
    else:
        path = IMAGES_DIR / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(available_images()) or "none"
        raise BadInputError(f"no image recipe {name!r} under {IMAGES_DIR}", hint=f"known: {known}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(
            f"{path}: not valid TOML: {exc}", hint="fix the recipe; images/default.toml is one"
        ) from None

    allowed = {"base", "kernel", "overlay", "init", "platform", "description"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise BadInputError(
            f"{path}: unknown key {unknown[0]!r}", hint=f"allowed: {', '.join(sorted(allowed))}"
        )
    example = "images/default.toml is an example"
    if not isinstance(data.get("base"), str) or not data["base"]:
        raise BadInputError(
            f"{path}: 'base' must name a Docker image or a file",
            hint='for example base = "busybox:1.36"',
        )
    for key in ("kernel", "overlay", "init", "platform", "description"):
        if key in data and not isinstance(data[key], str):
            raise BadInputError(f"{path}: {key!r} must be a string", hint=example)
    try:
        init = InitChoice(data.get("init", "uvmkit"))
    except ValueError:
        raise BadInputError(
            f"{path}: 'init' must be 'uvmkit' or 'base'",
            hint="'base' boots the base's own /init; leave it out for uvmkit's",
        ) from None
    overlay = path.parent / data["overlay"] if data.get("overlay") else None
    if overlay is not None and not overlay.is_dir():
        what = "is not a directory" if overlay.exists() else "does not exist"
        raise BadInputError(
            f"{path}: overlay {overlay} {what}",
            hint="'overlay' names a directory, relative to the recipe file",
        )
    return Recipe(
        name=name,
        path=path,
        base=data["base"],
        kernel=path.parent / data["kernel"] if data.get("kernel") else None,
        overlay=overlay,
        init=init,
        platform=data.get("platform", "linux/amd64"),
        description=data.get("description", ""),
    )


# The last second of the year 9999: dates past it cannot be written as dates.
MAX_SOURCE_DATE_EPOCH = 253402300799


def default_source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH from the environment, else the last commit's time, else 0."""
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env:
        hint = "seconds since 1970, as `git log -1 --format=%ct` prints; or unset it"
        try:
            value = int(env)
        except ValueError:
            raise BadInputError(f"SOURCE_DATE_EPOCH={env!r} is not an integer", hint=hint) from None
        if not 0 <= value <= MAX_SOURCE_DATE_EPOCH:
            raise BadInputError(f"SOURCE_DATE_EPOCH={env} is outside 1970 to 9999", hint=hint)
        return value
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


def make_build_config(
    *,
    image: str = DEFAULT_IMAGE,
    base: str = "",
    out: str = "",
    compression: str = "gzip",
    level: int | None = None,
    platform: str = "",
    no_cache: bool = False,
) -> BuildConfig:
    """A BuildConfig from command-line options; bad values are errors naming the option."""
    recipe = load_recipe(image)
    try:
        chosen = Compression(compression)
    except ValueError:
        raise BadInputError(
            f"--compression {compression!r} is not known",
            hint=f"use one of: {', '.join(c.value for c in Compression)}",
        ) from None
    chosen_platform = parse_platform(platform or recipe.platform)  # malformed: refused here
    if chosen_platform != parse_platform(GUEST_PLATFORM):
        # The agent and /init are compiled by this machine's compiler, for this machine.
        where = "--platform" if platform else f"'platform' in {recipe.path}"
        raise BadInputError(
            f"{where} {chosen_platform.shown}: uvmkit's guest programs are built for "
            f"{GUEST_PLATFORM} only",
            hint=f"build a {GUEST_PLATFORM} image (from a multi-platform input, "
            f"--platform {GUEST_PLATFORM} picks it)",
        )
    if recipe.kernel is not None and not recipe.kernel.is_file():
        # Only `invoke boot` reads it; the build goes on, but says so now.
        log.warning(
            "kernel %s named by %s does not exist: invoke boot will need --kernel",
            recipe.kernel,
            recipe.path,
        )
    return BuildConfig(
        recipe=recipe,
        base=base or recipe.base,
        out_dir=out_dir(out),
        base_dir=None if base else recipe.path.parent,
        source_date_epoch=default_source_date_epoch(),
        compression=chosen,
        level=level,
        platform=GUEST_PLATFORM,
        use_cache=not no_cache,
    )


def not_empty(option: str, value: str | None) -> str:
    """An option's text, "" when it was left out; given but empty, it is refused.

    Tasks default such options to None, so `--base ""` (a variable that expanded to
    nothing, say) is not taken for "the default".
    """
    if value is None:
        return ""
    if not value:
        raise BadInputError(f"{option} is empty", hint="give it a value, or leave it out")
    return value


def out_dir(text: str) -> Path:
    """--out's directory: DEFAULT_OUT when the option is left out (or empty)."""
    return user_path(text, "--out") if text else DEFAULT_OUT


def parse_level(text: str) -> int | None:
    """--level's value: empty for the compressor's default, else a whole number."""
    if not text:
        return None
    return whole_number(
        "--level", text, hint="gzip takes 0-3, zstd 1-19; leave it out for the default (3)"
    )


def whole_number(option: str, text: str, *, hint: str = "") -> int:
    """A numeric command-line option's value; anything but a whole number is refused.

    Tasks take numbers as text and read them here: Invoke's own conversion would answer
    `--count abc` with a traceback.
    """
    try:
        return int(text)
    except ValueError:
        raise BadInputError(
            f"{option} {text!r} is not a whole number",
            hint=hint or f"{option} takes a whole number, such as 2",
        ) from None


def user_path(text: str, what: str) -> Path:
    """A path typed by the user with ~ expanded; ~NAME of no such user is refused."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        # Path.expanduser's answer to a ~NAME it cannot resolve (or no home at all).
        name = text.split("/", 1)[0]
        raise BadInputError(
            f"{what} {text}: {name} is no user's home directory",
            hint="spell the path out, or write ./~... for a directory named so",
        ) from None
