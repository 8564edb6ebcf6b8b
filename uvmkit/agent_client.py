"""Talk to the guest agent: hello, run a command with its output streamed, read a file, shut down.

The client works over any pair of file descriptors: the unix socket behind QEMU's second
serial port, or the pipes of an agent started with `--stdio` on the host (the tests do).
Every wait is bounded and calls a `check` hook between reads, so the boot harness can
notice a guest that died instead of waiting for an answer that will never come.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from .errors import BootError
from .protocol import (
    AgentError,
    ExitStatus,
    Frame,
    FrameDecoder,
    FrameType,
    HelloInfo,
    ProtocolError,
    decode_error,
    decode_exit,
    decode_hello_reply,
    encode_exec,
    encode_frame,
    encode_hello,
    encode_string,
)

OutputSink = Callable[[bytes], None]

# How often a wait wakes up to run the check hook.
_TICK = 0.05


class AgentTimeout(BootError):
    """The agent did not answer in time."""


class AgentGone(BootError):
    """The connection to the agent closed."""


class AgentClient:
    """A connection to one agent. Requests are answered in order, one at a time."""

    def __init__(
        self,
        read_fd: int,
        write_fd: int,
        *,
        check: Callable[[], None] | None = None,
    ) -> None:
        self._read_fd = read_fd
        self._write_fd = write_fd
        self._check = check
        self._decoder = FrameDecoder()
        self._frames: list[Frame] = []
        self._next_id = 1
        self.ready = False

    # ---- low level ----------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Write raw bytes to the agent (tests use it to send malformed frames)."""
        view = memoryview(data)
        while view:
            _, writable, _ = select.select([], [self._write_fd], [], _TICK)
            if self._check:
                self._check()
            if writable:
                view = view[os.write(self._write_fd, view) :]

    def _fill(self, deadline: float | None) -> None:
        """Read once from the agent, waiting until `deadline` (monotonic) at most."""
        while True:
            remaining = _TICK if deadline is None else min(_TICK, deadline - time.monotonic())
            if remaining <= 0:
                raise AgentTimeout("the guest agent did not answer in time")
            readable, _, _ = select.select([self._read_fd], [], [], remaining)
            if not readable:
                # Only when idle: bytes already sent still count after the guest has gone.
                if self._check:
                    self._check()
                continue
            try:
                data = os.read(self._read_fd, 65536)
            except ConnectionResetError:
                data = b""
            if not data:
                raise AgentGone("the connection to the guest agent closed")
            # Before READY, skip anything that is not a frame: a serial line may carry
            # noise from before the agent set it to raw mode.
            self._frames += self._decoder.feed(data, resync=not self.ready)
            return

    def receive(self, *, timeout: float | None) -> Frame:
        """The next frame, waiting at most `timeout` seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._frames:
            self._fill(deadline)
        return self._frames.pop(0)

    def _request(self, type_: FrameType, payload: bytes = b"") -> int:
        request_id = self._next_id
        self._next_id += 1
        self.send(encode_frame(type_, request_id, payload))
        return request_id

    def _reply(self, request_id: int, what: str, *, timeout: float | None) -> Frame:
        frame = self.receive(timeout=timeout)
        if frame.type == FrameType.ERROR:
            code, message = decode_error(frame.payload)
            raise AgentError(f"guest agent refused {what}: {message}", code=code)
        if frame.request_id != request_id:
            raise ProtocolError(
                f"guest agent answered request {frame.request_id} while we waited for "
                f"{request_id} ({what})"
            )
        return frame

    @staticmethod
    def _expect(frame: Frame, type_: FrameType, what: str) -> None:
        if frame.type != type_:
            raise ProtocolError(
                f"guest agent sent frame type 0x{frame.type:02x} in reply to {what}"
            )

    # ---- requests -----------------------------------------------------------------------

    def wait_ready(self, *, timeout: float | None) -> None:
        """Wait for the READY frame the agent sends once its line is set up."""
        frame = self.receive(timeout=timeout)
        self._expect(frame, FrameType.READY, "startup")
        self.ready = True

    def hello(self, *, timeout: float | None = 10.0) -> HelloInfo:
        """Handshake: agent version, kernel release, time since boot and since /init started."""
        request_id = self._request(FrameType.HELLO, encode_hello())
        frame = self._reply(request_id, "hello", timeout=timeout)
        self._expect(frame, FrameType.HELLO_REPLY, "hello")
        return decode_hello_reply(frame.payload)

    def exec(
        self,
        argv: Sequence[str | bytes],
        *,
        env: Mapping[str, str] | Iterable[str | bytes] | None = None,
        cwd: str | bytes = "/",
        stdout: OutputSink | None = None,
        stderr: OutputSink | None = None,
        timeout: float | None = None,
    ) -> ExitStatus:
        """Run argv in the guest; stream its stdout and stderr to the sinks; return its status.

        A command that cannot be found ends with status 127, one that cannot be run with
        126, as in a shell. `timeout` bounds the whole command (None: no limit).
        """
        request_id = self._request(FrameType.EXEC, encode_exec(argv, env=env, cwd=cwd))
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            frame = self._reply(request_id, f"exec of {argv[0]!r}", timeout=remaining)
            if frame.type == FrameType.STDOUT:
                if stdout:
                    stdout(frame.payload)
            elif frame.type == FrameType.STDERR:
                if stderr:
                    stderr(frame.payload)
            elif frame.type == FrameType.EXIT:
                return decode_exit(frame.payload)
            else:
                raise ProtocolError(f"guest agent sent frame type 0x{frame.type:02x} during exec")

    def read_file(self, path: str | bytes, *, timeout: float | None = 10.0) -> bytes:
        """The contents of a regular file in the guest (at most MAX_PAYLOAD bytes)."""
        request_id = self._request(FrameType.READ_FILE, encode_string(path))
        frame = self._reply(request_id, f"reading {path!r}", timeout=timeout)
        self._expect(frame, FrameType.FILE_DATA, "read_file")
        return frame.payload

    def shutdown(self, *, timeout: float | None = 10.0) -> None:
        """Ask the agent to exit; in a VM, /init then powers the machine off."""
        request_id = self._request(FrameType.SHUTDOWN)
        frame = self._reply(request_id, "shutdown", timeout=timeout)
        self._expect(frame, FrameType.SHUTDOWN_ACK, "shutdown")
