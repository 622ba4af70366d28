"""``/studio``: the Studio page, static files shipped in the package (``imagegen/serve/studio/``).

The page needs no key to load (it has no data of its own); everything it shows comes from the
public ``/v1`` API, called by the page with the key the user types (kept in ``sessionStorage``,
sent as a header: never in a URL, never in a cookie). The files are served from a table built
once from the package directory, looked up by exact name, so no part of a request path ever
reaches the file system. Every response carries a strict Content-Security-Policy: scripts and
styles from this origin only (no inline script can run, whatever text ends up in the page),
images from this origin, ``blob:`` (what the page makes of the images it fetches with the key) or
``data:``, frames only ``blob:`` (an eval run's report.html, shown sandboxed, without scripts).
``style-src`` allows inline styles because a report shown in a ``srcdoc``/``blob:`` frame inherits
this policy and report.html styles itself inline; inline styles cannot run code.
"""

from __future__ import annotations

import re
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from imagegen.serve.errors import ApiError

router = APIRouter(tags=["studio"], include_in_schema=False)

STUDIO_PREFIX = "/studio"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
#: names a shipped file may have (anything else in the directory is not served)
FILE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\.(html|js|css|svg|png)$")
CSP = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' blob: data:",
        "connect-src 'self'",
        "frame-src blob:",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def _load_files() -> dict[str, tuple[bytes, str]]:
    """Every servable file of the package's ``studio`` directory: name -> (bytes, content type)."""
    files: dict[str, tuple[bytes, str]] = {}
    for entry in resources.files("imagegen.serve").joinpath("studio").iterdir():
        name = entry.name
        if entry.is_file() and FILE_NAME_RE.match(name):
            files[name] = (entry.read_bytes(), CONTENT_TYPES[name[name.rindex(".") :]])
    if "index.html" not in files:
        raise RuntimeError("the Studio's index.html is missing from the package (imagegen/serve/studio/)")
    return files


FILES = _load_files()
#: the exact paths the edge lets through without a key (the page's own files, nothing else)
PUBLIC_STUDIO_PATHS = frozenset({STUDIO_PREFIX, f"{STUDIO_PREFIX}/"} | {f"{STUDIO_PREFIX}/{n}" for n in FILES})


def _file(name: str) -> Response:
    found = FILES.get(name)
    if found is None:
        raise ApiError(404, "not_found", "no such file in the Studio", "path")
    body, content_type = found
    return Response(body, media_type=content_type, headers=HEADERS)


@router.get(STUDIO_PREFIX)
async def studio_root() -> Response:
    """``/studio`` -> ``/studio/`` (so the page's relative URLs resolve under it)."""
    return RedirectResponse(f"{STUDIO_PREFIX}/", status_code=308, headers=HEADERS)


@router.get(f"{STUDIO_PREFIX}/")
async def studio_index() -> Response:
    """The Studio page."""
    return _file("index.html")


@router.get(STUDIO_PREFIX + "/{name}")
async def studio_file(name: str) -> Response:
    """One of the page's scripts or style sheets."""
    return _file(name)
