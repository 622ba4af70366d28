"""`imagegen studio` as a person runs it: a real subprocess with its own local Ray, on a free port and a
throw-away IMAGEGEN_HOME; the URL and key it prints open the Studio in chromium; Ctrl-C stops it
and revokes the key."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from imagegen.serve.store import ServeStore
from tests.serve.conftest import free_port, wait_ready
from tests.studio.conftest import STEP_MS

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
KEY_LINE = re.compile(r"^(igk_[0-9a-f]{12}_[A-Za-z0-9_-]{43})$")
URL_LINE = re.compile(r"imagegen Studio: (http://\S+/studio/)")


def _lines(proc: subprocess.Popen) -> queue.Queue:
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _read_url_and_key(lines: queue.Queue, seen: list[str], timeout_s: float) -> tuple[str, str]:
    url = key = None
    deadline = time.monotonic() + timeout_s
    while (url is None or key is None) and time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        seen.append(line)
        if match := URL_LINE.search(line):
            url = match.group(1)
        if match := KEY_LINE.match(line.strip()):
            key = match.group(1)
    assert url and key, "imagegen studio printed no URL and key:\n" + "\n".join(seen[-40:])
    return url, key


def test_imagegen_studio_prints_a_url_and_a_key_that_open_the_studio(isolated_home, browser):
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "imagegen"), "studio", "--port", str(port), "--preset", "tiny-flux"],
        cwd=ROOT,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []
    lines = _lines(proc)
    try:
        url, key = _read_url_and_key(lines, seen, timeout_s=240)
        assert url == f"http://127.0.0.1:{port}/studio/"
        wait_ready(f"http://127.0.0.1:{port}", timeout_s=120)
        headers = {"Authorization": f"Bearer {key}"}
        presets = httpx.get(f"http://127.0.0.1:{port}/v1/presets", headers=headers, timeout=30)
        assert [p["name"] for p in presets.json()["presets"]] == ["tiny-flux"]
        with ServeStore.open() as store:  # the subprocess's home (isolated_home set IMAGEGEN_HOME)
            record = next(k for k in store.list_keys() if k.name == "studio-local")
        assert sorted(record.scopes) == ["characters:approve", "characters:write", "render"]
        assert record.tenant == "default" and record.revoked_at is None

        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(STEP_MS)
        try:
            page = context.new_page()
            page.goto(url)
            page.fill("#key-input", key)
            page.click("#key-submit")
            page.wait_for_selector("#nav:not([hidden])")
            page.wait_for_selector("text=No characters yet")
        finally:
            context.close()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        while (line := lines.get(timeout=10)) is not None:
            seen.append(line)
    output = "\n".join(seen)
    assert proc.returncode == 0, output[-3000:]
    assert "stopped" in output, output[-3000:]
    with ServeStore.open() as store:
        record = next(k for k in store.list_keys() if k.name == "studio-local")
    assert record.revoked_at is not None, "the local user's key outlived the Studio"
