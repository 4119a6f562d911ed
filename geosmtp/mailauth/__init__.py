"""Sender authentication: SPF, DKIM and DMARC on incoming mail, DKIM signing of outgoing.

    headers.py      the header section: fields, line ends, From: domains, the
                    authserv-id of an Authentication-Results field (pure)
    canon.py        DKIM canonicalization (RFC 6376 §3.4), the body hashed as it
                    streams from the spool (pure)
    results.py      check results and the one Authentication-Results field (RFC 8601)
    spf_check.py    SPF (RFC 7208) with pyspf, its DNS through our resolver
    dkim_verify.py  DKIM verification (RFC 6376) with dkimpy, keys fetched first
    dmarc.py        DMARC (RFC 7489): record, alignment, policy (our own, on the
                    results above and the Public Suffix List)
    dkim_sign.py    DKIM signing with the sender domain's key (streamed body hash)
    stages.py       the two pipeline stages (gevent, spool files, the threadpool)
    keygen.py       `geosmtp dkim keygen`

Everything DNS goes through `geosmtp.dns.Resolver`, the resolver the relay uses too
(`dns.nameservers`, `dns.timeout`). See docs/authentication.md.
"""
