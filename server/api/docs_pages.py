"""The interactive API docs, /docs (Swagger UI) and /redoc (ReDoc), with every asset served by this server.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, so they render blank on a machine without internet
access. The fastapi-offline package (the `serve` extra) ships the Swagger UI bundle and stylesheet, ReDoc's
standalone bundle and a favicon; they are served at ASSETS_URL/{name} and the pages point there. The pages stay as
public as FastAPI's: no API key is needed to read the docs or /openapi.json.
"""

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, Response

ASSETS_URL = "/docs/assets"
SWAGGER_JS, SWAGGER_CSS = "swagger-ui-bundle.js", "swagger-ui.css"
REDOC_JS, FAVICON = "redoc.standalone.js", "favicon.png"
ASSETS = (SWAGGER_JS, SWAGGER_CSS, REDOC_JS, FAVICON)
# Swagger UI's validator badge would send the spec's URL to validator.swagger.io from every reader's browser.
SWAGGER_UI_PARAMETERS = {"validatorUrl": None}
# The pages may load nothing from another origin: ReDoc's menu footer, for one, always asks cdn.redoc.ly for a logo
# (it hides the image when that fails). Inline scripts and styles are the pages' own (FastAPI's HTML, Swagger UI
# and ReDoc's styling); images of API responses in Swagger UI are blob: URLs; ReDoc's search runs in a blob: worker.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    "base-uri 'self'; form-action 'self'"
)


def assets_dir() -> Path:
    """The folder of bundled assets; a package update that moved one fails here, at start-up, not in a browser."""
    try:
        directory = Path(str(files("fastapi_offline") / "static"))
    except ModuleNotFoundError as e:
        raise RuntimeError("the API docs need the fastapi-offline package: pip install 'snapgen[api]'") from e
    missing = [name for name in ASSETS if not (directory / name).is_file()]
    if missing:
        raise RuntimeError(f"fastapi-offline has no {', '.join(missing)} in {directory}: reinstall 'snapgen[api]'")
    return directory


def install(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Serve Swagger UI at ``docs_url`` and ReDoc at ``redoc_url``; ``app`` must be made with both set to None."""
    if app.docs_url is not None or app.redoc_url is not None:
        raise ValueError("create the app with docs_url=None and redoc_url=None: FastAPI's own pages use a CDN")
    if app.openapi_url is None:
        return
    openapi_url, oauth2_redirect_url = app.openapi_url, app.swagger_ui_oauth2_redirect_url
    static = StaticFiles(directory=assets_dir())

    def asset(request: Request, name: str) -> str:
        return f"{root_path(request)}{ASSETS_URL}/{name}"

    # Plain routes, as FastAPI registers its own docs pages: they answer GET and HEAD and stay out of the schema.
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = root_path(request)
        return same_origin_only(
            get_swagger_ui_html(
                openapi_url=root + openapi_url,
                title=f"{app.title} - Swagger UI",
                swagger_js_url=asset(request, SWAGGER_JS),
                swagger_css_url=asset(request, SWAGGER_CSS),
                swagger_favicon_url=asset(request, FAVICON),
                oauth2_redirect_url=root + oauth2_redirect_url if oauth2_redirect_url else None,
                init_oauth=app.swagger_ui_init_oauth,
                swagger_ui_parameters={**SWAGGER_UI_PARAMETERS, **(app.swagger_ui_parameters or {})},
            )
        )

    # A route with GET and HEAD rather than a mount, which would match every method: a POST then gets a 405
    # whose Allow says GET, HEAD; only the four files are served; StaticFiles adds ETag and 304s.
    async def asset_file(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:
            raise HTTPException(404)
        return await static.get_response(name, request.scope)

    async def swagger_ui_redirect(request: Request) -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    async def redoc(request: Request) -> HTMLResponse:
        return same_origin_only(
            get_redoc_html(
                openapi_url=root_path(request) + openapi_url,
                title=f"{app.title} - ReDoc",
                redoc_js_url=asset(request, REDOC_JS),
                redoc_favicon_url=asset(request, FAVICON),
                with_google_fonts=False,
            )
        )

    app.add_route(ASSETS_URL + "/{name}", asset_file, include_in_schema=False)
    app.add_route(docs_url, swagger_ui, include_in_schema=False)
    if oauth2_redirect_url:
        app.add_route(oauth2_redirect_url, swagger_ui_redirect, include_in_schema=False)
    app.add_route(redoc_url, redoc, include_in_schema=False)


def same_origin_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return page


def root_path(request: Request) -> str:
    """The prefix a proxy serves the app under (uvicorn --root-path), so links work behind it."""
    return request.scope.get("root_path", "").rstrip("/")
