"""The boot harness: boot the built initrd under QEMU, talk to the agent, report what happened.

One boot is: start QEMU with the console going to a file and the agent's serial port on a
unix socket; wait for the agent's READY and HELLO; then run the user's command (its exit
status becomes ours) or a smoke check; then ask the agent to shut down, which powers the
guest off. While waiting, the harness watches QEMU and the console, so a guest whose
/init dies or whose kernel panics fails at once with the reason, not at the timeout.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import config, qemu
from .agent_client import AgentClient, AgentGone, AgentTimeout
from .build import built_recipe
from .errors import BadInputError, BootError, UvmkitError
from .interrupts import sigterm_as_interrupt
from .log import log
from .protocol import AgentError, ExitStatus, HelloInfo
from .qemu import Accel, QemuConfig

# Always on the command line: the console on the first UART, and a panic ends QEMU at once
# (panic=-1 reboots, -no-reboot turns that into QEMU exiting).
BASE_KERNEL_ARGS = ("console=ttyS0", "panic=-1", "uvmkit.transport=serial:/dev/ttyS1")

CONSOLE_TAIL_LINES = 20

# The /info files the smoke check reads and reports, when the image has them.
INFO_FILES = ("version", "branch", "base", "build-date")

# How long a guest may take to power off after the agent acknowledged the shutdown.
POWER_OFF_SECONDS = 10.0


@dataclass(frozen=True, kw_only=True)
class BootOptions:
    """What `invoke boot` was asked to do."""

    out_dir: Path
    kernel: Path | None = None
    # The recipe whose kernel to boot; "" for the one that built out_dir.
    image: str = ""
    command: tuple[str, ...] = ()
    timeout: float = 60.0
    accel: Accel = Accel.AUTO
    cpus: int = 1
    memory_mb: int = 512
    kernel_args: str = ""
    count: int = 1
    parallel: int = 1
    measure: bool = False
    console_log: Path | None = None


@dataclass(frozen=True)
class BootResult:
    """How one boot went."""

    index: int
    hello_seconds: float
    hello: HelloInfo
    status: ExitStatus | None


@dataclass(frozen=True)
class _Plan:
    options: BootOptions
    qemu: str
    kernel: Path
    initrd: Path
    accel: Accel
    kernel_args: str
    cancel: threading.Event


class _GuestWatch:
    """The `check` hook for the agent client: raises as soon as the guest is known dead."""

    def __init__(self, proc: subprocess.Popen[bytes], console_log: Path, stderr_log: Path) -> None:
        self.proc = proc
        self.console_log = console_log
        self.stderr_log = stderr_log
        self.cancel: threading.Event | None = None
        self._console = b""
        self._offset = 0

    def console(self) -> bytes:
        """The console output so far (read incrementally)."""
        with contextlib.suppress(OSError), open(self.console_log, "rb") as f:
            f.seek(self._offset)
            data = f.read()
            self._offset += len(data)
            self._console += data
        return self._console

    def __call__(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise BootError("boot cancelled")
        # A panic with a user-supplied panic=0 would leave QEMU running: read the console too.
        if self.proc.poll() is not None or b"Kernel panic" in self.console():
            raise self.diagnose()

    def diagnose(self, waiting_for: str = "the guest agent") -> BootError:
        """Why the guest is gone, from the console and QEMU's exit."""
        # Give QEMU a moment to finish exiting after a panic; it never needs long.
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=2)
        console = self.console().decode("utf-8", "replace")
        panic = next((ln for ln in console.splitlines() if "Kernel panic" in ln), None)
        if panic is not None:
            panic = panic.split("] ", 1)[-1].strip()
            if "Attempted to kill init" in panic:
                return BootError(
                    f"the guest's /init {_init_end(panic)} before {waiting_for} answered ({panic})"
                )
            return BootError(f"the guest kernel panicked: {panic}")
        code = self.proc.returncode
        if code is None:
            return BootError(f"lost the connection to {waiting_for} while QEMU still runs")
        if code != 0:
            stderr = self.stderr_log.read_text(errors="replace").strip().splitlines()
            last = stderr[-1] if stderr else "no message"
            return BootError(f"QEMU exited with status {code}: {last}")
        return BootError(f"the guest powered off before {waiting_for} answered")

    def reached_init(self) -> bool:
        """True once the kernel has started /init (it logs that line at boot)."""
        return b"Run /init as init process" in self.console()


def _init_end(panic: str) -> str:
    """How /init ended, from the wait status the kernel prints in its panic message."""
    match = re.search(r"exitcode=0x([0-9a-f]+)", panic)
    if match is None:
        return "died"
    status = int(match.group(1), 16)
    if status & 0x7F:
        return f"was killed by signal {status & 0x7F}"
    return f"exited with status {status >> 8}"


def _recipe(options: BootOptions) -> config.Recipe | None:
    """The recipe asked for, else the one that built out_dir, else the default one."""
    if options.image:
        return config.load_recipe(options.image)
    recorded = built_recipe(options.out_dir)
    try:
        return config.load_recipe(str(recorded) if recorded else config.DEFAULT_IMAGE)
    except UvmkitError as exc:
        # Gone or changed since the build: the kernel then comes from /boot.
        log.debug("not using a recipe's kernel: %s", exc)
        return None


def boot(options: BootOptions) -> int:
    """Boot as asked; return the exit status for the command line (the command's, or 0)."""
    _validate(options)
    initrd = options.out_dir / "initrd.img"
    if not initrd.is_file():
        raise BadInputError(
            f"{initrd} does not exist", hint="run `invoke build-all`, or pass --out DIR"
        )
    qemu_path = qemu.find_qemu()
    kernel = qemu.find_kernel(options.kernel, recipe=_recipe(options))
    accel = qemu.choose_accel(options.accel, qemu_path, kernel)
    _check_console_log(_console_path(options, 0))
    host_cpus = os.cpu_count() or 1
    if options.cpus > host_cpus:
        log.warning(
            "--cpus %d is more than this machine's %d CPUs: the guest will be slow to boot "
            "(raise --timeout if it does not answer in time)",
            options.cpus,
            host_cpus,
        )
    log.info("Booting %s with %s under %s", initrd, kernel, accel.upper())
    plan = _Plan(
        options=options,
        qemu=qemu_path,
        kernel=kernel,
        initrd=initrd,
        accel=accel,
        kernel_args=" ".join([*BASE_KERNEL_ARGS, options.kernel_args]).strip(),
        cancel=threading.Event(),
    )

    with sigterm_as_interrupt():
        results = [_boot_once(plan, 0)] if options.count == 1 else _boot_many(plan)

    if options.measure or options.count > 1:
        _report_times(results, accel)
    statuses = [r.status.shell_status for r in results if r.status is not None]
    return next((s for s in statuses if s != 0), 0)


def _validate(options: BootOptions) -> None:
    checks = [
        (options.timeout > 0, "--timeout must be more than 0 seconds"),
        (options.cpus >= 1, "--cpus must be at least 1"),
        # Debian's kernel, unpacking a small initrd, needs about 100 MB before /init runs.
        (options.memory_mb >= 128, "--memory must be at least 128 MB"),
        (options.count >= 1, "--count must be at least 1"),
        (options.parallel >= 1, "--parallel must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise BadInputError(message, hint="invoke --help boot lists the options")


def _check_console_log(path: Path) -> None:
    """Refuse a console log that cannot be written before any guest starts."""
    hint = "pass --console-log a file in a writable directory"
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise BadInputError(
                    f"cannot write the console log {path}: {parent} is not a directory",
                    hint=hint,
                )
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab"):
            pass
    except OSError as exc:
        raise BadInputError(
            f"cannot write the console log {path}: {exc.strerror} ({exc.filename})", hint=hint
        ) from None


def _console_path(options: BootOptions, index: int) -> Path:
    path = options.console_log or options.out_dir / "console.log"
    if options.count == 1:
        return path
    return path.with_name(f"{path.stem}-{index + 1}{path.suffix}")


def _boot_many(plan: _Plan) -> list[BootResult]:
    options = plan.options
    results: list[BootResult] = []
    failures: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=options.parallel) as pool:
        futures = [pool.submit(_boot_once, plan, i) for i in range(options.count)]
        try:
            for future in concurrent.futures.as_completed(futures):
                try:
                    results.append(future.result())
                except BootError as exc:
                    failures.append(str(exc))
        except BaseException:
            # Ctrl-C lands in this thread; the workers stop once their QEMU is gone.
            plan.cancel.set()
            for future in futures:
                future.cancel()
            qemu.kill_all()
            raise
    if failures:
        raise BootError(
            f"{len(failures)} of {options.count} boots failed; first: {failures[0]}",
            hint=f"console logs: {_console_path(options, 0).with_name('console-N.log')}",
        )
    return sorted(results, key=lambda r: r.index)


def _report_times(results: list[BootResult], accel: Accel) -> None:
    times = [r.hello_seconds for r in results]
    log.info(
        "QEMU start to agent hello over %d boot%s under %s: min %.2f s, median %.2f s, max %.2f s",
        len(times),
        "" if len(times) == 1 else "s",
        accel.upper(),
        min(times),
        statistics.median(times),
        max(times),
    )


def _boot_once(plan: _Plan, index: int) -> BootResult:
    options = plan.options
    console_log = _console_path(options, index)
    console_log.parent.mkdir(parents=True, exist_ok=True)
    # Emptied first: a QEMU that fails before opening it must not leave the last boot's
    # lines to be read as this one's.
    console_log.write_bytes(b"")
    # The socket lives in a short private directory: unix socket paths max out at 107 bytes.
    with tempfile.TemporaryDirectory(prefix="uvmkit-boot-") as tmp:
        config = QemuConfig(
            qemu=plan.qemu,
            kernel=plan.kernel,
            initrd=plan.initrd,
            accel=plan.accel,
            cpus=options.cpus,
            memory_mb=options.memory_mb,
            kernel_args=plan.kernel_args,
            console_log=console_log,
            agent_socket=Path(tmp) / "agent.sock",
        )
        stderr_log = Path(tmp) / "qemu.stderr"
        start = time.monotonic()
        with qemu.running(config.argv(), stderr_path=stderr_log) as proc:
            watch = _GuestWatch(proc, console_log, stderr_log)
            watch.cancel = plan.cancel
            try:
                return _talk(plan, index, config.agent_socket, watch, start)
            except BootError as exc:
                _show_console_tail(watch, console_log)
                if exc.hint is None:
                    exc.hint = f"full console log: {console_log}"
                raise


def _talk(
    plan: _Plan, index: int, socket_path: Path, watch: _GuestWatch, start: float
) -> BootResult:
    options = plan.options
    deadline = start + options.timeout
    try:
        with _connect(socket_path, watch, deadline) as sock:
            client = AgentClient(sock.fileno(), sock.fileno(), check=watch)
            client.wait_ready(timeout=max(0.0, deadline - time.monotonic()))
            hello = client.hello(timeout=max(0.0, deadline - time.monotonic()))
            hello_seconds = time.monotonic() - start
            log.info(
                "guest agent %s answered after %.2f s (kernel %s, /init started %s ago)",
                hello.agent_version,
                hello_seconds,
                hello.kernel_release,
                "?" if hello.since_init_ms is None else f"{hello.since_init_ms / 1000:.2f} s",
            )

            status = None
            if options.command:
                status = client.exec(options.command, stdout=_write_stdout, stderr=_write_stderr)
                _log_status(options.command[0], status)
            else:
                _smoke_check(client, hello)

            client.shutdown()
    except AgentTimeout:
        stage = "after /init started" if watch.reached_init() else "before the kernel ran /init"
        raise BootError(
            f"timed out: no answer from the guest agent within {options.timeout:.0f} s ({stage})"
        ) from None
    except AgentGone:
        raise watch.diagnose() from None
    except AgentError as exc:
        raise BootError(exc.message) from None

    try:
        watch.proc.wait(timeout=POWER_OFF_SECONDS)
    except subprocess.TimeoutExpired:
        log.warning("the guest did not power off within %.0f s; killing QEMU", POWER_OFF_SECONDS)
    return BootResult(index, hello_seconds, hello, status)


@contextlib.contextmanager
def _connect(path: Path, watch: _GuestWatch, deadline: float) -> Iterator[socket.socket]:
    """Connect to QEMU's agent socket, which appears a moment after QEMU starts."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        while True:
            try:
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                watch()
                if time.monotonic() > deadline:
                    raise AgentTimeout(f"QEMU never opened {path}") from None
                time.sleep(0.02)
        yield sock
    finally:
        sock.close()


def _write_stdout(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _write_stderr(data: bytes) -> None:
    sys.stderr.buffer.write(data)
    sys.stderr.buffer.flush()


def _log_status(name: str, status: ExitStatus) -> None:
    if status.signal is not None:
        log.info("%s was killed by signal %d (status %d)", name, status.signal, status.shell_status)
    else:
        log.info("%s exited with status %d", name, status.shell_status)


def _smoke_check(client: AgentClient, hello: HelloInfo) -> None:
    """Without a command: the kernel answers through the agent, and /info matches the agent."""
    version = client.read_file("/proc/version")
    if not version.startswith(b"Linux version"):
        raise BootError(f"/proc/version in the guest reads {version[:40]!r}")
    if hello.kernel_release.encode() not in version:
        raise BootError(
            f"kernel release {hello.kernel_release} is not in /proc/version: {version[:80]!r}"
        )

    info = {}
    for name in INFO_FILES:
        try:
            info[name] = client.read_file(f"/info/{name}").decode("utf-8", "replace").strip()
        except AgentError as exc:
            log.debug("not in the guest: %s", exc.message)
    if "version" not in info:
        log.warning("the guest has no /info/version, so its guest layer is not from a build")
    elif info["version"] != hello.agent_version:
        # Both are written by the same build; a mismatch means a mixed-up guest layer.
        raise BootError(
            f"/info/version in the guest is {info['version']!r} but its agent says "
            f"{hello.agent_version!r}",
            hint="rebuild the image with `invoke build-all`",
        )
    log.info(
        "smoke check passed: /proc/version read through the agent; /info: %s",
        ", ".join(f"{name} {value}" for name, value in info.items()) or "none",
    )


def _show_console_tail(watch: _GuestWatch, console_log: Path) -> None:
    lines = watch.console().decode("utf-8", "replace").splitlines()
    # After a panic the last lines are its backtrace; what led up to it says more.
    end = next((i + 1 for i, ln in enumerate(lines) if "Kernel panic" in ln), len(lines))
    tail = lines[max(0, end - CONSOLE_TAIL_LINES) : end]
    print(f"--- console up to line {end} of {console_log} ---", file=sys.stderr)
    for line in tail:
        print(f"  {line.rstrip()}", file=sys.stderr)
    if end < len(lines):
        print(f"  ({len(lines) - end} more lines: the panic's backtrace)", file=sys.stderr)
    print("---", file=sys.stderr)
