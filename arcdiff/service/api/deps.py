"""Dependencies shared by the routes, as Annotated aliases."""

from __future__ import annotations

import hashlib
import secrets
from typing import Annotated, NoReturn

from fastapi import Depends, HTTPException, Request, status

from arcdiff.contract import GenerationSpec
from arcdiff.service.backend import Backend
from arcdiff.service.settings import ApiSettings


def get_settings(request: Request) -> ApiSettings:
    return request.app.state.settings


def get_backend(request: Request) -> Backend:
    return request.app.state.backend


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
BackendDep = Annotated[Backend, Depends(get_backend)]


def key_digests(keys: list[str]) -> list[bytes]:
    """The configured keys as SHA-256 digests: 'sha256:<hex>' entries as given, plain ones hashed.

    Only digests are kept in memory and compared, so a hashed configuration never holds a key."""
    out = []
    for key in keys:
        if key.lower().startswith("sha256:"):
            out.append(bytes.fromhex(key[7:]))
        else:
            out.append(hashlib.sha256(key.encode()).digest())
    return out


def presented_key(request: Request) -> str:
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.headers.get("x-api-key", "").strip()


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """With ARCDIFF_API_KEYS set: 401 without a key, 403 with one that matches none.

    Keys come as 'Authorization: Bearer KEY' (or 'X-API-Key: KEY'); the SHA-256 of the key is
    compared with every configured digest in constant time (no early exit on a match). The
    matching digest names the caller for the per-key rate limit (request.state.client_id)."""
    digests: list[bytes] = request.app.state.key_digests
    if not digests:
        request.state.client_id = "addr:" + (request.client.host if request.client else "unknown")
        return
    key = presented_key(request)
    if not key:
        _reject(request, status.HTTP_401_UNAUTHORIZED, "an API key is required: 'Authorization: Bearer KEY'")
    given = hashlib.sha256(key.encode()).digest()
    matched = None
    for d in digests:
        if secrets.compare_digest(given, d):
            matched = d
    if matched is None:
        _reject(request, status.HTTP_403_FORBIDDEN, "the API key is not valid")
    request.state.client_id = "key:" + matched.hex()[:16]


def keys_configured(request: Request) -> bool:
    return bool(request.app.state.key_digests)


def owns(request: Request, spec: GenerationSpec) -> bool:
    """With keys set, a generation belongs to the key that made it: its spec's `client` (a short
    hash of that key, never the key) is the caller's. Without keys every caller owns everything."""
    if not keys_configured(request):
        return True
    return bool(spec.client) and spec.client == getattr(request.state, "client_id", None)


def idempotency_scope(request: Request) -> str:
    """Whose Idempotency-Keys a request's is among: its API key's (by hash); one scope without keys."""
    return request.state.client_id if keys_configured(request) else ""


def _reject(request: Request, code: int, message: str) -> NoReturn:
    from arcdiff.service.metrics import REJECTED

    if request.method == "POST":
        REJECTED.labels("unauthorized").inc()
    raise HTTPException(code, message, headers={"WWW-Authenticate": "Bearer"})
