"""The interactive API documentation, /docs (Swagger UI) and /redoc, from files this server serves itself.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, so on a machine without internet they are
blank. The fastapi-offline package ships those files (Swagger UI 5, which renders OpenAPI 3.1, and
ReDoc's standalone bundle); they are mounted under /docs/static. Neither page asks anything of another
host: Swagger UI's validator badge is off, and ReDoc's bundle, which loads its vendor's logo from a CDN in
every page's menu, is served from memory with that image made an inline one (/docs/redoc.js). Like
/openapi.json, the pages and their files are open: no token (server/api/auth.py).
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

STATIC_URL = "/docs/static"


REDOC_URL = "/docs/redoc.js"
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
BLANK_IMAGE = "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg'/%3E"


def install_docs(app: FastAPI) -> None:
    """/docs, /redoc and their static files; create the app with docs_url=None and redoc_url=None."""
    static = files("fastapi_offline") / "static"
    redoc_bundle = (static / "redoc.standalone.js").read_bytes().replace(REDOC_LOGO.encode(), BLANK_IMAGE.encode())

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc_js() -> Response:
        return Response(redoc_bundle, media_type="text/javascript", headers={"Cache-Control": "max-age=3600"})

    app.mount(STATIC_URL, StaticFiles(directory=str(static)), name="docs-static")

    def assets(request: Request) -> tuple[str, str]:
        # Behind a proxy that strips a prefix (--root-path), the browser asks for the prefixed URLs.
        root = request.scope.get("root_path", "")
        return root + STATIC_URL, root + (app.openapi_url or "/openapi.json")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        static_url, openapi_url = assets(request)
        return get_swagger_ui_html(openapi_url=openapi_url, title=f"{app.title} - Swagger UI",
                                   swagger_js_url=f"{static_url}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{static_url}/swagger-ui.css",
                                   swagger_favicon_url=f"{static_url}/favicon.png",
                                   # No validator badge: Swagger UI would send the document to swagger.io's.
                                   swagger_ui_parameters={**(app.swagger_ui_parameters or {}), "validatorUrl": None})

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        static_url, openapi_url = assets(request)
        root = request.scope.get("root_path", "")
        return get_redoc_html(openapi_url=openapi_url, title=f"{app.title} - ReDoc", redoc_js_url=root + REDOC_URL,
                              redoc_favicon_url=f"{static_url}/favicon.png", with_google_fonts=False)
