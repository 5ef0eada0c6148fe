"""Pages for people: the web page at ``/`` and the API docs at ``/docs`` (Swagger UI) and
``/redoc`` (ReDoc), which work offline: their scripts and styles are served by this server from
the ``fastapi-offline`` package (FastAPI's documented self-hosting), never from a CDN.

The web page needs no key (it holds no data); the docs and their assets need it when
``DPR_API_KEY`` is set, like the schema they show.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

from ..web import index_page, inline_script_hashes

DOCS, REDOC, OAUTH2_REDIRECT, ASSETS_PATH = "/docs", "/redoc", "/docs/oauth2-redirect", "/docs-assets"
ASSET_DIR = Path(str(files("fastapi_offline") / "static"))
ASSETS = {  # name -> media type: the only files served from ASSET_DIR
    "swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript", "favicon.png": "image/png",
}

router = APIRouter()


def _same_origin_only(page: HTMLResponse) -> HTMLResponse:
    """Add a Content-Security-Policy that lets the page load and connect to this server only (its
    own inline scripts by hash), so a docs bundle's one reference to another host (ReDoc's
    sidebar logo) is never requested, online or off."""
    scripts = " ".join(["'self'", inline_script_hashes(page.body.decode("utf-8"))]).strip()
    page.headers["Content-Security-Policy"] = (
        f"default-src 'self'; script-src {scripts}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return page


@router.get("/", include_in_schema=False)
async def web_page() -> HTMLResponse:
    """The web page: search and score in the browser (static, no data in it, so no key)."""
    return index_page()


def _asset(request: Request, name: str) -> str:
    return f"{request.scope.get('root_path', '')}{ASSETS_PATH}/{name}"


@router.get(DOCS, include_in_schema=False)
async def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI over ``/openapi.json``, with its script, style and icon from this server."""
    app = request.app
    return _same_origin_only(get_swagger_ui_html(
        openapi_url=f"{request.scope.get('root_path', '')}{app.openapi_url}", title=f"{app.title} - Swagger UI",
        oauth2_redirect_url=OAUTH2_REDIRECT, swagger_js_url=_asset(request, "swagger-ui-bundle.js"),
        swagger_css_url=_asset(request, "swagger-ui.css"), swagger_favicon_url=_asset(request, "favicon.png"),
        swagger_ui_parameters=app.swagger_ui_parameters))


@router.get(OAUTH2_REDIRECT, include_in_schema=False)
async def swagger_ui_redirect() -> HTMLResponse:
    """Swagger UI's OAuth2 redirect page (as FastAPI serves it by default)."""
    return get_swagger_ui_oauth2_redirect_html()


@router.get(REDOC, include_in_schema=False)
async def redoc(request: Request) -> HTMLResponse:
    """ReDoc over ``/openapi.json``, with its script and icon from this server (no web fonts)."""
    app = request.app
    return _same_origin_only(get_redoc_html(
        openapi_url=f"{request.scope.get('root_path', '')}{app.openapi_url}", title=f"{app.title} - ReDoc",
        redoc_js_url=_asset(request, "redoc.standalone.js"), redoc_favicon_url=_asset(request, "favicon.png"),
        with_google_fonts=False))


@router.get(ASSETS_PATH + "/{name}", include_in_schema=False)
async def docs_asset(name: str) -> FileResponse:
    """One of :data:`ASSETS`; any other name is 404."""
    if name not in ASSETS:
        raise HTTPException(404, f"{name}: no such docs asset")
    return FileResponse(ASSET_DIR / name, media_type=ASSETS[name], headers={"Cache-Control": "public, max-age=86400"})
