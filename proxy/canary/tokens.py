"""Per-request feedback tokens: who may send feedback for a request is whoever received its answer.

A token names the proxy's own record id of the request (random, never chosen by the client) and
proves it: ``<record id>.<mac>``, the mac being HMAC-SHA256 of the record id keyed with
``canary.feedback_secret``, truncated to 128 bits, in unpadded URL-safe base64 (22 characters).
Feedback is joined on that record id, so a client that reuses another user's ``x-request-id`` gets a
token for its own request only. Nothing is stored: any replica with the same secret checks any
replica's token.
"""

from __future__ import annotations

import base64
import hmac
import secrets

import structlog
from pydantic import SecretStr

from ..config import Config

HEADER = "x-feedback-token"
_BYTES = 16

log = structlog.get_logger("shadow_proxy.feedback")


class FeedbackTokens:
    """Issues and checks the tokens of one secret."""

    __slots__ = ("_key",)

    def __init__(self, secret: str | bytes) -> None:
        self._key = secret.encode() if isinstance(secret, str) else secret

    def issue(self, record_id: str) -> str:
        """The token of a record id (one HMAC: cheap enough for every answered request)."""
        return f"{record_id}.{self._mac(record_id)}"

    def _mac(self, record_id: str) -> str:
        digest = hmac.digest(self._key, record_id.encode(), "sha256")[:_BYTES]
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def record_of(self, token: str) -> str | None:
        """The record id a token was issued for, or None when it was not issued with this secret."""
        record_id, dot, mac = token.rpartition(".")
        if not dot or not record_id or len(token) > 300:
            return None
        return record_id if hmac.compare_digest(self._mac(record_id).encode(), mac.encode()) else None


def with_feedback_secret(config: Config) -> Config:
    """The config with a feedback secret: the configured one, else a random one (with a warning).

    A random secret is drawn once, before workers are spawned, so the workers of one `serve` share
    it; another replica (or a restart) draws another, and its tokens do not verify here.
    """
    if config.canary.feedback_secret.get_secret_value():
        return config
    log.warning(
        "feedback_secret_random",
        message="canary.feedback_secret is not set: feedback tokens verify only in this process tree and "
        "until it restarts; set it (the same value on every replica) when running several replicas",
    )
    canary = config.canary.model_copy(update={"feedback_secret": SecretStr(secrets.token_urlsafe(32))})
    return config.model_copy(update={"canary": canary})
