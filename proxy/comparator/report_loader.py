"""Load a report from Redis: shared by the `report` command and the admin API."""

from __future__ import annotations

import time

from ..config import Config, canary_candidate
from ..redis import AggregateReader, Clients, Keys
from .offload import INLINE, ReportBuilder
from .report_model import Report


async def report_from(
    reader: AggregateReader,
    config: Config,
    *,
    since_seconds: float,
    segment_filter: dict[str, str] | None = None,
    builder: ReportBuilder = INLINE,
    candidate: str | None = None,
) -> Report:
    """Build one candidate's report for the last `since_seconds` (default: the canary's candidate, else the
    first configured) and store it as the latest verdict when it is the default view."""
    until = time.time()
    since = until - since_seconds
    # A window is included when it starts inside the range (or is the one in progress at its start).
    windows = await reader.load(since - config.compare.window_seconds, until, config.compare.examples_per_window)
    chosen = candidate or default_candidate(config)
    canary = canary_candidate(config)
    # User feedback joins the incumbent with the candidate the canary serves: no other candidate has any.
    serves_users = canary is None or chosen in (None, canary.name)
    feedback = await reader.feedback(since, until, config.compare.window_seconds) if serves_users else {}
    report = await builder.build(
        windows,
        await reader.segments(),
        config.compare,
        since=since,
        until=until,
        segment_filter=segment_filter,
        examples=config.compare.examples_per_window,
        feedback=feedback,
        min_feedback=config.canary.min_feedback,
        satisfaction_drop_max=config.canary.satisfaction_drop_max,
        candidate=chosen,
    )
    report = report.model_copy(
        update={"workers": await reader.workers(), "pending": await reader.pending(config.compare.group)}
    )
    if not segment_filter and not candidate:
        await reader.save_verdict(report.as_json(), config.compare.window_ttl)
    return report


def default_candidate(config: Config) -> str | None:
    """The candidate a report shows unless asked: the canary's, else the first configured (None: first seen)."""
    chosen = canary_candidate(config)
    return chosen.name if chosen is not None else None


async def load_report(
    config: Config,
    redis_url: str,
    *,
    since_seconds: float,
    segment_filter: dict[str, str] | None = None,
    candidate: str | None = None,
) -> Report:
    clients = Clients(redis_url, socket_timeout=config.record.socket_timeout)
    reader = AggregateReader(
        clients.get("control"), Keys(config.record.namespace, config.record.stream, config.record.shards)
    )
    try:
        return await report_from(
            reader, config, since_seconds=since_seconds, segment_filter=segment_filter, candidate=candidate
        )
    finally:
        await clients.close()
