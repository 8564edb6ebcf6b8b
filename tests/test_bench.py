"""`invoke bench` runs both pipelines for real and reports them side by side."""

from __future__ import annotations

import re

import pytest
from readback import invoke

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def test_bench_reports_both_sides(busybox_image: str) -> None:
    result = invoke("bench", "--base", busybox_image, "--rounds", "1", timeout=600)

    assert result.returncode == 0, result.stderr
    report = result.stdout
    assert f"base {busybox_image}" in report
    median = re.search(r"median wall time \(1 runs\)\s+([\d.]+) s\s+([\d.]+) s\s+([\d.]+)x", report)
    assert median is not None, report
    reference, ours, ratio = (float(g) for g in median.groups())
    assert reference > 0 and ours > 0
    assert abs(ratio - reference / ours) < 0.1
    for row in ("peak RSS", "initrd.img", "rootfs.tar.gz", "unchanged rebuild",
                "rebuild, comment in guest/", "rebuild, code in guest/"):  # fmt: skip
        assert row in report, report
