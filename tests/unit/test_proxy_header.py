"""The PROXY protocol parser (issue 22, `geosmtp.protocol.proxy`), fed bytes:
every kind of header whole, octet by octet, and cut at every offset, with the
protocol's bytes after it; malformed headers give ProxyError and nothing else.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from geosmtp.protocol.proxy import (
    MAX_LENGTH,
    V1_MAX,
    V2_MAX_BODY,
    V2_SIGNATURE,
    ProxyError,
    ProxyHeader,
    parse,
)
from tests.unit.fuzzing import fuzz_settings

AFTER = b"EHLO client.example\r\n"


def v2(
    command: int = 1,
    family: int = 1,
    transport: int = 1,
    addresses: bytes = b"",
    tlvs: bytes = b"",
    version: int = 2,
    length: int | None = None,
) -> bytes:
    """A version 2 header as HAProxy builds one."""
    body = addresses + tlvs
    size = len(body) if length is None else length
    return (
        V2_SIGNATURE
        + bytes([version << 4 | command, family << 4 | transport])
        + struct.pack("!H", size)
        + body
    )


def v4_addresses(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def v6_addresses(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


#: Every kind of header, and what it says.
HEADERS = {
    "v1 TCP4": (
        b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\r\n",
        ProxyHeader(1, ("192.0.2.7", 56324), ("198.51.100.1", 25), 44),
    ),
    "v1 TCP6": (
        b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 587\r\n",
        ProxyHeader(1, ("2001:db8::7", 65535), ("2001:db8::1", 587), 46),
    ),
    "v1 TCP6 IPv4-mapped": (
        b"PROXY TCP6 ::ffff:192.0.2.9 ::1 1 25\r\n",
        ProxyHeader(1, ("192.0.2.9", 1), ("::1", 25), 38),
    ),
    "v1 UNKNOWN": (b"PROXY UNKNOWN\r\n", ProxyHeader(1, None, None, 15)),
    "v1 UNKNOWN with addresses": (
        b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
        ProxyHeader(1, None, None, 59),
    ),
    "v1 longest": (
        b"PROXY TCP6 " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n",
        ProxyHeader(
            1,
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
            104,
        ),
    ),
    "v2 PROXY IPv4": (
        v2(addresses=v4_addresses("192.0.2.7", "198.51.100.1", 56324, 25)),
        ProxyHeader(2, ("192.0.2.7", 56324), ("198.51.100.1", 25), 28),
    ),
    "v2 PROXY IPv6": (
        v2(family=2, addresses=v6_addresses("2001:db8::7", "2001:db8::1", 40000, 995)),
        ProxyHeader(2, ("2001:db8::7", 40000), ("2001:db8::1", 995), 52),
    ),
    "v2 PROXY IPv4 with TLVs": (
        v2(
            addresses=v4_addresses("127.0.0.5", "127.0.0.1", 1234, 2525),
            tlvs=tlv(0x02, b"mx.example.test") + tlv(0x04, b"") + tlv(0x05, b"id-1"),
        ),
        ProxyHeader(2, ("127.0.0.5", 1234), ("127.0.0.1", 2525), 28 + 18 + 3 + 7),
    ),
    "v2 LOCAL": (v2(command=0, family=0, transport=0), ProxyHeader(2, None, None, 16)),
    "v2 LOCAL with an address block": (
        v2(command=0, addresses=v4_addresses("10.0.0.1", "10.0.0.2", 1, 2)),
        ProxyHeader(2, None, None, 28),
    ),
    "v2 PROXY UNSPEC": (v2(family=0, transport=0), ProxyHeader(2, None, None, 16)),
}


@pytest.mark.parametrize("name", list(HEADERS))
def test_every_header_whole(name: str) -> None:
    data, expected = HEADERS[name]
    assert parse(data) == expected
    assert expected.length == len(data)
    # The protocol's bytes after it are left to the protocol.
    header = parse(data + AFTER)
    assert header == expected
    assert (data + AFTER)[header.length :] == AFTER


@pytest.mark.parametrize("name", list(HEADERS))
def test_every_header_cut_at_every_offset(name: str) -> None:
    """Any beginning of a header asks for more; the whole one, then, is whole."""
    data, expected = HEADERS[name]
    for cut in range(len(data)):
        assert parse(data[:cut]) is None, cut
    for cut in range(len(AFTER) + 1):
        assert parse(data + AFTER[:cut]) == expected


@pytest.mark.parametrize("name", list(HEADERS))
def test_every_header_byte_by_byte(name: str) -> None:
    """As a shell reads it: one octet at a time, parsing what has come so far."""
    data, expected = HEADERS[name]
    stream = data + AFTER
    buffer = b""
    header = None
    for octet in stream:
        buffer += bytes([octet])
        header = parse(buffer)
        if header is not None:
            break
    assert header == expected
    assert len(buffer) == len(data)


MALFORMED = {
    "SMTP instead": b"EHLO client.example\r\n",
    "TLS instead": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    "lower case": b"proxy TCP4 192.0.2.7 198.51.100.1 1 2\r\n",
    "no space": b"PROXYTCP4 192.0.2.7 198.51.100.1 1 2\r\n",
    "v1 too long": b"PROXY UNKNOWN " + b"x" * (V1_MAX - 14),
    "v1 too long with CRLF": b"PROXY UNKNOWN " + b"x" * (V1_MAX - 15) + b"\r\n",
    "v1 bare LF": b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\n",
    "v1 NUL": b"PROXY TCP4 192.0.2.7\0",
    "v1 control": b"PROXY TCP4 192.0.2.7 198.51.100.1 1\t2\r\n",
    "v1 bad family": b"PROXY UDP4 192.0.2.7 198.51.100.1 1 2\r\n",
    "v1 too few fields": b"PROXY TCP4 192.0.2.7 198.51.100.1 1\r\n",
    "v1 too many fields": b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2 3\r\n",
    "v1 double space": b"PROXY TCP4  192.0.2.7 198.51.100.1 1 2\r\n",
    "v1 bad IPv4": b"PROXY TCP4 192.0.2.256 198.51.100.1 1 2\r\n",
    "v1 IPv4 with leading zero": b"PROXY TCP4 192.0.2.07 198.51.100.1 1 2\r\n",
    "v1 IPv6 in TCP4": b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n",
    "v1 IPv4 in TCP6": b"PROXY TCP6 192.0.2.7 2001:db8::1 1 2\r\n",
    "v1 IPv6 scope": b"PROXY TCP6 fe80::1%eth0 2001:db8::1 1 2\r\n",
    "v1 host name": b"PROXY TCP4 mx.example 198.51.100.1 1 2\r\n",
    "v1 port over 65535": b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 25\r\n",
    "v1 negative port": b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 25\r\n",
    "v1 port not a number": b"PROXY TCP4 192.0.2.7 198.51.100.1 smtp 25\r\n",
    "v1 port of 6 digits": b"PROXY TCP4 192.0.2.7 198.51.100.1 000025 25\r\n",
    "v1 unicode digits": "PROXY TCP4 192.0.2.7 198.51.100.1 ١٢ 25\r\n".encode(),
    "v2 bad signature": V2_SIGNATURE[:11] + b"X" + b"\x21\x11\x00\x0c",
    "v2 version 1": v2(version=1, addresses=v4_addresses("192.0.2.7", "192.0.2.1", 1, 2)),
    "v2 version 3": v2(version=3, addresses=v4_addresses("192.0.2.7", "192.0.2.1", 1, 2)),
    "v2 command 2": v2(command=2, addresses=v4_addresses("192.0.2.7", "192.0.2.1", 1, 2)),
    "v2 length over the limit": v2(length=V2_MAX_BODY + 1),
    "v2 length 65535": v2(length=65535),
    "v2 UNIX family": v2(family=3, addresses=b"\0" * 216),
    "v2 family 4": v2(family=4, addresses=b"\0" * 36),
    "v2 UDP over IPv4": v2(transport=2, addresses=v4_addresses("192.0.2.7", "192.0.2.1", 1, 2)),
    "v2 IPv4 too short": v2(addresses=v4_addresses("192.0.2.7", "192.0.2.1", 1, 2)[:11]),
    "v2 IPv6 too short": v2(family=2, addresses=b"\0" * 35),
    "v2 cut TLV": v2(addresses=v4_addresses("192.0.2.7", "192.0.2.1", 1, 2), tlvs=b"\x04\x00"),
    "v2 TLV too long": v2(
        addresses=v4_addresses("192.0.2.7", "192.0.2.1", 1, 2), tlvs=b"\x04\x00\x05abc"
    ),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_headers_are_errors(name: str) -> None:
    data = MALFORMED[name]
    with pytest.raises(ProxyError):
        parse(data)
    with pytest.raises(ProxyError):  # more input changes nothing
        parse(data + AFTER)


def test_an_error_comes_as_soon_as_the_octets_show_it() -> None:
    """A client that is not a balancer is told apart by its first octet (so a
    direct SMTP client's command is refused at once, not after a timeout), and
    a version 2 length over the limit as soon as the length is read."""
    with pytest.raises(ProxyError):
        parse(b"E")
    with pytest.raises(ProxyError):
        parse(b"PROXY\t")
    with pytest.raises(ProxyError):
        parse(v2(length=V2_MAX_BODY + 1)[:16])


def test_an_empty_read_asks_for_more() -> None:
    assert parse(b"") is None


@fuzz_settings(max_examples=400)
@given(st.binary(max_size=MAX_LENGTH + 40))
def test_random_bytes_give_a_header_more_or_proxy_error(data: bytes) -> None:
    """Whatever comes, the parser answers None, a header within the data and
    MAX_LENGTH, or ProxyError: never another exception."""
    try:
        header = parse(data)
    except ProxyError:
        return
    if header is not None:
        assert header.length <= min(len(data), MAX_LENGTH)


@fuzz_settings(max_examples=400)
@given(
    st.sampled_from([h for h, _ in HEADERS.values()]),
    st.integers(min_value=0, max_value=120),
    st.binary(min_size=1, max_size=8),
)
def test_a_header_with_octets_changed_never_raises_another_exception(
    header: bytes, at: int, junk: bytes
) -> None:
    """Headers with some octets replaced, near-misses of valid ones: None, a
    header, or ProxyError."""
    at = min(at, len(header))
    data = header[:at] + junk + header[at + len(junk) :]
    try:
        result = parse(data)
    except ProxyError:
        return
    if result is not None:
        assert result.length <= len(data)
