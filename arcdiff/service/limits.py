"""Request-body guard (pure ASGI): a size limit (413) and JSON-only bodies (415).

Runs before routing and before any body is parsed: a Content-Length over the limit is refused
without reading the body; a chunked body is counted as it arrives and refused once it passes the
limit (bodies are small: the app gets the buffered body). A POST/PUT/PATCH with a body must say
`Content-Type: application/json` (or `...+json`).
"""

from __future__ import annotations

import json
from typing import Any

_BODY_METHODS = {b"POST", b"PUT", b"PATCH", "POST", "PUT", "PATCH"}


async def _send_error(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"message": detail, "detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class BodyLimitMiddleware:
    def __init__(self, app: Any, max_body_bytes: int):
        self.app = app
        self.max = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        length = headers.get(b"content-length")
        too_large = f"request body larger than {self.max} bytes"
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _send_error(send, 400, "Content-Length is not a number")
                return
            if declared > self.max:
                await _send_error(send, 413, too_large)
                return
        has_body = (length is None and b"transfer-encoding" in headers) or (length is not None and int(length) > 0)
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        if has_body and not _is_json(content_type):
            await _send_error(
                send,
                415,
                f"the body must be JSON (Content-Type: application/json), got {content_type or 'no Content-Type'!r}",
            )
            return

        # read the whole (bounded) body first, then replay it to the app
        chunks, received, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max:
                await _send_error(send, 413, too_large)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
