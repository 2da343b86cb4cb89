"""The per-window reservoir of pairs: a uniform sample whose every prefix is uniform too."""

from __future__ import annotations

import numpy as np

from proxy.comparator.aggregate import Contribution, Segment
from proxy.redis import AggregateWriter, Clients, Keys, Limits


def _contribution(index: int) -> Contribution:
    return Contribution(
        f"r{index}", f"r{index}|c", 0, Segment("/*", "m", False, "c"), {"n": 1}, [float(index)], None, None
    )


async def test_a_reservoir_prefix_is_not_the_earliest_arrivals(redis_url, redis_client) -> None:
    """200 pairs into a 100-slot reservoir: its first 20 entries average near the middle arrival."""
    clients = Clients(redis_url, socket_timeout=5)
    store = AggregateWriter(clients.get("comparator"), Keys("shadow"), limits=Limits(3600, 900, 100, 0))
    means = []
    try:
        for trial in range(20):
            redis_client.flushall()
            for start in range(0, 200, 100):
                await store.apply([_contribution(i) for i in range(start, start + 100)])
            key = Keys("shadow").pairs(0, Segment("/*", "m", False, "c").id)
            kept = [float(v.strip(b"[]")) for v in redis_client.lrange(key, 0, -1)]
            assert len(kept) == 100 and len(set(kept)) == 100, trial
            means.append(np.mean(kept[:20]))
    finally:
        await clients.close()
    # A uniform sample of 0..199 has mean 99.5 (standard error here about 3); the first 20 entries of an
    # unshuffled reservoir average about 80 (half of them are still the first 20 arrivals).
    assert 90 < float(np.mean(means)) < 110
