"""/docs and /redoc work offline: their pages name only this server's own files (no CDN), which answer with
JavaScript, CSS and an icon; like /openapi.json they need no token."""

from __future__ import annotations

import re

import pytest
from starlette.testclient import TestClient

from server.api.app import create_app
from server.config import Settings

CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


@pytest.fixture(scope="module")
def client():
    # The pages need no model: the app is not started (no lifespan), and tokens are set to show they are open.
    with_tokens = Settings(api_token="docs-api-token", admin_token="docs-admin-token")
    return TestClient(create_app(with_tokens))


@pytest.mark.parametrize(("page", "needs"), [("/docs", {".js", ".css", ".png"}), ("/redoc", {".js", ".png"})])
def test_the_docs_pages_load_only_local_assets(client, page, needs):
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = re.findall(r"""(?:src|href|spec-url)=["']([^"']+)["']|url: ?'([^']+)'""", r.text)
    urls = [a or b for a, b in urls]
    assert "/openapi.json" in urls
    assert not [u for u in urls if not u.startswith("/") or u.startswith("//")], urls  # nothing from elsewhere
    assert "cdn" not in r.text.lower() and "fonts.googleapis" not in r.text
    assets = [u for u in urls if u != "/openapi.json"]
    assert {u[u.rindex("."):] for u in assets} == needs
    for url in assets:
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert asset.headers["content-type"].startswith(CONTENT_TYPES[url[url.rindex("."):]]), url
        assert len(asset.content) > 100, url


def test_the_swagger_page_runs_swagger_ui_5_for_openapi_3_1(client):
    # Swagger UI 4 cannot render FastAPI's OpenAPI 3.1 documents: the packaged bundle must be version 5.
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
    bundle = client.get("/docs/static/swagger-ui-bundle.js").text
    assert re.search(r'PACKAGE_VERSION:"5\.\d+\.\d+"', bundle)


def test_a_proxy_prefix_is_kept_in_the_asset_urls():
    prefixed = TestClient(create_app(Settings()), root_path="/promptswap")
    page = prefixed.get("/docs").text
    assert 'src="/promptswap/docs/static/swagger-ui-bundle.js"' in page and "url: '/promptswap/openapi.json'" in page
