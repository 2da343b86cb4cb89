"""Which names hold secrets: one rule for JSON keys, form fields and query parameters, and the scrubs
that apply it to bytes that are not a JSON document (form bodies, SSE streams, cut JSON).

The rule (docs/records.md, "Never recorded"): a name is lowercased and stripped of every character
that is not a letter or digit (``API-Key``, ``api_key`` and ``apiKey`` all become ``apikey``); it is a
secret when it ends with one of the secret words (``x_api_key``, ``openai_api_key``, ``id_token``,
``client_secret`` match), unless it is a tokenizer's special token (``eos_token``). Counts never match,
because they end in ``tokens``/``count``/``ids`` (``max_tokens``, ``prompt_tokens``, ``token_ids``), and
a ``token`` key next to a ``logprob`` key is a log-probability entry, not a credential.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote_plus

import orjson

SECRET_WORDS = (
    "api_key",
    "private_key",
    "secret_key",
    "access_key",
    "password",
    "passwd",
    "secret",
    "token",
    "authorization",
)
# Names ending in "token" that hold vocabulary (a tokenizer's special tokens), not credentials.
NOT_SECRETS = frozenset(f"{t}token" for t in ("bos", "eos", "pad", "unk", "sep", "cls", "mask", "stop"))

_KNOWN_MAX = 4096  # names whose verdict is remembered
_NOT_ALNUM = re.compile(r"[\W_]+")
# A JSON key (plain, or escaped inside a JSON string) and its value: a string (possibly cut) or a scalar.
_JSON_PAIR = (
    r'(?P<q>\\?")(?P<key>[^"\\]{1,200})(?P=q)\s*:\s*'
    r'(?P<value>"(?:[^"\\]|\\.)*(?:"|\Z)|\\"(?:[^"\\]|\\[^"])*(?:\\"|\Z)|[^\s,}\]"\\]+)'
)
# A form field or query parameter: name=value between & (or start, whitespace, ?, ;).
_FORM_PAIR = r"(?P<lead>^|[&?;\s])(?P<key>[^&=\s\"';?]{1,200})=(?P<value>[^&\s\"]*)"


def normalise(name: str) -> str:
    """The name as the rule compares it: lowercase letters and digits only."""
    return _NOT_ALNUM.sub("", name.lower())


class SecretNames:
    """The key rule, compiled once with the operator's extra names (``record.redact_keys``)."""

    def __init__(self, extra: Iterable[str] = ()) -> None:
        words = {normalise(w) for w in (*SECRET_WORDS, *extra)} - {""}
        self._suffixes = tuple(sorted(words))
        self._known: dict[str, bool] = {}
        # The pre-check: a word's last part right before `":` or `=`, one pattern per word so that each
        # starts with a literal (re then skips ahead with a fast substring search). Over-inclusive on
        # purpose (it also finds "cache_key":); the exact rule runs only on what it finds.
        tails = {_NOT_ALNUM.split(w.lower())[-1] for w in SECRET_WORDS}
        tails |= {r"[\W_]*".join(map(re.escape, normalise(w))) for w in extra if normalise(w)}
        self._checks = tuple(re.compile(rf'{tail}(?:\\?"\s*:|=)'.encode()) for tail in sorted(tails))
        self._text_checks = tuple(re.compile(check.pattern.decode()) for check in self._checks)
        self._json_text = re.compile(_JSON_PAIR)
        self._form_text = re.compile(_FORM_PAIR)

    def is_secret(self, name: str) -> bool:
        # Documents repeat their keys (150 logprob entries, 150 times "token"): decide each name once.
        known = self._known.get(name)
        if known is None:
            key = normalise(name)
            known = key not in NOT_SECRETS and key.endswith(self._suffixes)
            if len(self._known) >= _KNOWN_MAX:
                self._known.clear()
            self._known[name] = known
        return known

    def may_hold(self, data: bytes) -> bool:
        """Cheap filter: False means no secret name can be in these bytes, so nothing is parsed."""
        lowered = data.lower()
        return any(check.search(lowered) is not None for check in self._checks)

    def _may_hold_text(self, text: str) -> bool:
        lowered = text.lower()
        return any(check.search(lowered) is not None for check in self._text_checks)

    def mask(self, node: Any, marker: str) -> bool:
        """Replace, at any depth, the values of secret keys; True when something was replaced."""
        hit = False
        if isinstance(node, dict):
            logprob_entry = "logprob" in node
            for key, value in node.items():
                if (
                    value is not None
                    and not isinstance(value, bool)
                    and self.is_secret(key)
                    and not (logprob_entry and key == "token")
                ):
                    node[key] = marker
                    hit = True
                elif isinstance(value, str):
                    if _pairs_possible(value) and self._may_hold_text(value):
                        scrubbed = self.scrub_text(value, marker)
                        hit = hit or scrubbed != value
                        node[key] = scrubbed
                elif isinstance(value, dict | list):
                    hit = self.mask(value, marker) or hit
        elif isinstance(node, list):
            for index, value in enumerate(node):
                if isinstance(value, str) and _pairs_possible(value) and self._may_hold_text(value):
                    node[index] = self.scrub_text(value, marker)
                    hit = hit or node[index] != value
                elif isinstance(value, dict | list):
                    hit = self.mask(value, marker) or hit
        return hit

    def scrub_text(self, text: str, marker: str) -> str:
        """A string value that embeds JSON or form pairs (tool-call arguments, pasted config)."""
        text = self._json_text.sub(lambda m: self._replace(m, unquoted=False, marker=marker), text)
        return self._form_text.sub(lambda m: self._replace(m, unquoted=True, marker=marker), text)

    def scrub(self, body: bytes, marker: str) -> bytes:
        """Bytes that are not one JSON document: SSE events are parsed one by one, everything else
        (form bodies, a cut event, cut JSON) is scrubbed pair by pair."""
        out = []
        for line in body.split(b"\n"):
            if self.may_hold(line):
                line = self._scrub_line(line, marker)
            out.append(line)
        return b"\n".join(out)

    def _scrub_line(self, line: bytes, marker: str) -> bytes:
        if line.startswith(b"data:"):
            try:
                event = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                pass
            else:
                return b"data: " + orjson.dumps(event) if self.mask(event, marker) else line
        text = line.decode("utf-8", "surrogateescape")
        return self.scrub_text(text, marker).encode("utf-8", "surrogateescape")

    def _replace(self, match: re.Match[str], *, unquoted: bool, marker: str) -> str:
        key = match.group("key")
        if not self.is_secret(unquote_plus(key) if unquoted else key):
            return match.group(0)
        quote = match.groupdict().get("q") or ""
        start = match.start("value") - match.start(0)
        return f"{match.group(0)[:start]}{quote}{marker}{quote}"


def _pairs_possible(text: str) -> bool:
    """Most string values (message text, tokens) hold neither `:` nor `=`: skip them without a scan."""
    return ":" in text or "=" in text
