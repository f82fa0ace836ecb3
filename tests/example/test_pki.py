"""
Tests for shardtcp.example.pki: the certificates it issues verify against its CA with
OpenSSL, carry the names and usages asked for, and are written to disk safely.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.trial.unittest import SynchronousTestCase

from shardtcp.example.pki import CertificateAuthority, Issued

UTC = datetime.timezone.utc


def verify(ca: CertificateAuthority, issued: Issued, when: datetime.datetime | None = None) -> None:
    """
    Verify ``issued`` against ``ca`` with OpenSSL's X509Store, strict checks on;
    raise ``crypto.X509StoreContextError`` when it does not verify.
    """
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(ca.cert))
    store.set_flags(crypto.X509StoreFlags.X509_STRICT)
    if when is not None:
        store.set_time(when)
    leaf = crypto.X509.from_cryptography(issued.cert)
    crypto.X509StoreContext(store, leaf).verify_certificate()


def sans(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    """The subjectAltName extension of ``cert``."""
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def usages(cert: x509.Certificate) -> list:
    """The extendedKeyUsage OIDs of ``cert``."""
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


class AuthorityTests(SynchronousTestCase):
    """The CA certificate itself."""

    def test_ca_is_self_signed_ca(self) -> None:
        """The CA certificate is a CA, names itself as issuer and verifies against itself."""
        ca = CertificateAuthority("Example CA")
        cn = ca.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        self.assertEqual(cn, "Example CA")
        self.assertEqual(ca.cert.issuer, ca.cert.subject)
        bc = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(bc.value.ca)
        self.assertTrue(bc.critical)
        store = crypto.X509Store()
        store.add_cert(crypto.X509.from_cryptography(ca.cert))
        crypto.X509StoreContext(store, crypto.X509.from_cryptography(ca.cert)).verify_certificate()

    def test_pem_round_trip(self) -> None:
        """cert_pem and key_pem load back to the same certificate and a matching key."""
        ca = CertificateAuthority()
        self.assertEqual(x509.load_pem_x509_certificate(ca.cert_pem), ca.cert)
        private = ssl.PrivateCertificate.loadPEM(ca.cert_pem + ca.key_pem)
        self.assertEqual(private.getPublicKey().original.to_cryptography_key().public_numbers(),
                         ca.cert.public_key().public_numbers())

    def test_rsa_key_type(self) -> None:
        """key_type="rsa" gives an RSA CA whose issued certificates verify."""
        ca = CertificateAuthority(key_type="rsa")
        issued = ca.issue_server(["rsa.example.test"])
        self.assertEqual(issued.cert.public_key().key_size, 2048)
        verify(ca, issued)

    def test_unknown_key_type(self) -> None:
        """An unknown key type is refused."""
        self.assertRaises(ValueError, CertificateAuthority, key_type="dsa")

    def test_write_ca(self) -> None:
        """write() stores the CA certificate as <stem>.pem and returns its path."""
        ca = CertificateAuthority()
        directory = self.mktemp()
        os.mkdir(directory)
        path = ca.write(directory)
        self.assertEqual(path, os.path.join(directory, "ca.pem"))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), ca.cert_pem)
        self.assertEqual(os.listdir(directory), ["ca.pem"])


class ServerCertificateTests(SynchronousTestCase):
    """Certificates from issue_server."""

    def setUp(self) -> None:
        self.ca = CertificateAuthority()

    def test_verifies(self) -> None:
        """A server certificate verifies against its CA under strict checks."""
        verify(self.ca, self.ca.issue_server(["api.example.test"]))

    def test_other_ca_refused(self) -> None:
        """A certificate does not verify against a different CA."""
        other = CertificateAuthority()
        issued = other.issue_server(["api.example.test"])
        self.assertRaises(crypto.X509StoreContextError, verify, self.ca, issued)

    def test_names(self) -> None:
        """DNS names become DNS SANs, IP strings IP SANs, and the first name is the CN."""
        issued = self.ca.issue_server(["api.example.test", "*.api.example.test", "127.0.0.1", "::1"])
        alt = sans(issued.cert)
        self.assertEqual(alt.get_values_for_type(x509.DNSName), ["api.example.test", "*.api.example.test"])
        self.assertEqual(
            alt.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )
        cn = issued.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        self.assertEqual(cn, "api.example.test")

    def test_common_name(self) -> None:
        """common_name overrides the subject's CN."""
        issued = self.ca.issue_server(["a.example.test"], common_name="shard a")
        cn = issued.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        self.assertEqual(cn, "shard a")

    def test_server_auth(self) -> None:
        """A server certificate has the serverAuth usage only, and is not a CA."""
        issued = self.ca.issue_server(["api.example.test"])
        self.assertEqual(usages(issued.cert), [ExtendedKeyUsageOID.SERVER_AUTH])
        self.assertFalse(issued.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)

    def test_service_identity(self) -> None:
        """service-identity accepts the certificate for its DNS and IP names, not others."""
        from service_identity import VerificationError
        from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address

        issued = self.ca.issue_server(["api.example.test", "127.0.0.1"])
        verify_certificate_hostname(issued.cert, "api.example.test")
        verify_certificate_ip_address(issued.cert, "127.0.0.1")
        self.assertRaises(VerificationError, verify_certificate_hostname, issued.cert, "other.example.test")

    def test_default_validity(self) -> None:
        """By default validity runs from an hour before now to 30 days after."""
        now = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
        ca = CertificateAuthority(now=now)
        cert = ca.issue_server(["api.example.test"]).cert
        self.assertEqual(cert.not_valid_before_utc, now - datetime.timedelta(hours=1))
        self.assertEqual(cert.not_valid_after_utc, now + datetime.timedelta(days=30))

    def test_expired(self) -> None:
        """A not_after in the past gives a certificate OpenSSL reports as expired."""
        past = datetime.datetime.now(UTC) - datetime.timedelta(days=1)
        issued = self.ca.issue_server(["api.example.test"], not_after=past)
        self.assertLess(issued.cert.not_valid_before_utc, issued.cert.not_valid_after_utc)
        with self.assertRaises(crypto.X509StoreContextError) as caught:
            verify(self.ca, issued)
        self.assertEqual(caught.exception.errors[0], 10)  # X509_V_ERR_CERT_HAS_EXPIRED

    def test_not_yet_valid(self) -> None:
        """A not_before in the future gives a certificate that is not yet valid."""
        future = datetime.datetime.now(UTC) + datetime.timedelta(days=1)
        issued = self.ca.issue_server(["api.example.test"], not_before=future)
        self.assertLess(issued.cert.not_valid_before_utc, issued.cert.not_valid_after_utc)
        with self.assertRaises(crypto.X509StoreContextError) as caught:
            verify(self.ca, issued)
        self.assertEqual(caught.exception.errors[0], 9)  # X509_V_ERR_CERT_NOT_YET_VALID

    def test_inverted_validity(self) -> None:
        """not_after before not_before is refused."""
        now = datetime.datetime.now(UTC)
        self.assertRaises(
            ValueError,
            self.ca.issue_server,
            ["api.example.test"],
            not_before=now,
            not_after=now - datetime.timedelta(seconds=1),
        )

    def test_no_names(self) -> None:
        """A server certificate without any name is refused."""
        self.assertRaises(ValueError, self.ca.issue_server, [])

    def test_twisted_loads(self) -> None:
        """Twisted builds CertificateOptions from the issued PEM pair."""
        issued = self.ca.issue_server(["api.example.test"])
        options = ssl.PrivateCertificate.loadPEM(issued.cert_pem + issued.key_pem).options()
        options.getContext()


class ClientCertificateTests(SynchronousTestCase):
    """Certificates from issue_client."""

    def setUp(self) -> None:
        self.ca = CertificateAuthority()

    def test_uri_and_dns(self) -> None:
        """The URI and DNS SANs are present, the CN is the subject, and the usage is clientAuth."""
        issued = self.ca.issue_client(
            "orders", uri="spiffe://example.test/orders", dns=["orders.example.test"]
        )
        verify(self.ca, issued)
        alt = sans(issued.cert)
        self.assertEqual(
            alt.get_values_for_type(x509.UniformResourceIdentifier), ["spiffe://example.test/orders"]
        )
        self.assertEqual(alt.get_values_for_type(x509.DNSName), ["orders.example.test"])
        cn = issued.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        self.assertEqual(cn, "orders")
        self.assertEqual(usages(issued.cert), [ExtendedKeyUsageOID.CLIENT_AUTH])

    def test_cn_only(self) -> None:
        """Without uri or dns the certificate has no subjectAltName and still verifies."""
        issued = self.ca.issue_client("alice")
        verify(self.ca, issued)
        self.assertRaises(
            x509.ExtensionNotFound, issued.cert.extensions.get_extension_for_class, x509.SubjectAlternativeName
        )

    def test_expired(self) -> None:
        """An expired client certificate is reported expired."""
        past = datetime.datetime.now(UTC) - datetime.timedelta(hours=2)
        issued = self.ca.issue_client("alice", not_after=past)
        with self.assertRaises(crypto.X509StoreContextError) as caught:
            verify(self.ca, issued)
        self.assertEqual(caught.exception.errors[0], 10)


class WriteTests(SynchronousTestCase):
    """Issued.write."""

    def test_write(self) -> None:
        """write() stores <stem>.pem and <stem>.key with their PEM contents, the key mode 0600."""
        issued = CertificateAuthority().issue_server(["api.example.test"])
        directory = self.mktemp()
        os.mkdir(directory)
        cert_path, key_path = issued.write(directory, "api")
        self.assertEqual(cert_path, os.path.join(directory, "api.pem"))
        self.assertEqual(key_path, os.path.join(directory, "api.key"))
        with open(cert_path, "rb") as f:
            self.assertEqual(f.read(), issued.cert_pem)
        with open(key_path, "rb") as f:
            self.assertEqual(f.read(), issued.key_pem)
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)

    def test_rewrite_tightens_mode(self) -> None:
        """Writing over an existing, world-readable key file leaves it at 0600."""
        issued = CertificateAuthority().issue_server(["api.example.test"])
        directory = self.mktemp()
        os.mkdir(directory)
        key_path = os.path.join(directory, "api.key")
        with open(key_path, "wb") as f:
            f.write(b"old")
        os.chmod(key_path, 0o644)
        issued.write(directory, "api")
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)
        with open(key_path, "rb") as f:
            self.assertEqual(f.read(), issued.key_pem)
