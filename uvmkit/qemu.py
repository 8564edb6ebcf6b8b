"""QEMU for the boot harness: find it and a kernel, pick an accelerator, run and always kill it."""

from __future__ import annotations

import contextlib
import enum
import fcntl
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import config
from .errors import BadInputError, BootError
from .log import log
from .run import not_installed

QEMU = "qemu-system-x86_64"

# From <linux/kvm.h>: _IO(KVMIO, 0x00) and _IO(KVMIO, 0x01); the API version is 12 since 2.6.22.
_KVM_GET_API_VERSION = 0xAE00
_KVM_CREATE_VM = 0xAE01
_KVM_API_VERSION = 12

# A kernel that really runs under KVM prints its banner well within this.
_KVM_PROBE_SECONDS = 4.0


class Accel(enum.StrEnum):
    """Which accelerator QEMU uses."""

    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


def find_qemu() -> str:
    """The path of qemu-system-x86_64; a ToolError naming the package when it is missing."""
    path = shutil.which(QEMU)
    if path is None:
        raise not_installed(QEMU)
    return path


def _version_key(path: Path) -> list[tuple[int, int | str]]:
    # "6.1.0-10-cloud-amd64" sorts after "6.1.0-9-...": compare digit runs as numbers.
    parts = re.split(r"(\d+)", path.name)
    return [(1, int(p)) if p.isdigit() else (0, p) for p in parts]


def find_kernel(explicit: Path | None, *, recipe: config.Recipe | None = None) -> Path:
    """--kernel, else the recipe's kernel, else the newest /boot/vmlinuz-*."""
    if explicit is not None:
        if not explicit.is_file():
            raise BadInputError(f"kernel {explicit} does not exist", hint="check --kernel")
        return check_kernel(explicit, "check --kernel")
    if recipe is not None and recipe.kernel is not None:
        hint = f"fix 'kernel' in {recipe.path} (relative to that file), or pass --kernel"
        if not recipe.kernel.is_file():
            raise BadInputError(
                f"kernel {recipe.kernel} named by image recipe {recipe.path} does not exist",
                hint=hint,
            )
        return check_kernel(recipe.kernel, hint)
    candidates = sorted(Path("/boot").glob("vmlinuz-*"), key=_version_key)
    if not candidates:
        raise BootError(
            "no kernel to boot: no --kernel, no kernel in the recipe, nothing in /boot",
            hint="apt-get install linux-image-cloud-amd64, or pass --kernel PATH",
        )
    return check_kernel(candidates[-1], "pass --kernel PATH")


# The x86 boot protocol puts "HdrS" at this offset of every bzImage QEMU can boot.
_BZIMAGE_MAGIC_OFFSET = 0x202


def check_kernel(path: Path, hint: str) -> Path:
    """`path`, once it is known to be a readable x86 Linux kernel image (a bzImage)."""
    try:
        with path.open("rb") as f:
            f.seek(_BZIMAGE_MAGIC_OFFSET)
            magic = f.read(4)
    except OSError as exc:
        raise BadInputError(f"cannot read kernel {path}: {exc.strerror}", hint=hint) from None
    if magic != b"HdrS":
        raise BadInputError(
            f"kernel {path} is not an x86 Linux kernel image (no bzImage header)", hint=hint
        )
    return path


def cpu_virtualisation_problem(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """Why this CPU cannot run KVM guests (no vmx or svm flag), or None when it says it can."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None  # nothing to go by; the probes below decide
    flags = {word for line in text.splitlines() if line.startswith("flags") for word in
             line.split()}  # fmt: skip
    if flags and not flags & {"vmx", "svm"}:
        return "the CPU offers no hardware virtualisation (no vmx or svm flag)"
    return None


def kvm_device_problem(device: str = "/dev/kvm") -> str | None:
    """Why /dev/kvm cannot create a VM, or None when it can (this does not prove it runs one)."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot open {device}: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
        if version != _KVM_API_VERSION:
            return f"{device} speaks KVM API {version}, not {_KVM_API_VERSION}"
        vm_fd = fcntl.ioctl(fd, _KVM_CREATE_VM, 0)
        os.close(vm_fd)
    except OSError as exc:
        return f"{device} refused to create a VM: {exc.strerror}"
    finally:
        os.close(fd)
    return None


def kvm_boot_problem(qemu: str, kernel: Path) -> str | None:
    """Boot the kernel briefly under KVM; why it did not print its banner, or None if it did.

    /dev/kvm can accept every ioctl and still hang the guest (nested virtualisation that
    stalls in the kernel's real-mode setup), so only a kernel that gets going counts.
    """
    argv = [
        qemu,
        *("-M", "pc", "-accel", "kvm", "-m", "128", "-nodefaults", "-display", "none"),
        *("-no-reboot", "-serial", "stdio", "-kernel", str(kernel)),
        *("-append", "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1"),
    ]
    log.debug("+ %s", " ".join(argv))
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    seen = b""
    deadline = time.monotonic() + _KVM_PROBE_SECONDS
    try:
        while time.monotonic() < deadline:
            chunk = proc.stdout.read(65536) or b""
            seen = (seen + chunk)[-4096:]
            if b"Linux version" in seen:
                return None
            if not chunk and proc.poll() is not None:
                stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                last = stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
                return f"QEMU with KVM failed: {last[0]}"
            time.sleep(0.05)
        return f"a kernel under KVM printed nothing in {_KVM_PROBE_SECONDS:.0f} s"
    finally:
        proc.kill()
        proc.wait()


_accel_cache: dict[tuple[str, Path], Accel] = {}
_accel_lock = threading.Lock()


def choose_accel(requested: Accel, qemu: str, kernel: Path) -> Accel:
    """KVM or TCG. For auto, KVM only when it provably boots a kernel; logged either way."""
    if requested is Accel.KVM:
        # Asked for by name: refuse at once what cannot work, rather than time out later.
        problem = cpu_virtualisation_problem() or kvm_device_problem()
        if problem:
            raise BootError(f"--accel kvm: KVM is not usable here: {problem}",
                            hint="use --accel auto or tcg")  # fmt: skip
    if requested is not Accel.AUTO:
        return requested
    with _accel_lock:
        key = (qemu, kernel)
        if key not in _accel_cache:
            problem = (
                cpu_virtualisation_problem()
                or kvm_device_problem()
                or kvm_boot_problem(qemu, kernel)
            )
            if problem:
                log.warning("KVM is not usable (%s); falling back to TCG, which is slower", problem)
                _accel_cache[key] = Accel.TCG
            else:
                _accel_cache[key] = Accel.KVM
        return _accel_cache[key]


@dataclass(frozen=True, kw_only=True)
class QemuConfig:
    """One QEMU invocation for the harness: console to a file, agent on a unix socket."""

    qemu: str
    kernel: Path
    initrd: Path
    accel: Accel
    cpus: int
    memory_mb: int
    kernel_args: str
    console_log: Path
    agent_socket: Path

    def argv(self) -> list[str]:
        """The qemu-system-x86_64 command line."""
        if self.accel is Accel.AUTO:
            raise ValueError("choose an accelerator before building the command line")
        return [
            self.qemu,
            *("-M", "pc", "-accel", str(self.accel)),
            *("-smp", str(self.cpus), "-m", str(self.memory_mb)),
            # No default NIC, VGA or monitor: less to start, and nothing reads stdin.
            *("-nodefaults", "-nographic", "-no-reboot"),
            *("-chardev", f"file,id=console,path={self.console_log}"),
            *("-serial", "chardev:console"),
            *("-chardev", f"socket,id=agent,path={self.agent_socket},server=on,wait=off"),
            *("-serial", "chardev:agent"),
            *("-kernel", str(self.kernel), "-initrd", str(self.initrd)),
            *("-append", self.kernel_args),
        ]


_live: set[subprocess.Popen[bytes]] = set()
_live_lock = threading.Lock()


def kill_all() -> None:
    """Kill every QEMU this process started that is still running (used on interrupt)."""
    with _live_lock:
        procs = list(_live)
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


@contextlib.contextmanager
def running(argv: Sequence[str], *, stderr_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start QEMU; whatever happens inside the block, it is killed and reaped on the way out."""
    log.debug("+ %s", " ".join(argv))
    with open(stderr_path, "wb") as stderr:
        try:
            # Its own session: a Ctrl-C reaches us, and we decide how QEMU ends.
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,
            )
        except FileNotFoundError:
            raise not_installed(argv[0]) from None
    with _live_lock:
        _live.add(proc)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        with _live_lock:
            _live.discard(proc)
