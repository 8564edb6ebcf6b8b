"""--compression and --level: every choice gives a standard stream that other tools read."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from readback import by_path, invoke, read_with_libarchive


@pytest.fixture(scope="module")
def small_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain rootfs tar: a few directories and files, one of them compressible."""
    path = tmp_path_factory.mktemp("base") / "rootfs.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("etc", "usr", "usr/share"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in [
            ("etc/os-release", b"NAME=test\n"),
            ("usr/share/words", b"uvmkit " * 50_000),
            ("usr/share/random", os.urandom(200_000)),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _build(base: Path, out: Path, tmp_path: Path, *options: str) -> None:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    result = invoke("initrd", "--base", str(base), "--out", str(out), *options, env=env)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("options", "magic", "tester"),
    [
        ((), b"\x1f\x8b", ["gzip", "-t"]),
        (("--level", "0"), b"\x1f\x8b", ["gzip", "-t"]),
        (("--compression", "zstd"), b"\x28\xb5\x2f\xfd", ["zstd", "-t", "-q"]),
        (("--compression", "zstd", "--level", "19"), b"\x28\xb5\x2f\xfd", ["zstd", "-t", "-q"]),
        (("--compression", "none"), b"070701", ["cpio", "-t", "--quiet", "-F"]),
    ],
    ids=["gzip", "gzip-0", "zstd", "zstd-19", "none"],
)
def test_each_compression_is_standard_and_complete(
    small_base: Path, tmp_path: Path, options: tuple[str, ...], magic: bytes, tester: list[str]
) -> None:
    out = tmp_path / "out"
    _build(small_base, out, tmp_path, *options)
    initrd = out / "initrd.img"

    assert initrd.read_bytes().startswith(magic)
    check = subprocess.run([*tester, str(initrd)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    entries = by_path(read_with_libarchive(initrd))
    assert entries["usr/share/words"].data == b"uvmkit " * 50_000
    assert entries["etc/os-release"].data == b"NAME=test\n"
    assert entries["dev/console"].rdev == (5, 1)


def test_gzip_header_has_no_name_or_time(small_base: Path, tmp_path: Path) -> None:
    _build(small_base, tmp_path / "out", tmp_path)
    header = (tmp_path / "out" / "initrd.img").read_bytes()[:10]
    flags, mtime = header[3], int.from_bytes(header[4:8], "little")
    assert (flags, mtime) == (0, 0)


def test_levels_trade_size(small_base: Path, tmp_path: Path) -> None:
    sizes = {}
    for level in ("0", "3"):
        out = tmp_path / f"out-{level}"
        _build(small_base, out, tmp_path, "--level", level, "--no-cache")
        sizes[level] = (out / "initrd.img").stat().st_size
    assert sizes["3"] < sizes["0"]


def test_same_input_same_bytes_for_each_compression(small_base: Path, tmp_path: Path) -> None:
    for compression in ("gzip", "zstd", "none"):
        first, second = tmp_path / f"{compression}-1", tmp_path / f"{compression}-2"
        _build(small_base, first, tmp_path, "--compression", compression, "--no-cache")
        _build(small_base, second, tmp_path, "--compression", compression, "--no-cache")
        assert (first / "initrd.img").read_bytes() == (second / "initrd.img").read_bytes()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--level", "4"), "--level 4 is out of range for gzip"),
        (("--compression", "zstd", "--level", "0"), "--level 0 is out of range for zstd"),
        (("--level", "high"), "--level 'high' is not a whole number"),
        (("--compression", "xz"), "--compression 'xz' is not known"),
    ],
)
def test_bad_options_are_one_line(
    small_base: Path, tmp_path: Path, options: tuple[str, ...], message: str
) -> None:
    result = invoke("initrd", "--base", str(small_base), "--out", str(tmp_path / "out"), *options)
    assert result.returncode == 1
    assert f"error: {message}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
