"""Boot a real kernel under QEMU (TCG) with a small test initrd, through `invoke boot`.

The initrd holds busybox, our compiled /init and agent, and /info files (tests/guestimage.py),
so these tests do not depend on the build pipeline. Each boot costs a few seconds under
TCG, so each test boots once and checks all it can from that boot.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from guestimage import EXITING_INIT, write_test_initrd

from uvmkit import qemu
from uvmkit.boot import BootOptions, boot
from uvmkit.config import ROOT
from uvmkit.errors import BootError
from uvmkit.guest import GuestBuild

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

# No test waits longer than this for one `invoke boot`, whatever the guest does.
BOOT_LIMIT = 120


@pytest.fixture(scope="module")
def kernel() -> Path:
    return qemu.find_kernel(None)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory, guest_build: GuestBuild) -> Path:
    """An OUT directory holding a bootable initrd.img with our /init and agent."""
    out = tmp_path_factory.mktemp("image")
    info = {"version": f"{guest_build.version}\n".encode(), "base": b"guestimage\n"}
    write_test_initrd(out, init=guest_build.init_path, agent=guest_build.agent_path, info=info)
    return out


def invoke_boot(
    out: Path, kernel: Path, *args: str, accel: str = "tcg"
) -> subprocess.CompletedProcess[str]:
    """Run `python -m invoke boot` from the repository, as a user would."""
    argv = [sys.executable, "-m", "invoke", "boot", "--out", str(out), "--kernel", str(kernel)]
    return subprocess.run(
        [*argv, "--accel", accel, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=BOOT_LIMIT,
    )


def test_exec_prints_the_guest_kernel_version(image: Path, kernel: Path) -> None:
    result = invoke_boot(image, kernel, "--exec", "cat /proc/version")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Linux version ")
    assert kernel.name.removeprefix("vmlinuz-") in result.stdout
    assert result.stdout.count("\n") == 1
    assert "under TCG" in result.stderr
    assert "cat exited with status 0" in result.stderr
    assert (image / "console.log").read_text().count("Run /init as init process") == 1


def test_exit_status_and_streams_reach_the_command_line(image: Path, kernel: Path) -> None:
    script = "echo to-out; echo to-err >&2; exit 7"

    result = invoke_boot(image, kernel, "--exec", f"sh -c '{script}'")

    assert result.returncode == 7
    assert result.stdout == "to-out\n"
    assert "to-err\n" in result.stderr
    assert "sh exited with status 7" in result.stderr


def test_signal_gives_128_plus_n(image: Path, kernel: Path) -> None:
    result = invoke_boot(image, kernel, "--exec", "sh -c 'kill -TERM $$'")

    assert result.returncode == 128 + 15
    assert "sh was killed by signal 15 (status 143)" in result.stderr


def test_smoke_check_with_auto_accel(image: Path, kernel: Path, guest_build: GuestBuild) -> None:
    # KVM does not work on these machines (nor in CI): /dev/kvm is there, but a guest
    # hangs. auto must notice, say so and boot under TCG; where KVM works, it uses KVM.
    result = invoke_boot(image, kernel, accel="auto")

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    if "KVM is not usable" in result.stderr:
        assert "falling back to TCG" in result.stderr
        assert "under TCG" in result.stderr
    else:
        assert "under KVM" in result.stderr
    assert (
        f"smoke check passed: /proc/version read through the agent; /info: "
        f"version {guest_build.version}, base guestimage"
    ) in result.stderr


def test_count_parallel_measure(image: Path, kernel: Path, tmp_path: Path) -> None:
    console = tmp_path / "console.log"

    result = invoke_boot(
        image, kernel, "--count", "2", "--parallel", "2", "--measure", "--console-log", str(console)
    )

    assert result.returncode == 0, result.stderr
    report = [ln for ln in result.stderr.splitlines() if ln.startswith("QEMU start to agent")]
    assert len(report) == 1
    assert report[0].startswith("QEMU start to agent hello over 2 boots under TCG: min ")
    times = [float(word) for word in report[0].replace(",", " ").split() if word[0].isdigit()]
    low, median, high = times[1:]
    assert 0 < low <= median <= high < 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["console-1.log", "console-2.log"]


def test_init_that_exits_fails_fast_with_the_cause(
    tmp_path: Path, kernel: Path, guest_build: GuestBuild, capsys: pytest.CaptureFixture[str]
) -> None:
    write_test_initrd(tmp_path, init=EXITING_INIT, agent=guest_build.agent_path)
    (tmp_path / "console.log").write_text("a stale line from an earlier boot\n")
    options = BootOptions(out_dir=tmp_path, kernel=kernel, accel=qemu.Accel.TCG, timeout=60)
    start = time.monotonic()

    with pytest.raises(BootError) as caught:
        boot(options)

    elapsed = time.monotonic() - start
    assert elapsed < 30  # the guest is known dead at once; the 60 s timeout never comes
    assert caught.value.message == (
        "the guest's /init exited with status 3 before the guest agent answered "
        "(Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000300)"
    )
    assert caught.value.hint == f"full console log: {tmp_path / 'console.log'}"
    tail = capsys.readouterr().err
    assert "--- console up to line" in tail
    assert "  test init exiting now\n" in tail
    assert "more lines: the panic's backtrace" in tail
    assert "stale line" not in tail
    assert "stale line" not in (tmp_path / "console.log").read_text()


def test_agent_that_never_answers_times_out(image: Path, kernel: Path) -> None:
    # The agent talks on the console instead, so the host never hears READY.
    start = time.monotonic()

    result = invoke_boot(
        image, kernel, "--timeout", "8", "--kernel-args", "uvmkit.transport=serial:/dev/ttyS0"
    )

    assert result.returncode == 1
    assert 8 <= time.monotonic() - start < 30
    assert (
        "error: timed out: no answer from the guest agent within 8 s (after /init started)"
        in result.stderr
    )
    assert "console up to line" in result.stderr


def test_bad_options_are_one_line_errors(tmp_path: Path, kernel: Path) -> None:
    missing = invoke_boot(tmp_path, kernel, "--exec", "true")
    unbalanced = invoke_boot(tmp_path, kernel, "--exec", "sh -c 'exit 7")
    accel = invoke_boot(tmp_path, kernel, accel="fast")

    assert missing.returncode == 1
    assert missing.stderr.splitlines() == [
        f"error: {tmp_path / 'initrd.img'} does not exist",
        "  hint: run `invoke build-all`, or pass --out DIR",
    ]
    assert unbalanced.returncode == 1
    assert unbalanced.stderr.startswith('error: --exec "sh -c \'exit 7": No closing quotation')
    assert accel.returncode == 1
    assert accel.stderr.splitlines() == [
        "error: --accel 'fast' is not one of auto, kvm, tcg",
        "  hint: auto uses KVM where it really works, else TCG",
    ]


def test_a_file_that_is_no_kernel_is_refused_before_qemu(image: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a kernel\n" * 100)
    empty = tmp_path / "empty"
    empty.touch()

    for bad in (text, empty):
        result = invoke_boot(image, bad, accel="auto")

        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            f"error: kernel {bad} is not an x86 Linux kernel image (no bzImage header)",
            "  hint: check --kernel",
        ]


def test_a_console_log_that_cannot_be_written_is_refused_before_qemu(
    image: Path, kernel: Path, tmp_path: Path
) -> None:
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a directory")
    log = in_the_way / "logs" / "console.log"

    result = invoke_boot(image, kernel, "--console-log", str(log))

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: cannot write the console log {log}: {in_the_way} is not a directory",
        "  hint: pass --console-log a file in a writable directory",
    ]
    assert in_the_way.read_text() == "not a directory"


def test_kvm_needs_a_cpu_flag(tmp_path: Path) -> None:
    without = tmp_path / "without"
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 hypervisor\n")
    with_vmx = tmp_path / "with"
    with_vmx.write_text("processor\t: 0\nflags\t\t: fpu vmx sse2\n")

    assert qemu.cpu_virtualisation_problem(str(without)) == (
        "the CPU offers no hardware virtualisation (no vmx or svm flag)"
    )
    assert qemu.cpu_virtualisation_problem(str(with_vmx)) is None


def test_kvm_asked_for_where_it_cannot_work_fails_at_once(image: Path, kernel: Path) -> None:
    problem = qemu.cpu_virtualisation_problem() or qemu.kvm_device_problem()
    result = invoke_boot(image, kernel, "--exec", "true", accel="kvm")

    if problem is None:  # a machine where KVM works: it boots under KVM
        assert result.returncode == 0, result.stderr
        assert "under KVM" in result.stderr
    else:
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            f"error: --accel kvm: KVM is not usable here: {problem}",
            "  hint: use --accel auto or tcg",
        ]


def test_an_empty_exec_is_refused(image: Path, kernel: Path) -> None:
    result = invoke_boot(image, kernel, "--exec", "  ")

    assert result.returncode == 1
    assert result.stderr.startswith("error: --exec names no command\n")
