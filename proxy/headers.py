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


def _lowered(items: Iterable[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(lowercased name, name, value) per header: every later test reads the lowercased name, computed once."""
    return [(name.lower(), name, value) for name, value in items]


def _drop(lowered: list[tuple[str, str, str]], extra_drop: frozenset[str]) -> frozenset[str]:
    drop = HOP_BY_HOP | extra_drop
    tokens = [token.strip().lower() for low, _, value in lowered if low == "connection" for token in value.split(",")]
    return drop.union(token for token in tokens if token) if tokens else drop


def end_to_end(items: Iterable[tuple[str, str]], extra_drop: frozenset[str] = frozenset()) -> Headers:
    """Keep end-to-end headers in order (repeated ones too), dropping hop-by-hop ones."""
    lowered = _lowered(items)
    drop = _drop(lowered, extra_drop)
    return [(name, value) for low, name, value in lowered if low not in drop]


def relayed_headers(items: Iterable[tuple[str, str]], via: str) -> tuple[Headers, str, bool]:
    """A response's end-to-end headers, its Via value with this proxy appended, and whether it has a
    Content-Type, in one pass."""
    lowered = _lowered(items)
    drop = _drop(lowered, frozenset())
    kept = [(name, value) for low, name, value in lowered if low not in drop]
    typed = any(low == "content-type" for low, _, _ in lowered)
    return kept, _via([value for low, _, value in lowered if low == "via"], via), typed


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
    lowered = _lowered(items)
    drop = _drop(lowered, REQUEST_REPLACED)
    headers: Headers = []
    names: set[str] = set()
    forwarded_for: list[str] = []
    earlier_via: list[str] = []
    for low, name, value in lowered:
        if low == "via":
            earlier_via.append(value)  # whatever Connection says: earlier hops are always named
        if low in drop:
            continue
        names.add(low)
        if low == "x-forwarded-for":
            forwarded_for.append(value)
        elif low != "via":
            headers.append((name, value))
    headers.append(
        ("X-Forwarded-For", ", ".join([*forwarded_for, client_ip]) if client_ip else ", ".join(forwarded_for))
    )
    # A load balancer in front of us may already have said what the client used; keep its word.
    if "x-forwarded-proto" not in names:
        headers.append(("X-Forwarded-Proto", scheme))
    if "x-forwarded-host" not in names and host:
        headers.append(("X-Forwarded-Host", host))
    headers.append(("Via", _via(earlier_via, via)))
    if request_id_header.lower() not in names:
        headers.append((request_id_header, request_id))
    return headers


def append_via(items: Iterable[tuple[str, str]], via: str, version: str = "1.1") -> str:
    """The Via value with this proxy appended to what earlier hops wrote."""
    return _via([value for name, value in items if name.lower() == "via"], via, version)


def _via(earlier: list[str], via: str, version: str = "1.1") -> str:
    return ", ".join([*earlier, f"{version} {via}"])
