"""Redaction: secrets in headers, query strings and JSON bodies never reach a record."""

import gzip

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


def _masked(body: bytes, **values: object) -> object:
    return orjson.loads(_redactor(**values).body(body, False))


def test_secret_keys_are_masked_at_any_depth_whatever_their_spelling() -> None:
    """api_key, apiKey, API-KEY, x_api_key, client_secret... inside objects inside arrays inside objects."""
    body = {
        "api_key": "s1",
        "outer": [{"inner": {"apiKey": "s2", "API-KEY": "s3", "x_api_key": "s4", "openai_api_key": "s5"}}],
        "auth": {"password": "s6", "Secret": "s7", "token": "s8", "access_token": "s9", "refreshToken": "s10"},
        "oauth": [[{"client_secret": "s11", "private_key": {"pem": "s12"}, "id_token": 42}]],
    }
    out = orjson.dumps(_masked(orjson.dumps(body)))
    for n in range(1, 13):
        assert f'"s{n}"'.encode() not in out
    assert out.count(b"[REDACTED]") == 13  # the twelve strings and the id_token number


def test_token_counts_logprobs_and_special_tokens_are_not_secrets() -> None:
    """What the comparator reads (usage, logprobs, max_tokens, token_ids) stays byte for byte."""
    body = orjson.dumps(
        {
            "max_tokens": 5,
            "max_completion_tokens": 6,
            "token_ids": [1, 2],
            "prompt_cache_key": "k",
            "eos_token": "</s>",
            "choices": [
                {
                    "logprobs": {
                        "content": [{"token": "Hi", "logprob": -0.1, "top_logprobs": [{"token": "Hey", "logprob": -2}]}]
                    }
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
            "stream": True,
            "token": None,
        }
    )
    assert _redactor().body(body, False) is body


def test_a_form_encoded_body_is_masked_by_field_name() -> None:
    """password=, client_secret= and percent-encoded names lose their values; other fields are kept."""
    out = _redactor().body(b"grant_type=password&username=u&password=p%40ss&client%5Fsecret=c&max_tokens=3", False)
    assert out == b"grant_type=password&username=u&password=[REDACTED]&client%5Fsecret=[REDACTED]&max_tokens=3"


def test_a_truncated_json_body_is_scrubbed_pair_by_pair() -> None:
    """A body cut by the capture cap still loses every secret value, even one cut in the middle."""
    out = _redactor().body(b'{"messages": [{"role": "user"}], "api_key": "sk-1", "x": {"password": "pa', True)
    assert out == b'{"messages": [{"role": "user"}], "api_key": "[REDACTED]", "x": {"password": "[REDACTED]"'


def test_streamed_events_are_masked_one_by_one() -> None:
    """Each SSE data line is parsed; a cut last event is scrubbed; logprob tokens of whole events stay."""
    body = (
        b'data: {"choices": [{"logprobs": {"content": [{"token": "Hi", "logprob": 0}]}}], "session_token": "t1"}\n\n'
        b'data: {"echo": {"apiKey": "t2'
    )
    out = _redactor().body(body, True)
    assert b"t1" not in out and b"t2" not in out
    assert b'"token":"Hi"' in out


def test_secrets_inside_string_values_are_scrubbed() -> None:
    """JSON or form pairs embedded in a string (tool-call arguments) are scrubbed too."""
    body = orjson.dumps({"arguments": orjson.dumps({"password": "p1", "n": 1}).decode(), "q": "a=1&token=p2"})
    out = _redactor().body(body, False)
    assert b"p1" not in out and b"p2" not in out and b'\\"n\\":1' in out


def test_gzip_bodies_are_inflated_checked_and_compressed_again() -> None:
    """A gzip body with a secret is stored gzip-compressed without it; one without is kept byte for byte."""
    clean = gzip.compress(b'{"usage": {"total_tokens": 3}}')
    assert _redactor().body(clean, False, "gzip") is clean
    out = _redactor().body(gzip.compress(b'{"api_key": "sk-1"}'), False, "gzip")
    assert gzip.decompress(out) == b'{"api_key":"[REDACTED]"}'


def test_bodies_in_an_encoding_that_cannot_be_checked_are_withheld() -> None:
    """br (or a gzip body that does not inflate) cannot be checked, so none of it is kept."""
    assert b"withheld" in _redactor().body(b"\x1b\x00sk-secret", False, "br")
    assert b"sk-secret" not in _redactor().body(b"not gzip sk-secret", False, "gzip")


def test_extra_key_names_follow_the_same_rule() -> None:
    """record.redact_keys adds names, matched case- and separator-insensitively as suffixes."""
    assert _masked(b'{"Session-Id": "a", "user_session_id": "b", "sessions": 1}', redact_keys=("session_id",)) == {
        "Session-Id": "[REDACTED]",
        "user_session_id": "[REDACTED]",
        "sessions": 1,
    }


def test_provider_auth_headers_and_any_auth_token_secret_or_key_header_are_masked() -> None:
    """Provider key headers and names containing auth, token, secret or key are masked; rate-limit counts stay."""
    names = [
        "x-goog-api-key",
        "OpenAI-Api-Key",
        "x-api-key",
        "Ocp-Apim-Subscription-Key",
        "Proxy-Authorization",
        "Set-Cookie",
        "X-Auth-User",
        "X-Session-Token",
        "X-Client-Secret",
        "X-Custom-Key",
    ]
    out = _redactor().headers([(n, "v") for n in names] + [("x-ratelimit-remaining-tokens", "9"), ("Accept", "a")])
    assert [v for _, v in out] == ["[REDACTED]"] * len(names) + ["9", "a"]


def test_query_parameters_named_like_secrets_are_masked() -> None:
    """The key rule applies to query parameters besides record.redact_query_params."""
    assert _redactor().query("apiKey=1&client_secret=2&max_tokens=3&a=4") == (
        "apiKey=[REDACTED]&client_secret=[REDACTED]&max_tokens=3&a=4"
    )


def test_a_body_nested_too_deep_to_walk_is_withheld() -> None:
    """JSON that orjson parses but Python cannot recurse through is not kept (the writer task survives)."""
    body = b'{"api_key": "sk-1", "a": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    out = _redactor().body(body, False)
    assert out == b'{"redacted":"JSON body withheld: nested too deep to be checked for secrets"}'


def test_every_body_withheld_whole_is_counted_by_reason() -> None:
    """Each body replaced whole reports its reason (the recorder counts them in
    shadow_proxy_record_bodies_withheld_total); a body that could be checked reports nothing."""
    seen: list[str] = []
    redactor = Redactor(RecordConfig(redact_json_paths=("user",)), seen.append)
    redactor.body(b"\x1b\x00sk-secret", False, "br")
    redactor.body(b"not gzip", False, "gzip")
    redactor.body(b'{"user": "ab', True)
    redactor.body(b'{"api_key": "sk-1", "a": ' + b"[" * 1000 + b"]" * 1000 + b"}", False)
    redactor.body(b'{"user": "x", "api_key": "k"}', False)
    assert seen == ["encoding", "not_inflatable", "truncated_json", "too_deep"]
