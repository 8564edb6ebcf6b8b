"""uvmkit's front door: `invoke --list` shows the tasks, `invoke --help TASK` their options.

Each task parses its options and calls one function of the uvmkit package. Errors are
printed as one line with a hint; UVMKIT_DEBUG=1 (or `invoke --debug TASK`) shows the
traceback too.
"""

from __future__ import annotations

import functools
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

from uvmkit import build
from uvmkit.build import clean_outputs
from uvmkit.config import (
    DEFAULT_IMAGE,
    make_build_config,
    not_empty,
    out_dir,
    parse_level,
    whole_number,
)
from uvmkit.errors import UvmkitError, from_os_error
from uvmkit.interrupts import exit_status
from uvmkit.log import debug_enabled, log, setup_logging

F = TypeVar("F", bound=Callable[..., Any])


def friendly(func: F) -> F:
    """Run a task body with uvmkit's logging; turn errors into one line and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = debug_enabled()
        setup_logging(debug=debug)
        if debug:
            # invoke's, the Docker SDK's and urllib3's own --debug chatter is not what a user
            # debugging a build wants.
            for name in ("invoke", "docker", "urllib3"):
                logging.getLogger(name).setLevel(logging.INFO)
        try:
            return func(*args, **kwargs)
        except Exit:
            raise
        except KeyboardInterrupt as exc:
            log.error("%s", getattr(exc, "message", "interrupted"))
            raise Exit(code=exit_status()) from None
        except Exception as exc:
            if debug:
                traceback.print_exc()
            error = _for_the_user(exc)
            if error is None:
                log.error("internal error: %s: %s", type(exc).__name__, exc)
                print("  hint: run with UVMKIT_DEBUG=1 for the traceback", file=sys.stderr)
                raise Exit(code=70) from None
            log.error("%s", error.message)
            if error.hint:
                print(f"  hint: {error.hint}", file=sys.stderr)
            raise Exit(code=1) from None

    return wrapper  # type: ignore[return-value]


def _for_the_user(exc: Exception) -> UvmkitError | None:
    """The error as the user should see it; None for a fault of uvmkit's own."""
    if isinstance(exc, UvmkitError):
        return exc
    if isinstance(exc, OSError):
        # A full disk or a read-only --out is the machine's doing, not a bug.
        return from_os_error(exc)
    return None


BUILD_HELP = {
    "image": "recipe: a name under images/ (default: default), or a path to a .toml file",
    "base": "overrides the recipe's base: a path when something exists there or it starts "
    "with / ./ ../ ~ (tar, cpio, docker save archive, OCI layout), else a Docker image",
    "out": "directory to write the artifacts into (default: out/ at the top of this checkout)",
    "compression": "initrd.img compression: gzip (default), zstd or none",
    "level": "compression level (gzip 0-3, default 3; zstd 1-19, default 3)",
    "platform": "OS/ARCH the base must be for; picks from a multi-platform OCI index "
    "(default linux/amd64)",
    "no_cache": "ignore the build cache and out/'s earlier build; build everything again",
}


def _build(
    targets: frozenset[build.Artifact],
    *,
    image: str,
    base: str,
    out: str,
    compression: str,
    level: str,
    platform: str,
    no_cache: bool,
) -> None:
    config = make_build_config(
        image=image,
        base=base,
        out=out,
        compression=compression,
        level=parse_level(level),
        platform=platform,
        no_cache=no_cache,
    )
    build.build(config, targets)


def _build_task(name: str, targets: frozenset[build.Artifact], doc: str) -> Any:
    """A build task for `targets`; every build task takes the same options."""

    def body(
        c: Context,
        image: str = DEFAULT_IMAGE,
        base: str | None = None,
        out: str | None = None,
        compression: str = "gzip",
        level: str | None = None,
        platform: str | None = None,
        no_cache: bool = False,
    ) -> None:
        _build(
            targets,
            image=image,
            base=not_empty("--base", base),
            out=not_empty("--out", out),
            compression=compression,
            level=not_empty("--level", level),
            platform=not_empty("--platform", platform),
            no_cache=no_cache,
        )

    body.__doc__ = doc
    body.__name__ = body.__qualname__ = name
    return task(help=BUILD_HELP)(friendly(body))


build_all = _build_task(
    "build_all",
    build.ALL_ARTIFACTS,
    "Build initrd.img, rootfs.tar.gz, delta.tar.gz, manifest.json and SHA256SUMS.",
)
base = _build_task(
    "base",
    frozenset({build.Artifact.BASE}),
    "Write the flattened base root filesystem alone as base.tar.",
)
agent = _build_task(
    "agent",
    frozenset({build.Artifact.AGENT}),
    "Compile the guest's /init and agent into OUT/init and OUT/uvmkit-agent.",
)
delta = _build_task(
    "delta",
    frozenset({build.Artifact.DELTA}),
    "Write delta.tar.gz: the guest layer (/init, the agent, /info) alone.",
)
initrd = _build_task(
    "initrd",
    frozenset({build.Artifact.INITRD}),
    "Write initrd.img: base plus guest layer as a compressed newc cpio.",
)
rootfs = _build_task(
    "rootfs",
    frozenset({build.Artifact.ROOTFS}),
    "Write rootfs.tar.gz: base plus guest layer as a PAX tar.",
)


@task(
    help={
        "base": "image to benchmark on (default: debian-minbase:local, which ./setup.sh test "
        "makes)",
        "rounds": "how many cold runs of each side (default 3)",
    }
)
@friendly
def bench(c: Context, base: str = "debian-minbase:local", rounds: str = "3") -> None:
    """Time build-all against the shell pipeline it replaces; print medians side by side."""
    from uvmkit.bench import bench as run_bench

    print(run_bench(base, rounds=whole_number("--rounds", rounds)))


@task(
    help={
        "out": "directory to clean (default: out/ at the top of this checkout)",
        "cache": "also empty the build cache ($XDG_CACHE_HOME/uvmkit)",
    }
)
@friendly
def clean(c: Context, out: str | None = None, cache: bool = False) -> None:
    """Remove what builds wrote into OUT; with --cache, empty the build cache too."""
    clean_outputs(out_dir(not_empty("--out", out)), cache=cache)


@task(
    help={
        "out": "directory the boot files are in (default: out/ at the top of this checkout)",
        "kernel": "kernel to boot (default: the recipe's, else the newest /boot/vmlinuz-*)",
        "image": "recipe whose kernel to boot (default: the one that built OUT)",
        "exec": "command to run in the guest, split as a shell would, with an empty stdin; its "
        "exit status (128+N for signal N) becomes ours; without it, a smoke check runs",
        "timeout": "seconds to wait for the guest agent to answer (default 60); the command "
        "itself may run longer",
        "accel": "auto, kvm or tcg; auto uses KVM only when it really works",
        "cpus": "virtual CPUs (default 1)",
        "memory": "guest memory in MB (default 512)",
        "kernel_args": "extra kernel command line arguments",
        "count": "boot this many times; more than once also reports the boot times",
        "parallel": "how many guests to run at once (default 1)",
        "measure": "report min/median/max time from QEMU start to the agent's hello",
        "console_log": "where to write the guest's console (default: OUT/console.log)",
    }
)
@friendly
def boot(
    c: Context,
    out: str | None = None,
    kernel: str | None = None,
    image: str | None = None,
    exec: str | None = None,
    timeout: str = "60",
    accel: str = "auto",
    cpus: str = "1",
    memory: str = "512",
    kernel_args: str = "",
    count: str = "1",
    parallel: str = "1",
    measure: bool = False,
    console_log: str | None = None,
) -> None:
    """Boot the built initrd under QEMU, talk to the guest agent, optionally run a command."""
    import shlex

    from uvmkit import boot as harness
    from uvmkit.errors import BadInputError
    from uvmkit.qemu import Accel

    try:
        accel_choice = Accel(accel)
    except ValueError:
        raise BadInputError(
            f"--accel {accel!r} is not one of auto, kvm, tcg",
            hint="auto uses KVM where it really works, else TCG",
        ) from None
    kernel_path = not_empty("--kernel", kernel)
    log_path = not_empty("--console-log", console_log)
    try:
        command = tuple(shlex.split(exec or ""))
    except ValueError as exc:
        raise BadInputError(f"--exec {exec!r}: {exc}", hint="quote it as for a shell") from None
    if exec is not None and not command:
        raise BadInputError("--exec names no command", hint="leave --exec out for the smoke check")
    options = harness.BootOptions(
        out_dir=out_dir(not_empty("--out", out)),
        kernel=Path(kernel_path) if kernel_path else None,
        image=not_empty("--image", image),
        command=command,
        timeout=whole_number("--timeout", timeout),
        accel=accel_choice,
        cpus=whole_number("--cpus", cpus),
        memory_mb=whole_number("--memory", memory),
        kernel_args=kernel_args,
        count=whole_number("--count", count),
        parallel=whole_number("--parallel", parallel),
        measure=measure,
        console_log=Path(log_path) if log_path else None,
    )
    status = harness.boot(options)
    if status != 0:
        raise Exit(code=status)
