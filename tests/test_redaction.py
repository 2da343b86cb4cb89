"""Redaction: secrets in headers, query strings and JSON bodies never reach a record."""

import orjson

from proxy.config import RecordConfig
from proxy.redaction import Redactor


def _redactor(**values: object) -> Redactor:
    return Redactor(RecordConfig(**values))  # type: ignore[arg-type]


def test_sensitive_headers_are_always_masked() -> None:
    """Authorization, Cookie, Set-Cookie, X-Api-Key and configured headers keep their name, lose their value."""
    items = [
        ("Authorization", "Bearer s"),
        ("Cookie", "c"),
        ("X-Api-Key", "k"),
        ("X-Team-Secret", "t"),
        ("Accept", "a"),
    ]
    out = _redactor(redact_headers=("x-team-secret",)).headers(items)
    assert out == [
        ["authorization", "[REDACTED]"],
        ["cookie", "[REDACTED]"],
        ["x-api-key", "[REDACTED]"],
        ["x-team-secret", "[REDACTED]"],
        ["accept", "a"],
    ]


def test_query_parameters_are_masked_by_name() -> None:
    """Listed parameters (percent-encoded names too) are masked; the rest stays byte for byte."""
    assert _redactor().query("a=1&api_key=xyz&b=%20&to%6Ben=t") == "a=1&api_key=[REDACTED]&b=%20&to%6Ben=[REDACTED]"


def test_json_paths_with_wildcards_are_masked() -> None:
    """Dotted paths, with * for any key or index, replace values by the marker."""
    body = orjson.dumps({"user": "u1", "messages": [{"role": "user", "content": "hi"}], "keep": 1})
    out = orjson.loads(_redactor(redact_json_paths=("user", "messages.*.content")).body(body, False))
    assert out == {"user": "[REDACTED]", "messages": [{"role": "user", "content": "[REDACTED]"}], "keep": 1}


def test_body_without_matches_is_returned_unchanged() -> None:
    """Bodies are not re-serialised when nothing was masked (bytes stay identical)."""
    body = b'{"a":  1}'
    assert _redactor(redact_json_paths=("user",)).body(body, False) is body
    assert _redactor(redact_json_paths=("user",)).body(b"not json", False) == b"not json"


def test_truncated_json_body_is_withheld_when_paths_are_configured() -> None:
    """A cut JSON body cannot be checked, so none of it is kept."""
    out = _redactor(redact_json_paths=("user",)).body(b'{"user": "secret", "x": [1, 2', True)
    assert b"secret" not in out
