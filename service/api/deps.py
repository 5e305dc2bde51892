"""Dependencies shared by the routes, as Annotated aliases."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from service.backend import Backend
from service.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_backend(request: Request) -> Backend:
    return request.app.state.backend


SettingsDep = Annotated[Settings, Depends(get_settings)]
BackendDep = Annotated[Backend, Depends(get_backend)]


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """With ARCDIFF_API_KEYS set, /v1 needs 'Authorization: Bearer KEY' (or 'X-API-Key: KEY')."""
    if not settings.api_keys:
        return
    header = request.headers.get("authorization", "")
    key = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not any(secrets.compare_digest(key.encode(), k.encode()) for k in settings.api_keys):
        from service.metrics import REJECTED

        if request.method == "POST":
            REJECTED.labels("unauthorized").inc()
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"}
        )
