"""Run thinkstream from the command line: ``python server.py --help``.

This module only reads the command line and the environment, sets up logging
and runs the app. Embedders import :func:`create_app` and :class:`Config`
from here and mount the app wherever they like.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from aiohttp import web

from handlers.app import create_app
from handlers.config import Config, ConfigError, load_config
from handlers.provider.providers import configured_providers
from handlers.runtime import quiet_accept_errors, tune_process

__all__ = ["Config", "app_factory", "create_app", "main"]

logger = logging.getLogger("thinkstream")

# Seconds aiohttp gives requests still under way once the streams are drained (see main).
_AFTER_DRAIN = 0.5


_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: Sequence[str] | None = None) -> int:
    """Start the server; return the process exit status."""
    logging.basicConfig(format=_LOG_FORMAT, level=logging.INFO)
    try:
        config = load_config(sys.argv[1:] if argv is None else argv, os.environ)
    except ConfigError as exc:
        logger.error("cannot start: %s", exc)
        return 2
    logging.getLogger().setLevel(config.log_level.upper())
    if not config.is_loopback and not config.tokens:
        logger.warning(
            "listening on %s without access tokens: anyone who can reach this address can spend your "
            "provider budget. Set THINKSTREAM_TOKENS (or --token), or listen on 127.0.0.1.",
            config.host,
        )
    if config.config_file:
        logger.info("settings from config file %s", config.config_file)
    if config.uses_demo:
        logger.info("no provider configured: answering with the embedded demo model (set LLM_BASE_URL to change)")
    else:
        for provider in configured_providers(config):
            models = ", ".join(model.id for model in provider.models)
            logger.info("relaying to %s at %s: %s", provider.name, provider.public_url, models)
        logger.info("default model %s", config.default_model)
    app = create_app(config)
    tune_process(config.max_streams)
    loop = asyncio.new_event_loop()
    quiet_accept_errors(loop)
    listening = False

    def announce(banner: str) -> None:
        nonlocal listening
        listening = True
        _announce(banner)

    try:
        web.run_app(
            app,
            host=config.host,
            port=config.port,
            backlog=config.backlog,
            # No access log: GET /stream URLs carry the user's prompt.
            access_log=None,
            print=announce,
            # Not the whole shutdown's: aiohttp first closes the listener and idle connections, then
            # the app drains its streams (up to --shutdown-timeout, ending the rest with server_shutdown),
            # then aiohttp gives every request still under way this long before it cancels it (and as
            # long again to end): a stream's last event, or a body that is still coming.
            shutdown_timeout=_AFTER_DRAIN,
            loop=loop,
        )
    except OSError as exc:
        if listening:
            raise
        # The listen failed: the port is taken, needs privileges, or the address is not this host's.
        logger.error("cannot start: %s", exc.strerror or exc)
        return 1
    return 0


async def app_factory() -> web.Application:
    """The app configured from the environment, for process managers such as gunicorn:
    ``gunicorn 'server:app_factory' --worker-class aiohttp.GunicornWebWorker``."""
    config = load_config([], os.environ)
    # gunicorn configures only its own loggers: without this, the relay's (each stream's line) go nowhere.
    logging.basicConfig(format=_LOG_FORMAT)
    for name in ("thinkstream", "handlers"):
        logging.getLogger(name).setLevel(config.log_level.upper())
    app = create_app(config)
    tune_process(config.max_streams)
    quiet_accept_errors(asyncio.get_running_loop())
    return app


def _announce(banner: str) -> None:
    """aiohttp's start-up banner ("Running on http://…"), as one log line."""
    first = banner.strip().splitlines()[0].strip("= ")
    logger.info("%s/ (Ctrl+C to stop)", first)


if __name__ == "__main__":
    sys.exit(main())
