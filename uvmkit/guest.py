"""Compile the guest programs (/init and the agent) from guest/*.c into static binaries.

The binaries are reproducible: the same sources, compiler and flags give the same bytes
whatever directory the build runs in and whenever it runs, so `source_hash` can serve as
a cache key for them.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .config import GUEST_DIR, ROOT
from .errors import ToolError
from .log import human_size, log, step
from .run import run

# Each program is its main file plus the shared helpers.
PROGRAMS = {"init": "init.c", "uvmkit-agent": "agent.c"}
SHARED_SOURCES = ("common.c",)

BASE_FLAGS = (
    "-std=gnu11",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-O2",
    "-static",
    # Stripped, and no build id: the id would hash in nothing new but is one more
    # thing for two builds to disagree on.
    "-s",
    "-Wl,--build-id=none",
)


@dataclass(frozen=True)
class GuestBuild:
    """The compiled guest programs and what they were built from."""

    init_path: Path
    agent_path: Path
    version: str
    branch: str
    compiler: str
    source_hash: str


@dataclass(frozen=True)
class _Compiler:
    command: str
    description: str
    extra_flags: tuple[str, ...]


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(
            ["git", "-C", str(ROOT), *args],
            capture_output=True,
            text=True,
            check=True,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return proc.stdout.strip() or None


@functools.cache
def guest_version() -> tuple[str, str]:
    """(short commit hash, branch) of the repository, or "unknown" for either."""
    version = _git("rev-parse", "--short=12", "HEAD") or "unknown"
    # symbolic-ref works on a branch with no commits yet; detached heads have no branch.
    branch = _git("symbolic-ref", "--short", "-q", "HEAD") or "unknown"
    return version, branch


def _find_compiler() -> _Compiler:
    return _compiler_on(os.environ.get("PATH", ""))


@functools.cache
def _compiler_on(search_path: str) -> _Compiler:
    """The compiler found on PATH, asked for its version once per process."""
    # musl gives a ~50 KB static binary; glibc's static libc is ten times that, and warns.
    for command in ("musl-gcc", "gcc"):
        path = shutil.which(command, path=search_path or None)
        if path is None:
            continue
        proc = run([path, "-dumpfullversion"], capture=True, check=False)
        gcc_version = proc.stdout.strip() or "unknown"
        return _Compiler(command, f"{command} (gcc {gcc_version})", ())
    raise ToolError("no C compiler: install musl-tools", hint="apt-get install musl-tools")


def _sources(source_dir: Path) -> list[Path]:
    return sorted(p for p in source_dir.iterdir() if p.suffix in (".c", ".h") and p.is_file())


def _flags(compiler: _Compiler, source_dir: Path, version: str) -> list[str]:
    return [
        *BASE_FLAGS,
        *compiler.extra_flags,
        # __FILE__ and debug info would otherwise carry the checkout's absolute path.
        f"-ffile-prefix-map={source_dir}=guest",
        f'-DUVMKIT_VERSION="{version}"',
    ]


def _hash(source_dir: Path, compiler: _Compiler, flags: list[str]) -> str:
    digest = hashlib.sha256()
    for path in _sources(source_dir):
        data = path.read_bytes()
        digest.update(f"{path.name}\0{len(data)}\0".encode())
        digest.update(data)
    digest.update(compiler.description.encode() + b"\0")
    # The prefix map holds the source path, which must not change the key.
    stable = [f for f in flags if not f.startswith("-ffile-prefix-map=")]
    digest.update("\0".join(stable).encode())
    return digest.hexdigest()


def _compile(compiler: str, args: list[str], *, env: dict[str, str], cwd: Path, out: Path) -> None:
    """Run the compiler; its diagnostics are shown when it fails, except for a full disk,
    which is the one-line error any other write to that disk gives."""
    proc = run([compiler, *args], env=env, cwd=cwd, capture=True, check=False)
    if proc.returncode == 0:
        return
    if "No space left on device" in proc.stderr:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out))
    sys.stderr.write(proc.stderr)
    raise ToolError(f"{Path(compiler).name} could not compile the guest (exit code "
                    f"{proc.returncode}); its messages are above")  # fmt: skip


def guest_source_hash(*, source_dir: Path = GUEST_DIR) -> str:
    """The cache key of the guest binaries, computed without compiling them."""
    compiler = _find_compiler()
    version, _ = guest_version()
    return _hash(source_dir, compiler, _flags(compiler, source_dir, version))


def build_guest(
    work_dir: Path, *, source_date_epoch: int, source_dir: Path = GUEST_DIR
) -> GuestBuild:
    """Compile /init and the agent into work_dir; raise ToolError when they do not build."""
    compiler = _find_compiler()
    version, branch = guest_version()
    source_dir = source_dir.resolve()
    flags = _flags(compiler, source_dir, version)
    work_dir.mkdir(parents=True, exist_ok=True)
    # gcc's temporary files go where the build cleans up, even when it is killed.
    scratch = Path(tempfile.mkdtemp(prefix=".cc-", dir=work_dir))
    env = {"SOURCE_DATE_EPOCH": str(source_date_epoch), "TMPDIR": str(scratch)}

    outputs = {}
    with (
        contextlib.ExitStack() as cleanup,
        step(f"Compiling the guest with {compiler.description}"),
    ):
        cleanup.callback(shutil.rmtree, scratch, ignore_errors=True)
        for name, main_source in PROGRAMS.items():
            output = work_dir / name
            # Relative names, run from source_dir: the checkout's path stays out of the binary.
            sources = [main_source, *SHARED_SOURCES]
            _compile(compiler.command, [*flags, "-o", str(output.resolve()), *sources],
                     env=env, cwd=source_dir, out=work_dir)  # fmt: skip
            os.chmod(output, 0o755)
            log.debug("%s: %s", output, human_size(output.stat().st_size))
            outputs[name] = output

    return GuestBuild(
        init_path=outputs["init"],
        agent_path=outputs["uvmkit-agent"],
        version=version,
        branch=branch,
        compiler=compiler.description,
        source_hash=_hash(source_dir, compiler, flags),
    )
