"""The dashboard: served from the package, and drawn in a real headless Chromium from a real report."""

from __future__ import annotations

import asyncio
import os
import random
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import orjson
import pytest
from aiohttp import web
from playwright.async_api import Page, Route, async_playwright
from yarl import URL

from proxy.comparator.worker import Worker
from proxy.dashboard import ASSETS
from proxy.server import ProxyServer

from .conftest import echo, eventually, make_config

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
# The charts in page order, and the arms each one draws a line for (divergence: the candidate against the noise).
CHART_ARMS = {
    "chart-latency": ("incumbent", "candidate"),
    "chart-distribution": ("incumbent", "candidate"),
    "chart-errors": ("incumbent", "candidate"),
    "chart-divergence": ("candidate",),
    "chart-cost": ("incumbent", "candidate"),
}
# Per chart canvas: how many pixels are (nearly) the incumbent's blue and the candidate's orange.
COLOURED_PIXELS = """canvases => canvases.map(canvas => {
    const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    const colours = {incumbent: [37, 99, 235], candidate: [232, 89, 12]};
    const counts = {incumbent: 0, candidate: 0};
    for (let i = 0; i < data.length; i += 4) {
        for (const [arm, [r, g, b]] of Object.entries(colours)) {
            const distance = Math.abs(data[i] - r) + Math.abs(data[i + 1] - g) + Math.abs(data[i + 2] - b);
            if (data[i + 3] > 200 && distance < 40) counts[arm]++;
        }
    }
    return [canvas.closest(".chart").id, counts];
})"""
ANSWER = "The capital of France is Paris."
VARIANT = "The capital city of France is Paris."  # every third candidate answer: one word more


def chat_server(delay_ms: float, *, variant: bool = False, failing: bool = False):  # type: ignore[no-untyped-def]
    """A chat endpoint answering ANSWER; variant: VARIANT to every third question; failing: 500 to one in 30."""
    jitter = random.Random(delay_ms)

    async def handler(request: web.Request) -> web.Response:
        question = orjson.loads(await request.read())["messages"][0]["content"]
        number = int(question.removeprefix("question "))
        await asyncio.sleep((delay_ms + jitter.random() * delay_ms / 2) / 1000)
        if failing and number % 30 == 7:
            return web.json_response({"error": {"message": "overloaded"}}, status=500)
        text = VARIANT if variant and number % 3 == 0 else ANSWER
        return web.json_response(
            {
                "object": "chat.completion",
                "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 8, "completion_tokens": len(text.split())},
            }
        )

    return handler


@dataclass
class Stack:
    """A running proxy with recording, and the config sections its comparator worker uses."""

    proxy: ProxyServer
    sections: dict[str, dict[str, Any]]
    redis_url: str

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.proxy.admin_port}/"

    async def traffic(self, questions: range) -> None:
        """Sends the questions about 20 ms apart (several one-second windows), then compares them all."""
        async with aiohttp.ClientSession() as client:

            async def send(i: int) -> None:
                body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": f"question {i}"}]})
                async with client.post(f"http://127.0.0.1:{self.proxy.port}/v1/chat/completions", data=body) as resp:
                    await resp.read()

            sends = []
            for i in questions:
                sends.append(asyncio.create_task(send(i)))
                await asyncio.sleep(0.02)
            await asyncio.gather(*sends)
        metrics = self.proxy.runtime.metrics
        await eventually(lambda: metrics.value("shadow_proxy_records_written_total") == questions.stop)
        worker = Worker(make_config(**self.sections), self.redis_url)
        await worker.run(burst=True)
        await worker.close()


async def stack(upstreams, proxies, redis_url: str, n: int = 150, token: str = "") -> Stack:  # type: ignore[no-untyped-def]
    """Proxy, both arms, a held canary and n requests over about three seconds, compared by a burst worker."""
    # Incumbent errors give the error chart data without failing the canary's error gate.
    incumbent = await upstreams(chat_server(10, failing=True))
    candidate = await upstreams(chat_server(14, variant=True))
    stage = {"min_duration": 3600, "min_pairs": 100_000, "gates": ["error_rate"]}
    sections: dict[str, dict[str, Any]] = {
        "incumbent": {"url": incumbent.url, "price": {"input_per_1k": 0.5, "output_per_1k": 1.5}},
        "candidate": {"url": candidate.url, "price": {"input_per_1k": 0.4, "output_per_1k": 1.2}},
        "record": {"redis_url": redis_url},
        "compare": {"window_seconds": 1, "noise_sample_rate": 0.5},
        "canary": {"enabled": True, "stage": [{"weight": 0.0, **stage}, {"weight": 0.25, **stage}]},
        "admin": {"token": token},
    }
    result = Stack(await proxies(**sections), sections, redis_url)
    await result.traffic(range(n))
    return result


@dataclass
class Browser:
    """One Chromium page, with everything it requested and every error it logged."""

    page: Page
    requested: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    async def open(self, url: str) -> dict[str, Any]:
        """Loads the page and waits for its first completed refresh; returns window.shadowDashboard."""
        await self.page.goto(url)
        await self.page.wait_for_function("() => window.shadowDashboard && window.shadowDashboard.refreshes >= 1")
        return await self.state()

    async def state(self) -> dict[str, Any]:
        state: dict[str, Any] = await self.page.evaluate("() => window.shadowDashboard")
        return state


@pytest.fixture
def chromium_path() -> Path:
    """Debian's Chromium; the tests that need it skip when it is not installed."""
    if not CHROMIUM.exists():
        pytest.skip(reason=f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)")
    return CHROMIUM


@pytest.fixture
async def browser(chromium_path: Path) -> AsyncIterator[Browser]:
    """A headless Chromium page that may only reach loopback hosts (anything else is aborted and noted)."""
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=str(chromium_path), args=CHROMIUM_ARGS)
        try:
            context = await chromium.new_context(viewport={"width": 1440, "height": 900})
            page = await context.new_page()
            seen = Browser(page)

            async def guard(route: Route) -> None:
                if urlsplit(route.request.url).hostname in LOOPBACK:
                    await route.continue_()
                else:
                    seen.blocked.append(route.request.url)
                    await route.abort()

            await context.route("**/*", guard)
            page.on("request", lambda request: seen.requested.append(request.url))
            page.on("console", lambda msg: seen.console_errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda error: seen.page_errors.append(str(error)))
            yield seen
            await context.close()
        finally:
            await chromium.close()


def screenshot_dir(tmp_path: Path) -> Path:
    directory = Path(os.environ.get("SHADOW_PROXY_SCREENSHOT_DIR") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as client, client.get(url) as resp:
        return await resp.json()


# --- without a browser ----------------------------------------------------------------------------------


@pytest.fixture
async def admin(upstreams, proxies) -> str:  # type: ignore[no-untyped-def]
    """The admin listener's base URL of a proxy without recording."""
    incumbent = await upstreams(echo)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"enabled": False})
    return f"http://127.0.0.1:{proxy.admin_port}/"


async def test_page_references_only_packaged_static_assets(admin: str) -> None:
    """GET / is HTML whose scripts and styles all resolve to allow-listed /static/ files of the right type."""
    async with aiohttp.ClientSession() as client:
        async with client.get(admin) as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
            assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
            html = await resp.text()
        references = re.findall(r'(?:src|href)="([^"]*)"', html)
        assets = [urljoin(admin, ref) for ref in references if not ref.startswith("data:")]
        assert {urlsplit(url).path for url in assets} == {f"/static/{name}" for name in ASSETS}
        assert all(urlsplit(url).netloc == urlsplit(admin).netloc for url in assets)
        types = {}
        for url in assets:
            async with client.get(url) as resp:
                assert resp.status == 200, url
                types[url.rsplit(".", 1)[-1]] = resp.content_type
    assert types == {"css": "text/css", "js": "text/javascript", "LICENSE": "text/plain"}


async def test_static_refuses_anything_outside_the_allow_list(admin: str) -> None:
    """Dot-dot paths (plain and encoded), the page itself and unknown names under /static/ are all 404."""
    paths = [
        "static/../x",
        "static/../admin.py",
        "static/..%2Fadmin.py",
        "static/%2e%2e%2f%2e%2e%2fpyproject.toml",
        "static/..",
        "static/dashboard.html",
        "static/dashboard.py",
        "static/",
    ]
    async with aiohttp.ClientSession() as client:
        for path in paths:
            async with client.get(URL(admin + path, encoded=True)) as resp:  # sent as written, not normalised
                body = await resp.read()
                assert resp.status == 404, path
                assert b"import" not in body and b"[project]" not in body, path


async def test_assets_are_revalidated_by_etag(admin: str) -> None:
    """A conditional GET with the asset's ETag answers 304 without a body."""
    async with aiohttp.ClientSession() as client:
        async with client.get(admin + "static/dashboard.js") as resp:
            etag = resp.headers["ETag"]
            assert resp.headers["Cache-Control"] == "no-cache"
        async with client.get(admin + "static/dashboard.js", headers={"If-None-Match": etag}) as resp:
            assert resp.status == 304 and await resp.read() == b""


# --- in Chromium ----------------------------------------------------------------------------------------


async def test_dashboard_plots_the_report(browser: Browser, upstreams, proxies, redis_url, tmp_path: Path) -> None:
    """Every chart is drawn from the report's windows, every gate has a row and the canary shows its stage."""
    admin = (await stack(upstreams, proxies, redis_url)).admin
    state = await browser.open(admin)
    report = await get_json(admin + "api/report")
    page = browser.page
    await page.screenshot(path=screenshot_dir(tmp_path) / "dashboard.png", full_page=True)

    windows = len(report["timeseries"])
    assert windows >= 2 and state["error"] is None
    assert {k: v for k, v in state["plotted"].items() if k != "distribution"} == dict.fromkeys(
        ("latency", "errors", "divergence", "cost"), windows
    )
    assert state["plotted"]["distribution"] > 0
    painted = await page.eval_on_selector_all(".chart canvas", COLOURED_PIXELS)
    assert [chart for chart, _ in painted] == list(CHART_ARMS)
    for chart, pixels in painted:  # each arm's line is on the canvas in its own colour
        assert all(pixels[arm] > 50 for arm in CHART_ARMS[chart]), (chart, pixels)
    rows = page.locator("#gates-body tr[data-gate]")
    gates = report["verdict"]["gates"]
    assert await rows.evaluate_all("rows => rows.map(r => r.dataset.gate)") == [g["name"] for g in gates]
    for row, gate in zip(await rows.all(), gates, strict=True):
        cells = await row.locator("td").all_inner_texts()
        assert cells[0].startswith(gate["name"]) and cells[1].lower() == gate["outcome"] and cells[5] == str(gate["n"])
        assert gate["rule"] in cells[6]
        if gate["need_more_pairs"]:
            assert f"need about {gate['need_more_pairs']:,} more pairs" in cells[6]
    assert await page.inner_text("#canary-stage") == "1 of 2"
    assert await page.inner_text("#canary .weight") == "0%"
    assert state["canary"] == "active"


async def test_examples_highlight_the_differing_words(browser: Browser, upstreams, proxies, redis_url) -> None:
    """Both answers side by side with only the inserted word marked; a failed arm's error body is not marked."""
    state = await browser.open((await stack(upstreams, proxies, redis_url)).admin)
    examples = browser.page.locator("#examples-body .example")
    assert state["examples"] == await examples.count()
    kinds = []
    for example in await examples.all():
        candidate = await example.locator(".candidate pre").inner_text()
        if await example.locator(".incumbent.failed").count():
            kinds.append("failed")
            assert candidate == ANSWER and await example.locator("ins, del").count() == 0
        else:
            kinds.append("differs")
            assert await example.locator(".incumbent pre").inner_text() == ANSWER and candidate == VARIANT
            assert await example.locator("ins").all_inner_texts() == ["city"]
            assert await example.locator("del").count() == 0
    assert kinds == sorted(kinds, reverse=True) and set(kinds) == {"failed", "differs"}  # failures first


async def test_dashboard_sends_the_token_from_the_url_fragment(browser: Browser, upstreams, proxies, redis_url) -> None:
    """Without the admin token the examples are withheld; opened as /#token=..., the page shows them, sends the
    token only as a Bearer header and drops it from the address bar."""
    admin = (await stack(upstreams, proxies, redis_url, n=60, token="s3cret")).admin
    state = await browser.open(admin)
    assert state["examplesWithheld"] is True and state["examples"] == 0 and state["error"] is None
    assert "#token=<admin.token>" in await browser.page.inner_text("#examples-body")
    sent: list[str | None] = []
    browser.page.on("request", lambda r: sent.append(r.headers.get("authorization")) if "api/" in r.url else None)
    state = await browser.open(admin + "?refresh=1#token=s3cret")
    assert state["examplesWithheld"] is False and state["examples"] > 0
    assert await browser.page.locator("#examples-body .example").count() == state["examples"]
    await browser.page.wait_for_function("() => window.shadowDashboard.refreshes >= 2")  # the token is kept
    assert "token" not in browser.page.url and not any("s3cret" in url for url in browser.requested)
    assert sent and set(sent) == {"Bearer s3cret"}
    assert browser.page_errors == [] and browser.console_errors == []


async def test_dashboard_stays_on_loopback_without_errors(browser: Browser, upstreams, proxies, redis_url) -> None:
    """Through two refreshes the page requests nothing outside loopback and logs no error."""
    await browser.open((await stack(upstreams, proxies, redis_url, n=60)).admin + "?refresh=1")
    await browser.page.wait_for_function("() => window.shadowDashboard.refreshes >= 2")
    assert browser.blocked == []
    assert {urlsplit(url).hostname for url in browser.requested} == {"127.0.0.1"}
    assert browser.console_errors == [] and browser.page_errors == []


async def test_dashboard_refreshes_by_itself(browser: Browser, upstreams, proxies, redis_url) -> None:
    """New pairs compared after the page loaded appear on it without a reload."""
    running = await stack(upstreams, proxies, redis_url, n=60)
    await browser.open(running.admin + "?refresh=1")
    assert await browser.page.inner_text("#kpis .value >> nth=0") == "60"
    await running.traffic(range(60, 90))
    await browser.page.wait_for_function("() => document.querySelector('#kpis .value').textContent === '90'")


async def test_dashboard_without_recording_says_so(browser: Browser, admin: str, tmp_path: Path) -> None:
    """Without Redis the report and canary APIs are 404: the page says there is no canary and no report."""
    state = await browser.open(admin)
    await browser.page.screenshot(path=screenshot_dir(tmp_path) / "dashboard-no-recording.png", full_page=True)
    assert state["canary"] == "none" and state["error"] is None
    assert await browser.page.inner_text("#canary-body") == "No canary: recording is disabled."
    assert await browser.page.inner_text("#problem") == "No report: recording is disabled."
    assert browser.page_errors == []


async def test_each_candidate_can_be_shown(browser: Browser, upstreams, proxies, redis_url) -> None:
    """With two candidates the selector lists both with their verdicts, and choosing one shows its report."""
    incumbent = await upstreams(chat_server(5))
    same = await upstreams(chat_server(5))
    wordy = await upstreams(chat_server(5, variant=True))
    sections: dict[str, Any] = {
        "incumbent": {"url": incumbent.url},
        "candidate": [{"name": "same", "url": same.url}, {"name": "wordy", "url": wordy.url}],
        "record": {"redis_url": redis_url},
        "compare": {"window_seconds": 1},
    }
    result = Stack(await proxies(**sections), sections, redis_url)
    await result.traffic(range(30))
    await browser.open(result.admin)
    options = await browser.page.eval_on_selector_all("#candidate option", "os => os.map(o => o.value)")
    assert options == ["", "same", "wordy"]
    assert "default (same)" in await browser.page.inner_text("#candidate")
    before = (await browser.state())["refreshes"]
    await browser.page.select_option("#candidate", "wordy")
    await browser.page.wait_for_function(f"() => window.shadowDashboard.refreshes > {before}")
    assert any(url.endswith("api/report?candidate=wordy") for url in browser.requested)
    assert await browser.page.input_value("#candidate") == "wordy"
    assert not browser.page_errors and not browser.console_errors
