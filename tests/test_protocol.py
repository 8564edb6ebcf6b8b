"""The wire format: guest/protocol.h and uvmkit/protocol.py agree, and encoding round-trips."""

from __future__ import annotations

import ast
import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uvmkit import protocol
from uvmkit.config import GUEST_DIR
from uvmkit.protocol import (
    ExitStatus,
    Frame,
    FrameDecoder,
    FrameType,
    PayloadReader,
    ProtocolError,
    decode_error,
    decode_exit,
    decode_hello_reply,
    encode_exec,
    encode_frame,
    encode_hello,
    encode_string,
)

HEADER_H = GUEST_DIR / "protocol.h"


def _c_int(expression: str) -> int:
    """Evaluate a C integer constant expression of literals, parentheses and <<."""
    python = re.sub(r"\b(0x[0-9a-fA-F]+|\d+)[uUlL]*\b", r"\1", expression)

    def value(node: ast.expr) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.LShift):
            return value(node.left) << value(node.right)
        raise ValueError(f"not a simple C constant: {expression!r}")

    return value(ast.parse(python, mode="eval").body)


def _defines() -> dict[str, int]:
    text = HEADER_H.read_text()
    return {
        name: _c_int(expr.split("/*")[0].strip())
        for name, expr in re.findall(r"^#define (PROTO_\w+) (.+)$", text, re.MULTILINE)
    }


def _enum(name: str) -> dict[str, int]:
    text = HEADER_H.read_text()
    match = re.search(rf"enum {name} \{{(.*?)\}};", text, re.DOTALL)
    assert match, f"enum {name} not found in {HEADER_H}"
    body = re.sub(r"/\*.*?\*/", "", match.group(1), flags=re.DOTALL)
    return {key: _c_int(val) for key, val in re.findall(r"(\w+)\s*=\s*([^,\s]+)", body)}


def test_header_constants_agree() -> None:
    defines = _defines()

    assert defines == {
        "PROTO_MAGIC": protocol.MAGIC,
        "PROTO_VERSION": protocol.VERSION,
        "PROTO_HEADER_SIZE": protocol.HEADER_SIZE,
        "PROTO_MAX_PAYLOAD": protocol.MAX_PAYLOAD,
    }
    assert protocol.MAGIC_BYTES == b"UVMK"
    assert protocol.HEADER_SIZE == 16
    assert protocol.MAX_PAYLOAD == 1_048_576


def test_frame_types_agree() -> None:
    c_types = {key.removeprefix("FRAME_"): val for key, val in _enum("frame_type").items()}

    assert c_types == {member.name: member.value for member in FrameType}


def test_exit_kinds_agree() -> None:
    assert _enum("exit_kind") == {"EXIT_KIND_CODE": 0, "EXIT_KIND_SIGNAL": 1}
    assert decode_exit(bytes([0, 0, 0, 0]) + struct.pack(">I", 5)) == ExitStatus(code=5)
    assert decode_exit(bytes([1, 0, 0, 0]) + struct.pack(">I", 9)) == ExitStatus(signal=9)


def test_header_layout() -> None:
    frame = encode_frame(FrameType.EXEC, 0x01020304, b"xyz", flags=0x0506)

    assert frame == b"UVMK\x01\x02\x05\x06\x01\x02\x03\x04\x00\x00\x00\x03xyz"


@settings(max_examples=200)
@given(
    frames=st.lists(
        st.tuples(
            st.integers(0, 255),
            st.integers(0, 2**32 - 1),
            st.binary(max_size=300),
            st.integers(0, 2**16 - 1),
        ),
        max_size=5,
    ),
    chunk=st.integers(1, 64),
)
def test_frames_round_trip_however_split(
    frames: list[tuple[int, int, bytes, int]], chunk: int
) -> None:
    stream = b"".join(encode_frame(t, rid, p, flags=f) for t, rid, p, f in frames)
    decoder = FrameDecoder()

    decoded = []
    for start in range(0, len(stream), chunk):
        decoded += decoder.feed(stream[start : start + chunk])

    assert decoded == [Frame(t, rid, p, f) for t, rid, p, f in frames]
    assert decoder.pending == 0


def test_decoder_keeps_a_partial_frame() -> None:
    frame = encode_frame(FrameType.STDOUT, 3, b"hello")
    decoder = FrameDecoder()

    assert decoder.feed(frame[:20]) == []
    assert decoder.pending == 20
    assert decoder.feed(frame[20:]) == [Frame(FrameType.STDOUT, 3, b"hello")]


def test_decoder_refuses_bad_headers() -> None:
    with pytest.raises(ProtocolError, match="bad frame magic 0x58564d4b"):
        FrameDecoder().feed(encode_frame(1, 1, magic=0x58564D4B))
    with pytest.raises(ProtocolError, match="frame version 2"):
        FrameDecoder().feed(encode_frame(1, 1, version=2))
    oversized = protocol.HEADER.pack(protocol.MAGIC, 1, 1, 0, 1, protocol.MAX_PAYLOAD + 1)
    with pytest.raises(ProtocolError, match="1048577-byte payload"):
        FrameDecoder().feed(oversized)


def test_decoder_resync_skips_noise_before_the_first_frame() -> None:
    ready = encode_frame(FrameType.READY, 0)
    decoder = FrameDecoder()

    # The last three bytes of the noise could be the start of a magic, so they are kept.
    assert decoder.feed(b"\r\nnoise UV", resync=True) == []
    assert decoder.pending == 3
    assert decoder.feed(b"garbage" + ready, resync=True) == [Frame(FrameType.READY, 0)]


def test_encode_frame_refuses_oversized_payload() -> None:
    with pytest.raises(ValueError, match="exceeds 1048576"):
        encode_frame(FrameType.EXEC, 1, bytes(protocol.MAX_PAYLOAD + 1))
    assert len(encode_frame(FrameType.EXEC, 1, bytes(protocol.MAX_PAYLOAD))) == 16 + 2**20


def _read_strings(reader: PayloadReader, count: int) -> list[bytes]:
    return [reader.string() for _ in range(count)]


text = st.binary(max_size=40).filter(lambda b: b"\0" not in b)


@given(
    argv=st.lists(text, min_size=1, max_size=5),
    env=st.lists(text, max_size=5),
    cwd=text,
)
def test_exec_payload_layout(argv: list[bytes], env: list[bytes], cwd: bytes) -> None:
    payload = encode_exec(argv, env=env, cwd=cwd)

    argc, envc = struct.unpack_from(">II", payload)
    reader = PayloadReader(payload[8:], "exec")
    assert (argc, envc) == (len(argv), len(env))
    assert _read_strings(reader, argc) == argv
    assert _read_strings(reader, envc) == env
    assert reader.string() == cwd
    with pytest.raises(ProtocolError, match="truncated"):
        reader.u32()


def test_exec_payload_env_mapping_and_default_cwd() -> None:
    payload = encode_exec(["env"], env={"A": "1", "B": "x=y"})

    assert payload == (
        struct.pack(">II", 1, 2)
        + encode_string("env")
        + encode_string("A=1")
        + encode_string("B=x=y")
        + encode_string("/")
    )
    with pytest.raises(ValueError, match="at least one argument"):
        encode_exec([])


def test_hello_round_trip() -> None:
    assert encode_hello() == b"\x00\x00\x00\x01"
    payload = (
        struct.pack(">IQQ", 1, 2345, 2**64 - 1) + encode_string("abc123") + encode_string("6.1.0")
    )

    info = decode_hello_reply(payload)

    assert info.protocol_version == 1
    assert info.uptime_ms == 2345
    assert info.since_init_ms is None
    assert info.agent_version == "abc123"
    assert info.kernel_release == "6.1.0"
    assert (
        decode_hello_reply(payload[:4] + struct.pack(">QQ", 5, 3) + payload[20:]).since_init_ms == 3
    )
    with pytest.raises(ProtocolError, match="hello reply from the agent is truncated"):
        decode_hello_reply(payload[:-1])


def test_exit_and_error_decoding() -> None:
    assert decode_exit(b"\x00\x00\x00\x00\x00\x00\x00\x07").shell_status == 7
    assert decode_exit(b"\x01\x00\x00\x00\x00\x00\x00\x09").shell_status == 137
    assert ExitStatus(code=0).shell_status == 0
    with pytest.raises(ProtocolError, match="truncated"):
        decode_exit(b"\x00" * 7)
    with pytest.raises(ProtocolError, match="unknown kind 2"):
        decode_exit(b"\x02" + b"\x00" * 7)

    assert decode_error(struct.pack(">I", 2) + encode_string("no such file")) == (
        2,
        "no such file",
    )
    with pytest.raises(ProtocolError, match="error frame from the agent is truncated"):
        decode_error(struct.pack(">I", 2) + struct.pack(">I", 10) + b"short")
