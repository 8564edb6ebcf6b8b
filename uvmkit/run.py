"""The one way uvmkit runs another program."""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import ToolError
from .log import log

# Debian package that provides each program we run, for the "not installed" hint.
PACKAGE_OF = {
    "musl-gcc": "musl-tools",
    "gcc": "gcc",
    "strip": "binutils",
    "qemu-system-x86_64": "qemu-system-x86",
    "dockerd": "docker.io",
    "docker": "docker.io",
    "cpio": "cpio",
    "gzip": "gzip",
    "tar": "tar",
    "busybox": "busybox-static",
    "debootstrap": "debootstrap",
    "docker-registry": "docker-registry",
}


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    capture: bool = False,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run argv with stdin closed and a fixed locale; raise ToolError on failure.

    With `capture`, stdout and stderr are returned as text; otherwise they pass
    through to ours. A program that is not installed becomes a one-line error
    naming the Debian package that provides it.
    """
    args = [os.fspath(a) for a in argv]
    full_env = dict(os.environ)
    full_env["LC_ALL"] = "C.UTF-8"
    if env:
        full_env.update(env)
    log.debug("+ %s", shlex.join(args))
    try:
        proc = subprocess.run(
            args,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            capture_output=capture,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        raise not_installed(args[0]) from None
    if check and proc.returncode != 0:
        detail = (proc.stderr or "").strip().splitlines()
        last = f": {detail[-1]}" if detail else ""
        raise ToolError(f"{shlex.join(args[:3])}… failed with exit code {proc.returncode}{last}")
    return proc


def not_installed(program: str) -> ToolError:
    """The error for a program that is not on PATH."""
    name = Path(program).name
    package = PACKAGE_OF.get(name, name)
    return ToolError(
        f"{name} is not installed",
        hint=f"apt-get install {package}, or run ./setup.sh",
    )


def process_alive(pid: int) -> bool:
    """True while a process of this machine with that ID exists (whoever owns it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
