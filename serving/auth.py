"""Who may call the backend, and how much they may send.

Both checks are ASGI middleware so they run before any route reads the body, and so they cover every
route, ``/health`` and the OpenAPI docs included: Label Studio's "connect model" dialog sends the same
HTTP Basic credentials on every call, health checks too, so nothing needs to stay open.

- Credentials: HTTP Basic (what Label Studio can send) when ``basic_user``/``basic_password`` are set,
  ``Authorization: Bearer <api_token>`` (for scripts) when ``api_token`` is set; either one passes.
  Secrets are compared with :func:`secrets.compare_digest`.
- A refused ``POST /webhook`` says why in words a Label Studio admin can act on: connecting the backend
  in Label Studio's UI makes the project webhook without the credentials, so every annotation event is
  refused, Label Studio does not retry, and labels wait for the reconciler. Each such refusal is logged.
- Webhook secret: with ``webhook_secret`` set, ``POST /webhook`` must also carry it in the
  ``X-Labelloop-Webhook-Secret`` header (Label Studio webhooks send custom headers; ``labelloop connect``
  sets it). Anyone holding the backend's basic-auth credentials (every annotator's Label Studio does, to
  call ``/predict``) could otherwise write labels into the journal; the secret limits that to Label Studio's
  webhook. A refusal is a 401 before the body is read, so nothing is journaled.
- Size: ``Content-Length`` above ``max_request_bytes`` is refused at once with 413; a body without a
  length (chunked) is read up to the limit and refused as soon as it passes it, so an oversized body is
  never held in memory.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
from urllib.parse import parse_qsl

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from labelloop.config import Settings

REALM = "labelloop"
WEBHOOK_PATH = "/webhook"
WEBHOOK_SECRET_HEADER = "X-Labelloop-Webhook-Secret"
log = logging.getLogger("labelloop.auth")


class AuthConfigError(ValueError):
    pass


class Credentials:
    """The configured secrets; ``enabled`` is False when none are set (open backend, for local use)."""

    def __init__(self, settings: Settings):
        user = settings.basic_user
        password = settings.basic_password.get_secret_value() if settings.basic_password else None
        if bool(user) != bool(password):
            raise AuthConfigError("set both basic_user and basic_password, or neither")
        self.basic = (user.encode(), password.encode()) if user and password else None
        token = settings.api_token.get_secret_value() if settings.api_token else None
        self.token = token.encode() if token else None
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
        self.webhook_secret = secret.encode() if secret else None

    @property
    def enabled(self) -> bool:
        return self.basic is not None or self.token is not None

    def challenges(self) -> list[str]:
        out = []
        if self.basic:
            out.append(f'Basic realm="{REALM}", charset="UTF-8"')
        if self.token:
            out.append(f'Bearer realm="{REALM}"')
        return out

    def accepts(self, authorization: bytes | None) -> bool:
        if not self.enabled:
            return True
        if not authorization:
            return False
        scheme, _, value = authorization.strip().partition(b" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == b"basic" and self.basic:
            try:
                user, sep, password = base64.b64decode(value, validate=True).partition(b":")
            except (binascii.Error, ValueError):
                return False
            user_ok = secrets.compare_digest(user, self.basic[0])
            password_ok = secrets.compare_digest(password, self.basic[1])
            return bool(sep) and user_ok and password_ok
        if scheme == b"bearer" and self.token:
            return secrets.compare_digest(value, self.token)
        return False


async def _send_json(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def accepts_webhook_secret(expected: bytes | None, sent: bytes | None) -> bool:
    """Whether a webhook's secret header passes (always, when no secret is configured)."""
    if expected is None:
        return True
    return sent is not None and secrets.compare_digest(sent.strip(), expected)


def _is_webhook(scope: Scope) -> bool:
    return scope.get("method") == "POST" and scope.get("path", "").rstrip("/") == WEBHOOK_PATH


class AuthMiddleware:
    def __init__(self, app: ASGIApp, credentials: Credentials):
        self.app = app
        self.credentials = credentials

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization")
        challenges = [(b"www-authenticate", c.encode()) for c in self.credentials.challenges()]
        if not self.credentials.accepts(authorization):
            await _send_json(send, 401, _refusal(scope, authorization), challenges)
            return
        if _is_webhook(scope):
            sent = headers.get(WEBHOOK_SECRET_HEADER.lower().encode())
            if not accepts_webhook_secret(self.credentials.webhook_secret, sent):
                await _send_json(send, 401, _secret_refusal(sent), challenges)
                return
        await self.app(scope, receive, send)


def _secret_refusal(sent: bytes | None) -> str:
    what = "carries a wrong" if sent is not None else "has no"
    detail = (f"this webhook {what} {WEBHOOK_SECRET_HEADER} header, which the backend requires (webhook_secret): "
              "run `labelloop connect` with the backend's webhook_secret")
    log.warning("refused a webhook (nothing journaled; labels wait for the reconciler): %s", detail)
    return detail


def _refusal(scope: Scope, authorization: bytes | None) -> str:
    """The 401's detail; for Label Studio's webhook, the fix (its events are not retried, so say it loudly)."""
    if not _is_webhook(scope):
        return "authentication required: HTTP Basic or Bearer token"
    if authorization:
        detail = ("Label Studio's webhook sends credentials this backend refuses: run `labelloop connect` "
                  "with the backend's basic_user/basic_password")
    else:
        detail = "Label Studio's webhook has no credentials: run `labelloop connect`"
    log.warning("refused a webhook (labels wait for the reconciler): %s", detail)
    return detail


class BodyTooLarge(HTTPException):
    """An HTTPException so FastAPI's body parser re-raises it as the 413 it is (not a generic 400)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the {limit}-byte limit (max_request_bytes)")


class SingleValuedQueryMiddleware:
    """400 for a query parameter given more than once. No route takes a list in its query, and the
    framework would silently keep one of the values, so ``?project_id=1&project_id=2`` must not pass as
    either; the schema promises one value."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("query_string"):
            keys = [key for key, _ in parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)]
            repeated = sorted({key for key in keys if keys.count(key) > 1})
            if repeated:
                await _send_json(send, 400, f"query parameter(s) given more than once: {', '.join(repeated)}")
                return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _send_json(send, 400, "invalid Content-Length header")
                return
            if declared > limit:
                await _send_json(send, 413, BodyTooLarge(limit).detail)
                return
        received = 0
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge as e:
            if response_started:
                raise
            await _send_json(send, 413, e.detail)
