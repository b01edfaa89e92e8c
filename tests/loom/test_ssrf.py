"""loom.fetch.fetch_url: the SSRF guard, against real local HTTP(S) servers that count requests."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures_worker import missing
from http_servers import BIG, BODY, Server, start_server, tls_pair
from loom.errors import (
    BlockedUrl,
    FetchFailed,
    InputMissing,
    InputTooLarge,
    InvalidInput,
)
from loom.fetch import (
    MAX_REDIRECTS,
    AddressPolicy,
    fetch_url,
    resolve_host,
)


@pytest.fixture
def server() -> Iterator[Server]:
    yield from start_server()


@pytest.fixture
def other() -> Iterator[Server]:
    yield from start_server()


def _only(server: Server) -> AddressPolicy:
    """A strict policy (allow_private=False) with exactly this one server let through."""
    return AddressPolicy(allow_private=False, allow=frozenset({(server.host, server.port)}))


def _fetch(url: str, **kw: object) -> bytes:
    kw.setdefault("allow_private", False)
    kw.setdefault("timeout", 5.0)
    kw.setdefault("max_bytes", 1_000_000)
    return fetch_url(url, **kw)  # type: ignore[arg-type]


# --- every blocked spelling is refused before any connection -------------------------------

BLOCKED_HOSTS = [
    ("127.0.0.1", "loopback"),
    ("localhost", "loopback"),
    ("[::1]", "loopback"),
    ("2130706433", "loopback"),  # decimal
    ("0177.0.0.1", "loopback"),  # octal
    ("0x7f.0.0.1", "loopback"),  # hex
    ("0x7f.1", "loopback"),  # hex, short
    ("127.1", "loopback"),  # short
    ("[::ffff:127.0.0.1]", "IPv4-mapped"),
    ("169.254.169.254", "cloud metadata"),
    ("10.0.0.1", "private"),
    ("172.16.5.4", "private"),
    ("192.168.1.1", "private"),
    ("100.64.0.1", "CGNAT"),
    ("0.0.0.0", "unspecified"),
    ("[::]", "unspecified"),
    ("[fe80::1]", "link-local"),
    ("[fd00::1]", "unique-local"),
    ("224.0.0.1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("[64:ff9b::7f00:1]", "NAT64"),
    ("[2002:7f00:1::]", "6to4"),
]


@pytest.mark.parametrize(("host", "klass"), BLOCKED_HOSTS)
def test_blocked_spellings_never_reach_the_server(server: Server, host: str, klass: str) -> None:
    url = f"http://{host}:{server.port}/"
    with pytest.raises(BlockedUrl) as ei:
        _fetch(url)
    assert ei.value.code == "blocked_url"
    assert ei.value.transient is False
    msg = ei.value.message
    assert msg.startswith("refused")
    assert klass in msg
    assert host.strip("[]") in msg  # names the host as given
    assert server.count == 0


def test_refusal_message_format() -> None:
    with pytest.raises(BlockedUrl) as ei:
        _fetch("http://127.0.0.1/")
    assert ei.value.message == "refused: 127.0.0.1 is a loopback address"
    with pytest.raises(BlockedUrl) as ei:
        _fetch("http://2130706433/")
    assert ei.value.message == "refused: 2130706433 resolves to 127.0.0.1, which is a loopback address"


@pytest.mark.parametrize(
    "spelling", ["2130706433", "0177.0.0.1", "0x7f.0.0.1", "0x7f.1", "127.1", "127.0.0.1"]
)
def test_getaddrinfo_normalises_odd_ipv4_spellings(spelling: str) -> None:
    assert resolve_host(spelling, 80) == ["127.0.0.1"]


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "file:///etc/passwd", "gopher://x/", "data:,x"])
def test_only_http_and_https(url: str) -> None:
    with pytest.raises(BlockedUrl, match="scheme"):
        _fetch(url)


def test_credentials_and_garbage_urls_are_invalid(server: Server) -> None:
    with pytest.raises(InvalidInput, match="credentials"):
        _fetch(f"http://user:pw@127.0.0.1:{server.port}/", allow_private=True)
    with pytest.raises(InvalidInput):
        _fetch("http://127.0.0.1:99999999/")
    with pytest.raises(InvalidInput, match="no host"):
        _fetch("http:///just-a-path")
    assert server.count == 0


# --- allow_private --------------------------------------------------------------------------


def test_allow_private_fetches_from_the_local_server(server: Server) -> None:
    assert _fetch(server.url("/"), allow_private=True) == BODY
    assert server.requests == [("/", f"127.0.0.1:{server.port}")]


def test_allow_private_still_refuses_metadata_and_link_local() -> None:
    for url in ("http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/", "http://0.0.0.0/"):
        with pytest.raises(BlockedUrl):
            _fetch(url, allow_private=True, timeout=0.5)


# --- redirects: every hop re-checked --------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{other}/",  # same address, other port
        "http://localhost:{other}/",
        "http://2130706433:{other}/",
        "http://[::ffff:127.0.0.1]:{other}/",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://10.0.0.1/",
        "file:///etc/passwd",
    ],
)
def test_redirect_to_blocked_address_is_refused_at_the_hop(
    server: Server, other: Server, target: str
) -> None:
    to = target.format(other=other.port)
    with pytest.raises(BlockedUrl) as ei:
        _fetch(server.url(f"/redirect?to={to}"), policy=_only(server))
    assert ei.value.message.startswith("refused")
    assert server.count == 1  # the first hop was allowed and made
    assert other.count == 0  # the redirect target was never contacted


def test_redirect_within_allowed_addresses_is_followed(server: Server) -> None:
    for code in (301, 302, 303, 307, 308):
        assert _fetch(server.url(f"/redirect?code={code}&to=/"), policy=_only(server)) == BODY
    assert server.count == 10


def test_redirect_with_allow_private_still_refuses_metadata(server: Server) -> None:
    with pytest.raises(BlockedUrl, match="metadata"):
        _fetch(server.url("/redirect?to=http://169.254.169.254/"), allow_private=True)
    assert server.count == 1


def test_too_many_redirects(server: Server) -> None:
    with pytest.raises(InputMissing, match="too many redirects"):
        _fetch(server.url("/loop"), allow_private=True)
    assert server.count == MAX_REDIRECTS + 1


# --- size, time, status ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/big", "/big-unsized"])
def test_size_cap(server: Server, path: str) -> None:
    with pytest.raises(InputTooLarge) as ei:
        _fetch(server.url(path), allow_private=True, max_bytes=BIG - 1)
    assert ei.value.code == "input_too_large"
    assert f"{BIG - 1:,} bytes" in ei.value.message
    assert _fetch(server.url(path), allow_private=True, max_bytes=BIG) == b"x" * BIG


def test_timeout_waiting_for_response(server: Server) -> None:
    start = time.monotonic()
    with pytest.raises(FetchFailed) as ei:
        _fetch(server.url("/slow"), allow_private=True, timeout=0.3)
    assert time.monotonic() - start < 3
    assert ei.value.transient is True
    assert "timed out" in ei.value.message


def test_total_deadline_cuts_off_a_trickling_body(server: Server) -> None:
    start = time.monotonic()
    with pytest.raises(FetchFailed, match="timed out"):
        _fetch(server.url("/trickle"), allow_private=True, timeout=0.5)
    assert time.monotonic() - start < 3  # the server would trickle for 10 s


@pytest.mark.parametrize(
    ("code", "error"),
    [(404, InputMissing), (410, InputMissing), (403, InputMissing), (400, InputMissing),
     (429, FetchFailed), (500, FetchFailed), (503, FetchFailed)],
)
def test_status_codes(server: Server, code: int, error: type) -> None:
    with pytest.raises(error) as ei:
        _fetch(server.url(f"/status?code={code}"), allow_private=True)
    assert type(ei.value) is error
    assert str(code) in ei.value.message
    assert ei.value.transient is (error is FetchFailed)


def test_connection_refused_is_transient() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    with pytest.raises(FetchFailed):
        _fetch(f"http://127.0.0.1:{port}/", allow_private=True, timeout=2)


# --- DNS rebinding: the connection goes to the address that was checked -----------------------


class _Resolver:
    """Answers `answers[i]` on the i-th lookup (the last one after that): a rebinding DNS."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        return self.answers[min(len(self.calls) - 1, len(self.answers) - 1)]


def test_connects_to_the_checked_address_with_the_original_host_header(server: Server) -> None:
    # First answer is the allowed address; any later lookup would answer the metadata address.
    resolver = _Resolver(["127.0.0.1"], ["169.254.169.254"])
    url = f"http://images.example.test:{server.port}/"  # not resolvable by the system: pinned
    assert _fetch(url, policy=_only(server), resolver=resolver) == BODY
    assert resolver.calls == ["images.example.test"]  # one lookup per hop, no re-resolution
    assert server.requests == [("/", f"images.example.test:{server.port}")]


def test_any_blocked_record_refuses_the_host(server: Server) -> None:
    resolver = _Resolver(["93.184.216.34", "127.0.0.1"])
    with pytest.raises(BlockedUrl, match="resolves to 127.0.0.1, which is a loopback address"):
        _fetch(f"http://mixed.example.test:{server.port}/", resolver=resolver)
    assert server.count == 0


def test_redirect_hop_is_resolved_again(server: Server) -> None:
    resolver = _Resolver(["127.0.0.1"], ["169.254.169.254"])
    url = f"http://a.example.test:{server.port}/redirect?to=http://b.example.test:{server.port}/"
    with pytest.raises(BlockedUrl, match="b.example.test resolves to 169.254.169.254"):
        _fetch(url, policy=_only(server), resolver=resolver)
    assert resolver.calls == ["a.example.test", "b.example.test"]
    assert server.count == 1


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_ipv6_pinned_address() -> None:
    if not _ipv6_loopback():
        missing("IPv6 loopback (::1)")  # skips locally, fails under CI=true
    for srv in start_server("::1"):
        assert _fetch(srv.url("/"), allow_private=True) == BODY
        assert srv.requests == [("/", f"[::1]:{srv.port}")]
        resolver = _Resolver(["::1"])
        assert _fetch(f"http://v6.example.test:{srv.port}/", policy=_only(srv), resolver=resolver) == BODY
        assert srv.requests[-1] == ("/", f"v6.example.test:{srv.port}")


# --- https: pinned address, SNI and certificate checked against the host name ------------------




def test_https_pins_address_and_verifies_the_host_name(tmp_path: Path) -> None:
    server_ctx, client_ctx = tls_pair(tmp_path, "images.example.test")
    for srv in start_server(tls=server_ctx):
        url = f"https://images.example.test:{srv.port}/"
        body = _fetch(url, policy=_only(srv), resolver=_Resolver(["127.0.0.1"]), ssl_context=client_ctx)
        assert body == BODY
        assert srv.sni == ["images.example.test"]  # SNI is the host name, not the IP
        assert srv.requests == [("/", f"images.example.test:{srv.port}")]

        # The certificate is checked against the host name the user gave, not the pinned IP.
        wrong = f"https://other.example.test:{srv.port}/"
        with pytest.raises(FetchFailed, match="(?i)certificate|hostname"):
            _fetch(wrong, policy=_only(srv), resolver=_Resolver(["127.0.0.1"]), ssl_context=client_ctx)
        assert srv.count == 1
