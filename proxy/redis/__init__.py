"""The one package that talks to Redis: clients, key layout, errors, and every command the project sends.

Nothing outside this package imports ``redis``. Callers get ``StoreUnavailable`` (with a ``kind``) for
any Redis or socket failure. Layout and guarantees: ``docs/redis.md``.
"""

from .aggregates import AggregateReader, AggregateWriter, Limits, WindowData
from .canary import FEEDBACK_DUPLICATE, FEEDBACK_STORED, FEEDBACK_UNKNOWN, CanaryStore
from .client import Backoff, Clients, StoreUnavailable
from .consumer import Batch, Entry, RecordConsumer
from .keys import Keys
from .records import RecordWriter

__all__ = [
    "FEEDBACK_DUPLICATE",
    "FEEDBACK_STORED",
    "FEEDBACK_UNKNOWN",
    "AggregateReader",
    "AggregateWriter",
    "Backoff",
    "Batch",
    "CanaryStore",
    "Clients",
    "Entry",
    "Keys",
    "Limits",
    "RecordConsumer",
    "RecordWriter",
    "StoreUnavailable",
    "WindowData",
]
