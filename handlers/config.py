"""thinkstream's configuration: one frozen object, every setting declared once.

Each field of :class:`Config` carries its documentation, its environment
variables and its command-line flag in ``metadata``; the ``--help`` text, the
environment reader and the README check in the tests are all made from that
single declaration, so a setting cannot exist undocumented.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import math
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import limits
from yarl import URL

from .config_file import read_config_file
from .errors import ConfigError
from .provider.providers import Provider, check_base_url, check_providers
from .provider.think_tags import THINK_MODES

logger = logging.getLogger(__name__)

__all__ = ["DEEPSEEK_BASE_URL", "OPENAI_BASE_URL", "Config", "ConfigError", "load_config", "settings"]

DEEPSEEK_BASE_URL = "https://api.deepseek.com"
DEEPSEEK_DEFAULT_MODEL = "deepseek-reasoner"
OPENAI_BASE_URL = "https://api.openai.com/v1"
DEMO_MODEL = "demo"


def _setting(
    default: Any,
    help: str,
    *,
    env: Sequence[str] = (),
    flag: str | None = None,
    secret: bool = False,
) -> Any:
    return field(
        default=default,
        repr=not secret,
        metadata={"help": help, "env": tuple(env), "flag": flag, "secret": secret},
    )


@dataclass(frozen=True, slots=True)
class Config:
    """Everything ``create_app`` needs; validated as soon as it is made."""

    config_file: str | None = _setting(
        None,
        "A TOML file with settings (by their names with underscores, e.g. port = 8080) and [[providers]] "
        "tables; flags and environment variables win over it.",
        env=["THINKSTREAM_CONFIG"],
        flag="--config",
    )
    host: str = _setting(
        "127.0.0.1",
        "Address to listen on. Anything but loopback exposes the relay (and your key's budget).",
        env=["THINKSTREAM_HOST"],
        flag="--host",
    )
    port: int = _setting(8080, "TCP port to listen on.", env=["THINKSTREAM_PORT"], flag="--port")
    backlog: int = _setting(
        2048,
        "Connections the kernel may hold until the server accepts them (capped by net.core.somaxconn). "
        "When thousands of clients connect at once, a client that finds the queue full waits a second "
        "or more for its connection to be retried.",
        env=["THINKSTREAM_BACKLOG"],
        flag="--backlog",
    )
    base_url: str | None = _setting(
        None,
        "Base URL of the OpenAI-compatible API, up to but not including /chat/completions. "
        "Unset: the embedded demo model (no key, no network); with only DEEPSEEK_API_KEY "
        f"set: {DEEPSEEK_BASE_URL}; with only OPENAI_API_KEY set: {OPENAI_BASE_URL}.",
        env=["LLM_BASE_URL", "OPENAI_BASE_URL"],
        flag="--base-url",
    )
    api_key: str | None = _setting(
        None,
        "The provider's API key, sent upstream as a Bearer token and nowhere else. "
        "Environment only, so it never shows in a process list.",
        env=["LLM_API_KEY", "OPENAI_API_KEY", "DEEPSEEK_API_KEY"],
        secret=True,
    )
    model: str | None = _setting(
        None,
        f"Model used when the client names none. Defaults to '{DEMO_MODEL}' for the demo and "
        f"'{DEEPSEEK_DEFAULT_MODEL}' for DeepSeek; required for any other provider.",
        env=["LLM_MODEL"],
        flag="--model",
    )
    models: tuple[str, ...] = _setting(
        (),
        "Comma-separated models a client may ask for; the default model is always allowed.",
        env=["THINKSTREAM_MODELS"],
        flag="--models",
    )
    providers: tuple[Provider, ...] = _setting(
        (),
        "Several providers, each with its base URL, key variable, models and headers: [[providers]] "
        "tables in the config file (instead of base_url, the key and models).",
    )
    think: str = _setting(
        "auto",
        "How a model's content is read for a thinking block, unless the config file sets it per model: "
        "auto (a leading <think> or similar tag opens one), open (the chat template opened <think> in the "
        "prompt, so the output is reasoning until </think>) or none (content is only answer).",
        env=["THINKSTREAM_THINK"],
        flag="--think",
    )
    include_usage: bool = _setting(
        True,
        "Ask the provider for token usage (stream_options.include_usage).",
        env=["THINKSTREAM_INCLUDE_USAGE"],
        flag="--include-usage",
    )
    connect_timeout: float = _setting(
        10.0,
        "Seconds to wait for a connection to the provider.",
        env=["THINKSTREAM_CONNECT_TIMEOUT"],
        flag="--connect-timeout",
    )
    first_byte_timeout: float = _setting(
        120.0,
        "Seconds from sending a request to the provider's first byte (a keep-alive comment counts).",
        env=["THINKSTREAM_FIRST_BYTE_TIMEOUT"],
        flag="--first-byte-timeout",
    )
    upstream_retries: int = _setting(
        2,
        "Times a request is tried again when the provider refuses the connection or answers 429 or 5xx "
        "before sending anything (with backoff, honouring Retry-After, within the first-byte timeout).",
        env=["THINKSTREAM_UPSTREAM_RETRIES"],
        flag="--upstream-retries",
    )
    idle_timeout: float = _setting(
        300.0,
        "Seconds the provider may stay silent (no byte, not even a keep-alive comment) before the "
        "stream fails. Generous, because reasoning models can think for minutes.",
        env=["THINKSTREAM_IDLE_TIMEOUT"],
        flag="--idle-timeout",
    )
    keepalive: float = _setting(
        15.0,
        "Seconds between keep-alives sent to clients (SSE comments, NDJSON empty lines).",
        env=["THINKSTREAM_KEEPALIVE"],
        flag="--keepalive",
    )
    disconnect_grace: float = _setting(
        10.0,
        "Seconds a generation goes on after its last client disconnected, waiting for it to "
        "resume, before the provider request is cancelled (0 = at once).",
        env=["THINKSTREAM_DISCONNECT_GRACE"],
        flag="--disconnect-grace",
    )
    retention: float = _setting(
        300.0,
        "Seconds a finished stream is kept so that late or reconnecting clients can still collect it.",
        env=["THINKSTREAM_RETENTION"],
        flag="--retention",
    )
    stream_buffer_bytes: int = _setting(
        4 << 20,
        "Most bytes of events kept per stream for resuming; older events are dropped first.",
        env=["THINKSTREAM_STREAM_BUFFER_BYTES"],
        flag="--stream-buffer-bytes",
    )
    buffer_total_bytes: int = _setting(
        256 << 20,
        "Most bytes of events kept for all streams together; finished streams are forgotten first.",
        env=["THINKSTREAM_BUFFER_TOTAL_BYTES"],
        flag="--buffer-total-bytes",
    )
    stall_timeout: float = _setting(
        30.0,
        "Seconds a client may go without reading any of what it is sent before it is dropped (it can resume later).",
        env=["THINKSTREAM_STALL_TIMEOUT"],
        flag="--stall-timeout",
    )
    shutdown_timeout: float = _setting(
        10.0,
        "On SIGINT/SIGTERM, seconds running streams get to finish before they end with a "
        "retryable server_shutdown error.",
        env=["THINKSTREAM_SHUTDOWN_TIMEOUT"],
        flag="--shutdown-timeout",
    )
    retry_ms: int = _setting(
        3000,
        "The SSE retry: value (milliseconds) sent on each stream's first event.",
        env=["THINKSTREAM_RETRY_MS"],
        flag="--retry-ms",
    )
    max_body_bytes: int = _setting(
        1 << 20,
        "Largest POST /stream body accepted, in bytes (larger: 413).",
        env=["THINKSTREAM_MAX_BODY_BYTES"],
        flag="--max-body-bytes",
    )
    body_timeout: float = _setting(
        30.0,
        "Seconds a request's body may take to arrive once its headers have (longer: 408, and the "
        "connection is closed).",
        env=["THINKSTREAM_BODY_TIMEOUT"],
        flag="--body-timeout",
    )
    max_line_bytes: int = _setting(
        1 << 20,
        "Longest line accepted from the provider's stream, in bytes; the data lines of one event together "
        "are held to the same bound.",
        env=["THINKSTREAM_MAX_LINE_BYTES"],
        flag="--max-line-bytes",
    )
    demo_delay: float = _setting(
        0.03,
        "Demo model: seconds between tokens (0 = as fast as possible).",
        env=["THINKSTREAM_DEMO_DELAY"],
        flag="--demo-delay",
    )
    demo_tokens: int = _setting(
        0,
        "Demo model: answer length in tokens (0 = its natural length of about 100).",
        env=["THINKSTREAM_DEMO_TOKENS"],
        flag="--demo-tokens",
    )
    tokens: tuple[str, ...] = _setting(
        (),
        "Comma-separated access tokens. When set, every API route needs 'Authorization: Bearer "
        "<token>' (or ?access_token= for EventSource); the page asks for one. Unset: open to anyone "
        "who can reach the port.",
        env=["THINKSTREAM_TOKENS"],
        flag="--token",
        secret=True,
    )
    max_messages: int = _setting(
        256,
        "Most messages in one request (more: 400).",
        env=["THINKSTREAM_MAX_MESSAGES"],
        flag="--max-messages",
    )
    max_chars: int = _setting(
        400_000,
        "Most characters of message content in one request, all messages together (more: 400).",
        env=["THINKSTREAM_MAX_CHARS"],
        flag="--max-chars",
    )
    max_streams: int = _setting(
        5000,
        "Most generations running at once in this process, or with --redis-url in all processes together "
        "(more: 503 with Retry-After).",
        env=["THINKSTREAM_MAX_STREAMS"],
        flag="--max-streams",
    )
    client_streams: int = _setting(
        20,
        "Most generations one client may have running at once (more: 429 with Retry-After). "
        "A client is its token, or else its address.",
        env=["THINKSTREAM_CLIENT_STREAMS"],
        flag="--client-streams",
    )
    rate_limit: str = _setting(
        "120/minute",
        "Most API requests per client, as N/second, N/minute or N/hour (more: 429 with Retry-After).",
        env=["THINKSTREAM_RATE_LIMIT"],
        flag="--rate-limit",
    )
    trusted_proxies: tuple[str, ...] = _setting(
        (),
        "Comma-separated addresses or networks of reverse proxies whose X-Forwarded-For is "
        "believed when telling clients apart (for example 127.0.0.1,10.0.0.0/8).",
        env=["THINKSTREAM_TRUSTED_PROXIES"],
        flag="--trusted-proxies",
    )
    ipv6_prefix: int = _setting(
        64,
        "Length of the network prefix that makes one IPv6 client for the per-client limits (a host "
        "commonly has a whole /64); 128 tells every address apart.",
        env=["THINKSTREAM_IPV6_PREFIX"],
        flag="--ipv6-prefix",
    )
    cors_origins: tuple[str, ...] = _setting(
        (),
        "Comma-separated origins (scheme://host[:port]) whose pages may call the API from a "
        "browser, or * for any. Unset: same origin only.",
        env=["THINKSTREAM_CORS_ORIGINS"],
        flag="--cors-origins",
    )
    cors_credentials: bool = _setting(
        False,
        "Let those origins send credentials (cookies, HTTP authentication) with their requests.",
        env=["THINKSTREAM_CORS_CREDENTIALS"],
        flag="--cors-credentials",
    )
    allowed_hosts: tuple[str, ...] = _setting(
        (),
        "Comma-separated host names (Host header, any port) the relay answers to besides localhost, "
        "127.0.0.1 and [::1], or * for any. Unset, only requests that arrive over loopback are "
        "checked; set, every request is. Other names get 421, which stops DNS rebinding.",
        env=["THINKSTREAM_ALLOWED_HOSTS"],
        flag="--allowed-hosts",
    )
    redis_url: str | None = _setting(
        None,
        "Redis (7 or newer) or Valkey that several relay processes share, as redis://[:password@]host[:port][/db], "
        "rediss:// for TLS, or unix:///path/to/socket: streams, cancellations and limits then reach across "
        "processes and machines. Unset: one process, everything in memory. Put a password in the environment, "
        "not on the command line.",
        env=["THINKSTREAM_REDIS_URL", "REDIS_URL"],
        flag="--redis-url",
        secret=True,
    )
    redis_prefix: str = _setting(
        "thinkstream",
        "Prefix of every Redis key the relay writes; relays with different prefixes share a Redis without "
        "seeing each other's streams.",
        env=["THINKSTREAM_REDIS_PREFIX"],
        flag="--redis-prefix",
    )
    ready_check: bool = _setting(
        False,
        "Make /readyz also check that the provider answers (GET <base-url>/models), not just that one is configured.",
        env=["THINKSTREAM_READY_CHECK"],
        flag="--ready-check",
    )
    log_content: bool = _setting(
        False,
        "Debugging only: put prompts and answers in the per-stream log line.",
        env=["THINKSTREAM_LOG_CONTENT"],
        flag="--log-content",
    )
    log_level: str = _setting(
        "INFO",
        "Logging level: DEBUG, INFO, WARNING or ERROR.",
        env=["THINKSTREAM_LOG_LEVEL"],
        flag="--log-level",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "providers", tuple(self.providers))
        _validate(self)
        # As browsers send them, so that "https://App.example.com/" matches their Origin.
        object.__setattr__(self, "cors_origins", tuple(normal_origin(o) for o in self.cors_origins))

    @property
    def uses_demo(self) -> bool:
        """True when no provider is configured and the embedded demo answers."""
        return self.base_url is None and not self.providers

    @property
    def default_model(self) -> str:
        if self.model:
            return self.model
        if self.providers:
            return self.providers[0].models[0].id
        return DEMO_MODEL

    @property
    def is_loopback(self) -> bool:
        """Whether only this machine can reach the listener."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def allowed_models(self) -> tuple[str, ...]:
        """The default model first, then the extra ones (or every provider's), without repeats."""
        served = (model.id for provider in self.providers for model in provider.models)
        return tuple(dict.fromkeys((self.default_model, *self.models, *served)))


def settings() -> tuple[dataclasses.Field[Any], ...]:
    """The declared settings, in order."""
    return dataclasses.fields(Config)


def normal_origin(origin: str) -> str:
    """An origin as browsers send it: lower-case scheme and host, no default port, no final slash."""
    try:
        url = URL(origin.strip())
        name = url.host  # decoded only now (IDNA), and may fail here too
        port = "" if url.is_default_port() else f":{url.port}"
    except ValueError:  # not a URL yarl can read (a bad IPv6 host or IDNA name, a port past 65535)
        return origin.strip()
    if not url.scheme or not name:
        return origin.strip()
    host = f"[{name}]" if ":" in name else name
    return f"{url.scheme.lower()}://{host.lower()}{port}"


def _validate(config: Config) -> None:
    if not 0 <= config.port <= 65535:
        raise ConfigError(f"port must be between 0 and 65535, not {config.port}")
    if config.base_url is not None:
        check_base_url(config.base_url, config.api_key)
        if not config.model:
            raise ConfigError(
                "no model is set for the provider: set LLM_MODEL or pass --model "
                "(for example gpt-4.1-mini, deepseek-reasoner or qwen3:8b)"
            )
    for name in (
        "connect_timeout",
        "first_byte_timeout",
        "idle_timeout",
        "keepalive",
        "retention",
        "stall_timeout",
        "shutdown_timeout",
        "body_timeout",
    ):
        value = getattr(config, name)
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{name} must be a positive number of seconds, not {value}")
    if not (config.disconnect_grace >= 0 and math.isfinite(config.disconnect_grace)):
        raise ConfigError(f"disconnect_grace must be zero or more seconds, not {config.disconnect_grace}")
    if config.buffer_total_bytes < config.stream_buffer_bytes:
        raise ConfigError("buffer_total_bytes must be at least stream_buffer_bytes")
    for name in ("max_body_bytes", "max_line_bytes", "stream_buffer_bytes"):
        if getattr(config, name) < 1024:
            raise ConfigError(f"{name} must be at least 1024, not {getattr(config, name)}")
    if config.retry_ms < 0:
        raise ConfigError(f"retry_ms must not be negative, not {config.retry_ms}")
    if config.demo_delay < 0 or not math.isfinite(config.demo_delay):
        raise ConfigError(f"demo_delay must be zero or more seconds, not {config.demo_delay}")
    if config.demo_tokens < 0:
        raise ConfigError(f"demo_tokens must be zero or more, not {config.demo_tokens}")
    if config.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"log level must be DEBUG, INFO, WARNING or ERROR, not {config.log_level!r}")
    for name in ("backlog", "max_messages", "max_chars", "max_streams", "client_streams"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be at least 1, not {getattr(config, name)}")
    try:
        rate = limits.parse(config.rate_limit)
    except ValueError:
        raise ConfigError(f"rate limit {config.rate_limit!r} is not of the form N/second, N/minute or N/hour") from None
    if rate.amount < 1:
        raise ConfigError(f"rate limit {config.rate_limit!r} would refuse every request: allow at least 1")
    if not 1 <= config.ipv6_prefix <= 128:
        raise ConfigError(f"ipv6_prefix must be between 1 and 128 bits, not {config.ipv6_prefix}")
    for proxy in config.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(f"trusted proxy {proxy!r} is not an IP address or network") from None
    for origin in config.cors_origins:
        if origin != "*" and not _is_origin(origin):
            raise ConfigError(f"CORS origin {origin!r} must look like https://example.com")
    for host in config.allowed_hosts:
        if host != "*" and (not host.strip("[].") or any(c in host for c in " /@?#") or "://" in host):
            raise ConfigError(f"allowed host {host!r} must be a host name such as chat.example.com, or *")
    if config.cors_credentials and "*" in config.cors_origins:
        raise ConfigError("CORS credentials cannot be allowed for every origin ('*'): list the origins")
    if any(not t or t != t.strip() for t in config.tokens):
        raise ConfigError("tokens must be non-empty and without spaces around them")
    if config.redis_url is not None:
        _validate_redis_url(config.redis_url)
    if not config.redis_prefix or any(c.isspace() or c in "{}" for c in config.redis_prefix):
        raise ConfigError(f"redis prefix {config.redis_prefix!r} must be non-empty, without spaces or braces")
    if any(not m or m != m.strip() for m in config.models):
        raise ConfigError(f"models must be non-empty names without spaces around them: {config.models!r}")
    _validate_providers(config)


def _is_origin(text: str) -> bool:
    """A scheme, a host and perhaps a port, as a browser's ``Origin`` header has them."""
    try:
        url = URL(text)
        host, port = url.host, url.port  # the host decoded (IDNA) here, where its failure is caught
    except ValueError:
        return False
    return url.scheme in ("http", "https") and bool(host) and url.path in ("", "/") and 0 < (port or 0) < 65536


def _validate_redis_url(url: str) -> None:
    """A URL redis-py can use; the messages never repeat it, as it may hold a password."""
    example = "for example redis://localhost:6379/0"
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # brackets that hold no IPv6 address
        raise ConfigError(f"the Redis URL cannot be read as a URL ({example})") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"the Redis URL must start with redis://, rediss:// or unix:// ({example})")
    try:
        parts.port  # noqa: B018  # raises for a port that is not a number
    except ValueError:
        raise ConfigError(f"the Redis URL's port must be a number ({example})") from None
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError("a unix:// Redis URL needs the socket's path, for example unix:///run/redis.sock")
    elif not parts.hostname:
        raise ConfigError(f"the Redis URL needs a host ({example})")
    elif parts.path.strip("/") and not parts.path.strip("/").isdigit():
        raise ConfigError(f"the Redis URL's path is the database's number ({example})")


def _validate_providers(config: Config) -> None:
    if config.think not in THINK_MODES:
        raise ConfigError(f"think must be {', '.join(THINK_MODES[:-1])} or {THINK_MODES[-1]}, not {config.think!r}")
    if not 0 <= config.upstream_retries <= 10:
        raise ConfigError(f"upstream_retries must be between 0 and 10, not {config.upstream_retries}")
    if not config.providers:
        return
    check_providers(config.providers)
    used = {"base_url": config.base_url is not None, "api_key": config.api_key, "models": config.models}
    shorthand = [name for name, value in used.items() if value]
    if shorthand:
        raise ConfigError(
            f"{' and '.join(shorthand)} (the single-provider settings) cannot be combined with [[providers]]: "
            "unset them (--base-url, LLM_BASE_URL, OPENAI_BASE_URL, --models, THINKSTREAM_MODELS), or give each "
            "provider its base_url, api_key_env and models in the config file"
        )
    served = [model.id for provider in config.providers for model in provider.models]
    if config.model and config.model not in served:
        raise ConfigError(
            f"the default model {config.model!r} is not listed by any provider: "
            f"add it to one, or choose one of {', '.join(served)}"
        )


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, not {text!r}")


def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _parser_for(f: dataclasses.Field[Any]) -> Callable[[str], Any]:
    default = f.default
    if isinstance(default, bool):
        return _parse_bool
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    if isinstance(default, tuple):
        return _parse_list
    return str


def _convert(f: dataclasses.Field[Any], text: str, source: str) -> Any:
    try:
        return _parser_for(f)(text)
    except ValueError:
        raise ConfigError(f"{source}={text!r} is not a valid value for {f.name}") from None


def argument_parser() -> argparse.ArgumentParser:
    """The ``server.py`` command line, generated from the settings."""
    parser = argparse.ArgumentParser(
        prog="server.py",
        description=(
            "thinkstream: relay a streaming LLM chat completion to browsers over "
            "Server-Sent Events, and serve the chat page. Command-line flags override "
            "environment variables, which override the --config file."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in settings():
        env = ", ".join(f.metadata["env"])
        help_text = f"{f.metadata['help']} Environment: {env}." if env else f.metadata["help"]
        flag = f.metadata["flag"]
        if flag is None:
            # Settings without a flag (the API key) still appear in --help.
            parser.epilog = (parser.epilog or "") + f"{f.name}: {help_text} "
            continue
        parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)
    return parser


def load_config(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """Build the configuration from the command line, over the environment, over the config file."""
    args = vars(argument_parser().parse_args(argv))
    values: dict[str, Any] = {}
    for f in settings():
        if f.name in args:
            values[f.name] = _convert(f, args[f.name], f.metadata["flag"])
            continue
        for name in f.metadata["env"]:
            if environ.get(name, "").strip():
                values[f.name] = _convert(f, environ[name].strip(), name)
                break
    path = values.get("config_file")
    from_file = read_config_file(path, settings(), environ) if path else {}
    for name, value in from_file.items():
        values.setdefault(name, value)
    if values.get("providers"):
        # Each provider's key comes from its own variable (api_key_env); the shorthand's key plays no part.
        values.pop("api_key", None)
    else:
        _apply_provider_conventions(values, environ)
        _choose_key(values, environ)
    try:
        return Config(**values)
    except ConfigError as exc:
        raise _blame_file(exc, path, from_file) from None


def _blame_file(error: ConfigError, path: str | None, from_file: Mapping[str, Any]) -> ConfigError:
    """Name the file (and the key) when the problem is the file's own; else the error as it is."""
    probes = [
        (f", {name}", {name: value, "model": "m"} if name == "base_url" else {name: value})
        for name, value in from_file.items()
        if name != "providers"
    ]
    for where, probe in [*probes, ("", dict(from_file))]:
        try:
            Config(**probe)
        except ConfigError as own:
            if str(own) == str(error):
                return ConfigError(f"config file {path}{where}: {error}")
    return error


def _apply_provider_conventions(values: dict[str, Any], environ: Mapping[str, str]) -> None:
    """A lone DEEPSEEK_API_KEY means DeepSeek; a lone OPENAI_API_KEY means OpenAI."""
    if "base_url" in values:
        return
    if environ.get("LLM_API_KEY", "").strip():
        raise ConfigError("LLM_API_KEY is set but LLM_BASE_URL is not: set LLM_BASE_URL (or --base-url)")
    if environ.get("OPENAI_API_KEY", "").strip():
        values["base_url"] = OPENAI_BASE_URL
    elif environ.get("DEEPSEEK_API_KEY", "").strip():
        values["base_url"] = DEEPSEEK_BASE_URL
        values.setdefault("model", DEEPSEEK_DEFAULT_MODEL)


# Hosts whose own key variable is meant for them: with both keys set, each goes to its own provider.
_OWN_KEYS = {"api.openai.com": "OPENAI_API_KEY", "api.deepseek.com": "DEEPSEEK_API_KEY"}


def _choose_key(values: dict[str, Any], environ: Mapping[str, str]) -> None:
    """The single provider's key: ``LLM_API_KEY``, else the base URL's own provider's variable, else the first set.

    A key taken from another provider's variable is sent all the same (as
    documented), with a warning that names the variable and the host, never the key.
    """
    if "api_key" not in values or environ.get("LLM_API_KEY", "").strip():
        return
    base_url = values.get("base_url")
    try:
        host = URL(base_url).host if isinstance(base_url, str) else None
    except ValueError:
        return  # refused when the configuration is checked
    own = _OWN_KEYS.get((host or "").rstrip("."))
    if own is not None and environ.get(own, "").strip():
        values["api_key"] = environ[own].strip()
        return
    source = next(name for name in ("OPENAI_API_KEY", "DEEPSEEK_API_KEY") if environ.get(name, "").strip())
    if source == "OPENAI_API_KEY" and base_url == environ.get("OPENAI_BASE_URL", "").strip():
        return  # the OpenAI SDK's own pair, for any OpenAI-compatible server
    logger.warning(
        "the key in %s is sent to %s; if it is not that provider's key, set LLM_API_KEY to the right one",
        source,
        host,
    )
