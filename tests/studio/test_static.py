"""The Studio's files as the service serves them: no key needed, a strict CSP, nothing external, no HTML
built from strings, no key in a URL. Plus ``GET /v1/presets``, the one route added for the page."""

from __future__ import annotations

import re
import tomllib
from fnmatch import fnmatch
from importlib import resources
from pathlib import Path

import httpx

from tests.serve.conftest import assert_error_shape

ROOT = Path(__file__).resolve().parents[2]
STUDIO = resources.files("imagegen.serve").joinpath("studio")


def studio_files() -> dict[str, str]:
    return {entry.name: entry.read_text() for entry in STUDIO.iterdir() if entry.is_file()}


def test_the_page_loads_without_a_key_under_a_strict_policy(service):
    with httpx.Client(base_url=service.url, timeout=30) as http:
        redirect = http.get("/studio")
        assert redirect.status_code == 308 and redirect.headers["location"] == "/studio/"
        page = http.get("/studio/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        assert directives["default-src"] == "'self'"
        assert directives["script-src"] == "'self'"  # no 'unsafe-inline', no 'unsafe-eval', no other origin
        assert directives["img-src"] == "'self' blob: data:"
        assert directives["connect-src"] == "'self'"
        assert directives["object-src"] == "'none'" and directives["frame-ancestors"] == "'none'"
        assert page.headers["x-content-type-options"] == "nosniff"
        for name in studio_files():
            response = http.get(f"/studio/{name}")
            assert response.status_code == 200, name
            assert response.headers["content-security-policy"] == csp
        script = http.get("/studio/app.js")
        assert script.headers["content-type"].startswith("text/javascript")
        # only the page's own files are public: anything else under /studio needs a key like every route
        assert_error_shape(http.get("/studio/missing.js"), 401)
        assert_error_shape(http.get("/studio/..%2Fhttp%2Fstudio.py"), 401)


def test_unknown_studio_files_are_404_with_a_key(service, keys):
    headers = {"Authorization": f"Bearer {keys.render}"}
    with httpx.Client(base_url=service.url, timeout=30, headers=headers) as http:
        for name in ("missing.js", "..%2F..%2Fsettings.py", "studio.py", ".hidden.js"):
            assert_error_shape(http.get(f"/studio/{name}"), 404)


def test_no_external_resource_no_inline_script_no_html_from_strings():
    files = studio_files()
    assert {"index.html", "app.js", "api.js", "dom.js", "studio.css"} <= set(files)
    for name, text in files.items():
        # offline machines: nothing from another origin (no CDN, no font service)
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), f"{name} refers to another origin"
    html = files["index.html"]
    for tag in re.findall(r"<script\b[^>]*>", html):
        assert "src=" in tag, f"inline script in index.html: {tag}"
    assert not re.search(r"\son[a-z]+\s*=", html, re.I), "inline event handler in index.html"
    for name, text in files.items():
        if not name.endswith(".js"):
            continue
        banned_calls = (
            ".innerHTML",
            ".outerHTML",
            "insertAdjacentHTML(",
            "document.write",
            "eval(",
            "new Function",
            "createContextualFragment(",
            "DOMParser",
            "srcdoc =",  # the one frame (an eval report) is sandboxed: checked below
        )
        for banned in banned_calls:
            if banned == "srcdoc =" and name == "evals.js":
                assert 'sandbox: ""' in text, "the report frame must be sandboxed (no scripts, opaque origin)"
                continue
            assert banned not in text, f"{name} uses {banned}: user text must go in through textContent / DOM APIs"
        assert "new EventSource" not in text, f"{name}: events are read over fetch with the key as a header"
        assert "?key=" not in text and "api_key=" not in text, f"{name} puts a key in a URL"
        assert "localStorage" not in text, f"{name}: the key is kept in sessionStorage only"


def test_the_package_ships_every_studio_file():
    """pyproject's package-data covers every file of imagegen/serve/studio (a wheel would lack the rest)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["imagegen"]
    for name in studio_files():
        assert any(fnmatch(f"serve/studio/{name}", p) for p in patterns), f"{name} is not package data"


def test_presets_lists_the_served_presets_and_their_methods(service, keys):
    with httpx.Client(base_url=service.url, timeout=30) as http:
        assert_error_shape(http.get("/v1/presets"), 401)
        answer = http.get("/v1/presets", headers={"Authorization": f"Bearer {keys.render}"})
    assert answer.status_code == 200, answer.text
    presets = {p["name"]: p for p in answer.json()["presets"]}
    assert set(presets) == {"tiny-flux", "tiny-sdxl"}
    flux = presets["tiny-flux"]
    assert flux["family"] == "flux" and flux["methods"][0] == flux["default_method"]
    assert "pulid-flux-v0.9.1" in flux["methods"]
    assert flux["defaults"]["width"] > 0 and flux["limits"]["max_steps"] >= flux["defaults"]["steps"]
