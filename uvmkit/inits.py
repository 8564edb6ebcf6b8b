"""Make sure the image's /init is something the kernel can run, before anything is written.

The kernel runs /init from the initramfs and panics if it cannot: a file without execute
bits, a text file, a script whose interpreter is not in the image (or whose #! line ends
in a carriage return), or an ELF program whose dynamic loader is missing. Each of those
is caught here with a message that names the file and the way out. Paths resolve as the
kernel resolves them: every symlink followed, `..` at the root staying there.
"""

from __future__ import annotations

import os
import re
import struct

from .archive import Kind
from .config import InitChoice
from .errors import BadInputError, show_name
from .tree import Blob, Inode, Tree

# Linux follows #! at most this deep (BINPRM_MAX_RECURSION).
MAX_INTERPRETER_DEPTH = 4
# Linux reads this much of a file to find its #! line (BINPRM_BUF_SIZE).
SHEBANG_BYTES = 256
ELF_MAGIC = b"\x7fELF"
PT_INTERP = 3
HEAD_BYTES = 4096

INIT_HINT = {
    InitChoice.UVMKIT: "this is a bug in uvmkit's guest build",
    InitChoice.BASE: 'set init = "uvmkit" in the image recipe to boot uvmkit\'s own /init, '
    "or fix the base's /init",
}


def read_head(inode: Inode, size: int = HEAD_BYTES, offset: int = 0) -> bytes:
    """Up to `size` bytes of a regular file, from `offset`."""
    if isinstance(inode.data, Blob):
        length = max(0, min(size, inode.size - offset))
        return os.pread(inode.data.fd, length, inode.data.offset + offset)
    return (inode.data or b"")[offset : offset + size]


def check_init(tree: Tree, choice: InitChoice) -> None:
    """Raise BadInputError unless the tree's /init can be run by the kernel."""
    problem = runnable_problem(tree, b"/init")
    if problem is not None:
        raise BadInputError(f"the image's /init cannot run: {problem}", hint=INIT_HINT[choice])


def runnable_problem(tree: Tree, name: bytes, depth: int = 0) -> str | None:
    """Why the kernel could not execute `name` in this tree, or None."""
    shown = show_name(name)
    found = tree.follow(name)
    if found is None:
        return f"{shown} is not in the image (or is a dangling symlink)"
    inode = found[1]
    if inode.kind is not Kind.FILE:
        return f"{shown} is a {inode.kind.value}, not a file"
    if not inode.mode & 0o111:
        return f"{shown} is mode {inode.mode:04o}, without execute permission"
    head = read_head(inode)
    if head.startswith(ELF_MAGIC):
        interp = elf_interpreter(inode, head)
        if interp is not None and not _is_elf_program(tree, interp):
            return (
                f"{shown} needs the dynamic loader {show_name(interp)}, which is missing or "
                "not an executable ELF file"
            )
        return None
    if head.startswith(b"#!"):
        if depth >= MAX_INTERPRETER_DEPTH:
            return f"{shown}: #! interpreters nest too deep"
        interpreter = shebang_interpreter(head)
        if interpreter is None:
            return f"{shown} has a #! line longer than the {SHEBANG_BYTES} bytes Linux reads"
        if not interpreter:
            return f"{shown} starts with #! but names no interpreter"
        if interpreter.endswith(b"\r"):
            return (
                f"{shown} has CRLF line ends, so Linux looks for the interpreter "
                f"{show_name(interpreter[:-1])} with a carriage return after its name"
            )
        inner = runnable_problem(tree, interpreter, depth + 1)
        if inner is not None:
            return f"{shown} is a script for {show_name(interpreter)}, and {inner}"
        return None
    return f"{shown} is neither an ELF program nor a #! script"


def shebang_interpreter(head: bytes) -> bytes | None:
    """The interpreter a #! line names, read as Linux does; None when the line is too long.

    Only spaces, tabs and NUL end the name, so a script saved with CRLF line ends names
    "/bin/sh\\r", which does not exist: exactly what the kernel would try to run.
    """
    buf = head[:SHEBANG_BYTES].ljust(SHEBANG_BYTES, b"\0")  # the kernel zero-fills it too
    name = re.match(rb"[ \t]*([^ \t\0\n]*)", buf[2:])
    assert name is not None
    end = 2 + name.end()
    # Without a newline in the buffer, the name must end before its last byte, or Linux
    # takes it to be cut off.
    if end >= SHEBANG_BYTES - 1 and buf[end : end + 1] != b"\n":
        return None
    return name.group(1)


def _is_elf_program(tree: Tree, name: bytes) -> bool:
    found = tree.follow(name)
    if found is None or found[1].kind is not Kind.FILE or not found[1].mode & 0o111:
        return False
    return read_head(found[1], len(ELF_MAGIC)) == ELF_MAGIC


def elf_interpreter(inode: Inode, head: bytes) -> bytes | None:
    """The PT_INTERP path of an ELF file (its dynamic loader), or None for a static one."""
    if len(head) < 64:
        return None
    is_64 = head[4] == 2
    endian = "<" if head[5] == 1 else ">"
    if is_64:
        (phoff,) = struct.unpack_from(endian + "Q", head, 0x20)
        phentsize, phnum = struct.unpack_from(endian + "HH", head, 0x36)
        entry_fmt, type_at, offset_at, size_at = "IIQQQQ", 0, 2, 5
    else:
        (phoff,) = struct.unpack_from(endian + "I", head, 0x1C)
        phentsize, phnum = struct.unpack_from(endian + "HH", head, 0x2A)
        entry_fmt, type_at, offset_at, size_at = "IIIIIIII", 0, 1, 4
    table = read_head(inode, phentsize * phnum, phoff)
    if phentsize < struct.calcsize(endian + entry_fmt) or len(table) < phentsize * phnum:
        return None  # not an ELF the kernel would load either; exec reports that at boot
    for i in range(phnum):
        fields = struct.unpack_from(endian + entry_fmt, table, i * phentsize)
        if fields[type_at] == PT_INTERP:
            interp = read_head(inode, fields[size_at], fields[offset_at])
            return interp.rstrip(b"\0")
    return None
