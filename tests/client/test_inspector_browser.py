"""The inspector page in a real browser: Debian's chromium, driven by Playwright, against a real tunnel.

Chromium comes from `scripts/install-test-deps` (the apt package `chromium`;
Playwright downloads no browser here). Without it these tests fail, saying so.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import requests

from tests.client.support import XSS

CHROMIUM = os.environ.get("TUN2G_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DOCS_IMAGES = Path(__file__).resolve().parents[2] / "docs" / "img"


def _screenshot(page, name: str, tmp_path: Path) -> None:
    """Into the test's tmp folder; with TUN2G_UPDATE_SCREENSHOTS=1, also over the README's docs/img/ copies."""
    page.screenshot(path=str(tmp_path / name))
    if os.environ.get("TUN2G_UPDATE_SCREENSHOTS") == "1":
        page.screenshot(path=str(DOCS_IMAGES / name))


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        pytest.fail(f"chromium is not installed at {CHROMIUM}: run scripts/install-test-deps "
                    f"(it installs Debian's chromium package, which these browser tests drive)", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: run scripts/install-test-deps "
                    "(pip install -e '.[test]')", pytrace=False)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM if os.path.exists(CHROMIUM)
                                             else shutil.which("chromium"), args=ARGS, timeout=30_000)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    # bypass_csp: the page's CSP forbids eval, which Playwright's wait_for_function needs; it also makes the XSS
    # test prove the escaping itself, not the CSP behind it.
    context = browser.new_context(viewport={"width": 1280, "height": 720}, device_scale_factor=1, bypass_csp=True)
    page = context.new_page()
    page.set_default_timeout(5_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    try:
        yield page
    finally:
        context.close()


def _row(page, path: str):
    return page.locator("#requests tbody tr", has=page.locator("td.path", has_text=path))


def test_the_page_lists_a_request_live_and_replays_it(inspected, page, tmp_path):
    page.goto(inspected.ui + "/")
    page.wait_for_selector("#empty", state="visible")
    page.wait_for_function("document.getElementById('tunnel').textContent.includes('connected')")
    started = time.monotonic()
    assert inspected.post("/json/orders?page=2", json={"item": "book", "qty": 2},
                          headers={"Authorization": "Bearer hunter2", "Cookie": "sid=abc"}).status_code == 200
    _row(page, "/json/orders?page=2").first.wait_for(timeout=1_000)  # live, within a second, no reload
    assert time.monotonic() - started < 1.5
    for path in ("/hello", "/status-page", "/binary"):
        inspected.get(path, headers={"User-Agent": "demo"})
    _row(page, "/binary").first.wait_for(timeout=1_000)
    _row(page, "/json/orders").first.click()
    page.wait_for_function("document.getElementById('d-title').textContent.includes('/json/orders')")
    request_headers = page.inner_text("#d-request-headers")
    assert "Authorization\t[redacted]" in request_headers and "Cookie\t[redacted]" in request_headers
    assert "hunter2" not in page.content() and "sid=abc" not in page.content()
    assert "Set-Cookie\t[redacted]" in page.inner_text("#d-response-headers")
    assert page.inner_text("#d-request-body") == '{\n  "item": "book",\n  "qty": 2\n}'
    assert '"items": [' in page.inner_text("#d-response-body")
    _screenshot(page, "inspector-detail.png", tmp_path)

    page.click("#replay")
    page.wait_for_function("document.getElementById('d-meta').textContent.includes('replay of')")
    assert inspected.app.hits["/json/orders"] == 2
    assert inspected.app.last_headers["/json/orders"]["authorization"] == "Bearer hunter2"
    assert _row(page, "/json/orders").count() == 2
    assert _row(page, "/json/orders").first.locator(".badge").inner_text() == "replay"
    assert "Authorization\t[redacted]" in page.inner_text("#d-request-headers")
    _screenshot(page, "inspector-list.png", tmp_path)
    assert page.errors == []


def test_filters_narrow_the_list(inspected, page):
    inspected.get("/alpha")
    inspected.post("/created/beta")
    inspected.wait_for("/created/beta")
    page.goto(inspected.ui + "/")
    _row(page, "/alpha").wait_for()
    page.fill("#filter-path", "beta")
    page.wait_for_function("document.querySelectorAll('#requests tbody tr').length === 1")
    assert _row(page, "/created/beta").count() == 1
    page.fill("#filter-path", "")
    page.select_option("#filter-status", "2xx")
    page.wait_for_function("document.querySelectorAll('#requests tbody tr').length === 2")
    page.select_option("#filter-status", "4xx")
    page.wait_for_function("document.querySelectorAll('#requests tbody tr').length === 0")


def test_an_xss_payload_in_the_path_headers_and_body_is_shown_as_text(inspected, page):
    page.goto(inspected.ui + "/")
    page.wait_for_selector("#empty", state="visible")
    path = "/xss/" + XSS.replace(" ", "%20").replace('"', "%22").replace("<", "%3C").replace(">", "%3E")
    inspected.get(path, headers={"X-Evil": XSS})
    row = page.locator("#requests tbody tr").first
    row.wait_for(timeout=1_000)
    row.click()
    page.wait_for_function("document.getElementById('d-title').textContent.includes('/xss/')")
    assert XSS in page.inner_text("#d-request-headers")
    assert XSS in page.inner_text("#d-response-headers")
    assert page.inner_text("#d-response-body") == XSS
    assert page.evaluate("window.__xss") is None
    assert page.locator("img").count() == 0
    # and a raw path with markup from the tunnel, shown in the list, stays text
    assert page.locator("#requests td.path").first.inner_text().startswith("/xss/")
    assert page.errors == []


def test_the_page_is_refused_under_a_foreign_host_name(inspected):
    port = inspected.inspector.address[1]
    response = requests.get(f"{inspected.ui}/", headers={"Host": f"attacker.example:{port}"}, timeout=5)
    assert response.status_code == 403
