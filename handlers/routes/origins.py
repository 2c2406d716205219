"""Which names and which pages may reach the relay: the Host and Origin checks.

A relay on loopback without tokens is out of other machines' reach, but not out
of the reach of its operator's browser. Any page can send it a request that
needs no CORS preflight (a form's POST, a ``fetch`` with ``text/plain``, an
``<img>`` GET) and so spend the key; and a page whose name an attacker rebinds
to 127.0.0.1 (DNS rebinding) is the relay's own origin to the browser, so it
can read the answers too. Hence:

- **Host.** A request that came in over loopback must name a loopback host
  (``localhost``, ``127.0.0.1``, ``[::1]``, any port), the address it came in
  on, or one of ``--allowed-hosts``. The check follows the connection, not the
  settings, so it holds wherever the app listens or is mounted. With
  ``--allowed-hosts`` set it applies to every connection; ``*`` turns it off.
- **Origin.** An API request from a page is refused unless the page is the
  relay's own or ``--cors-origins`` lists it. Browsers say which in
  ``Sec-Fetch-Site``, which pages cannot forge; one that does not send it is
  judged by its ``Origin`` against the ``Host``. Requests from outside a
  browser (no ``Origin``, no ``Sec-Fetch-Site``) are not a page's.
"""

from __future__ import annotations

import ipaddress

from aiohttp import web
from yarl import URL

from ..config import Config, normal_origin
from ..errors import RelayError

__all__ = ["LOOPBACK_NAMES", "Origins"]

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# Sec-Fetch-Site values of requests a page did not make for another site: its own, or the user's (address bar).
_OWN_SITE = frozenset({"same-origin", "none"})


class Origins:
    """The Host and Origin checks for one application."""

    def __init__(self, config: Config) -> None:
        self._any_host = "*" in config.allowed_hosts
        self._hosts = LOOPBACK_NAMES | {_name(host) for host in config.allowed_hosts}
        # Listed names make the check apply to every connection, not only to loopback ones.
        self._hosts_listed = bool(config.allowed_hosts)
        self._any_origin = "*" in config.cors_origins
        self._origins = frozenset(config.cors_origins)  # normalised by Config

    def check_host(self, request: web.BaseRequest) -> None:
        """Refuse (421) a request whose Host names this relay by a name it does not answer to."""
        if self._any_host:
            return
        local = _local_address(request)
        if not self._hosts_listed and (local is None or not local.is_loopback):
            return
        host = request.headers.get("Host")
        if host is None:
            return  # Browsers always send one; without it there is no name to rebind.
        name = _name(host)
        if name in self._hosts or (local is not None and name == str(local)):
            return
        raise RelayError(
            f"this relay does not answer to the name {name[:100]!r}: if it is one of its names, "
            "add it to --allowed-hosts (THINKSTREAM_ALLOWED_HOSTS)",
            code="host_not_allowed",
            http_status=421,
        )

    def check_origin(self, request: web.BaseRequest) -> None:
        """Refuse (403) an API request made by a page of another origin that ``--cors-origins`` does not list."""
        if self._any_origin:
            return
        headers = request.headers
        origin = headers.get("Origin")
        # As sent, an allowed origin is already in its normal form: parsed only when it is not.
        if origin is not None and self._origins and (origin in self._origins or normal_origin(origin) in self._origins):
            return
        site = headers.get("Sec-Fetch-Site")
        if site is not None:
            if site in _OWN_SITE:
                return
        elif origin is None or _same_origin(origin, headers.get("Host", "")):
            return
        raise RelayError(
            "pages of other origins may not use this relay; list yours in --cors-origins (THINKSTREAM_CORS_ORIGINS)",
            code="origin_not_allowed",
            http_status=403,
        )


def _name(host: str) -> str:
    """The name in a Host header or setting: no port, no IPv6 brackets, lower case, no final dot."""
    host = host.strip().lower()
    if host.count(":") > 1 and not host.startswith("["):
        # A bare IPv6 address: its colons are not a port. (Tried only then: a failed parse on every
        # request's "localhost:8080" cost more than the rest of the check.)
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            pass
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    else:
        name, colon, port = host.rpartition(":")
        if colon and port.isdigit():
            host = name
    return host.rstrip(".")


def _local_address(request: web.BaseRequest) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address the connection came in on (IPv4-mapped IPv6 as IPv4), or None off TCP."""
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if not isinstance(sockname, tuple):
        return None
    try:
        address = ipaddress.ip_address(sockname[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _same_origin(origin: str, host: str) -> bool:
    """Whether ``Origin`` names the host and port the request was sent to (the scheme may differ behind TLS)."""
    try:
        url = URL(origin)
        sent_to = URL.build(scheme=url.scheme, authority=host)
        # Hosts are decoded (IDNA) when first read, and may fail then.
        return bool(url.host) and url.host == sent_to.host and url.port == sent_to.port
    except ValueError:
        return False
