"""The host side of the guest agent's wire format (guest/PROTOCOL.md describes it).

Every frame is a 16-byte header (magic, version, type, flags, request id, payload length,
all big-endian) and a payload of at most MAX_PAYLOAD bytes. guest/protocol.h holds the
agent's copy of these numbers; tests/test_protocol.py checks the two agree.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .errors import BootError

MAGIC = 0x55564D4B  # "UVMK"
VERSION = 1
HEADER = struct.Struct(">IBBHII")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 1 << 20
MAGIC_BYTES = MAGIC.to_bytes(4, "big")


class FrameType(enum.IntEnum):
    """What a frame carries; host requests are below 0x80, agent replies from 0x80."""

    HELLO = 0x01
    EXEC = 0x02
    READ_FILE = 0x03
    SHUTDOWN = 0x04

    READY = 0x80
    HELLO_REPLY = 0x81
    STDOUT = 0x82
    STDERR = 0x83
    EXIT = 0x84
    FILE_DATA = 0x85
    SHUTDOWN_ACK = 0x86
    ERROR = 0xFF


class ProtocolError(BootError):
    """The agent sent something that is not a valid frame or not the expected reply."""


class AgentError(BootError):
    """The agent answered a request with an ERROR frame."""

    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Frame:
    """One decoded frame. `type` stays an int so unknown types can still be reported."""

    type: int
    request_id: int
    payload: bytes = b""
    flags: int = 0


@dataclass(frozen=True)
class HelloInfo:
    """What the agent says about itself in its HELLO_REPLY."""

    protocol_version: int
    uptime_ms: int
    since_init_ms: int | None
    agent_version: str
    kernel_release: str


@dataclass(frozen=True)
class ExitStatus:
    """How a command ended: an exit code, or the number of the signal that killed it."""

    code: int | None = None
    signal: int | None = None

    @property
    def shell_status(self) -> int:
        """The status a shell would report: the code, or 128 + the signal number."""
        if self.signal is not None:
            return 128 + self.signal
        return self.code if self.code is not None else 0


def encode_frame(
    type: int,
    request_id: int,
    payload: bytes = b"",
    *,
    flags: int = 0,
    version: int = VERSION,
    magic: int = MAGIC,
) -> bytes:
    """Header plus payload. `version` and `magic` can be overridden to make bad frames."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(magic, version, type, flags, request_id, len(payload)) + payload


class FrameDecoder:
    """Turns a byte stream into frames, however it is split; refuses bad headers."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes, *, resync: bool = False) -> list[Frame]:
        """Add bytes; return every frame now complete.

        With `resync`, bytes before the first frame magic are dropped instead of refused.
        """
        self._buffer += data
        if resync:
            self._skip_to_magic()
        frames = []
        while len(self._buffer) >= HEADER_SIZE:
            magic, version, type_, flags, request_id, length = HEADER.unpack_from(self._buffer)
            if magic != MAGIC:
                raise ProtocolError(f"bad frame magic 0x{magic:08x} from the agent")
            if version != VERSION:
                raise ProtocolError(f"agent sent frame version {version}, we speak {VERSION}")
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"agent announced a {length}-byte payload (max {MAX_PAYLOAD})")
            if len(self._buffer) < HEADER_SIZE + length:
                break
            payload = bytes(self._buffer[HEADER_SIZE : HEADER_SIZE + length])
            del self._buffer[: HEADER_SIZE + length]
            frames.append(Frame(type_, request_id, payload, flags))
        return frames

    def _skip_to_magic(self) -> None:
        index = self._buffer.find(MAGIC_BYTES)
        if index < 0:
            # Keep a possible partial magic at the end.
            del self._buffer[: max(0, len(self._buffer) - len(MAGIC_BYTES) + 1)]
        else:
            del self._buffer[:index]

    @property
    def pending(self) -> int:
        """Bytes received that are not yet part of a complete frame."""
        return len(self._buffer)


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def encode_string(value: str | bytes) -> bytes:
    """A u32 length and the bytes; the agent refuses NUL bytes inside."""
    data = _as_bytes(value)
    return struct.pack(">I", len(data)) + data


class PayloadReader:
    """Reads fields from a payload; a short payload is a ProtocolError naming the frame."""

    def __init__(self, payload: bytes, what: str) -> None:
        self._data = payload
        self._pos = 0
        self._what = what

    def _take(self, size: int) -> bytes:
        if self._pos + size > len(self._data):
            raise ProtocolError(f"{self._what} from the agent is truncated")
        chunk = self._data[self._pos : self._pos + size]
        self._pos += size
        return chunk

    def u32(self) -> int:
        """The next big-endian u32."""
        value: int = struct.unpack(">I", self._take(4))[0]
        return value

    def u64(self) -> int:
        """The next big-endian u64."""
        value: int = struct.unpack(">Q", self._take(8))[0]
        return value

    def string(self) -> bytes:
        """The next length-prefixed string, as bytes."""
        return self._take(self.u32())


def encode_hello(version: int = VERSION) -> bytes:
    """HELLO payload: the highest protocol version the host speaks."""
    return struct.pack(">I", version)


def decode_hello_reply(payload: bytes) -> HelloInfo:
    """Parse a HELLO_REPLY payload."""
    reader = PayloadReader(payload, "hello reply")
    version = reader.u32()
    uptime = reader.u64()
    since_init = reader.u64()
    return HelloInfo(
        protocol_version=version,
        uptime_ms=uptime,
        since_init_ms=None if since_init == 2**64 - 1 else since_init,
        agent_version=reader.string().decode("utf-8", "replace"),
        kernel_release=reader.string().decode("utf-8", "replace"),
    )


def encode_exec(
    argv: Sequence[str | bytes],
    *,
    env: Mapping[str, str] | Iterable[str | bytes] | None = None,
    cwd: str | bytes = "/",
) -> bytes:
    """EXEC payload: argc, envc, argv strings, env strings ("KEY=VALUE"), working directory.

    With no env the command inherits the agent's environment (PATH, HOME, TERM).
    """
    if not argv:
        raise ValueError("exec needs at least one argument")
    if env is None:
        env_items: list[bytes] = []
    elif isinstance(env, Mapping):
        env_items = [f"{key}={value}".encode() for key, value in env.items()]
    else:
        env_items = [_as_bytes(item) for item in env]
    parts = [struct.pack(">II", len(argv), len(env_items))]
    parts += [encode_string(arg) for arg in argv]
    parts += [encode_string(item) for item in env_items]
    parts.append(encode_string(cwd))
    return b"".join(parts)


def decode_exit(payload: bytes) -> ExitStatus:
    """Parse an EXIT payload: kind (0 code, 1 signal), 3 reserved bytes, u32 value."""
    if len(payload) < 8:
        raise ProtocolError("exit frame from the agent is truncated")
    kind = payload[0]
    value: int = struct.unpack(">I", payload[4:8])[0]
    if kind == 0:
        return ExitStatus(code=value)
    if kind == 1:
        return ExitStatus(signal=value)
    raise ProtocolError(f"exit frame from the agent has unknown kind {kind}")


def decode_error(payload: bytes) -> tuple[int, str]:
    """Parse an ERROR payload into (errno-style code, message)."""
    reader = PayloadReader(payload, "error frame")
    code = reader.u32()
    return code, reader.string().decode("utf-8", "replace")
