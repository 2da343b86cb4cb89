"""Keeps a process's background loops running and says which one is down and since when.

A loop reports trouble it handles itself (Redis unavailable: it backs off and resumes) through its
``Health``; an exception that escapes a loop is caught here, logged as one line, counted in
``shadow_proxy_loop_restarts_total`` and the loop is started again after a backoff. ``/readyz`` and
the comparator's health key show ``status()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from .redis import Backoff

log = structlog.get_logger("shadow_proxy.supervisor")


@dataclass(slots=True)
class Health:
    """The state one loop reports: ok, or down since a time for a reason."""

    name: str
    on_change: Callable[[Health], None] | None = None
    ok: bool = True
    since: float = 0.0
    reason: str = ""
    restarts: int = 0
    failures: int = 0  # failed attempts in the current outage
    last_outage: dict[str, Any] | None = None  # the latest one that ended: since, until, reason

    def up(self) -> None:
        if not self.ok:
            now = time.time()
            log.warning("loop_recovered", loop=self.name, down_for=round(now - self.since, 3), reason=self.reason)
            self.last_outage = {"since": self.since, "until": now, "reason": self.reason}
            self.ok, self.since, self.reason, self.failures = True, now, "", 0
            self._changed()

    def down(self, reason: str) -> None:
        self.failures += 1
        if self.ok or reason != self.reason:
            if self.ok:
                self.since = time.time()
                log.warning("loop_down", loop=self.name, reason=reason)
            self.ok, self.reason = False, reason
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "since": self.since or None,
            "reason": self.reason or None,
            "restarts": self.restarts,
            "last_outage": self.last_outage,
        }


class Supervisor:
    """Runs named loops, restarting any that dies; ``stop`` cancels them all."""

    def __init__(self, on_change: Callable[[Health], None] | None = None, *, backoff_cap: float = 5.0) -> None:
        self._on_change = on_change
        self._backoff_cap = backoff_cap
        self._health: dict[str, Health] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.restarted: Callable[[str], None] | None = None

    def health(self, name: str) -> Health:
        found = self._health.get(name)
        if found is None:
            found = self._health[name] = Health(name, self._on_change, since=time.time())
            if self._on_change is not None:
                self._on_change(found)
        return found

    def start(self, name: str, loop: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run ``loop()`` until it returns; when it raises, log, count and run it again after a backoff."""
        health = self.health(name)
        task = self._tasks[name] = asyncio.create_task(self._supervise(health, loop), name=f"supervised:{name}")
        return task

    async def _supervise(self, health: Health, loop: Callable[[], Awaitable[None]]) -> None:
        backoff = Backoff(0.2, self._backoff_cap)
        while True:
            started = time.monotonic()
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever killed the loop, it must come back
                health.restarts += 1
                health.down(f"crashed: {type(exc).__name__}")
                log.error("loop_crashed", loop=health.name, error=f"{type(exc).__name__}: {exc}"[:500])
                if self.restarted is not None:
                    self.restarted(health.name)
            if time.monotonic() - started > 60:
                backoff.reset()  # it ran for a while: a new crash is a new incident
            await asyncio.sleep(backoff.next())

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: health.as_dict() for name, health in sorted(self._health.items())}

    @property
    def all_ok(self) -> bool:
        return all(h.ok for h in self._health.values())

    async def wait(self, name: str) -> None:
        """Wait for a loop to return by itself (one that stops when asked)."""
        task = self._tasks.pop(name, None)
        if task is not None:
            await task

    async def stop(self) -> None:
        tasks, self._tasks = list(self._tasks.values()), {}
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def start_loop(supervisor: Supervisor | None, name: str, loop: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
    """Run a loop under the process's supervisor, or as a plain task where there is none (tests, tools)."""
    if supervisor is not None:
        return supervisor.start(name, loop)
    return asyncio.create_task(_awaited(loop), name=name)


async def _awaited(loop: Callable[[], Awaitable[None]]) -> None:
    await loop()
