"""A real headless browser for page tests: Debian's chromium, run as a command (no driver, no downloaded build)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

# What a sandboxed CI machine needs: no sandbox (root), no GPU, and no background calls to the outside world.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]  # fmt: skip


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise RuntimeError("chromium is not installed: scripts/test installs Debian's chromium package")
    return path


def _run(url: str, extra: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        args = [chromium(), *FLAGS, f"--user-data-dir={profile}", *extra, url]
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def dump_dom(url: str, wait_ms: int = 6000, timeout: float = 60) -> str:
    """The page's DOM after its scripts ran for `wait_ms` of virtual time (fetches complete within it)."""
    result = _run(url, [f"--virtual-time-budget={wait_ms}", "--dump-dom"], timeout)
    if result.returncode != 0 or "<html" not in result.stdout:
        raise RuntimeError(f"chromium failed ({result.returncode}): {result.stderr[-2000:]}")
    return result.stdout


def screenshot(url: str, path: str, wait_ms: int = 6000, size: str = "1280,1100", timeout: float = 60) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    extra = [f"--virtual-time-budget={wait_ms}", f"--screenshot={os.path.abspath(path)}", f"--window-size={size}"]
    result = _run(url, extra, timeout)
    if result.returncode != 0 or not os.path.exists(path):
        raise RuntimeError(f"chromium took no screenshot ({result.returncode}): {result.stderr[-2000:]}")
    return path
