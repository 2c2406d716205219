"""The chat page: ``static/index.html`` and its assets, served by the same app.

The page uses relative URLs only, so it works wherever the app is mounted.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

__all__ = ["SECURITY_HEADERS", "STATIC_DIR", "asset", "index"]

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"

SECURITY_HEADERS = {
    # No inline script anywhere: model output that slips into the DOM cannot run.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


async def index(request: web.Request) -> web.FileResponse:
    """``GET /``: the page itself."""
    return web.FileResponse(STATIC_DIR / "index.html", headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})


async def asset(request: web.Request) -> web.FileResponse:
    """``GET /static/{path}``: a file of ``static/``, never one outside it.

    A missing one is the JSON 404 every route gives (aiohttp's own static
    route answers it with an empty body).
    """
    try:
        path = (STATIC_DIR / request.match_info["path"]).resolve()
        found = path.is_relative_to(STATIC_DIR) and path.is_file()
    except (OSError, ValueError):  # a name the file system cannot take (a NUL byte, too long)
        found = False
    if not found:
        raise web.HTTPNotFound()
    return web.FileResponse(path)
