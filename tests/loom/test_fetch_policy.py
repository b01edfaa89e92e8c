"""loom.fetch's address policy: which resolved addresses the SSRF guard refuses (no sockets)."""

from __future__ import annotations

import ipaddress

import pytest

from loom.fetch import AddressPolicy, classify_address


@pytest.mark.parametrize(
    ("ip", "strict", "with_private"),
    [
        # public: allowed by both policies
        ("8.8.8.8", True, True),
        ("2606:4700:4700::1111", True, True),
        ("64:ff9b::808:808", True, True),  # NAT64 of a public address: a real route
        ("2002:808:808::1", True, True),  # 6to4 of a public address
        # private classes: refused unless allow_private
        ("127.0.0.1", False, True),
        ("127.255.0.1", False, True),
        ("10.1.2.3", False, True),
        ("172.31.255.255", False, True),
        ("192.168.0.10", False, True),
        ("100.127.0.1", False, True),
        ("::1", False, True),
        ("fc00::1", False, True),
        ("fdab:cdef::1", False, True),
        ("::ffff:10.0.0.1", False, True),
        ("64:ff9b::a00:1", False, True),  # NAT64 of 10.0.0.1
        ("64:ff9b:1::7f00:1", False, True),  # local-use NAT64 of 127.0.0.1
        ("2002:c0a8:101::", False, True),  # 6to4 of 192.168.1.1
        # never, whatever allow_private says
        ("169.254.169.254", False, False),
        ("169.254.170.2", False, False),
        ("169.254.1.1", False, False),
        ("100.100.100.200", False, False),
        ("fd00:ec2::254", False, False),
        ("::ffff:169.254.169.254", False, False),
        ("64:ff9b::a9fe:a9fe", False, False),  # NAT64 of 169.254.169.254
        ("fe80::1", False, False),
        ("fe80::1%1", False, False),
        ("0.0.0.0", False, False),
        ("0.1.2.3", False, False),
        ("::", False, False),
        ("::7f00:1", False, False),  # IPv4-compatible (deprecated)
        ("::ffff:8.8.8.8", False, False),  # IPv4-mapped: never a real AAAA record
        ("224.0.0.251", False, False),
        ("ff02::1", False, False),
        ("255.255.255.255", False, False),
        ("240.0.0.1", False, False),
        ("192.0.2.1", False, False),
        ("198.51.100.7", False, False),
        ("203.0.113.9", False, False),
        ("198.18.0.1", False, False),
        ("192.0.0.8", False, False),
        ("2001:db8::1", False, False),
        ("2001::1", False, False),  # Teredo
        ("fec0::1", False, False),
        ("100::1", False, False),
    ],
)
def test_address_policy(ip: str, strict: bool, with_private: bool) -> None:
    assert (AddressPolicy().refusal(ip, 80) is None) is strict, classify_address(ipaddress.ip_address(ip))
    assert (AddressPolicy(allow_private=True).refusal(ip, 80) is None) is with_private


def test_allow_list_is_exact_ip_and_port() -> None:
    policy = AddressPolicy(allow=frozenset({("127.0.0.1", 8080)}))
    assert policy.refusal("127.0.0.1", 8080) is None
    assert policy.refusal("127.0.0.1", 8081) == "a loopback address"
    assert policy.refusal("127.0.0.2", 8080) == "a loopback address"
