"""Pure routing decisions: sampling by request id, route globs, skip reasons."""

from proxy.routing import MirrorPolicy, RouteTable, sampled, unit_hash


def _policy(**overrides: object) -> MirrorPolicy:
    values: dict[str, object] = {
        "routes": RouteTable.compile(("/v1/*",)),
        "methods": frozenset({"POST"}),
        "sample_rate": 1.0,
        "max_body_bytes": 100,
    }
    values.update(overrides)
    return MirrorPolicy(**values)  # type: ignore[arg-type]


def test_unit_hash_is_stable_and_in_range() -> None:
    """The same key gives the same value in [0, 1) every time (replicas agree)."""
    assert unit_hash("abc") == unit_hash("abc")
    assert all(0.0 <= unit_hash(str(i)) < 1.0 for i in range(1000))


def test_sample_rate_is_honoured_in_proportion() -> None:
    """About rate × n of n request ids are sampled; 0 and 1 are exact."""
    ids = [f"req-{i}" for i in range(20_000)]
    share = sum(sampled(i, 0.25) for i in ids) / len(ids)
    assert 0.23 < share < 0.27
    assert not any(sampled(i, 0.0) for i in ids[:100])
    assert all(sampled(i, 1.0) for i in ids[:100])


def test_route_table_returns_first_matching_glob() -> None:
    """Globs match whole paths; the matching pattern is the route label."""
    table = RouteTable.compile(("/v1/chat/*", "/v1/*"))
    assert table.match("/v1/chat/completions") == "/v1/chat/*"
    assert table.match("/v1/embeddings") == "/v1/*"
    assert table.match("/healthz") is None


def test_skip_reasons() -> None:
    """Each way a request is not mirrored has its own reason."""
    assert _policy().skip_reason(method="POST", path="/v1/x", request_id="r", body_size=10) is None
    assert _policy().skip_reason(method="GET", path="/v1/x", request_id="r", body_size=1) == "route_not_mirrored"
    assert _policy().skip_reason(method="POST", path="/v2/x", request_id="r", body_size=1) == "route_not_mirrored"
    assert (
        _policy(sample_rate=0.0).skip_reason(method="POST", path="/v1/x", request_id="r", body_size=1) == "not_sampled"
    )
    assert _policy().skip_reason(method="POST", path="/v1/x", request_id="r", body_size=101) == "body_too_large"


def test_lower_sample_rates_take_subsets_of_higher_ones() -> None:
    """Candidates sampled at 10% and 50% see nested samples, so they compare on the same requests."""
    ids = [f"req-{i}" for i in range(5_000)]
    low = {i for i in ids if sampled(i, 0.1)}
    high = {i for i in ids if sampled(i, 0.5)}
    assert low and low <= high
