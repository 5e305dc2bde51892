"""GET /: the playground, one static page (arcdiff/service/static/) that calls the API from the browser.

The page and its assets need no API key (they are static and hold no data); the API calls the
page makes send the key the user enters. Nothing is loaded from other hosts, and the Content-
Security-Policy says so.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Response

STATIC = Path(__file__).resolve().parents[2] / "static"
ASSETS = {  # the only files served: name -> media type
    "playground.css": "text/css; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
}
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["playground"], include_in_schema=False)


def _read(name: str) -> bytes:
    try:
        return (STATIC / name).read_bytes()
    except FileNotFoundError:
        raise HTTPException(404, f"{name} is missing from this installation") from None


@router.get("/")
async def playground() -> Response:
    return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/static/{name}")
async def asset(name: str) -> Response:
    if name not in ASSETS:
        raise HTTPException(404, f"no static file {name!r}")
    return Response(_read(name), media_type=ASSETS[name], headers=HEADERS)
