"""The configuration file (``--config FILE``): settings by name, ``[[providers]]``, precedence, clear errors."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import ROOT, clean_env, start_server, stop_server

from handlers.config import Config, ConfigError, load_config
from handlers.provider.providers import Model, Provider

TWO_PROVIDERS = """
port = 9090
rate_limit = "30/minute"
model = "deepseek-chat"

[[providers]]
name = "deepseek"
base_url = "https://api.deepseek.com"
api_key_env = "DEEPSEEK_API_KEY"
models = ["deepseek-reasoner", "deepseek-chat"]

[[providers]]
name = "local"
base_url = "http://127.0.0.1:8000/v1"
models = [{ id = "Qwen/QwQ-32B", think = "open" }, "qwen3:8b"]
headers = { "X-Title" = "thinkstream" }
"""


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str], str]:
    """``write(text)``: a config file holding ``text``; returns its path."""

    def make(text: str) -> str:
        path = tmp_path / "thinkstream.toml"
        path.write_text(text)
        return str(path)

    return make


def test_a_file_holds_settings_by_their_names_and_any_number_of_providers(write: Callable[[str], str]) -> None:
    config = load_config(["--config", write(TWO_PROVIDERS)], {"DEEPSEEK_API_KEY": "sk-ds"})

    assert (config.port, config.rate_limit, config.default_model) == (9090, "30/minute", "deepseek-chat")
    deepseek, local = config.providers
    assert (deepseek.name, deepseek.base_url, deepseek.api_key) == ("deepseek", "https://api.deepseek.com", "sk-ds")
    assert deepseek.models == (Model("deepseek-reasoner"), Model("deepseek-chat"))
    assert (local.name, local.api_key, dict(local.headers)) == ("local", None, {"X-Title": "thinkstream"})
    assert local.models == (Model("Qwen/QwQ-32B", think="open"), Model("qwen3:8b"))
    assert config.allowed_models == ("deepseek-chat", "deepseek-reasoner", "Qwen/QwQ-32B", "qwen3:8b")


def test_the_environment_can_name_the_file(write: Callable[[str], str]) -> None:
    config = load_config([], {"THINKSTREAM_CONFIG": write("port = 9191\n")})

    assert config.port == 9191


def test_without_a_default_model_the_first_providers_first_model_is_the_default(
    write: Callable[[str], str],
) -> None:
    path = write(TWO_PROVIDERS.replace('model = "deepseek-chat"', ""))
    config = load_config(["--config", path], {"DEEPSEEK_API_KEY": "k"})

    assert config.default_model == "deepseek-reasoner"


def test_a_flag_wins_over_the_environment_which_wins_over_the_file_which_wins_over_the_default(
    write: Callable[[str], str],
) -> None:
    path = write('port = 9001\nidle_timeout = 60\nkeepalive = 5\nlog_level = "DEBUG"\n')
    env = {"THINKSTREAM_PORT": "9002", "THINKSTREAM_IDLE_TIMEOUT": "90"}
    config = load_config(["--config", path, "--port", "9003"], env)

    assert config.port == 9003  # flag over environment and file
    assert config.idle_timeout == 90  # environment over file
    assert config.keepalive == 5  # file over default
    assert config.log_level == "DEBUG"
    assert config.retention == 300  # the default


def test_the_single_provider_settings_in_a_file_are_the_shorthand_for_one_provider(
    write: Callable[[str], str],
) -> None:
    path = write('base_url = "http://localhost:11434/v1"\nmodel = "qwen3:8b"\nmodels = ["llama3"]\n')
    config = load_config(["--config", path], {"LLM_API_KEY": "k-1"})

    assert (config.base_url, config.api_key, config.allowed_models) == (
        "http://localhost:11434/v1",
        "k-1",
        ("qwen3:8b", "llama3"),
    )


def test_with_providers_in_the_file_a_lone_deepseek_key_is_only_that_providers_key(
    write: Callable[[str], str],
) -> None:
    config = load_config(["--config", write(TWO_PROVIDERS)], {"DEEPSEEK_API_KEY": "sk-ds"})

    assert config.base_url is None and config.api_key is None
    assert [p.api_key for p in config.providers] == ["sk-ds", None]


def test_a_provider_key_never_shows_in_the_configs_repr(write: Callable[[str], str]) -> None:
    config = load_config(["--config", write(TWO_PROVIDERS)], {"DEEPSEEK_API_KEY": "sk-canary-456"})

    assert "sk-canary-456" not in repr(config)


def test_embedders_build_providers_as_typed_records() -> None:
    config = Config(
        providers=(
            Provider("a", "http://a.example/v1", (Model("m1"),), api_key="k-a"),
            Provider("b", "http://b.example/v1", (Model("m2", think="open"),), headers={"X-Title": "t"}),
        ),
        model="m2",
    )

    assert (config.default_model, config.allowed_models, config.uses_demo) == ("m2", ("m2", "m1"), False)


def test_a_redis_url_without_a_password_may_be_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('redis_url = "redis://redis.internal:6379/2"\n')

    assert load_config(["--config", str(path)], {}).redis_url == "redis://redis.internal:6379/2"


# A bad file stops start-up, naming the file, the key (or line) and what to fix.

BAD_FILES = [
    pytest.param('port = 80\nrate_limit = "120/minute\n', ["line 2", "not valid TOML"], id="not TOML"),
    pytest.param("prot = 8080\n", ["prot", "did you mean 'port'"], id="an unknown setting"),
    pytest.param('port = "eighty"\n', ["port", "whole number", "'eighty'"], id="a wrong type"),
    pytest.param("port = 70000\n", ["port", "between 0 and 65535"], id="a value out of range"),
    pytest.param('rate_limit = "lots"\n', ["rate_limit", "N/minute"], id="a bad rate limit"),
    pytest.param('tokens = ["tok"]\n', ["tokens", "THINKSTREAM_TOKENS", "environment"], id="a secret setting"),
    pytest.param('api_key = "sk-x"\n', ["api_key", "LLM_API_KEY", "environment"], id="a key at the top"),
    pytest.param(
        'redis_url = "redis://:pw-1@localhost:6379/0"\n',
        ["redis_url", "REDIS_URL", "environment"],
        id="a Redis URL with a password",
    ),
    pytest.param(
        'redis_url = "redis://localhost:6379/0?password=pw-1"\n',
        ["redis_url", "REDIS_URL", "environment"],
        id="a Redis URL with a password in its query",
    ),
    pytest.param('redis_url = "redis://localhost:six/0"\n', ["port must be a number"], id="a Redis URL without a port"),
    pytest.param('config_file = "other.toml"\n', ["config_file", "unknown setting"], id="a file naming a file"),
    pytest.param(
        '[[providers]]\nname = "a"\nbase_url = "http://a/v1"\napi_key = "sk-x"\nmodels = ["m"]\n',
        ["providers[0] (a)", "api_key_env"],
        id="a key in a provider",
    ),
    pytest.param(
        '[[providers]]\nname = "a"\nmodels = ["m"]\n', ["providers[0] (a)", "base_url is missing"], id="no base URL"
    ),
    pytest.param(
        '[[providers]]\nname = "a"\nbase_url = "api.example.com"\nmodels = ["m"]\n',
        ["providers[0] (a)", "absolute http"],
        id="a base URL without scheme",
    ),
    pytest.param(
        '[[providers]]\nname = "a"\nbase_url = "http://a/v1"\napi_key_env = "A_KEY"\nmodels = ["m"]\n',
        ["providers[0] (a), api_key_env", "A_KEY is not set"],
        id="a key variable that is not set",
    ),
    pytest.param(
        '[[providers]]\nname = "a"\nbase_url = "http://a/v1"\nmodels = [{ id = "m", think = "opened" }]\n',
        ["providers[0] (a), models[0]", "'auto', 'open' or 'none'"],
        id="an unknown think mode",
    ),
    pytest.param(
        '[[providers]]\nname = "a"\nbase_url = "http://a/v1"\nmodels = [{ name = "m" }]\n',
        ["models[0]", "unknown model key 'name'"],
        id="a model table without id",
    ),
    pytest.param(
        '[[providers]]\nname = "a"\nbase_url = "http://a/v1"\nmodels = []\n',
        ["providers[0] (a), models", "non-empty list"],
        id="no models",
    ),
    pytest.param(
        '[[providers]]\nname = "a"\nbase_url = "http://a/v1"\nmodels = ["m"]\n'
        'headers = { Authorization = "Bearer x" }\n',
        ["providers[0] (a)", "Authorization", "api_key_env"],
        id="an Authorization header",
    ),
    pytest.param(
        '[[providers]]\nname = "a"\nbase_url = "http://a/v1"\nmodels = ["m"]\n'
        '[[providers]]\nname = "b"\nbase_url = "http://b/v1"\nmodels = ["m"]\n',
        ["providers", "'m' is listed by both 'a' and 'b'"],
        id="a model served twice",
    ),
    pytest.param(
        '[[providers]]\nname = "a"\nbase_url = "http://a/v1"\nmodels = ["m"]\n'
        '[[providers]]\nname = "a"\nbase_url = "http://b/v1"\nmodels = ["n"]\n',
        ["providers", "two providers are named 'a'"],
        id="two providers with one name",
    ),
    pytest.param(
        'model = "gpt-9"\n[[providers]]\nname = "a"\nbase_url = "http://a/v1"\nmodels = ["m"]\n',
        ["'gpt-9' is not listed by any provider", "m"],
        id="a default model no provider lists",
    ),
    pytest.param(
        'models = ["x"]\n[[providers]]\nname = "a"\nbase_url = "http://a/v1"\nmodels = ["m"]\n',
        ["models", "cannot be combined with [[providers]]"],
        id="top-level models beside providers",
    ),
    pytest.param('providers = "deepseek"\n', ["providers", "[[providers]] table"], id="providers that are not tables"),
]


@pytest.mark.parametrize(("text", "said"), BAD_FILES)
def test_a_bad_file_stops_start_up_naming_the_file_the_key_and_what_to_fix(
    write: Callable[[str], str], text: str, said: list[str]
) -> None:
    path = write(text)
    with pytest.raises(ConfigError) as error:
        load_config(["--config", path], {})

    message = str(error.value)
    assert path in message
    for words in said:
        assert words in message


def test_a_missing_file_is_named() -> None:
    with pytest.raises(ConfigError, match=r"config file /no/such/thinkstream\.toml cannot be read"):
        load_config(["--config", "/no/such/thinkstream.toml"], {})


def test_a_single_provider_base_url_in_the_environment_beside_providers_in_the_file_is_refused(
    write: Callable[[str], str],
) -> None:
    env = {"LLM_BASE_URL": "http://elsewhere/v1", "DEEPSEEK_API_KEY": "k"}
    with pytest.raises(ConfigError, match=r"base_url .* cannot be combined with \[\[providers\]\].*LLM_BASE_URL"):
        load_config(["--config", write(TWO_PROVIDERS)], env)


def test_a_bad_flag_beside_a_good_file_is_blamed_on_the_flag(write: Callable[[str], str]) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(["--config", write("port = 9090\n"), "--idle-timeout", "0"], {})

    assert str(error.value) == "idle_timeout must be a positive number of seconds, not 0.0"


async def test_server_py_with_a_bad_file_exits_with_status_2_and_says_where_and_what(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    # think belongs to a model, not to its provider.
    path.write_text('[[providers]]\nname = "local"\nbase_url = "http://localhost/v1"\nmodels = ["m"]\nthink = "open"\n')
    process = await asyncio.create_subprocess_exec(
        sys.executable, "server.py", "--config", str(path), cwd=ROOT, env=clean_env(), stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(20):
        _, err = await process.communicate()

    assert process.returncode == 2
    assert f"cannot start: config file {path}, providers[0] (local): unknown provider key 'think'".encode() in err
    assert b"Traceback" not in err


async def test_server_py_names_its_file_and_providers_at_start_up_without_any_secret(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(
        '[[providers]]\nname = "local"\nbase_url = "http://127.0.0.1:9/v1?key=q-444"\n'
        'api_key_env = "LOCAL_KEY"\nmodels = ["m", "n"]\n'
        '[[providers]]\nname = "gateway"\nbase_url = "http://user:pw-333@127.0.0.1:8/v1"\nmodels = ["g"]\n'
    )
    process, _, log = await start_server("--config", str(path), env=clean_env(LOCAL_KEY="sk-local-555"))
    _, rest = await stop_server(process)

    assert f"settings from config file {path}".encode() in log
    assert b"relaying to local at http://127.0.0.1:9/v1: m, n" in log
    for secret in (b"pw-333", b"q-444", b"sk-local-555"):
        assert secret not in log + rest
