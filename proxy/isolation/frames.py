"""The wire format between a serving process and its shadow process: two kinds of frame on a Unix socket.

A frame is ``u32 header length, u32 payload length, orjson header, raw payload``. ``REQ`` carries what a
mirror and a record need of a request at its arrival (the payload is the request body); ``DONE`` carries the
live arm's capture when it ended (the payload is the captured answer, then the chunk gaps as doubles).
Timestamps are ``exchange.now()`` (``perf_counter``, CLOCK_MONOTONIC on Linux): one clock for every process
of the host, so both processes' times of one request compare directly.
"""

from __future__ import annotations

import struct
from array import array
from typing import Any

import orjson

from ..exchange import ArmCapture, Exchange

PREFIX = struct.Struct("!II")
REQ, DONE = "q", "d"
# The live arm's scalar fields, in a DONE header under their own names.
_ARM_FIELDS = (
    "upstream",
    "role",
    "start",
    "model",
    "first_byte",
    "first_chunk",
    "end",
    "status",
    "error",
    "captured",
    "size",
    "chunk_count",
    "last_chunk",
    "gap_sum",
    "gap_max",
)


def frame(header: dict[str, Any], payload: bytes) -> list[bytes]:
    """One frame as the pieces to hand to ``transport.writelines`` (the payload is never copied)."""
    head = orjson.dumps(header)
    return [PREFIX.pack(len(head), len(payload)), head, payload]


def request_frame(exchange: Exchange, raw_target: str, upstream_headers: list[tuple[str, str]]) -> list[bytes]:
    """REQ: the request as it arrived and the headers every arm is sent."""
    header = {
        "t": REQ,
        "id": exchange.request_id,
        "m": exchange.method,
        "tg": raw_target,
        "r": exchange.route,
        "h": exchange.headers,
        "uh": upstream_headers,
        "ip": exchange.client_ip,
        "w": exchange.received_wall,
        "rc": exchange.received,
        "c": exchange.client_request_id,
        "s": exchange.live.upstream if exchange.live is not None else "",
        "cap": exchange.live.cap if exchange.live is not None else 0,
    }
    return frame(header, exchange.body)


def done_frame(exchange: Exchange) -> list[bytes]:
    """DONE: the live arm's capture and how the client's side ended."""
    live = exchange.live
    assert live is not None
    arm = {name: getattr(live, name) for name in _ARM_FIELDS}
    arm["headers"] = live.headers
    body = live.body
    header = {
        "t": DONE,
        "id": exchange.request_id,
        "a": arm,
        "cd": exchange.client_disconnected,
        "rs": exchange.response_status,
        "bl": len(body),
    }
    return frame(header, body + live.gaps.tobytes())


def exchange_of(header: dict[str, Any], body: bytes) -> tuple[Exchange, str, list[tuple[str, str]]]:
    """From a REQ: the exchange (its live arm expected, not yet filled), the raw target, the upstream headers."""
    raw_target: str = header["tg"]
    path, _, query = raw_target.partition("?")
    exchange = Exchange(
        request_id=header["id"],
        method=header["m"],
        path=path,
        query=query,
        route=header["r"],
        headers=[(k, v) for k, v in header["h"]],
        client_ip=header["ip"],
        received_wall=header["w"],
        received=header["rc"],
        body=body,
    )
    exchange.client_request_id = header["c"]
    exchange.live = ArmCapture(header["s"], "live", header["cap"])
    exchange.expect_arm()
    return exchange, raw_target, [(k, v) for k, v in header["uh"]]


def fill_live(exchange: Exchange, header: dict[str, Any], payload: bytes) -> None:
    """From a DONE: copy the live arm's capture into the exchange's live arm."""
    live = exchange.live
    assert live is not None
    for name, value in header["a"].items():
        if name == "headers":
            live.headers = [(k, v) for k, v in value]
        elif name in _ARM_FIELDS:
            setattr(live, name, value)
    split = header["bl"]
    live.chunks = [payload[:split]] if split else []
    live.gaps = array("d", payload[split:])
    exchange.client_disconnected = header["cd"]
    exchange.response_status = header["rs"]
