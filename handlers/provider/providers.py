"""The providers one relay calls, the models each serves, and the routing of a request's model.

A provider is an OpenAI-compatible base URL, its key (read from the
environment, never from a file), the models it serves, each with how its
content is read for a thinking block (``think``), and any request headers it
asks for (OpenRouter's ``HTTP-Referer`` and ``X-Title``). They come from the
configuration file's ``[[providers]]`` tables, or from the single-provider
settings (``--base-url``, ``LLM_API_KEY``, ``--model``, ``--models``), which
make one. A request's model picks its provider, and a provider's key goes to
that provider only.
"""

from __future__ import annotations

import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from yarl import URL

from ..errors import ConfigError
from .think_tags import THINK_MODES
from .upstream import Upstream

if TYPE_CHECKING:
    from ..config import Config

__all__ = [
    "Model",
    "Provider",
    "ProviderTable",
    "check_base_url",
    "check_providers",
    "configured_providers",
    "public_url",
]

# RFC 9110 §5.6.2: a header name is a token.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Headers the relay sets itself: the key's, and those the request's body and stream need.
_RESERVED_HEADERS = frozenset(
    {"authorization", "accept", "content-type", "content-length", "host", "transfer-encoding"}
)


@dataclass(frozen=True, slots=True)
class Model:
    """A model a client may choose, and how its content is read for a thinking block."""

    id: str
    # auto, open or none (see think_tags); None: the relay's own think setting.
    think: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id or self.id != self.id.strip():
            raise ConfigError(f"a model id must be a non-empty name without spaces around it, not {self.id!r}")
        if self.think is not None and self.think not in THINK_MODES:
            raise ConfigError(f"think must be {_choices(THINK_MODES)}, not {self.think!r} (model {self.id!r})")


@dataclass(frozen=True, slots=True)
class Provider:
    """An OpenAI-compatible API, its key and the models it serves."""

    name: str
    base_url: str
    models: tuple[Model, ...]
    api_key: str | None = field(default=None, repr=False)
    # Extra request headers, sent to this provider only.
    headers: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name != self.name.strip():
            raise ConfigError(f"a provider needs a name without spaces around it, not {self.name!r}")
        check_base_url(self.base_url, self.api_key)
        models = tuple(self.models)
        if not models or not all(isinstance(m, Model) for m in models):
            raise ConfigError(f"provider {self.name!r} needs at least one model")
        ids = [m.id for m in models]
        if len(set(ids)) < len(ids):
            raise ConfigError(f"provider {self.name!r} lists a model twice: {', '.join(ids)}")
        object.__setattr__(self, "models", models)
        for name, value in self.headers.items():
            if not isinstance(name, str) or not _TOKEN.fullmatch(name):
                raise ConfigError(f"provider {self.name!r}: {name!r} is not a valid header name")
            if name.lower() in _RESERVED_HEADERS:
                raise ConfigError(
                    f"provider {self.name!r}: the relay sets the {name} header itself"
                    + (" from the key in the environment (api_key_env)" if name.lower() == "authorization" else "")
                )
            if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
                raise ConfigError(f"provider {self.name!r}: header {name} must be a single line of text")
        object.__setattr__(self, "headers", types.MappingProxyType(dict(self.headers)))

    @property
    def public_url(self) -> str:
        return public_url(self.base_url)


def check_base_url(base_url: Any, api_key: str | None = None) -> None:
    """An absolute http(s) URL, as ``--base-url`` and a provider's ``base_url`` must be.

    The messages show it without its user, password and query, which may be secret.
    """
    try:
        url = URL(base_url) if isinstance(base_url, str) else None
        # The host is decoded (IDNA) when first read: here, where its failure is caught.
        host, port = (url.host, url.port) if url is not None else (None, None)
    except ValueError:  # yarl: a bracketed host that is not an IPv6 address, a bad IDNA name, a bad port
        url = host = port = None
    if url is None or url.scheme not in ("http", "https") or not host or not 0 < (port or 0) < 65536:
        shown: Any = base_url
        if isinstance(base_url, str) and any(c in base_url for c in "@?#"):
            # A user, password or query (with or without a scheme before them) may be secret.
            shown = "(not shown: it carries a user, password or query)"
        elif host:
            shown = public_url(base_url)
        raise ConfigError(
            f"base URL {shown!r} must be an absolute http:// or https:// URL, "
            "for example https://api.deepseek.com or http://localhost:11434/v1"
        )
    if api_key and (url.user or url.password):
        raise ConfigError(
            f"base URL {public_url(base_url)!r} carries a user and password, and a key is set too: one "
            "Authorization header can carry only one of them; drop the user:password@ or unset the key"
        )


def public_url(base_url: str) -> str:
    """The URL without what may be secret in it (user, password, query), for logs."""
    return str(URL(base_url).with_user(None).with_query(None).with_fragment(None))


def check_providers(providers: tuple[Provider, ...]) -> None:
    """Names and models must each be unique, so that a model has exactly one provider."""
    seen_names: set[str] = set()
    served_by: dict[str, str] = {}
    for provider in providers:
        if not isinstance(provider, Provider):
            raise ConfigError(f"providers must be Provider records, not {type(provider).__name__}")
        if provider.name in seen_names:
            raise ConfigError(f"two providers are named {provider.name!r}: give each its own name")
        seen_names.add(provider.name)
        for model in provider.models:
            other = served_by.setdefault(model.id, provider.name)
            if other != provider.name:
                raise ConfigError(f"model {model.id!r} is listed by both {other!r} and {provider.name!r}: keep one")


def configured_providers(config: Config) -> tuple[Provider, ...]:
    """The providers the relay calls: the file's, or the one the single-provider settings make (none: the demo)."""
    if config.providers:
        return config.providers
    if config.base_url is None:
        return ()
    name = URL(config.base_url).host or "provider"
    models = tuple(Model(model_id) for model_id in config.allowed_models)
    return (Provider(name=name, base_url=config.base_url, models=models, api_key=config.api_key),)


class ProviderTable:
    """Which upstream serves each model; built once per app from its configuration."""

    __slots__ = ("_routes", "default_model", "models", "providers")

    def __init__(self, config: Config) -> None:
        self.providers = configured_providers(config)
        self.default_model = config.default_model
        self._routes = {
            model.id: Upstream(
                provider.base_url,
                provider.api_key,
                headers=provider.headers,
                think=model.think or config.think,
                name=provider.name,
            )
            for provider in self.providers
            for model in provider.models
        }
        # (model, its provider's name), the default first: what /models lists, which is what is allowed.
        self.models: tuple[tuple[str, str], ...] = tuple(
            (model_id, route.name if (route := self._routes.get(model_id)) else "demo")
            for model_id in config.allowed_models
        )

    def upstream(self, model: str) -> Upstream | None:
        """The upstream for an allowed model; None when the embedded demo answers every request."""
        if not self.providers:
            return None
        return self._routes[model]

    def listing(self) -> list[dict[str, Any]]:
        """``/models``: every model with its provider's name (never its URL or key), the default first."""
        return [
            {"id": model_id, "default": model_id == self.default_model, "provider": provider}
            for model_id, provider in self.models
        ]


def _choices(options: tuple[str, ...]) -> str:
    return ", ".join(repr(o) for o in options[:-1]) + f" or {options[-1]!r}"
