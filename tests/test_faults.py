"""Faults in the middle of a build: a broken export stream, a full disk, a dead engine.

Each must end with a non-zero exit and one clear line, leave the previous artifacts as
they were, leave no temporary files in out/, and (while the engine lives) no container.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from helpers import small_tmpfs
from readback import invoke

from uvmkit.engine import EXPORT_LABEL
from uvmkit.engine_images import PRIVATE_SOCKET, SYSTEM_SOCKET

pytestmark = [pytest.mark.engine, pytest.mark.slow]

CUT_AFTER = 8 * 1024 * 1024


def _engine_socket() -> str:
    host = os.environ.get("DOCKER_HOST", "")
    if host.startswith("unix://"):
        return host.removeprefix("unix://")
    for candidate in (SYSTEM_SOCKET, PRIVATE_SOCKET):
        if candidate.exists():
            return str(candidate)
    pytest.fail("these tests need the engine on a unix socket; ./setup.sh test starts one")


@contextlib.contextmanager
def cutting_proxy(target: str, path: Path) -> Iterator[list[int]]:
    """A unix socket relay to the engine that hangs up any reply longer than CUT_AFTER.

    Only an export is that long, so everything else the build asks works as usual.
    Yields a list that gets one item per connection it cut.
    """
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(16)
    cuts: list[int] = []
    stop = threading.Event()

    def pump(src: socket.socket, dst: socket.socket, *, limit: bool) -> None:
        sent = 0
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                sent += len(data)
                if limit and sent > CUT_AFTER:
                    cuts.append(sent)
                    break
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(target)
            threading.Thread(target=pump, args=(client, upstream), kwargs={"limit": False},
                             daemon=True).start()  # fmt: skip
            threading.Thread(target=pump, args=(upstream, client), kwargs={"limit": True},
                             daemon=True).start()  # fmt: skip

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield cuts
    finally:
        stop.set()
        listener.close()


def _previous_build(out: Path) -> dict[str, bytes]:
    out.mkdir(parents=True)
    previous = {"initrd.img": b"previous initrd", "manifest.json": b"{}\n"}
    for name, data in previous.items():
        (out / name).write_bytes(data)
    return previous


def _contents(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir()}


def _labelled(client: docker.DockerClient) -> set[str]:
    return {str(c.id) for c in client.containers.list(all=True, filters={"label": EXPORT_LABEL})}


def test_export_stream_cut_half_way(
    debian_image: str, engine: docker.DockerClient, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    previous = _previous_build(out)
    before = _labelled(engine)
    proxy = Path("/tmp") / f"uvmkit-proxy-{os.getpid()}.sock"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), DOCKER_HOST=f"unix://{proxy}")
    try:
        with cutting_proxy(_engine_socket(), proxy) as cuts:
            result = invoke("build-all", "--base", debian_image, "--out", str(out), env=env)
    finally:
        proxy.unlink(missing_ok=True)

    assert cuts, "the proxy never cut a reply"
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"error: the export of image {debian_image} broke off after" in result.stderr
    assert _contents(out) == previous
    assert _labelled(engine) == before
    # Nothing half-exported stays in the cache to be trusted later.
    exports = tmp_path / "cache" / "uvmkit" / "exports"
    assert not exports.exists() or list(exports.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 20 MB tmpfs: far too small for a Debian base's artifacts."""
    with small_tmpfs(tmp_path / "small", "20m") as mount:
        yield mount


def test_disk_fills_under_out(debian_image: str, small_disk: Path, tmp_path: Path) -> None:
    out = small_disk / "out"
    previous = _previous_build(out)
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))

    result = invoke("build-all", "--base", debian_image, "--out", str(out), env=env)

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "error: no space left on the device while writing" in result.stderr
    assert _contents(out) == previous


def test_full_cache_disk_is_named(busybox_image: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with small_tmpfs(tmp_path / "cache", "1m") as cache:
        env = dict(os.environ, XDG_CACHE_HOME=str(cache))
        result = invoke("build-all", "--base", busybox_image, "--out", str(out), env=env)

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert errors[0].startswith("error: no space left on the device while writing"), errors
    assert f"{cache}/uvmkit" in errors[0]
    assert str(out) not in errors[0]  # out/'s disk has room: only the cache is named
    assert not out.exists()


def test_missing_engine_socket(tmp_path: Path) -> None:
    env = dict(os.environ, DOCKER_HOST=f"unix://{tmp_path}/no-engine.sock")
    result = invoke("build-all", "--base", "busybox:local", "--out", str(tmp_path / "out"),
                    env=env)  # fmt: skip
    assert result.returncode == 1
    assert f"cannot reach a Docker engine at unix://{tmp_path}/no-engine.sock" in result.stderr
    assert "hint: run ./setup.sh, or set DOCKER_HOST" in result.stderr
