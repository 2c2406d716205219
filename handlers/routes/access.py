"""Who may use the API, and how much: access tokens, client identity, rate limits.

A relay holds someone's paid API key, so an open one is an open wallet. When
tokens are configured every API route wants one, compared in constant time.
Each request is attributed to a *client*: its token (by fingerprint, never
the token itself) or else its address, with ``X-Forwarded-For`` believed
only from configured proxies; an IPv6 address stands for its whole network
(``--ipv6-prefix``, a /64 by default), which one host commonly has to
itself. Request rates are limited per client with the ``limits`` library.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import time
from typing import TYPE_CHECKING

import limits
from aiohttp import web
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError

from ..config import Config
from ..errors import RelayError

if TYPE_CHECKING:
    from redis.asyncio import Redis

logger = logging.getLogger(__name__)

# Seconds after a failure of the shared counts during which requests are not counted at all.
_UNCOUNTED = 1.0

__all__ = ["Access", "client_key", "principal"]

# The client a request is attributed to, set by the access middleware.
client_key = web.RequestKey("client_key", str)
# How a client that presented an access token is named.
_TOKEN_CLIENT = "token:"


def principal(request: web.Request) -> str | None:
    """Who owns the streams ``request`` starts: its access token (by fingerprint), or None without tokens."""
    client = request.get(client_key)
    return client if client is not None and client.startswith(_TOKEN_CLIENT) else None


class Access:
    """Access control and per-client request rates for one application."""

    def __init__(self, config: Config, redis: Redis | None = None) -> None:
        self._tokens = [token.encode() for token in config.tokens]
        self._proxies = [ipaddress.ip_network(p, strict=False) for p in config.trusted_proxies]
        self._ipv6_prefix = config.ipv6_prefix
        self._ipv6_mask = ((1 << 128) - 1) ^ ((1 << (128 - config.ipv6_prefix)) - 1)
        self._limit = limits.parse(config.rate_limit)
        self._memory: MemoryStorage | None = None
        self._warned = self._failed = -math.inf
        self._storage_errors: tuple[type[Exception], ...] = (StorageError,)
        storage: Storage
        if redis is None:
            storage = self._memory = MemoryStorage()
        else:
            # Every process counts in the same Redis, through the pool the stream store uses.
            from limits.aio.storage import RedisStorage
            from redis.exceptions import RedisError

            storage = RedisStorage(
                "async+redis://",
                implementation="redispy",
                connection_pool=redis.connection_pool,  # type: ignore[arg-type]  # limits types options narrowly
                key_prefix=f"{config.redis_prefix}:limits",
                wrap_exceptions=True,
            )
            self._storage_errors = (StorageError, RedisError)
        self._limiter = SlidingWindowCounterRateLimiter(storage)

    def client(self, request: web.BaseRequest) -> str:
        """Authenticate ``request`` (401 if it must and cannot) and name its client."""
        if not self._tokens:
            return self.address(request)
        given = _bearer(request)
        # Compare with every token, without stopping early, so timing tells nothing.
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(token, given)
        if not given or not matched:
            raise RelayError(
                "this relay needs an access token: send 'Authorization: Bearer <token>'",
                code="unauthorized",
                http_status=401,
            )
        return _TOKEN_CLIENT + hashlib.sha256(given).hexdigest()[:12]

    async def check_rate(self, client: str) -> None:
        """Count one request for ``client``; 429 with Retry-After past the limit.

        When the shared counts (Redis) cannot be reached the request goes through uncounted: what
        needs the store fails on its own (a new stream is a 503), and the rest, such as
        ``/metrics``, keeps answering when it is most wanted.
        """
        if time.monotonic() - self._failed < _UNCOUNTED:
            return  # It failed a moment ago: no request waits on it again so soon.
        try:
            if await self._limiter.hit(self._limit, client):
                return
            stats = await self._limiter.get_window_stats(self._limit, client)
        except self._storage_errors as exc:
            now = self._failed = time.monotonic()
            if now - self._warned >= 10:
                self._warned = now
                logger.warning("request rates are not counted: the stream store is unreachable (%s)", exc)
            return
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        raise RelayError(
            f"too many requests: the limit is {self._limit}; try again in {retry_after} s",
            code="rate_limited",
            http_status=429,
            retry_after=retry_after,
        )

    async def close(self) -> None:
        """Stop the memory storage's expiry task, so that none is left pending at exit."""
        if self._memory is None:
            return
        timer = self._memory.timer
        if timer is not None and not timer.done():
            timer.cancel()
        await self._memory.reset()

    def address(self, request: web.BaseRequest) -> str:
        """The peer's address, or the client's as told by trusted proxies (an IPv6 one as its network)."""
        peer = request.remote or "unknown"
        if not self._proxies or not self._trusted(peer):
            return self._grouped(peer)
        hops = [hop.strip() for header in request.headers.getall("X-Forwarded-For", ()) for hop in header.split(",")]
        # Walk back from the nearest hop; the first address no trusted proxy vouches for is the client.
        # A hop that is no address at all ends the walk at the last real one: a client is never named
        # by header text, which would reach logs and Redis keys.
        client = peer
        for hop in reversed([hop for hop in hops if hop]):
            address = _address(hop)
            if address is None:
                break
            client = address
            if not self._trusted(address):
                break
        return self._grouped(client)

    def _grouped(self, address: str) -> str:
        """An IPv6 address as its ``--ipv6-prefix`` network, an IPv4-mapped one as IPv4; anything else as is."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return address
        if isinstance(ip, ipaddress.IPv4Address):
            return address
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        # What str(ip_network(..., strict=False)) gives, at less than half its cost (per request).
        return f"{ipaddress.IPv6Address(int(ip) & self._ipv6_mask)}/{self._ipv6_prefix}"

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            # A dual-stack socket shows an IPv4 proxy as ::ffff:a.b.c.d: it is the proxy all the same.
            mapped = ip.ipv4_mapped
            return any(ip in network or mapped in network for network in self._proxies)
        return any(ip in network for network in self._proxies)


def _address(hop: str) -> str | None:
    """An ``X-Forwarded-For`` hop as an IP address, its port dropped (some gateways add one); None if it is none."""
    candidates = [hop]
    if hop.startswith("[") and "]" in hop:
        candidates.append(hop[1 : hop.index("]")])  # [v6]:port
    elif hop.count(":") == 1:
        candidates.append(hop.partition(":")[0])  # v4:port
    for candidate in candidates:
        try:
            return str(ipaddress.ip_address(candidate))
        except ValueError:
            continue
    return None


def _bearer(request: web.BaseRequest) -> bytes:
    """The token from ``Authorization: Bearer``, or ``?access_token=`` (RFC 6750 §2.3), for EventSource.

    Bytes that are not UTF-8 (aiohttp keeps them as surrogates) make a token that matches none.
    """
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip().encode("utf-8", "surrogateescape")
    return request.query.get("access_token", "").encode("utf-8", "surrogateescape")
