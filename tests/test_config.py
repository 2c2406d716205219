"""Configuration: environment conventions, flags over environment, clear start-up errors."""

from __future__ import annotations

import pytest

from handlers.config import DEEPSEEK_BASE_URL, OPENAI_BASE_URL, Config, ConfigError, load_config


def test_nothing_configured_means_the_demo_model_on_loopback_port_8080() -> None:
    config = load_config([], {})

    assert config.uses_demo
    assert (config.host, config.port) == ("127.0.0.1", 8080)
    assert config.default_model == "demo"


def test_llm_variables_choose_any_openai_compatible_provider() -> None:
    env = {"LLM_BASE_URL": "http://localhost:8000/v1", "LLM_API_KEY": "k-1", "LLM_MODEL": "qwq"}
    config = load_config([], env)

    assert (config.base_url, config.api_key, config.default_model) == ("http://localhost:8000/v1", "k-1", "qwq")


def test_a_lone_deepseek_key_means_the_deepseek_api_and_its_reasoner() -> None:
    config = load_config([], {"DEEPSEEK_API_KEY": "sk-ds"})

    assert (config.base_url, config.api_key, config.default_model) == (DEEPSEEK_BASE_URL, "sk-ds", "deepseek-reasoner")


def test_a_lone_openai_key_means_the_openai_api_but_needs_a_model() -> None:
    with pytest.raises(ConfigError, match="LLM_MODEL"):
        load_config([], {"OPENAI_API_KEY": "sk-oa"})
    config = load_config([], {"OPENAI_API_KEY": "sk-oa", "LLM_MODEL": "gpt-4.1-mini"})

    assert (config.base_url, config.api_key) == (OPENAI_BASE_URL, "sk-oa")


def test_openai_base_url_is_honoured() -> None:
    config = load_config([], {"OPENAI_BASE_URL": "http://proxy.local/v1", "OPENAI_API_KEY": "k", "LLM_MODEL": "m"})

    assert config.base_url == "http://proxy.local/v1"


def test_llm_variables_win_over_the_conventional_ones() -> None:
    env = {"LLM_BASE_URL": "http://a/v1", "OPENAI_BASE_URL": "http://b/v1", "LLM_API_KEY": "a", "OPENAI_API_KEY": "b"}
    config = load_config(["--model", "m"], env)

    assert (config.base_url, config.api_key) == ("http://a/v1", "a")


def test_flags_override_the_environment() -> None:
    env = {"LLM_BASE_URL": "http://env/v1", "LLM_MODEL": "env-model", "THINKSTREAM_PORT": "9000"}
    args = ["--base-url", "http://flag/v1", "--model", "flag-model", "--port", "9001", "--host", "::1"]
    config = load_config(args, env)

    assert (config.base_url, config.default_model, config.port, config.host) == (
        "http://flag/v1",
        "flag-model",
        9001,
        "::1",
    )


def test_typed_settings_are_parsed_from_text() -> None:
    env = {"THINKSTREAM_INCLUDE_USAGE": "off", "THINKSTREAM_IDLE_TIMEOUT": "60", "THINKSTREAM_MODELS": "a, b,,c"}
    config = load_config([], env)

    assert config.include_usage is False
    assert config.idle_timeout == 60.0
    assert config.allowed_models == ("demo", "a", "b", "c")


def test_a_key_without_a_base_url_is_refused_with_advice() -> None:
    with pytest.raises(ConfigError, match="LLM_BASE_URL"):
        load_config([], {"LLM_API_KEY": "k"})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--base-url", "api.deepseek.com", "--model", "m"], "absolute http"),
        (["--base-url", "ftp://x/v1", "--model", "m"], "absolute http"),
        (["--port", "70000"], "port"),
        (["--port", "eighty"], "--port"),
        (["--idle-timeout", "0"], "idle_timeout"),
        (["--connect-timeout", "nan"], "connect_timeout"),
        (["--include-usage", "maybe"], "--include-usage"),
        (["--log-level", "loud"], "log level"),
        (["--max-line-bytes", "10"], "max_line_bytes"),
        (["--allowed-hosts", "https://chat.example.com"], "allowed host"),
        (["--ipv6-prefix", "129"], "ipv6_prefix"),
        (["--base-url", "http://[::1", "--model", "m"], "absolute http"),
        (["--base-url", "http://api.example.com:99999/v1", "--model", "m"], "absolute http"),
        (["--cors-origins", "http://["], "CORS origin"),
        (["--cors-origins", "https://app.example.com:70000"], "CORS origin"),
        (["--redis-url", "redis://[bad"], "Redis URL"),
        (["--rate-limit", "0/minute"], "refuse every request"),
        (["--base-url", "http://xn--/v1", "--model", "m"], "absolute http"),
        (["--cors-origins", "https://xn--a.com"], "CORS origin"),
    ],
    ids=[
        "url-without-scheme",
        "url-not-http",
        "port-out-of-range",
        "port-not-a-number",
        "zero-timeout",
        "nan-timeout",
        "bool-not-a-bool",
        "unknown-log-level",
        "tiny-line-limit",
        "allowed-host-a-url",
        "ipv6-prefix-too-long",
        "url-with-a-broken-ipv6-host",
        "url-with-a-port-past-65535",
        "cors-origin-with-a-broken-ipv6-host",
        "cors-origin-with-a-port-past-65535",
        "redis-url-with-a-broken-ipv6-host",
        "a-rate-of-zero",
        "url-with-a-bad-idna-name",
        "cors-origin-with-a-bad-idna-name",
    ],
)
def test_bad_values_fail_at_start_up_saying_what_to_fix(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(args, {})


@pytest.mark.parametrize(
    "base_url", ["user:s3cret-pw@api.example.com/v1", "api.example.com/v1?key=s3cret-pw", "//u:s3cret-pw@x/v1"]
)
def test_a_base_url_refused_for_its_form_is_not_repeated_when_it_may_hold_a_secret(base_url: str) -> None:
    with pytest.raises(ConfigError, match="absolute http") as refused:
        load_config(["--base-url", base_url, "--model", "m"], {})

    assert "s3cret" not in str(refused.value)


def test_the_key_never_shows_in_the_configs_repr() -> None:
    config = Config(base_url="http://x/v1", api_key="sk-canary-123", model="m")

    assert "sk-canary-123" not in repr(config)


def test_the_key_has_no_command_line_flag() -> None:
    with pytest.raises(SystemExit):
        load_config(["--api-key", "sk-x"], {})


def test_with_both_vendors_keys_set_each_vendors_url_gets_its_own_key() -> None:
    both = {"OPENAI_API_KEY": "sk-openai", "DEEPSEEK_API_KEY": "sk-deepseek", "LLM_MODEL": "m"}

    to_deepseek = load_config([], {**both, "LLM_BASE_URL": "https://api.deepseek.com"})
    to_openai = load_config([], {**both, "LLM_BASE_URL": "https://api.openai.com/v1"})
    to_deepseek_dotted = load_config([], {**both, "LLM_BASE_URL": "https://api.deepseek.com./"})

    assert (to_deepseek.api_key, to_openai.api_key) == ("sk-deepseek", "sk-openai")
    assert to_deepseek_dotted.api_key == "sk-deepseek", "the host's final dot changes nothing"


def test_a_vendors_key_sent_to_another_host_is_warned_of_without_showing_it(caplog: pytest.LogCaptureFixture) -> None:
    env = {"LLM_BASE_URL": "https://openrouter.ai/api/v1", "OPENAI_API_KEY": "sk-openai-canary", "LLM_MODEL": "m"}

    config = load_config([], env)

    assert config.api_key == "sk-openai-canary", "as documented: the first key variable set"
    assert "OPENAI_API_KEY" in caplog.text and "openrouter.ai" in caplog.text
    assert "canary" not in caplog.text


@pytest.mark.parametrize(
    "env",
    [
        pytest.param(
            {"LLM_BASE_URL": "http://vllm.internal:8000/v1", "LLM_API_KEY": "k", "OPENAI_API_KEY": "o"},
            id="LLM_API_KEY, meant for LLM_BASE_URL",
        ),
        pytest.param(
            {"OPENAI_BASE_URL": "http://vllm.internal:8000/v1", "OPENAI_API_KEY": "o"},
            id="the OpenAI SDK's pair of variables",
        ),
    ],
)
def test_a_key_meant_for_the_base_url_is_not_warned_of(env: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    load_config([], {**env, "LLM_MODEL": "m"})

    assert caplog.text == ""
