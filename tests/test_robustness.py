"""What a build does when the world around it misbehaves: a cache shared by builds running
at once, a cache that cannot be written, leftovers of killed builds, an overlay that steps
on uvmkit's own files, settings that make no sense. Real builds from file inputs."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    ROOT,
    assert_refused,
    by_path,
    directory,
    file,
    invoke,
    read_archive,
    run_build,
    small_tmpfs,
    write_tar,
)
from test_image_archive import layer_tar, write_docker_save

from uvmkit.cache import Cache
from uvmkit.config import out_dir

WORK_PREFIX = ".uvmkit-build."
WORK_LOCK = ".lock"


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return write_tar(
        tmp_path / "base.tar",
        [directory(b"etc/"), file(b"etc/os-release", b"NAME=robust\n"), directory(b"bin/")],
    )


def _recipe(tmp_path: Path, base: Path, overlay: Path) -> str:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'base = "{base}"\noverlay = "{overlay}"\n')
    return str(recipe)


# --- the cache ----------------------------------------------------------------------------


def test_builds_storing_one_entry_at_once_all_succeed(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    failures: list[BaseException] = []

    def store_many() -> None:
        try:
            for _ in range(200):
                with cache.store("builds", "same-key") as entry:
                    assert entry is not None
                    (entry / "artifact").write_bytes(b"the same bytes")
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=store_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert failures == []
    entry = cache.lookup("builds", "same-key", "the test entry")
    assert entry is not None and (entry / "artifact").read_bytes() == b"the same bytes"
    assert [p.name for p in (tmp_path / "cache" / "builds").iterdir()] == ["same-key"]


def test_a_relative_xdg_cache_home_is_ignored(base: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, XDG_CACHE_HOME="uvmkit-relative", HOME=str(home))
    argv = [sys.executable, "-m", "invoke", "build-all", "--base", str(base), "--out",
            str(tmp_path / "out")]  # fmt: skip

    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    assert not (ROOT / "uvmkit-relative").exists()
    assert (home / ".cache" / "uvmkit" / "builds").is_dir()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs, for a cache that fills at once."""
    with small_tmpfs(tmp_path / "small", "1m") as mount:
        yield mount


@pytest.mark.parametrize("compressed", [False, True], ids=["tar", "tar.gz"])
def test_a_full_cache_does_not_fail_the_build(
    tmp_path: Path, small_disk: Path, compressed: bool
) -> None:
    rng = random.Random(5)
    noise = bytes(rng.getrandbits(8) for _ in range(3 << 20))  # incompressible: 3 MB out
    base = write_tar(tmp_path / "base.tar", [file(b"noise", noise)])
    if compressed:
        # Decompressed into the cache first, which fills before the content is all there.
        subprocess.run(["gzip", "-1", str(base)], check=True)
        base = tmp_path / "base.tar.gz"
    env = dict(os.environ, XDG_CACHE_HOME=str(small_disk))
    argv = [sys.executable, "-m", "invoke", "build-all", "--base", str(base), "--out",
            str(tmp_path / "out")]  # fmt: skip

    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    # Said once: after the first entry that does not fit, nothing more is tried.
    full = (
        f"warning: the cache at {small_disk}/uvmkit is full; keeping decompressed base.tar.gz "
        "with this build only"
    )
    artifacts_not_kept = "warning: could not keep this build in the cache"
    assert (full if compressed else artifacts_not_kept) in result.stderr
    assert result.stderr.count("warning: ") == 1, result.stderr
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=tmp_path / "out")
    assert check.returncode == 0
    assert by_path(read_archive(tmp_path / "out" / "rootfs.tar.gz"))[b"noise"].data == noise


def test_a_cache_too_small_even_for_the_guest_costs_warnings(base: Path, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "tiny", "16k") as tiny:
        env = dict(os.environ, XDG_CACHE_HOME=str(tiny))
        argv = [sys.executable, "-m", "invoke", "build-all", "--base", str(base), "--out",
                str(tmp_path / "out")]  # fmt: skip

        result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    assert f"warning: could not keep the guest programs in the cache at {tiny}/uvmkit (No " \
        "space left on device)" in result.stderr  # fmt: skip
    assert "warning: could not keep this build in the cache" in result.stderr
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=tmp_path / "out")
    assert check.returncode == 0


def test_a_cache_that_cannot_be_emptied_says_so(tmp_path: Path) -> None:
    stuck = tmp_path / "xdg-cache" / "uvmkit" / "builds"
    stuck.mkdir(parents=True)
    (stuck / "entry").write_text("kept")
    stuck.chmod(0o555)

    result = invoke("clean", "--cache", "--out", str(tmp_path / "out"), tmp_path=tmp_path,
                    as_user=True)  # fmt: skip

    assert result.returncode == 1
    assert result.stderr.splitlines()[-2:] == [
        f"error: cannot empty the cache at {stuck.parent}: Permission denied",
        "  hint: check that its file system is writable and the files are yours, or remove it "
        "by hand",
    ]


def test_a_cache_that_is_a_file_is_left_out(base: Path, tmp_path: Path) -> None:
    (tmp_path / "xdg-cache").write_text("not a directory")
    out = tmp_path / "out"

    result = invoke("build-all", "--base", str(base), "--out", str(out), tmp_path=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(
        f"warning: cannot write the cache at {tmp_path / 'xdg-cache' / 'uvmkit'} (Not a "
        "directory); building without it\n"
    )
    assert "damaged" not in result.stderr
    assert subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out).returncode == 0
    assert (tmp_path / "xdg-cache").read_text() == "not a directory"


def test_a_read_only_cache_still_serves(base: Path, tmp_path: Path) -> None:
    first = invoke("build-all", "--base", str(base), "--out", str(tmp_path / "first"),
                   tmp_path=tmp_path)  # fmt: skip
    assert first.returncode == 0, first.stderr
    cache = tmp_path / "xdg-cache" / "uvmkit"
    entries_before = sorted(str(p.relative_to(cache)) for p in cache.rglob("*"))
    for folder in (cache, *(p for p in cache.rglob("*") if p.is_dir())):
        folder.chmod(0o555)
    out = tmp_path / "second"

    second = invoke("build-all", "--base", str(base), "--out", str(out), tmp_path=tmp_path,
                    as_user=True)  # fmt: skip

    assert second.returncode == 0, second.stderr
    assert (
        f"warning: cannot write the cache at {cache} (Permission denied); building without "
        "keeping anything in it"
    ) in second.stderr
    assert "reused the cached build of these inputs" in second.stderr
    assert _artifacts(out) == _artifacts(tmp_path / "first")
    assert sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) == entries_before


def test_level_0_takes_data_that_does_not_compress(tmp_path: Path) -> None:
    rng = random.Random(6)
    noise = bytes(rng.getrandbits(8) for _ in range(2 << 20))
    base = write_tar(tmp_path / "base.tar", [file(b"noise", noise)])

    result, out = run_build(base, tmp_path, "--level", "0")

    assert result.returncode == 0, result.stderr
    for artifact in ("initrd.img", "rootfs.tar.gz"):
        assert by_path(read_archive(out / artifact))[b"noise"].data == noise


def test_warnings_about_an_image_archive_are_kept_with_its_build(tmp_path: Path) -> None:
    layers = [layer_tar([])]
    saved = write_docker_save(tmp_path / "two.tar", layers, images=2)

    first, _ = run_build(saved.path, tmp_path)
    again = invoke("build-all", "--base", str(saved.path), "--out", str(tmp_path / "again"),
                   tmp_path=tmp_path)  # fmt: skip

    assert first.returncode == 0 and again.returncode == 0, again.stderr
    said = [ln for ln in first.stderr.splitlines() if ln.startswith("warning:")]
    assert any("holds 2 images; using the first" in ln for ln in said), first.stderr
    assert [ln for ln in again.stderr.splitlines() if ln.startswith("warning:")] == said
    assert "reused the cached build" in again.stderr
    manifest = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert [f"warning: {w}" for w in manifest["warnings"]] == said


# --- the overlay --------------------------------------------------------------------------


def test_every_change_to_the_overlay_rebuilds(base: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "hello").write_text("hi\n")
    (overlay / "link").symlink_to("target-a")
    recipe = _recipe(tmp_path, base, overlay)
    out = str(tmp_path / "out")
    changes = [
        lambda: (overlay / "hello").chmod(0o4755),
        lambda: ((overlay / "link").unlink(), (overlay / "link").symlink_to("target-b")),
        lambda: (overlay / "empty").mkdir(),
    ]

    assert invoke("build-all", "--image", recipe, "--out", out, tmp_path=tmp_path).returncode == 0
    for change in changes:
        change()
        result = invoke("build-all", "--image", recipe, "--out", out, tmp_path=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "up to date" not in result.stderr and "reused" not in result.stderr

    delta = by_path(read_archive(tmp_path / "out" / "delta.tar.gz"))
    assert delta[b"hello"].mode == 0o4755
    assert delta[b"link"].target == b"target-b"
    assert delta[b"empty"].kind == "dir"


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda o: (o / "bin").write_text("not a directory"), "/bin/uvmkit-agent"),
        (lambda o: (o / "info").write_text("not a directory"), "/info/"),
        (
            lambda o: ((o / "dev").mkdir(), (o / "dev" / "console").symlink_to("/dev/null")),
            "/dev/console",
        ),
        (lambda o: (o / "init").write_text("#!/bin/sh\n"), "/init"),
    ],
    ids=["bin", "info", "console", "init"],
)
def test_an_overlay_that_replaces_uvmkits_files_is_refused(
    base: Path, tmp_path: Path, make: object, named: str
) -> None:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    make(overlay)  # type: ignore[operator]

    result, out = run_build(base, tmp_path, "--image", _recipe(tmp_path, base, overlay))

    assert_refused(result, out, "replaces uvmkit's", named)


# --- out/ ---------------------------------------------------------------------------------


def test_a_step_task_retires_the_manifest_it_would_contradict(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = invoke("build-all", "--base", str(base), "--out", str(out), tmp_path=tmp_path)
    assert first.returncode == 0, first.stderr

    same = invoke("delta", "--base", str(base), "--out", str(out), tmp_path=tmp_path)
    same_sums = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out, capture_output=True)
    step = invoke("initrd", "--base", str(base), "--out", str(out), "--level", "1",
                  tmp_path=tmp_path)  # fmt: skip

    # The same bytes again leave the manifest true, so it stays.
    assert same.returncode == 0, same.stderr
    assert "removed" not in same.stderr
    assert same_sums.returncode == 0, same_sums.stdout
    assert step.returncode == 0, step.stderr
    assert "removed manifest.json and SHA256SUMS" in step.stderr
    assert json.loads((out / ".uvmkit-files").read_text()) == [
        "delta.tar.gz", "initrd.img", "rootfs.tar.gz"
    ]  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [
        ".uvmkit-files",
        "delta.tar.gz",
        "initrd.img",
        "rootfs.tar.gz",
    ]


def _contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def _artifacts(directory: Path) -> dict[str, bytes]:
    """The files a build published, without its own records (.uvmkit-*)."""
    return {name: data for name, data in _contents(directory).items() if name[0] != "."}


def test_a_publication_that_fails_midway_is_taken_back(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = invoke("build-all", "--base", str(base), "--out", str(out), tmp_path=tmp_path)
    assert first.returncode == 0, first.stderr
    # rootfs.tar.gz is renamed after delta.tar.gz and initrd.img: a directory in its way
    # stops the publication when those two are already in place.
    (out / "rootfs.tar.gz").unlink()
    (out / "rootfs.tar.gz" / "x").mkdir(parents=True)
    before = _contents(out)

    again = invoke("build-all", "--base", str(base), "--out", str(out), "--level", "1",
                   tmp_path=tmp_path)  # fmt: skip
    after_failure = _contents(out)
    step = invoke("initrd", "--base", str(base), "--out", str(out), "--level", "1",
                  tmp_path=tmp_path)  # fmt: skip
    fresh_out = tmp_path / "fresh"
    (fresh_out / "initrd.img").mkdir(parents=True)
    fresh = invoke("build-all", "--base", str(base), "--out", str(fresh_out), tmp_path=tmp_path)

    assert again.returncode == 1
    assert again.stderr.splitlines()[-2:] == [
        f"error: cannot replace {out / 'rootfs.tar.gz'}: Is a directory",
        f"  hint: move (or unlock) what is at that path; nothing in {out} was changed",
    ]
    assert step.returncode == 0, step.stderr  # it leaves rootfs.tar.gz alone
    assert fresh.returncode == 1 and f"cannot replace {fresh_out / 'initrd.img'}" in fresh.stderr
    assert sorted(p.name for p in fresh_out.iterdir()) == ["initrd.img"]
    assert list((fresh_out / "initrd.img").iterdir()) == []
    assert after_failure == before
    after = _contents(out)
    # The step task then replaced initrd.img and took away the build-all's records.
    assert after["initrd.img"] != before["initrd.img"]
    assert "manifest.json" not in after and "SHA256SUMS" not in after
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".uvmkit-build")) == []


def test_leftovers_of_killed_builds_are_removed(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    # pid 1 lives, but holds no lock: the build that made this is gone.
    (out / f"{WORK_PREFIX}1.abc").mkdir()
    (out / f"{WORK_PREFIX}1.abc" / WORK_LOCK).touch()
    (out / f"{WORK_PREFIX}1.abc" / "initrd.img").write_bytes(b"half")
    (out / f"{WORK_PREFIX}stray").write_bytes(b"a file")

    result = invoke("build-all", "--base", str(base), "--out", str(out), tmp_path=tmp_path)

    assert result.returncode == 0, result.stderr
    assert not [p.name for p in out.iterdir() if p.name.startswith(WORK_PREFIX)]


def test_a_running_builds_work_is_left_alone(base: Path, tmp_path: Path) -> None:
    import fcntl

    out = tmp_path / "out"
    work = out / f"{WORK_PREFIX}1.live"
    work.mkdir(parents=True)
    with (work / WORK_LOCK).open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = invoke("clean", "--out", str(out), tmp_path=tmp_path)
        assert result.returncode == 0, result.stderr
        assert work.is_dir()
    result = invoke("clean", "--out", str(out), tmp_path=tmp_path)
    assert not work.exists()


# --- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ("base = 3\n", "'base' must name a Docker image or a file"),
        ('base = "x.tar"\nplatform = 7\n', "'platform' must be a string"),
        ('base = "x.tar"\ninit = "foo"\n', "'init' must be 'uvmkit' or 'base'"),
        ('base = "x.tar"\noverlay = "missing"\n', "does not exist"),
        ('base = "x.tar"\noverlay = "recipe.toml"\n', "is not a directory"),
    ],
    ids=["base", "platform", "init", "overlay-missing", "overlay-file"],
)
def test_recipe_mistakes_are_one_line_with_a_hint(
    tmp_path: Path, recipe: str, message: str
) -> None:
    path = tmp_path / "recipe.toml"
    path.write_text(recipe)

    result = invoke("build-all", "--image", str(path), "--out", str(tmp_path / "out"),
                    tmp_path=tmp_path)  # fmt: skip

    assert_refused(result, tmp_path / "out", message)
    assert "  hint: " in result.stderr


def test_settings_that_make_no_sense_are_one_line_with_a_hint(base: Path, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    env = dict(os.environ, SOURCE_DATE_EPOCH="99999999999999")
    huge = subprocess.run(
        [sys.executable, "-m", "invoke", "build-all", "--base", str(base), "--out",
         str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    bogus = invoke("build-all", "--base", str(base), "--platform", "bogus", "--out",
                   str(tmp_path / "out"), tmp_path=tmp_path)  # fmt: skip
    clean = invoke("clean", "--out", str(not_a_dir), tmp_path=tmp_path)

    assert_refused(huge, tmp_path / "out", "SOURCE_DATE_EPOCH=99999999999999 is outside")
    assert_refused(bogus, tmp_path / "out", "platform 'bogus' is not OS/ARCH")
    assert clean.returncode == 1 and "is a file, not an output directory" in clean.stderr
    for result in (huge, bogus, clean):
        assert "  hint: " in result.stderr


@pytest.mark.parametrize(
    ("args", "message", "hint"),
    [
        (("build-all", "--base", "~no-such-user-uvmkit/base.tar"),
         "base ~no-such-user-uvmkit/base.tar: ~no-such-user-uvmkit is no user's home directory",
         "spell the path out"),
        (("build-all", "--compression", "none", "--level", "3"),
         "--level 3 does not apply to --compression none", "leave --level out"),
        (("build-all", "--image", "default.toml"), "recipe file default.toml does not exist",
         "pass --image default"),
        (("boot", "--count", "abc"), "--count 'abc' is not a whole number", "whole number"),
        (("boot", "--timeout", "1.5"), "--timeout '1.5' is not a whole number", "whole number"),
        (("boot", "--memory", "1G"), "--memory '1G' is not a whole number", "whole number"),
        (("build-all", "--base", ""), "--base is empty", "leave it out"),
        (("boot", "--exec", ""), "--exec names no command", "leave --exec out"),
        (("build-all", "--platform", "linux/arm64"),
         "--platform linux/arm64: uvmkit's guest programs are built for linux/amd64 only",
         "--platform linux/amd64 picks it"),
    ],
    ids=["unknown-user", "level-for-none", "recipe-file-name", "count", "timeout", "memory",
         "empty-base", "empty-exec", "arm64"],
)  # fmt: skip
def test_option_mistakes_are_one_line_with_a_hint(
    tmp_path: Path, args: tuple[str, ...], message: str, hint: str
) -> None:
    out = tmp_path / "out"
    result = invoke(*args, "--out", str(out), tmp_path=tmp_path)

    assert_refused(result, out, message)
    hints = [line for line in result.stderr.splitlines() if line.startswith("  hint: ")]
    assert len(hints) == 1 and hint in hints[0], result.stderr


@pytest.mark.engine
def test_a_missing_file_named_like_an_archive_says_so(tmp_path: Path) -> None:
    # No such file beside the checkout, so it is taken for an image, which is not there
    # either (nor on any registry); the error says the file is missing too.
    name = "no-such-base-uvmkit.tar.zst"
    out = tmp_path / "out"

    result = invoke("build-all", "--base", name, "--out", str(out), tmp_path=tmp_path)

    assert_refused(result, out, name)
    assert f"  hint: no file {ROOT / name} exists either; check the --base path" in result.stderr


def test_out_is_the_checkouts_own_from_any_directory(tmp_path: Path) -> None:
    here = Path.cwd()
    os.chdir(tmp_path)
    try:
        assert out_dir("") == ROOT / "out"
        assert out_dir("elsewhere") == Path("elsewhere")
    finally:
        os.chdir(here)


def test_a_base_path_that_is_not_utf8_goes_into_info_as_its_bytes(
    base: Path, tmp_path: Path
) -> None:
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/base-\xff.tar"))
    odd.write_bytes(base.read_bytes())
    out = tmp_path / "out"

    result = invoke("build-all", "--base", str(odd), "--out", str(out), tmp_path=tmp_path)

    assert result.returncode == 0, result.stderr
    info = by_path(read_archive(out / "rootfs.tar.gz"))[b"info/base"].data
    assert info == bytes(odd) + b"\n"
    assert json.loads((out / "manifest.json").read_bytes())["base"]["ref"] == str(odd)


def test_a_recipes_file_base_is_found_from_the_recipe(base: Path, tmp_path: Path) -> None:
    # The same recipe and base in two places, one beside the recipe, one above it.
    outs = []
    for place in ("one", "two"):
        recipes = tmp_path / place / "recipes"
        recipes.mkdir(parents=True)
        (recipes / "up.toml").write_text('base = "../base.tar"\n')
        (recipes / "beside.toml").write_text('base = "base.tar"\n')
        for where in (recipes, recipes.parent):
            (where / "base.tar").write_bytes(base.read_bytes())
        for name in ("up", "beside"):
            out = tmp_path / place / f"out-{name}"
            result = invoke("build-all", "--image", str(recipes / f"{name}.toml"), "--out",
                            str(out), tmp_path=tmp_path)  # fmt: skip

            assert result.returncode == 0, result.stderr
            manifest = json.loads((out / "manifest.json").read_text())
            # Recorded as the recipe wrote it, so both places build the same bytes.
            assert manifest["base"]["ref"] == ("../base.tar" if name == "up" else "base.tar")
            outs.append(_artifacts(out))
    assert outs[0] == outs[2] and outs[1] == outs[3]


@pytest.mark.engine
def test_a_recipes_base_is_never_taken_from_where_invoke_runs(tmp_path: Path) -> None:
    recipe = tmp_path / "recipes" / "stray.toml"
    recipe.parent.mkdir()
    recipe.write_text('base = "stray-uvmkit.tar"\n')
    here = tmp_path / "elsewhere"
    here.mkdir()
    (here / "stray-uvmkit.tar").write_bytes(b"\0" * 10240)  # would be refused if read
    out = tmp_path / "out"

    result = subprocess.run(
        [sys.executable, "-m", "invoke", "-r", str(ROOT), "build-all", "--image", str(recipe),
         "--out", str(out)],
        cwd=here, env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache")),
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip

    # Taken for an image, which no engine or registry has; the hint looks beside the recipe.
    assert_refused(result, out, "stray-uvmkit.tar")
    assert "holds no entries" not in result.stderr
    assert (
        f"  hint: no file {recipe.parent / 'stray-uvmkit.tar'} exists either; check 'base' in "
        "the recipe"
    ) in result.stderr


def test_a_recipe_kernel_that_is_missing_is_said_at_build_time(base: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'base = "{base}"\nkernel = "vmlinuz-missing"\n')

    result = invoke("build-all", "--image", str(recipe), "--out", str(tmp_path / "out"),
                    tmp_path=tmp_path)  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert (
        f"warning: kernel {tmp_path / 'vmlinuz-missing'} named by {recipe} does not exist: "
        "invoke boot will need --kernel"
    ) in result.stderr


def test_a_base_that_is_a_stream_is_refused(base: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "base.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "invoke", "build-all", "--out", str(out), "--base"]
    # What a shell's <(cat base.tar) passes: a /dev/fd path to a pipe, fed as it is read.
    reader, writer = os.pipe()
    feeder = threading.Thread(target=lambda: _feed(writer, base.read_bytes()), daemon=True)
    feeder.start()
    piped = subprocess.run([*argv, f"/dev/fd/{reader}"], cwd=ROOT, pass_fds=(reader,),
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    os.close(reader)

    for result, name in (
        (invoke("build-all", "--base", str(fifo), "--out", str(out), tmp_path=tmp_path), fifo),
        (invoke("build-all", "--base", "/dev/zero", "--out", str(out), tmp_path=tmp_path),
         "/dev/zero"),
        (piped, f"/dev/fd/{reader}"),
    ):  # fmt: skip
        assert_refused(result, out, f"base {name} is not a regular file or a directory")


def _feed(fd: int, data: bytes) -> None:
    with contextlib.suppress(BrokenPipeError), os.fdopen(fd, "wb") as pipe:
        pipe.write(data)


def test_clean_removes_what_builds_published_and_nothing_else(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    built = invoke("build-all", "--base", str(base), "--out", str(out), tmp_path=tmp_path)
    assert built.returncode == 0, built.stderr
    (out / "notes.txt").write_text("mine")
    (out / "console.log").write_text("a boot's log")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for name in ("initrd.img", "manifest.json", "init"):
        (foreign / name).write_text("someone else's")

    cleaned = invoke("clean", "--out", str(out), tmp_path=tmp_path)
    left_alone = invoke("clean", "--out", str(foreign), tmp_path=tmp_path)

    assert cleaned.returncode == 0 and left_alone.returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in foreign.iterdir()) == ["init", "initrd.img", "manifest.json"]
    assert "holds no files a uvmkit build published; left them alone" in left_alone.stderr
    assert "removed" not in left_alone.stderr
    # Five artifacts, the boot's log, and the build's two records (.uvmkit-files, -stamp).
    assert f"removed 8 file(s) from {out}" in cleaned.stderr


def test_clean_with_a_damaged_record_warns_and_keeps_the_artifacts(
    base: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    built = invoke("build-all", "--base", str(base), "--out", str(out), tmp_path=tmp_path)
    assert built.returncode == 0, built.stderr
    (out / ".uvmkit-files").write_text("garbage")

    cleaned = invoke("clean", "--out", str(out), tmp_path=tmp_path)

    assert cleaned.returncode == 0, cleaned.stderr
    assert f"warning: {out / '.uvmkit-files'} lists no files (it is damaged or empty)" in (
        cleaned.stderr
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "SHA256SUMS", "delta.tar.gz", "initrd.img", "manifest.json", "rootfs.tar.gz"
    ]  # fmt: skip


def test_clean_of_a_missing_out_says_so_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "never-built"

    result = invoke("clean", "--out", str(missing), tmp_path=tmp_path)

    assert result.returncode == 0, result.stderr
    assert f"nothing to clean: {missing} does not exist" in result.stderr
    assert not missing.exists()


def test_an_out_that_cannot_be_written_is_one_line_for_every_task(
    base: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    built = invoke("build-all", "--base", str(base), "--out", str(out), tmp_path=tmp_path)
    assert built.returncode == 0, built.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    out.chmod(0o555)
    try:
        results = {
            "build-all": invoke("build-all", "--base", str(base), "--out", str(out),
                                "--level", "1", tmp_path=tmp_path, as_user=True),
            "clean": invoke("clean", "--out", str(out), tmp_path=tmp_path, as_user=True),
            "boot": invoke("boot", "--out", str(out), "--timeout", "5", tmp_path=tmp_path,
                           as_user=True),
        }  # fmt: skip
    finally:
        out.chmod(0o755)

    for task, result in results.items():
        assert result.returncode == 1, (task, result.stderr)
        assert "Traceback" not in result.stderr and "internal error" not in result.stderr
        errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and str(out) in errors[0], (task, result.stderr)
        assert "writ" in errors[0] and "  hint: " in result.stderr, (task, result.stderr)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_boot_takes_the_kernel_of_the_recipe_that_built_out(base: Path, tmp_path: Path) -> None:
    recipes = tmp_path / "recipes"
    (recipes / "kernels").mkdir(parents=True)
    # Files that are no kernel: boot refuses them by name before QEMU starts, which shows
    # which kernel it chose without booting one.
    for name in ("kernels/vmlinuz-custom", "other-kernel"):
        (recipes / name).write_text("not a kernel\n" * 100)
    (recipes / "custom.toml").write_text(f'base = "{base}"\nkernel = "kernels/vmlinuz-custom"\n')
    (recipes / "other.toml").write_text(f'base = "{base}"\nkernel = "other-kernel"\n')
    out = tmp_path / "out"
    built = invoke("build-all", "--image", str(recipes / "custom.toml"), "--out", str(out),
                   tmp_path=tmp_path)  # fmt: skip
    assert built.returncode == 0, built.stderr

    recorded = invoke("boot", "--out", str(out), "--accel", "tcg", tmp_path=tmp_path)
    asked = invoke("boot", "--out", str(out), "--accel", "tcg", "--image",
                   str(recipes / "other.toml"), tmp_path=tmp_path)  # fmt: skip

    for result, kernel, recipe in (
        (recorded, recipes / "kernels" / "vmlinuz-custom", recipes / "custom.toml"),
        (asked, recipes / "other-kernel", recipes / "other.toml"),
    ):
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            f"error: kernel {kernel} is not an x86 Linux kernel image (no bzImage header)",
            f"  hint: fix 'kernel' in {recipe} (relative to that file), or pass --kernel",
        ]


# --- tasks and limits ---------------------------------------------------------------------


def test_the_agent_task_writes_the_guest_programs_alone(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke("agent", "--out", str(out), tmp_path=tmp_path)

    assert result.returncode == 0, result.stderr
    for name in ("init", "uvmkit-agent"):
        program = out / name
        assert program.read_bytes()[:4] == b"\x7fELF"
        assert program.stat().st_mode & 0o777 == 0o755
    assert not (out / "initrd.img").exists()
    assert f"artifacts in {out}: init, uvmkit-agent" in result.stderr


def test_a_source_date_epoch_past_2106_is_refused_for_the_initrd(
    base: Path, tmp_path: Path
) -> None:
    # newc cpio holds 8 hex digits of mtime; more would make a corrupt initrd.
    out = tmp_path / "out"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), SOURCE_DATE_EPOCH="4294967296")
    result = subprocess.run(
        [sys.executable, "-m", "invoke", "build-all", "--base", str(base), "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip

    assert_refused(result, out, "SOURCE_DATE_EPOCH=4294967296 is past the last time newc cpio "
                   "(initrd.img) holds (4294967295, in the year 2106)")  # fmt: skip
    assert "  hint: set SOURCE_DATE_EPOCH to 4294967295 or less" in result.stderr
    rootfs = subprocess.run(
        [sys.executable, "-m", "invoke", "rootfs", "--base", str(base), "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert rootfs.returncode == 0, rootfs.stderr
    assert sorted(p.name for p in out.iterdir() if p.name[0] != ".") == ["rootfs.tar.gz"]
