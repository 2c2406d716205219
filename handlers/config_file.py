"""Read the TOML configuration file (``--config FILE``): settings by name, and ``[[providers]]``.

The file may hold any setting the flags have, under its name with underscores
(``port = 8080``, ``rate_limit = "120/minute"``), and any number of providers.
Keys never: a secret setting is refused, and a provider names the environment
variable its key is in (``api_key_env``). Every problem stops start-up with a
message that names the file, the key (or, for bad TOML, the line) and what to
fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import ConfigError
from .provider.providers import Model, Provider, check_providers

__all__ = ["read_config_file"]

# Settings a file cannot hold: the file's own name.
_NOT_IN_FILE = frozenset({"config_file"})
_PROVIDER_KEYS = ("name", "base_url", "api_key_env", "models", "headers")
_MODEL_KEYS = ("id", "think")


def read_config_file(path: str, fields: Sequence[dataclasses.Field[Any]], environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings the file at ``path`` holds, by field name and typed; providers with their keys."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not valid TOML: it is not UTF-8 text") from None
    known = {f.name: f for f in fields if f.name not in _NOT_IN_FILE}
    values: dict[str, Any] = {}
    for key, value in data.items():
        where = f"config file {path}, {key}"
        setting = known.get(key)
        if setting is None:
            raise ConfigError(f"{where}: {_unknown(key, known, 'setting', 'python server.py --help lists them')}")
        if setting.metadata["secret"] and not _no_secret_in(key, value):
            env = " or ".join(setting.metadata["env"])
            raise ConfigError(f"{where}: secrets stay out of files; set {env} in the environment instead")
        if key == "providers":
            values[key] = _providers(value, path, environ)
        else:
            values[key] = _typed(setting, value, where)
    return values


def _no_secret_in(key: str, value: Any) -> bool:
    """A secret setting's value that holds no secret: a Redis URL without a password."""
    if key != "redis_url" or not isinstance(value, str):
        return False
    try:
        parts = urllib.parse.urlsplit(value)
        return parts.password is None and "password" not in urllib.parse.parse_qs(parts.query)
    except ValueError:
        return False


def _typed(setting: dataclasses.Field[Any], value: Any, where: str) -> Any:
    """``value`` as the setting's type, which its default tells (as the flags' parsers do)."""
    default = setting.default
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        wanted = "true or false"
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        wanted = "a whole number"
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        wanted = "a number"
    elif isinstance(default, tuple):
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
        wanted = 'a list of strings, like ["a", "b"]'
    else:
        if isinstance(value, str):
            return value
        wanted = "a string (in quotes)"
    raise ConfigError(f"{where}: must be {wanted}, not {value!r}")


def _providers(value: Any, path: str, environ: Mapping[str, str]) -> tuple[Provider, ...]:
    if not isinstance(value, list) or not all(isinstance(table, dict) for table in value):
        raise ConfigError(f"config file {path}, providers: write each provider as a [[providers]] table")
    providers = tuple(_provider(table, f"config file {path}, providers[{i}]", environ) for i, table in enumerate(value))
    try:
        check_providers(providers)
    except ConfigError as exc:
        raise ConfigError(f"config file {path}, providers: {exc}") from None
    return providers


def _provider(table: dict[str, Any], where: str, environ: Mapping[str, str]) -> Provider:
    if isinstance(table.get("name"), str):
        where = f"{where} ({table['name']})"
    for key in table:
        if key == "api_key":
            raise ConfigError(
                f"{where}: keys stay out of files; put the key in an environment variable and name it "
                'with api_key_env = "VARIABLE"'
            )
        if key not in _PROVIDER_KEYS:
            raise ConfigError(f"{where}: {_unknown(key, _PROVIDER_KEYS, 'provider key')}")
    for key in ("name", "base_url", "models"):
        if key not in table:
            raise ConfigError(f"{where}: {key} is missing")
    for key in ("name", "base_url", "api_key_env"):
        if key in table and not isinstance(table[key], str):
            raise ConfigError(f"{where}, {key}: must be a string (in quotes), not {table[key]!r}")
    api_key = None
    if "api_key_env" in table:
        variable = table["api_key_env"]
        api_key = environ.get(variable, "").strip()
        if not api_key:
            raise ConfigError(
                f"{where}, api_key_env: the environment variable {variable} is not set: set it to the key"
            )
    headers = table.get("headers", {})
    if not isinstance(headers, dict):
        raise ConfigError(f'{where}, headers: write them as a table, like headers = {{ "X-Title" = "thinkstream" }}')
    models = _models(table["models"], f"{where}, models")
    try:
        return Provider(
            name=table["name"],
            base_url=table["base_url"],
            models=models,
            api_key=api_key,
            headers=headers,
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _models(value: Any, where: str) -> tuple[Model, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f'{where}: must be a non-empty list, like ["model-a", {{ id = "model-b", think = "open" }}]')
    models = []
    for i, item in enumerate(value):
        here = f"{where}[{i}]"
        if isinstance(item, str):
            item = {"id": item}
        if not isinstance(item, dict):
            raise ConfigError(f'{here}: must be a model id or a table like {{ id = "…", think = "open" }}')
        for key in item:
            if key not in _MODEL_KEYS:
                raise ConfigError(f"{here}: {_unknown(key, _MODEL_KEYS, 'model key')}")
        if not isinstance(item.get("id"), str):
            raise ConfigError(f"{here}: needs an id (a string)")
        if "think" in item and not isinstance(item["think"], str):
            raise ConfigError(f"{here}, think: must be a string, not {item['think']!r}")
        try:
            models.append(Model(item["id"], item.get("think")))
        except ConfigError as exc:
            raise ConfigError(f"{here}: {exc}") from None
    return tuple(models)


def _unknown(key: str, known: Sequence[str] | Mapping[str, Any], what: str, listed: str = "") -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean {close[0]!r}?" if close else (listed or f"known: {', '.join(known)}")
    return f"unknown {what} {key!r}; {hint}"
