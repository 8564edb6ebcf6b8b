"""The machine-side services uvmkit needs: a Docker engine, seeded base images, a registry.

./setup.sh calls these through `python -m uvmkit.services engine|host|seed|seed-test|registry`;
the tests call them as functions. Everything here works offline: base images come from
Debian packages on this machine, never from a public registry.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound

from . import engine
from .engine_images import PRIVATE_SOCKET
from .errors import EngineError, ToolError, UvmkitError
from .log import log, setup_logging
from .run import not_installed, run

RUN_DIR = PRIVATE_SOCKET.parent
DATA_ROOT = Path("/var/lib/uvmkit-docker")
ENGINE_LOG = Path("/var/log/uvmkit-dockerd.log")
ENGINE_PIDFILE = RUN_DIR / "dockerd.pid"
ENGINE_START_TIMEOUT = 30.0

DEFAULT_BASE = "busybox:1.36"
LOCAL_BUSYBOX = "busybox:local"
DEBIAN_IMAGE = "debian-minbase:local"
TEST_CACHE = Path("/var/cache/uvmkit-test")
DEBIAN_TARBALL = TEST_CACHE / "debian-minbase.tar"
DEBIAN_MIRROR = "http://deb.debian.org/debian"

BUSYBOX = Path("/bin/busybox")
ORIGIN_LABEL = "org.uvmkit.origin"
# Seeded trees carry one fixed mtime so the same package always gives the same layer.
SEED_MTIME = 946684800  # 2000-01-01


# --- the engine ---------------------------------------------------------------------------


def ensure_engine() -> docker.DockerClient:
    """A client for a reachable engine, starting the private dockerd when there is none."""
    try:
        client = engine.connect()
    except EngineError:
        if os.environ.get("DOCKER_HOST"):
            # The user chose an engine; starting another one elsewhere would hide the problem.
            raise
    else:
        print(f"docker engine: already running at {engine.engine_url(client)}")
        return client

    start_private_engine()
    client = engine.connect()
    print(
        f"docker engine: started at unix://{PRIVATE_SOCKET} (log: {ENGINE_LOG}; data: {DATA_ROOT})"
    )
    return client


def start_private_engine() -> None:
    """Start dockerd detached on PRIVATE_SOCKET and wait until it answers.

    No iptables or bridge, so it runs in a container or a bare VM alike; the socket,
    pidfile and state are all our own, apart from any system engine. Storage is overlay2
    where the kernel allows it, else vfs, which works everywhere but copies a whole
    image for every container (seconds for a 200 MB base).
    """
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise not_installed("dockerd")
    if _pid_alive(ENGINE_PIDFILE):
        log.info("dockerd (pid file %s) is running but not answering yet; waiting", ENGINE_PIDFILE)
        if _wait_for_engine(None):
            return
        raise _engine_failed()
    drivers = (
        [os.environ["UVMKIT_STORAGE_DRIVER"]]
        if "UVMKIT_STORAGE_DRIVER" in os.environ
        else [
            "overlay2",
            "vfs",
        ]
    )
    for driver in drivers:
        proc = _spawn_dockerd(dockerd, driver)
        if _wait_for_engine(proc):
            log.debug("dockerd runs with the %s storage driver", driver)
            return
        if proc.poll() is None:
            break  # running but silent: another driver would not help
        log.warning("dockerd would not start with the %s storage driver", driver)
    raise _engine_failed()


def _spawn_dockerd(dockerd: str, driver: str) -> subprocess.Popen[bytes]:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    ENGINE_LOG.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        dockerd,
        f"--storage-driver={driver}",
        "--iptables=false",
        "--ip6tables=false",
        "--bridge=none",
        f"--data-root={DATA_ROOT}",
        f"--exec-root={RUN_DIR / 'exec'}",
        f"--pidfile={ENGINE_PIDFILE}",
        f"--host=unix://{PRIVATE_SOCKET}",
    ]
    log.debug("+ %s", " ".join(argv))
    with ENGINE_LOG.open("ab") as out:
        # A new session, so the engine outlives setup.sh and ignores its Ctrl-C.
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )


def _wait_for_engine(proc: subprocess.Popen[bytes] | None) -> bool:
    """True once the private engine answers; False when it exits or time runs out."""
    deadline = time.monotonic() + ENGINE_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        if PRIVATE_SOCKET.exists():
            try:
                docker.DockerClient(
                    base_url=f"unix://{PRIVATE_SOCKET}", version="auto", timeout=5
                ).ping()
                return True
            except (DockerException, requests.RequestException):
                pass
        time.sleep(0.2)
    return False


def _engine_failed() -> ToolError:
    return ToolError(
        f"dockerd did not answer on {PRIVATE_SOCKET} within {ENGINE_START_TIMEOUT:.0f} s;"
        f" last lines of {ENGINE_LOG}:\n{_tail(ENGINE_LOG)}",
        hint="fix the cause above, or point DOCKER_HOST at a working engine",
    )


def _pid_alive(pidfile: Path) -> bool:
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read it: {exc.strerror})"
    return "\n".join("  " + line for line in text.splitlines()[-lines:])


def _has_image(client: docker.DockerClient, ref: str) -> bool:
    try:
        client.images.get(ref)
    except ImageNotFound:
        return False
    return True


def import_tar(
    client: docker.DockerClient,
    data: bytes | Path,
    ref: str,
    *,
    message: str,
    labels: dict[str, str],
) -> str:
    """`docker import` a root filesystem tar (bytes or a file) as ref; returns the image id.

    The SDK's import_image cannot set the commit message, and the message is where the
    image records its origin for `docker history` and our manifest, so the request is
    made directly.
    """
    repository, tag = ref.rsplit(":", 1)
    api = client.api
    url = f"{api.base_url}/v{api.api_version}/images/create"
    changes = [f"LABEL {key}={_quote(value)}" for key, value in sorted(labels.items())]
    params: dict[str, str | list[str]] = {
        "fromSrc": "-",
        "repo": repository,
        "tag": tag,
        "message": message,
        "changes": changes,
    }
    headers = {"Content-Type": "application/tar"}
    try:
        if isinstance(data, Path):
            with data.open("rb") as f:
                response = api.post(url, params=params, data=f, headers=headers, timeout=None)
        else:
            response = api.post(url, params=params, data=data, headers=headers, timeout=None)
        response.raise_for_status()
    except requests.RequestException as exc:
        raise EngineError(f"cannot import {ref} into the engine: {exc}") from None
    return str(client.images.get(ref).id)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- seeded busybox -------------------------------------------------------------------------


def busybox_version() -> str:
    """The installed busybox-static package's version, e.g. 1:1.35.0-4+deb12u1+b1."""
    proc = run(["dpkg-query", "-W", "-f=${Version}", "busybox-static"], capture=True, check=False)
    if proc.returncode != 0 or not BUSYBOX.exists():
        raise ToolError(
            "Debian's busybox-static is not installed", hint="apt-get install busybox-static"
        )
    return proc.stdout.strip()


def busybox_tree_tar() -> bytes:
    """A deterministic root filesystem tar: static busybox, its applets, a minimal /etc.

    The layout follows the busybox image on Docker Hub: every applet is in /bin.
    """
    applets = run([BUSYBOX, "--list"], capture=True).stdout.split()
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def add(name: str, kind: bytes, mode: int, data: bytes = b"", link: str = "") -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.mtime = SEED_MTIME
        info.linkname = link
        info.size = len(data)
        entries.append((info, data if kind == tarfile.REGTYPE else None))

    for directory, mode in [
        ("bin", 0o755),
        ("dev", 0o755),
        ("etc", 0o755),
        ("home", 0o755),
        ("proc", 0o555),
        ("root", 0o700),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("usr", 0o755),
        ("usr/sbin", 0o755),
        ("var", 0o755),
        ("var/spool", 0o755),
        ("var/spool/mail", 0o755),
        ("var/www", 0o755),
    ]:
        add(directory, tarfile.DIRTYPE, mode)
    add("bin/busybox", tarfile.REGTYPE, 0o755, BUSYBOX.read_bytes())
    for applet in applets:
        if applet != "busybox":
            add(f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox")
    add("etc/passwd", tarfile.REGTYPE, 0o644, _PASSWD)
    add("etc/group", tarfile.REGTYPE, 0o644, _GROUP)
    add("etc/shadow", tarfile.REGTYPE, 0o640, _SHADOW)
    add("etc/hostname", tarfile.REGTYPE, 0o644, b"uvm\n")
    add("etc/hosts", tarfile.REGTYPE, 0o644, b"127.0.0.1\tlocalhost\n::1\tlocalhost\n")

    buffer = io.BytesIO()
    # Sorted names and fixed owners and times: the same package makes the same bytes.
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in sorted(entries, key=lambda entry: entry[0].name):
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


_PASSWD = b"""\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
bin:x:2:2:bin:/bin:/bin/false
sys:x:3:3:sys:/dev:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
"""
_GROUP = b"""\
root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
tty:x:5:
disk:x:6:
wheel:x:10:root
www-data:x:33:
users:x:100:
nogroup:x:65534:
"""
_SHADOW = (
    b"root:*::::::\ndaemon:*::::::\nbin:*::::::\nsys:*::::::\nwww-data:*::::::\nnobody:*::::::\n"
)


def seed_busybox(client: docker.DockerClient, refs: Sequence[str]) -> str:
    """Import the busybox tree under each of refs (one image, several tags); returns its id."""
    version = busybox_version()
    message = f"uvmkit seed: Debian busybox-static {version}"
    labels = {ORIGIN_LABEL: f"debian:busybox-static={version}"}
    image_id = import_tar(client, busybox_tree_tar(), refs[0], message=message, labels=labels)
    image = client.images.get(image_id)
    for ref in refs[1:]:
        repository, tag = ref.rsplit(":", 1)
        image.tag(repository, tag)
    return image_id


def ensure_local_busybox(client: docker.DockerClient) -> str:
    """Make sure busybox:local (the tests' small image) exists; returns its reference."""
    if _has_image(client, LOCAL_BUSYBOX):
        print(f"{LOCAL_BUSYBOX}: already in the engine")
    else:
        seed_busybox(client, [LOCAL_BUSYBOX])
        print(f"{LOCAL_BUSYBOX}: seeded from Debian's busybox-static {busybox_version()}")
    return LOCAL_BUSYBOX


def ensure_default_base(client: docker.DockerClient, ref: str = DEFAULT_BASE) -> str:
    """Make sure the default recipe's base is in the engine: present, pulled, or seeded."""
    if _has_image(client, ref):
        print(f"{ref}: already in the engine")
        return ref
    try:
        engine.resolve_image(ref, client=client)
    except EngineError as exc:
        log.debug("pulling %s failed: %s", ref, exc)
    else:
        print(f"{ref}: pulled")
        return ref
    refs = [ref] if _has_image(client, LOCAL_BUSYBOX) else [ref, LOCAL_BUSYBOX]
    seed_busybox(client, refs)
    print(
        f"{ref} is not reachable; seeded {' and '.join(refs)} from Debian's busybox-static "
        f"{busybox_version()}"
    )
    return ref


# --- a Debian minbase image for realistic sizes -------------------------------------------


def ensure_debian_image(client: docker.DockerClient) -> str:
    """Make sure debian-minbase:local exists: debootstrap once per machine, then import."""
    if _has_image(client, DEBIAN_IMAGE):
        print(f"{DEBIAN_IMAGE}: already in the engine")
        return DEBIAN_IMAGE
    if DEBIAN_TARBALL.exists():
        how = f"imported from {DEBIAN_TARBALL}"
    else:
        _debootstrap_tarball(DEBIAN_TARBALL)
        how = f"made with debootstrap (cached at {DEBIAN_TARBALL})"
    import_tar(
        client,
        DEBIAN_TARBALL,
        DEBIAN_IMAGE,
        message="uvmkit test image: debootstrap --variant=minbase bookworm",
        labels={ORIGIN_LABEL: f"debootstrap:minbase:bookworm:{DEBIAN_MIRROR}"},
    )
    print(f"{DEBIAN_IMAGE}: {how}")
    return DEBIAN_IMAGE


def _debootstrap_tarball(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("debootstrap --variant=minbase bookworm (about 40 s)")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix="debootstrap.") as tmp:
        tree = Path(tmp) / "root"
        run(["debootstrap", "--variant=minbase", "bookworm", tree, DEBIAN_MIRROR], capture=True)
        partial = target.with_suffix(".tar.partial")
        # Sorted and with numeric owners, so the cached tarball does not depend on this
        # host's user database; written aside and renamed, so a killed run leaves no half.
        run(
            [
                "tar",
                "--sort=name",
                "--numeric-owner",
                "--xattrs",
                "-C",
                tree,
                "-cf",
                partial,
                ".",
            ]
        )
        partial.rename(target)


# --- a local registry ---------------------------------------------------------------------


@contextlib.contextmanager
def local_registry(*, timeout: float = 15.0) -> Iterator[str]:
    """Run Debian's docker-registry on 127.0.0.1 with storage in a temporary directory.

    Yields its address ("127.0.0.1:PORT"); the engine treats 127.0.0.0/8 as an insecure
    registry, so plain HTTP works without configuration. Stopped when the block ends.
    """
    program = shutil.which("docker-registry")
    if program is None:
        raise not_installed("docker-registry")
    address = f"127.0.0.1:{_free_port()}"
    with tempfile.TemporaryDirectory(prefix="uvmkit-registry.") as tmp:
        config = Path(tmp) / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {tmp}/storage\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: {address}\n"
        )
        logfile = Path(tmp) / "registry.log"
        with logfile.open("wb") as out:
            proc = subprocess.Popen(
                [program, "serve", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_for_registry(address, proc, logfile, timeout)
            log.debug("registry at %s (pid %d)", address, proc.pid)
            yield address
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_registry(
    address: str, proc: subprocess.Popen[bytes], logfile: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if requests.get(f"http://{address}/v2/", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise ToolError(
        f"docker-registry did not start on {address}; its log:\n{_tail(logfile)}",
        hint="apt-get install docker-registry, or run ./setup.sh test",
    )


# --- command line -------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m uvmkit.services engine|host|seed|...`, for setup.sh and humans."""
    parser = argparse.ArgumentParser(prog="python -m uvmkit.services", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show commands and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("engine", help="make sure a Docker engine answers; start a private one")
    sub.add_parser("host", help="print the address of the engine that answers, for DOCKER_HOST")
    seed = sub.add_parser("seed", help="make sure the default base image is in the engine")
    seed.add_argument(
        "--base", default=DEFAULT_BASE, help=f"image to seed (default {DEFAULT_BASE})"
    )
    sub.add_parser("seed-test", help="make sure the test images exist (busybox, debian-minbase)")
    sub.add_parser("registry", help="run a local registry until Ctrl-C")
    args = parser.parse_args(argv)

    setup_logging(debug=args.debug)
    try:
        if args.command == "engine":
            ensure_engine()
        elif args.command == "host":
            print(engine.engine_url(engine.connect()))
        elif args.command == "seed":
            ensure_default_base(engine.connect(), args.base)
        elif args.command == "seed-test":
            client = engine.connect()
            ensure_local_busybox(client)
            ensure_debian_image(client)
        elif args.command == "registry":
            with local_registry() as address:
                print(f"registry: listening on {address}; Ctrl-C stops it", flush=True)
                while True:
                    time.sleep(3600)
    except UvmkitError as exc:
        if args.debug:
            raise
        log.error("%s", exc.message)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        return 1
    except APIError as exc:
        log.error("the Docker engine refused: %s", exc.explanation or exc)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
