"""The loop supervisor and the Redis error mapping every loop relies on."""

from __future__ import annotations

import asyncio

import pytest
from redis import exceptions as rx

from proxy.metrics import Metrics
from proxy.redis.client import StoreUnavailable, kind_of, translated
from proxy.wiring import _supervisor

from .conftest import eventually


async def test_a_loop_that_dies_is_restarted_counted_and_shown_down_then_up() -> None:
    """A loop raising twice is started three times; the restarts are counted in its health and in
    shadow_proxy_loop_restarts_total, and it reads as up once it runs."""
    metrics = Metrics()
    supervisor = _supervisor(metrics)
    health = supervisor.health("demo")
    runs = 0
    running = asyncio.Event()

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise KeyError("boom")
        health.up()
        running.set()
        await asyncio.Event().wait()

    supervisor.start("demo", loop)
    async with asyncio.timeout(10):
        await running.wait()
    assert runs == 3 and health.restarts == 2
    assert metrics.value("shadow_proxy_loop_restarts_total", loop="demo") == 2
    assert supervisor.status()["demo"]["ok"] is True
    assert supervisor.status()["demo"]["last_outage"]["reason"] == "crashed: KeyError"
    await eventually(lambda: metrics.value("shadow_proxy_loop_up", loop="demo") == 1.0)
    await supervisor.stop()


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (rx.ConnectionError("Connection closed by server."), "connection"),
        (ConnectionRefusedError(111, "refused"), "connection"),
        (rx.TimeoutError("Timeout reading from socket"), "timeout"),
        (rx.BusyLoadingError("LOADING Redis is loading the dataset in memory"), "loading"),
        (rx.ResponseError("BUSY Redis is busy running a script."), "busy"),
        (rx.ReadOnlyError("READONLY You can't write against a read only replica."), "readonly"),
        (rx.ResponseError("NOGROUP No such key or consumer group"), "nogroup"),
        (rx.OutOfMemoryError("OOM command not allowed"), "oom"),
        (rx.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), "response"),
    ],
)
def test_every_redis_failure_becomes_store_unavailable_with_its_kind(error: Exception, kind: str) -> None:
    assert kind_of(error) == kind
    with pytest.raises(StoreUnavailable) as raised, translated():
        raise error
    assert raised.value.kind == kind
