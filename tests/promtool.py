"""`promtool` (Prometheus' checker, Debian package `prometheus`) for the metrics tests.

`scripts/test.sh` installs it when missing and running as root; without it a test skips
on a developer machine and fails in CI (`CI=true`), so CI never passes without the check.
"""

from __future__ import annotations

import os
import shutil

import pytest


def promtool_path() -> str:
    """The `promtool` executable; skips the test (fails it in CI) when it is not installed."""
    path = shutil.which("promtool")
    if path is None:
        message = (
            "promtool is not installed (Debian package 'prometheus'; scripts/test.sh installs it "
            "when run as root: apt-get install prometheus)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path
