"""The cluster's certificate authority: mutual TLS 1.3 between a gateway and the model
replicas it placed on other hosts (docs/scaling.md).

`bastion init --cluster` creates one CA (ECDSA P-256) whose private key the key ring seals
and the shared database keeps, so every gateway with the same master key (or KEK) can use
it. A gateway issues itself a server certificate for the address replicas dial
(``BASTION_WORKER_ADVERTISE``), and one client certificate per replica at launch: the
replica's host makes a key pair, sends only a certificate request, and gets back a
certificate naming that replica (``urn:bastion:replica:<id>``) valid for a short time. The
gateway accepts a replica's connection only with the very certificate it issued for the
replica it is waiting for (pinned by fingerprint), so a certificate cannot be replayed by
another replica, and nothing without one can complete a handshake.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import secrets
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bastion.errors import ConfigurationError

# The key ring context of the CA's sealed private key.
CA_CONTEXT = "bastion/cluster-ca/v1"
REPLICA_URI_PREFIX = "urn:bastion:replica:"
_CA_LIFETIME = dt.timedelta(days=3650)
_SERVER_LIFETIME = dt.timedelta(days=7)
# Clock skew tolerated between the gateway and a replica's host.
_BACKDATE = dt.timedelta(minutes=5)


class CertificateRefused(Exception):
    """A certificate request the authority will not sign; the message is safe to log."""


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A certificate in PEM and its SHA-256 fingerprint (of the DER), for pinning."""

    pem: bytes
    fingerprint: str


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


class ClusterAuthority:
    """The CA certificate and its private key (held in memory only)."""

    def __init__(self, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.certificate = certificate
        self._key = key

    @classmethod
    def generate(cls, name: str = "Bastion cluster CA") -> ClusterAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, name),
                x509.NameAttribute(NameOID.SERIAL_NUMBER, secrets.token_hex(8)),
            ]
        )
        now = _now()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key)

    # ------------------------------------------------------------------ storage

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def private_key_der(self) -> bytes:
        """The private key, for the key ring to seal (never stored or sent in the clear)."""
        return self._key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @classmethod
    def load(cls, certificate_pem: bytes, key_der: bytes) -> ClusterAuthority:
        certificate = x509.load_pem_x509_certificate(certificate_pem)
        key = serialization.load_der_private_key(key_der, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigurationError("The cluster CA's key is not an EC key.")
        if key.public_key().public_numbers() != certificate.public_key().public_numbers():  # type: ignore[union-attr]
            raise ConfigurationError("The cluster CA's key does not match its certificate.")
        return cls(certificate, key)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate.public_bytes(serialization.Encoding.DER))

    # ------------------------------------------------------------------ issuing

    def issue_server(self, host: str) -> tuple[IssuedCertificate, bytes]:
        """A server certificate (and its private key, PEM) for a gateway's worker port at
        `host` (an IP address or a DNS name), valid for a week: a gateway issues itself a
        new one at every start."""
        key = ec.generate_private_key(ec.SECP256R1())
        name: x509.GeneralName
        try:
            name = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            name = x509.DNSName(host)
        certificate = self._sign(
            key.public_key(),
            common_name=f"bastion gateway {host}",
            names=[name],
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
            lifetime=_SERVER_LIFETIME,
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return certificate, key_pem

    def issue_replica(
        self, csr_pem: bytes, replica_id: str, lifetime: dt.timedelta
    ) -> IssuedCertificate:
        """A client certificate naming `replica_id` for the key in `csr_pem` (a P-256 key
        whose request is self-signed); whatever names the request asks for are ignored."""
        try:
            request = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise CertificateRefused("the replica's certificate request does not parse") from exc
        if not request.is_signature_valid:
            raise CertificateRefused("the replica's certificate request is not self-signed")
        public_key = request.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise CertificateRefused("the replica's key is not a P-256 key")
        return self._sign(
            public_key,
            common_name=f"bastion replica {replica_id}",
            names=[x509.UniformResourceIdentifier(REPLICA_URI_PREFIX + replica_id)],
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
            lifetime=lifetime,
        )

    def _sign(
        self,
        public_key: ec.EllipticCurvePublicKey,
        *,
        common_name: str,
        names: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        lifetime: dt.timedelta,
    ) -> IssuedCertificate:
        now = _now()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        der = certificate.public_bytes(serialization.Encoding.DER)
        return IssuedCertificate(
            certificate.public_bytes(serialization.Encoding.PEM), fingerprint(der)
        )


def replica_key_and_request(replica_id: str) -> tuple[bytes, bytes]:
    """A replica host's new private key (PEM, stays on that host) and the certificate
    request to send to the gateway."""
    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"bastion replica {replica_id}")])
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, request.public_bytes(serialization.Encoding.PEM)


def replica_id_of(der: bytes) -> str | None:
    """The replica a client certificate names (None: it names none)."""
    try:
        certificate = x509.load_der_x509_certificate(der)
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (ValueError, x509.ExtensionNotFound):
        return None
    for uri in names.value.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(REPLICA_URI_PREFIX):
            return uri[len(REPLICA_URI_PREFIX) :]
    return None


def server_context(ca_pem: bytes, certificate_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """The gateway's worker port: TLS 1.3 only, a client certificate from the CA required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=ca_pem.decode())
    _load_chain(context, certificate_pem, key_pem)
    return context


def client_context(ca_pem: bytes, certificate_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A replica's end: TLS 1.3 only, the gateway's certificate checked against the CA and
    the address dialled."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(context)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=ca_pem.decode())
    _load_chain(context, certificate_pem, key_pem)
    return context


def _harden(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    # No session tickets: nothing resumes a replica's session without its key.
    context.options |= ssl.OP_NO_TICKET


def _load_chain(context: ssl.SSLContext, certificate_pem: bytes, key_pem: bytes) -> None:
    # The ssl module reads keys from files only: a private temporary folder, removed at once.
    with tempfile.TemporaryDirectory(prefix="bastion-tls-") as folder:
        certificate = Path(folder) / "cert.pem"
        key = Path(folder) / "key.pem"
        certificate.write_bytes(certificate_pem)
        key.touch(mode=0o600)
        key.write_bytes(key_pem)
        context.load_cert_chain(certificate, key)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
