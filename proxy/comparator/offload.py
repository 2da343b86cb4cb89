"""Report building (bootstraps over thousands of pairs: up to a second of CPU) away from an event loop.

Inside `serve` the statistics run in one child process, so the live path never waits on them and
they never hold its GIL; the `report` command builds inline. Both go through a ``ReportBuilder``.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from .report import build
from .report_model import Report


class ReportBuilder:
    """Builds reports inline (``offload=False``) or in a lazily started child process."""

    def __init__(self, *, offload: bool) -> None:
        self._offload = offload
        self._pool: ProcessPoolExecutor | None = None

    async def build(self, *args: Any, **kwargs: Any) -> Report:
        if not self._offload:
            return build(*args, **kwargs)
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=die_with_parent
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(build, *args, **kwargs))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


INLINE = ReportBuilder(offload=False)


def die_with_parent() -> None:
    """In a child process (the report builder, the shadow process): end when the serving process ends, even by
    SIGKILL (Linux PR_SET_PDEATHSIG), rather than linger as an orphan holding a few hundred MB."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the call took effect
        os._exit(0)


PR_SET_PDEATHSIG = 1
