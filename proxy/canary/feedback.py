"""``POST /_shadow/feedback``: a user's score or label for a request, joined to the arm that served it.

Only whoever received the answer may score it: the body (``"token"``) or the ``x-feedback-token``
header carries the token the proxy returned with the answer (see tokens.py); without it, 403.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from ..forwarding import read_body
from ..redis import FEEDBACK_DUPLICATE, FEEDBACK_UNKNOWN, StoreUnavailable
from . import tokens

if TYPE_CHECKING:
    from ..wiring import Runtime

MAX_BODY = 16 * 1024
_LABEL = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _error(status: int, kind: str, message: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "code": status}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def parse(body: bytes) -> tuple[str | None, float | None, str | None, str | None]:
    """Validate ``{token, score}`` or ``{token, label}`` (``request_id`` optional, echoed back; the token
    may come in a header instead); ValueError says what is wrong."""
    try:
        data: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ValueError('body must be JSON: {"token": ..., "score": 0..1} or {"token": ..., "label": ...}') from None
    if not isinstance(data, dict):
        raise ValueError("body must be a JSON object")
    unknown = set(data) - {"request_id", "score", "label", "token"}
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
    request_id = data.get("request_id")
    if request_id is not None and (not isinstance(request_id, str) or not 0 < len(request_id) <= 200):
        raise ValueError("request_id, when given, must be a non-empty string (the x-request-id of the answer)")
    score, label = data.get("score"), data.get("label")
    if (score is None) == (label is None):
        raise ValueError("give exactly one of score (a number from 0 to 1) or label")
    if score is not None and (isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 1):
        raise ValueError("score must be a number from 0 to 1")
    if label is not None and (not isinstance(label, str) or not _LABEL.match(label)):
        raise ValueError("label must be 1-64 characters of letters, digits, _ . -")
    token = data.get("token")
    if token is not None and not isinstance(token, str):
        raise ValueError(f"token must be the string the answer's {tokens.HEADER} header gave")
    return request_id, None if score is None else float(score), label, token


class Feedback:
    """The feedback endpoint of the main listener."""

    def __init__(self, runtime: Runtime) -> None:
        assert runtime.canary is not None
        self._store = runtime.canary.store
        self._metrics = runtime.metrics
        self._ttl = runtime.config.canary.feedback_ttl
        self._window = runtime.config.compare.window_seconds
        assert runtime.forwarder.feedback_tokens is not None
        self._tokens = runtime.forwarder.feedback_tokens

    async def handle(self, request: web.Request) -> web.Response:
        # Whole, however many TCP segments it arrives in; bounded before and while reading.
        body = await read_body(request, MAX_BODY)
        if body is None:
            self._metrics.feedback.labels("-", "too_large").inc()
            return _error(413, "request_too_large", f"feedback bodies are at most {MAX_BODY} bytes")
        try:
            request_id, score, label, token = parse(body)
        except ValueError as exc:
            self._metrics.feedback.labels("-", "invalid").inc()
            return _error(400, "invalid_feedback", str(exc))
        record_id = self._record_of(token or request.headers.get(tokens.HEADER))
        if isinstance(record_id, web.Response):
            return record_id
        request_id = request_id or record_id
        window = int(time.time() // self._window) * self._window
        try:
            code, arm = await self._store.add_feedback(
                record_id, score=score, label=label, window=window, ttl=self._ttl
            )
        except StoreUnavailable as exc:
            return _error(503, "redis_unavailable", f"feedback could not be stored: {exc}")
        if code == FEEDBACK_UNKNOWN:
            self._metrics.feedback.labels("-", "unknown_request").inc()
            return _error(404, "unknown_request", f"no served request {request_id!r} is known (or it expired)")
        if code == FEEDBACK_DUPLICATE:
            self._metrics.feedback.labels(arm, "duplicate").inc()
            return _error(409, "duplicate_feedback", f"request {request_id!r} already has feedback")
        self._metrics.feedback.labels(arm, "stored").inc()
        return web.Response(body=orjson.dumps({"request_id": request_id, "arm": arm}), content_type="application/json")

    def _record_of(self, token: str | None) -> str | web.Response:
        """The record id the token was issued for; 403 when there is none or it was not issued here."""
        if not token:
            self._metrics.feedback.labels("-", "token_missing").inc()
            message = f'send the token the answer\'s {tokens.HEADER} header gave, as "token" or in that header'
            return _error(403, "feedback_token_missing", message)
        record_id = self._tokens.record_of(token)
        if record_id is None:
            self._metrics.feedback.labels("-", "token_invalid").inc()
            return _error(403, "feedback_token_invalid", "the token was not issued by this deployment")
        return record_id
