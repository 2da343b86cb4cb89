"""Secrets never reach Redis: headers, query parameters and body fields are masked here.

Runs in the recorder's writer task, never on the live path, so it must stay cheap: a body is parsed
only when a fast scan finds a secret name in it (``SecretNames.may_hold``). The rules are listed in
docs/records.md ("Never recorded").
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_plus

import orjson

from .config import RecordConfig
from .secret_names import SecretNames

# Always masked, whatever the configuration says: the providers' credential headers by name, and
# any header whose name contains one of HEADER_WORDS (rate-limit counters excepted).
ALWAYS_REDACTED_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "api-key",
        "x-goog-api-key",
        "openai-api-key",
        "ocp-apim-subscription-key",
    }
)
HEADER_WORDS = ("auth", "token", "secret", "key")
INFLATED_CAP = 16 * 1024 * 1024  # a compressed body is checked up to this size inflated; beyond, withheld
_WBITS = {"gzip": 31, "x-gzip": 31, "deflate": 15}
_HEADER_NAMES_MAX = 4096


class Redactor:
    """Masks configured secrets in headers, query strings and JSON bodies."""

    def __init__(self, config: RecordConfig, on_withheld: Callable[[str], None] | None = None) -> None:
        self._on_withheld = on_withheld  # called with the reason's kind each time a body is withheld whole
        self._headers = ALWAYS_REDACTED_HEADERS | {h.lower() for h in config.redact_headers}
        self._params = frozenset(p.lower() for p in config.redact_query_params)
        self._paths = tuple(tuple(p.split(".")) for p in config.redact_json_paths)
        self._names = SecretNames(config.redact_keys)
        self._marker = config.redact_marker
        self._header_names: dict[str, tuple[str, bool]] = {}  # name as sent -> (lowercased, secret)

    def headers(self, items: list[tuple[str, str]]) -> list[list[str]]:
        """Every header kept with its name; a secret one's value replaced by the marker."""
        out = []
        for name, value in items:
            # The same few names come with every record: decide each once (clients choose names, so bounded).
            known = self._header_names.get(name)
            if known is None:
                lower = name.lower()
                known = (lower, self._secret_header(lower))
                if len(self._header_names) >= _HEADER_NAMES_MAX:
                    self._header_names.clear()
                self._header_names[name] = known
            out.append([known[0], self._marker if known[1] else value])
        return out

    def _secret_header(self, name: str) -> bool:
        if name in self._headers:
            return True
        # x-ratelimit-remaining-tokens and the like are counts the comparator may want.
        return "ratelimit" not in name and any(word in name for word in HEADER_WORDS)

    def query(self, query: str) -> str:
        if not query:
            return query
        parts = []
        for part in query.split("&"):
            name, sep, _ = part.partition("=")
            plain = unquote_plus(name)
            if sep and (plain.lower() in self._params or self._names.is_secret(plain)):
                part = f"{name}={self._marker}"
            parts.append(part)
        return "&".join(parts)

    def body(self, body: bytes, truncated: bool, encoding: str = "") -> bytes:
        """The body with every secret field masked; what cannot be checked is replaced whole.

        ``encoding`` is the body's Content-Encoding: gzip and deflate bodies are inflated to be
        checked (and compressed again only when something was masked); others are withheld."""
        if not body:
            return body
        encoding = encoding.strip().lower()
        if encoding in ("", "identity"):
            return self._plain(body, truncated)
        wbits = _WBITS.get(encoding)
        if wbits is None:
            return self._withheld("encoding", f"{encoding}-encoded body withheld: it cannot be checked for secrets")
        inflater = zlib.decompressobj(wbits)
        try:
            plain = inflater.decompress(body, INFLATED_CAP)
        except zlib.error:
            return self._withheld(
                "not_inflatable", "compressed body withheld: it does not inflate, so it cannot be checked for secrets"
            )
        if inflater.unconsumed_tail:
            return self._withheld(
                "inflates_too_large", "compressed body withheld: it inflates past the size that is checked for secrets"
            )
        redacted = self._plain(plain, truncated or not inflater.eof)
        if redacted is plain:
            return body
        deflater = zlib.compressobj(1, zlib.DEFLATED, wbits)
        return deflater.compress(redacted) + deflater.flush()

    def _withheld(self, kind: str, reason: str) -> bytes:
        if self._on_withheld is not None:
            self._on_withheld(kind)
        return orjson.dumps({"redacted": reason})

    def _plain(self, body: bytes, truncated: bool) -> bytes:
        may_hold = self._names.may_hold(body)
        if not may_hold and not self._paths:
            return body
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            if truncated and self._paths and body.lstrip()[:1] in (b"{", b"["):
                # A cut JSON body might hold a field we were told to mask: keep none of it.
                return self._withheld(
                    "truncated_json", "truncated JSON body withheld: its fields cannot be checked for masking"
                )
            # Form bodies, SSE streams, cut JSON: scrubbed pair by pair.
            return self._names.scrub(body, self._marker) if may_hold else body
        try:
            hit = may_hold and self._names.mask(document, self._marker)
        except RecursionError:  # nested deeper than Python recurses: cannot be walked, so not kept
            return self._withheld("too_deep", "JSON body withheld: nested too deep to be checked for secrets")
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
