"""The DNS resolver every part of geosmtp asks: the relay (MX and address
lookups, `relay.mx`) and the sender checks (SPF, DKIM keys, DMARC, `mailauth`).

DNS is dnspython's synchronous resolver. It talks through `socket` and
`selectors`, so once the process is monkey-patched (the CLI's first statement)
a lookup waits cooperatively like any other socket; unpatched (tests, scripts)
it simply blocks. This module never patches anything itself.

What a lookup can end in:

- records (`Resolver.lookup`, `Resolver.query`, `Resolver.addresses`);
- NXDOMAIN, or a name that is not a valid domain name: `DNSPermanentError`
  (5.1.2, "bad destination system address", RFC 3463);
- timeouts, SERVFAIL, REFUSED, unreachable nameservers: `DNSTemporaryError`
  (4.4.3, "directory server failure", RFC 3463);
- the name exists without a record of the type asked: `NoData` from `query`,
  an empty list from `lookup`.

Internationalised domains are looked up by their A-label (RFC 5890 §2.3.2.1),
converted by dnspython's IDNA 2008 codec (UTS #46 mapping, non-transitional;
IDNA 2003 when the `idna` package is missing).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

#: dnspython's default per-try timeout; a lookup may retry within `timeout`.
_PER_TRY = 2.0

#: RFC 3463 enhanced status codes for the DSN (RFC 3464 §2.3.4 Status).
STATUS_NO_DOMAIN = "5.1.2"  # X.1.2 bad destination system address
STATUS_NO_ROUTE = "5.4.4"  # X.4.4 unable to route
STATUS_DNS_TEMPORARY = "4.4.3"  # X.4.3 directory server failure


class DNSError(Exception):
    """A lookup that gave no host to deliver to; `str()` is fit for a DSN and the log."""

    temporary: bool = False

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.message = message
        self.status = status  # RFC 3463 enhanced status code

    @property
    def diagnostic(self) -> str:
        """The RFC 3464 §2.3.6 `Diagnostic-Code` value (a non-SMTP diagnostic type)."""
        return f"x-geosmtp; {self.message}"


class DNSPermanentError(DNSError):
    """The domain cannot receive mail (NXDOMAIN, null MX, no address): bounce now."""


class DNSTemporaryError(DNSError):
    """The lookup failed for now (timeout, SERVFAIL, REFUSED): try again later."""

    temporary = True


def parse_nameserver(spec: str) -> tuple[str, int]:
    """`"ip"`, `"ip:port"`, `"[ipv6]:port"` or a bare IPv6 address -> (ip, port)."""
    spec = spec.strip()
    host, port = spec, 53
    if spec.startswith("["):
        close = spec.find("]")
        if close < 0:
            raise ValueError(f"nameserver {spec!r}: missing ']'")
        host, rest = spec[1:close], spec[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"nameserver {spec!r}: expected ':port' after ']'")
            port = _port(spec, rest[1:])
    elif spec.count(":") == 1:
        host, port_text = spec.split(":")
        port = _port(spec, port_text)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"nameserver {spec!r}: not an IP address") from None
    return str(address), port


def _port(spec: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"nameserver {spec!r}: bad port {text!r}")
    return int(text)


def address_literal(domain: str) -> str | None:
    """The address of an RFC 5321 §4.1.3 address literal (`[1.2.3.4]`,
    `[IPv6:...]`), or None when `domain` is not one."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        try:
            return str(ipaddress.IPv6Address(inner[5:]))
        except ValueError:
            return None
    try:
        return str(ipaddress.IPv4Address(inner))
    except ValueError:
        return None


class Resolver:
    """DNS questions with geosmtp's errors, and the addresses of a name.

    `nameservers`: entries `"ip"` or `"ip:port"` (`"[::1]:5353"` for IPv6 with
    a port); None uses the system's `/etc/resolv.conf` (dnspython raises
    `NoResolverConfiguration` here when there is none). `timeout` bounds each
    DNS question (dnspython's lifetime; it retries within it); an MX lookup
    takes one MX question and two address questions per MX host.

    Address order: IPv4 first, then IPv6 (`prefer_ipv6=True` turns it round).
    Mail is judged by the reputation and reverse DNS of the sending address, and
    many hosts that have IPv6 at all have a less well-kept IPv6 identity (no
    PTR, no SPF for it), which large receivers refuse outright; Postfix
    operators set `smtp_address_preference = ipv4` for that reason. IPv6 is
    still tried, right after, when IPv4 fails; a host without IPv6 connectivity
    loses nothing (the connect fails at once).
    """

    def __init__(
        self,
        nameservers: Sequence[str] | None = None,
        timeout: float = 5.0,
        *,
        prefer_ipv6: bool = False,
        cache: bool = True,
    ) -> None:
        if not timeout > 0:
            raise ValueError("timeout must be > 0")
        if isinstance(nameservers, str):
            raise TypeError("nameservers is a list of strings")
        if nameservers is None:
            resolver = dns.resolver.Resolver(configure=True)
        else:
            if not nameservers:
                raise ValueError("nameservers: an empty list (None means the system's)")
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(*parse_nameserver(spec)) for spec in nameservers
            ]
        resolver.timeout = min(_PER_TRY, timeout)
        resolver.lifetime = timeout
        if cache:
            resolver.cache = dns.resolver.LRUCache(4096)
        self._resolver = resolver
        self._families = (
            (dns.rdatatype.AAAA, dns.rdatatype.A)
            if prefer_ipv6
            else (dns.rdatatype.A, dns.rdatatype.AAAA)
        )

    @property
    def nameservers(self) -> list[str]:
        """The nameservers asked, as "ip:port" (for the log)."""
        return [
            _host_port(ns.address, ns.port)
            if isinstance(ns, dns.nameserver.Do53Nameserver)
            else str(ns)
            for ns in self._resolver.nameservers
        ]

    # ------------------------------------------------------------------ lookups

    def lookup(self, name: str, rdtype: str) -> list:
        """The records of type `rdtype` ("TXT", "A", "MX", ...) at `name`, as
        dnspython's rdata objects; [] when there are none (NODATA, NXDOMAIN, or
        a name that is not a valid domain name).

        For the sender checks (SPF, DKIM keys, DMARC), to which "no such name"
        and "no such record" are the same answer. Raises `DNSTemporaryError`
        when the question got no answer (timeout, SERVFAIL, REFUSED).
        """
        try:
            answer = self.query(qname(name), dns.rdatatype.from_text(rdtype))
        except (NoData, DNSPermanentError):
            return []
        return list(answer)

    def addresses(self, name: dns.name.Name) -> tuple[str, ...]:
        """Every A and AAAA address of `name`, in the preferred family order."""
        addresses: list[str] = []
        failure: DNSError | None = None
        for rdtype in self._families:
            try:
                answer = self.query(name, rdtype)
            except NoData:
                continue
            except DNSPermanentError as exc:  # NXDOMAIN: the other family will say so too
                failure = exc
                break
            except DNSTemporaryError as exc:
                failure = exc
                continue
            for record in answer:
                if record.address not in addresses:
                    addresses.append(record.address)
        if addresses:
            return tuple(addresses)
        if failure is not None:
            raise failure
        raise DNSPermanentError(f"{text(name)} has no A or AAAA record", STATUS_NO_ROUTE)

    def query(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> dns.resolver.Answer:
        """One question; every outcome but an answer is one of our exceptions
        (`NoData`: the name exists without such records)."""
        what = f"{text(name)} {dns.rdatatype.to_text(rdtype)}"
        try:
            return self._resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NoAnswer:
            raise NoData from None
        except dns.resolver.NXDOMAIN:
            raise DNSPermanentError(
                f"{text(name)}: no such domain (DNS: NXDOMAIN for {what})", STATUS_NO_DOMAIN
            ) from None
        except dns.resolver.YXDOMAIN:
            raise DNSPermanentError(
                f"{text(name)}: name too long after DNAME substitution ({what})",
                STATUS_NO_DOMAIN,
            ) from None
        except dns.resolver.NoNameservers as exc:
            raise DNSTemporaryError(
                f"DNS lookup of {what} failed: no nameserver answered it"
                f" (SERVFAIL or REFUSED: {_errors(exc)})",
                STATUS_DNS_TEMPORARY,
            ) from None
        except dns.exception.Timeout:
            raise DNSTemporaryError(
                f"DNS lookup of {what} timed out (nameservers: {', '.join(self.nameservers)})",
                STATUS_DNS_TEMPORARY,
            ) from None
        except (dns.exception.DNSException, OSError) as exc:
            raise DNSTemporaryError(
                f"DNS lookup of {what} failed: {exc}", STATUS_DNS_TEMPORARY
            ) from None


class NoData(Exception):
    """The name exists but has no record of the type asked (NOERROR, empty answer)."""


def qname(domain: str) -> dns.name.Name:
    """The absolute DNS name of `domain`, by its A-labels (RFC 5890 §2.3.2.1)."""
    try:
        # dnspython's default codec: IDNA 2008 with UTS #46 mapping when `idna`
        # is installed, else IDNA 2003; an ASCII name is taken as it is.
        name = dns.name.from_text(domain.strip())
    except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
        raise DNSPermanentError(
            f"{domain!r} is not a valid domain name ({exc})", STATUS_NO_DOMAIN
        ) from None
    if name == dns.name.root:
        raise DNSPermanentError("an empty domain name", STATUS_NO_DOMAIN)
    return name


def text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True)


def _host_port(address: str, port: int) -> str:
    """A nameserver as `dns.nameservers` writes it: "127.0.0.1:5353", "[::1]:53"."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _nameserver(name: str, port: int) -> str:
    """dnspython's name of a nameserver in its errors, "Do53:127.0.0.1@5353",
    as the config writes it (`_host_port`)."""
    return _host_port(name.removeprefix("Do53:").rsplit("@", 1)[0], port)


def _errors(exc: dns.resolver.NoNameservers) -> str:
    """The nameservers' answers, briefly: "127.0.0.1:5353 SERVFAIL"."""
    parts: list[str] = []
    for err in exc.kwargs.get("errors") or ():
        part = f"{_nameserver(err[0], err[2])} {err[3]}"
        if part not in parts:
            parts.append(part)
    return "; ".join(parts[:5]) or "no detail"
