"""The web page in a real headless browser: Debian's chromium driven by Playwright's Python API."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("FOURBIT_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture
def browser_page(server):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM} (apt install chromium, or set FOURBIT_CHROMIUM)")
    from playwright import sync_api  # the dev extra
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            requested: list[str] = []
            page.on("request", lambda r: requested.append(r.url))
            yield page, requested
        finally:
            browser.close()


def test_page_chats_asks_documents_and_uploads(server, browser_page, tmp_path):
    page, requested = browser_page
    shot = tmp_path / "page-failure.png"
    try:
        page.goto(server.url + "/")
        page.wait_for_function("document.querySelectorAll('#model option').length === 3")
        assert page.locator("#model option").all_inner_texts() == ["tiny", "alpha", "beta"]

        doc = tmp_path / "comets.txt"
        doc.write_text("A comet is a frozen body of ice and dust. The tail of a comet always points away from "
                       "the Sun. Halley's comet returns roughly every seventy-six years.", encoding="utf-8")
        page.set_input_files("#upload-file", str(doc))
        page.click("#upload-button")
        page.wait_for_function("/comets.txt: (indexed|unchanged)/.test(document.getElementById('upload-status')"
                               ".textContent)")

        page.fill("#question", "Which way does the tail of a comet point?")
        page.click("#ask")
        page.wait_for_selector("#answer[data-done='true']")
        assert page.locator("#sources .where").first.inner_text().startswith("comets.txt, page 1")
        marked = page.locator("#sources mark").all_inner_texts()
        assert "The tail of a comet always points away from the Sun." in marked
        assert page.locator("#evidence li").count() >= 1
        # The tiny random model's answer is not supported: the checked answer shown is the best sentence.
        assert page.locator("#answer").get_attribute("data-supported") == "false"
        assert "The tail of a comet always points away from the Sun." in page.locator("#answer").inner_text()

        page.select_option("#model", "alpha")
        page.fill("#chat-input", "Hello!")
        page.click("#chat-send")
        page.wait_for_selector(".msg.assistant[data-done='true']")
        assert page.locator(".msg.user").inner_text() == "Hello!"
        assert page.locator("#error").inner_text() == ""

        # Shift+Enter starts a new line and sends nothing; Enter sends the two lines as one message.
        box = page.locator("#chat-input")
        box.click()
        page.keyboard.type("line one")
        page.keyboard.press("Shift+Enter")
        page.keyboard.type("line two")
        assert box.input_value() == "line one\nline two"
        assert page.locator(".msg.user").count() == 1
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelectorAll(\".msg.assistant[data-done='true']\").length === 2")
        assert page.locator(".msg.user").nth(1).text_content() == "line one\nline two"
        assert box.input_value() == ""
        assert all(url.startswith(server.url) for url in requested), requested  # nothing from elsewhere
    except BaseException:
        page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot of the failing page: {shot}")
        raise
