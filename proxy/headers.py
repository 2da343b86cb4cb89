"""Pure header hygiene for a reverse proxy: hop-by-hop removal, forwarding headers, Via.

RFC 9110 §7.6.1: a proxy removes the Connection header, every header it names, and the hop-by-hop
headers of earlier specifications (Keep-Alive, Proxy-Connection, TE, Transfer-Encoding, Upgrade).
"""

from __future__ import annotations

from collections.abc import Iterable

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
# Set by the proxy itself: Host comes from the upstream URL, the body is re-sent with its own
# Content-Length, and Expect was answered by the proxy when it read the body.
REQUEST_REPLACED = frozenset({"host", "content-length", "expect"})

Headers = list[tuple[str, str]]


def connection_tokens(items: Iterable[tuple[str, str]]) -> frozenset[str]:
    """The header names listed in Connection headers, lowercased."""
    return frozenset(
        token.strip().lower()
        for name, value in items
        if name.lower() == "connection"
        for token in value.split(",")
        if token.strip()
    )


def end_to_end(items: Iterable[tuple[str, str]], extra_drop: frozenset[str] = frozenset()) -> Headers:
    """Keep end-to-end headers in order (repeated ones too), dropping hop-by-hop ones."""
    pairs = list(items)
    drop = HOP_BY_HOP | connection_tokens(pairs) | extra_drop
    return [(name, value) for name, value in pairs if name.lower() not in drop]


def request_headers(
    items: Iterable[tuple[str, str]],
    *,
    client_ip: str,
    scheme: str,
    host: str,
    via: str,
    request_id_header: str,
    request_id: str,
) -> Headers:
    """Headers to send upstream: end-to-end ones plus X-Forwarded-*, Via and the request id."""
    headers = end_to_end(items, REQUEST_REPLACED)
    names = {name.lower() for name, _ in headers}
    forwarded_for = [value for name, value in headers if name.lower() == "x-forwarded-for"]
    headers = [(name, value) for name, value in headers if name.lower() not in ("x-forwarded-for", "via")]
    headers.append(
        ("X-Forwarded-For", ", ".join([*forwarded_for, client_ip]) if client_ip else ", ".join(forwarded_for))
    )
    # A load balancer in front of us may already have said what the client used; keep its word.
    if "x-forwarded-proto" not in names:
        headers.append(("X-Forwarded-Proto", scheme))
    if "x-forwarded-host" not in names and host:
        headers.append(("X-Forwarded-Host", host))
    headers.append(("Via", append_via(items, via)))
    if request_id_header.lower() not in names:
        headers.append((request_id_header, request_id))
    return headers


def append_via(items: Iterable[tuple[str, str]], via: str, version: str = "1.1") -> str:
    """The Via value with this proxy appended to what earlier hops wrote."""
    earlier = [value for name, value in items if name.lower() == "via"]
    return ", ".join([*earlier, f"{version} {via}"])
