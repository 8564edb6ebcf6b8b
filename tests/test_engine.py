"""uvmkit.engine against a real Docker engine and a real local registry."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.errors import ImageNotFound
from docker.models.containers import ContainerCollection

from uvmkit.config import ROOT
from uvmkit.engine import EXPORT_LABEL, connect, export_image, resolve_image
from uvmkit.engine_images import lookup
from uvmkit.errors import EngineError

pytestmark = pytest.mark.engine


def _our_containers(client: docker.DockerClient) -> set[str]:
    return {str(c.id) for c in client.containers.list(all=True, filters={"label": EXPORT_LABEL})}


def test_resolve_local_image(engine: docker.DockerClient, busybox_image: str) -> None:
    info = resolve_image(busybox_image, pull=False, client=engine)

    assert info.ref == busybox_image
    assert info.id.startswith("sha256:")
    assert info.id == engine.images.get(busybox_image).id
    assert info.comment.startswith("uvmkit seed: Debian busybox-static ")
    assert info.labels["org.uvmkit.origin"].startswith("debian:busybox-static=")
    assert info.size > 500_000


def test_lookup_without_the_sdk_agrees_with_it(
    engine: docker.DockerClient, busybox_image: str
) -> None:
    image = engine.images.get(busybox_image)
    nested = f"uvmkit-test/lookup/{uuid.uuid4().hex[:8]}:nested"
    image.tag(nested)
    try:
        for ref in (busybox_image, nested, image.id, image.id.removeprefix("sha256:")[:12]):
            found = lookup(ref)
            assert found is not None, ref
            assert found.id == image.id
            assert found == resolve_image(ref, pull=False, client=engine)
    finally:
        engine.images.remove(nested)


def test_lookup_leaves_what_it_cannot_answer_to_the_sdk(
    engine: docker.DockerClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert lookup("uvmkit-test/never-made:nowhere") is None
    assert lookup("Not A Reference") is None
    for host in (f"unix://{tmp_path}/no-engine.sock", "tcp://127.0.0.1:9", "ssh://nobody@host"):
        monkeypatch.setenv("DOCKER_HOST", host)
        assert lookup("busybox:local") is None, host


def test_export_is_a_tar_of_the_tree(engine: docker.DockerClient, busybox_image: str) -> None:
    info = resolve_image(busybox_image, client=engine)
    before = _our_containers(engine)

    with export_image(info, client=engine) as stream:
        data = b"".join(stream)

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        busybox = tar.getmember("bin/busybox")
        sh = tar.getmember("bin/sh")
        tmp = tar.getmember("tmp")
    assert busybox.isfile() and busybox.size > 500_000
    assert sh.issym() and sh.linkname == "busybox"
    assert tmp.mode & 0o7777 == 0o1777
    assert _our_containers(engine) == before


def test_container_removed_when_consumer_fails(
    engine: docker.DockerClient, busybox_image: str
) -> None:
    info = resolve_image(busybox_image, client=engine)
    before = _our_containers(engine)

    with (
        pytest.raises(RuntimeError, match="consumer gave up"),
        export_image(info, client=engine) as stream,
    ):
        next(stream)
        assert len(_our_containers(engine) - before) == 1
        raise RuntimeError("consumer gave up")

    assert _our_containers(engine) == before


def test_container_removed_on_ctrl_c(engine: docker.DockerClient, busybox_image: str) -> None:
    info = resolve_image(busybox_image, client=engine)
    before = _our_containers(engine)

    with pytest.raises(KeyboardInterrupt), export_image(info, client=engine) as stream:
        for _chunk in stream:
            raise KeyboardInterrupt

    assert _our_containers(engine) == before


def test_ctrl_c_while_the_engine_creates_the_container_leaves_none(
    engine: docker.DockerClient, busybox_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C that lands while the engine is making the export's container: the
    container exists, but its ID has not reached us yet."""
    info = resolve_image(busybox_image, client=engine)
    before = _our_containers(engine)
    create = ContainerCollection.create

    def create_then_ctrl_c(self: ContainerCollection, *args: Any, **kwargs: Any) -> Any:
        container = create(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # arrives before the ID is returned
        return container

    monkeypatch.setattr(ContainerCollection, "create", create_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt), export_image(info, client=engine) as stream:
        next(stream)

    assert _our_containers(engine) == before


KILLED_MID_EXPORT = """
import os, signal, sys
from uvmkit.engine import export_image, resolve_image
with export_image(resolve_image(sys.argv[1])) as stream:
    next(stream)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_container_of_a_killed_export_goes_with_the_next_export(
    engine: docker.DockerClient, busybox_image: str
) -> None:
    before = _our_containers(engine)
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_EXPORT, busybox_image],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (leftover,) = _our_containers(engine) - before
    owner = engine.containers.get(leftover).labels[EXPORT_LABEL]
    space = owner.rpartition(":")[0]
    # Not leftovers: an export of a live process here, and one of another machine or
    # PID namespace, whose PIDs mean nothing here.
    alive, elsewhere = (
        engine.containers.create(busybox_image, command=["true"], labels={EXPORT_LABEL: owner})
        for owner in (f"{space}:{os.getpid()}", "other-boot pid:[1]:99999")
    )
    try:
        with export_image(resolve_image(busybox_image, client=engine), client=engine) as stream:
            assert sum(len(chunk) for chunk in stream) > 500_000

        assert _our_containers(engine) == before | {str(alive.id), str(elsewhere.id)}
    finally:
        for container in (alive, elsewhere):
            container.remove(force=True)


def test_missing_image_names_it(engine: docker.DockerClient) -> None:
    ref = f"uvmkit-test/no-such-image:{uuid.uuid4().hex[:8]}"

    with pytest.raises(EngineError, match=re.escape(f"image {ref} is not in the engine")):
        resolve_image(ref, pull=False, client=engine)
    # Pulling goes to Docker Hub, which either lacks it or is unreachable: either way one
    # error naming the image.
    with pytest.raises(EngineError, match=re.escape(f"cannot pull image {ref}")) as caught:
        resolve_image(ref, client=engine)
    assert "\n" not in caught.value.message
    assert caught.value.hint


@pytest.mark.registry
def test_pull_through_local_registry(
    engine: docker.DockerClient, busybox_image: str, registry: str
) -> None:
    remote = f"{registry}/uvmkit-test/busybox"
    ref = f"{remote}:1"
    local_id = engine.images.get(busybox_image).id
    engine.images.get(busybox_image).tag(remote, "1")
    for line in engine.images.push(remote, tag="1", stream=True, decode=True):
        assert "error" not in line, line
    engine.images.remove(ref)
    with pytest.raises(ImageNotFound):
        engine.images.get(ref)

    try:
        info = resolve_image(ref, client=engine)

        assert info.id == local_id
        assert any(d.startswith(f"{remote}@sha256:") for d in info.repo_digests)
    finally:
        engine.images.remove(ref)


def test_unreachable_docker_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:9")

    with pytest.raises(
        EngineError, match=re.escape("cannot reach a Docker engine at tcp://127.0.0.1:9")
    ):
        connect()
    with pytest.raises(EngineError, match="cannot reach"):
        resolve_image("busybox:local")
