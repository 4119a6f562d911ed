"""`geosmtp dkim keygen DOMAIN SELECTOR`: a DKIM key pair and the DNS record to publish.

The private key goes to `DIR/DOMAIN.SELECTOR.key` (PEM, PKCS#8, mode 0600,
never over an existing file); the TXT record goes to standard output in zone
file form, its text cut into strings of at most 255 octets (RFC 1035
§3.3.14: a TXT record holds several such strings, which DKIM joins, RFC 6376
§3.6.2.2). What to put in the config goes to standard error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
#: RFC 1035 §3.3.14: one character-string is at most 255 octets.
TXT_STRING = 255


def txt_strings(text: str, size: int = TXT_STRING) -> list[str]:
    """`text` cut into the strings of one TXT record."""
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def zone_line(name: str, text: str) -> str:
    """`name. IN TXT ( "..." "..." )`, as a zone file (and most DNS panels) take it."""
    strings = " ".join(f'"{s}"' for s in txt_strings(text))
    return f"{name}. IN TXT ( {strings} )"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="geosmtp dkim",
        description="DKIM keys for signing outgoing mail (the config's dkim: section).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser(
        "keygen",
        help="make a key pair; print the DNS TXT record to publish",
        description="Write an RSA private key to DIR/DOMAIN.SELECTOR.key (mode 0600) and "
        "print the TXT record to publish at SELECTOR._domainkey.DOMAIN.",
    )
    k.add_argument("domain", metavar="DOMAIN", help="the sender domain (of the From: address)")
    k.add_argument("selector", metavar="SELECTOR", help="a name for this key, e.g. 2025a")
    k.add_argument("--dir", default=".", help="where the private key is written (default: .)")
    k.add_argument(
        "--bits", type=int, default=2048, help="RSA key size: 1024 to 4096 (default: 2048)"
    )
    args = p.parse_args(argv)
    from .. import config as cfg
    from ..mail.address import canonical_domain

    domain = args.domain.lower().rstrip(".")
    problem = cfg._domain_problem(domain)
    if problem:
        print(
            f"geosmtp dkim: {cfg.printable(args.domain)}: not a domain name ({problem})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if not cfg._SELECTOR_RE.fullmatch(args.selector):
        print(
            f"geosmtp dkim: {cfg.printable(args.selector)}: not a selector "
            "(letters, digits, '-', '.')",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if not 1024 <= args.bits <= 4096:
        print("geosmtp dkim: --bits: from 1024 to 4096 (RFC 8301)", file=sys.stderr)
        return EXIT_USAGE
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from .dkim_sign import public_key_record

    key = rsa.generate_private_key(public_exponent=65537, key_size=args.bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = Path(args.dir) / f"{domain}.{args.selector}.key"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        print(f"geosmtp dkim: '{path}' exists; not overwritten", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        print(f"geosmtp dkim: cannot write '{path}': {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    name = f"{args.selector}._domainkey.{canonical_domain(domain)}"
    print(zone_line(name, public_key_record(key)))
    print(
        f"wrote the private key to {path.resolve()} (mode 0600). Publish the TXT record "
        f"above, then add to the config:\n"
        f"dkim:\n  domains:\n    {domain}:\n      selector: {args.selector}\n"
        f"      key_file: {path.resolve()}",
        file=sys.stderr,
    )
    return EXIT_OK
