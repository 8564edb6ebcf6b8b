"""Engine images as uvmkit sees them, without the Docker SDK.

What identifies an image (ImageInfo), how its `docker export` differs from the image, and
the one question an up-to-date build asks the engine: which image a reference names now.
That lookup uses the standard library's HTTP client over the engine's unix socket, so such a
build never imports the Docker SDK, whose import alone is a quarter of its time. Exports,
pulls and every failure's explanation go through the SDK (engine.py).

Which engine: the one DOCKER_HOST names; else the system engine at /var/run/docker.sock;
else the private engine that ./setup.sh starts at PRIVATE_SOCKET when the machine has no
engine of its own.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import re
import socket
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .archive import Entry, Kind
from .log import log

SYSTEM_SOCKET = Path("/var/run/docker.sock")
# Where ./setup.sh (python -m uvmkit.services engine) runs its own dockerd.
PRIVATE_SOCKET = Path("/run/uvmkit/docker.sock")

# The lookup gives up and leaves the question to the SDK after this long.
LOOKUP_TIMEOUT = 10.0

# What the engine's "init layer" puts into every container, and so into every export,
# over whatever the image has there: empty 0755 files, and a symlink for /etc/mtab.
_PLACEHOLDER_FILES = frozenset(
    {b".dockerenv", b"etc/hostname", b"etc/hosts", b"etc/resolv.conf", b"dev/console"}
)
_PLACEHOLDER_LINKS = {b"etc/mtab": b"/proc/mounts"}
# Directories that layer creates or writes into: an export shows them with the container's
# creation time, which would make every export of one image differ from the last.
_INIT_LAYER_DIRS = frozenset({b"", b"dev", b"dev/pts", b"dev/shm", b"etc", b"proc", b"sys"})


def is_export_placeholder(entry: Entry) -> bool:
    """True for a file the engine made for the container rather than one the image holds.

    The image's own copies of those paths are hidden by the placeholders, so an export
    cannot give them back; dropping the placeholders at least keeps empty, executable
    /etc/hosts files out of the image. (A `docker save` archive as --base keeps them.)
    """
    name = _export_name(entry.name)
    if name in _PLACEHOLDER_FILES:
        return entry.kind is Kind.FILE and entry.size == 0 and entry.mode == 0o755
    if name in _PLACEHOLDER_LINKS:
        return entry.kind is Kind.SYMLINK and entry.linkname == _PLACEHOLDER_LINKS[name]
    return False


def export_entries(entries: Iterable[Entry], image_created: int) -> Iterator[Entry]:
    """An export's entries as close to the image as an export allows: without the
    engine's placeholders, and no directory its init layer touched newer than the image."""
    for entry in entries:
        if is_export_placeholder(entry):
            continue
        if entry.kind is Kind.DIR and _export_name(entry.name) in _INIT_LAYER_DIRS:
            entry.mtime = min(entry.mtime, image_created)
        yield entry


def _export_name(name: bytes) -> bytes:
    name = name.strip(b"/").removeprefix(b"./")
    return b"" if name == b"." else name


def created_epoch(info: ImageInfo) -> int:
    """The image's creation time in whole seconds; 0 when the engine gave none we can read."""
    # The engine writes nanoseconds, which fromisoformat does not take; seconds suffice.
    match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)", info.created)
    if match is None:
        return 0
    stamp = datetime.datetime.fromisoformat(match.group(1)).replace(tzinfo=datetime.UTC)
    return int(stamp.timestamp())


@dataclass(frozen=True)
class ImageInfo:
    """What uvmkit records about a base image: enough for a manifest and a cache key."""

    ref: str
    id: str
    repo_digests: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    # The image's Comment; `docker import --message` puts it there.
    comment: str = ""
    created: str = ""
    size: int = 0
    # As the engine reports it: OS, architecture and variant ("" when it does not say).
    os: str = ""
    architecture: str = ""
    variant: str = ""


def candidate_urls() -> list[str]:
    """The engine addresses to try, in order; DOCKER_HOST, when set, is the only one."""
    host = os.environ.get("DOCKER_HOST", "")
    if host:
        return [host]
    return [f"unix://{SYSTEM_SOCKET}", f"unix://{PRIVATE_SOCKET}"]


def image_info(ref: str, attrs: dict[str, Any]) -> ImageInfo:
    """ImageInfo out of the engine's inspection of an image (GET /images/{name}/json)."""
    config = attrs.get("Config") or {}
    return ImageInfo(
        ref=ref,
        id=str(attrs["Id"]),
        repo_digests=tuple(attrs.get("RepoDigests") or ()),
        labels=dict(config.get("Labels") or {}),
        comment=str(attrs.get("Comment") or ""),
        created=str(attrs.get("Created") or ""),
        size=int(attrs.get("Size") or 0),
        os=str(attrs.get("Os") or ""),
        architecture=str(attrs.get("Architecture") or ""),
        variant=str(attrs.get("Variant") or ""),
    )


def lookup(ref: str) -> ImageInfo | None:
    """The engine's image for ref, or None when this lookup cannot say.

    None means: not in the engine, a reference the engine refuses, an engine that is not
    on a unix socket, or one that does not answer. engine.resolve_image then finds the
    image, pulls it, or explains what is wrong. The engine asked is the one connect()
    would pick: the first that answers.
    """
    for url in candidate_urls():
        if not url.startswith("unix://"):
            return None  # tcp:// and ssh:// engines, and their TLS settings, are the SDK's
        connection = _UnixHTTPConnection(url.removeprefix("unix://"))
        try:
            # Unversioned: the engine answers in its own API version, and every field
            # image_info reads is in all of them.
            connection.request("GET", f"/images/{urllib.parse.quote(ref, safe='/:@')}/json")
            response = connection.getresponse()
            body = response.read()
        except (FileNotFoundError, ConnectionRefusedError):
            continue  # no engine behind this address: the next one, as connect() does
        except (OSError, http.client.HTTPException) as exc:
            log.debug("image lookup at %s failed: %s", url, exc)
            return None
        finally:
            connection.close()
        if response.status != http.client.OK:
            return None
        try:
            attrs = json.loads(body)
            return image_info(ref, attrs)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
    return None


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP to the engine's API over its unix socket."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=LOOKUP_TIMEOUT)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock
