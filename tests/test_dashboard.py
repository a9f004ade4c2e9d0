"""The dashboard of `edgemoe serve`, in a real headless Chromium (Debian's package, driven by Playwright).

A chat sent from the page's own chat box streams through /v1/chat/completions; while it
streams, the numbers and the expert grid must change. A screenshot is kept in the test's
tmp dir, and copied to docs/dashboard.png with EDGEMOE_UPDATE_SCREENSHOT=1.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from conftest import REPO, unavailable
from test_server import KEY, start_server, stop_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    # a small cache, so experts come and go from it while the request streams
    packed = models.packed("qwen3_moe", True)
    srv = start_server(packed, tmp_path_factory.mktemp("dash") / "server.log", "--api-key", KEY,
                       "--cache-mb", "0.25", "--max-tokens", "4000")
    try:
        yield srv
    finally:
        stop_server(srv.proc)


@pytest.fixture
def browser():
    if not os.path.exists(CHROMIUM):
        unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the playwright package is missing (pip install -e '.[test]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def test_page_is_static_and_events_need_the_key(server):
    page = httpx.get(f"{server.url}/", timeout=10)
    assert page.status_code == 200 and 'id="grid"' in page.text
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    for headers in ({}, {"Authorization": "Bearer nope"}):
        # a stream: read the status only, since granted events never end
        with httpx.stream("GET", f"{server.url}/v1/dashboard/events", headers=headers, timeout=10) as r:
            assert r.status_code == 401
    with httpx.stream("GET", f"{server.url}/v1/dashboard/events", headers={"Authorization": f"Bearer {KEY}"},
                      timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert '"layers":' in next(r.iter_lines())


def _look(page) -> dict:
    return page.evaluate("""() => ({
        tokens: document.getElementById('tokens').textContent,
        bytes: document.getElementById('bytes').textContent,
        hit: document.getElementById('hit').textContent,
        grid: Array.from(document.querySelectorAll('.cell')).map(c => c.style.background + c.dataset.where).join('|'),
        cells: document.querySelectorAll('.cell').length,
        streaming: document.getElementById('send').disabled,
        answer: document.getElementById('log').textContent,
    })""")


def test_grid_and_numbers_change_while_a_chat_streams(server, browser, tmp_path):
    # bypass_csp: the page forbids eval, which Playwright's wait_for_function uses (the header is checked above)
    page = browser.new_page(viewport={"width": 1400, "height": 900}, bypass_csp=True)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # the key in the fragment: never sent to the server, and the page takes it out of the address bar
    page.goto(f"{server.url}/#key={KEY}")
    page.wait_for_function("document.getElementById('status').textContent === 'live'", timeout=30_000)
    page.wait_for_function("document.querySelectorAll('.cell').length > 0", timeout=30_000)
    assert "key=" not in page.url
    before = _look(page)
    assert before["tokens"] == "0"

    page.fill("#temp", "0")  # greedy: this reply is long on the test model (sampled ones may end at once)
    page.fill("#prompt", "Tell me a long story about the sea.")
    page.click("#send")
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(seen) < 6:
        time.sleep(0.6)
        look = _look(page)
        if not look["streaming"] and look["tokens"] != "0":  # the reply ended
            break
        if look["streaming"] and look["tokens"] != "0":  # looked at while the reply still streams
            seen.append(look)
    assert len(seen) >= 3, f"the reply did not stream long enough to watch: {seen} {_look(page)}"
    screenshot = tmp_path / "dashboard.png"
    page.screenshot(path=str(screenshot), full_page=True)
    if os.environ.get("EDGEMOE_UPDATE_SCREENSHOT") == "1":
        shutil.copy(screenshot, Path(REPO) / "docs" / "dashboard.png")

    assert len({s["tokens"] for s in seen}) >= 2, "the token count did not move while streaming"
    assert len({s["grid"] for s in seen} | {before["grid"]}) >= 3, "the expert grid did not change while streaming"
    assert seen[-1]["bytes"] != before["bytes"], "no SSD bytes read shown"
    assert seen[-1]["hit"] != "–"
    assert seen[-1]["answer"].strip() != "> Tell me a long story about the sea."  # the reply text arrived
    assert seen[-1]["cells"] == before["cells"] > 0
    assert not errors, errors
