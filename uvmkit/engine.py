"""The Docker engine as a source of base root filesystems: find an image, pull it, export
its tree, all through the Docker SDK. Which engine, and what an image is to uvmkit, are in
engine_images, which an up-to-date build uses alone.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.utils import parse_repository_tag

from .engine_images import ImageInfo, candidate_urls, image_info
from .errors import BadInputError, EngineError
from .interrupts import deferred_interrupts
from .log import human_size, log, progress
from .run import process_alive

EXPORT_CHUNK = 1024 * 1024
# An image without CMD or ENTRYPOINT cannot be created as a container; the container is
# never started, so this command only has to exist on paper.
DUMMY_COMMAND = ["/uvmkit-none"]
# Marks the containers we create. The value names the process that made one, as
# "BOOT_ID PID_NAMESPACE:PID", so a leftover of a killed process can be told apart from a
# container another build (in this PID namespace or not) is exporting through right now.
EXPORT_LABEL = "org.uvmkit.export"

CONNECT_HINT = "run ./setup.sh, or set DOCKER_HOST"
NOT_FOUND_HINT = "docker import a tarball under that name, or ./setup.sh seeds the default base"


def connect(*, timeout: int = 120) -> docker.DockerClient:
    """A client for the first engine that answers; EngineError when none does.

    The API version is negotiated because the engine (Debian's 20.10 speaks 1.41) can be
    older than the SDK's default.
    """
    tried: list[str] = []
    for url in candidate_urls():
        if url.startswith("unix://") and not Path(url.removeprefix("unix://")).exists():
            tried.append(url)
            continue
        try:
            if os.environ.get("DOCKER_HOST"):
                # from_env also honours DOCKER_TLS_VERIFY and DOCKER_CERT_PATH.
                client = docker.from_env(version="auto", timeout=timeout)
            else:
                client = docker.DockerClient(base_url=url, version="auto", timeout=timeout)
            client.ping()
        except (DockerException, requests.RequestException) as exc:
            log.debug("no engine at %s: %s", url, exc)
            tried.append(url)
            continue
        log.debug("docker engine at %s (API %s)", url, client.api.api_version)
        return client
    raise EngineError(f"cannot reach a Docker engine at {' or '.join(tried)}", hint=CONNECT_HINT)


def engine_url(client: docker.DockerClient) -> str:
    """The address a client talks to, for messages ("http+docker://..." shown as unix://)."""
    url = str(client.api.base_url)
    if url.startswith("http+docker://"):
        # The SDK hides the socket path behind a fake host name; the adapter still knows it.
        adapter = client.api.get_adapter(url)
        socket_path = getattr(adapter, "socket_path", None)
        if socket_path:
            return f"unix://{socket_path}"
    return url


def resolve_image(
    ref: str, *, pull: bool = True, client: docker.DockerClient | None = None
) -> ImageInfo:
    """The engine's image for ref: the local one when present, else pulled (when allowed)."""
    client = client or connect()
    try:
        return image_info(ref, client.images.get(ref).attrs)
    except ImageNotFound:
        if not pull:
            raise EngineError(f"image {ref} is not in the engine", hint=NOT_FOUND_HINT) from None
    except APIError as exc:
        if exc.status_code == 400:
            # The engine's word for a malformed reference ("invalid reference format").
            raise BadInputError(
                f"--base {ref!r} is not a valid image reference: {_reason(exc)}",
                hint="name an image as NAME[:TAG], or a file as ./PATH",
            ) from None
        raise EngineError(
            f"cannot look up image {ref}: {_reason(exc)}", hint=CONNECT_HINT
        ) from None
    except requests.RequestException as exc:
        raise EngineError(
            f"cannot look up image {ref}: {_reason(exc)}", hint=CONNECT_HINT
        ) from None

    _pull(ref, client)
    try:
        return image_info(ref, client.images.get(ref).attrs)
    except (APIError, requests.RequestException) as exc:
        raise EngineError(f"image {ref} was pulled but cannot be read: {_reason(exc)}") from None


def _pull(ref: str, client: docker.DockerClient) -> None:
    """Pull ref, one progress bar per layer on a terminal, plain log lines otherwise."""
    repository, tag = parse_repository_tag(ref)
    log.info("pulling %s", ref)
    start = time.monotonic()
    bars: dict[str, Any] = {}
    try:
        events = client.api.pull(repository, tag=tag or "latest", stream=True, decode=True)
        for event in events:
            if "error" in event:
                raise EngineError(f"cannot pull image {ref}: {event['error']}", hint=NOT_FOUND_HINT)
            _show_pull_event(event, bars)
    except (APIError, requests.RequestException) as exc:
        raise EngineError(f"cannot pull image {ref}: {_reason(exc)}", hint=NOT_FOUND_HINT) from None
    finally:
        for bar in bars.values():
            bar.close()
    log.info("pulled %s in %.1f s", ref, time.monotonic() - start)


def _show_pull_event(event: dict[str, Any], bars: dict[str, Any]) -> None:
    layer = event.get("id")
    status = str(event.get("status", ""))
    detail = event.get("progressDetail") or {}
    if not layer or status.startswith(("Pulling from", "Digest:", "Status:")):
        log.debug("%s", status)
        return
    if status in ("Downloading", "Extracting") and detail.get("total"):
        bar = bars.get(layer)
        if bar is None:
            bar = bars[layer] = progress(total=int(detail["total"]), desc=layer)
        if bar.total != detail["total"]:
            bar.reset(total=int(detail["total"]))
        bar.set_description(f"{layer} {status.lower()}", refresh=False)
        bar.update(int(detail.get("current", 0)) - bar.n)
    elif status in ("Pull complete", "Already exists"):
        log.debug("layer %s: %s", layer, status.lower())


@contextlib.contextmanager
def export_image(
    info: ImageInfo, *, client: docker.DockerClient | None = None
) -> Iterator[Iterator[bytes]]:
    """Yield the image's root filesystem as a tar stream (`docker export` of a new container).

    The container is created, never started, and removed however the caller leaves the
    block: normally, by an exception, or by Ctrl-C in the middle of the stream.
    """
    client = client or connect()
    remove_leftovers(client)
    container_id = ""
    response: requests.Response | None = None
    try:
        # Ctrl-C waits until the engine has answered: a container it made for a request
        # we gave up on would be left behind, its ID never known.
        with deferred_interrupts():
            try:
                container = client.containers.create(
                    info.id, command=DUMMY_COMMAND, network_disabled=True,
                    labels={EXPORT_LABEL: _owner(os.getpid())},
                )  # fmt: skip
            except (APIError, requests.RequestException) as exc:
                raise EngineError(
                    f"cannot create a container from image {info.ref}: {_reason(exc)}"
                ) from None
            container_id = str(container.id)
        log.debug("exporting %s through container %s", info.ref, container_id[:12])

        # A plain GET rather than container.export(): the SDK's generator never closes its
        # response, and an early stop must hang up before the container is removed.
        api = client.api
        url = f"{api.base_url}/v{api.api_version}/containers/{container_id}/export"
        try:
            response = api.get(url, stream=True, timeout=(30, None))
            response.raise_for_status()
        except requests.RequestException as exc:
            raise EngineError(f"cannot export image {info.ref}: {_reason(exc)}") from None
        yield _chunks(info, response)
    finally:
        if response is not None:
            response.close()
        if container_id:
            _remove(client, container_id, f"made from {info.ref}")


def remove_leftovers(client: docker.DockerClient) -> None:
    """Remove the export containers of processes of this machine that are gone: a build
    killed outright (SIGKILL, a power cut) cannot remove its own."""
    try:
        found = client.api.containers(all=True, filters={"label": EXPORT_LABEL})
    except (APIError, requests.RequestException) as exc:
        log.debug("cannot list leftover export containers: %s", _reason(exc))
        return
    for container in found:
        owner = str((container.get("Labels") or {}).get(EXPORT_LABEL, ""))
        space, _, pid = owner.rpartition(":")
        if space and space == _process_space() and pid.isdigit() and not process_alive(int(pid)):
            log.info("removing container %s, left by a killed export", container["Id"][:12])
            _remove(client, str(container["Id"]), "left by a killed export")


def _owner(pid: int) -> str:
    return f"{_process_space()}:{pid}"


@functools.cache
def _process_space() -> str:
    """Where this process's PID means something: this boot of the machine, and the PID
    namespace; "" when either cannot be read."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{boot} {namespace}"


def _chunks(info: ImageInfo, response: requests.Response) -> Iterator[bytes]:
    total = 0
    try:
        for chunk in response.iter_content(EXPORT_CHUNK):
            total += len(chunk)
            yield chunk
    except requests.RequestException as exc:
        raise EngineError(
            f"the export of image {info.ref} broke off after {human_size(total)}: {_reason(exc)}",
            hint="check that the Docker engine is still running, then build again",
        ) from None
    log.debug("exported %s: %s", info.ref, human_size(total))


def _remove(client: docker.DockerClient, container_id: str, what: str) -> None:
    try:
        client.api.remove_container(container_id, force=True)
    except NotFound:
        pass
    except (APIError, requests.RequestException) as exc:
        # Not fatal for the build; the label lets `docker ps -a` users find it.
        log.warning("could not remove container %s %s: %s", container_id[:12], what, _reason(exc))


def _reason(exc: BaseException) -> str:
    """One line out of an SDK or HTTP exception."""
    if isinstance(exc, APIError) and exc.explanation:
        return str(exc.explanation).strip().splitlines()[0]
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
