"""The dashboard in a real headless Chromium, against 4 real workers.

Chromium is Debian's ``chromium`` package, driven by Playwright's Python package
through ``executable_path`` (Playwright's own browser download is not used). The
test installs the package with apt-get when it is missing and it can (root);
otherwise it skips, saying why. Screenshots go to ``test-output/``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from .support.app_cluster import AppCluster
from .support.procs import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage"]  # fmt: skip
OUTPUT = ROOT / "test-output" / "dashboard"


def find_or_install_chromium() -> str:
    """Path of a Chromium binary, installing Debian's package if possible; else skip."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("no chromium on PATH, and apt-get is unavailable (not root or not Debian)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        result = subprocess.run(command, env=env, capture_output=True, timeout=900, check=False)
        if result.returncode != 0:
            pytest.skip(f"could not install chromium: {result.stderr.decode()[-500:]}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get installed chromium but no chromium binary is on PATH")
    return found


@pytest.fixture
async def demo(redis_url: str) -> AsyncIterator[AppCluster]:
    cluster = AppCluster(redis_url, f"ui{uuid.uuid4().hex[:8]}", workers=4, app="app.main:app",
                         env={"DEMO_COLLECT_EVERY_S": "1"})  # fmt: skip
    async with cluster.running():
        yield cluster


async def test_two_dashboards_on_different_workers(demo: AppCluster) -> None:
    playwright_api = pytest.importorskip("playwright.async_api")
    chromium = find_or_install_chromium()
    OUTPUT.mkdir(parents=True, exist_ok=True)
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, headless=True,
                                           args=CHROMIUM_ARGS)  # fmt: skip
        try:
            pages: dict[str, object] = {}
            for _ in range(30):  # each context has its own connections, so may hit any worker
                context = await browser.new_context(viewport={"width": 1200, "height": 900})
                page = await context.new_page()
                await page.goto(demo.base + "/")
                served_by = await page.text_content("#page-instance")
                assert served_by
                if served_by in pages:
                    await context.close()
                    continue
                pages[served_by] = page
                if len(pages) == 2:
                    break
            assert len(pages) == 2, "could not get pages from two different workers"
            a, b = pages.values()
            for page in (a, b):
                await page.wait_for_selector("#conn.live", timeout=20000)  # type: ignore[attr-defined]
                await page.wait_for_function(  # type: ignore[attr-defined]
                    "document.getElementById('stream-instance').textContent.length > 3",
                    timeout=20000,
                )

            text = f"hello {uuid.uuid4().hex[:8]}"
            await a.fill("#message", text)  # type: ignore[attr-defined]
            await a.click("#send")  # type: ignore[attr-defined]
            for page in (a, b):
                await page.wait_for_function(  # type: ignore[attr-defined]
                    f"document.getElementById('messages').textContent.includes({text!r})",
                    timeout=20000,
                )
                await page.wait_for_function(  # type: ignore[attr-defined]
                    "document.getElementById('runs').textContent.includes('collect-metrics')",
                    timeout=30000,
                )
                await page.wait_for_function(  # type: ignore[attr-defined]
                    "!['\u2013', 'none (election in progress)', '']"
                    ".includes(document.getElementById('leader-instance').textContent)",
                    timeout=20000,
                )
            leader = (await demo.get("/api/leader")).json()["leader"]
            for page in (a, b):
                shown = await page.text_content("#leader-instance")  # type: ignore[attr-defined]
                assert shown == leader["instance_id"]
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for name, page in zip("ab", (a, b), strict=True):
                path = OUTPUT / f"dashboard-{name}-{stamp}.png"
                await page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
                assert path.stat().st_size > 10_000
        finally:
            await browser.close()
    await asyncio.sleep(0)


def test_output_folder_is_ignored_by_git() -> None:
    assert "/test-output/" in Path(ROOT / ".gitignore").read_text()
