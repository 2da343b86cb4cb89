"""Typed, validated configuration: the only reader of TOML files and SHADOW_PROXY_* variables.

Precedence, lowest first: built-in defaults, the TOML file, environment variables
(``SHADOW_PROXY_<SECTION>_<KEY>``), CLI flags. Everything is validated once, by pydantic,
into frozen models that the rest of the program receives and never mutates.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from .headers import HOP_BY_HOP, REQUEST_REPLACED

ENV_PREFIX = "SHADOW_PROXY_"
SECRET_KEYS = frozenset({"token", "api_key", "feedback_secret"})
MASK = "***"

_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


class ConfigError(ValueError):
    """A configuration problem, phrased as one line naming the key and the fix."""


def _parse_size(value: Any) -> Any:
    """Accept 1048576, "1MiB", "64 KiB", "10MB"; leave other types for pydantic to reject."""
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match is None or match.group(2).lower() not in _SIZE_UNITS:
            raise ValueError("expected a byte size such as 1048576, '64KiB' or '10MiB'")
        return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    return value


ByteSize = Annotated[int, BeforeValidator(_parse_size), Field(ge=0)]
Seconds = Annotated[float, Field(ge=0)]
PositiveSeconds = Annotated[float, Field(gt=0)]


def _validate_listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError("expected HOST:PORT, for example 127.0.0.1:8080 (port 0 picks a free port)")
    return value


def split_listen(value: str) -> tuple[str, int]:
    """Split a validated HOST:PORT (IPv6 hosts may be bracketed)."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


Listen = Annotated[str, BeforeValidator(lambda v: _validate_listen(v) if isinstance(v, str) else v)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProxyConfig(_Section):
    listen: Listen = "0.0.0.0:8080"
    workers: int = Field(default=1, ge=1, le=64)
    request_id_header: str = "x-request-id"
    via: str = "shadow-proxy"
    shutdown_timeout: Seconds = 30.0
    keepalive_timeout: Seconds = 75.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"


class AdminConfig(_Section):
    listen: Listen = "127.0.0.1:9901"
    # Needed for mutations and for recorded content (report examples); required off loopback.
    token: SecretStr = SecretStr("")
    health_check_timeout: PositiveSeconds = 1.0
    report_cache_seconds: Seconds = 5.0

    @field_validator("token", mode="before")
    @classmethod
    def _token(cls, value: Any, info: ValidationInfo) -> Any:
        return resolved_secret(value, info, "admin.token")


class PriceConfig(_Section):
    input_per_1k: float = Field(default=0.0, ge=0.0)
    output_per_1k: float = Field(default=0.0, ge=0.0)


_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP header name (RFC 9110 token)
# Headers the proxy sets itself, and hop-by-hop ones (RFC 9110 §7.6.1) that describe one connection:
# shaping may not touch them.
_UNSHAPEABLE = HOP_BY_HOP | REQUEST_REPLACED
_REFERENCE = re.compile(r"\$\{([^}]*)\}")


def http_url(value: str, example: str) -> str:
    """An http(s) URL without its trailing slash; empty stays empty (the feature is off)."""
    if value and not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
        raise ValueError(f"expected an http:// or https:// URL such as {example}")
    return value.rstrip("/")


def _resolve(template: str, environ: Mapping[str, str], where: str) -> str:
    """Expand ${VAR} (an environment variable) and ${file:PATH} (a mounted secret, trailing newline dropped)."""

    def one(match: re.Match[str]) -> str:
        ref = match.group(1)
        if ref.startswith("file:"):
            try:
                # Secrets files (and Kubernetes Secret values) often end with a newline: it is not the value.
                return Path(ref[5:]).read_text().rstrip("\r\n")
            except OSError as exc:
                raise ValueError(f"{where}: secret file {ref[5:]} cannot be read ({exc.strerror})") from None
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", ref):
            # Not echoed: a value pasted where a name belongs may be the secret itself.
            raise ValueError(f"{where}: a ${{...}} reference is not a variable name: use ${{NAME}} or ${{file:/path}}")
        if ref not in environ:
            raise ValueError(f"{where}: environment variable {ref} is not set: export it or remove the reference")
        return environ[ref].rstrip("\r\n")

    value = _REFERENCE.sub(one, template)
    if any(ord(c) < 0x20 and c != "\t" or ord(c) == 0x7F for c in value):
        raise ValueError(f"{where}: the value holds a control character (a line break?), which no header may carry")
    return value


def resolved_secret(value: Any, info: ValidationInfo, where: str) -> Any:
    """A secret string with its ${VAR} / ${file:PATH} references expanded; other types left for pydantic."""
    if not isinstance(value, str):
        return value
    return _resolve(value, (info.context or {}).get("environ", os.environ), where)


class UpstreamConfig(_Section):
    url: str = ""
    connect_timeout: PositiveSeconds = 5.0
    read_timeout: PositiveSeconds = 300.0
    total_timeout: Seconds = 0.0
    pool_size: int = Field(default=512, ge=1)
    health_path: str = ""
    # Request shaping for this arm (see shaping.py): the JSON body's model field and headers.
    model: str | dict[str, str] = ""
    set_headers: dict[str, SecretStr] = Field(default_factory=dict)
    remove_headers: tuple[str, ...] = ()
    price: PriceConfig = PriceConfig()

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return http_url(value, "http://127.0.0.1:8000")

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value
        if isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            if not all(value.values()):
                raise ValueError("a model map may not rewrite a name to an empty string")
            return dict(value)
        raise ValueError(
            'expected a model name (model = "gpt-4.1-mini") or a table mapping incoming model names to this '
            'arm\'s ([candidate.model] "gpt-4o-mini" = "gpt-4.1-mini", "*" = any other)'
        )

    @field_validator("set_headers", mode="before")
    @classmethod
    def _set_headers(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, Mapping):
            raise ValueError('expected a table of header names to values: { authorization = "Bearer ${API_KEY}" }')
        environ = (info.context or {}).get("environ", os.environ)
        resolved = {}
        for name, template in value.items():
            _check_shaped_header(name)
            if name.lower() in resolved:
                raise ValueError(f"header {name} is set twice (header names are case-insensitive)")
            if isinstance(template, SecretStr):
                template = template.get_secret_value()
            if not isinstance(template, str):
                raise ValueError(f"header {name}: expected a string value")
            resolved[name.lower()] = _resolve(template, environ, f"header {name}")
        return resolved

    @field_validator("remove_headers")
    @classmethod
    def _remove_headers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            _check_shaped_header(name)
        return tuple(name.lower() for name in value)


def _check_shaped_header(name: str) -> None:
    if not _TOKEN.match(name):
        raise ValueError(f"{name!r} is not a header name")
    if name.lower() in _UNSHAPEABLE:
        raise ValueError(f"header {name} is set by the proxy itself and cannot be shaped")


class CandidateConfig(UpstreamConfig):
    name: str = Field(default="candidate", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    connect_timeout: PositiveSeconds = 2.0
    read_timeout: PositiveSeconds = 60.0
    total_timeout: Seconds = 120.0
    pool_size: int = Field(default=256, ge=1)
    # Per-candidate mirroring; unset means the [shadow] value.
    sample_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    routes: tuple[str, ...] | None = None
    max_in_flight: int | None = Field(default=None, ge=1)
    slow_after: Seconds | None = None
    # Spend cap on mirrors: the candidate's cost over the last hour (its price table, else the maintained
    # price list, and the usage its answers report). Beyond it mirrors are skipped (reason "budget"). 0: none.
    budget_per_hour: float = Field(default=0.0, ge=0.0)

    @field_validator("name")
    @classmethod
    def _not_incumbent(cls, value: str) -> str:
        if value.startswith("incumbent"):
            raise ValueError("names starting with 'incumbent' label the incumbent's arms: choose another name")
        return value


class ShadowConfig(_Section):
    sample_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    routes: tuple[str, ...] = ("/*",)
    methods: tuple[str, ...] = ("POST",)
    max_in_flight: int = Field(default=256, ge=1)
    max_body_bytes: ByteSize = 1024**2
    breaker_failures: int = Field(default=20, ge=0)
    breaker_cooldown: PositiveSeconds = 5.0
    breaker_max_cooldown: PositiveSeconds = 300.0
    slow_after: Seconds = 30.0
    # The learned slow threshold (breaker.SlowThreshold): min(slow_after, max(slow_floor, slow_factor x p99)).
    slow_factor: float = Field(default=4.0, ge=0.0)
    slow_floor: Seconds = 1.0
    slow_min_samples: int = Field(default=50, ge=1, le=200)  # at most the 200 answers it learns from
    marker_header: str = "x-shadow-request"
    marker_value: str = "1"
    drain_timeout: Seconds = 10.0
    # "process": mirrors, their reads and recording run in a shadow process of their own, fed over a Unix socket
    # (docs/live-path.md, "Isolation"); "inline": on the serving process's event loop.
    isolation: Literal["inline", "process"] = "inline"
    isolation_buffer_bytes: ByteSize = 64 * 1024**2  # unsent bytes to the shadow process; over it: dropped, counted
    isolation_max_pending: int = Field(default=10_000, ge=1)  # requests the shadow process holds awaiting their end
    isolation_pending_timeout: PositiveSeconds = 900.0  # a request whose live end never came is forgotten after this

    @field_validator("methods")
    @classmethod
    def _upper(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(m.upper() for m in value)


CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


def is_cluster_url(url: str) -> bool:
    """A Redis Cluster URL: ``redis+cluster://`` (or ``rediss+cluster://`` for TLS)."""
    return url.startswith(CLUSTER_SCHEMES)


def cluster_nodes(url: str) -> tuple[tuple[str, int], ...]:
    """The seed nodes of ``redis+cluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...][/0]``; ValueError if malformed.

    Any one reachable seed is enough: the client reads the whole topology (CLUSTER SLOTS) from it.
    """
    rest = url.split("://", 1)[1].rsplit("@", 1)[-1]
    if "?" in rest or "#" in rest:
        raise ValueError(
            "a redis+cluster:// URL takes no query or fragment: write redis+cluster://HOST:PORT[,HOST:PORT]"
        )
    hosts, _, path = rest.partition("/")
    if path not in ("", "0"):
        raise ValueError("Redis Cluster has only database 0: drop the /DB part of the URL")
    nodes = []
    for item in hosts.split(","):
        host, sep, port = item.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"expected redis+cluster://HOST:PORT[,HOST:PORT...], one or more seed nodes (got {item.strip()!r})"
            )
        nodes.append((host, int(port)))
    return tuple(nodes)


class RecordConfig(_Section):
    enabled: bool = True
    redis_url: str = ""
    namespace: str = Field(default="shadow", pattern=r"^[A-Za-z0-9_.:-]+$")
    stream: str = "records"
    # Record streams: records (and what is built from them) spread over this many hash tags (docs/redis.md).
    shards: int = Field(default=1, ge=1, le=1024)
    maxlen: int = Field(default=100_000, ge=1)
    max_body_bytes: ByteSize = 256 * 1024
    queue_max_records: int = Field(default=10_000, ge=1)
    queue_max_bytes: ByteSize = 64 * 1024**2
    batch_size: int = Field(default=256, ge=1)
    linger: Seconds = 0.05
    retry_interval: PositiveSeconds = 0.5
    flush_timeout: Seconds = 5.0
    socket_timeout: PositiveSeconds = 5.0
    redact_headers: tuple[str, ...] = ()
    redact_json_paths: tuple[str, ...] = ()
    redact_keys: tuple[str, ...] = ()  # extra secret key names, matched like the built-in ones (redaction.py)
    redact_query_params: tuple[str, ...] = ("api_key", "api-key", "key", "token", "access_token")
    redact_marker: str = "[REDACTED]"
    # The disk spool: every record is written here before Redis, and replayed after a restart (docs/spool.md).
    spool_dir: str = ""
    spool_max_bytes: ByteSize = 1024**3
    spool_fsync: bool = False
    embedded_dir: str = ""

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if is_cluster_url(value):
            cluster_nodes(value)  # raises ValueError naming what is wrong
        elif value and not re.match(r"^(rediss?|unix)://", value):
            raise ValueError(
                "expected redis://HOST:PORT/DB, rediss://, unix://, or redis+cluster://HOST:PORT[,HOST:PORT...] "
                "for a Redis Cluster (empty starts an embedded Redis)"
            )
        return value


class GatesConfig(_Section):
    min_pairs: int = Field(default=100, ge=1)
    latency_p50_increase_pct: float = Field(default=10.0, ge=0.0)
    latency_p99_increase_pct: float = Field(default=25.0, ge=0.0)
    latency_min_effect_ms: float = Field(default=1.0, ge=0.0)
    error_rate_increase_pp: float = Field(default=1.0, ge=0.0)
    divergence_excess_pp: float = Field(default=5.0, ge=0.0)
    similarity_shift_max: float = Field(default=0.05, ge=0.0, le=1.0)
    noise_quantiles: tuple[float, ...] = Field(default=(0.01, 0.05), min_length=1)
    min_noise_pairs: int = Field(default=50, ge=1)
    cost_ratio_max: float = Field(default=1.10, gt=0.0)
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
    fdr: float = Field(default=0.05, gt=0.0, lt=1.0)
    # The pairwise judge: fails when the candidate's win rate is clearly below 50% minus this margin.
    judge_margin_pp: float = Field(default=10.0, ge=0.0, lt=50.0)
    judge_min_pairs: int = Field(default=30, ge=1)

    @field_validator("noise_quantiles")
    @classmethod
    def _quantiles(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not all(0.0 < q < 0.5 for q in value):
            raise ValueError("each quantile of the A/A similarity must lie strictly between 0 and 0.5")
        return value


class _Endpoint(_Section):
    """An OpenAI-compatible API the comparator calls (off when url is empty); its key never leaves the header."""

    url: str = ""
    model: str = ""
    api_key: SecretStr = SecretStr("")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return http_url(value, "http://127.0.0.1:8000/v1")

    @field_validator("api_key", mode="before")
    @classmethod
    def _api_key(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if not isinstance(value, str):
            raise ValueError('expected a string such as "${EMBEDDINGS_API_KEY}"')
        return _resolve(value, (info.context or {}).get("environ", os.environ), "api_key")


class SemanticConfig(_Endpoint):
    """An OpenAI-compatible embeddings endpoint the user runs, for semantic similarity (off when url is empty)."""

    batch_size: int = Field(default=64, ge=1, le=2048)
    max_in_flight: int = Field(default=2, ge=1, le=64)
    rate_per_second: float = Field(default=20.0, gt=0.0)
    timeout: PositiveSeconds = 5.0
    cache_entries: int = Field(default=10_000, ge=0)


class JudgeConfig(_Endpoint):
    """An OpenAI-compatible chat endpoint that judges sampled pairs blind (off when url is empty)."""

    sample_rate: float = Field(default=0.05, ge=0.0, le=1.0)
    # The judge's spend over the last hour (its price table, else the maintained price list), per worker.
    budget_per_hour: float = Field(default=0.0, ge=0.0)
    max_in_flight: int = Field(default=2, ge=1, le=64)
    timeout: PositiveSeconds = 20.0
    price: PriceConfig = PriceConfig()


class CompareConfig(_Section):
    group: str = "comparators"
    consumer: str = ""
    batch_size: int = Field(default=256, ge=1, le=10_000)
    block_ms: int = Field(default=2000, ge=0)
    claim_idle_ms: int = Field(default=30_000, ge=100)
    window_seconds: int = Field(default=60, ge=1)
    window_ttl: int = Field(default=7 * 86400, ge=60)
    dedup_ttl: int = Field(default=900, ge=10)
    reservoir_per_window: int = Field(default=1000, ge=10)
    examples_per_window: int = Field(default=10, ge=0)
    dead_letter_maxlen: int = Field(default=10_000, ge=1)
    health_ttl: int = Field(default=30, ge=1)
    noise_sample_rate: float = Field(default=0.1, ge=0.0, le=1.0)
    ignore_paths: tuple[str, ...] = ("id", "created", "system_fingerprint", "usage", "model")
    abs_tolerance: float = Field(default=1e-6, ge=0.0)
    rel_tolerance: float = Field(default=1e-3, ge=0.0)
    report_since: str = Field(default="1h", pattern=r"^\d+[smhd]$")
    drift_threshold_pct: float = Field(default=20.0, ge=0.0)
    gates: GatesConfig = GatesConfig()
    semantic: SemanticConfig = SemanticConfig()
    judge: JudgeConfig = JudgeConfig()


class StageConfig(_Section):
    weight: float = Field(ge=0.0, le=1.0)
    min_duration: Seconds = 600.0
    # A stage advances on evidence only: at least one pair and one gate (else it would promote on time alone).
    min_pairs: int = 200
    gates: tuple[str, ...] = ("latency_p50", "latency_p99", "error_rate", "divergence")

    @field_validator("min_pairs")
    @classmethod
    def _some_pairs(cls, value: int) -> int:
        if value < 1:
            raise ValueError("a stage needs at least 1 pair, or it would advance with no evidence")
        return value

    @field_validator("gates")
    @classmethod
    def _known_gates(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        known = {"latency_p50", "latency_p99", "error_rate", "divergence", "cost", "satisfaction", "judge"}
        if not value:
            raise ValueError(
                f"a stage needs at least one gate, or it would advance with no evidence: use {', '.join(sorted(known))}"
            )
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown gate(s) {', '.join(unknown)}: use {', '.join(sorted(known))}")
        return value


def _default_stages() -> tuple[StageConfig, ...]:
    return tuple(StageConfig(weight=w) for w in (0.0, 0.01, 0.05, 0.25, 0.5, 1.0))


class CanaryConfig(_Section):
    enabled: bool = False
    candidate: str = ""
    stage: tuple[StageConfig, ...] = Field(default_factory=_default_stages, min_length=1)
    on_fail: Literal["rollback", "pause"] = "rollback"
    evaluate_interval: PositiveSeconds = 10.0
    lease_ttl: PositiveSeconds = 15.0
    weight_poll_interval: PositiveSeconds = 5.0
    sticky_keys: tuple[str, ...] = ("header:x-user-id", "cookie:session_id", "header:authorization", "client_ip")
    # Empty: no header says which arm served (a user who knows could bias the feedback).
    served_by_header: str = ""
    reverse_shadow: bool = True
    feedback_path: str = "/_shadow/feedback"
    # Key of the per-request feedback tokens; every replica must share it (empty: random per process tree).
    feedback_secret: SecretStr = SecretStr("")
    feedback_ttl: int = Field(default=86_400, ge=60)
    min_feedback: int = Field(default=30, ge=2)
    satisfaction_drop_max: float = Field(default=0.05, ge=0.0)

    @field_validator("feedback_secret", mode="before")
    @classmethod
    def _feedback_secret(cls, value: Any, info: ValidationInfo) -> Any:
        return resolved_secret(value, info, "canary.feedback_secret")

    @field_validator("sticky_keys")
    @classmethod
    def _sticky(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            kind, _, name = item.partition(":")
            if kind not in ("header", "cookie", "client_ip") or (kind != "client_ip" and not name):
                raise ValueError(f"bad sticky key {item!r}: use header:NAME, cookie:NAME or client_ip")
        return value


class LimitsConfig(_Section):
    max_body_bytes: ByteSize = 10 * 1024**2
    max_header_bytes: int = Field(default=16 * 1024, ge=1024)
    max_headers: int = Field(default=128, ge=8)
    # Slow clients (see clients.py): complete headers within header_timeout of a request's first byte, then a
    # body that keeps coming: body_timeout plus one second per body_min_rate bytes received.
    header_timeout: PositiveSeconds = 10.0
    body_timeout: PositiveSeconds = 10.0
    body_min_rate: ByteSize = 1024
    # Greedy clients, per worker process: over them a connection or request gets 503 with Retry-After.
    max_connections: int = Field(default=10_000, ge=1)
    max_in_flight: int = Field(default=1024, ge=1)


def _candidates(value: Any) -> Any:
    """``[candidate]`` (one table) or ``[[candidate]]`` (several). A single table without a url is still
    validated (a misspelt key is an error), then means "no candidate" (see ``_check_candidates``)."""
    if isinstance(value, Mapping):
        return (value,)
    return value


class Config(_Section):
    proxy: ProxyConfig = ProxyConfig()
    admin: AdminConfig = AdminConfig()
    incumbent: UpstreamConfig = UpstreamConfig()
    candidate: Annotated[tuple[CandidateConfig, ...], BeforeValidator(_candidates)] = ()
    shadow: ShadowConfig = ShadowConfig()
    record: RecordConfig = RecordConfig()
    compare: CompareConfig = CompareConfig()
    canary: CanaryConfig = CanaryConfig()
    limits: LimitsConfig = LimitsConfig()


SECTIONS: dict[str, type[_Section]] = {
    "proxy": ProxyConfig,
    "admin": AdminConfig,
    "incumbent": UpstreamConfig,
    "candidate": CandidateConfig,
    "shadow": ShadowConfig,
    "record": RecordConfig,
    "compare": CompareConfig,
    "canary": CanaryConfig,
    "limits": LimitsConfig,
}

# Nested tables, for naming them in error messages.
_NESTED: dict[str, type[_Section]] = {
    "price": PriceConfig,
    "gates": GatesConfig,
    "stage": StageConfig,
    "semantic": SemanticConfig,
    "judge": JudgeConfig,
}


def parse_duration(text: str) -> float:
    """Seconds in "90s", "15m", "2h", "7d"."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if match is None:
        raise ValueError(f"expected a duration such as 90s, 15m, 2h or 7d, got {text!r}")
    return int(match.group(1)) * units[match.group(2)]


def _env_value(raw: str) -> Any:
    """Read an environment value as a TOML value when it is one (0.5, true, ["/v1/*"]), else a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


# Kubernetes injects <SERVICE>_SERVICE_HOST, <SERVICE>_PORT, <SERVICE>_PORT_9901_TCP_ADDR, ... for every
# Service; a Service named shadow-proxy-admin would otherwise look like an unknown [admin] key. Only a
# name of that shape holding a value of that shape is skipped: SHADOW_PROXY_ADMIN_PORT=9901 is a mistake.
_ADDRESS = r"(tcp|udp|sctp)://[\w.:\[\]-]+:\d+"
_SERVICE_LINK = (
    (re.compile(r".+_SERVICE_HOST"), re.compile(r"[\w.:-]+")),
    (re.compile(r".+_SERVICE_PORT(_\w+)?"), re.compile(r"\d+")),
    (re.compile(r".+_PORT(_\d+_(TCP|UDP|SCTP))?"), re.compile(_ADDRESS)),
    (re.compile(r".+_PORT_\d+_(TCP|UDP|SCTP)_PROTO"), re.compile(r"tcp|udp|sctp")),
    (re.compile(r".+_PORT_\d+_(TCP|UDP|SCTP)_PORT"), re.compile(r"\d+")),
    (re.compile(r".+_PORT_\d+_(TCP|UDP|SCTP)_ADDR"), re.compile(r"[\w.:-]+")),
)


def _service_link(name: str, value: str) -> bool:
    return any(n.fullmatch(name) and v.fullmatch(value) for n, v in _SERVICE_LINK)


def env_names() -> list[str]:
    """Every SHADOW_PROXY_<SECTION>_<KEY> the configuration reads."""
    return [f"{ENV_PREFIX}{s}_{k}".upper() for s, model in SECTIONS.items() for k in model.model_fields]


def did_you_mean(name: str, known: list[str]) -> str:
    """' (did you mean X?)' for the closest known names, else nothing."""
    close = difflib.get_close_matches(name, known, n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("_")
        real = section in SECTIONS and key in SECTIONS[section].model_fields
        if not real and _service_link(name, raw):
            continue
        if section not in SECTIONS or not key:
            known = ", ".join(sorted(SECTIONS))
            raise ConfigError(
                f"unknown environment variable {name}{did_you_mean(name, env_names())}: expected "
                f"{ENV_PREFIX}<SECTION>_<KEY> with SECTION one of {known}"
            )
        overrides.setdefault(section, {})[key] = _env_value(raw)
    return overrides


def _conventional(environ: Mapping[str, str]) -> dict[str, Any]:
    """REDIS_URL, the name platforms (Heroku, Render, Railway, Compose files) give an attached Redis: the
    lowest layer for record.redis_url, under the file, SHADOW_PROXY_RECORD_REDIS_URL and --redis-url."""
    url = environ.get("REDIS_URL", "")
    return {"record": {"redis_url": url}} if url else {}


def _merge(base: dict[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in layer.items():
        if key == "candidate" and isinstance(value, Mapping) and isinstance(merged.get(key), list):
            merged[key] = _merge_into_candidates(merged[key], value)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _merge_into_candidates(entries: list[Any], layer: Mapping[str, Any]) -> list[Any]:
    """SHADOW_PROXY_CANDIDATE_* and --candidate apply to the only candidate; with several they are ambiguous."""
    if len(entries) > 1:
        raise ConfigError(
            f"candidate.{next(iter(layer))} set by a flag or SHADOW_PROXY_CANDIDATE_* is ambiguous with "
            f"{len(entries)} [[candidate]] entries: set it in the entry of the candidate it is for"
        )
    first = entries[0] if entries and isinstance(entries[0], Mapping) else {}
    return [_merge(dict(first), layer)]


def _describe(error: Any, sources: str) -> str:
    """Turn the first pydantic error into one line: key, bad value, what is expected, where to fix it."""
    loc = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        names = [str(p) for p in error["loc"][:-1] if not isinstance(p, int)]  # candidate.1.x: [[candidate]]
        table = ".".join(names)
        model = (SECTIONS.get(table) or _NESTED.get(names[-1])) if names else None
        fields = list(model.model_fields if model else SECTIONS)
        where = f"[{table}]" if model else "the top level"
        hint = did_you_mean(str(error["loc"][-1]), fields)
        return f"unknown config key {loc}{hint}: remove it or use one of {where}: {', '.join(fields)}"
    if error["loc"] == ("canary", "stage") and error["type"] == "tuple_type":
        return f"invalid config key canary.stage: write each stage as a [[canary.stage]] table (fix it in {sources})"
    # Header values may hold credentials: never echo them.
    secret = error["loc"][-1] in SECRET_KEYS or "set_headers" in error["loc"]
    shown = MASK if secret else repr(error.get("input"))
    if error["loc"][-1] == "redis_url":  # a URL may hold a password: show it masked
        shown = repr(re.sub(r"//([^@/]*):([^@/]*)@", r"//\1:" + MASK + "@", str(error.get("input"))))
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"invalid config key {loc} = {shown}: {message} (fix it in {sources})"


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Load, merge and validate the configuration once; raise ConfigError with a one-line message."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found: pass an existing file to --config") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    environ = os.environ if environ is None else environ
    data = _merge(_conventional(environ), data)
    data = _merge(data, _env_overrides(environ))
    data = _merge(data, overrides or {})
    sources = f"{path or 'the config file'}, {ENV_PREFIX}* or the CLI flag"
    if "REDIS_URL" in environ:
        sources += " or REDIS_URL"
    entries = data.get("candidate")
    for index, entry in enumerate(entries if isinstance(entries, list) else []):
        if isinstance(entry, Mapping) and not entry.get("url"):
            raise ConfigError(
                f"missing config key candidate.{index}.url: every [[candidate]] needs a url (fix it in {sources})"
            )
    try:
        config = Config.model_validate(data, context={"environ": environ})
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0], sources)) from None
    return _check_judge(_check_candidates(config, sources), sources)


def _check_candidates(config: Config, sources: str) -> Config:
    """What one candidate's table cannot see: names unique, the canary's candidate known (and named when
    there are several). The single table without a url (the documented ``[candidate] url = ""``) means no
    candidate at all; a ``[[candidate]]`` entry without one was refused before validation."""
    if len(config.candidate) == 1 and not config.candidate[0].url:
        config = config.model_copy(update={"candidate": ()})
    seen: set[str] = set()
    for index, candidate in enumerate(config.candidate):
        if candidate.name in seen:
            hint = (
                'give each [[candidate]] a name (name = "...")'
                if "name" not in candidate.model_fields_set
                else ("give each [[candidate]] a unique name")
            )
            raise ConfigError(
                f"invalid config key candidate.{index}.name = {candidate.name!r}: another candidate has this name; "
                f"{hint} (fix it in {sources})"
            )
        seen.add(candidate.name)
    wanted = config.canary.candidate
    if wanted and wanted not in seen:
        known = ", ".join(sorted(seen)) or "none is configured"
        raise ConfigError(
            f"invalid config key canary.candidate = {wanted!r}: no candidate has this name ({known}) "
            f"(fix it in {sources})"
        )
    for index, stage in enumerate(config.canary.stage):
        if "judge" in stage.gates and not config.compare.judge.url:
            raise ConfigError(
                f"invalid config key canary.stage.{index}.gates: the stage waits on the judge gate but "
                f'compare.judge.url is empty, so it could never pass: set [compare.judge] url or drop "judge" '
                f"(fix it in {sources})"
            )
    if config.canary.enabled and not wanted and len(seen) > 1:
        raise ConfigError(
            f"missing config key canary.candidate: with {len(seen)} candidates, name the one the canary promotes "
            f"({', '.join(sorted(seen))}) (fix it in {sources})"
        )
    return config


def normalised_url(url: str) -> str:
    """An API base for comparison: scheme and host in lower case, the default port explicit, no trailing
    slash and no trailing /v1 (an OpenAI base is often written either way)."""
    parts = urlsplit(url)
    try:
        port = str(parts.port or (443 if parts.scheme.lower() == "https" else 80))
    except ValueError:  # not a number: compared as written
        port = parts.netloc.rpartition(":")[2]
    path = parts.path.rstrip("/").removesuffix("/v1").rstrip("/")
    return f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}:{port}{path}"


def _check_judge(config: Config, sources: str) -> Config:
    """A judge that is also one of the arms would grade its own answers: refused."""
    judge = config.compare.judge
    if not judge.url:
        return config
    arms = [("the incumbent", config.incumbent.url)] + [(f"candidate {c.name}", c.url) for c in config.candidate]
    for label, url in arms:
        if url and normalised_url(url) == normalised_url(judge.url):
            raise ConfigError(
                f"invalid config key compare.judge.url = {judge.url!r}: a judge that is also one of the arms "
                f"({label}) would grade its own answers: point it at a model that is neither (fix it in {sources})"
            )
    return config


def require_incumbent(config: Config) -> None:
    """The proxy cannot start without an incumbent; say how to give one."""
    if not config.incumbent.url:
        raise ConfigError(
            "missing config key incumbent.url: pass --incumbent URL, set [incumbent] url, or SHADOW_PROXY_INCUMBENT_URL"
        )


def on_loopback(listen: str) -> bool:
    """True when HOST:PORT only accepts connections from this host."""
    host, _ = split_listen(listen)
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def require_admin_token(config: Config) -> None:
    """An admin listener other hosts can reach serves recorded prompts and answers and moves the canary:
    it needs a token (serve and check-config refuse it otherwise)."""
    if config.admin.token.get_secret_value() or on_loopback(config.admin.listen):
        return
    raise ConfigError(
        f"missing config key admin.token: admin.listen = {config.admin.listen!r} is not a loopback address and "
        'the admin API serves recorded prompts and answers: set [admin] token (e.g. "${file:/run/secrets/token}") '
        "or SHADOW_PROXY_ADMIN_TOKEN, or listen on 127.0.0.1"
    )


def canary_candidate(config: Config) -> CandidateConfig | None:
    """The candidate a canary promotes: canary.candidate by name, else the first one."""
    for candidate in config.candidate:
        if candidate.name == config.canary.candidate or not config.canary.candidate:
            return candidate
    return None


def masked(config: Config) -> dict[str, Any]:
    """The resolved configuration as plain data with secrets masked, for printing."""
    # set_headers values are SecretStr: model_dump shows them as "**********".
    data = config.model_dump(mode="json")
    for section in data.values():
        if not isinstance(section, dict):
            continue
        for key in SECRET_KEYS & section.keys():
            if section[key]:
                section[key] = MASK
    for section in ("record",):
        url = data[section].get("redis_url", "")
        data[section]["redis_url"] = re.sub(r"//([^@/]*):([^@/]*)@", r"//\1:" + MASK + "@", url)
    return data
