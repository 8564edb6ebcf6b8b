#!/usr/bin/env bash
# Quick start for uvmkit on Debian 12 (run as root):
#   ./setup.sh build         install what is missing, start an engine, seed the base, build
#   ./setup.sh test [ARGS]   the same set-up plus test images, then python -m pytest ARGS
# Safe to run again: each step says whether it found things in place or changed them.
# The logic lives in uvmkit/services.py (python -m uvmkit.services --help).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"

PYTHON=${PYTHON:-python3}
APT_PACKAGES=(
    docker.io musl-tools busybox-static qemu-system-x86 linux-image-cloud-amd64 cpio pigz
    zstd libarchive-tools debootstrap docker-registry time
)

usage() {
    echo "usage: ./setup.sh build | ./setup.sh test [pytest arguments]"
    echo "  build  install what is missing, start a Docker engine, seed the base, build into out/"
    echo "  test   the same set-up plus the test images, then the whole test suite"
}

install_apt_packages() {
    local missing=() package
    for package in "${APT_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'ok installed'; then
            missing+=("$package")
        fi
    done
    if ((${#missing[@]} == 0)); then
        echo "apt packages: all present"
        return
    fi
    echo "apt packages: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    echo "installed: ${missing[*]}"
}

# True when uvmkit is installed editable from this checkout and every dependency that
# pyproject.toml declares (with the test extra) is present. Standard library only: it runs
# before anything is installed.
python_ready() {
    # -P: not the checkout, whose uvmkit.egg-info would hide the installed metadata.
    "$PYTHON" -P - <<'PY'
import importlib.metadata as md
import json
import pathlib
import re
import sys
import tomllib

project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
wanted = project["dependencies"] + project.get("optional-dependencies", {}).get("test", [])
try:
    url = json.loads(md.distribution("uvmkit").read_text("direct_url.json") or "{}")
    if url.get("url") != pathlib.Path.cwd().as_uri() or not url.get("dir_info", {}).get("editable"):
        sys.exit(1)
    for requirement in wanted:
        md.distribution(re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0])
except md.PackageNotFoundError:
    sys.exit(1)
PY
}

install_python_packages() {
    if python_ready; then
        echo "python packages: uvmkit (editable) and its dependencies present"
        return
    fi
    "$PYTHON" -m pip install --quiet --disable-pip-version-check -e '.[test]'
    echo "installed: uvmkit (pip install -e '.[test]')"
}

# Bytecode for uvmkit and tasks.py: an editable install compiles nothing, and where
# PYTHONDONTWRITEBYTECODE is set Python never keeps what it compiles, so every invoke would
# compile them again (a third of an up-to-date build's time). Stale files are recompiled.
precompile() {
    "$PYTHON" -m compileall -q uvmkit tasks.py >/dev/null
}

# The engine, and DOCKER_HOST pointing at it, so every tool below talks to the same one.
start_engine() {
    "$PYTHON" -m uvmkit.services engine
    DOCKER_HOST=$("$PYTHON" -m uvmkit.services host)
    export DOCKER_HOST
}

mode=${1:-}
case "$mode" in
build | test) shift ;;
-h | --help | help)
    usage
    exit 0
    ;;
*)
    usage >&2
    exit 2
    ;;
esac

install_apt_packages
install_python_packages
precompile
start_engine
"$PYTHON" -m uvmkit.services seed

if [[ $mode == build ]]; then
    "$PYTHON" -m invoke build-all
    echo "artifacts: $PWD/out/"
    ls -l out/
else
    "$PYTHON" -m uvmkit.services seed-test
    echo "running: python -m pytest $*"
    exec "$PYTHON" -m pytest "$@"
fi
