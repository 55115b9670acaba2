"""TLS for the gateway's listeners: the server's SSL context, and a development certificate.

The context is built here rather than by uvicorn's options, so that what a listener accepts
is decided in one place: TLS 1.2 and 1.3 only; for TLS 1.2 only ECDHE key exchange with
AEAD ciphers (AES-GCM, ChaCha20-Poly1305; TLS 1.3's suites are all AEAD); no compression
(CRIME), no renegotiation, no session tickets (whose key would outlive forward secrecy).
With a client CA, a client must present a certificate that CA issued, or the handshake
fails.

``bastion init --self-signed`` writes a development certificate into the home
(``tls/cert.pem``, ``tls/key.pem``): ECDSA P-256, for localhost, 127.0.0.1 and ::1, valid
90 days, its key readable by its owner alone. It is its own issuer, so a client trusts it
by naming ``cert.pem`` as its CA file.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import stat
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bastion.errors import ConfigurationError

# TLS 1.2 cipher suites: ECDHE (forward secrecy) with an AEAD, strongest first.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
DEV_CERT_DAYS = 90
# The names a development certificate is valid for.
DEV_DNS_NAMES = ("localhost",)
DEV_ADDRESSES = ("127.0.0.1", "::1")


def server_context(cert: Path, key: Path, *, client_ca: Path | None = None) -> ssl.SSLContext:
    """A server-side SSL context for this certificate and key, requiring client
    certificates issued by `client_ca` if given; ConfigurationError if a file is missing,
    unreadable, does not match, or the key file is readable by every user."""
    check_key_file(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)
    context.options |= (
        ssl.OP_NO_COMPRESSION
        | ssl.OP_NO_RENEGOTIATION
        | ssl.OP_NO_TICKET
        | ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_SINGLE_ECDH_USE
    )
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"Cannot use the TLS certificate {cert} with the key {key}: {_reason(exc)}."
        ) from exc
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(
                f"Cannot read the client CA {client_ca}: {_reason(exc)}."
            ) from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def check_key_file(key: Path) -> None:
    """ConfigurationError unless `key` exists and only its owner and group may read it
    (a group, as Debian's ssl-cert, may be how a service is given its key)."""
    try:
        mode = key.stat().st_mode
    except OSError as exc:
        raise ConfigurationError(f"Cannot read the TLS key {key}: {_reason(exc)}.") from exc
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ConfigurationError(
            f"The TLS key {key} is readable or writable by every user; "
            f"restrict it first (chmod 600 {key})."
        )


@dataclass(frozen=True, slots=True)
class DevCertificate:
    """A development certificate in a home: its files, expiry and whether it is new."""

    cert: Path
    key: Path
    not_after: datetime
    created: bool


def dev_certificate_paths(home: Path) -> tuple[Path, Path]:
    """Where a home keeps its development certificate and key."""
    return home / "tls" / "cert.pem", home / "tls" / "key.pem"


def ensure_dev_certificate(home: Path, *, now: datetime | None = None) -> DevCertificate:
    """The home's development certificate: the one there while it is valid for another
    day, or a new one (written in place of an expiring one)."""
    now = now or datetime.now(UTC)
    cert_path, key_path = dev_certificate_paths(home)
    if cert_path.exists() and key_path.exists():
        try:
            existing = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError:
            existing = None
        if existing is not None and existing.not_valid_after_utc > now + timedelta(days=1):
            return DevCertificate(cert_path, key_path, existing.not_valid_after_utc, False)
    cert_pem, key_pem, not_after = dev_certificate(now=now)
    cert_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write(key_path, key_pem, 0o600)
    _write(cert_path, cert_pem, 0o644)
    return DevCertificate(cert_path, key_path, not_after, True)


def dev_certificate(*, now: datetime) -> tuple[bytes, bytes, datetime]:
    """A new self-signed development certificate: (certificate PEM, key PEM, expiry)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bastion development")])
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in DEV_DNS_NAMES]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in DEV_ADDRESSES]
    not_after = now + timedelta(days=DEV_CERT_DAYS)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem, not_after


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` with `mode` from the start, replacing it whole."""
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.replace(partial, path)


def _no_password() -> bytes:
    # Without this, OpenSSL would prompt on the terminal for an encrypted key's password.
    raise ConfigurationError("The TLS key is encrypted; Bastion needs it unencrypted.")


def _reason(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__
