"""Config: typed defaults, precedence file < environment < flags, one-line errors naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import CandidateConfig, ConfigError, load_config, masked, require_admin_token


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_are_documented_values() -> None:
    """Without a file the documented defaults apply."""
    config = load_config(None, environ={})
    assert config.proxy.listen == "0.0.0.0:8080"
    assert config.admin.listen == "127.0.0.1:9901"
    assert config.limits.max_body_bytes == 10 * 1024**2
    assert config.shadow.marker_header == "x-shadow-request"


def test_example_config_is_valid_and_complete() -> None:
    """config.example.toml loads, shows the real defaults and mentions every key of every table."""
    example = Path(__file__).parent.parent / "config.example.toml"
    config = load_config(example, environ={})
    assert config == load_config(None, environ={}), "the example must show the defaults the code uses"
    text = example.read_text()
    dumped = config.model_dump()
    # Candidates are a list (empty by default): document every key of one, in the [candidate] table.
    dumped["candidate"] = CandidateConfig().model_dump()
    tables = [(section, values) for section, values in dumped.items()]
    tables += [(f"{s}.{k}", v) for s, values in tables for k, v in values.items() if isinstance(v, dict)]
    for table, values in tables:
        assert f"[{table}]" in text, f"[{table}] is not in config.example.toml"
        body = text.split(f"[{table}]", 1)[1].split("\n[", 1)[0]
        for key, value in values.items():
            if isinstance(value, list | tuple) and value and isinstance(value[0], dict):
                entry = text.split(f"[[{table}.{key}]]", 1)[1].split("\n[", 1)[0]
                for item in value[0]:
                    assert f"\n{item} =" in entry, f"{table}.{key}.{item} is not documented"
            elif value is None:  # unset by default: shown commented out
                assert f"\n# {key} =" in body, f"{table}.{key} is not documented in config.example.toml"
            elif not isinstance(value, dict):
                assert f"\n{key} =" in body, f"{table}.{key} is not documented in config.example.toml"


def test_environment_overrides_file_and_flags_override_environment(tmp_path: Path) -> None:
    """SHADOW_PROXY_<SECTION>_<KEY> beats the file; CLI overrides beat both; values are typed."""
    path = _write(tmp_path, '[shadow]\nsample_rate = 0.1\n[admin]\nlisten = "127.0.0.1:1"\n')
    environ = {
        "SHADOW_PROXY_SHADOW_SAMPLE_RATE": "0.5",
        "SHADOW_PROXY_ADMIN_LISTEN": "127.0.0.1:9911",
        "SHADOW_PROXY_SHADOW_ROUTES": '["/v1/*"]',
    }
    config = load_config(path, environ=environ, overrides={"admin": {"listen": "127.0.0.1:2"}})
    assert config.shadow.sample_rate == 0.5
    assert config.shadow.routes == ("/v1/*",)
    assert config.admin.listen == "127.0.0.1:2"


def test_byte_sizes_accept_units(tmp_path: Path) -> None:
    """Sizes may be written as integers or with units."""
    config = load_config(
        _write(tmp_path, '[limits]\nmax_body_bytes = "2MiB"\n[record]\nmax_body_bytes = "64 KiB"\n'), environ={}
    )
    assert config.limits.max_body_bytes == 2 * 1024**2
    assert config.record.max_body_bytes == 64 * 1024


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[shadow]\nsampel_rate = 1\n",
            "unknown config key shadow.sampel_rate (did you mean sample_rate?): remove it or use one of [shadow]: ",
        ),
        ("[shadw]\nx = 1\n", "unknown config key shadw"),
        ("[shadow]\nsample_rate = 1.5\n", "invalid config key shadow.sample_rate = 1.5: Input should be less than"),
        ('[proxy]\nlisten = "8080"\n', "invalid config key proxy.listen = '8080': expected HOST:PORT"),
        ('[incumbent]\nurl = "model-a:8000"\n', "invalid config key incumbent.url = 'model-a:8000': expected an http"),
        (
            '[limits]\nmax_body_bytes = "ten"\n',
            "invalid config key limits.max_body_bytes = 'ten': expected a byte size",
        ),
        ("[admin]\ntoken = 5\n", "invalid config key admin.token = ***"),
    ],
)
def test_errors_name_the_key_the_value_and_the_fix(tmp_path: Path, text: str, expected: str) -> None:
    """Every invalid or unknown key produces one line naming it (secrets masked)."""
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), environ={})
    assert str(info.value).startswith(expected)
    assert "\n" not in str(info.value)


def test_unknown_environment_section_is_an_error() -> None:
    """A misspelt SHADOW_PROXY_ variable is refused rather than silently ignored."""
    with pytest.raises(ConfigError, match="unknown environment variable SHADOW_PROXY_SHADDOW_SAMPLE_RATE"):
        load_config(None, environ={"SHADOW_PROXY_SHADDOW_SAMPLE_RATE": "1"})


def test_kubernetes_service_link_variables_are_not_config() -> None:
    """Variables Kubernetes injects for Services named shadow-proxy-* are ignored, not refused."""
    environ = {
        "SHADOW_PROXY_ADMIN_SERVICE_HOST": "10.0.0.5",
        "SHADOW_PROXY_ADMIN_SERVICE_PORT": "9901",
        "SHADOW_PROXY_ADMIN_PORT": "tcp://10.0.0.5:9901",
        "SHADOW_PROXY_ADMIN_PORT_9901_TCP_ADDR": "10.0.0.5",
        "SHADOW_PROXY_ADMIN_PORT_9901_TCP_PROTO": "tcp",
        "SHADOW_PROXY_SERVICE_PORT_HTTP": "80",
        "SHADOW_PROXY_ADMIN_LISTEN": "0.0.0.0:9901",
    }
    assert load_config(None, environ=environ).admin.listen == "0.0.0.0:9901"


@pytest.mark.parametrize("name", ["SHADOW_PROXY_REDIS_URL", "SHADOW_PROXY_RECORD_REDISURL"])
def test_a_misnamed_variable_is_refused_with_the_right_name(name: str) -> None:
    """The names people try first for the Redis URL are refused, and the error names the real one."""
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={name: "redis://h:1/0"})
    assert "SHADOW_PROXY_RECORD_REDIS_URL" in str(info.value) or "did you mean redis_url?" in str(info.value)


def test_redis_url_is_the_conventional_fallback_for_record_redis_url(tmp_path: Path) -> None:
    """REDIS_URL (what platforms set for an attached Redis) applies only when nothing of ours sets the URL."""
    assert load_config(None, environ={"REDIS_URL": "redis://a:1/0"}).record.redis_url == "redis://a:1/0"
    ours = {"REDIS_URL": "redis://a:1/0", "SHADOW_PROXY_RECORD_REDIS_URL": "redis://b:1/0"}
    assert load_config(None, environ=ours).record.redis_url == "redis://b:1/0"
    path = _write(tmp_path, '[record]\nredis_url = "redis://c:1/0"\n')
    assert load_config(path, environ={"REDIS_URL": "redis://a:1/0"}).record.redis_url == "redis://c:1/0"


@pytest.mark.parametrize(
    ("name", "value"),
    [("SHADOW_PROXY_ADMIN_PORT", "9901"), ("SHADOW_PROXY_PROXY_PORT", "8080"), ("SHADOW_PROXY_ADMIN_SERVICE_HOST", "")],
)
def test_our_variables_shaped_like_service_links_are_not_skipped(name: str, value: str) -> None:
    """Only Kubernetes' exact service-link shape (name and value) is skipped: SHADOW_PROXY_ADMIN_PORT=9901 is an
    operator's mistake and is refused, not silently ignored."""
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(None, environ={name: value})


def test_a_typo_in_a_stage_lists_the_stage_keys(tmp_path: Path) -> None:
    """A misspelt key inside [[canary.stage]] names the stage's keys, not the top-level sections."""
    path = _write(tmp_path, "[[canary.stage]]\nweight = 0.1\nmin_pair = 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value).startswith("unknown config key canary.stage.0.min_pair (did you mean min_pairs?)")
    assert "[canary.stage]: weight, min_duration, min_pairs, gates" in str(info.value)


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        ("min_pairs = 0\n", "canary.stage.0.min_pairs = 0: a stage needs at least 1 pair"),
        ("gates = []\n", "canary.stage.0.gates = []: a stage needs at least one gate"),
    ],
)
def test_a_stage_without_evidence_is_refused(tmp_path: Path, stage: str, expected: str) -> None:
    """A stage with no pairs or no gates would promote on time alone: check-config exits 2 saying why."""
    result = _cli("check-config", str(_write(tmp_path, f"[[canary.stage]]\nweight = 1.0\n{stage}")))
    assert result.returncode == 2
    assert expected in result.stderr


def test_masked_hides_token_and_redis_password() -> None:
    """The printable config never shows the admin token or a Redis password."""
    config = load_config(
        None, environ={}, overrides={"admin": {"token": "t0p"}, "record": {"redis_url": "redis://u:pw@h:1/0"}}
    )
    data = masked(config)
    assert data["admin"]["token"] == "***"
    assert data["record"]["redis_url"] == "redis://u:***@h:1/0"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_check_config_prints_resolved_config_and_exits_0(tmp_path: Path) -> None:
    """check-config prints the resolved JSON with secrets masked."""
    result = _cli("check-config", str(_write(tmp_path, '[admin]\ntoken = "s3cret"\n[incumbent]\nurl = "http://a:1"\n')))
    assert result.returncode == 0, result.stderr
    assert '"token": "***"' in result.stdout and "s3cret" not in result.stdout
    assert '"url": "http://a:1"' in result.stdout


def test_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    """serve and check-config exit 2 with a single line naming the key."""
    path = _write(tmp_path, "[shadow]\nmax_in_flight = 0\n")
    for args in (["check-config", str(path)], ["serve", "--config", str(path), "--incumbent", "http://127.0.0.1:1"]):
        result = _cli(*args)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1
        assert "shadow.max_in_flight = 0" in result.stderr


def test_serve_without_incumbent_exits_2() -> None:
    """The one required setting is named with the three ways to give it."""
    result = _cli("serve")
    assert result.returncode == 2
    assert "incumbent.url" in result.stderr and "--incumbent" in result.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[candidate]\nurl = "http://c:1"\n[candidate.set_headers]\nauthorization = "Bearer ${NOT_SET_ANYWHERE}"\n',
            "invalid config key candidate.0.set_headers = ***: header authorization: environment variable "
            "NOT_SET_ANYWHERE is not set",
        ),
        (
            '[candidate]\nurl = "http://c:1"\nmodel = ["a", "b"]\n',
            "invalid config key candidate.0.model = ['a', 'b']: expected a model name",
        ),
        (
            '[[candidate]]\nname = "x"\nurl = "http://c:1"\n[[candidate]]\nname = "x"\nurl = "http://d:1"\n',
            "invalid config key candidate.1.name = 'x': another candidate has this name",
        ),
        ('[[candidate]]\nname = "x"\n', "missing config key candidate.0.url"),
        ('[candidate]\nurl = "http://c:1"\nname = "incumbent"\n', "invalid config key candidate.0.name = 'incumbent'"),
        ('[candidate]\nurl = "http://c:1"\n[canary]\ncandidate = "y"\n', "invalid config key canary.candidate = 'y'"),
        (
            '[candidate]\nurl = "http://c:1"\nremove_headers = ["Host"]\n',
            "invalid config key candidate.0.remove_headers",
        ),
    ],
)
def test_candidate_errors_exit_2_naming_the_key(tmp_path: Path, text: str, expected: str) -> None:
    """Bad candidate shaping or naming stops check-config with exit 2 and one line naming the key."""
    result = _cli("check-config", str(_write(tmp_path, text)))
    assert result.returncode == 2, result.stdout
    assert result.stderr.count("\n") == 1
    assert expected in result.stderr


def test_header_values_come_from_the_environment_or_a_file_and_are_masked(tmp_path: Path) -> None:
    """${VAR} and ${file:PATH} are resolved at load; check-config shows neither the value nor the secret."""
    secret_file = tmp_path / "key"
    secret_file.write_text("file-secret-123\n")
    text = (
        '[[candidate]]\nname = "a"\nurl = "http://c:1"\n[candidate.set_headers]\n'
        'authorization = "Bearer ${CAND_KEY}"\nx-other = "${file:' + str(secret_file) + '}"\n'
    )
    config = load_config(_write(tmp_path, text), environ={"CAND_KEY": "env-secret-456"})
    headers = {k: v.get_secret_value() for k, v in config.candidate[0].set_headers.items()}
    assert headers == {"authorization": "Bearer env-secret-456", "x-other": "file-secret-123"}
    printed = str(masked(config)) + repr(config)
    assert "env-secret-456" not in printed and "file-secret-123" not in printed


def test_one_candidate_table_and_flags_still_work(tmp_path: Path) -> None:
    """[candidate] is one entry named "candidate"; --candidate URL sets it, and is refused with several."""
    single = load_config(_write(tmp_path, '[candidate]\nurl = "http://c:1"\n'), environ={})
    assert [(c.name, c.url) for c in single.candidate] == [("candidate", "http://c:1")]
    flagged = load_config(None, environ={}, overrides={"candidate": {"url": "http://f:1"}})
    assert [(c.name, c.url) for c in flagged.candidate] == [("candidate", "http://f:1")]
    several = _write(
        tmp_path, '[[candidate]]\nname = "a"\nurl = "http://a:1"\n[[candidate]]\nname = "b"\nurl = "http://b:1"\n'
    )
    with pytest.raises(ConfigError, match="ambiguous with 2"):
        load_config(several, environ={}, overrides={"candidate": {"url": "http://f:1"}})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[candidate]\nurll = "http://c:1"\n', "unknown config key candidate.0.urll"),
        ('[candidate]\nurl = "http://c:1"\n[candidate.set_headers]\nx = "a\\nb"\n', "control character"),
        ('[candidate]\nurl = "http://c:1"\n[candidate.set_headers]\nX-A = "1"\nx-a = "2"\n', "set twice"),
        ('[candidate]\nurl = "http://c:1"\n[candidate.set_headers]\nkeep-alive = "1"\n', "set by the proxy"),
        ('[candidate]\nurl = "http://c:1"\nname = "incumbent_noise"\n', "label the incumbent's arms"),
        ('[candidate]\nurl = "http://c:1"\nmodel = { a = "" }\n', "empty string"),
        (
            '[[candidate]]\nurl = "http://a:1"\n[[candidate]]\nurl = "http://b:1"\n',
            'give each [[candidate]] a name (name = "...")',
        ),
        (
            '[[candidate]]\nname = "a"\nurl = "http://a:1"\n[[candidate]]\nname = "b"\nurl = "http://b:1"\n'
            "[canary]\nenabled = true\n",
            "missing config key canary.candidate: with 2 candidates",
        ),
        ('[[canary.stage]]\nweight = 0.0\ngates = ["judge"]\n', "invalid config key canary.stage.0.gates"),
    ],
)
def test_candidate_tables_are_checked_even_when_unused(tmp_path: Path, text: str, expected: str) -> None:
    """A misspelt key, a header value that cannot be sent, or an ambiguous canary is refused at load."""
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), environ={})
    assert expected in str(info.value)


def test_a_secret_pasted_as_a_variable_name_is_not_echoed(tmp_path: Path) -> None:
    """${sk-...} is not a variable name; the error says so without repeating it."""
    text = '[candidate]\nurl = "http://c:1"\n[candidate.set_headers]\nauthorization = "Bearer ${sk-proj-SECRET}"\n'
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), environ={})
    assert "is not a variable name" in str(info.value) and "SECRET" not in str(info.value)


def test_environment_values_lose_a_trailing_newline(tmp_path: Path) -> None:
    """A Kubernetes Secret exposed as a variable often ends with a newline; the header value does not."""
    text = '[candidate]\nurl = "http://c:1"\n[candidate.set_headers]\nauthorization = "Bearer ${K}"\n'
    config = load_config(_write(tmp_path, text), environ={"K": "abc\n"})
    assert config.candidate[0].set_headers["authorization"].get_secret_value() == "Bearer abc"


def test_admin_off_loopback_without_a_token_exits_2(tmp_path: Path) -> None:
    """serve and check-config refuse an admin listener on every interface without admin.token, in one line."""
    path = _write(tmp_path, '[admin]\nlisten = "0.0.0.0:9901"\n[incumbent]\nurl = "http://127.0.0.1:1"\n')
    for args in (["check-config", str(path)], ["serve", "--config", str(path)]):
        result = _cli(*args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1
        assert "admin.token" in result.stderr and "'0.0.0.0:9901' is not a loopback address" in result.stderr


@pytest.mark.parametrize("listen", ["127.0.0.1:9901", "127.0.0.2:0", "[::1]:9901", "localhost:9901"])
def test_admin_on_loopback_needs_no_token(listen: str) -> None:
    """Loopback addresses, by number or as localhost, are accepted without a token."""
    require_admin_token(load_config(None, environ={}, overrides={"admin": {"listen": listen}}))


@pytest.mark.parametrize("listen", ["0.0.0.0:9901", "[::]:9901", "10.0.0.5:9901", "admin.internal:9901"])
def test_admin_elsewhere_needs_a_token(listen: str) -> None:
    """Any other address, a host name included, needs admin.token."""
    with pytest.raises(ConfigError, match=r"^missing config key admin\.token: "):
        require_admin_token(load_config(None, environ={}, overrides={"admin": {"listen": listen}}))
    require_admin_token(load_config(None, environ={}, overrides={"admin": {"listen": listen, "token": "t"}}))


def test_secrets_come_from_the_environment_or_a_file_and_are_masked(tmp_path: Path) -> None:
    """admin.token and canary.feedback_secret resolve ${VAR} and ${file:PATH}; check-config shows neither."""
    secret_file = tmp_path / "token"
    secret_file.write_text("file-token-123\n")
    text = (
        '[admin]\nlisten = "0.0.0.0:9901"\ntoken = "${file:' + str(secret_file) + '}"\n'
        '[canary]\nfeedback_secret = "${FEEDBACK_SECRET}"\n[incumbent]\nurl = "http://a:1"\n'
    )
    config = load_config(_write(tmp_path, text), environ={"FEEDBACK_SECRET": "env-secret-456"})
    secrets = (config.admin.token.get_secret_value(), config.canary.feedback_secret.get_secret_value())
    assert secrets == ("file-token-123", "env-secret-456")
    assert "file-token-123" not in repr(config) and "env-secret-456" not in repr(config)
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(_write(tmp_path, text))],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "FEEDBACK_SECRET": "env-secret-456"},
    )
    assert result.returncode == 0, result.stderr
    assert '"token": "***"' in result.stdout and '"feedback_secret": "***"' in result.stdout
    assert "file-token-123" not in result.stdout and "env-secret-456" not in result.stdout
    with pytest.raises(ConfigError, match="environment variable NOPE is not set"):
        load_config(None, environ={}, overrides={"admin": {"token": "${NOPE}"}})


def test_a_redis_cluster_url_lists_its_seed_nodes() -> None:
    """redis+cluster:// (rediss+cluster:// with TLS) takes one or more HOST:PORT seeds, a password masked."""
    for url in (
        "redis+cluster://10.0.0.1:7000",
        "redis+cluster://10.0.0.1:7000,10.0.0.2:7000,[::1]:7001/0",
        "rediss+cluster://u:pw@h:7000",
    ):
        assert load_config(None, environ={}, overrides={"record": {"redis_url": url}}).record.redis_url == url
    config = load_config(None, environ={"REDIS_URL": "rediss+cluster://u:pw@h:7000,h2:7000"})
    assert masked(config)["record"]["redis_url"] == "rediss+cluster://u:***@h:7000,h2:7000"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis+cluster://h:7000/3", "Redis Cluster has only database 0: drop the /DB part of the URL"),
        ("redis+cluster://h:7000,h2", "expected redis+cluster://HOST:PORT[,HOST:PORT...], one or more seed nodes"),
        ("redis+cluster://h:7000?ssl=true", "takes no query or fragment"),
        ("cluster://h:7000", "or redis+cluster://HOST:PORT[,HOST:PORT...] for a Redis Cluster"),
    ],
)
def test_a_malformed_cluster_url_exits_2_naming_the_key_and_the_fix(tmp_path: Path, url: str, expected: str) -> None:
    """One line naming record.redis_url, what is wrong and the expected form; a password is never echoed."""
    password_url = url.replace("//", "//user:s3cret@", 1)
    result = _cli("check-config", str(_write(tmp_path, f'[record]\nredis_url = "{password_url}"\n')))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "invalid config key record.redis_url" in result.stderr and expected in result.stderr
    assert "s3cret" not in result.stderr
