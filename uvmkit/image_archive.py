"""Image archives as a base: `docker save` output and OCI image layouts (a tar or a directory).

Both describe an image in JSON (a manifest naming a config and layer blobs) next to the
blobs themselves. What comes out is the image's layers as uncompressed tars on disk, lowest
first, each checked against the digests the image records for it:

- a blob named by its digest (`blobs/sha256/<hex>`, an OCI descriptor, a classic
  `<hex>.json` config) must hash to that digest;
- a layer's uncompressed content must hash to its entry in the config's `rootfs.diff_ids`.

An uncompressed layer inside an uncompressed archive is used where it lies, as a byte range
of the archive. A gzip or zstd layer is decompressed once into the cache, keyed by its
digest. Compression is recognised from the bytes, never from media types alone, which
tools get wrong.

Which image: an OCI index may list several, for several platforms, and may nest indexes;
the one for the requested platform is used. A `docker save` archive of several images
gives the first one, with a warning naming it: there is no option to pick another.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .archive import BLOCK, Entry, Kind, read_tar
from .base import SPOOL_CHUNK, BaseSource, Layer, LayerFormat, Sniffed, sniff
from .cache import Cache
from .config import GUEST_PLATFORM
from .errors import BadInputError
from .log import human_size, log, progress, step
from .platforms import DEFAULT_PLATFORM, Platform, make_platform, parse_platform

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

DOCKER_SAVE = "docker-save"
OCI = "oci"

MANIFEST_JSON = "manifest.json"
INDEX_JSON = "index.json"
OCI_LAYOUT = "oci-layout"

# Manifests, configs and indexes are read whole; real ones are kilobytes.
MAX_JSON = 64 << 20
# Content addressing rules out index loops; this bounds deliberately deep nesting.
MAX_INDEX_DEPTH = 8
MAX_LINK_HOPS = 40

INDEX_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
MANIFEST_TYPES = frozenset(
    {
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    }
)
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"

_DIGEST = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")
_BLOB_NAME = re.compile(r"(?:.*/)?blobs/(sha256|sha512)/([0-9a-f]+)")
_CLASSIC_CONFIG = re.compile(r"([0-9a-f]{64})\.json")

# Neither layout puts a file deeper than blobs/<algorithm>/<hex>; a root filesystem does
# almost at once (usr/lib/<triplet>/...), which ends the scan of a plain tar early.
_MAX_LAYOUT_DEPTH = 3

DAMAGED = "the archive is damaged or incomplete; save or download the image again"
NOT_AN_IMAGE = "the archive is damaged, or was not written by docker save or an OCI tool"


# --- detection ---------------------------------------------------------------------------


def detect(path: Path, *, name: str | None = None) -> str | None:
    """What an uncompressed tar holds, from its member names: "docker-save", "oci" or None.

    None means a plain root filesystem tar.

    Only headers are read, and the scan stops once the answer is known: at manifest.json,
    or at the first member deeper than any image layout has. `name` is the archive's
    name in messages (the path by default).
    """
    archive = name or str(path)
    seen: set[bytes] = set()
    try:
        with path.open("rb") as f:
            for entry in read_tar(f, archive):
                member = _normalize(entry.name)
                if member == MANIFEST_JSON.encode():
                    return DOCKER_SAVE
                if member.count(b"/") >= _MAX_LAYOUT_DEPTH:
                    return None
                seen.add(member)
    except OSError as exc:
        raise BadInputError(f"cannot read {archive}: {exc.strerror}") from None
    if OCI_LAYOUT.encode() in seen and INDEX_JSON.encode() in seen:
        return OCI
    _refuse_partial_layout(seen, archive)
    return None


# A docker save archive's layers: a directory named by a hex ID, holding layer.tar.
_SAVED_LAYER = re.compile(rb"[0-9a-f]{64}/layer\.tar")


def _refuse_partial_layout(members: set[bytes], archive: str) -> None:
    """An image archive that lost its index is an error, not a root filesystem of JSON
    files and layer tars."""
    saved = sorted(m for m in members if _SAVED_LAYER.fullmatch(m))
    if saved or b"repositories" in members:
        example = (saved or [b"repositories"])[0].decode()
        raise BadInputError(
            f"{archive} looks like a docker save archive ({example}) but has no {MANIFEST_JSON}",
            hint="save the image again (docker save IMAGE -o FILE); the archive is incomplete",
        )
    if OCI_LAYOUT.encode() in members:
        raise BadInputError(
            f"{archive} has an {OCI_LAYOUT} file but no {INDEX_JSON}",
            hint="copy the whole OCI image layout again; it is incomplete",
        )


# --- entry points ------------------------------------------------------------------------


def from_tar(
    plain: Path,
    layout: str,
    *,
    source: Path,
    cache: Cache,
    work_dir: Path,
    platform: str = DEFAULT_PLATFORM,
) -> BaseSource:
    """The layers of an image archive held in the uncompressed tar `plain`.

    `layout` is what `detect` said; `source` is the file the user named (plain itself, or
    the compressed file it was spooled from), which messages and the result name.
    """
    if layout not in (DOCKER_SAVE, OCI):
        raise ValueError(f"unknown image archive layout {layout!r}")
    archive = str(source)
    with step(f"Reading image archive {source.name}"):
        store = _TarStore(plain, archive)
        if layout == DOCKER_SAVE:
            return _docker_save(
                store, source=source, cache=cache, work_dir=work_dir, platform=platform
            )
        _check_layout_file(store)
        return _oci(
            store,
            source=source,
            cache=cache,
            work_dir=work_dir,
            platform=platform,
            layout="OCI layout tar",
        )


def from_oci_dir(
    path: Path, *, cache: Cache, work_dir: Path, platform: str = DEFAULT_PLATFORM
) -> BaseSource:
    """The layers of an OCI image layout directory (oci-layout, index.json, blobs/)."""
    with step(f"Reading OCI layout {path.name}"):
        store = _DirStore(path, str(path))
        _check_layout_file(store)
        return _oci(
            store,
            source=path,
            cache=cache,
            work_dir=work_dir,
            platform=platform,
            layout="OCI layout directory",
        )


# --- the files of an archive -------------------------------------------------------------


@dataclass(frozen=True)
class _Blob:
    """A file of the image archive: `size` bytes of `path` from `start`."""

    member: str
    path: Path
    start: int
    size: int


class _Store:
    """The files of an image archive, found by name; `archive` names it in messages."""

    def __init__(self, archive: str) -> None:
        self.archive = archive

    def find(self, name: str) -> _Blob | None:
        """The regular file `name` (relative to the layout's root), or None."""
        raise NotImplementedError

    def need(self, name: str, what: str) -> _Blob:
        found = self.find(name)
        if found is None:
            raise BadInputError(
                f"{self.archive}: {what} {name} is missing (or not a regular file)",
                hint=DAMAGED,
            )
        return found

    def blob(self, desc: _Descriptor, what: str) -> _Blob:
        """The blob a descriptor points at, which must have the size it says."""
        algorithm, _, hexdigest = desc.digest.partition(":")
        found = self.find(f"blobs/{algorithm}/{hexdigest}")
        if found is None:
            hint = DAMAGED
            if "nondistributable" in desc.media_type or "foreign" in desc.media_type:
                hint = "the layer is non-distributable, so the archive leaves it out"
            raise BadInputError(
                f"{self.archive}: {what} {desc.digest} is missing from blobs/", hint=hint
            )
        if found.size != desc.size:
            raise BadInputError(
                f"{self.archive}: {what} {desc.digest} is {found.size} bytes, but the "
                f"descriptor that names it says {desc.size}",
                hint=DAMAGED,
            )
        return found

    def open(self, blob: _Blob) -> io.BufferedReader:
        try:
            f = blob.path.open("rb")
        except OSError as exc:
            raise BadInputError(
                f"cannot read {self.archive}: {blob.member}: {exc.strerror}"
            ) from None
        f.seek(blob.start)
        return f

    def read(self, blob: _Blob, what: str) -> bytes:
        """A small blob's bytes (a JSON document)."""
        if blob.size > MAX_JSON:
            raise BadInputError(
                f"{self.archive}: {what} {blob.member} is {human_size(blob.size)}, too large "
                "for a JSON document",
                hint=NOT_AN_IMAGE,
            )
        with self.open(blob) as f:
            data = f.read(blob.size)
        if len(data) != blob.size:
            raise self.cut_short(blob)
        return data

    def chunks(self, blob: _Blob) -> Iterator[bytes]:
        with self.open(blob) as f:
            left = blob.size
            while left:
                chunk = f.read(min(SPOOL_CHUNK, left))
                if not chunk:
                    raise self.cut_short(blob)
                left -= len(chunk)
                yield chunk

    def cut_short(self, blob: _Blob) -> BadInputError:
        return BadInputError(
            f"{self.archive}: {blob.member} ends early (did it change while being read?)",
            hint=DAMAGED,
        )


def _normalize(name: bytes) -> bytes:
    """A member name as a lookup key: no leading '/' or './', '..' clamped at the root."""
    return posixpath.normpath(b"/" + name).lstrip(b"/")


class _TarStore(_Store):
    """The members of an uncompressed tar, located by one scan of its headers."""

    def __init__(self, path: Path, archive: str) -> None:
        super().__init__(archive)
        self.path = path
        self.members: dict[bytes, Entry] = {}
        try:
            with path.open("rb") as f:
                for entry in read_tar(f, archive):
                    self.members[_normalize(entry.name)] = entry  # the last one wins, as in tar
        except OSError as exc:
            raise BadInputError(f"cannot read {archive}: {exc.strerror}") from None

    def find(self, name: str) -> _Blob | None:
        key = _normalize(name.encode("utf-8", "surrogateescape"))
        # `docker save` stores a layer that two images share once, and a symlink to it
        # for the second: follow links between members.
        for _ in range(MAX_LINK_HOPS):
            entry = self.members.get(key)
            if entry is None:
                return None
            if entry.kind is Kind.SYMLINK:
                key = _normalize(posixpath.join(posixpath.dirname(key), entry.linkname))
            elif entry.kind is Kind.HARDLINK:
                key = _normalize(entry.linkname)
            elif entry.kind is Kind.FILE:
                return _Blob(name, self.path, entry.offset, entry.size)
            else:
                return None
        raise BadInputError(f"{self.archive}: member {name} is a loop of links", hint=NOT_AN_IMAGE)


class _DirStore(_Store):
    """The files of a layout directory."""

    def __init__(self, root: Path, archive: str) -> None:
        super().__init__(archive)
        self.root = root

    def find(self, name: str) -> _Blob | None:
        if name.startswith("/") or ".." in name.split("/"):
            return None  # names come from the layout's own JSON: keep them inside it
        path = self.root / name
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise BadInputError(f"cannot read {self.archive}: {name}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            return None
        return _Blob(name, path, 0, st.st_size)


# --- JSON documents ----------------------------------------------------------------------


def _bad(where: str, key: str, expected: str) -> BadInputError:
    return BadInputError(f"{where}: {key} is missing or not {expected}", hint=NOT_AN_IMAGE)


def _as_obj(value: Any, where: str, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(where, key, "a JSON object")
    return value


def _as_doc(value: Any, where: str) -> dict[str, Any]:
    """A whole JSON document that must be an object."""
    if not isinstance(value, dict):
        raise BadInputError(f"{where} is not a JSON object", hint=NOT_AN_IMAGE)
    return value


def _get_obj(obj: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    return _as_obj(obj.get(key), where, key)


def _get_list(obj: dict[str, Any], key: str, where: str, *, optional: bool = False) -> list[Any]:
    value = obj.get(key)
    if value is None and optional:
        return []
    if not isinstance(value, list):
        raise _bad(where, key, "a list")
    return value


def _get_str(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise _bad(where, key, "a string")
    return value


def _str_list(values: list[Any], where: str, key: str) -> list[str]:
    if not all(isinstance(v, str) and v for v in values):
        raise _bad(where, key, "a list of strings")
    return values


def _parse_json(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
        raise BadInputError(f"{where} is not valid JSON ({exc})", hint=NOT_AN_IMAGE) from None


def _digest(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise _bad(where, key, "a digest")
    if not _DIGEST.fullmatch(value):
        algorithm = value.partition(":")[0] if ":" in value else "?"
        raise BadInputError(
            f"{where}: {key} {value!r} is not a sha256 or sha512 digest",
            hint="uvmkit verifies every blob, and knows sha256 and sha512"
            if algorithm not in ("sha256", "sha512")
            else NOT_AN_IMAGE,
        )
    return value


def _check_digest(archive: str, what: str, digest: str, actual: str) -> None:
    if actual != digest:
        raise BadInputError(
            f"{archive}: {what} {digest} is damaged: its content hashes to {actual}",
            hint=DAMAGED,
        )


def _hexdigest(algorithm: str, data: bytes) -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _read_json(store: _Store, blob: _Blob, what: str, *, digest: str | None = None) -> Any:
    """A JSON blob, checked against its digest when the archive gives one."""
    data = store.read(blob, what)
    if digest is not None:
        _check_digest(store.archive, what, digest, _hexdigest(digest.partition(":")[0], data))
    return _parse_json(data, f"{store.archive}: {what} {digest or blob.member}")


def _digest_in_name(name: str) -> str | None:
    """The digest a member's name gives: blobs/<algorithm>/<hex>, or a classic <hex>.json."""
    if match := _BLOB_NAME.fullmatch(name):
        digest = f"{match[1]}:{match[2]}"
        return digest if _DIGEST.fullmatch(digest) else None
    if match := _CLASSIC_CONFIG.fullmatch(posixpath.basename(name)):
        return f"sha256:{match[1]}"
    if _DIGEST.fullmatch(name):  # go-containerregistry names the config sha256:<hex>
        return name
    return None


def _check_layout_file(store: _Store) -> None:
    where = f"{store.archive}: {OCI_LAYOUT}"
    doc = _parse_json(store.read(store.need(OCI_LAYOUT, "layout marker"), "layout marker"), where)
    version = doc.get("imageLayoutVersion") if isinstance(doc, dict) else None
    if not isinstance(version, str) or not version.startswith("1."):
        raise BadInputError(
            f"{where}: imageLayoutVersion is {version!r}, not 1.x",
            hint="uvmkit reads OCI image layouts of version 1",
        )


# --- descriptors and platforms -----------------------------------------------------------


def _config_platform(config: dict[str, Any]) -> Platform | None:
    os_name, arch, variant = config.get("os"), config.get("architecture"), config.get("variant")
    if not isinstance(os_name, str) or not isinstance(arch, str) or not os_name or not arch:
        return None
    return make_platform(os_name, arch, variant if isinstance(variant, str) else "")


@dataclass(frozen=True)
class _Descriptor:
    """An OCI content descriptor: what a blob is, its digest and size."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] = field(default_factory=dict)


def _descriptor(value: Any, where: str, key: str) -> _Descriptor:
    obj = _as_obj(value, where, key)
    digest = _digest(obj.get("digest"), where, f"{key}.digest")
    size = obj.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _bad(where, f"{key}.size", "a size in bytes")
    media_type = obj.get("mediaType", "")
    if not isinstance(media_type, str):
        raise _bad(where, f"{key}.mediaType", "a string")
    platform = None
    if obj.get("platform") is not None:
        raw = _as_obj(obj["platform"], where, f"{key}.platform")
        variant = raw.get("variant") or ""
        if not isinstance(variant, str):
            raise _bad(where, f"{key}.platform.variant", "a string")
        platform = make_platform(
            _get_str(raw, "os", f"{where}: {key}.platform"),
            _get_str(raw, "architecture", f"{where}: {key}.platform"),
            variant,
        )
    annotations = obj.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise _bad(where, f"{key}.annotations", "a JSON object")
    strings = {k: v for k, v in annotations.items() if isinstance(v, str)}
    return _Descriptor(media_type, digest, size, platform, strings)


# --- choosing the image from an index ----------------------------------------------------


@dataclass
class _Candidate:
    """An image manifest an index lists, with the names its index entries give it."""

    desc: _Descriptor
    names: tuple[str, ...]
    manifest: dict[str, Any] | None = None

    def load(self, store: _Store) -> dict[str, Any]:
        if self.manifest is None:
            doc = _read_json(
                store, store.blob(self.desc, "manifest"), "manifest", digest=self.desc.digest
            )
            self.manifest = _as_doc(doc, f"{store.archive}: manifest {self.desc.digest}")
        return self.manifest


def _walk(
    store: _Store, index: Any, where: str, names: tuple[str, ...], depth: int, *, partial: bool
) -> Iterator[_Candidate]:
    """Every image manifest below an index, in the index's order, nested indexes opened.

    With `partial`, blobs the archive leaves out are passed over: an archive may list every
    platform of an image but hold only one.
    """
    for i, value in enumerate(_get_list(_as_doc(index, where), "manifests", where)):
        desc = _descriptor(value, where, f"manifests[{i}]")
        if partial and not _present(store, desc):
            log.debug("%s: %s is not in the archive", where, desc.digest)
            continue
        # containerd's annotation has the whole reference; the OCI one is often a bare tag.
        name = desc.annotations.get(CONTAINERD_NAME) or desc.annotations.get(REF_NAME)
        here = (*names, name) if name else names
        is_index = desc.media_type in INDEX_TYPES
        doc: Any = None
        if not is_index and desc.media_type not in MANIFEST_TYPES:
            if desc.media_type:
                log.debug("%s: skipping %s, a %s", where, desc.digest, desc.media_type)
                continue
            # No media type in the descriptor: the document says what it is.
            doc = _read_json(store, store.blob(desc, "manifest"), "manifest", digest=desc.digest)
            inner = doc.get("mediaType") if isinstance(doc, dict) else None
            is_index = inner in INDEX_TYPES or (isinstance(doc, dict) and "manifests" in doc)
        if not is_index:
            yield _Candidate(desc, here, doc if isinstance(doc, dict) else None)
            continue
        if depth >= MAX_INDEX_DEPTH:
            raise BadInputError(
                f"{where}: indexes nest more than {MAX_INDEX_DEPTH} deep at {desc.digest}",
                hint=NOT_AN_IMAGE,
            )
        if doc is None:
            doc = _read_json(
                store, store.blob(desc, "image index"), "image index", digest=desc.digest
            )
        inner_where = f"{store.archive}: image index {desc.digest}"
        yield from _walk(store, doc, inner_where, here, depth + 1, partial=partial)


def _present(store: _Store, desc: _Descriptor) -> bool:
    algorithm, _, hexdigest = desc.digest.partition(":")
    return store.find(f"blobs/{algorithm}/{hexdigest}") is not None


def _read_index(store: _Store, *, partial: bool = False) -> Iterator[_Candidate]:
    where = f"{store.archive}: {INDEX_JSON}"
    index = _read_json(store, store.need(INDEX_JSON, "image index"), "image index")
    return _walk(store, index, where, (), 0, partial=partial)


def _choose(store: _Store, want: Platform) -> tuple[_Candidate, tuple[str, ...]]:
    """The manifest for `want`, and every name the index gives it."""
    candidates = list(_read_index(store))
    offered: list[str] = []
    matches: list[_Candidate] = []
    unknown: list[_Candidate] = []
    for cand in candidates:
        platform = cand.desc.platform
        if platform is None:  # only the config says
            platform = _config_platform(_read_config(store, cand)[0])
        if platform is None:
            unknown.append(cand)
            continue
        if platform.os != "unknown":  # attestations and other non-images
            offered.append(str(platform))
        if platform == want:
            matches.append(cand)
    if not matches and len(candidates) == 1 and unknown:
        log.debug("%s: its one image names no platform; using it", store.archive)
        matches = unknown
    if not matches:
        if not candidates:
            raise BadInputError(
                f"{store.archive}: {INDEX_JSON} lists no image manifest", hint=NOT_AN_IMAGE
            )
        listed = ", ".join(dict.fromkeys(offered)) or "no platform at all"
        raise BadInputError(
            f"{store.archive}: no image for platform {want}; the index offers {listed}",
            hint=f"use an archive that holds a {GUEST_PLATFORM} image, the only kind uvmkit's "
            "guest runs on",
        )
    chosen = matches[0]
    same = [c for c in matches if c.desc.digest == chosen.desc.digest]
    others = [c for c in matches if c.desc.digest != chosen.desc.digest]
    if others:
        log.warning(
            "%s holds %d images for %s; using the first (%s)",
            store.archive,
            len(others) + 1,
            want,
            ", ".join(chosen.names) or chosen.desc.digest,
        )
    log.debug("%s: %s is manifest %s", store.archive, want, chosen.desc.digest)
    names = tuple(dict.fromkeys(name for c in same for name in c.names))
    return chosen, names


# --- configs -----------------------------------------------------------------------------


def _read_config(store: _Store, cand: _Candidate) -> tuple[dict[str, Any], str]:
    """A listed manifest's image config, and the image ID (sha256 of the config)."""
    where = f"{store.archive}: manifest {cand.desc.digest}"
    desc = _descriptor(cand.load(store).get("config"), where, "config")
    return _load_config(store, store.blob(desc, "image config"), desc.digest)


def _load_config(store: _Store, blob: _Blob, digest: str | None) -> tuple[dict[str, Any], str]:
    data = store.read(blob, "image config")
    if digest is not None:
        algorithm = digest.partition(":")[0]
        _check_digest(store.archive, "image config", digest, _hexdigest(algorithm, data))
    where = f"{store.archive}: image config {digest or blob.member}"
    config = _as_doc(_parse_json(data, where), where)
    return config, _hexdigest("sha256", data)


def _diff_ids(config: dict[str, Any], where: str, count: int) -> list[str]:
    rootfs = _get_obj(config, "rootfs", where)
    values = _get_list(rootfs, "diff_ids", f"{where}: rootfs")
    diff_ids = [_digest(v, where, f"rootfs.diff_ids[{i}]") for i, v in enumerate(values)]
    if len(diff_ids) != count:
        raise BadInputError(
            f"{where}: rootfs.diff_ids lists {len(diff_ids)} layer(s), but the manifest lists "
            f"{count}",
            hint=NOT_AN_IMAGE,
        )
    return diff_ids


def _origin(names: tuple[str, ...] | list[str], config: dict[str, Any]) -> str:
    """Where the image says it came from: its names, else uvmkit's seed label, its comment."""
    if names:
        return ", ".join(names)
    inner = config.get("config")
    labels = inner.get("Labels") if isinstance(inner, dict) else None
    label = labels.get("org.uvmkit.origin") if isinstance(labels, dict) else None
    if isinstance(label, str) and label:
        return label
    comment = config.get("comment")
    return comment if isinstance(comment, str) else ""


# --- the two layouts ---------------------------------------------------------------------


def _docker_save(
    store: _Store, *, source: Path, cache: Cache, work_dir: Path, platform: str
) -> BaseSource:
    """manifest.json names the config and the layers by member name."""
    archive = store.archive
    want = parse_platform(platform)
    where = f"{archive}: {MANIFEST_JSON}"
    images = _parse_json(store.read(store.need(MANIFEST_JSON, "image list"), "image list"), where)
    if not isinstance(images, list):
        raise BadInputError(f"{where} is not a list of images", hint=NOT_AN_IMAGE)
    if not images:
        raise BadInputError(f"{where} lists no image", hint="docker save IMAGE -o FILE")
    image = _as_obj(images[0], where, "[0]")
    tags = _str_list(_get_list(image, "RepoTags", where, optional=True), where, "RepoTags")
    config_name = _get_str(image, "Config", where)
    layer_names = _str_list(_get_list(image, "Layers", where), where, "Layers")
    if len(images) > 1:
        log.warning(
            "%s holds %d images; using the first (%s). To build another, save it alone: "
            "docker save IMAGE -o FILE",
            archive,
            len(images),
            ", ".join(tags) or config_name,
        )

    config, image_id = _load_config(
        store, store.need(config_name, "image config"), _digest_in_name(config_name)
    )
    config_where = f"{archive}: image config {config_name}"
    diff_ids = _diff_ids(config, config_where, len(layer_names))
    refs = [
        _LayerRef(store.need(name, "layer"), _digest_in_name(name), diff_id, "", i, len(diff_ids))
        for i, (name, diff_id) in enumerate(zip(layer_names, diff_ids, strict=True), 1)
    ]
    layers, compression = _materialize(store, refs, source=source, cache=cache, work_dir=work_dir)

    has_platform = _config_platform(config)
    if has_platform is not None and has_platform != want:
        # As for an engine image: a guest of another architecture would not boot.
        raise BadInputError(
            f"{archive} is an image for {has_platform}, not {want}",
            hint=f"save a {GUEST_PLATFORM} image, the only kind uvmkit's guest runs on",
        )
    # Docker 25 and later write an OCI layout next to manifest.json, with manifests.
    with_index = store.find(INDEX_JSON) is not None
    digests: tuple[str, ...] = ()
    if with_index:
        candidates = _read_index(store, partial=True)
        found = [c.desc.digest for c in candidates if _config_of(store, c) == image_id]
        digests = tuple(dict.fromkeys(found))
    return BaseSource(
        ref=str(source),
        kind="docker-save",
        id=image_id,
        layers=layers,
        digests=digests,
        origin=_origin(tags, config),
        details={
            "layout": "docker save (OCI layout)" if with_index else "docker save",
            "platform": str(has_platform or "unknown"),
            "compression": compression,
        },
    )


def _config_of(store: _Store, cand: _Candidate) -> str | None:
    config = cand.load(store).get("config")
    digest = config.get("digest") if isinstance(config, dict) else None
    return digest if isinstance(digest, str) else None


def _oci(
    store: _Store, *, source: Path, cache: Cache, work_dir: Path, platform: str, layout: str
) -> BaseSource:
    """index.json -> (indexes ->) the platform's manifest -> config and layer blobs."""
    want = parse_platform(platform)
    chosen, names = _choose(store, want)
    manifest = chosen.load(store)
    where = f"{store.archive}: manifest {chosen.desc.digest}"
    config_desc = _descriptor(manifest.get("config"), where, "config")
    config, image_id = _load_config(
        store, store.blob(config_desc, "image config"), config_desc.digest
    )
    descs = [
        _descriptor(value, where, f"layers[{i}]")
        for i, value in enumerate(_get_list(manifest, "layers", where))
    ]
    config_where = f"{store.archive}: image config {config_desc.digest}"
    diff_ids = _diff_ids(config, config_where, len(descs))
    refs = [
        _LayerRef(store.blob(desc, "layer"), desc.digest, diff_id, desc.media_type, i, len(descs))
        for i, (desc, diff_id) in enumerate(zip(descs, diff_ids, strict=True), 1)
    ]
    layers, compression = _materialize(store, refs, source=source, cache=cache, work_dir=work_dir)
    has_platform = chosen.desc.platform or _config_platform(config)
    return BaseSource(
        ref=str(source),
        kind="oci-layout",
        id=image_id,
        layers=layers,
        digests=(chosen.desc.digest,),
        origin=_origin(names, config),
        details={
            "layout": layout,
            "platform": str(has_platform or "unknown"),
            "compression": compression,
        },
    )


# --- layers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LayerRef:
    """A layer blob and the digests the image records for it."""

    blob: _Blob
    # Of the blob as stored; None when the archive does not say (classic docker save).
    digest: str | None
    # Of the uncompressed tar, from the config's rootfs.diff_ids.
    diff_id: str
    media_type: str
    number: int
    count: int

    @property
    def label(self) -> str:
        return f"layer {self.digest or self.blob.member}"


def _materialize(
    store: _Store, refs: list[_LayerRef], *, source: Path, cache: Cache, work_dir: Path
) -> tuple[tuple[Layer, ...], str]:
    """Each layer as an uncompressed tar on disk, checked; and how each was compressed."""
    layers: list[Layer] = []
    kinds: list[str] = []
    for ref in refs:
        layer, kind = _layer(store, ref, source=source, cache=cache, work_dir=work_dir)
        kinds.append(kind)
        if layer is not None:
            layers.append(layer)
    return tuple(layers), ", ".join(kinds) or "none"


def _looks_like_tar(head: bytes) -> bool:
    # An empty layer is a tar of two zero blocks, which has no header to sniff.
    return len(head) >= BLOCK and (sniff(head) is Sniffed.TAR or not any(head[:BLOCK]))


def _layer(
    store: _Store, ref: _LayerRef, *, source: Path, cache: Cache, work_dir: Path
) -> tuple[Layer | None, str]:
    """One layer; None for an empty blob, which holds nothing to apply."""
    name = f"{store.archive} ({ref.blob.member})"
    with store.open(ref.blob) as f:
        head = f.read(min(BLOCK, ref.blob.size))
    kind = sniff(head)
    if kind in (Sniffed.GZIP, Sniffed.ZSTD):
        path = _decompressed(store, ref, kind, source=source, cache=cache, work_dir=work_dir)
        if path.stat().st_size == 0:
            return None, kind.value
        return Layer(path, LayerFormat.TAR, name=name), kind.value

    # Hashed in any case: a damaged blob is reported as such, not as an unknown format.
    _verify_in_place(store, ref)
    if ref.blob.size == 0:
        return None, "none"
    if _looks_like_tar(head):
        log.debug("%s: used in place, %s", name, human_size(ref.blob.size))
        start = ref.blob.start
        layer = Layer(ref.blob.path, LayerFormat.TAR, name, start=start, end=start + ref.blob.size)
        return layer, "none"
    known = f" (it is {kind.value}-compressed)" if kind in (Sniffed.BZIP2, Sniffed.XZ) else ""
    media = f", media type {ref.media_type}" if ref.media_type else ""
    raise BadInputError(
        f"{store.archive}: {ref.label} is not a tar, gzip or zstd stream{known}{media}",
        hint="uvmkit reads uncompressed, gzip and zstd layers; rebuild or convert the image",
    )


def _check_diff_id(store: _Store, ref: _LayerRef, actual: str) -> None:
    if actual != ref.diff_id:
        raise BadInputError(
            f"{store.archive}: {ref.label} does not match the image config: its content "
            f"hashes to {actual}, rootfs.diff_ids says {ref.diff_id}",
            hint=DAMAGED,
        )


def _verify_in_place(store: _Store, ref: _LayerRef) -> None:
    """Hash an uncompressed blob in one pass, for its own digest and its diff_id alike."""
    algorithms = {ref.diff_id.partition(":")[0]}
    if ref.digest is not None:
        algorithms.add(ref.digest.partition(":")[0])
    hashes = {a: hashlib.new(a) for a in sorted(algorithms)}
    with progress(total=ref.blob.size, desc=f"verify {ref.label[:19]}") as bar:
        for chunk in store.chunks(ref.blob):
            for h in hashes.values():
                h.update(chunk)
            bar.update(len(chunk))
    actual = {a: f"{a}:{h.hexdigest()}" for a, h in hashes.items()}
    if ref.digest is not None:
        _check_digest(store.archive, "layer", ref.digest, actual[ref.digest.partition(":")[0]])
    _check_diff_id(store, ref, actual[ref.diff_id.partition(":")[0]])


def _decompressed(
    store: _Store, ref: _LayerRef, kind: Sniffed, *, source: Path, cache: Cache, work_dir: Path
) -> Path:
    """A compressed layer's tar, decompressed and checked once, then taken from the cache."""
    key = (ref.digest or ref.diff_id).replace(":", "-")

    def make(directory: Path) -> None:
        size = human_size(ref.blob.size)
        with step(f"Decompressing layer {ref.number}/{ref.count} ({kind.value}, {size})"):
            _decompress(store, ref, kind, directory / "layer.tar")
        (directory / "diff_id").write_text(ref.diff_id + "\n")

    what = f"{ref.label} of {source.name}"
    entry = cache.get_or_make("layers", key, what, make, scratch=work_dir / "layers" / key)
    # A cache hit skips the blob: the entry was checked against this digest when it was
    # made. What the config says of the content must still agree with what it was then.
    try:
        recorded = (entry / "diff_id").read_text().strip()
    except OSError:
        recorded = "(unrecorded)"
    if recorded != ref.diff_id:
        raise BadInputError(
            f"{store.archive}: {ref.label} holds content {recorded}, but rootfs.diff_ids "
            f"says {ref.diff_id}",
            hint=DAMAGED,
        )
    return entry / "layer.tar"


class _BlobReader(io.RawIOBase):
    """A blob's bytes as a stream for a decompressor, hashed on the way through."""

    def __init__(self, f: io.BufferedReader, size: int, digest: Any, bar: Any) -> None:
        super().__init__()
        self._f = f
        self._left = size
        self._digest = digest
        self._bar = bar

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._left)
        if want == 0:
            return 0
        got = self._f.readinto(view[:want])
        if not got:  # the file shrank under us; the digests will say so
            self._left = 0
            return 0
        if self._digest is not None:
            self._digest.update(view[:got])
        self._left -= got
        self._bar.update(got)
        return got

    def drain(self) -> None:
        """Read (and hash) what the decompressor left, such as trailing padding."""
        while self.read(SPOOL_CHUNK):
            pass


def _decompress(store: _Store, ref: _LayerRef, kind: Sniffed, target: Path) -> None:
    """Decompress a layer into target in one pass, hashing what goes in and what comes out."""
    # Imported here, as elsewhere: a build with nothing to decompress never loads them.
    import zstandard
    from isal import igzip

    stored = hashlib.new(ref.digest.partition(":")[0]) if ref.digest else None
    content = hashlib.new(ref.diff_id.partition(":")[0])
    head = b""

    def check_stored() -> None:
        if ref.digest is not None and stored is not None:
            actual = f"{ref.digest.partition(':')[0]}:{stored.hexdigest()}"
            _check_digest(store.archive, "layer", ref.digest, actual)

    with (
        store.open(ref.blob) as f,
        target.open("wb") as out,
        progress(total=ref.blob.size, desc=f"{kind.value} {ref.label[:19]}") as bar,
    ):
        reader = _BlobReader(f, ref.blob.size, stored, bar)
        buffered = io.BufferedReader(reader, SPOOL_CHUNK)
        try:
            if kind is Sniffed.GZIP:
                stream = igzip.open(buffered, "rb")  # type: ignore[no-untyped-call]
            else:
                stream = zstandard.ZstdDecompressor().stream_reader(
                    buffered, read_across_frames=True, closefd=False
                )
            with stream:
                while chunk := stream.read(SPOOL_CHUNK):
                    if len(head) < BLOCK:
                        head += chunk[: BLOCK - len(head)]
                    content.update(chunk)
                    out.write(chunk)
            reader.drain()
        except (OSError, EOFError, zstandard.ZstdError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise  # the disk, not the data
            # A damaged blob is best reported as one, when its digest can say so.
            reader.drain()
            check_stored()
            # Without a digest of its own, the layer is known by its content's.
            known = "" if ref.digest else f" (diff_id {ref.diff_id})"
            raise BadInputError(
                f"{store.archive}: {ref.label}{known}: its {kind.value} stream is damaged or "
                f"cut short ({exc})",
                hint=DAMAGED,
            ) from None
    check_stored()
    if head and not _looks_like_tar(head):
        raise BadInputError(
            f"{store.archive}: {ref.label} decompresses to something other than a tar",
            hint="image layers are tar archives; rebuild the image",
        )
    _check_diff_id(store, ref, f"{ref.diff_id.partition(':')[0]}:{content.hexdigest()}")
