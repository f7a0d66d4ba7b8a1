"""What every request passes before a route sees it: the bearer key (compared in constant time) and the body size
limit, enforced while the body is read; and the OpenAI error shape every refusal is answered in."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

# Routes anyone may call: liveness, and the static web page (it holds no data; its API calls carry the key).
OPEN_PATHS = ("/health", "/", "/favicon.ico")
OPEN_PREFIXES = ("/static/",)
# Bytes of a refused body read and dropped before answering, so that the client, still sending, reads the answer
# instead of a reset connection; a larger body is cut off with the connection.
DRAIN_LIMIT = 64 * 1024 * 1024


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class BodyTooLarge(Exception):
    """Raised from the receive channel when the body passes the limit while it is read."""


class Guard:
    """ASGI middleware: 401 without the bearer key (except ``OPEN_PATHS``); 413 for a body whose Content-Length is
    over ``max_body`` bytes, and ``BodyTooLarge`` from ``receive`` when a body without one grows past it.

    Args:
        app: the ASGI app behind it.
        api_key: the key, or None for none.
        max_body: the most bytes a request body may have.
        on_refused: called with the status of each refusal (for the metrics).
    """

    def __init__(self, app: Any, api_key: str | None, max_body: int, on_refused: Callable[[int], None]):
        self.app, self.max_body, self.on_refused = app, max_body, on_refused
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        if self.api_key is not None and not _open(path) and not self._authorized(headers.get("authorization")):
            await drain(receive)
            await self._refuse(send, 401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                               "invalid_api_key", {"www-authenticate": "Bearer"})  # fmt: skip
            return
        length = headers.get("content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            await drain(receive)
            await self._refuse(send, 413, f"the request body has {int(length):,} bytes, over this server's limit "
                               f"of {self.max_body:,}: upload a smaller image", "request_too_large")  # fmt: skip
            return
        seen, raised = 0, False

        async def counted() -> dict:
            nonlocal seen, raised
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body and not raised:  # once: the route may then drain the rest
                raised = True
                raise BodyTooLarge(seen)
            return message

        await self.app(scope, counted, send)

    def _authorized(self, header: bytes | None) -> bool:
        scheme, _, token = (header or b"").partition(b" ")
        # compare_digest on equal-length inputs is constant-time; any length mismatch is simply False.
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    async def _refuse(self, send: Callable, status: int, message: str, code: str, extra: dict | None = None) -> None:
        self.on_refused(status)
        body = json.dumps(error_body(message, status, None, code)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def drain(receive: Callable) -> None:
    """Read and drop the rest of a request body (``DRAIN_LIMIT`` bytes at most)."""
    read = 0
    while read <= DRAIN_LIMIT:
        message = await receive()
        read += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body"):
            return


def _open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)
