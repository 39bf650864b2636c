"""Which URLs may receive webhooks: the syntax, the allow-list (``SNAPGEN_WEBHOOK_ALLOWED_HOSTS``) and the
addresses a host resolves to."""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_URL_CHARS = 2048


class WebhookRefused(ValueError):
    """The URL may not receive webhooks (the message says why and what is allowed)."""


class WebhookUnresolvable(WebhookRefused):
    """The host name does not resolve (now): at submit time a refusal, when delivering a reason to retry."""


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NEVER = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32",  # this network, link-local, multicast
    "100.100.100.200/32", "192.0.0.192/32",  # Alibaba's and Oracle's metadata services (AWS/GCP/Azure: 169.254.169.254)
    "::/128", "fe80::/10", "ff00::/8", "fd00:ec2::254/128",  # unspecified, link-local, multicast, AWS's IPv6 metadata
))  # fmt: skip
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Host name labels; `_` too, as container service names have it.
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"^(\*\.)?({_LABEL}\.)*{_LABEL}$")


def _embedded_v4(addr: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64), which is where the packets go."""
    if isinstance(addr, ipaddress.IPv4Address):
        return None
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def never_allowed(addr: IPAddress) -> bool:
    return any(a.version == n.version and a in n for a in (addr, _embedded_v4(addr)) if a is not None for n in _NEVER)


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str
    host: str  # lower case, IPv6 without brackets
    port: int
    path: str  # path and query, as sent in the request line


def parse_url(url: str) -> Target:
    """Syntax only: http or https, a host, no credentials. Raises WebhookRefused."""
    if len(url) > MAX_URL_CHARS:
        raise WebhookRefused(f"the URL is longer than {MAX_URL_CHARS} characters")
    if not url.isascii() or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise WebhookRefused("the URL must be ASCII without spaces (write an international host name in punycode)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise WebhookRefused(f"not a valid URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise WebhookRefused("the URL must start with http:// or https://")
    if not parts.hostname:
        raise WebhookRefused("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise WebhookRefused("the URL may not carry credentials (user:password@); verify the webhook signature instead")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(url, scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80), path)


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])  # fe80::1%eth0: the scope is no part of the address
    except ValueError:
        return None


class WebhookPolicy:
    """Which webhook URLs are allowed: built from ``SNAPGEN_WEBHOOK_ALLOWED_HOSTS`` entries (see the module doc).

    No entries: no webhook is allowed at all.
    """

    def __init__(self, entries: Iterable[str]):
        self.public = False
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.names: list[str] = []
        for raw in entries:
            entry = raw.strip().lower()
            if not entry:
                continue
            if entry == "public":
                self.public = True
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            if not _HOST_NAME.match(entry.rstrip(".")):
                raise ValueError(f"{raw!r} is not a webhook host entry: write public, an IP address or network "
                                 "(10.0.0.0/8), or a host name (hooks.example.com, *.example.com)")  # fmt: skip
            self.names.append(entry.rstrip("."))

    @property
    def enabled(self) -> bool:
        return self.public or bool(self.networks) or bool(self.names)

    def describe(self) -> str:
        parts = (["public addresses"] if self.public else []) + [str(n) for n in self.networks] + self.names
        return ", ".join(parts) if parts else "nothing (webhooks are off)"

    def _name_allowed(self, host: str) -> bool:
        host = host.rstrip(".")
        return any(host.endswith(n[1:]) if n.startswith("*.") else host == n for n in self.names)

    def check_addresses(self, target: Target, addresses: Iterable[str]) -> list[str]:
        """``addresses`` (what the host resolved to) if every one is allowed; else WebhookRefused."""
        addresses = list(dict.fromkeys(addresses))
        named = self._name_allowed(target.host)
        for text in addresses:
            addr = _ip(text)
            if addr is None:
                raise WebhookRefused(f"{target.host} resolved to {text!r}, which is not an IP address")
            if never_allowed(addr):
                raise WebhookRefused(f"{target.host} is {addr}: link-local, metadata, multicast and unspecified "
                                     "addresses never receive webhooks")  # fmt: skip
            if named:
                continue
            mapped = _embedded_v4(addr) or addr
            if self.public and mapped.is_global:
                continue
            if any(a.version == n.version and a in n for a in (addr, mapped) for n in self.networks):
                continue
            kind = "loopback" if mapped.is_loopback else "private" if mapped.is_private else "not public"
            raise WebhookRefused(f"{target.host} is {addr}, a {kind} address; this server sends webhooks to "
                                 f"{self.describe()} (SNAPGEN_WEBHOOK_ALLOWED_HOSTS)")  # fmt: skip
        return addresses

    def _check_syntax(self, url: str) -> Target:
        if not self.enabled:
            raise WebhookRefused("this server sends no webhooks (SNAPGEN_WEBHOOK_ALLOWED_HOSTS is empty)")
        return parse_url(url)

    def resolve(self, url: str) -> tuple[Target, list[str]]:
        """The target and its allowed addresses, resolved now (blocking). Raises WebhookRefused."""
        target = self._check_syntax(url)
        if _ip(target.host) is not None:
            return target, self.check_addresses(target, [target.host])
        try:
            infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise WebhookUnresolvable(f"the host {target.host} does not resolve ({e})") from None
        return target, self.check_addresses(target, [info[4][0] for info in infos])

    async def acheck(self, url: str, timeout_s: float = 5.0) -> Target:
        """The API's check at submit time (the same rules, resolved without blocking the event loop)."""
        import asyncio

        target = self._check_syntax(url)
        if _ip(target.host) is not None:
            self.check_addresses(target, [target.host])
            return target
        try:
            loop = asyncio.get_running_loop()
            infos = await asyncio.wait_for(loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM),
                                           timeout_s)  # fmt: skip
        except (OSError, asyncio.TimeoutError) as e:
            raise WebhookUnresolvable(f"the host {target.host} does not resolve ({e or 'timed out'})") from None
        self.check_addresses(target, [info[4][0] for info in infos])
        return target


@functools.lru_cache(maxsize=8)
def policy_for(entries: tuple[str, ...]) -> WebhookPolicy:
    return WebhookPolicy(entries)
