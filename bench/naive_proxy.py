"""The baseline shadow-proxy is measured against: the mirroring proxy anyone would write in aiohttp first.

One session per upstream, the request forwarded as it came, the answer streamed back chunk by chunk, each POST
also sent to the candidate by a fire-and-forget task whose answer is read and thrown away. No recording, no
limits, no metrics. Used by ``bench/live_path.py --only targets``; run alone:

    python bench/naive_proxy.py --listen 8080 --incumbent http://127.0.0.1:9001 --candidate http://127.0.0.1:9002
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import signal

import aiohttp
import uvloop
from aiohttp import web

HOP = {"host", "connection", "keep-alive", "transfer-encoding", "content-length", "upgrade", "te", "trailer"}


async def serve(port: int, incumbent: str, candidate: str) -> None:
    live = aiohttp.ClientSession(incumbent, auto_decompress=False)
    # No pool ceiling for mirrors: with aiohttp's default of 100 a slow candidate would queue them in the connector.
    mirror = aiohttp.ClientSession(candidate, connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
    tasks: set[asyncio.Task[None]] = set()  # references, so pending mirrors are not garbage-collected

    async def shadow(method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        try:
            async with mirror.request(method, path, headers=headers, data=body) as answer:
                await answer.read()
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass  # a failed mirror must not touch the live request

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        if request.method == "POST":
            task = asyncio.create_task(shadow(request.method, request.path_qs, headers, body))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        async with live.request(request.method, request.path_qs, headers=headers, data=body) as up:
            kept = {k: v for k, v in up.headers.items() if k.lower() not in HOP - {"content-length"}}
            response = web.StreamResponse(status=up.status, headers=kept)
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    runner = web.AppRunner(web.Application(), handle_signals=False)
    runner.app.router.add_route("*", "/{tail:.*}", handle)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_port=True).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()
    await asyncio.gather(live.close(), mirror.close())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--incumbent", required=True)
    parser.add_argument("--candidate", required=True)
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    args = parser.parse_args()
    for _ in range(args.workers - 1):
        if os.fork() == 0:  # a worker: ends with its parent (PR_SET_PDEATHSIG), serves on its own socket
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)
            break
    uvloop.run(serve(args.listen, args.incumbent, args.candidate))


if __name__ == "__main__":
    main()
