"""URL fetching for item inputs behind an SSRF guard.

Torch-free; raises ``loom.errors`` classes only.

Fetching (``fetch_url``)
    * http/https only, no credentials in the URL;
    * every hop (the first request and each redirect, at most 5) resolves the host with
      ``getaddrinfo`` and refuses the URL if ANY resolved address is refused by the
      ``AddressPolicy`` (loopback, private, link-local/metadata, CGNAT, unspecified, multicast,
      reserved, documentation, IPv6 ULA / site-local, IPv4-mapped/compatible, NAT64/6to4/Teredo
      embeddings of non-public IPv4). Odd IPv4 spellings (``2130706433``, ``0177.0.0.1``,
      ``0x7f.1``, ``127.1``) are normalised by ``getaddrinfo`` and checked like any other;
    * DNS-rebinding defence: the connection goes to the address that was checked. The request
      URL's host is replaced with that IP; the ``Host`` header carries the original host, and for
      https the TLS ``server_hostname`` (SNI *and* certificate verification, via httpx's
      ``sni_hostname`` request extension) is the original host name, so certificates are still
      verified against the name the user gave. ``trust_env=False`` so that no proxy (which would
      resolve the name itself) is used;
    * the body is streamed and abandoned past ``max_bytes`` (``InputTooLarge``); ``timeout`` bounds
      each connect/read and the whole fetch (all hops; checked between chunks, so a server that
      trickles bytes is cut off at the next chunk after the deadline);
    * errors: refused address/scheme -> ``BlockedUrl``; 403/404/410 and other 4xx, too many
      redirects -> ``InputMissing`` (permanent); timeouts, connection errors, DNS failures, 5xx,
      408, 429 -> ``FetchFailed`` (transient).

    Metadata policy: ``allow_private=True`` (LOOM_ALLOW_PRIVATE_URLS=1, for on-premise inputs) lets
    loopback, RFC 1918, CGNAT, IPv6 ULA and their IPv4-mapped forms through, but NEVER link-local
    (169.254.0.0/16, fe80::/10: that is where cloud metadata services live, 169.254.169.254,
    169.254.170.2, fd00:ec2::254), the known metadata addresses outside link-local
    (100.100.100.200 Alibaba, fd00:ec2::254 AWS IPv6), unspecified, multicast, broadcast,
    reserved or documentation addresses. Pinning one extra host/port through is possible with
    ``AddressPolicy(allow=...)``.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

from loom.errors import BlockedUrl, FetchFailed, InputMissing, InputTooLarge, InvalidInput

if TYPE_CHECKING:
    import httpx

# --------------------------------------------------------------------------------------------
# The address policy (SSRF guard)
# --------------------------------------------------------------------------------------------

_PRIVATE = "private"  # may be let through by allow_private
_NEVER = "never"  # refused whatever the policy says (allow-list aside)

_Net = ipaddress.IPv4Network | ipaddress.IPv6Network

# Specific addresses first, then networks from most to least specific where they overlap.
_METADATA_ADDRESSES: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {
    ipaddress.ip_address("169.254.169.254"): "a cloud metadata address",
    ipaddress.ip_address("169.254.170.2"): "a cloud metadata address (ECS task metadata)",
    ipaddress.ip_address("100.100.100.200"): "a cloud metadata address (Alibaba Cloud)",
    ipaddress.ip_address("fd00:ec2::254"): "a cloud metadata address (AWS IPv6)",
}

_NETWORKS: tuple[tuple[_Net, str, str], ...] = tuple(
    (ipaddress.ip_network(net), label, kind)
    for net, label, kind in (
        ("0.0.0.0/8", "an unspecified ('this network') address", _NEVER),
        ("10.0.0.0/8", "a private address", _PRIVATE),
        ("100.64.0.0/10", "a shared (CGNAT) address", _PRIVATE),
        ("127.0.0.0/8", "a loopback address", _PRIVATE),
        ("169.254.0.0/16", "a link-local address", _NEVER),
        ("172.16.0.0/12", "a private address", _PRIVATE),
        ("192.0.0.0/24", "a reserved (IETF protocol assignment) address", _NEVER),
        ("192.0.2.0/24", "a documentation address", _NEVER),
        ("192.88.99.0/24", "a reserved (6to4 relay) address", _NEVER),
        ("192.168.0.0/16", "a private address", _PRIVATE),
        ("198.18.0.0/15", "a reserved (benchmarking) address", _NEVER),
        ("198.51.100.0/24", "a documentation address", _NEVER),
        ("203.0.113.0/24", "a documentation address", _NEVER),
        ("224.0.0.0/4", "a multicast address", _NEVER),
        ("255.255.255.255/32", "the broadcast address", _NEVER),
        ("240.0.0.0/4", "a reserved address", _NEVER),
        ("::/128", "an unspecified address", _NEVER),
        ("::1/128", "a loopback address", _PRIVATE),
        ("100::/64", "a discard-only address", _NEVER),
        ("2001::/32", "a Teredo tunnel address", _NEVER),
        ("2001:db8::/32", "a documentation address", _NEVER),
        ("fc00::/7", "a unique-local (private) address", _PRIVATE),
        ("fe80::/10", "a link-local address", _NEVER),
        ("fec0::/10", "a site-local (deprecated) address", _NEVER),
        ("ff00::/8", "a multicast address", _NEVER),
    )
)

_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_COMPAT = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_SIXTOFOUR = ipaddress.ip_network("2002::/16")


def classify_address(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> tuple[str, str] | None:
    """``(label, kind)`` for an address the guard cares about, ``None`` for a public address.

    ``kind`` is "private" (allow_private may let it through) or "never". IPv6 forms that embed an
    IPv4 address (IPv4-mapped, NAT64, 6to4) are judged by the embedded address; IPv4-compatible
    (``::a.b.c.d``, deprecated) addresses are always refused.
    """
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        ip = ipaddress.IPv6Address(ip.compressed.split("%", 1)[0])
    if ip in _METADATA_ADDRESSES:
        return _METADATA_ADDRESSES[ip], _NEVER
    if isinstance(ip, ipaddress.IPv6Address):
        embedded: ipaddress.IPv4Address | None = None
        form = ""
        if ip in _MAPPED:
            embedded, form = ip.ipv4_mapped, "an IPv4-mapped IPv6 address"
        elif ip in _NAT64 or ip in _NAT64_LOCAL:
            embedded, form = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "a NAT64 address"
        elif ip in _SIXTOFOUR:
            embedded, form = ip.sixtofour, "a 6to4 address"
        elif ip in _COMPAT and int(ip) > 1:
            v4 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
            return f"an IPv4-compatible IPv6 address (deprecated, embeds {v4})", _NEVER
        if embedded is not None:
            inner = classify_address(embedded)
            if inner is None:
                if form == "an IPv4-mapped IPv6 address":
                    # A real AAAA record is never IPv4-mapped; refuse rather than guess.
                    return f"{form} (embeds {embedded})", _NEVER
                return None  # NAT64 / 6to4 of a public IPv4 address: a legitimate route
            label, kind = inner
            return f"{form} embedding {embedded}, {label}", kind
    for net, label, kind in _NETWORKS:
        if ip.version == net.version and ip in net:
            return label, kind
    if not ip.is_global:
        return "a non-global (reserved) address", _NEVER
    return None


@dataclass(frozen=True)
class AddressPolicy:
    """Which resolved addresses a fetch may connect to.

    ``allow_private`` lets loopback / RFC 1918 / CGNAT / ULA through (never link-local, metadata,
    unspecified, multicast or reserved). ``allow`` is an explicit allow-list of ``(ip, port)``
    pairs that pass regardless (one on-premise host; tests).
    """

    allow_private: bool = False
    allow: frozenset[tuple[str, int]] = field(default_factory=frozenset)

    def refusal(self, ip: str, port: int) -> str | None:
        """Why ``ip`` (a resolved address) is refused, or None when it may be connected to."""
        addr = ipaddress.ip_address(ip)
        if (addr.compressed, port) in {(ipaddress.ip_address(a).compressed, p) for a, p in self.allow}:
            return None
        verdict = classify_address(addr)
        if verdict is None:
            return None
        label, kind = verdict
        if kind == _PRIVATE and self.allow_private:
            return None
        return label


Resolver = Callable[[str, int], Iterable[str]]


def resolve_host(host: str, port: int) -> list[str]:
    """All addresses ``host`` resolves to (getaddrinfo; normalises odd IPv4 spellings)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FetchFailed(f"could not resolve host {host!r}: {exc.strerror or exc}") from exc
    except (UnicodeError, ValueError) as exc:
        raise InvalidInput(f"invalid host name {host!r}: {exc}") from exc
    addrs: list[str] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        addr = str(sockaddr[0])
        if addr not in addrs:
            addrs.append(addr)
    if not addrs:
        raise FetchFailed(f"host {host!r} resolved to no IPv4/IPv6 address")
    return addrs


# --------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------

MAX_REDIRECTS = 5
_REDIRECTS = {301, 302, 303, 307, 308}
_TRANSIENT_4XX = {408, 425, 429}
_USER_AGENT = "loom-fetch/0.1"


@dataclass(frozen=True)
class _Target:
    url: str
    scheme: str
    host: str  # as written (lower-cased, brackets stripped)
    port: int
    ip: str  # the checked address we connect to
    host_header: str
    ip_literal: bool


def _port_suffix(scheme: str, port: int) -> str:
    return "" if (scheme, port) in (("http", 80), ("https", 443)) else f":{port}"


def _check_target(url: str, policy: AddressPolicy, resolver: Resolver) -> _Target:
    try:
        parts = urlsplit(url)
        port_opt = parts.port
    except ValueError as exc:
        raise InvalidInput(f"invalid URL {url!r}: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise BlockedUrl(f"refused {url!r}: scheme {scheme or '(none)'!r} is not allowed (http and https only)")
    host = parts.hostname
    if not host:
        raise InvalidInput(f"invalid URL {url!r}: no host")
    if parts.username is not None or parts.password is not None:
        raise InvalidInput(f"invalid URL {url!r}: credentials in URLs are not supported")
    port = port_opt if port_opt is not None else (443 if scheme == "https" else 80)
    addrs = list(resolver(host, port))
    if not addrs:
        raise FetchFailed(f"host {host!r} resolved to no address")
    for ip in addrs:
        reason = policy.refusal(ip, port)
        if reason is not None:
            shown = ip.split("%", 1)[0]
            if host.strip("[]") == shown:
                raise BlockedUrl(f"refused: {shown} is {reason}")
            raise BlockedUrl(f"refused: {host} resolves to {shown}, which is {reason}")
    ip = addrs[0]
    # Is the host itself an address (including odd IPv4 spellings such as 2130706433)?
    ip_literal = True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            socket.inet_aton(host)
            host = socket.inet_ntoa(socket.inet_aton(host))  # normalised for the Host header
        except OSError:
            ip_literal = False
    shown_host = f"[{host}]" if ":" in host else host
    return _Target(
        url=url,
        scheme=scheme,
        host=host,
        port=port,
        ip=ip,
        host_header=shown_host + _port_suffix(scheme, port),
        ip_literal=ip_literal,
    )


def check_url(url: str, *, policy: AddressPolicy, resolver: Resolver | None = None) -> None:
    """Refuse ``url`` now if its scheme, credentials or resolved addresses fail ``policy``:
    ``BlockedUrl`` / ``InvalidInput`` / ``FetchFailed`` (name does not resolve). A check at
    submit time only; requests re-check every hop when they are made."""
    _check_target(url, policy, resolver or resolve_host)


# Webhooks go to the caller's own public endpoint: never loopback, private or metadata addresses,
# whatever LOOM_ALLOW_PRIVATE_URLS says for inputs (a webhook is a POST the server makes on its own).
WEBHOOK_POLICY = AddressPolicy(allow_private=False)


@contextmanager
def open_guarded(
    method: str,
    url: str,
    *,
    policy: AddressPolicy,
    timeout: float,
    resolver: Resolver | None = None,
    ssl_context: ssl.SSLContext | None = None,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Iterator[tuple[httpx.Response, str, float]]:
    """Send ``method url`` through the SSRF guard, following redirects (each hop resolved and
    checked again, at most ``MAX_REDIRECTS``); yields (response, final URL, deadline) with the
    body not yet read. 307/308 repeat the method and body; 301/302/303 continue with a GET."""
    import httpx  # local: keeps `import loom.media` light for code that only decodes

    resolver = resolver or resolve_host
    deadline = time.monotonic() + timeout
    verify: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True

    with httpx.Client(
        follow_redirects=False,
        trust_env=False,  # no proxies / netrc: we connect to the address we checked
        verify=verify,
        headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"},
    ) as client:
        current = url
        for _hop in range(MAX_REDIRECTS + 1):
            target = _check_target(current, policy, resolver)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FetchFailed(f"timed out after {timeout:g}s fetching {url!r}")
            try:
                # Same host (the checked IP) and the same port as the check, whatever httpx's own
                # URL parser would make of the string.
                pinned = httpx.URL(current).copy_with(host=target.ip.split("%", 1)[0], port=target.port)
            except (httpx.InvalidURL, ValueError, TypeError) as exc:
                raise InvalidInput(f"invalid URL {current!r}: {exc}") from exc
            extensions: dict[str, object] = {}
            if target.scheme == "https" and not target.ip_literal:
                extensions["sni_hostname"] = target.host  # SNI + certificate name check
            try:
                with client.stream(
                    method,
                    pinned,
                    headers={**(headers or {}), "Host": target.host_header},
                    content=content,
                    extensions=extensions,
                    timeout=httpx.Timeout(remaining),
                ) as response:
                    status = response.status_code
                    if status in _REDIRECTS:
                        location = response.headers.get("location")
                        if not location:
                            raise InputMissing(f"{current!r} answered {status} without a Location")
                        current = urljoin(current, location)
                        if status in (301, 302, 303) and method != "HEAD":
                            method, content = "GET", None
                        continue
                    yield response, current, deadline
                    return
            except httpx.TimeoutException as exc:
                raise FetchFailed(f"timed out after {timeout:g}s fetching {url!r} ({type(exc).__name__})") from exc
            except httpx.InvalidURL as exc:
                raise InvalidInput(f"invalid URL {current!r}: {exc}") from exc
            except httpx.HTTPError as exc:
                raise FetchFailed(f"could not fetch {current!r}: {type(exc).__name__}: {exc}") from exc
        raise InputMissing(f"too many redirects (more than {MAX_REDIRECTS}) fetching {url!r}")


def fetch_url(
    url: str,
    *,
    allow_private: bool,
    timeout: float,
    max_bytes: int,
    policy: AddressPolicy | None = None,
    resolver: Resolver | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> bytes:
    """GET ``url`` through the SSRF guard and return the body (at most ``max_bytes`` bytes).

    ``policy`` (default ``AddressPolicy(allow_private=allow_private)``) decides which addresses
    may be connected to; ``resolver`` (default ``resolve_host``) and ``ssl_context`` (default: the
    system trust store) exist for tests and special deployments.
    """
    policy = policy or AddressPolicy(allow_private=allow_private)
    with open_guarded("GET", url, policy=policy, timeout=timeout, resolver=resolver,
                      ssl_context=ssl_context) as (response, current, deadline):
        status = response.status_code
        if status >= 400:
            raise _status_error(status, current)
        if not 200 <= status < 300:
            raise InputMissing(f"{current!r} answered {status}, not 200")
        return _read_capped(response, max_bytes, deadline, timeout, url)


def _status_error(status: int, url: str) -> FetchFailed | InputMissing:
    if status >= 500 or status in _TRANSIENT_4XX:
        return FetchFailed(f"{url!r} answered HTTP {status}")
    return InputMissing(f"{url!r} answered HTTP {status}")


def _read_capped(response, max_bytes: int, deadline: float, timeout: float, url: str) -> bytes:  # noqa: ANN001
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise InputTooLarge(
            f"{url!r} is {int(declared):,} bytes (Content-Length); the limit is {max_bytes:,} bytes"
        )
    buf = bytearray()
    for chunk in response.iter_bytes():
        buf += chunk
        if len(buf) > max_bytes:
            raise InputTooLarge(f"{url!r} is larger than the limit of {max_bytes:,} bytes")
        if time.monotonic() > deadline:
            raise FetchFailed(f"timed out after {timeout:g}s fetching {url!r} (body too slow)")
    return bytes(buf)
