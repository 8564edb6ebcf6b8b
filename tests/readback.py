"""Read artifacts back with readers that are not uvmkit's: libarchive and Python's tarfile."""

from __future__ import annotations

import stat
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import libarchive

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Member:
    """One archive entry as an independent reader sees it."""

    path: str
    mode: int  # with the file type bits
    uid: int
    gid: int
    size: int
    link: str | None  # symlink target, or hard link target
    hardlink: bool
    rdev: tuple[int, int]
    data: bytes

    @property
    def kind(self) -> str:
        if self.hardlink:
            return "hardlink"
        for test, name in (
            (stat.S_ISDIR, "dir"),
            (stat.S_ISLNK, "symlink"),
            (stat.S_ISREG, "file"),
            (stat.S_ISCHR, "char"),
            (stat.S_ISBLK, "block"),
            (stat.S_ISFIFO, "fifo"),
        ):
            if test(self.mode):
                return name
        return "other"


def read_with_libarchive(path: Path) -> list[Member]:
    """Every entry of an archive libarchive can read (cpio, tar; gzip, zstd), in order."""
    members = []
    with libarchive.file_reader(str(path)) as archive:
        for entry in archive:
            data = b"".join(entry.get_blocks()) if entry.isreg else b""
            link = entry.linkpath if (entry.issym or entry.islnk) else None
            members.append(
                Member(
                    path=entry.pathname.rstrip("/"),
                    mode=entry.mode,
                    uid=entry.uid,
                    gid=entry.gid,
                    size=entry.size or 0,
                    link=link,
                    hardlink=bool(entry.islnk),
                    rdev=(entry.rdevmajor, entry.rdevminor),
                    data=data,
                )
            )
    return members


def read_with_tarfile(path: Path) -> list[Member]:
    """Every entry of a (compressed) tar, read by Python's tarfile."""
    members = []
    with tarfile.open(path) as tar:
        for info in tar:
            data = b""
            if info.isreg():
                extracted = tar.extractfile(info)
                assert extracted is not None
                data = extracted.read()
            kind = {
                tarfile.DIRTYPE: stat.S_IFDIR,
                tarfile.SYMTYPE: stat.S_IFLNK,
                tarfile.CHRTYPE: stat.S_IFCHR,
                tarfile.BLKTYPE: stat.S_IFBLK,
                tarfile.FIFOTYPE: stat.S_IFIFO,
            }.get(info.type, stat.S_IFREG)
            members.append(
                Member(
                    path=info.name.rstrip("/"),
                    mode=kind | info.mode,
                    uid=info.uid,
                    gid=info.gid,
                    size=info.size,
                    link=info.linkname if (info.issym() or info.islnk()) else None,
                    hardlink=info.islnk(),
                    rdev=(info.devmajor, info.devminor),
                    data=data,
                )
            )
    return members


def by_path(members: list[Member]) -> dict[str, Member]:
    """Members keyed by path; a path that appears twice is an error in itself."""
    seen: dict[str, Member] = {}
    for member in members:
        assert member.path not in seen, f"{member.path} appears twice"
        seen[member.path] = member
    return seen


def invoke(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run `python -m invoke ARGS` as a user would; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "invoke", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
