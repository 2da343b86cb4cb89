"""Per-request feedback tokens: who may send feedback for a request is whoever received its answer.

A token is HMAC-SHA256 of the request id the client saw (its ``x-request-id``), keyed with
``canary.feedback_secret``, truncated to 128 bits and written in unpadded URL-safe base64 (22
characters). Nothing is stored: any replica with the same secret checks any replica's token.
"""

from __future__ import annotations

import base64
import hmac
import secrets

import structlog

from ..config import Config

HEADER = "x-feedback-token"
_BYTES = 16

log = structlog.get_logger("shadow_proxy.feedback")


class FeedbackTokens:
    """Issues and checks the tokens of one secret."""

    __slots__ = ("_key",)

    def __init__(self, secret: str | bytes) -> None:
        self._key = secret.encode() if isinstance(secret, str) else secret

    def issue(self, request_id: str) -> str:
        """The token of a request id (one HMAC: cheap enough for every answered request)."""
        digest = hmac.digest(self._key, request_id.encode(), "sha256")[:_BYTES]
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def valid(self, request_id: str, token: str) -> bool:
        """True when the token was issued for this request id (compared in constant time)."""
        return hmac.compare_digest(self.issue(request_id).encode(), token.encode())


def with_feedback_secret(config: Config) -> Config:
    """The config with a feedback secret: the configured one, else a random one (with a warning).

    A random secret is drawn once, before workers are spawned, so the workers of one `serve` share
    it; another replica (or a restart) draws another, and its tokens do not verify here.
    """
    if config.canary.feedback_secret:
        return config
    log.warning(
        "feedback_secret_random",
        message="canary.feedback_secret is not set: feedback tokens verify only in this process tree and "
        "until it restarts; set it (the same value on every replica) when running several replicas",
    )
    canary = config.canary.model_copy(update={"feedback_secret": secrets.token_urlsafe(32)})
    return config.model_copy(update={"canary": canary})
