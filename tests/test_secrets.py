"""Secrets never recorded: with the default config, no planted secret reaches Redis or a log line.

The proxy and the comparator run as real processes (``python -m proxy serve`` / ``compare --burst``)
with JSON logs at debug level, in front of real upstreams that echo secrets back; afterwards every key
in Redis is read whole, by its type, and every log line is searched.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import aiohttp
import orjson
import redis
from aiohttp import web

from .conftest import eventually

ROOT = Path(__file__).resolve().parent.parent
RUN = uuid.uuid4().hex[:10]
CAP = 256 * 1024  # record.max_body_bytes by default


def _secret(where: str) -> str:
    return f"PLANTED{RUN}{where.replace('-', '').replace('_', '')}X"


PLANTED_HEADERS = [
    "x-goog-api-key",
    "openai-api-key",
    "x-api-key",
    "api-key",
    "ocp-apim-subscription-key",
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-my-auth",
    "x-session-token",
    "x-team-secret",
    "x-custom-key",
]
BODY_FIELDS = ["api_key", "apiKey", "password", "secret", "token", "access_token", "refresh_token"]
BODY_FIELDS += ["client_secret", "private_key", "x_api_key", "OPENAI-API-KEY"]
FORM_FIELDS = ["password", "client_secret", "api_key", "refresh_token"]
QUERY_PARAMS = ["key", "api_key", "apiKey", "token", "client_secret", "x_api_key"]
ECHOED = ["echo_api_key", "echo_client_secret", "echo_session_token", "echo_gzip_key", "echo_sse_token"]
CUT = f"PLANTED{RUN}CUTSECRET" + "Y" * 40  # a value the capture cap cuts in two
SECRETS = [_secret(f"h{n}") for n in PLANTED_HEADERS] + [_secret(f"b{n}") for n in BODY_FIELDS]
SECRETS += [_secret(f"f{n}") for n in FORM_FIELDS] + [_secret(f"q{n}") for n in QUERY_PARAMS]
SECRETS += [_secret(n) for n in ECHOED] + [_secret("setcookie"), _secret("respheader"), CUT[:30]]


async def _upstream_answer(request: web.Request) -> web.StreamResponse:
    """An OpenAI-like answer that echoes secrets in its JSON body and headers (gzip or SSE on request)."""
    await request.read()
    headers = {"set-cookie": f"sid={_secret('setcookie')}", "x-upstream-token": _secret("respheader")}
    if request.path.endswith("/stream"):
        response = web.StreamResponse(headers={**headers, "content-type": "text/event-stream"})
        await response.prepare(request)
        event = {"choices": [{"delta": {"content": "hi"}}], "meta": {"session_token": _secret("echo_sse_token")}}
        await response.write(b"data: " + orjson.dumps(event) + b"\n\ndata: [DONE]\n\n")
        return response
    answer = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": f"answer {uuid.uuid4().hex}"}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        "echo": {
            "api_key": _secret("echo_api_key"),
            "list": [{"auth": {"client_secret": _secret("echo_client_secret")}}],
        },
    }
    if request.path.endswith("/gzip"):
        answer = {"config": {"openai_api_key": _secret("echo_gzip_key")}}
        body = gzip.compress(orjson.dumps(answer))
        return web.Response(
            body=body, headers={**headers, "content-encoding": "gzip", "content-type": "application/json"}
        )
    return web.json_response(answer, headers=headers)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(path: Path, redis_url: str, incumbent: str, candidate: str, port: int) -> Path:
    """The default config plus a candidate, A/A copies on every request, and debug JSON logs."""
    path.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{port}"\nlog_level = "debug"\nlog_format = "json"\n'
        f'[admin]\nlisten = "127.0.0.1:{_free_port()}"\n'
        f'[incumbent]\nurl = "{incumbent}"\n[candidate]\nurl = "{candidate}"\n'
        f'[record]\nredis_url = "{redis_url}"\n[compare]\nnoise_sample_rate = 1.0\n'
    )
    return path


def _env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)}


def _serve(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """`shadow-proxy serve` as a real process, its stdout and stderr (the JSON log lines) into a file."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
            env=_env(),
            cwd=ROOT,
            stderr=out,
            stdout=out,
        )


async def _wait_listening(port: int, proxy: subprocess.Popen[bytes]) -> None:
    async with asyncio.timeout(30):
        while True:
            assert proxy.poll() is None, "the proxy exited"
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return


async def _send_everything(port: int) -> int:
    """Requests carrying every planted secret; returns how many were sent."""
    base = f"http://127.0.0.1:{port}"
    headers = {name: _secret(f"h{name}") for name in PLANTED_HEADERS}
    headers["authorization"] = f"Bearer {headers['authorization']}"
    query = "&".join(f"{name}={_secret(f'q{name}')}" for name in QUERY_PARAMS) + "&max_tokens=5"
    fields = {name: _secret(f"b{name}") for name in BODY_FIELDS}
    nested = {
        "model": "m",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi", "meta": [{"deep": {k: v}} for k, v in fields.items()]}],
        **{k: v for k, v in list(fields.items())[:3]},
    }
    form = "&".join(f"{name}={_secret(f'f{name}')}" for name in FORM_FIELDS) + "&grant_type=password"
    padding = CAP - 30 - len('{"pad": "", "api_key": "')
    cut = orjson.dumps({"pad": "p" * padding, "api_key": CUT}).replace(b'","api_key":"', b'", "api_key": "')
    form_headers = {**headers, "content-type": "application/x-www-form-urlencoded"}
    sends = [
        ("/v1/chat/completions", orjson.dumps(nested), headers),
        ("/oauth/token", form.encode(), form_headers),
        ("/v1/chat/completions", cut, headers),
        ("/v1/chat/gzip", orjson.dumps(nested), {**headers, "accept-encoding": "gzip"}),
        ("/v1/chat/stream", orjson.dumps({**nested, "stream": True}), headers),
    ] * 3
    async with aiohttp.ClientSession() as client:
        for path, body, hdrs in sends:
            async with client.post(f"{base}{path}?{query}", data=body, headers=hdrs) as response:
                assert response.status == 200
                await response.read()
    return len(sends)


def _everything_in(client: redis.Redis) -> bytes:
    """Every key and every value in Redis, read by type; gzip values inflated too."""
    parts: list[bytes] = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        parts.append(key)
        if kind == "string":
            parts.append(client.get(key) or b"")
        elif kind == "hash":
            parts += [b for pair in client.hgetall(key).items() for b in pair]
        elif kind == "list":
            parts += client.lrange(key, 0, -1)
        elif kind == "set":
            parts += list(client.smembers(key))
        elif kind == "zset":
            parts += [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            parts += [b for _, fields in client.xrange(key) for pair in fields.items() for b in pair]
        else:
            raise AssertionError(f"a key of type {kind} this test cannot read: {key!r}")
    return b"\n".join(gzip.decompress(p) if p[:2] == b"\x1f\x8b" else p for p in parts)


def _dead_letter_a_real_record(client: redis.Redis) -> None:
    """Copy a recorded entry with an unknown schema version, so the worker parks it (bodies and all)."""
    _, fields = client.xrange("{shadow}:records", count=1)[0]
    meta = orjson.loads(fields[b"meta"])
    client.xadd("{shadow}:records", {**fields, b"meta": orjson.dumps({**meta, "v": 99})})


async def test_no_planted_secret_reaches_redis_or_the_logs(upstreams, redis_url, redis_client, tmp_path: Path) -> None:
    """Secrets in headers, query, nested JSON, form, cut and echoed bodies appear in no key and no log line."""
    incumbent = await upstreams(_upstream_answer)
    candidate = await upstreams(_upstream_answer)
    port = _free_port()
    config = _config(tmp_path / "config.toml", redis_url, incumbent.url, candidate.url, port)
    proxy_log = tmp_path / "proxy.log"
    proxy = _serve(config, proxy_log)
    try:
        await _wait_listening(port, proxy)
        sent = await _send_everything(port)
        await eventually(lambda: redis_client.xlen("{shadow}:records") == sent, within=30)
        await eventually(lambda: all(len(u.requests) >= sent for u in (incumbent, candidate)), within=30)
    finally:
        proxy.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proxy.wait, 30)
    _dead_letter_a_real_record(redis_client)
    worker = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "proxy", "compare", "--burst", "--config", str(config)],
        env=_env(),
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert worker.returncode == 0, worker.stderr.decode()
    assert redis_client.xlen("{shadow}:dead-letter") == 1
    stored = _everything_in(redis_client)
    arms = [orjson.loads(f[b"meta"])["arms"] for _, f in redis_client.xrange("{shadow}:records")]
    assert all({"live", "shadow.candidate", "noise"} <= set(a) for a in arms[:sent])
    kinds = {key.split(b":")[1] for key in redis_client.scan_iter(count=1000)}
    assert {b"records", b"dead-letter", b"agg", b"pairs", b"ex", b"exdata", b"segments"} <= kinds
    logs = proxy_log.read_bytes() + worker.stdout + worker.stderr
    assert logs.count(b'"event":"request_proxied"') == sent  # every request's log line was captured
    assert [s for s in SECRETS if s.encode() in stored] == [], "found in Redis"
    assert [s for s in SECRETS if s.encode() in logs] == [], "found in a log line"
