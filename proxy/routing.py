"""Pure decisions about a request: is it sampled, is its route mirrored, may it be mirrored at all."""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

_SCALE = float(1 << 64)


def unit_hash(key: str) -> float:
    """A stable value in [0, 1) for a key, the same on every replica and every run."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


def sampled(request_id: str, rate: float) -> bool:
    """Whether a request is in the shadow sample, decided from its id so replicas agree."""
    if rate >= 1.0:
        return True
    return rate > 0.0 and unit_hash(request_id) < rate


@dataclass(frozen=True, slots=True)
class RouteTable:
    """Glob patterns (``/v1/*``, ``/v1/chat/completions``) matched against the path."""

    patterns: tuple[str, ...]
    regexes: tuple[re.Pattern[str], ...]

    @classmethod
    def compile(cls, patterns: tuple[str, ...]) -> RouteTable:
        return cls(patterns, tuple(re.compile(fnmatch.translate(p)) for p in patterns))

    def match(self, path: str) -> str | None:
        """The first pattern the path matches, used as the route label; None when none does."""
        for pattern, regex in zip(self.patterns, self.regexes, strict=True):
            if regex.match(path):
                return pattern
        return None


@dataclass(frozen=True, slots=True)
class MirrorPolicy:
    """Everything needed to decide, without I/O, whether one target wants a request mirrored."""

    routes: RouteTable
    methods: frozenset[str]
    sample_rate: float
    max_body_bytes: int

    def skip_reason(self, *, method: str, path: str, request_id: str, body_size: int) -> str | None:
        """None when the request should be mirrored, else the reason it is not (a metric label).

        Every target samples on the same hash of the request id: a target with a lower rate gets a
        subset of the requests a target with a higher rate gets, so candidates compare like for like.
        """
        if method not in self.methods or self.routes.match(path) is None:
            return "route_not_mirrored"
        if body_size > self.max_body_bytes:
            return "body_too_large"
        if not sampled(request_id, self.sample_rate):
            return "not_sampled"
        return None


def sticky_key(
    keys: tuple[str, ...], headers: Mapping[str, str], cookies: Mapping[str, str], client_ip: str, request_id: str
) -> str:
    """The first configured identity present (header:NAME, cookie:NAME, client_ip), else the request id.

    The kind is part of the key, so a user id and a cookie with the same text hash differently.
    """
    for item in keys:
        kind, _, name = item.partition(":")
        if kind == "header":
            value = headers.get(name)
        elif kind == "cookie":
            value = cookies.get(name)
        else:
            value = client_ip
        if value:
            return f"{item}={value}"
    return f"request_id={request_id}"


def serves_candidate(key: str, weight: float) -> bool:
    """Whether this user is in the candidate's share at this weight.

    Each key has a fixed point in [0, 1); raising the weight only ever adds users to the candidate,
    and every replica computes the same answer.
    """
    return weight > 0.0 and unit_hash("canary:" + key) < weight
