"""The cluster CA: what it signs, for whom, and what it refuses."""

from __future__ import annotations

import datetime as dt
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bastion.crypto.cluster_ca import (
    CertificateRefused,
    ClusterAuthority,
    client_context,
    replica_id_of,
    replica_key_and_request,
    server_context,
)
from bastion.errors import ConfigurationError

HOUR = dt.timedelta(hours=1)


def _certificate(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def test_a_replica_certificate_names_the_replica_only_for_client_auth_and_a_short_time() -> None:
    authority = ClusterAuthority.generate()
    _, request = replica_key_and_request("abc123")
    issued = authority.issue_replica(request, "abc123", HOUR)
    certificate = _certificate(issued.pem)
    der = certificate.public_bytes(serialization.Encoding.DER)
    assert replica_id_of(der) == "abc123"
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    life = certificate.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(minutes=55) < life <= HOUR
    # Signed by the CA.
    authority.certificate.public_key().verify(  # type: ignore[union-attr]
        certificate.signature,
        certificate.tbs_certificate_bytes,
        ec.ECDSA(hashes.SHA256()),  # type: ignore[call-arg]
    )


def test_names_asked_for_in_the_request_are_ignored() -> None:
    """A request that asks to be another replica (or a server) gets the name it was
    issued for, nothing else."""
    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("urn:bastion:replica:x")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    issued = ClusterAuthority.generate().issue_replica(request, "mine", HOUR)
    der = _certificate(issued.pem).public_bytes(serialization.Encoding.DER)
    assert replica_id_of(der) == "mine"


def test_bad_requests_are_refused() -> None:
    authority = ClusterAuthority.generate()
    with pytest.raises(CertificateRefused):
        authority.issue_replica(b"not a request", "r", HOUR)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "r")]))
        .sign(rsa_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(CertificateRefused, match="P-256"):
        authority.issue_replica(rsa_request, "r", HOUR)


def test_the_sealed_form_round_trips_and_a_wrong_key_is_refused() -> None:
    authority = ClusterAuthority.generate()
    again = ClusterAuthority.load(authority.certificate_pem, authority.private_key_der())
    assert again.fingerprint == authority.fingerprint
    other = ClusterAuthority.generate()
    with pytest.raises(ConfigurationError, match="does not match"):
        ClusterAuthority.load(authority.certificate_pem, other.private_key_der())


def test_contexts_are_tls_1_3_only_and_require_certificates() -> None:
    authority = ClusterAuthority.generate()
    certificate, key = authority.issue_server("10.0.0.1")
    server = server_context(authority.certificate_pem, certificate.pem, key)
    assert server.minimum_version == ssl.TLSVersion.TLSv1_3
    assert server.verify_mode == ssl.CERT_REQUIRED
    replica_key, request = replica_key_and_request("r")
    issued = authority.issue_replica(request, "r", HOUR)
    client = client_context(authority.certificate_pem, issued.pem, replica_key)
    assert client.minimum_version == ssl.TLSVersion.TLSv1_3 and client.check_hostname
    names = _certificate(certificate.pem).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert [str(a) for a in names.value.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
