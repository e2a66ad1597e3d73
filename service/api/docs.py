"""`/docs`: Swagger UI served from the files of the `swagger-ui-py` package (Swagger UI 5, which reads the OpenAPI
3.1 schema FastAPI writes), so it works offline: FastAPI's default page loads its script and style from a CDN and
is blank without internet. ReDoc is not offered: it would need a CDN too."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

ASSETS_DIR = files("swagger_ui") / "static"
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}
"""The files the page loads (name -> media type); nothing else in the package is served."""

router = APIRouter(include_in_schema=False)


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=request.app.openapi_url,
        title=f"{request.app.title} - API docs",
        swagger_js_url=str(request.url_for("swagger_asset", name="swagger-ui-bundle.js").path),
        swagger_css_url=str(request.url_for("swagger_asset", name="swagger-ui.css").path),
        swagger_favicon_url=str(request.url_for("swagger_asset", name="favicon-32x32.png").path),
        # Swagger UI otherwise asks validator.swagger.io to check the schema (an outside request, a badge).
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.get("/docs/assets/{name}", name="swagger_asset")
async def swagger_asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise HTTPException(404, f"no docs asset {name!r}")
    return FileResponse(ASSETS_DIR / name, media_type=ASSETS[name])
