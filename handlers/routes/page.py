"""The chat page: ``static/index.html`` and its assets, served by the same app.

The page uses relative URLs only, so it works wherever the app is mounted.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

__all__ = ["SECURITY_HEADERS", "STATIC_DIR", "index"]

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
