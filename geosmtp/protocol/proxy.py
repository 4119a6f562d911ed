"""The PROXY protocol header (HAProxy's specification, versions 1 and 2), sans-I/O.

A load balancer in TCP mode (HAProxy's `send-proxy`, `send-proxy-v2`) opens
each connection to the server with one header that says who its client is;
the protocol (SMTP, POP3) follows it. `parse(data)` takes the first octets of
a connection and answers `None` (a header is begun: read more), a
`ProxyHeader` (its `length` octets are the header; what follows belongs to
the protocol), or raises `ProxyError` (the connection must be closed).

Version 1 is a line of text: `PROXY TCP4|TCP6 src dst sport dport\\r\\n` or
`PROXY UNKNOWN ...\\r\\n`, at most `V1_MAX` octets. Version 2 is binary: a
12-octet signature, the version and command, the family and transport, the
length of what follows (at most `V2_MAX_BODY` here), the addresses, then
TLVs (type, length, value), which are checked for framing and skipped. The
`LOCAL` command (a health check of the balancer's own), `UNKNOWN` and the
unspecified family mean "no client address": `source` is None and the
socket's own address stands.

Pure: imports only the standard library.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

#: The longest version 1 header, its CRLF included (the specification's 107).
V1_MAX = 107
V1_PREFIX = b"PROXY "
#: The version 2 signature, the first 12 octets.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Signature, version and command, family and transport, length.
V2_FIXED = 16
#: The longest version 2 body (addresses and TLVs) taken: the addresses need
#: at most 216 (two UNIX paths); the rest leaves room for TLVs (authority,
#: unique id, TLS facts), which HAProxy sends only when told to.
V2_MAX_BODY = 1024
#: The most octets a header may take, of either version.
MAX_LENGTH = V2_FIXED + V2_MAX_BODY

_V2_LOCAL, _V2_PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6 = 0x0, 0x1, 0x2
_STREAM = 0x1
#: Octets of the address block: two addresses and two ports.
_V2_ADDRESS_LENGTH = {_AF_INET: 12, _AF_INET6: 36}


class ProxyError(Exception):
    """Not a valid PROXY header; the message says why (for the log)."""


@dataclass(frozen=True)
class ProxyHeader:
    """One parsed header."""

    version: int  # 1 or 2
    #: The client (address, port), or None: keep the socket's (LOCAL, UNKNOWN).
    source: tuple[str, int] | None
    #: The address the client connected to on the balancer, or None.
    dest: tuple[str, int] | None
    #: Octets of the header: the protocol's bytes begin after them.
    length: int


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of `data`; None when `data` is the beginning
    of one (read more); ProxyError when it cannot be one."""
    if not data:
        return None
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    raise ProxyError("not a PROXY header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    head = data[: len(V1_PREFIX)]
    if not V1_PREFIX.startswith(head):
        raise ProxyError("not a PROXY header")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyError(f"version 1 header longer than {V1_MAX} octets")
        if b"\n" in data or b"\0" in data:
            raise ProxyError("version 1 header with a bare LF or a NUL")
        return None
    line = data[:end]
    if not all(0x20 <= b < 0x7F for b in line):
        raise ProxyError("version 1 header with a control or non-ASCII octet")
    fields = line.decode("ascii").split(" ")
    length = end + 2
    if len(fields) >= 2 and fields[1] == "UNKNOWN":  # the rest is ignored (spec 2.1)
        return ProxyHeader(1, None, None, length)
    if len(fields) != 6:
        raise ProxyError("version 1 header without TCP4|TCP6 src dst sport dport")
    family = fields[1]
    if family not in ("TCP4", "TCP6"):
        raise ProxyError(f"version 1 header with an unsupported protocol {family[:8]!r}")
    version = 4 if family == "TCP4" else 6
    source = _v1_address(fields[2], version), _v1_port(fields[4])
    dest = _v1_address(fields[3], version), _v1_port(fields[5])
    return ProxyHeader(1, _unmapped(source), _unmapped(dest), length)


def _v1_address(text: str, version: int) -> str:
    """An IPv4 (TCP4) or IPv6 (TCP6) address in text, as `ipaddress` writes it."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyError(f"version 1 header with a bad address {text[:46]!r}") from None
    if address.version != version or "%" in text:
        raise ProxyError(f"version 1 header with a bad address {text[:46]!r}")
    return str(address)


def _v1_port(text: str) -> int:
    if not (text.isdigit() and text.isascii() and len(text) <= 5 and int(text) <= 65535):
        raise ProxyError(f"version 1 header with a bad port {text[:8]!r}")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    head = data[: len(V2_SIGNATURE)]
    if not V2_SIGNATURE.startswith(head):
        raise ProxyError("not a PROXY header")
    if len(data) < V2_FIXED:
        if len(data) > 12 and data[12] >> 4 != 2:
            raise ProxyError(f"version 2 signature with version {data[12] >> 4}")
        return None
    command, version = data[12] & 0xF, data[12] >> 4
    if version != 2:
        raise ProxyError(f"version 2 signature with version {version}")
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyError(f"version 2 header with an unknown command {command}")
    body_length = int.from_bytes(data[14:16], "big")
    if body_length > V2_MAX_BODY:
        raise ProxyError(f"version 2 header of {body_length} octets, over {V2_MAX_BODY}")
    length = V2_FIXED + body_length
    if len(data) < length:
        return None
    body = data[V2_FIXED:length]
    if command == _V2_LOCAL:  # the balancer's own connection: no client
        return ProxyHeader(2, None, None, length)
    family, transport = data[13] >> 4, data[13] & 0xF
    if family == _AF_UNSPEC:  # spec 2.2: the receiver ignores the addresses
        _check_tlvs(body, 0)
        return ProxyHeader(2, None, None, length)
    if family not in _V2_ADDRESS_LENGTH or transport != _STREAM:
        raise ProxyError(
            f"version 2 header with an unsupported family {family} or transport {transport}"
        )
    size = _V2_ADDRESS_LENGTH[family]
    if body_length < size:
        raise ProxyError(f"version 2 header of {body_length} octets, too short for addresses")
    half = (size - 4) // 2
    make = ipaddress.IPv4Address if family == _AF_INET else ipaddress.IPv6Address
    source = str(make(body[:half])), int.from_bytes(body[2 * half : 2 * half + 2], "big")
    dest = str(make(body[half : 2 * half])), int.from_bytes(body[2 * half + 2 : size], "big")
    _check_tlvs(body, size)
    return ProxyHeader(2, _unmapped(source), _unmapped(dest), length)


def _check_tlvs(body: bytes, start: int) -> None:
    """The TLVs after the addresses fill the body exactly (their values are skipped)."""
    at = start
    while at < len(body):
        if at + 3 > len(body):
            raise ProxyError("version 2 header with a cut TLV")
        at += 3 + int.from_bytes(body[at + 1 : at + 3], "big")
        if at > len(body):
            raise ProxyError("version 2 header with a TLV longer than the header")


def _unmapped(address: tuple[str, int]) -> tuple[str, int]:
    """An IPv4-mapped IPv6 address (`::ffff:192.0.2.1`) as its IPv4 form: a
    client on IPv4 is the same client however the balancer listened."""
    host, port = address
    if ":" in host:
        mapped = ipaddress.IPv6Address(host).ipv4_mapped
        if mapped is not None:
            return str(mapped), port
    return address
