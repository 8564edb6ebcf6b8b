"""`invoke build-all` end to end against a real Docker engine, read back independently."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import docker
import pytest
from readback import ROOT, by_path, invoke, read_with_libarchive, read_with_tarfile

from uvmkit import services
from uvmkit.engine import EXPORT_LABEL

pytestmark = pytest.mark.engine

ARTIFACTS = ("initrd.img", "rootfs.tar.gz", "delta.tar.gz")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    env.pop("SOURCE_DATE_EPOCH", None)
    env.update(extra)
    return env


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout.strip()


def _labelled_containers(client: docker.DockerClient) -> set[str]:
    found = client.containers.list(all=True, filters={"label": EXPORT_LABEL})
    return {str(c.id) for c in found}


@pytest.fixture(scope="module")
def busybox_build(
    busybox_image: str, engine: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """One build-all of busybox:local that the read-back tests share."""
    tmp = tmp_path_factory.mktemp("busybox-build")
    before = _labelled_containers(engine)
    result = invoke("build-all", "--base", busybox_image, "--out", str(tmp / "out"),
                    env=_env(tmp))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert _labelled_containers(engine) == before, "the export container was left behind"
    return tmp / "out"


def test_writes_every_artifact_and_verifiable_sums(busybox_build: Path) -> None:
    names = sorted(p.name for p in busybox_build.iterdir())
    assert names == sorted(
        [*ARTIFACTS, "manifest.json", "SHA256SUMS", ".uvmkit-stamp", ".uvmkit-files"]
    )
    check = subprocess.run(
        ["sha256sum", "-c", "SHA256SUMS"], cwd=busybox_build, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert sorted(check.stdout.split()) == sorted([f"{a}:" for a in ARTIFACTS] + ["OK"] * 3)


def test_manifest_records_inputs_and_outputs(
    busybox_build: Path, busybox_image: str, engine: docker.DockerClient
) -> None:
    manifest = json.loads((busybox_build / "manifest.json").read_text())
    base = manifest["base"]
    assert base["ref"] == busybox_image
    assert base["kind"] == "docker-image"
    assert base["id"] == engine.images.get(busybox_image).id
    assert base["origin"].startswith("debian:busybox-static=")
    assert manifest["agent"]["version"] == _git("rev-parse", "--short=12", "HEAD")
    assert manifest["source_date_epoch"] == int(_git("log", "-1", "--format=%ct"))
    assert manifest["options"]["initrd_compression"] == "gzip"
    for name in ARTIFACTS:
        meta = manifest["artifacts"][name]
        assert meta["size"] == (busybox_build / name).stat().st_size
        assert len(meta["sha256"]) == 64


def test_initrd_holds_base_guest_layer_and_console(busybox_build: Path) -> None:
    members = read_with_libarchive(busybox_build / "initrd.img")
    entries = by_path(members)
    paths = [m.path for m in members]

    assert paths == sorted(paths, key=os.fsencode), "entries are not in sorted order"
    busybox = entries["bin/busybox"]
    assert busybox.kind == "file" and busybox.data == Path("/bin/busybox").read_bytes()
    assert entries["bin/sh"].kind == "symlink" and entries["bin/sh"].link == "busybox"
    init = entries["init"]
    assert init.kind == "file" and init.mode & 0o777 == 0o755
    assert init.data.startswith(b"\x7fELF")
    agent = entries["bin/uvmkit-agent"]
    assert agent.data.startswith(b"\x7fELF") and agent.mode & 0o777 == 0o755
    console = entries["dev/console"]
    assert (console.kind, console.rdev, console.mode & 0o7777) == ("char", (5, 1), 0o600)
    assert entries["tmp"].mode & 0o7777 == 0o1777
    assert all((m.uid, m.gid) == (0, 0) for m in members)
    assert entries["info/base"].data == b"busybox:local\n"
    # The engine's per-container placeholders are not part of the image.
    assert ".dockerenv" not in entries
    assert "etc/resolv.conf" not in entries


def test_rootfs_and_initrd_hold_the_same_tree(busybox_build: Path) -> None:
    initrd = by_path(read_with_libarchive(busybox_build / "initrd.img"))
    rootfs = by_path(read_with_tarfile(busybox_build / "rootfs.tar.gz"))

    assert set(initrd) == set(rootfs)
    for path, member in initrd.items():
        other = rootfs[path]
        assert (member.kind, member.mode, member.uid, member.gid) == (
            other.kind,
            other.mode,
            other.uid,
            other.gid,
        ), path
        assert member.data == other.data, path
        assert member.link == other.link, path


def test_delta_is_the_guest_layer_alone(busybox_build: Path) -> None:
    delta = by_path(read_with_tarfile(busybox_build / "delta.tar.gz"))
    initrd = by_path(read_with_libarchive(busybox_build / "initrd.img"))

    assert set(delta) == {
        "init",
        "bin/uvmkit-agent",
        "info",
        "info/base",
        "info/base-id",
        "info/branch",
        "info/build-date",
        "info/build.json",
        "info/version",
    }
    for path, member in delta.items():
        assert member.data == initrd[path].data, path
    build_info = json.loads(delta["info/build.json"].data)
    assert build_info["base"]["ref"] == "busybox:local"
    assert build_info["agent"]["version"] == _git("rev-parse", "--short=12", "HEAD")


def test_two_clones_build_identical_bytes(busybox_image: str, tmp_path: Path) -> None:
    outs = []
    for i, where in enumerate(["a", "somewhere/much/deeper"]):
        clone = tmp_path / where / "uvmkit"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        out = tmp_path / f"out-{i}"
        result = invoke("build-all", "--base", busybox_image, "--out", str(out), cwd=clone,
                        env=_env(tmp_path / where))  # fmt: skip
        assert result.returncode == 0, result.stderr
        outs.append(out)
        time.sleep(1.1)  # a later build time must not show in the output

    for name in [*ARTIFACTS, "manifest.json", "SHA256SUMS"]:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_exports_made_at_different_times_build_identical_bytes(
    busybox_image: str, engine: docker.DockerClient, tmp_path: Path
) -> None:
    # A SOURCE_DATE_EPOCH later than both exports: clamping hides nothing. The engine
    # stamps the directories its init layer touches (dev/, etc/) with the container's
    # creation time; each build exports afresh, a second apart.
    env = _env(tmp_path, SOURCE_DATE_EPOCH="4000000000")
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        result = invoke("build-all", "--no-cache", "--base", busybox_image, "--out", str(out),
                        env=env)  # fmt: skip
        assert result.returncode == 0, result.stderr
        time.sleep(1.1)

    for name in ARTIFACTS:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    created = engine.images.get(busybox_image).attrs["Created"][:19]
    image_time = int(datetime.datetime.fromisoformat(created + "+00:00").timestamp())
    with tarfile.open(outs[0] / "rootfs.tar.gz") as tar:
        for name in ("dev", "etc"):
            assert tar.getmember(name).mtime <= image_time, name


def test_unchanged_rebuild_is_a_no_op_and_cache_serves_other_outs(
    busybox_image: str, tmp_path: Path
) -> None:
    env = _env(tmp_path, UVMKIT_DEBUG="1")
    first = invoke("build-all", "--base", busybox_image, "--out", str(tmp_path / "a"), env=env)
    assert first.returncode == 0, first.stderr

    # Python lists every module it imports: neither build may load the Docker SDK, whose
    # import alone would be a quarter of the time they take.
    env["PYTHONPROFILEIMPORTTIME"] = "1"
    again = invoke("build-all", "--base", busybox_image, "--out", str(tmp_path / "a"), env=env)
    other = invoke("build-all", "--base", busybox_image, "--out", str(tmp_path / "b"), env=env)

    assert again.returncode == 0 and "is up to date" in again.stderr
    assert other.returncode == 0 and "reused the cached build" in other.stderr
    for result in (again, other):
        modules = _imported_modules(result.stderr)
        assert "uvmkit.build" in modules
        assert not modules & {"docker", "requests", "uvmkit.engine"}
    for name in ARTIFACTS:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def _imported_modules(stderr: str) -> set[str]:
    """The modules named by PYTHONPROFILEIMPORTTIME's "import time: ... | name" lines."""
    prefix = "import time:"
    return {
        line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith(prefix)
    }


def test_damaged_cache_entry_is_rebuilt_not_used(busybox_image: str, tmp_path: Path) -> None:
    env = _env(tmp_path, UVMKIT_DEBUG="1")
    first = invoke("build-all", "--base", busybox_image, "--out", str(tmp_path / "a"), env=env)
    assert first.returncode == 0, first.stderr
    good = (tmp_path / "a" / "initrd.img").read_bytes()
    entries = list((tmp_path / "cache" / "uvmkit" / "builds").glob("*/initrd.img"))
    assert len(entries) == 1
    # Break the cache entry (a copy, so out/a keeps its own good file).
    entries[0].unlink()
    entries[0].write_bytes(good[:-10] + b"0123456789")

    second = invoke("build-all", "--base", busybox_image, "--out", str(tmp_path / "b"), env=env)

    assert second.returncode == 0, second.stderr
    assert "is damaged" in second.stderr
    assert (tmp_path / "b" / "initrd.img").read_bytes() == good


def test_export_read_as_it_streams_builds_what_the_spooled_export_builds(
    debian_image: str, tmp_path: Path
) -> None:
    """A first build reads the engine's export as it arrives; a later one finds the export
    in the cache and reads the file. Both must write the same bytes."""
    env = _env(tmp_path, UVMKIT_DEBUG="1")
    first = invoke("build-all", "--base", debian_image, "--out", str(tmp_path / "a"), env=env)
    assert first.returncode == 0, first.stderr
    assert "read the base's entries as the export streamed in" in first.stderr
    # Keep the export; forget the artifacts and their segments, so everything is written.
    for kind in ("builds", "segments"):
        shutil.rmtree(tmp_path / "cache" / "uvmkit" / kind)

    second = invoke("build-all", "--base", debian_image, "--out", str(tmp_path / "b"), env=env)

    assert second.returncode == 0, second.stderr
    assert f"export of {debian_image}: reused from the cache" in second.stderr
    assert "Reading the base (1 layer(s))" in second.stderr
    assert "streamed in" not in second.stderr
    for name in ARTIFACTS:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_usr_merged_debian_base(debian_image: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke("build-all", "--base", debian_image, "--out", str(out), env=_env(tmp_path))
    assert result.returncode == 0, result.stderr

    initrd = by_path(read_with_libarchive(out / "initrd.img"))
    rootfs = by_path(read_with_tarfile(out / "rootfs.tar.gz"))
    delta = by_path(read_with_tarfile(out / "delta.tar.gz"))

    assert len(initrd) > 5000
    assert set(initrd) == set(rootfs)
    assert initrd["bin"].kind == "symlink" and initrd["bin"].link == "usr/bin"
    assert initrd["usr/bin/uvmkit-agent"].data.startswith(b"\x7fELF")
    assert "bin/uvmkit-agent" not in initrd
    assert "usr/bin/uvmkit-agent" in delta and "bin" not in delta
    # Debian's shadow files keep their group in both archives.
    assert initrd["etc/shadow"].gid == rootfs["etc/shadow"].gid == 42
    assert initrd["usr/bin/passwd"].mode & 0o4000


def test_engine_image_with_tricky_entries(engine: docker.DockerClient, tmp_path: Path) -> None:
    """An image made with `docker import`: a hard link to a symlink, setuid, binary xattrs."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, mode, extra in [
            ("usr", tarfile.DIRTYPE, 0o755, {}),
            ("usr/bin", tarfile.DIRTYPE, 0o755, {}),
            ("usr/bin/sudo", tarfile.REGTYPE, 0o4755, {}),
            ("target", tarfile.REGTYPE, 0o644, {}),
            ("s", tarfile.SYMTYPE, 0o777, {"linkname": "target"}),
            ("h", tarfile.LNKTYPE, 0o777, {"linkname": "s"}),
        ]:
            info = tarfile.TarInfo(name)
            info.type, info.mode = kind, mode
            info.linkname = extra.get("linkname", "")
            tar.addfile(info, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    ref = "uvmkit-test/tricky:1"
    services.import_tar(engine, tar_bytes.getvalue(), ref, message="uvmkit test", labels={})
    try:
        out = tmp_path / "out"
        result = invoke("build-all", "--base", ref, "--out", str(out), env=_env(tmp_path))
        assert result.returncode == 0, result.stderr
        for members in (
            read_with_libarchive(out / "initrd.img"),
            read_with_tarfile(out / "rootfs.tar.gz"),
        ):
            entries = by_path(members)
            assert entries["s"].kind == entries["h"].kind == "symlink"
            assert entries["s"].link == entries["h"].link == "target"
            assert entries["usr/bin/sudo"].mode & 0o7777 == 0o4755
    finally:
        engine.images.remove(ref, force=True)


# --- errors a user will meet ----------------------------------------------------------


def _assert_clean_failure(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_missing_image_is_one_line_and_nothing_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke("build-all", "--base", "uvmkit-test/none:404", "--out", str(out),
                    env=_env(tmp_path))  # fmt: skip
    _assert_clean_failure(result, "uvmkit-test/none:404", "hint:")
    # The build made out/ itself, so it takes it away again, empty as it was.
    assert not out.exists()


def test_unreachable_engine_names_it(tmp_path: Path) -> None:
    result = invoke("build-all", "--base", "busybox:local", "--out", str(tmp_path / "out"),
                    env=_env(tmp_path, DOCKER_HOST="tcp://127.0.0.1:9"))  # fmt: skip
    _assert_clean_failure(result, "cannot reach a Docker engine at tcp://127.0.0.1:9")


def test_out_that_is_a_file(busybox_image: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("not a directory")
    result = invoke("build-all", "--base", busybox_image, "--out", str(out), env=_env(tmp_path))
    _assert_clean_failure(result, str(out))
    assert out.read_text() == "not a directory"


def test_unreadable_base_file(tmp_path: Path) -> None:
    base = tmp_path / "base.tar"
    base.write_bytes(b"this is not an archive\n" * 100)
    result = invoke("build-all", "--base", str(base), "--out", str(tmp_path / "out"),
                    env=_env(tmp_path))  # fmt: skip
    _assert_clean_failure(result, str(base), "not a tar, cpio, gzip or zstd archive")


def test_an_empty_tar_as_base_is_called_empty(tmp_path: Path) -> None:
    base = tmp_path / "empty.tar"
    subprocess.run(["tar", "-cf", str(base), "--files-from", "/dev/null"], check=True)
    result = invoke("build-all", "--base", str(base), "--out", str(tmp_path / "out"),
                    env=_env(tmp_path))  # fmt: skip
    _assert_clean_failure(result, f"base {base} holds no entries: it is an empty tar, or zeros")


def test_malformed_reference_is_blamed_on_the_reference(tmp_path: Path) -> None:
    result = invoke("build-all", "--base", "Bad Ref!!", "--out", str(tmp_path / "out"),
                    env=_env(tmp_path))  # fmt: skip
    _assert_clean_failure(result, "'Bad Ref!!' is not a valid image reference", "NAME[:TAG]")
    assert "DOCKER_HOST" not in result.stderr


def test_plain_directory_base_says_what_to_pass(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    result = invoke("build-all", "--base", str(tree), "--out", str(tmp_path / "out"),
                    env=_env(tmp_path))  # fmt: skip
    _assert_clean_failure(result, "not an OCI image layout (it has no index.json)", "tar -C")


def test_image_of_another_platform_is_refused(engine: docker.DockerClient, tmp_path: Path) -> None:
    # `docker load` of a one-layer arm64 image: the engine then reports that architecture.
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tarfile.TarInfo("etc")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    diff_id = "sha256:" + hashlib.sha256(layer.getvalue()).hexdigest()
    config = json.dumps({"architecture": "arm64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()  # fmt: skip
    ref = "uvmkit-test/arm64:latest"
    manifest = json.dumps([{"Config": "config.json", "RepoTags": [ref], "Layers": ["l.tar"]}])
    saved = io.BytesIO()
    with tarfile.open(fileobj=saved, mode="w") as tar:
        for name, data in (("config.json", config), ("l.tar", layer.getvalue()),
                           ("manifest.json", manifest.encode())):  # fmt: skip
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    engine.images.load(saved.getvalue())
    assert engine.images.get(ref).attrs["Architecture"] == "arm64"
    try:
        default = invoke("build-all", "--base", ref, "--out", str(tmp_path / "a"),
                         env=_env(tmp_path))  # fmt: skip
        bogus = invoke("build-all", "--base", ref, "--platform", "arm64", "--out",
                       str(tmp_path / "b"), env=_env(tmp_path))  # fmt: skip
    finally:
        engine.images.remove(ref, force=True)

    _assert_clean_failure(
        default,
        f"image {ref} is for linux/arm64, not linux/amd64",
        "hint: use a linux/amd64 image, the only kind uvmkit's guest runs on",
    )
    _assert_clean_failure(bogus, "platform 'arm64' is not OS/ARCH")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_missing_compiler(busybox_build: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("git",):
        found = subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip()
        (bin_dir / tool).symlink_to(found)
    base = tmp_path / "base.tar"
    with tarfile.open(base, "w") as tar:
        info = tarfile.TarInfo("etc")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    env = _env(tmp_path, PATH=str(bin_dir))
    result = subprocess.run(
        [sys.executable, "-m", "invoke", "build-all", "--base", str(base), "--out",
         str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    _assert_clean_failure(result, "no C compiler", "musl-tools")


def test_failed_build_keeps_previous_artifacts(busybox_image: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    good = invoke("build-all", "--base", busybox_image, "--out", str(out), env=_env(tmp_path))
    assert good.returncode == 0, good.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        info = tarfile.TarInfo("../evil")
        tar.addfile(info, io.BytesIO(b""))

    result = invoke("build-all", "--base", str(bad), "--out", str(out), env=_env(tmp_path))

    _assert_clean_failure(result, "../evil")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize(
    ("sent", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"]
)
def test_an_interrupt_leaves_nothing_behind(
    debian_image: str, engine: docker.DockerClient, tmp_path: Path, sent: int, status: int
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "initrd.img").write_bytes(b"the previous initrd")
    before = _labelled_containers(engine)
    proc = subprocess.Popen(
        [sys.executable, "-m", "invoke", "--debug", "build-all", "--base", debian_image,
         "--out", str(out), "--no-cache"],
        cwd=ROOT, env=_env(tmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:
        if "Exporting" in line:
            time.sleep(0.3)  # inside the export stream
            proc.send_signal(sent)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == status, rest
    assert "interrupted" in rest
    assert sorted(p.name for p in out.iterdir()) == ["initrd.img"]
    assert (out / "initrd.img").read_bytes() == b"the previous initrd"
    assert _labelled_containers(engine) == before


def _communicate_or_dump(proc: subprocess.Popen[str], when: float) -> str:
    """The stderr of a build told to stop; a failure with every thread's stack if it
    does not stop within two minutes (SIGABRT makes faulthandler print them)."""
    try:
        return proc.communicate(timeout=120)[1]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        stacks = proc.communicate(timeout=30)[1]
        raise AssertionError(f"the build interrupted at {when} did not stop:\n{stacks}") from None


@pytest.mark.slow
def test_ctrl_c_at_any_moment_leaves_one_whole_build(
    busybox_image: str, debian_image: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    # A build that hangs instead of stopping shows where each of its threads waits.
    env = _env(tmp_path, PYTHONFAULTHANDLER="1")
    first = invoke("build-all", "--base", busybox_image, "--out", str(out), env=env)
    assert first.returncode == 0, first.stderr
    argv = [sys.executable, "-m", "invoke", "build-all", "--no-cache", "--base", debian_image,
            "--out", str(out)]  # fmt: skip
    start = time.monotonic()
    whole = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    duration = time.monotonic() - start
    first = invoke("build-all", "--base", busybox_image, "--out", str(out), env=env)
    assert first.returncode == 0, first.stderr

    # Signals spread over the whole build, the last ones around the publishing at its end.
    for fraction in (0.2, 0.5, 0.8, 0.9, 0.95, 1.0, 1.05):
        before = (out / "manifest.json").read_text()
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(duration * fraction)
        proc.send_signal(signal.SIGINT)
        stderr = _communicate_or_dump(proc, fraction)

        # A signal after the build returned (while Python exits) ends it by that signal.
        finished = "artifacts in" in stderr
        assert proc.returncode in (0, 130, *((-signal.SIGINT,) if finished else ())), stderr
        assert "Traceback" not in stderr
        check = subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=out,
                               capture_output=True, text=True)  # fmt: skip
        assert check.returncode == 0, (fraction, check.stdout, stderr)
        assert sorted(p.name for p in out.iterdir() if p.name.startswith(".uvmkit-build")) == []
        if "nothing in" in stderr:
            assert (out / "manifest.json").read_text() == before, fraction
        elif proc.returncode == 130:
            assert "after the build finished" in stderr, stderr
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["base"]["ref"] in (busybox_image, debian_image)
        if manifest["base"]["ref"] == debian_image:
            restore = invoke("build-all", "--base", busybox_image, "--out", str(out), env=env)
            assert restore.returncode == 0, restore.stderr
