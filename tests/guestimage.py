"""A small bootable initrd for tests: busybox, our /init and agent, a few /info files.

Written with our own newc writer so the test image does not depend on the build pipeline;
the boot tests can also be pointed at a real `invoke build-all` output instead.
"""

from __future__ import annotations

import gzip
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

BUSYBOX = Path("/bin/busybox")

# What a shell script as /init looks like when it exits straight away.
EXITING_INIT = b"#!/bin/sh\necho 'test init exiting now'\nexit 3\n"


@dataclass
class _Entry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


@dataclass
class NewcWriter:
    """Collects entries and writes them as a newc ("070701") cpio archive."""

    entries: list[_Entry] = field(default_factory=list)

    def directory(self, name: str, mode: int = 0o755) -> None:
        self.entries.append(_Entry(name, stat.S_IFDIR | mode))

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.entries.append(_Entry(name, stat.S_IFREG | mode, data))

    def symlink(self, name: str, target: str) -> None:
        self.entries.append(_Entry(name, stat.S_IFLNK | 0o777, target.encode()))

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.entries.append(_Entry(name, stat.S_IFCHR | mode, rdev=(major, minor)))

    def to_bytes(self) -> bytes:
        out = bytearray()
        for ino, entry in enumerate([*self.entries, _Entry("TRAILER!!!", 0)], start=1):
            name = entry.name.encode() + b"\0"
            fields = [
                ino if entry.mode else 0,
                entry.mode,
                0,  # uid
                0,  # gid
                2 if stat.S_ISDIR(entry.mode) else 1,
                0,  # mtime
                len(entry.data),
                0,  # devmajor
                0,  # devminor
                entry.rdev[0],
                entry.rdev[1],
                len(name),
                0,  # check
            ]
            out += b"070701" + b"".join(b"%08X" % value for value in fields) + name
            out += b"\0" * (-len(out) % 4)
            out += entry.data
            out += b"\0" * (-len(out) % 4)
        return bytes(out)


def busybox_applets() -> list[str]:
    """The applets Debian's static busybox provides."""
    proc = subprocess.run(
        [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True, stdin=None
    )
    return [name for name in proc.stdout.split() if name and "/" not in name]


def write_test_initrd(
    out_dir: Path,
    *,
    init: Path | bytes,
    agent: Path,
    info: dict[str, bytes] | None = None,
) -> Path:
    """Write out_dir/initrd.img (gzip'd newc) and return its path.

    `init` is either a compiled /init or the bytes of a script to run as /init.
    """
    writer = NewcWriter()
    for directory in ("bin", "dev", "etc", "info", "proc", "root", "sbin", "sys", "usr"):
        writer.directory(directory)
    # /run and /tmp are left out on purpose: /init must create missing mountpoints.
    writer.char_device("dev/console", 5, 1)
    writer.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for applet in busybox_applets():
        if applet != "busybox":
            writer.symlink(f"bin/{applet}", "busybox")
    init_data = init.read_bytes() if isinstance(init, Path) else init
    writer.file("init", init_data, 0o755)
    writer.file("bin/uvmkit-agent", agent.read_bytes(), 0o755)
    for name, data in (info or {"test": b"guestimage\n"}).items():
        writer.file(f"info/{name}", data)

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "initrd.img"
    # mtime=0 keeps the image the same from run to run.
    path.write_bytes(gzip.compress(writer.to_bytes(), compresslevel=1, mtime=0))
    return path
