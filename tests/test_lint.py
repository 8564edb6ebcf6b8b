"""The linters are part of the suite: a change that breaks them fails like any other test."""

from __future__ import annotations

import subprocess
import sys

import pytest
from readback import ROOT


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy-strict"],
)
def test_linter_is_clean(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_guest_sources_are_clang_formatted_width() -> None:
    """The C sources keep the 100-column limit their .clang-format sets."""
    long_lines = [
        f"{path.name}:{number}"
        for path in sorted((ROOT / "guest").glob("*.[ch]"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if len(line.expandtabs(8)) > 100
    ]
    assert long_lines == []
