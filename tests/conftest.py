"""Session fixtures for tests that need the real machine: a Docker engine, images, a registry.

Nothing here is mocked. When no engine answers, the engine fixture fails (it does not
skip): CI starts one through ./setup.sh test, and a silent skip would hide that it did not.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from uvmkit import engine as engine_module
from uvmkit import services
from uvmkit.errors import UvmkitError
from uvmkit.guest import GuestBuild, build_guest


@pytest.fixture(scope="session")
def engine() -> Iterator[docker.DockerClient]:
    """A client for a reachable Docker engine."""
    try:
        client = engine_module.connect()
    except UvmkitError as exc:
        pytest.fail(f"{exc} -- the engine tests need one; ./setup.sh test starts it")
    yield client
    client.close()


@pytest.fixture(scope="session")
def busybox_image(engine: docker.DockerClient) -> str:
    """busybox:local, seeded from Debian's busybox-static when the engine lacks it."""
    try:
        return services.ensure_local_busybox(engine)
    except UvmkitError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def registry() -> Iterator[str]:
    """A local registry for the session: yields "127.0.0.1:PORT"."""
    try:
        with services.local_registry() as address:
            yield address
    except UvmkitError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def debian_image(engine: docker.DockerClient) -> str:
    """debian-minbase:local (debootstrap on first use, then cached per machine)."""
    try:
        return services.ensure_debian_image(engine)
    except UvmkitError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def tmp_xdg_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh XDG_CACHE_HOME for one test, so build caches never leak between tests."""
    cache = tmp_path / "xdg-cache"
    cache.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


@pytest.fixture(scope="session")
def guest_build(tmp_path_factory: pytest.TempPathFactory) -> GuestBuild:
    """/init and the agent, compiled once per session from guest/ as a build would."""
    return build_guest(tmp_path_factory.mktemp("guest"), source_date_epoch=0)
