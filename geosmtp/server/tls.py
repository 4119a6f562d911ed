"""TLS server contexts for STARTTLS (RFC 3207) and implicit TLS (RFC 8314).

Defaults are the standard library's secure ones (`ssl.create_default_context`
for a server: no SSLv3/TLS 1.0/1.1 ciphers, no compression) with a minimum
version from the config, TLS 1.2 unless raised to 1.3.
"""

from __future__ import annotations

import datetime
import os
import ssl
import tempfile

from ..config import TLS, ConfigError

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_context(tls: TLS, hostname: str) -> ssl.SSLContext | None:
    """The context for the configured certificate, or None when TLS is not set up.

    Raises ConfigError naming the key when a certificate or key cannot be used.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = _VERSIONS[tls.min_version]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    if tls.cert is None and tls.key is None:
        if not tls.self_signed:
            return None
        _load_self_signed(ctx, hostname)
        return ctx
    if tls.cert is None or tls.key is None:
        missing = "tls.cert" if tls.cert is None else "tls.key"
        raise ConfigError(f"{missing}: needed when the other of tls.cert/tls.key is set")
    for key, path in (("tls.cert", tls.cert), ("tls.key", tls.key)):
        if not path.is_file():
            raise ConfigError(f"{key}: no such file: '{path}'")
    try:
        # Without a password callback OpenSSL asks for a passphrase on the terminal
        # and the server hangs at start; an encrypted key is refused instead.
        ctx.load_cert_chain(str(tls.cert), str(tls.key), password=_no_passphrase)
    except _EncryptedKey:
        raise ConfigError(
            f"tls.key: '{tls.key}' is encrypted; geosmtp needs a key without a passphrase"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(_diagnose(tls, exc)) from None
    return ctx


class _EncryptedKey(Exception):
    pass


def _no_passphrase() -> bytes:
    raise _EncryptedKey


def _diagnose(tls: TLS, exc: Exception) -> str:
    """Which of tls.cert and tls.key is at fault, for a one-line error."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    assert tls.cert is not None and tls.key is not None
    try:
        x509.load_pem_x509_certificates(tls.cert.read_bytes())
    except OSError as err:
        return f"tls.cert: cannot read '{tls.cert}': {err.strerror}"
    except ValueError:
        return f"tls.cert: '{tls.cert}' holds no PEM certificate"
    try:
        serialization.load_pem_private_key(tls.key.read_bytes(), password=None)
    except OSError as err:
        return f"tls.key: cannot read '{tls.key}': {err.strerror}"
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return f"tls.key: '{tls.key}' holds no usable PEM private key"
    if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
        return f"tls.key: '{tls.key}' does not match the certificate in tls.cert"
    reason = exc.reason if isinstance(exc, ssl.SSLError) else None
    return f"tls.cert: cannot use '{tls.cert}' with tls.key: {reason or exc}"


def _load_self_signed(ctx: ssl.SSLContext, hostname: str) -> None:
    """A throwaway certificate for `hostname`, for trying the server out locally."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # load_cert_chain only reads files; the file lives as long as this call.
    fd, path = tempfile.mkstemp(suffix=".pem")
    try:
        os.write(fd, pem)
        os.close(fd)
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)
