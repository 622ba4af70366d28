"""The Studio page in a real browser: Playwright driving Debian's chromium against the session's service.

Playwright cannot download its own browsers here, so it launches the system ``chromium``
(``executable_path``); the tests skip, saying so, only when chromium is not installed (``.ci/run``
installs it). Every key these tests use belongs to their own tenant, so the page shows only what
they made. Screenshots of each step go to ``test-artifacts/studio/<test>/`` (gitignored; set
``IMAGEGEN_TEST_ARTIFACTS`` to put them elsewhere).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagegen.client import Client
from imagegen.serve.auth import create_key
from imagegen.serve.store import ServeStore
from tests.eval._browser import chromium

ROOT = Path(__file__).resolve().parents[2]
TENANT = "studio-tests"
STUDIO_SCOPES = ["render", "characters:write", "characters:approve"]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: how long the page may take for one step (tiny renders on a loaded 2-core machine)
STEP_MS = 90_000


@pytest.fixture(scope="session")
def browser():
    executable = chromium()  # skips, saying why, when Debian's chromium is not installed
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="session")
def studio_key(service) -> str:
    """A key like the one `imagegen studio` prints: render, design/register, approve; its own tenant."""
    with ServeStore.open() as store:
        return create_key(store, "studio-tests", STUDIO_SCOPES, tenant=TENANT)[1]


@pytest.fixture(scope="session")
def studio_api(service, studio_key) -> Iterator[Client]:
    with Client(service.url, studio_key) as client:
        yield client


class Shots:
    """Numbered full-page screenshots of one test's steps."""

    def __init__(self, page, directory: Path):
        self.page = page
        self.directory = directory
        self.count = 0
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("*.png"):
            old.unlink()

    def take(self, step: str) -> Path:
        self.count += 1
        path = self.directory / f"{self.count:02d}-{step}.png"
        self.page.screenshot(path=str(path), full_page=True)
        # a full-page screenshot leaves chromium's scroll position stale: a click right after it can land on
        # whatever the page scrolls to when the clicked element takes the focus
        self.page.evaluate("() => window.scrollTo(0, 0)")
        return path

    def element(self, step: str, selector: str) -> Path:
        """A screenshot of one part of the page (what the README shows)."""
        self.count += 1
        path = self.directory / f"{self.count:02d}-{step}.png"
        self.page.locator(selector).screenshot(path=str(path))
        return path


def open_page(browser, base_url: str, **options):
    """A fresh browser context (empty sessionStorage) and its page, recording page errors and dialogs."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=base_url, **options)
    context.set_default_timeout(STEP_MS)
    tab = context.new_page()
    tab.page_errors = []
    tab.dialogs = []
    tab.on("pageerror", lambda exc: tab.page_errors.append(str(exc)))

    def on_dialog(dialog):
        tab.dialogs.append(dialog.message)
        dialog.dismiss()

    tab.on("dialog", on_dialog)
    return context, tab


@pytest.fixture
def page(browser, service):
    """The Studio's origin in a fresh context, its Content-Security-Policy enforced."""
    context, tab = open_page(browser, service.url)
    try:
        yield tab
    finally:
        context.close()


@pytest.fixture
def page_without_csp(browser, service):
    """The same without the Content-Security-Policy: what the page's own escaping does, with no second line."""
    context, tab = open_page(browser, service.url, bypass_csp=True)
    try:
        yield tab
    finally:
        context.close()


@pytest.fixture
def shots(request) -> Shots:
    """Screenshots of the test's page (``page`` or ``page_without_csp``) into test-artifacts/studio/<test>/."""
    tab = request.getfixturevalue("page_without_csp" if "page_without_csp" in request.fixturenames else "page")
    base = Path(os.environ.get("IMAGEGEN_TEST_ARTIFACTS") or ROOT / "test-artifacts") / "studio"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)
    return Shots(tab, base / name)


def sign_in(page, key: str) -> None:
    """Open the Studio and use ``key`` (the key form, as a person would)."""
    page.goto("/studio/")
    page.fill("#key-input", key)
    page.click("#key-submit")
    page.wait_for_selector("#nav:not([hidden])")


@pytest.fixture(scope="session")
def studio_character(studio_api) -> Iterator[str]:
    """An approved character of the tests' tenant, registered from real photos (the astronaut)."""
    from tests.photos import astronaut_set

    character_id = "studio-mia"
    studio_api.create_character(
        character_id,
        "Mia (studio tests)",
        list(astronaut_set(3)),
        {"kind": "synthetic", "creator": "studio-tests"},
        card={"look": "short dark hair", "personality": "calm", "style_notes": "film photo"},
    )
    studio_api.approve_character(character_id)
    yield character_id
    studio_api.delete_character(character_id)


def focus_is_visible(page) -> bool:
    """The focused element draws a visible outline (the keyboard user sees where they are)."""
    return page.evaluate(
        """() => {
            const el = document.activeElement;
            if (!el || el === document.body) return false;
            const style = getComputedStyle(el);
            return style.outlineStyle !== "none" && parseFloat(style.outlineWidth) > 0;
        }"""
    )


def tab_to(page, selector: str, limit: int = 80, reverse: bool = False) -> None:
    """Press Tab (Shift+Tab) until ``selector`` has the focus; every element passed on the way shows its focus."""
    for _ in range(limit):
        page.keyboard.press("Shift+Tab" if reverse else "Tab")
        if page.evaluate("(s) => document.activeElement && document.activeElement.matches(s)", selector):
            assert focus_is_visible(page), f"{selector} has the focus but shows no focus outline"
            return
        focused = page.evaluate("() => document.activeElement && document.activeElement.outerHTML.slice(0, 120)")
        if focused and not focused.startswith("<body"):
            assert focus_is_visible(page), f"no visible focus on {focused}"
    raise AssertionError(f"{selector} cannot be reached with Tab")


def unlabelled_controls(page) -> list[str]:
    """Form controls of the page without a label (a <label for>, a wrapping label or aria-label)."""
    return page.evaluate(
        """() => [...document.querySelectorAll("input, select, textarea")]
            .filter((el) => el.type !== "hidden")
            .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute("aria-label")
                && !el.getAttribute("aria-labelledby"))
            .map((el) => el.outerHTML.slice(0, 120))"""
    )
