"""The guest agent, compiled as for the guest and run on the host with --stdio.

The first half drives it with the host's AgentClient, as the boot harness does. The
second feeds it hostile bytes (bad headers, lying lengths, truncation, garbage payloads)
and checks it answers ERROR or closes with status 0 or 2: never a crash, never a hang,
never more memory than its fixed buffers.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uvmkit.agent_client import AgentClient
from uvmkit.guest import GuestBuild
from uvmkit.protocol import (
    HEADER,
    MAGIC,
    MAX_PAYLOAD,
    VERSION,
    AgentError,
    ExitStatus,
    Frame,
    FrameDecoder,
    FrameType,
    decode_error,
    encode_frame,
    encode_hello,
    encode_string,
)

# The agent sees a small, known environment, so inheritance can be told from replacement.
AGENT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/agent-home", "LC_ALL": "C"}

# Hostile input may happen to spell a valid EXEC; with nothing on PATH it finds no program.
HOSTILE_ENV = {"PATH": "/nonexistent-uvmkit-path"}

# Each hostile case must finish well within this; a hang fails the case, not the suite.
CASE_TIMEOUT = 5.0

# The agent's buffers are static (about 5 MB); it must never need more address space.
ADDRESS_SPACE_LIMIT = 64 << 20

REQUEST_TYPES = {FrameType.HELLO, FrameType.EXEC, FrameType.READ_FILE, FrameType.SHUTDOWN}
REPLY_TYPES = {t for t in FrameType if t not in REQUEST_TYPES and t is not FrameType.READY}


@dataclass
class RunningAgent:
    proc: subprocess.Popen[bytes]
    client: AgentClient


def _ignore_sigchld() -> None:
    # An ignored signal stays ignored across exec, so the agent inherits this.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)


@contextlib.contextmanager
def running_agent(
    agent: Path, *, env: dict[str, str] | None = None, ignore_sigchld: bool = False
) -> Iterator[RunningAgent]:
    """Start `agent --stdio`, wait for READY; stop it however the test ends."""
    proc = subprocess.Popen(
        [str(agent), "--stdio"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env or AGENT_ENV,
        preexec_fn=_ignore_sigchld if ignore_sigchld else None,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        client = AgentClient(proc.stdout.fileno(), proc.stdin.fileno())
        client.wait_ready(timeout=CASE_TIMEOUT)
        yield RunningAgent(proc, client)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=CASE_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@pytest.fixture
def agent(guest_build: GuestBuild) -> Iterator[RunningAgent]:
    with running_agent(guest_build.agent_path) as running:
        yield running


@dataclass
class Output:
    stdout: bytearray
    stderr: bytearray
    stdout_frames: list[int]


def run(
    client: AgentClient,
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str = "/",
) -> tuple[ExitStatus, Output]:
    """Run argv through the agent, collecting its output."""
    out = Output(bytearray(), bytearray(), [])

    def on_stdout(data: bytes) -> None:
        out.stdout += data
        out.stdout_frames.append(len(data))

    status = client.exec(
        argv, env=env, cwd=cwd, stdout=on_stdout, stderr=out.stderr.extend, timeout=10
    )
    return status, out


# ---- talking to the agent ---------------------------------------------------------------


def test_hello(agent: RunningAgent, guest_build: GuestBuild) -> None:
    before = time.monotonic()
    info = agent.client.hello()
    after = time.monotonic()

    assert info.protocol_version == VERSION
    assert info.agent_version == guest_build.version
    assert info.kernel_release == os.uname().release
    # The agent's uptime is CLOCK_MONOTONIC, the same clock as time.monotonic().
    assert int(before * 1000) - 1 <= info.uptime_ms <= int(after * 1000) + 1
    assert info.since_init_ms is None


def test_hello_reports_time_since_init(guest_build: GuestBuild) -> None:
    start_ms = int(time.monotonic() * 1000) - 1500
    env = {**AGENT_ENV, "UVMKIT_INIT_START_MS": str(start_ms)}

    with running_agent(guest_build.agent_path, env=env) as running:
        info = running.client.hello()

    assert info.since_init_ms is not None
    assert 1500 <= info.since_init_ms < 1500 + 5000


def test_hello_refuses_version_zero(agent: RunningAgent) -> None:
    agent.client.send(encode_frame(FrameType.HELLO, 41, encode_hello(0)))

    frame = agent.client.receive(timeout=CASE_TIMEOUT)

    assert (frame.type, frame.request_id) == (FrameType.ERROR, 41)
    code, message = decode_error(frame.payload)
    assert code == errno.EPROTONOSUPPORT
    assert message == "hello: protocol version 0 is not supported"


def test_exit_code(agent: RunningAgent) -> None:
    status, _ = run(agent.client, ["sh", "-c", "exit 7"])

    assert status == ExitStatus(code=7)
    assert status.shell_status == 7


def test_killed_by_signal(agent: RunningAgent) -> None:
    status, _ = run(agent.client, ["sh", "-c", "kill -9 $$"])

    assert status == ExitStatus(signal=9)
    assert status.shell_status == 137


def test_exit_status_survives_an_inherited_ignored_sigchld(guest_build: GuestBuild) -> None:
    with running_agent(guest_build.agent_path, ignore_sigchld=True) as running:
        status, _ = run(running.client, ["sh", "-c", "exit 7"])

    assert status == ExitStatus(code=7)


def test_command_gets_default_sigpipe(agent: RunningAgent) -> None:
    # The agent ignores SIGPIPE for itself; a command must not inherit that.
    status, out = run(agent.client, ["sh", "-c", "yes | head -c 3"])

    assert status == ExitStatus(code=0)
    assert bytes(out.stdout) == b"y\ny"


def test_stdout_and_stderr_kept_apart(agent: RunningAgent) -> None:
    status, out = run(agent.client, ["sh", "-c", "echo out; echo err >&2; echo more; exit 3"])

    assert status == ExitStatus(code=3)
    assert bytes(out.stdout) == b"out\nmore\n"
    assert bytes(out.stderr) == b"err\n"


def test_large_output_arrives_whole_in_bounded_frames(agent: RunningAgent) -> None:
    status, out = run(agent.client, ["head", "-c", "300000", "/dev/urandom"])

    assert status == ExitStatus(code=0)
    assert len(out.stdout) == 300_000
    assert max(out.stdout_frames) <= 65536


def test_env_replaces_the_agents(agent: RunningAgent) -> None:
    env = {"PATH": AGENT_ENV["PATH"], "GREETING": "hello world"}

    status, out = run(agent.client, ["sh", "-c", 'echo "$GREETING"; echo "home=$HOME"'], env=env)

    assert status == ExitStatus(code=0)
    assert bytes(out.stdout) == b"hello world\nhome=\n"


def test_no_env_inherits_the_agents(agent: RunningAgent) -> None:
    status, out = run(agent.client, ["sh", "-c", 'echo "home=$HOME"'])

    assert status == ExitStatus(code=0)
    assert bytes(out.stdout) == b"home=/agent-home\n"


def test_cwd(agent: RunningAgent, tmp_path: Path) -> None:
    status, out = run(agent.client, ["pwd", "-P"], cwd=str(tmp_path))
    _, root = run(agent.client, ["pwd", "-P"], cwd="")

    assert status == ExitStatus(code=0)
    assert bytes(out.stdout) == os.fsencode(tmp_path.resolve()) + b"\n"
    assert bytes(root.stdout) == b"/\n"


def test_bad_cwd_is_refused_before_running(agent: RunningAgent, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    a_file = tmp_path / "file"
    a_file.write_text("")

    with pytest.raises(AgentError, match=f"working directory {missing}") as not_found:
        run(agent.client, ["true"], cwd=str(missing))
    with pytest.raises(AgentError, match="Not a directory") as not_dir:
        run(agent.client, ["true"], cwd=str(a_file))

    assert not_found.value.code == errno.ENOENT
    assert not_dir.value.code == errno.ENOTDIR


def test_missing_and_unrunnable_commands(agent: RunningAgent, tmp_path: Path) -> None:
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")

    missing, missing_out = run(agent.client, ["no-such-command-uvmkit"])
    unrunnable, _ = run(agent.client, [str(script)])

    assert missing == ExitStatus(code=127)
    assert b"no-such-command-uvmkit" in missing_out.stderr
    assert unrunnable == ExitStatus(code=126)


def test_stdin_is_empty(agent: RunningAgent) -> None:
    status, out = run(agent.client, ["wc", "-c"])

    assert status == ExitStatus(code=0)
    assert out.stdout.strip() == b"0"


def test_exit_does_not_wait_for_background_processes(agent: RunningAgent) -> None:
    start = time.monotonic()
    quiet, quiet_out = run(agent.client, ["sh", "-c", "sleep 60 & echo $!"])
    os.kill(int(quiet_out.stdout), signal.SIGKILL)
    # A leftover that writes without end must not keep the agent streaming either.
    noisy_bytes = 0

    def count(data: bytes) -> None:
        nonlocal noisy_bytes
        noisy_bytes += len(data)

    noisy = agent.client.exec(["sh", "-c", "yes &"], stdout=count, timeout=10)
    elapsed = time.monotonic() - start

    assert quiet == ExitStatus(code=0)
    assert noisy == ExitStatus(code=0)
    assert elapsed < 3
    # After the shell's exit, at most one pipe's worth (1 MiB at the very most) follows.
    assert noisy_bytes <= MAX_PAYLOAD
    assert agent.client.hello().protocol_version == VERSION


def test_slow_host_still_gets_all_output(agent: RunningAgent) -> None:
    # More than the host's pipe holds, written at once; the command exits long before
    # the host has read it, and none of it may be lost.
    script = "head -c 60000 /dev/zero; head -c 60000 /dev/zero >&2"
    received = bytearray()

    def slow(data: bytes) -> None:
        if not received:
            time.sleep(1.5)
        received.extend(data)

    status = agent.client.exec(["sh", "-c", script], stdout=slow, stderr=slow, timeout=10)

    assert status == ExitStatus(code=0)
    assert len(received) == 120_000


def test_requests_in_sequence(agent: RunningAgent) -> None:
    statuses = [run(agent.client, ["sh", "-c", f"exit {n}"])[0].code for n in range(5)]

    assert statuses == [0, 1, 2, 3, 4]


def test_read_file(agent: RunningAgent, tmp_path: Path) -> None:
    data = bytes(range(256)) * 300
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")

    assert agent.client.read_file(str(path)) == data
    assert agent.client.read_file(str(empty)) == b""
    # /proc files report size 0; the agent reads them to the end anyway.
    status = agent.client.read_file(f"/proc/{agent.proc.pid}/status")
    assert status.startswith(b"Name:\tuvmkit-agent\n")


def test_read_file_refusals(agent: RunningAgent, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big"
    big.write_bytes(bytes(MAX_PAYLOAD + 1))
    exact = tmp_path / "exact"
    exact.write_bytes(b"x" * MAX_PAYLOAD)

    codes = {}
    for name, path in [
        ("missing", tmp_path / "missing"),
        ("directory", tmp_path),
        ("fifo", fifo),
        ("big", big),
    ]:
        with pytest.raises(AgentError) as caught:
            agent.client.read_file(str(path))
        codes[name] = caught.value.code

    assert codes == {
        "missing": errno.ENOENT,
        "directory": errno.EINVAL,
        "fifo": errno.EINVAL,
        "big": errno.EFBIG,
    }
    assert agent.client.read_file(str(exact)) == b"x" * MAX_PAYLOAD


def test_shutdown(guest_build: GuestBuild) -> None:
    with running_agent(guest_build.agent_path) as running:
        running.client.shutdown()

        assert running.proc.wait(timeout=CASE_TIMEOUT) == 0
        assert running.proc.stdout is not None
        assert running.proc.stdout.read() == b""


def test_host_hanging_up_between_frames_ends_cleanly(guest_build: GuestBuild) -> None:
    with running_agent(guest_build.agent_path) as running:
        assert running.proc.stdin is not None
        running.proc.stdin.close()

        assert running.proc.wait(timeout=CASE_TIMEOUT) == 0


def test_memory_stays_bounded_under_large_frames(agent: RunningAgent) -> None:
    many_args = ["true", *["x"] * 150_000]
    for request_id in range(1, 9):
        agent.client.send(encode_frame(0x7F, request_id, bytes(MAX_PAYLOAD)))
        assert agent.client.receive(timeout=CASE_TIMEOUT).type == FrameType.ERROR
    status, _ = run(agent.client, many_args)

    status_text = Path(f"/proc/{agent.proc.pid}/status").read_text()
    peak_kb = int(next(ln for ln in status_text.splitlines() if ln.startswith("VmHWM:")).split()[1])
    assert status == ExitStatus(code=0)
    assert peak_kb < 16 * 1024


@pytest.mark.slow
def test_host_stalling_mid_frame_is_dropped(guest_build: GuestBuild) -> None:
    with running_agent(guest_build.agent_path) as running:
        running.client.send(encode_frame(FrameType.HELLO, 1, encode_hello())[:9])
        start = time.monotonic()

        returncode = running.proc.wait(timeout=20)

        # The agent gives a frame that has begun 10 s to arrive.
        assert returncode == 2
        assert 9 <= time.monotonic() - start < 15


# ---- hostile input ----------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    returncode: int
    replies: list[Frame]


def feed(agent: Path, data: bytes, workdir: Path) -> Outcome:
    """Run a fresh agent on `data` then end of input; check what any input must give."""
    proc = subprocess.Popen(
        [str(agent), "--stdio"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=HOSTILE_ENV,
        cwd=workdir,
    )
    resource.prlimit(proc.pid, resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))
    try:
        stdout, stderr = proc.communicate(data, timeout=CASE_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"the agent hung on {len(data)} bytes starting {data[:48]!r}")

    # 0: a clean end; 2: it refused the stream. A negative code would be a crash.
    assert proc.returncode in (0, 2), f"agent ended with {proc.returncode}: {stderr!r}"
    decoder = FrameDecoder()
    frames = decoder.feed(stdout)
    assert decoder.pending == 0
    assert frames[:1] == [Frame(FrameType.READY, 0)]
    for frame in frames[1:]:
        assert frame.type in REPLY_TYPES
        if frame.type == FrameType.ERROR:
            code, message = decode_error(frame.payload)
            assert code > 0 and message
    return Outcome(proc.returncode, frames[1:])


def header(
    *,
    magic: int = MAGIC,
    version: int = VERSION,
    type_: int = FrameType.HELLO,
    flags: int = 0,
    request_id: int = 1,
    length: int = 0,
) -> bytes:
    return HEADER.pack(magic, version, type_, flags, request_id, length)


def only_error(outcome: Outcome) -> int:
    """The one reply must be an ERROR; return its code."""
    assert [f.type for f in outcome.replies] == [FrameType.ERROR]
    return decode_error(outcome.replies[0].payload)[0]


PROBE = encode_frame(FrameType.HELLO, 0xABCD, encode_hello())

u8 = st.integers(0, 255)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
hostile = settings(max_examples=100, deadline=None)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty directory for hostile agents to run in."""
    return tmp_path_factory.mktemp("hostile")


@hostile
@given(magic=u32.filter(lambda m: m != MAGIC), rest=st.binary(max_size=64))
def test_bad_magic(guest_build: GuestBuild, workdir: Path, magic: int, rest: bytes) -> None:
    outcome = feed(guest_build.agent_path, header(magic=magic) + rest + PROBE, workdir)

    assert outcome.returncode == 2
    assert only_error(outcome) == errno.EPROTO
    assert outcome.replies[0].request_id == 0


@hostile
@given(version=u8.filter(lambda v: v != VERSION), type_=u8, request_id=u32)
def test_bad_version(
    guest_build: GuestBuild, workdir: Path, version: int, type_: int, request_id: int
) -> None:
    data = header(version=version, type_=type_, request_id=request_id) + PROBE

    outcome = feed(guest_build.agent_path, data, workdir)

    assert outcome.returncode == 2
    assert only_error(outcome) == errno.EPROTONOSUPPORT
    assert outcome.replies[0].request_id == request_id


@hostile
@given(length=st.integers(MAX_PAYLOAD + 1, 2**32 - 1), type_=u8)
def test_oversized_length(guest_build: GuestBuild, workdir: Path, length: int, type_: int) -> None:
    # Far less payload than announced follows: the agent must refuse, not wait for it.
    data = header(type_=type_, length=length) + bytes(1000)

    outcome = feed(guest_build.agent_path, data, workdir)

    assert outcome.returncode == 2
    assert only_error(outcome) == errno.EMSGSIZE


@hostile
@given(cut=st.integers(1, 15), type_=u8, length=st.integers(0, MAX_PAYLOAD))
def test_truncated_header(
    guest_build: GuestBuild, workdir: Path, cut: int, type_: int, length: int
) -> None:
    data = header(type_=type_, length=length)[:cut]

    outcome = feed(guest_build.agent_path, data, workdir)

    assert outcome == Outcome(2, [])


@hostile
@given(
    type_=u8,
    payload=st.binary(min_size=1, max_size=3000),
    keep=st.floats(0, 1, exclude_max=True),
)
def test_truncated_payload(
    guest_build: GuestBuild, workdir: Path, type_: int, payload: bytes, keep: float
) -> None:
    data = header(type_=type_, length=len(payload)) + payload[: int(len(payload) * keep)]

    outcome = feed(guest_build.agent_path, data, workdir)

    assert outcome == Outcome(2, [])


@hostile
@given(
    type_=u8.filter(lambda t: t not in REQUEST_TYPES),
    flags=u16,
    request_id=u32,
    payload=st.binary(max_size=500),
)
def test_unknown_type_is_refused_and_the_session_goes_on(
    guest_build: GuestBuild,
    workdir: Path,
    type_: int,
    flags: int,
    request_id: int,
    payload: bytes,
) -> None:
    data = encode_frame(type_, request_id, payload, flags=flags) + PROBE

    outcome = feed(guest_build.agent_path, data, workdir)

    assert outcome.returncode == 0
    assert [(f.type, f.request_id) for f in outcome.replies] == [
        (FrameType.ERROR, request_id),
        (FrameType.HELLO_REPLY, 0xABCD),
    ]
    assert decode_error(outcome.replies[0].payload)[0] == errno.ENOSYS


# What a request may legitimately be answered with, besides ERROR.
ANSWERS = {
    FrameType.HELLO: {FrameType.HELLO_REPLY},
    FrameType.EXEC: {FrameType.STDOUT, FrameType.STDERR, FrameType.EXIT},
    FrameType.READ_FILE: {FrameType.FILE_DATA},
}


def check_answered_then_probe(outcome: Outcome, request: FrameType) -> None:
    """Replies to request 1 (ERROR, or a proper answer), then the probe's HELLO_REPLY."""
    assert outcome.returncode == 0
    *answer, probe = outcome.replies
    assert (probe.type, probe.request_id) == (FrameType.HELLO_REPLY, 0xABCD)
    assert answer, "the request got no reply"
    assert all(f.request_id == 1 for f in answer)
    types = [f.type for f in answer]
    if types != [FrameType.ERROR]:
        assert set(types) <= ANSWERS[request]
        if request is FrameType.EXEC:
            assert types[-1] == FrameType.EXIT and types.count(FrameType.EXIT) == 1
        else:
            assert len(types) == 1


@settings(hostile, max_examples=200)
@given(
    request=st.sampled_from([FrameType.HELLO, FrameType.EXEC, FrameType.READ_FILE]),
    payload=st.binary(max_size=300),
)
def test_garbage_payloads(
    guest_build: GuestBuild, workdir: Path, request: FrameType, payload: bytes
) -> None:
    data = encode_frame(request, 1, payload) + PROBE

    check_answered_then_probe(feed(guest_build.agent_path, data, workdir), request)


@st.composite
def exec_payloads(draw: st.DrawFn) -> bytes:
    """An EXEC payload that is valid, or one mutation away from it."""
    strings = st.binary(max_size=12)  # a NUL byte now and then
    argv = draw(st.lists(strings, min_size=1, max_size=3))
    env = draw(st.lists(strings, max_size=3))
    cwd = draw(st.one_of(st.sampled_from([b"", b"/", b"/nonexistent", b"/proc/version"]), strings))
    counts = [len(argv), len(env)]
    fields = [encode_string(item) for item in [*argv, *env, cwd]]

    mutation = draw(st.sampled_from(["none", "count", "length", "truncate"]))
    if mutation == "count":
        which = draw(st.integers(0, 1))
        counts[which] = draw(st.one_of(st.integers(0, 8), u32))
    elif mutation == "length":
        index = draw(st.integers(0, len(fields) - 1))
        fields[index] = struct.pack(">I", draw(u32)) + fields[index][4:]
    payload = struct.pack(">II", *counts) + b"".join(fields)
    if mutation == "truncate":
        payload = payload[: draw(st.integers(0, len(payload) - 1))]
    return payload


@settings(hostile, max_examples=200)
@given(payload=exec_payloads())
def test_malformed_exec_payloads(guest_build: GuestBuild, workdir: Path, payload: bytes) -> None:
    data = encode_frame(FrameType.EXEC, 1, payload) + PROBE

    check_answered_then_probe(feed(guest_build.agent_path, data, workdir), FrameType.EXEC)


@settings(hostile, max_examples=200)
@given(data=st.binary(max_size=2000))
def test_random_bytes(guest_build: GuestBuild, workdir: Path, data: bytes) -> None:
    feed(guest_build.agent_path, data, workdir)


frame_fields = st.tuples(
    st.one_of(st.just(MAGIC), u32),
    st.one_of(st.just(VERSION), u8),
    st.one_of(st.sampled_from(sorted(REQUEST_TYPES - {FrameType.SHUTDOWN})), u8),
    u16,
    u32,
    st.binary(max_size=200),
    st.one_of(st.none(), u32),
)


@settings(hostile, max_examples=200)
@given(frames=st.lists(frame_fields, max_size=6))
def test_random_frame_sequences(
    guest_build: GuestBuild,
    workdir: Path,
    frames: list[tuple[int, int, int, int, int, bytes, int | None]],
) -> None:
    data = b"".join(
        HEADER.pack(magic, version, type_, flags, rid, len(payload) if length is None else length)
        + payload
        for magic, version, type_, flags, rid, payload, length in frames
    )

    outcome = feed(guest_build.agent_path, data, workdir)

    well_formed = all(
        magic == MAGIC and version == VERSION and type_ != FrameType.SHUTDOWN and length is None
        for magic, version, type_, _, _, _, length in frames
    )
    if well_formed:
        # Every frame is answered, whatever its payload, and the session ends cleanly.
        assert outcome.returncode == 0
        assert {f.request_id for f in outcome.replies} == {rid for _, _, _, _, rid, *_ in frames}
