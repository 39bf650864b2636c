"""The playground: a page at ``/`` that drives the public API from a browser (``static/playground/``).

The page itself needs no key (it holds nothing private); the API calls it makes send the key the user
types, kept in the tab's sessionStorage. Plain files, no build step: index.html, playground.css and
one ES module. They are left out of the OpenAPI document, which describes the API, not its pages.
"""

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from ..errors import APIError

STATIC = Path(__file__).resolve().parents[1] / "static" / "playground"
# Served by name from this list only: nothing else in the package is reachable through the path.
ASSETS = {"playground.css": "text/css; charset=utf-8", "playground.js": "text/javascript; charset=utf-8"}

# Everything the page loads comes from this server: its own files, the API, and images as data: URLs.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on each load (ETag / Last-Modified), so an upgraded server never runs an old script.
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def _file(name: str) -> str:
    return str(STATIC / name)


@router.api_route("/", methods=["GET", "HEAD"])
async def playground() -> FileResponse:
    return FileResponse(_file("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.api_route("/static/playground/{name}", methods=["GET", "HEAD"])
async def playground_asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise APIError(404, "not_found", f"no playground file {name!r}")
    return FileResponse(_file(name), media_type=media_type, headers=HEADERS)
