"""`invoke bench`: uvmkit's build against the shell pipeline it replaces, on the same base.

Each round runs the reference pipeline (docker export | gzip; unpack base and guest
layer, find | cpio -o -H newc -R 0:0 | gzip; gunzip | cpio -i; tar -z) and then
`invoke build-all`, each cold: a fresh XDG_CACHE_HOME and a fresh output directory.
Rounds alternate so that a slow moment of the machine hits both sides alike. Then
rebuilds show what the cache saves: unchanged, after a comment is appended to a guest
source file, and after a line of code is (on a scratch copy of the checkout, so the real
one is never touched), each as many times as there are rounds. The report quotes
medians side by side, with peak memory and sizes.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import engine
from .base import looks_like_path
from .config import ROOT
from .errors import BadInputError, ToolError
from .log import human_size, log

REFERENCE_SCRIPT = r"""
set -euo pipefail
base=$1 delta=$2 out=$3
work=$(mktemp -d "$out/ref.XXXXXX")
cid=$(docker create "$base" /none)
trap 'docker rm -f "$cid" >/dev/null; rm -rf "$work"' EXIT
docker export "$cid" | gzip -6 > "$work/base.tar.gz"
mkdir "$work/rootfs"
tar -xzf "$work/base.tar.gz" -C "$work/rootfs" --numeric-owner
tar -xzf "$delta" -C "$work/rootfs" --numeric-owner
(cd "$work/rootfs" && find . | cpio -o -H newc -R 0:0 --quiet) | gzip -6 > "$out/initrd.img"
mkdir "$work/unpacked"
(cd "$work/unpacked" && gunzip -c "$out/initrd.img" | cpio -i -d -m --quiet --no-absolute-filenames)
tar -czf "$out/rootfs.tar.gz" -C "$work/unpacked" --numeric-owner .
"""


@dataclass
class Runs:
    """Wall times and peak memory of one contender."""

    name: str
    seconds: list[float] = field(default_factory=list)
    peak_rss: list[int] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def run_measured(
    argv: list[str], *, env: dict[str, str], cwd: Path | None = None, name: str = ""
) -> tuple[float, int]:
    """Run argv; its wall time and the peak RSS (bytes) of its largest process."""
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        last = stderr.decode(errors="replace").strip().splitlines()[-3:]
        what = name or " ".join(argv[:4])
        raise ToolError(f"{what} failed (exit status {proc.returncode}): {' / '.join(last)}")
    # ru_maxrss is in KiB on Linux: the largest of the process and its waited-for children.
    return elapsed, usage.ru_maxrss * 1024


def bench(base: str, *, rounds: int = 3, work_root: Path | None = None) -> str:
    """Run the comparison; returns the report table."""
    if shutil.which("docker") is None:
        raise ToolError("the docker command is not installed", hint="apt-get install docker.io")
    if rounds < 1:
        raise BadInputError(f"--rounds {rounds}: at least one round is needed", hint="try 3")
    if looks_like_path(base):
        raise BadInputError(
            f"--base {base}: the reference pipeline starts from `docker export`, so the bench "
            "needs an image in the engine",
            hint="docker import the archive under a name, and pass that name",
        )
    engine.resolve_image(base, pull=False)  # a missing image is one clear line, up front
    top = Path(tempfile.mkdtemp(prefix="uvmkit-bench.", dir=work_root))
    try:
        return _bench(base, rounds, top)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _bench(base: str, rounds: int, top: Path) -> str:
    # The docker CLI of the reference pipeline must talk to the engine uvmkit uses, which
    # may be the private one ./setup.sh started without DOCKER_HOST in this shell.
    env = dict(os.environ, LC_ALL="C.UTF-8", DOCKER_HOST=engine.engine_url(engine.connect()))
    invoke = [sys.executable, "-m", "invoke"]
    # A scratch checkout for the rebuild measurements (and its own git time stamp).
    checkout = top / "checkout"
    subprocess.run(
        ["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(checkout)],
        check=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    _copy_worktree(ROOT, checkout)
    # Compiled as ./setup.sh compiles the real checkout, so builds start as they do there.
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "uvmkit", "tasks.py"],
        cwd=checkout, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )  # fmt: skip

    # The reference pipeline unpacks the same guest layer uvmkit adds.
    seed = top / "seed"
    subprocess.run(
        [*invoke, "delta", "--base", base, "--out", str(seed)],
        cwd=checkout, env=dict(env, XDG_CACHE_HOME=str(top / "seed-cache")),
        check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )  # fmt: skip

    reference = Runs("reference pipeline")
    uvmkit = Runs("invoke build-all")
    for i in range(rounds):
        log.info("round %d of %d", i + 1, rounds)
        out = top / f"ref-{i}"
        out.mkdir()
        seconds, rss = run_measured(
            ["bash", "-c", REFERENCE_SCRIPT, "reference", base, str(seed / "delta.tar.gz"),
             str(out)], env=env, name="the reference pipeline",
        )  # fmt: skip
        reference.seconds.append(seconds)
        reference.peak_rss.append(rss)
        reference.sizes = _sizes(out)
        log.info("  reference pipeline: %.2f s", seconds)
        shutil.rmtree(out)

        out = top / f"uvmkit-{i}"
        cache = top / f"cache-{i}"
        seconds, rss = run_measured(
            [*invoke, "build-all", "--base", base, "--out", str(out)],
            env=dict(env, XDG_CACHE_HOME=str(cache)), cwd=checkout,
        )  # fmt: skip
        uvmkit.seconds.append(seconds)
        uvmkit.peak_rss.append(rss)
        uvmkit.sizes = _sizes(out)
        log.info("  invoke build-all: %.2f s", seconds)
        if i < rounds - 1:
            shutil.rmtree(out)
            shutil.rmtree(cache)

    # Rebuilds on the last round's output and cache, each `rounds` times: the unchanged
    # one as it is, the others after a fresh edit each time, so every run has work to do.
    last_env = dict(env, XDG_CACHE_HOME=str(top / f"cache-{rounds - 1}"))
    build_argv = [*invoke, "build-all", "--base", base, "--out", str(top / f"uvmkit-{rounds - 1}")]
    agent_source = checkout / "guest" / "agent.c"
    edits: dict[str, Callable[[int], str]] = {
        "unchanged rebuild": lambda i: "",
        "rebuild, comment in guest/": lambda i: f"/* bench: comment {i} */\n",
        "rebuild, code in guest/": lambda i: (
            f'static const char bench_{i}[] __attribute__((used)) = "bench {i}";\n'
        ),
    }
    rebuilds: dict[str, float] = {}
    for what, edit in edits.items():
        times = []
        for i in range(rounds):
            with agent_source.open("a") as f:
                f.write(edit(i))
            times.append(run_measured(build_argv, env=last_env, cwd=checkout)[0])
        rebuilds[what] = statistics.median(times)
        log.info("%s: %s s", what, "/".join(f"{t:.2f}" for t in times))

    return _report(reference, uvmkit, rebuilds=rebuilds, base=base)


def _copy_worktree(source: Path, target: Path) -> None:
    """Uncommitted changes count too: bench what is in the working tree."""
    listed = subprocess.run(
        ["git", "-C", str(source), "ls-files", "--cached", "--others", "--exclude-standard"],
        capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL,
    ).stdout.splitlines()  # fmt: skip
    for name in listed:
        path = source / name
        if path.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / name)


def _sizes(out: Path) -> dict[str, int]:
    return {name: (out / name).stat().st_size for name in ("initrd.img", "rootfs.tar.gz")}


def _report(reference: Runs, uvmkit: Runs, *, rebuilds: dict[str, float], base: str) -> str:
    ratio = reference.median / uvmkit.median
    size_ratio = uvmkit.sizes["initrd.img"] / reference.sizes["initrd.img"]
    rows = [
        ("", "reference", "build-all", "ratio"),
        (
            f"median wall time ({len(uvmkit.seconds)} runs)",
            f"{reference.median:.2f} s",
            f"{uvmkit.median:.2f} s",
            f"{ratio:.1f}x faster",
        ),
        (
            "peak RSS (largest process)",
            human_size(max(reference.peak_rss)),
            human_size(max(uvmkit.peak_rss)),
            "",
        ),
        (
            "initrd.img",
            human_size(reference.sizes["initrd.img"]),
            human_size(uvmkit.sizes["initrd.img"]),
            f"{(size_ratio - 1) * 100:+.1f}%",
        ),
        (
            "rootfs.tar.gz",
            human_size(reference.sizes["rootfs.tar.gz"]),
            human_size(uvmkit.sizes["rootfs.tar.gz"]),
            f"{(uvmkit.sizes['rootfs.tar.gz'] / reference.sizes['rootfs.tar.gz'] - 1) * 100:+.1f}%",
        ),
        *(
            (what, "", f"{seconds:.2f} s", f"{seconds / uvmkit.median:.0%} of cold")
            for what, seconds in rebuilds.items()
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"base {base}; all runs cold (fresh cache and output) unless marked rebuild"]
    for row in rows:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    times = ", ".join(
        f"{r:.2f}/{u:.2f}" for r, u in zip(reference.seconds, uvmkit.seconds, strict=True)
    )
    lines.append(f"each round, reference/build-all: {times} s")
    return "\n".join(lines)
