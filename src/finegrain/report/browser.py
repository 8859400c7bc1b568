"""Open a report in headless Chromium: the DOM after its scripts ran, and a screenshot.

Uses a real Chromium binary (Debian: `apt-get install chromium`), no Python browser driver. Each run gets a
throwaway profile folder and runs in its own process group, so a timeout kills the whole browser.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile

from finegrain.errors import FinegrainError

INSTALL_HINT = "Debian's chromium is not installed: apt-get install chromium"

# `--headless` alone is the new headless mode in Chromium >= 132 (the old one moved to chrome-headless-shell).
BASE_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--virtual-time-budget=5000",
    "--run-all-compositor-stages-before-draw",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--mute-audio",
]


def find_chromium() -> str | None:
    """The path of a Chromium binary on PATH, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run_chromium(binary: str, flags: list[str], url: str, *, timeout: float, what: str) -> str:
    """Run chromium once with a fresh profile; return its stdout. FinegrainError on failure or timeout."""
    with tempfile.TemporaryDirectory(prefix="finegrain-chromium-") as profile:
        cmd = [binary, *BASE_FLAGS, f"--user-data-dir={profile}", *flags, url]
        env = dict(os.environ, HOME=profile)  # keep crash dumps and caches out of the real home
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        except OSError as e:
            raise FinegrainError(f"could not start chromium ({binary}): {e}. {INSTALL_HINT}") from e
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise FinegrainError(f"chromium timed out after {timeout:g} s ({what} of {url})") from None
        finally:
            _kill_group(proc)  # helpers (zygote, gpu, network service) that outlived the browser process
        if proc.returncode != 0:
            tail = err.decode("utf-8", "replace").strip()[-2000:]
            raise FinegrainError(f"chromium failed with exit code {proc.returncode} ({what} of {url}): {tail}")
        return out.decode("utf-8", "replace")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait()


def render_in_browser(
    html_path: str,
    *,
    screenshot_path: str,
    chromium: str | None = None,
    width: int = 1280,
    height: int = 2000,
    timeout: float = 60,
) -> str:
    """Load `html_path` in headless Chromium; write a `width` x `height` PNG screenshot to `screenshot_path` and
    return the serialised DOM after the page's scripts ran (after `load`).

    Raises FinegrainError when chromium is missing, fails, times out or writes no screenshot."""
    binary = chromium or find_chromium()
    if not binary:
        raise FinegrainError(INSTALL_HINT)
    if not os.path.isfile(html_path):
        raise FinegrainError(f"render_in_browser: no such file {html_path}")
    url = "file://" + os.path.abspath(html_path)

    dom = _run_chromium(binary, ["--dump-dom"], url, timeout=timeout, what="dump-dom")
    if "<html" not in dom.lower():
        raise FinegrainError(f"chromium returned no DOM for {url}")

    shot = os.path.abspath(screenshot_path)
    os.makedirs(os.path.dirname(shot), exist_ok=True)
    if os.path.exists(shot):
        os.unlink(shot)  # so a stale screenshot cannot pass for a new one
    _run_chromium(
        binary, [f"--screenshot={shot}", f"--window-size={width},{height}"], url, timeout=timeout, what="screenshot"
    )
    if not os.path.isfile(shot) or os.path.getsize(shot) == 0:
        raise FinegrainError(f"chromium wrote no screenshot to {shot}")
    return dom
