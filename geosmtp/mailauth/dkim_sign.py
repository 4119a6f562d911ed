"""DKIM signing (RFC 6376 §5) with the key of the sender's domain.

The signature is made here, with `cryptography` (RSA-SHA256, RFC 8301), not
with dkimpy's `sign()`: that one needs the whole message in memory, several
copies of it, while here the body hash is computed as the body streams from
the spool (`canon.BodyHasher`) and only the header section is held. What is
signed is checked by two implementations: geosmtp's own inbound check
(dkimpy) and dkimpy's `dkimverify` program, in the tests.

Which key: the one configured for the domain of the RFC5322.From address, the
identifier DMARC aligns with (RFC 7489 §3.1), not the envelope sender's. A
message with no From domain, several, or one without a key is not signed.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

# Read (and checked) by the config: `dkim.domains.*.key_file`.
from ..config import load_key as load_key
from .canon import canonical_header, select_fields
from .headers import CRLF, DKIM_SIGNED_HEADERS, HeaderField

#: Signed one time more than present, so that nobody can add another above
#: it without breaking the signature (RFC 6376 §8.15): the double From attack.
OVERSIGNED = ("from",)

#: Where the header is folded (RFC 5322 §2.1.1 recommends 78 characters a line).
_WIDTH = 76


def public_key_record(key: rsa.RSAPrivateKey) -> str:
    """The key record for the DNS (RFC 6376 §3.6.1): `v=DKIM1; k=rsa; p=...`."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"


@dataclass(frozen=True)
class SigningKey:
    domain: str  # d=, an A-label
    selector: str  # s=
    key: rsa.RSAPrivateKey


class Signer:
    """Makes `DKIM-Signature:` fields: `relaxed` is the canonicalization of the
    header and the body as `c=` gives them ("relaxed/relaxed" by default)."""

    def __init__(
        self,
        keys: dict[str, SigningKey],
        headers: tuple[str, ...] | list[str] = DKIM_SIGNED_HEADERS,
        canonicalization: str = "relaxed/relaxed",
    ) -> None:
        self.keys = keys  # by domain, lower-case A-label
        self.headers = [h.lower().encode("ascii") for h in headers]
        self.canonicalization = canonicalization
        header, _, body = canonicalization.partition("/")
        self.relaxed_header = header == "relaxed"
        self.relaxed_body = body == "relaxed"

    def key_for(self, domain: str) -> SigningKey | None:
        return self.keys.get(domain)

    def signed_names(self, fields: list[HeaderField]) -> list[bytes]:
        """`h=`: each configured field once per instance present, bottom up;
        the oversigned ones once more."""
        names: list[bytes] = []
        for name in self.headers:
            count = sum(1 for f in fields if f.lname == name)
            if name.decode() in OVERSIGNED:
                count += 1
            names.extend([name] * count)
        return names

    def signature_field(
        self, key: SigningKey, fields: list[HeaderField], body_hash: bytes, now: int
    ) -> bytes:
        """The `DKIM-Signature:` field for a message with these header `fields`
        (CRLF line ends, `headers.parse_header_section`) and this body hash
        (`BodyHasher(self.relaxed_body)`), with LF line ends as the spool keeps
        them; it goes above the fields it signs."""
        names = self.signed_names(fields)
        tags = [
            f"v=1; a=rsa-sha256; c={self.canonicalization}; d={key.domain}; s={key.selector};",
            f"t={now};",
            *_fold_list("h=", [n.decode("ascii") for n in names], ":", ";"),
            f"bh={base64.b64encode(body_hash).decode('ascii')};",
            "b=",
        ]
        prefix = "DKIM-Signature: " + "\r\n\t".join(tags)
        unsigned = HeaderField(b"DKIM-Signature", prefix.encode("ascii") + CRLF)
        data = b"".join(
            canonical_header(f, self.relaxed_header) for f in select_fields(fields, names)
        )
        # The signature field itself goes last, with b= empty and no final CRLF (§3.7).
        data += canonical_header(unsigned, self.relaxed_header)[: -len(CRLF)]
        signature = key.key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        b64 = base64.b64encode(signature).decode("ascii")
        first = _WIDTH - len("b=") - 1
        chunks = [b64[:first]] + [
            b64[i : i + _WIDTH - 1] for i in range(first, len(b64), _WIDTH - 1)
        ]
        field = prefix + "\r\n\t".join(chunk for chunk in chunks if chunk)
        return field.replace("\r\n", "\n").encode("ascii") + b"\n"


def _fold_list(tag: str, items: list[str], sep: str, end: str) -> list[str]:
    """`tag` and `items` joined by `sep`, cut into lines of at most `_WIDTH`."""
    lines, line = [], tag
    for i, item in enumerate(items):
        piece = item + (sep if i < len(items) - 1 else end)
        if len(line) + len(piece) > _WIDTH and line != tag:
            lines.append(line)
            line = ""
        line += piece
    lines.append(line)
    return lines
