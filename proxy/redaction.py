"""Secrets never reach Redis: headers, query parameters and JSON body fields are masked here.

Runs in the recorder's writer task, never on the live path.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_plus

import orjson

from .config import RecordConfig

# Always masked, whatever the configuration says.
ALWAYS_REDACTED_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key"}
)


class Redactor:
    """Masks configured secrets in headers, query strings and JSON bodies."""

    def __init__(self, config: RecordConfig) -> None:
        self._headers = ALWAYS_REDACTED_HEADERS | {h.lower() for h in config.redact_headers}
        self._params = frozenset(p.lower() for p in config.redact_query_params)
        self._paths = tuple(tuple(p.split(".")) for p in config.redact_json_paths)
        self._marker = config.redact_marker

    def headers(self, items: list[tuple[str, str]]) -> list[list[str]]:
        return [[name.lower(), self._marker if name.lower() in self._headers else value] for name, value in items]

    def query(self, query: str) -> str:
        if not query or not self._params:
            return query
        parts = []
        for part in query.split("&"):
            name, sep, _ = part.partition("=")
            if sep and unquote_plus(name).lower() in self._params:
                part = f"{name}={self._marker}"
            parts.append(part)
        return "&".join(parts)

    def body(self, body: bytes, truncated: bool) -> bytes:
        """Mask configured JSON paths; a body that cannot be parsed to check is replaced whole."""
        if not self._paths or not body:
            return body
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            if truncated and body.lstrip()[:1] in (b"{", b"["):
                # A cut JSON body might hold a field we were told to mask: keep none of it.
                return orjson.dumps(
                    {"redacted": "truncated JSON body withheld: its fields cannot be checked for masking"}
                )
            return body
        hit = False
        for path in self._paths:
            hit = _mask(document, path, self._marker) or hit
        return orjson.dumps(document) if hit else body


def _mask(node: Any, path: tuple[str, ...], marker: str) -> bool:
    """Replace the value at a dotted path (``*`` matches any key or index); True when one was found."""
    head, rest = path[0], path[1:]
    if isinstance(node, dict):
        keys = list(node) if head == "*" else [head] if head in node else []
    elif isinstance(node, list):
        keys = (
            list(range(len(node))) if head == "*" else [int(head)] if head.isdigit() and int(head) < len(node) else []
        )
    else:
        return False
    hit = False
    for key in keys:
        if rest:
            hit = _mask(node[key], rest, marker) or hit
        else:
            node[key] = marker
            hit = True
    return hit
