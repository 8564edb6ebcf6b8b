"""End to end: `invoke build-all` from a real engine image, then `invoke boot` on its output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from uvmkit import qemu
from uvmkit.config import ROOT
from uvmkit.guest import guest_version

pytestmark = [pytest.mark.qemu, pytest.mark.engine, pytest.mark.slow]


def invoke(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """`python -m invoke ARGS` from the repository, with DOCKER_HOST and all from `env`."""
    return subprocess.run(
        [sys.executable, "-m", "invoke", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, busybox_image: str) -> tuple[Path, str]:
    """OUT of `invoke build-all --base busybox:local`, and the base reference it used."""
    out = tmp_path_factory.mktemp("built")
    # A cache of its own, so the build really runs instead of reusing another test's.
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("xdg-cache"))}

    result = invoke("build-all", "--base", busybox_image, "--out", str(out), env=env, timeout=600)

    assert result.returncode == 0, result.stderr
    assert (out / "initrd.img").is_file()
    return out, busybox_image


def boot(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    kernel = qemu.find_kernel(None)
    argv = ["boot", "--out", str(out), "--kernel", str(kernel), "--accel", "tcg", *args]
    return invoke(*argv, env=dict(os.environ), timeout=120)


def test_built_image_runs_a_command(built: tuple[Path, str]) -> None:
    out, _ = built

    result = boot(out, "--exec", "cat /proc/version")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Linux version ")
    assert result.stdout.count("\n") == 1


def test_built_image_passes_the_exit_status_on(built: tuple[Path, str]) -> None:
    out, _ = built

    result = boot(out, "--exec", "sh -c 'exit 7'")

    assert result.returncode == 7
    assert "sh exited with status 7" in result.stderr


def test_built_image_smoke_check_reads_info(built: tuple[Path, str]) -> None:
    out, base = built
    version, branch = guest_version()

    result = boot(out)

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("smoke check passed")]
    assert len(lines) == 1
    assert lines[0].startswith(
        "smoke check passed: /proc/version read through the agent; /info: "
        f"version {version}, branch {branch}, base {base}, build-date "
    )
    assert "warning" not in result.stderr


def test_zstd_initrd_boots(tmp_path: Path, busybox_image: str) -> None:
    """The kernel reads a zstd initrd as well: build one and run a command in it."""
    out = tmp_path / "out"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    built = invoke("build-all", "--base", busybox_image, "--out", str(out), "--compression",
                   "zstd", env=env, timeout=600)  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert (out / "initrd.img").read_bytes()[:4] == b"\x28\xb5\x2f\xfd"

    result = boot(out, "--exec", "cat /info/base")

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{busybox_image}\n"


def test_usr_merged_debian_image_boots(tmp_path: Path, debian_image: str) -> None:
    """A realistic base: thousands of entries, hard links, /bin a link to usr/bin."""
    out = tmp_path / "out"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    built = invoke("build-all", "--base", debian_image, "--out", str(out), env=env, timeout=600)
    assert built.returncode == 0, built.stderr

    script = (
        "readlink /bin; ls -l /usr/bin/uvmkit-agent | cut -c1-10; stat -c %a /usr/bin/passwd; "
        "grep ^ID= /etc/os-release; echo oops >&2"
    )
    result = boot(out, "--memory", "1024", "--timeout", "90", "--exec", f"sh -c '{script}'")

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["usr/bin", "-rwxr-xr-x", "4755", "ID=debian"]
    assert "oops" in result.stderr
