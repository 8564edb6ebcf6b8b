"""uvmkit's front door: `invoke --list` shows the tasks, `invoke --help TASK` their options.

Each task parses its options and calls one function of the uvmkit package. Errors are
printed as one line with a hint; `invoke --debug TASK` (or UVMKIT_DEBUG=1) shows the
traceback too.
"""

from __future__ import annotations

import functools
import logging
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from invoke import Context, Exit, task

from uvmkit.errors import UvmkitError
from uvmkit.log import debug_enabled, log, setup_logging

F = TypeVar("F", bound=Callable[..., Any])


def friendly(func: F) -> F:
    """Run a task body with uvmkit's logging; turn errors into one line and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = debug_enabled()
        setup_logging(debug=debug)
        if debug:
            # invoke's own --debug chatter is not what a user debugging a build wants.
            logging.getLogger("invoke").setLevel(logging.INFO)
        try:
            return func(*args, **kwargs)
        except UvmkitError as exc:
            if debug:
                traceback.print_exc()
            log.error("%s", exc.message)
            if exc.hint:
                print(f"  hint: {exc.hint}", file=sys.stderr)
            raise Exit(code=1) from None
        except KeyboardInterrupt:
            log.error("interrupted; no artifact was changed")
            raise Exit(code=130) from None
        except Exit:
            raise
        except Exception as exc:
            if debug:
                traceback.print_exc()
            log.error("internal error: %s: %s", type(exc).__name__, exc)
            print("  hint: run `invoke --debug ...` for the traceback", file=sys.stderr)
            raise Exit(code=70) from None

    return wrapper  # type: ignore[return-value]


@task(
    help={
        "out": "directory the boot files are in (default: out/)",
        "kernel": "kernel to boot (default: the recipe's, else the newest /boot/vmlinuz-*)",
        "exec": "command to run in the guest; its exit status becomes ours",
        "timeout": "seconds to wait for the guest agent before failing",
        "accel": "auto, kvm or tcg; auto uses KVM only when it really works",
        "cpus": "virtual CPUs",
        "memory": "guest memory in MB",
        "kernel_args": "extra kernel command line arguments",
        "count": "boot this many times (with --measure: report boot times)",
        "parallel": "how many guests to run at once",
        "measure": "report min/median/max time from QEMU start to the agent's hello",
        "console_log": "where to write the guest's console (default: OUT/console.log)",
    }
)
@friendly
def boot(
    c: Context,
    out: str = "out",
    kernel: str = "",
    exec: str = "",
    timeout: float = 60.0,
    accel: str = "auto",
    cpus: int = 1,
    memory: int = 512,
    kernel_args: str = "",
    count: int = 1,
    parallel: int = 1,
    measure: bool = False,
    console_log: str = "",
) -> None:
    """Boot the built initrd under QEMU, talk to the guest agent, optionally run a command."""
    raise UvmkitError("boot is not implemented yet")
