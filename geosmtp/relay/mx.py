"""Where to deliver mail for a domain: MX lookup and address resolution (RFC 5321 §5.1).

The questions go through `geosmtp.dns.Resolver`, the resolver the sender
checks ask too; `Resolver` here adds the MX logic on top of it.

What `Resolver.resolve_mx` answers, and why:

- MX records sorted by preference, lowest first (RFC 5321 §5.1). Records of
  equal preference are shuffled ("the SMTP client SHOULD randomize them to
  spread the load", §5.1) with the `random.Random` the resolver was given, so
  a test can make the order deterministic.
- Each MX host resolved to its addresses, IPv4 first then IPv6 (see
  `Resolver` for why); the client tries every address of every host in the
  order given. A host whose lookup fails is left out, as long as another host
  has an address.
- No MX records (the name exists, NOERROR/NODATA): the domain itself is the
  "implicit MX" with preference 0 (§5.1), looked up for A and AAAA.
- Null MX (RFC 7505 §3: one MX record, preference 0, exchange "."): the domain
  accepts no mail; a permanent failure, status 5.1.10 (RFC 7505 §4.2). A "."
  exchange among other MX records is malformed (§3: "MUST NOT have any other
  MX RRs"); those "." records are skipped and the others used.
- NXDOMAIN: permanent (5.1.2, "bad destination system address", RFC 3463).
  Names without any usable address: permanent (5.4.4, "unable to route").
- Timeouts, SERVFAIL, REFUSED, unreachable nameservers: temporary (4.4.3,
  "directory server failure", RFC 3463); the message stays queued.
- Internationalised domains are looked up by their A-label (RFC 5890 §2.3.2.1),
  converted by dnspython's IDNA 2008 codec (UTS #46 mapping, non-transitional;
  IDNA 2003 when the `idna` package is missing). A name that cannot be
  converted is a permanent failure.
- An address literal (`[192.0.2.1]`, `[IPv6:2001:db8::1]`, RFC 5321 §4.1.3)
  is the one address to use, without DNS.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass

import dns.name
import dns.rdatatype

from .. import dns as geodns
from ..dns import (
    STATUS_DNS_TEMPORARY,
    STATUS_NO_ROUTE,
    DNSError,
    DNSPermanentError,
    DNSTemporaryError,
    NoData,
    address_literal,
    qname,
    text,
)

#: RFC 7505 §4.2: recipient address has null MX.
STATUS_NULL_MX = "5.1.10"


@dataclass(frozen=True, slots=True)
class Host:
    """One place to deliver to: an MX host (or a smarthost) and its addresses in order.

    `name` is the host's name as it goes in the DSN's `Remote-MTA: dns; ...`
    and in TLS's server name (A-label, no trailing dot). An empty `addresses`
    means "connect by name": the system's resolver (getaddrinfo) finds them at
    connect time, as for a smarthost named in the config.
    """

    name: str
    addresses: tuple[str, ...] = ()
    preference: int = 0


class Resolver(geodns.Resolver):
    """MX and address lookups for outbound delivery (and, as `geosmtp.dns.Resolver`,
    every other DNS question).

    `rng` shuffles MX hosts of equal preference (RFC 5321 §5.1); `max_hosts`
    caps the MX hosts looked up, lowest preference first, so a domain with
    hundreds of MX records cannot hold an attempt for hours. The other
    arguments are `geosmtp.dns.Resolver`'s.
    """

    def __init__(
        self,
        nameservers: Sequence[str] | None = None,
        timeout: float = 5.0,
        *,
        prefer_ipv6: bool = False,
        rng: random.Random | None = None,
        max_hosts: int = 10,
        cache: bool = True,
    ) -> None:
        super().__init__(nameservers, timeout, prefer_ipv6=prefer_ipv6, cache=cache)
        self._rng = rng if rng is not None else random.Random()
        self.max_hosts = max_hosts

    def resolve_mx(self, domain: str) -> list[Host]:
        """The hosts to try for mail to `domain`, in order, each with its addresses.

        Raises `DNSPermanentError` (bounce) or `DNSTemporaryError` (retry later).
        """
        literal = address_literal(domain)
        if literal is not None:
            return [Host(domain, (literal,))]
        name = qname(domain)
        try:
            answer = self.query(name, dns.rdatatype.MX)
        except NoData:
            return [self._implicit_mx(name)]
        exchanges = [(r.preference, r.exchange) for r in answer if r.exchange != dns.name.root]
        if not exchanges:
            # A null MX (RFC 7505 §3), or several "." records: still no mail.
            # §4.2: "556 5.1.10" at the sender's end.
            raise DNSPermanentError(
                f"{text(name)} does not accept mail (null MX, RFC 7505)", STATUS_NULL_MX
            )
        ordered = self._order(exchanges)[: self.max_hosts]
        hosts: list[Host] = []
        temporary: DNSTemporaryError | None = None
        for preference, exchange in ordered:
            try:
                addresses = self.addresses(exchange)
            except DNSTemporaryError as exc:
                temporary = exc
                continue
            except DNSPermanentError:
                continue
            hosts.append(Host(text(exchange), addresses, preference))
        if hosts:
            return hosts
        if temporary is not None:
            raise DNSTemporaryError(
                f"no address for any MX host of {text(name)} for now: {temporary.message}",
                STATUS_DNS_TEMPORARY,
            )
        names = ", ".join(text(ex) for _, ex in ordered)
        raise DNSPermanentError(
            f"no MX host of {text(name)} has an address ({names})", STATUS_NO_ROUTE
        )

    def resolve_host(self, name: str) -> Host:
        """A and AAAA of one host (a smarthost named in the config, say), in order."""
        literal = address_literal(name)
        if literal is not None:
            return Host(name, (literal,))
        try:
            return Host(name, (str(ipaddress.ip_address(name)),))
        except ValueError:
            pass
        absolute = qname(name)
        return Host(text(absolute), self.addresses(absolute))

    def _order(self, exchanges: list[tuple[int, dns.name.Name]]) -> list[tuple[int, dns.name.Name]]:
        """By preference; equal preferences shuffled (RFC 5321 §5.1); each name once."""
        seen: set[dns.name.Name] = set()
        ordered: list[tuple[int, dns.name.Name]] = []
        exchanges = sorted(exchanges, key=lambda e: e[0])
        for _, group in itertools.groupby(exchanges, key=lambda e: e[0]):
            items = [e for e in group if e[1] not in seen]
            seen.update(e[1] for e in items)
            # sorted first, so the shuffle's input does not depend on the DNS answer's order
            items.sort(key=lambda e: e[1].to_text())
            self._rng.shuffle(items)
            ordered.extend(items)
        return ordered

    def _implicit_mx(self, name: dns.name.Name) -> Host:
        """RFC 5321 §5.1: no MX, so the domain itself, preference 0."""
        try:
            addresses = self.addresses(name)
        except DNSPermanentError as exc:
            raise DNSPermanentError(
                f"{text(name)} has no MX and no address: {exc.message}", exc.status
            ) from None
        return Host(text(name), addresses, 0)


__all__ = [
    "DNSError",
    "DNSPermanentError",
    "DNSTemporaryError",
    "Host",
    "Resolver",
    "address_literal",
]
