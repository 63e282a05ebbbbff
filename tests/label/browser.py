"""Headless Debian chromium for the end-to-end tests (the `browser` fixture is in conftest.py).

Playwright's own browser download does not work offline, so the tests use the system chromium
(`apt-get install chromium`, done by .ci/run). Where it is missing the browser tests are skipped,
unless RLHF_REQUIRE_BROWSER=1 (set by CI) makes that a failure.
"""

from __future__ import annotations

import os
import shutil

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # the machine's closed network refuses these connections
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    return shutil.which("chromium") or (os.path.exists("/usr/bin/chromium") and "/usr/bin/chromium") or None
