"""uvmkit.image_archive on real docker save archives and OCI layouts built in tmp_path.

The inputs are written here with tarfile, json, gzip, zstandard and hashlib, independently
of the code under test; the layers it returns are applied with the tree and read back.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import docker
import pytest
import zstandard
from helpers import invoke, run_build

from uvmkit.archive import Kind, read_tar
from uvmkit.base import BaseSource
from uvmkit.cache import Cache
from uvmkit.errors import BadInputError
from uvmkit.image_archive import DOCKER_SAVE, OCI, detect, from_oci_dir, from_tar
from uvmkit.tree import Blob, Tree

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TYPES = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
COMPRESSIONS = list(LAYER_TYPES)

# --- layer tars ---------------------------------------------------------------------------

Member = tuple[tarfile.TarInfo, bytes]


def file(name: str, data: bytes = b"", mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def directory(name: str, mode: int = 0o755) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return info, b""


def symlink(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
    return info, b""


def hardlink(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info, b""


def layer_tar(members: Sequence[Member]) -> bytes:
    """An uncompressed layer; names may carry non-UTF-8 bytes as surrogate escapes."""
    out = io.BytesIO()
    with tarfile.open(
        fileobj=out, mode="w", format=tarfile.GNU_FORMAT, errors="surrogateescape"
    ) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return out.getvalue()


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def config_json(layers: Sequence[bytes], platform: str = "linux/amd64") -> bytes:
    os_name, arch, *variant = platform.split("/")
    config: dict[str, object] = {
        "architecture": arch,
        "os": os_name,
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [sha256(layer) for layer in layers]},
    }
    if variant:
        config["variant"] = variant[0]
    return json.dumps(config).encode()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# --- image archives -----------------------------------------------------------------------


@dataclass
class DockerSave:
    path: Path
    config: str
    layer_members: list[str]
    diff_ids: list[str]


def write_docker_save(
    path: Path,
    layers: Sequence[bytes],
    *,
    compression: str = "none",
    tags: Sequence[str] = ("test:latest",),
    images: int = 1,
    platform: str = "linux/amd64",
) -> DockerSave:
    """A classic `docker save` archive (Docker before 25): <id>/layer.tar, <hex>.json.

    A layer that appears twice is stored once and linked, as docker does.
    """
    config = config_json(layers, platform)
    config_hex = sha256(config).removeprefix("sha256:")
    members: list[str] = []
    first_of: dict[str, str] = {}
    with tarfile.open(path, "w") as tar:
        add(tar, f"{config_hex}.json", config)
        for i, layer in enumerate(layers):
            diff_id = sha256(layer)
            layer_id = hashlib.sha256(f"{i}:{diff_id}".encode()).hexdigest()
            member = f"{layer_id}/layer.tar"
            tar.addfile(directory(f"{layer_id}/")[0])
            add(tar, f"{layer_id}/VERSION", b"1.0")
            add(tar, f"{layer_id}/json", json.dumps({"id": layer_id}).encode())
            if diff_id in first_of:
                tar.addfile(symlink(member, f"../{first_of[diff_id]}")[0])
            else:
                add(tar, member, compress(layer, compression))
                first_of[diff_id] = member
            members.append(member)
        entry = {"Config": f"{config_hex}.json", "RepoTags": list(tags), "Layers": members}
        add(tar, "manifest.json", json.dumps([entry] * images).encode())
    return DockerSave(path, f"{config_hex}.json", members, [sha256(x) for x in layers])


@dataclass
class OciImage:
    layers: list[bytes]
    platform: str = "linux/amd64"
    ref_name: str | None = "test:latest"


@dataclass
class OciWritten:
    root: Path
    manifests: list[str] = field(default_factory=list)
    configs: list[str] = field(default_factory=list)
    layers: list[list[str]] = field(default_factory=list)


def write_blob(root: Path, data: bytes, media_type: str) -> dict[str, object]:
    digest = sha256(data)
    path = root / "blobs" / "sha256" / digest.removeprefix("sha256:")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def write_oci_layout(
    root: Path,
    images: Sequence[OciImage],
    *,
    compression: str = "none",
    index: str = "flat",
    descriptor_platform: bool = True,
) -> OciWritten:
    """An OCI image layout directory; `index` is "flat" (index.json lists the manifests),
    "nested" (index.json -> an inner index) or "nested-untyped" (that descriptor has no
    mediaType)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    written = OciWritten(root)
    descriptors = []
    for image in images:
        layer_descs = [
            write_blob(root, compress(layer, compression), LAYER_TYPES[compression])
            for layer in image.layers
        ]
        config = write_blob(root, config_json(image.layers, image.platform), OCI_CONFIG)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config,
            "layers": layer_descs,
        }
        desc = write_blob(root, json.dumps(manifest).encode(), OCI_MANIFEST)
        if descriptor_platform:
            os_name, arch, *variant = image.platform.split("/")
            desc["platform"] = {"os": os_name, "architecture": arch}
            if variant:
                desc["platform"] = {"os": os_name, "architecture": arch, "variant": variant[0]}
        if image.ref_name:
            desc["annotations"] = {"org.opencontainers.image.ref.name": image.ref_name}
        descriptors.append(desc)
        written.manifests.append(str(desc["digest"]))
        written.configs.append(str(config["digest"]))
        written.layers.append([str(d["digest"]) for d in layer_descs])
    if index != "flat":
        inner = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
        inner_desc = write_blob(root, json.dumps(inner).encode(), OCI_INDEX)
        if index == "nested-untyped":
            del inner_desc["mediaType"]
        descriptors = [inner_desc]
    top = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
    (root / "index.json").write_text(json.dumps(top))
    return written


def tar_directory(root: Path, out: Path) -> Path:
    with tarfile.open(out, "w") as tar:
        for path in sorted(root.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(root)), recursive=False)
    return out


def blob_path(root: Path, digest: str) -> Path:
    return root / "blobs" / "sha256" / digest.removeprefix("sha256:")


# --- running the code under test ----------------------------------------------------------


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(tmp_path / "cache")


def read_archive(path: Path, cache: Cache, work: Path, platform: str = "") -> BaseSource:
    """What base.from_file does with an uncompressed tar: detect, then read the layout."""
    layout = detect(path)
    assert layout is not None, f"{path} not detected as an image archive"
    return from_tar(path, layout, source=path, cache=cache, work_dir=work, platform=platform)


Snapshot = dict[bytes, tuple[str, int, int, int, bytes]]


def snapshot_of(tree: Tree) -> Snapshot:
    """Every path's kind, mode, owner and content (file bytes or symlink target)."""
    snapshot: Snapshot = {}
    for path, inode in tree.sorted_entries():
        if isinstance(inode.data, Blob):
            content = os.pread(inode.data.fd, inode.size, inode.data.offset)
        elif inode.kind is Kind.SYMLINK:
            content = inode.target
        else:
            content = inode.data or b""
        snapshot[path] = (inode.kind.value, inode.mode, inode.uid, inode.gid, content)
    return snapshot


def apply_tar(
    tree: Tree, path: Path, name: str, fds: list[int], *, start: int = 0, end: int | None = None
) -> None:
    fd = os.open(path, os.O_RDONLY)
    fds.append(fd)
    with path.open("rb") as f:
        tree.apply_layer(read_tar(f, name, start=start, end=end), fd=fd, archive=name)


def merge(source: BaseSource) -> tuple[Tree, Snapshot]:
    """The source's layers applied with the tree, lowest first, and what they give."""
    tree = Tree()
    fds: list[int] = []
    try:
        for layer in source.layers:
            apply_tar(tree, layer.path, layer.name, fds, start=layer.start, end=layer.end)
        return tree, snapshot_of(tree)
    finally:
        for fd in fds:
            os.close(fd)


# Each writer makes one image in a directory and gives back how to read it, as base.py would.
Reader = Callable[[Cache, Path], BaseSource]


def docker_save_input(tmp: Path, layers: list[bytes], compression: str) -> Reader:
    path = write_docker_save(tmp / "image.tar", layers, compression=compression).path
    return lambda cache, work: read_archive(path, cache, work)


def oci_dir_input(tmp: Path, layers: list[bytes], compression: str) -> Reader:
    root = write_oci_layout(tmp / "layout", [OciImage(layers)], compression=compression).root
    return lambda cache, work: from_oci_dir(root, cache=cache, work_dir=work, platform="")


def oci_tar_input(tmp: Path, layers: list[bytes], compression: str) -> Reader:
    root = write_oci_layout(tmp / "layout", [OciImage(layers)], compression=compression).root
    path = tar_directory(root, tmp / "oci.tar")
    return lambda cache, work: read_archive(path, cache, work)


WRITERS: dict[str, Callable[[Path, list[bytes], str], Reader]] = {
    "docker-save": docker_save_input,
    "oci-dir": oci_dir_input,
    "oci-tar": oci_tar_input,
}


def build(kind: str, tmp: Path, layers: list[bytes], compression: str = "none") -> BaseSource:
    read = WRITERS[kind](tmp, layers, compression)
    return read(Cache(tmp / "cache"), tmp / "work")


# --- detection ----------------------------------------------------------------------------


def test_detect_each_kind(tmp_path: Path) -> None:
    layer = layer_tar([file("etc/hostname", b"vm\n")])
    classic = write_docker_save(tmp_path / "classic.tar", [layer]).path
    oci_root = write_oci_layout(tmp_path / "oci", [OciImage([layer])]).root
    oci = tar_directory(oci_root, tmp_path / "oci.tar")
    plain = tmp_path / "rootfs.tar"
    plain.write_bytes(layer_tar([directory("etc"), file("etc/hostname", b"vm\n")]))
    # A root filesystem that happens to hold the OCI marker names is still a root
    # filesystem: it has members deeper than any image layout.
    lookalike = tmp_path / "lookalike.tar"
    lookalike.write_bytes(
        layer_tar([file("oci-layout"), file("index.json"), file("usr/share/doc/x/copyright")])
    )

    assert detect(classic) == DOCKER_SAVE
    assert detect(oci) == OCI
    assert detect(plain) is None
    assert detect(lookalike) is None


def test_an_image_archive_without_its_index_is_refused(tmp_path: Path) -> None:
    layer = layer_tar([file("etc/hostname", b"vm\n")])
    saved = write_docker_save(tmp_path / "saved.tar", [layer])
    headless = tmp_path / "headless.tar"
    with tarfile.open(saved.path) as source, tarfile.open(headless, "w") as target:
        for member in source.getmembers():
            if member.name != "manifest.json":
                target.addfile(member, source.extractfile(member) if member.isfile() else None)
    oci_root = write_oci_layout(tmp_path / "oci", [OciImage([layer])]).root
    (oci_root / "index.json").unlink()
    oci = tar_directory(oci_root, tmp_path / "oci.tar")

    with pytest.raises(BadInputError) as no_manifest:
        detect(headless)
    with pytest.raises(BadInputError) as no_index:
        detect(oci)

    assert no_manifest.value.message == (
        f"{headless} looks like a docker save archive ({saved.layer_members[0]}) but has no "
        "manifest.json"
    )
    assert no_index.value.message == f"{oci} has an oci-layout file but no index.json"


def test_a_docker_save_of_another_platform_is_refused(tmp_path: Path, cache: Cache) -> None:
    layer = layer_tar([file("arch", b"arm64")])
    saved = write_docker_save(tmp_path / "arm.tar", [layer], platform="linux/arm64").path

    with pytest.raises(BadInputError) as caught:
        read_archive(saved, cache, tmp_path / "work")

    assert caught.value.message == f"{saved} is an image for linux/arm64, not linux/amd64"
    assert caught.value.hint == ("save a linux/amd64 image, the only kind uvmkit's guest runs on")


def test_docker_25_layout_is_read_as_docker_save(tmp_path: Path, cache: Cache) -> None:
    """Docker 25+ writes an OCI layout with manifest.json naming blobs/sha256/<hex>."""
    layer = layer_tar([file("etc/os-release", b"ID=test\n")])
    written = write_oci_layout(tmp_path / "layout", [OciImage([layer])])
    entry = {
        "Config": f"blobs/sha256/{written.configs[0].removeprefix('sha256:')}",
        "RepoTags": ["test:25"],
        "Layers": [f"blobs/sha256/{d.removeprefix('sha256:')}" for d in written.layers[0]],
    }
    (written.root / "manifest.json").write_text(json.dumps([entry]))
    # The index may list platforms whose blobs the archive does not hold.
    index = json.loads((written.root / "index.json").read_text())
    absent = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "1" * 64, "size": 10}
    index["manifests"].append({**absent, "platform": {"os": "linux", "architecture": "arm64"}})
    (written.root / "index.json").write_text(json.dumps(index))
    path = tar_directory(written.root, tmp_path / "docker25.tar")

    assert detect(path) == DOCKER_SAVE
    source = read_archive(path, cache, tmp_path / "work")

    assert source.kind == "docker-save"
    assert source.id == written.configs[0]
    assert source.digests == (written.manifests[0],)
    assert source.origin == "test:25"
    assert merge(source)[1][b"etc/os-release"][4] == b"ID=test\n"


# --- platforms ----------------------------------------------------------------------------


def two_platforms(root: Path, index: str = "flat") -> OciWritten:
    return write_oci_layout(
        root,
        [
            OciImage([layer_tar([file("arch", b"amd64")])], "linux/amd64", "test:amd64"),
            OciImage([layer_tar([file("arch", b"arm64")])], "linux/arm64/v8", "test:arm64"),
        ],
        compression="gzip",
        index=index,
    )


@pytest.mark.parametrize("index", ["flat", "nested", "nested-untyped"])
@pytest.mark.parametrize(
    ("platform", "arch"),
    [
        ("", "amd64"),
        ("linux/amd64", "amd64"),
        ("linux/arm64", "arm64"),
        ("linux/arm64/v8", "arm64"),
    ],
)
def test_platform_chosen_from_index(
    tmp_path: Path, cache: Cache, index: str, platform: str, arch: str
) -> None:
    written = two_platforms(tmp_path / "layout", index)

    source = from_oci_dir(written.root, cache=cache, work_dir=tmp_path / "work", platform=platform)

    chosen = 0 if arch == "amd64" else 1
    assert merge(source)[1][b"arch"][4] == arch.encode()
    assert source.kind == "oci-layout"
    assert source.id == written.configs[chosen]
    assert source.digests == (written.manifests[chosen],)
    assert source.origin == f"test:{arch}"


def test_missing_platform_lists_what_the_index_offers(tmp_path: Path, cache: Cache) -> None:
    written = two_platforms(tmp_path / "layout", "nested")

    with pytest.raises(BadInputError) as caught:
        from_oci_dir(written.root, cache=cache, work_dir=tmp_path / "work", platform="linux/s390x")

    message = str(caught.value)
    assert str(written.root) in message
    assert "linux/s390x" in message
    assert "linux/amd64, linux/arm64/v8" in message
    assert "hint: use an archive that holds a linux/amd64 image" in message


def test_platform_from_the_config_when_the_index_does_not_say(tmp_path: Path, cache: Cache) -> None:
    image = OciImage([layer_tar([file("arch", b"arm64")])], "linux/arm64")
    root = write_oci_layout(tmp_path / "layout", [image], descriptor_platform=False).root

    source = from_oci_dir(root, cache=cache, work_dir=tmp_path / "work", platform="linux/arm64")
    assert merge(source)[1][b"arch"][4] == b"arm64"
    with pytest.raises(BadInputError, match=r"no image for platform linux/amd64.*linux/arm64"):
        from_oci_dir(root, cache=cache, work_dir=tmp_path / "work", platform="linux/amd64")


def test_bad_platform_text(tmp_path: Path, cache: Cache) -> None:
    root = two_platforms(tmp_path / "layout").root
    with pytest.raises(BadInputError, match="not OS/ARCH"):
        from_oci_dir(root, cache=cache, work_dir=tmp_path / "work", platform="amd64")


# --- layers and compression ---------------------------------------------------------------


def sample_layers() -> list[bytes]:
    lower = layer_tar(
        [
            directory("usr", 0o755),
            directory("usr/bin", 0o755),
            file("usr/bin/tool", b"#!/bin/sh\necho tool\n", 0o4755),
            hardlink("usr/bin/tool2", "usr/bin/tool"),
            symlink("bin", "usr/bin"),
            directory("tmp", 0o1777),
            file("etc/hostname", b"lower\n"),
            file("etc/gone", b"deleted above"),
        ]
    )
    upper = layer_tar(
        [
            file("etc/hostname", b"upper\n", 0o600),
            file("etc/.wh.gone"),
            file("etc/caf\udce9", b"not UTF-8"),
            file("big", bytes(range(256)) * 4096),
        ]
    )
    return [lower, upper]


EXPECTED_SAMPLE_PATHS = [
    b"big",
    b"bin",
    b"etc",
    b"etc/caf\xe9",
    b"etc/hostname",
    b"tmp",
    b"usr",
    b"usr/bin",
    b"usr/bin/tool",
    b"usr/bin/tool2",
]


@pytest.mark.parametrize("kind", list(WRITERS))
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_every_compression_gives_the_same_tree(tmp_path: Path, kind: str, compression: str) -> None:
    layers = sample_layers()
    # The reference: the same layer tars, applied straight from files of their own.
    reference = Tree()
    fds: list[int] = []
    for i, layer in enumerate(layers):
        plain = tmp_path / f"plain{i}.tar"
        plain.write_bytes(layer)
        apply_tar(reference, plain, str(plain), fds)
    expected = snapshot_of(reference)
    for fd in fds:
        os.close(fd)

    source = build(kind, tmp_path, layers, compression)
    tree, snapshot = merge(source)

    assert list(snapshot) == EXPECTED_SAMPLE_PATHS
    assert snapshot == expected
    assert snapshot[b"usr/bin/tool"][:2] == ("file", 0o4755)
    assert snapshot[b"tmp"][:2] == ("dir", 0o1777)
    assert snapshot[b"etc/hostname"] == ("file", 0o600, 0, 0, b"upper\n")
    assert snapshot[b"bin"] == ("symlink", 0o777, 0, 0, b"usr/bin")
    assert tree.lookup(b"usr/bin/tool2") is tree.lookup(b"usr/bin/tool")
    assert source.details["compression"] == f"{compression}, {compression}"


@pytest.mark.parametrize("kind", ["docker-save", "oci-tar"])
def test_uncompressed_layers_are_used_in_place(tmp_path: Path, kind: str) -> None:
    source = build(kind, tmp_path, sample_layers())

    archive = Path(source.ref)
    with tarfile.open(archive) as tar:
        starts = {m.offset_data for m in tar.getmembers() if m.isfile()}
    for layer in source.layers:
        assert layer.path == archive
        assert layer.start in starts
        assert layer.end is not None and layer.end > layer.start
    assert not (tmp_path / "cache" / "layers").exists()


def test_compressed_layers_are_decompressed_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    read = oci_dir_input(tmp_path, sample_layers(), "zstd")
    cache = Cache(tmp_path / "cache")

    first = read(cache, tmp_path / "work")
    with caplog.at_level(logging.DEBUG, logger="uvmkit"):
        second = read(cache, tmp_path / "work")

    assert [layer.path for layer in first.layers] == [layer.path for layer in second.layers]
    assert all((tmp_path / "cache" / "layers") in layer.path.parents for layer in first.layers)
    assert caplog.text.count("reused from the cache") == 2
    assert "Decompressing" not in caplog.text
    assert merge(second)[1] == merge(first)[1]


def test_without_a_cache_layers_go_to_the_work_dir(tmp_path: Path) -> None:
    read = oci_dir_input(tmp_path, sample_layers(), "gzip")

    source = read(Cache(tmp_path / "cache", enabled=False), tmp_path / "work")

    assert all((tmp_path / "work") in layer.path.parents for layer in source.layers)
    assert list(merge(source)[1]) == EXPECTED_SAMPLE_PATHS
    assert not (tmp_path / "cache").exists()


def test_docker_save_links_a_repeated_layer(tmp_path: Path, cache: Cache) -> None:
    same = layer_tar([file("f", b"same")])
    saved = write_docker_save(tmp_path / "image.tar", [same, same])
    with tarfile.open(saved.path) as tar:
        assert tar.getmember(saved.layer_members[1]).issym()

    source = read_archive(saved.path, cache, tmp_path / "work")

    assert len(source.layers) == 2
    assert source.layers[0].start == source.layers[1].start
    assert merge(source)[1][b"f"][4] == b"same"


def test_docker_save_fields(tmp_path: Path, cache: Cache) -> None:
    saved = write_docker_save(tmp_path / "image.tar", sample_layers(), tags=["a:1", "a:latest"])

    source = read_archive(saved.path, cache, tmp_path / "work")

    assert source.kind == "docker-save"
    assert source.ref == str(saved.path)
    assert source.id == "sha256:" + saved.config.removesuffix(".json")
    assert source.origin == "a:1, a:latest"
    assert source.digests == ()
    assert source.details == {
        "layout": "docker save",
        "platform": "linux/amd64",
        "compression": "none, none",
    }
    assert saved.layer_members[0] in source.layers[0].name


def test_docker_save_with_several_images_uses_the_first(
    tmp_path: Path, cache: Cache, caplog: pytest.LogCaptureFixture
) -> None:
    saved = write_docker_save(tmp_path / "image.tar", sample_layers(), tags=["first:1"], images=2)

    with caplog.at_level(logging.WARNING, logger="uvmkit"):
        source = read_archive(saved.path, cache, tmp_path / "work")

    assert source.origin == "first:1"
    assert "holds 2 images; using the first (first:1)" in caplog.text


# --- CASES.md 9 and 10 --------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(WRITERS))
def test_case_9_opaque_directory(tmp_path: Path, kind: str) -> None:
    lower = layer_tar([file("a/b/foo", b"foo")])
    upper = layer_tar([file("a/.wh..wh..opq"), file("a/new", b"new")])

    snapshot = merge(build(kind, tmp_path, [lower, upper], "gzip"))[1]

    assert [p for p in snapshot if p.startswith(b"a/")] == [b"a/new"]
    assert snapshot[b"a"][0] == "dir"
    assert snapshot[b"a/new"] == ("file", 0o644, 0, 0, b"new")
    assert not any(b".wh." in p for p in snapshot)


@pytest.mark.parametrize("kind", list(WRITERS))
def test_case_9_opaque_marker_under_a_lower_symlink(tmp_path: Path, kind: str) -> None:
    lower = layer_tar([file("t/keep", b"kept"), symlink("link", "t")])
    upper = layer_tar([file("link/.wh..wh..opq")])

    snapshot = merge(build(kind, tmp_path, [lower, upper]))[1]

    assert snapshot[b"t/keep"] == ("file", 0o644, 0, 0, b"kept")
    assert snapshot[b"link"] == ("symlink", 0o777, 0, 0, b"t")
    assert not any(b".wh." in p for p in snapshot)


@pytest.mark.parametrize("kind", list(WRITERS))
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_case_10_whiteout_as_hard_link_and_link_to_lower(
    tmp_path: Path, kind: str, compression: str
) -> None:
    lower = layer_tar([file("w/a", b"A", 0o640), file("w/b", b"B")])
    upper = layer_tar([hardlink("w/.wh.b", "w/a"), hardlink("w/c", "w/a")])

    tree, snapshot = merge(build(kind, tmp_path, [lower, upper], compression))

    assert list(snapshot) == [b"w", b"w/a", b"w/c"]
    assert snapshot[b"w/a"] == ("file", 0o640, 0, 0, b"A")
    assert snapshot[b"w/c"] == ("file", 0o640, 0, 0, b"A")
    assert tree.lookup(b"w/c") is tree.lookup(b"w/a")
    assert not any(b".wh." in p for p in snapshot)


# --- damaged inputs -----------------------------------------------------------------------


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def corrupt_layers() -> list[bytes]:
    return [layer_tar([file("data", bytes(range(256)) * 16)])]


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_corrupt_oci_blob_names_its_digest(tmp_path: Path, cache: Cache, compression: str) -> None:
    image = OciImage(corrupt_layers())
    written = write_oci_layout(tmp_path / "layout", [image], compression=compression)
    digest = written.layers[0][0]
    blob = blob_path(written.root, digest)
    flip(blob, blob.stat().st_size // 2)

    with pytest.raises(BadInputError) as caught:
        from_oci_dir(written.root, cache=cache, work_dir=tmp_path / "work")

    assert str(caught.value).startswith(f"{written.root}: layer {digest} is damaged")
    assert caught.value.hint


def test_oci_blob_damaged_after_a_cached_build_is_still_reported(tmp_path: Path) -> None:
    written = write_oci_layout(tmp_path / "layout", [OciImage(corrupt_layers())])
    first, _ = run_build(written.root, tmp_path)
    assert first.returncode == 0, first.stderr
    digest = written.layers[0][0]
    blob = blob_path(written.root, digest)
    flip(blob, blob.stat().st_size // 2)  # index.json is unchanged

    # The same cache as the first build, another out/.
    again = invoke("build-all", "--base", str(written.root), "--out", str(tmp_path / "again"),
                   tmp_path=tmp_path)  # fmt: skip

    assert again.returncode == 1, again.stderr
    assert f"layer {digest} is damaged" in again.stderr
    assert "reused" not in again.stderr


def test_corrupt_blob_in_an_oci_tar(tmp_path: Path, cache: Cache) -> None:
    written = write_oci_layout(tmp_path / "layout", [OciImage(corrupt_layers())])
    digest = written.layers[0][0]
    path = tar_directory(written.root, tmp_path / "oci.tar")
    with tarfile.open(path) as tar:
        member = tar.getmember(f"blobs/sha256/{digest.removeprefix('sha256:')}")
    flip(path, member.offset_data + 1000)

    with pytest.raises(BadInputError, match=f"^{re.escape(str(path))}: layer {digest} is damaged"):
        read_archive(path, cache, tmp_path / "work")


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_corrupt_docker_save_layer_names_its_diff_id(
    tmp_path: Path, cache: Cache, compression: str
) -> None:
    saved = write_docker_save(tmp_path / "image.tar", corrupt_layers(), compression=compression)
    with tarfile.open(saved.path) as tar:
        member = tar.getmember(saved.layer_members[0])
    flip(saved.path, member.offset_data + member.size // 2)

    with pytest.raises(BadInputError) as caught:
        read_archive(saved.path, cache, tmp_path / "work")

    message = str(caught.value)
    assert message.startswith(f"{saved.path}: layer {saved.layer_members[0]}")
    assert saved.diff_ids[0] in message


def test_corrupt_config_names_its_digest(tmp_path: Path, cache: Cache) -> None:
    written = write_oci_layout(tmp_path / "layout", [OciImage(corrupt_layers())])
    config = blob_path(written.root, written.configs[0])
    config.write_bytes(config.read_bytes().replace(b'"amd64"', b'"AMD64"'))

    with pytest.raises(BadInputError, match=f"image config {written.configs[0]} is damaged"):
        from_oci_dir(written.root, cache=cache, work_dir=tmp_path / "work")


def test_missing_oci_blob_names_its_digest(tmp_path: Path, cache: Cache) -> None:
    written = write_oci_layout(tmp_path / "layout", [OciImage(corrupt_layers())])
    digest = written.layers[0][0]
    blob_path(written.root, digest).unlink()

    with pytest.raises(
        BadInputError, match=f"^{re.escape(str(written.root))}: layer {digest} is missing"
    ):
        from_oci_dir(written.root, cache=cache, work_dir=tmp_path / "work")


def test_missing_docker_save_layer_names_it(tmp_path: Path, cache: Cache) -> None:
    saved = write_docker_save(tmp_path / "full.tar", corrupt_layers())
    stripped = tmp_path / "image.tar"
    with tarfile.open(saved.path) as src, tarfile.open(stripped, "w") as dst:
        for member in src.getmembers():
            if member.name != saved.layer_members[0]:
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)

    expected = f"{stripped}: layer {saved.layer_members[0]} is missing"
    with pytest.raises(BadInputError, match=f"^{re.escape(expected)}"):
        read_archive(stripped, cache, tmp_path / "work")


def replace_member(path: Path, name: str, data: bytes) -> None:
    """Rewrite a tar with one member's content replaced."""
    new = path.with_suffix(".new")
    with tarfile.open(path) as src, tarfile.open(new, "w") as dst:
        for member in src.getmembers():
            if member.name == name:
                add(dst, name, data)
            else:
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    new.replace(path)


@pytest.mark.parametrize(
    ("manifest", "complaint"),
    [
        (b"[{not json", "manifest.json is not valid JSON"),
        (b"\xff\xfe", "manifest.json is not valid JSON"),
        (b'{"Config": "x"}', "manifest.json is not a list of images"),
        (b"[]", "manifest.json lists no image"),
        (b"[3]", "manifest.json: [0] is missing or not a JSON object"),
        (b'[{"Layers": []}]', "manifest.json: Config is missing or not a string"),
        (b'[{"Config": "c.json", "Layers": "x"}]', "manifest.json: Layers is missing"),
        (b'[{"Config": "c.json", "Layers": [1]}]', "manifest.json: Layers is missing"),
        (b'[{"Config": "nope.json", "Layers": []}]', "image config nope.json is missing"),
    ],
)
def test_malformed_manifest_json(
    tmp_path: Path, cache: Cache, manifest: bytes, complaint: str
) -> None:
    saved = write_docker_save(tmp_path / "image.tar", corrupt_layers())
    replace_member(saved.path, "manifest.json", manifest)

    with pytest.raises(BadInputError) as caught:
        read_archive(saved.path, cache, tmp_path / "work")

    assert str(caught.value).startswith(f"{saved.path}: {complaint}")
    assert caught.value.hint


def test_config_and_manifest_disagree_on_layer_count(tmp_path: Path, cache: Cache) -> None:
    saved = write_docker_save(tmp_path / "image.tar", corrupt_layers())
    entry = {"Config": saved.config, "Layers": saved.layer_members * 2}
    replace_member(saved.path, "manifest.json", json.dumps([entry]).encode())

    with pytest.raises(BadInputError, match=r"rootfs\.diff_ids lists 1 layer.*manifest lists 2"):
        read_archive(saved.path, cache, tmp_path / "work")


def one_manifest(*, size: int) -> str:
    """An index.json listing one manifest that is not in the layout."""
    desc = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "0" * 64, "size": size}
    return json.dumps({"manifests": [desc]})


@pytest.mark.parametrize(
    ("index", "complaint"),
    [
        ("{", "image index index.json is not valid JSON"),
        ("[]", "index.json is not a JSON object"),
        ('{"manifests": {}}', "index.json: manifests is missing or not a list"),
        ('{"manifests": []}', "index.json lists no image manifest"),
        ('{"manifests": [{"digest": "md5:00", "size": 1}]}', "is not a sha256 or sha512"),
        (
            '{"manifests": [{"digest": "sha256:../../../etc/passwd", "size": 1}]}',
            "is not a sha256 or sha512",
        ),
        (
            one_manifest(size=-1),
            "manifests[0].size is missing or not a size in bytes",
        ),
        (
            one_manifest(size=2),
            f"manifest sha256:{'0' * 64} is missing",
        ),
    ],
)
def test_malformed_index_json(tmp_path: Path, cache: Cache, index: str, complaint: str) -> None:
    root = write_oci_layout(tmp_path / "layout", [OciImage(corrupt_layers())]).root
    (root / "index.json").write_text(index)

    with pytest.raises(BadInputError) as caught:
        from_oci_dir(root, cache=cache, work_dir=tmp_path / "work")

    assert str(caught.value).startswith(f"{root}: ")
    assert complaint in str(caught.value)


def test_layer_that_is_not_an_archive(tmp_path: Path, cache: Cache) -> None:
    text = b"just some text, not a tar\n" * 40
    root = tmp_path / "layout"
    written = write_oci_layout(root, [OciImage([text])])

    with pytest.raises(BadInputError, match=f"layer {written.layers[0][0]} is not a tar, gzip"):
        from_oci_dir(root, cache=cache, work_dir=tmp_path / "work")


def test_oci_layout_marker_is_checked(tmp_path: Path, cache: Cache) -> None:
    root = write_oci_layout(tmp_path / "layout", [OciImage(corrupt_layers())]).root
    (root / "oci-layout").write_text('{"imageLayoutVersion": "2.0.0"}')

    with pytest.raises(BadInputError, match=r"oci-layout: imageLayoutVersion is '2\.0\.0'"):
        from_oci_dir(root, cache=cache, work_dir=tmp_path / "work")


# --- a real engine ------------------------------------------------------------------------


@pytest.mark.engine
def test_real_docker_save(
    engine: docker.DockerClient, busybox_image: str, tmp_path: Path, cache: Cache
) -> None:
    image = engine.images.get(busybox_image)
    archive = tmp_path / "busybox.tar"
    with archive.open("wb") as out:
        for chunk in image.save(named=True):
            out.write(chunk)

    source = read_archive(archive, cache, tmp_path / "work")
    snapshot = merge(source)[1]

    assert source.kind == "docker-save"
    assert source.id == image.id
    assert source.origin in image.tags  # save(named=True) records the first tag
    assert all(layer.path == archive for layer in source.layers)
    kind, mode, _, _, content = snapshot[b"bin/busybox"]
    assert kind == "file" and mode & 0o111 and len(content) > 500_000
    assert snapshot[b"bin/sh"][0] == "symlink"
    assert snapshot[b"bin/sh"][4] == b"busybox"
