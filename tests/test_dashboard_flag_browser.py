"""The dashboard's feature flag in a real headless Chromium against 4 real workers: toggled
on a page one worker served, it flips on pages and streams other workers serve.

Chromium as in ``test_dashboard_browser.py``: Debian's ``chromium`` through Playwright's
``executable_path``; without one on PATH the test skips, saying how to get one.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from .support.app_cluster import AppCluster

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.timeout(180)]

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
FLAG_ON = "document.getElementById('flag').checked && document.body.classList.contains('highlight')"
FLAG_OFF = (
    "!document.getElementById('flag').checked && !document.body.classList.contains('highlight')"
)


@pytest.fixture
def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("chromium not found: install it (apt-get install chromium) to run browser tests")


@pytest.fixture
async def demo(redis_url: str) -> AsyncIterator[AppCluster]:
    cluster = AppCluster(redis_url, f"uf{uuid.uuid4().hex[:8]}", workers=4, app="app.main:app")
    async with cluster.running():
        yield cluster


async def test_flag_toggled_on_one_dashboard_flips_on_the_others(
    chromium: str, demo: AppCluster
) -> None:
    playwright_api = pytest.importorskip("playwright.async_api")
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
        try:
            pages: dict[str, Any] = {}  # by the worker that serves the page's stream
            for _ in range(40):  # each context has its own connections: any worker
                context = await browser.new_context()
                page = await context.new_page()
                await page.goto(demo.base + "/")
                await page.wait_for_selector("#flag:not([disabled])", timeout=20000)
                await page.wait_for_function(
                    "document.getElementById('stream-instance').textContent.length > 3",
                    timeout=20000,
                )
                streamed_by = await page.text_content("#stream-instance")
                if streamed_by in pages:
                    await context.close()
                    continue
                pages[streamed_by] = page
                if len(pages) == 3:
                    break
            assert len(pages) >= 2, "could not get streams from two different workers"
            first, *others = pages.values()
            assert not await first.is_checked("#flag")

            await first.click("#flag")  # on: PUT with the version the page shows
            for page in pages.values():
                await page.wait_for_function(FLAG_ON, timeout=10000)
            version_on = int(await others[0].text_content("#flag-version"))

            await others[-1].click("#flag")  # off, from a page another worker streams
            for page in pages.values():
                await page.wait_for_function(FLAG_OFF, timeout=10000)
            assert int(await first.text_content("#flag-version")) == version_on + 1
            state = (await demo.get("/api/state/dashboard.highlight")).json()
            assert (state["value"], state["version"]) == (False, version_on + 1)

            # A page opened now shows the current value (read on its stream's hello).
            late = await (await browser.new_context()).new_page()
            await late.goto(demo.base + "/")
            await late.wait_for_function(
                f"document.getElementById('flag-version').textContent === '{version_on + 1}'",
                timeout=10000,
            )
            assert not await late.is_checked("#flag")
        finally:
            await browser.close()
