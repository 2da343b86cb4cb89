"""The capacity arithmetic of bench/capacity.py (docs/scaling.md's tables come from it): pure functions, no timing."""

from __future__ import annotations

import math

import pytest

from bench.capacity import Assumptions, Unit, one_node_ceiling, plan

# Round figures, so every expected value below can be checked by hand.
UNIT = Unit(
    record_bytes=4000.0,
    redis_append_cpu_us=15.0,
    redis_compare_cpu_us=35.0,  # 50 µs of redis CPU per request with one pair per record
    memory_bytes=4000.0,
    net_in_bytes=4100.0,
    pairs_per_worker_s=5000.0,
    proxy_cpu_us=300.0,
)


def test_plan_at_10k_requests() -> None:
    p = plan(10_000, UNIT)
    assert p["records_per_s"] == 10_000
    assert p["bytes_per_s"] == 40e6
    assert p["redis_cpu_cores"] == pytest.approx(0.5)  # 10k x 50 µs
    assert p["need_maxlen"]["cpu"] == pytest.approx(1.0)  # exactly one node at half a core
    # in: 41 MB/s, to one replica: 41 MB/s, read by one group: 40 MB/s
    assert p["network_bytes_s"] == pytest.approx(122e6)
    assert p["memory_maxlen_bytes"] == pytest.approx(100_000 * 4000.0)
    assert p["maxlen_covers_s"] == pytest.approx(10.0)
    assert p["memory_retention_bytes"] == pytest.approx(10_000 * 3600 * 4000.0)  # 144 GB
    assert p["nodes_maxlen"] == 1
    assert p["breaks_first_maxlen"] == "cpu"
    assert p["nodes_1h"] == math.ceil(144e9 / 25e9) == 6
    assert p["breaks_first_1h"] == "memory"
    assert p["proxy_processes"] == math.ceil(10_000 * 300e-6 / 0.7) == 5
    assert p["comparator_workers"] == math.ceil(10_000 / (5000 * 0.7)) == 3


def test_nodes_grow_with_the_rate_and_the_assumptions_are_used() -> None:
    assert plan(100_000, UNIT)["nodes_maxlen"] == 10  # 5 cores of redis CPU at half a core each
    no_pairs = Assumptions(pairs_per_record=0.0)
    p = plan(100_000, UNIT, no_pairs)
    assert p["redis_cpu_cores"] == pytest.approx(1.5)  # the append alone
    assert p["comparator_workers"] == 1  # at least one
    sharded = plan(100_000, UNIT, Assumptions(streams=4))
    assert sharded["memory_maxlen_bytes"] == pytest.approx(4 * 100_000 * 4000.0)  # maxlen is per stream


def test_one_node_ceiling_is_where_plan_needs_a_second_node() -> None:
    ceiling = one_node_ceiling(UNIT)
    assert ceiling["cpu"] == pytest.approx(10_000)
    for resource, key in (("cpu", "cpu"), ("network", "network"), ("memory_1h", "memory")):
        at = plan(ceiling[resource], UNIT)
        assert at["need_1h"][key] == pytest.approx(1.0)
        assert plan(ceiling[resource] * 1.01, UNIT)["nodes_1h"] >= 2
