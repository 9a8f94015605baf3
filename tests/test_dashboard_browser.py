"""The dashboard in a real headless Chromium, against 4 real workers.

Chromium is Debian's ``chromium`` package, driven by Playwright's Python package
through ``executable_path`` (Playwright's own browser download is not used). The
test never installs it: without a ``chromium`` on PATH it skips, saying how to get
one (``.ci/run`` installs it in CI). Screenshots go to ``test-output/``.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from .support.app_cluster import AppCluster
from .support.procs import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
OUTPUT = ROOT / "test-output" / "dashboard"


@pytest.fixture
def chromium() -> str:
    """Path of a Chromium binary on PATH; else skip (before any worker starts), saying how
    to install one."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(
        "chromium not found: install it (apt-get install chromium) to run the browser test; "
        ".ci/run installs it"
    )


@pytest.fixture
async def demo(redis_url: str) -> AsyncIterator[AppCluster]:
    cluster = AppCluster(
        redis_url,
        f"ui{uuid.uuid4().hex[:8]}",
        workers=4,
        app="app.main:app",
        env={"DEMO_COLLECT_EVERY_S": "1"},
    )
    async with cluster.running():
        yield cluster


async def test_two_dashboards_on_different_workers(chromium: str, demo: AppCluster) -> None:
    playwright_api = pytest.importorskip("playwright.async_api")
    OUTPUT.mkdir(parents=True, exist_ok=True)
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
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


async def _two_pages_on_different_workers(browser: object, demo: AppCluster, width: int) -> list:
    """Two pages, each in its own context (own connections), served by different workers,
    each streaming live; each page's console errors and HTTP errors are collected."""
    pages: dict[str, object] = {}
    for _ in range(30):
        context = await browser.new_context(viewport={"width": width, "height": 900})  # type: ignore[attr-defined]
        page = await context.new_page()
        page.problems = []  # type: ignore[attr-defined]
        page.on(
            "console",
            lambda m, p=page: m.type == "error" and p.problems.append(f"console: {m.text}"),
        )
        page.on("pageerror", lambda e, p=page: p.problems.append(f"pageerror: {e}"))
        page.on(
            "response",
            lambda r, p=page: r.status >= 400 and p.problems.append(f"{r.status} {r.url}"),
        )
        page.on("requestfailed", lambda r, p=page: p.problems.append(f"failed {r.url}"))
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
    for page in pages.values():
        await page.wait_for_selector("#conn.live", timeout=20000)  # type: ignore[attr-defined]
        await page.wait_for_function(  # type: ignore[attr-defined]
            "document.getElementById('stream-instance').textContent.length > 3", timeout=20000
        )
    return list(pages.values())


async def _job_row_paused(page: object, job_id: str, paused: bool) -> None:
    await page.wait_for_selector(  # type: ignore[attr-defined]
        f'#jobs tr.job[data-id="{job_id}"][data-paused="{str(paused).lower()}"]', timeout=20000
    )


async def test_jobs_reminders_runs_and_lease_on_two_workers(
    chromium: str, demo: AppCluster
) -> None:
    """Issue 12: a reminder added on one dashboard shows once on both; pause, resume and run
    now through the buttons; runs show status, duration and data; the lease counts down;
    the header is one line at 1280 px; no console error, no 404 (favicon included)."""
    playwright_api = pytest.importorskip("playwright.async_api")
    OUTPUT.mkdir(parents=True, exist_ok=True)
    # an unset flag is the state API's 404 (the page reads it as "never set"): set it, so
    # any 404 in the network log below is a real one
    async with httpx.AsyncClient(base_url=demo.base, timeout=10) as client:
        put = await client.put("/api/state/dashboard.highlight", json={"value": False})
        assert put.status_code == 200, put.text
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
        try:
            a, b = await _two_pages_on_different_workers(browser, demo, 1280)

            # a reminder added on a: both pages show it, once each
            text = f"stretch {uuid.uuid4().hex[:8]}"
            await a.fill("#remind-seconds", "2")
            await a.fill("#remind-message", text)
            async with a.expect_response(lambda r: r.url.endswith("/api/jobs")) as added:
                await a.click("#remind-add")
            job = await (await added.value).json()
            assert job["task"] == "remind" and job["source"] == "runtime", job
            for page in (a, b):
                await page.wait_for_function(
                    f"document.getElementById('reminders').textContent.includes({text!r})",
                    timeout=30000,
                )
            # the run that delivered it: a history row with status, duration and its data
            key = f'#runs li[data-job="{job["id"]}"][data-status="ok"]'
            for page in (a, b):
                row = await page.wait_for_selector(key, timeout=20000)
                assert text in await row.text_content()
                assert await row.query_selector(".duration")
            for page in (a, b):
                shown = await page.eval_on_selector_all(
                    "#reminders li",
                    f"els => els.filter(e => e.textContent.includes({text!r})).length",
                )
                assert shown == 1, f"reminder shown {shown} times"

            # pause on a: both pages (different workers) show it paused; the API agrees
            job_id = "periodic-report"
            await _job_row_paused(a, job_id, False)
            row = f'#jobs tr.job[data-id="{job_id}"]'
            assert await a.get_attribute(row, "data-source") == "code"
            await a.click(f"{row} button.pause")
            for page in (a, b):
                await _job_row_paused(page, job_id, True)
            assert (await demo.get(f"/api/jobs/{job_id}")).json()["paused"] is True
            # resume on b
            await b.click(f"{row} button.resume")
            for page in (a, b):
                await _job_row_paused(page, job_id, False)
            assert (await demo.get(f"/api/jobs/{job_id}")).json()["paused"] is False
            # run now on a: that fire's run row appears, ok, with its duration and data
            run_row = '#jobs tr.job[data-id="cleanup"] button.run'
            await a.wait_for_selector(run_row, timeout=20000)
            async with a.expect_response(lambda r: r.url.endswith("/api/jobs/cleanup/run")) as ran:
                await a.click(run_row)
            fire = await (await ran.value).json()
            assert (await ran.value).status == 202
            stamp_ms = await a.evaluate(f"isoMs({fire['scheduled_at']!r})")
            for page in (a, b):
                li = await page.wait_for_selector(
                    f'#runs li[data-key="cleanup|{stamp_ms}"][data-status="ok"]', timeout=30000
                )
                assert await li.query_selector(".duration")
                assert '"removed"' in await li.text_content()

            # the lease counts down between polls (renewed_at + ttl_ms)
            first = await a.text_content("#leader-ttl")
            assert first and first.endswith(" s"), first
            await a.wait_for_function(
                f"document.getElementById('leader-ttl').textContent !== {first!r}", timeout=5000
            )

            # header: one line at 1280 px
            for page in (a, b):
                height = await page.evaluate("document.querySelector('header').clientHeight")
                line = await page.evaluate(
                    "document.querySelector('header h1').getBoundingClientRect().height"
                )
                assert height < 2 * line + 24, (height, line)  # 24: the header's padding
                overflow = await page.evaluate(
                    "[...document.querySelectorAll('header > *')].map(e => e.offsetTop)"
                )
                assert len(set(overflow)) == 1 or max(overflow) - min(overflow) < line, overflow
                cut = await page.evaluate(  # nothing pushed out of the header's right edge
                    "(() => { const h = document.querySelector('header').getBoundingClientRect();"
                    " return [...document.querySelectorAll('header > *')]"
                    ".filter(e => e.getBoundingClientRect().right > h.right)"
                    ".map(e => e.textContent); })()"
                )
                assert cut == [], cut

            stamp = time.strftime("%Y%m%d-%H%M%S")
            for name, page in zip("ab", (a, b), strict=True):
                path = OUTPUT / f"dashboard-jobs-{name}-1280-{stamp}.png"
                await page.screenshot(path=str(path), full_page=True)
                assert path.stat().st_size > 10_000
            for page in (a, b):  # each fire has one row: live event and history merged
                keys = await page.eval_on_selector_all(
                    "#runs li", "els => els.map(e => e.dataset.key)"
                )
                assert len(keys) == len(set(keys)), keys
                assert page.problems == [], page.problems
        finally:
            await browser.close()


def test_output_folder_is_ignored_by_git() -> None:
    assert "/test-output/" in Path(ROOT / ".gitignore").read_text()
