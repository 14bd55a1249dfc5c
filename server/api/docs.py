"""The interactive API documentation, /docs (Swagger UI) and /redoc, from files this server serves itself.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, so on a machine without internet they are
blank. The fastapi-offline package ships those files (Swagger UI 5, which renders OpenAPI 3.1, and
ReDoc's standalone bundle); they are mounted under /docs/static. Like /openapi.json, the pages and
their files are open: no token (server/api/auth.py).
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_URL = "/docs/static"


def install_docs(app: FastAPI) -> None:
    """/docs, /redoc and their static files; create the app with docs_url=None and redoc_url=None."""
    static = files("fastapi_offline") / "static"
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
                                   swagger_ui_parameters=app.swagger_ui_parameters)

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        static_url, openapi_url = assets(request)
        return get_redoc_html(openapi_url=openapi_url, title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{static_url}/redoc.standalone.js",
                              redoc_favicon_url=f"{static_url}/favicon.png", with_google_fonts=False)
