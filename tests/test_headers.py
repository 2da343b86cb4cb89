"""Header hygiene: RFC 9110 hop-by-hop removal, forwarding headers, Via, request id."""

from proxy.headers import append_via, end_to_end, request_headers


def _forward(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return request_headers(
        items,
        client_ip="10.1.2.3",
        scheme="http",
        host="api.example",
        via="shadow-proxy",
        request_id_header="x-request-id",
        request_id="rid-1",
    )


def test_hop_by_hop_headers_are_removed() -> None:
    """Connection, Keep-Alive, TE, Transfer-Encoding, Upgrade, Proxy-* never cross the proxy."""
    items = [
        ("Connection", "keep-alive"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "h2c"),
        ("Proxy-Connection", "close"),
        ("Proxy-Authorization", "Basic x"),
        ("Trailer", "Expires"),
        ("Accept", "*/*"),
    ]
    assert end_to_end(items) == [("Accept", "*/*")]


def test_headers_named_in_connection_are_removed() -> None:
    """A header listed in Connection is hop-by-hop for this hop only (RFC 9110 §7.6.1)."""
    items = [
        ("Connection", "close, X-Hop"),
        ("X-Hop", "1"),
        ("connection", "x-other"),
        ("X-Other", "2"),
        ("X-Keep", "3"),
    ]
    assert end_to_end(items) == [("X-Keep", "3")]


def test_repeated_headers_keep_their_order() -> None:
    """Repeated end-to-end headers are all forwarded, in order."""
    items = [("X-Tag", "a"), ("Accept", "*/*"), ("X-Tag", "b")]
    assert [v for k, v in _forward(items) if k == "X-Tag"] == ["a", "b"]


def test_x_forwarded_for_is_appended() -> None:
    """The client's address is appended to an existing X-Forwarded-For chain."""
    headers = dict(_forward([("X-Forwarded-For", "1.1.1.1, 2.2.2.2")]))
    assert headers["X-Forwarded-For"] == "1.1.1.1, 2.2.2.2, 10.1.2.3"


def test_forwarded_proto_and_host_are_set_when_absent_and_kept_when_present() -> None:
    """X-Forwarded-Proto/Host describe the client's request unless an earlier proxy already did."""
    fresh = dict(_forward([]))
    assert fresh["X-Forwarded-Proto"] == "http" and fresh["X-Forwarded-Host"] == "api.example"
    kept = _forward([("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "public.example")])
    assert [v for k, v in kept if k.lower() == "x-forwarded-proto"] == ["https"]
    assert [v for k, v in kept if k.lower() == "x-forwarded-host"] == ["public.example"]


def test_host_content_length_and_expect_are_left_to_the_client_library() -> None:
    """Host comes from the upstream URL and the body is re-framed, so those headers are not copied."""
    names = {k.lower() for k, _ in _forward([("Host", "a"), ("Content-Length", "3"), ("Expect", "100-continue")])}
    assert not names & {"host", "content-length", "expect"}


def test_via_is_appended_and_request_id_added_once() -> None:
    """Via lists earlier hops then this proxy; a request id is added only when the client sent none."""
    headers = _forward([("Via", "1.0 edge")])
    assert dict(headers)["Via"] == "1.0 edge, 1.1 shadow-proxy"
    assert dict(headers)["x-request-id"] == "rid-1"
    given = _forward([("X-Request-Id", "mine")])
    assert [v for k, v in given if k.lower() == "x-request-id"] == ["mine"]
    assert append_via([], "p") == "1.1 p"
