"""The build pipeline: base and guest layer in, boot files out.

`build` reads as its steps: identify the base, decide the cache key, and, unless an
identical build is already in `out/` or in the cache, materialize the base, compile the
guest, merge the tree, check /init, write every artifact in one pass, and publish.
Artifacts are written in a private directory inside `out/` and renamed into place only
when all of them are complete, so a failed or interrupted build leaves the previous
artifacts as they were and no partial file behind.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import enum
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from . import __version__, engine_images, guest
from .archive import Entry, Kind, read_cpio, read_tar
from .base import (
    BaseId,
    BaseSource,
    ForwardReader,
    Layer,
    LayerFormat,
    identify,
    materialize,
)
from .cache import ENTRY_FILE, Cache, cache_key, sha256_file
from .compress import CompressedWriter
from .config import TEMPLATES_DIR, BuildConfig, Compression, InitChoice, default_cache_dir
from .errors import (
    BadInputError,
    FormatLimitError,
    Interrupted,
    UvmkitError,
    from_os_error,
    show_name,
)
from .inits import check_init
from .interrupts import deferred_interrupts, result_of, sigterm_as_interrupt
from .log import human_size, log, progress, step
from .run import process_alive
from .segments import Output, SegmentStore, layer_identity, split_runs, write_in_runs
from .swap import all_or_nothing
from .tree import WHITEOUT_PREFIX, Inode, Tree
from .writers import (
    NEWC_MAX,
    NewcWriter,
    Planned,
    TarWriter,
    check_newc_limits,
    plan,
    write_archives,
    xattr_losses,
)

INFO_DIR = b"info"
AGENT_PATH = b"bin/uvmkit-agent"
INIT_PATH = b"init"


class Artifact(enum.StrEnum):
    """What a build can write into out/."""

    BASE = "base.tar"
    AGENT = "agent"
    DELTA = "delta.tar.gz"
    INITRD = "initrd.img"
    ROOTFS = "rootfs.tar.gz"


ALL_ARTIFACTS = frozenset({Artifact.DELTA, Artifact.INITRD, Artifact.ROOTFS})
MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
# Private to uvmkit: what out/ held when it was last published, to spot a no-op quickly.
STAMP = ".uvmkit-stamp"
# The names builds published into out/: what `invoke clean` removes.
OWNED = ".uvmkit-files"
# Kept in a cached build beside its artifacts, never published.
WARNINGS = "warnings.json"
# A build's private directory inside out/ is named for its process, so a later build can
# tell a killed build's leftovers from the work of a build still running.
WORK_PREFIX = ".uvmkit-build."
WORK_LOCK = ".lock"
AGENT_FILES = ("init", "uvmkit-agent")


@dataclass
class BuildContext:
    """What the steps of one build share."""

    config: BuildConfig
    targets: frozenset[Artifact]
    cache: Cache
    work: Path
    base_id: BaseId | None = None
    base: BaseSource | None = None
    guest: guest.GuestBuild | None = None
    tree: Tree | None = None
    # The guest layer as added to the tree: (resolved path, inode), sorted.
    delta: list[tuple[bytes, Inode]] = field(default_factory=list)
    key: str = ""
    written: list[str] = field(default_factory=list)
    # sha256 of each artifact, taken as it was written.
    hashes: dict[str, str] = field(default_factory=dict)
    # Closed when the build ends: the work directory's lock and the base's layer files
    # (opened for reading file data; layer_ids says which file each is).
    fds: list[int] = field(default_factory=list)
    layer_ids: dict[int, str] = field(default_factory=dict)
    segments: SegmentStore | None = None
    # Set once the artifacts are in out/, to say so if the build is interrupted after.
    published: bool = False
    # What the build warned about: kept with the artifacts and said again whenever they
    # are served from the cache or found up to date, so a warning is never lost.
    warnings: list[str] = field(default_factory=list)

    @property
    def manifest_wanted(self) -> bool:
        return self.targets == ALL_ARTIFACTS


@dataclass(frozen=True)
class BuildResult:
    """What a build left in out/."""

    out_dir: Path
    files: tuple[str, ...]
    reused: str  # "", "out" (already up to date) or "cache"


def build(config: BuildConfig, targets: frozenset[Artifact] = ALL_ARTIFACTS) -> BuildResult:
    """Build `targets` into config.out_dir; build-all is every artifact plus the manifest."""
    created = not config.out_dir.exists()
    out = prepare_out(config.out_dir)
    remove_stale_work(out)
    cache = Cache(config.cache_dir, enabled=config.use_cache)
    cache.check()
    work = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}.", dir=out))
    # Held for the whole build: a later build that can take it knows this one is gone.
    lock = os.open(work / WORK_LOCK, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    ctx = BuildContext(config=config, targets=targets, cache=cache, work=work)
    ctx.fds.append(lock)
    try:
        with _friendly_os_errors(config), sigterm_as_interrupt():
            return _build(ctx)
    except KeyboardInterrupt:
        raise _interrupted(ctx) from None
    finally:
        try:
            # Cleaning up must not be cut short by a second Ctrl-C either.
            with deferred_interrupts():
                for fd in ctx.fds:
                    os.close(fd)
                shutil.rmtree(work, ignore_errors=True)
                if created:
                    # A build that failed before writing anything leaves no empty out/.
                    with contextlib.suppress(OSError):
                        out.rmdir()
        except KeyboardInterrupt:
            raise _interrupted(ctx) from None


def _interrupted(ctx: BuildContext) -> Interrupted:
    out = ctx.config.out_dir
    if ctx.published:
        return Interrupted(f"interrupted after the build finished; {out} holds its artifacts")
    return Interrupted(f"interrupted; nothing in {out} was changed")


def _build(ctx: BuildContext) -> BuildResult:
    sde = ctx.config.source_date_epoch
    if Artifact.INITRD in ctx.targets and sde > NEWC_MAX:
        # uvmkit's own files carry that time, so no initrd.img could hold it.
        raise FormatLimitError(
            f"SOURCE_DATE_EPOCH={sde} is past the last time newc cpio (initrd.img) holds "
            f"({NEWC_MAX}, in the year 2106)",
            hint=f"set SOURCE_DATE_EPOCH to {NEWC_MAX} or less; `invoke rootfs` takes any",
        )
    if ctx.targets == {Artifact.AGENT}:
        # The guest programs alone: no base, no engine.
        if not reuse_agent(ctx):
            build_agent(ctx)
        write_artifacts(ctx)
        publish(ctx, tuple(ctx.written))
        return BuildResult(ctx.config.out_dir, tuple(ctx.written), reused="")
    identify_base(ctx)
    needs_guest = ctx.targets != {Artifact.BASE}
    if needs_guest and not reuse_agent(ctx):
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            # The compiler runs while the engine exports: neither needs the other. The
            # export stays in this thread, where Ctrl-C lands and stops it at once.
            compiled = pool.submit(build_agent, ctx)
            materialize_base(ctx)
            if ctx.tree is None and not compiled.done():
                # The base is read while the compiler runs: needed unless the artifacts
                # turn out to be cached, and free then, as the compiler is the wait.
                merge_base(ctx)
            result_of(compiled)
    ctx.key = build_key(ctx)

    if ctx.manifest_wanted and ctx.config.use_cache and up_to_date(ctx):
        _replay_warnings(ctx.config.out_dir / MANIFEST, key="warnings")
        log.info("%s is up to date (the same inputs built it)", ctx.config.out_dir)
        return BuildResult(ctx.config.out_dir, (), reused="out")
    cached = ctx.cache.lookup("builds", ctx.key, "the artifacts")
    if cached is not None:
        _replay_warnings(cached / WARNINGS)
        names = tuple(
            p.name for p in sorted(cached.iterdir()) if p.name not in (ENTRY_FILE, WARNINGS)
        )
        for name in names:
            # A copy, not a link: an artifact edited in one out/ must not change another's.
            shutil.copyfile(cached / name, ctx.work / name)
        publish(ctx, names)
        log.info("reused the cached build of these inputs")
        return BuildResult(ctx.config.out_dir, names, reused="cache")

    if ctx.base is None:
        materialize_base(ctx)
    if ctx.tree is None:
        merge_base(ctx)
    if needs_guest:
        add_guest_layer(ctx)
        check_init(ctx.tree, ctx.config.recipe.init)  # type: ignore[arg-type]
    write_artifacts(ctx)
    if ctx.manifest_wanted:
        write_manifest(ctx)
    store_in_cache(ctx)
    publish(ctx, tuple(ctx.written))
    return BuildResult(ctx.config.out_dir, tuple(ctx.written), reused="")


# --- steps --------------------------------------------------------------------------


def prepare_out(out: Path) -> Path:
    """Make sure out/ exists and is writable; a clear error when it cannot be."""
    hint = "pass --out DIR with a directory you can write"
    if out.exists() and not out.is_dir():
        raise BadInputError(f"output directory {out} is a file, not a directory", hint=hint)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(
            f"cannot create output directory {out}: {exc.strerror}", hint=hint
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise BadInputError(f"output directory {out} is not writable", hint=hint)
    return out


def remove_stale_work(out: Path) -> None:
    """Remove what builds that were killed left in out/ (never a running build's work)."""
    for leftover in out.glob(f"{WORK_PREFIX}*"):
        if leftover.is_dir() and not leftover.is_symlink():
            if _build_running(leftover):
                continue
            log.debug("removing %s, left by a build that was killed", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _build_running(work: Path) -> bool:
    """True while the build that owns `work` holds its lock (or, before it took the lock,
    while its process lives)."""
    try:
        fd = os.open(work / WORK_LOCK, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        pid = work.name.removeprefix(WORK_PREFIX).split(".", 1)[0]
        return pid.isdigit() and process_alive(int(pid))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def identify_base(ctx: BuildContext) -> None:
    ctx.base_id = identify(ctx.config.base, relative_to=ctx.config.base_dir)
    log.debug("base %s is %s", ctx.config.base, ctx.base_id.id)


def build_key(ctx: BuildContext) -> str:
    """Everything that changes what the build writes.

    The guest counts by the bytes of its compiled programs, not its sources: a change
    that compiles to the same programs (a comment, say) changes no artifact.
    """
    assert ctx.base_id is not None
    programs = []
    if ctx.guest is not None:
        programs = [
            sha256_file(ctx.guest.init_path),
            sha256_file(ctx.guest.agent_path),
            ctx.guest.version,
            ctx.guest.branch,
            ctx.guest.compiler,
        ]
    return cache_key(
        "uvmkit-build",
        __version__,
        _code_hash(),
        ctx.config.base,
        ctx.base_id.id,
        programs,
        _tree_hash(TEMPLATES_DIR),
        _overlay_hash(ctx.config.recipe.overlay) if ctx.config.recipe.overlay else "",
        ctx.config.options(),
        ctx.config.source_date_epoch,
        sorted(ctx.targets),
    )


def up_to_date(ctx: BuildContext) -> bool:
    """True when out/ already holds exactly what this build would write.

    The stamp publish() leaves records each file's size, inode and change time, which
    any write changes; only when the stamp does not match are the files hashed.
    """
    out = ctx.config.out_dir
    try:
        stamp = json.loads((out / STAMP).read_text())
        if stamp["build_key"] == ctx.key and stamp["files"] == _fingerprints(out, stamp["files"]):
            log.debug("out/ matches its stamp: nothing to do")
            return True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("build_key") != ctx.key:
            log.debug("out/ was built from other inputs: rebuilding")
            return False
        for name, meta in manifest["artifacts"].items():
            if sha256_file(out / name) != meta["sha256"]:
                log.debug("%s in out/ changed since it was built: rebuilding", name)
                return False
        if (out / SUMS).read_text() != _sums_text(manifest["artifacts"]):
            return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log.debug("no complete earlier build in out/: building")
        return False
    _write_stamp(ctx, [*manifest["artifacts"], MANIFEST, SUMS])
    return True


def built_recipe(out: Path) -> Path | None:
    """The recipe file of the last build into out/, as its stamp recorded it."""
    try:
        recipe = json.loads((out / STAMP).read_text())["recipe"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Path(recipe) if isinstance(recipe, str) else None


def _fingerprints(out: Path, names: Iterable[str]) -> dict[str, list[int]]:
    prints = {}
    for name in names:
        st = (out / name).stat()
        prints[name] = [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]
    return prints


def _write_stamp(ctx: BuildContext, names: Sequence[str]) -> None:
    out = ctx.config.out_dir
    stamp = {
        "build_key": ctx.key,
        "files": _fingerprints(out, names),
        "recipe": str(ctx.config.recipe.path.resolve()),
    }
    tmp = ctx.work / STAMP
    tmp.write_text(json.dumps(stamp) + "\n")
    os.replace(tmp, out / STAMP)


def materialize_base(ctx: BuildContext) -> None:
    """Get the base's layers on disk. An engine export is read into the tree as it streams
    in, which costs no time: the engine is the wait."""
    assert ctx.base_id is not None
    tree = Tree(mtime=ctx.config.source_date_epoch)
    streamed: list[int] = []

    def read(layer: Layer, stream: ForwardReader) -> None:
        fd = _open_layer(ctx, layer.path)
        _apply_layer(tree, layer, stream, fd)
        streamed.append(fd)

    with _keeping_warnings(ctx, module="image_archive"):
        ctx.base = materialize(
            ctx.base_id,
            cache=ctx.cache,
            work_dir=ctx.work,
            platform=ctx.config.platform,
            follow=read,
        )
    if streamed and len(streamed) == len(ctx.base.layers):
        for index, (fd, layer) in enumerate(zip(streamed, ctx.base.layers, strict=True)):
            ctx.layer_ids[fd] = _layer_id(ctx, index, layer)
        ctx.tree = tree
        log.debug("read the base's entries as the export streamed in")


@contextlib.contextmanager
def _keeping_warnings(ctx: BuildContext, *, module: str) -> Iterator[None]:
    """Keep, with the artifacts, the warnings one module logs about the base (which image
    of an archive was used, say): they hold for every build the cache serves."""

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING and record.module == module:
                ctx.warnings.append(record.getMessage())

    handler = Keep()
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)


def merge_base(ctx: BuildContext) -> None:
    """Apply the base's layers, lowest first, into a tree."""
    assert ctx.base is not None
    tree = Tree(mtime=ctx.config.source_date_epoch)
    with step(f"Reading the base ({len(ctx.base.layers)} layer(s))"):
        for index, layer in enumerate(ctx.base.layers):
            fd = _open_layer(ctx, layer.path)
            ctx.layer_ids[fd] = _layer_id(ctx, index, layer)
            with layer.path.open("rb") as f:
                _apply_layer(tree, layer, f, fd)
    ctx.tree = tree


def _open_layer(ctx: BuildContext, path: Path) -> int:
    """A descriptor file data is read through when the artifacts are written."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    ctx.fds.append(fd)
    return fd


def _layer_id(ctx: BuildContext, index: int, layer: Layer) -> str:
    """The base's content identity (hashed this build) and the layer file's own."""
    assert ctx.base is not None
    return f"{ctx.base.id}#{index}:{layer_identity(layer.path)}"


def _apply_layer(tree: Tree, layer: Layer, f: BinaryIO | ForwardReader, fd: int) -> None:
    if layer.format is LayerFormat.CPIO:
        assert not isinstance(f, ForwardReader)
        entries = read_cpio(f, layer.name)
    else:
        entries = read_tar(f, layer.name, start=layer.start, end=layer.end)
    if layer.export_of_image_created is not None:
        entries = engine_images.export_entries(entries, layer.export_of_image_created)
    tree.apply_layer(entries, fd=fd, archive=layer.name)


def reuse_agent(ctx: BuildContext) -> bool:
    """Take /init and the agent from the cache when these sources built them before."""
    entry = ctx.cache.lookup("guest", guest.guest_source_hash(), "the guest programs")
    if entry is not None:
        _use_guest(ctx, entry)
    return entry is not None


def build_agent(ctx: BuildContext) -> None:
    """Compile /init and the agent, and keep them in the cache.

    They are compiled in the work directory, not in the cache: a full cache disk must
    cost the cache entry, not the build.
    """
    directory = ctx.work / "guest"
    built = guest.build_guest(directory, source_date_epoch=ctx.config.source_date_epoch)
    (directory / "build.json").write_text(
        json.dumps({"compiler": built.compiler, "source_hash": built.source_hash})
    )
    _use_guest(ctx, directory)
    with (
        ctx.cache.best_effort("the guest programs"),
        ctx.cache.store("guest", guest.guest_source_hash()) as tmp,
    ):
        if tmp is not None:
            for name in ("init", "uvmkit-agent", "build.json"):
                _copy(directory / name, tmp / name)


def _use_guest(ctx: BuildContext, entry: Path) -> None:
    recorded = json.loads((entry / "build.json").read_text())
    version, branch = guest.guest_version()
    ctx.guest = guest.GuestBuild(
        init_path=entry / "init",
        agent_path=entry / "uvmkit-agent",
        version=version,
        branch=branch,
        compiler=recorded["compiler"],
        source_hash=recorded["source_hash"],
    )


def add_guest_layer(ctx: BuildContext) -> None:
    """dev/console, then /init, the agent, /info and the recipe's overlay, on top of the base.

    Names are resolved through the base's symlinks, so a usr-merged base gets the agent
    at usr/bin, and bin stays a link.
    """
    assert ctx.tree is not None and ctx.guest is not None and ctx.base is not None
    tree, sde = ctx.tree, ctx.config.source_date_epoch
    base_paths = {path for path, _ in tree.walk()}

    # The kernel opens /dev/console for init's stdio; without the node init has none.
    # It is a header in the archives, so no mknod (and no root) is needed to make it.
    console = tree.lookup(b"dev/console")
    if console is None or console.kind is not Kind.CHAR or console.rdev != (5, 1):
        _add(tree, b"dev/console", Inode(Kind.CHAR, 0o600, mtime=sde, rdev=(5, 1)))

    layer: list[tuple[bytes, Inode]] = []
    if ctx.config.recipe.init is InitChoice.UVMKIT:
        layer.append((INIT_PATH, _file(ctx.guest.init_path.read_bytes(), 0o755, sde)))
    layer.append((AGENT_PATH, _file(ctx.guest.agent_path.read_bytes(), 0o755, sde)))
    layer.append((INFO_DIR, Inode(Kind.DIR, 0o755, mtime=sde, children={})))
    for info_name, data in render_info(ctx).items():
        layer.append((INFO_DIR + b"/" + info_name.encode(), _file(data, 0o644, sde)))
    # What uvmkit itself puts in the guest, which an overlay must leave alone.
    ours = [(path, inode) for path, inode in layer if inode.kind is Kind.FILE]
    if ctx.config.recipe.overlay is not None:
        layer.extend(_overlay(ctx.config.recipe.overlay, sde))

    # /info is uvmkit's: a base's own `info` link is replaced, never written through.
    info = tree.lookup(INFO_DIR)
    if info is not None and info.kind is Kind.SYMLINK:
        warn(ctx, f"the base's /info is a symlink (to {show_name(info.target)}); the guest "
                  "layer's /info directory replaces it")  # fmt: skip
    added: dict[bytes, Inode] = {}
    for path, inode in layer:
        added[_add(tree, path, inode, through_links=path != INFO_DIR)] = inode
    _check_guest_layer_kept(ctx, tree, ours)
    # Parents the base did not have go into delta.tar.gz too, so it unpacks anywhere.
    for added_path in list(added):
        parts = added_path.split(b"/")
        for i in range(1, len(parts)):
            parent = b"/".join(parts[:i])
            made = tree.lookup(parent)
            if parent not in base_paths and parent not in added and made is not None:
                added[parent] = made
    ctx.delta = sorted(added.items())
    log.debug("guest layer: %s", ", ".join(show_name(p) for p, _ in ctx.delta))


def _check_guest_layer_kept(ctx: BuildContext, tree: Tree, ours: list[tuple[bytes, Inode]]) -> None:
    """Refuse an overlay that replaced uvmkit's own files (or a directory above them)."""

    def found(path: bytes) -> Inode | None:
        resolved = tree.follow(path)  # None, not an error, when a file stands in the way
        return resolved[1] if resolved is not None else None

    console = found(b"dev/console")
    checks = [(path, found(path) is inode) for path, inode in ours]
    checks.append((b"dev/console", console is not None and console.kind is Kind.CHAR
                   and console.rdev == (5, 1)))  # fmt: skip
    for path, kept in checks:
        if not kept:
            raise BadInputError(
                f"the overlay of image recipe {ctx.config.recipe.name!r} replaces uvmkit's "
                f"/{show_name(path)}, which the guest needs",
                hint=f"remove /{show_name(path)} (or what stands in its place) from the overlay",
            )


def _add(tree: Tree, name: bytes, inode: Inode, *, through_links: bool = True) -> bytes:
    entry = Entry(name=name, kind=inode.kind, mode=inode.mode, mtime=inode.mtime)
    # Through a base's links, not over them: a usr-merged base keeps lib -> usr/lib.
    return tree.add(entry, inode, archive="the guest layer", keep_dir_symlinks=through_links)


def _file(data: bytes, mode: int, mtime: int) -> Inode:
    return Inode(Kind.FILE, mode, mtime=mtime, size=len(data), data=data)


def _overlay(root: Path, mtime: int) -> list[tuple[bytes, Inode]]:
    """The recipe's overlay directory as guest-layer entries, owned by root."""
    items: list[tuple[bytes, Inode]] = []
    top = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, top)
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if name.startswith(WHITEOUT_PREFIX):
                raise BadInputError(
                    f"overlay {root}: {show_name(rel)} has a whiteout name (.wh.), which no "
                    "image may hold",
                    hint="rename it; to remove a base file, leave it out of the base instead",
                )
            st = os.lstat(full)
            mode = st.st_mode & 0o7777
            if os.path.islink(full):
                items.append(
                    (rel, Inode(Kind.SYMLINK, 0o777, mtime=mtime, target=os.readlink(full)))
                )
            elif os.path.isdir(full):
                items.append((rel, Inode(Kind.DIR, mode, mtime=mtime, children={})))
            elif os.path.isfile(full):
                with open(full, "rb") as f:
                    items.append((rel, _file(f.read(), mode, mtime)))
            else:
                raise BadInputError(
                    f"overlay {root}: {show_name(rel)} is not a file, directory or symlink",
                    hint="keep only those in an overlay",
                )
    return items


def render_info(ctx: BuildContext) -> dict[str, bytes]:
    """The /info files, rendered from templates/info/*.j2."""
    import jinja2  # only a build that writes artifacts needs it

    assert ctx.guest is not None and ctx.base is not None
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    sde = ctx.config.source_date_epoch
    values = {
        "uvmkit_version": __version__,
        "image": ctx.config.recipe.name,
        "agent": {"version": ctx.guest.version, "branch": ctx.guest.branch},
        "base": {"ref": ctx.base.ref, "id": ctx.base.id, "origin": ctx.base.origin},
        "source_date_epoch": sde,
        "build_date": _iso_date(sde),
    }
    rendered = {}
    for name in sorted(env.list_templates(filter_func=lambda n: n.startswith("info/"))):
        target = name.removeprefix("info/").removesuffix(".j2")
        # surrogateescape: a base path that is not UTF-8 goes in as the bytes it is.
        rendered[target] = env.get_template(name).render(values).encode("utf-8", "surrogateescape")
    return rendered


def _iso_date(epoch: int) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_artifacts(ctx: BuildContext) -> None:
    """initrd.img and rootfs.tar.gz in one pass over the tree, then the small ones."""
    config, targets = ctx.config, ctx.targets
    sde = config.source_date_epoch

    if Artifact.BASE in targets:
        planned = plan(_tree(ctx).sorted_entries(), source_date_epoch=sde)
        _write_pass(ctx, planned, initrd=False, rootfs=False, base=True)
    if Artifact.AGENT in targets:
        assert ctx.guest is not None
        for path in (ctx.guest.init_path, ctx.guest.agent_path):
            _copy(path, ctx.work / path.name)
            os.chmod(ctx.work / path.name, 0o755)
            ctx.written.append(path.name)
    want_initrd, want_rootfs = Artifact.INITRD in targets, Artifact.ROOTFS in targets
    if want_initrd or want_rootfs:
        planned = plan(_tree(ctx).sorted_entries(), source_date_epoch=sde)
        if want_initrd:
            check_newc_limits(planned)
            lost = xattr_losses(planned)
            if lost:
                shown = "; ".join(lost[:5]) + (
                    f"; and {len(lost) - 5} more" if len(lost) > 5 else ""
                )
                warn(
                    ctx,
                    f"newc cpio cannot hold xattrs, so initrd.img lacks them on {len(lost)} "
                    f"file(s): {shown} (rootfs.tar.gz keeps them)",
                )
        _write_pass(ctx, planned, initrd=want_initrd, rootfs=want_rootfs, base=False)
    if Artifact.DELTA in targets:
        delta = plan(ctx.delta, source_date_epoch=sde)
        with _artifact(ctx, Artifact.DELTA.value, Compression.GZIP, config.gzip_level) as sink:
            write_archives(delta, newc=None, tar=TarWriter(sink))


def _tree(ctx: BuildContext) -> Tree:
    """The merged tree: every artifact but the guest programs is written from it."""
    assert ctx.tree is not None
    return ctx.tree


def _write_pass(
    ctx: BuildContext, planned: Sequence[Planned], *, initrd: bool, rootfs: bool, base: bool
) -> None:
    config = ctx.config
    total = sum(p.inode.size for p in planned if p.inode.kind is Kind.FILE)
    names = [n for n, wanted in (("initrd.img", initrd), ("rootfs.tar.gz", rootfs),
                                  ("base.tar", base)) if wanted]  # fmt: skip
    title = " and ".join(names)
    with contextlib.ExitStack() as stack:
        outputs = []
        if initrd:
            sink = stack.enter_context(
                _artifact(ctx, "initrd.img", config.compression, config.initrd_level)
            )
            outputs.append(Output(NewcWriter(sink), sink, "initrd.img", config.initrd_level))
        if rootfs:
            sink = stack.enter_context(
                _artifact(ctx, "rootfs.tar.gz", Compression.GZIP, config.gzip_level)
            )
            outputs.append(Output(TarWriter(sink), sink, "rootfs.tar.gz", config.gzip_level))
        if base:
            sink = stack.enter_context(_artifact(ctx, "base.tar", Compression.NONE, 0))
            outputs.append(Output(TarWriter(sink), sink, "base.tar", 0))
        guest_paths = frozenset(path for path, _ in ctx.delta)
        runs = split_runs(planned, guest_paths, layers=ctx.layer_ids,
                          salt=f"{__version__}:{_code_hash()}")  # fmt: skip
        if config.use_cache and ctx.segments is None:
            ctx.segments = SegmentStore(ctx.cache)
        start = time.monotonic()
        with progress(total=total, desc=title) as bar:
            write_in_runs(runs, outputs, store=ctx.segments, progress=bar.update)
        log.debug("%s: %d entries in %d run(s), %s of file data in %.1f s", title, len(planned),
                  len(runs), human_size(total), time.monotonic() - start)  # fmt: skip


@contextlib.contextmanager
def _artifact(
    ctx: BuildContext, name: str, compression: Compression, level: int
) -> Iterator[CompressedWriter]:
    """A compressed stream into work/NAME; logged with its size and time once complete."""
    start = time.monotonic()
    path = ctx.work / name
    raw = HashingFile(path.open("wb"))
    writer = CompressedWriter(raw, compression, level)  # type: ignore[arg-type]
    try:
        yield writer
    except BaseException:
        writer.abort()
        path.unlink(missing_ok=True)
        raise
    writer.close()
    ctx.hashes[name] = raw.digest.hexdigest()
    ctx.written.append(name)
    log.info(
        "%s %s in %.1f s (%s before compression)",
        name,
        human_size(path.stat().st_size),
        time.monotonic() - start,
        human_size(writer.written),
    )


def write_manifest(ctx: BuildContext) -> None:
    """manifest.json (what went in, what came out) and SHA256SUMS."""
    assert ctx.base is not None and ctx.guest is not None
    artifacts = {
        name: {
            "size": (ctx.work / name).stat().st_size,
            "sha256": ctx.hashes.get(name) or sha256_file(ctx.work / name),
        }
        for name in sorted(ctx.written)
    }
    base = ctx.base
    manifest = {
        "uvmkit": __version__,
        "image": ctx.config.recipe.name,
        "base": {
            "ref": base.ref,
            "kind": base.kind,
            "id": base.id,
            "digests": list(base.digests),
            "origin": base.origin,
            **({"details": base.details} if base.details else {}),
        },
        # What the guest programs are, not what they were compiled from: a change that
        # compiles to the same programs (a comment) leaves the artifacts, and so this,
        # as they were.
        "agent": {
            "version": ctx.guest.version,
            "branch": ctx.guest.branch,
            "compiler": ctx.guest.compiler,
            "init_sha256": sha256_file(ctx.guest.init_path),
            "agent_sha256": sha256_file(ctx.guest.agent_path),
        },
        "options": ctx.config.options(),
        "source_date_epoch": ctx.config.source_date_epoch,
        "build_key": ctx.key,
        "artifacts": artifacts,
        "warnings": ctx.warnings,
    }
    (ctx.work / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    (ctx.work / SUMS).write_text(_sums_text(artifacts))
    ctx.written += [MANIFEST, SUMS]


def _sums_text(artifacts: dict[str, dict[str, object]]) -> str:
    return "".join(f"{meta['sha256']}  {name}\n" for name, meta in sorted(artifacts.items()))


def store_in_cache(ctx: BuildContext) -> None:
    """Keep the artifacts under the build key, so the same inputs never build twice.

    The cache only saves time: when it cannot be written (a full disk, say), the build
    goes on and says so.
    """
    with ctx.cache.best_effort("this build"):
        _store_in_cache(ctx)


def _store_in_cache(ctx: BuildContext) -> None:
    with ctx.cache.store("builds", ctx.key) as tmp:
        if tmp is None:
            return
        for name in ctx.written:
            _copy(ctx.work / name, tmp / name)
            if name in ctx.hashes:
                ctx.cache.note_hash(tmp / name, ctx.hashes[name])
        (tmp / WARNINGS).write_text(json.dumps(ctx.warnings) + "\n")
    if ctx.segments is not None:
        ctx.segments.record(ctx.key)


def publish(ctx: BuildContext, names: Sequence[str]) -> None:
    """Rename the finished artifacts into out/, the manifest last, all or none of them.

    Ctrl-C is held off until every rename is done, and a rename that fails takes the
    others back, so out/ never holds some artifacts of this build beside others of the
    build before.
    """
    out = ctx.config.out_dir
    ordered = sorted(names, key=lambda n: (n in (MANIFEST, SUMS), n))
    retire = not ctx.manifest_wanted and _contradicts_manifest(ctx, names)
    with deferred_interrupts():
        # What `invoke clean` may remove: what builds published here, and nothing else.
        owned = (_owned(out) - ({MANIFEST, SUMS, STAMP} if retire else set())) | set(ordered)
        (ctx.work / OWNED).write_text(json.dumps(sorted(owned)) + "\n")
        with all_or_nothing(out, ctx.work) as swap:
            if retire:
                # A step task replacing an artifact of an earlier build-all takes that
                # build's records away: they would no longer describe out/.
                for name in (MANIFEST, SUMS, STAMP):
                    swap.remove(name)
            swap.put(OWNED)
            for name in ordered:
                swap.put(name)
        ctx.published = True
        if ctx.manifest_wanted:
            _write_stamp(ctx, ordered)
    if retire:
        log.info("removed %s and %s from %s: they described the earlier build-all", MANIFEST,
                 SUMS, out)  # fmt: skip
    log.info("artifacts in %s: %s", out, ", ".join(ordered))


def _contradicts_manifest(ctx: BuildContext, names: Sequence[str]) -> bool:
    """True when out/'s manifest lists any of these artifacts with other bytes than this
    build's (a step task that wrote the same bytes leaves the manifest true)."""
    try:
        listed = json.loads((ctx.config.out_dir / MANIFEST).read_text())["artifacts"]
        recorded = {name: listed[name]["sha256"] for name in names if name in listed}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return any(
        (ctx.hashes.get(name) or sha256_file(ctx.work / name)) != digest
        for name, digest in recorded.items()
    )


# --- helpers ------------------------------------------------------------------------


def warn(ctx: BuildContext, message: str) -> None:
    """Log a warning about the artifacts, and keep it with them."""
    log.warning("%s", message)
    ctx.warnings.append(message)


def _replay_warnings(path: Path, *, key: str = "") -> None:
    """Say again what the build that made these artifacts warned about."""
    try:
        recorded = json.loads(path.read_text())
        messages = recorded[key] if key else recorded
    except (OSError, ValueError, KeyError, TypeError):
        return
    for message in messages:
        log.warning("%s", message)


class HashingFile:
    """A file opened for writing that hashes what goes through it, to spare a re-read."""

    def __init__(self, inner: BinaryIO) -> None:
        self.inner = inner
        self.digest = hashlib.sha256()

    def write(self, data: bytes | memoryview, /) -> int:
        self.digest.update(data)
        return self.inner.write(data)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()


def _copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows, else a copy.

    Linking is safe although an artifact edited in out/ then changes the cache entry too:
    every cache entry is verified against its hashes before use, so a changed one is
    rebuilt, never served.
    """
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


@contextlib.contextmanager
def _friendly_os_errors(config: BuildConfig) -> Iterator[None]:
    """Turn a full disk or a permission problem while writing into one clear line."""
    try:
        yield
    except UvmkitError:
        raise
    except OSError as exc:
        where = str(config.out_dir)
        if config.use_cache:
            # A write that names no file: the disk with less room left is the one that filled.
            out_room, cache_room = _free_bytes(config.out_dir), _free_bytes(config.cache_dir)
            if cache_room < out_room:
                where = f"the cache at {config.cache_dir}"
            elif cache_room == out_room:
                where += f" or the cache at {config.cache_dir}"
        converted = from_os_error(exc, where=where)
        if converted is None:
            raise
        raise converted from None


def _free_bytes(path: Path) -> int:
    """Room left on the disk holding path (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        try:
            stats = os.statvfs(candidate)
        except OSError:
            continue
        return stats.f_bavail * stats.f_frsize
    return 0


@functools.cache
def _code_hash() -> str:
    """The uvmkit package's own sources: a change to how artifacts are written changes them."""
    return _tree_hash(Path(__file__).resolve().parent, suffix=".py")


def _tree_hash(root: Path, *, suffix: str = "") -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name.endswith(suffix) and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _overlay_hash(root: Path) -> str:
    """Everything of an overlay that reaches the image: names, kinds, modes, link targets
    and file contents (directories count too, empty or not)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest.update(b"%s\0%o\0" % (os.fsencode(path.relative_to(root)), st.st_mode))
        if path.is_symlink():
            digest.update(os.fsencode(os.readlink(path)))
        elif path.is_file():
            digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def clean_outputs(out: Path, *, cache: bool) -> None:
    """Remove what builds wrote into out/ (and leftovers), and the cache if asked.

    Only files a build published there are removed (they are listed in out/), and the
    boot logs beside them: a directory uvmkit never wrote keeps its files.
    """
    if out.exists() and not out.is_dir():
        raise BadInputError(f"{out} is a file, not an output directory", hint="check --out")
    if not out.exists():
        log.info("nothing to clean: %s does not exist", out)
    elif (out / OWNED).exists():
        owned = _owned(out)
        if not owned:
            log.warning(
                "%s lists no files (it is damaged or empty): only uvmkit's records and boot "
                "logs are removed; remove the artifacts by hand",
                out / OWNED,
            )
        removed = 0
        logs = {p.name for p in out.glob("console*.log")}
        for name in sorted({*owned, *logs, STAMP, OWNED}):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                (out / name).unlink()
                removed += 1
        remove_stale_work(out)
        log.info("removed %d file(s) from %s", removed, out)
    else:
        remove_stale_work(out)
        if any(out.iterdir()):
            log.info("%s holds no files a uvmkit build published; left them alone", out)
        else:
            log.info("nothing to clean: %s is empty", out)
    if cache:
        store = Cache(default_cache_dir())
        log.info("emptied the cache at %s (%s)", store.root, human_size(store.clear()))


def _owned(out: Path) -> set[str]:
    """The names builds published into out/, as they recorded them."""
    try:
        names = json.loads((out / OWNED).read_text())
    except (OSError, ValueError):
        return set()
    # Plain names only: the record must not lead `clean` out of out/.
    return {n for n in names if isinstance(n, str) and n and "/" not in n and n not in (".", "..")}
