"""The dashboard of the admin listener: ``GET /`` and its assets, shipped inside the package.

The page polls ``api/report`` and ``api/canary`` and draws them with uPlot 1.6.32 (MIT, vendored from
npm: ``dist/uPlot.iife.min.js`` and ``dist/uPlot.min.css``, licence in ``static/uPlot.LICENSE``). It makes
no request outside the admin listener, so it works on a host without internet access.

Assets are served from a fixed allow-list read once from the package through importlib.resources (so
they also load from a zip or wheel); a request's file name is only ever a key into that list, never
part of a path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

import orjson
from aiohttp import web

PAGE = "dashboard.html"

# Every file /static/ serves, with its Content-Type. Anything else is 404.
ASSETS: dict[str, str] = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
    "uPlot.LICENSE": "text/plain; charset=utf-8",
}

# The page loads scripts, styles and data from its own origin only; inline script is refused.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True, slots=True)
class Asset:
    """One file of the dashboard, read from the package."""

    body: bytes
    content_type: str
    etag: str


@cache
def assets() -> dict[str, Asset]:
    """The page and every allowed asset, keyed by file name (read once per process)."""
    static = files("proxy").joinpath("static")
    out = {}
    for name, content_type in {PAGE: "text/html; charset=utf-8", **ASSETS}.items():
        body = static.joinpath(name).read_bytes()
        out[name] = Asset(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:20] + '"')
    return out


def _fresh(request: web.Request, etag: str) -> bool:
    """True when the client's If-None-Match already names this version."""
    header = request.headers.get("If-None-Match", "")
    return header.strip() == "*" or etag in {tag.strip().removeprefix("W/") for tag in header.split(",")}


def _serve(request: web.Request, asset: Asset, extra: dict[str, str] | None = None) -> web.Response:
    # no-cache: the browser revalidates with the ETag, so an upgraded proxy never serves stale assets.
    headers = {"ETag": asset.etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", **(extra or {})}
    if _fresh(request, asset.etag):
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, headers={**headers, "Content-Type": asset.content_type})


async def page(request: web.Request) -> web.Response:
    """The dashboard page."""
    security = {
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
    }
    return _serve(request, assets()[PAGE], security)


async def static(request: web.Request) -> web.Response:
    """One allow-listed asset by exact name; any other name (paths, dot-dot, the page itself) is 404."""
    name = request.match_info["name"]
    if name not in ASSETS:
        error = {"error": {"message": "no such dashboard asset", "type": "not_found"}}
        return web.Response(body=orjson.dumps(error), status=404, content_type="application/json")
    return _serve(request, assets()[name])


def add_routes(app: web.Application) -> None:
    """Registers ``GET /`` (the page) and ``GET /static/{name}`` (its assets) on the admin app."""
    assets()  # a missing file is a packaging bug: fail when the app is built, not on the first visit
    app.router.add_get("/", page)
    app.router.add_get("/static/{name}", static)
